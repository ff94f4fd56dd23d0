//! `/metrics` on the `broker` daemon's `metrics_listen`: the real binary, driven by the real
//! client over the Unix socket and HTTPS, scraped while it runs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use broker::api::{JobType, SaveRequest};
use broker::client::{Client, Endpoint};
use testkit::metrics::{assert_process_metrics, scrape, value};
use tokio::io::AsyncBufReadExt as _;

const WAIT: Duration = Duration::from_secs(10);

/// The daemon with an HTTPS API mapping only alice, jobs reaped every second and metrics on
/// 127.0.0.1:0: the child, its socket, its HTTPS and metrics addresses.
async fn start(
    dir: &std::path::Path,
) -> (
    tokio::process::Child,
    std::path::PathBuf,
    SocketAddr,
    SocketAddr,
) {
    let pki = testkit::test_pki();
    let low = 21000 + 400 * (rand::random::<u16>() % 27);
    let socket = dir.join("broker.sock");
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nstate_dir = {state:?}\nhost = \"localhost\"\n\
             port_range = [{low}, {high}]\nreap_interval_secs = 1\ndrain_grace_secs = 1\n\
             metrics_listen = \"127.0.0.1:0\"\n\n\
             [https]\nlisten = \"127.0.0.1:0\"\n[https.tls]\ncert = {cert:?}\nkey = {key:?}\n\
             client_ca = {ca:?}\n[https.users]\n\"CN=alice\" = \"alice\"\n",
            state = dir.join("state"),
            high = low + 399,
            cert = pki.server.cert_path,
            key = pki.server.key_path,
            ca = pki.ca_path,
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(crate::support::bin("broker"))
        .arg("-c")
        .arg(&config)
        .args(["--print-address", "--log", "warn"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut https, mut metrics) = (None, None);
    tokio::time::timeout(WAIT, async {
        while https.is_none() || metrics.is_none() {
            let line = lines.next_line().await.unwrap().expect("the broker exited");
            if let Some(addr) = line.strip_prefix("listening on https://") {
                https = addr.parse().ok();
            } else if let Some(addr) = line.strip_prefix("metrics on ") {
                metrics = addr.parse().ok();
            }
        }
    })
    .await
    .expect("the broker prints its https and metrics addresses");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, socket, https.unwrap(), metrics.unwrap())
}

fn count(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_as_the_broker_is_used() {
    common::tls::install_default_provider();
    let pki = testkit::test_pki();
    let dir = tempfile::tempdir().unwrap();
    let (_child, socket, https, metrics) = start(dir.path()).await;

    // Before anything: every family of our own is there at zero, with the process metrics.
    let text = scrape(metrics).await;
    assert_process_metrics(&text);
    assert_eq!(
        value(&text, "broker_jobs_reaped_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(value(&text, "broker_connections_open"), Some(0.0), "{text}");

    // The Unix socket: a save, a wrong and a right verification, a job that expires.
    let mut local = Client::unix(&socket).with_timeout(WAIT);
    let job = local.save_type(JobType::Ssh, None).await.unwrap();
    let secret = job.secret.clone().unwrap();
    assert!(!local.verify(&job.summary.id, "00").await.unwrap());
    assert!(local.verify(&job.summary.id, &secret).await.unwrap());
    local
        .save(&SaveRequest {
            job_type: Some(JobType::Ssl),
            ttl_secs: Some(1),
            label: None,
        })
        .await
        .unwrap();

    // HTTPS: bob's certificate is valid but mapped to nobody (an authorization refusal); a
    // client without a certificate fails its handshake.
    let url = format!("https://localhost:{}", https.port());
    let mut bob = Client::new(
        Endpoint::https(&url, &pki.ca_path, &pki.bob.cert_path, &pki.bob.key_path).unwrap(),
    )
    .with_timeout(WAIT);
    let refused = bob.whoami().await.unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    let no_cert = common::tls::client_config(&common::tls::ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: None,
        key: None,
        alpn: vec![b"http/1.1".to_vec()],
        skip_hostname_check: false,
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    if let Ok(mut tls) =
        common::tls::connect(std::sync::Arc::new(no_cert), "localhost", tcp, WAIT).await
    {
        // TLS 1.3: the server's refusal comes after the client's finished.
        let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0u8; 16]).await;
    }

    let text = testkit::eventually("the reaper and the handshake counted", WAIT, || async {
        let text = scrape(metrics).await;
        (count(&text, "broker_jobs_reaped_total") >= 1.0
            && count(
                &text,
                "broker_tls_handshake_failures_total{reason=\"no_certificate\"}",
            ) >= 1.0)
            .then_some(text)
    })
    .await;
    for (series, expected) in [
        ("broker_jobs_saved_total{type=\"ssh\"}", 1.0),
        ("broker_jobs_saved_total{type=\"ssl\"}", 1.0),
        ("broker_verifies_total{outcome=\"invalid\"}", 1.0),
        ("broker_verifies_total{outcome=\"valid\"}", 1.0),
        ("broker_refusals_total{reason=\"authorization\"}", 1.0),
        ("broker_requests_total{route=\"save\",status=\"201\"}", 2.0),
        (
            "broker_requests_total{route=\"verify\",status=\"200\"}",
            2.0,
        ),
        (
            "broker_requests_total{route=\"whoami\",status=\"403\"}",
            1.0,
        ),
        ("broker_request_duration_seconds_count{route=\"save\"}", 2.0),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series}\n{text}");
    }
    // The local client, bob and the certificate-less one at least.
    assert!(
        count(&text, "broker_connections_accepted_total") >= 3.0,
        "{text}"
    );
    assert!(count(&text, "broker_connections_open") >= 0.0, "{text}");
    // Labels are fixed words: no job id, user or address in any series.
    assert!(!text.contains(&job.summary.id), "{text}");
    assert!(
        !text.contains("alice") && !text.contains("127.0.0.1"),
        "{text}"
    );
}
