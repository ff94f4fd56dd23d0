//! Glue every daemon's `main` shares: tracing, layered configuration, signals, systemd
//! notifications and draining.
//!
//! Libraries never call into this module's signal or environment parts; only binaries do. The
//! library side sees a [`Shutdown`] handle, which tests trigger directly.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;

pub use crate::exit;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `journal` under systemd, coloured `text` on a terminal, plain `text` otherwise.
    #[default]
    Auto,
    /// Human-readable lines with timestamps.
    Text,
    /// Plain lines without timestamps or colours (the journal adds its own).
    Journal,
    /// One JSON object per line.
    Json,
}

/// Logging flags every daemon flattens into its clap arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, or `info,<crate>=debug` for one crate (overrides `RUST_LOG`).
    /// rustls's SNI warnings (a client naming an IP address) are errors-only unless the filter
    /// names `rustls`.
    #[arg(long = "log", value_name = "FILTER", global = true)]
    pub log_filter: Option<String>,
}

impl LogArgs {
    /// These flags, with `file_filter` (the configuration file's `log` key) where no
    /// `--log` flag gave a filter.
    #[must_use]
    pub fn or_file(&self, file_filter: Option<&String>) -> Self {
        let mut log = self.clone();
        if log.log_filter.is_none() {
            log.log_filter = file_filter.cloned();
        }
        log
    }
}

/// rustls warns "Illegal SNI extension: ignoring IP address presented as hostname" for every
/// client that dials an IP address and names it in SNI (curl, Python, `openssl s_client` do;
/// RFC 6066 forbids it, rustls ignores it): expected input, not a warning. The module that
/// logs it (and its other SNI complaints, which strangers can repeat at will) is lowered to
/// errors unless the filter names a `rustls` target itself.
const QUIET_RUSTLS_SNI: &str = "rustls::msgs::handshake=error";

/// `filter` with [`QUIET_RUSTLS_SNI`] added, unless one of its directives names rustls.
fn quiet_rustls_sni(filter: &str) -> String {
    let names_rustls = filter
        .split(',')
        .any(|directive| directive.trim().starts_with("rustls"));
    match filter.trim() {
        _ if names_rustls => filter.to_owned(),
        "" => QUIET_RUSTLS_SNI.to_owned(),
        _ => format!("{filter},{QUIET_RUSTLS_SNI}"),
    }
}

/// Sets up the global tracing subscriber; call once, first thing in `main`.
///
/// The filter is `filter`, else `RUST_LOG`, else `default_filter`; whichever it is, rustls's
/// SNI warnings are lowered to errors unless it names a `rustls` target
/// ([`QUIET_RUSTLS_SNI`]).
///
/// # Errors
/// An invalid filter directive.
pub fn init_tracing(args: &LogArgs, default_filter: &str) -> anyhow::Result<()> {
    let filter = match &args.log_filter {
        Some(filter) => EnvFilter::try_new(quiet_rustls_sni(filter))?,
        None => std::env::var(EnvFilter::DEFAULT_ENV)
            .ok()
            .and_then(|env| EnvFilter::try_new(quiet_rustls_sni(&env)).ok())
            .map_or_else(|| EnvFilter::try_new(quiet_rustls_sni(default_filter)), Ok)?,
    };
    let format = match args.log_format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journal,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `json` escapes by itself; the line formats escape control characters in every field.
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Journal => builder
            .fmt_fields(crate::log::EscapingFields)
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .try_init(),
        LogFormat::Auto | LogFormat::Text => builder
            .fmt_fields(crate::log::EscapingFields)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the tracing subscriber: {e}"))
}

/// Errors from loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this daemon (unknown keys are errors).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause, with line and column.
        source: toml::de::Error,
    },
    /// A value is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The tail of a daemon's `main` once its configuration is valid: sets up tracing (exit 64 on
/// a bad filter), builds the multi-thread runtime (exit 70 if it cannot) and runs `main` on
/// it. Errors are printed as `name: error`.
pub fn run_daemon<F, Fut>(name: &str, log: &LogArgs, main: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::process::ExitCode>,
{
    if let Err(err) = init_tracing(log, "info") {
        eprintln!("{name}: {err:#}");
        return std::process::ExitCode::from(exit::USAGE);
    }
    run_daemon_on(name, crate::cli::Flavor::MultiThread, main)
}

/// [`run_daemon`] for a daemon that set up tracing itself and chose its runtime's threads.
pub fn run_daemon_on<F, Fut>(
    name: &str,
    flavor: crate::cli::Flavor,
    main: F,
) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::process::ExitCode>,
{
    match flavor.build() {
        Ok(runtime) => {
            let code = runtime.block_on(main());
            // Dropping the runtime would wait for every blocking task; one stuck in a system
            // call (a read from a hung NFS server) must not keep a stopped daemon alive.
            runtime.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Err(err) => {
            eprintln!("{name}: starting the runtime: {err}");
            std::process::ExitCode::from(exit::SOFTWARE)
        }
    }
}

/// Prints one line on stdout for whoever started the daemon (`--print-address`'s "listening
/// on ..."). A reader that has gone (`| head -1` that already exited, a closed descriptor) must
/// not stop a daemon that is serving: the line is then dropped, noted at debug.
pub fn announce(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(err) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        tracing::debug!(%err, "stdout is gone; the announcement is dropped");
    }
}

/// A daemon's start-up failure before tracing runs: prints `name: message` on stderr and gives
/// the exit code, for `main` to return.
pub fn fail(name: &str, code: u8, message: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{name}: {message}");
    std::process::ExitCode::from(code)
}

/// A daemon's configuration file ([`load_toml`]); on failure `name: error` is printed and the
/// exit code is 78 ([`exit::CONFIG`]).
///
/// # Errors
/// The exit code for `main` to return.
pub fn load_config<T: DeserializeOwned + Default>(
    name: &str,
    path: Option<&Path>,
) -> Result<T, std::process::ExitCode> {
    load_toml(path).map_err(|err| fail(name, exit::CONFIG, err))
}

/// A configuration that did not validate: prints `name: invalid configuration: error` and gives
/// exit code 78 ([`exit::CONFIG`]).
pub fn invalid_config(name: &str, err: impl std::fmt::Display) -> std::process::ExitCode {
    fail(
        name,
        exit::CONFIG,
        format_args!("invalid configuration: {err}"),
    )
}

/// The exit code of a daemon whose drain ended: 0 when every task finished within the grace
/// period, 70 ([`exit::SOFTWARE`]) when some were still running.
pub fn drained_exit(drained: bool) -> std::process::ExitCode {
    if drained {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(exit::SOFTWARE)
    }
}

/// Parses a TOML configuration file; without a path the type's defaults are used.
///
/// The target type should carry `#[serde(deny_unknown_fields, default)]` so a misspelt key is
/// an error and a missing one takes its default.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`].
pub fn load_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Parses TOML text into a configuration type.
///
/// # Errors
/// Syntax errors, wrong types and unknown keys.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str(text)
}

pub use crate::secret::secret_mode_ok;

/// Binds a Unix socket at `path` with `mode`. A stale socket file (nobody accepting on it) is
/// replaced; a live one, or a path that is not a socket, is an error, so two daemons never
/// share a path. The directory, and who may reach it, are the caller's.
///
/// # Errors
/// The path is not a socket, a process accepts on it, or binding fails.
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::AddrInUse,
                        format!("another process is accepting on {}", path.display()),
                    ));
                }
                Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale socket file");
                    std::fs::remove_file(path)?;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Writes `contents` to a new file at `path` that only its owner can read (0600 from the
/// moment it exists, whatever the umask), and syncs it to disk. An existing file is never
/// overwritten.
///
/// # Errors
/// The file exists or cannot be created or written.
pub fn write_new_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The umask can only have removed bits from 0600; make it exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Makes sure a private file (a daemon's SQLite database) exists before anything opens it:
/// missing parent directories are created with `dir_mode` (less the umask), then the file with
/// mode 0600 and nothing in it, so it is never readable by others for a moment. An existing
/// file is kept as it is (never truncated, its mode untouched) if it is safe to trust.
///
/// What another local user may have planted is refused, since the file is later opened by
/// name (SQLite, and its `-wal`/`-shm` files beside it): the directory must be this process's
/// own or root's and writable by nobody else (then nobody else can put or swap a file in it),
/// and an existing file must be a regular file (not a symbolic link), this process's own, and
/// writable by nobody else.
///
/// # Errors
/// A directory or the file cannot be created, or one of them is not safe to trust
/// (`PermissionDenied`, naming the path, its owner and its mode).
pub fn create_private_file(path: &Path, dir_mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
    let euid = rustix::process::geteuid().as_raw();
    let untrusted = |what: &Path, meta: &std::fs::Metadata, why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing {}: {why} (owner uid {}, mode {:o})",
                what.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        )
    };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(parent)?;
    }
    check_trusted_dir(
        parent.unwrap_or(Path::new(".")),
        "the directory of a private file must be ours or root's and writable by nobody else",
    )?;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_file() {
                return Err(untrusted(path, &meta, "not a regular file"));
            }
            if meta.uid() != euid || meta.mode() & 0o022 != 0 {
                return Err(untrusted(
                    path,
                    &meta,
                    "a private file must be ours and writable by nobody else",
                ));
            }
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// Checks that nobody but this process's user (or root) can put, remove or swap a file in
/// `dir`: it belongs to us or to root, and neither its group nor others may write to it.
/// Used before a private file or a socket whose path is trusted is made in it.
///
/// # Errors
/// `PermissionDenied` naming the directory, its owner and mode, and `why`; or the directory
/// cannot be read.
pub fn check_trusted_dir(dir: &Path, why: &str) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let euid = rustix::process::geteuid().as_raw();
    let meta = std::fs::metadata(dir)?;
    if (meta.uid() != euid && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing {}: {why} (owner uid {}, mode {:o})",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Checks every directory above `dir`, up to `/`: who may write to one of them may rename
/// the path below it away and put a directory of their own in its place (then a socket or
/// file made in `dir` is theirs to stand in for). Each belongs to us or to root, and neither
/// its group nor others may write to it unless its sticky bit is set (as `/tmp`: there only
/// an entry's owner may rename it, and the entry below is checked in turn). Both the path as
/// given (made absolute; a symbolic link on it must be ours or root's too) and its canonical
/// form are checked, `dir` included: a stranger's symbolic link as `dir` itself, in a sticky
/// directory, is one its owner may point elsewhere at any time.
///
/// # Errors
/// `PermissionDenied` naming the first directory (or link) that fails, its owner and mode,
/// and `why`; or a directory cannot be read.
pub fn check_trusted_ancestors(dir: &Path, why: &str) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let euid = rustix::process::geteuid().as_raw();
    let refuse = |path: &Path, meta: &std::fs::Metadata| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing {}: {why} (owner uid {}, mode {:o})",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        )
    };
    let ours = |meta: &std::fs::Metadata| meta.uid() == euid || meta.uid() == 0;
    let absolute = std::path::absolute(dir)?;
    let canonical = std::fs::canonicalize(dir)?;
    for path in absolute.ancestors().chain(canonical.ancestors()) {
        let link = std::fs::symlink_metadata(path)?;
        if link.file_type().is_symlink() && !ours(&link) {
            return Err(refuse(path, &link));
        }
        let meta = std::fs::metadata(path)?;
        let open = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
        if !ours(&meta) || open {
            return Err(refuse(path, &meta));
        }
    }
    Ok(())
}

/// Replaces `slot` with `value` when a flag or environment variable was given.
pub fn overlay<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

/// Tells connection tasks to stop and waits for them: the library side of shutdown.
///
/// Cloning shares the handle. Daemons spawn connection tasks with [`Shutdown::spawn`] so that
/// [`Shutdown::drain`] can wait for them.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh, untriggered handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop; idempotent.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has been asked for.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown has been asked for.
    pub fn triggered(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    /// Spawns a task that [`Shutdown::drain`] waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Number of tracked tasks still running.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// Triggers shutdown and waits up to `grace` for tracked tasks; `true` if all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.trigger();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// How [`serve_http1`] serves one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http1 {
    /// Time a request head may take to arrive (hyper's `header_read_timeout`), the first
    /// one's and every keep-alive one's.
    pub header_timeout: Duration,
    /// Largest read buffer, which bounds a request head; `None`: hyper's default.
    pub max_buf_size: Option<usize>,
    /// The connection closes after the request in progress at this age; `None`: no limit.
    pub max_age: Option<Duration>,
    /// After shutdown, the time the request in progress gets to finish.
    pub drain: Duration,
}

/// Serves HTTP/1.1 on one connection with `service` until it ends: the one connection loop of
/// the daemons' HTTP servers. The connection closes after the request in progress at
/// [`Http1::max_age`], on shutdown (given [`Http1::drain`] to finish) and when `close_soon`
/// completes; it is dropped at once when `abort` completes (a login deadline). Pass
/// [`std::future::pending`] for an end that does not apply.
pub async fn serve_http1<IO, S, B>(
    io: IO,
    service: S,
    http: Http1,
    shutdown: &Shutdown,
    close_soon: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(http.header_timeout);
    if let Some(size) = http.max_buf_size {
        builder.max_buf_size(size);
    }
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    drive_http_until(
        conn,
        |c| c.graceful_shutdown(),
        http.max_age,
        shutdown,
        http.drain,
        close_soon,
        abort,
    )
    .await;
}

/// Drives one HTTP connection (hyper's, pinned) to its end. At `max_age` (none: no limit) and
/// on shutdown it is asked to close after the request in progress (`graceful`, since hyper's
/// connection types share no trait); after shutdown it gets `drain` to finish.
pub async fn drive_http<C, E>(
    conn: std::pin::Pin<&mut C>,
    graceful: impl FnMut(std::pin::Pin<&mut C>),
    max_age: Option<Duration>,
    shutdown: &Shutdown,
    drain: Duration,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    drive_http_until(
        conn,
        graceful,
        max_age,
        shutdown,
        drain,
        std::future::pending(),
        std::future::pending(),
    )
    .await;
}

/// [`drive_http`], also closing after the request in progress when `close_soon` completes and
/// dropping the connection at once when `abort` does.
pub async fn drive_http_until<C, E>(
    mut conn: std::pin::Pin<&mut C>,
    mut graceful: impl FnMut(std::pin::Pin<&mut C>),
    max_age: Option<Duration>,
    shutdown: &Shutdown,
    drain: Duration,
    close_soon: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let too_old = tokio::time::sleep(max_age.unwrap_or(Duration::MAX / 4));
    tokio::pin!(too_old, close_soon, abort);
    // Once asked to close, it is not asked again (and a completed future is not polled again).
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%err, "http connection ended");
                }
                return;
            }
            () = &mut too_old, if !closing && max_age.is_some() => {
                tracing::debug!(?max_age, "closing after the request in progress: max_connection_age reached");
                closing = true;
                graceful(conn.as_mut());
            }
            () = &mut close_soon, if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            () = &mut abort => return,
            () = shutdown.triggered() => {
                graceful(conn.as_mut());
                let _ = tokio::time::timeout(drain, conn).await;
                return;
            }
        }
    }
}

/// A process signal that ends the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: systemd's stop.
    Term,
    /// SIGINT: Ctrl-C.
    Interrupt,
}

/// Waits for SIGTERM or SIGINT.
///
/// # Errors
/// The signal handlers could not be installed.
pub async fn stop_signal() -> std::io::Result<StopSignal> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => StopSignal::Term,
        _ = int.recv() => StopSignal::Interrupt,
    })
}

/// systemd notifications; every call is a no-op outside systemd (no `NOTIFY_SOCKET`).
pub mod systemd {
    use sd_notify::NotifyState;

    fn send(states: &[NotifyState<'_>]) {
        if let Err(err) = sd_notify::notify(false, states) {
            tracing::debug!(%err, "systemd notification failed");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `RELOADING=1` with the monotonic timestamp `Type=notify-reload` wants.
    pub fn reloading() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }

    /// `STOPPING=1`.
    pub fn stopping() {
        send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    /// `STATUS=...`.
    pub fn status(status: &str) {
        send(&[NotifyState::Status(status)]);
    }
}

/// The daemon's SIGTERM, SIGINT and SIGHUP handlers.
///
/// Install them before the daemon announces itself (binds, prints its address, tells systemd
/// it is ready): from then on those signals are queued for [`supervise`] instead of taking
/// their default action, which would end the process without a drain.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// The signal handlers could not be installed.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// [`Signals::install`] in a daemon's `main`: on failure `name: signals: error` is printed
    /// and the exit code is 70 ([`exit::SOFTWARE`]).
    ///
    /// # Errors
    /// The exit code for `main` to return.
    pub fn install_for(name: &str) -> Result<Self, std::process::ExitCode> {
        Self::install().map_err(|err| fail(name, exit::SOFTWARE, format_args!("signals: {err}")))
    }
}

/// Runs the signal loop of a daemon's `main` until SIGTERM or SIGINT, then drains.
///
/// Sends `READY=1` first; on SIGHUP calls `reload` between `RELOADING=1` and `READY=1` and logs
/// the outcome (a failed reload keeps the old state, which `reload` must guarantee). What was
/// reloaded is logged by what reloaded it ([`crate::tls::ServerTls::reload`] names its files);
/// this line says only that the reload is over and that the configuration file was not read. On a stop
/// signal it sends `STOPPING=1`, triggers `shutdown` and waits up to `grace` for its tasks.
/// Returns whether the drain finished in time.
pub async fn supervise<R>(
    mut signals: Signals,
    shutdown: &Shutdown,
    grace: Duration,
    ready_status: &str,
    mut reload: R,
) -> bool
where
    R: FnMut() -> anyhow::Result<()>,
{
    let Signals { term, int, hup } = &mut signals;
    systemd::ready(ready_status);
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(signal = ?StopSignal::Term, grace_secs = grace.as_secs_f64(), "stopping: draining connections");
                break;
            }
            _ = int.recv() => {
                tracing::info!(signal = ?StopSignal::Interrupt, grace_secs = grace.as_secs_f64(), "stopping: draining connections");
                break;
            }
            () = shutdown.triggered() => {
                tracing::info!("stopping: shutdown requested internally");
                break;
            }
            _ = hup.recv() => {
                systemd::reloading();
                match reload() {
                    // What was reloaded is logged where it was (`ServerTls::reload`).
                    Ok(()) => tracing::info!("reload done; the configuration file is read only at start"),
                    Err(err) => tracing::error!(err = format!("{err:#}"), "reload failed; keeping the previous material"),
                }
                systemd::ready(ready_status);
            }
        }
    }
    systemd::stopping();
    let drained = shutdown.drain(grace).await;
    if drained {
        tracing::info!("drained");
    } else {
        tracing::warn!(
            remaining = shutdown.active(),
            "grace period over; closing remaining connections"
        );
    }
    drained
}

/// Doubling back-off for accept errors (EMFILE and friends), capped at one second.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// Records a failure and sleeps for the next back-off step.
    pub async fn failed(&mut self, err: &std::io::Error) {
        self.failures = self.failures.saturating_add(1);
        let millis = 5u64.saturating_mul(1 << self.failures.min(8)).min(1000);
        tracing::warn!(%err, backoff_ms = millis, "accept failed");
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }

    /// Records a success.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The next connection `accept` yields, or `None` once `shutdown` is triggered. A failed
    /// accept (EMFILE and friends) is logged and backed off, never returned: an accept loop
    /// does not end on one bad peer.
    pub async fn next<T, F>(
        &mut self,
        shutdown: &Shutdown,
        mut accept: impl FnMut() -> F,
    ) -> Option<T>
    where
        F: Future<Output = std::io::Result<T>>,
    {
        loop {
            tokio::select! {
                accepted = accept() => match accepted {
                    Ok(conn) => {
                        self.succeeded();
                        return Some(conn);
                    }
                    Err(err) => self.failed(&err).await,
                },
                () = shutdown.triggered() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {

    /// Second attack pass on the front socket: a stranger's symbolic link in a sticky
    /// directory, naming a directory of root's, as the socket's directory itself. Its owner
    /// may delete it (the sticky bit lets an entry's owner do that) and point it elsewhere.
    #[test]
    fn a_strangers_link_as_the_directory_itself_is_refused() {
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("skipped: needs root to give a link to another user");
            return;
        }
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let sticky = root.path().join("st");
        let target = root.path().join("run");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = sticky.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // Ours (root's), the link is accepted: the directories around it are root's.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        check_trusted_ancestors(&link, "test").expect("root's link");
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let err = check_trusted_ancestors(&link, "test").expect_err("a stranger's link");
        assert!(err.to_string().contains("link"), "{err}");
    }
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        port: u16,
        name: String,
    }

    #[test]
    fn rustls_sni_warnings_are_quiet_unless_the_filter_names_rustls() {
        for (filter, expected) in [
            ("info", "info,rustls::msgs::handshake=error"),
            (
                "warn,broker=debug",
                "warn,broker=debug,rustls::msgs::handshake=error",
            ),
            ("", "rustls::msgs::handshake=error"),
            ("info,rustls=warn", "info,rustls=warn"),
            ("info,rustls::msgs=trace", "info,rustls::msgs=trace"),
        ] {
            assert_eq!(quiet_rustls_sni(filter), expected, "{filter:?}");
            assert!(EnvFilter::try_new(quiet_rustls_sni(filter)).is_ok());
        }
    }

    #[test]
    fn toml_defaults_overrides_and_unknown_keys() {
        let parsed: Sample = parse_toml("port = 7").unwrap();
        assert_eq!(
            parsed,
            Sample {
                port: 7,
                name: String::new()
            }
        );
        let err = parse_toml::<Sample>("prot = 7").unwrap_err().to_string();
        assert!(err.contains("unknown field `prot`"), "{err}");
        let mut port = 7;
        overlay(&mut port, Some(9));
        overlay(&mut port, None);
        assert_eq!(port, 9);
        assert_eq!(load_toml::<Sample>(None).unwrap(), Sample::default());
    }

    #[test]
    fn tls_section_parses_with_defaults_and_rejects_unknown_keys() {
        use crate::tls::{ClientAuth, TlsSection};
        let section: TlsSection = parse_toml("cert = \"a.pem\"\ncrls = [\"c.pem\"]").unwrap();
        assert_eq!(section.handshake_timeout_secs, 10);
        let files = section.files(ClientAuth::Required, Vec::new());
        assert_eq!(files.client_auth, ClientAuth::Required);
        assert_eq!(files.crls.len(), 1);
        let section: TlsSection = parse_toml("cert = \"a.pem\"\nclient_auth = \"off\"").unwrap();
        assert_eq!(
            section.files(ClientAuth::Required, Vec::new()).client_auth,
            ClientAuth::Off
        );
        assert!(parse_toml::<TlsSection>("cert = \"a\"\nclient-ca = \"x\"").is_err());
    }

    #[test]
    fn start_up_helpers_keep_the_exit_codes() {
        use std::process::ExitCode;
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "nope = ").unwrap();
        #[derive(Debug, Default, serde::Deserialize)]
        struct File {
            log: Option<String>,
        }
        assert_eq!(
            load_config::<File>("t", Some(&bad)).unwrap_err(),
            ExitCode::from(exit::CONFIG)
        );
        assert!(load_config::<File>("t", None).unwrap().log.is_none());
        assert_eq!(invalid_config("t", "x"), ExitCode::from(exit::CONFIG));
        assert_eq!(drained_exit(true), ExitCode::SUCCESS);
        assert_eq!(drained_exit(false), ExitCode::from(exit::SOFTWARE));
        // The flag wins over the file; the file fills in.
        let flags = LogArgs::default();
        let file = Some("debug".to_owned());
        assert_eq!(
            flags.or_file(file.as_ref()).log_filter.as_deref(),
            Some("debug")
        );
        let flags = LogArgs {
            log_filter: Some("warn".into()),
            ..LogArgs::default()
        };
        assert_eq!(
            flags.or_file(file.as_ref()).log_filter.as_deref(),
            Some("warn")
        );
        assert_eq!(flags.or_file(None).log_filter.as_deref(), Some("warn"));
    }

    #[test]
    fn private_files_are_new_and_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_new_private(&path, b"s3cret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"s3cret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_new_private(&path, b"other").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"s3cret");
    }

    #[test]
    fn private_files_are_created_0600_in_new_directories_and_kept_when_they_exist() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("state/db/store.sqlite");
        create_private_file(&path, 0o700).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(mode(&dir.path().join("state")), 0o700);
        assert_eq!(mode(&dir.path().join("state/db")), 0o700);
        // An existing file (already written, perhaps chmod-ed by its operator) is kept.
        std::fs::write(&path, b"rows").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        create_private_file(&path, 0o700).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"rows");
        assert_eq!(mode(&path), 0o640);
        // A bare file name needs no directory.
        let here = dir.path().join("bare.sqlite");
        create_private_file(&here, 0o700).unwrap();
        assert_eq!(mode(&here), 0o600);
        // A parent that is a file is an error, not a panic.
        let blocked = dir.path().join("bare.sqlite/x.sqlite");
        assert!(create_private_file(&blocked, 0o700).is_err());
    }

    /// What another local user could have planted before the first start is refused: a file
    /// others may write, a symbolic link, a directory others may write.
    #[test]
    fn planted_private_files_and_open_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let refused = |p: &Path| {
            let err = create_private_file(p, 0o700).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
            err.to_string()
        };
        let planted = dir.path().join("planted.sqlite");
        std::fs::write(&planted, b"").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(refused(&planted).contains("mode 666"));

        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"").unwrap();
        let link = dir.path().join("link.sqlite");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(refused(&link).contains("not a regular file"));
        assert_eq!(std::fs::metadata(&victim).unwrap().len(), 0);

        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(refused(&open.join("store.sqlite")).contains("directory"));
        assert!(!open.join("store.sqlite").exists());
    }

    #[test]
    fn secret_modes() {
        let creds = Path::new("/run/credentials/x.service");
        let inside = creds.join("key");
        let outside = Path::new("/etc/x/key");
        assert!(secret_mode_ok(outside, 0o100600, None));
        assert!(secret_mode_ok(outside, 0o100400, Some(creds)));
        assert!(!secret_mode_ok(outside, 0o100640, Some(creds)));
        assert!(!secret_mode_ok(outside, 0o100604, None));
        assert!(secret_mode_ok(&inside, 0o100440, Some(creds)));
        assert!(!secret_mode_ok(&inside, 0o100440, None));
        assert!(!secret_mode_ok(&inside, 0o100460, Some(creds)));
        assert!(!secret_mode_ok(&inside, 0o100444, Some(creds)));
    }

    /// One connection served by [`serve_http1`] with a service answering "hi", and the client
    /// end of it.
    async fn http1_pair(
        http: Http1,
        shutdown: &Shutdown,
        close_soon: impl Future<Output = ()> + Send + 'static,
        abort: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("hi")))
            });
            serve_http1(server, service, http, &stop, close_soon, abort).await;
        });
        client
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n";

    /// Sends a GET and reads one answer (up to its "hi" body).
    async fn get(client: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        client.write_all(GET).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 512];
        while !answer.ends_with(b"hi") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Whether the server closes the connection within `within`.
    async fn closes(client: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 512];
        matches!(
            tokio::time::timeout(within, client.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn serve_http1_keeps_alive_and_ends_every_way_it_should() {
        use std::future::pending;
        let http = Http1 {
            header_timeout: Duration::from_secs(5),
            max_buf_size: Some(16 * 1024),
            max_age: None,
            drain: Duration::from_secs(5),
        };
        let long = Duration::from_secs(5);
        let shutdown = Shutdown::new();

        // Keep-alive: two requests on one connection, then shutdown closes it.
        let mut client = http1_pair(http, &shutdown, pending(), pending()).await;
        assert!(get(&mut client).await.starts_with("HTTP/1.1 200"));
        assert!(get(&mut client).await.starts_with("HTTP/1.1 200"));

        // A silent client meets the header timeout.
        let quick = Http1 {
            header_timeout: Duration::from_millis(200),
            ..http
        };
        let mut silent = http1_pair(quick, &shutdown, pending(), pending()).await;
        assert!(closes(&mut silent, long).await);

        // At its age the connection closes after the request in progress.
        let aging = Http1 {
            max_age: Some(Duration::from_millis(200)),
            ..http
        };
        let mut old = http1_pair(aging, &shutdown, pending(), pending()).await;
        assert!(get(&mut old).await.starts_with("HTTP/1.1 200"));
        assert!(closes(&mut old, long).await);

        // `close_soon` closes it the same way; `abort` drops it at once.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tied = http1_pair(
            http,
            &shutdown,
            async move {
                let _ = rx.await;
            },
            pending(),
        )
        .await;
        assert!(get(&mut tied).await.starts_with("HTTP/1.1 200"));
        tx.send(()).unwrap();
        assert!(closes(&mut tied, long).await);
        let mut aborted = http1_pair(
            http,
            &shutdown,
            pending(),
            tokio::time::sleep(Duration::from_millis(100)),
        )
        .await;
        assert!(closes(&mut aborted, long).await);

        // Shutdown: the idle keep-alive connection closes and every task ends.
        assert!(shutdown.drain(long).await);
        assert!(closes(&mut client, long).await);
    }

    #[tokio::test]
    async fn drain_waits_for_tasks_and_times_out() {
        let shutdown = Shutdown::new();
        let watcher = shutdown.clone();
        shutdown.spawn(async move {
            watcher.triggered().await;
        });
        assert!(shutdown.drain(Duration::from_secs(5)).await);

        let stuck = Shutdown::new();
        stuck.spawn(std::future::pending::<()>());
        assert!(!stuck.drain(Duration::from_millis(50)).await);
        assert_eq!(stuck.active(), 1);
    }
}
