//! The gateway side of `ws-proxy-client gateway`: answers each REST:REQUEST from the partner by
//! performing it against a local HTTP service and sending the REST:RESPONSE back.
//!
//! The upstream is a plain `http://` base URL (the Micronets gateway's services listen on
//! loopback); the request's `path` (with its query) is appended to the base path and
//! `queryStrings` are added to the query. Bodies follow `dataFormat` both ways; an upstream
//! body that is not UTF-8 text travels as `application/octet-stream` (base64) with the
//! upstream's Content-Type kept in the headers. An answer without a body (HEAD) carries the
//! length the upstream's framing would give a GET: one valid Content-Length, none with a
//! Transfer-Encoding or without a Content-Length, and 502 for conflicting or invalid ones. At most 64 requests run at once; each has a
//! deadline (504) and a body limit (502).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::envelope::micronets::{
    self, BodyError, Message, NameValue, RestRequest, RestResponse, data_format,
};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, mpsc};
use url::Url;

use super::SessionEvent;

/// Requests performed at once; more wait.
const MAX_IN_FLIGHT: usize = 64;

/// Headers that belong to one hop, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Why a gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The upstream URL is unusable.
    #[error("upstream {0}")]
    Upstream(String),
}

/// The gateway role; clone it freely.
#[derive(Clone, Debug)]
pub struct Gateway {
    state: Arc<GatewayState>,
}

#[derive(Debug)]
struct GatewayState {
    out: mpsc::Sender<String>,
    upstream: Url,
    client: Client<HttpConnector, Full<Bytes>>,
    next_id: AtomicI64,
    in_flight: Arc<Semaphore>,
    timeout: Duration,
    max_body_bytes: usize,
}

impl Gateway {
    /// A gateway for `upstream` (an `http://host:port[/base]` URL); the receiver is the
    /// session's outgoing queue.
    ///
    /// # Errors
    /// An upstream URL that is not plain `http://` with a host.
    pub fn new(
        upstream: &str,
        timeout: Duration,
        max_body_bytes: usize,
    ) -> Result<(Self, mpsc::Receiver<String>), GatewayError> {
        let upstream = Url::parse(upstream)
            .map_err(|e| GatewayError::Upstream(format!("{upstream:?}: {e}")))?;
        if upstream.scheme() != "http" || upstream.host_str().is_none() {
            return Err(GatewayError::Upstream(format!(
                "{upstream}: must be http://host[:port][/base]"
            )));
        }
        let (out, rx) = mpsc::channel(256);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok((
            Self {
                state: Arc::new(GatewayState {
                    out,
                    upstream,
                    client,
                    next_id: AtomicI64::new(1),
                    in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                    timeout,
                    max_body_bytes,
                }),
            },
            rx,
        ))
    }

    /// Where other sources (stdin events) queue messages for the partner.
    pub fn sender(&self) -> mpsc::Sender<String> {
        self.state.out.clone()
    }

    /// The next message id (for events this side emits).
    pub fn next_id(&self) -> i64 {
        self.state.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Handles a session event: requests are performed in the background; returns a line to
    /// print for anything else.
    pub fn on_event(&self, event: SessionEvent) -> Option<String> {
        match event {
            SessionEvent::Up(hello) => {
                tracing::info!(peer_class = ?hello.peer_class, peer_id = ?hello.peer_id, "paired");
                None
            }
            SessionEvent::Down(err) => {
                tracing::warn!(%err, "disconnected; reconnecting");
                None
            }
            SessionEvent::Binary(bytes) => Some(format!("binary message of {} bytes", bytes.len())),
            SessionEvent::Text(text) => match micronets::parse(&text) {
                Ok(Message::RestRequest(request)) => {
                    let gateway = self.clone();
                    tokio::spawn(async move {
                        let Ok(_permit) = gateway.state.in_flight.clone().acquire_owned().await
                        else {
                            return;
                        };
                        let response = gateway.perform(&request).await;
                        let _ = gateway
                            .state
                            .out
                            .send(Message::RestResponse(response).encode())
                            .await;
                    });
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

    /// Performs one REST:REQUEST against the upstream and builds the answer.
    pub async fn perform(&self, request: &RestRequest) -> RestResponse {
        let state = &self.state;
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let fail = |status: u16, reason: &str, text: String| {
            tracing::info!(method = ?request.method, path = ?request.path, status, text = ?text, "request failed");
            RestResponse::new(id, request.message_id, status)
                .with_reason(reason)
                .with_body(Some("text/plain"), text.as_bytes())
                .unwrap_or_else(|_| RestResponse::new(id, request.message_id, status))
        };
        let http = match self.build(request) {
            Ok(http) => http,
            Err(text) => return fail(400, "Bad Request", text),
        };
        let call = async {
            let response = state
                .client
                .request(http)
                .await
                .map_err(|e| (502, e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, state.max_body_bytes)
                .collect()
                .await
                .map_err(|e| (502, format!("reading the upstream body: {e}")))?
                .to_bytes();
            Ok::<_, (u16, String)>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(state.timeout, call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err((status, text))) => {
                return fail(status, "Bad Gateway", format!("upstream: {text}"));
            }
            Err(_) => {
                return fail(
                    504,
                    "Gateway Timeout",
                    format!(
                        "upstream did not answer within {} s",
                        state.timeout.as_secs_f64()
                    ),
                );
            }
        };
        let mut response = RestResponse::new(id, request.message_id, parts.status.as_u16());
        response.reason_phrase = parts.status.canonical_reason().map(str::to_owned);
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut keep_content_type = false;
        if !body.is_empty() {
            response = match response.clone().with_body(content_type.as_deref(), &body) {
                Ok(response) => response,
                Err(BodyError::NotUtf8(_) | BodyError::Json(_)) => {
                    keep_content_type = true;
                    response
                        .with_body(Some(data_format::OCTET_STREAM), &body)
                        .unwrap_or_else(|_| RestResponse::new(id, request.message_id, 502))
                }
                Err(BodyError::Base64) => RestResponse::new(id, request.message_id, 502),
            };
        }
        let mut headers = Vec::new();
        // A body's length travels with it; without one (HEAD, 304) the length a GET's framing
        // would give is the only place it is said: one valid Content-Length, or none.
        if body.is_empty() {
            let framing = parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())));
            match super::framed_length(framing) {
                Ok(Some(length)) => {
                    headers.push(NameValue::new("content-length", length.to_string()))
                }
                Ok(None) => {}
                Err(text) => return fail(502, "Bad Gateway", format!("upstream: {text}")),
            }
        }
        for (name, value) in &parts.headers {
            let name = name.as_str();
            let skip = HOP_BY_HOP.contains(&name)
                || name == "content-length"
                || (name == "content-type" && !keep_content_type && !body.is_empty());
            if !skip {
                headers.push(NameValue::new(
                    name,
                    String::from_utf8_lossy(value.as_bytes()),
                ));
            }
        }
        if !headers.is_empty() {
            response.headers = Some(headers);
        }
        tracing::info!(method = ?request.method, path = ?request.path, status = response.status_code, "performed");
        response
    }

    fn build(&self, request: &RestRequest) -> Result<hyper::Request<Full<Bytes>>, String> {
        let mut url = self.state.upstream.clone();
        let (path, query) = match request.path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (request.path.as_str(), None),
        };
        if !path.starts_with('/') {
            return Err(format!("path {path:?} does not start with '/'"));
        }
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{path}"));
        url.set_query(query);
        if let Some(params) = &request.query_strings {
            let mut pairs = url.query_pairs_mut();
            for pair in params {
                pairs.append_pair(&pair.name, &pair.value);
            }
        }
        let method = hyper::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| format!("method {:?} is not an HTTP method", request.method))?;
        let mut builder = hyper::Request::builder().method(method).uri(url.as_str());
        for pair in &request.headers {
            let lower = pair.name.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&lower.as_str()) || lower == "content-length" {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(pair.name.as_bytes()),
                HeaderValue::from_str(&pair.value),
            ) {
                builder = builder.header(name, value);
            }
        }
        let body = request.body_bytes().map_err(|e| e.to_string())?;
        if body.is_some() && request.header("content-type").is_none() {
            if let Some(format) = request.data_format.as_deref() {
                builder = builder.header(header::CONTENT_TYPE, format);
            }
        }
        builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())
    }
}
