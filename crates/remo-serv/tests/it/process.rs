//! The real binaries as child processes: the `remo-serv` daemon (flags, exit codes, SIGTERM,
//! HTTPS, memory use, an upload killed mid-way), the `remo` CLI and `remo-admin`.

use std::ffi::OsString;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remo_serv::client::{Client, ClientConfig, ClientError, plain_info};
use remo_serv::keys::{PrivateKey, PublicKey};
use sha2::Digest as _;

use crate::harness::{
    Keys, USER, WAIT, numbers, put_temporaries, random_bytes, sha256_file, wait_ended,
};

const SERV: &str = env!("CARGO_BIN_EXE_remo-serv");
const REMO: &str = env!("CARGO_BIN_EXE_remo");
const ADMIN: &str = env!("CARGO_BIN_EXE_remo-admin");

/// A running daemon; killed when dropped.
pub(crate) struct Daemon {
    child: Child,
    pub(crate) addr: SocketAddr,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The lines it prints after its address.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `remo-serv ARGS --print-address` in `cwd` and waits for its address.
    fn spawn(cwd: &Path, args: &[OsString]) -> Self {
        let mut child = Command::new(SERV)
            .current_dir(cwd)
            .args(args)
            .arg("--print-address")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let mut pipe = child.stderr.take().unwrap();
            let stderr = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    stderr.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            // Keep reading to the end, so the daemon never writes into a closed pipe.
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "no address from remo-serv: {}",
                String::from_utf8_lossy(&stderr.lock().unwrap())
            )
        });
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            stderr,
            lines: rx,
        }
    }

    /// The rest of the first line printed after the address that starts with `prefix`.
    pub(crate) fn printed(&self, prefix: &str) -> String {
        loop {
            let line = self.lines.recv_timeout(WAIT).unwrap_or_else(|_| {
                panic!("remo-serv printed no {prefix:?} line: {}", self.stderr())
            });
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Peak resident memory (VmHWM) in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "remo-serv did not exit: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_no_panic(&self) {
        let stderr = self.stderr();
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Key files, a user database and a served directory in a temporary directory:
/// `alice_key.pem`, `alice.pem`, `remo_serv_key.pem`, `remo_serv.pem`, `users.sqlite`,
/// `served/`.
pub(crate) struct Deployment {
    dir: tempfile::TempDir,
    pub(crate) keys: Keys,
}

impl Deployment {
    pub(crate) async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::generate();
        keys.write(dir.path());
        keys.users(&dir.path().join("users.sqlite"))
            .await
            .close()
            .await;
        std::fs::create_dir(dir.path().join("served")).unwrap();
        Self { dir, keys }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn served(&self) -> PathBuf {
        self.path("served")
    }

    /// The daemon with this deployment's files and `extra` flags, logging warnings.
    pub(crate) fn start(&self, extra: &[&str]) -> Daemon {
        self.start_logging("warn", extra)
    }

    /// The daemon with this deployment's files and `extra` flags, logging at `level`.
    fn start_logging(&self, level: &str, extra: &[&str]) -> Daemon {
        let mut args: Vec<OsString> = [
            "-p",
            "0",
            "-k",
            "remo_serv_key.pem",
            "-u",
            "SqliteUserService:users.sqlite",
            "--workdir",
            "served",
            "-l",
            level,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.extend(extra.iter().map(OsString::from));
        Daemon::spawn(self.dir.path(), &args)
    }

    pub(crate) fn client_config(&self, url: &str) -> ClientConfig {
        ClientConfig {
            url: url.parse().unwrap(),
            user: USER.into(),
            ca: None,
            single_token_upload: false,
            timeout: WAIT,
        }
    }

    async fn client(&self, daemon: &Daemon) -> Client {
        Client::login(
            self.client_config(&daemon.url()),
            self.keys.user_key(),
            self.keys.server_pub.clone(),
        )
        .await
        .unwrap()
    }

    /// Runs `remo --user alice -k alice_key.pem -s remo_serv.pem URL ARGS` here.
    fn remo(&self, url: &str, args: &[&str]) -> Output {
        self.remo_as(USER, "remo_serv.pem", url, args)
    }

    fn remo_as(&self, user: &str, server_key: &str, url: &str, args: &[&str]) -> Output {
        Command::new(REMO)
            .current_dir(self.dir.path())
            .args(["--user", user, "-k", "alice_key.pem", "-s", server_key, url])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn remo_put(&self, url: &str, local: &str, remote: &str) -> Child {
        Command::new(REMO)
            .current_dir(self.dir.path())
            .args(["--user", USER, "-k", "alice_key.pem", "-s", "remo_serv.pem"])
            .args([url, "put", local, remote])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

/// Writes `mib` MiB: one random MiB repeated, each 4 KiB stamped with its index so that no
/// two 4 KiB blocks of the file are equal. Returns the SHA-256.
fn write_stamped(path: &Path, mib: usize, seed: u64) -> [u8; 32] {
    let mut block = random_bytes(1 << 20, seed);
    let mut hash = sha2::Sha256::new();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for b in 0..mib {
        for (j, sub) in block.chunks_mut(4096).enumerate() {
            sub[..8].copy_from_slice(&(((b << 8) | j) as u64).to_le_bytes());
        }
        hash.update(&block);
        out.write_all(&block).unwrap();
    }
    out.flush().unwrap();
    hash.finalize().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_round_trip_keeps_server_memory_bounded() {
    let d = Deployment::new().await;
    let daemon = d.start(&[]);
    let local = d.path("big.bin");
    let digest = write_stamped(&local, 256, 256);
    let mut client = d.client(&daemon).await;
    let started = Instant::now();
    let sent = client.put(&local, "big.bin", |_| {}).await.unwrap();
    assert_eq!(sent, 256 << 20);
    assert_eq!(sha256_file(&d.served().join("big.bin")), digest);
    let back = d.path("back.bin");
    let got = client.get("big.bin", &back, |_, _| {}).await.unwrap();
    assert_eq!(got, 256 << 20);
    assert_eq!(sha256_file(&back), digest);
    let elapsed = started.elapsed();
    let peak = daemon.peak_rss_kib();
    assert!(
        peak < 64 * 1024,
        "server peak RSS {peak} KiB for a 256 MiB round trip"
    );
    assert!(put_temporaries(&d.served()).is_empty());
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    daemon.assert_no_panic();
}

fn wait_for_temporary(served: &Path, cli: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let temps = put_temporaries(served);
        // The server has created its temporary and written some of the upload into it.
        let written = temps
            .iter()
            .filter_map(|t| std::fs::metadata(served.join(t)).ok())
            .any(|m| m.len() > 0);
        if written {
            return;
        }
        assert!(
            cli.try_wait().unwrap().is_none(),
            "the upload ended before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_no_temporary(served: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !put_temporaries(served).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the partial upload was not removed: {:?}",
            put_temporaries(served)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn an_interrupted_cli_upload_keeps_the_old_file() {
    let d = Deployment::new().await;
    std::fs::write(d.path("remo-serv.toml"), "\"body-timeout\" = 2\n").unwrap();
    let daemon = d.start(&["-c", "remo-serv.toml"]);
    let served = d.served();
    let target = served.join("target.bin");
    std::fs::write(&target, b"old content").unwrap();
    // Big enough (sparse, so cheap) that the upload is still running when interrupted.
    std::fs::File::create(d.path("big.bin"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();

    // Killed: the connection closes, the server drops the upload at once.
    let mut cli = d.remo_put(&daemon.url(), "big.bin", "target.bin");
    wait_for_temporary(&served, &mut cli);
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"old content");
    wait_no_temporary(&served, Duration::from_secs(5));

    // Stopped: the connection stays open but nothing comes; the body timeout (2 s) ends it.
    let mut cli = d.remo_put(&daemon.url(), "big.bin", "target.bin");
    wait_for_temporary(&served, &mut cli);
    let pid = rustix::process::Pid::from_raw(cli.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let stopped = Instant::now();
    wait_no_temporary(&served, Duration::from_secs(8));
    assert!(
        stopped.elapsed() >= Duration::from_millis(1500),
        "dropped before the body timeout"
    );
    assert!(
        cli.try_wait().unwrap().is_none(),
        "the client is still there"
    );
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"old content");

    // The server carries on.
    let out = d.remo(&daemon.url(), &["exec", "cat", "target.bin"]);
    assert_eq!(out.stdout, b"old content");
    daemon.assert_no_panic();
}

fn serv(cwd: &Path, args: &[&str]) -> Output {
    Command::new(SERV)
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn daemon_configuration_checks_and_exit_codes() {
    let d = Deployment::new().await;
    let dir = d.dir.path();
    // The good flags, each replaceable by an override of the same flag.
    let check = |overrides: &[(&str, &str)]| {
        let mut flags = vec![
            ("-k", "remo_serv_key.pem"),
            ("-u", "SqliteUserService:users.sqlite"),
            ("--workdir", "served"),
        ];
        for &(flag, value) in overrides {
            match flags.iter_mut().find(|(f, _)| *f == flag) {
                Some(slot) => slot.1 = value,
                None => flags.push((flag, value)),
            }
        }
        let mut args: Vec<&str> = flags.iter().flat_map(|&(f, v)| [f, v]).collect();
        args.push("--check-config");
        serv(dir, &args)
    };
    let out = check(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));

    std::fs::write(dir.join("unknown-key.toml"), "prot = 8080\n").unwrap();
    std::fs::write(dir.join("bad-value.toml"), "timeout = 0\n").unwrap();
    std::fs::write(dir.join("bad-type.toml"), "port = \"eighty\"\n").unwrap();
    std::fs::write(dir.join("bad-syntax.toml"), "port = = 1\n").unwrap();
    std::fs::write(dir.join("original.toml"), "port = 9000\ntimeout = 30\n").unwrap();
    for file in [
        "unknown-key.toml",
        "bad-value.toml",
        "bad-type.toml",
        "bad-syntax.toml",
    ] {
        let out = check(&[("-c", file)]);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(check(&[("-c", "original.toml")]).status.success());
    assert_eq!(
        check(&[("-u", "MemoryUserService:a:b")]).status.code(),
        Some(78)
    );
    assert_eq!(
        check(&[("--workdir", "no-such-dir")]).status.code(),
        Some(78)
    );

    // A check does not create a missing user database.
    let out = check(&[("-u", "SqliteUserService:fresh.sqlite")]);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        !dir.join("fresh.sqlite").exists(),
        "--check-config created a file"
    );

    // Key files: missing, not a key, encrypted (a server key must not be).
    std::fs::write(dir.join("junk.pem"), "not a key\n").unwrap();
    let encrypted = PrivateKey::generate().to_pem(Some(b"pw")).unwrap();
    std::fs::write(dir.join("encrypted.pem"), encrypted.as_bytes()).unwrap();
    for key in ["missing.pem", "junk.pem", "encrypted.pem"] {
        let out = check(&[("-k", key)]);
        assert_eq!(out.status.code(), Some(66), "{key}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(key),
            "the message names the file"
        );
    }

    // A port already in use: 69.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = serv(
        dir,
        &[
            "-k",
            "remo_serv_key.pem",
            "-u",
            "SqliteUserService:users.sqlite",
            "--workdir",
            "served",
            "-p",
            &port,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_stops_promptly_and_ends_interactive_commands() {
    let d = Deployment::new().await;
    std::fs::write(d.path("remo-serv.toml"), "\"kill-grace\" = 1\n").unwrap();
    let mut daemon = d.start(&["-c", "remo-serv.toml"]);
    // A logged-in client with an idle keep-alive connection and an interactive command that
    // ignores SIGTERM (so it needs the SIGKILL after the grace period).
    let mut client = d.client(&daemon).await;
    let mut output = client
        .iexec("sh -c 'trap \"\" TERM; echo $$; exec sleep 60'")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while numbers(&output).is_empty() {
        assert!(Instant::now() < deadline);
        output.extend(client.idata(b"").await.unwrap());
    }
    let pid = numbers(&output)[0];

    let started = Instant::now();
    daemon.signal(rustix::process::Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(8));
    assert!(status.success(), "{status}: {}", daemon.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    wait_ended(pid, Duration::from_secs(2), "the server stopped").await;
    daemon.assert_no_panic();
    // The client sees a closed server.
    let err = client.exec("true", b"").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { .. } | ClientError::Io(_)),
        "{err}"
    );
}

/// `remo` logs out when it is done, whether the command worked or not.
#[tokio::test]
async fn remo_logs_out_after_success_and_failure() {
    let h = crate::harness::Harness::start().await;
    h.keys.write(h.dir.path());
    for (args, code) in [
        (&["exec", "true"][..], 0),
        (&["exec", "no-such-program-xyz"][..], 65),
        (&["get", "missing.txt"][..], 66),
    ] {
        let out = tokio::process::Command::new(REMO)
            .current_dir(h.dir.path())
            .args(["--user", USER, "-k", "alice_key.pem", "-s", "remo_serv.pem"])
            .arg(h.url())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert_code(&out, code);
        assert_eq!(h.server.sessions(), 0, "{args:?}: the session lingers");
    }
    h.stop().await;
}

#[tokio::test]
async fn https_mode() {
    let pki = testkit::test_pki();
    let d = Deployment::new().await;
    let cert = pki.server.cert_path.to_str().unwrap();
    let key = pki.server.key_path.to_str().unwrap();
    let daemon = d.start(&["--tls-cert", cert, "--tls-key", key]);
    let url = format!("https://localhost:{}", daemon.addr.port());
    let config = ClientConfig {
        ca: Some(pki.ca_path.clone()),
        ..d.client_config(&url)
    };
    assert_eq!(
        plain_info(&config).await.unwrap(),
        remo_serv::server::info_text()
    );
    let mut client = Client::login(config.clone(), d.keys.user_key(), d.keys.server_pub.clone())
        .await
        .unwrap();
    let out = client
        .exec("sh -c 'echo over tls; exit 2'", b"")
        .await
        .unwrap();
    assert_eq!(
        (out.output.as_slice(), out.exit_status),
        (&b"over tls\n"[..], Some(2))
    );
    let data = random_bytes(300_000, 3);
    std::fs::write(d.path("tls.bin"), &data).unwrap();
    client
        .put(&d.path("tls.bin"), "tls.bin", |_| {})
        .await
        .unwrap();
    client
        .get("tls.bin", &d.path("tls.back"), |_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(d.path("tls.back")).unwrap(), data);

    // A client that does not trust the certificate does not get in.
    let untrusted = ClientConfig {
        ca: Some(pki.untrusted_ca_path.clone()),
        ..config
    };
    let err = Client::login(untrusted, d.keys.user_key(), d.keys.server_pub.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = d.client_config(&daemon.url());
    assert!(plain_info(&plain).await.is_err());
    daemon.assert_no_panic();
}

fn admin(cwd: &Path, args: &[&str]) -> Output {
    Command::new(ADMIN)
        .current_dir(cwd)
        .args(args)
        .env_remove("REMO_PASSPHRASE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[track_caller]
fn assert_code(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn remo_admin_keys_and_users() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("pass"), "  s3cret phrase  \nsecond line\n").unwrap();

    // An encrypted user key, 0600, that the library loads with the passphrase only.
    assert_code(
        &admin(d, &["keygen", "alice", "--passphrase-file", "pass"]),
        0,
    );
    let private = d.join("alice_key.pem");
    let pem = std::fs::read_to_string(&private).unwrap();
    assert!(
        pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        "{pem}"
    );
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key = PrivateKey::read(&private, Some(b"s3cret phrase")).unwrap();
    assert!(PrivateKey::read(&private, Some(b"wrong")).is_err());
    assert!(PrivateKey::read(&private, None).is_err());
    let public = std::fs::read_to_string(d.join("alice.pem")).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(public, PublicKey::ed448_pem(&key.verifying_key()));

    // No overwriting without --force.
    assert_code(
        &admin(d, &["keygen", "alice", "--passphrase-file", "pass"]),
        73,
    );
    assert_code(&admin(d, &["keygen", "alice", "--no-passphrase"]), 73);
    assert_eq!(std::fs::read_to_string(&private).unwrap(), pem);
    assert_code(
        &admin(d, &["keygen", "alice", "--no-passphrase", "--force"]),
        0,
    );
    let replaced = std::fs::read_to_string(&private).unwrap();
    assert!(replaced.starts_with("-----BEGIN PRIVATE KEY-----"));
    let alice = PrivateKey::read(&private, None).unwrap();
    // The server key, into a subdirectory.
    std::fs::create_dir(d.join("keys")).unwrap();
    assert_code(
        &admin(d, &["keygen", "remo_serv", "keys", "--no-passphrase"]),
        0,
    );
    assert!(d.join("keys/remo_serv_key.pem").exists());

    // Users: add, list, refuse duplicates and garbage, remove.
    assert_code(&admin(d, &["useradd", "alice"]), 0);
    assert!(
        d.join("users_db.sqlite").exists(),
        "the original's default name"
    );
    assert_code(&admin(d, &["useradd", "alice"]), 1);
    std::fs::write(
        d.join("junk.pem"),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    assert_code(&admin(d, &["useradd", "junk", "junk.pem"]), 65);
    assert_code(&admin(d, &["useradd", "ghost", "ghost.pem"]), 66);
    assert_code(&admin(d, &["useradd", "bob", "keys/remo_serv.pem"]), 0);
    let listed = admin(d, &["users", "--json"]);
    assert_code(&listed, 0);
    let users: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        users,
        serde_json::json!([
            {"id": 1, "user": "alice", "key_type": "ed448"},
            {"id": 2, "user": "bob", "key_type": "ed448"},
        ])
    );
    assert_code(&admin(d, &["userdel", "bob"]), 0);
    assert_code(&admin(d, &["userdel", "bob"]), 1);
    let listed = admin(d, &["users", "--json"]);
    let users: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 1);
    // Another database by base name.
    assert_code(
        &admin(d, &["useradd", "-b", "other", "carol", "alice.pem"]),
        0,
    );
    assert!(d.join("other.sqlite").exists());

    // What the tools made runs a server that alice logs into.
    let mut daemon_args: Vec<OsString> = [
        "-p",
        "0",
        "-k",
        "keys/remo_serv_key.pem",
        "-u",
        "SqliteUserService:users_db.sqlite",
        "-l",
        "warn",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    daemon_args.push("--workdir".into());
    daemon_args.push(d.into());
    let daemon = Daemon::spawn(d, &daemon_args);
    let server_pub = PublicKey::read(&d.join("keys/remo_serv.pem")).unwrap();
    let config = ClientConfig {
        url: daemon.url().parse().unwrap(),
        user: USER.into(),
        ca: None,
        single_token_upload: false,
        timeout: WAIT,
    };
    let mut client = Client::login(config, alice, server_pub).await.unwrap();
    assert_eq!(client.exec("echo in", b"").await.unwrap().output, b"in\n");
    daemon.assert_no_panic();
}

#[tokio::test]
async fn remo_cli_exit_codes() {
    let d = Deployment::new().await;
    let daemon = d.start(&[]);
    let url = daemon.url();

    let out = d.remo(
        &url,
        &["exec", "--", "sh", "-c", "echo hi; echo err >&2; exit 5"],
    );
    assert_code(&out, 5);
    assert_eq!(out.stdout, b"hi\nerr\n");
    assert_code(&d.remo(&url, &["exec", "true"]), 0);
    let out = d.remo(&url, &["--json", "exec", "sh -c 'echo j; exit 3'"]);
    assert_code(&out, 3);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["output"], "j\n");
    assert_eq!(value["exit_status"], 3);
    std::fs::write(d.path("input.txt"), b"from a file").unwrap();
    let out = d.remo(&url, &["exec", "--stdin", "input.txt", "--", "cat"]);
    assert_code(&out, 0);
    assert_eq!(out.stdout, b"from a file");

    assert_code(&d.remo(&url, &["put", "input.txt", "copy.txt"]), 0);
    assert_eq!(
        std::fs::read(d.served().join("copy.txt")).unwrap(),
        b"from a file"
    );
    assert_code(&d.remo(&url, &["get", "copy.txt", "back.txt"]), 0);
    assert_eq!(std::fs::read(d.path("back.txt")).unwrap(), b"from a file");

    let out = d.remo(&url, &["info"]);
    assert_code(&out, 0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        remo_serv::server::info_text()
    );
    assert_code(&d.remo(&url, &["info", "--anonymous"]), 0);

    // Refusals.
    assert_code(&d.remo(&url, &["get", "missing.txt"]), 66);
    assert!(!d.path("missing.txt").exists());
    assert_code(&d.remo(&url, &["get", "../alice_key.pem", "stolen"]), 77);
    assert_code(&d.remo(&url, &["exec", "no-such-program-xyz"]), 65);
    assert_code(&d.remo_as(USER, "alice.pem", &url, &["info"]), 77);
    assert_code(&d.remo_as("mallory", "remo_serv.pem", &url, &["info"]), 77);
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    assert_code(&d.remo(&closed, &["info"]), 69);
    daemon.assert_no_panic();
}

/// Log injection (SECURITY.md, invariant 7): a user name at login (unknown, or registered
/// with a wrong key, logged in and out), a command line and a file name never forge a line in
/// the daemon's log, and no raw escape sequence reaches it.
#[tokio::test]
async fn a_user_name_command_or_file_name_cannot_forge_a_log_line() {
    use testkit::logs::{ESCAPED, assert_not_forged, injection};
    let d = Deployment::new().await;
    // A registered user whose name forges a line, with alice's key.
    let users = remo_serv::users::Users::open(&d.path("users.sqlite"))
        .await
        .unwrap();
    users
        .add(&injection("eve"), d.keys.user_pub_pem().as_bytes())
        .await
        .unwrap();
    users.close().await;
    let daemon = d.start_logging("info", &["--log-format", "text"]);
    let mut config = d.client_config(&daemon.url());
    config.user = injection("mallory");
    let refused = Client::login(config, d.keys.user_key(), d.keys.server_pub.clone()).await;
    assert!(refused.is_err());
    let mut eve_config = d.client_config(&daemon.url());
    eve_config.user = injection("eve");
    let wrong_key = Client::login(
        eve_config.clone(),
        d.keys.server_key(),
        d.keys.server_pub.clone(),
    )
    .await;
    assert!(wrong_key.is_err());
    let mut eve = Client::login(eve_config, d.keys.user_key(), d.keys.server_pub.clone())
        .await
        .unwrap();
    eve.logout().await.unwrap();
    let mut alice = d.client(&daemon).await;
    let _ = alice.exec(&injection("true"), b"").await;
    let missing = alice
        .get(&injection("missing"), &d.path("local"), |_, _| {})
        .await;
    assert!(missing.is_err());
    // Unknown user, eve's bad signature, login and logout, the command, the file name: each
    // logged once at least.
    testkit::until("six escaped log lines", WAIT, || {
        daemon.stderr().matches(ESCAPED).count() >= 6
    })
    .await;
    assert_not_forged(&daemon.stderr.lock().unwrap());
}

/// A stranger grew the log by about 10 KB per failed login: a 10 KB user name was logged
/// escaped but whole. Client-controlled fields are cut (`common::log::Clipped`): twenty
/// failed logins (one login burst) with a name of 5,000 newlines add under 1 KB each.
#[tokio::test]
async fn a_long_user_name_does_not_grow_the_log_by_its_length() {
    use remo_serv::proto::{self, AuthRequest};
    let d = Deployment::new().await;
    let daemon = d.start(&[]);
    // 10 KB as JSON and as logged before (each newline escaped to two bytes).
    let user = format!("{}x", "\n".repeat(5_000));
    let stranger = remo_serv::keys::PrivateKey::generate();
    let public = proto::x448_public(&proto::x448_secret());
    let body = AuthRequest {
        user: user.clone(),
        key: public.to_vec(),
        sign: stranger.sign(&AuthRequest::signed_message(&user, &public)),
    }
    .to_json();
    let before = daemon.stderr().len();
    let attempts = 20;
    for _ in 0..attempts {
        let answer = crate::harness::request(
            daemon.addr,
            "POST",
            "/auth",
            None,
            crate::harness::RawBody::Length(body.clone().into()),
        )
        .await;
        assert_eq!(answer.status, 403);
    }
    testkit::until("a log line per attempt", WAIT, || {
        daemon.stderr().matches("unknown user").count() >= attempts
    })
    .await;
    let log = daemon.stderr();
    assert_eq!(log.matches("unknown user").count(), attempts, "{log}");
    let per_attempt = (log.len() - before) / attempts;
    assert!(
        per_attempt < 1024,
        "{per_attempt} log bytes per failed login"
    );
}

/// Bodies with nothing but a valid cookie were buffered before any check (up to 87 MiB for
/// one token, 24 MiB for a chunked first line): three such requests took the server from
/// 18 MB to 281 MB. At the default configuration, twelve connections of three sessions each
/// pushing a 16 MiB first token now leave the daemon's peak memory within the unverified-body
/// budget (about 43 MiB) and some slack; every one of them is refused (an answer, or the
/// connection closed under a body still being sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_bodies_keep_server_memory_bounded_at_the_defaults() {
    use bytes::Bytes;
    use http_body_util::BodyExt as _;

    const PER_CONNECTION: usize = 16 << 20;
    let d = Deployment::new().await;
    let daemon = d.start(&[]);
    let before = daemon.peak_rss_kib();
    let mut tasks = Vec::new();
    for i in 0..3u8 {
        let s = crate::harness::RawSession::login(daemon.addr, &d.keys, None).await;
        let path = s.path("/cmd/", "true");
        for j in 0..4u8 {
            let source = std::net::IpAddr::from([127, 0, 1, 4 * i + j + 1]);
            let cookie = s.cookie();
            let path = path.clone();
            let addr = daemon.addr;
            tasks.push(tokio::spawn(async move {
                let tcp = testkit::front::connect_from(source, addr).await.unwrap();
                let (mut sender, _) = crate::harness::http1(tcp).await;
                let (tx, body) = crate::harness::RawBody::channel();
                let crate::harness::RawBody::Chunked(body) = body else {
                    unreachable!()
                };
                let request = hyper::Request::post(&path)
                    .header("host", "x")
                    .header("cookie", cookie)
                    .header("transfer-encoding", "chunked")
                    .body(body)
                    .unwrap();
                let feeder = tokio::spawn(async move {
                    // Base64-looking bytes without a line break: a first token still coming.
                    let piece = Bytes::from(vec![b'A'; 64 << 10]);
                    for _ in 0..PER_CONNECTION / piece.len() {
                        if tx.send(piece.clone()).await.is_err() {
                            break;
                        }
                    }
                    tx
                });
                let answer = tokio::time::timeout(WAIT, sender.send_request(request)).await;
                let status = match answer {
                    Ok(Ok(response)) => {
                        let status = response.status().as_u16();
                        let _ = response.into_body().collect().await;
                        status
                    }
                    // The server answered and closed while the body was still being sent,
                    // so the client saw the connection end before the answer: refused too.
                    Ok(Err(_)) => 1,
                    // The whole 16 MiB was taken without an answer.
                    Err(_) => 0,
                };
                drop(feeder.await);
                status
            }));
        }
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let peak = daemon.peak_rss_kib();
    let grown = peak.saturating_sub(before);
    eprintln!("peak RSS {before} KiB -> {peak} KiB; answers {statuses:?}");
    assert!(
        statuses.iter().all(|s| [1, 413, 429, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        grown < 80 * 1024,
        "server grew by {grown} KiB ({before} -> {peak}) under unverified bodies"
    );
    daemon.assert_no_panic();
}
