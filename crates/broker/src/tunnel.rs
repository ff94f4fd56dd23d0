//! The user's end of `broker-cli connect`: a local listener that, for each connection, opens
//! the job's port (directly, or through an `ssh -L` forward started by [`Ssh::forward`]),
//! proves the user's right to it (the magic key line in ssh mode, the owner's client
//! certificate in ssl mode, checking that the server is the job's own certificate) and then
//! splices bytes both ways. Also runs `broker-cli` on another host over ssh
//! ([`Ssh::run_cli`]) for `--host`.
//!
//! Whoever reaches the local listener uses the job as the user, and whoever listens where the
//! tunnel connects receives the key line, so both ends live where only the user can reach
//! them (SECURITY.md, invariant 6): the listener is a Unix socket in a 0700 directory
//! ([`private_dir`]) unless a TCP port is asked for, and then a loopback peer is served only
//! when its socket belongs to the user's uid ([`crate::peer`]); the ssh forward ends in a
//! Unix socket in the same directory, and ssh's readiness is learnt from ssh itself (its
//! control socket answers `ssh -O check`), never from "something accepts a connection".
//!
//! It never reads argv, the environment or signals: the binary hands it a [`Shutdown`]. It
//! never logs the secret, and it never runs a local shell: ssh gets its arguments as a vector,
//! and the one string the remote shell sees is built from validated, quoted words
//! ([`remote_command`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::{AcceptBackoff, Shutdown};
use common::tls::{ClientTlsPem, Pem, TlsError};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::api::{Job, JobSummary, JobType};

/// Deadline for connecting to the target and for writing the magic key.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the TLS handshake with the job's application (or its gate).
pub const HANDSHAKE_TIMEOUT: Duration = common::tls::DEFAULT_HANDSHAKE_TIMEOUT;
/// Local connections served at once; more are closed straight away.
pub const MAX_CONNECTIONS: usize = 256;
/// How long an `ssh -L` forward may take to start listening.
pub const FORWARD_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one `ssh -O check` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The local socket's name in the private directory.
pub const LOCAL_SOCKET: &str = "tunnel.sock";
/// The ssh forward's socket and ssh's control socket there.
const FORWARD_SOCKET: &str = "fwd.sock";
const CONTROL_SOCKET: &str = "ctl.sock";
/// How long `broker-cli` on the remote host may take, ssh login included.
pub const REMOTE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long ssh gets to exit after SIGTERM before it is killed.
const SSH_STOP_GRACE: Duration = Duration::from_secs(2);
/// How much of ssh's stderr is kept for error messages (the tail).
const STDERR_KEEP: usize = 8 * 1024;
/// Largest answer read from the remote `broker-cli`.
const MAX_REMOTE_OUTPUT: usize = 1 << 20;

/// Errors from setting up a tunnel or running ssh.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A host name, option or job that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The local listener or the private directory could not be made.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address or path asked for.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The job's certificate material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// ssh could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        /// The ssh binary.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// ssh ended (or failed) on its own.
    #[error("ssh to {host} {status}{}", stderr_suffix(.stderr))]
    Ssh {
        /// The host.
        host: String,
        /// `exited with status N`, `did not ...`.
        status: String,
        /// The tail of ssh's stderr.
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Where each local connection goes, and the name the job's certificate must carry there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    address: Address,
    server_name: String,
}

/// A TCP `host:port` or the Unix socket of an ssh forward.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(address) => f.write_str(address),
            Self::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Target {
    /// `address` (`host:port`) with an explicit TLS server name.
    pub fn new(address: impl Into<String>, server_name: impl Into<String>) -> Self {
        Self {
            address: Address::Tcp(address.into()),
            server_name: server_name.into(),
        }
    }

    /// `address` for `job`: an ssl job's certificate is checked for `localhost` when the
    /// address is a loopback one (every job certificate carries it), else for the job's host.
    pub fn for_job(address: impl Into<String>, job: &JobSummary) -> Self {
        let address = address.into();
        let server_name = if is_loopback(host_part(&address)) {
            String::from("localhost")
        } else {
            job.host.clone()
        };
        Self::new(address, server_name)
    }

    /// The job's own `host:port`, as the broker registered it.
    pub fn job(job: &JobSummary) -> Self {
        let address = if job.host.contains(':') {
            format!("[{}]:{}", job.host, job.port)
        } else {
            format!("{}:{}", job.host, job.port)
        };
        Self::for_job(address, job)
    }

    /// `host:port` or the socket path connected to.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// The name checked against an ssl job's certificate.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }
}

/// The host of `host:port`, `[v6]:port` or a bare host.
fn host_part(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => address,
    }
}

/// Whether `host` names this machine's loopback interface.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// How a connection proves it is the owner's.
#[derive(Clone)]
enum Proof {
    /// ssh mode: this line first.
    Secret(Arc<str>),
    /// ssl mode: a client certificate in a TLS handshake.
    Tls(Arc<rustls::ClientConfig>),
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret([elided])"),
            Self::Tls(_) => f.write_str("Tls"),
        }
    }
}

/// Where the local listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path; its directory must be one only the user can enter
    /// ([`private_dir`]).
    Unix(PathBuf),
    /// A TCP address (port 0: any free port). Loopback peers are served only when their
    /// socket is the user's; peers on other hosts only when the address is not a loopback
    /// one (the user asked for that, and was warned).
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp(address) => write!(f, "{address}"),
        }
    }
}

/// A fresh directory `broker-connect-XXXXXX` in `base`, mode 0700, owned by us: the local
/// socket, the ssh forward's socket and ssh's control socket go there. Removed when dropped.
///
/// # Errors
/// [`TunnelError::Bind`] when it cannot be made, [`TunnelError::Invalid`] when its path
/// cannot carry a socket (too long, or a `:` or `%` that ssh would take apart).
pub fn private_dir(base: &Path) -> Result<tempfile::TempDir, TunnelError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let error = |source| TunnelError::Bind {
        addr: base.display().to_string(),
        source,
    };
    let dir = tempfile::Builder::new()
        .prefix("broker-connect-")
        .tempdir_in(base)
        .map_err(error)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(error)?;
    let meta = std::fs::symlink_metadata(dir.path()).map_err(error)?;
    if !meta.is_dir() || meta.mode() & 0o077 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(TunnelError::Invalid(format!(
            "{} is not a private directory",
            dir.path().display()
        )));
    }
    let longest = dir.path().join(LOCAL_SOCKET);
    let text = longest.to_str().unwrap_or("");
    if text.is_empty() || text.len() > MAX_SOCKET_PATH || text.contains([':', '%']) {
        return Err(TunnelError::Invalid(format!(
            "{} cannot hold a socket path for ssh (too long, or a ':' or '%'); choose another --runtime-dir",
            dir.path().display()
        )));
    }
    Ok(dir)
}

/// What every connection task needs.
#[derive(Debug)]
struct Shared {
    target: Target,
    proof: Proof,
}

/// The bound local listener.
#[derive(Debug)]
enum Listener {
    Unix(UnixListener),
    Tcp {
        listener: TcpListener,
        /// Whether peers on other hosts are let in (a non-loopback address was asked for).
        remote_ok: bool,
    },
}

/// One accepted local connection.
enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream, SocketAddr),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Self::Unix(listener) => listener.accept().await.map(|(s, _)| Accepted::Unix(s)),
            Self::Tcp { listener, .. } => listener
                .accept()
                .await
                .map(|(s, peer)| Accepted::Tcp(s, peer)),
        }
    }
}

/// A bound local listener for one job; [`Tunnel::run`] serves it.
#[derive(Debug)]
pub struct Tunnel {
    listener: Listener,
    local: Listen,
    job_id: String,
    shared: Arc<Shared>,
}

impl Tunnel {
    /// Checks the job's material, builds the TLS configuration (ssl mode, pinned to the job's
    /// own server certificate) and binds `local` (TCP port 0: any free port).
    ///
    /// # Errors
    /// [`TunnelError::Invalid`] for a job without its secret or certificates (or a secret
    /// with a line break), [`TunnelError::Tls`], [`TunnelError::Bind`].
    pub async fn bind(job: &Job, target: Target, local: Listen) -> Result<Self, TunnelError> {
        let proof = match job.summary.job_type {
            JobType::Ssh => {
                let secret = job.secret.as_deref().ok_or_else(|| {
                    TunnelError::Invalid(format!("job {} came without its secret", job.summary.id))
                })?;
                if secret.is_empty() || secret.contains(['\n', '\r']) {
                    return Err(TunnelError::Invalid(format!(
                        "the secret of job {} is not one line",
                        job.summary.id
                    )));
                }
                Proof::Secret(Arc::from(secret))
            }
            JobType::Ssl => {
                let tls = job.tls.as_ref().ok_or_else(|| {
                    TunnelError::Invalid(format!(
                        "job {} came without its certificates",
                        job.summary.id
                    ))
                })?;
                // Every job's certificate chains to the same CA and names the same hosts, so
                // only the job's own certificate (from `load`) is accepted.
                let config = ClientTlsPem {
                    pinned: Some(Pem::new("job server certificate", &tls.cert)),
                    ..ClientTlsPem::mutual(
                        Pem::new("job CA certificate", &tls.ca),
                        Pem::new("job client certificate", &tls.client_cert),
                        Pem::new("job client key", &tls.client_key),
                    )
                }
                .config()?;
                Proof::Tls(Arc::new(config))
            }
        };
        if rustls::pki_types::ServerName::try_from(target.server_name.as_str()).is_err() {
            return Err(TunnelError::Invalid(format!(
                "{:?} cannot be a TLS server name",
                target.server_name
            )));
        }
        let shown = local.to_string();
        let bind_error = |source| TunnelError::Bind {
            addr: shown.clone(),
            source,
        };
        let (listener, local) = match local {
            Listen::Unix(path) => {
                let listener = UnixListener::bind(&path).map_err(bind_error)?;
                (Listener::Unix(listener), Listen::Unix(path))
            }
            Listen::Tcp(address) => {
                if !crate::peer::available() {
                    return Err(TunnelError::Invalid(String::from(
                        "this system cannot tell which user a TCP connection comes from \
                         (no /proc/net/tcp): use the Unix socket (no --local-port, --bind)",
                    )));
                }
                let listener = TcpListener::bind(address).await.map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                (
                    Listener::Tcp {
                        listener,
                        remote_ok: !bound.ip().is_loopback(),
                    },
                    Listen::Tcp(bound),
                )
            }
        };
        Ok(Self {
            listener,
            local,
            job_id: job.summary.id.clone(),
            shared: Arc::new(Shared { target, proof }),
        })
    }

    /// The bound local address (with the port chosen) or socket path.
    pub fn local(&self) -> &Listen {
        &self.local
    }

    /// Serves local connections until `shutdown` is triggered; connection tasks are tracked
    /// by `shutdown` and end with it.
    pub async fn run(self, shutdown: Shutdown) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut backoff = AcceptBackoff::default();
        let listener = &self.listener;
        let remote_ok = matches!(
            listener,
            Listener::Tcp {
                remote_ok: true,
                ..
            }
        );
        let me = nix::unistd::geteuid().as_raw();
        while let Some(accepted) = backoff.next(&shutdown, || listener.accept()).await {
            let peer = match &accepted {
                Accepted::Unix(_) => String::from("unix"),
                Accepted::Tcp(_, peer) => peer.to_string(),
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = MAX_CONNECTIONS, "too many connections; closing");
                continue;
            };
            let shared = self.shared.clone();
            let stop = shutdown.clone();
            let span = tracing::info_span!(
                "tunnel",
                job = %self.job_id,
                %peer,
                target = %shared.target.address
            );
            shutdown.spawn(
                async move {
                    let _permit = permit;
                    let served = async {
                        match accepted {
                            Accepted::Unix(stream) => serve(&shared, stream).await,
                            Accepted::Tcp(stream, peer) => {
                                admit_tcp(&stream, peer, me, remote_ok).await?;
                                let _ = stream.set_nodelay(true);
                                serve(&shared, stream).await
                            }
                        }
                    };
                    tokio::select! {
                        result = served => match result {
                            Ok((up, down)) => tracing::debug!(up, down, "connection closed"),
                            Err(ConnError::Refused(why)) => {
                                tracing::warn!(why, "refused a local connection");
                            }
                            Err(err) => tracing::warn!(%err, "tunnel connection failed"),
                        },
                        () = stop.triggered() => tracing::debug!("closed by shutdown"),
                    }
                }
                .instrument(span),
            );
        }
    }
}

/// Lets a TCP peer in only when its socket is ours (it is on this host), or when it is on
/// another host and a non-loopback address was asked for.
async fn admit_tcp(
    stream: &TcpStream,
    peer: SocketAddr,
    me: u32,
    remote_ok: bool,
) -> Result<(), ConnError> {
    let local = stream
        .local_addr()
        .map_err(|_| ConnError::Refused("the connection has no local address"))?;
    let owner = tokio::task::spawn_blocking(move || crate::peer::peer_uid(peer, local))
        .await
        .unwrap_or(None);
    match owner {
        Some(uid) if uid == me => Ok(()),
        Some(_) => Err(ConnError::Refused(
            "the peer's socket belongs to another user",
        )),
        None if remote_ok && !peer.ip().to_canonical().is_loopback() => Ok(()),
        None => Err(ConnError::Refused("the peer's owner cannot be found")),
    }
}

/// Why one tunnelled connection failed (never with the secret in it).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("connecting to the target: {0}")]
    Connect(std::io::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("sending the key: {0}")]
    Key(std::io::Error),
    #[error("tls with the target: {0}")]
    Tls(TlsError),
    #[error("relaying: {0}")]
    Splice(std::io::Error),
}

async fn serve<L>(shared: &Shared, local: L) -> Result<(u64, u64), ConnError>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    match &shared.target.address {
        Address::Tcp(address) => {
            let remote =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address.as_str()))
                    .await
                    .map_err(|_| ConnError::Timeout("connecting to the target"))?
                    .map_err(ConnError::Connect)?;
            let _ = remote.set_nodelay(true);
            relay(shared, local, remote).await
        }
        Address::Unix(path) => {
            let remote = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                .await
                .map_err(|_| ConnError::Timeout("connecting to the target"))?
                .map_err(ConnError::Connect)?;
            relay(shared, local, remote).await
        }
    }
}

/// Proves the user's right on `remote`, then splices.
async fn relay<L, R>(shared: &Shared, mut local: L, mut remote: R) -> Result<(u64, u64), ConnError>
where
    L: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    match &shared.proof {
        Proof::Secret(secret) => {
            let mut line = Vec::with_capacity(secret.len() + 1);
            line.extend_from_slice(secret.as_bytes());
            line.push(b'\n');
            tokio::time::timeout(CONNECT_TIMEOUT, remote.write_all(&line))
                .await
                .map_err(|_| ConnError::Timeout("sending the key"))?
                .map_err(ConnError::Key)?;
            tokio::io::copy_bidirectional(&mut local, &mut remote)
                .await
                .map_err(ConnError::Splice)
        }
        Proof::Tls(config) => {
            let mut tls = common::tls::connect(
                config.clone(),
                &shared.target.server_name,
                remote,
                HANDSHAKE_TIMEOUT,
            )
            .await
            .map_err(ConnError::Tls)?;
            tokio::io::copy_bidirectional(&mut local, &mut tls)
                .await
                .map_err(ConnError::Splice)
        }
    }
}

/// Whether `host` is safe to hand to ssh as its destination: no option, no spaces or control
/// characters (ssh gets it after `--` anyway).
pub fn valid_ssh_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '\'' | '"' | '`' | '\\' | ';'))
}

/// Whether `host` can be the far end of `-L` (a host name or an address, no `:` games).
fn valid_forward_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// The command string the remote shell runs: every word quoted for a POSIX shell.
///
/// # Errors
/// [`TunnelError::Invalid`] for an empty program or a word that cannot be quoted (NUL).
pub fn remote_command(program: &str, args: &[&str]) -> Result<String, TunnelError> {
    if program.is_empty() {
        return Err(TunnelError::Invalid("the remote program is empty".into()));
    }
    let mut words = Vec::with_capacity(args.len() + 1);
    for word in std::iter::once(program).chain(args.iter().copied()) {
        let quoted = shlex::try_quote(word)
            .map_err(|e| TunnelError::Invalid(format!("{word:?} cannot be quoted: {e}")))?;
        words.push(quoted.into_owned());
    }
    Ok(words.join(" "))
}

/// What the remote `broker-cli` did.
#[derive(Debug)]
pub struct RemoteOutput {
    /// ssh's exit status (the remote command's, or 255 for ssh's own failures); `None` when
    /// it was killed by a signal.
    pub code: Option<i32>,
    /// The remote command's stdout.
    pub stdout: Vec<u8>,
    /// ssh's and the remote command's stderr.
    pub stderr: String,
}

/// How to reach a host with the system's ssh.
#[derive(Debug, Clone)]
pub struct Ssh {
    program: PathBuf,
    options: Vec<String>,
    host: String,
}

impl Ssh {
    /// `program` (usually `ssh`) to `host`, with extra `-o` `options` (after ours, so ours
    /// win: ssh takes the first value it sees).
    ///
    /// # Errors
    /// [`TunnelError::Invalid`] for a host or option that could be taken for something else.
    pub fn new(
        program: impl Into<PathBuf>,
        options: Vec<String>,
        host: impl Into<String>,
    ) -> Result<Self, TunnelError> {
        let host = host.into();
        if !valid_ssh_host(&host) {
            return Err(TunnelError::Invalid(format!(
                "{host:?} is not a host name for ssh"
            )));
        }
        for option in &options {
            if option.is_empty() || option.starts_with('-') || option.contains(['\n', '\0']) {
                return Err(TunnelError::Invalid(format!(
                    "{option:?} is not an ssh -o option (write Name=value)"
                )));
            }
        }
        Ok(Self {
            program: program.into(),
            options,
            host,
        })
    }

    /// The destination host.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn command(&self, ours: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        for option in ours {
            command.arg("-o").arg(option);
        }
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        command.kill_on_drop(true);
        command
    }

    fn spawn_error(&self, source: std::io::Error) -> TunnelError {
        TunnelError::Spawn {
            program: self.program.display().to_string(),
            source,
        }
    }

    /// Runs `program ARGS...` on the host (`ssh -o BatchMode=yes -- HOST 'program' 'arg'...`)
    /// and collects its output; the caller judges the exit status.
    ///
    /// # Errors
    /// [`TunnelError::Invalid`] (unquotable words), [`TunnelError::Spawn`], or
    /// [`TunnelError::Ssh`] when it takes longer than [`REMOTE_TIMEOUT`].
    pub async fn run_cli(&self, program: &str, args: &[&str]) -> Result<RemoteOutput, TunnelError> {
        let remote = remote_command(program, args)?;
        let mut command = self.command(&["BatchMode=yes"]);
        command
            .arg("--")
            .arg(&self.host)
            .arg(remote)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| self.spawn_error(e))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let read = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let out_task = async {
                if let Some(stdout) = stdout {
                    let _ = stdout
                        .take(MAX_REMOTE_OUTPUT as u64)
                        .read_to_end(&mut out)
                        .await;
                }
            };
            let err_task = async {
                if let Some(stderr) = stderr {
                    let _ = stderr.take(STDERR_KEEP as u64).read_to_end(&mut err).await;
                }
            };
            tokio::join!(out_task, err_task);
            let status = child.wait().await;
            (out, err, status)
        };
        let (stdout, stderr, status) =
            tokio::time::timeout(REMOTE_TIMEOUT, read)
                .await
                .map_err(|_| TunnelError::Ssh {
                    host: self.host.clone(),
                    status: format!("did not finish within {REMOTE_TIMEOUT:?}"),
                    stderr: String::new(),
                })?;
        let status = status.map_err(|e| self.spawn_error(e))?;
        Ok(RemoteOutput {
            code: status.code(),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Starts `ssh -N -L DIR/fwd.sock:FORWARD_HOST:REMOTE_PORT -- HOST` as a control master
    /// (control socket `DIR/ctl.sock`, `ExitOnForwardFailure=yes`) and waits until ssh itself
    /// says it is ready: its control socket answers `ssh -O check` (ssh opens it only after
    /// the forward is listening) and the forward's socket is there, up to
    /// [`FORWARD_READY_TIMEOUT`]. Nothing is connected through the forward to find out.
    /// `dir` must be a private directory ([`private_dir`]); `forward_host` is where the ssh
    /// server connects to: `localhost` for a job on HOST itself.
    ///
    /// # Errors
    /// [`TunnelError::Invalid`], [`TunnelError::Spawn`], or [`TunnelError::Ssh`] with ssh's
    /// stderr when it exits first or does not get ready in time.
    pub async fn forward(
        &self,
        dir: &Path,
        forward_host: &str,
        remote_port: u16,
    ) -> Result<SshForward, TunnelError> {
        if !valid_forward_host(forward_host) {
            return Err(TunnelError::Invalid(format!(
                "{forward_host:?} is not a host name to forward to"
            )));
        }
        let socket = dir.join(FORWARD_SOCKET);
        let control = dir.join(CONTROL_SOCKET);
        let (Some(socket_text), Some(control_text)) = (socket.to_str(), control.to_str()) else {
            return Err(TunnelError::Invalid(format!(
                "{} is not a path ssh can take",
                dir.display()
            )));
        };
        if socket_text.contains([':', '%']) || control_text.contains([':', '%']) {
            return Err(TunnelError::Invalid(format!(
                "{} has a ':' or '%', which ssh would take apart",
                dir.display()
            )));
        }
        let spec = format!("{socket_text}:{forward_host}:{remote_port}");
        let control_path = format!("ControlPath={control_text}");
        let mut command = self.command(&[
            "ExitOnForwardFailure=yes",
            "ControlMaster=yes",
            &control_path,
            "ControlPersist=no",
            "StreamLocalBindUnlink=no",
        ]);
        command
            .arg("-N")
            .arg("-L")
            .arg(&spec)
            .arg("--")
            .arg(&self.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| self.spawn_error(e))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|pipe| {
            let keep = stderr.clone();
            tokio::spawn(collect_stderr(pipe, keep))
        });
        tracing::debug!(host = %self.host, %spec, "started ssh");
        let mut forward = SshForward {
            child,
            socket,
            control,
            ssh: self.clone(),
            stderr,
            reader,
        };
        forward.wait_ready().await?;
        tracing::info!(host = %self.host, socket = %forward.socket.display(), remote_port, "ssh forward ready");
        Ok(forward)
    }
}

/// Keeps the tail of ssh's stderr (it may write warnings all along; the pipe must not fill).
async fn collect_stderr(mut pipe: tokio::process::ChildStderr, keep: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut kept) = keep.lock() {
                    kept.extend_from_slice(&chunk[..n]);
                    let excess = kept.len().saturating_sub(STDERR_KEEP);
                    kept.drain(..excess);
                }
            }
        }
    }
}

/// A running `ssh -N -L`; killed when dropped, stopped gently by [`SshForward::stop`].
#[derive(Debug)]
pub struct SshForward {
    child: Child,
    socket: PathBuf,
    control: PathBuf,
    ssh: Ssh,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl SshForward {
    /// The local end of the forward: a Unix socket in the private directory.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The tunnel target through this forward for `job`, forwarded to `forward_host` on the
    /// far side: an ssl job's certificate is checked for `localhost` when that is loopback,
    /// else for the job's host.
    pub fn target(&self, job: &JobSummary, forward_host: &str) -> Target {
        let server_name = if is_loopback(forward_host) {
            String::from("localhost")
        } else {
            job.host.clone()
        };
        Target {
            address: Address::Unix(self.socket.clone()),
            server_name,
        }
    }

    async fn stderr_text(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            // The pipe closes when ssh exits; do not wait for a grandchild holding it.
            let _ = tokio::time::timeout(Duration::from_millis(500), reader).await;
        }
        let kept = self.stderr.lock().map(|k| k.clone()).unwrap_or_default();
        String::from_utf8_lossy(&kept).trim().to_owned()
    }

    async fn exit_error(&mut self, status: std::process::ExitStatus) -> TunnelError {
        TunnelError::Ssh {
            host: self.ssh.host.clone(),
            status: format!("exited ({status})"),
            stderr: self.stderr_text().await,
        }
    }

    async fn wait_ready(&mut self) -> Result<(), TunnelError> {
        let deadline = tokio::time::Instant::now() + FORWARD_READY_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Err(self.exit_error(status).await),
                Ok(None) => {}
                Err(source) => {
                    return Err(TunnelError::Spawn {
                        program: String::from("ssh"),
                        source,
                    });
                }
            }
            // Only ssh can have made these: the directory is ours alone.
            if self.control.exists() && self.check().await && self.socket.exists() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let stderr = self.stderr_text().await;
                return Err(TunnelError::Ssh {
                    host: self.ssh.host.clone(),
                    status: format!(
                        "did not open the forward within {}s",
                        FORWARD_READY_TIMEOUT.as_secs()
                    ),
                    stderr,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ssh -O check`: whether the master answers on its control socket.
    async fn check(&self) -> bool {
        let control_path = format!("ControlPath={}", self.control.display());
        let mut command = Command::new(&self.ssh.program);
        command
            .arg("-o")
            .arg(control_path)
            .arg("-O")
            .arg("check")
            .arg("--")
            .arg(&self.ssh.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        matches!(
            tokio::time::timeout(CHECK_TIMEOUT, command.status()).await,
            Ok(Ok(status)) if status.success()
        )
    }

    /// Completes when ssh exits on its own, with the reason.
    pub async fn exited(&mut self) -> TunnelError {
        match self.child.wait().await {
            Ok(status) => self.exit_error(status).await,
            Err(source) => TunnelError::Spawn {
                program: String::from("ssh"),
                source,
            },
        }
    }

    /// Ends ssh: SIGTERM, then SIGKILL if it is still there after a grace period.
    pub async fn stop(mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw)
        {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(SSH_STOP_GRACE, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn summary(host: &str) -> JobSummary {
        JobSummary {
            id: "job_0123456789abcdef0123456789abcdef".into(),
            job_type: JobType::Ssl,
            owner: "alice".into(),
            host: host.into(),
            port: 23001,
            status: "active".into(),
            created: String::new(),
            expires: String::new(),
            ttl_secs: 3600,
            label: None,
        }
    }

    #[test]
    fn quoting_keeps_words_whole() {
        let check = |program: &str, args: &[&str], expected: &str| {
            assert_eq!(remote_command(program, args).unwrap(), expected);
        };
        check(
            "broker-cli",
            &["--json", "load", "job_0123456789abcdef0123456789abcdef"],
            "broker-cli --json load job_0123456789abcdef0123456789abcdef",
        );
        check(
            "/opt/my broker/cli",
            &["query"],
            "'/opt/my broker/cli' query",
        );
        check("x;rm -rf ~", &[], "'x;rm -rf ~'");
        check("$(id)", &["`id`"], "'$(id)' '`id`'");
        assert!(remote_command("", &[]).is_err());
        assert!(remote_command("a\0b", &[]).is_err());
        // What the remote shell makes of it: the same words back.
        let line = remote_command("it's", &["a b", "c\"d", "e\nf"]).unwrap();
        assert_eq!(
            shlex::split(&line).unwrap(),
            vec!["it's", "a b", "c\"d", "e\nf"]
        );
    }

    #[test]
    fn hosts() {
        for good in ["login1", "alice@login1.example.org", "10.0.0.1", "[::1]"] {
            assert!(valid_ssh_host(good), "{good}");
        }
        for bad in ["", "-oProxyCommand=x", "a b", "a;b", "a\nb", "'a'"] {
            assert!(!valid_ssh_host(bad), "{bad:?}");
        }
        assert!(valid_forward_host("c12.cluster"));
        assert!(!valid_forward_host("a:b"));
        assert!(Ssh::new("ssh", vec!["Port=2222".into()], "h").is_ok());
        assert!(Ssh::new("ssh", vec!["-oX=y".into()], "h").is_err());
        assert!(Ssh::new("ssh", vec![], "-h").is_err());
    }

    #[test]
    fn server_names() {
        let job = summary("node7.example.org");
        let check = |address: &str, name: &str| {
            assert_eq!(
                Target::for_job(address, &job).server_name(),
                name,
                "{address}"
            );
        };
        check("127.0.0.1:9000", "localhost");
        check("localhost:9000", "localhost");
        check("[::1]:9000", "localhost");
        check("10.1.2.3:9000", "node7.example.org");
        check("node7.example.org:23001", "node7.example.org");
        assert_eq!(Target::job(&job).address(), "node7.example.org:23001");
        assert_eq!(Target::job(&summary("::1")).address(), "[::1]:23001");
        assert_eq!(Target::job(&summary("::1")).server_name(), "localhost");
    }
}
