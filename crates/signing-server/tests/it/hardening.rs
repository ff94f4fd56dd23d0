//! Issue 14's attacks on the signer, each reproduced against the in-process server: a file
//! rewritten between the two passes of pure Ed448 (key recovery), directories and files
//! swapped while a path is being signed (signing outside the roots, a FIFO freezing a
//! signing thread), names that forge lines of the original protocol or collide, a signing
//! job past its deadline, a spool that would fill the disk, `/v1/verify` as a disk filler,
//! and a body trickled in below the minimum rate.

use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use signing_server::config::Limits;
use signing_server::signer::PassHook;

use crate::signatures::{have_openssl, openssl_verifies};
use crate::support::{
    Answer, Options, TestServer, base64_decode, full, pki, sha256_hex, streamed, test_limits,
};

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Content spanning several of the signer's 256 KiB reads.
fn content(seed: u8) -> Vec<u8> {
    (0..700_001usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn server_with(limits: Limits) -> TestServer {
    TestServer::start(Options {
        limits,
        ..Options::default()
    })
    .await
}

/// The attack: sign a file, then sign it again while one byte is rewritten in place after
/// the first pass (so the first pass, and with it R, is that of the first signature) or in
/// the middle of the first pass. Before the fix the second answer carried R of the first
/// signature with another S, and `(S1 - S2) / (k1 - k2)` gave the private scalar. Now the
/// server refuses such a file; what it does sign verifies with openssl over the content the
/// audit records.
#[tokio::test]
async fn a_file_rewritten_while_it_is_signed_never_yields_a_reused_nonce() {
    let server = TestServer::start(Options::default()).await;
    let file = server.pkgs.join("bos.rte.race.7.3.0.0.bff");
    let original = content(1);
    std::fs::write(&file, &original).unwrap();

    let first = Answer::parse(&server.alice_legacy(text(&file)).await);
    let sig1 = base64_decode(
        first.files()["bos.rte.race.7.3.0.0.bff"]["signature"]
            .as_str()
            .unwrap(),
    );

    for (pass, offset) in [(2u8, 0u64), (1, 262_144)] {
        // Restore the original, then rewrite one byte when the signer reaches (pass, offset).
        std::fs::write(&file, &original).unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let hook: PassHook = {
            let file = file.clone();
            let fired = Arc::clone(&fired);
            Arc::new(move |p, at| {
                if p == pass && at == offset && !fired.swap(true, Ordering::SeqCst) {
                    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                    f.write_at(b"X", 500_000).unwrap();
                }
            })
        };
        server.service.set_pass_hook(Some(hook));
        let answer = Answer::parse(&server.alice_legacy(text(&file)).await);
        server.service.set_pass_hook(None);
        assert!(fired.load(Ordering::SeqCst), "the hook ran");
        let entry = &answer.files()["bos.rte.race.7.3.0.0.bff"];
        if let Some(signature) = entry["signature"].as_str() {
            // Signing one consistent content would be acceptable; a reused R never is.
            let sig2 = base64_decode(signature);
            assert!(
                sig2[..57] != sig1[..57] || sig2 == sig1,
                "pass {pass}: same R, different S: the key is recoverable"
            );
        } else {
            let error = entry["error"].as_str().unwrap();
            assert!(error.contains("changed"), "pass {pass}: {error}");
        }
    }
    // Only consistent content was ever signed: each audited digest is of content whose
    // signature verifies with openssl.
    let rows = server.service.audit.rows().await.unwrap();
    assert_eq!(rows.len(), 1, "the changed file was not signed: {rows:?}");
    assert_eq!(rows[0].3, sha256_hex(&original));
    if have_openssl() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("content");
        std::fs::write(&copy, &original).unwrap();
        assert!(openssl_verifies(
            dir.path(),
            &server.public_pem,
            &base64_decode(&rows[0].5),
            &copy
        ));
    }
    server.stop().await;
}

/// A directory swapped for a symlink out of the roots, and a file swapped for a FIFO, over
/// and over while paths are signed: nothing outside the roots is ever signed, and no request
/// blocks (before the fix the path was checked, then reopened by name).
#[tokio::test]
async fn swapping_directories_and_fifos_never_signs_outside_or_blocks() {
    let server = TestServer::start(Options::default()).await;
    let outside = tempfile::tempdir().unwrap();
    let secret = b"outside the roots".to_vec();
    std::fs::write(outside.path().join("pkg.bff"), &secret).unwrap();
    let dir = server.pkgs.join("d");
    let real = server.pkgs.join("d.real");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("pkg.bff"), b"inside").unwrap();
    let fifo_dir = server.pkgs.join("f");
    std::fs::create_dir(&fifo_dir).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let flipper = {
        let (stop, swaps) = (Arc::clone(&stop), Arc::clone(&swaps));
        let (dir, real, fifo_dir) = (dir.clone(), real.clone(), fifo_dir.clone());
        let target = outside.path().to_owned();
        std::thread::spawn(move || {
            let fifo = fifo_dir.join("x.bff");
            while !stop.load(Ordering::Relaxed) {
                std::fs::rename(&dir, &real).unwrap();
                std::os::unix::fs::symlink(&target, &dir).unwrap();
                let _ = std::fs::remove_file(&fifo);
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &fifo,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
                std::thread::sleep(Duration::from_micros(200));
                std::fs::remove_file(&dir).unwrap();
                std::fs::rename(&real, &dir).unwrap();
                let _ = std::fs::remove_file(&fifo);
                std::fs::write(&fifo, b"regular").unwrap();
                std::thread::sleep(Duration::from_micros(200));
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    for round in 0..60 {
        for path in [
            dir.join("pkg.bff"),
            dir.clone(),
            fifo_dir.join("x.bff"),
            fifo_dir.clone(),
        ] {
            let body = serde_json::json!({ "path": text(&path) }).to_string();
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                server.alice("POST", "/v1/sign-path", full(body)),
            )
            .await
            .unwrap_or_else(|_| panic!("round {round}: {} blocked", path.display()));
            assert!(
                matches!(reply.status, 200 | 400 | 403 | 404),
                "{}",
                reply.text()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(swaps.load(Ordering::Relaxed) > 10, "the swaps ran");
    let rows = server.service.audit.rows().await.unwrap();
    assert!(!rows.is_empty(), "some requests were signed");
    assert!(
        rows.iter().all(|r| r.3 != sha256_hex(&secret)),
        "a file outside the roots was signed"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // The server still stops at once: no signing thread is stuck.
    server.stop().await;
}

/// Names with control characters, bytes that are not UTF-8, or backslashes are shown
/// escaped everywhere and never signed; no name forges a line of the original protocol's
/// output; two names never share a key (before the fix `dup\xff` and `dup\xfe` both became
/// `dup\u{fffd}`, with two signatures and two audit rows under one name).
#[tokio::test]
async fn unsafe_names_are_escaped_consistently_and_not_signed() {
    use std::os::unix::ffi::OsStrExt as _;
    let server = TestServer::start(Options::default()).await;
    let dir = server.pkgs.join("names");
    std::fs::create_dir(&dir).unwrap();
    let forged = "evil\nSignatures written to: FORGED\n";
    for name in [
        std::ffi::OsStr::from_bytes(b"dup\xff"),
        std::ffi::OsStr::from_bytes(b"dup\xfe"),
        std::ffi::OsStr::new(forged),
        std::ffi::OsStr::new("esc\x1b[31mred"),
        std::ffi::OsStr::new("back\\slash"),
        std::ffi::OsStr::new("ok.bin"),
    ] {
        std::fs::write(dir.join(name), b"x").unwrap();
    }
    let raw = server.alice_legacy(text(&dir)).await;
    assert!(!raw.contains("\nSignatures written to: FORGED"), "{raw:?}");
    assert!(!raw.contains('\x1b'), "{raw:?}");
    let answer = Answer::parse(&raw);
    let listed: Vec<&str> = answer.listing.lines().skip(1).collect();
    assert_eq!(
        listed,
        [
            "back\\\\slash",
            "dup\\xfe",
            "dup\\xff",
            "esc\\u{1b}[31mred",
            "evil\\nSignatures written to: FORGED\\n",
            "ok.bin"
        ],
        "{raw:?}"
    );
    let files = answer.files();
    let object = files.as_object().unwrap();
    assert_eq!(object.len(), 6, "one key per file: {files}");
    for name in &listed[..5] {
        let error = object[*name]["error"].as_str().unwrap();
        assert!(error.contains("rename"), "{name}: {error}");
    }
    assert!(object["ok.bin"]["signature"].is_string());
    assert_eq!(answer.trailer.lines().filter(|l| !l.is_empty()).count(), 1);
    let rows = server.service.audit.rows().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2, format!("{}/ok.bin", text(&dir)));
    let signatures = std::fs::read_to_string(server.signatures_file()).unwrap();
    assert_eq!(signatures.lines().count(), 2, "{signatures}");

    // A requested path with a control character is refused outright.
    let refused = server.alice_legacy(&format!("{}/a\rb", text(&dir))).await;
    assert!(
        refused.starts_with("Refused:") && refused.contains("control"),
        "{refused:?}"
    );
    server.stop().await;
}

/// A signing job past `sign_timeout_secs` answers an error at the deadline and keeps its
/// slot until the work really ends (here: a read held by the test hook).
#[tokio::test]
async fn a_signing_job_past_its_deadline_is_stopped() {
    assert_eq!(Limits::default().sign_timeout_secs, 900);
    let server = server_with(Limits {
        sign_timeout_secs: 1,
        max_concurrent_signatures: 1,
        ..test_limits()
    })
    .await;
    std::fs::write(server.pkgs.join("slow.bin"), content(2)).unwrap();
    std::fs::write(server.pkgs.join("fast.bin"), b"fast").unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let hook: PassHook = Arc::new(move |_, at| {
        if at > 0 {
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
    });
    server.service.set_pass_hook(Some(hook));
    let started = Instant::now();
    let answer = Answer::parse(
        &server
            .alice_legacy(&format!("{}/slow.bin", text(&server.pkgs)))
            .await,
    );
    let elapsed = started.elapsed();
    let error = answer.files()["slow.bin"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("within 1 s"), "{error}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    // The stuck read still holds the only slot: the next signature waits for it.
    let fast = format!("{}/fast.bin", text(&server.pkgs));
    let answer = {
        let next = server.alice_legacy(&fast);
        tokio::pin!(next);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut next)
                .await
                .is_err(),
            "the slot is still held by the stuck read"
        );
        // The next job runs without the hook (it holds its own copy of the old one).
        server.service.set_pass_hook(None);
        release_tx.send(()).unwrap();
        Answer::parse(&next.await)
    };
    assert!(answer.files()["fast.bin"]["signature"].is_string());
    server.stop().await;
}

/// Uploads stop at the spool's quota (507) and leave nothing behind; signing from memory and
/// the audit keep working.
#[tokio::test]
async fn the_spool_quota_refuses_uploads_and_keeps_the_audit_working() {
    let server = server_with(Limits {
        max_spool_bytes: 3 << 20,
        ..test_limits()
    })
    .await;
    let reply = server
        .alice("POST", "/v1/sign?name=big.bin", full(vec![1u8; 4 << 20]))
        .await;
    assert_eq!(reply.status, 507, "{}", reply.text());
    assert!(reply.text().contains("max_spool_bytes"), "{}", reply.text());
    assert_eq!(server.service.spool.used(), 0);
    let reply = server
        .alice("POST", "/v1/sign?name=small.bin", full(vec![1u8; 1000]))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 1);
    server.stop().await;
}

/// `/v1/verify` never writes to the spool (before the fix any trusted certificate streamed
/// up to 64 GiB per request beside the audit database), and an identity without a rule has
/// a small budget.
#[tokio::test]
async fn verify_hashes_as_it_reads_and_strangers_have_a_small_budget() {
    let server = server_with(Limits {
        max_verify_bytes_without_rule: 1 << 20,
        ..test_limits()
    })
    .await;
    let body = vec![5u8; 3 << 20];
    let signed = server
        .alice("POST", "/v1/sign?name=v.bin", full(body.clone()))
        .await
        .json();
    let uri = format!(
        "/v1/verify?keyid={}&signature={}",
        server.keyid,
        url_encode(signed["signature"].as_str().unwrap())
    );
    // Streamed in pieces while the spool is watched: it stays empty.
    let spool = server.state.join("spool");
    let pieces: Vec<bytes::Bytes> = body
        .chunks(64 << 10)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let watching = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (watching, seen, spool) = (Arc::clone(&watching), Arc::clone(&seen), spool.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                let n = std::fs::read_dir(&spool).unwrap().count();
                seen.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let reply = server
        .alice("POST", &uri, streamed(pieces.into_iter()))
        .await;
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["valid"], true);
    assert_eq!(seen.load(Ordering::Relaxed), 0, "verify wrote to the spool");

    // carol has no rule: 1 MiB at most.
    let reply = server
        .https(Some(&pki().chained_client), "POST", &uri, full(body))
        .await
        .unwrap();
    assert_eq!(reply.status, 413, "{}", reply.text());
    server.stop().await;
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// One identity cannot hold every signing slot: with two slots, alice's stuck signature
/// leaves the other to bob, and small uploads (signed on the request's task) never wait for
/// a slot at all. Before the fix a client with a directory of huge sparse files stopped all
/// signing for everyone until sign_timeout_secs.
#[tokio::test]
async fn one_identity_cannot_hold_every_signing_slot() {
    let server = server_with(Limits {
        max_concurrent_signatures: 2,
        ..test_limits()
    })
    .await;
    std::fs::write(server.pkgs.join("stuck.bin"), content(3)).unwrap();
    std::fs::write(server.bobs.join("bob.bin"), b"bob").unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let stuck = Arc::new(AtomicBool::new(false));
    let hook: PassHook = {
        let stuck = Arc::clone(&stuck);
        Arc::new(move |_, at| {
            if at > 0 && !stuck.swap(true, Ordering::SeqCst) {
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(20));
            }
        })
    };
    server.service.set_pass_hook(Some(hook));
    let pkgs = text(&server.pkgs).to_owned();
    let alice = {
        let path = format!("{pkgs}/stuck.bin");
        let addr = server.addr;
        tokio::spawn(async move { crate::support::legacy(addr, Some(&pki().alice), &path).await })
    };
    while !stuck.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // alice's second large signature waits for her share; bob's is served at once.
    let bobs = format!("{}/bob.bin", text(&server.bobs));
    let bob = tokio::time::timeout(
        Duration::from_secs(5),
        server.legacy(Some(&pki().bob), &bobs),
    )
    .await
    .expect("bob is not held up by alice")
    .unwrap();
    assert!(String::from_utf8_lossy(&bob).contains("signature"));
    let small = tokio::time::timeout(
        Duration::from_secs(5),
        server.alice("POST", "/v1/sign?name=small.bin", full(vec![1u8; 1000])),
    )
    .await
    .expect("a small upload needs no slot");
    assert_eq!(small.status, 200, "{}", small.text());
    server.service.set_pass_hook(None);
    release_tx.send(()).unwrap();
    let _ = alice.await.unwrap();
    server.stop().await;
}

/// A directory's listing is bounded by `max_listing_entries` (the smallest names are kept and
/// the rest counted); a file signed by path is bounded by `max_upload_bytes`; an upload name
/// with a control character is refused (it reached the audit table raw).
#[tokio::test]
async fn listings_files_and_names_are_bounded() {
    let server = server_with(Limits {
        max_listing_entries: 5,
        max_upload_bytes: 100,
        ..test_limits()
    })
    .await;
    let dir = server.pkgs.join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..8 {
        std::fs::write(dir.join(format!("f{i}.bin")), vec![b'x'; 10 + i * 20]).unwrap();
    }
    let raw = server.alice_legacy(text(&dir)).await;
    let answer = Answer::parse(&raw);
    let listed: Vec<&str> = answer.listing.lines().skip(1).collect();
    assert_eq!(listed, ["f0.bin", "f1.bin", "f2.bin", "f3.bin", "f4.bin"]);
    assert!(
        answer
            .trailer
            .contains("Not listed (more than max_listing_entries entries): 3 more"),
        "{raw:?}"
    );
    let files = answer.files();
    assert!(files["f4.bin"]["signature"].is_string(), "{files}");
    assert!(
        files["f0.bin"]["signature"].is_string(),
        "10 bytes is within max_upload_bytes"
    );
    let body = serde_json::json!({ "path": text(&dir) }).to_string();
    let reply = server.alice("POST", "/v1/sign-path", full(body)).await;
    assert_eq!(reply.json()["not_listed"], 3, "{}", reply.text());

    std::fs::write(server.pkgs.join("big.bin"), vec![b'x'; 101]).unwrap();
    let answer = Answer::parse(
        &server
            .alice_legacy(&format!("{}/big.bin", text(&server.pkgs)))
            .await,
    );
    let error = answer.files()["big.bin"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("max_upload_bytes"), "{error}");

    let reply = server
        .alice(
            "POST",
            "/v1/sign?name=%1b%5b2J%0dbos.bff",
            full(vec![1u8; 10]),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    server.stop().await;
}

/// SIGTERM while a signing thread is busy for the next hour (a 1 TiB sparse file, read at a
/// few hundred MB/s): the daemon drains for `drain_grace_secs` and exits. Before the fix the
/// runtime, dropped at the end of `main`, waited for that blocking thread: the log said it
/// had stopped and the process never ended.
#[tokio::test]
async fn sigterm_ends_the_daemon_while_a_signature_is_still_running() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _key) = crate::support::daemon_setup(
        dir.path(),
        "drain_grace_secs = 1\nmax_upload_bytes = 2199023255552\n",
    );
    let pkgs = dir.path().join("pkgs");
    let huge = pkgs.join("huge.bin");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let pki = pki();
    let daemon = crate::support::Daemon::start(&config).await;
    let request = {
        let (addr, path) = (daemon.addr, text(&huge).to_owned());
        tokio::spawn(async move { crate::support::legacy(addr, Some(&pki.alice), &path).await })
    };
    // Let the signature start reading.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let _status = daemon.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    request.abort();
}
