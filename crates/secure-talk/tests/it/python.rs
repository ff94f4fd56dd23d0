//! The independent Python client (`tests/py/talk_client.py`, written from the specification
//! on the `websockets` package) against the real server, over the Unix socket and over TLS
//! with a client certificate: token flow, echo, framed uploads, pipes, reconnection, errors.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::support::{TestServer, pki};

/// Bound on one run of the Python selftest (the process is killed after it).
const PYTHON_DEADLINE: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/talk_client.py")
}

/// Fails with a clear message when python3 or its `websockets` package is missing.
async fn require_websockets() {
    let probe = Command::new("python3")
        .args(["-c", "import websockets.asyncio.client"])
        .output()
        .await
        .unwrap_or_else(|err| panic!("python3 is needed for the interoperability tests: {err}"));
    assert!(
        probe.status.success(),
        "the Python `websockets` package (>= 13) is missing (scripts/test installs it; or run \
         `python3 -m pip install websockets`): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `talk_client.py <transport> selftest` in a fresh directory (for ./token.txt) and
/// asserts that every check passed.
async fn selftest(transport: &[String]) {
    require_websockets().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let child = Command::new("python3")
        .arg(script())
        .args(transport)
        .arg("selftest")
        .current_dir(cwd.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    let out = tokio::time::timeout(PYTHON_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the Python selftest did not finish in {PYTHON_DEADLINE:?}"))
        .expect("python3 output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"done\": true"), "{stdout}");
    assert!(!stdout.contains("\"ok\": false"), "{stdout}");
    eprintln!(
        "python selftest {transport:?}: {:?}\n{stdout}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_over_unix_socket() {
    let mut server = TestServer::start().await;
    let socket = server.config.unix_socket.clone().expect("a unix socket");
    selftest(&["--unix".into(), arg(&socket)]).await;
    assert!(server.stop().await, "the server drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_over_tls_with_client_certificate() {
    let mut server = TestServer::start().await;
    let pki = pki();
    selftest(&[
        "--host".into(),
        server.addr.ip().to_string(),
        "--port".into(),
        server.addr.port().to_string(),
        "--ca".into(),
        arg(&pki.ca_path),
        "--cert".into(),
        arg(&pki.alice.cert_path),
        "--key".into(),
        arg(&pki.alice.key_path),
    ])
    .await;
    assert!(server.stop().await, "the server drains");
}
