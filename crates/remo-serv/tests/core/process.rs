//! The real binaries as child processes: the daemon, remo-admin and remo.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERV: &str = env!("CARGO_BIN_EXE_remo-serv");
const ADMIN: &str = env!("CARGO_BIN_EXE_remo-admin");
const REMO: &str = env!("CARGO_BIN_EXE_remo");

fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ADMIN)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Keys and a user in `dir`: remo_serv_key.pem, remo_serv.pem, alice_key.pem, users_db.sqlite.
fn setup(dir: &Path) {
    for prefix in ["remo_serv", "alice"] {
        let out = admin(dir, &["keygen", prefix, "--no-passphrase"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(admin(dir, &["useradd", "alice"]).status.success());
    std::fs::create_dir_all(dir.join("served")).unwrap();
}

struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, extra: &[&str]) -> Daemon {
    let mut child = Command::new(SERV)
        .current_dir(dir)
        .args(["-p", "0", "--print-address", "-k", "remo_serv_key.pem"])
        .args([
            "-u",
            "SqliteUserService:users_db.sqlite",
            "--workdir",
            "served",
            "-l",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_owned();
    Daemon {
        child,
        url: format!("http://{addr}"),
    }
}

fn remo(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(REMO)
        .current_dir(dir)
        .args(["--user", "alice", url])
        .args(args)
        .output()
        .unwrap()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn big_round_trip_keeps_server_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let daemon = start(dir.path(), &[]);
    // 256 MiB of non-repeating content, cheap to make: a counter-mixed pattern.
    let size: usize = 256 << 20;
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let local = dir.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    let digest = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&data)
    };
    drop(data);
    let put = remo(dir.path(), &daemon.url, &["put", "big.bin", "copy.bin"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = remo(dir.path(), &daemon.url, &["get", "copy.bin", "back.bin"]);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    use sha2::Digest as _;
    for file in ["served/copy.bin", "back.bin"] {
        let mut hash = sha2::Sha256::new();
        let mut reader = std::fs::File::open(dir.path().join(file)).unwrap();
        std::io::copy(&mut reader, &mut hash).unwrap();
        assert_eq!(hash.finalize(), digest, "{file}");
    }
    let peak = vm_hwm_kib(daemon.child.id());
    assert!(
        peak < 64 * 1024,
        "server peak RSS {peak} KiB for a 256 MiB round trip"
    );
}

#[test]
fn killed_upload_leaves_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    std::fs::write(dir.path().join("served/target.bin"), b"old content").unwrap();
    let daemon = start(dir.path(), &[]);
    // Big enough that the upload is still running when it is killed.
    let big = dir.path().join("big.bin");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(2 << 30).unwrap();
    let mut client = Command::new(REMO)
        .current_dir(dir.path())
        .args([
            "--user",
            "alice",
            &daemon.url,
            "put",
            "big.bin",
            "target.bin",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let served = dir.path().join("served");
    let partial = || {
        std::fs::read_dir(&served)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(".remo-put-"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !partial() {
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    client.kill().unwrap();
    client.wait().unwrap();
    assert_eq!(
        std::fs::read(served.join("target.bin")).unwrap(),
        b"old content"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while partial() {
        assert!(
            Instant::now() < deadline,
            "the partial upload was not removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cli_exit_codes_and_admin_tools() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // keygen refuses to overwrite; an encrypted key needs its passphrase.
    assert_eq!(
        admin(d, &["keygen", "alice", "--no-passphrase"])
            .status
            .code(),
        Some(73)
    );
    std::fs::write(d.join("pass"), "s3cret\n").unwrap();
    assert!(
        admin(d, &["keygen", "bob", "--passphrase-file", "pass"])
            .status
            .success()
    );
    let bob_key = std::fs::read_to_string(d.join("bob_key.pem")).unwrap();
    assert!(bob_key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(d.join("bob_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(remo_serv::keys::PrivateKey::read(&d.join("bob_key.pem"), Some(b"s3cret")).is_ok());
    assert!(admin(d, &["useradd", "bob"]).status.success());
    assert_eq!(admin(d, &["useradd", "bob"]).status.code(), Some(1));
    std::fs::write(d.join("junk.pem"), "not a key").unwrap();
    assert_eq!(
        admin(d, &["useradd", "junk", "junk.pem"]).status.code(),
        Some(65)
    );
    let listed = admin(d, &["users", "--json"]);
    let users: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 2);

    let daemon = start(d, &[]);
    let out = remo(
        d,
        &daemon.url,
        &["exec", "--", "sh", "-c", "echo hi; exit 5"],
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(
        remo(d, &daemon.url, &["get", "missing"]).status.code(),
        Some(66)
    );
    // bob's key is encrypted: the passphrase comes from a file.
    let out = Command::new(REMO)
        .current_dir(d)
        .args([
            "--user",
            "bob",
            "--passphrase-file",
            "pass",
            &daemon.url,
            "exec",
            "true",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The wrong server key is refused.
    std::fs::copy(d.join("alice.pem"), d.join("fake_server.pem")).unwrap();
    let out = Command::new(REMO)
        .current_dir(d)
        .args([
            "--user",
            "alice",
            "--server-key",
            "fake_server.pem",
            &daemon.url,
            "info",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77));
    assert!(admin(d, &["userdel", "bob"]).status.success());
    let out = Command::new(REMO)
        .current_dir(d)
        .args([
            "--user",
            "bob",
            "--passphrase-file",
            "pass",
            &daemon.url,
            "info",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77));
    drop(daemon);
    assert_eq!(
        remo(d, "http://127.0.0.1:9", &["info"]).status.code(),
        Some(69)
    );
}

#[test]
fn daemon_config_checks_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let check = Command::new(SERV)
        .current_dir(d)
        .args([
            "--check-config",
            "-k",
            "remo_serv_key.pem",
            "-u",
            "SqliteUserService:users_db.sqlite",
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::write(d.join("bad.toml"), "prot = 1\n").unwrap();
    let bad = Command::new(SERV)
        .current_dir(d)
        .args(["-c", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(78));
    let nokey = Command::new(SERV)
        .current_dir(d)
        .args(["-k", "nope.pem", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(nokey.status.code(), Some(66));

    let mut daemon = start(d, &[]);
    // Ready: it answers.
    assert!(
        remo(d, &daemon.url, &["info", "--anonymous"])
            .status
            .success()
    );
    let pid = rustix::process::Pid::from_raw(daemon.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
