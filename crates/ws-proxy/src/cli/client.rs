//! `ws-proxy-client`: a peer of the proxy, in one of two roles.
//!
//! `connect` is the manager side (the original test client's role): HTTP requests on a local
//! port become REST:REQUESTs. `gateway` is the home-gateway side: REST:REQUESTs are performed
//! against a local HTTP service. Both print what else arrives (EVENTs, ...) as one JSON line
//! each, send JSON envelopes typed on stdin, and reconnect with back-off after any close.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use common::cli::Failure;
use common::daemon::{LogArgs, exit};
use common::envelope::micronets::{self, Hello};
use common::tls::{self, ClientTlsFiles};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

use crate::client::front::{self, Front, FrontLimits, FrontListener};
use crate::client::gateway::Gateway;
use crate::client::{ClientError, ConnectOptions, Session, SessionOptions};

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
pub struct Cli {
    #[command(subcommand)]
    pub role: Role,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Role {
    /// Manager side: serve HTTP locally and turn each request into a REST:REQUEST.
    #[command(
        after_help = "Example (the seed's walkthrough):\n  ws-proxy-client connect wss://localhost:5050/micronets/v1/ws-proxy/gw-test/1 \\\n      --cert certs/dev/alice.pkeycert.pem --ca certs/dev/ca.cert.pem\n  curl -s http://127.0.0.1:5001/micronets/v1/gateway/status\n  curl -s -X POST -H 'Content-Type: application/json' -d '{\"a\":1}' http://127.0.0.1:5001/x"
    )]
    Connect {
        #[command(flatten)]
        peer: PeerArgs,
        /// Where the HTTP front end listens: an IP address and port (a host name is not
        /// resolved here), or unix:PATH, a socket in a directory only its owner may enter
        /// (made 0700 if missing; `curl --unix-socket PATH`). Whoever reaches the front end
        /// acts with this client's certificate: a TCP port, even on 127.0.0.1, lets every
        /// local user do so.
        #[arg(long, default_value = "127.0.0.1:5001", value_name = "ADDR:PORT|unix:PATH", value_parser = http_listen)]
        http_listen: HttpListen,
        /// Connections the HTTP front end serves at once; one more evicts the oldest connection not being answered (at any age), or is closed at once.
        #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        http_max_connections: u32,
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
pub struct PeerArgs {
    /// Proxy URL: wss://HOST:PORT/micronets/v1/ws-proxy/ID.
    pub url: String,
    /// Client certificate PEM; may also hold the key (the original's pkeycert: cert then key).
    #[arg(long, alias = "pkeycert", value_name = "PEM")]
    pub cert: PathBuf,
    /// Client key PEM, when it is not in the certificate file.
    #[arg(long, value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// CA bundle the proxy's certificate must chain to.
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// Name to check in the proxy's certificate (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Check the proxy's chain but not its name (Micronets certificates carry none).
    #[arg(long)]
    pub no_hostname_check: bool,
    /// peerClass in our HELLO [default: micronets-ws-test-client, or
    /// micronets-gateway-service for the gateway].
    #[arg(long, value_name = "CLASS")]
    pub peer_class: Option<String>,
    /// peerId in our HELLO.
    #[arg(long, default_value = "12345678", value_name = "ID")]
    pub peer_id: String,
    /// Seconds to wait for the partner's answer (connect) or the upstream (gateway).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub request_timeout: u64,
    /// Largest body in bytes, either way.
    #[arg(long, default_value_t = 768 * 1024, value_name = "BYTES")]
    pub max_body: usize,
    /// Exit on the first close instead of reconnecting.
    #[arg(long)]
    pub once: bool,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub max_backoff: u64,
}

/// Runs the client until it is interrupted, told to `quit`, or (with `--once`) closed.
///
/// # Errors
/// A [`Failure`] with the exit code the command's help lists: 64 bad arguments, 66
/// certificate files unreadable, 69 the proxy or the local listener unavailable, 77 a
/// certificate or the meet-up id refused.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    common::daemon::init_tracing(&cli.log, "info").map_err(Failure::usage)?;
    tls::install_default_provider();
    serve(cli.role).await
}

/// `err` as printed (its own text, without its causes) with the exit code it means.
fn fail(code: u8, err: impl std::fmt::Display) -> Failure {
    Failure::new(code, anyhow::Error::msg(err.to_string()))
}

fn session_options(peer: &PeerArgs, default_class: &str) -> Result<SessionOptions, Failure> {
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

/// Where `connect` serves HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpListen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// `--http-listen`: an IP address and port (with a clear word when it is a host name), or
/// `unix:PATH`.
fn http_listen(value: &str) -> Result<HttpListen, String> {
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(
                "unix: needs a socket path (unix:/run/user/1000/ws-proxy/http.sock)".into(),
            );
        }
        return Ok(HttpListen::Unix(PathBuf::from(path)));
    }
    value.parse().map(HttpListen::Tcp).map_err(|_| {
        format!(
            "{value:?} is not an IP address and port (127.0.0.1:5001, [::1]:5001) or unix:PATH; host names are not resolved here"
        )
    })
}

/// Binds the front end's Unix socket at `path` (mode 0600) in a directory only its owner may
/// enter: made with mode 0700 when missing; an existing one must give group and others no
/// access and belong to whoever owns the socket (us).
///
/// # Errors
/// A message for exit 64 (the directory is open to others) or 69 (binding failed).
fn bind_front_socket(path: &Path) -> Result<tokio::net::UnixListener, Failure> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| {
                fail(
                    exit::UNAVAILABLE,
                    format!("creating {}: {err}", dir.display()),
                )
            })?;
    }
    let meta = std::fs::metadata(dir)
        .map_err(|err| fail(exit::UNAVAILABLE, format!("{}: {err}", dir.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(
            exit::USAGE,
            format!(
                "{} has mode {mode:o}: the HTTP front end's socket must be in a directory only its owner may enter (0700), since whoever reaches it acts with this certificate",
                dir.display()
            ),
        ));
    }
    let listener = common::daemon::bind_unix(path, 0o600).map_err(|err| {
        fail(
            exit::UNAVAILABLE,
            format!("binding {}: {err}", path.display()),
        )
    })?;
    let ours = std::fs::symlink_metadata(path).map(|socket| socket.uid());
    if ours.ok() != Some(meta.uid()) {
        let _ = std::fs::remove_file(path);
        return Err(fail(
            exit::USAGE,
            format!(
                "{} belongs to another user: use a directory of your own",
                dir.display()
            ),
        ));
    }
    Ok(listener)
}

#[allow(clippy::print_stdout, reason = "a CLI: received messages go to stdout")]
async fn serve(role: Role) -> Result<(), Failure> {
    match role {
        Role::Connect {
            peer,
            http_listen,
            http_max_connections,
        } => {
            let options = session_options(&peer, "micronets-ws-test-client")?;
            let request_timeout = Duration::from_secs(peer.request_timeout);
            let (front, outgoing) = Front::new(request_timeout, peer.max_body);
            let listener = match &http_listen {
                HttpListen::Tcp(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|err| fail(exit::UNAVAILABLE, format!("binding {addr}: {err}")))?;
                    let addr = listener
                        .local_addr()
                        .map_err(|err| fail(exit::UNAVAILABLE, err))?;
                    tracing::info!(%addr, "HTTP front end listening (every local user can reach a TCP port and act with this certificate)");
                    FrontListener::Tcp(listener)
                }
                HttpListen::Unix(path) => {
                    let listener = bind_front_socket(path)?;
                    tracing::info!(path = %path.display(), "HTTP front end listening");
                    FrontListener::Unix(listener)
                }
            };
            let mut limits = FrontLimits::for_request_timeout(request_timeout);
            limits.max_connections = usize::try_from(http_max_connections).unwrap_or(usize::MAX);
            let router = front.router();
            let http = async move {
                front::serve(listener, router, limits, common::daemon::Shutdown::new()).await;
                Ok(())
            };
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
            let options = session_options(&peer, "micronets-gateway-service")?;
            let (gateway, outgoing) = Gateway::new(
                &upstream,
                Duration::from_secs(peer.request_timeout),
                peer.max_body,
            )
            .map_err(|err| fail(exit::USAGE, err))?;
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
) -> Result<(), Failure> {
    tokio::select! {
        result = session => match result {
            Ok(()) => Ok(()),
            Err(err) if err.is_refusal() => Err(fail(exit::NOPERM, err)),
            Err(err @ ClientError::Url(_)) => Err(fail(exit::USAGE, err)),
            Err(err) => Err(fail(exit::UNAVAILABLE, err)),
        },
        result = http => Err(fail(exit::UNAVAILABLE, format!("HTTP front end: {}", result.err().map_or_else(String::new, |e| e.to_string())))),
        _ = stdin => Ok(()),
        signal = common::daemon::stop_signal() => {
            tracing::info!(?signal, "stopping");
            Ok(())
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from([&["ws-proxy-client"], args].concat()).expect("arguments parse")
    }

    #[test]
    fn connect_has_the_original_defaults() {
        let cli = parse(&[
            "connect",
            "wss://h:5050/micronets/v1/ws-proxy/x",
            "--pkeycert",
            "c.pem",
            "--ca",
            "ca.pem",
        ]);
        let Role::Connect {
            peer,
            http_listen,
            http_max_connections,
        } = cli.role
        else {
            panic!("not connect");
        };
        assert_eq!(
            http_listen,
            HttpListen::Tcp(SocketAddr::from(([127, 0, 0, 1], 5001)))
        );
        assert_eq!(http_max_connections, 64);
        assert_eq!(peer.cert, PathBuf::from("c.pem"));
        assert_eq!(peer.peer_id, "12345678");
        assert_eq!(peer.request_timeout, 30);
        assert!(!peer.once);
    }

    #[test]
    fn http_listen_takes_an_ip_address_and_says_so_for_a_name() {
        let args = [
            "ws-proxy-client",
            "connect",
            "wss://h/x",
            "--pkeycert",
            "c.pem",
            "--ca",
            "ca.pem",
            "--http-listen",
            "localhost:5001",
        ];
        let err = Cli::try_parse_from(args).unwrap_err().to_string();
        assert!(err.contains("host names are not resolved here"), "{err}");
    }

    #[test]
    fn unreadable_certificates_exit_66() {
        tls::install_default_provider();
        let dir = std::env::temp_dir().join("ws-proxy-cli-test-absent");
        let absent = dir.join("absent.pem").display().to_string();
        let cli = parse(&[
            "gateway",
            "wss://h/x",
            "--cert",
            &absent,
            "--ca",
            &absent,
            "--upstream",
            "http://127.0.0.1:1",
        ]);
        let Role::Gateway { peer, .. } = cli.role else {
            panic!("not gateway");
        };
        let code = session_options(&peer, "g")
            .err()
            .map(|failure| failure.code());
        assert_eq!(code, Some(exit::NOINPUT));
    }

    #[test]
    fn http_listen_takes_a_unix_socket() {
        assert_eq!(
            http_listen("unix:/run/x/http.sock"),
            Ok(HttpListen::Unix(PathBuf::from("/run/x/http.sock")))
        );
        assert!(http_listen("unix:").is_err());
    }

    /// Attack pass F5: the front end's socket goes in a directory only its owner may enter.
    #[tokio::test]
    async fn the_front_socket_needs_a_private_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        // Missing: made 0700.
        let private = dir.path().join("private");
        let _listener = bind_front_socket(&private.join("http.sock")).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Open to others: refused (64).
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let code = bind_front_socket(&open.join("http.sock"))
            .err()
            .map(|failure| failure.code());
        assert_eq!(code, Some(exit::USAGE));
        assert!(!open.join("http.sock").exists());
    }
}
