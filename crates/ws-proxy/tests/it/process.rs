//! The `ws-proxy` binary as systemd runs it: TOML config, SIGHUP reload, SIGTERM drain.

use std::process::Stdio;

use testkit::test_pki;
use tokio::process::Command;

use crate::support::{
    DAEMON, WAIT, closed, options, pair_at, recv_text, send, spawn_daemon, write_config_with,
};

async fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_keeping_pairs_and_sigterm_closes_with_1001() {
    common::tls::install_default_provider();
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let cert = crate::support::copy_to(dir.path(), &pki.server.cert_path, "cert.pem");
    let key = crate::support::copy_to(dir.path(), &pki.server.key_path, "key.pem");
    let config = write_config_with(
        dir.path(),
        &cert,
        &key,
        "drain_grace_secs = 5",
        "close_timeout_secs = 1",
    );
    let (mut child, port) = spawn_daemon(&config, &[], Stdio::null()).await;
    let url = format!("wss://localhost:{port}/micronets/v1/ws-proxy/p");

    let (mut a, mut b) = pair_at(&url).await;

    std::fs::copy(&pki.server2.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server2.key_path, &key).unwrap();
    let pid = child.id().unwrap();
    signal(pid, "HUP").await;
    let other = url.replace("/p", "/q");
    // SIGHUP loads the new certificate.
    testkit::eventually("the new certificate after SIGHUP", WAIT, || {
        let options = options(&other, Some(&pki.alice));
        async move {
            let ws = ws_proxy::client::connect(&options).await.unwrap();
            let leaf = ws.get_ref().get_ref().1.peer_certificates().unwrap()[0].clone();
            let cn = common::tls::PeerIdentity::from_der(leaf.as_ref())
                .unwrap()
                .cn;
            (cn.as_deref() == Some("server2")).then_some(())
        }
    })
    .await;
    send(&mut a, "after reload").await;
    assert_eq!(recv_text(&mut b).await, "after reload");

    signal(pid, "TERM").await;
    assert_eq!(closed(&mut a).await.0, 1001);
    assert_eq!(closed(&mut b).await.0, 1001);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_bad_configuration_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[limits]\nping_interval_sec = 5\n").unwrap();
    let output = Command::new(DAEMON)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ping_interval_sec"), "{stderr}");
}

#[tokio::test]
async fn check_config_validates_the_file_and_the_tls_material() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, cert: &std::path::Path| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n",
                key = pki.server.key_path,
                ca = pki.ca_path,
            ),
        )
        .unwrap();
        path
    };
    let good = write("good.toml", &pki.server.cert_path);
    let output = Command::new(DAEMON)
        .args(["--config", good.to_str().unwrap(), "--check-config"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("configuration ok: listen 127.0.0.1:5050"),
        "{stdout}"
    );
    assert!(stdout.contains("CN=server"), "{stdout}");

    let missing = write("missing.toml", &dir.path().join("nope.pem"));
    let output = Command::new(DAEMON)
        .args(["--config", missing.to_str().unwrap(), "--check-config"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nope.pem"));
}
