//! The remo-serv daemon: flags and file -> validated config -> keys and users -> bind -> serve
#![allow(clippy::print_stdout)] // --print-address and --check-config report on stdout
//! -> drain.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use common::daemon::{self, LogArgs, Shutdown, exit};
use common::metrics::MetricsListener;
use common::tls::{ClientAuth, ServerTls, ServerTlsFiles};
use remo_serv::config::FileConfig;
use remo_serv::keys::PrivateKey;
use remo_serv::server::Server;
use remo_serv::users::Users;
use tokio::net::TcpListener;

use remo_serv::cli::daemon::Args;

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    let mut file = match daemon::load_config::<FileConfig>("remo-serv", args.conf.as_deref()) {
        Ok(file) => file,
        Err(code) => return code,
    };
    daemon::overlay(&mut file.port, args.port.map(Some));
    daemon::overlay(&mut file.host, args.interface.map(Some));
    daemon::overlay(&mut file.user_service, args.user_service.clone().map(Some));
    daemon::overlay(&mut file.key_file, args.key_file.clone().map(Some));
    daemon::overlay(&mut file.timeout, args.session.map(Some));
    daemon::overlay(&mut file.tls_cert, args.tls_cert.clone().map(Some));
    daemon::overlay(&mut file.tls_key, args.tls_key.clone().map(Some));
    daemon::overlay(&mut file.workdir, args.workdir.clone().map(Some));
    let filter = args
        .log
        .clone()
        .or_else(|| (args.debug || file.debug == Some(true)).then(|| "debug".to_owned()))
        .or_else(|| file.log.clone());
    let log = LogArgs {
        log_format: args.log_format,
        log_filter: filter,
    };
    let config = match file.into_config() {
        Ok(config) => config,
        Err(err) => return daemon::invalid_config("remo-serv", err),
    };
    daemon::run_daemon("remo-serv", &log, || {
        run(config, args.print_address, args.check_config)
    })
}

async fn run(config: remo_serv::config::Config, print_address: bool, check_only: bool) -> ExitCode {
    let key = match load_server_key(&config.key_file) {
        Ok(key) => key,
        Err(err) => {
            eprintln!("remo-serv: {err:#}");
            return ExitCode::from(exit::NOINPUT);
        }
    };
    let users = match Users::open_with(&config.users_db, !check_only).await {
        Ok(users) => users,
        Err(err) => {
            eprintln!("remo-serv: {err}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    common::tls::install_default_provider();
    let tls = match &config.tls {
        None => None,
        Some((cert, key)) => match ServerTls::load(ServerTlsFiles {
            cert: cert.clone(),
            key: Some(key.clone()),
            client_ca: None,
            crls: Vec::new(),
            client_auth: ClientAuth::Off,
            alpn: vec![b"http/1.1".to_vec()],
        }) {
            Ok(tls) => Some(tls),
            Err(err) => {
                eprintln!("remo-serv: loading the HTTPS certificate: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        },
    };
    let listen = config.listen;
    let metrics_listen = config.metrics_listen.clone();
    let grace = config.drain_grace;
    let https = tls.is_some();
    let server = match Server::new(config, key, users, tls) {
        Ok(server) => server,
        Err(err) => {
            eprintln!("remo-serv: working directory or file roots: {err}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    if check_only {
        println!("configuration ok: listen {listen}, https {https}");
        return ExitCode::SUCCESS;
    }
    let listener = match bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("remo-serv: {err:#}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let metrics = match &metrics_listen {
        Some(listen) => match MetricsListener::bind(listen).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("remo-serv: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        },
        None => None,
    };
    // Signals are ours before the address is announced.
    let signals = match daemon::Signals::install_for("remo-serv") {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(address = %local, https, "listening");
    if print_address {
        common::daemon::announce(format_args!("listening on {local}"));
    }
    let shutdown = Shutdown::new();
    if let Some(listener) = metrics {
        if print_address {
            common::daemon::announce(format_args!("metrics on {}", listener.addr()));
        }
        let scraped = server.clone();
        tokio::spawn(listener.serve(
            std::sync::Arc::new(move || scraped.encode_metrics()),
            server.metric_families(),
            shutdown.clone(),
        ));
    }
    let serving = {
        let server = server.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { server.serve(listener, shutdown).await })
    };
    let reloader = server.clone();
    let drained = daemon::supervise(signals, &shutdown, grace, "serving", move || {
        reloader.reload_tls()
    })
    .await;
    let _ = serving.await;
    daemon::drained_exit(drained)
}

fn load_server_key(path: &std::path::Path) -> anyhow::Result<PrivateKey> {
    use std::os::unix::fs::PermissionsExt as _;
    let key = PrivateKey::read(path, None).with_context(|| {
        format!(
            "server key {} (Ed448, PKCS#8 PEM, unencrypted)",
            path.display()
        )
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        // Inside systemd's credentials directory the ACL mask shows as group read; that is
        // systemd granting this service access, not a leak.
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
        if !daemon::secret_mode_ok(path, meta.permissions().mode(), credentials.as_deref()) {
            tracing::warn!(path = %path.display(), "the server key is readable by group or others; chmod 600 it");
        }
    }
    Ok(key)
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}
