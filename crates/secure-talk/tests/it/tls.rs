//! Client certificates on the TCP listener.

use common::tls::ClientAuth;
use secure_talk::client;
use secure_talk::hub::Channel;
use serde_json::json;

use crate::support::{STEP, TestServer, connect, pki, send};

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
