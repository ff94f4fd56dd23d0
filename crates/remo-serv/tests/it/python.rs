//! The independent Python client (`tests/py/remo_client.py`, written from the specification
//! on the `cryptography` package) against the real server, and key files crossing over.

use std::path::{Path, PathBuf};
use std::process::Output;

use remo_serv::keys::PrivateKey;
use tokio::process::Command;

use crate::harness::{Harness, USER};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/remo_client.py")
}

/// Fails with a clear message when python3 or its `cryptography` package is missing.
async fn require_cryptography() {
    let probe = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .await
        .unwrap_or_else(|err| panic!("python3 is needed for the interoperability tests: {err}"));
    assert!(
        probe.status.success(),
        "the Python `cryptography` package is missing (scripts/test installs it; or run \
         `python3 -m pip install cryptography`): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[track_caller]
fn assert_ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn python_client_selftest() {
    require_cryptography().await;
    let out = Command::new("python3")
        .arg(script())
        .arg("selftest")
        .output()
        .await
        .unwrap();
    assert_ok(&out);
}

async fn roundtrip(h: &Harness, key: &Path, passphrase: Option<&str>) {
    let server_pem = h.dir.path().join("remo_serv.pem");
    std::fs::write(&server_pem, h.keys.server_pub_pem()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut command = Command::new("python3");
    command
        .arg(script())
        .args(["--url", &h.url(), "--user", USER, "--timeout", "30"])
        .arg("--key")
        .arg(key)
        .arg("--server-key")
        .arg(&server_pem);
    if let Some(passphrase) = passphrase {
        command.args(["--passphrase", passphrase]);
    }
    let out = command
        .arg("roundtrip")
        .arg("--dir")
        .arg(scratch.path())
        .output()
        .await
        .unwrap();
    let stdout = assert_ok(&out);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ok"], true, "{stdout}");
    assert!(stdout.contains("\"ok\": true"), "{stdout}");
    let steps = summary["steps"].as_array().unwrap();
    for step in [
        "put 1MiB+123",
        "sha256 equal",
        "icm/idt cat",
        "cmd after logout -> 403",
    ] {
        assert!(steps.iter().any(|s| s == step), "{step} missing: {stdout}");
    }
}

#[tokio::test]
async fn python_client_round_trip() {
    require_cryptography().await;
    let h = Harness::start().await;
    let key = h.dir.path().join("alice_key.pem");
    std::fs::write(&key, &h.keys.user_pem).unwrap();
    roundtrip(&h, &key, None).await;
    // Our PBES2-encrypted key file, read by Python's cryptography.
    let encrypted = h.dir.path().join("alice_key_encrypted.pem");
    let pem = h.keys.user_key().to_pem(Some(b"py pass")).unwrap();
    std::fs::write(&encrypted, pem.as_bytes()).unwrap();
    roundtrip(&h, &encrypted, Some("py pass")).await;
    // The remote files the script made were cleaned up by it, through /cmd.
    assert_eq!(std::fs::read_dir(&h.served).unwrap().count(), 0);
    h.stop().await;
}

/// A key encrypted by Python's cryptography (`BestAvailableEncryption`, as the original
/// `build_key_pair`) loads in our library and signs what its public half verifies.
#[tokio::test]
async fn keys_written_by_python_load() {
    require_cryptography().await;
    let dir = tempfile::tempdir().unwrap();
    let program = r#"
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
key = Ed448PrivateKey.generate()
enc = serialization.BestAvailableEncryption(b"foo")
with open(sys.argv[1] + "/enc_key.pem", "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
with open(sys.argv[1] + "/plain_key.pem", "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
with open(sys.argv[1] + "/pub.pem", "wb") as f:
    f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
"#;
    let out = Command::new("python3")
        .args(["-c", program])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert_ok(&out);
    let encrypted = PrivateKey::read(&dir.path().join("enc_key.pem"), Some(b"foo")).unwrap();
    let plain = PrivateKey::read(&dir.path().join("plain_key.pem"), None).unwrap();
    let public = remo_serv::keys::PublicKey::read(&dir.path().join("pub.pem")).unwrap();
    for key in [encrypted, plain] {
        assert!(public.verify(b"message", &key.sign(b"message")));
    }
}
