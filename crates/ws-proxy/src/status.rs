//! The plain-HTTP status listener: `GET /status` (JSON) and `GET /metrics` (Prometheus text).
//!
//! Meant for 127.0.0.1 and curl; it shows certificate identities and addresses, so it is off
//! unless `status_listen` is set. `/status` is paged (`?offset=N&limit=M`, at most
//! [`MAX_STATUS_PAGE`] ids a page) and every client-chosen field on it is cut short, so its
//! size does not grow with the number of peers or what they sent.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::server::{DEFAULT_STATUS_PAGE, MAX_STATUS_PAGE, Server};

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

/// Serves the status router on `listener` until `shutdown` completes.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: TcpListener,
    server: Server,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(server))
        .with_graceful_shutdown(shutdown)
        .await
}
