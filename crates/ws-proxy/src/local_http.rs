//! ws-proxy's local listeners (the status listener and `ws-proxy-client connect`'s front end)
//! serve an axum router on `common::local_http`: a pool of their own, a deadline on every
//! request head and a maximum age (see there).

use std::sync::Arc;

use axum::Router;
use common::daemon::Shutdown;
use common::local_http::Pool;
pub use common::local_http::{Limits, Listener};
use tower::ServiceExt as _;

/// Serves `router` on `listener` until `shutdown` is triggered, each connection holding a
/// slot of `pool`. Connections are tracked by `shutdown`.
pub(crate) async fn serve(
    listener: Listener,
    router: Router,
    pool: Arc<Pool>,
    limits: Limits,
    shutdown: Shutdown,
) {
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
    common::local_http::serve(listener, service, pool, limits, shutdown).await;
}
