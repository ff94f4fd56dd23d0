//! Trust that changes while a websocket lives: a peer revoked by a CRL reload is closed
//! (1008) at the reload, and refused relaying if it was not closed yet; connections are
//! closed with 1001 at `max_connection_age`.

use std::time::Duration;

use common::tls::{ClientAuth, ServerTlsFiles};
use futures_util::StreamExt as _;
use testkit::test_pki;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Proxy, WAIT, closed, hello, quick, recv_text, send};

/// A proxy whose CRL is a file of its own, holding the test PKI's CRL at first.
async fn proxy_with_own_crl(
    config: ws_proxy::Config,
) -> (Proxy, tempfile::TempDir, std::path::PathBuf) {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("crl.pem");
    std::fs::write(&crl, &pki.crl_pem).unwrap();
    let proxy = Proxy::start_with(
        config,
        ServerTlsFiles {
            cert: pki.server.cert_path.clone(),
            key: Some(pki.server.key_path.clone()),
            client_ca: Some(pki.ca_path.clone()),
            crls: vec![crl.clone()],
            client_auth: ClientAuth::Required,
            alpn: Vec::new(),
        },
    )
    .await;
    (proxy, dir, crl)
}

#[tokio::test]
async fn a_peer_revoked_by_a_reload_is_closed() {
    let pki = test_pki();
    let (proxy, _dir, crl) = proxy_with_own_crl(quick()).await;
    let (mut alice, mut bob) = proxy.pair("revoke-on-reload").await;
    send(&mut alice, "before").await;
    assert_eq!(recv_text(&mut bob).await, "before");

    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    // What the SIGHUP handler calls.
    proxy.server.reload().unwrap();
    let (code, reason) = closed(&mut alice).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("revoked"), "{reason}");
    // bob is told his partner left; a new alice connection is refused in the handshake.
    let _ = closed(&mut bob).await;
    assert!(proxy.dial(Some(&pki.alice), "again").await.is_err());
    proxy.stop().await;
}

#[tokio::test]
async fn a_revoked_peer_cannot_relay_even_before_its_connection_is_told() {
    let pki = test_pki();
    let (proxy, _dir, crl) = proxy_with_own_crl(quick()).await;
    let (mut alice, mut bob) = proxy.pair("revoke-per-message").await;
    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    // Swap the TLS material only, without telling the connections: the per-message check
    // alone must stop alice.
    proxy.server.tls().unwrap().reload().unwrap();
    send(&mut alice, "after").await;
    let (code, reason) = closed(&mut alice).await;
    assert_eq!(code, 1008, "{reason}");
    // bob never sees the message: the next thing he gets is the close.
    let next = tokio::time::timeout(WAIT, async {
        loop {
            match bob.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("bob hears in time");
    assert!(
        matches!(next, Some(Ok(Message::Close(_))) | None),
        "bob got {next:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connections_are_closed_with_1001_at_max_connection_age() {
    let pki = test_pki();
    let mut config = quick();
    config.limits.max_connection_age = Duration::from_secs(1);
    let (proxy, _dir, _crl) = proxy_with_own_crl(config).await;
    let (mut alice, mut bob) = proxy.pair("old").await;
    send(&mut alice, "young").await;
    assert_eq!(recv_text(&mut bob).await, "young");
    let started = std::time::Instant::now();
    let (code, reason) = closed(&mut alice).await;
    assert_eq!(code, 1001, "{reason}");
    assert!(started.elapsed() < WAIT);
    let _ = closed(&mut bob).await;
    // A fresh connection works.
    let mut fresh = proxy.connect(&pki.alice, "new").await;
    send(&mut fresh, &hello("fresh")).await;
    proxy
        .wait_for(|s| s.meetups.iter().any(|m| m.id == "new"))
        .await;
    proxy.stop().await;
}
