//! Signatures verify with the library's streaming verifier and with `openssl pkeyutl` (the
//! audit table's tests are in `audit`).

use std::path::Path;

use signing_server::ed448::{parse_public_pem, verify_stream};

use crate::support::{Answer, Options, TestServer, base64_decode};

/// Whether `openssl pkeyutl -verify -rawin` accepts `signature` over `file` with `public`.
pub(crate) fn openssl_verifies(dir: &Path, public: &str, signature: &[u8], file: &Path) -> bool {
    let public_path = dir.join("pub.pem");
    let signature_path = dir.join("sig.bin");
    std::fs::write(&public_path, public).unwrap();
    std::fs::write(&signature_path, signature).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkeyutl", "-verify", "-rawin", "-pubin", "-inkey"])
        .arg(&public_path)
        .arg("-sigfile")
        .arg(&signature_path)
        .arg("-in")
        .arg(file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // openssl 3 exits 1 on a bad signature; 1.1.1 exits 0 and says so.
    out.status.success() && stdout.contains("Signature Verified Successfully")
}

pub(crate) fn have_openssl() -> bool {
    let found = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("note: openssl is not on PATH; the openssl verification is skipped");
    }
    found
}

#[tokio::test]
async fn signatures_verify_with_the_library_and_with_openssl() {
    let server = TestServer::start(Options::default()).await;
    let dir = server.pkgs.join("verify");
    std::fs::create_dir(&dir).unwrap();
    // Sizes around the signer's 256 KiB read size.
    let contents: Vec<(String, Vec<u8>)> = [0usize, 1, 57, 262_144, 262_145, 700_001]
        .iter()
        .map(|&n| {
            let content: Vec<u8> = (0..n).map(|i| (i * 131 % 251) as u8).collect();
            (format!("file-{n:07}"), content)
        })
        .collect();
    for (name, content) in &contents {
        std::fs::write(dir.join(name), content).unwrap();
    }
    let answer = Answer::parse(&server.alice_legacy(dir.to_str().unwrap()).await);
    let files = answer.files();
    let key = parse_public_pem(&server.public_pem).unwrap();
    let openssl = have_openssl();
    let scratch = tempfile::tempdir().unwrap();
    for (name, content) in &contents {
        let text = files[name]["signature"].as_str().unwrap();
        // As docs/signing-server.md says: 152 characters, never a padding `=`.
        assert_eq!(text.len(), 152, "{name}: {text}");
        assert!(!text.contains('='), "{name}: {text}");
        let signature = base64_decode(text);
        assert_eq!(signature.len(), 114, "{name}");
        assert!(
            verify_stream(&key, &signature, &content[..]).unwrap(),
            "{name}"
        );
        let mut bad_signature = signature.clone();
        bad_signature[60] ^= 0x01;
        assert!(!verify_stream(&key, &bad_signature, &content[..]).unwrap());
        if !content.is_empty() {
            let mut tampered = content.clone();
            let at = tampered.len() / 2;
            tampered[at] ^= 0x01;
            assert!(!verify_stream(&key, &signature, &tampered[..]).unwrap());
            if openssl {
                assert!(
                    openssl_verifies(
                        scratch.path(),
                        &server.public_pem,
                        &signature,
                        &dir.join(name)
                    ),
                    "openssl rejects {name}"
                );
                let tampered_path = scratch.path().join("tampered");
                std::fs::write(&tampered_path, &tampered).unwrap();
                assert!(!openssl_verifies(
                    scratch.path(),
                    &server.public_pem,
                    &signature,
                    &tampered_path
                ));
                assert!(!openssl_verifies(
                    scratch.path(),
                    &server.public_pem,
                    &bad_signature,
                    &dir.join(name)
                ));
            }
        }
    }
}
