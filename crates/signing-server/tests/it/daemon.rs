//! The `signing-server` binary: keygen, --check-config, serving from a TOML file, SIGTERM.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt as _;

use crate::both_stores;
use crate::support::{Answer, Backend, STEP, daemon_setup, legacy, pki};

const BIN: &str = env!("CARGO_BIN_EXE_signing-server");

/// Makes a key with `keygen` in `dir` and a TOML file serving `dir/pkgs` to alice.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    daemon_setup(dir, "drain_grace_secs = 3\n")
}

#[test]
fn keygen_writes_a_private_key_0600_and_a_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let out = std::process::Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let private = signing_server::ed448::Ed448Key::read(&key).unwrap();
    let public = std::fs::read_to_string(dir.path().join("k.pem.pub")).unwrap();
    let public = signing_server::ed448::parse_public_pem(&public).unwrap();
    assert_eq!(signing_server::ed448::keyid(&public), private.keyid());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(private.keyid()), "{stdout}");
    // Never overwritten.
    let again = std::process::Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(73));
    assert_eq!(
        signing_server::ed448::Ed448Key::read(&key).unwrap().keyid(),
        private.keyid()
    );
}

#[test]
fn check_config_accepts_a_good_file_and_refuses_an_open_key() {
    let dir = tempfile::tempdir().unwrap();
    let (config, key) = setup(dir.path());
    let check = || {
        std::process::Command::new(BIN)
            .arg("--check-config")
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check();
    assert_eq!(
        out.status.code(),
        Some(66),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    // A configuration error is 78.
    std::fs::write(&config, "bogus = 1\n").unwrap();
    assert_eq!(check().status.code(), Some(78));
}

#[test]
fn without_a_configuration_file_it_says_none_was_given() {
    for args in [&[][..], &["--check-config"]] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env_remove("SIGNING_SERVER_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("signing-server: no configuration file given: use -c FILE"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("[tls]"), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_root_that_is_not_a_directory_is_refused_at_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = setup(dir.path());
    let pkgs = dir.path().join("pkgs");
    // A daemon that starts anyway is killed at the deadline and fails the test.
    let run = |extra: &'static [&'static str]| {
        let child = tokio::process::Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        async move {
            tokio::time::timeout(STEP, child.wait_with_output())
                .await
                .expect("the daemon exits at once")
                .unwrap()
        }
    };
    std::fs::remove_dir(&pkgs).unwrap();
    for extra in [&["--check-config"][..], &[]] {
        let out = run(extra).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{extra:?}: {stderr}");
        let expected = format!(
            "invalid configuration: client \"alice\": root {} cannot be opened as a directory",
            pkgs.display()
        );
        assert!(stderr.contains(&expected), "{extra:?}: {stderr}");
        assert!(!dir.path().join("state").exists(), "nothing was opened");
    }
    // A file where the root should be: the same.
    std::fs::write(&pkgs, b"not a directory").unwrap();
    let out = run(&["--check-config"]).await;
    assert_eq!(out.status.code(), Some(78));
    std::fs::remove_file(&pkgs).unwrap();
    std::fs::create_dir(&pkgs).unwrap();
    let out = run(&["--check-config"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

both_stores!(
    the_daemon_serves_a_toml_configuration_and_stops_on_sigterm,
    |backend| async move {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = setup(dir.path());
        let pkgs = dir.path().join("pkgs");
        std::fs::write(pkgs.join("bos.rte.7.3.0.0.bff"), b"bos").unwrap();
        let mut command = tokio::process::Command::new(BIN);
        if backend == Backend::Postgres {
            command.env(
                "SIGNING_SERVER_DATABASE",
                crate::support::PgAudit::ready().await.service_url,
            );
        }
        let mut child = command
            .arg("-c")
            .arg(&config)
            .arg("--print-address")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(STEP, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return addr.parse::<std::net::SocketAddr>().unwrap();
                }
            }
            panic!("the daemon exited without printing its address");
        })
        .await
        .expect("the daemon prints its address");
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let answer = legacy(addr, Some(&pki().alice), pkgs.to_str().unwrap())
            .await
            .unwrap();
        let answer = Answer::parse(&String::from_utf8(answer).unwrap());
        assert!(answer.files()["bos.rte.7.3.0.0.bff"]["signature"].is_string());
        assert_eq!(
            dir.path().join("state/audit.sqlite").exists(),
            backend == Backend::Sqlite
        );
        assert!(dir.path().join("state/signatures.txt").exists());

        let pid = child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(8), child.wait())
            .await
            .expect("the daemon stops after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0));
        drain.await.unwrap();
    }
);

/// `--print-address | head -c0`: the reader is gone before the daemon prints its address. The
/// line is dropped; the daemon keeps serving (it died with a "failed printing to stdout" panic)
/// and still stops cleanly on SIGTERM.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = setup(dir.path());
    let mut child = tokio::process::Command::new(BIN)
        .arg("-c")
        .arg(&config)
        .arg("--print-address")
        .args(["--log", "info"])
        .stdout(testkit::usage::closed_stdout())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // The address is printed right after the "listening" log line.
    tokio::time::timeout(STEP, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("listening") {
                return;
            }
        }
        panic!("the daemon ended before it was ready");
    })
    .await
    .expect("the daemon gets ready");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "the daemon still runs");
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(8), child.wait())
        .await
        .expect("the daemon stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    drain.await.unwrap();
}
