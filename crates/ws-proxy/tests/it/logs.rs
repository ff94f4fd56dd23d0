//! Log injection (SECURITY.md, invariant 7): a certificate subject, a meet-up id or a HELLO
//! never forges a line in the daemon's log, and no raw escape sequence reaches it.

use std::process::Stdio;

use testkit::logs::{LogCapture, client_with_cn, injection};
use testkit::test_pki;

use crate::support::{WAIT, closed, hello, options, send, spawn_daemon, write_config};

#[tokio::test]
async fn a_certificate_subject_cannot_forge_a_log_line() {
    common::tls::install_default_provider();
    let pki = test_pki();
    let eve = client_with_cn(pki, "ws-proxy-log-eve", &injection("eve"));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "drain_grace_secs = 1", "");
    let (mut child, port) = spawn_daemon(
        &config,
        &["--log-format", "text", "--log", "info"],
        Stdio::piped(),
    )
    .await;
    let log = LogCapture::start("ws-proxy", child.stderr.take().unwrap());
    let url = format!("wss://localhost:{port}/micronets/v1/ws-proxy/p");

    // Connected (the subject is logged), then an invalid HELLO whose fields hold the same
    // text, so the refusal is logged too.
    let mut ws = ws_proxy::client::connect(&options(&url, Some(&eve)))
        .await
        .unwrap();
    let bad = hello(&injection("x")).replace("\"messageId\":0", "\"messageId\":\"x\"");
    send(&mut ws, &bad).await;
    closed(&mut ws).await;
    log.wait_for("invalid hello", WAIT).await;
    log.assert_not_forged(1, WAIT).await;
    assert!(
        String::from_utf8_lossy(&log.bytes()).contains("connected"),
        "the connection was logged"
    );
}
