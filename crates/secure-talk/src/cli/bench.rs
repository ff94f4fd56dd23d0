//! `secure-talk-bench`, the load generator for `scripts/bench secure-talk`: text echo round
//! trips from N clients (or the raw-echo floor the same runtime reaches).
#![allow(clippy::print_stdout)] // the result line goes to stdout

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{ClientOptions, Connection, Transport};
use crate::hub::Channel;
use anyhow::Context as _;
use clap::Parser;
use common::tls::ClientTlsFiles;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};

/// Measures `text` echo round trips against a running secure-talk server.
///
/// Each client fetches its own token, opens the admin channel and keeps `--window` echo
/// requests in flight for the whole run; the result (one JSON line) gives the messages per
/// second over all clients and the round-trip latency percentiles, measured after the warm-up.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Unix socket of the server (plain WS); otherwise TLS to --host/--port.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(long, default_value_t = 8445)]
    port: u16,
    /// Name expected in the server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA bundle (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Payload length in bytes.
    #[arg(long, default_value_t = 16)]
    payload: usize,
    /// Label copied into the result.
    #[arg(long, default_value = "")]
    label: String,
    /// Use the full websocket client library for each message instead of pre-built frames
    /// written straight to the socket (the default keeps the load generator's own cost low,
    /// so the server is what is measured).
    #[arg(long)]
    library_client: bool,
    /// Instead of measuring: serve a raw echo (no HTTP, no websocket, no TLS) on this Unix
    /// socket (or `tcp:ADDR`), the floor the same runtime and sockets reach on this machine.
    #[arg(long, value_name = "PATH", conflicts_with = "floor")]
    floor_serve: Option<PathBuf>,
    /// Measure the raw echo served by --floor-serve at PATH (same clients, window, payload).
    #[arg(long, value_name = "PATH")]
    floor: Option<PathBuf>,
}

struct ClientResult {
    messages: u64,
    latencies_us: Vec<u32>,
}

/// One client's requests in flight, oldest first, and what it measured of their round trips
/// (every client kind shares it).
struct Window {
    /// Requests kept in flight.
    size: usize,
    sent: std::collections::VecDeque<Instant>,
    measure_from: Instant,
    end: Instant,
    result: ClientResult,
}

impl Window {
    fn new(size: usize, measure_from: Instant, end: Instant) -> Self {
        Self {
            size,
            sent: std::collections::VecDeque::with_capacity(size),
            measure_from,
            end,
            result: ClientResult {
                messages: 0,
                latencies_us: Vec::with_capacity(1 << 16),
            },
        }
    }

    /// A request went out now.
    fn sent(&mut self) {
        self.sent.push_back(Instant::now());
    }

    /// The reply to the oldest request came now: its round trip counts when it falls in the
    /// measured span. True once the run is over (send no more; collect what is in flight).
    ///
    /// # Errors
    /// No request was waiting for a reply.
    fn replied(&mut self) -> anyhow::Result<bool> {
        let now = Instant::now();
        let Some(at) = self.sent.pop_front() else {
            anyhow::bail!("a reply nobody asked for");
        };
        if at >= self.measure_from && now <= self.end {
            self.result.messages += 1;
            let us = now.duration_since(at).as_micros();
            self.result
                .latencies_us
                .push(u32::try_from(us).unwrap_or(u32::MAX));
        }
        Ok(now >= self.end)
    }

    /// Requests still waiting for their reply.
    fn in_flight(&self) -> usize {
        self.sent.len()
    }
}

/// Serves the floor (`--floor-serve`) or measures and prints one JSON result line.
///
/// # Errors
/// The TLS files do not load, a client cannot connect, or a client task failed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    common::tls::install_default_provider();
    if let Some(path) = &args.floor_serve {
        return floor_serve(path).await;
    }
    let transport = match (&args.unix, &args.floor) {
        (Some(path), _) | (None, Some(path)) => Transport::Unix(path.clone()),
        (None, None) => {
            let files = ClientTlsFiles {
                ca: args.ca.clone(),
                cert: args.cert.clone(),
                key: args.key.clone(),
                ..ClientTlsFiles::default()
            };
            Transport::Tls {
                host: args.host.clone(),
                port: args.port,
                server_name: args.server_name.clone(),
                config: Arc::new(common::tls::client_config(&files).context("tls files")?),
            }
        }
    };
    let mut options = ClientOptions::new(transport);
    options.token_file = None;
    let payload = "x".repeat(args.payload);
    let message = format!(r#"{{"headers":{{"method":"text"}},"payload":"{payload}"}}"#);
    let window = args.window.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let (measure_from, end);
    if let Some(path) = &args.floor {
        let mut streams: Vec<RawStream> = Vec::with_capacity(args.clients);
        for _ in 0..args.clients {
            streams.push(match tcp_address(path) {
                Some(addr) => {
                    let tcp = TcpStream::connect(addr).await.context("connecting")?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
                None => Box::new(UnixStream::connect(path).await.context("connecting")?),
            });
        }
        measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
        end = measure_from + Duration::from_secs_f64(args.duration);
        for stream in streams {
            let message = message.clone();
            tasks
                .spawn(async move { raw_client(stream, message, window, measure_from, end).await });
        }
    } else {
        let mut conns = Vec::with_capacity(args.clients);
        for _ in 0..args.clients {
            conns.push(
                crate::client::connect(&options, Channel::Admin)
                    .await
                    .context("connecting")?,
            );
        }
        measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
        end = measure_from + Duration::from_secs_f64(args.duration);
        let lean = !args.library_client;
        for conn in conns {
            let message = message.clone();
            if lean {
                tasks.spawn(async move {
                    lean_client(conn.into_stream(), message, window, measure_from, end).await
                });
            } else {
                tasks.spawn(async move { client(conn, message, window, measure_from, end).await });
            }
        }
    }
    let mut messages = 0u64;
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let result = result.context("client task")??;
        messages += result.messages;
        latencies.extend(result.latencies_us);
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index.min(latencies.len() - 1)]
    };
    let secs = args.duration;
    let line = serde_json::json!({
        "label": args.label,
        "transport": if args.floor.as_deref().and_then(tcp_address).is_some() { "raw-tcp" } else if args.floor.is_some() { "raw-unix" } else if args.unix.is_some() { "unix" } else { "tls" },
        "clients": args.clients,
        "window": args.window,
        "payload": args.payload,
        "messages": messages,
        "secs": secs,
        "msgs_per_sec": (messages as f64 / secs).round(),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
    });
    println!("{line}");
    Ok(())
}

async fn client(
    mut conn: Connection,
    message: String,
    window: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<ClientResult> {
    let mut window = Window::new(window, measure_from, end);
    for _ in 0..window.size {
        conn.feed_text(message.clone()).await?;
        window.sent();
    }
    conn.flush().await?;
    loop {
        let Some(_reply) = conn.recv_frame().await? else {
            anyhow::bail!("the server closed the connection");
        };
        if window.replied()? {
            // Collect the replies still in flight, then stop.
            for _ in 0..window.in_flight() {
                if conn.recv_frame().await?.is_none() {
                    break;
                }
            }
            let _ = conn.close().await;
            return Ok(window.result);
        }
        conn.send_text(message.clone()).await?;
        window.sent();
    }
}

/// Either kind of raw stream.
type RawStream = Box<dyn RawIo>;
trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

/// `tcp:ADDR` as an address.
fn tcp_address(path: &std::path::Path) -> Option<std::net::SocketAddr> {
    path.to_str()?.strip_prefix("tcp:")?.parse().ok()
}

/// Serves a raw echo: every read is written back as is.
async fn floor_serve(path: &std::path::Path) -> anyhow::Result<()> {
    let tcp = match tcp_address(path) {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .context("binding")?,
        ),
        None => None,
    };
    let unix = match tcp {
        Some(_) => None,
        None => {
            let _ = std::fs::remove_file(path);
            Some(tokio::net::UnixListener::bind(path).context("binding")?)
        }
    };
    loop {
        let mut stream: RawStream = match (&tcp, &unix) {
            (Some(tcp), _) => {
                let (stream, _) = tcp.accept().await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            (None, Some(unix)) => Box::new(unix.accept().await?.0),
            (None, None) => anyhow::bail!("nothing to serve"),
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// The raw echo's client: fixed-size messages, `window` in flight.
async fn raw_client(
    mut stream: RawStream,
    message: String,
    window: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<ClientResult> {
    let size = message.len();
    let mut window = Window::new(window, measure_from, end);
    for _ in 0..window.size {
        stream.write_all(message.as_bytes()).await?;
        window.sent();
    }
    let mut buf = vec![0u8; size];
    loop {
        stream.read_exact(&mut buf).await?;
        if window.replied()? {
            for _ in 0..window.in_flight() {
                stream.read_exact(&mut buf).await?;
            }
            return Ok(window.result);
        }
        stream.write_all(message.as_bytes()).await?;
        window.sent();
    }
}

/// A masked text frame of `payload` (fixed mask: fine for a load generator).
fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81u8];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Length of the server's unmasked text frame carrying `len` payload bytes.
fn reply_len(len: usize) -> usize {
    match len {
        0..=125 => 2 + len,
        126..=65535 => 4 + len,
        _ => 10 + len,
    }
}

/// Echo client writing pre-built frames and reading fixed-size replies.
async fn lean_client(
    mut stream: crate::client::Stream,
    message: String,
    window: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<ClientResult> {
    let frame = masked_frame(message.as_bytes());
    let mut buf = vec![0u8; reply_len(message.len())];
    let mut window = Window::new(window, measure_from, end);
    let mut burst = Vec::with_capacity(frame.len() * window.size);
    for _ in 0..window.size {
        burst.extend_from_slice(&frame);
        window.sent();
    }
    stream.write_all(&burst).await?;
    stream.flush().await?;
    loop {
        stream.read_exact(&mut buf).await?;
        if buf.first() != Some(&0x81) {
            anyhow::bail!(
                "unexpected frame from the server (opcode byte {:#x})",
                buf[0]
            );
        }
        if window.replied()? {
            for _ in 0..window.in_flight() {
                stream.read_exact(&mut buf).await?;
            }
            return Ok(window.result);
        }
        stream.write_all(&frame).await?;
        stream.flush().await?;
        window.sent();
    }
}
