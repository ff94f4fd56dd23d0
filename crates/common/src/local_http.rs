//! The small plain-HTTP server behind every local listener: ws-proxy's status listener and
//! `ws-proxy-client connect`'s front end, and every daemon's metrics listener
//! ([`crate::metrics::MetricsListener::serve`]).
//!
//! Whoever can reach such a listener must not be able to take what the rest of the process
//! needs (invariant 3 of SECURITY.md), nor keep a legitimate client of the listener out: the
//! listener has a [`Pool`] of its own, a request head must arrive within `header_timeout`,
//! keep-alive ends at `max_age`, and a connection is dropped one `header_timeout` after that
//! whatever it is doing (a client that does not read its answer).
//!
//! When the pool is full, a newcomer evicts a connection that is not answering a request (an
//! idle keep-alive connection, or one still sending its head): of those, the oldest of the
//! key (source address for TCP, as [`AddressKey`]; one key for a Unix socket) holding the most
//! slots, at any age. A connection whose request is being answered (from its head to the last
//! byte of the answer handed to the socket) is never evicted; it ends at its hard deadline at
//! the latest. Only when every connection is being answered is the newcomer closed at once.
//! A newcomer is the youngest connection, so it is evicted only after every older idle one:
//! a client that connects and sends its request at once (a scraper on loopback takes well
//! under a millisecond) is answered however the pool is held, unless the holder opens a pool's
//! worth of connections in that time (or keeps every slot busy with answers it does not read,
//! each until the hard deadline): what is left. There is no minimum age (unlike the TLS
//! stranger pool's [`EVICT_MIN_AGE`]): with one, a holder that reopens each connection before
//! it is old enough (a few connections a second) kept every newcomer out (second attack pass
//! on issue 19).
//!
//! Refusals and evictions are counted ([`Pool::refused`], [`Pool::evicted`], and the pool's
//! observer, [`Pool::observed`]); refusals are logged at most once per [`WARN_INTERVAL`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::Warning;
pub use crate::admission::{AddressKey, EVICT_MIN_AGE, WARN_INTERVAL};
use crate::daemon::{AcceptBackoff, Http1, Shutdown};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A bound local listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP: every local user (and more, off loopback) can connect.
    Tcp(TcpListener),
    /// A Unix socket: its mode and directory decide who can connect.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Self {
        Self::Unix(listener)
    }
}

/// A local listener's per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a request head may take to arrive.
    pub header_timeout: Duration,
    /// Keep-alive ends after the request in progress at this age.
    pub max_age: Duration,
    /// Largest read buffer, which bounds a request head.
    pub max_buf_size: usize,
    /// What the log calls a connection dropped at its hard deadline.
    pub what: &'static str,
}

/// What a [`Pool`] did to make or refuse room: what its observer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    /// A newcomer was closed at once: the pool was full and no connection could be evicted.
    Refused,
    /// A connection was closed to make room for a newcomer.
    Evicted,
}

/// What a pool's connection is counted under: its source address, or the Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Addr(AddressKey),
    Unix,
}

/// A connection holding a slot.
struct Conn {
    key: Key,
    /// Requests being answered (0 or 1: HTTP/1 answers one at a time).
    answering: usize,
    evict: CancellationToken,
}

#[derive(Default)]
struct Table {
    next: u64,
    conns: BTreeMap<u64, Conn>,
    per_key: HashMap<Key, usize>,
}

impl Table {
    fn remove(&mut self, seq: u64) -> Option<Conn> {
        let conn = self.conns.remove(&seq)?;
        if let Some(held) = self.per_key.get_mut(&conn.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_key.remove(&conn.key);
            }
        }
        Some(conn)
    }

    /// The connection to evict: not answering, of the key holding the most slots, the oldest
    /// of those (seq order is admission order).
    fn victim(&self) -> Option<u64> {
        let mut best: Option<(usize, u64)> = None;
        for (&seq, conn) in &self.conns {
            if conn.answering > 0 {
                continue;
            }
            let held = self.per_key.get(&conn.key).copied().unwrap_or(0);
            if best.is_none_or(|(most, _)| held > most) {
                best = Some((held, seq));
            }
        }
        best.map(|(_, seq)| seq)
    }
}

/// The connection pool of one local listener: `limit` slots, evicting as the module
/// documentation says. Shared (an `Arc`) by the accept loop and the connections.
pub struct Pool {
    name: &'static str,
    key: &'static str,
    limit: usize,
    table: Mutex<Table>,
    refused: AtomicU64,
    evicted: AtomicU64,
    warning: Warning,
    observer: Option<Box<dyn Fn(Turned) + Send + Sync>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of `limit` slots; `name` (e.g. `metrics`) and `key` (what sets the limit, e.g.
    /// `max_status_connections`) appear in the warning.
    pub fn new(name: &'static str, key: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self::unshared(name, key, limit, None))
    }

    /// [`Pool::new`], telling `observer` of every refusal and eviction (a daemon counts them
    /// in its metrics).
    pub fn observed(
        name: &'static str,
        key: &'static str,
        limit: usize,
        observer: impl Fn(Turned) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self::unshared(name, key, limit, Some(Box::new(observer))))
    }

    fn unshared(
        name: &'static str,
        key: &'static str,
        limit: usize,
        observer: Option<Box<dyn Fn(Turned) + Send + Sync>>,
    ) -> Self {
        Self {
            name,
            key,
            limit,
            table: Mutex::new(Table::default()),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            warning: Warning::default(),
            observer,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tell(&self, turned: Turned) {
        if let Some(observer) = &self.observer {
            observer(turned);
        }
    }

    /// A slot for a connection from `key` at `now`, evicting one if the pool is full; `None`
    /// (counted, and logged at most once per [`WARN_INTERVAL`]) when none can be.
    fn admit(self: &Arc<Self>, key: Key, now: Instant) -> Option<Held> {
        let evicted = {
            let mut table = self.table();
            let evicted = if table.conns.len() >= self.limit {
                match table.victim().and_then(|seq| table.remove(seq)) {
                    Some(victim) => {
                        victim.evict.cancel();
                        true
                    }
                    None => {
                        drop(table);
                        self.refuse(now);
                        return None;
                    }
                }
            } else {
                false
            };
            let seq = table.next;
            table.next = seq.wrapping_add(1);
            let evict = CancellationToken::new();
            table.conns.insert(
                seq,
                Conn {
                    key,
                    answering: 0,
                    evict: evict.clone(),
                },
            );
            let held = table.per_key.entry(key).or_insert(0);
            *held = held.saturating_add(1);
            if evicted {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            (
                evicted,
                Held {
                    pool: self.clone(),
                    seq,
                    evict,
                },
            )
        };
        if evicted.0 {
            tracing::debug!(pool = self.name, "evicted an idle connection to make room");
            self.tell(Turned::Evicted);
        }
        Some(evicted.1)
    }

    fn refuse(&self, now: Instant) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(refused) = self.warning.note(now) {
            tracing::warn!(
                pool = self.name,
                limit = self.limit,
                refused,
                "refusing connections: {} reached (every connection is answering or younger than 1 s)",
                self.key
            );
        }
        self.tell(Turned::Refused);
    }

    /// Connections holding a slot now.
    pub fn in_use(&self) -> usize {
        self.table().conns.len()
    }

    /// Connections refused since start-up.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections evicted since start-up.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// A connection's slot; given back when dropped (unless an eviction took it already).
struct Held {
    pool: Arc<Pool>,
    seq: u64,
    evict: CancellationToken,
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.pool.table().remove(self.seq);
    }
}

impl Held {
    /// A request is being answered: the connection is not evictable until the guard is
    /// dropped. `None` if it was evicted already (it is being closed).
    fn answering(self: &Arc<Self>) -> Option<Answering> {
        let mut table = self.pool.table();
        let conn = table.conns.get_mut(&self.seq)?;
        conn.answering = conn.answering.saturating_add(1);
        Some(Answering { held: self.clone() })
    }
}

/// Held while a request is answered: from its head to the answer's last byte handed to hyper.
struct Answering {
    held: Arc<Held>,
}

impl Drop for Answering {
    fn drop(&mut self) {
        let mut table = self.held.pool.table();
        if let Some(conn) = table.conns.get_mut(&self.held.seq) {
            conn.answering = conn.answering.saturating_sub(1);
        }
    }
}

/// An answer's body, keeping its connection unevictable until hyper has taken its last frame
/// (or dropped it).
struct Answer<D> {
    body: UnsyncBoxBody<D, BoxError>,
    _answering: Option<Answering>,
}

impl<D: hyper::body::Buf> Body for Answer<D> {
    type Data = D;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<D>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves `service` on `listener` until `shutdown` is triggered, each connection holding a
/// slot of `pool` (evictable while it is not answering, see the module documentation).
/// Connections are tracked by `shutdown`.
pub async fn serve<S, B>(
    listener: Listener,
    service: S,
    pool: Arc<Pool>,
    limits: Limits,
    shutdown: Shutdown,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut backoff = AcceptBackoff::default();
    match listener {
        Listener::Tcp(listener) => {
            while let Some((stream, peer)) = backoff.next(&shutdown, || listener.accept()).await {
                let key = Key::Addr(AddressKey::of(SocketAddr::ip(&peer)));
                admit(&pool, key, &service, limits, &shutdown, stream);
            }
        }
        Listener::Unix(listener) => {
            while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
                admit(&pool, Key::Unix, &service, limits, &shutdown, stream);
            }
        }
    }
}

/// Serves `stream` if the pool has (or can make) a slot; otherwise drops it at once (its
/// descriptor with it).
fn admit<IO, S, B>(
    pool: &Arc<Pool>,
    key: Key,
    service: &S,
    limits: Limits,
    shutdown: &Shutdown,
    stream: IO,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Refusals are counted and logged (rate-limited) by the pool.
    let Some(held) = pool.admit(key, Instant::now()) else {
        return;
    };
    let held = Arc::new(held);
    let evicted = held.evict.clone().cancelled_owned();
    let service = service.clone();
    let marking = held.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let answering = marking.answering();
        let answer = service.call(request);
        async move {
            let response = answer.await?;
            Ok::<_, S::Error>(response.map(|body| Answer {
                body: body.map_err(Into::into).boxed_unsync(),
                _answering: answering,
            }))
        }
    });
    let stopping = shutdown.clone();
    shutdown.spawn(async move {
        let http = Http1 {
            header_timeout: limits.header_timeout,
            max_buf_size: Some(limits.max_buf_size),
            max_age: Some(limits.max_age),
            drain: Duration::from_secs(1),
        };
        let served = crate::daemon::serve_http1(
            stream,
            service,
            http,
            &stopping,
            std::future::pending(),
            evicted,
        );
        let hard = limits.max_age.saturating_add(limits.header_timeout);
        if tokio::time::timeout(hard, served).await.is_err() {
            tracing::debug!(
                ?hard,
                what = limits.what,
                "connection dropped at its maximum age"
            );
        }
        drop(held);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(last: u8) -> Key {
        Key::Addr(AddressKey::of(std::net::IpAddr::from([127, 0, 0, last])))
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_idle_connection_of_the_busiest_key_at_any_age() {
        let pool = Pool::new("test", "limit", 3);
        let t0 = Instant::now();
        let a = pool.admit(tcp(1), t0).unwrap();
        let b = pool.admit(tcp(2), t0).unwrap();
        let c = pool.admit(tcp(2), t0).unwrap();
        // Full: the oldest of 127.0.0.2 (which holds two) goes, not the older a, however
        // young they all are.
        let d = pool.admit(tcp(3), t0).unwrap();
        assert!(b.evict.is_cancelled());
        assert!(!a.evict.is_cancelled() && !c.evict.is_cancelled());
        assert_eq!((pool.in_use(), pool.refused(), pool.evicted()), (3, 0, 1));
        drop(b);
        assert_eq!(pool.in_use(), 3);
        // A connection answering is never evicted: with a and c answering, d (the only idle
        // one) goes; with the newcomer answering too, the next one is closed at once.
        let (a, c) = (Arc::new(a), Arc::new(c));
        let answering = (a.answering().unwrap(), c.answering().unwrap());
        let e = Arc::new(pool.admit(Key::Unix, t0).unwrap());
        assert!(d.evict.is_cancelled() && !a.evict.is_cancelled() && !c.evict.is_cancelled());
        let e_answering = e.answering().unwrap();
        assert!(pool.admit(Key::Unix, t0).is_none());
        assert_eq!((pool.refused(), pool.evicted()), (1, 2));
        // Answered: evictable again (a is the oldest of the keys holding one).
        drop(answering);
        let _f = pool.admit(Key::Unix, t0).unwrap();
        assert!(a.evict.is_cancelled(), "between equal keys the oldest goes");
        assert!(!c.evict.is_cancelled() && !e.evict.is_cancelled());
        assert_eq!((pool.refused(), pool.evicted()), (1, 3));
        drop(e_answering);
    }

    /// A body whose one frame comes when `go` fires: an answer in progress until then.
    struct Later {
        go: Option<tokio::sync::oneshot::Receiver<()>>,
    }

    impl Body for Later {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
            let Some(go) = self.go.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(go).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => {
                    self.go = None;
                    Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(b"done")))))
                }
            }
        }
    }

    #[tokio::test]
    async fn a_connection_mid_answer_is_not_evicted() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        let go_rx = Arc::new(Mutex::new(Some(go_rx)));
        let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
            let go = go_rx.lock().unwrap().take();
            std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(Later {
                go,
            })))
        });
        let pool = Pool::new("test", "limit", 1);
        let limits = Limits {
            header_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(60),
            max_buf_size: 16 * 1024,
            what: "test",
        };
        let shutdown = Shutdown::new();
        tokio::spawn(serve(
            Listener::Tcp(listener),
            service,
            pool.clone(),
            limits,
            shutdown.clone(),
        ));
        let mut answering = tokio::net::TcpStream::connect(addr).await.unwrap();
        answering
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The head of the answer arrives; its body waits for `go`.
        let mut buf = [0u8; 1024];
        let n = answering.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Answering: the newcomer is closed at once instead of evicting it.
        let mut newcomer = tokio::net::TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(2), newcomer.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
        assert_eq!((pool.refused(), pool.evicted()), (1, 0));
        // The answer finishes on the connection that kept its slot.
        go_tx.send(()).unwrap();
        let mut rest = Vec::new();
        while !rest.windows(4).any(|w| w == b"done") {
            let n = answering.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "closed mid-answer");
            rest.extend_from_slice(&buf[..n]);
        }
        // Answered, it is idle on keep-alive: evictable now.
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let n = third.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        assert_eq!(pool.evicted(), 1);
        let end = tokio::time::timeout(Duration::from_secs(2), answering.read(&mut buf)).await;
        assert!(matches!(end, Ok(Ok(0) | Err(_))), "{end:?}");
        shutdown.trigger();
    }
}
