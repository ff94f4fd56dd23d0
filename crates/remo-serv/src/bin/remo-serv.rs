//! The remo-serv daemon: flags and file -> validated config -> keys and users -> bind -> serve
#![allow(clippy::print_stdout)] // --print-address and --check-config report on stdout
//! -> drain.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use common::daemon::{self, LogArgs, LogFormat, Shutdown, exit};
use common::tls::{ClientAuth, ServerTls, ServerTlsFiles};
use remo_serv::config::FileConfig;
use remo_serv::keys::PrivateKey;
use remo_serv::server::Server;
use remo_serv::users::Users;
use tokio::net::TcpListener;

/// Encrypted remote administration server, wire-compatible with remo_serv 0.6.0.
///
/// Users log in with their Ed448 key (registered with `remo-admin useradd`); the session is
/// encrypted with a key agreed over X448, and every request is a Fernet token. Logged-in users
/// run commands (no shell) and get and put files inside the served directories.
///
/// The options are the original server's; every one also has a TOML key (see
/// deploy/config/remo-serv.example.toml). Flags override the file.
///
/// Signals: SIGHUP reloads the HTTPS certificate and key; SIGTERM or SIGINT stops accepting,
/// lets running requests finish (drain-grace) and terminates interactive commands.
///
/// Exit codes: 0 stopped cleanly, 64 bad flags or log filter, 78 bad configuration, 66 key file unreadable,
/// 69 cannot bind, open the user database or load TLS, 70 requests still running after the
/// grace period.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  remo-serv -k remo_serv_key.pem -u SqliteUserService:users_db.sqlite\n  remo-serv -c /etc/remo-serv/remo-serv.toml\n  remo-serv -p 8443 --tls-cert server.crt --tls-key server.key"
)]
struct Args {
    /// TOML configuration file (keys: port, host, timeout, log, user-service, key-file, ...).
    #[arg(
        long = "conf",
        short = 'c',
        env = "REMO_SERV_CONFIG",
        value_name = "FILE"
    )]
    conf: Option<PathBuf>,
    /// TCP port [default: 8080].
    #[arg(long, short = 'p')]
    port: Option<u16>,
    /// Address to bind [default: 127.0.0.1; the original bound 0.0.0.0].
    #[arg(long, short = 'i', value_name = "ADDR")]
    interface: Option<IpAddr>,
    /// User service: SqliteUserService:PATH [default: SqliteUserService:users_db.sqlite].
    #[arg(long, short = 'u', value_name = "SPEC")]
    user_service: Option<String>,
    /// Server Ed448 private key, PKCS#8 PEM, unencrypted [default: remo_serv_key.pem].
    #[arg(long, short = 'k', value_name = "PEM")]
    key_file: Option<PathBuf>,
    /// Session idle timeout in seconds [default: 600].
    #[arg(long, short = 's', value_name = "SECS")]
    session: Option<u64>,
    /// Debug logging (same as --log debug).
    #[arg(long, short = 'd')]
    debug: bool,
    /// Log filter, e.g. `info` or `info,remo_serv=debug` (the original took a logging
    /// config file here).
    #[arg(long = "log", short = 'l', value_name = "FILTER")]
    log: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    /// HTTPS certificate chain (PEM); with --tls-key the server speaks HTTPS only.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// HTTPS private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Working directory of commands and base of relative file names [default: the current
    /// directory].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Print `listening on ADDR` on stdout once bound (for scripts that use port 0).
    #[arg(long)]
    print_address: bool,
    /// Check the configuration, the server key and the user database, then exit.
    #[arg(long)]
    check_config: bool,
}

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
