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
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::support::{CLI, Daemon, ours};

const STEP: Duration = Duration::from_secs(20);
const UNKNOWN_JOB: &str = "job_00000000000000000000000000000000";

/// The CLI on the daemon's socket, with no BROKER_* from outside, in `cwd`.
fn cli_in(daemon: &Daemon, cwd: &Path) -> Command {
    cli_on(&daemon.socket, cwd)
}

/// The CLI on `socket`, with no BROKER_* from outside, in `cwd`.
fn cli_on(socket: &Path, cwd: &Path) -> Command {
    let mut command = ours(CLI);
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
    // A bad type is clap's usage error: 64, as every bad flag (common::cli::parse).
    let out = run(cli(&daemon), &["-s", "tls"], None).await;
    assert_eq!(code(&out), 64, "{}", stderr(&out));
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
/// serves the forward from the Unix socket it names, then opens its control socket (as ssh
/// does: after the forward listens), or with `-O check` connects to the control socket (all
/// it checks: that the master accepts there). `FAKE_SSH_FORWARD_FAIL` makes the forward fail
/// the way ssh does.
const FAKE_SSH: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys, threading
args = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps({"pid": os.getpid(), "args": args}) + "\n")
i, forward, no_command, control, op = 0, None, False, None, None
while args[i] != "--":
    if args[i] == "-o":
        if args[i + 1].startswith("ControlPath="): control = args[i + 1][len("ControlPath="):]
        i += 2
    elif args[i] == "-N": no_command, i = True, i + 1
    elif args[i] == "-L": forward, i = args[i + 1], i + 2
    elif args[i] == "-O": op, i = args[i + 1], i + 2
    else: sys.exit("fake ssh: unexpected " + args[i])
host, rest = args[i + 1], args[i + 2:]
if op == "check":
    try:
        socket.socket(socket.AF_UNIX).connect(control)
    except OSError as e:
        sys.exit("Control socket connect(%s): %s" % (control, e))
    sys.exit(0)
if op: sys.exit("fake ssh: unexpected -O " + op)
if not no_command:
    os.execvp("sh", ["sh", "-c", " ".join(rest)])
path, to_host, to_port = forward.rsplit(":", 2)
if os.environ.get("FAKE_SSH_FORWARD_FAIL"):
    sys.stderr.write("unix_listener: cannot bind to path " + path + ": Address already in use\n")
    sys.exit(255)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(16)
master = socket.socket(socket.AF_UNIX)
master.bind(control)
master.listen(16)
def answer_checks():
    while True:
        master.accept()[0].close()
threading.Thread(target=answer_checks, daemon=True).start()
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

/// Where `connect` said it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Local {
    Unix(PathBuf),
    Tcp(u16),
}

/// The listener in `connect`'s announcement, JSON or text.
fn announced(line: &str) -> Local {
    if let Ok(json) = serde_json::from_str::<Value>(line) {
        if let Some(path) = json["socket"].as_str() {
            return Local::Unix(PathBuf::from(path));
        }
        let port = json["local_port"].as_u64().expect("a socket or a port");
        return Local::Tcp(u16::try_from(port).unwrap());
    }
    if let Some(rest) = line.strip_prefix("socket ") {
        return Local::Unix(PathBuf::from(rest.split("  (").next().unwrap()));
    }
    let port = line
        .strip_prefix("open http://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("not an announcement: {line}"));
    Local::Tcp(port.parse().unwrap())
}

/// A connection to the tunnel's local end.
async fn dial(local: &Local) -> Box<dyn Stream> {
    match local {
        Local::Unix(path) => Box::new(UnixStream::connect(path).await.unwrap()),
        Local::Tcp(port) => Box::new(TcpStream::connect(("127.0.0.1", *port)).await.unwrap()),
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Sends one line through the tunnel and expects it back.
async fn echo_through(local: &Local, text: &str) {
    let mut stream = dial(local).await;
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
    let json: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["job"], job.summary.id.as_str());
    assert_eq!(json["url"], "http://localhost/");
    // By default a Unix socket in a directory only we can enter.
    let local = announced(&line);
    let Local::Unix(path) = &local else {
        panic!("a Unix socket by default: {line}")
    };
    let dir = path.parent().unwrap().to_owned();
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(
        json["curl"],
        format!("curl --unix-socket {} http://localhost/", path.display())
    );

    for text in ["GET / HTTP/1.0\r\n\r\n", "second connection\n"] {
        echo_through(&local, text).await;
        assert_eq!(
            seen.recv().await.unwrap(),
            secret,
            "the key line comes first"
        );
    }
    // Two at once.
    tokio::join!(echo_through(&local, "a\n"), echo_through(&local, "b\n"));
    terminate(child).await;
    assert!(!dir.exists(), "the private directory goes with connect");

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
    echo_through(&Local::Tcp(chosen), "x\n").await;
    terminate(child).await;
    daemon.stop().await;
}

/// A TLS echo server on 127.0.0.1 with a job's server certificate, taking any client
/// certificate of the broker's CA; each completed handshake sends the client's CN.
async fn tls_echo_server(
    tls: &broker::api::TlsMaterial,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<Option<String>>,
) {
    let config = crate::support::mtls_server(&tls.cert, &tls.key, &tls.ca, &[]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (peers, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
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
    (address, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ssl_mode_presents_the_owners_certificate() {
    let daemon = Daemon::start().await;
    let me = daemon.client().whoami().await.unwrap();
    let job = save(&daemon, "ssl").await;
    let tls = job.tls.clone().unwrap();
    let (target_addr, mut seen) = tls_echo_server(&tls).await;

    let mut command = cli(&daemon);
    command.args([
        "connect",
        &job.summary.id,
        "--target",
        &target_addr.to_string(),
    ]);
    let (child, line) = start_connect(command).await;
    assert!(line.contains("ssl mode"), "{line}");
    echo_through(&announced(&line), "GET /api HTTP/1.1\r\nHost: x\r\n\r\n").await;
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
    let local = announced(&line);
    let Local::Unix(path) = &local else {
        panic!("{line}")
    };
    let dir = path.parent().unwrap().to_owned();
    echo_through(&local, "through ssh\n").await;
    assert_eq!(seen.recv().await.unwrap(), secret);
    assert_eq!(
        seen.try_recv().ok(),
        None,
        "nothing was connected through the forward to see whether it is ready"
    );

    let calls = ssh_log(&log);
    let args = |call: &Value| -> Vec<String> {
        call["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        calls.len() >= 3,
        "a remote load, the forward, a check: {calls:?}"
    );
    // The forward ends in a socket in connect's private directory; ssh is a control master
    // there, and exits if the forward fails.
    let forward = args(&calls[1]);
    let control = format!("ControlPath={}", dir.join("ctl.sock").display());
    assert_eq!(
        forward,
        [
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ControlMaster=yes",
            "-o",
            &control,
            "-o",
            "ControlPersist=no",
            "-o",
            "StreamLocalBindUnlink=no",
            "-o",
            "Port=2222",
            "-N",
            "-L",
            &format!(
                "{}:localhost:{}",
                dir.join("fwd.sock").display(),
                job.summary.port
            ),
            "--",
            "login1",
        ]
    );
    // Readiness is ssh's word: -O check on the control socket.
    for call in &calls[2..] {
        assert_eq!(args(call), ["-o", &control, "-O", "check", "--", "login1"]);
    }
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
        stderr(&out).contains("cannot bind to path"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "nothing announced");
    daemon.stop().await;
}

/// A uid with no passwd entry: another local user, as far as anyone can tell.
const OTHER_UID: u32 = 4_242_421;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A stand-in for the job's web application behind its gate: after the right key line, one
/// HTTP answer with `body`; anything else is closed unanswered.
async fn keyed_web_app(listener: TcpListener, secret: String, body: &'static str) {
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let secret = secret.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let mut line = String::new();
                if read.read_line(&mut line).await.is_err() || line.trim_end() != secret {
                    return;
                }
                loop {
                    line.clear();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let answer = format!(
                    "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = write.write_all(answer.as_bytes()).await;
                let _ = write.shutdown().await;
            });
        }
    });
}

/// `curl` as `uid` to the tunnel's local end: curl's exit code and what it printed.
fn curl_local_as(uid: u32, local: &Local) -> (i32, String) {
    use std::os::unix::process::CommandExt as _;
    let mut command = std::process::Command::new("curl");
    command.args(["-sS", "--max-time", "10"]);
    match local {
        Local::Unix(path) => {
            command
                .arg("--unix-socket")
                .arg(path)
                .arg("http://localhost/");
        }
        Local::Tcp(port) => {
            command.arg(format!("http://127.0.0.1:{port}/"));
        }
    }
    let output = command.uid(uid).gid(uid).output().expect("run curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Issue 16: any local user could use the job through connect's listener (`curl` as `nobody`
/// to the printed URL got the owner's data). Now the default is a Unix socket in a 0700
/// directory, and on a TCP port asked for, another uid's connection is closed unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_lets_no_other_local_user_in() {
    if !is_root() {
        eprintln!("skipped: needs root to act as a second uid");
        return;
    }
    const DATA: &str = "the owner's data\n";
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap().to_string();
    keyed_web_app(target, job.secret.clone().unwrap(), DATA).await;

    for extra in [&[][..], &["--local-port", "0"]] {
        let mut command = cli(&daemon);
        command
            .args([
                "--json",
                "connect",
                &job.summary.id,
                "--target",
                &target_addr,
            ])
            .args(extra);
        let (child, line) = start_connect(command).await;
        let local = announced(&line);
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(
            curl_local_as(me, &local),
            (0, DATA.to_owned()),
            "the owner gets through ({extra:?})"
        );
        let (code, out) = curl_local_as(OTHER_UID, &local);
        assert!(
            code != 0 && out.is_empty(),
            "another uid gets nothing ({extra:?}, {local:?}): curl exit {code}, {out:?}"
        );
        match &local {
            // curl: "Couldn't connect" (EACCES on the directory).
            Local::Unix(_) => assert_eq!(code, 7, "{line}"),
            // curl: "Empty reply from server" or "Recv failure" (reset): closed unanswered.
            Local::Tcp(_) => assert!(code == 52 || code == 56, "{code}: {line}"),
        }
        assert!(
            extra.is_empty() == matches!(local, Local::Unix(_)),
            "{line}"
        );
        terminate(child).await;
    }
    daemon.stop().await;
}

/// Issue 16: connect accepted any job's server certificate (all chain to the broker CA and
/// carry the same names), so another user serving their own job's certificate on the job's
/// port while it was unbound got the owner's connection. Now only the job's own certificate
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ssl_refuses_another_jobs_certificate() {
    let daemon = Daemon::start().await;
    let mine = save(&daemon, "ssl").await;
    let theirs = save(&daemon, "ssl").await;
    let other = theirs.tls.clone().unwrap();
    // Their server, with their certificate, taking any certificate of the broker's CA.
    let (impostor_addr, mut done) = tls_echo_server(&other).await;

    let mut command = cli(&daemon);
    command.args([
        "connect",
        &mine.summary.id,
        "--target",
        &impostor_addr.to_string(),
    ]);
    let (child, line) = start_connect(command).await;
    let mut stream = dial(&announced(&line)).await;
    let _ = stream.write_all(b"GET /private HTTP/1.0\r\n\r\n").await;
    let mut answer = [0u8; 256];
    let got = tokio::time::timeout(STEP, stream.read(&mut answer))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(
        got,
        0,
        "nothing through another job's server: {:?}",
        String::from_utf8_lossy(&answer[..got])
    );
    assert!(done.try_recv().is_err(), "no handshake completed with it");
    terminate(child).await;
    daemon.stop().await;
}

/// A stand-in broker on a Unix socket that answers every request with `body` (200).
async fn hostile_broker(socket: &Path, body: String) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let body = body.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let mut line = String::new();
                loop {
                    line.clear();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = write.write_all(answer.as_bytes()).await;
                let _ = write.shutdown().await;
            });
        }
    });
}

/// Issue 16: `load --out-dir D` took the id for file names from the answer, so a crafted
/// answer (`/../../...`) wrote outside D. Now the answer must be the job asked for, a valid
/// id, with a hex secret; else exit 76 and nothing is written. Checked against a hostile
/// broker socket and a hostile remote broker-cli behind --host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_refuses_a_crafted_answer_and_writes_nothing() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let id = job.summary.id.clone();
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("out");
    // From D up to / and down to the work directory: where the files would land.
    let depth = out_dir.components().count() - 1;
    let escape = format!(
        "/{}{}/pwned",
        "../".repeat(depth),
        work.path().to_str().unwrap().trim_start_matches('/')
    );
    let landed = work.path().join("pwned.secret");
    let crafted = |id: &str, secret: &str| {
        let mut job = job.clone();
        job.summary.id = id.to_owned();
        job.secret = Some(secret.to_owned());
        serde_json::to_string(&job).unwrap()
    };
    let secret = job.secret.clone().unwrap();
    let other_id = "job_ffffffffffffffffffffffffffffffff";
    let answers = [
        crafted(&escape, &secret),
        crafted(other_id, &secret),
        crafted(&id, "00ff\n../x"),
    ];
    let (ssh, log) = fake_ssh(work.path());
    for (n, answer) in answers.iter().enumerate() {
        // A hostile broker on the socket.
        let socket = work.path().join(format!("hostile{n}.sock"));
        hostile_broker(&socket, answer.clone()).await;
        let out = run(
            cli_on(&socket, work.path()),
            &["load", &id, "--out-dir", out_dir.to_str().unwrap()],
            None,
        )
        .await;
        assert_eq!(code(&out), 76, "answer {n}: {}", stderr(&out));
        // A hostile broker-cli on the --host.
        let remote_cli = work.path().join(format!("hostile-cli{n}"));
        let answer_file = work.path().join(format!("answer{n}.json"));
        std::fs::write(&answer_file, answer).unwrap();
        std::fs::write(
            &remote_cli,
            format!("#!/bin/sh\ncat '{}'\n", answer_file.display()),
        )
        .unwrap();
        std::fs::set_permissions(&remote_cli, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = cli_in(&daemon, work.path());
        with_fake_ssh(&mut command, &ssh, &log);
        command.arg("--remote-cli").arg(&remote_cli).args([
            "load",
            &id,
            "--out-dir",
            out_dir.to_str().unwrap(),
        ]);
        let out = run(command, &[], None).await;
        assert_eq!(code(&out), 76, "remote answer {n}: {}", stderr(&out));
        assert!(!landed.exists(), "written outside --out-dir");
    }
    let names: Vec<_> = std::fs::read_dir(&out_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(names.is_empty(), "nothing written: {names:?}");
    // The real broker's answer still passes.
    let out = run(
        cli(&daemon),
        &["load", &id, "--out-dir", out_dir.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(out_dir.join(format!("{id}.secret")).exists());
    daemon.stop().await;
}

/// Issue 16: an existing --out-dir open to others kept its mode without a word, and the
/// secrets went in. Now it is refused (exit 74, the fix in the message) and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_dir_open_to_others_is_refused() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let id = job.summary.id.as_str();
    let dir = daemon.dir.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    for loose in [0o755, 0o750, 0o701, 0o770] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(loose)).unwrap();
        let out = run(
            cli(&daemon),
            &["load", id, "--out-dir", dir.to_str().unwrap()],
            None,
        )
        .await;
        assert_eq!(code(&out), 74, "{loose:o}: {}", stderr(&out));
        assert!(stderr(&out).contains("chmod 700"), "{}", stderr(&out));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing written"
        );
        assert_eq!(mode(&dir), loose, "the mode is the user's to change");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run(
        cli(&daemon),
        &["load", id, "--out-dir", dir.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(&dir.join(format!("{id}.secret"))), 0o600);
    daemon.stop().await;
}

/// Gives `path` (not following a symlink) to [`OTHER_UID`] where we can (as root).
fn give_away(path: &Path) {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(path, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    }
}

/// The names in `dir` that are temporary files.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Attack on fb69011 (F3): `--out-dir /tmp/keysA`, a symlink another user made to a
/// directory of the victim's, was checked through the link and written into its target.
/// Now a symlinked --out-dir is refused (exit 74), whoever owns it, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_out_dir_is_refused() {
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let id = job.summary.id.as_str();
    let shared = daemon.dir.path().join("tmp");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let private = daemon.dir.path().join("priv-test");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let theirs = shared.join("keysA");
    std::os::unix::fs::symlink(&private, &theirs).unwrap();
    give_away(&theirs);
    let mine = shared.join("keysB");
    std::os::unix::fs::symlink(&private, &mine).unwrap();
    for link in [&theirs, &mine] {
        let out = run(
            cli(&daemon),
            &["load", id, "--out-dir", link.to_str().unwrap()],
            None,
        )
        .await;
        assert_eq!(code(&out), 74, "{}", stderr(&out));
        assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0);
    }
    // The directory itself is fine.
    let out = run(
        cli(&daemon),
        &["load", id, "--out-dir", private.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(&private.join(format!("{id}.secret"))), 0o600);
    daemon.stop().await;
}

/// Attack on fb69011 (F3, `outdir_race.py`): a path component flipped between the victim's
/// private directory and another user's open one put the secret in the open one (17 of 150
/// runs) and left `.JOB.secret.*.tmp` files behind. Now the directory is opened once and
/// the files are created relative to that descriptor: for about a second of flipping, every
/// run either writes into the private directory or is refused, and no temporary file stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipping_out_dir_never_lands_in_the_wrong_directory() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let daemon = Daemon::start().await;
    let job = save(&daemon, "ssh").await;
    let id = job.summary.id.clone();
    let base = daemon.dir.path().join("race");
    let good = base.join("good/keys");
    let loot = base.join("loot/keys");
    for dir in [&good, &loot] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&loot, std::fs::Permissions::from_mode(0o777)).unwrap();
    give_away(&loot);
    let planted = loot.join(format!("{id}.secret"));
    std::fs::write(&planted, b"").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
    give_away(&planted);
    // --out-dir base/link/keys, base/link flipping between good and loot.
    let link = base.join("link");
    std::os::unix::fs::symlink("good", &link).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, link, base) = (stop.clone(), link.clone(), base.clone());
        std::thread::spawn(move || {
            let tmp = base.join("link.tmp");
            let mut flips = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for target in ["good", "loot"] {
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(target, &tmp).unwrap();
                    std::fs::rename(&tmp, &link).unwrap();
                    flips += 1;
                }
            }
            flips
        })
    };
    let out_dir = link.join("keys");
    let started = std::time::Instant::now();
    let (mut written, mut refused) = (0, 0);
    while started.elapsed() < Duration::from_secs(1) {
        let out = run(
            cli(&daemon),
            &["load", &id, "--out-dir", out_dir.to_str().unwrap()],
            None,
        )
        .await;
        match code(&out) {
            0 => written += 1,
            74 => refused += 1,
            other => panic!("exit {other}: {}", stderr(&out)),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    eprintln!("{written} written, {refused} refused, {flips} flips");
    assert!(written + refused > 0);
    assert_eq!(
        std::fs::read(&planted).unwrap(),
        b"",
        "the secret landed in the open directory"
    );
    assert_eq!(
        std::fs::read_dir(&loot).unwrap().count(),
        1,
        "only the planted file"
    );
    assert_eq!(temp_files(&good), Vec::<String>::new());
    if written > 0 {
        assert_eq!(mode(&good.join(format!("{id}.secret"))), 0o600);
    }
    daemon.stop().await;
}
