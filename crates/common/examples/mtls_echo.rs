//! A line-echo server and client over mutual TLS, built only from `common::tls`.
//!
//! `scripts/demo` uses it to show a TLS round trip between two endpoints with mutual
//! authentication: `serve` prints `listening on ADDR` and echoes one line per connection;
//! `call` sends a line and prints `echo: TEXT from server CN=...`.
#![expect(clippy::print_stdout, reason = "a demo program that reports on stdout")]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use common::tls::{self, ClientAuth, ClientTlsFiles, ServerTls, ServerTlsFiles};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until killed.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        crl: Vec<PathBuf>,
    },
    /// Send one line and print the answer.
    Call {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value = "hello")]
        message: String,
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tls::install_default_provider();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mtls_echo: {err:#}");
            std::process::ExitCode::from(common::daemon::exit::UNAVAILABLE)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Serve {
            listen,
            cert,
            key,
            ca,
            crl,
        } => {
            let server = ServerTls::load(ServerTlsFiles {
                cert,
                key: Some(key),
                client_ca: Some(ca),
                crls: crl,
                client_auth: ClientAuth::Required,
                alpn: Vec::new(),
            })?;
            let listener = TcpListener::bind(&listen).await.context("binding")?;
            println!("listening on {}", listener.local_addr()?);
            loop {
                let (stream, peer) = listener.accept().await?;
                let acceptor = server.acceptor();
                tokio::spawn(async move {
                    match tls::accept(&acceptor, stream, tls::DEFAULT_HANDSHAKE_TIMEOUT).await {
                        Ok((stream, identity)) => {
                            let who = identity.map(|id| id.to_string()).unwrap_or_default();
                            let (read, mut write) = tokio::io::split(stream);
                            let mut line = String::new();
                            if BufReader::new(read).read_line(&mut line).await.is_ok() {
                                let reply = format!("{} (client {who})\n", line.trim_end());
                                let _ = write.write_all(reply.as_bytes()).await;
                                let _ = write.shutdown().await;
                            }
                        }
                        Err(err) => eprintln!("refused {peer}: {err}"),
                    }
                });
            }
        }
        Command::Call {
            connect,
            cert,
            key,
            ca,
            message,
            server_name,
        } => {
            let config = tls::client_config(&ClientTlsFiles {
                ca: Some(ca),
                cert: Some(cert),
                key: Some(key),
                alpn: Vec::new(),
            })?;
            let tcp = TcpStream::connect(&connect).await.context("connecting")?;
            let mut stream = tls::connect(
                Arc::new(config),
                &server_name,
                tcp,
                tls::DEFAULT_HANDSHAKE_TIMEOUT,
            )
            .await?;
            let server = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| tls::PeerIdentity::from_der(leaf.as_ref()))
                .context("server sent no certificate")?;
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
