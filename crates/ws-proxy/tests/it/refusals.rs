//! Who is refused, and how: TLS, paths, authorization rules; reload keeps live pairs.

use common::tls::{ClientAuth, ServerTlsFiles};
use testkit::test_pki;
use ws_proxy::auth::{Rule, RuleSpec, Rules};
use ws_proxy::client::ClientError;
use ws_proxy::metrics::Refusal;

use crate::support::{Proxy, copy_to, hello, quick, recv_text, send};

#[tokio::test]
async fn bad_certificates_are_refused_in_the_handshake() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    for (who, leaf) in [
        ("no certificate", None),
        ("untrusted ca", Some(&pki.mallory)),
        ("revoked", Some(&pki.revoked)),
        ("expired", Some(&pki.expired)),
    ] {
        match proxy.dial(leaf, "gw/1").await {
            Ok(_) => panic!("{who}: accepted"),
            Err(ClientError::Refused { .. }) => panic!("{who}: reached HTTP"),
            Err(_) => {}
        }
    }
    proxy
        .wait_for(|_| proxy.server.metrics().refusals(Refusal::tls) == 4)
        .await;
    // A certificate from the intermediate CA (chain sent by the client) is fine.
    let mut carol = proxy.connect(&pki.chained_client, "gw/1").await;
    send(&mut carol, &hello("carol")).await;
    proxy.wait_for(|s| s.meetups.len() == 1).await;
    assert_eq!(
        proxy.server.status().meetups[0].peers[0]
            .identity
            .as_ref()
            .unwrap()
            .cn
            .as_deref(),
        Some("carol")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn paths_outside_the_prefix_and_bad_ids_are_refused_before_the_upgrade() {
    let proxy = Proxy::start(quick()).await;
    let alice = &test_pki().alice;
    let port = proxy.addr.port();
    let long = "x".repeat(257);
    let cases = [
        (format!("wss://localhost:{port}/micronets/v1/ws-proxy"), 404),
        (format!("wss://localhost:{port}/other/gw/1"), 404),
        (
            format!("wss://localhost:{port}/micronets/v1/ws-proxy/"),
            400,
        ),
        (
            format!("wss://localhost:{port}/micronets/v1/ws-proxy/{long}"),
            400,
        ),
    ];
    for (url, expected) in cases {
        let result = ws_proxy::client::connect(&crate::support::options(&url, Some(alice))).await;
        match result {
            Err(ClientError::Refused { status, .. }) => assert_eq!(status, expected, "{url}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    // 256 bytes is fine.
    proxy.connect(alice, &"y".repeat(256)).await;
    proxy.stop().await;
}

#[tokio::test]
async fn authorization_rules_map_identities_to_ids() {
    let spec = |cn: &str, ids: &[&str]| RuleSpec {
        cn: Some(cn.to_owned()),
        ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        ..RuleSpec::default()
    };
    let mut config = quick();
    config.rules = Rules::new(vec![
        Rule::compile(&spec("alice", &["gw/{cn}", "shared/*"])).unwrap(),
        Rule::compile(&spec("b*", &["shared/*"])).unwrap(),
    ]);
    let proxy = Proxy::start(config).await;
    let pki = test_pki();
    let check = |leaf, id: &'static str, allowed: bool| {
        let proxy = &proxy;
        async move {
            let result = proxy.dial(Some(leaf), id).await;
            match (allowed, result) {
                (true, Ok(_)) => {}
                (false, Err(ClientError::Refused { status: 403, .. })) => {}
                (_, other) => panic!("{id}: expected allowed={allowed}, got {other:?}"),
            }
        }
    };
    check(&pki.alice, "gw/alice", true).await;
    check(&pki.alice, "gw/bob", false).await;
    check(&pki.alice, "shared/x", true).await;
    check(&pki.alice, "shared/x/y", false).await;
    check(&pki.bob, "shared/x", true).await;
    check(&pki.bob, "gw/bob", false).await;
    check(&pki.chained_client, "shared/x", false).await;
    assert_eq!(proxy.server.metrics().refusals(Refusal::forbidden), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn reload_swaps_the_certificate_and_keeps_live_pairs() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let cert = copy_to(dir.path(), &pki.server.cert_path, "cert.pem");
    let key = copy_to(dir.path(), &pki.server.key_path, "key.pem");
    let crl = copy_to(dir.path(), &pki.crl_path, "crl.pem");
    let empty_crl = pki
        .ca
        .issue_crl(&common::pki::CrlParams::new(
            time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
            time::Duration::days(1),
        ))
        .unwrap();
    std::fs::write(&crl, &empty_crl.pem).unwrap();
    let proxy = Proxy::start_with(
        quick(),
        ServerTlsFiles {
            cert: cert.clone(),
            key: Some(key.clone()),
            client_ca: Some(pki.ca_path.clone()),
            crls: vec![crl.clone()],
            client_auth: ClientAuth::Required,
            alpn: Vec::new(),
        },
    )
    .await;
    let (mut a, mut b) = proxy.pair("live").await;
    // `revoked` is not revoked yet under the empty CRL.
    let before = proxy.connect(&pki.revoked, "other").await;
    drop(before);

    std::fs::copy(&pki.server2.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server2.key_path, &key).unwrap();
    std::fs::copy(&pki.crl_path, &crl).unwrap();
    proxy.server.reload().unwrap();

    // The live pair still relays both ways.
    send(&mut a, "after reload").await;
    assert_eq!(recv_text(&mut b).await, "after reload");
    send(&mut b, "still here").await;
    assert_eq!(recv_text(&mut a).await, "still here");
    // New connections see the new certificate and the new CRL.
    let fresh = proxy.connect(&pki.alice, "new").await;
    let (_, conn) = fresh.get_ref().get_ref();
    let leaf = conn.peer_certificates().unwrap()[0].clone();
    let identity = common::tls::PeerIdentity::from_der(leaf.as_ref()).unwrap();
    assert_eq!(identity.cn.as_deref(), Some("server2"));
    assert!(proxy.dial(Some(&pki.revoked), "other").await.is_err());

    // A broken file keeps the running material.
    std::fs::write(&cert, "garbage").unwrap();
    assert!(proxy.server.reload().is_err());
    proxy.connect(&pki.alice, "new2").await;
    proxy.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_dropped() {
    let mut config = quick();
    config.max_connections = 2;
    let proxy = Proxy::start(config).await;
    let pki = test_pki();
    let _one = proxy.connect(&pki.alice, "a").await;
    let _two = proxy.connect(&pki.alice, "b").await;
    assert!(proxy.dial(Some(&pki.alice), "c").await.is_err());
    assert_eq!(proxy.server.metrics().refusals(Refusal::max_connections), 1);
    drop(_one);
    // The slot comes back once the first connection has ended.
    testkit::eventually("a slot to free up", crate::support::WAIT, || async {
        proxy.dial(Some(&pki.alice), "c").await.ok()
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_plain_https_request_gets_426_with_directions() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    let output = tokio::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "10", "--cacert"])
        .arg(&pki.ca_path)
        .arg("--cert")
        .arg(&pki.alice.cert_path)
        .arg("--key")
        .arg(&pki.alice.key_path)
        .arg(format!(
            "https://localhost:{}/micronets/v1/ws-proxy/x",
            proxy.addr.port()
        ))
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.starts_with("HTTP/1.1 426"), "{text}");
    assert!(
        text.contains("wss://HOST:PORT/micronets/v1/ws-proxy/ID"),
        "{text}"
    );
    assert_eq!(proxy.server.metrics().refusals(Refusal::upgrade), 1);
    // The proxy still serves websockets afterwards.
    proxy.connect(&pki.alice, "x").await;
    proxy.stop().await;
}

/// Issue 14: idle sockets that never start the TLS handshake took `max_connections` slots and
/// locked everyone out. Now they wait in the stranger pool (three per address here), are
/// closed at the handshake deadline, and a client with a certificate is served meanwhile.
#[tokio::test]
async fn idle_strangers_do_not_lock_out_clients_with_certificates() {
    use std::time::Duration;
    use testkit::front::{closed_within, idle_crowd, tls_from_other_loopback};

    let deadline = Duration::from_secs(1);
    let mut config = quick();
    config.max_connections = 4;
    config.limits.handshake_timeout = deadline;
    config.limits.max_handshakes = 16;
    config.limits.max_handshakes_per_address = 3;
    let proxy = Proxy::start(config).await;
    let crowd = idle_crowd(proxy.addr, 40).await;

    // A client with a certificate, from another address, upgrades and is relayed.
    let pki = test_pki();
    let tls = tls_from_other_loopback(proxy.addr, &pki.alice, &[]).await;
    let (mut alice, _) = tokio_tungstenite::client_async(proxy.url("crowd"), tls)
        .await
        .expect("alice upgrades past the crowd");
    send(&mut alice, &hello("alice")).await;
    proxy.wait_for(|s| s.meetups.len() == 1).await;

    let stats = proxy.server.admission().stats();
    assert_eq!((stats.strangers, stats.connections), (3, 1), "{stats:?}");
    let metrics = proxy.server.metrics();
    assert_eq!(metrics.refusals(Refusal::max_handshakes_per_address), 37);
    assert_eq!(metrics.refusals(Refusal::max_connections), 0);

    // The refused are closed at once, the three waiting ones at the deadline.
    let (closed, last) = closed_within(crowd, deadline * 4).await;
    assert_eq!(closed, 40);
    assert!(last >= deadline / 2 && last < deadline * 3, "{last:?}");
    proxy
        .wait_for(|_| proxy.server.metrics().refusals(Refusal::tls_timeout) == 3)
        .await;
    drop(alice);
    proxy.stop().await;
}

/// A TLS connection to the proxy as `leaf`, handshake done.
async fn tls_as(
    proxy: &Proxy,
    leaf: &testkit::Leaf,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let files = common::tls::ClientTlsFiles {
        ca: Some(test_pki().ca_path.clone()),
        cert: Some(leaf.cert_path.clone()),
        key: Some(leaf.key_path.clone()),
        ..common::tls::ClientTlsFiles::default()
    };
    let config = std::sync::Arc::new(common::tls::client_config(&files).unwrap());
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    common::tls::connect(config, "localhost", tcp, crate::support::WAIT)
        .await
        .unwrap()
}

/// Sends `request` on `tls` and returns the whole answer (the proxy closes after a refusal).
async fn exchange(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    request: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tls.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(crate::support::WAIT, tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends `request` over TLS as `leaf`; the whole answer.
async fn raw(proxy: &Proxy, leaf: &testkit::Leaf, request: &[u8]) -> String {
    exchange(tls_as(proxy, leaf).await, request).await
}

fn upgrade_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes()
}

/// Issue 18: the 404, 400, 403 and 409 answers came from tungstenite with no headers at all.
/// Every refusal now has the 426's headers: Date, Content-Type, a Content-Length that is the
/// body's, and `Connection: close`.
#[tokio::test]
async fn every_refusal_carries_the_same_headers() {
    let spec = |cn: &str, ids: &[&str]| {
        Rule::compile(&RuleSpec {
            cn: Some(cn.to_owned()),
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            ..RuleSpec::default()
        })
        .unwrap()
    };
    let mut config = quick();
    config.limits.max_connections_per_identity = 2;
    config.rules = Rules::new(vec![
        spec("alice", &["**"]),
        spec("bob", &["**"]),
        spec("carol", &["gw/**", "full"]),
    ]);
    let proxy = Proxy::start(config).await;
    let pki = test_pki();
    let carol = &pki.chained_client;
    let (_a, _b) = proxy.pair("full").await;
    let prefix = "/micronets/v1/ws-proxy";
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(16 * 1024));
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (404, upgrade_request("/other/gw/1")),
        (400, upgrade_request(&format!("{prefix}/"))),
        (403, upgrade_request(&format!("{prefix}/elsewhere"))),
        (409, upgrade_request(&format!("{prefix}/full"))),
        (
            426,
            format!("GET {prefix}/gw/1 HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
        ),
        (400, b"\x16\x03\x01 not http\r\n\r\n".to_vec()),
        (431, huge.into_bytes()),
    ];
    let check = |status: u16, answer: &str| {
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("\r\nconnection: close"), "{head}");
        assert!(
            lower.contains("\r\ncontent-type: text/plain; charset=utf-8"),
            "{head}"
        );
        assert!(lower.contains("\r\ndate: "), "{head}");
        assert!(
            lower.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        assert!(!body.trim().is_empty(), "{answer}");
    };
    for (status, request) in cases {
        check(status, &raw(&proxy, carol, &request).await);
    }
    // 429: carol already has max_connections_per_identity (2) connections.
    let _one = proxy.connect(carol, "gw/1").await;
    let _two = proxy.connect(carol, "gw/2").await;
    check(
        429,
        &raw(&proxy, carol, &upgrade_request(&format!("{prefix}/gw/3"))).await,
    );
    drop((_one, _two));
    // 503: the proxy began shutting down between the handshake and the request.
    let tls = tls_as(&proxy, &pki.alice).await;
    proxy.shutdown().trigger();
    check(
        503,
        &exchange(tls, &upgrade_request(&format!("{prefix}/gw/4"))).await,
    );
    proxy.stop().await;
}

/// Attack pass F3: requests the websocket library refused by closing the connection got no
/// answer (HTTP/1.0, a malformed key, bytes after the head), two versions were accepted, a
/// HEAD got a body and the 431 said the head was not HTTP. Each now gets its answer.
#[tokio::test]
async fn malformed_upgrades_get_an_http_answer() {
    let proxy = Proxy::start(quick()).await;
    let alice = &test_pki().alice;
    let good = String::from_utf8(upgrade_request("/micronets/v1/ws-proxy/x")).unwrap();
    let with = |from: &str, to: &str| good.replacen(from, to, 1).into_bytes();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("HTTP/1.0", with("HTTP/1.1", "HTTP/1.0"), 400, "HTTP/1.1"),
        (
            "key x",
            with("dGhlIHNhbXBsZSBub25jZQ==", "x"),
            400,
            "Sec-WebSocket-Key",
        ),
        (
            "two versions",
            with("\r\n\r\n", "\r\nSec-WebSocket-Version: 12\r\n\r\n"),
            400,
            "Sec-WebSocket-Version",
        ),
        (
            "a body",
            format!("{good}hello").into_bytes(),
            400,
            "bytes after the upgrade request",
        ),
        (
            "a HELLO frame with the request",
            [good.as_bytes(), b"\x81\x85abcd\x29\x07\x0f\x08\x0e"].concat(),
            400,
            "bytes after the upgrade request",
        ),
        (
            "65 header lines",
            format!("GET / HTTP/1.1\r\n{}\r\n", "X: a\r\n".repeat(65)).into_bytes(),
            431,
            "64 header lines",
        ),
    ];
    for (what, request, status, says) in cases {
        let answer = raw(&proxy, alice, &request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {answer:?}"
        );
        assert!(answer.contains(says), "{what}: {answer}");
    }
    // A HEAD gets the 426's headers and no body.
    let answer = raw(
        &proxy,
        alice,
        b"HEAD /micronets/v1/ws-proxy/x HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 426 "), "{answer}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: "),
        "{head}"
    );
    assert_eq!(body, "", "{answer}");
    proxy.stop().await;
}
