//! The load generator behind `broker-bench` and `scripts/bench broker`: saves per second, and
//! verify and load latency, over the daemon's Unix socket with the real client library; and,
//! for comparison, what the original paid per call (starting a Python interpreter).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;

use crate::api::JobType;
use crate::client::Client;

/// Measures a running broker; prints one JSON line per measure.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// The daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Saves issued in the throughput measure (the port range and max_jobs_per_user must
    /// hold them).
    #[arg(long, default_value_t = 4000)]
    saves: usize,
    /// Concurrent clients issuing saves.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Sequential verify and load requests timed for the latency measures.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Label printed in each line (e.g. sqlite or postgres).
    #[arg(long, default_value = "")]
    store: String,
    /// Also time `python3 -c pass` starts, the floor of the original's per-call cost.
    #[arg(long)]
    python_baseline: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

#[allow(clippy::print_stdout)] // the result lines go to stdout
fn latency_line(store: &str, what: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "store": store,
            "measure": what,
            "n": samples.len(),
            "p50_us": percentile(&samples, 0.50),
            "p99_us": percentile(&samples, 0.99),
            "max_us": percentile(&samples, 1.0),
        })
    );
}

/// Measures the broker on `args.socket`, printing one JSON line per measure; the saves it made
/// are deleted again, so runs can repeat on one daemon.
///
/// # Errors
/// The broker is unreachable or refused a request, a verify said false, python3 failed.
#[allow(clippy::print_stdout)] // the result lines go to stdout
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut client = Client::unix(&args.socket);
    client.whoami().await.context("broker not reachable")?;

    // Throughput: `clients` tasks share `saves` saves.
    let per_client = args.saves / args.clients.max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let socket = args.socket.clone();
            tokio::spawn(async move {
                let mut client = Client::unix(&socket);
                let mut ids = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    ids.push(client.save_type(JobType::Ssh, None).await?.summary.id);
                }
                Ok::<_, crate::client::ClientError>(ids)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await??);
    }
    let elapsed = started.elapsed();
    #[allow(clippy::cast_precision_loss)]
    let rate = ids.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "store": args.store,
            "measure": "save",
            "n": ids.len(),
            "clients": args.clients,
            "per_sec": rate,
        })
    );

    // Latency: one client, sequential, on one live job.
    let job = client.save_type(JobType::Ssh, None).await?;
    let secret = job.secret.clone().unwrap_or_default();
    for _ in 0..200 {
        client.verify(&job.summary.id, &secret).await?;
    }
    let mut samples = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let t = Instant::now();
        let valid = client.verify(&job.summary.id, &secret).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(valid, "verify said false");
    }
    latency_line(&args.store, "verify", samples);
    let mut samples = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let t = Instant::now();
        client.load(&job.summary.id).await?;
        samples.push(t.elapsed());
    }
    latency_line(&args.store, "load", samples);

    // Clean up, so runs can repeat on one daemon.
    ids.push(job.summary.id);
    for id in &ids {
        client.delete(id).await?;
    }

    if args.python_baseline {
        let mut samples = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            let status = tokio::process::Command::new("python3")
                .args(["-c", "import json, os"])
                .status()
                .await?;
            samples.push(t.elapsed());
            anyhow::ensure!(status.success(), "python3 failed");
        }
        latency_line("", "python3_start", samples);
    }
    Ok(())
}
