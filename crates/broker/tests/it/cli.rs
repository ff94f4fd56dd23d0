//! `broker-cli` as a child process against the test daemon: save, query, load, verify and
//! delete (JSON and text), the original's short flags, `--out-dir` files, exit codes, `--host`
//! through a stand-in ssh (which runs the remote command string with `sh -c`, as sshd would),
//! and `connect` to stand-in targets in ssh mode (the magic key line first) and ssl mode
//! (mTLS with the owner's certificate), directly and through a stand-in `ssh -N -L`.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker::api::{Job, JobList, JobType, VerifyResponse};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::support::Daemon;

const CLI: &str = env!("CARGO_BIN_EXE_broker-cli");
const STEP: Duration = Duration::from_secs(20);
const UNKNOWN_JOB: &str = "job_00000000000000000000000000000000";

/// The CLI on the daemon's socket, with no BROKER_* from outside, in `cwd`.
fn cli_in(daemon: &Daemon, cwd: &Path) -> Command {
    cli_on(&daemon.socket, cwd)
}

/// The CLI on `socket`, with no BROKER_* from outside, in `cwd`.
fn cli_on(socket: &Path, cwd: &Path) -> Command {
    let mut command = Command::new(CLI);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BROKER_") {
            command.env_remove(name);
        }
    }
    command
        .current_dir(cwd)
        // For `--host` tests: the "remote" broker-cli finds the daemon through this.
        .env("BROKER_SOCKET", socket)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

fn cli(daemon: &Daemon) -> Command {
    cli_in(daemon, daemon.dir.path())
}

/// Runs the CLI to the end, feeding `stdin`.
async fn run(mut command: Command, args: &[&str], stdin: Option<&[u8]>) -> Output {
    command.args(args);
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().expect("broker-cli starts");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // A CLI that stops early (usage errors) closes its stdin unread.
        let _ = pipe.write_all(bytes).await;
        drop(pipe);
    }
    tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("broker-cli finishes")
        .unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and parses stdout.
fn json<T: serde::de::DeserializeOwned>(output: &Output) -> T {
    assert_eq!(code(output), 0, "stderr: {}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", stdout(output)))
}

async fn save(daemon: &Daemon, job_type: &str) -> Job {
    json(&run(cli(daemon), &["--json", "save", job_type], None).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_round_trip_in_json() {
    let daemon = Daemon::start().await;
    let saved: Job = json(
        &run(
            cli(&daemon),
            &[
                "--json", "save", "ssh", "--ttl", "1h", "--label", "notebook",
            ],
            None,
        )
        .await,
    );
    let id = saved.summary.id.clone();
    let secret = saved.secret.clone().expect("an ssh job has a secret");
    assert_eq!(saved.summary.ttl_secs, 3600);
    assert_eq!(saved.summary.label.as_deref(), Some("notebook"));
    assert_eq!(daemon.client().load(&id).await.unwrap(), saved);

    let listed = run(cli(&daemon), &["--json", "query"], None).await;
    let list: JobList = json(&listed);
    assert_eq!(list.jobs, vec![saved.summary.clone()]);
    assert!(
        !stdout(&listed).contains(&secret),
        "query carries no secrets"
    );

    let loaded: Job = json(&run(cli(&daemon), &["load", &id, "--json"], None).await);
    assert_eq!(loaded, saved);

    // verify: stdin with or without its newline, or a file; exit 0 or 1.
    for input in [
        format!("{secret}\n"),
        secret.clone(),
        format!("{secret}\r\n"),
    ] {
        let out = run(
            cli(&daemon),
            &["--json", "verify", &id],
            Some(input.as_bytes()),
        )
        .await;
        assert_eq!(json::<VerifyResponse>(&out), VerifyResponse { valid: true });
    }
    let file = daemon.dir.path().join("secret.txt");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let out = run(
        cli(&daemon),
        &["verify", &id, "--secret-file", file.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(
        (code(&out), stdout(&out).trim()),
        (0, "valid"),
        "{}",
        stderr(&out)
    );
    let mut wrong = secret.clone().into_bytes();
    wrong[0] = if wrong[0] == b'a' { b'b' } else { b'a' };
    let out = run(cli(&daemon), &["--json", "verify", &id], Some(&wrong)).await;
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let answer: VerifyResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!answer.valid);

    let out = run(cli(&daemon), &["--json", "delete", &id], None).await;
    let deleted: Value = json(&out);
    assert_eq!(deleted["deleted"], true);
    assert_eq!(deleted["id"], id.as_str());
    let out = run(cli(&daemon), &["--json", "load", &id], None).await;
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    let out = run(cli(&daemon), &["delete", &id], None).await;
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    let list: JobList = json(&run(cli(&daemon), &["--json", "query"], None).await);
    assert!(list.jobs.is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_short_flags_work() {
    let daemon = Daemon::start().await;
    let saved: Job = json(&run(cli(&daemon), &["-s", "ssh", "--json"], None).await);
    assert_eq!(saved.summary.job_type, JobType::Ssh);
    let ssl: Job = json(&run(cli(&daemon), &["--json", "--save", "SSL"], None).await);
    assert_eq!(ssl.summary.job_type, JobType::Ssl);
    let id = saved.summary.id.as_str();

    let list: JobList = json(&run(cli(&daemon), &["-q", "--json"], None).await);
    assert_eq!(list.jobs.len(), 2);
    let list: JobList = json(&run(cli(&daemon), &["--json", "--query"], None).await);
    assert_eq!(list.jobs.len(), 2);
    let loaded: Job = json(&run(cli(&daemon), &["-l", id, "--json"], None).await);
    assert_eq!(loaded, saved);
    let loaded: Job = json(&run(cli(&daemon), &["--json", &format!("--load={id}")], None).await);
    assert_eq!(loaded, saved);

    let secret = saved.secret.clone().unwrap();
    let out = run(cli(&daemon), &["-v", id], Some(secret.as_bytes())).await;
    assert_eq!(
        (code(&out), stdout(&out).trim()),
        (0, "valid"),
        "{}",
        stderr(&out)
    );
    let out = run(cli(&daemon), &["--verify", id], Some(b"not it\n")).await;
    assert_eq!(
        (code(&out), stdout(&out).trim()),
        (1, "invalid"),
        "{}",
        stderr(&out)
    );
    // The original's `-v JOB SECRET`: refused, the secret would be in ps.
    let out = run(cli(&daemon), &["-v", id, &secret], None).await;
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("stdin"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&secret));
    // A bad type is clap's usage error.
    let out = run(cli(&daemon), &["-s", "tls"], None).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_output_keeps_secrets_off_the_screen() {
    let daemon = Daemon::start().await;
    let out = run(cli(&daemon), &["save", "ssh", "--label", "lab"], None).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("job"))
        .map(|rest| rest.trim().to_owned())
        .expect("a job line");
    let job = daemon.client().load(&id).await.unwrap();
    let secret = job.secret.clone().unwrap();
    assert!(!text.contains(&secret), "{text}");
    assert!(text.contains("--out-dir"), "the hint: {text}");
    assert!(text.contains(&job.summary.port.to_string()), "{text}");

    let out = run(cli(&daemon), &["load", &id], None).await;
    let text = stdout(&out);
    for fact in [
        id.as_str(),
        "ssh",
        &job.summary.host,
        &job.summary.port.to_string(),
        "active",
        &job.summary.created,
        &job.summary.expires,
        "lab",
    ] {
        assert!(text.contains(fact), "{fact} in {text}");
    }
    assert!(!text.contains(&secret), "{text}");
    let out = run(cli(&daemon), &["load", &id, "--show-secret"], None).await;
    assert!(stdout(&out).contains(&secret));

    let out = run(cli(&daemon), &["query"], None).await;
    let text = stdout(&out);
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.contains(&id) && text.contains("lab"), "{text}");

    let ssl = run(cli(&daemon), &["save", "ssl"], None).await;
    assert!(!stdout(&ssl).contains("PRIVATE KEY"), "{}", stdout(&ssl));

    let out = run(cli(&daemon), &["whoami", "--json"], None).await;
    let me: Value = json(&out);
    assert_eq!(me["via"], "unix");
    let out = run(cli(&daemon), &["ca"], None).await;
    assert_eq!(stdout(&out), daemon.client().ca_pem().await.unwrap());
    daemon.stop().await;
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_dir_files_are_private_and_match_load() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path().join("keys/new");
    let out = run(
        cli(&daemon),
        &["save", "ssh", "--out-dir", dir.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(&dir), 0o700);
    let jobs = daemon.client().query().await.unwrap();
    let job = daemon.client().load(&jobs[0].id).await.unwrap();
    let file = dir.join(format!("{}.secret", job.summary.id));
    assert!(
        stdout(&out).contains(file.to_str().unwrap()),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains(job.secret.as_deref().unwrap()));
    assert_eq!(mode(&file), 0o600);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("{}\n", job.secret.as_deref().unwrap())
    );
    // The file is what verify takes.
    let out = run(
        cli(&daemon),
        &[
            "verify",
            &job.summary.id,
            "--secret-file",
            file.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // ssl into the same directory; a stale file of the same name is replaced.
    let ssl: Job = json(
        &run(
            cli(&daemon),
            &["--json", "save", "ssl", "--out-dir", dir.to_str().unwrap()],
            None,
        )
        .await,
    );
    let tls = ssl.tls.clone().unwrap();
    assert_eq!(daemon.client().load(&ssl.summary.id).await.unwrap(), ssl);
    let id = &ssl.summary.id;
    for (suffix, content) in [
        ("crt", &tls.cert),
        ("key", &tls.key),
        ("client.crt", &tls.client_cert),
        ("client.key", &tls.client_key),
        ("ca.crt", &tls.ca),
    ] {
        let path = dir.join(format!("{id}.{suffix}"));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        assert_eq!(&std::fs::read_to_string(&path).unwrap(), content);
    }
    std::fs::write(dir.join(format!("{id}.key")), "stale").unwrap();
    let out = run(
        cli(&daemon),
        &["load", id, "--out-dir", dir.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join(format!("{id}.key"))).unwrap(),
        tls.key
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 6, "no temporary files left: {names:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_contact_nobody_and_exit_codes_are_documented() {
    let daemon = Daemon::start().await;
    let nowhere = daemon.dir.path().join("no-such.sock");
    let offline = || cli_on(&nowhere, daemon.dir.path());
    let missing_ssh = daemon.dir.path().join("no-such-ssh");
    let ssh = missing_ssh.to_str().unwrap();
    // Exit 64, not 69: nothing was contacted.
    for args in [
        &["load", "job_8000"][..],
        &["verify", "../etc/passwd"],
        &["delete", "JOB_0123456789abcdef0123456789abcdef"],
        &["connect", "job_x", "--target", "127.0.0.1:1"],
        &["--ssh", ssh, "--host", "login1", "load", "job_1; rm -rf ~"],
        &["--ssh", ssh, "--host=-oProxyCommand=x", "query"],
        &["--ssh", ssh, "--host", "login1", "save", "ssh"],
        &["--url", "https://broker:8443", "query"],
    ] {
        let out = run(offline(), args, Some(b"secret\n")).await;
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("broker-cli: "), "{}", stderr(&out));
    }
    let out = run(offline(), &["load", UNKNOWN_JOB], None).await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let out = run(
        offline(),
        &["--ssh", ssh, "--host", "login1", "load", UNKNOWN_JOB],
        None,
    )
    .await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));

    let out = run(cli(&daemon), &["load", UNKNOWN_JOB], None).await;
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    assert!(stderr(&out).contains("no such job"), "{}", stderr(&out));
    let out = run(cli(&daemon), &["verify", UNKNOWN_JOB], Some(b"x\n")).await;
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    let out = run(cli(&daemon), &["verify", UNKNOWN_JOB], Some(b"")).await;
    assert_eq!(code(&out), 64, "an empty secret: {}", stderr(&out));

    let out = run(cli(&daemon), &["--help"], None).await;
    let help = stdout(&out);
    for needle in [
        "Exit codes",
        "65",
        "69",
        "77",
        "broker-run --type ssh --gate",
        "connect JOB --host",
    ] {
        assert!(help.contains(needle), "{needle} in --help");
    }
    daemon.stop().await;
}

/// A stand-in for `ssh`: logs its arguments (one JSON array per line) and its pid, then
/// either runs the remote command string with `sh -c`, as sshd does with it, or with `-N -L`
/// serves the forward. `FAKE_SSH_FORWARD_FAIL` makes the forward fail the way ssh does.
const FAKE_SSH: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys, threading
args = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps({"pid": os.getpid(), "args": args}) + "\n")
i, forward, no_command = 0, None, False
while args[i] != "--":
    if args[i] == "-o": i += 2
    elif args[i] == "-N": no_command, i = True, i + 1
    elif args[i] == "-L": forward, i = args[i + 1], i + 2
    else: sys.exit("fake ssh: unexpected " + args[i])
host, rest = args[i + 1], args[i + 2:]
if not no_command:
    os.execvp("sh", ["sh", "-c", " ".join(rest)])
if os.environ.get("FAKE_SSH_FORWARD_FAIL"):
    sys.stderr.write("channel_setup_fwd_listener: cannot listen to port: " + forward + "\n")
    sys.exit(255)
bind, port, to_host, to_port = forward.split(":")
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((bind, int(port)))
listener.listen(16)
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data: break
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(conn):
    try:
        far = socket.create_connection((to_host, int(to_port)))
    except OSError:
        conn.close(); return
    threading.Thread(target=pipe, args=(conn, far), daemon=True).start()
    threading.Thread(target=pipe, args=(far, conn), daemon=True).start()
while True:
    conn, _ = listener.accept()
    serve(conn)
"#;

/// Writes the fake ssh into `dir`; returns its path and its log.
fn fake_ssh(dir: &Path) -> (PathBuf, PathBuf) {
    let path = dir.join("fake-ssh");
    std::fs::write(&path, FAKE_SSH).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (path, dir.join("fake-ssh.log"))
}

fn ssh_log(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn with_fake_ssh(command: &mut Command, ssh: &Path, log: &Path) {
    command
        .env("FAKE_SSH_LOG", log)
        .arg("--ssh")
        .arg(ssh)
        .args(["--ssh-option", "Port=2222", "--host", "login1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_runs_the_remote_cli_over_ssh_with_quoted_words() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let id = job.summary.id.as_str();
    let work = tempfile::tempdir().unwrap();
    let (ssh, log) = fake_ssh(work.path());
    // A remote program path the remote shell would split or run pieces of if it were not
    // quoted.
    let odd = work.path().join("bin dir; touch pwned $(touch pwned2)");
    std::fs::create_dir(&odd).unwrap();
    std::os::unix::fs::symlink(CLI, odd.join("broker-cli")).unwrap();
    let remote_cli = odd.join("broker-cli");
    let remote = |args: &[&str]| {
        let mut command = cli_in(&daemon, work.path());
        with_fake_ssh(&mut command, &ssh, &log);
        command.arg("--remote-cli").arg(&remote_cli).args(args);
        command
    };

    let loaded: Job = json(&run(remote(&["--json", "load", id]), &[], None).await);
    assert_eq!(loaded, job);
    let list: JobList = json(&run(remote(&["--json", "query"]), &[], None).await);
    assert_eq!(list.jobs, vec![job.summary.clone()]);
    let out = run(remote(&["query"]), &[], None).await;
    assert!(stdout(&out).contains(id), "text output of a remote query");
    let out = run(remote(&["load", id]), &[], None).await;
    assert!(!stdout(&out).contains(job.secret.as_deref().unwrap()));
    let out = run(remote(&["load", UNKNOWN_JOB]), &[], None).await;
    assert_eq!(
        code(&out),
        65,
        "the remote exit code comes through: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("on login1"), "{}", stderr(&out));
    let mut missing = remote(&["load", id]);
    missing.args(["--remote-cli", "/no/such/broker-cli"]);
    let out = run(missing, &[], None).await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(stderr(&out).contains("--remote-cli"), "{}", stderr(&out));

    assert!(!work.path().join("pwned").exists() && !work.path().join("pwned2").exists());
    let calls = ssh_log(&log);
    let first: Vec<&str> = calls[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let quoted = shlex::try_quote(remote_cli.to_str().unwrap()).unwrap();
    assert_eq!(
        first,
        [
            "-o",
            "BatchMode=yes",
            "-o",
            "Port=2222",
            "--",
            "login1",
            &format!("{quoted} --json load {id}"),
        ]
    );
    daemon.stop().await;
}

/// A gate-less stand-in for the job's application: reads the first line, reports it, closes
/// unless it is `secret`, then echoes.
async fn key_checking_echo(
    listener: TcpListener,
    secret: String,
) -> mpsc::UnboundedReceiver<String> {
    let (seen, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let mut line = String::new();
                if read.read_line(&mut line).await.is_err() || line.is_empty() {
                    return; // the readiness probe of an ssh forward
                }
                let line = line.strip_suffix('\n').unwrap_or(&line).to_owned();
                let _ = seen.send(line.clone());
                if line == secret {
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
        }
    });
    lines
}

/// Starts `broker-cli connect` and returns it with its announcement (the first stdout line).
async fn start_connect(mut command: Command) -> (Child, String) {
    let mut child = command.spawn().expect("broker-cli starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = match tokio::time::timeout(STEP, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
            panic!("no announcement ({other:?}): {err}");
        }
    };
    (child, line)
}

/// Sends one line through the tunnel and expects it back.
async fn echo_through(port: u16, text: &str) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(String::from_utf8(back).unwrap(), text);
}

/// SIGTERM to the child we started; it must exit 0.
async fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("connect ends on SIGTERM")
        .unwrap();
    if !status.success() {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
        panic!("connect ended with {status}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ssh_mode_sends_the_key_line_first() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let secret = job.secret.clone().unwrap();
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let mut seen = key_checking_echo(target, secret.clone()).await;

    let mut command = cli(&daemon);
    command.args([
        "--json",
        "connect",
        &job.summary.id,
        "--target",
        &target_addr.to_string(),
    ]);
    let (child, line) = start_connect(command).await;
    let announced: Value = serde_json::from_str(&line).unwrap();
    let port = u16::try_from(announced["local_port"].as_u64().unwrap()).unwrap();
    assert_eq!(announced["url"], format!("http://127.0.0.1:{port}/"));
    assert_eq!(announced["job"], job.summary.id.as_str());

    for text in ["GET / HTTP/1.0\r\n\r\n", "second connection\n"] {
        echo_through(port, text).await;
        assert_eq!(
            seen.recv().await.unwrap(),
            secret,
            "the key line comes first"
        );
    }
    // Two at once.
    tokio::join!(echo_through(port, "a\n"), echo_through(port, "b\n"));
    terminate(child).await;

    // Text announcement, a chosen local port.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let chosen = free.local_addr().unwrap().port();
    drop(free);
    let mut command = cli(&daemon);
    command.args([
        "connect",
        &job.summary.id,
        "--target",
        &target_addr.to_string(),
        "--local-port",
        &chosen.to_string(),
    ]);
    let (child, line) = start_connect(command).await;
    assert_eq!(
        line,
        format!(
            "open http://127.0.0.1:{chosen}/  (job {}, ssh mode, to {target_addr})",
            job.summary.id
        )
    );
    echo_through(chosen, "x\n").await;
    terminate(child).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ssl_mode_presents_the_owners_certificate() {
    let daemon = Daemon::start().await;
    let me = daemon.client().whoami().await.unwrap();
    let job = save(&daemon, "ssl").await;
    let tls = job.tls.clone().unwrap();
    let config = broker::pemtls::server_config(&tls.cert, &tls.key, &tls.ca, "").unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (peers, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = target.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let peers = peers.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = common::tls::peer_identity(stream.get_ref().1);
                let _ = peers.send(peer.and_then(|p| p.cn));
                let (mut read, mut write) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });

    let mut command = cli(&daemon);
    command.args([
        "connect",
        &job.summary.id,
        "--target",
        &target_addr.to_string(),
    ]);
    let (child, line) = start_connect(command).await;
    assert!(line.contains("ssl mode"), "{line}");
    let port: u16 = line
        .strip_prefix("open http://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    echo_through(port, "GET /api HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(seen.recv().await.unwrap(), Some(me.user.clone()));
    terminate(child).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_host_runs_an_ssh_forward_and_stops_it() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let secret = job.secret.clone().unwrap();
    // The "application" on the job's port of the "remote" host (this one).
    let target = TcpListener::bind(("127.0.0.1", job.summary.port))
        .await
        .expect("the job's port is free");
    let mut seen = key_checking_echo(target, secret.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let (ssh, log) = fake_ssh(work.path());
    let mut command = cli_in(&daemon, work.path());
    with_fake_ssh(&mut command, &ssh, &log);
    command.args(["--remote-cli", CLI, "connect", &job.summary.id]);
    let (child, line) = start_connect(command).await;
    assert!(line.ends_with("ssh mode, via login1)"), "{line}");
    let port: u16 = line
        .strip_prefix("open http://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    echo_through(port, "through ssh\n").await;
    assert_eq!(seen.recv().await.unwrap(), secret);

    let calls = ssh_log(&log);
    assert_eq!(calls.len(), 2, "a remote load, then the forward: {calls:?}");
    let forward: Vec<&str> = calls[1]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let spec = forward[forward.len() - 3];
    assert!(
        spec.starts_with("127.0.0.1:")
            && spec.ends_with(&format!(":localhost:{}", job.summary.port)),
        "{forward:?}"
    );
    assert_eq!(
        forward[..8],
        [
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "-o",
            "Port=2222"
        ]
    );
    assert_eq!(forward[8..10], ["-N", "-L"]);
    assert_eq!(forward[forward.len() - 2..], ["--", "login1"]);
    let ssh_pid = i32::try_from(calls[1]["pid"].as_i64().unwrap()).unwrap();

    terminate(child).await;
    // The forward went with it (and was reaped).
    assert!(
        !Path::new(&format!("/proc/{ssh_pid}")).exists(),
        "ssh {ssh_pid} still there"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_a_failed_forward_with_sshs_words() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let work = tempfile::tempdir().unwrap();
    let (ssh, log) = fake_ssh(work.path());
    let mut command = cli_in(&daemon, work.path());
    with_fake_ssh(&mut command, &ssh, &log);
    command.env("FAKE_SSH_FORWARD_FAIL", "1").args([
        "--remote-cli",
        CLI,
        "connect",
        &job.summary.id,
    ]);
    let out = run(command, &[], None).await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot listen to port"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "nothing announced");
    daemon.stop().await;
}
