//! What the server refuses: certificates, paths outside a client's roots, symlinks out of a
//! root; and shell metacharacters, which are only bytes.

use std::path::Path;

use crate::support::{Answer, Options, TestServer, base64_decode, empty, pki};

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn missing_untrusted_expired_and_revoked_certificates_get_nothing() {
    let server = TestServer::start(Options::default()).await;
    std::fs::write(server.pkgs.join("p.bin"), b"p").unwrap();
    let pki = pki();
    let path = text(&server.pkgs);
    for (who, leaf) in [
        ("no certificate", None),
        ("mallory", Some(&pki.mallory)),
        ("expired", Some(&pki.expired)),
        ("revoked", Some(&pki.revoked)),
    ] {
        let answer = server.legacy(leaf, path).await;
        assert!(answer.is_err(), "{who}: {answer:?}");
        let reply = server.https(leaf, "GET", "/v1/keys", empty()).await;
        assert!(reply.is_err(), "{who}: {reply:?}");
    }
    assert!(server.service.audit.rows().await.unwrap().is_empty());
    assert!(!server.signatures_file().exists());
    // The server is unharmed.
    let answer = Answer::parse(&server.alice_legacy(path).await);
    assert!(answer.files()["p.bin"]["signature"].is_string());
}

#[tokio::test]
async fn paths_outside_the_clients_roots_are_refused_and_nothing_is_recorded() {
    let server = TestServer::start(Options::default()).await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.bin"), b"secret").unwrap();
    std::fs::write(server.pkgs.join("alices.bin"), b"a").unwrap();
    std::fs::write(server.bobs.join("bobs.bin"), b"b").unwrap();
    std::os::unix::fs::symlink(outside.path(), server.pkgs.join("outdir")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.bin"),
        server.pkgs.join("link.bin"),
    )
    .unwrap();
    let pki = pki();
    let pkgs = text(&server.pkgs);
    let cases = [
        (&pki.alice, "/etc".to_owned(), "outside"),
        (&pki.alice, "/etc/passwd".to_owned(), "outside"),
        (&pki.alice, format!("{pkgs}/../bobs"), "outside"),
        (&pki.alice, text(&server.bobs).to_owned(), "outside"),
        (&pki.bob, pkgs.to_owned(), "outside"),
        (&pki.bob, format!("{pkgs}/alices.bin"), "outside"),
        (&pki.alice, format!("{pkgs}/outdir"), "outside"),
        (&pki.alice, format!("{pkgs}/outdir/secret.bin"), "outside"),
        (&pki.alice, format!("{pkgs}/link.bin"), "outside"),
        (&pki.alice, format!("{pkgs}/missing"), "no such file"),
        (&pki.alice, "pkgs".to_owned(), "not an absolute path"),
        (&pki.chained_client, pkgs.to_owned(), "no [[clients]] rule"),
    ];
    for (leaf, path, why) in &cases {
        let answer = String::from_utf8(server.legacy(Some(leaf), path).await.unwrap()).unwrap();
        assert!(
            answer.starts_with("Refused: ") && answer.ends_with('\n') && answer.contains(why),
            "{path}: {answer:?}"
        );
        assert_eq!(answer.lines().count(), 1, "{path}: {answer:?}");
    }
    assert!(server.service.audit.rows().await.unwrap().is_empty());
    assert!(!server.signatures_file().exists());
}

#[tokio::test]
async fn a_symlink_in_a_signed_directory_that_leaves_the_root_gets_an_error_entry() {
    let server = TestServer::start(Options::default()).await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.bin"), b"secret").unwrap();
    let dir = server.pkgs.join("mixed");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("good.bin"), b"good").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.bin"), dir.join("evil.bin")).unwrap();
    std::os::unix::fs::symlink(dir.join("good.bin"), dir.join("inner.bin")).unwrap();

    let answer = Answer::parse(&server.alice_legacy(text(&dir)).await);
    assert_eq!(
        answer.listing,
        format!(
            "List of files in {}:\nevil.bin\ngood.bin\ninner.bin\n",
            text(&dir)
        )
    );
    let files = answer.files();
    let error = files["evil.bin"]["error"].as_str().unwrap();
    assert!(error.contains("outside"), "{error}");
    assert!(files["evil.bin"].get("signature").is_none());
    assert!(files["good.bin"]["signature"].is_string());
    // A symlink that stays inside the root is an ordinary file.
    assert_eq!(
        files["inner.bin"]["signature"],
        files["good.bin"]["signature"]
    );
    let rows = server.service.audit.rows().await.unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("{}/good.bin", text(&dir)),
            format!("{}/inner.bin", text(&dir))
        ]
    );
}

#[tokio::test]
async fn shell_metacharacters_run_nothing() {
    let server = TestServer::start(Options::default()).await;
    let tag = format!("{:016x}", rand::random::<u64>());
    let marker = std::env::temp_dir().join(format!("pwned-{tag}"));
    let marker = text(&marker).to_owned();
    let pkgs = text(&server.pkgs).to_owned();
    for path in [
        format!("/tmp/x; touch {marker}"),
        format!("{pkgs}/x; touch {marker}"),
        format!("{pkgs}/$(touch {marker})"),
        format!("{pkgs}`touch {marker}`"),
        format!("{pkgs} && touch {marker}"),
    ] {
        let answer =
            String::from_utf8(server.legacy(Some(&pki().alice), &path).await.unwrap()).unwrap();
        assert!(answer.starts_with("Refused: "), "{path}: {answer:?}");
    }

    // File names a shell would run; a shell would run them in the server's working directory
    // or in the directory being listed.
    let dir = server.pkgs.join("meta");
    std::fs::create_dir(&dir).unwrap();
    let names = [
        format!("$(touch pwned-{tag}-1)"),
        format!("`touch pwned-{tag}-2`"),
        format!("a; touch pwned-{tag}-3"),
        format!("|| touch pwned-{tag}-4 &"),
        "-rf".to_owned(),
    ];
    for name in &names {
        std::fs::write(dir.join(name), name.as_bytes()).unwrap();
    }
    let answer = Answer::parse(&server.alice_legacy(text(&dir)).await);
    let files = answer.files();
    let key = signing_server::ed448::parse_public_pem(&server.public_pem).unwrap();
    for name in &names {
        let signature = files[name]["signature"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {files}"));
        let signature = base64_decode(signature);
        assert!(
            signing_server::ed448::verify_stream(&key, &signature, name.as_bytes()).unwrap(),
            "{name}"
        );
    }

    let cwd = std::env::current_dir().unwrap();
    for place in [std::env::temp_dir(), cwd, dir.clone(), server.state.clone()] {
        let found: Vec<String> = std::fs::read_dir(&place)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("pwned-{tag}")))
            .collect();
        assert!(found.is_empty(), "{}: {found:?}", place.display());
    }
}
