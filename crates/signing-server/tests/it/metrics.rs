//! The metrics listener (`metrics_listen`) of the real daemon: counters move as clients sign,
//! fail their handshake and are refused; the listener is bounded like every local listener.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::metrics::{assert_listener_bounded, assert_process_metrics, scrape, value};

use crate::support::{Answer, Daemon, STEP, daemon_setup, empty, https, legacy, pki};

/// A daemon configuration (alice may sign `dir/pkgs` with the key `release`) with
/// `metrics_listen = "127.0.0.1:0"`.
fn setup(dir: &Path) -> PathBuf {
    let (config, _) = daemon_setup(dir, "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("metrics_listen = \"127.0.0.1:0\"\n{text}")).unwrap();
    config
}

#[tokio::test]
async fn counters_move_as_clients_sign_fail_and_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let pkgs = dir.path().join("pkgs");
    std::fs::write(pkgs.join("a.bff"), b"a").unwrap();
    std::fs::write(pkgs.join("b.bff"), b"b").unwrap();
    let daemon = Daemon::start_with_metrics(&config).await;
    let metrics = daemon.metrics.unwrap();
    assert!(
        metrics.ip().is_loopback() && metrics.port() != 0,
        "{metrics}"
    );

    let before = scrape(metrics).await;
    assert_process_metrics(&before);
    assert_eq!(
        value(&before, "signing_server_connections_accepted_total"),
        Some(0.0)
    );
    assert_eq!(
        value(
            &before,
            "signing_server_audit_commit_duration_seconds_count"
        ),
        Some(0.0)
    );

    let pki = pki();
    // Two signatures by path, the original protocol.
    let answer = legacy(daemon.addr, Some(&pki.alice), pkgs.to_str().unwrap())
        .await
        .unwrap();
    let answer = Answer::parse(&String::from_utf8(answer).unwrap());
    assert!(answer.files()["a.bff"]["signature"].is_string());
    // A TLS failure: a revoked certificate.
    assert!(legacy(daemon.addr, Some(&pki.revoked), "/x").await.is_err());
    // A refusal: bob has no [[clients]] rule (403).
    let refused = https(
        daemon.addr,
        Some(&pki.bob),
        "POST",
        "/v1/sign?name=x",
        crate::support::full("x"),
        STEP,
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 403);
    // An unknown endpoint (404).
    let missing = https(
        daemon.addr,
        Some(&pki.alice),
        "GET",
        "/nowhere",
        empty(),
        STEP,
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404);

    let after = testkit::eventually(
        "every connection closed",
        Duration::from_secs(10),
        || async {
            let text = scrape(metrics).await;
            (value(&text, "signing_server_connections_open") == Some(0.0)).then_some(text)
        },
    )
    .await;
    for (series, expected) in [
        ("signing_server_connections_accepted_total", 4.0),
        ("signing_server_signatures_total{key=\"release\"}", 2.0),
        ("signing_server_audit_commit_duration_seconds_count", 1.0),
        (
            "signing_server_tls_handshake_failures_total{reason=\"bad_certificate\"}",
            1.0,
        ),
        (
            "signing_server_refusals_total{reason=\"authorization\"}",
            1.0,
        ),
        ("signing_server_refusals_total{reason=\"not_found\"}", 1.0),
        (
            "signing_server_requests_total{route=\"path\",status=\"200\"}",
            1.0,
        ),
        (
            "signing_server_requests_total{route=\"sign\",status=\"403\"}",
            1.0,
        ),
        (
            "signing_server_requests_total{route=\"other\",status=\"404\"}",
            1.0,
        ),
        (
            "signing_server_request_duration_seconds_count{route=\"path\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&after, series), Some(expected), "{series}\n{after}");
    }
    assert_eq!(daemon.stop().await.code(), Some(0));
}

#[tokio::test]
async fn the_metrics_listener_is_bounded_and_serves_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_metrics(&setup(dir.path())).await;
    assert_listener_bounded(daemon.metrics.unwrap()).await;
    assert_eq!(daemon.stop().await.code(), Some(0));
}
