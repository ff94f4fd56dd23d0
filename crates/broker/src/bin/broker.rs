//! The broker daemon: flags and file -> validated config -> store, CA, HTTPS material -> bind
//! -> serve -> drain.
#![allow(clippy::print_stdout)] // --print-address and --check-config report on stdout

use std::process::ExitCode;
use std::sync::Arc;

use broker::config::{Config, FileConfig};
use broker::server::{Server, bind_unix};
use broker::service::Broker;
use clap::Parser;
use common::daemon::{self, Shutdown, exit};
use common::metrics::MetricsListener;
use common::tls::{ClientAuth, ServerTls};

use broker::cli::daemon::Args;

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
    let metrics_listen = config.metrics_listen.clone();
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
    let metrics = match &metrics_listen {
        Some(listen) => match MetricsListener::bind(listen).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("broker: {err}");
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
    if let Some(listener) = metrics {
        if print_address {
            common::daemon::announce(format_args!("metrics on {}", listener.addr()));
        }
        let metrics = broker.metrics().clone();
        let families = metrics.shared.clone();
        tokio::spawn(listener.serve(
            Arc::new(move || metrics.encode()),
            families,
            shutdown.clone(),
        ));
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
