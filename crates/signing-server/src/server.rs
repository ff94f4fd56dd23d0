//! The listener: TLS (client certificate required by default), then one of two protocols
//! chosen by ALPN.
//!
//! - No ALPN: the original's. The client writes a path; the server answers three messages
//!   (each its own TLS record, as the original's clients read one record per message): the
//!   listing (`List of files in <path>:` and a name per line, or `File to be signed: <path>`
//!   for a file), the per-file JSON object as Python's `json.dumps` writes it, and
//!   `\nSignatures written to: <file>\n`; then it closes. A refusal is one line,
//!   `Refused: <why>`.
//! - ALPN `http/1.1`: the JSON API (see [`crate::api`]).
//!
//! Every connection is its own task; signing runs on blocking threads under a concurrency
//! limit, so a slow or silent client never holds up another.

use std::net::SocketAddr;
use std::sync::Arc;

use common::admission::{AcceptError, Admission, Stranger};
use common::daemon::{AcceptBackoff, Shutdown};
use common::tls::{LivePeer, PeerIdentity, ServerTls, TlsError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::fields::python_json;
use crate::metrics::PATH_ROUTE;
use crate::service::{PathReport, Service};

/// ALPN of the JSON API.
pub const ALPN_HTTP: &[u8] = b"http/1.1";

/// The daemon.
#[derive(Debug, Clone)]
pub struct Server {
    service: Arc<Service>,
    tls: Arc<ServerTls>,
    shutdown: Shutdown,
    admission: Admission,
}

impl Server {
    /// A server over a loaded service and TLS material (which must offer [`ALPN_HTTP`]).
    pub fn new(service: Arc<Service>, tls: Arc<ServerTls>, shutdown: Shutdown) -> Self {
        let limits = service
            .config
            .tls
            .admission(service.config.limits.max_connections);
        Self {
            service,
            tls,
            shutdown,
            admission: Admission::new("tls", limits),
        }
    }

    /// The service.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The front door (pools and their counters).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Rebuilds the TLS configuration from disk for new connections.
    ///
    /// # Errors
    /// The new material does not load; the old stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.tls.reload()
    }

    /// Accepts connections until shutdown; connection tasks are tracked by the shutdown
    /// handle.
    pub async fn serve(&self, listener: TcpListener) {
        let mut backoff = AcceptBackoff::default();
        let metrics = &self.service.metrics.shared;
        while let Some((tcp, addr)) = backoff.next(&self.shutdown, || listener.accept()).await {
            // Counted in connections_open until the connection task ends.
            let open = metrics.connection();
            // Refusals are logged (rate-limited) by the admission.
            let stranger = match self.admission.stranger(addr) {
                Ok(stranger) => stranger,
                Err(refused) => {
                    metrics.refused(refused);
                    continue;
                }
            };
            let server = self.clone();
            let span = tracing::info_span!("conn", peer = %addr);
            self.shutdown.spawn(
                async move {
                    server.connection(tcp, addr, stranger).await;
                    drop(open);
                }
                .instrument(span),
            );
        }
    }

    async fn connection(&self, tcp: TcpStream, addr: SocketAddr, stranger: Stranger) {
        let _ = tcp.set_nodelay(true);
        // The slot in max_connections is taken only once the handshake (client certificate
        // verified) is done, and held until the connection ends.
        let metrics = &self.service.metrics.shared;
        let (stream, identity, _slot) = match stranger.accept_tls(&self.tls.acceptor(), tcp).await {
            Ok(accepted) => accepted,
            Err(AcceptError::Tls(err)) => {
                metrics.tls_failure(&err);
                // A closed probe was logged where it was accepted.
                if !matches!(err, TlsError::Closed) {
                    tracing::debug!(outcome = "refused", %err, "tls handshake failed");
                }
                return;
            }
            Err(AcceptError::Refused(refused)) => {
                metrics.refused(refused);
                return;
            }
        };
        let http = stream.get_ref().1.alpn_protocol() == Some(ALPN_HTTP);
        let live = self.tls.live_peer(stream.get_ref().1);
        let cn = identity.as_ref().and_then(|i| i.cn.clone());
        tracing::debug!(%addr, identity = identity.as_ref().map(ToString::to_string), http, "connected");
        if http {
            crate::api::serve(
                self.service.clone(),
                stream,
                cn,
                live,
                self.shutdown.clone(),
            )
            .await;
        } else {
            self.legacy(stream, identity, live).await;
        }
    }

    /// The original's protocol on one connection.
    async fn legacy<S>(&self, mut stream: S, identity: Option<PeerIdentity>, live: LivePeer)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let limits = &self.service.config.limits;
        let metrics = &self.service.metrics;
        let started = Instant::now();
        let answered = |status: u16| metrics.answered(PATH_ROUTE, status, started.elapsed());
        let cn = identity.as_ref().and_then(|i| i.cn.clone());
        let path = match tokio::time::timeout(
            limits.request_timeout(),
            read_path(&mut stream, limits.max_path_bytes),
        )
        .await
        {
            Ok(Ok(path)) => path,
            Ok(Err(err)) => {
                answered(400);
                let _ = write_message(&mut stream, format!("Refused: {err}\n").as_bytes()).await;
                return;
            }
            Err(_) => {
                answered(408);
                tracing::info!(outcome = "refused", "no path in time");
                return;
            }
        };
        // The certificate may have been revoked since the handshake.
        if let Err(err) = live.check() {
            answered(403);
            tracing::warn!(outcome = "refused", identity = ?cn, %err, "path refused");
            let io = limits.io_timeout();
            let refusal = format!("Refused: {err}\n");
            let _ = tokio::time::timeout(io, write_message(&mut stream, refusal.as_bytes())).await;
            let _ = tokio::time::timeout(io, stream.shutdown()).await;
            return;
        }
        let messages = match self.service.sign_path(cn.as_deref(), &path).await {
            Ok(report) => {
                answered(200);
                legacy_messages(&report)
            }
            Err(refusal) => {
                answered(refusal.status);
                tracing::info!(outcome = "refused", identity = cn, path, reason = %common::log::Escaped(&refusal), "path refused");
                vec![format!("Refused: {refusal}\n").into_bytes()]
            }
        };
        let io = limits.io_timeout();
        for message in messages {
            match tokio::time::timeout(io, write_message(&mut stream, &message)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let _ = tokio::time::timeout(io, stream.shutdown()).await;
    }
}

/// Reads the path: what the client's first write carries, up to `max` bytes (a client that
/// writes it in pieces gets 50 ms to finish; a newline ends it at once).
///
/// # Errors
/// Not UTF-8, too long, empty, or the connection failed.
// Public for crates/fuzzing only.
#[doc(hidden)]
pub async fn read_path<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let mut buf = Vec::with_capacity(256);
    let mut chunk = vec![0u8; max.min(64 * 1024) + 1];
    loop {
        let read = if buf.is_empty() {
            stream.read(&mut chunk).await?
        } else {
            match tokio::time::timeout(
                std::time::Duration::from_millis(50),
                stream.read(&mut chunk),
            )
            .await
            {
                Ok(read) => read?,
                Err(_) => break,
            }
        };
        if read == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..read]);
        if buf.len() > max {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("the path is longer than {max} bytes"),
            ));
        }
        if buf.ends_with(b"\n") {
            break;
        }
    }
    while buf
        .last()
        .is_some_and(|b| matches!(b, b'\n' | b'\r' | b'\0'))
    {
        buf.pop();
    }
    if buf.is_empty() {
        return Err(Error::new(ErrorKind::InvalidData, "no path was sent"));
    }
    String::from_utf8(buf).map_err(|_| Error::new(ErrorKind::InvalidData, "the path is not UTF-8"))
}

async fn write_message<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) -> std::io::Result<()> {
    stream.write_all(message).await?;
    stream.flush().await
}

/// The three messages of the original protocol for a report.
pub fn legacy_messages(report: &PathReport) -> Vec<Vec<u8>> {
    let mut first = if report.directory {
        format!("List of files in {}:\n", report.path)
    } else {
        format!("File to be signed: {}\n", report.path)
    };
    if report.directory {
        for name in &report.listing {
            first.push_str(name);
            first.push('\n');
        }
    }
    let second = python_json(&report.files);
    let mut third = format!("\nSignatures written to: {}\n", report.signatures_file);
    if report.not_listed > 0 {
        third.push_str(&format!(
            "Not listed (more than max_listing_entries entries): {} more\n",
            report.not_listed
        ));
    }
    if !report.not_signed.is_empty() {
        third.push_str(&format!(
            "Not signed (more than max_files_per_request files): {}\n",
            report.not_signed.join(", ")
        ));
    }
    vec![first.into_bytes(), second.into_bytes(), third.into_bytes()]
}
