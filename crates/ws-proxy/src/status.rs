//! The plain-HTTP status listener: `GET /status` (JSON) and `GET /metrics` (Prometheus text).
//!
//! It shows certificate identities and addresses, so it is off unless `status_listen` is set,
//! and the recommended listener is a Unix socket whose mode and directory decide who may read
//! it (a TCP listener, even on 127.0.0.1, is readable by every local user). `/status` is paged
//! (`?offset=N&limit=M`, at most [`MAX_STATUS_PAGE`] ids a page) and every client-chosen field
//! on it is cut short, so its size does not grow with the number of peers or what they sent.
//!
//! Whoever can reach the listener must not be able to take the descriptors the TLS port
//! needs: the listener has its own pool of `max_status_connections` (one more is closed at
//! once), a connection must send its request head within `status_header_timeout_secs`, and
//! none lives longer than `status_connection_timeout_secs`.

use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use common::admission::{Pool, Slot};
use common::daemon::{AcceptBackoff, Shutdown};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tower::ServiceExt as _;

use crate::config::Limits;
use crate::server::Server;
use crate::state::{DEFAULT_STATUS_PAGE, MAX_STATUS_PAGE};

/// `/status` query parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(default)]
struct Page {
    offset: usize,
    limit: usize,
}

impl Default for Page {
    fn default() -> Self {
        Self {
            offset: 0,
            limit: DEFAULT_STATUS_PAGE,
        }
    }
}

/// The router: `/status` and `/metrics`.
pub fn router(server: Server) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(server)
}

async fn status(State(server): State<Server>, Query(page): Query<Page>) -> impl IntoResponse {
    axum::Json(server.status_page(page.offset, page.limit.min(MAX_STATUS_PAGE)))
}

async fn metrics(State(server): State<Server>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        server.metrics().encode(),
    )
}

/// A bound status listener.
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

/// The status listener's own limits (from `[limits]`).
#[derive(Debug, Clone, Copy)]
struct StatusLimits {
    header_timeout: Duration,
    connection_timeout: Duration,
}

/// Serves the status router on `listener` until `shutdown` is triggered, with the status
/// limits of the server's configuration. Connections are tracked by `shutdown`.
pub async fn serve(listener: impl Into<Listener>, server: Server, shutdown: Shutdown) {
    let limits: &Limits = &server.config().limits;
    let pool = Pool::new(
        "status",
        "max_status_connections",
        limits.max_status_connections,
    );
    let timeouts = StatusLimits {
        header_timeout: limits.status_header_timeout,
        connection_timeout: limits.status_connection_timeout,
    };
    let router = router(server);
    let mut backoff = AcceptBackoff::default();
    match listener.into() {
        Listener::Tcp(listener) => {
            while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
                admit(&pool, &router, timeouts, &shutdown, stream);
            }
        }
        Listener::Unix(listener) => {
            while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
                admit(&pool, &router, timeouts, &shutdown, stream);
            }
        }
    }
}

/// Serves `stream` if the pool has a slot; otherwise drops it at once (its descriptor with it).
fn admit<S>(pool: &Pool, router: &Router, limits: StatusLimits, shutdown: &Shutdown, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Refusals are counted and logged (rate-limited) by the pool.
    let Ok(slot) = pool.try_admit() else {
        return;
    };
    let router = router.clone();
    let stopping = shutdown.clone();
    shutdown.spawn(connection(stream, router, limits, stopping, slot));
}

/// One status connection: the request head within `header_timeout`, keep-alive asked to end
/// at `connection_timeout`, and the connection dropped whatever it is doing one
/// `header_timeout` later (a client that does not read its answer).
async fn connection<S>(
    stream: S,
    router: Router,
    limits: StatusLimits,
    shutdown: Shutdown,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let driven = common::daemon::drive_http(
        conn,
        |c| c.graceful_shutdown(),
        Some(limits.connection_timeout),
        &shutdown,
        Duration::from_secs(1),
    );
    let hard = limits
        .connection_timeout
        .saturating_add(limits.header_timeout);
    if tokio::time::timeout(hard, driven).await.is_err() {
        tracing::debug!(
            ?hard,
            "status connection dropped: status_connection_timeout_secs passed"
        );
    }
    drop(slot);
}

/// Binds the status Unix socket at `path` with `mode`. A stale socket file (nobody accepting)
/// is replaced; a live one or another kind of file is an error. The directory must exist (the
/// unit's `RuntimeDirectory=`): who may reach the socket is decided there and by `mode`.
///
/// # Errors
/// Binding failed, the path is not a socket, or a daemon accepts on it.
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    common::daemon::bind_unix(path, mode)
}
