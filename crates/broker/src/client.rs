//! The client library: the daemon's API over its Unix socket (identity = the calling uid) or
//! over HTTPS with a client certificate (identity = the certificate's mapped user).
//!
//! One HTTP/1.1 connection is kept and reused; a request that finds it closed reconnects
//! once. Every request has a deadline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::api::{
    ErrorBody, HeartbeatResponse, Job, JobList, JobSummary, JobType, SaveRequest, VerifyRequest,
    VerifyResponse, WhoAmI, valid_job_id,
};

/// Default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/broker/broker.sock";

/// Largest response body read (a job with certificates is a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// Errors from the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot reach the broker at {target}: {source}")]
    Connect {
        /// Socket path or address.
        target: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS set-up or handshake failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The connection failed mid-request.
    #[error("talking to the broker: {0}")]
    Http(String),
    /// No answer before the deadline.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The daemon answered with an error.
    #[error("{message} (HTTP {status})")]
    Status {
        /// HTTP status.
        status: u16,
        /// The `code` field.
        code: String,
        /// The `error` field.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
    /// A job id that cannot be one.
    #[error("{0:?} is not a job id (job_ and 32 hex digits)")]
    BadJobId(String),
}

impl ClientError {
    /// The HTTP status, when the daemon answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the daemon said the job does not exist (or is not the caller's).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// Where the daemon is.
#[derive(Clone)]
pub enum Endpoint {
    /// The local socket.
    Unix(PathBuf),
    /// The HTTPS API: address to connect to, name to verify, TLS configuration with the
    /// client certificate.
    Https {
        /// `host:port`.
        address: String,
        /// Server name checked against the certificate.
        server_name: String,
        /// rustls configuration (roots and client certificate).
        tls: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Https { address, .. } => write!(f, "https://{address}"),
        }
    }
}

impl Endpoint {
    /// The HTTPS API at `url` (`https://host:port`), authenticating with `cert`/`key` and
    /// trusting `ca`.
    ///
    /// # Errors
    /// A malformed URL or unreadable TLS files.
    pub fn https(url: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Self, ClientError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| ClientError::Tls(format!("{url:?} is not an https:// URL")))?
            .trim_end_matches('/');
        let host = match rest.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => return Err(ClientError::Tls(format!("{url:?} has no port"))),
        };
        let server_name = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        common::tls::install_default_provider();
        let files = common::tls::ClientTlsFiles {
            ca: Some(ca.to_owned()),
            cert: Some(cert.to_owned()),
            key: Some(key.to_owned()),
            alpn: vec![b"http/1.1".to_vec()],
            skip_hostname_check: false,
        };
        let tls =
            common::tls::client_config(&files).map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Self::Https {
            address: rest.to_owned(),
            server_name,
            tls: Arc::new(tls),
        })
    }
}

/// A connection to the broker.
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for `endpoint`; connects on first use.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            timeout: Duration::from_secs(30),
            conn: None,
        }
    }

    /// A client for the local socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    /// Sets the per-request deadline (default 30 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Who the broker thinks the caller is.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn whoami(&mut self) -> Result<WhoAmI, ClientError> {
        self.json(Method::GET, "/v1/whoami", None).await
    }

    /// Registers a job: allocates a port and a secret or certificates.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn save(&mut self, request: &SaveRequest) -> Result<Job, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let job: Job = self.json(Method::POST, "/v1/jobs", Some(body)).await?;
        job.check_answer(None).map_err(ClientError::Protocol)?;
        Ok(job)
    }

    /// Shorthand for [`Client::save`] with a type and optional TTL.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn save_type(
        &mut self,
        job_type: JobType,
        ttl: Option<Duration>,
    ) -> Result<Job, ClientError> {
        self.save(&SaveRequest {
            job_type: Some(job_type),
            ttl_secs: ttl.map(|t| t.as_secs().max(1)),
            label: None,
        })
        .await
    }

    /// The caller's jobs, without secrets.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn query(&mut self) -> Result<Vec<JobSummary>, ClientError> {
        let list: JobList = self.json(Method::GET, "/v1/jobs", None).await?;
        Ok(list.jobs)
    }

    /// One of the caller's jobs, with its secret or certificates.
    ///
    /// # Errors
    /// [`ClientError`]; 404 when it does not exist or is someone else's;
    /// [`ClientError::Protocol`] when the answer is another job or not a job
    /// ([`Job::check_answer`]).
    pub async fn load(&mut self, id: &str) -> Result<Job, ClientError> {
        check_id(id)?;
        let job: Job = self
            .json(Method::GET, &format!("/v1/jobs/{id}"), None)
            .await?;
        job.check_answer(Some(id)).map_err(ClientError::Protocol)?;
        Ok(job)
    }

    /// Whether `secret` is the job's secret (compared in constant time by the daemon).
    ///
    /// # Errors
    /// [`ClientError`]; 404 when it does not exist or is someone else's.
    pub async fn verify(&mut self, id: &str, secret: &str) -> Result<bool, ClientError> {
        check_id(id)?;
        let body = serde_json::to_vec(&VerifyRequest {
            secret: secret.to_owned(),
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let answer: VerifyResponse = self
            .json(Method::POST, &format!("/v1/jobs/{id}/verify"), Some(body))
            .await?;
        Ok(answer.valid)
    }

    /// Extends the job's life by its TTL.
    ///
    /// # Errors
    /// [`ClientError`]; 404 when it is gone (expired and reaped, or deleted).
    pub async fn heartbeat(&mut self, id: &str) -> Result<HeartbeatResponse, ClientError> {
        check_id(id)?;
        self.json(
            Method::POST,
            &format!("/v1/jobs/{id}/heartbeat"),
            Some(Vec::new()),
        )
        .await
    }

    /// Deletes the job: frees its port and revokes its certificates.
    ///
    /// # Errors
    /// [`ClientError`]; 404 when it does not exist or is someone else's.
    pub async fn delete(&mut self, id: &str) -> Result<(), ClientError> {
        check_id(id)?;
        self.request(Method::DELETE, &format!("/v1/jobs/{id}"), None)
            .await
            .map(|_| ())
    }

    /// The broker CA certificate, PEM.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ca_pem(&mut self) -> Result<String, ClientError> {
        self.text("/v1/ca").await
    }

    /// The broker CA's current CRL, PEM.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn crl_pem(&mut self) -> Result<String, ClientError> {
        self.text("/v1/crl").await
    }

    async fn text(&mut self, path: &str) -> Result<String, ClientError> {
        let body = self.request(Method::GET, path, None).await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let bytes = self.request(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Sends one request and returns the body of a 2xx answer.
    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                self.conn = None;
                ClientError::Timeout(timeout)
            })?
    }

    async fn request_inner(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let body = Bytes::from(body.unwrap_or_default());
        let mut retried = false;
        loop {
            let reused = self.conn.is_some();
            let sender = match &mut self.conn {
                Some(sender) => sender,
                None => self.conn.insert(connect(&self.endpoint).await?),
            };
            let request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, "broker")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let ready = sender.ready().await;
            let sent = match ready {
                Ok(()) => sender.send_request(request).await,
                Err(err) => Err(err),
            };
            let response = match sent {
                Ok(response) => response,
                // A kept-alive connection the daemon closed (idle timeout, restart): once more
                // on a new one. The request never reached the handler, so this is safe.
                Err(err) if reused && !retried && (err.is_closed() || err.is_canceled()) => {
                    self.conn = None;
                    retried = true;
                    continue;
                }
                Err(err) => {
                    self.conn = None;
                    return Err(ClientError::Http(err.to_string()));
                }
            };
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| {
                    self.conn = None;
                    ClientError::Http(e.to_string())
                })?
                .to_bytes();
            if status.is_success() {
                return Ok(bytes);
            }
            return Err(status_error(status, &bytes));
        }
    }
}

fn check_id(id: &str) -> Result<(), ClientError> {
    if valid_job_id(id) {
        Ok(())
    } else {
        Err(ClientError::BadJobId(id.to_owned()))
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => (body.code, body.error),
        Err(_) => (
            String::from("unknown"),
            String::from_utf8_lossy(body).trim().to_owned(),
        ),
    };
    ClientError::Status {
        status: status.as_u16(),
        code,
        message,
    }
}

async fn connect(endpoint: &Endpoint) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Connect {
                    target: path.display().to_string(),
                    source,
                })?;
            handshake(stream).await
        }
        Endpoint::Https {
            address,
            server_name,
            tls,
        } => {
            let tcp = tokio::net::TcpStream::connect(address.as_str())
                .await
                .map_err(|source| ClientError::Connect {
                    target: address.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let stream = common::tls::connect(
                tls.clone(),
                server_name,
                tcp,
                common::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            )
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
            handshake(stream).await
        }
    }
}

async fn handshake<IO>(io: IO) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
