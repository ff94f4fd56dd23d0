//! The `secure-talk-cli` binary against the in-process server, over the Unix socket and TLS:
//! tokens, echo, create with --follow, list, destroy, uploads, receive, the shell on stdin,
//! and the exit codes.

use std::path::Path;
use std::process::{Output, Stdio};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::support::{STEP, TestServer, pki};

const CLI: &str = env!("CARGO_BIN_EXE_secure-talk-cli");

/// The CLI in `cwd` (its token file lands there), without any SECURE_TALK_* from outside.
fn cli(cwd: &Path) -> Command {
    let mut command = Command::new(CLI);
    command
        .current_dir(cwd)
        .env("HOME", cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SECURE_TALK_") {
            command.env_remove(name);
        }
    }
    command
}

/// The CLI on the server's Unix socket.
fn unix(server: &TestServer, cwd: &Path) -> Command {
    let mut command = cli(cwd);
    let socket = server.config.unix_socket.as_ref().expect("a unix socket");
    command.arg("--unix").arg(socket).args(["--timeout", "5"]);
    command
}

/// The CLI over TLS, presenting Alice's certificate when `with_cert`.
fn tls(server: &TestServer, cwd: &Path, with_cert: bool) -> Command {
    let pki = pki();
    let mut command = cli(cwd);
    command
        .args(["--host", "127.0.0.1", "--server-name", "localhost"])
        .args(["--port", &server.addr.port().to_string(), "--timeout", "5"])
        .arg("--ca")
        .arg(&pki.ca_path);
    if with_cert {
        command
            .arg("--cert")
            .arg(&pki.alice.cert_path)
            .arg("--key")
            .arg(&pki.alice.key_path);
    }
    command
}

/// Runs to completion within [`STEP`].
async fn run(command: &mut Command, args: &[&str]) -> Output {
    let child = command.args(args).spawn().expect("the CLI starts");
    tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("secure-talk-cli {args:?} finished in time"))
        .expect("the CLI's output")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit status, showing the output otherwise.
#[track_caller]
fn assert_status(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}

fn json_line(output: &Output) -> Value {
    serde_json::from_str(stdout(output).lines().next().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{err}: {}", stdout(output)))
}

#[tokio::test]
async fn token_echo_and_exit_codes() {
    let server = TestServer::start().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    let first = run(&mut unix(&server, cwd.path()), &["token", "--json"]).await;
    assert_status(&first, 0);
    let second = run(&mut unix(&server, cwd.path()), &["--json", "token"]).await;
    assert_status(&second, 0);
    let (first, second) = (json_line(&first), json_line(&second));
    assert!(first["client_id"].is_u64(), "{first}");
    assert_eq!(first["client_id"], second["client_id"]);
    let token_file = cwd.path().join("token.txt");
    assert_eq!(second["token_file"], Value::from(token_file.to_str()));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file)
            .expect("token.txt")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let echo = run(&mut unix(&server, cwd.path()), &["echo", "hi"]).await;
    assert_status(&echo, 0);
    assert_eq!(stdout(&echo), "hi\n");

    // Refused by the server: 1, with its text on stderr.
    let destroy = run(&mut unix(&server, cwd.path()), &["destroy", "999"]).await;
    assert_status(&destroy, 1);
    assert!(
        stderr(&destroy).contains("has no pipes yet"),
        "{}",
        stderr(&destroy)
    );
    // The server's text as it is (no `secure-talk-cli:` prefix); with --json its code and
    // text on stdout first.
    assert!(
        !stderr(&destroy).starts_with("secure-talk-cli:"),
        "{}",
        stderr(&destroy)
    );
    let refused = run(
        &mut unix(&server, cwd.path()),
        &["--json", "destroy", "999"],
    )
    .await;
    assert_status(&refused, 1);
    let line = json_line(&refused);
    assert_eq!(line["code"], 404, "{line}");
    assert!(
        line["payload"]
            .as_str()
            .is_some_and(|t| t.contains("has no pipes yet")),
        "{line}"
    );
    // Bad JSON: 65, before connecting. Bad flags: 64 (common::cli::parse). No server: 69.
    let property = run(&mut unix(&server, cwd.path()), &["property", "1", "{nope"]).await;
    assert_status(&property, 65);
    let usage = run(&mut unix(&server, cwd.path()), &["create", "--pipes", "0"]).await;
    assert_status(&usage, 64);
    let nowhere = run(
        &mut cli(cwd.path()),
        &[
            "--unix",
            "/nonexistent/talk.sock",
            "--attempts",
            "1",
            "echo",
            "x",
        ],
    )
    .await;
    assert_status(&nowhere, 69);
}

#[tokio::test]
async fn create_follow_streams_output_and_exits_with_the_command_status() {
    let server = TestServer::start().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    let launch = "sh -c 'echo out; echo err >&2'";
    let ok = run(
        &mut unix(&server, cwd.path()),
        &["create", "--launch", launch, "--follow"],
    )
    .await;
    assert_status(&ok, 0);
    assert_eq!(stdout(&ok), "out\n");
    assert!(stderr(&ok).contains("err\n"), "{}", stderr(&ok));

    let failed = run(
        &mut unix(&server, cwd.path()),
        &["create", "--launch", "sh -c 'exit 3'", "--follow"],
    )
    .await;
    assert_status(&failed, 3);
    assert!(stderr(&failed).contains("command exited with status 3"));

    // Without --follow: the id; `list` shows the pipe; `destroy --wait` ends it.
    let created = run(
        &mut unix(&server, cwd.path()),
        &["create", "--launch", "sleep 30"],
    )
    .await;
    assert_status(&created, 0);
    let id: u64 = stdout(&created).trim().parse().expect("a pipe id");
    let listed = run(&mut unix(&server, cwd.path()), &["list", "--json"]).await;
    assert_status(&listed, 0);
    let listed = json_line(&listed);
    let pipe = listed["pipes"]
        .as_array()
        .and_then(|pipes| pipes.iter().find(|p| p["pipe_id"] == id))
        .unwrap_or_else(|| panic!("pipe {id} not listed: {listed}"));
    assert_eq!(pipe["create"]["launch"], "sleep 30");
    let human = run(&mut unix(&server, cwd.path()), &["list"]).await;
    assert!(stdout(&human).contains("sleep 30"), "{}", stdout(&human));
    let id_text = id.to_string();
    let sent = run(
        &mut unix(&server, cwd.path()),
        &["send", &id_text, "a", "line"],
    )
    .await;
    assert_status(&sent, 0);
    assert_eq!(stdout(&sent), format!("pipe_send {id}\n"));
    std::fs::write(cwd.path().join("property.json"), r#"{"mode": 1}"#).expect("write");
    let property = run(
        &mut unix(&server, cwd.path()),
        &["property", &id_text, "@property.json"],
    )
    .await;
    assert_status(&property, 0);
    assert_eq!(stdout(&property), format!("pipe_property {id}\n"));
    // Not an admin identity: refused.
    let disconnect = run(&mut unix(&server, cwd.path()), &["disconnect", "1"]).await;
    assert_status(&disconnect, 1);
    let destroyed = run(
        &mut unix(&server, cwd.path()),
        &["destroy", &id.to_string(), "--wait"],
    )
    .await;
    assert_status(&destroyed, 0);
    assert!(stdout(&destroyed).contains(&format!("pipe {id} deleted")));
}

#[tokio::test]
async fn tls_with_and_without_a_client_certificate() {
    let server = TestServer::start().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    let echo = run(
        &mut tls(&server, cwd.path(), true),
        &["echo", "over", "tls"],
    )
    .await;
    assert_status(&echo, 0);
    assert_eq!(stdout(&echo), "over tls\n");

    let refused = run(&mut tls(&server, cwd.path(), false), &["echo", "x"]).await;
    assert_status(&refused, 69);
    assert!(stderr(&refused).contains("--cert"), "{}", stderr(&refused));
    // TLS without --ca is a usage error.
    let no_ca = run(&mut cli(cwd.path()), &["echo", "x"]).await;
    assert_status(&no_ca, 64);
    assert!(stderr(&no_ca).contains("--ca"), "{}", stderr(&no_ca));
}

#[tokio::test]
async fn model_upload_then_show() {
    let server = TestServer::start().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    std::fs::write(cwd.path().join("weights.bin"), b"\x00\x01weights").expect("write");
    let upload = run(
        &mut unix(&server, cwd.path()),
        &["model", "weights.bin", "--name", "m1/weights.bin"],
    )
    .await;
    assert_status(&upload, 0);
    assert!(stdout(&upload).contains("saved"), "{}", stdout(&upload));
    assert_eq!(
        std::fs::read(server.config.upload_dir.join("m1/weights.bin")).expect("uploaded"),
        b"\x00\x01weights"
    );
    let show = run(&mut unix(&server, cwd.path()), &["--json", "show"]).await;
    assert_status(&show, 0);
    let md5 = common::envelope::talk::md5_hex(b"\x00\x01weights");
    assert_eq!(json_line(&show)["model_info"]["m1/weights.bin"], md5);
    let missing = run(&mut unix(&server, cwd.path()), &["model", "absent.bin"]).await;
    assert_status(&missing, 65);
}

/// Sends SIGTERM and waits for the exit status.
async fn terminate(child: &mut Child) -> Option<i32> {
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let pid = rustix::process::Pid::from_raw(pid.expect("a pid")).expect("a valid pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    tokio::time::timeout(STEP, child.wait())
        .await
        .expect("receive stops in time")
        .expect("an exit status")
        .code()
}

#[tokio::test]
async fn receive_stores_the_output_of_pipes_created_by_another_run() {
    let server = TestServer::start().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    // One identity for both runs: the token first.
    assert_status(&run(&mut unix(&server, cwd.path()), &["token"]).await, 0);
    let out = cwd.path().join("out");
    let mut receiver = unix(&server, cwd.path())
        .args(["receive", "--dir"])
        .arg(&out)
        .spawn()
        .expect("receive starts");
    let mut lines = BufReader::new(receiver.stderr.take().expect("stderr")).lines();
    tokio::time::timeout(STEP, async {
        while let Some(line) = lines.next_line().await.expect("stderr line") {
            if line.starts_with("receiving as client") {
                return;
            }
        }
        panic!("receive ended before connecting");
    })
    .await
    .expect("receive connects in time");

    let created = run(
        &mut unix(&server, cwd.path()),
        &["create", "--launch", "sh -c 'echo hello; echo oops >&2'"],
    )
    .await;
    assert_status(&created, 0);
    let id = stdout(&created).trim().to_owned();
    let pipe_dir = out.join(format!("pipe_{id}"));
    testkit::until("receive to store the output", STEP, || {
        std::fs::read_to_string(pipe_dir.join("output.txt")).is_ok_and(|t| t == "hello\n")
            && std::fs::read_to_string(pipe_dir.join("errors.txt"))
                .is_ok_and(|t| t.contains("oops"))
    })
    .await;
    assert_eq!(terminate(&mut receiver).await, Some(0));
}

#[tokio::test]
async fn shell_reads_commands_from_stdin() {
    let server = TestServer::start().await;
    let cwd = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        cwd.path().join("create.json"),
        r#"{"launch": "sleep 30", "pipe_num": 1}"#,
    )
    .expect("write");
    let mut shell = unix(&server, cwd.path())
        .stdin(Stdio::piped())
        .spawn()
        .expect("the shell starts");
    let mut stdin = shell.stdin.take().expect("stdin");
    stdin
        .write_all(b"c create.json\npipe\nlist\nbogus\nq\n")
        .await
        .expect("write stdin");
    drop(stdin);
    let output = tokio::time::timeout(STEP, shell.wait_with_output())
        .await
        .expect("the shell ends in time")
        .expect("output");
    assert_status(&output, 0);
    let text = stdout(&output);
    let id: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pipe_create "))
        .and_then(|id| id.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pipe_create in {text}"));
    assert!(text.contains(&format!("pipe {id}: ")), "{text}");
    assert!(text.contains("sleep 30"), "{text}");
    assert!(stderr(&output).contains("unknown command \"bogus\""));
    assert!(cwd.path().join(".secure_talk_history").exists());
}
