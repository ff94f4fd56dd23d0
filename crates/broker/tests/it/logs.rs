//! Log injection (SECURITY.md, invariant 7): the subject of an HTTPS client certificate never
//! forges a line in the `broker` daemon's log, and no raw escape sequence reaches it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use testkit::logs::{LogCapture, client_with_cn, injection};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

const BROKER: &str = env!("CARGO_BIN_EXE_broker");
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn an_unmapped_certificate_subject_cannot_forge_a_log_line() {
    common::tls::install_default_provider();
    let pki = testkit::test_pki();
    let eve = client_with_cn(pki, "broker-log-eve", &injection("eve"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nstate_dir = {state:?}\nhost = \"testhost\"\n\
             port_range = [21000, 21099]\ndrain_grace_secs = 1\n\n\
             [https]\nlisten = \"127.0.0.1:0\"\n[https.tls]\ncert = {cert:?}\nkey = {key:?}\n\
             client_ca = {ca:?}\ncrls = [{crl:?}]\n[https.users]\n\"CN=alice\" = \"alice\"\n",
            socket = dir.path().join("broker.sock"),
            state = dir.path().join("state"),
            cert = pki.server.cert_path,
            key = pki.server.key_path,
            ca = pki.ca_path,
            crl = pki.crl_path,
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BROKER)
        .arg("-c")
        .arg(&config)
        .args(["--print-address", "--log", "info", "--log-format", "text"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = LogCapture::start("broker", child.stderr.take().unwrap());
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("listening on https://") {
                return addr.parse::<std::net::SocketAddr>().unwrap();
            }
        }
        panic!("the broker exited without its https address");
    })
    .await
    .expect("the broker prints its https address");
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });

    let files = common::tls::ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: Some(eve.cert_path.clone()),
        key: Some(eve.key_path.clone()),
        alpn: Vec::new(),
        skip_hostname_check: false,
    };
    let tls_config = Arc::new(common::tls::client_config(&files).unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = common::tls::connect(tls_config, "localhost", tcp, WAIT)
        .await
        .unwrap();
    tls.write_all(b"GET /v1/whoami HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    log.wait_for("not mapped to a user", WAIT).await;
    log.assert_not_forged(1, WAIT).await;
}
