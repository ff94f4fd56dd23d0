//! `signing-bench`: the load generator behind `scripts/bench signing-server`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use common::tls::ClientTlsFiles;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// Measures signing: small uploads over one or more kept-alive HTTPS connections, a
/// server-side path, and SHAKE256 alone (the bound for pure Ed448 over large files).
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Conn {
    /// Server port.
    #[arg(long, default_value_t = 6000)]
    port: u16,
    /// CA bundle.
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate.
    #[arg(long)]
    cert: PathBuf,
    /// Client key.
    #[arg(long)]
    key: PathBuf,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// POST /v1/sign of a small body, `--connections` kept-alive connections in parallel.
    Small {
        #[command(flatten)]
        conn: Conn,
        /// Body size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Parallel connections.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// POST /v1/sign-path for one server-side file; reports MB/s.
    Path {
        #[command(flatten)]
        conn: Conn,
        /// Absolute path on the server.
        path: String,
    },
    /// Signs a small message in-process: the signer's own CPU cost, and the library's.
    Cpu {
        /// Message size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Signatures per measurement.
        #[arg(long, default_value_t = 2000)]
        count: u32,
    },
    /// SHAKE256 over a file, one pass, the signer's chunk size: the bound for pure Ed448.
    Shake {
        /// The file.
        file: PathBuf,
    },
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn open(conn: &Conn) -> anyhow::Result<Sender> {
    let files = ClientTlsFiles {
        ca: Some(conn.ca.clone()),
        cert: Some(conn.cert.clone()),
        key: Some(conn.key.clone()),
        alpn: vec![b"http/1.1".to_vec()],
        ..ClientTlsFiles::default()
    };
    let config = Arc::new(common::tls::client_config(&files)?);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", conn.port)).await?;
    tcp.set_nodelay(true)?;
    let tls = common::tls::connect(config, "localhost", tcp, Duration::from_secs(10)).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn post(
    sender: &mut Sender,
    uri: &str,
    body: Bytes,
) -> anyhow::Result<(u16, serde_json::Value)> {
    sender.ready().await?;
    let request = hyper::Request::post(uri)
        .header(hyper::header::HOST, "localhost")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// Runs the measurement `args` names and prints its result as one JSON line.
///
/// # Errors
/// Cannot connect, a request failed, a file cannot be read.
#[allow(clippy::print_stdout)] // the result lines go to stdout
pub async fn run(args: Args) -> anyhow::Result<()> {
    common::tls::install_default_provider();
    match args.command {
        Command::Small {
            conn,
            size,
            connections,
            duration,
        } => {
            let body = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let mut senders = Vec::new();
            for _ in 0..connections {
                senders.push(open(&conn).await.context("connecting")?);
            }
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(duration);
            let mut tasks = tokio::task::JoinSet::new();
            for (i, mut sender) in senders.into_iter().enumerate() {
                let body = body.clone();
                tasks.spawn(async move {
                    let mut done = 0u64;
                    let mut latencies = Vec::new();
                    while Instant::now() < end {
                        let at = Instant::now();
                        let (status, answer) = post(
                            &mut sender,
                            &format!("/v1/sign?name=bench-{i}-{done}.bin"),
                            body.clone(),
                        )
                        .await?;
                        anyhow::ensure!(status == 200, "status {status}: {answer}");
                        latencies.push(at.elapsed().as_micros() as u64);
                        done += 1;
                    }
                    Ok::<_, anyhow::Error>((done, latencies))
                });
            }
            let mut total = 0;
            let mut latencies = Vec::new();
            while let Some(result) = tasks.join_next().await {
                let (done, mut l) = result??;
                total += done;
                latencies.append(&mut l);
            }
            let secs = start.elapsed().as_secs_f64();
            latencies.sort_unstable();
            let pct = |p: f64| {
                latencies
                    .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
                    .copied()
                    .unwrap_or(0)
            };
            println!(
                "{}",
                serde_json::json!({
                    "kind": "small", "size": size, "connections": connections,
                    "signatures": total, "secs": secs,
                    "per_sec": (total as f64 / secs).round(),
                    "p50_us": pct(0.5), "p99_us": pct(0.99),
                })
            );
        }
        Command::Path { conn, path } => {
            let mut sender = open(&conn).await?;
            let body = Bytes::from(serde_json::json!({ "path": path }).to_string());
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let start = Instant::now();
            let (status, answer) = post(&mut sender, "/v1/sign-path", body).await?;
            let secs = start.elapsed().as_secs_f64();
            anyhow::ensure!(status == 200, "status {status}: {answer}");
            println!(
                "{}",
                serde_json::json!({
                    "kind": "path", "bytes": size, "secs": secs,
                    "mb_per_s": (size as f64 / secs / 1e6).round(),
                })
            );
        }
        Command::Cpu { size, count } => {
            let key = crate::ed448::Ed448Key::generate();
            let message: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let start = Instant::now();
            for _ in 0..count {
                let _ = key.sign_stream(|| Ok(&message[..]), sha2::Sha256::default)?;
            }
            let ours = start.elapsed().as_secs_f64() / f64::from(count);
            let start = Instant::now();
            for _ in 0..count {
                let _ = key.sign(&message);
            }
            let library = start.elapsed().as_secs_f64() / f64::from(count);
            println!(
                "{}",
                serde_json::json!({
                    "kind": "cpu", "size": size,
                    "sign_us": (ours * 1e6).round(), "library_sign_us": (library * 1e6).round(),
                    "per_sec_per_core": (1.0 / ours).round(),
                })
            );
        }
        Command::Shake { file } => {
            use ed448_goldilocks::shake::Shake256;
            use ed448_goldilocks::shake::digest::{
                ExtendableOutput as _, Update as _, XofReader as _,
            };
            use std::io::Read as _;
            let start = Instant::now();
            let mut reader = std::fs::File::open(&file)?;
            let mut hasher = Shake256::default();
            let mut buf = vec![0u8; crate::ed448::CHUNK];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            let mut out = [0u8; 114];
            hasher.finalize_xof().read(&mut out);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "kind": "shake256", "bytes": total, "secs": secs,
                    "mb_per_s": (total as f64 / secs / 1e6).round(),
                })
            );
        }
    }
    Ok(())
}
