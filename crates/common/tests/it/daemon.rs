//! The daemon glue in a real process (`mtls-echo serve`): systemd notifications, SIGHUP reloads
//! the certificate, SIGTERM drains and exits cleanly.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::test_pki;

const BIN: &str = env!("CARGO_BIN_EXE_mtls-echo");

fn notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
    assert!(status.unwrap().success());
}

fn call(addr: &str, cert: &Path, key: &Path) -> String {
    let pki = test_pki();
    let out = Command::new(BIN)
        .args(["call", "--connect", addr, "--message", "ping"])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(&pki.ca_path)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn notifies_systemd_reloads_on_sighup_and_drains_on_sigterm() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (
        dir.path().join("tls.cert.pem"),
        dir.path().join("tls.key.pem"),
    );
    std::fs::copy(&pki.server.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server.key_path, &key).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "journal",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--ca")
        .arg(&pki.ca_path)
        .arg("--crl")
        .arg(&pki.crl_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();

    assert!(notification(&notify).contains("READY=1"));
    let reply = call(&addr, &pki.alice.cert_path, &pki.alice.key_path);
    assert!(
        reply.contains("client CN=alice") && reply.contains("server CN=server,"),
        "{reply}"
    );
    let refused = call(&addr, &pki.revoked.cert_path, &pki.revoked.key_path);
    assert!(!refused.starts_with("echo:"), "{refused}");

    std::fs::copy(&pki.server2.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server2.key_path, &key).unwrap();
    signal(pid, "HUP");
    assert!(notification(&notify).contains("RELOADING=1"));
    assert!(notification(&notify).contains("READY=1"));
    let reply = call(&addr, &pki.alice.cert_path, &pki.alice.key_path);
    assert!(reply.contains("server CN=server2"), "{reply}");

    // A broken file on reload keeps the running certificate.
    std::fs::write(&cert, "not pem").unwrap();
    signal(pid, "HUP");
    assert!(notification(&notify).contains("RELOADING=1"));
    assert!(notification(&notify).contains("READY=1"));
    let reply = call(&addr, &pki.alice.cert_path, &pki.alice.key_path);
    assert!(reply.contains("server CN=server2"), "{reply}");

    signal(pid, "TERM");
    assert!(notification(&notify).contains("STOPPING=1"));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
