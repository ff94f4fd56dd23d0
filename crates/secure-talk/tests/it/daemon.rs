//! The `secure-talk` binary itself: configuration file, `--print-address`, SIGTERM,
//! `--check-config` and `gen-token-key`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use secure_talk::client::{self, Transport};
use secure_talk::hub::Channel;
use serde_json::json;
use tokio::process::Child;

use crate::support::{
    PIPE, STEP, alive, check_config, connect, create_pipe, daemon, daemon_serving, data_until,
    options, printed_address, processes_with_env, recv_message, wait_checked_in,
};

/// A Unix-socket-only configuration under `dir`, with `extra` top-level keys.
pub(crate) fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("secure-talk.toml");
    let text = format!(
        "listen = \"\"\nunix_socket = \"{}\"\nstate_dir = \"{}\"\npipe_program = \"{PIPE}\"\n{extra}\n\
         [limits]\nkill_grace_secs = 1\ndrain_grace_secs = 3\n",
        dir.join("talk.sock").display(),
        dir.join("state").display(),
    );
    std::fs::write(&path, text).expect("write the config");
    path
}

pub(crate) struct Daemon {
    pub(crate) child: Child,
    socket: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits for its `listening on unix:` line.
    pub(crate) async fn start(config: &Path) -> Self {
        let mut child = daemon_serving(config, &["--log", "warn"])
            .spawn()
            .expect("spawn secure-talk");
        let stdout = child.stdout.take().expect("stdout");
        let socket = PathBuf::from(printed_address(stdout, "listening on unix:").await);
        Self { child, socket }
    }

    pub(crate) fn options(&self, token_file: PathBuf) -> client::ClientOptions {
        options(Transport::Unix(self.socket.clone()), Some(token_file))
    }

    /// SIGTERM, then the exit code within a few seconds.
    pub(crate) async fn terminate(mut self) -> i32 {
        let pid = self
            .child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw)
            .expect("running");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = tokio::time::timeout(Duration::from_secs(6), self.child.wait())
            .await
            .expect("secure-talk exits in time after SIGTERM")
            .expect("wait");
        status.code().unwrap_or_else(|| panic!("killed: {status}"))
    }
}

#[tokio::test]
async fn the_daemon_serves_its_unix_socket_and_stops_on_sigterm() {
    crate::support::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&write_config(dir.path(), "")).await;
    assert_eq!(daemon.socket, dir.path().join("talk.sock"));
    let opts = daemon.options(dir.path().join("token"));
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let echo = r#"{"headers":{"method":"text"},"payload":"daemon"}"#;
    admin.send_text(echo).await.expect("send");
    recv_message(&mut admin, "echo", |m| m.payload == Some(json!("daemon"))).await;
    let id = create_pipe(&mut admin, "echo from-daemon").await;
    data_until(&mut data, id, "from-daemon\n").await;
    // A pipe still running when SIGTERM comes is stopped too.
    let id = create_pipe(&mut admin, "sleep 30").await;
    wait_checked_in(&mut admin, id).await;
    let ipc = dir.path().join("state/ipc/ipc.sock");
    let pipes = processes_with_env("SECURE_TALK_IPC_SOCKET", &ipc);
    assert!(
        !pipes.is_empty(),
        "the pipe runs with the daemon's ipc socket"
    );

    let socket = daemon.socket.clone();
    assert_eq!(daemon.terminate().await, 0);
    assert!(!socket.exists(), "socket file removed");
    assert!(!ipc.exists(), "ipc socket removed");
    assert!(pipes.iter().all(|pid| !alive(*pid)), "pipes stopped");
}

#[tokio::test]
async fn check_config_reports_bad_files_with_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write_config(dir.path(), "");
    let output = check_config(&good).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration ok"));
    assert!(
        !dir.path().join("talk.sock").exists(),
        "--check-config binds nothing"
    );

    for (name, extra, code) in [
        ("unknown key", "bogus_key = 1", 78),
        ("bad mode", "unix_socket_mode = \"999\"", 78),
        ("bad subject", "admin_subjects = [\"sha256:12\"]", 78),
        (
            "missing key file",
            "token_key_file = \"/nonexistent/key\"",
            66,
        ),
    ] {
        let sub = dir.path().join(name.replace(' ', "-"));
        std::fs::create_dir(&sub).expect("mkdir");
        let config = write_config(&sub, extra);
        let output = check_config(&config).await;
        assert_eq!(output.status.code(), Some(code), "{name}: {output:?}");
        assert!(!output.stderr.is_empty(), "{name}: says why");
    }
    let output = check_config(&dir.path().join("missing.toml")).await;
    assert_eq!(output.status.code(), Some(78), "{output:?}");

    // An unknown placeholder in pipe_args: 78, naming the key and the placeholder.
    let sub = dir.path().join("placeholder");
    std::fs::create_dir(&sub).expect("mkdir");
    let config = write_config(&sub, "pipe_args = [\"-l\", \"{loop_times}\"]");
    let output = check_config(&config).await;
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pipe_args") && stderr.contains("{loop_times}"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_token_key_file_makes_tokens_survive_a_restart() {
    crate::support::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("token.key");
    let status = daemon()
        .arg("gen-token-key")
        .arg(&key)
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run");
    assert_eq!(status.code(), Some(0));
    let written = std::fs::read(&key).expect("key file");
    assert_eq!(
        std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    assert!(written.len() >= 32);
    // Never overwritten.
    let status = daemon()
        .arg("gen-token-key")
        .arg(&key)
        .stderr(Stdio::null())
        .status()
        .await
        .expect("run");
    assert_eq!(status.code(), Some(73));
    assert_eq!(std::fs::read(&key).expect("key file"), written);

    let config = write_config(
        dir.path(),
        &format!("token_key_file = \"{}\"", key.display()),
    );
    let token_file = dir.path().join("client.token");
    let daemon = Daemon::start(&config).await;
    let conn = connect(&daemon.options(token_file.clone()), Channel::Admin).await;
    let (token, client_id) = (conn.token.clone(), conn.client_id);
    drop(conn);
    assert_eq!(daemon.terminate().await, 0);

    let daemon = Daemon::start(&config).await;
    let opts = daemon.options(token_file);
    let again = client::fetch_token(&opts, Some(&token))
        .await
        .expect("token");
    assert_eq!(again, token, "the same token is valid after a restart");
    let mut conn = connect(&opts, Channel::Admin).await;
    assert_eq!(
        (conn.client_id, conn.token.as_str()),
        (client_id, token.as_str())
    );
    conn.send_text(r#"{"headers":{"method":"text"},"payload":1}"#)
        .await
        .expect("send");
    recv_message(&mut conn, "echo", |m| m.payload == Some(json!(1))).await;
    drop(conn);
    assert_eq!(daemon.terminate().await, 0);
}

/// Log injection (SECURITY.md, invariant 7): an upload's path never forges a line in the
/// daemon's log, and no raw escape sequence reaches it.
#[tokio::test]
async fn an_upload_path_cannot_forge_a_log_line() {
    use common::envelope::talk::{BinaryMessage, Headers, method};
    use testkit::logs::{LogCapture, injection};
    crate::support::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let mut child = daemon_serving(&config, &["--log", "info", "--log-format", "text"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn secure-talk");
    let log = LogCapture::start("secure-talk", child.stderr.take().expect("stderr"));
    let stdout = child.stdout.take().expect("stdout");
    let socket = PathBuf::from(printed_address(stdout, "listening on unix:").await);

    let opts = options(Transport::Unix(socket), Some(dir.path().join("token")));
    let mut admin = connect(&opts, Channel::Admin).await;
    let upload = BinaryMessage::new(
        Headers::method(method::MODEL).with_path(injection("model")),
        b"weights".to_vec(),
    );
    admin.send_binary(&upload).await.expect("send");
    crate::support::expect_reply(&mut admin, 200, "").await;
    log.wait_for("model uploaded", STEP).await;
    log.assert_not_forged(1, STEP).await;
}
