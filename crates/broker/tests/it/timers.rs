//! Every broker timer whose default fits a test, at that default, both ways (SECURITY.md
//! invariant 8, docs/TESTING.md lists the others with their short-value tests). One broker
//! with the default reaper interval, request timeout and HTTPS `[tls]` section runs every
//! scenario at once.
//!
//! Dies at about its default: a job whose TTL ran out is hidden at once and reaped (its row
//! and port freed) at the next reaper pass (15 s); a TCP stranger on the HTTPS port (handshake, 10 s); a Unix-socket connection and a
//! verified HTTPS connection that send no request, and a kept-alive connection idle after its
//! second answer (request timeout, 10 s). Lives: a job with a short TTL kept alive by
//! heartbeats outlasts the reaper pass; a kept-alive connection's second request at 8 s is
//! answered. Request bodies (issue 16): one sent a byte at a time over 8 s is answered; one
//! still incomplete is cut (408) at the request timeout after its head.
//!
//! `max_ttl_secs` and `cert_days` are bounds, not timers that fire: a quick test below checks
//! them at their defaults.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use broker::api::{JobType, SaveRequest};
use broker::config::FileConfig;
use testkit::timers::{SLACK, assert_about, closed_at, http_get, sleep_until};

use crate::support::{Backend, Daemon, https_on_loopback};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timer_at_its_default_cuts_what_it_should_and_nothing_else() {
    let pki = testkit::pki::test_pki();
    let defaults = FileConfig::default();
    let reap_interval = Duration::from_secs(defaults.reap_interval_secs);
    let request_timeout = Duration::from_secs(defaults.request_timeout_secs);
    assert_eq!(reap_interval, Duration::from_secs(15));
    assert_eq!(request_timeout, Duration::from_secs(10));
    let mut tls = pki.server_tls_section();
    // The test PKI's section shortens the handshake timeout; this test is about defaults.
    tls.handshake_timeout_secs =
        common::tls::TlsSection::new(pki.server.cert_path.clone()).handshake_timeout_secs;
    let handshake = tls.handshake_timeout();
    assert_eq!(handshake, Duration::from_secs(10));
    let daemon = Daemon::start_with(Backend::Sqlite, |config| {
        // The test daemon reaps every second; this test is about the default.
        config.reap_interval = reap_interval;
        assert_eq!(config.request_timeout, request_timeout);
        config.https = Some(https_on_loopback(tls, &[("CN=alice", "alice")]));
    })
    .await;
    // The reaper's first pass ran at its start; the next is one interval later.
    let start = Instant::now();
    let https = daemon.https.unwrap();
    let within = Duration::from_secs(30);

    // Dies: a job whose TTL ran out is hidden at once and its row (and port) freed at the
    // next reaper pass. Lives: one kept alive by heartbeats, past that pass.
    let reaper = async {
        let mut client = daemon.client();
        let store = daemon.broker.store();
        let save = |ttl| SaveRequest {
            job_type: Some(JobType::Ssh),
            ttl_secs: Some(ttl),
            label: None,
        };
        let lapsed = client.save(&save(1)).await.unwrap().summary.id;
        let saved = Instant::now();
        let kept = client.save(&save(4)).await.unwrap().summary.id;
        let listed = |jobs: &[broker::api::JobSummary], id: &str| jobs.iter().any(|j| j.id == id);
        let mut hidden = None;
        let reaped = loop {
            let jobs = client.query().await.unwrap();
            assert!(listed(&jobs, &kept), "the heartbeated job lapsed");
            if hidden.is_none() && !listed(&jobs, &lapsed) {
                hidden = Some(saved.elapsed());
            }
            assert!(
                store.job(&kept).await.unwrap().is_some(),
                "the heartbeated job was reaped"
            );
            if store.job(&lapsed).await.unwrap().is_none() {
                break start.elapsed();
            }
            assert!(start.elapsed() < within, "the lapsed job was never reaped");
            client.heartbeat(&kept).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        // Expiry has a granularity of one second.
        assert_about(
            "lapsed job hidden",
            hidden.expect("hidden"),
            Duration::from_secs(1),
        );
        assert_about("lapsed job reaped", reaped, reap_interval);
        // Past the pass, the kept job still answers.
        sleep_until(start, reap_interval + SLACK).await;
        client.heartbeat(&kept).await.unwrap();
        assert_eq!(client.load(&kept).await.unwrap().summary.status, "active");
    };

    // Dies: a TCP connection to the HTTPS port that never starts TLS, at the handshake
    // timeout.
    let stranger = async {
        // The server's timer starts at its accept, which may come before connect returns
        // here: the clock starts before the connect, so a loaded machine cannot make the
        // timer look early.
        let began = Instant::now();
        let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
        let at = closed_at(tcp, began, within).await;
        assert_about("tcp stranger", at.expect("closed"), handshake);
    };

    // Dies: connections that send no request, on the socket and over HTTPS.
    let quiet_unix = async {
        let unix = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let began = Instant::now();
        let at = closed_at(unix, began, within).await;
        assert_about(
            "unix without a request",
            at.expect("closed"),
            request_timeout,
        );
    };
    let quiet_https = async {
        let tls = testkit::front::tls_from_other_loopback(https, &pki.alice, &[b"http/1.1"]).await;
        let began = Instant::now();
        let at = closed_at(tls, began, within).await;
        assert_about(
            "https without a request",
            at.expect("closed"),
            request_timeout,
        );
    };

    // Lives, then dies: on a kept-alive connection (socket and HTTPS) a second request at
    // 8 s is answered; idle after it, the connection is closed at the request timeout.
    let kept_alive_unix = async {
        let mut unix = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        assert_eq!(http_get(&mut unix, "/v1/whoami").await, 200);
        sleep_until(start, Duration::from_secs(8)).await;
        assert_eq!(http_get(&mut unix, "/v1/whoami").await, 200, "at 8 s");
        let answered = Instant::now();
        let at = closed_at(unix, answered, within).await;
        assert_about(
            "idle kept-alive (unix)",
            at.expect("closed"),
            request_timeout,
        );
    };
    let kept_alive_https = async {
        let mut tls =
            testkit::front::tls_from_other_loopback(https, &pki.alice, &[b"http/1.1"]).await;
        assert_eq!(http_get(&mut tls, "/v1/whoami").await, 200);
        sleep_until(start, Duration::from_secs(8)).await;
        assert_eq!(http_get(&mut tls, "/v1/whoami").await, 200, "at 8 s");
        let answered = Instant::now();
        let at = closed_at(tls, answered, within).await;
        assert_about(
            "idle kept-alive (https)",
            at.expect("closed"),
            request_timeout,
        );
    };

    // Lives: a body dripped over 8 s. Dies: one still incomplete at the request timeout.
    let slow_body = async {
        let mut unix = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let body = br#"{"type":"ssh"}"#;
        let head = format!(
            "POST /v1/jobs HTTP/1.1\r\nhost: b\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        unix.write_all(head.as_bytes()).await.unwrap();
        let began = Instant::now();
        for (i, byte) in body.iter().enumerate() {
            let at = Duration::from_secs(8) * u32::try_from(i + 1).unwrap()
                / u32::try_from(body.len()).unwrap();
            sleep_until(began, at).await;
            unix.write_all(&[*byte]).await.unwrap();
        }
        let mut answer = [0u8; 12];
        unix.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 201", "a body sent over 8 s is answered");
    };
    let endless_body = async {
        let mut unix = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        unix.write_all(b"POST /v1/jobs HTTP/1.1\r\nhost: b\r\ncontent-length: 1000\r\n\r\n{")
            .await
            .unwrap();
        let began = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 256];
        let at = loop {
            assert!(began.elapsed() < within, "an endless body is never cut");
            if unix.write_all(b" ").await.is_err() {
                break began.elapsed();
            }
            match tokio::time::timeout(Duration::from_secs(1), unix.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break began.elapsed(),
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        };
        assert_about("body a byte a second", at, request_timeout);
        assert!(answer.starts_with(b"HTTP/1.1 408"), "{answer:?}");
    };

    tokio::join!(
        reaper,
        stranger,
        quiet_unix,
        quiet_https,
        kept_alive_unix,
        kept_alive_https,
        slow_body,
        endless_body
    );
    assert!(start.elapsed() < reap_interval + 2 * SLACK + Duration::from_secs(5));
    daemon.stop().await;
}

/// `max_ttl_secs` (7 days) and `cert_days` (30) at their defaults: bounds, not timers that
/// fire. A save asking for exactly the maximum TTL is accepted and expires 7 days out, one
/// second more is refused (400); an ssl-mode job's server and client certificates are valid
/// from about now to about 30 days out.
#[tokio::test]
async fn max_ttl_and_cert_days_at_their_defaults() {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let defaults = FileConfig::default();
    assert_eq!(defaults.max_ttl_secs, 7 * 24 * 3600);
    assert_eq!(defaults.cert_days, 30);
    let max_ttl = defaults.max_ttl_secs;
    let daemon = Daemon::start_with(Backend::Sqlite, |config| {
        assert_eq!(config.max_ttl, Duration::from_secs(max_ttl));
        assert_eq!(config.cert_days, 30);
    })
    .await;
    let mut client = daemon.client();
    let save = |job_type, ttl| SaveRequest {
        job_type: Some(job_type),
        ttl_secs: Some(ttl),
        label: None,
    };
    let now = || {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap()
    };

    // One second over the maximum is refused, and saves nothing.
    let err = client
        .save(&save(JobType::Ssh, max_ttl + 1))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("above this broker's limit"),
        "{err}"
    );
    assert!(client.query().await.unwrap().is_empty());

    // Exactly the maximum is accepted and expires a week out.
    let before = now();
    let job = client.save(&save(JobType::Ssh, max_ttl)).await.unwrap();
    let row = daemon
        .broker
        .store()
        .job(&job.summary.id)
        .await
        .unwrap()
        .unwrap();
    let max_ttl = i64::try_from(max_ttl).unwrap();
    assert_eq!(row.ttl_secs, max_ttl);
    assert!(
        (before + max_ttl..=now() + max_ttl).contains(&row.expires_at),
        "expires at {} for a save at {before}",
        row.expires_at
    );

    // An ssl-mode job: both certificates end cert_days (30 days) from now.
    let before = now();
    let job = client.save(&save(JobType::Ssl, 60)).await.unwrap();
    let after = now();
    let tls = job.tls.expect("ssl material");
    for (what, pem) in [("server", &tls.cert), ("client", &tls.client_cert)] {
        let blocks = common::pki::pem_decode(pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&blocks[0].der).unwrap();
        let validity = cert.validity();
        let not_after = validity.not_after.timestamp();
        let not_before = validity.not_before.timestamp();
        let days_30 = 30 * 86_400;
        assert!(
            (before + days_30 - 60..=after + days_30 + 60).contains(&not_after),
            "{what}: notAfter {not_after}, not 30 days after {before}"
        );
        assert!(
            not_before <= after && not_before >= before - 3600,
            "{what}: notBefore {not_before} for an issue at {before}"
        );
    }
}
