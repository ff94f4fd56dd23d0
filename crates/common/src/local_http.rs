//! The small plain-HTTP server behind every local listener: ws-proxy's status listener and
//! `ws-proxy-client connect`'s front end, and every daemon's metrics listener
//! ([`crate::metrics::serve`]).
//!
//! Whoever can reach such a listener must not be able to take what the rest of the process
//! needs (invariant 3 of SECURITY.md): the listener has a pool of its own (one connection more
//! is closed at once), a request head must arrive within `header_timeout`, keep-alive ends at
//! `max_age`, and a connection is dropped one `header_timeout` after that whatever it is doing
//! (a client that does not read its answer).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::admission::Pool;
use crate::daemon::{AcceptBackoff, Http1, Shutdown};

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

/// Serves `service` on `listener` until `shutdown` is triggered, each connection holding a
/// slot of `pool`. Connections are tracked by `shutdown`.
pub async fn serve<S, B>(
    listener: Listener,
    service: S,
    pool: Arc<Pool>,
    limits: Limits,
    shutdown: Shutdown,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut backoff = AcceptBackoff::default();
    match listener {
        Listener::Tcp(listener) => {
            while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
                admit(&pool, &service, limits, &shutdown, stream);
            }
        }
        Listener::Unix(listener) => {
            while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
                admit(&pool, &service, limits, &shutdown, stream);
            }
        }
    }
}

/// Serves `stream` if the pool has a slot; otherwise drops it at once (its descriptor with it).
fn admit<IO, S, B>(pool: &Pool, service: &S, limits: Limits, shutdown: &Shutdown, stream: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Refusals are counted and logged (rate-limited) by the pool.
    let Ok(slot) = pool.try_admit() else {
        return;
    };
    let service = service.clone();
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
            std::future::pending(),
        );
        let hard = limits.max_age.saturating_add(limits.header_timeout);
        if tokio::time::timeout(hard, served).await.is_err() {
            tracing::debug!(
                ?hard,
                what = limits.what,
                "connection dropped at its maximum age"
            );
        }
        drop(slot);
    });
}
