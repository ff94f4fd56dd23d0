//! The broker daemon: flags and file -> validated config -> store, CA, HTTPS material -> bind
//! -> serve -> drain.
#![allow(clippy::print_stdout)] // --print-address and --check-config report on stdout

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use broker::config::{Config, FileConfig};
use broker::server::{Server, bind_unix};
use broker::service::Broker;
use clap::Parser;
use common::daemon::{self, LogArgs, Shutdown, exit};
use common::tls::{ClientAuth, ServerTls};

/// Hands users' applications a port plus a secret (ssh mode) or a certificate from the
/// broker's own CA (ssl mode), so that only their owner can reach them.
///
/// Local users talk to it over a Unix socket (`broker-cli`, `broker-run`, or
/// `curl --unix-socket /run/broker/broker.sock http://broker/v1/jobs`); who they are comes from
/// the kernel (SO_PEERCRED). An optional HTTPS API maps client certificates to users.
/// Jobs live in SQLite (default, in the state directory) or PostgreSQL (`--database URL`).
///
/// Signals: SIGHUP reloads the HTTPS certificate, key, client CA and CRLs; SIGTERM or SIGINT
/// stops accepting and lets running requests finish (drain_grace_secs).
///
/// Exit codes: 0 stopped cleanly, 64 bad flags or log filter, 78 bad configuration
/// (including a port range overlapping the kernel's ephemeral range), 69 cannot open the
/// store or the CA, load the HTTPS material or bind, 70 requests still running after the
/// grace period.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  broker -c /etc/broker/broker.toml\n  broker --socket /tmp/b.sock --state-dir /tmp/b --port-range 21000-21999\n  broker --database postgres:///broker?host=/run/postgresql -c /etc/broker/broker.toml"
)]
struct Args {
    /// TOML configuration file (deploy/config/broker.example.toml documents every key).
    #[arg(long, short = 'c', env = "BROKER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket of the local API [default: /run/broker/broker.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory: SQLite database and CA [default: /var/lib/broker].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Store URL: sqlite://PATH or postgres://... [default: SQLite in the state directory].
    #[arg(
        long,
        env = "BROKER_DATABASE",
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Host name jobs are registered under [default: the machine's].
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Ports handed out, inclusive, e.g. 20000-29999.
    #[arg(long, value_name = "LOW-HIGH", value_parser = parse_range)]
    port_range: Option<[u16; 2]>,
    #[command(flatten)]
    log: LogArgs,
    /// Print `listening on unix:PATH` (and the HTTPS address) on stdout once bound.
    #[arg(long)]
    print_address: bool,
    /// Check the configuration, open the store (running migrations) and the CA, then exit.
    #[arg(long)]
    check_config: bool,
}

fn parse_range(text: &str) -> Result<[u16; 2], String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected LOW-HIGH"))?;
    let low = low.trim().parse().map_err(|e| format!("{low:?}: {e}"))?;
    let high = high.trim().parse().map_err(|e| format!("{high:?}: {e}"))?;
    Ok([low, high])
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    let mut file = match daemon::load_config::<FileConfig>("broker", args.config.as_deref()) {
        Ok(file) => file,
        Err(code) => return code,
    };
    daemon::overlay(&mut file.socket, args.socket.clone());
    daemon::overlay(&mut file.state_dir, args.state_dir.clone());
    daemon::overlay(&mut file.database, args.database.clone());
    daemon::overlay(&mut file.host, args.host.clone());
    daemon::overlay(&mut file.port_range, args.port_range);
    let log = args.log.or_file(file.log.as_ref());
    let config = match file.into_config(&hostname()) {
        Ok(config) => config,
        Err(err) => return daemon::invalid_config("broker", err),
    };
    if let Some(ephemeral) = broker::config::ephemeral_range() {
        if config.ports.start() <= ephemeral.end() && ephemeral.start() <= config.ports.end() {
            eprintln!(
                "broker: invalid configuration: port_range {}-{} overlaps the kernel's ephemeral range {}-{} (net.ipv4.ip_local_port_range): outgoing connections could take a job's port",
                config.ports.start(),
                config.ports.end(),
                ephemeral.start(),
                ephemeral.end()
            );
            return ExitCode::from(exit::CONFIG);
        }
    }
    let ephemeral_unknown = broker::config::ephemeral_range().is_none();
    daemon::run_daemon("broker", &log, || async move {
        if ephemeral_unknown {
            tracing::warn!(
                "cannot read /proc/sys/net/ipv4/ip_local_port_range; make sure port_range lies outside the ephemeral range"
            );
        }
        run(config, args.print_address, args.check_config).await
    })
}

async fn run(config: Config, print_address: bool, check_only: bool) -> ExitCode {
    common::tls::install_default_provider();
    let https = match &config.https {
        Some(section) => {
            match ServerTls::load(
                section
                    .tls
                    .files(ClientAuth::Required, vec![b"http/1.1".to_vec()]),
            ) {
                // Client certificates are the identity: never anything but required.
                Ok(tls)
                    if section
                        .tls
                        .client_auth
                        .is_none_or(|a| a == ClientAuth::Required) =>
                {
                    Some((Arc::new(tls), section.listen))
                }
                Ok(_) => {
                    eprintln!(
                        "broker: invalid configuration: https.tls.client_auth must be \"required\" (certificates are the identity)"
                    );
                    return ExitCode::from(exit::CONFIG);
                }
                Err(err) => {
                    eprintln!("broker: loading the HTTPS material: {err}");
                    return ExitCode::from(exit::UNAVAILABLE);
                }
            }
        }
        None => None,
    };
    let socket = config.socket.clone();
    let socket_mode = config.socket_mode;
    let grace = config.drain_grace;
    let database = broker::service::redact_url(&config.database);
    let broker = match Broker::open(config).await {
        Ok(broker) => Arc::new(broker),
        Err(err) => {
            eprintln!("broker: {err:#}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    if check_only {
        let c = broker.config();
        println!(
            "configuration ok: socket {}, store {database}, host {}, ports {}-{}, https {}",
            socket.display(),
            c.host,
            c.ports.start(),
            c.ports.end(),
            https
                .as_ref()
                .map_or_else(|| "off".to_owned(), |(_, addr)| addr.to_string())
        );
        return ExitCode::SUCCESS;
    }
    let unix = match bind_unix(&socket, socket_mode) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("broker: binding {}: {err}", socket.display());
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let tcp = match &https {
        Some((_, addr)) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("broker: binding {addr}: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        },
        None => None,
    };
    let signals = match daemon::Signals::install_for("broker") {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    let c = broker.config();
    tracing::info!(
        socket = %socket.display(),
        store = %database,
        host = %c.host,
        ports = format!("{}-{}", c.ports.start(), c.ports.end()),
        "listening"
    );
    if print_address {
        common::daemon::announce(format_args!("listening on unix:{}", socket.display()));
    }
    let shutdown = Shutdown::new();
    let server = Server::new(
        broker.clone(),
        https.as_ref().map(|(tls, _)| tls.clone()),
        shutdown.clone(),
    );
    if let Some(listener) = tcp {
        let local = listener.local_addr().ok();
        let identity = https
            .as_ref()
            .and_then(|(tls, _)| tls.server_identity().ok())
            .map(|i| i.to_string());
        tracing::info!(address = ?local, identity, "https API listening");
        if print_address {
            if let Some(local) = local {
                common::daemon::announce(format_args!("listening on https://{local}"));
            }
        }
        tokio::spawn(server.clone().serve_https(listener));
    }
    let serving = tokio::spawn(server.clone().serve_unix(unix));
    let reaper = tokio::spawn(broker.clone().run_reaper(shutdown.clone()));
    let reloader = server.clone();
    let drained = daemon::supervise(signals, &shutdown, grace, "serving", move || {
        reloader.reload().map_err(anyhow::Error::from)
    })
    .await;
    let _ = serving.await;
    let _ = reaper.await;
    let _ = std::fs::remove_file(&socket);
    // Failed verifications counted since the reaper's last pass (and during the drain).
    if let Err(err) = broker.flush_audit(true).await {
        tracing::warn!(error = %err, "writing the counted failed verifications failed");
    }
    broker.store().close().await;
    daemon::drained_exit(drained)
}
