//! The ws-proxy daemon: flags and file -> validated config -> bind -> serve -> drain.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use clap::Parser;
use common::cli::{Failure, Flavor, conclude};
use common::daemon::{self, ConfigError, Shutdown, exit};
use common::metrics::MetricsListener;
use common::tls::{self, ClientAuth, ServerTls, TlsError, TlsSection};
use tokio::net::TcpListener;
use ws_proxy::config::{
    self, Config, DEFAULT_CLIENT_AUTH, Deployment, FileConfig, FrontListen, OnPartnerLeave,
    StatusListen,
};
use ws_proxy::listen::{self, ListenAddr};
use ws_proxy::{Server, status};

use ws_proxy::cli::daemon::Args;

/// The name errors are printed with.
const NAME: &str = "ws-proxy";

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    let file = match daemon::load_config::<FileConfig>(NAME, args.config.as_deref()) {
        Ok(file) => file,
        Err(code) => return code,
    };
    let mut log = args.log.or_file(file.log_filter.as_ref());
    if log.log_format == daemon::LogFormat::Auto {
        log.log_format = file.log_format;
    }
    if let Err(err) = daemon::init_tracing(&log, "info") {
        return daemon::fail(NAME, exit::USAGE, format_args!("{err:#}"));
    }
    // Every failure from here on is printed once, by `conclude`, with its exit code.
    let (config, deploy) = match configure(&args, file) {
        Ok(configured) => configured,
        Err(failure) => return ExitCode::from(conclude(NAME, Err::<(), _>(failure))),
    };
    if args.check_config {
        return common::cli::run(NAME, Flavor::CurrentThread, || check_config(config, deploy));
    }
    let flavor = match deploy.worker_threads {
        0 => Flavor::MultiThread,
        workers => Flavor::Workers(workers),
    };
    let print_address = args.print_address;
    daemon::run_daemon_on(NAME, flavor, || async move {
        ExitCode::from(conclude(NAME, run(config, deploy, print_address).await))
    })
}

/// A bad flag value (exit 64); the same mistake in the file is a configuration error (78).
fn flag_error(flag: &str, err: ConfigError) -> Failure {
    let text = match err {
        ConfigError::Invalid(text) => text,
        other => other.to_string(),
    };
    Failure::usage(anyhow!("{flag}: {text}"))
}

/// The file with the flags laid over it, validated. Flag values are checked before they
/// replace the file's, so a bad one exits 64 and a bad file value 78.
fn configure(args: &Args, mut file: FileConfig) -> Result<(Config, Deployment), Failure> {
    if let Some(listen) = &args.listen {
        ListenAddr::parse(listen)
            .map_err(|err| Failure::usage(anyhow!("--listen {listen:?}: {err}")))?;
        file.listen = Some(listen.clone());
    }
    if let Some(status) = &args.status_listen {
        config::parse_status_listen(status).map_err(|err| flag_error("--status-listen", err))?;
        file.status_listen = Some(status.clone());
    }
    if let Some(prefix) = &args.url_prefix {
        config::check_url_prefix(prefix).map_err(|err| flag_error("--url-prefix", err))?;
    }
    daemon::overlay(&mut file.url_prefix, args.url_prefix.clone());
    if let Some(mode) = &args.on_partner_leave {
        file.on_partner_leave = match mode.as_str() {
            "close" => OnPartnerLeave::Close,
            "wait" => OnPartnerLeave::Wait,
            other => {
                return Err(Failure::usage(anyhow!(
                    "--on-partner-leave {other:?}: expected close or wait"
                )));
            }
        };
    }
    let tls_in_file = file.tls.is_some();
    match (&args.cert, file.tls.as_mut()) {
        (Some(cert), Some(tls)) => tls.cert.clone_from(cert),
        (Some(cert), None) => file.tls = Some(TlsSection::new(cert.clone())),
        (None, Some(_)) => {}
        // Front only: the front holds the certificate.
        (None, None) if file.front.is_some() => {}
        (None, None) => return Err(no_certificate(args)),
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
        let auth = tls.client_auth.unwrap_or(DEFAULT_CLIENT_AUTH);
        if !tls_in_file && tls.client_ca.is_none() && auth != ClientAuth::Off {
            return Err(Failure::usage(anyhow!(
                "--cert given without --ca: give the CA bundle client certificates must chain to with --ca FILE"
            )));
        }
    }
    Config::from_file(&file).map_err(|err| Failure::new(exit::CONFIG, err))
}

/// Neither the flags nor the file name a certificate: which flags are missing.
fn no_certificate(args: &Args) -> Failure {
    let given: Vec<&str> = [
        ("--key", args.key.is_some()),
        ("--ca", args.ca.is_some()),
        ("--crl", !args.crl.is_empty()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    if !given.is_empty() {
        return Failure::usage(anyhow!(
            "{} given without --cert: give the server certificate with --cert FILE too",
            given.join(" and ")
        ));
    }
    match &args.config {
        None => Failure::usage(anyhow!(
            "no TLS material: give --cert FILE (and --key FILE unless the certificate file holds the key) and --ca FILE, or a configuration file (-c FILE) whose [tls] section sets cert and client_ca"
        )),
        Some(path) => Failure::new(
            exit::CONFIG,
            anyhow!(
                "{}: no [tls] section: set cert and client_ca there, or give --cert and --ca",
                path.display()
            ),
        ),
    }
}

/// The TLS material of `tls`; a certificate file without a key says where the key goes.
fn load_tls(tls: &TlsSection) -> Result<ServerTls, Failure> {
    ServerTls::load(tls.files(DEFAULT_CLIENT_AUTH, Vec::new())).map_err(|err| {
        let hint = match &err {
            TlsError::Pem { path, what }
                if tls.key.is_none() && *path == tls.cert && what.contains("private key") =>
            {
                "; give the key with --key FILE (tls.key), or a pkeycert file holding the certificate then the key"
            }
            _ => "",
        };
        Failure::new(
            exit::UNAVAILABLE,
            anyhow!("loading the TLS material: {err}{hint}"),
        )
    })
}

/// Binds the front listener's Unix socket (mode 0660) in a directory nobody else may write
/// to (ours or root's, not group- or world-writable: who could swap the socket could stand
/// in for the instance), below directories nobody else may write to either (who could
/// rename one could swap the whole path), given to `[front] socket_group` when set.
fn bind_front_socket(
    path: &std::path::Path,
    deploy: &Deployment,
) -> Result<tokio::net::UnixListener, Failure> {
    let unavailable = |err: std::io::Error| {
        Failure::new(
            exit::UNAVAILABLE,
            anyhow!("[front] listen unix:{}: {err}", path.display()),
        )
    };
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("/"));
    daemon::check_trusted_dir(
        dir,
        "the front socket's directory must be ours or root's and writable by nobody else",
    )
    .and_then(|()| {
        daemon::check_trusted_ancestors(
            dir,
            "every directory above the front socket's must be ours or root's and writable by nobody else (unless sticky, as /tmp)",
        )
    })
    .map_err(|err| {
        Failure::new(
            exit::CONFIG,
            anyhow!("[front] listen unix:{}: {err}", path.display()),
        )
    })?;
    let listener = daemon::bind_unix(path, config::FRONT_SOCKET_MODE).map_err(unavailable)?;
    if let Some((_, gid)) = &deploy.front_socket_group {
        std::os::unix::fs::chown(path, None, Some(*gid)).map_err(unavailable)?;
    }
    Ok(listener)
}

/// Binds every address the listen address (of the key `key`) resolves to: one that fails
/// while another binds is a warning, none bound an error (69).
async fn bind_listen(key: &str, listen: &ListenAddr) -> Result<Vec<TcpListener>, Failure> {
    let unavailable =
        |err: std::io::Error| Failure::new(exit::UNAVAILABLE, anyhow!("{key} {listen}: {err}"));
    let addrs = listen.resolve().await.map_err(unavailable)?;
    let bound = listen::bind_each(&addrs).await.map_err(unavailable)?;
    for (addr, err) in &bound.failed {
        tracing::warn!(%listen, %addr, %err, "cannot bind one of the listen addresses; serving on the others");
    }
    Ok(bound.listeners)
}

async fn run(config: Config, deploy: Deployment, print_address: bool) -> Result<u8, Failure> {
    let unavailable = |err: anyhow::Error| Failure::new(exit::UNAVAILABLE, err);
    tls::install_default_provider();
    let server_tls = match &deploy.tls {
        Some(tls) => Some(Arc::new(load_tls(tls)?)),
        None => None,
    };
    raise_fd_limit(fds_needed(&config));
    let identity = server_tls
        .as_ref()
        .map(|tls| tls.server_identity())
        .transpose()
        .map_err(|e| unavailable(e.into()))?;
    let listeners = match &deploy.listen {
        Some(listen) => bind_listen("listen", listen).await?,
        None => Vec::new(),
    };
    let front_listeners = match &deploy.front_listen {
        Some(FrontListen::Tcp(listen)) => bind_listen("[front] listen", listen).await?,
        _ => Vec::new(),
    };
    let front_socket = match &deploy.front_listen {
        Some(FrontListen::Unix(path)) => Some(bind_front_socket(path, &deploy)?),
        _ => None,
    };
    let front_crls = match &deploy.front_crls {
        Some((ca, crls)) => Some(Arc::new(
            tls::Crls::load(ca.clone(), crls.clone()).map_err(|err| {
                Failure::new(
                    exit::UNAVAILABLE,
                    anyhow!("loading [front] client_ca and crls: {err}"),
                )
            })?,
        )),
        None => None,
    };
    let local_addrs = |listeners: &[TcpListener]| {
        listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| unavailable(e.into()))
    };
    let locals = local_addrs(&listeners)?;
    let front_locals = local_addrs(&front_listeners)?;
    // Signals are ours before anything is announced (the address line, READY=1).
    let signals = daemon::Signals::install()
        .context("installing signal handlers")
        .map_err(unavailable)?;
    let status_listener: Option<status::Listener> = match &deploy.status_listen {
        Some(StatusListen::Tcp(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the status listener {addr}"))
                .map_err(unavailable)?
                .into(),
        ),
        Some(StatusListen::Unix(path)) => Some(
            status::bind_unix(path, deploy.status_socket_mode)
                .with_context(|| format!("binding the status socket {}", path.display()))
                .map_err(unavailable)?
                .into(),
        ),
        None => None,
    };
    let metrics_listener = match &deploy.metrics_listen {
        Some(listen) => Some(
            MetricsListener::bind(listen)
                .await
                .map_err(|e| unavailable(e.into()))?,
        ),
        None => None,
    };
    let shutdown = Shutdown::new();
    let mut server = match server_tls {
        Some(server_tls) => Server::new(config.clone(), server_tls, shutdown.clone()),
        None => Server::front_only(config.clone(), shutdown.clone()),
    };
    if let Some(crls) = front_crls {
        server = server.with_front_crls(crls);
    }
    let joined = |addrs: &[std::net::SocketAddr]| {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    if let (Some(identity), Some(tls)) = (&identity, &deploy.tls) {
        // `bind_listen` returns at least one listener; the first names the URL.
        let first = locals.first().map_or_else(String::new, ToString::to_string);
        tracing::info!(
            listen = joined(&locals),
            url = format!("wss://{first}{}<id>", config.url_prefix),
            server = %identity,
            client_auth = ?tls.client_auth.unwrap_or(DEFAULT_CLIENT_AUTH),
            rules = !config.rules.is_empty(),
            on_partner_leave = ?config.on_partner_leave,
            "serving"
        );
    }
    if let Some(peers) = &config.front {
        let front_listen = match &deploy.front_listen {
            Some(FrontListen::Unix(path)) => format!("unix:{}", path.display()),
            _ => joined(&front_locals),
        };
        tracing::info!(
            front_listen,
            front_crls = deploy.front_crls.is_some(),
            %peers,
            rules = !config.rules.is_empty(),
            on_partner_leave = ?config.on_partner_leave,
            "serving the front: plain HTTP, client identity from the X-Client-Cert header of these peers only"
        );
    }
    if let Some(listener) = status_listener {
        match &listener {
            status::Listener::Tcp(tcp) => {
                let addr = tcp.local_addr().map_err(|e| unavailable(e.into()))?;
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
    let metrics_addr = metrics_listener.as_ref().map(|m| m.addr().clone());
    if let Some(listener) = metrics_listener {
        let scraping = server.clone();
        let families = server.metrics().shared.clone();
        let scrape = Arc::new(move || scraping.metrics().encode());
        tokio::spawn(listener.serve(scrape, families, shutdown.clone()));
    }
    if print_address {
        for local in &locals {
            common::daemon::announce(format_args!("listening on {local}"));
        }
        for local in &front_locals {
            common::daemon::announce(format_args!("front listening on {local}"));
        }
        if let Some(addr) = metrics_addr {
            common::daemon::announce(format_args!("metrics on {addr}"));
        }
    }
    let mut accepts: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let serving = server.clone();
            tokio::spawn(async move { serving.serve(listener).await })
        })
        .collect();
    accepts.extend(front_listeners.into_iter().map(|listener| {
        let serving = server.clone();
        tokio::spawn(async move { serving.serve_front(listener).await })
    }));
    if let Some(listener) = front_socket {
        let serving = server.clone();
        accepts.push(tokio::spawn(async move {
            serving.serve_front_unix(listener).await
        }));
    }
    let reloading = server.clone();
    let drained = daemon::supervise(
        signals,
        &shutdown,
        deploy.drain_grace,
        "relaying",
        move || {
            // common::tls logs what was reloaded; the new certificate must still name us.
            reloading.reload()?;
            if let Some(tls) = reloading.tls() {
                tls.server_identity()?;
            }
            Ok(())
        },
    )
    .await;
    for accept in accepts {
        let _ = accept.await;
    }
    Ok(if drained { 0 } else { exit::SOFTWARE })
}

#[expect(clippy::print_stdout, reason = "the summary is the command's output")]
async fn check_config(config: Config, deploy: Deployment) -> Result<(), Failure> {
    tls::install_default_provider();
    let resolve = |key: &'static str, listen: ListenAddr| async move {
        let addrs = listen
            .resolve()
            .await
            .map_err(|err| Failure::new(exit::UNAVAILABLE, anyhow!("{key} {listen}: {err}")))?;
        let addrs = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        Ok::<_, Failure>(format!("{key} {listen} ({addrs})"))
    };
    let mut parts = Vec::new();
    if let (Some(tls), Some(listen)) = (&deploy.tls, &deploy.listen) {
        let identity = load_tls(tls)?
            .server_identity()
            .map_err(|err| Failure::new(exit::UNAVAILABLE, anyhow!("TLS material: {err}")))?;
        parts.push(resolve("listen", listen.clone()).await?);
        parts.push(format!(
            "url wss://HOST:PORT{}ID, server {identity}",
            config.url_prefix
        ));
    }
    match (&deploy.front_listen, &config.front) {
        (Some(FrontListen::Tcp(listen)), Some(peers)) => {
            parts.push(resolve("front listen", listen.clone()).await?);
            parts.push(format!("front peers {peers}"));
        }
        (Some(FrontListen::Unix(path)), Some(peers)) => {
            parts.push(format!("front listen unix:{}", path.display()));
            parts.push(format!("front peers {peers}"));
        }
        _ => {}
    }
    if let Some((ca, crls)) = &deploy.front_crls {
        tls::Crls::load(ca.clone(), crls.clone()).map_err(|err| {
            Failure::new(
                exit::UNAVAILABLE,
                anyhow!("loading [front] client_ca and crls: {err}"),
            )
        })?;
        parts.push(format!("front crls {}", crls.len()));
    }
    println!(
        "configuration ok: {}, {} authorization rule set, on_partner_leave {:?}",
        parts.join(", "),
        if config.rules.is_empty() { "no" } else { "an" },
        config.on_partner_leave,
    );
    Ok(())
}

/// Descriptors the daemon may need: one per connection (authenticated, in the handshake,
/// on the status listener) and a margin for listeners, the runtime and files being read.
fn fds_needed(config: &Config) -> u64 {
    let limits = &config.limits;
    let connections = config
        .max_connections
        .saturating_add(limits.max_handshakes)
        .saturating_add(limits.max_status_connections);
    u64::try_from(connections)
        .unwrap_or(u64::MAX)
        .saturating_add(FD_MARGIN)
}

/// Descriptors beyond the connections: listeners, epoll, signal pipes, TLS files on reload.
const FD_MARGIN: u64 = 64;

/// Raises the soft open-file limit to the hard limit (as servers commonly do), logs the limit
/// reached, and warns only when that is still below `needed`.
fn raise_fd_limit(needed: u64) {
    use rlimit::Resource;
    let (soft, hard) = match Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(err) => {
            tracing::warn!(%err, "cannot read the open-file limit");
            return;
        }
    };
    let limit = if soft < hard {
        match Resource::NOFILE.set(hard, hard) {
            Ok(()) => hard,
            // An unlimited hard limit is above what the kernel takes (nr_open): ask for what
            // is needed instead.
            Err(err) => rlimit::increase_nofile_limit(needed).unwrap_or_else(|_| {
                tracing::warn!(%err, soft, hard, "cannot raise the open-file limit");
                soft
            }),
        }
    } else {
        soft
    };
    tracing::info!(limit, needed, "open-file limit");
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what max_connections needs (one per connection, tls.max_handshakes, max_status_connections and 64); raise LimitNOFILE or lower max_connections"
        );
    }
}
