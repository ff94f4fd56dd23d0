//! Where the server is, how to reach it, and why the client stops (with its exit status).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::cli::Report;
use common::daemon::exit;
use common::tls::{ClientTlsFiles, TlsError};

use super::args::Conn;

/// Exit status: a signature did not verify, or the server refused a file or a request.
pub(crate) const REJECTED: u8 = 1;
/// Exit status: bad usage (64, as for bad flags).
pub(crate) const USAGE: u8 = exit::USAGE;
/// Exit status: the server's answer made no sense.
pub(crate) const PROTOCOL: u8 = 76;

/// Why the client stops, with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Rejected(String),
}

impl Report for Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => USAGE,
            Self::Input(_) => exit::DATAERR,
            Self::Connect(_) => exit::UNAVAILABLE,
            Self::Io(_) => exit::IOERR,
            Self::Protocol(_) => PROTOCOL,
            Self::Refused(_) => exit::NOPERM,
            Self::Rejected(_) => REJECTED,
        }
    }
}

/// Where to connect, with the TLS configuration for one protocol.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: String,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) timeout: Duration,
}

impl Target {
    pub(crate) fn new(conn: &Conn, alpn: Vec<Vec<u8>>) -> Result<Self, Failure> {
        let home = || {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".ssh"))
                .ok_or_else(|| {
                    Failure::Usage("$HOME is not set: pass --cert, --key and --ca".into())
                })
        };
        let or_home = |given: &Option<PathBuf>, name: &str| match given {
            Some(path) => Ok(path.clone()),
            None => home().map(|dir| dir.join(name)),
        };
        let files = ClientTlsFiles {
            ca: Some(or_home(&conn.ca, "signing-ca.crt")?),
            cert: Some(or_home(&conn.cert, "signing-client.crt")?),
            // --cert without --key: the key is in the --cert file.
            key: match (&conn.key, &conn.cert) {
                (Some(key), _) => Some(key.clone()),
                (None, Some(_)) => None,
                (None, None) => Some(home()?.join("signing-client.key")),
            },
            alpn,
            skip_hostname_check: false,
        };
        let tls = common::tls::client_config(&files).map_err(|err| match err {
            TlsError::Read { .. } | TlsError::Pem { .. } => Failure::Input(format!(
                "{err} (an administrator issues the client certificate, key and CA: see --help)"
            )),
            other => Failure::Input(format!("client TLS configuration: {other}")),
        })?;
        Ok(Self {
            host: conn.host.clone(),
            port: conn.port,
            server_name: conn
                .server_name
                .clone()
                .unwrap_or_else(|| conn.host.clone()),
            tls: Arc::new(tls),
            timeout: Duration::from_secs(conn.timeout.max(1)),
        })
    }

    /// `host:port` for the Host header.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// TCP, then TLS, each under the timeout.
pub(crate) async fn open_tls(
    target: &Target,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Failure> {
    let where_ = format!("{}:{}", target.host, target.port);
    let tcp = tokio::time::timeout(
        target.timeout,
        tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| Failure::Connect(format!("connecting to {where_}: timed out")))?
    .map_err(|e| Failure::Connect(format!("connecting to {where_}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    common::tls::connect(target.tls.clone(), &target.server_name, tcp, target.timeout)
        .await
        .map_err(|e| Failure::Connect(format!("{where_}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_exit_with_the_codes_the_help_lists() {
        let code = |failure: Failure| failure.exit_code();
        assert_eq!(code(Failure::Rejected(String::new())), 1);
        assert_eq!(code(Failure::Usage(String::new())), 64);
        assert_eq!(code(Failure::Input(String::new())), 65);
        assert_eq!(code(Failure::Connect(String::new())), 69);
        assert_eq!(code(Failure::Io(String::new())), 74);
        assert_eq!(code(Failure::Protocol(String::new())), 76);
        assert_eq!(code(Failure::Refused(String::new())), 77);
    }
}
