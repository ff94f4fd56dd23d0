//! Trust that changes while a connection lives: a client certificate revoked by a CRL reload
//! is refused on the connection it opened before (JSON API keep-alive, original protocol),
//! and `max_connection_age_secs` closes a keep-alive connection.

use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{Body, Options, STEP, TestServer, full, pki, tls_connect, tls_section};

/// A server whose `[tls]` CRL is a file of its own (the test PKI's CRL at first), closing
/// connections after `max_age_secs`.
async fn server_with_own_crl(max_age_secs: u64) -> (TestServer, std::path::PathBuf) {
    let pki = pki();
    let crl_dir = tempfile::tempdir().unwrap().keep();
    let crl = crl_dir.join("crl.pem");
    std::fs::write(&crl, &pki.crl_pem).unwrap();
    let mut section = tls_section(pki);
    section.crls = vec![crl.clone()];
    section.max_connection_age_secs = max_age_secs;
    let server = TestServer::start(Options {
        tls: Some(section),
        ..Options::default()
    })
    .await;
    (server, crl)
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// A keep-alive HTTPS connection as alice.
async fn alice_keep_alive(server: &TestServer) -> Sender {
    let tls = tls_connect(server.addr, Some(&pki().alice), true)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// One request on `sender`: status and body text.
async fn request(sender: &mut Sender, uri: &str, body: Body) -> hyper::Result<(u16, String)> {
    let request = hyper::Request::builder()
        .method("POST")
        .uri(uri)
        .header(hyper::header::HOST, "localhost")
        .body(body)
        .unwrap();
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("an answer in time")?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn a_revoked_client_is_refused_on_its_keep_alive_connection() {
    let pki = pki();
    let (server, crl) = server_with_own_crl(3600).await;
    let mut alice = alice_keep_alive(&server).await;
    let (status, _) = request(&mut alice, "/v1/sign?name=a.bff", full("one"))
        .await
        .unwrap();
    assert_eq!(status, 200);

    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    server.server.reload().unwrap();
    // The same connection: before the fix it kept signing.
    let (status, body) = request(&mut alice, "/v1/sign?name=b.bff", full("two"))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    // The refusal closes the connection.
    let next = request(&mut alice, "/v1/sign-path", full("{}")).await;
    assert!(next.is_err(), "{next:?}");
    // bob is not revoked.
    let reply = server
        .https(Some(&pki.bob), "POST", "/v1/sign?name=c.bff", full("three"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_client_is_refused_its_original_protocol_path() {
    let pki = pki();
    let (server, crl) = server_with_own_crl(3600).await;
    std::fs::write(server.pkgs.join("x.bff"), b"content").unwrap();
    // Handshake first, then the revocation, then the path.
    let mut tls = tls_connect(server.addr, Some(&pki.alice), false)
        .await
        .unwrap();
    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    server.server.reload().unwrap();
    let path = server.pkgs.join("x.bff");
    tls.write_all(path.to_str().unwrap().as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("Refused: "), "{answer}");
    assert!(answer.contains("revoked"), "{answer}");
    assert!(!server.signatures_file().exists());
    server.stop().await;
}

#[tokio::test]
async fn a_keep_alive_connection_is_closed_at_max_connection_age() {
    let (server, _crl) = server_with_own_crl(1).await;
    let mut old = alice_keep_alive(&server).await;
    let (status, _) = request(&mut old, "/v1/sign?name=a.bff", full("one"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = request(&mut old, "/v1/sign?name=b.bff", full("two")).await;
    assert!(after.is_err(), "the old connection still served: {after:?}");
    // A fresh connection works.
    let mut fresh = alice_keep_alive(&server).await;
    let (status, _) = request(&mut fresh, "/v1/sign?name=c.bff", full("three"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    server.stop().await;
}
