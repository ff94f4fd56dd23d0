//! `/metrics` on the `remo-serv` daemon's `metrics-listen`: the real binary over HTTPS, driven
//! by the real client, scraped while it runs.

use std::net::SocketAddr;

use remo_serv::client::Client;
use remo_serv::keys::PrivateKey;
use testkit::metrics::{assert_process_metrics, scrape, value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::WAIT;
use crate::process::Deployment;

fn count(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_as_remo_serv_is_used() {
    let pki = testkit::test_pki();
    let d = Deployment::new().await;
    std::fs::write(
        d.path("remo.toml"),
        "\"metrics-listen\" = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let cert = pki.server.cert_path.to_str().unwrap();
    let key = pki.server.key_path.to_str().unwrap();
    let daemon = d.start(&["--tls-cert", cert, "--tls-key", key, "--conf", "remo.toml"]);
    let metrics: SocketAddr = daemon.printed("metrics on ").parse().unwrap();

    let text = scrape(metrics).await;
    assert_process_metrics(&text);
    assert_eq!(value(&text, "remo_serv_sessions"), Some(0.0), "{text}");

    // A plain-HTTP request to the HTTPS port: a failed handshake.
    let mut tcp = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    tcp.write_all(b"GET /info HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::time::timeout(WAIT, tcp.read(&mut [0u8; 64])).await;

    // A login, a command, an interactive command left running; a stranger's key refused.
    let url = format!("https://localhost:{}", daemon.addr.port());
    let config = remo_serv::client::ClientConfig {
        ca: Some(pki.ca_path.clone()),
        ..d.client_config(&url)
    };
    let mut client = Client::login(config.clone(), d.keys.user_key(), d.keys.server_pub.clone())
        .await
        .unwrap();
    let out = client.exec("true", b"").await.unwrap();
    assert_eq!(out.exit_status, Some(0));
    client.iexec("cat").await.unwrap();
    let refused = Client::login(
        config.clone(),
        PrivateKey::generate(),
        d.keys.server_pub.clone(),
    )
    .await;
    assert!(refused.is_err());

    let text = testkit::eventually("the handshake failure counted", WAIT, || async {
        let text = scrape(metrics).await;
        (count(
            &text,
            "remo_serv_tls_handshake_failures_total{reason=\"protocol\"}",
        ) >= 1.0)
            .then_some(text)
    })
    .await;
    for (series, expected) in [
        ("remo_serv_sessions", 1.0),
        ("remo_serv_commands_running{kind=\"interactive\"}", 1.0),
        ("remo_serv_commands_running{kind=\"cmd\"}", 0.0),
        ("remo_serv_logins_total{outcome=\"ok\"}", 1.0),
        ("remo_serv_logins_total{outcome=\"refused\"}", 1.0),
        ("remo_serv_refusals_total{reason=\"authorization\"}", 1.0),
        (
            "remo_serv_requests_total{route=\"auth\",status=\"200\"}",
            1.0,
        ),
        (
            "remo_serv_requests_total{route=\"auth\",status=\"403\"}",
            1.0,
        ),
        (
            "remo_serv_requests_total{route=\"cmd\",status=\"200\"}",
            1.0,
        ),
        (
            "remo_serv_requests_total{route=\"icm\",status=\"200\"}",
            1.0,
        ),
        (
            "remo_serv_request_duration_seconds_count{route=\"cmd\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series}\n{text}");
    }
    assert!(
        count(&text, "remo_serv_connections_accepted_total") >= 3.0,
        "{text}"
    );
    assert!(count(&text, "remo_serv_connections_open") >= 1.0, "{text}");
    // No user name or address in any series.
    assert!(
        !text.contains("alice") && !text.contains("127.0.0.1"),
        "{text}"
    );

    // The interactive command ends with its output: no longer running.
    client.iend().await.unwrap();
    let text = testkit::eventually("the interactive command collected", WAIT, || async {
        let text = scrape(metrics).await;
        (value(&text, "remo_serv_commands_running{kind=\"interactive\"}") == Some(0.0))
            .then_some(text)
    })
    .await;
    assert_eq!(value(&text, "remo_serv_sessions"), Some(1.0), "{text}");
}
