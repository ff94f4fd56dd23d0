//! Client certificates on the TCP listener.

use common::tls::ClientAuth;
use secure_talk::client;
use secure_talk::hub::Channel;
use serde_json::json;

use crate::support::{STEP, TestServer, closed, connect, list, pki, send};

/// Connecting with these options fails (handshake or first read), within the time bound.
async fn refused(server: &TestServer, leaf: Option<&testkit::pki::Leaf>, name: &str) {
    let opts = server.tls(leaf, name);
    let result = tokio::time::timeout(STEP, client::connect(&opts, Channel::Admin))
        .await
        .unwrap_or_else(|_| panic!("{name}: refusal in time"));
    assert!(
        result.is_err(),
        "{name}: connected without a valid certificate"
    );
    assert!(!server.token_file(name).exists(), "{name}: got a token");
}

async fn echo_works(server: &TestServer, leaf: Option<&testkit::pki::Leaf>, name: &str) {
    let mut conn = connect(&server.tls(leaf, name), Channel::Admin).await;
    let text = json!({"headers": {"method": "text"}, "payload": name}).to_string();
    send(&mut conn, serde_json::from_str(&text).expect("json")).await;
    let frame = tokio::time::timeout(STEP, conn.recv_frame())
        .await
        .expect("echo in time")
        .expect("echo")
        .expect("a frame");
    assert_eq!(frame.into_text().expect("text").as_str(), text);
}

#[tokio::test]
async fn missing_untrusted_expired_and_revoked_certificates_are_refused() {
    let server = TestServer::start().await;
    let pki = pki();
    refused(&server, None, "none").await;
    refused(&server, Some(&pki.mallory), "mallory").await;
    refused(&server, Some(&pki.expired), "expired").await;
    refused(&server, Some(&pki.revoked), "revoked").await;
    // The server is unharmed and a good certificate works, the chained one too.
    echo_works(&server, Some(&pki.alice), "alice").await;
    echo_works(&server, Some(&pki.chained_client), "carol").await;
}

#[tokio::test]
async fn optional_client_certificates_allow_none_but_still_verify_one() {
    let server = TestServer::start_with(|c| c.client_auth = ClientAuth::Optional).await;
    let pki = pki();
    echo_works(&server, None, "anonymous").await;
    echo_works(&server, Some(&pki.bob), "bob").await;
    refused(&server, Some(&pki.mallory), "mallory").await;
    refused(&server, Some(&pki.revoked), "revoked").await;
}

/// A server whose CRL is a file of its own (the test PKI's CRL at first).
async fn server_with_own_crl(max_age_secs: u64) -> (TestServer, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let crl = dir.path().join("crl.pem");
    std::fs::write(&crl, &pki().crl_pem).expect("write crl");
    let server = TestServer::start_in(dir, |config| {
        let tls = config.tls.as_mut().expect("tls");
        tls.crls = vec![crl.clone()];
        tls.max_connection_age_secs = max_age_secs;
    })
    .await;
    let crl = server.dir.path().join("crl.pem");
    (server, crl)
}

#[tokio::test]
async fn a_client_revoked_after_it_connected_is_closed_before_its_next_admin_command() {
    let pki = pki();
    let (server, crl) = server_with_own_crl(3600).await;
    let mut alice = connect(&server.alice("alice"), Channel::Admin).await;
    let mut bob = connect(&server.bob("bob"), Channel::Admin).await;
    list(&mut alice).await;

    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).expect("write crl");
    // What the SIGHUP handler calls.
    server.server.reload().expect("reload");
    send(&mut alice, json!({"headers": {"method": "list"}})).await;
    let (code, reason) = closed(&mut alice).await.expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("revoked"), "{reason}");
    // bob goes on on his connection.
    list(&mut bob).await;
}

#[tokio::test]
async fn websockets_are_closed_with_1001_at_max_connection_age() {
    let (server, _crl) = server_with_own_crl(1).await;
    let mut old = connect(&server.alice("alice"), Channel::Admin).await;
    list(&mut old).await;
    let started = std::time::Instant::now();
    let (code, reason) = closed(&mut old).await.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    assert!(started.elapsed() < STEP);
    let mut fresh = connect(&server.alice("alice"), Channel::Admin).await;
    list(&mut fresh).await;
}

/// A request on a kept-alive HTTPS connection after the client's certificate was revoked
/// gets 403, not a token or an upgrade (found by the adversarial pass: `GET /` answered 200
/// with a fresh token and the upgrade 101 with the admin greeting).
#[tokio::test]
async fn a_revoked_client_gets_no_token_on_its_kept_alive_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = pki();
    let (server, crl) = server_with_own_crl(3600).await;
    let files = common::tls::ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: Some(pki.alice.cert_path.clone()),
        key: Some(pki.alice.key_path.clone()),
        alpn: vec![b"http/1.1".to_vec()],
        ..common::tls::ClientTlsFiles::default()
    };
    let config = std::sync::Arc::new(common::tls::client_config(&files).expect("client config"));
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut tls = common::tls::connect(config, "localhost", tcp, STEP)
        .await
        .expect("handshake");
    async fn status(
        tls: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    ) -> String {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
    assert!(status(&mut tls).await.contains(" 200 "), "a token before");
    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).expect("write crl");
    server.server.reload().expect("reload");
    let line = status(&mut tls).await;
    assert!(line.contains(" 403 "), "{line}");
}
