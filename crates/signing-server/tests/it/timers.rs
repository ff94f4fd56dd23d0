//! Every signing-server timer whose default fits a test, at that default, both ways
//! (SECURITY.md invariant 8, docs/TESTING.md lists the others with their short-value tests).
//! One server with the default limits and TLS section runs every scenario at once.
//!
//! Dies at about its default: a TCP stranger (handshake, 10 s); a verified connection of the
//! original protocol that sends no path, one of the HTTP API that sends no request head, and a
//! kept-alive one idle after its second answer (request timeout, 10 s). Lives: a path sent at
//! 9 s is signed; a second request on a kept-alive connection at 8 s is answered; an upload
//! that trickles in at 1 KiB/s for 16 s (past the request timeout, below the minimum rate but
//! within the first `io_timeout_secs` where the rate is not enforced) is signed.
//!
//! The timers of one or two minutes have a test each below, at their defaults too:
//! `io_timeout_secs` with `min_upload_bytes_per_sec` (~100 s), `command_timeout_secs` (~120 s).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use signing_server::config::{ClientRule, Limits};
use testkit::timers::{SLACK, assert_about, closed_at, sleep_until};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{
    Answer, Body, Options, TestServer, command_key, pki, tls_connect, tls_section,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timer_at_its_default_cuts_what_it_should_and_nothing_else() {
    let pki = pki();
    let limits = Limits::default();
    let mut tls = tls_section(pki);
    // The test PKI's section shortens the handshake timeout; this test is about defaults.
    tls.handshake_timeout_secs =
        common::tls::TlsSection::new(pki.server.cert_path.clone()).handshake_timeout_secs;
    let handshake = tls.handshake_timeout();
    assert_eq!(handshake, Duration::from_secs(10));
    assert_eq!(limits.request_timeout(), Duration::from_secs(10));
    assert_eq!(limits.io_timeout(), Duration::from_secs(60));
    let request_timeout = limits.request_timeout();
    let server = TestServer::start(Options {
        limits,
        tls: Some(tls),
        ..Options::default()
    })
    .await;
    std::fs::write(server.pkgs.join("late.bff"), b"signed at 9 s").unwrap();
    let start = Instant::now();
    let within = Duration::from_secs(30);

    // Dies: a TCP connection that never starts TLS, at the handshake timeout.
    let stranger = async {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let began = Instant::now();
        let at = closed_at(tcp, began, within).await;
        assert_about("tcp stranger", at.expect("closed"), handshake);
    };

    // Dies: the original protocol without a path, and HTTP without a request head.
    let no_path = async {
        let tls = tls_connect(server.addr, Some(&pki.alice), false)
            .await
            .unwrap();
        let began = Instant::now();
        let at = closed_at(tls, began, within).await;
        assert_about("no path", at.expect("closed"), request_timeout);
    };
    let no_head = async {
        let tls = tls_connect(server.addr, Some(&pki.bob), true)
            .await
            .unwrap();
        let began = Instant::now();
        let at = closed_at(tls, began, within).await;
        assert_about("no request head", at.expect("closed"), request_timeout);
    };

    // Lives: a path that comes at 9 s is signed.
    let late_path = async {
        let mut tls = tls_connect(server.addr, Some(&pki.alice), false)
            .await
            .unwrap();
        sleep_until(start, Duration::from_secs(9)).await;
        let path = server.pkgs.join("late.bff");
        tls.write_all(path.to_str().unwrap().as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        let answer = Answer::parse(&String::from_utf8(answer).unwrap());
        assert!(
            answer.files()["late.bff"]["signature"].is_string(),
            "{answer:?}"
        );
    };

    // Lives, then dies: a kept-alive connection's second request at 8 s is answered; idle
    // after it, the connection is closed at the request timeout.
    let kept_alive = async {
        let tls = tls_connect(server.addr, Some(&pki.bob), true)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let get = || {
            hyper::Request::builder()
                .uri("/v1/keys")
                .header(hyper::header::HOST, "localhost")
                .body(Empty::new())
                .unwrap()
        };
        for at in [Duration::ZERO, Duration::from_secs(8)] {
            sleep_until(start, at).await;
            let response = sender.send_request(get()).await.expect("answered");
            assert_eq!(response.status(), 200, "request at {at:?}");
            response.into_body().collect().await.unwrap();
        }
        let answered = Instant::now();
        tokio::time::timeout(within, driver)
            .await
            .expect("closed in time")
            .unwrap()
            .ok();
        assert_about("idle kept-alive", answered.elapsed(), request_timeout);
    };

    // Lives: an upload of 16 KiB, 1 KiB a second.
    let trickle = async {
        let pieces = futures_util::stream::unfold(0u8, |n| async move {
            if n == 16 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![n; 1024]))),
                n + 1,
            ))
        });
        let body: Body = StreamBody::new(pieces).boxed_unsync();
        let began = Instant::now();
        let reply = crate::support::https(
            server.addr,
            Some(&pki.alice),
            "POST",
            "/v1/sign?name=trickle.tar",
            body,
            within,
        )
        .await
        .expect("the upload is answered");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["size"], 16 * 1024);
        assert!(began.elapsed() > request_timeout, "{:?}", began.elapsed());
    };

    tokio::join!(stranger, no_path, no_head, late_path, kept_alive, trickle);
    assert!(start.elapsed() < Duration::from_secs(18) + request_timeout + SLACK);
    server.stop().await;
}

/// `limits.io_timeout_secs` (60 s) and `min_upload_bytes_per_sec` (16 KiB/s, enforced after
/// the first `io_timeout_secs`) at their defaults, both ways, in one ~100 s wait. Lives: an
/// upload of three 512 KiB pieces 50 s apart (no stall of 60 s, and ahead of the minimum rate
/// once its first 60 s are over: 1 MiB by 50 s buys 64 s more) is signed after 100 s. Dies:
/// an upload that sends 1 MiB and stalls gets 408 ("stalled") 60 s after its last byte; one
/// whose 1 KiB pieces come 20 s apart (never a stall) is not cut in its first 60 s but gets
/// 408 ("slower than") at about 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_at_the_default_io_timeout_and_minimum_rate() {
    use crate::limits::{raw_http, sign_head};
    let limits = Limits::default();
    assert_eq!(limits.io_timeout(), Duration::from_secs(60));
    assert_eq!(limits.min_upload_bytes_per_sec, 16 * 1024);
    let io_timeout = limits.io_timeout();
    let server = TestServer::start(Options {
        limits,
        ..Options::default()
    })
    .await;
    let start = Instant::now();
    let within = Duration::from_secs(120);

    // Lives: pieces 50 s apart that keep ahead of the minimum rate.
    let pieces_50_s_apart = async {
        let pieces: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 512 << 10]).collect();
        let (answer, _) = raw_http(
            server.addr,
            &sign_head("every-50-s.bin", 3 * (512 << 10)),
            &pieces,
            Duration::from_secs(50),
            within,
        )
        .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let signed: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(signed["size"], 3 * (512 << 10), "{signed}");
        assert!(start.elapsed() > Duration::from_secs(100));
    };

    // Dies: a stall of io_timeout after 1 MiB (far ahead of the minimum rate).
    let stalled = async {
        let (answer, _) = raw_http(
            server.addr,
            &sign_head("stalled.bin", 4 << 20),
            &[vec![7u8; 1 << 20]],
            Duration::ZERO,
            within,
        )
        .await;
        assert_eq!(answer.status, 408, "{answer:?}");
        assert!(answer.body.contains("stalled"), "{answer:?}");
        assert_about("a stalled upload", answer.after, io_timeout);
    };

    // Dies: no stall, but 3 KiB in 60 s, far below the minimum rate: not cut before the
    // first io_timeout, cut right after it (the 3 KiB buy 0.2 s).
    let too_slow = async {
        let pieces: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1024]).collect();
        let began = Instant::now();
        let (answer, _) = raw_http(
            server.addr,
            &sign_head("too-slow.bin", 64 << 10),
            &pieces,
            Duration::from_secs(20),
            within,
        )
        .await;
        assert_eq!(answer.status, 408, "{answer:?}");
        assert!(answer.body.contains("slower than"), "{answer:?}");
        assert_about(
            "an upload below the minimum rate",
            began.elapsed(),
            io_timeout,
        );
    };

    tokio::join!(pieces_50_s_apart, stalled, too_slow);
    assert!(server.service.audit.rows().await.unwrap().len() == 1);
    server.stop().await;
}

/// A stand-in signing command: a file named `hundred*` takes 100 s to sign, `hang*` never
/// finishes (`exec sleep`, so the SIGKILL at the deadline ends it), anything else signs at
/// once.
fn slow_signer() -> &'static str {
    r#"#!/bin/sh
file="${2#infile=}"
case "${file##*/}" in
  hundred*) sleep 100 ;;
  hang*) exec sleep 300 ;;
esac
printf 'bos:bos.rte:7.3.0.0:S:aixkey:2023-03-10 18:15:04:c2lnbmF0dXJl\n' > "$3"
"#
}

/// `limits.command_timeout_secs` (120 s) at its default, both ways, in one ~120 s wait: a
/// command that takes 100 s signs; one that hangs is killed at 120 s and its file gets an
/// error. Both through the original protocol, whose connection waits for the answer, as two
/// clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_at_the_default_command_timeout() {
    let limits = Limits::default();
    assert_eq!(limits.command_timeout(), Duration::from_secs(120));
    let command_timeout = limits.command_timeout();
    let work = tempfile::tempdir().unwrap();
    let program = work.path().join("create_pkgsign");
    let root = work.path().join("aix");
    std::fs::create_dir(&root).unwrap();
    crate::support::write_script(&program, slow_signer());
    let server = TestServer::start(Options {
        limits,
        keys: vec![command_key(program)],
        // Two identities: one identity gets at most all slots but one (one here, on two
        // cores), so the two commands of one client would run one after the other.
        clients: ["alice", "bob"]
            .map(|cn| ClientRule {
                cn: cn.into(),
                key: "aix".into(),
                roots: vec![root.clone()],
            })
            .to_vec(),
        ..Options::default()
    })
    .await;
    for name in ["hundred.bin", "hang.bin"] {
        std::fs::write(root.join(name), name.as_bytes()).unwrap();
    }

    // The original protocol: the path, then the answer when every file is done.
    let sign = |name: &'static str, leaf: &'static testkit::Leaf| {
        let path = root.join(name);
        let addr = server.addr;
        async move {
            let mut tls = tls_connect(addr, Some(leaf), false).await.unwrap();
            let began = Instant::now();
            tls.write_all(path.to_str().unwrap().as_bytes())
                .await
                .unwrap();
            tls.flush().await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(130), tls.read_to_end(&mut answer))
                .await
                .expect("an answer in time")
                .unwrap();
            let answer = Answer::parse(&String::from_utf8(answer).unwrap());
            (answer.files()[name].clone(), began.elapsed())
        }
    };

    // Lives: 100 s of signing.
    let hundred = async {
        let (file, took) = sign("hundred.bin", &pki().alice).await;
        assert_eq!(file["signature"], "c2lnbmF0dXJl", "{file}");
        assert!(took >= Duration::from_secs(100), "{took:?}");
    };
    // Dies: at the command timeout.
    let hang = async {
        let (file, took) = sign("hang.bin", &pki().bob).await;
        assert!(
            file["error"]
                .as_str()
                .is_some_and(|e| e.contains("within 120 s")),
            "{file}"
        );
        assert_about("a hung signing command", took, command_timeout);
    };

    tokio::join!(hundred, hang);
    server.stop().await;
}
