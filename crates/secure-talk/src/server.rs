//! Listeners and the HTTP layer: HTTPS on TCP (client certificates), plain HTTP on a Unix
//! socket, the same endpoints on both.
//!
//! - `GET /` and `GET /data`: the token endpoint (body = the bare JWT);
//! - websocket upgrades on `/` (admin) and `/data` (data), with a valid `token` header;
//! - `POST /` and `POST /data`: an empty 200, as the original;
//! - anything else: 404 (the original never answered).
//!
//! [`Server`] holds the shared state (`state::Shared`) and serves it; [`Listeners::bind`] opens the sockets (removing a stale
//! socket file left by a crash, refusing one a live server still holds).

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::admission::{AcceptError, Admission, Pool, Slot, Stranger};
use common::daemon::{AcceptBackoff, Shutdown};
use common::metrics::{OpenConnection, Reason};
use common::tls::{ServerTls, TlsError};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::Instrument as _;

use crate::channel;
use crate::config::Config;
use crate::hub::Channel;
use crate::state::{Peer, Shared};
use crate::token::Tokens;

/// The bound sockets.
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS and WSS.
    pub tcp: Option<TcpListener>,
    /// Plain HTTP and WS, with its path.
    pub unix: Option<(UnixListener, PathBuf)>,
    /// The pipes' IPC socket, with its path.
    pub ipc: (UnixListener, PathBuf),
}

impl Listeners {
    /// Binds every socket the configuration names.
    ///
    /// # Errors
    /// A socket cannot be bound, or a socket path is held by a live server or is not a socket.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let tcp = match config.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?,
            ),
            None => None,
        };
        let unix = match &config.unix_socket {
            Some(path) => Some((
                bind_unix(path, config.unix_socket_mode, false)
                    .with_context(|| format!("binding the unix socket {}", path.display()))?,
                path.clone(),
            )),
            None => None,
        };
        let ipc = bind_unix(&config.ipc_socket, 0o600, true)
            .with_context(|| format!("binding the ipc socket {}", config.ipc_socket.display()))?;
        Ok(Self {
            tcp,
            unix,
            ipc: (ipc, config.ipc_socket.clone()),
        })
    }
}

/// Binds a Unix socket at `path` with `mode`, first removing a stale socket file that no
/// process accepts on. `private_dir` creates a missing parent directory with mode 0700.
///
/// # Errors
/// The path is held by a live server, is not a socket, or cannot be bound.
pub fn bind_unix(path: &Path, mode: u32, private_dir: bool) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent)?;
            if private_dir {
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
            }
        }
    }
    common::daemon::bind_unix(path, mode)
}

/// The daemon: configuration, token keys, TLS material and the hub.
#[derive(Debug, Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server; `tls` is required when the configuration has a TCP listener.
    pub fn new(
        config: Config,
        tokens: Tokens,
        tls: Option<Arc<ServerTls>>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            shared: Arc::new(Shared::new(config, tokens, tls, shutdown)),
        }
    }

    /// Serves every listener until shutdown, then stops the pipes (SIGTERM, then SIGKILL
    /// after the kill grace) and removes the socket files. Connection and pipe tasks are
    /// tracked by the shutdown handle, so [`Shutdown::drain`] waits for them.
    pub async fn run(&self, listeners: Listeners) {
        let shared = &self.shared;
        let Listeners { tcp, unix, ipc } = listeners;
        crate::upload::remove_leftovers(&shared.config.upload_dir);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(crate::ipc::serve(shared.clone(), ipc.0));
        if let Some(tcp) = tcp {
            tasks.spawn(serve_tcp(shared.clone(), tcp));
        }
        let unix_path = unix.as_ref().map(|(_, p)| p.clone());
        if let Some((unix, _)) = unix {
            tasks.spawn(serve_unix(shared.clone(), unix));
        }
        let reaper = shared.clone();
        tasks.spawn(async move { reap_orphans(reaper).await });
        while tasks.join_next().await.is_some() {}
        for path in [Some(ipc.1), unix_path].into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Rebuilds the TLS configuration from disk for new connections.
    ///
    /// # Errors
    /// The new material does not load; the old stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        match &self.shared.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// The TCP front door (pools and their counters).
    pub fn admission(&self) -> &Admission {
        &self.shared.admission
    }

    /// The Unix socket's pool.
    pub fn local_pool(&self) -> &Pool {
        &self.shared.local
    }

    /// Clients with a live websocket.
    pub fn connected_clients(&self) -> usize {
        self.shared.hub.connected_clients()
    }

    /// Bytes of incoming messages held in memory now (the budget's use).
    pub fn bytes_in_flight(&self) -> usize {
        self.shared.budget.total().used()
    }

    /// The exposition of every metric (OpenMetrics text), as `/metrics` serves it.
    pub fn encode_metrics(&self) -> String {
        self.shared.metrics.encode(self.shared.hub.counts())
    }

    /// The shared families (the metrics listener counts its pool's refusals there).
    pub fn metric_families(&self) -> common::metrics::Families {
        self.shared.metrics.shared.clone()
    }

    /// Pipes alive.
    pub fn pipes(&self) -> usize {
        self.shared.hub.list(None).1.len()
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let mut backoff = AcceptBackoff::default();
    let shutdown = shared.shutdown.clone();
    while let Some((tcp, addr)) = backoff.next(&shutdown, || listener.accept()).await {
        let open = shared.metrics.shared.connection();
        // Refusals are counted and logged (rate-limited) by the admission.
        let stranger = match shared.admission.stranger(addr) {
            Ok(stranger) => stranger,
            Err(refused) => {
                shared.metrics.shared.refused(refused);
                continue;
            }
        };
        let shared = shared.clone();
        let span = tracing::info_span!("conn", peer = %addr);
        shutdown
            .spawn(tcp_connection(shared, tcp, addr.to_string(), stranger, open).instrument(span));
    }
}

async fn tcp_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    addr: String,
    stranger: Stranger,
    open: OpenConnection,
) {
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &shared.tls else {
        return;
    };
    let acceptor = tls.acceptor();
    // The max_connections slot is taken once the handshake is done, not at accept.
    match stranger.accept_tls(&acceptor, tcp).await {
        Ok((stream, identity, slot)) => {
            let live = Some(tls.live_peer(stream.get_ref().1));
            let peer = Peer {
                addr,
                identity,
                live,
            };
            http(
                shared,
                stream,
                peer,
                Held {
                    _slot: slot,
                    _open: open,
                },
            )
            .await;
        }
        // A closed probe was logged where it was accepted.
        Err(AcceptError::Tls(err @ common::tls::TlsError::Closed)) => {
            shared.metrics.shared.tls_failure(&err);
        }
        Err(AcceptError::Tls(err)) => {
            shared.metrics.shared.tls_failure(&err);
            tracing::debug!(outcome = "refused", %err, "tls handshake failed");
        }
        Err(AcceptError::Refused(refused)) => shared.metrics.shared.refused(refused),
    }
}

async fn serve_unix(shared: Arc<Shared>, listener: UnixListener) {
    let mut backoff = AcceptBackoff::default();
    let shutdown = shared.shutdown.clone();
    while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
        let open = shared.metrics.shared.connection();
        // Local users have their own pool: remote strangers never starve them, nor they them.
        let Ok(slot) = shared.local.try_admit() else {
            shared
                .metrics
                .shared
                .refused(Reason::new("max_local_connections"));
            continue;
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let peer = Peer {
            addr: uid.map_or_else(|| "unix".to_owned(), |uid| format!("unix:uid={uid}")),
            identity: None,
            live: None,
        };
        let span = tracing::info_span!("conn", peer = %peer.addr);
        let held = Held {
            _slot: slot,
            _open: open,
        };
        shutdown.spawn(http(shared.clone(), stream, peer, held).instrument(span));
    }
}

/// What a connection holds until it closes (an upgraded one: until its websocket ends): its
/// slot of a pool and its place in `connections_open`.
#[derive(Debug)]
struct Held {
    _slot: Slot,
    _open: OpenConnection,
}

/// Serves HTTP/1.1 on one connection until it closes, upgrades or the server stops.
async fn http<S>(shared: Arc<Shared>, io: S, peer: Peer, slot: Held)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.config.limits;
    let slot = Arc::new(slot);
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| {
            // A certificate revoked since the handshake gets no token and no upgrade on this
            // connection (the websocket checks again on every frame).
            let upgrade = header_has_token(&req, header::UPGRADE, "websocket");
            let timer = shared.metrics.shared.start(crate::metrics::route(
                req.method(),
                req.uri().path(),
                upgrade,
            ));
            let answer = match peer.live.as_ref().map(common::tls::LivePeer::check) {
                Some(Err(err)) => {
                    shared.metrics.shared.refused(Reason::AUTHORIZATION);
                    tracing::warn!(outcome = "refused", identity = ?peer.identity.as_ref().map(ToString::to_string), err = %common::log::Escaped(&err), "request refused");
                    let mut answer = plain(StatusCode::FORBIDDEN, "revoked by a current CRL");
                    answer
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    answer
                }
                _ => handle(&shared, &peer, &slot, req),
            };
            timer.done(answer.status().as_u16());
            async move { Ok::<_, Infallible>(answer) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout())
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    // Keep-alive ends at the age after the request in progress (an upgraded websocket has
    // its own timer in `channel`).
    common::daemon::drive_http(
        conn,
        |c| c.graceful_shutdown(),
        Some(shared.max_connection_age()),
        &shared.shutdown,
        Duration::from_secs(1),
    )
    .await;
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Answers one request.
fn handle(
    shared: &Arc<Shared>,
    peer: &Peer,
    slot: &Arc<Held>,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let channel = match req.uri().path() {
        "/" => Some(Channel::Admin),
        "/data" => Some(Channel::Data),
        _ => None,
    };
    let token = req
        .headers()
        .get("token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if header_has_token(&req, header::UPGRADE, "websocket") {
        let Some(channel) = channel else {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: websockets are / and /data",
            );
        };
        if req.method() != Method::GET {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "upgrade with GET");
        }
        let Some(claims) = token.as_deref().and_then(|t| shared.tokens.verify(t)) else {
            tracing::info!(
                outcome = "refused",
                ?channel,
                "upgrade without a valid token"
            );
            shared.metrics.shared.refused(Reason::AUTHORIZATION);
            return plain(
                StatusCode::UNAUTHORIZED,
                "a valid token header is required: GET / first",
            );
        };
        if shared.shutdown.is_triggered() {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
        }
        if req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            let mut response = plain(StatusCode::UPGRADE_REQUIRED, "websocket version 13 only");
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return response;
        }
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
            return plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing");
        };
        if !header_has_token(&req, header::CONNECTION, "upgrade") {
            return plain(StatusCode::BAD_REQUEST, "Connection: upgrade is missing");
        }
        let accept = derive_accept_key(key.as_bytes());
        let client = claims.client_id;
        if !shared
            .hub
            .would_admit(client, shared.config.limits.max_clients)
        {
            tracing::warn!(client_id = client, "refused: max_clients reached");
            shared.metrics.shared.refused(Reason::new("max_clients"));
            return plain(StatusCode::SERVICE_UNAVAILABLE, "too many clients");
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let task_shared = shared.clone();
        let peer = peer.clone();
        let slot = slot.clone();
        let span = tracing::info_span!("ws", client_id = client, ?channel);
        shared.shutdown.spawn(
            async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(err) => {
                        tracing::debug!(%err, "upgrade failed");
                        return;
                    }
                };
                channel::run(task_shared, TokioIo::new(upgraded), client, channel, peer).await;
                drop(slot);
            }
            .instrument(span),
        );
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        return response;
    }
    // The token endpoint compares the whole request target, as the original did.
    let exact = req.uri().query().is_none();
    match (req.method(), channel) {
        (&Method::GET, Some(_)) if exact => token_answer(shared, token.as_deref()),
        (&Method::POST, Some(_)) if exact => Response::new(Full::new(Bytes::new())),
        _ => plain(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `GET /`: the presented token while it verifies, else a new identity.
fn token_answer(shared: &Shared, presented: Option<&str>) -> Response<Full<Bytes>> {
    let token = match presented.filter(|t| shared.tokens.verify(t).is_some()) {
        Some(valid) => valid.to_owned(),
        None => {
            let (client_id, token) = shared.tokens.issue(SystemTime::now());
            tracing::debug!(client_id, "issued a token");
            token
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(token)));
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Stops pipes whose owner has been gone longer than the orphan timeout.
async fn reap_orphans(shared: Arc<Shared>) {
    let Some(after) = shared.config.limits.orphan_pipe_timeout() else {
        shared.shutdown.triggered().await;
        return;
    };
    let period = (after / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.triggered() => return,
        }
        for pipe in shared.hub.orphans(after) {
            tracing::info!(pipe_id = pipe, "owner gone too long; destroying the pipe");
            let _ = shared.destroy_pipe(None, pipe, None);
        }
    }
}
