//! The client library: token file, token fetch, websocket upgrade, reconnect with back-off.
//!
//! A client keeps its token in a file (default `./token.txt`, written 0600). [`connect`]
//! presents the saved token on `GET /` (the server answers with the same token while it is
//! valid, else a new identity), saves what it got, and upgrades `/` or `/data` with the same
//! `token` header, over TLS on TCP or plain on a Unix socket. Unlike the original client, the
//! server certificate's name is checked (pass the name to expect in [`Transport::Tls`]).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::envelope::talk::{BinaryMessage, Limits, Message};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::hub::Channel;

/// Default token file, as the original client's.
pub const DEFAULT_TOKEN_FILE: &str = "token.txt";
/// Longest token answer read.
const MAX_TOKEN_ANSWER: usize = 8192;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// TLS failed.
    #[error("{0}")]
    Tls(#[from] common::tls::TlsError),
    /// The server answered with an error status.
    #[error("server answered {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Body text.
        body: String,
    },
    /// HTTP failed.
    #[error("http: {0}")]
    Http(String),
    /// The websocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// A step did not finish in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The server sent something that is not a secure-talk message.
    #[error("bad message from the server: {0}")]
    Protocol(String),
    /// The token file cannot be read or written.
    #[error("token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl ClientError {
    /// Whether trying again later may help (network trouble, a stopping server, a limit).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Io(_) | Self::Timeout(_) | Self::WebSocket(_) | Self::Http(_) => true,
            Self::Refused { status, .. } => *status == 503,
            Self::Tls(common::tls::TlsError::HandshakeTimeout(_)) => true,
            _ => false,
        }
    }
}

/// How to reach the server.
#[derive(Clone)]
pub enum Transport {
    /// HTTPS/WSS on TCP.
    Tls {
        /// Host name or address to connect to.
        host: String,
        /// Port.
        port: u16,
        /// Name the server certificate must carry.
        server_name: String,
        /// CA, client certificate and key.
        config: Arc<ClientConfig>,
    },
    /// Plain HTTP/WS on a Unix socket.
    Unix(PathBuf),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls { host, port, .. } => write!(f, "wss://{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Everything a connection needs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Where the server is.
    pub transport: Transport,
    /// Where the token is kept; `None`: not kept (a new identity per connection).
    pub token_file: Option<PathBuf>,
    /// Deadline of each step (connect, TLS, token, upgrade).
    pub timeout: Duration,
    /// Largest message accepted from the server.
    pub max_message_bytes: usize,
}

impl ClientOptions {
    /// Options with the default token file and limits.
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            token_file: Some(PathBuf::from(DEFAULT_TOKEN_FILE)),
            timeout: Duration::from_secs(10),
            max_message_bytes: 512 << 20,
        }
    }
}

/// A TLS or Unix stream.
#[derive(Debug)]
pub enum Stream {
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Unix socket.
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens a stream to the server (TCP + TLS, or the Unix socket).
///
/// # Errors
/// Connect or handshake failure, or timeout.
pub async fn open_stream(options: &ClientOptions) -> Result<Stream, ClientError> {
    match &options.transport {
        Transport::Tls {
            host,
            port,
            server_name,
            config,
        } => {
            let tcp =
                tokio::time::timeout(options.timeout, TcpStream::connect((host.as_str(), *port)))
                    .await
                    .map_err(|_| ClientError::Timeout("connecting"))??;
            let _ = tcp.set_nodelay(true);
            let tls =
                common::tls::connect(config.clone(), server_name, tcp, options.timeout).await?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        Transport::Unix(path) => {
            let unix = tokio::time::timeout(options.timeout, UnixStream::connect(path))
                .await
                .map_err(|_| ClientError::Timeout("connecting"))??;
            Ok(Stream::Unix(unix))
        }
    }
}

fn authority(transport: &Transport) -> String {
    match transport {
        Transport::Tls { host, port, .. } if host.contains(':') => format!("[{host}]:{port}"),
        Transport::Tls { host, port, .. } => format!("{host}:{port}"),
        Transport::Unix(_) => "localhost".to_owned(),
    }
}

/// `GET /` with the saved token (if any); returns the token to use.
///
/// # Errors
/// Connection failures, a non-200 answer, or an answer that is not a token.
pub async fn fetch_token(
    options: &ClientOptions,
    saved: Option<&str>,
) -> Result<String, ClientError> {
    let stream = open_stream(options).await?;
    let work = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut request = hyper::Request::get("/")
            .header(hyper::header::HOST, authority(&options.transport))
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if let Some(token) = saved {
            if let Ok(value) = hyper::header::HeaderValue::from_str(token) {
                request.headers_mut().insert("token", value);
            }
        }
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_TOKEN_ANSWER)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        driver.abort();
        let text = String::from_utf8_lossy(&body).trim().to_owned();
        if status != 200 {
            return Err(ClientError::Refused { status, body: text });
        }
        if crate::token::peek(&text).is_none() {
            return Err(ClientError::Protocol(
                "the token answer is not a JWT".into(),
            ));
        }
        Ok(text)
    };
    tokio::time::timeout(options.timeout, work)
        .await
        .map_err(|_| ClientError::Timeout("fetching the token"))?
}

/// Reads a saved token; `None` when there is no file.
///
/// # Errors
/// The file exists but cannot be read.
pub fn read_token(path: &Path) -> Result<Option<String>, ClientError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ClientError::TokenFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Saves a token atomically, mode 0600.
///
/// # Errors
/// The file cannot be written.
pub fn save_token(path: &Path, token: &str) -> Result<(), ClientError> {
    use std::io::Write as _;
    let fail = |source| ClientError::TokenFile {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // tempfile creates the file 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".token-")
        .tempfile_in(dir)
        .map_err(fail)?;
    tmp.write_all(token.as_bytes()).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A JSON text message.
    Message(Message),
    /// A binary framed message (the `checkSum` push, binary pipe output).
    Binary(BinaryMessage),
}

/// A websocket to the server, with the identity it runs under.
#[derive(Debug)]
pub struct Connection {
    ws: WebSocketStream<Stream>,
    /// The `client_id` of the token.
    pub client_id: u64,
    /// The token presented.
    pub token: String,
    /// The close code and reason the server sent, once closed.
    pub closed: Option<(u16, String)>,
    max_message_bytes: usize,
}

/// Fetches (or reuses) the token, saves it and opens `channel`.
///
/// # Errors
/// Any step failing; [`ClientError::Refused`] carries the server's status (401 for a token
/// it does not accept).
pub async fn connect(options: &ClientOptions, channel: Channel) -> Result<Connection, ClientError> {
    let saved = match &options.token_file {
        Some(path) => read_token(path)?,
        None => None,
    };
    let token = fetch_token(options, saved.as_deref()).await?;
    if let Some(path) = &options.token_file {
        if saved.as_deref() != Some(token.as_str()) {
            save_token(path, &token)?;
        }
    }
    upgrade(options, channel, &token).await
}

/// Opens `channel` with `token` (no token fetch).
///
/// # Errors
/// Connection failure or refusal.
pub async fn upgrade(
    options: &ClientOptions,
    channel: Channel,
    token: &str,
) -> Result<Connection, ClientError> {
    let client_id = crate::token::peek(token)
        .map(|c| c.client_id)
        .ok_or_else(|| ClientError::Protocol("the token is not a JWT".into()))?;
    let stream = open_stream(options).await?;
    let path = match channel {
        Channel::Admin => "/",
        Channel::Data => "/data",
    };
    let mut request = format!("ws://{}{path}", authority(&options.transport))
        .into_client_request()
        .map_err(ClientError::WebSocket)?;
    let value = hyper::header::HeaderValue::from_str(token)
        .map_err(|_| ClientError::Protocol("the token is not a header value".into()))?;
    request.headers_mut().insert("token", value);
    let config = WebSocketConfig::default()
        .read_buffer_size(crate::channel::READ_BUFFER)
        .max_message_size(Some(options.max_message_bytes))
        .max_frame_size(Some(options.max_message_bytes));
    let upgrading = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
    let ws = match tokio::time::timeout(options.timeout, upgrading).await {
        Err(_) => return Err(ClientError::Timeout("upgrading")),
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default();
            return Err(ClientError::Refused { status, body });
        }
        Ok(Err(err)) => return Err(err.into()),
    };
    Ok(Connection {
        ws,
        client_id,
        token: token.to_owned(),
        closed: None,
        max_message_bytes: options.max_message_bytes,
    })
}

/// Back-off between connection attempts.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all; `None` for no limit.
    pub attempts: Option<u32>,
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: Some(8),
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

/// [`connect`], retried with doubling, jittered waits while the error is transient.
///
/// # Errors
/// The last error once attempts run out, or the first permanent one.
pub async fn connect_with_retry(
    options: &ClientOptions,
    channel: Channel,
    retry: Retry,
) -> Result<Connection, ClientError> {
    use rand::Rng as _;
    let mut wait = retry.initial;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match connect(options, channel).await {
            Ok(conn) => return Ok(conn),
            Err(err) if err.is_transient() && retry.attempts.is_none_or(|n| attempt < n) => {
                let jitter = rand::thread_rng().gen_range(0.5..1.0);
                let sleep = wait.mul_f64(jitter);
                tracing::info!(%err, attempt, wait_ms = sleep.as_millis(), "connection failed; retrying");
                tokio::time::sleep(sleep).await;
                wait = (wait * 2).min(retry.max);
            }
            Err(err) => return Err(err),
        }
    }
}

impl Connection {
    /// Sends a JSON message.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send(&mut self, message: &Message) -> Result<(), ClientError> {
        self.ws.send(WsMessage::text(message.encode())).await?;
        Ok(())
    }

    /// Sends a binary framed message.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send_binary(&mut self, message: &BinaryMessage) -> Result<(), ClientError> {
        self.ws.send(WsMessage::binary(message.encode())).await?;
        Ok(())
    }

    /// Sends a text frame as is.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.ws.send(WsMessage::text(text.into())).await?;
        Ok(())
    }

    /// Queues a text frame without flushing (see [`Connection::flush`]).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn feed_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.ws.feed(WsMessage::text(text.into())).await?;
        Ok(())
    }

    /// Flushes queued frames.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.ws.flush().await?;
        Ok(())
    }

    /// The next text or binary frame, raw; `None` once closed.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn recv_frame(&mut self) -> Result<Option<WsMessage>, ClientError> {
        loop {
            match self.ws.next().await {
                None => return Ok(None),
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(None),
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(WsMessage::Close(frame))) => {
                    self.closed = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(message @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                    return Ok(Some(message));
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// The next message; `None` once closed (see [`Connection::closed`]).
    ///
    /// # Errors
    /// The connection failed or the server sent something undecodable.
    pub async fn recv(&mut self) -> Result<Option<Incoming>, ClientError> {
        let Some(frame) = self.recv_frame().await? else {
            return Ok(None);
        };
        let limits = Limits {
            max_header: self.max_message_bytes,
            max_payload: self.max_message_bytes,
        };
        match frame {
            WsMessage::Text(text) => Message::decode(text.as_bytes(), self.max_message_bytes)
                .map(|m| Some(Incoming::Message(m)))
                .map_err(|e| ClientError::Protocol(e.to_string())),
            WsMessage::Binary(bytes) => BinaryMessage::decode(&bytes, limits)
                .map(|m| Some(Incoming::Binary(m)))
                .map_err(|e| ClientError::Protocol(e.to_string())),
            _ => Ok(None),
        }
    }

    /// [`Connection::recv`] with a deadline; `Ok(None)` also when it passes.
    ///
    /// # Errors
    /// As [`Connection::recv`].
    pub async fn recv_timeout(&mut self, wait: Duration) -> Result<Option<Incoming>, ClientError> {
        match tokio::time::timeout(wait, self.recv()).await {
            Ok(result) => result,
            Err(_) => Ok(None),
        }
    }

    /// The underlying stream, for load generators that write frames themselves. Bytes the
    /// websocket had read ahead are lost, so call it before the server sends anything.
    pub fn into_stream(self) -> Stream {
        self.ws.into_inner()
    }

    /// Closes the websocket (1000).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn close(mut self) -> Result<(), ClientError> {
        match self.ws.close(None).await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}
