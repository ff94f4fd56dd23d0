//! Log injection (SECURITY.md, invariant 7): the subject of an HTTPS client certificate never
//! forges a line in the `broker` daemon's log, and no raw escape sequence reaches it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use testkit::logs::{LogCapture, client_with_cn, injection};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

const BROKER: &str = env!("CARGO_BIN_EXE_broker");
const WAIT: Duration = Duration::from_secs(10);

/// The `broker` binary with an HTTPS API mapping `users` (certificate subject, user), logging
/// at info in text; its stderr captured, its HTTPS address.
async fn start(
    dir: &std::path::Path,
    users: &[(&str, &str)],
) -> (tokio::process::Child, LogCapture, std::net::SocketAddr) {
    let pki = testkit::test_pki();
    let config = dir.join("broker.toml");
    let users: String = users
        .iter()
        .map(|(subject, user)| format!("{subject:?} = {user:?}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nstate_dir = {state:?}\nhost = \"testhost\"\n\
             port_range = [21000, 21099]\ndrain_grace_secs = 1\n\n\
             [https]\nlisten = \"127.0.0.1:0\"\n[https.tls]\ncert = {cert:?}\nkey = {key:?}\n\
             client_ca = {ca:?}\ncrls = [{crl:?}]\n[https.users]\n{users}",
            socket = dir.join("broker.sock"),
            state = dir.join("state"),
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
    (child, log, addr)
}

#[tokio::test]
async fn an_unmapped_certificate_subject_cannot_forge_a_log_line() {
    common::tls::install_default_provider();
    let pki = testkit::test_pki();
    let eve = client_with_cn(pki, "broker-log-eve", &injection("eve"));
    let dir = tempfile::tempdir().unwrap();
    let (_child, log, addr) = start(dir.path(), &[("CN=alice", "alice")]).await;

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

/// A refused heartbeat or delete of another user's job is logged with its `action`, like the
/// refused load and verify (issue 18: the delete's line had none).
#[tokio::test]
async fn a_refusal_of_another_users_job_is_logged_with_its_action() {
    common::tls::install_default_provider();
    let pki = testkit::test_pki();
    let dir = tempfile::tempdir().unwrap();
    let (_child, log, addr) = start(dir.path(), &[("CN=alice", "alice"), ("CN=bob", "bob")]).await;
    let url = format!("https://localhost:{}", addr.port());
    let client = |leaf: &testkit::Leaf| {
        broker::client::Client::new(
            broker::client::Endpoint::https(&url, &pki.ca_path, &leaf.cert_path, &leaf.key_path)
                .unwrap(),
        )
        .with_timeout(WAIT)
    };
    let (mut alice, mut bob) = (client(&pki.alice), client(&pki.bob));
    let job = alice
        .save_type(broker::api::JobType::Ssh, None)
        .await
        .unwrap();
    let id = job.summary.id;
    for action in ["load", "heartbeat", "delete"] {
        let refused = match action {
            "load" => bob.load(&id).await.map(drop),
            "heartbeat" => bob.heartbeat(&id).await.map(drop),
            _ => bob.delete(&id).await,
        };
        assert!(refused.unwrap_err().is_not_found(), "{action}");
        log.wait_for(
            &format!(
                "refused: not the owner user=\"bob\" via=\"https\" job={id:?} action={action:?}"
            ),
            WAIT,
        )
        .await;
    }
    // Still alice's.
    assert_eq!(alice.query().await.unwrap().len(), 1);
}
