//! `ws-proxy-client`: a peer of the proxy, in one of two roles.
//!
//! `connect` is the manager side (the original test client's role): HTTP requests on a local
//! port become REST:REQUESTs. `gateway` is the home-gateway side: REST:REQUESTs are performed
//! against a local HTTP service. Both print what else arrives (EVENTs, ...) as one JSON line
//! each, send JSON envelopes typed on stdin, and reconnect with back-off after any close.
#![expect(clippy::print_stdout, reason = "a CLI: received messages go to stdout")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use common::daemon::{LogArgs, exit};
use common::envelope::micronets::{self, Hello};
use common::tls::{self, ClientTlsFiles};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;
use ws_proxy::client::front::Front;
use ws_proxy::client::gateway::Gateway;
use ws_proxy::client::{ClientError, ConnectOptions, Session, SessionOptions};

/// A peer of the Micronets websocket proxy.
///
/// Both roles connect to URL (wss://HOST:PORT/micronets/v1/ws-proxy/ID) with a client
/// certificate, send a HELLO, wait for the partner's HELLO, then work until interrupted,
/// reconnecting with jittered back-off after any close. Messages that are not requests or
/// responses (EVENTs, CONN:INFO) are printed on stdout, one JSON text per line; lines typed on
/// stdin must be JSON envelopes ({"message": {...}}) and are sent as they are; `quit` exits.
///
/// Exit codes: 0 interrupted or `quit`, 64 bad arguments, 66 certificate files unreadable,
/// 69 the proxy is unreachable (with --once), 77 a certificate is refused (ours by the proxy,
/// or the proxy's by us) or the proxy refuses the id (HTTP 400, 403, 404, 409).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    role: Role,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Manager side: serve HTTP locally and turn each request into a REST:REQUEST.
    #[command(
        after_help = "Example (the seed's walkthrough):\n  ws-proxy-client connect wss://localhost:5050/micronets/v1/ws-proxy/gw-test/1 \\\n      --cert certs/dev/alice.pkeycert.pem --ca certs/dev/ca.cert.pem\n  curl -s http://127.0.0.1:5001/micronets/v1/gateway/status\n  curl -s -X POST -H 'Content-Type: application/json' -d '{\"a\":1}' http://127.0.0.1:5001/x"
    )]
    Connect {
        #[command(flatten)]
        peer: PeerArgs,
        /// Where the HTTP front end listens.
        #[arg(long, default_value = "127.0.0.1:5001", value_name = "ADDR:PORT")]
        http_listen: SocketAddr,
    },
    /// Gateway side: answer REST:REQUESTs from an upstream HTTP service.
    #[command(
        after_help = "Example:\n  ws-proxy-client gateway wss://localhost:5050/micronets/v1/ws-proxy/gw-test/1 \\\n      --cert certs/dev/bob.pkeycert.pem --ca certs/dev/ca.cert.pem --upstream http://127.0.0.1:8080"
    )]
    Gateway {
        #[command(flatten)]
        peer: PeerArgs,
        /// Base URL of the local HTTP service (http:// only).
        #[arg(long, value_name = "URL")]
        upstream: String,
    },
}

#[derive(Debug, Args)]
struct PeerArgs {
    /// Proxy URL: wss://HOST:PORT/micronets/v1/ws-proxy/ID.
    url: String,
    /// Client certificate PEM; may also hold the key (the original's pkeycert: cert then key).
    #[arg(long, alias = "pkeycert", value_name = "PEM")]
    cert: PathBuf,
    /// Client key PEM, when it is not in the certificate file.
    #[arg(long, value_name = "PEM")]
    key: Option<PathBuf>,
    /// CA bundle the proxy's certificate must chain to.
    #[arg(long, value_name = "PEM")]
    ca: PathBuf,
    /// Name to check in the proxy's certificate (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Check the proxy's chain but not its name (Micronets certificates carry none).
    #[arg(long)]
    no_hostname_check: bool,
    /// peerClass in our HELLO [default: micronets-ws-test-client, or
    /// micronets-gateway-service for the gateway].
    #[arg(long, value_name = "CLASS")]
    peer_class: Option<String>,
    /// peerId in our HELLO.
    #[arg(long, default_value = "12345678", value_name = "ID")]
    peer_id: String,
    /// Seconds to wait for the partner's answer (connect) or the upstream (gateway).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    request_timeout: u64,
    /// Largest body in bytes, either way.
    #[arg(long, default_value_t = 768 * 1024, value_name = "BYTES")]
    max_body: usize,
    /// Exit on the first close instead of reconnecting.
    #[arg(long)]
    once: bool,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    max_backoff: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = common::daemon::init_tracing(&cli.log, "info") {
        eprintln!("ws-proxy-client: {err:#}");
        return ExitCode::from(exit::USAGE);
    }
    tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ws-proxy-client: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = runtime.block_on(run(cli.role));
    // stdin's reader thread may be blocked in a read; do not wait for it.
    runtime.shutdown_background();
    code
}

fn fail(code: u8, err: impl std::fmt::Display) -> ExitCode {
    eprintln!("ws-proxy-client: {err}");
    ExitCode::from(code)
}

fn session_options(peer: &PeerArgs, default_class: &str) -> Result<SessionOptions, ExitCode> {
    let files = ClientTlsFiles {
        ca: Some(peer.ca.clone()),
        cert: Some(peer.cert.clone()),
        key: peer.key.clone(),
        alpn: Vec::new(),
        skip_hostname_check: peer.no_hostname_check,
    };
    let config = tls::client_config(&files).map_err(|e| fail(exit::NOINPUT, e))?;
    let mut connect =
        ConnectOptions::new(&peer.url, Arc::new(config)).map_err(|e| fail(exit::USAGE, e))?;
    connect.server_name.clone_from(&peer.server_name);
    Ok(SessionOptions {
        connect,
        hello: Hello::new(
            0,
            peer.peer_class.as_deref().unwrap_or(default_class),
            peer.peer_id.clone(),
        ),
        reconnect: !peer.once,
        max_backoff: Duration::from_secs(peer.max_backoff.max(1)),
    })
}

async fn run(role: Role) -> ExitCode {
    match role {
        Role::Connect { peer, http_listen } => {
            let options = match session_options(&peer, "micronets-ws-test-client") {
                Ok(options) => options,
                Err(code) => return code,
            };
            let (front, outgoing) =
                Front::new(Duration::from_secs(peer.request_timeout), peer.max_body);
            let listener = match tokio::net::TcpListener::bind(http_listen).await {
                Ok(listener) => listener,
                Err(err) => {
                    return fail(exit::UNAVAILABLE, format!("binding {http_listen}: {err}"));
                }
            };
            match listener.local_addr() {
                Ok(addr) => tracing::info!(%addr, "HTTP front end listening"),
                Err(err) => return fail(exit::UNAVAILABLE, err),
            }
            let router = front.router();
            let http = async move { axum::serve(listener, router).await };
            let stdin = stdin_lines(front.sender());
            let printer = front.clone();
            let session = Session::run(options, outgoing, move |event| {
                if let Some(line) = printer.on_event(event) {
                    println!("{line}");
                }
            });
            finish(session, http, stdin).await
        }
        Role::Gateway { peer, upstream } => {
            let options = match session_options(&peer, "micronets-gateway-service") {
                Ok(options) => options,
                Err(code) => return code,
            };
            let (gateway, outgoing) = match Gateway::new(
                &upstream,
                Duration::from_secs(peer.request_timeout),
                peer.max_body,
            ) {
                Ok(made) => made,
                Err(err) => return fail(exit::USAGE, err),
            };
            let stdin = stdin_lines(gateway.sender());
            let handler = gateway.clone();
            let session = Session::run(options, outgoing, move |event| {
                if let Some(line) = handler.on_event(event) {
                    println!("{line}");
                }
            });
            finish(session, std::future::pending(), stdin).await
        }
    }
}

async fn finish(
    session: impl std::future::Future<Output = Result<(), ClientError>>,
    http: impl std::future::Future<Output = std::io::Result<()>>,
    stdin: tokio::task::JoinHandle<()>,
) -> ExitCode {
    tokio::select! {
        result = session => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) if err.is_refusal() => fail(exit::NOPERM, err),
            Err(err @ ClientError::Url(_)) => fail(exit::USAGE, err),
            Err(err) => fail(exit::UNAVAILABLE, err),
        },
        result = http => fail(exit::UNAVAILABLE, format!("HTTP front end: {}", result.err().map_or_else(String::new, |e| e.to_string()))),
        _ = stdin => ExitCode::SUCCESS,
        signal = common::daemon::stop_signal() => {
            tracing::info!(?signal, "stopping");
            ExitCode::SUCCESS
        }
    }
}

/// Reads stdin lines; envelopes go to the partner, `quit` ends the task (and the program).
/// At end of input the task just stops reading, the client keeps running.
fn stdin_lines(out: mpsc::Sender<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => return std::future::pending().await,
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line == "quit" {
                return;
            }
            match micronets::parse(line) {
                Ok(_) => {
                    if out.send(line.to_owned()).await.is_err() {
                        return;
                    }
                }
                Err(err) => eprintln!("not sent: {err} (expected {{\"message\": {{...}}}})"),
            }
        }
    })
}
