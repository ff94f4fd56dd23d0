//! `certgen dev-pki`.

use std::fs;

use crate::*;

const SERVERS: [&str; 5] = [
    "broker",
    "signing-server",
    "ws-proxy",
    "remo-serv",
    "secure-talk",
];

#[test]
fn dev_pki_is_complete_verifiable_and_idempotent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let out = certgen_ok(dir, &["dev-pki", "--out", "certs/dev"]);
    for name in SERVERS.iter().chain(&[
        "ca",
        "alice",
        "bob",
        "untrusted-ca",
        "mallory",
        "ca.crl.pem",
    ]) {
        assert!(
            out.lines().any(|l| l.starts_with(name)),
            "table lists {name}:\n{out}"
        );
    }

    let pki = dir.join("certs/dev");
    for name in ["ca", "untrusted-ca"] {
        for suffix in [".cert.pem", ".cert.der", ".key.pem"] {
            assert!(
                pki.join(format!("{name}{suffix}")).is_file(),
                "{name}{suffix}"
            );
        }
    }
    for name in SERVERS.iter().chain(&["alice", "bob", "mallory"]) {
        for suffix in [".cert.pem", ".cert.der", ".key.pem", ".pkeycert.pem"] {
            assert!(
                pki.join(format!("{name}{suffix}")).is_file(),
                "{name}{suffix}"
            );
        }
        #[cfg(unix)]
        assert_eq!(mode(&pki.join(format!("{name}.key.pem"))), 0o600, "{name}");
    }
    assert!(pki.join("ca.crl.pem").is_file());

    for server in SERVERS {
        let info = inspect_json(&pki, &format!("{server}.cert.pem"));
        assert_eq!(info["common_name"], server);
        assert_eq!(info["dns_names"][0], "localhost");
        assert_eq!(
            info["ip_addresses"],
            serde_json::json!(["127.0.0.1", "::1"])
        );
        assert_eq!(
            info["extended_key_usage"],
            serde_json::json!(["serverAuth", "clientAuth"])
        );
    }
    for user in ["alice", "bob"] {
        let info = inspect_json(&pki, &format!("{user}.cert.pem"));
        assert_eq!(info["common_name"], user);
        assert_eq!(
            info["extended_key_usage"],
            serde_json::json!(["clientAuth"])
        );
    }
    let crl = inspect_json(&pki, "ca.crl.pem");
    assert_eq!(crl["revoked_serials"], serde_json::json!([]));

    if have_openssl() {
        let trusted = [
            "-crl_check",
            "-CAfile",
            "ca.cert.pem",
            "-CRLfile",
            "ca.crl.pem",
        ];
        for name in SERVERS.iter().chain(&["alice", "bob"]) {
            let mut args = trusted.to_vec();
            let leaf = format!("{name}.cert.pem");
            args.push(&leaf);
            openssl_verify(&pki, &args).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        openssl_verify(&pki, &["-CAfile", "ca.cert.pem", "mallory.cert.pem"])
            .expect_err("mallory is not trusted by ca");
        openssl_verify(
            &pki,
            &["-CAfile", "untrusted-ca.cert.pem", "mallory.cert.pem"],
        )
        .expect("mallory is signed by the untrusted ca");
    }
    if have_python() {
        let out = py_handshake(
            &pki,
            ("broker.cert.pem", "broker.key.pem"),
            Some("ca.cert.pem"),
            Some(("alice.pkeycert.pem", "-")),
            "ca.cert.pem",
        )
        .expect("alice gets in");
        assert!(out.contains("ok alice"), "{out}");
        py_handshake(
            &pki,
            ("ws-proxy.cert.pem", "ws-proxy.key.pem"),
            Some("ca.cert.pem"),
            Some(("mallory.cert.pem", "mallory.key.pem")),
            "ca.cert.pem",
        )
        .expect_err("mallory is refused");
    }
    if have_node() {
        let out = node_handshake(&pki, "secure-talk", "alice").expect("node: alice gets in");
        assert!(out.contains("ok alice"), "{out}");
        node_handshake(&pki, "secure-talk", "mallory").expect_err("node: mallory is refused");
    }

    // Second run: refused without --force-overwrite, regenerated with it.
    let before = fs::read(pki.join("ca.key.pem")).expect("key");
    let run = certgen(dir, &["dev-pki", "--out", "certs/dev"]);
    assert_eq!(run.code, Some(73), "{run:?}");
    assert!(run.stderr.contains("--force-overwrite"), "{}", run.stderr);
    assert!(
        run.stderr.len() < 400,
        "the refusal names a few files, not all: {}",
        run.stderr
    );
    certgen_ok(dir, &["dev-pki", "--out", "certs/dev", "--force-overwrite"]);
    assert_ne!(fs::read(pki.join("ca.key.pem")).expect("key"), before);
    if have_openssl() {
        openssl_verify(&pki, &["-CAfile", "ca.cert.pem", "broker.cert.pem"])
            .expect("still coherent");
    }
}
