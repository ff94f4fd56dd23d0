//! The secure-talk daemon: flags and file -> validated config -> keys and TLS -> bind -> serve
//! -> drain.
#![allow(clippy::print_stdout)] // --print-address, --check-config and gen-token-key report on stdout

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use common::daemon::{self, Shutdown, exit};
use common::metrics::MetricsListener;
use common::tls::{ClientAuth, ServerTls};
use secure_talk::config::FileConfig;
use secure_talk::server::{Listeners, Server};
use secure_talk::token::Tokens;

use secure_talk::cli::daemon::{Args, Command};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    if let Some(Command::GenTokenKey { path }) = &args.command {
        return match Tokens::write_key_file(path) {
            Ok(()) => {
                println!("wrote {}", path.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("secure-talk: {}: {err}", path.display());
                ExitCode::from(exit::CANTCREAT)
            }
        };
    }
    let mut file = match daemon::load_config::<FileConfig>("secure-talk", args.config.as_deref()) {
        Ok(file) => file,
        Err(code) => return code,
    };
    daemon::overlay(&mut file.listen, args.listen.clone().map(Some));
    daemon::overlay(&mut file.unix_socket, args.unix_socket.clone().map(Some));
    daemon::overlay(&mut file.state_dir, args.state_dir.clone().map(Some));
    daemon::overlay(&mut file.pipe_program, args.pipe_program.clone().map(Some));
    let log = args.log.or_file(file.log.as_ref());
    let config = match file.into_config() {
        Ok(config) => config,
        Err(err) => return daemon::invalid_config("secure-talk", err),
    };
    daemon::run_daemon("secure-talk", &log, || {
        run(config, args.print_address, args.check_config)
    })
}

async fn run(
    config: secure_talk::config::Config,
    print_address: bool,
    check_only: bool,
) -> ExitCode {
    let tokens = match &config.token_key_file {
        Some(path) => match Tokens::from_file_in(
            path,
            config.token_lifetime,
            std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(std::path::PathBuf::from)
                .as_deref(),
        ) {
            Ok(tokens) => tokens,
            Err(err) => {
                eprintln!("secure-talk: {err}");
                return ExitCode::from(exit::NOINPUT);
            }
        },
        None => Tokens::random(config.token_lifetime),
    };
    common::tls::install_default_provider();
    let tls = match (&config.listen, &config.tls) {
        (Some(_), Some(section)) => {
            let files = section.files(config.client_auth, vec![b"http/1.1".to_vec()]);
            match ServerTls::load(files) {
                Ok(tls) => Some(Arc::new(tls)),
                Err(err) => {
                    eprintln!("secure-talk: loading TLS material: {err}");
                    return ExitCode::from(exit::UNAVAILABLE);
                }
            }
        }
        _ => None,
    };
    if check_only {
        println!(
            "configuration ok: listen {}, unix socket {}, client certificates {}",
            config
                .listen
                .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            config
                .unix_socket
                .as_ref()
                .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
            match config.client_auth {
                ClientAuth::Required => "required",
                ClientAuth::Optional => "optional",
                ClientAuth::Off => "off",
            }
        );
        return ExitCode::SUCCESS;
    }
    let listeners = match Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(err) => {
            eprintln!("secure-talk: {err:#}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let metrics = match &config.metrics_listen {
        Some(listen) => match MetricsListener::bind(listen).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("secure-talk: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        },
        None => None,
    };
    let signals = match daemon::Signals::install_for("secure-talk") {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    if let Some(tcp) = &listeners.tcp {
        let address = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let identity = tls
            .as_ref()
            .and_then(|t| t.server_identity().ok())
            .map(|i| i.to_string());
        tracing::info!(%address, identity, client_auth = ?config.client_auth, "listening on tcp (https, wss)");
        if print_address {
            common::daemon::announce(format_args!("listening on {address}"));
        }
    }
    if let Some((_, path)) = &listeners.unix {
        tracing::info!(path = %path.display(), mode = format!("{:o}", config.unix_socket_mode), "listening on the unix socket (http, ws)");
        if print_address {
            common::daemon::announce(format_args!("listening on unix:{}", path.display()));
        }
    }
    tracing::info!(path = %listeners.ipc.1.display(), program = config.pipe_program, "ipc socket ready");
    let grace = config.limits.drain_grace();
    let shutdown = Shutdown::new();
    let server = Server::new(config, tokens, tls, shutdown.clone());
    if let Some(listener) = metrics {
        if print_address {
            common::daemon::announce(format_args!("metrics on {}", listener.addr()));
        }
        let scraped = server.clone();
        let families = server.metric_families();
        tokio::spawn(listener.serve(
            Arc::new(move || scraped.encode_metrics()),
            families,
            shutdown.clone(),
        ));
    }
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.run(listeners).await })
    };
    let reloader = server.clone();
    let drained = daemon::supervise(signals, &shutdown, grace, "serving", move || {
        reloader.reload().map_err(anyhow::Error::from)
    })
    .await;
    let _ = serving.await;
    daemon::drained_exit(drained)
}
