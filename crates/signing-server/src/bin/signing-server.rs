//! The signing-server daemon: flags and file -> validated config -> keys, audit, TLS -> bind
//! -> serve -> drain.
#![allow(clippy::print_stdout)] // --print-address, --check-config and keygen report on stdout

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use common::daemon::{self, Shutdown, exit};
use common::metrics::MetricsListener;
use common::tls::{ClientAuth, ServerTls};
use signing_server::config::FileConfig;
use signing_server::ed448::Ed448Key;
use signing_server::server::{ALPN_HTTP, Server};
use signing_server::service::Service;

use signing_server::cli::daemon::{Args, Command};

/// What a run without `-c` prints.
const NO_CONFIG_FILE: &str = "no configuration file given: use -c FILE (or set SIGNING_SERVER_CONFIG=FILE); deploy/config/signing-server.example.toml documents every key";

fn keygen(out: &std::path::Path) -> ExitCode {
    let key = Ed448Key::generate();
    let public = out.with_file_name(format!(
        "{}.pub",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let written = (|| -> anyhow::Result<()> {
        let pem = key.to_pem()?;
        daemon::write_new_private(out, pem.as_bytes())?;
        std::fs::write(
            &public,
            signing_server::ed448::public_pem(&key.verifying_key()),
        )?;
        Ok(())
    })();
    match written {
        Ok(()) => {
            println!(
                "keyid {}\nprivate key {}\npublic key {}",
                key.keyid(),
                out.display(),
                public.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("signing-server: keygen: {}: {err:#}", out.display());
            ExitCode::from(exit::CANTCREAT)
        }
    }
}

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    if let Some(Command::Keygen { out }) = &args.command {
        return keygen(out);
    }
    // Every key the server needs (TLS, signing keys, rules) is in the file: without one, say
    // so rather than name the first section the defaults lack.
    let Some(path) = args.config.as_deref() else {
        return daemon::fail("signing-server", exit::CONFIG, NO_CONFIG_FILE);
    };
    let mut file = match daemon::load_config::<FileConfig>("signing-server", Some(path)) {
        Ok(file) => file,
        Err(code) => return code,
    };
    daemon::overlay(&mut file.listen, args.listen.clone().map(Some));
    daemon::overlay(&mut file.database, args.database.clone().map(Some));
    daemon::overlay(&mut file.instance, args.instance.clone().map(Some));
    let log = args.log.or_file(file.log.as_ref());
    // `--migrate` needs only `database` to be usable: an owner may run it on a host without
    // the package roots.
    let check_roots = !args.migrate;
    let config = match file.into_config().and_then(|config| {
        if check_roots {
            config.check_roots()?;
        }
        Ok(config)
    }) {
        Ok(mut config) => {
            config.credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            config
        }
        Err(err) => return daemon::invalid_config("signing-server", err),
    };
    if args.migrate {
        return daemon::run_daemon("signing-server", &log, || migrate(config));
    }
    daemon::run_daemon("signing-server", &log, || {
        run(config, args.print_address, args.check_config)
    })
}

/// `--migrate`: the schema to this release's version, nothing else.
async fn migrate(config: signing_server::config::Config) -> ExitCode {
    match signing_server::audit::Audit::migrate(&config.database).await {
        Ok(version) => {
            println!(
                "audit database {} is at schema version {version}",
                config.database
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("signing-server: audit database {}: {err}", config.database);
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}

async fn run(
    config: signing_server::config::Config,
    print_address: bool,
    check_only: bool,
) -> ExitCode {
    common::tls::install_default_provider();
    let files = config
        .tls
        .files(ClientAuth::Required, vec![ALPN_HTTP.to_vec()]);
    let tls = match ServerTls::load(files) {
        Ok(tls) => Arc::new(tls),
        Err(err) => {
            eprintln!("signing-server: loading TLS material: {err}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let listen = config.listen;
    let metrics_listen = config.metrics_listen.clone();
    let grace = config.limits.drain_grace();
    let service = match Service::open(config).await {
        Ok(service) => service,
        Err(err) => {
            eprintln!("signing-server: {err:#}");
            let text = format!("{err:#}");
            let privileged = matches!(
                err.downcast_ref::<signing_server::audit::AuditError>(),
                Some(signing_server::audit::AuditError::Privileged { .. })
            );
            return ExitCode::from(if privileged {
                exit::NOPERM
            } else if text.contains("audit database") {
                exit::UNAVAILABLE
            } else {
                exit::NOINPUT
            });
        }
    };
    if check_only {
        let keys: Vec<String> = service
            .signers()
            .iter()
            .map(|s| format!("{} ({}, keyid {})", s.name(), s.algorithm(), s.keyid()))
            .collect();
        println!(
            "configuration ok: listen {listen}, keys: {}, client rules: {}, audit database {} (instance {})",
            keys.join(", "),
            service.config.clients.len(),
            service.config.database,
            service.config.instance
        );
        return ExitCode::SUCCESS;
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("signing-server: binding {listen}: {err}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let metrics_listener = match &metrics_listen {
        Some(addr) => match MetricsListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("signing-server: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        },
        None => None,
    };
    let signals = match daemon::Signals::install_for("signing-server") {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    let local = listener.local_addr().unwrap_or(listen);
    let identity = tls.server_identity().ok().map(|i| i.to_string());
    for signer in service.signers() {
        tracing::info!(
            key = signer.name(),
            algorithm = signer.algorithm(),
            keyid = signer.keyid(),
            "signing key loaded"
        );
    }
    tracing::info!(address = %local, identity, "listening");
    let shutdown = Shutdown::new();
    let metrics_addr = metrics_listener.as_ref().map(|m| m.addr().clone());
    if let Some(listener) = metrics_listener {
        let scraping = service.clone();
        let families = service.metrics.shared.clone();
        let scrape = Arc::new(move || scraping.metrics.encode());
        tokio::spawn(listener.serve(scrape, families, shutdown.clone()));
    }
    if print_address {
        common::daemon::announce(format_args!("listening on {local}"));
        if let Some(addr) = metrics_addr {
            common::daemon::announce(format_args!("metrics on {addr}"));
        }
    }
    let server = Server::new(service, tls, shutdown.clone());
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    let reloader = server.clone();
    let drained = daemon::supervise(signals, &shutdown, grace, "serving", move || {
        reloader.reload().map_err(anyhow::Error::from)
    })
    .await;
    let _ = serving.await;
    daemon::drained_exit(drained)
}
