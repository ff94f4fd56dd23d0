//! `broker-run` as a child process against the test daemon: the environment and placeholders
//! an application gets, its private files, the ssh gate (the key line first, early bytes kept,
//! wrong keys closed without a byte), the ssl gate (the owner's certificate from the broker
//! CA admitted, a certificate from another CA refused), signal forwarding, the job deleted
//! when the app exits, the app stopped with 69 when the job is deleted from outside, and the
//! launcher's own exit codes. The applications are small python3 programs.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::support::{Daemon, http_get};

const RUN: &str = env!("CARGO_BIN_EXE_broker-run");
const STEP: Duration = Duration::from_secs(20);
const HELLO: &str = "hello from the app\n";

/// broker-run on the daemon's socket, nothing BROKER_* from outside, private files under
/// `runtime_dir`.
fn broker_run(daemon: &Daemon, runtime_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(RUN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BROKER_") {
            command.env_remove(name);
        }
    }
    command
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .env("RUST_LOG", "info")
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running broker-run and its stderr, line by line.
struct Running {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

/// What the start-up line says.
#[derive(Debug)]
struct Summary {
    id: String,
    port: u16,
    private: Option<u16>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command.spawn().expect("broker-run starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().expect("running")).unwrap())
    }

    /// Waits for `broker-run: job ID type T port P [(app on 127.0.0.1:Q)]`.
    async fn summary(&mut self) -> Summary {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no summary line; stderr so far: {:#?}", self.seen))
                .unwrap_or_else(|| panic!("stderr closed; stderr: {:#?}", self.seen));
            self.seen.push(line.clone());
            let Some(rest) = line.strip_prefix("broker-run: job ") else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(words[1], "type", "{line}");
            assert_eq!(words[3], "port", "{line}");
            let private = rest
                .split_once("(app on 127.0.0.1:")
                .map(|(_, p)| p.trim_end_matches(')').parse().unwrap());
            return Summary {
                id: words[0].to_owned(),
                port: words[4].parse().unwrap(),
                private,
            };
        }
    }

    /// Waits for the exit code, collecting the rest of stderr.
    async fn exit_code(&mut self, within: Duration) -> i32 {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("broker-run did not exit within {within:?}"))
            .unwrap();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.lines.recv()).await
        {
            self.seen.push(line);
        }
        status.code().expect("broker-run exits, it is not killed")
    }

    fn stderr(&self) -> String {
        self.seen.join("\n")
    }
}

/// A directory the app serves with `python3 -m http.server`, holding `hello.txt`.
fn web_root() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("broker-run-web-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    dir
}

fn runtime_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("broker-run-xdg-")
        .tempdir()
        .unwrap()
}

/// Retries `attempt` until its answer contains HELLO (the app may still be starting).
async fn until_served<F, Fut>(mut attempt: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let answer = String::from_utf8_lossy(&attempt().await).into_owned();
        if answer.contains(HELLO.trim_end()) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served; last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`http_get`] over plain TCP to 127.0.0.1:`port`.
async fn plain_get(port: u16, preamble: Vec<u8>) -> Vec<u8> {
    http_get(connect(port).await, &preamble).await
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// The private directory broker-run made under `runtime_dir`, if any.
fn private_dirs(runtime_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(runtime_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("broker-run-"))
        })
        .collect()
}

async fn assert_job_gone(daemon: &Daemon, id: &str) {
    let err = daemon.client().load(id).await.expect_err("job is deleted");
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_gate_admits_the_key_and_closes_on_a_wrong_one() {
    let daemon = Daemon::start().await;
    let web = web_root();
    let xdg = runtime_dir();
    let root = web.path().to_str().unwrap();
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssh",
            "--gate",
            "--bind",
            "127.0.0.1",
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            root,
            "{port}",
        ],
    ));
    let summary = run.summary().await;
    let private = summary
        .private
        .expect("the gate gives the app a private port");
    assert_ne!(private, summary.port);
    let job = daemon.client().load(&summary.id).await.unwrap();
    assert_eq!(job.summary.port, summary.port);
    assert_eq!(job.summary.label.as_deref(), Some("python3"));
    let secret = job.secret.clone().unwrap();

    // The key line and the request in one write: the bytes after the newline reach the app.
    let line = format!("{secret}\n");
    let answer = until_served(|| plain_get(summary.port, line.clone().into_bytes())).await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    // \r\n works too.
    let crlf = format!("{secret}\r\n");
    let answer =
        String::from_utf8(http_get(connect(summary.port).await, crlf.as_bytes()).await).unwrap();
    assert!(answer.contains(HELLO.trim_end()), "{answer}");

    // A wrong key, no key, a line that is too long: closed without a byte from the app.
    let mut wrong = secret.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    wrong.push(b'\n');
    let too_long = vec![b'a'; 4096];
    for preamble in [&wrong[..], b"", b"not a key\n", &too_long[..]] {
        let answer = http_get(connect(summary.port).await, preamble).await;
        assert!(
            answer.is_empty(),
            "no app bytes without the key, got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // The private directory and its secret are only ours.
    let dirs = private_dirs(xdg.path());
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let mode = std::fs::metadata(&dirs[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let secret_file = dirs[0].join("secret");
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);

    // SIGTERM reaches http.server through broker-run; the job and the files go.
    kill(run.pid(), Signal::SIGTERM).unwrap();
    let code = run.exit_code(STEP).await;
    assert_eq!(
        code,
        128 + 15,
        "the app's status; stderr:\n{}",
        run.stderr()
    );
    assert_job_gone(&daemon, &summary.id).await;
    assert!(
        private_dirs(xdg.path()).is_empty(),
        "private directory removed"
    );
    let logs = run.stderr();
    assert!(logs.contains("gate: wrong key"), "{logs}");
    assert!(!logs.contains(&secret), "the secret is never logged");
    assert!(
        TcpStream::connect(("127.0.0.1", summary.port))
            .await
            .is_err(),
        "the gate is closed"
    );
}

const ENV_APP: &str = r#"
import json, os, stat, sys
out = sys.argv[1]
files = {}
for name in ("BROKER_SECRET_FILE", "BROKER_CERT", "BROKER_KEY", "BROKER_CA"):
    path = os.environ.get(name)
    if path:
        st = os.stat(path)
        files[name] = {"mode": stat.S_IMODE(st.st_mode), "text": open(path).read(),
                       "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)}
env = {k: v for k, v in os.environ.items() if k.startswith("BROKER_")}
json.dump({"env": env, "argv": sys.argv[2:], "files": files,
           "pgid_is_pid": os.getpgid(0) == os.getpid()}, open(out + ".tmp", "w"))
os.rename(out + ".tmp", out)
sys.stdin.read()
sys.exit(3)
"#;

/// Waits for the JSON the env app writes.
async fn read_report(path: &Path) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the app never wrote {path:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_environment_placeholders_and_files_reach_the_app() {
    let daemon = Daemon::start().await;
    let xdg = runtime_dir();
    let out = xdg.path().join("report.json");
    let mut command = broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssh",
            "--ttl",
            "1h",
            "--label",
            "env test",
            "--",
            "python3",
            "-c",
            ENV_APP,
            out.to_str().unwrap(),
            "{port}",
            "x{public_port}y",
            "{job_id}",
            "{secret_file}",
            "{unknown}",
        ],
    );
    command.stdin(Stdio::piped());
    let mut run = Running::spawn(command);
    let summary = run.summary().await;
    assert_eq!(summary.private, None);
    let report = read_report(&out).await;
    let job = daemon.client().load(&summary.id).await.unwrap();
    assert_eq!(job.summary.ttl_secs, 3600);
    assert_eq!(job.summary.label.as_deref(), Some("env test"));
    let secret = job.secret.unwrap();

    let port = summary.port.to_string();
    let env = &report["env"];
    assert_eq!(env["BROKER_JOB_ID"], summary.id.as_str());
    assert_eq!(
        env["BROKER_PORT"],
        port.as_str(),
        "no gate: the public port"
    );
    assert_eq!(env["BROKER_PUBLIC_PORT"], port.as_str());
    for absent in ["BROKER_CERT", "BROKER_KEY", "BROKER_CA"] {
        assert!(env.get(absent).is_none(), "{absent} in an ssh job: {env}");
    }
    let secret_file = env["BROKER_SECRET_FILE"].as_str().unwrap().to_owned();
    assert!(
        secret_file.starts_with(xdg.path().to_str().unwrap()),
        "{secret_file}"
    );
    let argv: Vec<&str> = report["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        argv,
        [
            port.as_str(),
            &format!("x{port}y"),
            summary.id.as_str(),
            secret_file.as_str(),
            "{unknown}",
        ]
    );
    let file = &report["files"]["BROKER_SECRET_FILE"];
    assert_eq!(file["text"], secret.as_str(), "the hex secret, no newline");
    assert_eq!(file["mode"], 0o600);
    assert_eq!(file["dir_mode"], 0o700);
    assert_eq!(report["pgid_is_pid"], true, "own process group");
    // Only in the file: neither the environment nor the arguments carry the secret.
    assert!(!env.to_string().contains(&secret));

    // The app ends by itself (stdin closed): its code, the job deleted, the files gone.
    drop(run.child.stdin.take());
    assert_eq!(run.exit_code(STEP).await, 3, "{}", run.stderr());
    assert_job_gone(&daemon, &summary.id).await;
    assert!(!Path::new(&secret_file).exists());
    assert!(private_dirs(xdg.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_gate_admits_the_owners_certificate_only() {
    let daemon = Daemon::start().await;
    let web = web_root();
    let xdg = runtime_dir();
    let out = xdg.path().join("report.json");
    // The env app first (to see BROKER_CERT and friends), then the web server.
    let script = format!(
        "import runpy, subprocess, sys\n\
         subprocess.run([sys.executable, '-c', {ENV_APP:?}, {out:?}, '{{cert}}', '{{key}}', '{{ca}}'], stdin=subprocess.DEVNULL)\n\
         sys.argv = ['http.server', '--bind', '127.0.0.1', '--directory', {root:?}, sys.argv[1]]\n\
         runpy.run_module('http.server', run_name='__main__')\n",
        out = out.to_str().unwrap(),
        root = web.path().to_str().unwrap(),
    );
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type", "ssl", "--gate", "--", "python3", "-c", &script, "{port}",
        ],
    ));
    let summary = run.summary().await;
    let private = summary.private.unwrap();
    let job = daemon.client().load(&summary.id).await.unwrap();
    let tls = job.tls.clone().expect("ssl job has certificates");

    let report = read_report(&out).await;
    let env = &report["env"];
    assert_eq!(
        env["BROKER_PORT"],
        private.to_string().as_str(),
        "gate: the private port"
    );
    assert_eq!(env["BROKER_PUBLIC_PORT"], summary.port.to_string().as_str());
    assert!(env.get("BROKER_SECRET_FILE").is_none());
    let files = &report["files"];
    assert_eq!(files["BROKER_CERT"]["text"], tls.cert.as_str());
    assert_eq!(files["BROKER_KEY"]["text"], tls.key.as_str());
    assert_eq!(files["BROKER_CA"]["text"], tls.ca.as_str());
    assert_eq!(files["BROKER_KEY"]["mode"], 0o600);
    let argv = report["argv"].as_array().unwrap();
    assert_eq!(argv[0], env["BROKER_CERT"]);
    assert_eq!(argv[1], env["BROKER_KEY"]);
    assert_eq!(argv[2], env["BROKER_CA"]);

    // The owner's client certificate from the broker CA: through to the plain app.
    let owner = Arc::new(
        broker::pemtls::client_config(&tls.client_cert, &tls.client_key, &tls.ca).unwrap(),
    );
    let answer = until_served(|| {
        let owner = owner.clone();
        async move {
            let tcp = connect(summary.port).await;
            match common::tls::connect(owner, "localhost", tcp, STEP).await {
                Ok(stream) => http_get(stream, b"").await,
                Err(_) => Vec::new(),
            }
        }
    })
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");

    // A certificate for the same name from another CA, and none at all: refused.
    let pki = testkit::pki::test_pki();
    let stranger = Arc::new(
        broker::pemtls::client_config(&pki.alice.cert_pem, &pki.alice.key_pem, &tls.ca).unwrap(),
    );
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(common::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                let ca =
                    rustls::pki_types::pem::PemObject::from_pem_slice(tls.ca.as_bytes()).unwrap();
                roots.add(ca).unwrap();
                roots
            })
            .with_no_client_auth(),
    );
    for config in [stranger, anonymous] {
        let tcp = connect(summary.port).await;
        let answer = match common::tls::connect(config, "localhost", tcp, STEP).await {
            Ok(stream) => http_get(stream, b"").await,
            Err(_) => Vec::new(),
        };
        assert!(
            answer.is_empty(),
            "refused, got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Plain TCP to the public port gets at most a TLS alert, nothing from the app.
    let answer = http_get(connect(summary.port).await, b"").await;
    assert!(
        !answer.starts_with(b"HTTP"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // SIGINT reaches http.server (it exits, with 0 or 1 depending on the Python version).
    kill(run.pid(), Signal::SIGINT).unwrap();
    run.exit_code(STEP).await;
    assert_job_gone(&daemon, &summary.id).await;
    assert!(
        run.stderr().contains("gate: tls handshake refused"),
        "{}",
        run.stderr()
    );
}

const SIGNAL_APP: &str = r#"
import os, signal, sys, time
out = sys.argv[1]
def hup(*_):
    open(out, "a").write("HUP\n")
def term(*_):
    open(out, "a").write("TERM\n")
    sys.exit(7)
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, term)
open(out, "a").write("ready\n")
while True:
    time.sleep(0.1)
"#;

async fn wait_for_text(path: &Path, text: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now.contains(text) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path:?} never held {text:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_forwarded_and_the_job_deleted() {
    let daemon = Daemon::start().await;
    let xdg = runtime_dir();
    let out = xdg.path().join("signals.txt");
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssh",
            "--",
            "python3",
            "-c",
            SIGNAL_APP,
            out.to_str().unwrap(),
        ],
    ));
    let summary = run.summary().await;
    wait_for_text(&out, "ready").await;

    // SIGHUP: the app gets it, broker-run stays.
    kill(run.pid(), Signal::SIGHUP).unwrap();
    wait_for_text(&out, "HUP").await;
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "broker-run survives SIGHUP"
    );
    daemon
        .client()
        .load(&summary.id)
        .await
        .expect("job still there");

    // SIGTERM: the app's handler exits 7, which becomes broker-run's code.
    kill(run.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(run.exit_code(STEP).await, 7, "{}", run.stderr());
    wait_for_text(&out, "TERM").await;
    assert_job_gone(&daemon, &summary.id).await;
    assert!(daemon.client().query().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deleted_from_outside_stops_the_app_with_69() {
    let daemon = Daemon::start().await;
    let xdg = runtime_dir();
    let out = xdg.path().join("signals.txt");
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssh",
            "--ttl",
            "3s",
            "--",
            "python3",
            "-c",
            SIGNAL_APP,
            out.to_str().unwrap(),
        ],
    ));
    let summary = run.summary().await;
    wait_for_text(&out, "ready").await;
    // A few heartbeats (every second) keep it alive past its 3 s TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    daemon
        .client()
        .load(&summary.id)
        .await
        .expect("heartbeats keep the job");

    daemon.client().delete(&summary.id).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(run.exit_code(STEP).await, 69, "{}", run.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    wait_for_text(&out, "TERM").await;
    assert!(
        run.stderr().contains("no longer has this job"),
        "{}",
        run.stderr()
    );
    assert!(private_dirs(xdg.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_ignores_sigterm_is_killed_when_the_job_goes() {
    let daemon = Daemon::start().await;
    let xdg = runtime_dir();
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssh",
            "--ttl",
            "3s",
            "--",
            "python3",
            "-c",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)",
        ],
    ));
    let summary = run.summary().await;
    daemon.client().delete(&summary.id).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(run.exit_code(STEP).await, 69, "{}", run.stderr());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "SIGKILL only after the grace: {took:?}"
    );
    assert!(run.stderr().contains("killing it"), "{}", run.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_ignores_a_forwarded_sigterm_is_killed_after_the_stop_timeout() {
    let daemon = Daemon::start().await;
    let xdg = runtime_dir();
    let ready = xdg.path().join("ready");
    let ready_arg = ready.to_str().unwrap().to_owned();
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssh",
            "--stop-timeout",
            "1s",
            "--",
            "python3",
            "-c",
            "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nopen(sys.argv[1], 'w').close()\ntime.sleep(120)",
            &ready_arg,
        ],
    ));
    let summary = run.summary().await;
    // Only once the application ignores SIGTERM.
    for _ in 0..200 {
        if ready.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready.exists(), "the application started: {}", run.stderr());
    let started = tokio::time::Instant::now();
    kill(run.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(
        run.exit_code(STEP).await,
        137,
        "killed by SIGKILL: {}",
        run.stderr()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "SIGKILL after the stop timeout: {took:?}"
    );
    assert!(run.stderr().contains("killing it"), "{}", run.stderr());
    assert!(
        daemon
            .client()
            .load(&summary.id)
            .await
            .unwrap_err()
            .is_not_found(),
        "the job is deleted all the same"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launcher_exit_codes() {
    let daemon = Daemon::start().await;
    let xdg = runtime_dir();

    // No application, a bad type, a placeholder of the other type: usage, nothing registered.
    for args in [
        &["--type", "ssh"][..],
        &["--type", "tls", "--", "true"],
        &["--type", "ssh", "--", "app", "--cert={cert}"],
        &["--type", "ssl", "--", "app", "{secret_file}"],
    ] {
        let mut run = Running::spawn(broker_run(&daemon, xdg.path(), args));
        assert_eq!(run.exit_code(STEP).await, 64, "{args:?}: {}", run.stderr());
    }
    assert!(daemon.client().query().await.unwrap().is_empty());

    // An application that does not exist: 127, and the job it got is deleted again.
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &["--type", "ssh", "--", "/nonexistent/app"],
    ));
    assert_eq!(run.exit_code(STEP).await, 127, "{}", run.stderr());
    assert!(daemon.client().query().await.unwrap().is_empty());
    assert!(private_dirs(xdg.path()).is_empty());

    // No broker: 69 with a clear message.
    let mut command = Command::new(RUN);
    command
        .env("XDG_RUNTIME_DIR", xdg.path())
        .args([
            "--socket",
            "/nonexistent/broker.sock",
            "--type",
            "ssh",
            "--",
            "true",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut run = Running::spawn(command);
    assert_eq!(run.exit_code(STEP).await, 69);
    assert!(run.stderr().contains("cannot register"), "{}", run.stderr());

    // The app's own code passes through; --help teaches and exits 0.
    let mut run = Running::spawn(broker_run(
        &daemon,
        xdg.path(),
        &[
            "--type",
            "ssl",
            "--",
            "python3",
            "-c",
            "raise SystemExit(5)",
        ],
    ));
    assert_eq!(run.exit_code(STEP).await, 5, "{}", run.stderr());
    let help = Command::new(RUN).arg("--help").output().await.unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    for needle in ["--gate", "{port}", "BROKER_SECRET_FILE", "Exit codes", "69"] {
        assert!(help.contains(needle), "--help mentions {needle}");
    }
}
