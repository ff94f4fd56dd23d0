//! `certgen root`, `intermediate`, `leaf` and `inspect`.

use std::fs;

use crate::*;

const ROOT: [&str; 7] = [
    "root",
    "--cert-basename",
    "pki/root_ca",
    "--subject-org-name",
    "Acme",
    "--expiration-in-days",
    "3650",
];

fn leaf_args<'a>(base: &'a str, ca: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let cert = if ca == "pki/root_ca" {
        "pki/root_ca.cert.pem"
    } else {
        "pki/inter.cert.pem"
    };
    let key = if ca == "pki/root_ca" {
        "pki/root_ca.key.pem"
    } else {
        "pki/inter.key.pem"
    };
    let mut args = vec![
        "leaf",
        "--cert-basename",
        base,
        "--ca-certfile",
        cert,
        "--ca-keyfile",
        key,
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn root_then_leaf_verify_everywhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certgen_ok(dir, &ROOT);
    let out = certgen_ok(
        dir,
        &leaf_args(
            "pki/server",
            "pki/root_ca",
            &["--san", "localhost", "--san", "127.0.0.1,::1", "--server"],
        ),
    );
    assert!(out.contains("pki/server.key.pem"), "{out}");

    for file in ["root_ca.cert.pem", "root_ca.cert.der", "root_ca.key.pem"] {
        assert!(dir.join("pki").join(file).is_file(), "{file}");
    }
    for file in [
        "server.cert.pem",
        "server.cert.der",
        "server.key.pem",
        "server.pkeycert.pem",
    ] {
        assert!(dir.join("pki").join(file).is_file(), "{file}");
    }
    assert!(
        !dir.join("pki/server.chain.pem").exists(),
        "root-issued leaves need no chain file"
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir.join("pki/root_ca.key.pem")), 0o600);
        assert_eq!(mode(&dir.join("pki/server.key.pem")), 0o600);
        assert_eq!(mode(&dir.join("pki/server.pkeycert.pem")), 0o600);
    }
    let pkeycert = fs::read_to_string(dir.join("pki/server.pkeycert.pem")).expect("read");
    let cert_at = pkeycert
        .find("BEGIN CERTIFICATE")
        .expect("cert in pkeycert");
    let key_at = pkeycert.find("BEGIN PRIVATE KEY").expect("key in pkeycert");
    assert!(cert_at < key_at, "cert then key");

    let root = inspect_json(dir, "pki/root_ca.cert.pem");
    assert_eq!(root["is_ca"], true);
    assert_eq!(root["self_signed"], true);
    assert_eq!(root["organization"], "Acme");
    assert_eq!(root["common_name"], "root_ca");
    assert_eq!(
        root["key_usage"],
        serde_json::json!(["keyCertSign", "cRLSign"])
    );

    let leaf = inspect_json(dir, "pki/server.cert.der");
    assert_eq!(
        leaf["common_name"], "localhost",
        "CN defaults to the first DNS SAN"
    );
    assert_eq!(
        leaf["organization"], "server-Leaf",
        "O defaults as in the original scripts"
    );
    assert_eq!(leaf["dns_names"], serde_json::json!(["localhost"]));
    assert_eq!(
        leaf["ip_addresses"],
        serde_json::json!(["127.0.0.1", "::1"])
    );
    assert_eq!(
        leaf["extended_key_usage"],
        serde_json::json!(["serverAuth"])
    );
    assert_eq!(leaf["is_ca"], false);
    assert_eq!(leaf["key_type"], "p256");
    assert_eq!(leaf["issuer"], root["subject"]);
    assert_eq!(leaf["authority_key_id"], root["subject_key_id"]);
    for field in [
        "serial_hex",
        "not_before",
        "not_after",
        "sha256_fingerprint",
        "sha1_fingerprint",
    ] {
        assert!(
            leaf[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}"
        );
    }
    let der = fs::read(dir.join("pki/server.cert.der")).expect("der");
    assert_eq!(leaf["sha256_fingerprint"].as_str().map(str::len), Some(64));
    assert!(der.len() > 100);

    if have_openssl() {
        let out = openssl_verify(
            dir,
            &["-CAfile", "pki/root_ca.cert.pem", "pki/server.cert.pem"],
        )
        .expect("openssl verifies the leaf");
        assert!(out.contains("OK"), "{out}");
        openssl_verify(
            dir,
            &[
                "-CAfile",
                "pki/root_ca.cert.pem",
                "-purpose",
                "sslserver",
                "pki/server.cert.pem",
            ],
        )
        .expect("usable as an ssl server");
        openssl_verify(
            dir,
            &[
                "-CAfile",
                "pki/root_ca.cert.pem",
                "-purpose",
                "sslclient",
                "pki/server.cert.pem",
            ],
        )
        .expect_err("--server only: not a client certificate");
    }
    if have_python() {
        py_load(
            dir,
            "pki/server.cert.pem",
            Some("pki/server.key.pem"),
            "pki/root_ca.cert.pem",
        );
        py_load(dir, "pki/server.pkeycert.pem", None, "pki/root_ca.cert.pem");
        py_handshake(
            dir,
            ("pki/server.cert.pem", "pki/server.key.pem"),
            None,
            None,
            "pki/root_ca.cert.pem",
        )
        .expect("python handshake with hostname check");
    }
}

#[test]
fn intermediate_chain_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certgen_ok(dir, &ROOT);
    certgen_ok(
        dir,
        &[
            "intermediate",
            "--cert-basename",
            "pki/inter",
            "--ca-certfile",
            "pki/root_ca.cert.pem",
            "--ca-keyfile",
            "pki/root_ca.key.pem",
            "--not-after",
            "5y",
        ],
    );
    let inter = inspect_json(dir, "pki/inter.cert.pem");
    assert_eq!(inter["is_ca"], true);
    assert_eq!(inter["path_len"], 0);
    assert_eq!(inter["organization"], "inter-IntermediateCA");

    certgen_ok(
        dir,
        &leaf_args(
            "pki/carol",
            "pki/inter",
            &["--cn", "carol", "--client", "--key-type", "ed25519"],
        ),
    );
    certgen_ok(
        dir,
        &leaf_args(
            "pki/web",
            "pki/inter",
            &["--san", "localhost", "--key-type", "rsa2048"],
        ),
    );
    let chain = inspect_json(dir, "pki/web.chain.pem");
    let chain = chain.as_array().expect("a chain inspects as an array");
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0]["key_type"], "rsa2048");
    assert_eq!(
        chain[0]["key_usage"],
        serde_json::json!(["digitalSignature", "keyEncipherment"])
    );
    assert_eq!(
        chain[0]["extended_key_usage"],
        serde_json::json!(["serverAuth", "clientAuth"])
    );
    assert_eq!(chain[1]["subject"], inter["subject"]);
    let carol = inspect_json(dir, "pki/carol.cert.pem");
    assert_eq!(carol["common_name"], "carol");
    assert_eq!(carol["key_type"], "ed25519");
    assert_eq!(
        carol["extended_key_usage"],
        serde_json::json!(["clientAuth"])
    );

    if have_openssl() {
        for leaf in ["pki/carol.cert.pem", "pki/web.cert.pem"] {
            openssl_verify(
                dir,
                &[
                    "-CAfile",
                    "pki/root_ca.cert.pem",
                    "-untrusted",
                    "pki/inter.cert.pem",
                    leaf,
                ],
            )
            .unwrap_or_else(|e| panic!("{leaf}: {e}"));
            openssl_verify(dir, &["-CAfile", "pki/root_ca.cert.pem", leaf])
                .expect_err("no path without the intermediate");
        }
    }
    if have_python() {
        py_load(dir, "pki/web.pkeycert.pem", None, "pki/root_ca.cert.pem");
        let out = py_handshake(
            dir,
            ("pki/web.chain.pem", "pki/web.key.pem"),
            Some("pki/root_ca.cert.pem"),
            Some(("pki/carol.pkeycert.pem", "-")),
            "pki/root_ca.cert.pem",
        )
        .expect("mutual TLS through the intermediate with RSA and Ed25519");
        assert!(out.contains("ok carol"), "{out}");
    }
}

#[test]
fn every_key_type_verifies_with_openssl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for key_type in ["ed25519", "p256", "rsa2048", "rsa3072"] {
        let root = format!("{key_type}/ca");
        let leaf = format!("{key_type}/leaf");
        certgen_ok(
            dir,
            &["root", "--cert-basename", &root, "--key-type", key_type],
        );
        let ca_cert = format!("{root}.cert.pem");
        let ca_key = format!("{root}.key.pem");
        certgen_ok(
            dir,
            &[
                "leaf",
                "--cert-basename",
                &leaf,
                "--ca-certfile",
                &ca_cert,
                "--ca-keyfile",
                &ca_key,
                "--san",
                "localhost",
                "--key-type",
                key_type,
            ],
        );
        let leaf_cert = format!("{leaf}.cert.pem");
        assert_eq!(inspect_json(dir, &leaf_cert)["key_type"], key_type);
        if have_openssl() {
            openssl_verify(dir, &["-CAfile", &ca_cert, &leaf_cert])
                .unwrap_or_else(|e| panic!("{key_type}: {e}"));
        }
        if have_python() {
            let leaf_key = format!("{leaf}.key.pem");
            py_handshake(dir, (&leaf_cert, &leaf_key), None, None, &ca_cert)
                .unwrap_or_else(|e| panic!("{key_type}: {e}"));
        }
    }
}

#[test]
fn refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certgen_ok(dir, &ROOT);
    let before = fs::read(dir.join("pki/root_ca.key.pem")).expect("key");

    let run = certgen(dir, &ROOT);
    assert_eq!(run.code, Some(73), "{run:?}");
    assert!(
        run.stderr.contains("refusing to overwrite"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--force-overwrite"), "{}", run.stderr);
    assert_eq!(
        fs::read(dir.join("pki/root_ca.key.pem")).expect("key"),
        before,
        "untouched"
    );

    let mut forced = ROOT.to_vec();
    forced.push("--force-overwrite");
    certgen_ok(dir, &forced);
    assert_ne!(
        fs::read(dir.join("pki/root_ca.key.pem")).expect("key"),
        before,
        "replaced"
    );
    #[cfg(unix)]
    assert_eq!(mode(&dir.join("pki/root_ca.key.pem")), 0o600);
    let leftovers: Vec<_> = fs::read_dir(dir.join("pki"))
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn usage_and_input_errors_have_distinct_exit_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let run = certgen(dir, &["leaf", "--cert-basename", "x"]);
    assert_eq!(
        run.code,
        Some(64),
        "missing --ca-certfile is a usage error: {run:?}"
    );
    let run = certgen(dir, &["root", "--not-after", "5w"]);
    assert_eq!(run.code, Some(64), "{run:?}");
    let run = certgen(
        dir,
        &["root", "--not-after", "5d", "--expiration-in-days", "5"],
    );
    assert_eq!(run.code, Some(64), "{run:?}");
    let run = certgen(dir, &leaf_args("x", "pki/root_ca", &[]));
    assert_eq!(run.code, Some(66), "missing CA files: {run:?}");
    assert!(run.stderr.contains("root_ca.cert.pem"), "{}", run.stderr);
    let run = certgen(dir, &["inspect", "nope.pem"]);
    assert_eq!(run.code, Some(66), "{run:?}");

    certgen_ok(dir, &ROOT);
    let run = certgen(dir, &leaf_args("x", "pki/root_ca", &["--san", "bad name"]));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("bad name"), "{}", run.stderr);

    let help = certgen(dir, &["--help"]);
    assert_eq!(help.code, Some(0));
    assert!(
        help.stdout.contains("Examples:") && help.stdout.contains("dev-pki"),
        "{}",
        help.stdout
    );
}

#[test]
fn not_after_units_set_the_lifetime() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certgen_ok(
        dir,
        &["root", "--cert-basename", "short", "--not-after", "12h"],
    );
    let info = inspect_json(dir, "short.cert.pem");
    let parse = |v: &serde_json::Value| {
        time::OffsetDateTime::parse(
            v.as_str().expect("date"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("rfc3339")
    };
    let lifetime = parse(&info["not_after"]) - parse(&info["not_before"]);
    // not_before is backdated five minutes for clock skew.
    assert_eq!(
        lifetime,
        time::Duration::hours(12) + time::Duration::minutes(5)
    );
}

/// A CA made by `openssl` the way the original Micronets scripts make one (SEC1 `EC PRIVATE
/// KEY` after an `EC PARAMETERS` block), and one with a PKCS#1 RSA key, can issue leaves.
#[test]
fn openssl_made_ca_keys_issue_leaves() {
    if !have_openssl() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-out",
        "ec.key.pem",
    ]);
    openssl(&["genrsa", "-traditional", "-out", "rsa.key.pem", "2048"]);
    for kind in ["ec", "rsa"] {
        let key = format!("{kind}.key.pem");
        let cert = format!("{kind}.cert.pem");
        let subject = format!("/O=Micronets/CN={kind}-root");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-days",
            "30",
            "-subj",
            &subject,
            "-out",
            &cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        let base = format!("{kind}-leaf");
        certgen_ok(
            dir,
            &[
                "leaf",
                "--cert-basename",
                &base,
                "--ca-certfile",
                &cert,
                "--ca-keyfile",
                &key,
                "--san",
                "localhost",
            ],
        );
        openssl_verify(dir, &["-CAfile", &cert, &format!("{base}.cert.pem")])
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}
