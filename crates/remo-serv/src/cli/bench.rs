//! `remo-bench`: latency and throughput of a remo-serv server, measured with the client
//! library.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientConfig};
use crate::keys::{PrivateKey, PublicKey};

/// Measures a remo-serv server with the real client: login and `/cmd` round trips, get and
/// put throughput. Prints one JSON object.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Server public key (PEM).
    #[arg(long, default_value = "remo_serv.pem")]
    server_key: PathBuf,
    /// User name.
    #[arg(long)]
    user: String,
    /// Unencrypted user private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Server URL.
    url: url::Url,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
pub(crate) enum What {
    /// COUNT logins (each a fresh session).
    Login {
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// COUNT sequential `/cmd` round trips of COMMAND after one login.
    Cmd {
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value = "true")]
        command: String,
    },
    /// Download REMOTE to LOCAL.
    Get { remote: String, local: PathBuf },
    /// Upload LOCAL to REMOTE.
    Put { local: PathBuf, remote: String },
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    serde_json::json!({
        "count": samples.len(),
        "median_ms": percentile(&samples, 50.0),
        "p99_ms": percentile(&samples, 99.0),
    })
}

/// Runs the measurement `args` names and prints its result, one JSON object.
///
/// # Errors
/// Cannot read a key, log in or transfer; a command failed.
#[allow(clippy::print_stdout)] // the result goes to stdout
pub async fn run(args: Args) -> anyhow::Result<()> {
    let value = measure(args).await?;
    println!("{value}");
    Ok(())
}

async fn measure(args: Args) -> anyhow::Result<serde_json::Value> {
    let config = ClientConfig {
        url: args.url.clone(),
        user: args.user.clone(),
        ca: None,
        single_token_upload: false,
        timeout: Duration::from_secs(120),
    };
    let key_pem = std::fs::read_to_string(&args.key)?;
    let server_key = PublicKey::read(&args.server_key)?;
    let login = || async {
        let key = PrivateKey::from_pem(&key_pem, None)?;
        anyhow::Ok(Client::login(config.clone(), key, server_key.clone()).await?)
    };
    Ok(match args.what {
        What::Login { count } => {
            let mut samples = Vec::with_capacity(count);
            for _ in 0..count {
                let key = PrivateKey::from_pem(&key_pem, None)?;
                let started = Instant::now();
                let client = Client::login(config.clone(), key, server_key.clone()).await?;
                samples.push(started.elapsed().as_secs_f64() * 1e3);
                drop(client);
            }
            serde_json::json!({ "login": summary(samples) })
        }
        What::Cmd { count, command } => {
            let mut client = login().await?;
            client.exec(&command, b"").await?; // warm-up
            let mut samples = Vec::with_capacity(count);
            for _ in 0..count {
                let started = Instant::now();
                let out = client.exec(&command, b"").await?;
                samples.push(started.elapsed().as_secs_f64() * 1e3);
                anyhow::ensure!(out.exit_status == Some(0), "{command} failed: {out:?}");
            }
            serde_json::json!({ "cmd": summary(samples), "command": command })
        }
        What::Get { remote, local } => {
            let mut client = login().await?;
            let started = Instant::now();
            let bytes = client.get(&remote, &local, |_, _| {}).await?;
            let secs = started.elapsed().as_secs_f64();
            serde_json::json!({ "op": "get", "bytes": bytes, "seconds": secs, "mb_per_s": bytes as f64 / secs / 1e6 })
        }
        What::Put { local, remote } => {
            let mut client = login().await?;
            let started = Instant::now();
            let bytes = client.put(&local, &remote, |_| {}).await?;
            let secs = started.elapsed().as_secs_f64();
            serde_json::json!({ "op": "put", "bytes": bytes, "seconds": secs, "mb_per_s": bytes as f64 / secs / 1e6 })
        }
    })
}
