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
        .stderr(Stdio::piped())
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
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", out.status);
    // Each reload says what it read, then that the configuration file was not read again.
    let log = String::from_utf8_lossy(&out.stderr);
    let reloaded: Vec<_> = log
        .lines()
        .filter(|l| l.contains("reloaded certificates: the server certificate and key"))
        .collect();
    assert_eq!(reloaded.len(), 1, "{log}");
    assert!(
        reloaded[0].contains("tls.cert.pem") && reloaded[0].contains("crls=1"),
        "{log}"
    );
    assert_eq!(
        log.matches("reload done; the configuration file is read only at start")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("reload failed"), "{log}");
    assert!(!log.contains("and configuration"), "{log}");
}

/// `mtls-echo serve` with the test PKI, its global flags `flags` and its log on a pipe: the
/// child and its address.
fn serve(flags: &[&str]) -> (std::process::Child, String) {
    let pki = test_pki();
    let mut child = Command::new(BIN)
        .args(["--log-format", "journal"])
        .args(flags)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(&pki.server.cert_path)
        .arg("--key")
        .arg(&pki.server.key_path)
        .arg("--ca")
        .arg(&pki.ca_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    (child, addr)
}

/// Stops a [`serve`]d child (SIGTERM drains every connection first) and returns its log.
fn stop(child: std::process::Child) -> String {
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", out.status);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A TLS 1.2 ClientHello whose server_name extension holds `name`: what curl, Python and
/// `openssl s_client` send when told to dial an IP address (RFC 6066 forbids it).
fn client_hello_with_sni(name: &str) -> Vec<u8> {
    fn u16_len(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }
    let mut entry = vec![0]; // host_name
    entry.extend(u16_len(name.len()));
    entry.extend(name.as_bytes());
    let mut list = u16_len(entry.len()).to_vec();
    list.extend(entry);
    let mut extensions = vec![0, 0]; // server_name
    extensions.extend(u16_len(list.len()));
    extensions.extend(list);
    let mut body = vec![3, 3];
    body.extend([7; 32]); // random
    body.push(0); // no session id
    body.extend([0, 2, 0xc0, 0x2f]); // TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    body.extend([1, 0]); // null compression
    body.extend(u16_len(extensions.len()));
    body.extend(extensions);
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16_len(handshake.len()));
    record.extend(handshake);
    record
}

/// Dials `addr`, sends `bytes`, and waits for the server to close.
fn dial(addr: &str, bytes: &[u8]) {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(bytes).unwrap();
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = tcp.read_to_end(&mut Vec::new());
}

#[test]
fn a_port_probe_is_a_closed_probe_at_debug_not_a_failed_handshake() {
    let (child, addr) = serve(&["--log", "debug"]);
    dial(&addr, b"");
    let log = stop(child);
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("closed probe")),
        "{log}"
    );
    assert!(!log.contains("tls handshake failed"), "{log}");
    assert!(!log.contains("tls handshakes failed"), "{log}");
}

#[test]
fn an_ip_address_in_sni_is_not_a_warning_unless_the_filter_asks_for_rustls() {
    let hello = client_hello_with_sni("127.0.0.1");
    for (flags, warned) in [
        (&[][..], false),
        (&["--log", "debug"][..], false),
        // An operator who names rustls gets what they asked for.
        (&["--log", "info,rustls=warn"][..], true),
    ] {
        let (child, addr) = serve(flags);
        dial(&addr, &hello);
        let log = stop(child);
        assert_eq!(log.contains("Illegal SNI"), warned, "{flags:?}: {log}");
    }
}
