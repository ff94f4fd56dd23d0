//! A proxy peer: dial `wss://`, say HELLO, wait for the partner's HELLO, exchange messages.
//!
//! - [`connect`] and [`handshake`] are the building blocks tests and the load generator use.
//! - [`Session`] keeps one peer connected: it reconnects with jittered exponential back-off
//!   after any close and hands incoming text messages to a callback. Both roles of
//!   `ws-proxy-client` ([`front`], [`gateway`]) run on it.
//!
//! This module knows the Micronets envelope but not what the messages mean; the roles do.

pub mod front;
pub mod gateway;

use std::sync::Arc;
use std::time::Duration;

use common::envelope::micronets::{self, Hello, Message as Envelope};
use common::tls::TlsError;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use url::Url;

/// The length a response's framing headers give its body, read as a GET's answer would be
/// (as the HTTP client library reads it): a Transfer-Encoding, or no Content-Length, gives no
/// length (`None`); Content-Length values (repeated, or in a list) that are all the same
/// number give it; any other Content-Length is an error, a 502 for a GET, and so for a HEAD.
/// The answer to a HEAD carries exactly this: one valid Content-Length or none.
///
/// # Errors
/// The Content-Length values are not numbers, or differ.
pub(crate) fn framed_length<N, V>(
    headers: impl IntoIterator<Item = (N, V)>,
) -> Result<Option<u64>, String>
where
    N: AsRef<str>,
    V: AsRef<str>,
{
    let mut chunked = false;
    let mut length = None;
    for (name, value) in headers {
        let name = name.as_ref();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            for part in value.as_ref().split(',') {
                let part = part.trim();
                let n = part
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| part.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| format!("invalid Content-Length {part:?}"))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err("conflicting Content-Length values".to_owned());
                }
                length = Some(n);
            }
        }
    }
    Ok(if chunked { None } else { length })
}

/// A connected peer's websocket.
pub type PeerStream = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Why a peer could not connect or lost its connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not a usable `wss://` URL.
    #[error("bad url: {0}")]
    Url(String),
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (the proxy refused our certificate, or we refused its).
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The proxy answered the upgrade with an HTTP error.
    #[error("the proxy refused the connection: HTTP {status} {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body (the proxy's explanation).
        body: String,
    },
    /// The proxy ended the TLS session with an alert: it does not accept our certificate
    /// (unknown CA, revoked, expired). With TLS 1.3 this shows only after the handshake.
    #[error("the proxy refused our certificate: {0}")]
    CertificateRefused(String),
    /// A websocket error.
    #[error("websocket: {0}")]
    Websocket(#[from] tungstenite::Error),
    /// The proxy or the partner closed the connection.
    #[error("closed by the proxy: {code} {reason}")]
    Closed {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The partner's first message was not a HELLO.
    #[error("the partner's first message is not a HELLO: {0}")]
    NotHello(String),
    /// A step took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
}

impl ClientError {
    /// Whether retrying cannot help (the proxy refuses us for who we are).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Url(_)
                | Self::Refused {
                    status: 400 | 403 | 404,
                    ..
                }
        )
    }

    /// Whether this is a refusal: an HTTP refusal of the id, or a certificate either side
    /// does not accept (`ws-proxy-client` exits 77 for these).
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Refused { .. } | Self::CertificateRefused(_) => true,
            Self::Tls(err) => certificate_problem(err),
            _ => false,
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `wss://host:port/micronets/v1/ws-proxy/<id>`.
    pub url: Url,
    /// Client TLS configuration (CA, client certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Name to verify in the proxy's certificate; the URL's host when `None`.
    pub server_name: Option<String>,
    /// Deadline for TCP, TLS and the upgrade together.
    pub connect_timeout: Duration,
    /// Largest message accepted from the partner.
    pub max_message_bytes: usize,
}

impl ConnectOptions {
    /// Options with a 10 s connect deadline and the proxy's 1 MiB message limit.
    ///
    /// # Errors
    /// [`ClientError::Url`] unless the URL is `wss://` with a host.
    pub fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        let url = Url::parse(url).map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
        if url.scheme() != "wss" {
            return Err(ClientError::Url(format!(
                "{url}: only wss:// is supported (the proxy requires TLS)"
            )));
        }
        if url.host_str().is_none() {
            return Err(ClientError::Url(format!("{url}: no host")));
        }
        Ok(Self {
            url,
            tls,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
        })
    }

    fn websocket(&self) -> WebSocketConfig {
        let mut ws = WebSocketConfig::default();
        ws.read_buffer_size = 16 * 1024;
        ws.write_buffer_size = 16 * 1024;
        ws.max_write_buffer_size = 16 * 1024 + self.max_message_bytes + 64;
        ws.max_message_size = Some(self.max_message_bytes);
        ws.max_frame_size = Some(self.max_message_bytes);
        ws
    }
}

/// Dials the proxy: TCP, TLS with our certificate, websocket upgrade.
///
/// # Errors
/// Any [`ClientError`]; an HTTP refusal (404, 403, 409) is [`ClientError::Refused`].
pub async fn connect(options: &ConnectOptions) -> Result<PeerStream, ClientError> {
    tokio::time::timeout(options.connect_timeout, connect_inner(options))
        .await
        .map_err(|_| ClientError::Timeout("connecting to the proxy"))?
}

async fn connect_inner(options: &ConnectOptions) -> Result<PeerStream, ClientError> {
    let url = &options.url;
    let host = url.host_str().unwrap_or_default();
    let port = url.port().unwrap_or(443);
    // IPv6 literals come bracketed from the URL; the socket and the name want them bare.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = format!("{host}:{port}");
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let name = options.server_name.as_deref().unwrap_or(bare);
    let tls = common::tls::connect(options.tls.clone(), name, tcp, options.connect_timeout).await?;
    let request = url.as_str();
    match tokio_tungstenite::client_async_with_config(request, tls, Some(options.websocket())).await
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(ClientError::Refused {
            status: response.status().as_u16(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default(),
        }),
        // The proxy refuses a certificate after the TLS 1.3 handshake: the client only sees
        // an alert while it waits for the upgrade.
        Err(tungstenite::Error::Io(err)) => Err(match tls_alert(&err) {
            Some(alert) => ClientError::CertificateRefused(alert),
            None => ClientError::Websocket(tungstenite::Error::Io(err)),
        }),
        Err(err) => Err(ClientError::Websocket(err)),
    }
}

/// The TLS alert behind an I/O error, if that is what it is.
fn tls_alert(err: &std::io::Error) -> Option<String> {
    let inner = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::AlertReceived(alert) => Some(format!("{alert:?}")),
        _ => None,
    }
}

/// Whether a TLS handshake error is about certificates (ours refused, or theirs untrusted).
fn certificate_problem(err: &TlsError) -> bool {
    match err {
        TlsError::Handshake(io) => io
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(|e| {
                matches!(
                    e,
                    rustls::Error::AlertReceived(_)
                        | rustls::Error::InvalidCertificate(_)
                        | rustls::Error::NoCertificatesPresented
                )
            }),
        _ => false,
    }
}

/// Sends `hello` and waits for the partner's HELLO (the proxy sends nothing of its own).
///
/// `wait` bounds the wait for a partner; `None` waits as long as the proxy keeps us.
///
/// # Errors
/// The connection closes, the first message is not a HELLO, or the wait times out.
pub async fn handshake(
    ws: &mut PeerStream,
    hello: &Hello,
    wait: Option<Duration>,
) -> Result<Hello, ClientError> {
    ws.send(Message::text(Envelope::Hello(hello.clone()).encode()))
        .await?;
    let receive = async {
        loop {
            match ws.next().await {
                None => {
                    return Err(ClientError::Closed {
                        code: 1006,
                        reason: "connection lost".into(),
                    });
                }
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
                Some(Ok(Message::Text(text))) => {
                    return micronets::validate_hello(text.as_str())
                        .map_err(|e| ClientError::NotHello(e.to_string()));
                }
                Some(Ok(Message::Binary(bytes))) => {
                    return micronets::validate_hello_binary(&bytes)
                        .map_err(|e| ClientError::NotHello(e.to_string()));
                }
                Some(Ok(_)) => {}
            }
        }
    };
    match wait {
        Some(wait) => tokio::time::timeout(wait, receive)
            .await
            .map_err(|_| ClientError::Timeout("waiting for the partner's HELLO"))?,
        None => receive.await,
    }
}

/// A close frame as an error.
pub fn closed(frame: Option<tungstenite::protocol::CloseFrame>) -> ClientError {
    match frame {
        Some(frame) => ClientError::Closed {
            code: frame.code.into(),
            reason: frame.reason.to_string(),
        },
        None => ClientError::Closed {
            code: u16::from(CloseCode::Status),
            reason: String::new(),
        },
    }
}

/// Jittered exponential back-off: 0.5 s doubling to `max`, each wait between half and all of
/// the step, so many peers cut off together do not come back together.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 0.5 s, capped at `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            step: Duration::from_millis(500),
            max,
        }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let jitter: f64 = rand::random::<f64>() * 0.5 + 0.5;
        step.mul_f64(jitter)
    }

    /// Back to the first step, after a connection that worked.
    pub fn reset(&mut self) {
        self.step = Duration::from_millis(500);
    }
}

/// How a [`Session`] behaves.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Where to connect.
    pub connect: ConnectOptions,
    /// Our HELLO.
    pub hello: Hello,
    /// Reconnect after a close (`false`: return the first error).
    pub reconnect: bool,
    /// Longest back-off step.
    pub max_backoff: Duration,
}

/// What a session reports to its role.
#[derive(Debug)]
pub enum SessionEvent {
    /// Paired: the partner's HELLO.
    Up(Hello),
    /// A text message from the partner.
    Text(String),
    /// A binary message from the partner.
    Binary(bytes::Bytes),
    /// The connection ended; a reconnect follows if configured.
    Down(ClientError),
}

/// Keeps a peer connected and paired, and carries messages both ways.
#[derive(Debug)]
pub struct Session;

impl Session {
    /// Runs until `outgoing` closes (clean exit, close 1000) or, without reconnect, until the
    /// first error. Messages sent while disconnected wait in `outgoing` for the next pairing.
    ///
    /// # Errors
    /// Without reconnect, the error that ended the connection; with it, only a permanent
    /// refusal (bad URL, 403, 404).
    pub async fn run(
        options: SessionOptions,
        mut outgoing: mpsc::Receiver<String>,
        mut events: impl FnMut(SessionEvent),
    ) -> Result<(), ClientError> {
        let mut backoff = Backoff::new(options.max_backoff);
        loop {
            let started = tokio::time::Instant::now();
            let err = match Self::once(&options, &mut outgoing, &mut events).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let permanent = err.is_permanent();
            if !options.reconnect || permanent {
                return Err(err);
            }
            events(SessionEvent::Down(err));
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn once(
        options: &SessionOptions,
        outgoing: &mut mpsc::Receiver<String>,
        events: &mut impl FnMut(SessionEvent),
    ) -> Result<(), ClientError> {
        let mut ws = connect(&options.connect).await?;
        let partner = handshake(&mut ws, &options.hello, None).await?;
        events(SessionEvent::Up(partner));
        loop {
            tokio::select! {
                message = outgoing.recv() => match message {
                    Some(text) => {
                        ws.feed(Message::text(text)).await?;
                        // Send whatever else is ready in the same flush.
                        while let Ok(text) = outgoing.try_recv() {
                            ws.feed(Message::text(text)).await?;
                        }
                        ws.flush().await?;
                    }
                    None => {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                },
                incoming = ws.next() => match incoming {
                    None => return Err(ClientError::Closed { code: 1006, reason: "connection lost".into() }),
                    Some(Err(err)) => return Err(err.into()),
                    Some(Ok(Message::Text(text))) => events(SessionEvent::Text(text.to_string())),
                    Some(Ok(Message::Binary(bytes))) => events(SessionEvent::Binary(bytes)),
                    Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}
