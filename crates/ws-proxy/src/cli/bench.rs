//! `ws-proxy-bench`: a native load generator for ws-proxy (used by `scripts/bench`).
//!
//! `pairs` drives K pairs of peers through the proxy: one side of each pair sends ~200-byte
//! JSON messages, the other echoes them, and the sender measures each round trip. It reports
//! relayed messages per second (two per round trip) and the p50/p99 round-trip latency.
//! `idle` opens N connections that say HELLO and then only answer pings, and reports the
//! proxy's resident memory per connection, read from /proc/PID/status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use common::envelope::micronets::Hello;
use common::tls::{self, ClientTlsFiles};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, ConnectOptions, PeerStream};

/// Load generator for ws-proxy.
#[derive(Debug, Parser)]
#[command(name = "ws-proxy-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Target {
    /// URL prefix of the meet-up ids, e.g. wss://localhost:5050/micronets/v1/ws-proxy/bench.
    #[arg(long)]
    pub base: String,
    /// Client certificate (or pkeycert).
    #[arg(long)]
    pub cert: PathBuf,
    /// Client key, if not in the certificate file.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// CA bundle for the proxy's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Worker threads of the generator's runtime (0: one current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ping-pong through K pairs; prints one JSON line of results.
    Pairs {
        #[command(flatten)]
        target: Target,
        /// Number of pairs.
        #[arg(long, default_value_t = 1)]
        pairs: usize,
        /// Messages in flight per pair (1: strict ping-pong).
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Seconds of warm-up, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds measured.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Open N idle connections and report the proxy's RSS per connection.
    Idle {
        #[command(flatten)]
        target: Target,
        /// Number of connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// The proxy's process id (for /proc/PID/status).
        #[arg(long)]
        pid: u32,
        /// Connections opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

impl Cli {
    /// Worker threads of the generator's runtime (`--threads`; 0: one current-thread runtime).
    #[must_use]
    pub fn threads(&self) -> usize {
        match &self.command {
            Command::Pairs { target, .. } | Command::Idle { target, .. } => target.threads,
        }
    }
}

fn options(target: &Target, id: &str) -> anyhow::Result<ConnectOptions> {
    let config = tls::client_config(&ClientTlsFiles {
        ca: Some(target.ca.clone()),
        cert: Some(target.cert.clone()),
        key: target.key.clone(),
        ..ClientTlsFiles::default()
    })?;
    let mut options = ConnectOptions::new(
        &format!("{}/{id}", target.base.trim_end_matches('/')),
        Arc::new(config),
    )?;
    options.connect_timeout = Duration::from_secs(30);
    Ok(options)
}

/// Runs one benchmark and prints its results as one JSON line.
///
/// # Errors
/// The certificates do not load, a peer cannot connect or pair, the proxy's process is not
/// readable.
pub async fn run(command: Command) -> anyhow::Result<()> {
    tls::install_default_provider();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match command {
        Command::Pairs {
            target,
            pairs,
            window,
            size,
            warmup,
            seconds,
        } => run_pairs(&target, pairs, window.max(1), size, warmup, seconds).await,
        Command::Idle {
            target,
            connections,
            pid,
            concurrency,
        } => run_idle(&target, connections, pid, concurrency).await,
    }
}

async fn pair(target: &Target, id: &str) -> anyhow::Result<(PeerStream, PeerStream)> {
    let options = options(target, id)?;
    let (a, b) = tokio::join!(client::connect(&options), client::connect(&options));
    let (mut a, mut b) = (a?, b?);
    let (hello_a, hello_b) = (Hello::new(0, "bench", "a"), Hello::new(0, "bench", "b"));
    let wait = Some(Duration::from_secs(30));
    let (ha, hb) = tokio::join!(
        client::handshake(&mut a, &hello_a, wait),
        client::handshake(&mut b, &hello_b, wait)
    );
    ha?;
    hb?;
    Ok((a, b))
}

fn payload(size: usize) -> String {
    let head = r#"{"message":{"messageId":1,"messageType":"EVENT:BENCH","requiresResponse":false,"dataFormat":"text/plain","messageBody":""#;
    let tail = r#""}}"#;
    let fill = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(fill))
}

#[allow(
    clippy::print_stdout,
    reason = "a benchmark tool: results go to stdout"
)]
async fn run_pairs(
    target: &Target,
    pairs: usize,
    window: usize,
    size: usize,
    warmup: f64,
    seconds: f64,
) -> anyhow::Result<()> {
    let mut peers = Vec::with_capacity(pairs);
    for i in 0..pairs {
        peers.push(
            pair(target, &format!("p{i}"))
                .await
                .with_context(|| format!("pair {i}"))?,
        );
    }
    let text = payload(size);
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for (a, b) in peers {
        let text = text.clone();
        // The echo side.
        tokio::spawn(async move {
            let (mut tx, mut rx) = b.split();
            while let Some(Ok(message)) = rx.next().await {
                if let Message::Text(_) = message {
                    if tx.send(message).await.is_err() {
                        break;
                    }
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = a.split();
            tokio::time::sleep_until(start.into()).await;
            let mut sent = std::collections::VecDeque::with_capacity(window);
            for _ in 0..window {
                sent.push_back(Instant::now());
                tx.feed(Message::text(text.clone())).await?;
            }
            tx.flush().await?;
            let mut rtts = Vec::with_capacity(1 << 16);
            while let Some(message) = rx.next().await {
                if !matches!(message?, Message::Text(_)) {
                    continue;
                }
                let now = Instant::now();
                let Some(at) = sent.pop_front() else { break };
                if at >= measure_from && now <= end {
                    rtts.push(u32::try_from((now - at).as_micros()).unwrap_or(u32::MAX));
                }
                if now >= end {
                    if sent.is_empty() {
                        break;
                    }
                    continue;
                }
                sent.push_back(now);
                tx.send(Message::text(text.clone())).await?;
            }
            let _ = tx.close().await;
            anyhow::Ok(rtts)
        }));
    }
    let mut rtts = Vec::new();
    for task in tasks {
        rtts.extend(task.await??);
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let relayed = rtts.len() as f64 * 2.0 / seconds;
    println!(
        "{}",
        serde_json::json!({
            "pairs": pairs,
            "window": window,
            "size": size,
            "seconds": seconds,
            "round_trips": rtts.len(),
            "relayed_per_sec": relayed.round(),
            "rtt_p50_us": pct(0.50),
            "rtt_p99_us": pct(0.99),
        })
    );
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

#[allow(
    clippy::print_stdout,
    reason = "a benchmark tool: results go to stdout"
)]
async fn run_idle(
    target: &Target,
    connections: usize,
    pid: u32,
    concurrency: usize,
) -> anyhow::Result<()> {
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    for i in 0..connections {
        let options = options(target, &format!("idle/{i}"))?;
        let permit = semaphore.clone().acquire_owned().await?;
        let done = done_tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let opened = async {
                let mut ws = client::connect(&options).await?;
                ws.send(Message::text(
                    common::envelope::micronets::Message::Hello(Hello::new(0, "bench", "idle"))
                        .encode(),
                ))
                .await?;
                anyhow::Ok(ws)
            }
            .await;
            drop(permit);
            let mut ws = match opened {
                Ok(ws) => {
                    let _ = done.send(Ok(()));
                    ws
                }
                Err(err) => {
                    let _ = done.send(Err(err));
                    return;
                }
            };
            // Keep answering the proxy's pings until told to stop.
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    message = ws.next() => if !matches!(message, Some(Ok(_))) { break },
                }
            }
            let _ = ws.close(None).await;
        });
    }
    drop(done_tx);
    let mut opened = 0usize;
    let mut failed = 0usize;
    let mut first_error = None;
    // Each task reports once and then stays alive, so count reports rather than wait for the
    // channel to close.
    while opened + failed < connections {
        let Some(result) = done_rx.recv().await else {
            break;
        };
        match result {
            Ok(()) => opened += 1,
            Err(err) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{err:#}"));
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // Let the proxy settle (HELLOs processed, first pings answered).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per_conn = if opened > 0 {
        (after.saturating_sub(before)) as f64 / opened as f64
    } else {
        0.0
    };
    println!(
        "{}",
        serde_json::json!({
            "connections": opened,
            "failed": failed,
            "first_error": first_error,
            "connect_seconds": (connect_secs * 100.0).round() / 100.0,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "rss_per_connection_kib": (per_conn * 10.0).round() / 10.0,
        })
    );
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn payloads_are_envelopes_of_the_asked_size() {
        for size in [200, 1024] {
            let text = payload(size);
            assert_eq!(text.len(), size);
            assert!(common::envelope::micronets::parse(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn threads_come_from_either_command() {
        let target = ["--base", "wss://h:1/x", "--cert", "c", "--ca", "a"];
        let pairs =
            Cli::try_parse_from([&["bench", "pairs"], &target[..], &["--threads", "3"]].concat());
        assert_eq!(pairs.map(|cli| cli.threads()).ok(), Some(3));
        let idle = Cli::try_parse_from([&["bench", "idle"], &target[..], &["--pid", "1"]].concat());
        assert_eq!(idle.map(|cli| cli.threads()).ok(), Some(1));
    }
}
