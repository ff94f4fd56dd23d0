//! The metrics listener: the `metrics_listen` key every daemon shares, and a plain-HTTP
//! listener that answers `GET /metrics` and nothing else.
//!
//! It is off unless the key is set. `127.0.0.1:PORT` or `[::1]:PORT` is what Prometheus on the
//! same host scrapes; any other IP address is accepted with a warning in the log (every host
//! that reaches it reads the metrics); `unix:/abs/path` is a socket of mode
//! [`SOCKET_MODE`] whose directory decides who may connect. Host names are not resolved.
//!
//! Whoever can reach it must not be able to take what the daemon's port needs (invariant 3 of
//! SECURITY.md), nor keep Prometheus out: the listener has a pool of [`MAX_CONNECTIONS`]
//! connections of its own, in which a newcomer evicts a connection that is not answering (idle
//! on keep-alive or still sending its head) once it is [`crate::admission::EVICT_MIN_AGE`] old
//! (see [`crate::local_http`]; with none to evict, the newcomer is closed at once), a request
//! head must arrive within [`HEADER_TIMEOUT`], and no connection lives longer than
//! [`CONNECTION_TIMEOUT`] (plus one [`HEADER_TIMEOUT`] for a client that does not read its
//! answer). Refusals and evictions are counted in the daemon's
//! `<daemon>_refusals_total{reason="metrics_pool"}` ([`super::Reason::METRICS_POOL`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};

use crate::daemon::Shutdown;
use crate::local_http::{self, Listener, Pool};

/// Connections the metrics listener serves at once; one more evicts an idle one at least
/// [`crate::admission::EVICT_MIN_AGE`] old, or is closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a metrics connection has to send each request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Age at which a metrics connection is closed after the request in progress.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head (read buffer), in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Mode of a metrics Unix socket: its owner and group (the monitoring group) may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Where the metrics listener listens: the `metrics_listen` key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum MetricsListen {
    /// A TCP address (an IP address and port).
    Tcp(SocketAddr),
    /// A Unix socket at an absolute path.
    Unix(PathBuf),
}

impl MetricsListen {
    /// Parses `127.0.0.1:PORT`, `[::1]:PORT` (any IP address and port) or `unix:/abs/path`.
    ///
    /// # Errors
    /// What is wrong, naming the key and the value.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Ok(Self::Unix(PathBuf::from(path))),
            Some(_) => Err(format!(
                "metrics_listen {text:?}: the socket path must be absolute (unix:/run/NAME/metrics.sock)"
            )),
            None => text.parse().map(Self::Tcp).map_err(|_| {
                format!(
                    "metrics_listen {text:?} is neither an IP address and port (127.0.0.1:9101, [::1]:9101; host names are not resolved here) nor unix:/abs/path"
                )
            }),
        }
    }

    /// Whether only this host can connect: a loopback address or a Unix socket.
    #[must_use]
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(addr) => addr.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
}

impl TryFrom<String> for MetricsListen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What a scrape writes: the exposition, drawn when `/metrics` is asked for.
pub type Scrape = Arc<dyn Fn() -> String + Send + Sync>;

/// A bound metrics listener, not yet serving.
#[derive(Debug)]
pub struct MetricsListener {
    listener: Listener,
    addr: MetricsListen,
}

impl MetricsListener {
    /// Binds `listen` (a Unix socket with [`SOCKET_MODE`]; a stale socket file is replaced,
    /// see [`crate::daemon::bind_unix`]). An address off loopback is a warning in the log.
    ///
    /// # Errors
    /// Binding failed; the message names the address.
    pub async fn bind(listen: &MetricsListen) -> std::io::Result<Self> {
        let named = |err: std::io::Error| {
            std::io::Error::new(
                err.kind(),
                format!("binding the metrics listener {listen}: {err}"),
            )
        };
        let (listener, addr) = match listen {
            MetricsListen::Tcp(addr) => {
                let tcp = tokio::net::TcpListener::bind(addr).await.map_err(named)?;
                let bound = tcp.local_addr().map_err(named)?;
                (Listener::Tcp(tcp), MetricsListen::Tcp(bound))
            }
            MetricsListen::Unix(path) => {
                let unix = crate::daemon::bind_unix(path, SOCKET_MODE).map_err(named)?;
                (Listener::Unix(unix), listen.clone())
            }
        };
        if !listen.is_local() {
            tracing::warn!(%addr, "the metrics listener is not on loopback: every host that reaches it can read the metrics; prefer metrics_listen = \"127.0.0.1:PORT\"");
        }
        Ok(Self { listener, addr })
    }

    /// The address bound (with the port the kernel chose for port 0), for the log and the
    /// start-up announcement.
    #[must_use]
    pub fn addr(&self) -> &MetricsListen {
        &self.addr
    }

    /// Serves `GET /metrics` with what `scrape` writes until `shutdown` is triggered, counting
    /// the connections its pool refuses or evicts in `families` (`<daemon>_refusals_total`
    /// with [`super::Reason::METRICS_POOL`]); connections are tracked by `shutdown`.
    pub async fn serve(self, scrape: Scrape, families: super::Families, shutdown: Shutdown) {
        tracing::info!(addr = %self.addr, "metrics listener: /metrics");
        let pool = Pool::observed("metrics", "metrics listener", MAX_CONNECTIONS, move |_| {
            families.refused(super::Reason::METRICS_POOL);
        });
        let limits = local_http::Limits {
            header_timeout: HEADER_TIMEOUT,
            max_age: CONNECTION_TIMEOUT,
            max_buf_size: MAX_HEAD_BYTES,
            what: "metrics (60 s passed)",
        };
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let response = answer(request.method(), request.uri().path(), &scrape);
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        });
        local_http::serve(self.listener, service, pool, limits, shutdown).await;
    }
}

/// The answer to `method path`: the exposition for `GET /metrics` (headers only for `HEAD`),
/// 405 with `Allow` for another method on `/metrics`, 404 for any other path.
pub(crate) fn answer(method: &Method, path: &str, scrape: &Scrape) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if path != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: this listener serves GET /metrics only\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET /metrics\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(scrape())
    };
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(super::CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_sockets_parse_and_names_do_not() {
        for (text, local) in [
            ("127.0.0.1:9101", true),
            ("[::1]:9101", true),
            ("127.0.0.1:0", true),
            ("0.0.0.0:9101", false),
            ("192.0.2.7:9101", false),
            ("unix:/run/ws-proxy/metrics.sock", true),
        ] {
            let listen = MetricsListen::parse(text).unwrap();
            assert_eq!(listen.to_string(), text);
            assert_eq!(listen.is_local(), local, "{text}");
        }
        for (bad, expected) in [
            ("localhost:9101", "host names are not resolved"),
            ("9101", "neither"),
            ("unix:metrics.sock", "absolute"),
            ("", "neither"),
        ] {
            let err = MetricsListen::parse(bad).unwrap_err();
            assert!(err.contains(expected), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_key_is_checked_when_the_file_is_read() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            metrics_listen: Option<MetricsListen>,
        }
        let file: File = toml::from_str("metrics_listen = \"[::1]:9104\"").unwrap();
        assert_eq!(
            file.metrics_listen,
            Some(MetricsListen::Tcp("[::1]:9104".parse().unwrap()))
        );
        let file: File = toml::from_str("").unwrap();
        assert_eq!(file.metrics_listen, None);
        let err = toml::from_str::<File>("metrics_listen = \"metrics.example:1\"").unwrap_err();
        assert!(err.to_string().contains("metrics_listen"), "{err}");
    }

    #[test]
    fn only_get_and_head_of_metrics_are_answered() {
        let scrape: Scrape = Arc::new(|| "demo_up 1\n# EOF\n".to_owned());
        let get = answer(&Method::GET, "/metrics", &scrape);
        assert_eq!(get.status(), StatusCode::OK);
        assert_eq!(
            get.headers()[header::CONTENT_TYPE],
            super::super::CONTENT_TYPE
        );
        let head = answer(&Method::HEAD, "/metrics", &scrape);
        assert_eq!(head.status(), StatusCode::OK);
        let post = answer(&Method::POST, "/metrics", &scrape);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        for path in ["/", "/status", "/metrics/", "/metricsx"] {
            assert_eq!(
                answer(&Method::GET, path, &scrape).status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }
}
