//! `/get` and `/put` on the file system: roots and symlinks, modes, and uploads that fail or
//! stall (the old file survives, no temporary is left behind).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use remo_serv::client::{Client, ClientError};
use remo_serv::proto;

use crate::harness::{
    FIRST, Harness, LAST, MIDDLE, RawBody, RawSession, WAIT, now, put_temporaries, random_bytes,
    request,
};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

type MakeUpload = fn(&RawSession, &str, i16, &[u8]) -> Vec<String>;

/// Five 8 KiB tokens, then the failure: the server has already written to its temporary.
fn good_start(s: &RawSession, path: &str, req: i16, piece: &[u8]) -> Vec<String> {
    let mut lines = vec![format!("{}\r\n", s.first(path, FIRST, req, piece))];
    for tok in 1..5 {
        lines.push(format!("{}\r\n", s.later(MIDDLE, req, tok, piece)));
    }
    lines
}

#[tokio::test]
async fn a_failed_upload_keeps_the_old_file_and_leaves_no_temporary() {
    let h = Harness::start().await;
    let target = h.served.join("keep.txt");
    std::fs::write(&target, b"precious").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut s = h.raw().await;
    assert_eq!(s.call(&s.path("/cmd/", "true"), b"").await.status, 200);
    let piece = random_bytes(8192, 11);
    let cases: &[(&str, MakeUpload)] = &[
        ("a garbage token mid-way", |s, p, r, piece| {
            let mut lines = good_start(s, p, r, piece);
            lines.push("garbage\r\n".into());
            lines.push(s.later(LAST, r, 6, b""));
            lines
        }),
        ("a token out of sequence mid-way", |s, p, r, piece| {
            let mut lines = good_start(s, p, r, piece);
            lines.push(format!("{}\r\n", s.later(MIDDLE, r, 7, piece)));
            lines.push(s.later(LAST, r, 8, b""));
            lines
        }),
        ("a blank line mid-way", |s, p, r, piece| {
            let mut lines = good_start(s, p, r, piece);
            lines.push("\r\n".into());
            lines.push(s.later(LAST, r, 5, b""));
            lines
        }),
        ("an expired token mid-way", |s, p, r, piece| {
            let mut lines = good_start(s, p, r, piece);
            let old = proto::request_plain(MIDDLE, r, 5, None, piece);
            lines.push(format!("{}\r\n", s.cipher.encrypt_at(&old, now() - 11)));
            lines.push(s.later(LAST, r, 6, b""));
            lines
        }),
        ("a token of another request mid-way", |s, p, r, piece| {
            let mut lines = good_start(s, p, r, piece);
            lines.push(s.later(LAST, r + 1, 5, b""));
            lines
        }),
        ("the body ends without an E token", |s, p, r, piece| {
            good_start(s, p, r, piece)
        }),
        ("the first token has the wrong hash", |s, _, r, piece| {
            let other = s.path("/put/", "keep.txt");
            let mut lines = good_start(s, &other, r, piece);
            lines.push(s.later(LAST, r, 5, b""));
            lines
        }),
    ];
    for &(name, make) in cases {
        for remote in ["keep.txt", "fresh.txt"] {
            let put = s.path("/put/", remote);
            let req = s.last + 1;
            let answer = s.send_chunked(&put, make(&s, &put, req, &piece)).await;
            assert_eq!(answer.status, 400, "{name}: {}", answer.text());
            // A first token that checked took the number when the request was accepted.
            if !name.starts_with("the first token") {
                s.last = req;
            }
            assert_eq!(std::fs::read(&target).unwrap(), b"precious", "{name}");
            assert!(!h.served.join("fresh.txt").exists(), "{name}");
            let leftovers = put_temporaries(&h.served);
            assert!(leftovers.is_empty(), "{name}: {leftovers:?}");
        }
    }
    // A good upload replaces the file, mode kept.
    let put = s.path("/put/", "keep.txt");
    let req = s.last + 1;
    let mut lines = good_start(&s, &put, req, &piece);
    lines.push(s.later(LAST, req, 5, b""));
    let answer = s.send_chunked(&put, lines).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(s.decode_for(&answer, req), b"");
    assert_eq!(std::fs::read(&target).unwrap(), piece.repeat(5));
    assert_eq!(mode(&target), 0o640);
    h.stop().await;
}

#[tokio::test]
async fn a_stalled_upload_is_dropped_after_the_body_timeout() {
    let h = Harness::start_with(|c| c.body_timeout = Duration::from_secs(1)).await;
    let target = h.served.join("keep.txt");
    std::fs::write(&target, b"precious").unwrap();
    let s = h.raw().await;
    let put = s.path("/put/", "keep.txt");
    let (tx, body) = RawBody::channel();
    let pending = {
        let (addr, path, cookie) = (h.addr, put.clone(), s.cookie());
        tokio::spawn(async move { request(addr, "POST", &path, Some(&cookie), body).await })
    };
    let piece = random_bytes(8192, 12);
    tx.send(format!("{}\r\n", s.first(&put, FIRST, 1, &piece)).into())
        .await
        .unwrap();
    tx.send(format!("{}\r\n", s.later(MIDDLE, 1, 1, &piece)).into())
        .await
        .unwrap();
    testkit::until("the upload to start", WAIT, || {
        !put_temporaries(&h.served).is_empty()
    })
    .await;
    let stalled = Instant::now();
    // Nothing more is sent, but the connection stays open.
    let answer = pending.await.unwrap();
    assert!(stalled.elapsed() >= Duration::from_millis(500));
    assert_eq!(answer.status, 400);
    assert_eq!(s.decode_for(&answer, 1), b"");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    assert!(put_temporaries(&h.served).is_empty());
    drop(tx);
    h.stop().await;
}

fn status_of(result: Result<u64, ClientError>) -> u16 {
    match result {
        Ok(_) => 200,
        Err(ClientError::Status { status, .. }) => status,
        Err(other) => panic!("expected an HTTP status, got {other}"),
    }
}

async fn get_status(client: &mut Client, remote: &str, local: &Path) -> u16 {
    status_of(client.get(remote, local, |_, _| {}).await)
}

async fn put_status(client: &mut Client, local: &Path, remote: &str) -> u16 {
    status_of(client.put(local, remote, |_| {}).await)
}

#[tokio::test]
async fn names_resolve_inside_the_roots() {
    let h = Harness::start_with(|c| {
        let extra = c.workdir.parent().unwrap().join("extra");
        std::fs::create_dir(&extra).unwrap();
        c.file_roots = vec![".".into(), extra];
    })
    .await;
    let base = h.dir.path();
    let served = &h.served;
    std::fs::write(base.join("outside.txt"), b"secret").unwrap();
    std::fs::write(base.join("extra/e.txt"), b"extra").unwrap();
    std::fs::write(served.join("real.txt"), b"real").unwrap();
    std::fs::create_dir(served.join("sub")).unwrap();
    std::os::unix::fs::symlink("real.txt", served.join("inlink")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", served.join("outlink")).unwrap();
    std::os::unix::fs::symlink(base, served.join("outdir")).unwrap();
    let mut client = h.client().await;
    let local = base.join("local.txt");

    let outside = base.join("outside.txt");
    let real_abs = served.join("real.txt");
    let extra_abs = base.join("extra/e.txt");
    let gets: &[(&str, u16, &[u8])] = &[
        ("real.txt", 200, b"real"),
        ("./real.txt", 200, b"real"),
        ("sub/../real.txt", 200, b"real"),
        ("inlink", 200, b"real"),
        (real_abs.to_str().unwrap(), 200, b"real"),
        (extra_abs.to_str().unwrap(), 200, b"extra"),
        ("../extra/e.txt", 200, b"extra"),
        ("../outside.txt", 403, b""),
        (outside.to_str().unwrap(), 403, b""),
        ("/etc/passwd", 403, b""),
        ("outlink", 403, b""),
        ("outdir/outside.txt", 403, b""),
        ("sub", 400, b""),
        ("", 400, b""),
        ("nope/x", 404, b""),
        ("missing", 404, b""),
    ];
    for &(remote, status, content) in gets {
        let _ = std::fs::remove_file(&local);
        assert_eq!(
            get_status(&mut client, remote, &local).await,
            status,
            "get {remote:?}"
        );
        if status == 200 {
            assert_eq!(std::fs::read(&local).unwrap(), content, "get {remote:?}");
        } else {
            assert!(!local.exists(), "get {remote:?} left a local file");
        }
    }

    std::fs::write(&local, b"uploaded").unwrap();
    let evil = base.join("evil.txt");
    let puts: &[(&str, u16)] = &[
        ("../evil.txt", 403),
        (evil.to_str().unwrap(), 403),
        ("outdir/evil.txt", 403),
        ("/tmp/remo-serv-it-evil.txt", 403),
        ("sub", 400),
        ("sub/", 400),
        // The working directory itself: its parent is outside the roots.
        (".", 403),
        ("sub/..", 400),
        ("nope/x", 404),
        ("../extra/up.txt", 200),
        ("sub/new.txt", 200),
    ];
    for &(remote, status) in puts {
        assert_eq!(
            put_status(&mut client, &local, remote).await,
            status,
            "put {remote:?}"
        );
    }
    assert!(!evil.exists());
    assert!(!Path::new("/tmp/remo-serv-it-evil.txt").exists());
    assert_eq!(
        std::fs::read(base.join("extra/up.txt")).unwrap(),
        b"uploaded"
    );
    assert_eq!(
        std::fs::read(served.join("sub/new.txt")).unwrap(),
        b"uploaded"
    );
    // A put onto a symlink replaces the link itself: nothing is written where it pointed.
    assert_eq!(put_status(&mut client, &local, "outlink").await, 200);
    assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    assert_eq!(std::fs::read(served.join("outlink")).unwrap(), b"uploaded");
    assert!(put_temporaries(served).is_empty());
    h.stop().await;
}

#[tokio::test]
async fn put_keeps_the_mode_of_a_replaced_file() {
    let h = Harness::start().await;
    let script = h.served.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho old\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
    let private = h.served.join("private.txt");
    std::fs::write(&private, b"x").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut client = h.client().await;
    let local = h.dir.path().join("new.sh");
    std::fs::write(&local, "#!/bin/sh\necho new\n").unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o600)).unwrap();

    client.put(&local, "run.sh", |_| {}).await.unwrap();
    assert_eq!(mode(&script), 0o750);
    assert_eq!(client.exec("./run.sh", b"").await.unwrap().output, b"new\n");
    client.put(&local, "private.txt", |_| {}).await.unwrap();
    assert_eq!(mode(&private), 0o600);
    client.put(&local, "brand-new.txt", |_| {}).await.unwrap();
    assert_eq!(mode(&h.served.join("brand-new.txt")), 0o644);
    h.stop().await;
}

/// A local user made the target of an upload set-uid and set-gid (mode 6777) in a directory
/// they share with the server's users: the replaced file, owned by the daemon's uid, kept
/// those bits and ran with the daemon's euid. A replaced file keeps only its permission bits,
/// and loses group and other write when it belonged to another uid.
#[tokio::test]
async fn put_never_keeps_set_id_bits_of_a_replaced_file() {
    let h = Harness::start().await;
    let tool = h.served.join("tool");
    std::fs::write(&tool, b"planted").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o6777)).unwrap();
    assert_eq!(mode(&tool), 0o6777);
    let mut client = h.client().await;
    let local = h.dir.path().join("id");
    std::fs::write(&local, "#!/bin/sh\nid -u\n").unwrap();

    client.put(&local, "tool", |_| {}).await.unwrap();
    assert_eq!(
        mode(&tool),
        0o777,
        "set-uid/set-gid bits copied onto the new file"
    );
    assert_eq!(
        std::fs::read(&tool).unwrap(),
        std::fs::read(&local).unwrap()
    );

    // Planted by another uid (nobody): group and other write go too. Only root can chown.
    let other = h.served.join("other-tool");
    std::fs::write(&other, b"planted").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o6777)).unwrap();
    if std::os::unix::fs::chown(&other, Some(65_534), Some(65_534)).is_ok() {
        client.put(&local, "other-tool", |_| {}).await.unwrap();
        assert_eq!(mode(&other), 0o755);
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(
            std::fs::metadata(&other).unwrap().uid(),
            rustix::process::geteuid().as_raw()
        );
    }
    h.stop().await;
}

/// Unblocks anything stuck opening `fifo` for reading (the code before the fix did, on an
/// async worker): after `after`, opens the write end whenever a reader waits, until dropped.
struct FifoWatchdog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FifoWatchdog {
    fn start(fifo: &Path, after: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, fifo) = (std::sync::Arc::clone(&stop), fifo.to_owned());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if start.elapsed() >= after {
                    // ENXIO while no reader waits; a waiting reader gets EOF.
                    let _ = rustix::fs::open(
                        &fifo,
                        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NONBLOCK,
                        rustix::fs::Mode::empty(),
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FifoWatchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[tokio::test]
async fn get_of_a_fifo_is_refused_at_once_and_the_server_keeps_serving() {
    let h = Harness::start().await;
    let fifo = h.served.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // Without the fix the server's open() waits for a writer on an async worker: this test
    // then takes as long as the watchdog's delay (and fails) instead of hanging for ever.
    let _watchdog = FifoWatchdog::start(&fifo, Duration::from_secs(3));
    let mut getter = h.client().await;
    let mut other = h.client().await;
    let local = h.dir.path().join("fifo.copy");
    let started = Instant::now();
    let (got, ran) = tokio::join!(getter.get("fifo", &local, |_, _| {}), async {
        // A command and a new login while the FIFO is being asked for.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ran = other.exec("echo alive", b"").await.unwrap();
        let mut fresh = h.client().await;
        assert_eq!(fresh.exec("true", b"").await.unwrap().exit_status, Some(0));
        ran
    });
    let elapsed = started.elapsed();
    match got {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 400),
        other => panic!("a FIFO was served: {other:?}"),
    }
    assert_eq!(ran.output, b"alive\n");
    assert!(
        elapsed < Duration::from_secs(2),
        "the FIFO held the server for {elapsed:?}"
    );
    assert!(!local.exists());
    h.stop().await;
}

/// Swaps `served/d` (a directory) with a symlink to a directory outside the roots, atomically,
/// as fast as it can, until dropped.
struct Swapper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(served: &Path, outside: &Path) -> Self {
        use std::sync::atomic::Ordering;
        std::os::unix::fs::symlink(outside, served.join("link")).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, served) = (std::sync::Arc::clone(&stop), served.to_owned());
        let thread = std::thread::spawn(move || {
            let mut swaps = 0;
            while !flag.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    served.join("d"),
                    rustix::fs::CWD,
                    served.join("link"),
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                swaps += 1;
            }
            swaps
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_never_leads_outside() {
    let h = Harness::start().await;
    let outside = h.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("f"), b"SECRET").unwrap();
    std::fs::create_dir(h.served.join("d")).unwrap();
    std::fs::write(h.served.join("d/f"), b"inside").unwrap();
    let mut client = h.client().await;
    let local = h.dir.path().join("copy");
    let upload = h.dir.path().join("upload");
    std::fs::write(&upload, b"planted").unwrap();

    let swapper = Swapper::start(&h.served, &outside);
    let (mut served_gets, mut refused, mut puts) = (0, 0, 0);
    for round in 0..400 {
        let _ = std::fs::remove_file(&local);
        match client.get("d/f", &local, |_, _| {}).await {
            Ok(_) => {
                assert_eq!(std::fs::read(&local).unwrap(), b"inside", "round {round}");
                served_gets += 1;
            }
            Err(ClientError::Status { status, .. }) => {
                assert!(matches!(status, 403 | 404), "round {round}: {status}");
                refused += 1;
            }
            Err(other) => panic!("round {round}: {other}"),
        }
        if round % 4 == 0 {
            match client.put(&upload, "d/new", |_| {}).await {
                Ok(_) => puts += 1,
                Err(ClientError::Status { status, .. }) => {
                    assert!(matches!(status, 403 | 404), "round {round}: {status}");
                }
                Err(other) => panic!("round {round}: {other}"),
            }
        }
    }
    let swaps = swapper.stop();
    eprintln!("{swaps} swaps; gets: {served_gets} served, {refused} refused; {puts} puts");
    assert_eq!(names(&outside), ["f"], "something was written outside");
    assert_eq!(std::fs::read(outside.join("f")).unwrap(), b"SECRET");
    // Wherever the directory is now, it holds no temporaries.
    for dir in [h.served.join("d"), h.served.join("link"), h.served.clone()] {
        assert!(put_temporaries(&dir).is_empty(), "{dir:?}");
    }
    assert!(served_gets > 0 && refused > 0, "the race was not exercised");
    h.stop().await;
}
