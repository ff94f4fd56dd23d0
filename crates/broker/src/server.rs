//! The API over HTTP: one axum router served on the Unix socket (caller = the peer's uid from
//! `SO_PEERCRED`) and, optionally, on HTTPS (caller = the user the client certificate maps
//! to). The identity is attached by the connection, never read from the request.
//!
//! Every request has a deadline for its head (`request_timeout`, hyper's header timeout) and
//! another for its body, read whole before the handler runs; one uid holds at most
//! `max_local_connections_per_uid` of the socket's pool, one address at most
//! `max_connections_per_address` of the HTTPS slots. So nobody can hold the slots others need
//! by sending slowly.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path as UrlPath, State};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::admission::{AcceptError, AddressKey, Admission, PerKey, Pool};
use common::daemon::{AcceptBackoff, Shutdown};
use common::metrics::{OpenConnection, Reason};
use common::tls::{LivePeer, ServerTls};
use tower::ServiceExt as _;

use crate::api::{
    ErrorBody, HeartbeatResponse, JobList, SaveRequest, VerifyRequest, VerifyResponse, WhoAmI,
};
use crate::identity::{Caller, map_certificate};
use crate::service::{Broker, BrokerError};

/// Largest request body (a verify carries a 1 KiB secret; nothing needs more).
pub const MAX_BODY: usize = 16 * 1024;

/// Who the connection belongs to, or why it belongs to nobody.
#[derive(Debug, Clone)]
enum Identity {
    /// A Unix-socket peer's uid, resolved to a name for each request (cached), so that a
    /// failed lookup fails that request only.
    Unix(u32),
    /// An HTTPS peer's mapped user, or why it has none (403).
    Https(Result<Caller, String>),
}

impl FromRequestParts<Arc<Broker>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        broker: &Arc<Broker>,
    ) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Identity>() {
            Some(Identity::Unix(uid)) => broker
                .unix_caller(*uid)
                .await
                .map_err(IntoResponse::into_response),
            Some(Identity::Https(Ok(caller))) => Ok(caller.clone()),
            Some(Identity::Https(Err(why))) => {
                broker.metrics().shared.refused(Reason::AUTHORIZATION);
                Err(BrokerError::Forbidden(why.clone()).into_response())
            }
            None => {
                Err(BrokerError::Internal("connection without identity".into()).into_response())
            }
        }
    }
}

/// Reads `request`'s whole body (at most [`MAX_BODY`]) within `deadline`: a total for the
/// body, however it is cut into pieces. `Err` is the answer to send instead (408 and the
/// connection closed, or 413).
async fn read_body(
    request: hyper::Request<hyper::body::Incoming>,
    deadline: Duration,
) -> Result<hyper::Request<axum::body::Body>, Response> {
    use http_body_util::BodyExt as _;
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match tokio::time::timeout(deadline, limited.collect()).await {
        Ok(Ok(collected)) => Ok(hyper::Request::from_parts(
            parts,
            axum::body::Body::from(collected.to_bytes()),
        )),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            Err((StatusCode::PAYLOAD_TOO_LARGE, "request body over 16 KiB\n").into_response())
        }
        // The peer went away or sent a malformed body: nobody to answer.
        Ok(Err(_)) => Err((
            StatusCode::BAD_REQUEST,
            [(header::CONNECTION, "close")],
            "bad request body\n",
        )
            .into_response()),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            format!("request body not complete within {deadline:?}\n"),
        )
            .into_response()),
    }
}

/// The answer to a Unix-socket connection over its uid's share, written without waiting (a
/// new socket's buffer takes it) before the connection is closed.
const TOO_MANY_LOCAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nconnection: close\r\ncontent-length: 98\r\n\r\n\
{\"error\":\"this uid holds max_local_connections_per_uid connections already\",\"code\":\"unavailable\"}\n";

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let body = ErrorBody {
            error: self.to_string(),
            code: code.into(),
        };
        (status, axum::Json(body)).into_response()
    }
}

// Public for crates/fuzzing only.
#[doc(hidden)]
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BrokerError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| BrokerError::BadRequest(format!("request body: {e}")))
}

type Shared = State<Arc<Broker>>;

async fn whoami(State(broker): Shared, caller: Caller) -> axum::Json<WhoAmI> {
    axum::Json(WhoAmI {
        user: caller.user,
        via: caller.via.into(),
        host: broker.config().host.clone(),
    })
}

async fn save(State(broker): Shared, caller: Caller, body: Bytes) -> Result<Response, BrokerError> {
    let request: SaveRequest = parse_json(&body)?;
    let job = broker.save(&caller, request).await?;
    broker.metrics().job_saved(job.summary.job_type);
    tracing::info!(user = ?caller.user, via = caller.via, job = %job.summary.id, r#type = %job.summary.job_type, port = job.summary.port, "job saved");
    Ok((StatusCode::CREATED, axum::Json(job)).into_response())
}

async fn query(State(broker): Shared, caller: Caller) -> Result<axum::Json<JobList>, BrokerError> {
    Ok(axum::Json(JobList {
        jobs: broker.query(&caller).await?,
    }))
}

async fn load(
    State(broker): Shared,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, BrokerError> {
    let job = broker.load(&caller, &id).await?;
    Ok(axum::Json(job).into_response())
}

async fn verify(
    State(broker): Shared,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<axum::Json<VerifyResponse>, BrokerError> {
    let request: VerifyRequest = parse_json(&body)?;
    let valid = broker.verify(&caller, &id, &request.secret).await?;
    if !valid {
        tracing::warn!(user = ?caller.user, via = caller.via, job = ?id, "verify: wrong secret");
    }
    Ok(axum::Json(VerifyResponse { valid }))
}

async fn heartbeat(
    State(broker): Shared,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<HeartbeatResponse>, BrokerError> {
    let expires = broker.heartbeat(&caller, &id).await?;
    Ok(axum::Json(HeartbeatResponse { expires }))
}

async fn delete(
    State(broker): Shared,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, BrokerError> {
    broker.delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn pem(text: String) -> Response {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], text).into_response()
}

async fn ca(State(broker): Shared) -> Response {
    pem(broker.ca_pem().to_owned())
}

async fn crl(State(broker): Shared) -> Result<Response, BrokerError> {
    Ok(pem(broker.crl_pem().await?))
}

async fn health() -> &'static str {
    "ok\n"
}

async fn not_found() -> BrokerError {
    BrokerError::BadRequest("no such endpoint; see docs/broker.md".into())
}

/// The API's routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/jobs", get(query).post(save))
        .route("/v1/jobs/{id}", get(load).delete(delete))
        .route("/v1/jobs/{id}/verify", post(verify))
        .route("/v1/jobs/{id}/heartbeat", post(heartbeat))
        .route("/v1/ca", get(ca))
        .route("/v1/crl", get(crl))
        .route("/v1/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(broker)
}

/// The daemon's listeners and what they share.
#[derive(Clone)]
pub struct Server {
    broker: Arc<Broker>,
    router: Router,
    https: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
    /// The HTTPS front door: strangers in the handshake, then `max_connections`.
    admission: Admission,
    /// The Unix socket's own pool (`max_local_connections`).
    local: Arc<Pool>,
    /// Each uid's share of `local` (`max_local_connections_per_uid`).
    per_uid: Arc<PerKey<u32>>,
    /// Each address's share of the HTTPS slots (`max_connections_per_address`).
    per_address: Arc<PerKey<AddressKey>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `broker`; `https` is the TLS material of the HTTPS API when configured.
    pub fn new(broker: Arc<Broker>, https: Option<Arc<ServerTls>>, shutdown: Shutdown) -> Self {
        let config = broker.config();
        let limits = config.https.as_ref().map_or_else(
            || {
                common::admission::Limits::new(
                    config.max_connections,
                    common::tls::DEFAULT_HANDSHAKE_TIMEOUT,
                )
            },
            |h| h.tls.admission(config.max_connections),
        );
        let admission = Admission::new("https", limits);
        let local = Pool::new(
            "unix",
            "max_local_connections",
            config.max_local_connections,
        );
        let per_uid = PerKey::new(
            "unix",
            "max_local_connections_per_uid",
            config.max_local_connections_per_uid,
        );
        let per_address = PerKey::new(
            "https",
            "max_connections_per_address",
            config.max_connections_per_address,
        );
        Self {
            router: router(broker.clone()),
            broker,
            https,
            shutdown,
            admission,
            local,
            per_uid,
            per_address,
        }
    }

    /// The families every daemon shares, which the listeners record into.
    fn metrics(&self) -> &common::metrics::Families {
        &self.broker.metrics().shared
    }

    /// The broker behind this server.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The HTTPS front door (pools and their counters).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Re-reads the HTTPS certificate, key, client CA and CRLs; the old ones stay on error.
    ///
    /// # Errors
    /// The new files are unusable.
    pub fn reload(&self) -> Result<(), common::tls::TlsError> {
        match &self.https {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Accepts on the Unix socket until shutdown.
    pub async fn serve_unix(self, listener: tokio::net::UnixListener) {
        let mut backoff = AcceptBackoff::default();
        loop {
            // Local clients queue in the backlog for a slot of their own pool, apart from
            // HTTPS: remote strangers never starve them.
            let Some(permit) = self.local.admit().await else {
                return;
            };
            let Some((stream, _)) = backoff.next(&self.shutdown, || listener.accept()).await else {
                return;
            };
            let open = self.metrics().connection();
            let uid = match stream.peer_cred() {
                Ok(cred) => cred.uid(),
                Err(err) => {
                    tracing::warn!(%err, "no peer credentials; closing");
                    continue;
                }
            };
            // One uid never holds more than its share of the pool, however slowly it sends.
            let Some(share) = self.per_uid.try_admit(uid) else {
                drop(permit);
                self.metrics()
                    .refused(Reason::new("max_local_connections_per_uid"));
                let _ = stream.try_write(TOO_MANY_LOCAL);
                continue;
            };
            let this = self.clone();
            self.shutdown.spawn(async move {
                this.serve_connection(stream, Identity::Unix(uid), None)
                    .await;
                drop((share, permit, open));
            });
        }
    }

    /// Accepts HTTPS connections until shutdown.
    pub async fn serve_https(self, listener: tokio::net::TcpListener) {
        let Some(tls) = self.https.clone() else {
            return;
        };
        let Some(users) = self.broker.config().https.as_ref().map(|h| h.users.clone()) else {
            return;
        };
        let max_age = self
            .broker
            .config()
            .https
            .as_ref()
            .map_or(common::tls::DEFAULT_MAX_CONNECTION_AGE, |h| {
                h.tls.max_connection_age()
            });
        let users = Arc::new(users);
        let mut backoff = AcceptBackoff::default();
        loop {
            let Some((tcp, peer)) = backoff.next(&self.shutdown, || listener.accept()).await else {
                return;
            };
            let open = self.metrics().connection();
            // A stranger until its certificate is verified; refusals are counted and logged
            // (rate-limited) by the admission.
            let stranger = match self.admission.stranger(peer) {
                Ok(stranger) => stranger,
                Err(refused) => {
                    self.metrics().refused(refused);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let acceptor = tls.acceptor();
            let tls = tls.clone();
            let users = users.clone();
            self.shutdown.spawn(async move {
                let _open: OpenConnection = open;
                match stranger.accept_tls(&acceptor, tcp).await {
                    Ok((stream, identity, _slot)) => {
                        // One address never holds more than its share of the slots.
                        let Some(_share) = this.per_address.try_admit(AddressKey::of(peer.ip())) else {
                            this.metrics().refused(Reason::new("max_connections_per_address"));
                            return;
                        };
                        let live = tls.live_peer(stream.get_ref().1);
                        let identity = match identity.as_ref().and_then(|id| map_certificate(&users, id)) {
                            Some(user) => Identity::Https(Ok(Caller { user, uid: None, via: "https" })),
                            None => {
                                let subject = identity.as_ref().map_or_else(String::new, |id| id.to_string());
                                tracing::warn!(%peer, subject = ?subject, "https: certificate not mapped to a user");
                                Identity::Https(Err(format!("certificate {subject} is not mapped to a user on this broker")))
                            }
                        };
                        this.serve_connection(stream, identity, Some((live, max_age))).await;
                    }
                    Err(AcceptError::Tls(err)) => {
                        this.metrics().tls_failure(&err);
                        tracing::debug!(%peer, %err, "https: handshake refused");
                    }
                    Err(AcceptError::Refused(refused)) => this.metrics().refused(refused),
                }
            });
        }
    }

    /// Serves HTTP/1.1 on one connection. `tls`: the HTTPS peer, checked against the
    /// current CRLs before each request, and the age at which the connection is closed
    /// (after the request in progress).
    async fn serve_connection<IO>(
        &self,
        io: IO,
        identity: Identity,
        tls: Option<(LivePeer, Duration)>,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let (live, max_age) = tls.unzip();
        let timeout = self.broker.config().request_timeout;
        let metrics = self.metrics().clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                let timer = metrics.start(crate::metrics::route(
                    request.method(),
                    request.uri().path(),
                ));
                let metrics = metrics.clone();
                // A certificate revoked since the handshake acts for nobody (403).
                let identity = match live.as_ref().map(LivePeer::check) {
                    Some(Err(err)) => {
                        tracing::warn!(%err, "https: request refused");
                        Identity::Https(Err(err.to_string()))
                    }
                    _ => identity.clone(),
                };
                request.extensions_mut().insert(identity);
                let router = router.clone();
                async move {
                    // The head came within the header timeout; the body has a deadline of
                    // its own, so a byte every few seconds cannot hold the connection.
                    let answer = match read_body(request, timeout).await {
                        Ok(request) => router.oneshot(request).await,
                        Err(answer) => Ok(answer),
                    };
                    if let Ok(answer) = &answer {
                        if answer.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            metrics.refused(Reason::LIMITS);
                        }
                        timer.done(answer.status().as_u16());
                    }
                    answer
                }
            },
        );
        // The Unix socket's connections have no age limit: their identity cannot change.
        let http = common::daemon::Http1 {
            header_timeout: timeout,
            max_buf_size: Some(64 * 1024),
            max_age,
            drain: Duration::from_secs(30),
        };
        common::daemon::serve_http1(
            io,
            service,
            http,
            &self.shutdown,
            std::future::pending(),
            std::future::pending(),
        )
        .await;
    }
}

/// Binds the socket at `path` with `mode`. A stale socket file (nobody listening) is
/// replaced; a live one is an error, so two daemons never share a path.
///
/// # Errors
/// Binding failed or a daemon already listens there.
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    common::daemon::bind_unix(path, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canned_refusal_is_well_formed() {
        let text = std::str::from_utf8(TOO_MANY_LOCAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
        let body: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(body.code, "unavailable");
    }
}
