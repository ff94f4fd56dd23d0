//! The plain-HTTP status listener: `GET /status` (JSON) and `GET /metrics` (Prometheus text).
//!
//! Meant for 127.0.0.1 and curl; it shows certificate identities and addresses, so it is off
//! unless `status_listen` is set.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::server::Server;

/// The router: `/status` and `/metrics`.
pub fn router(server: Server) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(server)
}

async fn status(State(server): State<Server>) -> impl IntoResponse {
    axum::Json(server.status())
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
