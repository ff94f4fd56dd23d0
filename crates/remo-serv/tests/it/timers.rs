//! Every remo-serv timer whose default fits a test, at that default, both ways (SECURITY.md
//! invariant 8, docs/TESTING.md lists the others with their short-value tests). One server
//! with the default timers runs every scenario at once, for about 35 s (the body timeout).
//!
//! Dies at about its default: a connection that sends nothing (auth-timeout and
//! header-timeout, 10 s); a kept-alive connection idle after its answer (header-timeout,
//! 10 s); a body token sent 11 s after it was made (the protocol's 10 s token TTL); an upload
//! that stalls (body-timeout, 30 s); an interactive command that ignores SIGTERM after a
//! logout (SIGKILL at kill-grace, 5 s). Lives: a connection that logs in at 9 s and is used at
//! 17 s; a request at 8 s on a kept-alive connection; a body token sent 8 s after it was made;
//! a command running 12 s (command-timeout 0: no limit); an upload whose pieces come 8 s
//! apart for 24 s; an interactive command that needs 2 s after SIGTERM finishes by itself.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use remo_serv::client::ClientConfig;
use remo_serv::config::Config;
use remo_serv::proto;
use testkit::timers::{SLACK, assert_about, closed_at, sleep_until};

use crate::front::login;
use crate::harness::{
    FIRST, Harness, LAST, MIDDLE, ONLY, RawBody, RawSession, numbers, process_ended, random_bytes,
};

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A kept-alive HTTP connection; the driver task ends when the server closes it.
async fn kept_alive(h: &Harness) -> (Sender, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    crate::harness::http1(tcp).await
}

/// One request on a kept-alive connection; its status.
async fn status(sender: &mut Sender, method: &str, path: &str, body: Bytes) -> u16 {
    sender.ready().await.expect("the connection is open");
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x")
        .header("content-length", body.len())
        .body(Full::new(body))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

/// A POST with a chunked `body` on a fresh connection, with no deadline of its own (the
/// harness's `request` gives up after 10 s); the status.
async fn slow_post(addr: std::net::SocketAddr, path: String, cookie: String, body: RawBody) -> u16 {
    let RawBody::Chunked(body) = body else {
        panic!("a chunked body");
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, _) = crate::harness::http1(tcp).await;
    let request = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "x")
        .header("cookie", cookie)
        .header("transfer-encoding", "chunked")
        .body(body)
        .unwrap();
    let response = sender.send_request(request).await.expect("an answer");
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .expect("the whole answer");
    status
}

/// Starts `line` as the interactive command of `s` and returns the first pid it prints.
async fn interactive_pid(s: &mut RawSession, line: &str) -> u32 {
    let icm = s.path("/icm/", line);
    let answer = s.call(&icm, b"").await;
    assert_eq!(answer.status, 200);
    let mut output = s.decode(&answer);
    let deadline = Instant::now() + Duration::from_secs(5);
    while numbers(&output).is_empty() {
        assert!(Instant::now() < deadline, "no pid from {line}");
        let answer = s.call("/idt", b"").await;
        output.extend(s.decode(&answer));
    }
    numbers(&output)[0]
}

/// When `pid` ended, from `since`.
async fn ended_at(pid: u32, since: Instant) -> Duration {
    let what = format!("process {pid} to end");
    testkit::until(&what, Duration::from_secs(20), || process_ended(pid)).await;
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timer_at_its_default_cuts_what_it_should_and_nothing_else() {
    let defaults = Config::default();
    let secs = Duration::from_secs;
    assert_eq!(defaults.auth_timeout, secs(10));
    assert_eq!(defaults.header_timeout, secs(10));
    assert_eq!(defaults.body_timeout, secs(30));
    assert_eq!(defaults.kill_grace, secs(5));
    assert_eq!(defaults.command_timeout, None);
    assert_eq!(proto::TOKEN_TTL_SECS, 10);
    let h = Harness::start_with(|c| {
        // The test configuration shortens these; this test is about the defaults.
        c.kill_grace = defaults.kill_grace;
        c.body_timeout = defaults.body_timeout;
        c.header_timeout = defaults.header_timeout;
        c.auth_timeout = defaults.auth_timeout;
        c.command_timeout = defaults.command_timeout;
    })
    .await;
    let start = Instant::now();
    let within = secs(40);

    // Dies: a connection that sends nothing, at the auth (and header) timeout.
    let stranger = async {
        // The server's timer starts at its accept, which may come before connect returns
        // here: the clock starts before the connect, so a loaded machine cannot make the
        // timer look early.
        let began = Instant::now();
        let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let at = closed_at(tcp, began, within).await;
        assert_about(
            "silent connection",
            at.expect("closed"),
            defaults.auth_timeout,
        );
    };

    // Lives: a connection that logs in at 9 s, before the auth timeout, is served at 17 s.
    let late_login = async {
        let (mut sender, _driver) = kept_alive(&h).await;
        sleep_until(start, secs(9)).await;
        assert_eq!(
            status(&mut sender, "POST", "/auth", login(&h.keys)).await,
            200
        );
        sleep_until(start, secs(17)).await;
        assert_eq!(
            status(&mut sender, "GET", "/info", Bytes::new()).await,
            200,
            "at 17 s"
        );
    };

    // Lives, then dies: a logged-in kept-alive connection is served at 8 s, then closed at
    // the header timeout after its last answer.
    let idle_kept_alive = async {
        let (mut sender, driver) = kept_alive(&h).await;
        assert_eq!(
            status(&mut sender, "POST", "/auth", login(&h.keys)).await,
            200
        );
        sleep_until(start, secs(8)).await;
        assert_eq!(
            status(&mut sender, "GET", "/info", Bytes::new()).await,
            200,
            "at 8 s"
        );
        let answered = Instant::now();
        tokio::time::timeout(within, driver).await.unwrap().unwrap();
        assert_about(
            "idle kept-alive",
            answered.elapsed(),
            defaults.header_timeout,
        );
    };

    // The body token TTL. Lives: a token sent 8 s after it was made. Dies: one sent at 11 s.
    let token_ttl = async {
        let mut fresh = h.raw().await;
        let mut stale = h.raw().await;
        let fresh_path = fresh.path("/cmd/", "cat");
        let stale_path = stale.path("/cmd/", "cat");
        let fresh_token = fresh.first(&fresh_path, ONLY, 1, b"made at 0 s");
        let stale_token = stale.first(&stale_path, ONLY, 1, b"made at 0 s");
        let made = Instant::now();
        fresh.last = 1;
        stale.last = 1;
        sleep_until(made, secs(8)).await;
        let answer = fresh.send(&fresh_path, fresh_token).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(fresh.decode(&answer), b"made at 0 s");
        sleep_until(made, secs(11)).await;
        let answer = stale.send(&stale_path, stale_token).await;
        assert_eq!(answer.status, 400, "a token 11 s old: {}", answer.text());
    };

    // Lives: a command that runs 12 s (no command timeout), past the other timers.
    let long_command = async {
        let mut client = h
            .client_with(ClientConfig {
                timeout: secs(30),
                ..h.client_config()
            })
            .await;
        let out = client
            .exec("sh -c 'sleep 12; echo done'", b"")
            .await
            .unwrap();
        assert_eq!(
            (out.output.as_slice(), out.exit_status),
            (&b"done\n"[..], Some(0))
        );
        assert!(!out.timed_out);
    };

    // Uploads. Lives: pieces 8 s apart for 24 s. Dies: one that stalls, at the body timeout.
    let slow_upload = async {
        let s = h.raw().await;
        let put = s.path("/put/", "slow.bin");
        let (tx, body) = RawBody::channel();
        let pending = {
            let (addr, path, cookie) = (h.addr, put.clone(), s.cookie());
            tokio::spawn(slow_post(addr, path, cookie, body))
        };
        let piece = random_bytes(1024, 7);
        for (n, magic) in [FIRST, MIDDLE, MIDDLE, LAST].into_iter().enumerate() {
            sleep_until(start, secs(8) * u32::try_from(n).unwrap()).await;
            let token = if n == 0 {
                s.first(&put, magic, 1, &piece)
            } else {
                s.later(magic, 1, i16::try_from(n).unwrap(), &piece)
            };
            tx.send(format!("{token}\r\n").into()).await.unwrap();
        }
        // The end of the chunked body.
        drop(tx);
        assert_eq!(pending.await.unwrap(), 200);
        assert_eq!(
            std::fs::read(h.served.join("slow.bin")).unwrap(),
            piece.repeat(4)
        );
    };
    let stalled_upload = async {
        let s = h.raw().await;
        let put = s.path("/put/", "stalled.bin");
        let (tx, body) = RawBody::channel();
        let pending = {
            let (addr, path, cookie) = (h.addr, put.clone(), s.cookie());
            tokio::spawn(slow_post(addr, path, cookie, body))
        };
        let piece = random_bytes(1024, 8);
        tx.send(format!("{}\r\n", s.first(&put, FIRST, 1, &piece)).into())
            .await
            .unwrap();
        let stalled = Instant::now();
        let status = tokio::time::timeout(within, pending)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 400);
        assert_about("stalled upload", stalled.elapsed(), defaults.body_timeout);
        assert!(!h.served.join("stalled.bin").exists());
        drop(tx);
    };

    // The kill grace after a logout. Dies: a command that ignores SIGTERM, at the grace.
    // Lives: a command that writes and needs 2 s after SIGTERM finishes by itself (before
    // the fix its write on the closed socket killed it with SIGPIPE at once).
    let kill_grace = async {
        let mut stubborn = h.raw().await;
        let mut polite = h.raw().await;
        let stubborn_pid = interactive_pid(
            &mut stubborn,
            "sh -c 'trap \"\" TERM; echo $$; exec sleep 60'",
        )
        .await;
        let polite_pid = interactive_pid(
            &mut polite,
            "sh -c 'trap \"echo stopping; sleep 2; echo bye > polite.txt; exit 0\" TERM; echo $$; while :; do sleep 0.1; done'",
        )
        .await;
        let (stubborn_out, polite_out) = tokio::join!(stubborn.logout(), polite.logout());
        let logged_out = Instant::now();
        assert_eq!((stubborn_out.status, polite_out.status), (200, 200));
        let (stubborn_at, polite_at) = tokio::join!(
            ended_at(stubborn_pid, logged_out),
            ended_at(polite_pid, logged_out)
        );
        assert_about("command ignoring SIGTERM", stubborn_at, defaults.kill_grace);
        assert_about("command finishing after SIGTERM", polite_at, secs(2));
        assert_eq!(
            std::fs::read(h.served.join("polite.txt")).unwrap(),
            b"bye\n"
        );
    };

    tokio::join!(
        stranger,
        late_login,
        idle_kept_alive,
        token_ttl,
        long_command,
        slow_upload,
        stalled_upload,
        kill_grace,
    );
    assert!(start.elapsed() < secs(30) + SLACK + secs(5));
    h.stop().await;
}

/// A logged-out interactive command that writes while it stops (a shell prints "Terminated"
/// when its foreground child is killed) gets its kill grace. Before the fix the daemon closed
/// its end of the socketpair at once, and the first write killed the command with SIGPIPE:
/// the grace only held for commands that said nothing.
#[tokio::test]
async fn an_interactive_command_that_writes_while_it_stops_gets_its_grace() {
    let h = Harness::start_with(|c| c.kill_grace = Config::default().kill_grace).await;
    let mut s = h.raw().await;
    let pid = interactive_pid(
        &mut s,
        "sh -c 'trap \"echo stopping; sleep 1; echo done > stopped.txt; exit 0\" TERM; echo $$; while :; do sleep 0.1; done'",
    )
    .await;
    assert_eq!(s.logout().await.status, 200);
    let logged_out = Instant::now();
    let at = ended_at(pid, logged_out).await;
    assert!(at >= Duration::from_millis(900), "ended after {at:?}");
    assert_eq!(
        std::fs::read(h.served.join("stopped.txt")).unwrap(),
        b"done\n"
    );
    h.stop().await;
}
