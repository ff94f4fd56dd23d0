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

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use common::daemon::Shutdown;
use common::local_http::Pool;
use tokio::net::UnixListener;

use crate::config::Limits;
use crate::local_http;
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
        [(header::CONTENT_TYPE, common::metrics::CONTENT_TYPE)],
        server.metrics().encode(),
    )
}

/// A bound status listener: TCP (every local user, and more off loopback, can connect) or a
/// Unix socket (its mode and directory decide who can).
pub use crate::local_http::Listener;

/// Serves the status router on `listener` until `shutdown` is triggered, with the status
/// limits of the server's configuration. Connections are tracked by `shutdown`.
pub async fn serve(listener: impl Into<Listener>, server: Server, shutdown: Shutdown) {
    let limits: &Limits = &server.config().limits;
    let pool = Pool::new(
        "status",
        "max_status_connections",
        limits.max_status_connections,
    );
    let limits = local_http::Limits {
        header_timeout: limits.status_header_timeout,
        max_age: limits.status_connection_timeout,
        max_buf_size: 16 * 1024,
        what: "status (status_connection_timeout_secs passed)",
    };
    local_http::serve(listener.into(), router(server), pool, limits, shutdown).await;
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
