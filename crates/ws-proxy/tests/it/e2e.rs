//! curl -> ws-proxy-client connect -> ws-proxy -> ws-proxy-client gateway -> a local HTTP
//! service, with both clients as real processes.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::routing::{get, post, put};
use testkit::{Leaf, test_pki};
use tokio::process::{Child, Command};

use crate::support::{Proxy, WAIT, quick};

const CLIENT: &str = env!("CARGO_BIN_EXE_ws-proxy-client");

/// The service behind the gateway.
async fn upstream() -> SocketAddr {
    let app = Router::new()
        .route("/hello", get(|| async { "hello world" }))
        .route(
            "/json",
            post(|headers: HeaderMap, body: Bytes| async move {
                let kind = headers
                    .get(header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap_or("?").to_owned());
                let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                (
                    StatusCode::CREATED,
                    axum::Json(serde_json::json!({"got": value, "type": kind})),
                )
            }),
        )
        .route(
            "/items/1",
            put(|body: String| async move { format!("stored {body}") })
                .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .route(
            "/bin",
            post(|headers: HeaderMap, body: Bytes| async move {
                let reversed: Vec<u8> = body.iter().rev().copied().collect();
                let kind = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                ([(header::CONTENT_TYPE, kind)], reversed)
            }),
        )
        .route(
            "/echo-query",
            get(|uri: Uri| async move { uri.query().unwrap_or("").to_owned() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such thing") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client(role: &str, url: &str, leaf: &Leaf, extra: &[&str]) -> Child {
    Command::new(CLIENT)
        .arg(role)
        .arg(url)
        .arg("--pkeycert")
        .arg(&leaf.pkeycert_path)
        .arg("--ca")
        .arg(&test_pki().ca_path)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ws-proxy-client")
}

/// Runs curl; returns (status, body bytes).
async fn curl(args: &[&str]) -> (u16, Vec<u8>) {
    let output = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl runs (install curl)");
    let mut out = output.stdout;
    let split = out.iter().rposition(|b| *b == b'\n').expect("status line");
    let status = std::str::from_utf8(&out[split + 1..])
        .unwrap()
        .parse()
        .unwrap();
    out.truncate(split);
    (status, out)
}

#[tokio::test]
async fn curl_through_client_proxy_and_gateway_to_a_local_service() {
    let proxy = Proxy::start(quick()).await;
    let service = upstream().await;
    let pki = test_pki();
    let url = proxy.url("gw-test/e2e");
    let _gateway = client(
        "gateway",
        &url,
        &pki.bob,
        &["--upstream", &format!("http://{service}")],
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _front = client("connect", &url, &pki.alice, &["--http-listen", &listen]);
    let base = format!("http://{listen}");

    // Ready once paired: the front end answers 503 until then.
    testkit::eventually("the two clients to pair", WAIT, || async {
        (curl(&[&format!("{base}/hello")]).await.0 == 200).then_some(())
    })
    .await;

    let (status, body) = curl(&[&format!("{base}/hello")]).await;
    assert_eq!((status, body.as_slice()), (200, b"hello world".as_slice()));

    // HEAD has no body, yet keeps the upstream's Content-Type and Content-Length (the length
    // of the body a GET would get; it was 0).
    let (status, head) = curl(&["-I", &format!("{base}/hello")]).await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert!(head.contains("content-length: 11\r\n"), "{head}");

    let (status, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"device\": \"x\", \"n\": 1}",
        &format!("{base}/json"),
    ])
    .await;
    assert_eq!(status, 201);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["got"], serde_json::json!({"device": "x", "n": 1}));
    assert_eq!(json["type"], "application/json");

    let (status, body) = curl(&["-X", "PUT", "-d", "caf\u{e9}", &format!("{base}/items/1")]).await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (200, "stored caf\u{e9}".to_owned())
    );

    let (status, body) = curl(&["-X", "DELETE", &format!("{base}/items/1")]).await;
    assert_eq!((status, body.len()), (204, 0));

    let binary: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, &binary).unwrap();
    let (status, body) = curl(&[
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{base}/bin"),
    ])
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, binary.iter().rev().copied().collect::<Vec<u8>>());

    let (status, body) = curl(&[&format!("{base}/echo-query?a=1&b=two")]).await;
    assert_eq!((status, body.as_slice()), (200, b"a=1&b=two".as_slice()));

    let (status, body) = curl(&[&format!("{base}/missing")]).await;
    assert_eq!(
        (status, body.as_slice()),
        (404, b"no such thing".as_slice())
    );

    // Several requests in flight at once, each matched to its own answer.
    let started = std::time::Instant::now();
    let slow = format!("{base}/slow");
    let hello = format!("{base}/hello");
    let answers = futures_util::future::join_all((0..6).map(|i| {
        let target = if i % 2 == 0 {
            slow.clone()
        } else {
            hello.clone()
        };
        async move { (i, curl(&[&target]).await) }
    }))
    .await;
    for (i, (status, body)) in answers {
        let expected: &[u8] = if i % 2 == 0 { b"slow" } else { b"hello world" };
        assert_eq!((status, body.as_slice()), (200, expected), "request {i}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "requests were serialised"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn events_typed_on_the_gateways_stdin_are_printed_by_the_connect_side() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let proxy = Proxy::start(quick()).await;
    let service = upstream().await;
    let pki = test_pki();
    let url = proxy.url("gw-test/events");
    let mut gateway = client(
        "gateway",
        &url,
        &pki.bob,
        &["--upstream", &format!("http://{service}")],
    );
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut front = client("connect", &url, &pki.alice, &["--http-listen", &listen]);
    proxy
        .wait_for(|s| s.meetups.first().is_some_and(|m| m.state == "paired"))
        .await;
    let event = r#"{"message": {"messageId": 7, "messageType": "EVENT:DEVICE:CONNECTED", "requiresResponse": false, "dataFormat": "application/json", "messageBody": {"id": "d1"}}}"#;
    let mut stdin = gateway.stdin.take().unwrap();
    stdin.write_all(b"not json\n").await.unwrap();
    stdin
        .write_all(format!("{event}\n").as_bytes())
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    let mut lines = tokio::io::BufReader::new(front.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("event printed in time")
        .unwrap()
        .unwrap();
    assert_eq!(line, event);
    proxy.stop().await;
    // Both clients notice the shutdown and keep running to reconnect; `quit` ends them.
    let _ = front.kill().await;
    let _ = gateway.kill().await;
}

#[tokio::test]
async fn the_client_exits_77_when_the_proxy_refuses_its_certificate_for_the_id() {
    let mut config = quick();
    config.rules = ws_proxy::auth::Rules::new(vec![
        ws_proxy::auth::Rule::compile(&ws_proxy::auth::RuleSpec {
            cn: Some("alice".into()),
            ids: vec!["mine".into()],
            ..Default::default()
        })
        .unwrap(),
    ]);
    let proxy = Proxy::start(config).await;
    let pki = test_pki();
    let port = free_port().to_string();
    let mut child = client(
        "connect",
        &proxy.url("not-mine"),
        &pki.alice,
        &["--http-listen", &format!("127.0.0.1:{port}")],
    );
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(77));
    proxy.stop().await;
}

#[tokio::test]
async fn an_unanswered_request_gets_504_and_the_client_reconnects_after_a_close() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    let url = proxy.url("gw-test/quiet");
    let listen = format!("127.0.0.1:{}", free_port());
    // Separate --cert/--key this time, and a short request deadline.
    let _front = Command::new(CLIENT)
        .args(["connect", &url, "--cert"])
        .arg(&pki.alice.cert_path)
        .arg("--key")
        .arg(&pki.alice.key_path)
        .arg("--ca")
        .arg(&pki.ca_path)
        .args([
            "--http-listen",
            &listen,
            "--request-timeout",
            "1",
            "--max-backoff",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Before a partner arrives the front end says so.
    testkit::eventually("the front end to answer 503", WAIT, || async {
        (curl(&[&format!("http://{listen}/x")]).await.0 == 503).then_some(())
    })
    .await;

    // A partner that reads the request but never answers.
    let mut partner = proxy.connect(&pki.bob, "gw-test/quiet").await;
    crate::support::send(&mut partner, &crate::support::hello("quiet")).await;
    let first = crate::support::recv_text(&mut partner).await;
    assert!(first.contains("micronets-ws-test-client"), "{first}");
    let started = std::time::Instant::now();
    let (status, body) = curl(&[&format!("http://{listen}/never")]).await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < Duration::from_secs(5));
    let request = crate::support::recv_text(&mut partner).await;
    assert!(
        request.contains("REST:REQUEST") && request.contains("/never"),
        "{request}"
    );

    // The partner leaves: the proxy closes the client with 1002 and the client comes back.
    drop(partner);
    let mut second = proxy.connect(&pki.bob, "gw-test/quiet").await;
    crate::support::send(&mut second, &crate::support::hello("second")).await;
    let again = crate::support::recv_text(&mut second).await;
    assert!(again.contains("micronets-ws-test-client"), "{again}");
    proxy.stop().await;
}

#[tokio::test]
async fn certificate_refusals_exit_77_with_once() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    let url = proxy.url("gw-test/x");
    let run = |leaf: &Leaf, ca: &std::path::Path| {
        let mut command = Command::new(CLIENT);
        command
            .args(["connect", &url, "--once", "--http-listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--cert")
            .arg(&leaf.pkeycert_path)
            .arg("--ca")
            .arg(ca)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    // The proxy refuses mallory's certificate (unknown CA, an alert after the handshake).
    let out = tokio::time::timeout(WAIT, run(&pki.mallory, &pki.ca_path).output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains("refused our certificate"), "{stderr}");
    // We refuse the proxy's certificate (signed by a CA we do not trust).
    let out = tokio::time::timeout(WAIT, run(&pki.alice, &pki.untrusted_ca_path).output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    proxy.stop().await;
}
