//! The gate: `broker-run --gate` fronts an unmodified application. It owns the job's public
//! port and, for each connection, first requires the magic key line (ssh mode) or a client
//! certificate from the broker's CA issued to the job's owner (ssl mode), then splices the
//! bytes to the application on a private loopback address.
//!
//! The ssh-mode decision is the broker's: the gate asks it to verify the line (constant time,
//! audited there) through a [`KeyCheck`], and refuses when the broker cannot be asked (fail
//! closed). A refused connection is closed without a byte of reply and logged with the peer
//! address, never with what it sent. The gate knows nothing of the application's protocol;
//! [`key_line`] is its only parser.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use common::admission::{Admission, Limits, Stranger};
use common::daemon::{AcceptBackoff, Shutdown};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::api::TlsMaterial;
use crate::client::{Client, ClientError, Endpoint};
use crate::pemtls::{self, PemTlsError};

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
}

/// The ssh-mode [`KeyCheck`]: asks the broker to verify the key for one job, over a small
/// pool of kept-alive connections.
#[derive(Debug)]
pub struct BrokerKeyCheck {
    job_id: String,
    clients: Vec<Mutex<Client>>,
    next: AtomicUsize,
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
        }
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

impl TlsCheck {
    /// Serves the job's certificate from `tls` and admits client certificates issued by its
    /// CA to `owner`, minus those in `crl_pem` (may be empty).
    ///
    /// # Errors
    /// [`PemTlsError`] for unusable material.
    pub fn new(tls: &TlsMaterial, owner: &str, crl_pem: &str) -> Result<Self, PemTlsError> {
        let config = pemtls::server_config(&tls.cert, &tls.key, &tls.ca, crl_pem)?;
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
    /// [`PemTlsError`] for an unusable CRL.
    pub fn refresh_crl(&self, crl_pem: &str) -> Result<bool, PemTlsError> {
        if *self.crl_pem.read().unwrap_or_else(PoisonError::into_inner) == crl_pem {
            return Ok(false);
        }
        let config = pemtls::server_config(&self.cert_pem, &self.key_pem, &self.ca_pem, crl_pem)?;
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
        upstream: SocketAddr,
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
        upstream: SocketAddr,
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
        upstream: SocketAddr,
        shutdown: Shutdown,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let admission = Admission::new("gate", limits);
        let task = tokio::spawn(serve_admitted(
            listener, mode, upstream, shutdown, admission,
        ));
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

/// The accept loop with at most `max_connections` authenticated connections; returns when
/// `shutdown` is triggered.
pub async fn serve(
    listener: TcpListener,
    mode: GateMode,
    upstream: SocketAddr,
    shutdown: Shutdown,
    max_connections: usize,
) {
    let admission = Admission::new("gate", Limits::new(max_connections, KEY_LINE_TIMEOUT));
    serve_admitted(listener, mode, upstream, shutdown, admission).await;
}

/// The accept loop behind `admission`: a connection is a stranger (small pool, per-address
/// cap, deadline) until its key line or certificate is accepted, and only then takes a slot.
async fn serve_admitted(
    listener: TcpListener,
    mode: GateMode,
    upstream: SocketAddr,
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
        let mode = mode.clone();
        let stop = shutdown.clone();
        // A newcomer evicts the oldest idle stranger when the pool is full; once
        // authenticated it can no longer be evicted.
        let evicted = stranger.evicted();
        shutdown.spawn(async move {
            tokio::select! {
                () = connection(stream, peer, mode, upstream, stranger) => {}
                () = stop.triggered() => debug!(%peer, "gate: connection cut by shutdown"),
                () = evicted => debug!(%peer, "gate: evicted from the full stranger pool"),
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    mode: GateMode,
    upstream: SocketAddr,
    stranger: Stranger,
) {
    let _ = stream.set_nodelay(true);
    match mode {
        GateMode::Ssh(check) => ssh(stream, peer, check.as_ref(), upstream, stranger).await,
        GateMode::Ssl(check) => ssl(stream, peer, &check, upstream, stranger).await,
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
    upstream: SocketAddr,
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
    // The check is part of the stranger's deadline too: nothing unauthenticated outlives it.
    match tokio::time::timeout_at(deadline, check.check(key)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            warn!(%peer, "gate: wrong key");
            return;
        }
        Ok(Err(err)) => {
            warn!(%peer, err = %common::log::Escaped(&err), "gate: cannot verify the key with the broker; refused");
            return;
        }
        Err(_) => {
            warn!(%peer, "gate: the key check did not finish in time; refused");
            return;
        }
    }
    let Ok(_slot) = stranger.authenticated() else {
        return;
    };
    info!(%peer, "gate: key accepted");
    splice(stream, peer, upstream, &rest).await;
}

async fn ssl(
    stream: TcpStream,
    peer: SocketAddr,
    check: &TlsCheck,
    upstream: SocketAddr,
    stranger: Stranger,
) {
    let acceptor = check.acceptor();
    let left = stranger
        .deadline()
        .saturating_duration_since(tokio::time::Instant::now());
    let (tls, identity) = match common::tls::accept(&acceptor, stream, left).await {
        Ok(accepted) => accepted,
        // A port probe (or `connect --host`'s readiness check) closes before its ClientHello.
        Err(common::tls::TlsError::Handshake(err))
            if err.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            debug!(%peer, "gate: closed before the tls handshake");
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
async fn splice<S>(mut client: S, peer: SocketAddr, upstream: SocketAddr, first: &[u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut app =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
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
    let _ = app.set_nodelay(true);
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
            upstream,
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
            upstream,
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
            upstream,
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
}
