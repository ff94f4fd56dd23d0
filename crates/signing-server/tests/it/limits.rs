//! Limits and reloads: `max_connections` (connections over it are closed at once, slots come
//! back when connections close), SIGHUP reloading the daemon binary's TLS certificate (a file
//! that does not load keeps the old one), a stalled upload (408 after `io_timeout_secs`) and
//! an over-size upload (413, nothing signed).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use signing_server::config::Limits;
use signing_server::ed448::Ed448Key;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{
    Answer, Daemon, Options, STEP, TestServer, client_config, full, legacy, pki, sha256_hex,
    streamed, test_limits, tls_connect, write_private,
};

/// A server with `limits`.
async fn server_with(limits: Limits) -> TestServer {
    TestServer::start(Options {
        limits,
        ..Options::default()
    })
    .await
}

/// How many upload spool files are left behind.
fn spooled(server: &TestServer) -> usize {
    std::fs::read_dir(server.state.join("spool"))
        .unwrap()
        .count()
}

// ---------------------------------------------------------------------------------------
// max_connections
// ---------------------------------------------------------------------------------------

/// Whether the server closes `tls` within `within` (EOF or an error on read) rather than
/// waiting for the path.
async fn closed_by_server(tls: &mut Tls, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tls.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Asserts that a connection over max_connections is closed by the server at once. Slots go
/// to authenticated connections, so its handshake completes; then the server closes it
/// promptly instead of waiting for its path.
async fn assert_closed_at_once(addr: SocketAddr) {
    let started = Instant::now();
    let mut tls = match tls_connect(addr, Some(&pki().alice), false).await {
        Ok(tls) => tls,
        // Closed before the client saw the end of the handshake: closed all the same.
        Err(err) => {
            assert!(started.elapsed() < Duration::from_secs(2), "{err}");
            return;
        }
    };
    assert!(
        closed_by_server(&mut tls, Duration::from_secs(3)).await,
        "a connection over max_connections is not served"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed at once, not after {:?}",
        started.elapsed()
    );
}

/// A connection as alice (no ALPN) that holds a slot (the server waits for its path),
/// retried until a slot is free (up to 5 s).
async fn served(addr: SocketAddr) -> Tls {
    testkit::eventually("a slot", Duration::from_secs(5), || async move {
        let mut tls = tls_connect(addr, Some(&pki().alice), false).await.ok()?;
        let closed = closed_by_server(&mut tls, Duration::from_millis(300)).await;
        (!closed).then_some(tls)
    })
    .await
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_at_once_until_a_slot_frees() {
    let server = server_with(Limits {
        max_connections: 2,
        // The held connections must outlive the test, not be cut off for their silence.
        request_timeout_secs: 30,
        ..test_limits()
    })
    .await;
    std::fs::write(server.pkgs.join("a.bff"), b"a").unwrap();
    let path = server.pkgs.join("a.bff");
    let path = path.to_str().unwrap();
    let alice = Some(&pki().alice);

    // Two connections hold both slots: handshake done, no path sent yet.
    let mut first = tls_connect(server.addr, alice, false).await.unwrap();
    let mut second = tls_connect(server.addr, alice, false).await.unwrap();

    // A third is closed at once, again and again (it does not wait for a slot).
    for _ in 0..3 {
        assert_closed_at_once(server.addr).await;
    }

    // The held connections are served as usual.
    first.write_all(path.as_bytes()).await.unwrap();
    first.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, first.read_to_end(&mut answer))
        .await
        .expect("the first connection is answered")
        .unwrap();
    let answer = Answer::parse(&String::from_utf8(answer).unwrap());
    assert!(answer.files()["a.bff"]["signature"].is_string());
    drop(first);

    // Its slot comes back once the server has finished with it: a new connection is served
    // while `second` still holds the other slot (every refusal until then is immediate).
    let addr = server.addr;
    let answer = testkit::eventually(
        "a slot to come back",
        Duration::from_secs(5),
        || async move {
            legacy(addr, alice, path)
                .await
                .ok()
                .filter(|answer| !answer.is_empty())
        },
    )
    .await;
    let answer = Answer::parse(&String::from_utf8(answer).unwrap());
    assert!(answer.files()["a.bff"]["signature"].is_string());

    // `second` still holds the other slot: with a new connection in the freed one, both are
    // taken again and one more is refused. `second` closing does not disturb the new one.
    let mut third = served(server.addr).await;
    assert_closed_at_once(server.addr).await;
    second.shutdown().await.unwrap();
    drop(second);
    third.write_all(path.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, third.read_to_end(&mut answer))
        .await
        .expect("the third connection is answered")
        .unwrap();
    assert!(
        String::from_utf8(answer)
            .unwrap()
            .starts_with("File to be signed: ")
    );
    drop(third);

    // Once everything is closed, two connections at once are served again.
    let within = Duration::from_secs(5);
    testkit::eventually("both slots to come back", within, || async move {
        let (a, b) = tokio::join!(
            tls_connect(addr, alice, false),
            tls_connect(addr, alice, false)
        );
        let (Ok(mut a), Ok(mut b)) = (a, b) else {
            return None;
        };
        let mut answers = Vec::new();
        for stream in [&mut a, &mut b] {
            // A connection refused right after its handshake fails here: try again.
            let _ = stream.write_all(path.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut answer)).await;
            answers.push(String::from_utf8_lossy(&answer).into_owned());
        }
        answers
            .iter()
            .all(|a| a.contains("Signatures written to"))
            .then_some(())
    })
    .await;
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 5);
    server.stop().await;
}

/// Issue 14: idle sockets that never start the handshake held `max_connections` slots for the
/// whole handshake timeout, locking every client out. Now they wait in the stranger pool (at
/// most `max_handshakes_per_address` from one address), a client with a certificate from
/// another address is served meanwhile, and the idle ones are closed at the deadline.
#[tokio::test]
async fn idle_strangers_do_not_lock_out_clients_with_certificates() {
    use testkit::front::{closed_within, idle_crowd, tls_from_other_loopback};
    let server = TestServer::start(Options {
        limits: Limits {
            max_connections: 4,
            ..test_limits()
        },
        max_handshakes_per_address: common::admission::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
        ..Options::default()
    })
    .await;
    // The test [tls] section: 2 s handshake timeout, the default stranger budget.
    let deadline = Duration::from_secs(2);
    std::fs::write(server.pkgs.join("a.bff"), b"a").unwrap();
    let path = server.pkgs.join("a.bff");
    let crowd = idle_crowd(server.addr, 40).await;

    let mut alice = tls_from_other_loopback(server.addr, &pki().alice, &[]).await;
    alice
        .write_all(path.to_str().unwrap().as_bytes())
        .await
        .unwrap();
    alice.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, alice.read_to_end(&mut answer))
        .await
        .expect("alice is answered")
        .unwrap();
    let answer = Answer::parse(&String::from_utf8(answer).unwrap());
    assert!(answer.files()["a.bff"]["signature"].is_string());

    // 32 were refused at once, the 8 of the address's share at the deadline.
    let (closed, last) = closed_within(crowd, deadline * 3).await;
    assert_eq!(closed, 40);
    assert!(last >= deadline / 2 && last < deadline * 2, "{last:?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// SIGHUP
// ---------------------------------------------------------------------------------------

fn quoted(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

/// The subject CN of the certificate the server presents to a fresh connection.
async fn server_cn(addr: SocketAddr) -> Option<String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = common::tls::connect(
        client_config(Some(&pki().alice), false),
        "localhost",
        tcp,
        STEP,
    )
    .await
    .unwrap();
    common::tls::peer_identity(tls.get_ref().1).and_then(|identity| identity.cn)
}

#[tokio::test]
async fn the_daemon_reloads_its_certificate_on_sighup_and_keeps_it_when_the_new_one_is_bad() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let cert = base.join("tls.crt");
    let key = base.join("tls.key");
    std::fs::copy(&pki.server.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server.key_path, &key).unwrap();
    let signing_key = base.join("release.pem");
    write_private(
        &signing_key,
        Ed448Key::generate().to_pem().unwrap().as_bytes(),
    );
    let pkgs = base.join("pkgs");
    std::fs::create_dir(&pkgs).unwrap();
    std::fs::write(pkgs.join("a.bff"), b"a").unwrap();
    let config = base.join("signing-server.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
state_dir = {state}
log = "info"

[tls]
cert = {cert}
key = {key}
client_ca = {ca}
crls = [{crl}]

[[keys]]
type = "ed448"
name = "release"
file = {signing_key}

[[clients]]
cn = "alice"
key = "release"
roots = [{pkgs}]

[limits]
request_timeout_secs = 30
drain_grace_secs = 3
"#,
            state = quoted(&base.join("state")),
            cert = quoted(&cert),
            key = quoted(&key),
            ca = quoted(&pki.ca_path),
            crl = quoted(&pki.crl_path),
            signing_key = quoted(&signing_key),
            pkgs = quoted(&pkgs),
        ),
    )
    .unwrap();
    let file = pkgs.join("a.bff");
    let file = file.to_str().unwrap();

    let mut daemon = Daemon::start(&config).await;
    let addr = daemon.addr;
    assert_eq!(server_cn(addr).await.as_deref(), Some("server"));

    // A certificate file that does not parse: the reload fails, the old certificate stays.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    daemon.signal(Signal::HUP);
    daemon.log_line("reload failed", STEP).await;
    assert_eq!(server_cn(addr).await.as_deref(), Some("server"));

    // Half of the new pair (server2's certificate, still server's key): the key does not
    // match, the reload fails, the old pair stays.
    std::fs::copy(&pki.server2.cert_path, &cert).unwrap();
    daemon.signal(Signal::HUP);
    let failed = daemon.log_line("reload failed", STEP).await;
    assert!(failed.to_lowercase().contains("mismatch"), "{failed}");
    assert_eq!(server_cn(addr).await.as_deref(), Some("server"));

    // A connection made before the reload.
    let mut before = tls_connect(addr, Some(&pki.alice), false).await.unwrap();
    assert_eq!(
        common::tls::peer_identity(before.get_ref().1)
            .and_then(|i| i.cn)
            .as_deref(),
        Some("server")
    );

    // The whole new pair: new connections see server2.
    std::fs::copy(&pki.server2.key_path, &key).unwrap();
    daemon.signal(Signal::HUP);
    daemon.log_line("reloaded certificates", STEP).await;
    assert_eq!(server_cn(addr).await.as_deref(), Some("server2"));

    // The connection made before it is still served; so are new ones.
    before.write_all(file.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, before.read_to_end(&mut answer))
        .await
        .expect("the older connection is answered")
        .unwrap();
    let answer = Answer::parse(&String::from_utf8(answer).unwrap());
    assert!(answer.files()["a.bff"]["signature"].is_string());
    let answer = legacy(addr, Some(&pki.alice), file).await.unwrap();
    let answer = Answer::parse(&String::from_utf8(answer).unwrap());
    assert!(answer.files()["a.bff"]["signature"].is_string());

    // A broken file after a good reload keeps server2.
    std::fs::write(&key, "not a key\n").unwrap();
    daemon.signal(Signal::HUP);
    daemon.log_line("reload failed", STEP).await;
    assert_eq!(server_cn(addr).await.as_deref(), Some("server2"));

    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// ---------------------------------------------------------------------------------------
// 408: a stalled upload
// ---------------------------------------------------------------------------------------

/// A client TLS connection.
pub(crate) type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// An HTTP/1.1 answer read off a raw connection.
#[derive(Debug)]
pub(crate) struct RawAnswer {
    /// The status code.
    pub(crate) status: u16,
    /// The body.
    pub(crate) body: String,
    /// When the whole answer had arrived, counted from the last byte sent.
    pub(crate) after: Duration,
}

/// Writes `head`, then the `pieces` of the body `gap` apart, on a fresh HTTPS connection as
/// alice (maybe only part of what the head announces), then reads one answer (up to
/// `deadline`); returns it and the connection.
pub(crate) async fn raw_http(
    addr: SocketAddr,
    head: &str,
    pieces: &[Vec<u8>],
    gap: Duration,
    deadline: Duration,
) -> (RawAnswer, Tls) {
    let mut tls = tls_connect(addr, Some(&pki().alice), true).await.unwrap();
    tls.write_all(head.as_bytes()).await.unwrap();
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        tls.write_all(piece).await.unwrap();
        tls.flush().await.unwrap();
    }
    tls.flush().await.unwrap();
    let sent = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The head, then the body by its Content-Length.
    let (status, body) = tokio::time::timeout(deadline, async {
        loop {
            let read = tls.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the server closed without an answer");
            buf.extend_from_slice(&chunk[..read]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let head = &text[..end];
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("a Content-Length");
            if buf.len() >= end + 4 + length {
                return (status, text[end + 4..end + 4 + length].to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer within {deadline:?}"));
    let answer = RawAnswer {
        status,
        body,
        after: sent.elapsed(),
    };
    (answer, tls)
}

/// A `POST /v1/sign` head announcing `length` bytes.
pub(crate) fn sign_head(name: &str, length: usize) -> String {
    format!(
        "POST /v1/sign?name={name} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Whether the server closes `tls` within 2 s (reads nothing more, then end of stream).
async fn closed(tls: &mut Tls) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tls.read_to_end(&mut rest)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_stalled_upload_gets_408_after_io_timeout_and_is_not_signed() {
    let server = server_with(Limits {
        io_timeout_secs: 1,
        ..test_limits()
    })
    .await;
    // Signed from memory (Content-Length up to 1 MiB) and spooled (more): 100 bytes of the
    // 1000 announced, 64 KiB of the 4 MiB announced, then nothing.
    for (announced, sent) in [(1000usize, 100usize), (4 << 20, 64 << 10)] {
        let head = sign_head("stalled.bin", announced);
        let (answer, mut tls) = raw_http(
            server.addr,
            &head,
            &[vec![7u8; sent]],
            Duration::ZERO,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(answer.status, 408, "{answer:?}");
        assert!(answer.body.contains("stalled"), "{answer:?}");
        assert!(
            answer.after >= Duration::from_millis(900) && answer.after < Duration::from_secs(4),
            "408 after io_timeout_secs (1 s), not {:?}",
            answer.after
        );
        assert!(
            closed(&mut tls).await,
            "the connection is closed after the 408"
        );
    }
    assert!(server.service.audit.rows().await.unwrap().is_empty());
    assert_eq!(spooled(&server), 0, "the spool file is removed");

    server.stop().await;
}

#[tokio::test]
async fn an_upload_in_pieces_less_than_io_timeout_apart_is_not_cut_off() {
    let server = server_with(Limits {
        io_timeout_secs: 1,
        // Only the stall rule here; the minimum rate has its own test.
        min_upload_bytes_per_sec: 1,
        ..test_limits()
    })
    .await;
    // Five pieces 400 ms apart: 1.6 s in all, longer than io_timeout_secs, but no stall.
    // Signed from memory (2000 bytes) and spooled (2 MB).
    for (name, length) in [("small.bin", 2000usize), ("large.bin", 2_000_000)] {
        let pieces: Vec<Vec<u8>> = (0..5).map(|i| vec![i; length / 5]).collect();
        let (answer, _) = raw_http(
            server.addr,
            &sign_head(name, length),
            &pieces,
            Duration::from_millis(400),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
        let signed: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(signed["size"], length, "{signed}");
        assert_eq!(signed["sha256"], sha256_hex(&pieces.concat()));
    }
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 2);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 413: an upload over max_upload_bytes
// ---------------------------------------------------------------------------------------

/// A body trickled in below `min_upload_bytes_per_sec` is cut off once its allowance (the
/// first `io_timeout_secs`, plus what the bytes received need at that rate) runs out, though
/// no piece ever stalls for `io_timeout_secs`. Before the fix, one byte every 300 ms (or one
/// a minute at the defaults) held the connection forever.
#[tokio::test]
async fn an_upload_below_the_minimum_rate_gets_408() {
    let defaults = Limits::default();
    assert_eq!(defaults.min_upload_bytes_per_sec, 16 << 10);
    assert_eq!(defaults.body_allowance(0), Duration::from_secs(60));
    assert_eq!(
        defaults.body_allowance(16 << 20),
        Duration::from_secs(60 + 1024)
    );
    let server = server_with(Limits {
        io_timeout_secs: 1,
        min_upload_bytes_per_sec: 10,
        ..test_limits()
    })
    .await;
    // 20 pieces of 1 byte, 300 ms apart: each gap is far below io_timeout_secs, but after
    // 1 s the allowance grows by only 0.1 s per byte. The answer is read while the writes go
    // on (they fail once the server has closed).
    let tls = tls_connect(server.addr, Some(&pki().alice), true)
        .await
        .unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let started = Instant::now();
    let writes = tokio::spawn(async move {
        let _ = writer
            .write_all(sign_head("trickle.bin", 1000).as_bytes())
            .await;
        for _ in 0..20 {
            if writer.write_all(b"x").await.is_err() || writer.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    writes.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("min_upload_bytes_per_sec"), "{answer:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(server.service.audit.rows().await.unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_upload_over_max_upload_bytes_gets_413_and_is_not_signed() {
    let server = server_with(Limits {
        max_upload_bytes: 1024,
        ..test_limits()
    })
    .await;
    let content = vec![42u8; 2048];

    // With a Content-Length (signed from memory when small).
    let reply = server
        .alice("POST", "/v1/sign?name=big.bin", full(content.clone()))
        .await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(reply.json()["error"].as_str().unwrap().contains("1024"));

    // Without one (chunked, spooled).
    let pieces = content
        .chunks(512)
        .map(bytes::Bytes::copy_from_slice)
        .collect::<Vec<_>>();
    let reply = server
        .alice(
            "POST",
            "/v1/sign?name=big.bin",
            streamed(pieces.into_iter()),
        )
        .await;
    assert_eq!(reply.status, 413, "{}", reply.text());

    // A Content-Length over the limit is refused before the body is read (the server does
    // not wait io_timeout_secs for content it will not take).
    let (answer, mut tls) = raw_http(
        server.addr,
        &sign_head("huge.bin", 1 << 30),
        &[],
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.after < Duration::from_secs(2), "{answer:?}");
    assert!(
        closed(&mut tls).await,
        "the unread body ends the connection"
    );

    assert!(server.service.audit.rows().await.unwrap().is_empty());
    assert_eq!(spooled(&server), 0);

    // Exactly max_upload_bytes is fine.
    let reply = server
        .alice("POST", "/v1/sign?name=fits.bin", full(vec![42u8; 1024]))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let rows = server.service.audit.rows().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2, "fits.bin");
    server.stop().await;
}
