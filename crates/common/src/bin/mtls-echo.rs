//! A line-echo server and client over mutual TLS, built only from `common` (`tls`,
//! `admission`, `daemon`).
//!
//! `scripts/demo` uses it to show a TLS round trip between two endpoints with mutual
//! authentication: `serve` prints `listening on ADDR` and echoes one line per connection;
//! `call` sends a line and prints `echo: TEXT from server CN=...`. `serve` runs the daemon glue
//! every daemon uses (`common::daemon::supervise`): systemd notifications, SIGHUP reloads the
//! certificates, SIGTERM drains, so the integration tests exercise that glue in a real process.
#![expect(clippy::print_stdout, reason = "a demo program that reports on stdout")]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use common::admission::{Admission, Limits};
use common::cli::Failure;
use common::daemon::{Shutdown, exit};
use common::tls::{self, ClientAuth, ClientTlsFiles, ServerTls, ServerTlsFiles};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Authenticated connections served at once.
const MAX_CONNECTIONS: usize = 64;

#[derive(Parser)]
#[command(name = "mtls-echo", version)]
struct Args {
    #[command(flatten)]
    log: common::daemon::LogArgs,
    #[command(subcommand)]
    command: Command,
}

/// This end's certificate and key, and the CA the other end must chain to.
#[derive(clap::Args)]
struct Credentials {
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    ca: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until killed.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[command(flatten)]
        creds: Credentials,
        #[arg(long)]
        crl: Vec<PathBuf>,
    },
    /// Send one line and print the answer.
    Call {
        #[arg(long)]
        connect: String,
        #[command(flatten)]
        creds: Credentials,
        #[arg(long, default_value = "hello")]
        message: String,
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
}

fn main() -> ExitCode {
    tls::install_default_provider();
    let Args { log, command } = common::cli::parse(Args::try_parse);
    common::daemon::run_daemon("mtls-echo", &log, || async move {
        let result = run(command)
            .await
            .map_err(|err| Failure::new(exit::UNAVAILABLE, err));
        ExitCode::from(common::cli::conclude("mtls-echo", result))
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { listen, creds, crl } => {
            let server = ServerTls::load(ServerTlsFiles {
                cert: creds.cert,
                key: Some(creds.key),
                client_ca: Some(creds.ca),
                crls: crl,
                client_auth: ClientAuth::Required,
                alpn: Vec::new(),
            })?;
            let server = Arc::new(server);
            let listener = TcpListener::bind(&listen).await.context("binding")?;
            let signals = common::daemon::Signals::install()?;
            println!("listening on {}", listener.local_addr()?);
            let shutdown = Shutdown::new();
            tokio::spawn(serve(listener, server.clone(), shutdown.clone()));
            let reloading = server.clone();
            let drained = common::daemon::supervise(
                signals,
                &shutdown,
                std::time::Duration::from_secs(5),
                "serving",
                move || Ok(reloading.reload()?),
            )
            .await;
            anyhow::ensure!(drained, "connections still open after the grace period");
            Ok(())
        }
        Command::Call {
            connect,
            creds,
            message,
            server_name,
        } => {
            let config = tls::client_config(&ClientTlsFiles {
                ca: Some(creds.ca),
                cert: Some(creds.cert),
                key: Some(creds.key),
                alpn: Vec::new(),
                skip_hostname_check: false,
            })?;
            let tcp = TcpStream::connect(&connect).await.context("connecting")?;
            let mut stream = tls::connect(
                Arc::new(config),
                &server_name,
                tcp,
                tls::DEFAULT_HANDSHAKE_TIMEOUT,
            )
            .await?;
            let server =
                tls::peer_identity(stream.get_ref().1).context("server sent no certificate")?;
            stream.write_all(format!("{message}\n").as_bytes()).await?;
            let mut answer = String::new();
            BufReader::new(stream)
                .read_line(&mut answer)
                .await
                .context("reading the echo")?;
            if answer.is_empty() {
                anyhow::bail!("the server closed the connection: client certificate refused");
            }
            println!("echo: {} from server {server}", answer.trim_end());
            Ok(())
        }
    }
}

/// Accepts through the front door every daemon uses (`common::admission`), which also logs
/// failed handshakes and closed probes the way every daemon does.
async fn serve(listener: TcpListener, server: Arc<ServerTls>, shutdown: Shutdown) {
    let door = Admission::new(
        "mtls-echo",
        Limits::new(MAX_CONNECTIONS, tls::DEFAULT_HANDSHAKE_TIMEOUT),
    );
    let mut backoff = common::daemon::AcceptBackoff::default();
    while let Some((stream, peer)) = backoff.next(&shutdown, || listener.accept()).await {
        let Ok(stranger) = door.stranger(peer) else {
            continue;
        };
        let acceptor = server.acceptor();
        shutdown.spawn(async move {
            let Ok((stream, identity, _slot)) = stranger.accept_tls(&acceptor, stream).await else {
                return;
            };
            let who = identity.map(|id| id.to_string()).unwrap_or_default();
            let (read, mut write) = tokio::io::split(stream);
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_ok() {
                let reply = format!("{} (client {who})\n", line.trim_end());
                let _ = write.write_all(reply.as_bytes()).await;
                let _ = write.shutdown().await;
            }
        });
    }
}
