//! The JSON API over one kept-alive HTTP/1.1 connection (ALPN `http/1.1`), reopened when the
//! server closes it.
//!
//! Uploads stream from the file (never whole in memory). Deadlines: the answer head must start
//! within the timeout, and an upload fails when no byte leaves for the timeout; once the body
//! is sent, the server gets the timeout plus a second per 64 MiB to sign it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Limited, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::conn::{Failure, Target, open_tls};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Largest answer body we accept (keys, JSON, PEM).
const MAX_ANSWER: usize = 16 << 20;
/// Bytes per extra second the server gets to sign an upload.
const SIGNING_RATE: u64 = 64 << 20;

/// An answer: status and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

impl Answer {
    /// The body as JSON.
    ///
    /// # Errors
    /// Not JSON.
    pub(crate) fn json(&self) -> Result<serde_json::Value, Failure> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Failure::Protocol(format!("the answer is not JSON: {e}")))
    }

    /// The server's `{"error": ...}` text, or the body.
    pub(crate) fn error_text(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_owned())
    }

    /// A failure for a non-200 answer: 401/403 refused (77), anything else rejected (1).
    pub(crate) fn failure(&self, what: &str) -> Failure {
        let text = format!("{what}: {} ({})", self.error_text(), self.status);
        match self.status {
            401 | 403 => Failure::Refused(text),
            _ => Failure::Rejected(text),
        }
    }
}

/// The API client.
pub(crate) struct Api {
    target: Target,
    sender: Option<SendRequest<Body>>,
}

impl Api {
    /// Connects (TCP, TLS with ALPN `http/1.1`, HTTP handshake).
    ///
    /// # Errors
    /// Cannot connect, TLS failure.
    pub(crate) async fn connect(target: Target) -> Result<Self, Failure> {
        let mut api = Self {
            target,
            sender: None,
        };
        api.sender().await?;
        Ok(api)
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Body>, Failure> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            let stream = open_tls(&self.target).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Failure::Connect(format!("http handshake: {e}")))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let timeout = self.target.timeout;
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| Failure::Connect("no connection".into()))?;
        tokio::time::timeout(timeout, sender.ready())
            .await
            .map_err(|_| Failure::Connect("the connection did not become ready".into()))?
            .map_err(|e| Failure::Connect(e.to_string()))?;
        Ok(sender)
    }

    fn request(&self, method: hyper::Method, uri: &str) -> hyper::http::request::Builder {
        hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, self.target.authority())
            .header(
                hyper::header::USER_AGENT,
                concat!("signing-client/", env!("CARGO_PKG_VERSION")),
            )
    }

    /// `GET uri`.
    ///
    /// # Errors
    /// Connection failures and timeouts (69).
    pub(crate) async fn get(&mut self, uri: &str) -> Result<Answer, Failure> {
        let request = self
            .request(hyper::Method::GET, uri)
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| Failure::Usage(e.to_string()))?;
        let timeout = self.target.timeout;
        let sender = self.sender().await?;
        let response = tokio::time::timeout(timeout, sender.send_request(request))
            .await
            .map_err(|_| Failure::Connect(format!("no answer within {}s", timeout.as_secs())))?
            .map_err(|e| Failure::Connect(e.to_string()))?;
        read_answer(response, timeout).await
    }

    /// `POST uri` with the content of `file` (`size` bytes), counting bytes into `bar`.
    ///
    /// # Errors
    /// The file cannot be read (74), connection failures and timeouts (69).
    pub(crate) async fn post_file(
        &mut self,
        uri: &str,
        file: &Path,
        size: u64,
        bar: Option<indicatif::ProgressBar>,
    ) -> Result<Answer, Failure> {
        let opened = tokio::fs::File::open(file)
            .await
            .map_err(|e| Failure::Io(format!("{}: {e}", file.display())))?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let stream =
            tokio_util::io::ReaderStream::with_capacity(opened, 256 * 1024).map(move |piece| {
                piece.map(|bytes| {
                    counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if let Some(bar) = &bar {
                        bar.inc(bytes.len() as u64);
                    }
                    Frame::data(bytes)
                })
            });
        let request = self
            .request(hyper::Method::POST, uri)
            .header(hyper::header::CONTENT_LENGTH, size)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(StreamBody::new(stream).boxed_unsync())
            .map_err(|e| Failure::Usage(e.to_string()))?;
        let timeout = self.target.timeout;
        let sender = self.sender().await?;
        let exchange = sender.send_request(request);
        tokio::pin!(exchange);
        // A watchdog instead of one deadline: an upload may take long, but must keep moving.
        let mut last = 0;
        let mut since = Instant::now();
        let response = loop {
            tokio::select! {
                result = &mut exchange => {
                    break result.map_err(|e| classify_send_error(&e, file))?;
                }
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    let now = sent.load(Ordering::Relaxed);
                    if now != last {
                        last = now;
                        since = Instant::now();
                    }
                    let allowed = if now >= size {
                        timeout + Duration::from_secs(size / SIGNING_RATE)
                    } else {
                        timeout
                    };
                    if since.elapsed() > allowed {
                        return Err(Failure::Connect(if now >= size {
                            format!("no answer within {}s of sending {}", allowed.as_secs(), file.display())
                        } else {
                            format!("the upload of {} stalled for {}s", file.display(), allowed.as_secs())
                        }));
                    }
                }
            }
        };
        read_answer(response, timeout).await
    }
}

fn classify_send_error(err: &hyper::Error, file: &Path) -> Failure {
    use std::error::Error as _;
    // A local read error surfaces as the body's error.
    let mut source = err.source();
    while let Some(inner) = source {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            if err.is_user() {
                return Failure::Io(format!("{}: {io}", file.display()));
            }
        }
        source = inner.source();
    }
    Failure::Connect(format!("sending {}: {err}", file.display()))
}

async fn read_answer(
    response: hyper::Response<hyper::body::Incoming>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    let status = response.status().as_u16();
    let body = tokio::time::timeout(
        timeout,
        Limited::new(response.into_body(), MAX_ANSWER).collect(),
    )
    .await
    .map_err(|_| Failure::Connect("the answer stalled".into()))?
    .map_err(|e| Failure::Connect(format!("reading the answer: {e}")))?
    .to_bytes();
    Ok(Answer { status, body })
}
