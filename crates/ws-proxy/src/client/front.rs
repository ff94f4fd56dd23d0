//! The HTTP front end of `ws-proxy-client connect`: each HTTP request becomes a REST:REQUEST to
//! the partner, and the REST:RESPONSE with the matching `inResponseTo` becomes the HTTP
//! response.
//!
//! Requests are numbered 1, 2, 3, ... (the HELLO is 0); a request is registered before it is
//! sent, so a fast answer is never lost, and any number may be in flight. No answer in time
//! gives 504, no partner 503, a lost connection 502. Request headers travel as the original test
//! client sends them (all but Content-Length; Content-Type and Content-Encoding only when there
//! is no body, since the body carries them as `dataFormat`); response headers may use `value`
//! or `val`. The answer to a HEAD keeps the Content-Length the gateway side carried over when
//! it is one valid length and there is no Transfer-Encoding, else it has none.
//!
//! Whoever reaches the front end acts with this client's certificate, so [`serve`] bounds
//! what one local client can hold: at most [`FrontLimits::max_connections`] connections (one
//! more is closed at once), a request head within [`FrontLimits::header_timeout`], a body
//! within the request timeout (else 408; a declared length over the body limit gets 413
//! before any of it is read), and no connection older than [`FrontLimits::max_age`]. A Unix
//! socket in a directory only the owner may enter keeps other local users out; a TCP port,
//! even on 127.0.0.1, does not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::daemon::Shutdown;
use common::envelope::micronets::{self, BodyError, Message, RestRequest, RestResponse};
use common::local_http::Pool;
use tokio::sync::{mpsc, oneshot};

use super::SessionEvent;
use crate::local_http;

/// Headers that describe the body, which travels as `dataFormat`/`messageBody` instead.
const BODY_HEADERS: [HeaderName; 2] = [header::CONTENT_TYPE, header::CONTENT_ENCODING];

/// The connect-mode front end; clone it freely.
#[derive(Clone, Debug)]
pub struct Front {
    state: Arc<FrontState>,
}

#[derive(Debug)]
struct FrontState {
    out: mpsc::Sender<String>,
    pending: Mutex<HashMap<i64, oneshot::Sender<RestResponse>>>,
    next_id: AtomicI64,
    paired: AtomicBool,
    request_timeout: Duration,
    max_body_bytes: usize,
}

impl Front {
    /// A front end; the receiver is the session's outgoing queue.
    pub fn new(request_timeout: Duration, max_body_bytes: usize) -> (Self, mpsc::Receiver<String>) {
        let (out, rx) = mpsc::channel(256);
        let front = Self {
            state: Arc::new(FrontState {
                out,
                pending: Mutex::new(HashMap::new()),
                next_id: AtomicI64::new(1),
                paired: AtomicBool::new(false),
                request_timeout,
                max_body_bytes,
            }),
        };
        (front, rx)
    }

    /// Where other sources (stdin) queue messages for the partner.
    pub fn sender(&self) -> mpsc::Sender<String> {
        self.state.out.clone()
    }

    /// The HTTP router: every method and path goes to the partner.
    pub fn router(&self) -> Router {
        Router::new().fallback(relay).with_state(self.clone())
    }

    /// Handles a session event; returns a line to print (events and other messages).
    pub fn on_event(&self, event: SessionEvent) -> Option<String> {
        let state = &self.state;
        match event {
            SessionEvent::Up(hello) => {
                state.paired.store(true, Ordering::SeqCst);
                tracing::info!(peer_class = ?hello.peer_class, peer_id = ?hello.peer_id, "paired");
                None
            }
            SessionEvent::Down(err) => {
                state.paired.store(false, Ordering::SeqCst);
                // Dropping the senders answers every waiting request with 502.
                state
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                tracing::warn!(%err, "disconnected; reconnecting");
                None
            }
            SessionEvent::Binary(bytes) => Some(format!("binary message of {} bytes", bytes.len())),
            SessionEvent::Text(text) => match micronets::parse(&text) {
                Ok(Message::RestResponse(response)) => {
                    let waiter = state
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&response.in_response_to);
                    match waiter {
                        Some(waiter) => {
                            let _ = waiter.send(response);
                        }
                        None => tracing::warn!(
                            in_response_to = response.in_response_to,
                            "response to no waiting request (late or duplicate); dropped"
                        ),
                    }
                    None
                }
                Ok(Message::RestRequest(request)) => {
                    // This side serves no requests; say so instead of leaving the peer waiting.
                    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
                    let answer = RestResponse::new(id, request.message_id, 501)
                        .with_reason("Not Implemented");
                    let _ = state.out.try_send(Message::RestResponse(answer).encode());
                    None
                }
                Ok(_) => Some(text),
                Err(err) => {
                    tracing::warn!(err = %common::log::Escaped(&err), "message from the partner is not a Micronets envelope");
                    Some(text)
                }
            },
        }
    }
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    let mut body = text.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn relay(State(front): State<Front>, request: Request) -> Response {
    let state = &front.state;
    let (parts, body) = request.into_parts();
    let head = parts.method == Method::HEAD;
    let too_large = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {} bytes", state.max_body_bytes),
        )
    };
    // A declared length over the limit is refused before any of the body is read.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body_bytes as u64) {
        return too_large();
    }
    let reading = axum::body::to_bytes(body, state.max_body_bytes);
    let body = match tokio::time::timeout(state.request_timeout, reading).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    state.request_timeout.as_secs_f64()
                ),
            );
        }
    };
    if !state.paired.load(Ordering::SeqCst) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "not paired with a peer yet",
        );
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let mut message = RestRequest::new(id, parts.method.as_str(), path);
    for (name, value) in &parts.headers {
        let skip = *name == header::CONTENT_LENGTH
            || *name == header::TRANSFER_ENCODING
            || (!body.is_empty() && BODY_HEADERS.contains(name));
        if !skip {
            message = message.with_header(name.as_str(), String::from_utf8_lossy(value.as_bytes()));
        }
    }
    if !body.is_empty() {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        message = match message.with_body(content_type, &body) {
            Ok(message) => message,
            Err(err @ BodyError::NotUtf8(_)) => {
                return plain(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("{err}; send binary bodies as application/octet-stream"),
                );
            }
            Err(err) => return plain(StatusCode::BAD_REQUEST, err.to_string()),
        };
    }
    let (tx, rx) = oneshot::channel();
    state
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, tx);
    let forget = || {
        state
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    };
    if state
        .out
        .send(Message::RestRequest(message).encode())
        .await
        .is_err()
    {
        forget();
        return plain(
            StatusCode::BAD_GATEWAY,
            "the connection to the proxy is gone",
        );
    }
    match tokio::time::timeout(state.request_timeout, rx).await {
        Ok(Ok(response)) => to_http(&response, head),
        Ok(Err(_)) => plain(
            StatusCode::BAD_GATEWAY,
            "the connection to the peer was lost before it answered",
        ),
        Err(_) => {
            forget();
            plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no REST:RESPONSE within {} s",
                    state.request_timeout.as_secs_f64()
                ),
            )
        }
    }
}

/// Turns a REST:RESPONSE into an HTTP response; `head`: the answer to a HEAD request, whose
/// Content-Length (the upstream's, carried in the headers) is kept when it is what a GET's
/// framing would give (see `framed_length`), since no body says it.
pub fn to_http(response: &RestResponse, head: bool) -> Response {
    let Ok(status) = StatusCode::from_u16(response.status_code) else {
        return plain(
            StatusCode::BAD_GATEWAY,
            format!("the peer answered with status {}", response.status_code),
        );
    };
    let body = match response.body_bytes() {
        Ok(body) => body,
        Err(err) => return plain(StatusCode::BAD_GATEWAY, format!("the peer's answer: {err}")),
    };
    // Without a body, a HEAD's length is what a GET's framing would give: one valid
    // Content-Length and no Transfer-Encoding, else none (a GET's answer here always has
    // a body whose length is its own, so it never fails on them).
    let head_length = if head && body.is_none() {
        let framing = response
            .headers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|pair| (pair.name.as_str(), pair.value.as_str()));
        super::framed_length(framing).ok().flatten()
    } else {
        None
    };
    let mut http = Response::new(Body::from(
        body.clone().map(Bytes::from).unwrap_or_default(),
    ));
    *http.status_mut() = status;
    let headers = http.headers_mut();
    for pair in response.headers.as_deref().unwrap_or_default() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(pair.name.as_bytes()),
            HeaderValue::from_str(&pair.value),
        ) else {
            tracing::debug!(name = ?pair.name, "unusable response header dropped");
            continue;
        };
        // A body's length is its own, counted by the HTTP server; a HEAD's is set below.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        headers.append(name, value);
    }
    if let Some(length) = head_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    if body.is_some() && !headers.contains_key(header::CONTENT_TYPE) {
        if let Some(Ok(value)) = response.data_format.as_deref().map(HeaderValue::from_str) {
            headers.insert(header::CONTENT_TYPE, value);
        }
    }
    http
}

/// What one local client may hold of the HTTP front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontLimits {
    /// Connections at once; one more evicts the oldest not being answered (at any age),
    /// or is closed at once.
    pub max_connections: usize,
    /// Time a request head may take to arrive (each keep-alive one's too).
    pub header_timeout: Duration,
    /// A connection closes after the request in progress at this age, and is dropped one
    /// header timeout later whatever it is doing.
    pub max_age: Duration,
}

impl FrontLimits {
    /// The limits for a front end whose requests wait up to `request_timeout` for the
    /// partner: 64 connections, 10 s for a head, and an age of two request timeouts (the
    /// body's deadline and the answer's) plus the head's.
    pub fn for_request_timeout(request_timeout: Duration) -> Self {
        let header_timeout = Duration::from_secs(10);
        Self {
            max_connections: 64,
            header_timeout,
            max_age: request_timeout
                .saturating_mul(2)
                .saturating_add(header_timeout),
        }
    }
}

/// Where the HTTP front end listens: a TCP port (every local user can reach it) or a Unix
/// socket (its directory decides who can).
pub use crate::local_http::Listener as FrontListener;

/// Serves `router` on `listener` within `limits` until `shutdown`.
pub async fn serve(
    listener: FrontListener,
    router: Router,
    limits: FrontLimits,
    shutdown: Shutdown,
) {
    let pool = Pool::new(
        "http-front",
        "--http-max-connections",
        limits.max_connections,
    );
    let limits = local_http::Limits {
        header_timeout: limits.header_timeout,
        max_age: limits.max_age,
        max_buf_size: 64 * 1024,
        what: "HTTP front end",
    };
    local_http::serve(listener, router, pool, limits, shutdown).await;
}
