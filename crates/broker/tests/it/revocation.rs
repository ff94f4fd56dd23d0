//! Trust that changes while an HTTPS connection lives: a client certificate revoked by a CRL
//! reload is refused (403) on the keep-alive connection it already had, and
//! `max_connection_age_secs` closes a keep-alive connection.

use std::sync::Arc;
use std::time::Duration;

use broker::client::{Client, ClientError, Endpoint};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{Backend, Daemon, https_on_loopback};

/// A broker with the HTTPS API (alice mapped), its CRL a file of its own.
async fn https_daemon(max_age_secs: u64) -> (Daemon, std::path::PathBuf) {
    let pki = testkit::pki::test_pki();
    let crl_dir = tempfile::tempdir().unwrap().keep();
    let crl = crl_dir.join("crl.pem");
    std::fs::write(&crl, &pki.crl_pem).unwrap();
    let mut tls = pki.server_tls_section();
    tls.crls = vec![crl.clone()];
    tls.max_connection_age_secs = max_age_secs;
    let daemon = Daemon::start_with(Backend::Sqlite, |config| {
        config.https = Some(https_on_loopback(
            tls,
            &[("CN=alice", "alice"), ("CN=bob", "bob")],
        ));
    })
    .await;
    (daemon, crl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_after_the_handshake_is_refused_on_its_connection() {
    let pki = testkit::pki::test_pki();
    let (daemon, crl) = https_daemon(3600).await;
    let url = format!("https://localhost:{}", daemon.https.unwrap().port());
    let as_leaf = |leaf: &testkit::pki::Leaf| {
        Client::new(Endpoint::https(&url, &pki.ca_path, &leaf.cert_path, &leaf.key_path).unwrap())
    };
    // The client keeps one connection and reuses it.
    let mut alice = as_leaf(&pki.alice);
    let mut bob = as_leaf(&pki.bob);
    assert_eq!(alice.whoami().await.unwrap().user, "alice");
    assert_eq!(bob.whoami().await.unwrap().user, "bob");

    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    daemon.server.reload().unwrap();
    let err = alice.whoami().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status: 403, .. }),
        "not refused with 403: {err:?}"
    );
    assert!(err.to_string().contains("revoked"), "{err}");
    assert_eq!(bob.whoami().await.unwrap().user, "bob");
    daemon.stop().await;
}

/// One `GET /v1/whoami` as alice on a fresh TLS connection; then everything the server sends
/// until it closes the connection, within `wait`.
async fn whoami_until_closed(addr: std::net::SocketAddr, wait: Duration) -> Option<String> {
    let pki = testkit::pki::test_pki();
    let files = common::tls::ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: Some(pki.alice.cert_path.clone()),
        key: Some(pki.alice.key_path.clone()),
        alpn: vec![b"http/1.1".to_vec()],
        skip_hostname_check: false,
    };
    let config = Arc::new(common::tls::client_config(&files).unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = common::tls::connect(config, "localhost", tcp, Duration::from_secs(5))
        .await
        .unwrap();
    tls.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(wait, tls.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_is_closed_at_max_connection_age() {
    let (daemon, _crl) = https_daemon(1).await;
    let addr = daemon.https.unwrap();
    let started = std::time::Instant::now();
    let answer = whoami_until_closed(addr, Duration::from_secs(5))
        .await
        .expect("the connection is closed at its maximum age");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("alice"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // With the default age, the same exchange stays open.
    let (daemon2, _crl2) = https_daemon(86_400).await;
    assert_eq!(
        whoami_until_closed(daemon2.https.unwrap(), Duration::from_millis(1500)).await,
        None
    );
    daemon2.stop().await;
    daemon.stop().await;
}
