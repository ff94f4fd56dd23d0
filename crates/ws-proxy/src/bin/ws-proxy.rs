//! The ws-proxy daemon: flags and file -> validated config -> bind -> serve -> drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use common::cli::Flavor;
use common::daemon::{self, LogArgs, Shutdown, exit};
use common::tls::{self, ServerTls};
use tokio::net::TcpListener;
use ws_proxy::config::{Config, DEFAULT_CLIENT_AUTH, FileConfig, OnPartnerLeave, StatusListen};
use ws_proxy::{Server, status};

/// The Micronets websocket relay.
///
/// Peers connect with client certificates to wss://HOST:PORT/micronets/v1/ws-proxy/ID; two
/// peers on the same id are paired by HELLO and every message is relayed between them, in
/// order. Every setting lives in the TOML file (see deploy/config/ws-proxy.example.toml);
/// the flags below override it.
///
/// Signals: SIGHUP reloads the certificate, key, CA bundle and CRLs (live pairs stay);
/// SIGTERM or SIGINT closes every peer with 1001 and drains.
///
/// Exit codes: 0 stopped cleanly, 64 bad flags, 78 bad configuration, 69 cannot bind or
/// load the TLS material, 70 connections still open after the grace period.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  ws-proxy --config /etc/ws-proxy/ws-proxy.toml\n  ws-proxy --config dev.toml --listen 127.0.0.1:0 --status-listen unix:/run/ws-proxy/status.sock"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "WS_PROXY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// WSS listen address (overrides `listen`).
    #[arg(long, short = 'a', env = "WS_PROXY_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Status listener for /status and /metrics, `unix:PATH` or `ADDR:PORT` (overrides
    /// `status_listen`). A TCP listener is readable by every local user.
    #[arg(
        long,
        env = "WS_PROXY_STATUS_LISTEN",
        value_name = "unix:PATH|ADDR:PORT"
    )]
    status_listen: Option<String>,
    /// URL path prefix in front of meet-up ids (overrides `url_prefix`).
    #[arg(long, value_name = "PATH")]
    url_prefix: Option<String>,
    /// Server certificate, or the Micronets pkeycert (certificate then key) (overrides `tls.cert`).
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
    /// Server key, when not in the certificate file (overrides `tls.key`).
    #[arg(long, value_name = "PEM")]
    key: Option<PathBuf>,
    /// CA bundle client certificates must chain to (overrides `tls.client_ca`).
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// CRL file; repeat for several (replaces `tls.crls`).
    #[arg(long, value_name = "PEM")]
    crl: Vec<PathBuf>,
    /// `close` (the original) or `wait`: what happens to a peer whose partner leaves.
    #[arg(long, value_name = "MODE")]
    on_partner_leave: Option<String>,
    /// Print `listening on ADDR` on stdout once bound (for scripts that start it on port 0).
    #[arg(long)]
    print_address: bool,
    /// Check the configuration and the TLS material, print a summary and exit (0: good, 78:
    /// bad configuration, 69: TLS material unusable). Nothing is bound.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    let file = match daemon::load_config::<FileConfig>("ws-proxy", args.config.as_deref()) {
        Ok(file) => file,
        Err(code) => return code,
    };
    let mut log = args.log.or_file(file.log_filter.as_ref());
    if log.log_format == daemon::LogFormat::Auto {
        log.log_format = file.log_format;
    }
    if let Err(err) = daemon::init_tracing(&log, "info") {
        eprintln!("ws-proxy: {err:#}");
        return ExitCode::from(exit::USAGE);
    }
    let (config, deploy) = match configure(&args, file) {
        Ok(configured) => configured,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("ws-proxy: {err:#}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    if args.check_config {
        return check_config(&config, &deploy);
    }
    let flavor = match deploy.worker_threads {
        0 => Flavor::MultiThread,
        workers => Flavor::Workers(workers),
    };
    let print_address = args.print_address;
    daemon::run_daemon_on("ws-proxy", flavor, || async move {
        match run(config, deploy, print_address).await {
            Ok(code) => code,
            Err(err) => {
                tracing::error!("{err:#}");
                eprintln!("ws-proxy: {err:#}");
                ExitCode::from(exit::UNAVAILABLE)
            }
        }
    })
}

fn configure(
    args: &Args,
    mut file: FileConfig,
) -> anyhow::Result<(Config, ws_proxy::config::Deployment)> {
    if let Some(listen) = args.listen {
        file.listen = listen.to_string();
    }
    if let Some(status) = &args.status_listen {
        file.status_listen = Some(status.clone());
    }
    daemon::overlay(&mut file.url_prefix, args.url_prefix.clone());
    if let Some(mode) = &args.on_partner_leave {
        file.on_partner_leave = match mode.as_str() {
            "close" => OnPartnerLeave::Close,
            "wait" => OnPartnerLeave::Wait,
            other => anyhow::bail!("--on-partner-leave {other:?}: expected close or wait"),
        };
    }
    if let Some(cert) = &args.cert {
        let tls = file
            .tls
            .get_or_insert_with(|| common::tls::TlsSection::new(cert.clone()));
        tls.cert.clone_from(cert);
    }
    if let Some(tls) = file.tls.as_mut() {
        if args.key.is_some() {
            tls.key.clone_from(&args.key);
        }
        if args.ca.is_some() {
            tls.client_ca.clone_from(&args.ca);
        }
        if !args.crl.is_empty() {
            tls.crls.clone_from(&args.crl);
        }
    }
    Ok(Config::from_file(&file)?)
}

async fn run(
    config: Config,
    deploy: ws_proxy::config::Deployment,
    print_address: bool,
) -> anyhow::Result<ExitCode> {
    tls::install_default_provider();
    raise_fd_limit(config.max_connections + config.limits.max_status_connections);
    let files = deploy.tls.files(DEFAULT_CLIENT_AUTH, Vec::new());
    let server_tls = Arc::new(ServerTls::load(files).context("loading the TLS material")?);
    let identity = server_tls.server_identity()?;
    let listener = TcpListener::bind(deploy.listen)
        .await
        .with_context(|| format!("binding {}", deploy.listen))?;
    let local = listener.local_addr()?;
    // Signals are ours before anything is announced (the address line, READY=1).
    let signals = daemon::Signals::install().context("installing signal handlers")?;
    let status_listener: Option<status::Listener> = match &deploy.status_listen {
        Some(StatusListen::Tcp(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the status listener {addr}"))?
                .into(),
        ),
        Some(StatusListen::Unix(path)) => Some(
            status::bind_unix(path, deploy.status_socket_mode)
                .with_context(|| format!("binding the status socket {}", path.display()))?
                .into(),
        ),
        None => None,
    };
    let shutdown = Shutdown::new();
    let server = Server::new(config.clone(), server_tls, shutdown.clone());
    tracing::info!(
        listen = %local,
        url = format!("wss://{local}{}<id>", config.url_prefix),
        server = %identity,
        client_auth = ?deploy.tls.client_auth.unwrap_or(DEFAULT_CLIENT_AUTH),
        rules = !config.rules.is_empty(),
        on_partner_leave = ?config.on_partner_leave,
        "serving"
    );
    if let Some(listener) = status_listener {
        match &listener {
            status::Listener::Tcp(tcp) => {
                let addr = tcp.local_addr()?;
                tracing::warn!(%addr, "the status listener is on TCP: every local user can read identities and addresses; prefer status_listen = \"unix:PATH\"");
                tracing::info!(%addr, "status listener: /status, /metrics");
            }
            status::Listener::Unix(_) => {
                let listen = deploy
                    .status_listen
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string);
                tracing::info!(addr = %listen, mode = format!("{:o}", deploy.status_socket_mode), "status listener: /status, /metrics");
            }
        }
        tokio::spawn(status::serve(listener, server.clone(), shutdown.clone()));
    }
    if print_address {
        #[expect(clippy::print_stdout, reason = "the one line scripts read")]
        {
            println!("listening on {local}");
        }
    }
    let serving = server.clone();
    let accept = tokio::spawn(async move { serving.serve(listener).await });
    let reloading = server.clone();
    let drained = daemon::supervise(
        signals,
        &shutdown,
        deploy.drain_grace,
        "relaying",
        move || {
            reloading.reload()?;
            let identity = reloading.tls().server_identity()?;
            tracing::info!(server = %identity, "certificates reloaded");
            Ok(())
        },
    )
    .await;
    let _ = accept.await;
    Ok(daemon::drained_exit(drained))
}

#[expect(clippy::print_stdout, reason = "the summary is the command's output")]
fn check_config(config: &Config, deploy: &ws_proxy::config::Deployment) -> ExitCode {
    tls::install_default_provider();
    let files = deploy.tls.files(DEFAULT_CLIENT_AUTH, Vec::new());
    let identity = ServerTls::load(files)
        .map_err(anyhow::Error::from)
        .and_then(|server| Ok(server.server_identity()?));
    match identity {
        Ok(identity) => {
            println!(
                "configuration ok: listen {}, url wss://HOST:PORT{}ID, server {identity}, {} authorization rule set, on_partner_leave {:?}",
                deploy.listen,
                config.url_prefix,
                if config.rules.is_empty() { "no" } else { "an" },
                config.on_partner_leave,
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("ws-proxy: TLS material: {err:#}");
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}

/// Two descriptors per connection at most; ask for the hard limit when the soft one is short.
fn raise_fd_limit(max_connections: usize) {
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        + 64;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => tracing::warn!(
            limit = got,
            wanted,
            "the open-file limit is below what max_connections needs"
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit"),
    }
}
