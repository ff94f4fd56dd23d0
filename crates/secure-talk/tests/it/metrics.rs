//! `/metrics` on the `secure-talk` daemon's `metrics_listen`: the real binary with TLS and
//! real pipes, driven by the real client, scraped while it runs.

use std::net::SocketAddr;

use secure_talk::hub::Channel;
use serde_json::json;
use testkit::metrics::{assert_process_metrics, scrape, value};
use tokio::io::AsyncBufReadExt as _;

use crate::support::{
    PIPE, STEP, connect, create_pipe, daemon_serving, expect_reply, options, pki, send,
    tls_transport, upgrade_status, wait_checked_in,
};

fn count(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or(0.0)
}

/// The sum of the pipe exits with `reason`, whatever their status.
fn exits(text: &str, reason: &str) -> f64 {
    let prefix = format!("secure_talk_pipe_exits_total{{reason=\"{reason}\",");
    text.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn counters_move_as_secure_talk_is_used() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("secure-talk.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npipe_program = {PIPE:?}\n\
             metrics_listen = \"127.0.0.1:0\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             [limits]\nkill_grace_secs = 1\ndrain_grace_secs = 3\n",
            dir.path().join("state"),
            pki.server.cert_path,
            pki.server.key_path,
            pki.ca_path,
        ),
    )
    .expect("write the config");
    let mut child = daemon_serving(&config, &["--log", "warn"])
        .spawn()
        .expect("spawn secure-talk");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut addr, mut metrics) = (None::<SocketAddr>, None::<SocketAddr>);
    tokio::time::timeout(STEP, async {
        while addr.is_none() || metrics.is_none() {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("secure-talk exited");
            if let Some(rest) = line.strip_prefix("listening on ") {
                addr = rest.parse().ok();
            } else if let Some(rest) = line.strip_prefix("metrics on ") {
                metrics = rest.parse().ok();
            }
        }
    })
    .await
    .expect("secure-talk prints its addresses");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (addr, metrics) = (addr.unwrap(), metrics.unwrap());

    let text = scrape(metrics).await;
    assert_process_metrics(&text);
    assert_eq!(
        value(&text, "secure_talk_pipes_running"),
        Some(0.0),
        "{text}"
    );

    // A handshake without a client certificate, an upgrade without a token.
    let stranger = options(tls_transport(addr, None), None);
    if let Ok(mut stream) = secure_talk::client::open_stream(&stranger).await {
        // TLS 1.3: the server's refusal comes after the client's finished.
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut [0u8; 16]).await;
    }
    let alice = options(
        tls_transport(addr, Some(&pki.alice)),
        Some(dir.path().join("alice.token")),
    );
    assert_eq!(upgrade_status(&alice, "/", None).await, 401);

    // Both channels, a pipe that ends on its own, a pipe destroyed.
    let mut admin = connect(&alice, Channel::Admin).await;
    let _data = connect(&alice, Channel::Data).await;
    create_pipe(&mut admin, "true").await;
    let long = create_pipe(&mut admin, "sleep 30").await;
    wait_checked_in(&mut admin, long).await;
    let text = testkit::eventually("a pipe exited on its own", STEP, || async {
        let text = scrape(metrics).await;
        (exits(&text, "exited") >= 1.0).then_some(text)
    })
    .await;
    for (series, expected) in [
        ("secure_talk_clients_connected{channel=\"admin\"}", 1.0),
        ("secure_talk_clients_connected{channel=\"data\"}", 1.0),
        ("secure_talk_pipes_running", 1.0),
        ("secure_talk_refusals_total{reason=\"authorization\"}", 1.0),
        (
            "secure_talk_requests_total{route=\"upgrade_admin\",status=\"401\"}",
            1.0,
        ),
        (
            "secure_talk_requests_total{route=\"upgrade_admin\",status=\"101\"}",
            1.0,
        ),
        (
            "secure_talk_requests_total{route=\"upgrade_data\",status=\"101\"}",
            1.0,
        ),
        (
            "secure_talk_tls_handshake_failures_total{reason=\"no_certificate\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series}\n{text}");
    }
    assert!(
        count(&text, "secure_talk_connections_open") >= 2.0,
        "{text}"
    );
    assert!(
        count(
            &text,
            "secure_talk_request_duration_seconds_count{route=\"token\"}"
        ) >= 1.0,
        "{text}"
    );

    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": long}}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_destroy {long}")).await;
    let text = testkit::eventually("the destroyed pipe counted", STEP, || async {
        let text = scrape(metrics).await;
        (exits(&text, "stopped") >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(
        value(&text, "secure_talk_pipes_running"),
        Some(0.0),
        "{text}"
    );
    // No client id, certificate name or address in any series.
    assert!(
        !text.contains("alice") && !text.contains("127.0.0.1"),
        "{text}"
    );
}
