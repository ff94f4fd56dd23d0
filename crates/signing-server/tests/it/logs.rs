//! Log injection (SECURITY.md, invariant 7): what a client sends never forges a line in the
//! daemon's log, and no raw escape sequence reaches it.

use std::process::Stdio;

use testkit::logs::{LogCapture, injection};
use tokio::io::AsyncBufReadExt as _;

use crate::support::{STEP, legacy, pki};

const BIN: &str = env!("CARGO_BIN_EXE_signing-server");

#[tokio::test]
async fn a_refused_path_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _key) = crate::support::daemon_setup(dir.path(), "drain_grace_secs = 3\n");
    let pkgs = dir.path().join("pkgs");
    let pki = pki();
    let mut child = tokio::process::Command::new(BIN)
        .arg("-c")
        .arg(&config)
        .args(["--print-address", "--log-format", "text", "--log", "info"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = LogCapture::start("signing-server", child.stderr.take().unwrap());
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(STEP, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").unwrap().parse().unwrap();

    // A path inside alice's root that does not exist, and one outside it: both refusals
    // are logged with the path and a reason that embeds it.
    for path in [
        injection(&format!("{}/missing", pkgs.display())),
        injection("/elsewhere"),
    ] {
        let answer = legacy(addr, Some(&pki.alice), &path).await.unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("Refused: "));
    }
    // Each refusal logs the path twice (the path and the reason).
    log.assert_not_forged(4, STEP).await;
}
