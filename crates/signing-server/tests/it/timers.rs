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

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use signing_server::config::Limits;
use testkit::timers::{SLACK, assert_about, closed_at, sleep_until};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{Answer, Body, Options, TestServer, pki, tls_connect, tls_section};

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
