//! End to end: the real binaries together against the test daemon. `broker-run --gate` fronts
//! a small python3 web server on its `{socket}`, `broker-cli connect` opens the local port, and an
//! HTTP request goes through both, in ssh mode (the key line) and ssl mode (mTLS); wrong keys
//! and another user's broker-issued certificate are refused at the gate; an expired job is
//! refused by `connect`; deleting the job closes the gate to a tunnel that is still open; and
//! `connect --host` runs a real `ssh -N -L` to a throwaway sshd (when /usr/sbin/sshd exists
//! and the test runs as root), host key checking on, and another uid watching for the forward
//! to steal its port gets nothing.
//!
//! Every child is held by a [`Proc`] guard that stops it on drop (also on panic), every wait
//! has a deadline, and only processes this file started are signalled, by pid.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::api::{Job, JobType};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::support::{CLI, Daemon, accepting, curl_as, http_get, until_served};

/// Deadline of any single wait.
const STEP: Duration = Duration::from_secs(10);
/// Budget of a whole test.
const BUDGET: Duration = Duration::from_secs(30);
const HELLO: &str = "hello through the gate\n";
/// A uid with no passwd entry: another user, as far as the broker can tell.
const OTHER_UID: u32 = 4_242_421;
const SSHD: &str = "/usr/sbin/sshd";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A child process we started: its stdout and stderr line by line, and on drop SIGTERM, then
/// SIGKILL if it is still there after a grace period (so a panicking test leaves nothing).
struct Proc {
    name: &'static str,
    child: Child,
    out: mpsc::UnboundedReceiver<String>,
    err: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

fn lines<R>(pipe: Option<R>) -> mpsc::UnboundedReceiver<String>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    if let Some(pipe) = pipe {
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

impl Proc {
    fn spawn(name: &'static str, mut command: Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let out = lines(child.stdout.take());
        let err = lines(child.stderr.take());
        Proc {
            name,
            child,
            out,
            err,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().expect("still running")).unwrap())
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// stderr so far.
    fn stderr(&mut self) -> String {
        while let Ok(line) = self.err.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// The next stdout line.
    async fn next_line(&mut self) -> String {
        let name = self.name;
        match tokio::time::timeout(STEP, self.out.recv()).await {
            Ok(Some(line)) => line,
            other => {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
                panic!(
                    "{}: no stdout line ({other:?}); stderr:\n{}",
                    name,
                    self.stderr()
                )
            }
        }
    }

    /// Waits for a stderr line that satisfies `wanted` (lines already received count).
    async fn stderr_line(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| wanted(l)) {
            return line.clone();
        }
        self.wait_stderr(wanted).await
    }

    /// Waits for a stderr line that satisfies `wanted` and comes after the ones received so
    /// far.
    async fn fresh_stderr_line(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        let _ = self.stderr();
        self.wait_stderr(wanted).await
    }

    async fn wait_stderr(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.err.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                other => panic!(
                    "{}: the awaited line never came ({}); stderr:\n{}",
                    self.name,
                    if other.is_err() { "timeout" } else { "closed" },
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the exit code (a death by signal is a failure), then collects what is left
    /// of stderr.
    async fn exit_code(&mut self) -> i32 {
        let name = self.name;
        let status = match tokio::time::timeout(STEP, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "{} did not exit within {STEP:?}; stderr:\n{}",
                name,
                self.stderr()
            ),
        };
        // Grandchildren may hold the pipe: short waits only.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(300), self.err.recv()).await
        {
            self.seen.push(line);
        }
        status
            .code()
            .unwrap_or_else(|| panic!("{} was killed ({status}); stderr:\n{}", name, self.stderr()))
    }

    /// SIGTERM, then the exit code.
    async fn terminate(&mut self) -> i32 {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        self.exit_code().await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            // broker-run forwards SIGTERM to its application and deletes the job.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if !self.running() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.start_kill();
    }
}

/// A command for one of our binaries: nothing BROKER_* (or journald) from outside.
fn ours(program: &str, rust_log: &str) -> Command {
    let mut command = crate::support::ours(program);
    command
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", rust_log);
    command
}

/// broker-run on the daemon's socket ([`crate::support::broker_run`]), logging at `rust_log`.
fn broker_run(daemon: &Daemon, runtime_dir: &Path, rust_log: &str, args: &[&str]) -> Command {
    let mut command = crate::support::broker_run(daemon, runtime_dir, args);
    command
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", rust_log);
    command
}

/// broker-cli on the daemon's socket.
fn cli(daemon: &Daemon) -> Command {
    let mut command = ours(CLI, "warn");
    command.arg("--socket").arg(&daemon.socket);
    command
}

/// `broker-run --gate --bind 127.0.0.1 ARGS -- python3 SOCKET_WEB_APP unix WEB {socket}`
/// serving `web`, and the job id and public port from its start-up line.
async fn gated_web_app(
    daemon: &Daemon,
    web: &Path,
    xdg: &Path,
    rust_log: &str,
    args: &[&str],
) -> (Proc, String, u16) {
    let mut argv = vec!["--gate", "--bind", "127.0.0.1"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&[
        "--",
        "python3",
        "-c",
        crate::support::SOCKET_WEB_APP,
        "unix",
        web.to_str().unwrap(),
        "{socket}",
    ]);
    let mut run = Proc::spawn("broker-run", broker_run(daemon, xdg, rust_log, &argv));
    // `broker-run: job ID type T port P (gate; app on unix:PATH)`
    let line = run.stderr_line(|l| l.starts_with("broker-run: job ")).await;
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((words[3], words[5]), ("type", "port"), "{line}");
    assert!(line.contains("(gate; app on unix:"), "gated: {line}");
    let id = words[2].to_owned();
    let port = words[6].parse().unwrap();
    accepting(port, STEP).await;
    (run, id, port)
}

/// A directory holding `hello.txt`, for `http.server`.
fn web_root() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("broker-e2e-web-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    dir
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// [`http_get`] over plain TCP to 127.0.0.1:`port`.
async fn plain_get(port: u16, preamble: &[u8]) -> Vec<u8> {
    match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(stream) => http_get(stream, preamble).await,
        Err(_) => Vec::new(),
    }
}

/// [`http_get`] over TLS with `config` to 127.0.0.1:`port` (name `localhost`); nothing when
/// the handshake fails.
async fn tls_get(port: u16, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    match common::tls::connect(config, "localhost", tcp, STEP).await {
        Ok(stream) => http_get(stream, b"").await,
        Err(_) => Vec::new(),
    }
}

fn assert_refused(answer: &[u8], what: &str) {
    assert!(
        answer.is_empty(),
        "{what}: closed without a byte, got {:?}",
        String::from_utf8_lossy(answer)
    );
}

/// Starts `broker-cli ... --json connect ...` (`command` has the rest) and reads the local
/// port it announces.
async fn start_connect(command: Command, job: &str) -> (Proc, u16) {
    let mut connect = Proc::spawn("broker-cli connect", command);
    let line = connect.next_line().await;
    let announced: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(announced["job"], job, "{line}");
    let port = u16::try_from(announced["local_port"].as_u64().unwrap()).unwrap();
    assert_ne!(port, 0);
    assert_eq!(announced["url"], format!("http://127.0.0.1:{port}/"));
    (connect, port)
}

/// `connect JOB --target 127.0.0.1:PORT --local-port 0`.
async fn connect_direct(daemon: &Daemon, job: &str, port: u16) -> (Proc, u16) {
    let mut command = cli(daemon);
    command.args([
        "--json",
        "connect",
        job,
        "--target",
        &format!("127.0.0.1:{port}"),
        "--local-port",
        "0",
    ]);
    start_connect(command, job).await
}

async fn assert_job_gone(daemon: &Daemon, id: &str) {
    let err = daemon.client().load(id).await.expect_err("job is deleted");
    assert!(err.is_not_found(), "{err}");
}

/// After the application is gone: the tunnel stays up, but a request through it gets no
/// answer, and connect says why; SIGTERM ends it with 0.
async fn tunnel_fails_then_ends(mut connect: Proc, local: u16) {
    assert_refused(&plain_get(local, b"").await, "through a tunnel to nothing");
    assert!(connect.running(), "connect survives a failed connection");
    assert_eq!(connect.terminate().await, 0, "{}", connect.stderr());
    let log = connect.stderr();
    assert!(log.contains("tunnel connection failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_mode_gate_and_connect_end_to_end() {
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let (web, xdg) = (web_root(), temp_dir("broker-e2e-xdg-"));
    let (mut run, id, port) =
        gated_web_app(&daemon, web.path(), xdg.path(), "info", &["--type", "ssh"]).await;
    let job = daemon.client().load(&id).await.unwrap();
    assert_eq!(
        (job.summary.job_type, job.summary.port),
        (JobType::Ssh, port)
    );
    let secret = job.secret.clone().unwrap();

    // Through broker-cli connect: the key line is its business, the user sends plain HTTP.
    let (connect, local) = connect_direct(&daemon, &id, port).await;
    until_served(HELLO, STEP, || plain_get(local, b"")).await;
    until_served(HELLO, STEP, || plain_get(local, b"")).await;

    // Straight to the gate: a wrong key, no key line at all, a plain request: closed without
    // a byte; the right key line opens it (the refusals are about the key).
    let mut wrong = secret.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    wrong.push(b'\n');
    for (preamble, what) in [
        (&wrong[..], "a wrong key"),
        (&b"0123abcd\n"[..], "a short key"),
        (b"", "no key line"),
    ] {
        assert_refused(&plain_get(port, preamble).await, what);
    }
    let key_line = format!("{secret}\n");
    until_served(HELLO, STEP, || plain_get(port, key_line.as_bytes())).await;
    run.stderr_line(|l| l.contains("gate: wrong key")).await;

    // The app goes (SIGTERM to broker-run reaches http.server): the job is deleted, and the
    // tunnel that is still open gets nothing.
    assert_eq!(run.terminate().await, 128 + 15, "{}", run.stderr());
    assert_job_gone(&daemon, &id).await;
    assert!(
        !run.stderr().contains(&secret),
        "the secret is never logged"
    );
    tunnel_fails_then_ends(connect, local).await;
    daemon.stop().await;
    assert!(started.elapsed() < BUDGET, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_mode_gate_and_connect_end_to_end_refusing_another_users_certificate() {
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let (web, xdg) = (web_root(), temp_dir("broker-e2e-xdg-"));
    let (mut run, id, port) =
        gated_web_app(&daemon, web.path(), xdg.path(), "info", &["--type", "ssl"]).await;
    let job = daemon.client().load(&id).await.unwrap();
    let tls = job.tls.clone().expect("an ssl job has certificates");

    // Through broker-cli connect: mTLS with the owner's certificate is its business.
    let (connect, local) = connect_direct(&daemon, &id, port).await;
    until_served(HELLO, STEP, || plain_get(local, b"")).await;

    // Straight to the gate with the owner's certificate: served.
    let owner = Arc::new(crate::support::mtls_client(
        &tls.ca,
        &tls.client_cert,
        &tls.client_key,
    ));
    until_served(HELLO, STEP, || tls_get(port, owner.clone())).await;
    // Plain HTTP to the TLS port: nothing from the app.
    let answer = plain_get(port, b"").await;
    assert!(!answer.starts_with(b"HTTP"), "{answer:?}");

    if is_root() {
        // Another user's client certificate from the same broker CA: the chain is fine, the
        // owner is not.
        let (status, body) = curl_as(
            OTHER_UID,
            &daemon.socket,
            "POST",
            "/v1/jobs",
            Some(r#"{"type":"ssl"}"#),
        );
        assert_eq!(status, 201, "{body}");
        let theirs: Job = serde_json::from_str(&body).unwrap();
        assert_eq!(theirs.summary.owner, format!("uid:{OTHER_UID}"));
        let other = theirs.tls.clone().unwrap();
        let info = |pem: &str| common::pki::inspect_pem(pem).unwrap().remove(0);
        let (theirs_cert, ours_cert) = (info(&other.client_cert), info(&tls.client_cert));
        assert_eq!(
            theirs_cert.common_name.as_deref(),
            Some(format!("uid:{OTHER_UID}").as_str())
        );
        assert_eq!(theirs_cert.issuer, ours_cert.issuer, "the same broker CA");
        assert_ne!(theirs_cert.common_name, ours_cert.common_name);

        let stranger = Arc::new(crate::support::mtls_client(
            &tls.ca,
            &other.client_cert,
            &other.client_key,
        ));
        assert_refused(
            &tls_get(port, stranger).await,
            "another user's certificate from the broker CA",
        );
        run.stderr_line(|l| l.contains("not issued to the job owner"))
            .await;
        // The owner's still works, and their job goes again.
        until_served(HELLO, STEP, || tls_get(port, owner.clone())).await;
        let (status, body) = curl_as(
            OTHER_UID,
            &daemon.socket,
            "DELETE",
            &format!("/v1/jobs/{}", theirs.summary.id),
            None,
        );
        assert!((200..300).contains(&status), "{status} {body}");
    } else {
        eprintln!("skipped the other user's certificate: needs root to act as a second uid");
    }

    assert_eq!(run.terminate().await, 128 + 15, "{}", run.stderr());
    assert_job_gone(&daemon, &id).await;
    tunnel_fails_then_ends(connect, local).await;
    daemon.stop().await;
    assert!(started.elapsed() < BUDGET, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_an_expired_job_without_opening_a_port() {
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let job = daemon
        .client()
        .save_type(JobType::Ssh, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let id = job.summary.id.clone();
    // No heartbeat: expired after 1 s (and reaped within another).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut command = cli(&daemon);
    command.args([
        "--json",
        "connect",
        &id,
        "--target",
        &format!("127.0.0.1:{}", job.summary.port),
        "--local-port",
        "0",
    ]);
    let mut connect = Proc::spawn("broker-cli connect", command);
    let code = connect.exit_code().await;
    let stderr = connect.stderr();
    assert_eq!(code, 65, "the documented not-found code; stderr: {stderr}");
    assert!(stderr.contains("no such job"), "{stderr}");
    assert_eq!(
        tokio::time::timeout(STEP, connect.out.recv())
            .await
            .unwrap(),
        None,
        "nothing announced, no local port"
    );
    assert_job_gone(&daemon, &id).await;
    daemon.stop().await;
    assert!(started.elapsed() < BUDGET, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deleted_from_outside_closes_its_gate_to_an_open_tunnel() {
    // run.rs has the launcher's side (the app stopped, exit 69); this is the gate's: between
    // the deletion and broker-run noticing it at its next heartbeat, the gate already refuses,
    // because the broker no longer verifies the key.
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let (web, xdg) = (web_root(), temp_dir("broker-e2e-xdg-"));
    // A heartbeat every 3 s, logged at debug.
    let (mut run, id, port) = gated_web_app(
        &daemon,
        web.path(),
        xdg.path(),
        "info,broker_run=debug",
        &["--type", "ssh", "--ttl", "9s"],
    )
    .await;
    let (connect, local) = connect_direct(&daemon, &id, port).await;
    until_served(HELLO, STEP, || plain_get(local, b"")).await;

    // Right after a heartbeat: 3 s before broker-run can notice.
    run.fresh_stderr_line(|l| l.contains(" heartbeat job="))
        .await;
    let deleted = Instant::now();
    daemon.client().delete(&id).await.unwrap();
    assert_refused(
        &plain_get(local, b"").await,
        "through the tunnel after the deletion",
    );
    assert!(
        deleted.elapsed() < Duration::from_secs(2),
        "still inside the heartbeat period: {:?}",
        deleted.elapsed()
    );
    run.stderr_line(|l| l.contains("cannot verify the key with the broker; refused"))
        .await;
    assert!(
        run.running(),
        "the gate refused, broker-run had not yet noticed"
    );

    assert_eq!(run.exit_code().await, 69, "{}", run.stderr());
    assert!(run.stderr().contains("no longer has this job"));
    tunnel_fails_then_ends(connect, local).await;
    daemon.stop().await;
    assert!(started.elapsed() < BUDGET, "{:?}", started.elapsed());
}

/// A throwaway sshd on 127.0.0.1:`port` accepting `id` for the current user, with its host
/// key in `known_hosts`.
struct Sshd {
    proc: Proc,
    port: u16,
    id: PathBuf,
    known_hosts: PathBuf,
}

fn ssh_keygen(path: &Path, comment: &str) {
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen {status}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_sshd(dir: &Path) -> Sshd {
    let host_key = dir.join("host_key");
    let id = dir.join("id");
    ssh_keygen(&host_key, "broker-e2e-host");
    ssh_keygen(&id, "broker-e2e-user");
    let authorized = dir.join("authorized_keys");
    std::fs::copy(dir.join("id.pub"), &authorized).unwrap();
    std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The privilege separation directory.
    let privsep = Path::new("/run/sshd");
    if !privsep.exists() {
        std::fs::create_dir_all(privsep).unwrap();
        std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1:{port}\n\
             HostKey {host_key}\n\
             AuthorizedKeysFile {authorized}\n\
             StrictModes no\n\
             PidFile none\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\n\
             PrintMotd no\n",
            host_key = host_key.display(),
            authorized = authorized.display(),
        ),
    )
    .unwrap();
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}")).unwrap();
    let check = std::process::Command::new(SSHD)
        .arg("-t")
        .arg("-f")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "sshd -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut command = Command::new(SSHD);
    command.arg("-D").arg("-e").arg("-f").arg(&config);
    let mut proc = Proc::spawn("sshd", command);
    proc.stderr_line(|l| l.starts_with("Server listening on"))
        .await;
    Sshd {
        proc,
        port,
        id,
        known_hosts,
    }
}

/// The pids of `parent`'s children named `comm`.
fn children_named(parent: Pid, comm: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if name == comm && ppid == Some(parent.as_raw().to_string().as_str()) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_host_through_a_real_sshd() {
    if !Path::new(SSHD).exists() {
        eprintln!("skipped: no {SSHD} (install openssh-server)");
        return;
    }
    if !is_root() {
        eprintln!("skipped: the throwaway sshd needs root (privilege separation)");
        return;
    }
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let (web, xdg) = (web_root(), temp_dir("broker-e2e-xdg-"));
    let ssh_dir = temp_dir("broker-e2e-sshd-");
    let mut sshd = start_sshd(ssh_dir.path()).await;
    let (mut run, id, _port) =
        gated_web_app(&daemon, web.path(), xdg.path(), "info", &["--type", "ssh"]).await;

    // The "remote" broker-cli (over ssh, on this host) must find the test daemon's socket:
    // --remote-socket passes it on as the remote command's --socket.
    let connect_via = |known_hosts: &Path| {
        let mut command = cli(&daemon);
        command
            .args(["--host", "127.0.0.1", "--remote-cli", CLI])
            .arg("--ssh-option")
            .arg(format!("Port={}", sshd.port))
            .arg("--ssh-option")
            .arg(format!("IdentityFile={}", sshd.id.display()))
            .arg("--ssh-option")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["--ssh-option", "GlobalKnownHostsFile=/dev/null"])
            .args(["--ssh-option", "IdentitiesOnly=yes"])
            .arg("--remote-socket")
            .arg(&daemon.socket)
            .args(["--json", "connect", &id, "--local-port", "0"]);
        command
    };

    // Host key checking is on: an unknown host key stops it before anything is opened.
    let empty = ssh_dir.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let mut refused = Proc::spawn("broker-cli connect", connect_via(&empty));
    assert_eq!(refused.exit_code().await, 69, "{}", refused.stderr());
    assert!(
        refused.stderr().contains("Host key verification failed"),
        "{}",
        refused.stderr()
    );
    assert_eq!(
        tokio::time::timeout(STEP, refused.out.recv())
            .await
            .unwrap(),
        None,
        "nothing announced"
    );

    // With the host key known: a remote load, then ssh -N -L to the gate, and HTTP through.
    let (mut connect, local) = start_connect(connect_via(&sshd.known_hosts), &id).await;
    until_served(HELLO, STEP, || plain_get(local, b"")).await;
    until_served(HELLO, STEP, || plain_get(local, b"")).await;
    let forwards = children_named(connect.pid(), "ssh");
    assert_eq!(forwards.len(), 1, "one ssh -N -L child: {forwards:?}");
    let ssh_pid = forwards[0];
    let cmdline = std::fs::read(format!("/proc/{ssh_pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(" -N -L /") && cmdline.contains("/fwd.sock:localhost:"),
        "the forward ends in connect's private directory: {cmdline}"
    );
    // Two logins: the remote load and the forward.
    testkit::until("two ssh logins", STEP, || {
        sshd.proc.stderr().matches("Accepted publickey for").count() >= 2
    })
    .await;

    // SIGTERM to connect: it stops its ssh (and reaps it) before it exits.
    assert_eq!(connect.terminate().await, 0, "{}", connect.stderr());
    let proc = format!("/proc/{ssh_pid}");
    testkit::until("ssh to end with connect", Duration::from_secs(2), || {
        !Path::new(&proc).exists()
    })
    .await;

    assert_eq!(run.terminate().await, 128 + 15, "{}", run.stderr());
    assert_job_gone(&daemon, &id).await;
    let code = sshd.proc.terminate().await;
    assert!(code == 0 || code == 255, "sshd exit {code}");
    daemon.stop().await;
    assert!(started.elapsed() < BUDGET, "{:?}", started.elapsed());
}

/// Watches, as another uid, for an `ssh ... -L SPEC` and tries to take its local end first:
/// binds a TCP port (and reports every line sent to it) or dials and lists a socket path.
/// One report per stdout line: `spec SPEC`, `bound PORT`, `received HEX`, `dial-failed ERRNO`,
/// `list-failed ERRNO`, `dialed`, `listed`.
const PORT_THIEF: &str = r#"
import os, socket, sys, time
deadline = time.time() + float(sys.argv[1])
seen, listeners = set(), []
def report(*words): print(*words, flush=True)
while time.time() < deadline:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in seen: continue
        try: args = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
        except OSError: continue
        if b"-L" not in args or b"-N" not in args: continue
        seen.add(pid)
        spec = args[args.index(b"-L") + 1].decode()
        report("spec", spec)
        parts = spec.split(":")
        if len(parts) == 4:
            s = socket.socket()
            try:
                s.bind((parts[0], int(parts[1]))); s.listen(8); s.settimeout(0.01)
                listeners.append(s); report("bound", parts[1])
            except OSError as e: report("bind-failed", e.errno)
        else:
            path = parts[0]
            try: socket.socket(socket.AF_UNIX).connect(path); report("dialed")
            except OSError as e: report("dial-failed", e.errno)
            try: os.listdir(os.path.dirname(path)); report("listed")
            except OSError as e: report("list-failed", e.errno)
    for s in listeners:
        try: conn = s.accept()[0]
        except OSError: continue
        conn.settimeout(2)
        data = b""
        try:
            while b"\n" not in data:
                piece = conn.recv(65536)
                if not piece: break
                data += piece
        except OSError: pass
        report("received", data.hex())
    time.sleep(0.005)
"#;

/// Issue 16: `connect --host` picked a free port for `ssh -L` (visible in ssh's command line)
/// and took "something accepts on it" for "ssh is ready", so a local user who bound the port
/// first received the key line. Here the login is slow (1 s, as over a real network), the
/// thief runs as another uid, and the forward ends in connect's 0700 directory: the thief
/// can neither take nor reach it, and the key goes through ssh to the application only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_host_gives_a_port_thief_nothing() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if !Path::new(SSHD).exists() {
        eprintln!("skipped: no {SSHD} (install openssh-server)");
        return;
    }
    if !is_root() {
        eprintln!("skipped: the throwaway sshd and the second uid need root");
        return;
    }
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let job = daemon.client().save_type(JobType::Ssh, None).await.unwrap();
    let secret = job.secret.clone().unwrap();
    // The application on the job's port of the "remote" host (this one): the first line of
    // each connection is reported, the rest echoed when it is the key.
    let app = tokio::net::TcpListener::bind(("127.0.0.1", job.summary.port))
        .await
        .expect("the job's port is free");
    let (first_lines, mut app_seen) = mpsc::unbounded_channel();
    let key = secret.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = app.accept().await.unwrap();
            let first_lines = first_lines.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let mut line = String::new();
                let _ = read.read_line(&mut line).await;
                let line = line.trim_end().to_owned();
                let _ = first_lines.send(line.clone());
                if line == key {
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
        }
    });
    let ssh_dir = temp_dir("broker-e2e-sshd-");
    let sshd = start_sshd(ssh_dir.path()).await;
    let mut thief = {
        use std::os::unix::process::CommandExt as _;
        let mut command = std::process::Command::new("python3");
        command
            .args(["-c", PORT_THIEF, "8"])
            .uid(OTHER_UID)
            .gid(OTHER_UID);
        Proc::spawn("port thief", Command::from(command))
    };
    // Each ssh login takes a second: sshd in inetd mode behind a delay (ssh runs the
    // command as `exec COMMAND` in a shell).
    let proxy = format!(
        "ProxyCommand=sh -c 'sleep 1; exec {SSHD} -i -f {}'",
        ssh_dir.path().join("sshd_config").display()
    );
    let mut command = cli(&daemon);
    command
        .args(["--host", "127.0.0.1", "--remote-cli", CLI])
        .arg("--ssh-option")
        .arg(&proxy)
        .arg("--ssh-option")
        .arg(format!("Port={}", sshd.port))
        .arg("--ssh-option")
        .arg(format!("IdentityFile={}", sshd.id.display()))
        .arg("--ssh-option")
        .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
        .args(["--ssh-option", "GlobalKnownHostsFile=/dev/null"])
        .args(["--ssh-option", "IdentitiesOnly=yes"])
        .arg("--remote-socket")
        .arg(&daemon.socket)
        .args(["--json", "connect", &job.summary.id]);
    let mut connect = Proc::spawn("broker-cli connect", command);
    let line = connect.next_line().await;
    let announced: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    // The owner's request, as soon as connect says it is ready (whatever it offers).
    let request = HELLO.to_owned();
    let mut answer = vec![0u8; request.len()];
    let echoed = if let Some(path) = announced["socket"].as_str() {
        let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        tokio::time::timeout(STEP, stream.read_exact(&mut answer)).await
    } else {
        let port = u16::try_from(announced["local_port"].as_u64().unwrap()).unwrap();
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        tokio::time::timeout(STEP, stream.read_exact(&mut answer)).await
    };

    // The thief's view, once it has seen the forward and had its chance.
    let mut reports = Vec::new();
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline && !reports.iter().any(|r: &String| r.starts_with("list")) {
        if let Ok(Some(report)) =
            tokio::time::timeout(Duration::from_millis(200), thief.out.recv()).await
        {
            reports.push(report);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(report) = thief.out.try_recv() {
        reports.push(report);
    }
    let stolen: Vec<String> = reports
        .iter()
        .filter_map(|r| r.strip_prefix("received "))
        .filter_map(|hex| hex::decode(hex).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .collect();
    let short: Vec<String> = reports
        .iter()
        .map(|r| r.chars().take(80).collect())
        .collect();
    assert!(
        !stolen.iter().any(|got| got.contains(&secret[..64])),
        "the thief received the key line; its reports: {short:?}"
    );
    assert!(
        reports.iter().any(|r| r.starts_with("spec /")),
        "the thief saw the forward, a socket path: {reports:?}"
    );
    // EACCES (13): the directory is connect's alone.
    assert!(
        reports.iter().any(|r| r == "dial-failed 13")
            && reports.iter().any(|r| r == "list-failed 13"),
        "{reports:?}"
    );
    assert!(
        !reports.iter().any(|r| r.starts_with("bound")),
        "{reports:?}"
    );
    // And the owner's request went through ssh to the application, key line first.
    echoed
        .expect("the owner is answered in time")
        .expect("the owner's request is echoed");
    assert_eq!(String::from_utf8_lossy(&answer), request);
    assert_eq!(app_seen.recv().await.unwrap(), secret);
    assert!(
        app_seen.try_recv().is_err(),
        "nothing was connected through the forward to see whether it is ready"
    );
    assert_eq!(connect.terminate().await, 0, "{}", connect.stderr());
    drop(thief);
    drop(sshd);
    daemon.stop().await;
    assert!(started.elapsed() < BUDGET, "{:?}", started.elapsed());
}
