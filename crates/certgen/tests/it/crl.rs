//! `certgen crl`.

use crate::*;

#[test]
fn revoked_certificate_fails_openssl_crl_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certgen_ok(dir, &["root", "--cert-basename", "ca"]);
    let ca = ["--ca-certfile", "ca.cert.pem", "--ca-keyfile", "ca.key.pem"];
    for user in ["good", "bad", "worse"] {
        let mut args = vec!["leaf", "--cert-basename", user, "--cn", user, "--client"];
        args.extend(ca);
        certgen_ok(dir, &args);
    }
    let worse_serial = inspect_json(dir, "worse.cert.pem")["serial_hex"]
        .as_str()
        .expect("serial")
        .to_owned();

    let mut args = vec![
        "crl",
        "--revoke-cert",
        "bad.cert.pem",
        "--out",
        "ca.crl.pem",
    ];
    args.extend(ca);
    certgen_ok(dir, &args);
    let crl = inspect_json(dir, "ca.crl.pem");
    let bad_serial = inspect_json(dir, "bad.cert.pem")["serial_hex"].clone();
    assert_eq!(crl["revoked_serials"], serde_json::json!([bad_serial]));

    // Re-issuing needs --force-overwrite; --merge keeps the earlier entries.
    let mut args = vec![
        "crl",
        "--revoke",
        &worse_serial,
        "--merge",
        "ca.crl.pem",
        "--out",
        "ca.crl.pem",
    ];
    args.extend(ca);
    assert_eq!(certgen(dir, &args).code, Some(73));
    args.push("--force-overwrite");
    certgen_ok(dir, &args);
    let crl = inspect_json(dir, "ca.crl.pem");
    assert_eq!(
        crl["revoked_serials"].as_array().map(Vec::len),
        Some(2),
        "{crl}"
    );

    // A certificate from another CA cannot be revoked by this one.
    certgen_ok(dir, &["root", "--cert-basename", "other"]);
    let mut args = vec![
        "crl",
        "--revoke-cert",
        "other.cert.pem",
        "--out",
        "x.crl.pem",
    ];
    args.extend(ca);
    let run = certgen(dir, &args);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("not by this ca"), "{}", run.stderr);

    if have_openssl() {
        let check = |leaf: &str| {
            openssl_verify(
                dir,
                &[
                    "-crl_check",
                    "-CAfile",
                    "ca.cert.pem",
                    "-CRLfile",
                    "ca.crl.pem",
                    leaf,
                ],
            )
        };
        check("good.cert.pem").expect("good passes the crl check");
        let err = check("bad.cert.pem").expect_err("bad is revoked");
        assert!(err.contains("revoked"), "{err}");
        check("worse.cert.pem").expect_err("worse is revoked");
    }
}
