//! The remo client library: log in, run commands, get and put files, drive interactive
//! commands. Works against our server and against the stock original 0.6.0 server.
//!
//! One HTTP/1.1 connection is kept open and reused (the original client opened one per
//! request); it is re-established when the server closes it. The request counter follows the
//! protocol: 1 after login, +1 per request; before it would overflow int16, and when the server
//! says the session is gone, the client logs in again by itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::body::{BodyError, BodyReader, full, unix_now};
use crate::keys::{PrivateKey, PublicKey};
use crate::proto::{self, AuthRequest, Cipher, Magic, TokenHeader};
use crate::server::{EXIT_STATUS_HEADER, SIZE_HEADER};

type ReqBody = crate::body::BoxedBody;

/// Longest response line accepted.
const MAX_LINE: usize = 64 << 20;
/// Plaintext bytes per upload token (the original client used 8 KiB; larger pieces are
/// cheaper and any server reads any size).
pub const UPLOAD_PIECE: usize = 64 * 1024;

/// Client errors, each with a distinct exit code in the CLI.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Cannot reach the server.
    #[error("cannot reach {url}: {detail}")]
    Connect {
        /// The server.
        url: String,
        /// The cause.
        detail: String,
    },
    /// The server refused the login (unknown user, wrong key).
    #[error("login refused by the server (HTTP {0}): unknown user or wrong key")]
    LoginRefused(u16),
    /// The server's answer to /auth is not signed by the expected server key.
    #[error(
        "the server's login answer is not signed by the expected server key (wrong --server-key?)"
    )]
    ServerKey,
    /// The server answered with an error status.
    #[error("server answered {status}{}", if message.is_empty() { String::new() } else { format!(": {}", message.trim_end()) })]
    Status {
        /// HTTP status.
        status: u16,
        /// Decrypted error text, if any.
        message: String,
    },
    /// The answer is not what the protocol says (bad token, broken framing, truncated).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Local file or transport I/O.
    #[error("{0}")]
    Io(String),
}

impl ClientError {
    fn protocol(what: impl std::fmt::Display) -> Self {
        Self::Protocol(what.to_string())
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port[/prefix]` or `https://...`.
    pub url: url::Url,
    /// Login name.
    pub user: String,
    /// CA bundle for https URLs.
    pub ca: Option<std::path::PathBuf>,
    /// Upload as one Content-Length token (for the stock original server, whose chunked
    /// reading hangs): the whole file is held in memory.
    pub single_token_upload: bool,
    /// Deadline for connecting and for each answer to start.
    pub timeout: Duration,
}

/// A command's result.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// stdout and stderr, merged.
    pub output: Vec<u8>,
    /// Exit status (our server sends it; the original does not).
    pub exit_status: Option<i32>,
    /// Whether the server killed it at its command timeout.
    pub timed_out: bool,
}

/// A logged-in session.
pub struct Client {
    config: ClientConfig,
    key: Arc<PrivateKey>,
    server_key: Option<PublicKey>,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<SendRequest<ReqBody>>,
    cookie: Option<String>,
    cipher: Option<Arc<Cipher>>,
    req_no: i16,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.config.url.as_str())
            .field("user", &self.config.user)
            .field("req_no", &self.req_no)
            .finish_non_exhaustive()
    }
}

/// Fetches `/info` without logging in (plain text).
///
/// # Errors
/// [`ClientError`].
pub async fn plain_info(config: &ClientConfig) -> Result<String, ClientError> {
    let mut client = Client::unauthenticated(config.clone(), None)?;
    let response = client
        .send(Method::GET, "/info", full(Bytes::new()), false)
        .await?;
    if !response.status().is_success() {
        return Err(ClientError::Status {
            status: response.status().as_u16(),
            message: String::new(),
        });
    }
    let body = collect(response, 1 << 20).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn collect(response: Response<Incoming>, max: usize) -> Result<Bytes, ClientError> {
    let mut reader = BodyReader::new(response.into_body(), Duration::from_secs(60));
    reader
        .read_all(max)
        .await
        .map_err(|e| ClientError::Io(e.to_string()))
}

impl Client {
    fn unauthenticated(config: ClientConfig, key: Option<PrivateKey>) -> Result<Self, ClientError> {
        let tls = if config.url.scheme() == "https" {
            let ca = config.ca.clone().or_else(|| {
                let system = std::path::PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
                system.exists().then_some(system)
            });
            let files = common::tls::ClientTlsFiles {
                ca,
                alpn: vec![b"http/1.1".to_vec()],
                ..Default::default()
            };
            common::tls::install_default_provider();
            Some(Arc::new(
                common::tls::client_config(&files).map_err(|e| ClientError::Io(e.to_string()))?,
            ))
        } else if config.url.scheme() == "http" {
            None
        } else {
            return Err(ClientError::Io(format!(
                "unsupported URL scheme {:?}",
                config.url.scheme()
            )));
        };
        Ok(Self {
            config,
            key: Arc::new(key.unwrap_or_else(PrivateKey::generate)),
            server_key: None,
            tls,
            conn: None,
            cookie: None,
            cipher: None,
            req_no: 0,
        })
    }

    /// Connects and logs in with the user's key, checking the server's signature.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn login(
        config: ClientConfig,
        key: PrivateKey,
        server_key: PublicKey,
    ) -> Result<Self, ClientError> {
        let mut client = Self::unauthenticated(config, Some(key))?;
        client.server_key = Some(server_key);
        client.authenticate().await?;
        Ok(client)
    }

    async fn authenticate(&mut self) -> Result<(), ClientError> {
        let secret = proto::x448_secret();
        let public = proto::x448_public(&secret);
        let user = self.config.user.clone();
        let sign = self.key.sign(&AuthRequest::signed_message(&user, &public));
        let body = AuthRequest {
            user,
            key: public.to_vec(),
            sign,
        }
        .to_json();
        let response = self.send(Method::POST, "/auth", full(body), true).await?;
        let status = response.status();
        if status == StatusCode::FORBIDDEN || status == StatusCode::INTERNAL_SERVER_ERROR {
            return Err(ClientError::LoginRefused(status.as_u16()));
        }
        if !status.is_success() {
            return Err(ClientError::Status {
                status: status.as_u16(),
                message: String::new(),
            });
        }
        let body = collect(response, 4096).await?;
        let (server_public, signature) =
            proto::parse_auth_response(&body).map_err(ClientError::protocol)?;
        // Checking the server's signature and agreeing on the key are independent and each
        // takes about a millisecond: do them side by side.
        let server_key = self.server_key.clone();
        let signed = server_public.clone();
        let verify = tokio::task::spawn_blocking(move || {
            server_key.is_some_and(|key| key.verify(&signed, &signature))
        });
        let shared = proto::x448_shared(&secret, &server_public);
        if !verify.await.unwrap_or(false) {
            return Err(ClientError::ServerKey);
        }
        let shared = shared.map_err(ClientError::protocol)?;
        self.cipher = Some(Arc::new(Cipher::new(&proto::session_key(&shared))));
        self.req_no = 0;
        Ok(())
    }

    /// Logs out (the server forgets the session key and ends any interactive command).
    ///
    /// The body is one token of the session for the path `/auth` (our server ignores an empty
    /// `/auth`, which only needs the cookie); a server that does not take it (the original)
    /// gets the original's empty body next.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn logout(&mut self) -> Result<(), ClientError> {
        if let Some(cipher) = self.cipher.clone() {
            if self.req_no < i16::MAX {
                self.req_no += 1;
                let plain = proto::request_plain(
                    Magic {
                        first: true,
                        last: true,
                    },
                    self.req_no,
                    0,
                    Some(&proto::path_hash("/auth")),
                    b"",
                );
                let token = cipher.encrypt(&plain);
                if let Ok(response) = self.send(Method::POST, "/auth", full(token), true).await {
                    let done = response.status().is_success();
                    let _ = collect(response, 4096).await;
                    if done {
                        self.cipher = None;
                        return Ok(());
                    }
                }
            }
        }
        let response = self
            .send(Method::POST, "/auth", full(Bytes::new()), true)
            .await?;
        self.cipher = None;
        if !response.status().is_success() {
            return Err(ClientError::Status {
                status: response.status().as_u16(),
                message: String::new(),
            });
        }
        let _ = collect(response, 4096).await;
        Ok(())
    }

    /// The kept-alive connection, replaced by a new one when the server has closed it.
    async fn connection(&mut self) -> Result<&mut SendRequest<ReqBody>, ClientError> {
        let reusable = match &mut self.conn {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.conn = Some(self.open().await?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ClientError::Io("no connection".into()))
    }

    async fn open(&self) -> Result<SendRequest<ReqBody>, ClientError> {
        let url = &self.config.url;
        let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let err = |detail: String| ClientError::Connect {
            url: url.to_string(),
            detail,
        };
        let tcp = tokio::time::timeout(
            self.config.timeout,
            tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
        )
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let sender = match &self.tls {
            None => handshake(tcp).await.map_err(err)?,
            Some(tls) => {
                let stream = common::tls::connect(Arc::clone(tls), &host, tcp, self.config.timeout)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                handshake(stream).await.map_err(err)?
            }
        };
        Ok(sender)
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: ReqBody,
        with_length: bool,
    ) -> Result<Response<Incoming>, ClientError> {
        let url = self.config.url.clone();
        let prefix = url.path().trim_end_matches('/');
        let target = format!("{prefix}{path}");
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or("x")),
            None => url.host_str().unwrap_or("x").to_owned(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, host)
            .header(
                header::USER_AGENT,
                concat!("remo/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(cookie) = &self.cookie {
            builder = builder.header(header::COOKIE, format!("SESSION_ID={cookie}"));
        }
        if !with_length {
            builder = builder.header(header::TRANSFER_ENCODING, "chunked");
        }
        let request = builder
            .body(body)
            .map_err(|e| ClientError::Io(e.to_string()))?;
        let timeout = self.config.timeout;
        let sender = self.connection().await?;
        let response = tokio::time::timeout(timeout, sender.send_request(request))
            .await
            .map_err(|_| ClientError::Io("the server did not answer in time".into()))?
            .map_err(|e| ClientError::Io(format!("request failed: {e}")));
        let response = match response {
            Ok(response) => response,
            Err(err) => {
                self.conn = None;
                return Err(err);
            }
        };
        if let Some(id) = response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| crate::session::cookie_session_id(std::iter::once(v.as_bytes())))
            .next()
        {
            self.cookie = Some(id);
        }
        Ok(response)
    }

    fn cipher(&self) -> Result<Arc<Cipher>, ClientError> {
        self.cipher
            .clone()
            .ok_or_else(|| ClientError::Protocol("not logged in".into()))
    }

    async fn next_req_no(&mut self) -> Result<i16, ClientError> {
        if self.cipher.is_none() || self.req_no == i16::MAX {
            // Logged out, or at 32767 requests in this session (int16): start a new one.
            self.authenticate().await?;
        }
        self.req_no += 1;
        Ok(self.req_no)
    }

    /// Sends one request whose body is a single token (Content-Length mode).
    /// `endpoint` alone (`/info`, `/idt`, `/edt`) or followed by the encrypted `argument`.
    async fn request(
        &mut self,
        endpoint: &str,
        argument: Option<&str>,
        payload: &[u8],
    ) -> Result<(Response<Incoming>, i16), ClientError> {
        for attempt in 0..2 {
            let req_no = self.next_req_no().await?;
            let cipher = self.cipher()?;
            // Built per attempt: a new login means a new key.
            let path = match argument {
                Some(argument) => self.path_token(endpoint, argument)?,
                None => endpoint.to_owned(),
            };
            let path = path.as_str();
            let plain = proto::request_plain(
                Magic {
                    first: true,
                    last: true,
                },
                req_no,
                0,
                Some(&proto::path_hash(path)),
                payload,
            );
            let token = cipher.encrypt(&plain);
            let response = self.send(Method::POST, path, full(token), true).await?;
            // Rejected before execution, the request did not happen: a plain 403 (the session
            // expired or was killed) or a plain 400 "Wrong initial token" (our counter got
            // ahead of the server's after an earlier failure, which also killed the session).
            // Log in again once and repeat.
            if attempt > 0 {
                return Ok((response, req_no));
            }
            match self.rejected_early(response).await? {
                Some(response) => return Ok((response, req_no)),
                None => self.authenticate().await?,
            }
        }
        Err(ClientError::Protocol("session lost twice in a row".into()))
    }

    /// `Ok(None)` when `response` says the request was refused before it ran and the session
    /// is gone; otherwise the response, untouched.
    async fn rejected_early(
        &self,
        response: Response<Incoming>,
    ) -> Result<Option<Response<Incoming>>, ClientError> {
        let plain = response.headers().contains_key(header::CONTENT_LENGTH);
        match response.status() {
            StatusCode::FORBIDDEN if plain => {
                let _ = collect(response, 4096).await;
                Ok(None)
            }
            StatusCode::BAD_REQUEST if plain => {
                let body = collect(response, 4096).await?;
                if body.starts_with(b"Wrong initial token") {
                    Ok(None)
                } else {
                    Err(ClientError::Status {
                        status: 400,
                        message: String::from_utf8_lossy(&body).into_owned(),
                    })
                }
            }
            _ => Ok(Some(response)),
        }
    }

    fn path_token(&self, endpoint: &str, argument: &str) -> Result<String, ClientError> {
        Ok(format!(
            "{endpoint}{}",
            self.cipher()?.encrypt(argument.as_bytes())
        ))
    }

    /// Reads an encrypted answer, calling `sink` with each payload piece.
    async fn read_answer(
        &self,
        response: Response<Incoming>,
        req_no: i16,
        mut sink: impl FnMut(&[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let status = response.status();
        let encrypted = !response.headers().contains_key(header::CONTENT_LENGTH);
        if !encrypted {
            let body = collect(response, MAX_LINE).await?;
            if status.is_success() {
                return sink(&body);
            }
            return Err(ClientError::Status {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let cipher = self.cipher()?;
        let mut reader = BodyReader::new(response.into_body(), Duration::from_secs(60));
        let mut decoder = AnswerDecoder::new(req_no);
        let mut error_text = Vec::new();
        loop {
            let line = match reader.next_line(MAX_LINE).await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(BodyError::Io(e)) => {
                    return Err(ClientError::Io(format!("the answer was cut short: {e}")));
                }
                Err(e) => return Err(ClientError::Io(e.to_string())),
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // the original server puts blank lines between tokens
            }
            let text = std::str::from_utf8(&line).map_err(ClientError::protocol)?;
            let plain = cipher.decrypt_body(text, unix_now()).map_err(|_| {
                ClientError::protocol("answer token does not decrypt (clock skew over 10 s?)")
            })?;
            let (payload, last) = decoder.accept(&plain)?;
            if status.is_success() {
                sink(payload)?;
            } else {
                error_text.extend_from_slice(payload);
            }
            if last {
                break;
            }
        }
        // Zero tokens is an empty answer (the original's empty file); a missing `E` token is
        // accepted too, as the original server never sends one.
        if status.is_success() {
            Ok(())
        } else {
            Err(ClientError::Status {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&error_text).into_owned(),
            })
        }
    }

    /// `/info` over the session (encrypted).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn info(&mut self) -> Result<String, ClientError> {
        let (response, req_no) = self.request("/info", None, b"").await?;
        let mut text = Vec::new();
        self.read_answer(response, req_no, |piece| {
            text.extend_from_slice(piece);
            Ok(())
        })
        .await?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Runs `command` (split by the server with shell-word rules; no shell) with `stdin`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn exec(&mut self, command: &str, stdin: &[u8]) -> Result<ExecOutput, ClientError> {
        let (response, req_no) = self.request("/cmd/", Some(command), stdin).await?;
        let exit_status = response
            .headers()
            .get(EXIT_STATUS_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let timed_out = response.headers().contains_key("x-remo-timed-out");
        let mut output = Vec::new();
        self.read_answer(response, req_no, |piece| {
            output.extend_from_slice(piece);
            Ok(())
        })
        .await?;
        Ok(ExecOutput {
            output,
            exit_status,
            timed_out,
        })
    }

    /// Starts an interactive command; returns its first output (after the server's wait).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn iexec(&mut self, command: &str) -> Result<Vec<u8>, ClientError> {
        self.simple("/icm/", Some(command), b"").await
    }

    /// Sends `data` to the interactive command (empty: just poll) and returns its output.
    ///
    /// # Errors
    /// [`ClientError`]; HTTP 400 when no interactive command is attached.
    pub async fn idata(&mut self, data: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.simple("/idt", None, data).await
    }

    /// Closes the interactive command's input and returns the rest of its output.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn iend(&mut self) -> Result<Vec<u8>, ClientError> {
        self.simple("/edt", None, b"").await
    }

    async fn simple(
        &mut self,
        endpoint: &str,
        argument: Option<&str>,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let (response, req_no) = self.request(endpoint, argument, payload).await?;
        let mut output = Vec::new();
        self.read_answer(response, req_no, |piece| {
            output.extend_from_slice(piece);
            Ok(())
        })
        .await?;
        Ok(output)
    }

    /// Downloads `remote` into `local` (written to a temporary file, renamed at the end).
    /// `progress(done, total)` is called as bytes arrive (`total` when the server says it).
    ///
    /// # Errors
    /// [`ClientError`]; a missing remote file is `Status { status: 404, .. }`.
    pub async fn get(
        &mut self,
        remote: &str,
        local: &Path,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64, ClientError> {
        use std::io::Write as _;
        let (response, req_no) = self.request("/get/", Some(remote), b"").await?;
        let total = response
            .headers()
            .get(SIZE_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        if !response.status().is_success() {
            return self
                .read_answer(response, req_no, |_| Ok(()))
                .await
                .map(|()| 0);
        }
        let dir = local
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut temp = tempfile::Builder::new()
            .prefix(".remo-get-")
            .tempfile_in(dir)
            .map_err(|e| ClientError::Io(format!("{}: {e}", dir.display())))?;
        let mut written = 0u64;
        {
            let file = temp.as_file_mut();
            let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
            self.read_answer(response, req_no, |piece| {
                out.write_all(piece)
                    .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?;
                written += piece.len() as u64;
                progress(written, total);
                Ok(())
            })
            .await?;
            out.flush()
                .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?;
        }
        if let Some(total) = total {
            if total != written {
                return Err(ClientError::Protocol(format!(
                    "received {written} bytes of {total}"
                )));
            }
        }
        temp.persist(local)
            .map_err(|e| ClientError::Io(format!("{}: {}", local.display(), e.error)))?;
        Ok(written)
    }

    /// Uploads `local` to `remote`, streamed as tokens (chunked), or as one token when
    /// configured for the stock original server.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn put(
        &mut self,
        local: &Path,
        remote: &str,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<u64, ClientError> {
        let file = std::fs::File::open(local)
            .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?;
        let size = file
            .metadata()
            .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?
            .len();
        if self.config.single_token_upload {
            let data = std::fs::read(local)
                .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?;
            let (response, req_no) = self.request("/put/", Some(remote), &data).await?;
            progress(size);
            self.read_answer(response, req_no, |_| Ok(())).await?;
            return Ok(size);
        }
        let progress = Arc::new(progress);
        for attempt in 0..2 {
            let file = file
                .try_clone()
                .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?;
            let started = self
                .start_put(file, size, remote, Arc::clone(&progress))
                .await;
            let (response, req_no, producer) = match started {
                // A server that refuses the upload at once (its session expired) answers 403
                // and closes while the body is still going out; hyper then reports the broken
                // write, not the answer. Nothing was written: log in and start over, once.
                Err(ClientError::Io(message))
                    if attempt == 0 && message.starts_with("request failed") =>
                {
                    tracing::debug!(%message, "upload interrupted; logging in again");
                    self.authenticate().await?;
                    continue;
                }
                started => started?,
            };
            let response = if attempt == 0 {
                match self.rejected_early(response).await? {
                    Some(response) => response,
                    None => {
                        // The session was gone: nothing was written. Log in and start over.
                        drop(producer.await);
                        self.authenticate().await?;
                        continue;
                    }
                }
            } else {
                response
            };
            let sent = producer
                .await
                .map_err(|e| ClientError::Io(e.to_string()))?
                .map_err(|e| ClientError::Io(format!("{}: {e}", local.display())))?;
            self.read_answer(response, req_no, |_| Ok(())).await?;
            return Ok(sent);
        }
        Err(ClientError::Protocol("session lost twice in a row".into()))
    }

    /// Sends the chunked upload of `file`; returns the answer, the request number and the
    /// producer (which reports the bytes sent).
    async fn start_put(
        &mut self,
        file: std::fs::File,
        size: u64,
        remote: &str,
        progress: Arc<impl Fn(u64) + Send + Sync + 'static>,
    ) -> Result<
        (
            Response<Incoming>,
            i16,
            tokio::task::JoinHandle<std::io::Result<u64>>,
        ),
        ClientError,
    > {
        let req_no = self.next_req_no().await?;
        let cipher = self.cipher()?;
        let path = self.path_token("/put/", remote)?;
        let hash = proto::path_hash(&path);
        // Pieces grow for huge files so that token numbers stay within int16.
        let piece = UPLOAD_PIECE.max(usize::try_from(size.div_ceil(32_000)).unwrap_or(usize::MAX));
        let (tx, rx) = mpsc::channel::<std::io::Result<Frame<Bytes>>>(8);
        let producer = tokio::task::spawn_blocking(move || {
            // An empty file is one `BE` token with no payload.
            let count = size.div_ceil(piece as u64).max(1);
            let mut sent = 0u64;
            let mut tail = crate::pipeline::encrypt_batched(
                &file,
                crate::pipeline::Layout { size, piece, count },
                &cipher,
                |t, data| {
                    proto::request_plain(
                        Magic::nth(t, count),
                        req_no,
                        proto::token_no(t),
                        (t == 0).then_some(&hash),
                        data,
                    )
                },
                |batch, tokens| {
                    if tx.blocking_send(Ok(Frame::data(batch))).is_err() {
                        return false;
                    }
                    sent = (tokens * piece as u64).min(size);
                    progress(sent);
                    true
                },
            )?;
            // The original client puts no line break after the last token.
            tail.truncate(tail.len().saturating_sub(2));
            if tx.blocking_send(Ok(Frame::data(tail.freeze()))).is_ok() {
                sent = size;
                progress(sent);
            }
            Ok::<_, std::io::Error>(sent)
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let body = BodyExt::boxed(StreamBody::new(stream));
        let response = self.send(Method::POST, &path, body, false).await?;
        Ok((response, req_no, producer))
    }
}

async fn handshake<IO>(io: IO) -> Result<SendRequest<ReqBody>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Checks the token sequence of an answer.
struct AnswerDecoder {
    req_no: i16,
    started: bool,
    last_tok: i16,
}

impl AnswerDecoder {
    fn new(req_no: i16) -> Self {
        Self {
            req_no,
            started: false,
            last_tok: 0,
        }
    }

    fn accept<'p>(&mut self, plain: &'p [u8]) -> Result<(&'p [u8], bool), ClientError> {
        let (header, rest) = TokenHeader::split(plain).map_err(ClientError::protocol)?;
        if header.req_no != self.req_no {
            return Err(ClientError::protocol("answer to another request"));
        }
        let payload = if self.started {
            if header.is_first() || header.tok_no != self.last_tok.wrapping_add(1) {
                return Err(ClientError::protocol("answer tokens out of sequence"));
            }
            rest
        } else {
            if !header.is_first() || header.tok_no != 0 {
                return Err(ClientError::protocol(
                    "answer does not start with a first token",
                ));
            }
            // The first token carries the status text (always "200" in the original).
            rest.get(proto::STATUS_TEXT.len()..)
                .ok_or_else(|| ClientError::protocol("first answer token too short"))?
        };
        self.started = true;
        self.last_tok = header.tok_no;
        Ok((payload, header.is_last()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_sequence_checks() {
        let first = proto::response_plain(
            Magic {
                first: true,
                last: false,
            },
            3,
            0,
            b"ab",
        );
        let second = proto::response_plain(
            Magic {
                first: false,
                last: false,
            },
            3,
            1,
            b"cd",
        );
        let end = proto::response_plain(
            Magic {
                first: false,
                last: true,
            },
            3,
            2,
            b"",
        );
        let mut decoder = AnswerDecoder::new(3);
        assert_eq!(decoder.accept(&first).unwrap(), (&b"ab"[..], false));
        assert_eq!(decoder.accept(&second).unwrap(), (&b"cd"[..], false));
        assert_eq!(decoder.accept(&end).unwrap(), (&b""[..], true));
        let mut other = AnswerDecoder::new(4);
        assert!(other.accept(&first).is_err());
        let mut skipped = AnswerDecoder::new(3);
        skipped.accept(&first).unwrap();
        assert!(skipped.accept(&end).is_err());
        let mut headless = AnswerDecoder::new(3);
        assert!(headless.accept(&second).is_err());
    }
}
