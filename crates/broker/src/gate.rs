//! The gate: `broker-run --gate` fronts an unmodified application. It owns the job's public
//! port and, for each connection, first requires the magic key line (ssh mode) or a client
//! certificate from the broker's CA issued to the job's owner (ssl mode), then splices the
//! bytes to the application's [`Upstream`]: a Unix socket in the owner's 0700 directory, or
//! a loopback port broker-run bound itself and handed to the application.
//!
//! The ssh-mode decision is the broker's: the gate asks it to verify the line (constant time,
//! audited there) through a [`KeyCheck`], and refuses when the broker cannot be asked (fail
//! closed). After a refusal, the address is in [`Backoff`] for a short, growing interval:
//! its lines are then refused locally without asking the broker, except a line that matches
//! the job's secret (compared here in constant time), which is still asked, so wrong keys from
//! an address the owner shares cannot lock the owner out. A refused connection is closed
//! without a byte of reply and logged with the peer address, never with what it sent. The
//! gate knows nothing of the application's protocol; [`key_line`] is its only parser.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use common::admission::{AddressKey, Admission, Limits, Stranger, Warning};
use common::daemon::{AcceptBackoff, Shutdown};
use common::tls::{Pem, ServerTlsPem, TlsError};
use rustls::ServerConfig;
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::api::TlsMaterial;
use crate::client::{Client, ClientError, Endpoint};

/// Longest key line accepted, the `\n` included.
pub const MAX_KEY_LINE: usize = 2048;
/// How long a client has from TCP accept to authenticated: the whole key line and its check
/// (ssh mode), or the TLS handshake and the owner check (ssl mode).
pub const KEY_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to finish the TLS handshake (the same deadline as
/// [`KEY_LINE_TIMEOUT`]: accept to authenticated).
pub const HANDSHAKE_TIMEOUT: Duration = KEY_LINE_TIMEOUT;
/// How long connecting to the application may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on simultaneous authenticated gate connections. Those not authenticated yet
/// have a pool of their own ([`common::admission::DEFAULT_MAX_HANDSHAKES`], at most
/// [`common::admission::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS`] per source address).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default number of broker connections a [`BrokerKeyCheck`] keeps for verifications.
pub const DEFAULT_VERIFY_POOL: usize = 4;
/// Deadline of one verification request to the broker.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of one read while waiting for the key line.
const READ_CHUNK: usize = 4096;
/// How long an address's lines are refused locally after its first refusal by the broker;
/// each further refusal doubles it, up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest local back-off; an address quiet for this long after its back-off starts
/// afresh at [`BACKOFF_FIRST`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Addresses the back-off table remembers at most (memory bound); when it is full of live
/// entries a new address is simply asked about, as without back-off.
pub const BACKOFF_MAX_ADDRESSES: usize = 4096;

/// Where the gate sends admitted connections: the application's listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A Unix socket in the owner's private (0700) directory: only the owner reaches it.
    Unix(PathBuf),
    /// A loopback TCP address; used for a port broker-run bound and handed to the application
    /// (no other process can take it, but every local user can connect to it).
    Tcp(SocketAddr),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// A connection to the application, whichever the [`Upstream`].
trait AppStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AppStream for T {}

impl Upstream {
    async fn connect(&self) -> std::io::Result<Box<dyn AppStream>> {
        Ok(match self {
            Self::Unix(path) => Box::new(UnixStream::connect(path).await?),
            Self::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
        })
    }
}

/// The per-address back-off after refused key lines (sans-IO: the caller passes `now`).
#[derive(Debug, Default)]
pub struct Backoff {
    table: std::sync::Mutex<HashMap<AddressKey, BackoffEntry>>,
}

#[derive(Debug, Clone, Copy)]
struct BackoffEntry {
    /// Lines from the address are refused locally until then.
    until: Instant,
    /// The length of the current interval (the next one is twice as long).
    interval: Duration,
}

impl Backoff {
    /// Whether lines from `peer` are refused locally at `now`.
    pub fn holds(&self, peer: SocketAddr, now: Instant) -> bool {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table
            .get(&AddressKey::of(peer.ip()))
            .is_some_and(|entry| now < entry.until)
    }

    /// Records that the broker refused a line from `peer` at `now`; returns the interval its
    /// lines are now refused locally for.
    pub fn refused(&self, peer: SocketAddr, now: Instant) -> Duration {
        let key = AddressKey::of(peer.ip());
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let interval = match table.get(&key) {
            Some(entry) if now < entry.until + BACKOFF_MAX => (entry.interval * 2).min(BACKOFF_MAX),
            _ => BACKOFF_FIRST,
        };
        if !table.contains_key(&key) && table.len() >= BACKOFF_MAX_ADDRESSES {
            table.retain(|_, entry| now < entry.until + BACKOFF_MAX);
            if table.len() >= BACKOFF_MAX_ADDRESSES {
                return Duration::ZERO;
            }
        }
        table.insert(
            key,
            BackoffEntry {
                until: now + interval,
                interval,
            },
        );
        interval
    }
}

/// What the bytes received so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLine<'a> {
    /// A whole line: the key without its `\n` or `\r\n`, and the bytes that followed it.
    Complete {
        /// The key.
        key: &'a [u8],
        /// Bytes after the line terminator: the start of the application's stream.
        rest: &'a [u8],
    },
    /// No `\n` yet and still under [`MAX_KEY_LINE`].
    Incomplete,
    /// No `\n` within [`MAX_KEY_LINE`] bytes.
    TooLong,
}

/// Looks for the key line at the start of `buf` (sans-IO).
pub fn key_line(buf: &[u8]) -> KeyLine<'_> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end < MAX_KEY_LINE => {
            let (line, rest) = buf.split_at(end);
            let key = line.strip_suffix(b"\r").unwrap_or(line);
            KeyLine::Complete {
                key,
                rest: rest.get(1..).unwrap_or_default(),
            }
        }
        Some(_) => KeyLine::TooLong,
        None if buf.len() >= MAX_KEY_LINE => KeyLine::TooLong,
        None => KeyLine::Incomplete,
    }
}

/// Whether `key` can be a job secret at all (non-empty hex); anything else is refused
/// without bothering the broker.
pub fn plausible_key(key: &[u8]) -> bool {
    !key.is_empty() && key.iter().all(u8::is_ascii_hexdigit)
}

/// The future a [`KeyCheck`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, ClientError>> + Send + 'a>>;

/// Decides whether a key line opens the gate.
pub trait KeyCheck: Send + Sync {
    /// `Ok(true)` to let the connection through; an error refuses it too (fail closed).
    fn check<'a>(&'a self, key: &'a str) -> CheckFuture<'a>;

    /// Whether `key` can be the right one, judged locally (constant time) without asking
    /// anyone: used while the peer's address is in [`Backoff`], where `Some(false)` is
    /// refused locally and `Some(true)` still goes to [`KeyCheck::check`]. `None` (nothing
    /// to compare with) refuses every line during the back-off.
    fn local_match(&self, _key: &str) -> Option<bool> {
        None
    }
}

/// The ssh-mode [`KeyCheck`]: asks the broker to verify the key for one job, over a small
/// pool of kept-alive connections.
pub struct BrokerKeyCheck {
    job_id: String,
    clients: Vec<Mutex<Client>>,
    next: AtomicUsize,
    secret: Option<String>,
}

impl std::fmt::Debug for BrokerKeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerKeyCheck")
            .field("job_id", &self.job_id)
            .field("pool", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl BrokerKeyCheck {
    /// Verifies keys for `job_id` with up to `pool` (at least one) concurrent requests to the
    /// broker at `endpoint`.
    pub fn new(job_id: impl Into<String>, endpoint: &Endpoint, pool: usize) -> Self {
        let clients = (0..pool.max(1))
            .map(|_| Mutex::new(Client::new(endpoint.clone()).with_timeout(VERIFY_TIMEOUT)))
            .collect();
        Self {
            job_id: job_id.into(),
            clients,
            next: AtomicUsize::new(0),
            secret: None,
        }
    }

    /// Also knows the job's secret (broker-run has it from the save), so that during an
    /// address's [`Backoff`] the owner's right key still gets through.
    #[must_use]
    pub fn with_secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }
}

impl KeyCheck for BrokerKeyCheck {
    fn check<'a>(&'a self, key: &'a str) -> CheckFuture<'a> {
        Box::pin(async move {
            // An idle connection if there is one, else queue on one in turn.
            let mut client = match self.clients.iter().find_map(|c| c.try_lock().ok()) {
                Some(client) => client,
                None => {
                    let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
                    match self.clients.get(turn) {
                        Some(client) => client.lock().await,
                        None => return Ok(false),
                    }
                }
            };
            client.verify(&self.job_id, key).await
        })
    }

    fn local_match(&self, key: &str) -> Option<bool> {
        let secret = self.secret.as_ref()?;
        Some(secret.as_bytes().ct_eq(key.as_bytes()).into())
    }
}

/// The ssl-mode check: the job's server certificate, client certificates chained to the
/// broker CA and not revoked, subject CN equal to the owner.
///
/// The CRL is replaced with [`TlsCheck::refresh_crl`]; connections accepted after that see
/// the new one.
pub struct TlsCheck {
    owner: String,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    crl_pem: RwLock<String>,
    config: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCheck")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// The job's server configuration: its certificate and key, client certificates required from
/// its CA, minus those revoked by `crl_pem` (empty: none).
fn job_server_config(
    cert: &str,
    key: &str,
    ca: &str,
    crl_pem: &str,
) -> Result<ServerConfig, TlsError> {
    let crls = if crl_pem.trim().is_empty() {
        Vec::new()
    } else {
        vec![Pem::new("job CRL", crl_pem)]
    };
    ServerTlsPem::mutual(
        Pem::new("job certificate", cert),
        Pem::new("job key", key),
        Pem::new("job CA certificate", ca),
        crls,
    )
    .config()
}

impl TlsCheck {
    /// Serves the job's certificate from `tls` and admits client certificates issued by its
    /// CA to `owner`, minus those in `crl_pem` (may be empty).
    ///
    /// # Errors
    /// [`TlsError`] for unusable material.
    pub fn new(tls: &TlsMaterial, owner: &str, crl_pem: &str) -> Result<Self, TlsError> {
        let config = job_server_config(&tls.cert, &tls.key, &tls.ca, crl_pem)?;
        Ok(Self {
            owner: owner.to_owned(),
            cert_pem: tls.cert.clone(),
            key_pem: tls.key.clone(),
            ca_pem: tls.ca.clone(),
            crl_pem: RwLock::new(crl_pem.to_owned()),
            config: RwLock::new(Arc::new(config)),
        })
    }

    /// The user whose client certificates are admitted.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Uses `crl_pem` from now on; returns whether it changed. On error the previous
    /// configuration stays.
    ///
    /// # Errors
    /// [`TlsError`] for an unusable CRL.
    pub fn refresh_crl(&self, crl_pem: &str) -> Result<bool, TlsError> {
        if *self.crl_pem.read().unwrap_or_else(PoisonError::into_inner) == crl_pem {
            return Ok(false);
        }
        let config = job_server_config(&self.cert_pem, &self.key_pem, &self.ca_pem, crl_pem)?;
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        *self.crl_pem.write().unwrap_or_else(PoisonError::into_inner) = crl_pem.to_owned();
        Ok(true)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// How the gate authenticates a connection.
#[derive(Clone)]
pub enum GateMode {
    /// A key line first, checked by the [`KeyCheck`].
    Ssh(Arc<dyn KeyCheck>),
    /// mTLS with a client certificate for the owner; the stream is decrypted for the app.
    Ssl(Arc<TlsCheck>),
}

impl std::fmt::Debug for GateMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ssh(_) => f.write_str("Ssh"),
            Self::Ssl(check) => f.debug_tuple("Ssl").field(check).finish(),
        }
    }
}

/// Backlog of the gate's public listener.
const PUBLIC_BACKLOG: i32 = 1024;

/// Binds the job's public port for a gate. At the default, `0.0.0.0`, the port is taken on
/// every address of both families: one IPv6 socket that also accepts IPv4
/// (`IPV6_V6ONLY` off), so no other local user can bind the same port on `[::]`, `[::1]` or
/// a global IPv6 address and receive the key line of a client whose host name resolves to
/// IPv6 first. Only where the host has no IPv6 at all (nothing can listen there) is it
/// `0.0.0.0` alone. Any other address is bound as given: the same port on the host's other
/// addresses stays free for others (docs/broker.md says so).
///
/// # Errors
/// The port cannot be bound (in use, not permitted).
pub fn bind_public(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    if ip != IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        return listen_on(SocketAddr::new(ip, port), None);
    }
    let everywhere = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    match listen_on(everywhere, Some(false)) {
        Err(err) if no_ipv6(&err) => listen_on(SocketAddr::new(ip, port), None),
        other => other,
    }
}

/// Whether `err` says this host has no IPv6 (`EAFNOSUPPORT`, `EADDRNOTAVAIL`).
fn no_ipv6(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::AddrNotAvailable
        || err.raw_os_error() == Some(nix::errno::Errno::EAFNOSUPPORT as i32)
}

fn listen_on(address: SocketAddr, only_v6: Option<bool>) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(only_v6) = only_v6 {
        socket.set_only_v6(only_v6)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(PUBLIC_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A running gate.
#[derive(Debug)]
pub struct Gate {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Gate {
    /// Serves `listener` in a task: authenticates each connection per `mode` and splices it to
    /// `upstream`, with at most [`DEFAULT_MAX_CONNECTIONS`] authenticated at a time. Connection tasks are
    /// tracked by `shutdown`, whose trigger ends the accept loop and cuts the connections.
    ///
    /// # Errors
    /// The listener's address cannot be read.
    pub fn spawn(
        listener: TcpListener,
        mode: GateMode,
        upstream: Upstream,
        shutdown: Shutdown,
    ) -> std::io::Result<Self> {
        Self::spawn_with_limit(listener, mode, upstream, shutdown, DEFAULT_MAX_CONNECTIONS)
    }

    /// [`Gate::spawn`] with another connection cap.
    ///
    /// # Errors
    /// The listener's address cannot be read.
    pub fn spawn_with_limit(
        listener: TcpListener,
        mode: GateMode,
        upstream: Upstream,
        shutdown: Shutdown,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let limits = Limits::new(max_connections, KEY_LINE_TIMEOUT);
        Self::spawn_with_limits(listener, mode, upstream, shutdown, limits)
    }

    /// [`Gate::spawn`] with other front-door limits.
    ///
    /// # Errors
    /// The listener's address cannot be read.
    pub fn spawn_with_limits(
        listener: TcpListener,
        mode: GateMode,
        upstream: Upstream,
        shutdown: Shutdown,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let admission = Admission::new("gate", limits);
        let context = Arc::new(Context::new(mode, upstream));
        let task = tokio::spawn(serve_admitted(listener, context, shutdown, admission));
        Ok(Self { local_addr, task })
    }

    /// The public address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for the accept loop to end (after shutdown was triggered).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// What every connection of one gate shares.
struct Context {
    mode: GateMode,
    upstream: Upstream,
    backoff: Backoff,
    /// Lines refused locally during a back-off, logged at most once per interval.
    backed_off: AtomicU64,
    warn_backed_off: Warning,
}

impl Context {
    fn new(mode: GateMode, upstream: Upstream) -> Self {
        Self {
            mode,
            upstream,
            backoff: Backoff::default(),
            backed_off: AtomicU64::new(0),
            warn_backed_off: Warning::default(),
        }
    }
}

/// The accept loop with at most `max_connections` authenticated connections; returns when
/// `shutdown` is triggered.
pub async fn serve(
    listener: TcpListener,
    mode: GateMode,
    upstream: Upstream,
    shutdown: Shutdown,
    max_connections: usize,
) {
    let admission = Admission::new("gate", Limits::new(max_connections, KEY_LINE_TIMEOUT));
    let context = Arc::new(Context::new(mode, upstream));
    serve_admitted(listener, context, shutdown, admission).await;
}

/// The accept loop behind `admission`: a connection is a stranger (small pool, per-address
/// cap, deadline) until its key line or certificate is accepted, and only then takes a slot.
async fn serve_admitted(
    listener: TcpListener,
    context: Arc<Context>,
    shutdown: Shutdown,
    admission: Admission,
) {
    let mut backoff = AcceptBackoff::default();
    while let Some((stream, peer)) = backoff.next(&shutdown, || listener.accept()).await {
        // Refusals are counted and logged (rate-limited) by the admission.
        let Ok(stranger) = admission.stranger(peer) else {
            drop(stream);
            continue;
        };
        let context = context.clone();
        let stop = shutdown.clone();
        // A newcomer evicts the oldest idle stranger when the pool is full; once
        // authenticated it can no longer be evicted.
        let evicted = stranger.evicted();
        shutdown.spawn(async move {
            tokio::select! {
                () = connection(stream, peer, &context, stranger) => {}
                () = stop.triggered() => debug!(%peer, "gate: connection cut by shutdown"),
                () = evicted => debug!(%peer, "gate: evicted from the full stranger pool"),
            }
        });
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, context: &Context, stranger: Stranger) {
    let _ = stream.set_nodelay(true);
    match &context.mode {
        GateMode::Ssh(check) => ssh(stream, peer, check.as_ref(), context, stranger).await,
        GateMode::Ssl(check) => ssl(stream, peer, check, &context.upstream, stranger).await,
    }
}

/// What reading the key line produced.
enum KeyRead {
    Line { key: Vec<u8>, rest: Vec<u8> },
    Closed,
    TooLong,
}

async fn read_key_line<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<KeyRead> {
    let mut buf = Vec::with_capacity(MAX_KEY_LINE);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(KeyRead::Closed);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match key_line(&buf) {
            KeyLine::Complete { key, rest } => {
                return Ok(KeyRead::Line {
                    key: key.to_vec(),
                    rest: rest.to_vec(),
                });
            }
            KeyLine::TooLong => return Ok(KeyRead::TooLong),
            KeyLine::Incomplete => {}
        }
    }
}

async fn ssh(
    mut stream: TcpStream,
    peer: SocketAddr,
    check: &dyn KeyCheck,
    context: &Context,
    stranger: Stranger,
) {
    let deadline = stranger.deadline();
    let (key, rest) = match tokio::time::timeout_at(deadline, read_key_line(&mut stream)).await {
        Err(_) => {
            warn!(%peer, timeout_secs = stranger.allowed().as_secs(), "gate: no key line in time; refused");
            return;
        }
        Ok(Err(err)) => {
            debug!(%peer, %err, "gate: connection failed before the key line");
            return;
        }
        Ok(Ok(KeyRead::Closed)) => {
            debug!(%peer, "gate: connection closed before the key line");
            return;
        }
        Ok(Ok(KeyRead::TooLong)) => {
            warn!(%peer, "gate: wrong key");
            return;
        }
        Ok(Ok(KeyRead::Line { key, rest })) => (key, rest),
    };
    let key = match std::str::from_utf8(&key) {
        Ok(key) if plausible_key(key.as_bytes()) => key,
        _ => {
            warn!(%peer, "gate: wrong key");
            return;
        }
    };
    // After a refusal the address is in back-off: its wrong lines are refused here, without
    // a verification (and an audit row) at the broker; the owner's right one still goes on.
    if context.backoff.holds(peer, Instant::now()) && check.local_match(key) != Some(true) {
        let refused = context.backed_off.fetch_add(1, Ordering::Relaxed) + 1;
        debug!(%peer, "gate: refused during the address's back-off");
        if let Some(since) = context.warn_backed_off.note(Instant::now()) {
            warn!(%peer, refused = since, total = refused, "gate: wrong keys refused locally during back-off (not asked of the broker; logged at most once per 10 s)");
        }
        return;
    }
    // The check is part of the stranger's deadline too: nothing unauthenticated outlives it.
    let accepted = match tokio::time::timeout_at(deadline, check.check(key)).await {
        Ok(Ok(true)) => true,
        Ok(Ok(false)) => {
            warn!(%peer, "gate: wrong key");
            false
        }
        Ok(Err(err)) => {
            warn!(%peer, err = %common::log::Escaped(&err), "gate: cannot verify the key with the broker; refused");
            false
        }
        Err(_) => {
            warn!(%peer, "gate: the key check did not finish in time; refused");
            false
        }
    };
    if !accepted {
        let interval = context.backoff.refused(peer, Instant::now());
        debug!(%peer, backoff_ms = interval.as_millis(), "gate: address in back-off");
        return;
    }
    let Ok(_slot) = stranger.authenticated() else {
        return;
    };
    info!(%peer, "gate: key accepted");
    splice(stream, peer, &context.upstream, &rest).await;
}

async fn ssl(
    stream: TcpStream,
    peer: SocketAddr,
    check: &TlsCheck,
    upstream: &Upstream,
    stranger: Stranger,
) {
    let acceptor = check.acceptor();
    let left = stranger
        .deadline()
        .saturating_duration_since(tokio::time::Instant::now());
    let (tls, identity) = match common::tls::accept(&acceptor, stream, left).await {
        Ok(accepted) => accepted,
        // A port probe (or `connect --host`'s readiness check) closes before its ClientHello.
        Err(common::tls::TlsError::Closed) => {
            debug!(%peer, "gate: closed probe: closed before the tls handshake finished");
            return;
        }
        Err(err) => {
            warn!(%peer, %err, "gate: tls handshake refused");
            return;
        }
    };
    let cn = identity.and_then(|identity| identity.cn);
    if cn.as_deref() != Some(check.owner()) {
        warn!(%peer, cn = ?cn, owner = ?check.owner(), "gate: client certificate not issued to the job owner; refused");
        return;
    }
    // Authenticated only once the certificate is the owner's.
    let Ok(_slot) = stranger.authenticated() else {
        return;
    };
    info!(%peer, cn = ?cn, "gate: client certificate accepted");
    splice(tls, peer, upstream, &[]).await;
}

/// Connects to the application, sends `first` (bytes that came with the key line), then
/// copies both ways until either side closes.
///
/// No idle timeout: the gate fronts interactive applications (shells, notebooks) whose
/// connections may be silent for hours.
async fn splice<S>(mut client: S, peer: SocketAddr, upstream: &Upstream, first: &[u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut app = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, upstream.connect()).await {
        Ok(Ok(app)) => app,
        Ok(Err(err)) => {
            warn!(%peer, %upstream, %err, "gate: cannot reach the application");
            return;
        }
        Err(_) => {
            warn!(%peer, %upstream, "gate: connecting to the application timed out");
            return;
        }
    };
    if !first.is_empty() {
        if let Err(err) = app.write_all(first).await {
            debug!(%peer, %err, "gate: the application closed the connection");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut app).await {
        Ok((to_app, from_app)) => debug!(%peer, to_app, from_app, "gate: connection closed"),
        Err(err) => debug!(%peer, %err, "gate: connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], expected: KeyLine<'_>) {
        assert_eq!(key_line(input), expected, "input {input:?}");
    }

    #[test]
    fn key_lines() {
        check(b"", KeyLine::Incomplete);
        check(b"abc", KeyLine::Incomplete);
        check(
            b"abc\n",
            KeyLine::Complete {
                key: b"abc",
                rest: b"",
            },
        );
        check(
            b"abc\r\nGET / HTTP/1.1\r\n",
            KeyLine::Complete {
                key: b"abc",
                rest: b"GET / HTTP/1.1\r\n",
            },
        );
        check(
            b"\nx",
            KeyLine::Complete {
                key: b"",
                rest: b"x",
            },
        );
        let mut long = vec![b'a'; MAX_KEY_LINE - 1];
        check(&long, KeyLine::Incomplete);
        long.push(b'\n');
        assert!(
            matches!(key_line(&long), KeyLine::Complete { key, .. } if key.len() == MAX_KEY_LINE - 1)
        );
        let mut too_long = vec![b'a'; MAX_KEY_LINE];
        check(&too_long, KeyLine::TooLong);
        too_long.push(b'\n');
        check(&too_long, KeyLine::TooLong);
    }

    #[test]
    fn plausible_keys() {
        assert!(plausible_key(b"0123456789abcdefABCDEF"));
        assert!(!plausible_key(b""));
        assert!(!plausible_key(b"abc xyz"));
        assert!(!plausible_key(b"abc\r"));
    }

    struct Fixed(&'static str);

    impl KeyCheck for Fixed {
        fn check<'a>(&'a self, key: &'a str) -> CheckFuture<'a> {
            Box::pin(async move { Ok(key == self.0) })
        }
    }

    async fn echo_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn ssh_gate_forwards_after_the_key_and_keeps_early_bytes() {
        let upstream = echo_upstream().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = Shutdown::new();
        let gate = Gate::spawn(
            listener,
            GateMode::Ssh(Arc::new(Fixed("c0ffee"))),
            Upstream::Tcp(upstream),
            shutdown.clone(),
        )
        .expect("spawn");

        let mut good = TcpStream::connect(gate.local_addr())
            .await
            .expect("connect");
        good.write_all(b"c0ffee\r\nhello").await.expect("write");
        let mut buf = [0u8; 5];
        good.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"hello");

        for wrong in [&b"bad\n"[..], b"c0ffef\nhello", b"not hex\n"] {
            let mut bad = TcpStream::connect(gate.local_addr())
                .await
                .expect("connect");
            bad.write_all(wrong).await.expect("write");
            let mut out = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut out))
                .await
                .expect("closed in time");
            assert!(n.is_err() || out.is_empty(), "no bytes for {wrong:?}");
        }

        assert!(shutdown.drain(Duration::from_secs(2)).await);
        gate.stopped().await;
    }

    #[tokio::test]
    async fn connection_cap_refuses_extra_connections() {
        let upstream = echo_upstream().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = Shutdown::new();
        let gate = Gate::spawn_with_limit(
            listener,
            GateMode::Ssh(Arc::new(Fixed("aa"))),
            Upstream::Tcp(upstream),
            shutdown.clone(),
            1,
        )
        .expect("spawn");
        let mut first = TcpStream::connect(gate.local_addr())
            .await
            .expect("connect");
        first.write_all(b"aa\nx").await.expect("write");
        let mut one = [0u8; 1];
        first.read_exact(&mut one).await.expect("echo");
        // The second authenticates, finds the one slot taken and is closed without a byte.
        let mut second = TcpStream::connect(gate.local_addr())
            .await
            .expect("connect");
        second.write_all(b"aa\nx").await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut out))
            .await
            .expect("second is closed");
        assert!(out.is_empty());
        assert!(shutdown.drain(Duration::from_secs(2)).await);
        gate.stopped().await;
    }

    /// Issue 14: idle connections that never send a key line held the gate's slots for the
    /// whole key-line timeout, locking the job's owner out. Now they wait in the stranger pool
    /// (a few per address), the owner from another address gets through, and the idle ones
    /// are closed at the deadline.
    #[tokio::test]
    async fn idle_strangers_do_not_lock_out_the_owner() {
        use testkit::front::{OTHER_LOOPBACK, closed_within, connect_from, idle_crowd};
        let upstream = echo_upstream().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = Shutdown::new();
        let deadline = Duration::from_millis(800);
        let gate = Gate::spawn_with_limits(
            listener,
            GateMode::Ssh(Arc::new(Fixed("c0ffee"))),
            Upstream::Tcp(upstream),
            shutdown.clone(),
            Limits {
                max_connections: 4,
                max_handshakes: 16,
                max_handshakes_per_address: 3,
                deadline,
            },
        )
        .expect("spawn");
        let crowd = idle_crowd(gate.local_addr(), 40).await;
        let mut owner = connect_from(OTHER_LOOPBACK, gate.local_addr())
            .await
            .expect("connect");
        owner.write_all(b"c0ffee\nhello").await.expect("write");
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), owner.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&buf, b"hello");
        let (closed, last) = closed_within(crowd, deadline * 4).await;
        assert_eq!(closed, 40);
        assert!(last >= deadline / 2 && last < deadline * 3, "{last:?}");
        drop(owner);
        assert!(shutdown.drain(Duration::from_secs(2)).await);
        gate.stopped().await;
    }

    #[test]
    fn backoff_grows_resets_and_is_per_address() {
        let backoff = Backoff::default();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let same_host: SocketAddr = "192.0.2.1:2000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let t0 = Instant::now();
        assert!(!backoff.holds(a, t0));
        assert_eq!(backoff.refused(a, t0), BACKOFF_FIRST);
        assert!(
            backoff.holds(same_host, t0),
            "per address, not per connection"
        );
        assert!(!backoff.holds(b, t0));
        assert!(!backoff.holds(a, t0 + BACKOFF_FIRST));
        // Refused again after the interval: twice as long, up to the cap.
        let mut now = t0 + BACKOFF_FIRST;
        let mut expected = BACKOFF_FIRST;
        for _ in 0..10 {
            expected = (expected * 2).min(BACKOFF_MAX);
            assert_eq!(backoff.refused(a, now), expected);
            assert!(backoff.holds(a, now + expected - Duration::from_millis(1)));
            now += expected;
        }
        assert_eq!(expected, BACKOFF_MAX);
        // Quiet for BACKOFF_MAX after its back-off: starts afresh.
        assert_eq!(backoff.refused(a, now + BACKOFF_MAX), BACKOFF_FIRST);
    }

    #[test]
    fn backoff_table_is_bounded() {
        let backoff = Backoff::default();
        let now = Instant::now();
        for i in 0..BACKOFF_MAX_ADDRESSES + 10 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000_u32 + u32::try_from(i).unwrap());
            backoff.refused(SocketAddr::new(ip.into(), 1), now);
        }
        let len = backoff.table.lock().unwrap().len();
        assert_eq!(len, BACKOFF_MAX_ADDRESSES);
        // Once the old entries are stale they make room.
        let later = now + BACKOFF_FIRST + BACKOFF_MAX;
        assert_eq!(
            backoff.refused("192.0.2.9:1".parse().unwrap(), later),
            BACKOFF_FIRST
        );
        assert_eq!(backoff.table.lock().unwrap().len(), 1);
    }

    /// Counts the checks; knows the secret locally like broker-run's check.
    struct Counting {
        secret: &'static str,
        checks: AtomicUsize,
    }

    impl KeyCheck for Counting {
        fn check<'a>(&'a self, key: &'a str) -> CheckFuture<'a> {
            self.checks.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(key == self.secret) })
        }

        fn local_match(&self, key: &str) -> Option<bool> {
            Some(key == self.secret)
        }
    }

    /// Issue 16: each wrong line was a verification at the broker (and an audit row). Now,
    /// after the first refusal, wrong lines from the address are refused locally, while the
    /// owner's right key from the same address still goes through.
    #[tokio::test]
    async fn wrong_keys_back_off_locally_and_the_owner_still_gets_in() {
        let upstream = echo_upstream().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = Shutdown::new();
        let check = Arc::new(Counting {
            secret: "c0ffee",
            checks: AtomicUsize::new(0),
        });
        let gate = Gate::spawn(
            listener,
            GateMode::Ssh(check.clone()),
            Upstream::Tcp(upstream),
            shutdown.clone(),
        )
        .expect("spawn");
        let started = std::time::Instant::now();
        for _ in 0..200 {
            let mut bad = TcpStream::connect(gate.local_addr())
                .await
                .expect("connect");
            bad.write_all(b"a\n").await.expect("write");
            let mut out = Vec::new();
            let _ = bad.read_to_end(&mut out).await;
            assert!(out.is_empty());
        }
        let asked = check.checks.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        // One check per interval at most: 1 s, then 2 s, 4 s...
        assert!(
            asked <= 2 + usize::try_from(elapsed.as_secs()).unwrap(),
            "{asked} checks in {elapsed:?}"
        );
        let mut good = TcpStream::connect(gate.local_addr())
            .await
            .expect("connect");
        good.write_all(b"c0ffee\nhi").await.expect("write");
        let mut buf = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), good.read_exact(&mut buf))
            .await
            .expect("in time")
            .expect("the owner gets through during the back-off");
        assert_eq!(&buf, b"hi");
        assert_eq!(check.checks.load(Ordering::Relaxed), asked + 1);
        drop(good);
        assert!(shutdown.drain(Duration::from_secs(2)).await);
        gate.stopped().await;
    }

    #[tokio::test]
    async fn the_gate_splices_to_a_unix_socket() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("app.sock");
        let app = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = app.accept().await {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = Shutdown::new();
        let gate = Gate::spawn(
            listener,
            GateMode::Ssh(Arc::new(Fixed("c0ffee"))),
            Upstream::Unix(path),
            shutdown.clone(),
        )
        .expect("spawn");
        let mut good = TcpStream::connect(gate.local_addr())
            .await
            .expect("connect");
        good.write_all(b"c0ffee\nhello").await.expect("write");
        let mut buf = [0u8; 5];
        good.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"hello");
        drop(good);
        assert!(shutdown.drain(Duration::from_secs(2)).await);
        gate.stopped().await;
    }
}
