//! The metrics listener (`metrics_listen`) of the real daemon: it announces its address, its
//! counters move as real clients connect, fail, are refused and pair, and it is bounded like
//! every local listener.

use std::net::SocketAddr;

use testkit::logs::LogCapture;
use testkit::metrics::{assert_listener_bounded, assert_process_metrics, scrape, value};
use testkit::test_pki;
use tokio::io::AsyncBufReadExt as _;
use ws_proxy::client::{self, ClientError};

use crate::support::{DAEMON, WAIT, closed, options, pair_at, write_config};

/// Starts the daemon on `config` with `--print-address`; returns it (killed when dropped),
/// its log, its WSS port and its metrics address, read from the `listening on` and
/// `metrics on` lines.
async fn spawn_with_metrics(
    config: &std::path::Path,
) -> (tokio::process::Child, LogCapture, u16, SocketAddr) {
    let mut child = tokio::process::Command::new(DAEMON)
        .arg("--config")
        .arg(config)
        .arg("--print-address")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = LogCapture::start("ws-proxy", child.stderr.take().unwrap());
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut port = None;
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("a `metrics on` line");
        if let Some(addr) = line.strip_prefix("listening on ") {
            port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
        } else if let Some(addr) = line.strip_prefix("metrics on ") {
            return (
                child,
                log,
                port.expect("listening first"),
                addr.parse().unwrap(),
            );
        }
    }
}

/// The warning for a metrics listener off loopback.
const OFF_LOOPBACK: &str = "the metrics listener is not on loopback";

#[tokio::test]
async fn a_metrics_listener_off_loopback_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "metrics_listen = \"0.0.0.0:0\"", "");
    let (_daemon, log, _port, metrics) = spawn_with_metrics(&config).await;
    log.wait_for(OFF_LOOPBACK, WAIT).await;
    // It serves all the same.
    let local = SocketAddr::from(([127, 0, 0, 1], metrics.port()));
    assert!(scrape(local).await.contains("ws_proxy_connections_open"));
}

#[tokio::test]
async fn counters_move_as_clients_connect_fail_are_refused_and_pair() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "metrics_listen = \"127.0.0.1:0\"", "");
    let (_daemon, log, port, metrics) = spawn_with_metrics(&config).await;
    log.wait_for("metrics listener: /metrics", WAIT).await;
    assert!(!String::from_utf8_lossy(&log.bytes()).contains(OFF_LOOPBACK));
    assert!(
        metrics.ip().is_loopback() && metrics.port() != 0,
        "{metrics}"
    );

    let before = scrape(metrics).await;
    assert_process_metrics(&before);
    assert_eq!(
        value(&before, "ws_proxy_connections_accepted_total"),
        Some(0.0)
    );
    assert_eq!(value(&before, "ws_proxy_connections_open"), Some(0.0));
    // The proxy's own families are there too, as before.
    for family in [
        "ws_proxy_meetups_waiting",
        "ws_proxy_meetups_paired",
        "ws_proxy_buffered_bytes",
    ] {
        assert_eq!(value(&before, family), Some(0.0), "{family}\n{before}");
    }

    let pki = test_pki();
    let url = |path: &str| format!("wss://localhost:{port}{path}");
    // A TLS failure: a revoked certificate.
    let failed = client::connect(&options(
        &url("/micronets/v1/ws-proxy/gw"),
        Some(&pki.revoked),
    ))
    .await;
    assert!(
        matches!(failed, Err(ref err) if !matches!(err, ClientError::Refused { .. })),
        "{failed:?}"
    );
    // A refusal: a path outside the prefix (404).
    match client::connect(&options(&url("/elsewhere/gw"), Some(&pki.alice))).await {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status, 404),
        other => panic!("expected a 404, got {other:?}"),
    }
    // Two upgrades that pair.
    let (mut a, mut b) = pair_at(&url("/micronets/v1/ws-proxy/gw")).await;

    let during = testkit::eventually("the pair counted", WAIT, || async {
        let text = scrape(metrics).await;
        (value(&text, "ws_proxy_meetups_paired") == Some(1.0)).then_some(text)
    })
    .await;
    for (series, expected) in [
        ("ws_proxy_connections_accepted_total", 4.0),
        ("ws_proxy_connections_open", 2.0),
        (
            "ws_proxy_tls_handshake_failures_total{reason=\"bad_certificate\"}",
            1.0,
        ),
        ("ws_proxy_refusals_total{reason=\"not_found\"}", 1.0),
        (
            "ws_proxy_connections_refused_total{reason=\"not_found\"}",
            1.0,
        ),
        ("ws_proxy_connections_refused_total{reason=\"tls\"}", 1.0),
        (
            "ws_proxy_requests_total{route=\"upgrade\",status=\"101\"}",
            2.0,
        ),
        (
            "ws_proxy_requests_total{route=\"upgrade\",status=\"404\"}",
            1.0,
        ),
        (
            "ws_proxy_request_duration_seconds_count{route=\"upgrade\"}",
            3.0,
        ),
        ("ws_proxy_pairs_total", 1.0),
        ("ws_proxy_meetups_waiting", 0.0),
    ] {
        assert_eq!(value(&during, series), Some(expected), "{series}\n{during}");
    }

    drop(a.close(None).await);
    let _ = closed(&mut b).await;
    testkit::eventually("the connections closed", WAIT, || async {
        let text = scrape(metrics).await;
        (value(&text, "ws_proxy_connections_open") == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_metrics_listener_is_bounded_and_serves_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "metrics_listen = \"127.0.0.1:0\"", "");
    let (_daemon, _log, _port, metrics) = spawn_with_metrics(&config).await;
    // /status shows meet-up ids: the metrics listener does not serve it.
    assert_listener_bounded(metrics).await;
}
