//! The HTTP side: accept loop, session resolution, the authenticated-request pipeline and the
//! endpoints.
//!
//! Answers follow the original's framing: encrypted bodies are token lines separated by a
//! single CRLF and sent without Content-Length (the original client tells encrypted from plain
//! by that header's absence); plain errors are short texts. Statuses are the original's where
//! they were deliberate and clean 4xx codes where it crashed (see docs/remo-serv.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::admission::{Admission, Pending};
use common::daemon::{AcceptBackoff, Shutdown};
use common::metrics::{Families, OpenConnection, Reason, TlsFailure};
use common::tls::ServerTls;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::body::{BodyError, BodyReader, RequestBody, full, unix_now};
use crate::config::Config;
use crate::conns::{Tie, UserConnections};
use crate::exec::{self, CmdLimits, ExecError, Interactive};
use crate::files::{FileError, Roots};
use crate::keys::{PrivateKey, PublicKey};
use crate::limits::{Budget, LoginRate, OverBudget};
use crate::metrics::{self, Metrics};
use crate::proto::{self, AuthRequest, Cipher, Magic, TokenHeader};
use crate::session::{self, Login, Sessions, WINDOW_CHUNKED, WINDOW_SINGLE};
use crate::users::Users;

/// Response body type: encrypted answers stream, plain ones are full.
pub type Body = crate::body::BoxedBody;

/// Header carrying a command's exit status.
pub const EXIT_STATUS_HEADER: &str = "x-remo-exit-status";
/// Header carrying the plaintext size of a `/get` answer (for progress bars).
pub const SIZE_HEADER: &str = "x-remo-size";
/// Most bytes of an `/auth` body.
const MAX_AUTH_BODY: usize = 16 * 1024;
/// Most tokens in one answer (int16 token numbers).
const MAX_TOKENS: u64 = i16::MAX as u64;

/// The `/info` text.
pub fn info_text() -> String {
    format!("remo_serv {} here", env!("CARGO_PKG_VERSION"))
}

/// A running server's shared state.
#[derive(Debug)]
struct State {
    config: Config,
    server_key: Arc<PrivateKey>,
    users: Users,
    roots: Roots,
    sessions: Sessions,
    /// Unauthenticated connections wait in its stranger pool; authenticated ones hold one of
    /// its `max_connections` slots.
    admission: Admission,
    ephemerals: Arc<Ephemerals>,
    /// Bytes of request bodies not verified yet.
    budget: Budget,
    /// Authenticated connections per user.
    user_conns: Arc<UserConnections>,
    /// Login attempts per source address.
    login_rate: LoginRate,
    login_rate_warning: common::admission::Warning,
    /// The public key (PEM) an unknown user's login is verified against, so that it costs
    /// what a known user's does.
    dummy_pem: Vec<u8>,
    /// What `/metrics` exports.
    metrics: Metrics,
}

/// A server X448 key pair for one login, with the server's signature over the public half.
struct Ephemeral {
    secret: [u8; proto::X448_LEN],
    public: [u8; proto::X448_LEN],
    signature: Vec<u8>,
}

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ephemeral(..)")
    }
}

impl Ephemeral {
    fn new(server_key: &PrivateKey) -> Self {
        let secret = proto::x448_secret();
        let public = proto::x448_public(&secret);
        let signature = server_key.sign(&public);
        Self {
            secret,
            public,
            signature,
        }
    }
}

/// A few ephemeral key pairs made ahead of time, so a login does not wait for them. Each is
/// used once; the pool is refilled in the background.
#[derive(Debug, Default)]
struct Ephemerals {
    ready: std::sync::Mutex<Vec<Ephemeral>>,
    refilling: std::sync::atomic::AtomicBool,
}

/// Pre-made ephemeral keys kept ready.
const EPHEMERAL_POOL: usize = 8;

impl Ephemerals {
    fn take(&self, server_key: &PrivateKey) -> Ephemeral {
        let ready = self
            .ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        ready.unwrap_or_else(|| Ephemeral::new(server_key))
    }

    fn refill(self: &Arc<Self>, server_key: &Arc<PrivateKey>) {
        use std::sync::atomic::Ordering;
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        let key = Arc::clone(server_key);
        tokio::task::spawn_blocking(move || {
            loop {
                let missing = {
                    let ready = pool.ready.lock().unwrap_or_else(|p| p.into_inner());
                    ready.len() < EPHEMERAL_POOL
                };
                if !missing {
                    break;
                }
                let made = Ephemeral::new(&key);
                pool.ready
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(made);
            }
            pool.refilling.store(false, Ordering::Release);
        });
    }
}

/// The remo-serv server: call [`Server::serve`] with a bound listener.
#[derive(Debug, Clone)]
pub struct Server {
    state: Arc<State>,
    tls: Option<Arc<ServerTls>>,
}

impl Server {
    /// Builds a server; the roots and working directory must exist.
    ///
    /// # Errors
    /// A missing working directory or root.
    pub fn new(
        config: Config,
        server_key: PrivateKey,
        users: Users,
        tls: Option<ServerTls>,
    ) -> std::io::Result<Self> {
        let roots = Roots::new(&config.workdir, &config.file_roots)?;
        let sessions = Sessions::new(
            config.session_timeout,
            config.max_sessions,
            config.max_sessions_per_user,
        );
        let admission = Admission::new("http", config.admission());
        let (total, per_session) = config.unverified_budget();
        let login_rate = LoginRate::new(config.logins_per_minute, config.login_burst);
        let user_conns = UserConnections::new(config.max_connections_per_user);
        let dummy_pem = PublicKey::ed448_pem(&PrivateKey::generate().verifying_key()).into_bytes();
        Ok(Self {
            state: Arc::new(State {
                config,
                server_key: Arc::new(server_key),
                users,
                roots,
                sessions,
                admission,
                ephemerals: Arc::default(),
                budget: Budget::new(total, per_session),
                user_conns,
                login_rate,
                login_rate_warning: common::admission::Warning::default(),
                dummy_pem,
                metrics: Metrics::new(),
            }),
            tls: tls.map(Arc::new),
        })
    }

    /// Re-reads the HTTPS certificate and key (SIGHUP); a failure keeps the old ones.
    ///
    /// # Errors
    /// The new material does not load.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        if let Some(tls) = &self.tls {
            tls.reload()?;
        }
        Ok(())
    }

    /// The front door (pools and their counters).
    pub fn admission(&self) -> &Admission {
        &self.state.admission
    }

    /// The exposition of every metric (OpenMetrics text), as `/metrics` serves it.
    pub fn encode_metrics(&self) -> String {
        self.state.metrics.encode(self.state.sessions.len())
    }

    /// The shared families (the metrics listener counts its pool's refusals there).
    pub fn metric_families(&self) -> common::metrics::Families {
        self.state.metrics.shared.clone()
    }

    /// Logged-in sessions right now.
    pub fn sessions(&self) -> usize {
        self.state.sessions.len()
    }

    /// Bytes of unverified request bodies held right now.
    pub fn unverified_bytes(&self) -> usize {
        self.state.budget.used()
    }

    /// Accepts connections until `shutdown` triggers; each connection is a tracked task that
    /// finishes its current request and closes.
    pub async fn serve(&self, listener: TcpListener, shutdown: Shutdown) {
        self.state.ephemerals.refill(&self.state.server_key);
        let sweeper = {
            let state = Arc::clone(&self.state);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let period = state.config.session_timeout.min(Duration::from_secs(60));
                let mut tick = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { state.sessions.sweep(Instant::now()); }
                        () = stop.triggered() => break,
                    }
                }
            })
        };
        let mut backoff = AcceptBackoff::default();
        while let Some((stream, peer)) = backoff.next(&shutdown, || listener.accept()).await {
            let open = self.state.metrics.shared.connection();
            // A stranger until a request authenticates; refusals are counted and logged
            // (rate-limited) by the admission.
            let stranger = match self.state.admission.stranger(peer) {
                Ok(stranger) => stranger,
                Err(refused) => {
                    self.state.metrics.shared.refused(refused);
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let state = Arc::clone(&self.state);
            let tls = self.tls.as_ref().map(|tls| tls.acceptor());
            let stop = shutdown.clone();
            let span = tracing::info_span!("conn", %peer);
            shutdown.spawn(
                async move {
                    let _open: OpenConnection = open;
                    let door = Arc::new(Conn {
                        door: stranger.pending(),
                        tie: Tie::new(&state.user_conns),
                    });
                    match tls {
                        None => serve_connection(state, stream, peer, stop, door).await,
                        Some(acceptor) => {
                            // The handshake is part of the time to authenticate.
                            let left = door
                                .door
                                .deadline()
                                .saturating_duration_since(tokio::time::Instant::now());
                            // An eviction from the full stranger pool ends it too.
                            let accepted = tokio::select! {
                                accepted = common::tls::accept(&acceptor, stream, left) => accepted,
                                () = door.door.expired() => {
                                    tracing::debug!("evicted before the TLS handshake finished");
                                    state.metrics.shared.tls_failed(TlsFailure::evicted);
                                    return;
                                }
                            };
                            match accepted {
                                Ok((stream, _)) => {
                                    serve_connection(state, stream, peer, stop, door).await
                                }
                                Err(err) => {
                                    state.metrics.shared.tls_failure(&err);
                                    tracing::debug!(%err, "TLS handshake failed");
                                }
                            }
                        }
                    }
                }
                .instrument(span),
            );
        }
        sweeper.abort();
        // Interactive commands get SIGTERM, then SIGKILL after the grace period, before
        // serve returns (a detached killer would die with the runtime).
        let grace = self.state.config.kill_grace;
        let stopping: Vec<_> = self
            .state
            .sessions
            .clear()
            .into_iter()
            .map(|process| process.terminate(grace))
            .collect();
        futures_util::future::join_all(stopping).await;
    }
}

/// What the handlers of one connection share: its place at the front door (a stranger, then
/// a `max-connections` slot) and its tie to the session and user it authenticated with.
#[derive(Debug)]
struct Conn {
    door: Pending,
    tie: Tie,
}

async fn serve_connection<IO>(
    state: Arc<State>,
    io: IO,
    peer: SocketAddr,
    stop: Shutdown,
    door: Arc<Conn>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state_header_timeout = state.config.header_timeout;
    let max_age = state.config.max_connection_age;
    let handlers_door = Arc::clone(&door);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&state);
        let door = Arc::clone(&handlers_door);
        let timer = state.metrics.shared.start(metrics::route(req.uri().path()));
        async move {
            let metrics = state.metrics.shared.clone();
            let response = handle(state, req, peer, &door).await;
            if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                metrics.refused(Reason::LIMITS);
            }
            timer.done(response.status().as_u16());
            Ok::<_, Infallible>(response)
        }
    });
    let http = common::daemon::Http1 {
        header_timeout: state_header_timeout,
        max_buf_size: Some(64 * 1024),
        max_age: Some(max_age),
        // On shutdown the request in progress may finish; the daemon's drain-grace bounds it.
        drain: Duration::MAX,
    };
    // Closed after the request in progress (none: at once) when its session ends or its user
    // has too many connections; dropped at once without an authenticated request in time.
    let tie = async {
        door.tie.closing().await;
        tracing::debug!(
            "closing after the request in progress: its session ended, or max-connections-per-user"
        );
    };
    let expired = async {
        door.door.expired().await;
        tracing::debug!("no authenticated request in time; closing");
    };
    common::daemon::serve_http1(io, service, http, &stop, tie, expired).await;
}

/// A request of `user` on session `id` (whose end `ended` marks) authenticated: the connection
/// takes its `max_connections` slot if it has none, and is tied to that session and counted
/// against the user's share (their oldest connection closed beyond it). `Some(503)` (closing
/// the connection) when the slot pool is full.
fn promote(
    metrics: &Families,
    conn: &Conn,
    id: &str,
    user: &str,
    ended: &tokio_util::sync::CancellationToken,
) -> Option<Response<Body>> {
    if let Err(refused) = conn.door.authenticated() {
        metrics.refused(refused);
        let mut response = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            id,
            "too many connections\n",
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Some(response);
    }
    conn.tie.bind(user, id, ended);
    None
}

fn cookie_value(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("SESSION_ID={id}; Path=/"))
        .unwrap_or_else(|_| HeaderValue::from_static("SESSION_ID=invalid; Path=/"))
}

/// An answer with the headers every answer carries: the session cookie and the content type.
fn answer(status: StatusCode, body: Body, cookie: HeaderValue) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::SET_COOKIE, cookie);
    response
}

/// A body of one piece sent without Content-Length (chunked): what the original client takes
/// for encrypted, and what the original server sends for `/info` and logout.
fn without_length(bytes: impl Into<Bytes>) -> Body {
    let bytes = bytes.into();
    let stream = futures_util::stream::once(async move { Ok(Frame::data(bytes)) });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A plain answer (Content-Length set: the original client reads it raw).
fn plain(status: StatusCode, id: &str, text: &'static str) -> Response<Body> {
    answer(status, full(text), cookie_value(id))
}

/// A plain answer without Content-Length (what the original sends for `/info` and logout).
fn plain_streamed(status: StatusCode, id: &str, text: String) -> Response<Body> {
    answer(status, without_length(text), cookie_value(id))
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    door: &Conn,
) -> Response<Body> {
    let now = Instant::now();
    let cookie = session::cookie_session_id(
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let (id, login) = state.sessions.resolve(cookie, now);
    let path = req.uri().path().to_owned();
    if path == "/auth" {
        return auth(&state, req, &id, login, peer, door).await;
    }
    match login {
        None if path == "/info" => plain_streamed(StatusCode::OK, &id, info_text()),
        None if path.starts_with("/info") => plain(StatusCode::NOT_FOUND, &id, ""),
        None => {
            state.metrics.shared.refused(Reason::AUTHORIZATION);
            plain(StatusCode::FORBIDDEN, &id, "")
        }
        Some(login) => authenticated(&state, req, id, login, path, door).await,
    }
}

/// The declared Content-Length of a request, if any.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The plain answer refusing an unverified body (too slow, over a budget, cut short).
fn unverified_refusal(
    metrics: &Families,
    id: &str,
    err: &BodyError,
    incomplete: &'static str,
) -> Response<Body> {
    if matches!(err, BodyError::OverBudget(_)) {
        metrics.refused(Reason::LIMITS);
    }
    match err {
        BodyError::TooLarge => plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            id,
            "Request body too large\n",
        ),
        BodyError::OverBudget(OverBudget::Session) => plain(
            StatusCode::TOO_MANY_REQUESTS,
            id,
            "too much unverified data in flight for this session\n",
        ),
        BodyError::OverBudget(OverBudget::Server) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            id,
            "server busy: too much unverified data in flight\n",
        ),
        _ => plain(StatusCode::BAD_REQUEST, id, incomplete),
    }
}

async fn auth(
    state: &State,
    req: Request<Incoming>,
    id: &str,
    login: Option<Login>,
    peer: SocketAddr,
    door: &Conn,
) -> Response<Body> {
    if declared_length(&req).is_some_and(|n| n > MAX_AUTH_BODY as u64) {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, id, "auth body too large\n");
    }
    // Nothing in it is verified until the signature is: a total deadline and the budget.
    let mut reader = BodyReader::unverified(
        req.into_body(),
        state.config.body_timeout,
        state.config.unverified_body_timeout,
        state.budget.charge(None),
    );
    let body = match reader.read_all(MAX_AUTH_BODY).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, id, "auth body too large\n");
        }
        Err(err) => {
            tracing::info!(%peer, err = %common::log::Clipped(&err), "login refused: body");
            return unverified_refusal(&state.metrics.shared, id, &err, "incomplete auth body\n");
        }
    };
    drop(reader);
    let text = body.trim_ascii();
    if text.is_empty() {
        // The original logged out on an empty body; with nothing but a cookie anyone could,
        // so it is answered as before and changes nothing (see `logout`).
        return plain_streamed(StatusCode::OK, id, "Disconnected".into());
    }
    if !text.starts_with(b"{") {
        if let Some(login) = login {
            return logout(state, id, &login, text);
        }
    }
    if !state.login_rate.allow(peer.ip(), Instant::now()) {
        if let Some(refused) = state.login_rate_warning.note(tokio::time::Instant::now()) {
            tracing::warn!(%peer, refused, "login refused: too many attempts from this address");
        }
        state.metrics.login(metrics::Login::rate_limited);
        state.metrics.shared.refused(Reason::RATE_LIMIT);
        // As the original answers a refused login.
        return plain(StatusCode::FORBIDDEN, id, "");
    }
    let request = match AuthRequest::parse(&body) {
        Ok(request) => request,
        Err(err) => {
            tracing::info!(%peer, err = %common::log::Clipped(&err), "login refused: malformed request");
            state.metrics.login(metrics::Login::malformed);
            return plain(StatusCode::BAD_REQUEST, id, "");
        }
    };
    // An unknown user (or an unusable stored key) is verified against a key of our own, with
    // the same agreement after it: the answer takes as long as a wrong signature's.
    let (stored, known) = match state.users.public_pem(&request.user).await {
        Ok(Some(pem)) => (pem, true),
        Ok(None) => (state.dummy_pem.clone(), false),
        Err(err) => {
            tracing::error!(%err, "user database lookup failed");
            state.metrics.login(metrics::Login::unavailable);
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                "user database unavailable\n",
            );
        }
    };
    let (public, usable) = match PublicKey::from_pem(&stored) {
        Ok(public) => (public, true),
        Err(_) => match PublicKey::from_pem(&state.dummy_pem) {
            Ok(public) => (public, false),
            Err(_) => {
                state.metrics.login(metrics::Login::refused);
                return plain(StatusCode::FORBIDDEN, id, "");
            }
        },
    };
    // The signature check and the key agreement are independent: run them side by side on
    // the blocking pool (each is around a millisecond with ed448-goldilocks), with a server
    // ephemeral key that was made and signed ahead of time.
    let AuthRequest {
        user,
        key: peer_key,
        sign: signature,
    } = request;
    let message = AuthRequest::signed_message(&user, &peer_key);
    let verify = tokio::task::spawn_blocking(move || public.verify(&message, &signature));
    let ephemeral = state.ephemerals.take(&state.server_key);
    let secret = ephemeral.secret;
    let agree = tokio::task::spawn_blocking(move || proto::x448_shared(&secret, &peer_key));
    let (verified, shared) = (verify.await, agree.await);
    state.ephemerals.refill(&state.server_key);
    if !(known && usable && matches!(verified, Ok(true))) {
        // One outcome for the three: the metrics say no more than the answer does.
        state.metrics.login(metrics::Login::refused);
        state.metrics.shared.refused(Reason::AUTHORIZATION);
    }
    if !known {
        tracing::warn!(%peer, user = %common::log::Clipped(&user), "login refused: unknown user");
        return plain(StatusCode::FORBIDDEN, id, "");
    }
    if !usable {
        tracing::warn!(user = %common::log::Clipped(&user), "login refused: stored key is neither Ed448 nor RSA");
        return plain(StatusCode::FORBIDDEN, id, "");
    }
    if !matches!(verified, Ok(true)) {
        tracing::warn!(%peer, user = %common::log::Clipped(&user), "login refused: bad signature");
        return plain(StatusCode::FORBIDDEN, id, "");
    }
    let Ok(Ok(shared)) = shared else {
        tracing::info!(%peer, "login refused: bad X448 key");
        state.metrics.login(metrics::Login::malformed);
        return plain(StatusCode::BAD_REQUEST, id, "");
    };
    let cipher = Cipher::new(&proto::session_key(&shared));
    // Every login is a new session under a new id; the cookie's session is left alone.
    let Ok((id, ended)) = state.sessions.login(cipher, &user, Instant::now()) else {
        tracing::warn!(user = %common::log::Clipped(&user), "login refused: session table full");
        state.metrics.login(metrics::Login::unavailable);
        state.metrics.shared.refused(Reason::new("max_sessions"));
        return plain(StatusCode::SERVICE_UNAVAILABLE, id, "too many sessions\n");
    };
    if let Some(refused) = promote(&state.metrics.shared, door, &id, &user, &ended) {
        // The login stands (the session is the user's); this connection is closed.
        return refused;
    }
    state.metrics.login(metrics::Login::ok);
    tracing::info!(%peer, user = %common::log::Clipped(&user), "logged in");
    let text = proto::auth_response(&ephemeral.public, &ephemeral.signature);
    answer(StatusCode::OK, full(text), cookie_value(&id))
}

/// `POST /auth` whose body is one token of the session (`BE`, the path hash of `/auth`, the
/// next request number): the session holder logs out, and its interactive command ends. An
/// empty body no longer does (the cookie alone proves nothing).
fn logout(state: &State, id: &str, login: &Login, token: &[u8]) -> Response<Body> {
    let checked = std::str::from_utf8(token)
        .ok()
        .and_then(|text| login.cipher.decrypt_body(text, unix_now()).ok())
        .and_then(|plain| {
            let (header, rest) = TokenHeader::split(&plain).ok()?;
            let (hash, _) = proto::split_hash(rest).ok()?;
            (header.is_first()
                && header.is_last()
                && header.tok_no == 0
                && hash == &proto::path_hash("/auth"))
                .then_some(header.req_no)
        })
        .is_some_and(|req_no| {
            state
                .sessions
                .accept_req_no(id, req_no, WINDOW_SINGLE, Instant::now())
        });
    if !checked {
        return plain(StatusCode::BAD_REQUEST, id, "Wrong initial token\n");
    }
    if let Some(user) = state.sessions.logout(id) {
        tracing::info!(user = %common::log::Clipped(&user), "logged out");
    }
    plain_streamed(StatusCode::OK, id, "Disconnected".into())
}

/// Appends one encrypted token and its CRLF to `batch`.
fn push_line(batch: &mut bytes::BytesMut, cipher: &Cipher, plain: &[u8]) {
    batch.extend_from_slice(cipher.encrypt(plain).as_bytes());
    batch.extend_from_slice(b"\r\n");
}

/// Builds encrypted answers for one request.
struct Responder {
    cipher: Arc<Cipher>,
    req_no: i16,
    cookie: HeaderValue,
}

impl Responder {
    fn line(cipher: &Cipher, plain: &[u8]) -> Bytes {
        let mut token = cipher.encrypt(plain);
        token.push_str("\r\n");
        Bytes::from(token)
    }

    fn respond(&self, status: StatusCode, body: Body) -> Response<Body> {
        let mut response = answer(status, body, self.cookie.clone());
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// One token: `BE` when `payload` is empty, `B.` otherwise (as the original).
    fn single(&self, status: StatusCode, payload: &[u8]) -> Response<Body> {
        let magic = Magic {
            first: true,
            last: payload.is_empty(),
        };
        let line = Self::line(
            &self.cipher,
            &proto::response_plain(magic, self.req_no, 0, payload),
        );
        self.respond(status, without_length(line))
    }

    /// A streamed answer from lines produced elsewhere.
    fn stream(
        &self,
        status: StatusCode,
        lines: mpsc::Receiver<std::io::Result<Bytes>>,
    ) -> Response<Body> {
        let stream = futures_util::stream::unfold(lines, |mut lines| async move {
            lines
                .recv()
                .await
                .map(|item| (item.map(Frame::data), lines))
        });
        self.respond(status, BodyExt::boxed(StreamBody::new(stream)))
    }
}

/// What an endpoint produced and whether the request number is committed.
struct Outcome {
    response: Response<Body>,
    commit: bool,
}

impl Outcome {
    fn done(response: Response<Body>) -> Self {
        Self {
            response,
            commit: true,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    Chunked,
}

async fn authenticated(
    state: &State,
    req: Request<Incoming>,
    id: String,
    login: Login,
    path: String,
    door: &Conn,
) -> Response<Body> {
    let mode = if req.headers().contains_key(header::CONTENT_LENGTH)
        || !req.headers().contains_key(header::TRANSFER_ENCODING)
    {
        Mode::Single
    } else {
        Mode::Chunked
    };
    // The first token is unverified until it decrypts and checks: it is bounded in size
    // (a token of `max-body`), in total time, and charged to the session and the server.
    let max_token = state.config.max_first_token();
    if mode == Mode::Single && declared_length(&req).is_some_and(|n| n > max_token as u64) {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            &id,
            "Request body too large\n",
        );
    }
    let mut reader = BodyReader::unverified(
        req.into_body(),
        state.config.body_timeout,
        state.config.unverified_body_timeout,
        state.budget.charge(Some(&id)),
    );
    let first = match mode {
        Mode::Single => reader.read_all(max_token).await,
        Mode::Chunked => reader
            .next_line(max_token)
            .await
            .map(Option::unwrap_or_default),
    };
    let first = match first {
        Ok(first) => first,
        Err(err) => {
            tracing::info!(user = %common::log::Clipped(&login.user), err = %common::log::Clipped(&err), "request body refused before it verified");
            let incomplete = match mode {
                Mode::Single => "Incomplete request body\n",
                Mode::Chunked => "Invalid encoding\n",
            };
            return unverified_refusal(&state.metrics.shared, &id, &err, incomplete);
        }
    };
    if first.len() < proto::HEADER_LEN {
        return plain(StatusCode::BAD_REQUEST, &id, "Missing magic tokens\n");
    }
    let decrypted = std::str::from_utf8(&first)
        .ok()
        .and_then(|text| login.cipher.decrypt_body(text, unix_now()).ok());
    let Some(plain_first) = decrypted else {
        let text = match mode {
            Mode::Single => "Bad or expired token\n",
            Mode::Chunked => "Invalid encoding\n",
        };
        return plain(StatusCode::BAD_REQUEST, &id, text);
    };
    let checked = TokenHeader::split(&plain_first)
        .ok()
        .and_then(|(header, rest)| {
            let magic_ok = header.is_first()
                && header.tok_no == 0
                && (mode == Mode::Chunked || header.is_last());
            let (hash, payload) = proto::split_hash(rest).ok()?;
            (magic_ok && hash == &proto::path_hash(&path)).then(|| (header, payload.to_vec()))
        });
    let window = match mode {
        Mode::Single => WINDOW_SINGLE,
        Mode::Chunked => WINDOW_CHUNKED,
    };
    // Accepted and recorded in one step: a copy of the token sent while this request runs
    // finds the number taken.
    let checked = checked.filter(|(header, _)| {
        state
            .sessions
            .accept_req_no(&id, header.req_no, window, Instant::now())
    });
    let Some((header, payload)) = checked else {
        return match mode {
            Mode::Single => {
                // As the original: a wrong first token kills the session.
                tracing::warn!(user = %common::log::Clipped(&login.user), path = %common::log::Clipped(&path), "wrong initial token; session invalidated");
                state.sessions.logout(&id);
                plain(StatusCode::BAD_REQUEST, &id, "Wrong initial token\n")
            }
            Mode::Chunked => plain(StatusCode::BAD_REQUEST, &id, "Invalid encoding\n"),
        };
    };
    // The first token verified under the session key: the request is authentic.
    reader.verified();
    drop(first);
    if let Some(refused) = promote(&state.metrics.shared, door, &id, &login.user, &login.ended) {
        return refused;
    }
    let body = if mode == Mode::Chunked && !header.is_last() {
        RequestBody::streaming(payload, reader, Arc::clone(&login.cipher), header.req_no)
    } else {
        RequestBody::complete(payload)
    };
    let responder = Responder {
        cipher: login.cipher,
        req_no: header.req_no,
        cookie: cookie_value(&id),
    };
    let outcome = dispatch(state, &id, &login.user, &path, body, &responder).await;
    if outcome.commit {
        state.sessions.commit(&id, Instant::now());
    }
    outcome.response
}

fn body_error(id: &str, err: &BodyError) -> Outcome {
    tracing::info!(err = %common::log::Clipped(&err), "request body refused");
    let response = match err {
        BodyError::TooLarge => plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            id,
            "Request body too large\n",
        ),
        _ => plain(StatusCode::BAD_REQUEST, id, "Invalid encoding\n"),
    };
    Outcome {
        response,
        commit: false,
    }
}

async fn dispatch(
    state: &State,
    id: &str,
    user: &str,
    path: &str,
    body: RequestBody,
    out: &Responder,
) -> Outcome {
    let max_body = usize::try_from(state.config.max_body).unwrap_or(usize::MAX);
    let (endpoint, token) = match path.get(..5) {
        Some(prefix @ ("/get/" | "/put/" | "/cmd/" | "/icm/")) => (prefix, &path[5..]),
        _ => (path, ""),
    };
    // The argument of /get, /put, /cmd, /icm: a Fernet token of the UTF-8 text, no TTL.
    let argument = || -> Result<String, (StatusCode, &'static [u8])> {
        let bad_token = if matches!(endpoint, "/cmd/" | "/icm/") {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        let bytes = out
            .cipher
            .decrypt_path(token, unix_now())
            .map_err(|_| (bad_token, &b""[..]))?;
        String::from_utf8(bytes).map_err(|_| (StatusCode::BAD_REQUEST, &b"name is not UTF-8"[..]))
    };
    match endpoint {
        "/get/" | "/put/" | "/cmd/" | "/icm/" => {
            let arg = match argument() {
                Ok(arg) => arg,
                Err((status, text)) => {
                    // Read (and check) the body anyway so the connection stays usable.
                    if let Err(err) = body.collect(max_body, unix_now).await {
                        return body_error(id, &err);
                    }
                    return Outcome::done(out.single(status, text));
                }
            };
            match endpoint {
                "/get/" => get(state, id, user, &arg, body, out, max_body).await,
                "/put/" => put(state, user, &arg, body, out).await,
                _ => match command_input(id, user, &arg, body, out, max_body).await {
                    Err(outcome) => outcome,
                    Ok((stdin, argv)) if endpoint == "/cmd/" => {
                        cmd(state, user, &arg, stdin, &argv, out).await
                    }
                    Ok((input, argv)) => icm(state, id, user, &arg, &input, &argv, out).await,
                },
            }
        }
        "/info" => match body.collect(max_body, unix_now).await {
            Ok(_) => Outcome::done(out.single(StatusCode::OK, info_text().as_bytes())),
            Err(err) => body_error(id, &err),
        },
        "/idt" => idt(state, id, body, out, max_body).await,
        "/edt" => edt(state, id, body, out, max_body).await,
        _ => match body.collect(max_body, unix_now).await {
            Ok(_) => Outcome::done(out.single(StatusCode::NOT_FOUND, b"")),
            Err(err) => body_error(id, &err),
        },
    }
}

fn file_error(out: &Responder, user: &str, name: &str, err: &FileError) -> Outcome {
    tracing::info!(user = %common::log::Clipped(&user), name = %common::log::Clipped(&name), err = %common::log::Clipped(err), "file request refused");
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Outcome::done(out.single(status, format!("{err}\n").as_bytes()))
}

/// Plaintext bytes per `/get` token: 16 KiB as the original, larger for files that would
/// need more than 32767 tokens (token numbers are int16).
pub fn get_piece_size(size: u64) -> usize {
    let piece = proto::GET_PIECE as u64;
    let needed = size.div_ceil(MAX_TOKENS - 1).div_ceil(piece) * piece;
    usize::try_from(needed.max(piece)).unwrap_or(usize::MAX)
}

async fn get(
    state: &State,
    id: &str,
    user: &str,
    name: &str,
    body: RequestBody,
    out: &Responder,
    max_body: usize,
) -> Outcome {
    if let Err(err) = body.collect(max_body, unix_now).await {
        return body_error(id, &err);
    }
    // Opening blocks (a FIFO is opened without waiting, then refused): on the blocking pool.
    let (roots, owned) = (state.roots.clone(), name.to_owned());
    let (file, size) = match tokio::task::spawn_blocking(move || roots.open_for_get(&owned)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(err)) => return file_error(out, user, name, &err),
        Err(join) => {
            tracing::error!(%join, "opening a file panicked");
            return Outcome::done(out.single(StatusCode::INTERNAL_SERVER_ERROR, b""));
        }
    };
    tracing::info!(user = %common::log::Clipped(&user), name = %common::log::Clipped(&name), size, "get");
    let piece = get_piece_size(size);
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    let cipher = Arc::clone(&out.cipher);
    let req_no = out.req_no;
    // Reading and encrypting run on worker threads (tokens are independent); lines are sent
    // in order, in batches of about BATCH bytes, and the channel bounds what is buffered.
    tokio::task::spawn_blocking(move || {
        let count = size.div_ceil(piece as u64);
        let result = crate::pipeline::encrypt_batched(
            &file,
            crate::pipeline::Layout { size, piece, count },
            &cipher,
            |t, data| {
                // `count` tokens of data, then the end token.
                proto::response_plain(Magic::nth(t, count + 1), req_no, proto::token_no(t), data)
            },
            |batch, _| tx.blocking_send(Ok(batch)).is_ok(),
        );
        let mut batch = match result {
            Ok(tail) => tail,
            Err(err) => {
                // The client sees a truncated answer, never a short file taken for complete.
                tracing::warn!(%err, "get aborted");
                let _ = tx.blocking_send(Err(err));
                return;
            }
        };
        // An explicit end: the last token is an empty `.E` (or a lone `BE` for an empty file).
        let end = proto::response_plain(
            Magic::nth(count, count + 1),
            req_no,
            proto::token_no(count),
            b"",
        );
        push_line(&mut batch, &cipher, &end);
        let _ = tx.blocking_send(Ok(batch.freeze()));
    });
    let mut response = out.stream(StatusCode::OK, rx);
    if let Ok(value) = HeaderValue::from_str(&size.to_string()) {
        response.headers_mut().insert(SIZE_HEADER, value);
    }
    Outcome::done(response)
}

async fn put(
    state: &State,
    user: &str,
    name: &str,
    mut body: RequestBody,
    out: &Responder,
) -> Outcome {
    let (roots, owned, fsync) = (state.roots.clone(), name.to_owned(), state.config.put_fsync);
    let begun = tokio::task::spawn_blocking(move || roots.begin_put(&owned, fsync))
        .await
        .unwrap_or_else(|join| {
            tracing::error!(%join, "starting an upload panicked");
            Err(FileError::Io {
                name: name.to_owned(),
                source: std::io::Error::other("internal error"),
            })
        });
    let mut upload = match begun {
        Ok(upload) => upload,
        Err(err) => {
            // Drain the body so the answer is read; its errors do not matter any more.
            let _ = body.collect(usize::MAX, unix_now).await;
            return file_error(out, user, name, &err);
        }
    };
    // Decrypting happens here; writing on a blocking thread, one piece in flight at a time.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(piece) = rx.blocking_recv() {
            upload.write(&piece)?;
        }
        Ok::<_, FileError>(upload)
    });
    let mut failure: Option<BodyError> = None;
    loop {
        match body.next_piece(unix_now).await {
            Ok(Some(piece)) => {
                if piece.is_empty() {
                    continue;
                }
                if tx.send(piece).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Ok(None) => break,
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    drop(tx);
    let written = match writer.await {
        Ok(Ok(upload)) if failure.is_none() => {
            tokio::task::spawn_blocking(move || upload.commit()).await
        }
        Ok(Ok(_dropped)) => {
            let err = failure.unwrap_or(BodyError::Encoding("upload failed"));
            tracing::warn!(user = %common::log::Clipped(&user), name = %common::log::Clipped(&name), err = %common::log::Clipped(&err), "upload aborted; target left untouched");
            return Outcome {
                response: out.single(StatusCode::BAD_REQUEST, b""),
                commit: false,
            };
        }
        Ok(Err(err)) => return file_error(out, user, name, &err),
        Err(join) => {
            tracing::error!(%join, "upload writer panicked");
            return Outcome::done(out.single(StatusCode::INTERNAL_SERVER_ERROR, b""));
        }
    };
    match written {
        Ok(Ok(bytes)) => {
            tracing::info!(user = %common::log::Clipped(&user), name = %common::log::Clipped(&name), bytes, "put");
            Outcome::done(out.single(StatusCode::OK, b""))
        }
        Ok(Err(err)) => file_error(out, user, name, &err),
        Err(join) => {
            tracing::error!(%join, "upload commit panicked");
            Outcome::done(out.single(StatusCode::INTERNAL_SERVER_ERROR, b""))
        }
    }
}

fn exec_error(out: &Responder, user: &str, line: &str, err: &ExecError) -> Outcome {
    tracing::info!(user = %common::log::Clipped(&user), command = %common::log::Clipped(&line), err = %common::log::Clipped(err), "command refused");
    let status = match err {
        ExecError::OutputTooLarge(_) => StatusCode::INSUFFICIENT_STORAGE,
        ExecError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    Outcome::done(out.single(status, format!("{err}\n").as_bytes()))
}

/// The input and the argv of `/cmd` and `/icm`, or the answer refusing them.
async fn command_input(
    id: &str,
    user: &str,
    line: &str,
    body: RequestBody,
    out: &Responder,
    max_body: usize,
) -> Result<(Vec<u8>, Vec<String>), Outcome> {
    let input = body
        .collect(max_body, unix_now)
        .await
        .map_err(|err| body_error(id, &err))?;
    let argv = exec::split(line).map_err(|err| exec_error(out, user, line, &err))?;
    Ok((input, argv))
}

async fn cmd(
    state: &State,
    user: &str,
    line: &str,
    stdin: Vec<u8>,
    argv: &[String],
    out: &Responder,
) -> Outcome {
    let limits = CmdLimits {
        timeout: state.config.command_timeout,
        max_output: usize::try_from(state.config.max_output).unwrap_or(usize::MAX),
    };
    let started = Instant::now();
    let _running = state.metrics.running(metrics::Kind::cmd);
    match exec::run(argv, stdin, state.roots.workdir(), limits).await {
        Ok((output, exit)) => {
            tracing::info!(
                user = %common::log::Clipped(&user), command = %common::log::Clipped(&line), exit = exit.code, timed_out = exit.timed_out,
                millis = started.elapsed().as_millis() as u64, "cmd"
            );
            let mut response = out.single(StatusCode::OK, &output);
            response
                .headers_mut()
                .insert(EXIT_STATUS_HEADER, HeaderValue::from(exit.code));
            if exit.timed_out {
                response
                    .headers_mut()
                    .insert("x-remo-timed-out", HeaderValue::from_static("1"));
            }
            Outcome::done(response)
        }
        Err(err) => exec_error(out, user, line, &err),
    }
}

async fn icm(
    state: &State,
    id: &str,
    user: &str,
    line: &str,
    input: &[u8],
    argv: &[String],
    out: &Responder,
) -> Outcome {
    // A new interactive command replaces (and terminates) the previous one.
    drop(state.sessions.take_interactive(id));
    let workdir = state.roots.workdir();
    let mut process = match Interactive::start(argv, input, workdir, state.config.kill_grace).await
    {
        Ok(process) => process,
        Err(err) => return exec_error(out, user, line, &err),
    };
    process.count_as(state.metrics.running(metrics::Kind::interactive));
    tracing::info!(user = %common::log::Clipped(&user), command = %common::log::Clipped(&line), pid = process.pid(), "interactive command started");
    answer_output(state, id, process, out)
        .await
        .unwrap_or_else(|err| exec_error(out, user, line, &ExecError::Io(err)))
}

/// What the interactive command says within the wait, as the answer; it stays attached to
/// session `id` until it ends its output.
async fn answer_output(
    state: &State,
    id: &str,
    mut process: Interactive,
    out: &Responder,
) -> std::io::Result<Outcome> {
    let read = process.read_after(state.config.interactive_wait).await?;
    if !read.eof {
        state.sessions.attach(id, process);
    }
    Ok(Outcome::done(out.single(StatusCode::OK, &read.data)))
}

async fn idt(
    state: &State,
    id: &str,
    body: RequestBody,
    out: &Responder,
    max_body: usize,
) -> Outcome {
    let input = match body.collect(max_body, unix_now).await {
        Ok(input) => input,
        Err(err) => return body_error(id, &err),
    };
    let Some(mut process) = state.sessions.take_interactive(id) else {
        return Outcome::done(out.single(StatusCode::BAD_REQUEST, b""));
    };
    if let Err(err) = process.write(&input).await {
        // It closed its input: report what it still says; it is detached at EOF below.
        tracing::debug!(%err, "interactive command closed its input");
    }
    answer_output(state, id, process, out)
        .await
        .unwrap_or_else(|err| {
            Outcome::done(out.single(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("interactive command: {err}\n").as_bytes(),
            ))
        })
}

async fn edt(
    state: &State,
    id: &str,
    body: RequestBody,
    out: &Responder,
    max_body: usize,
) -> Outcome {
    if let Err(err) = body.collect(max_body, unix_now).await {
        return body_error(id, &err);
    }
    let Some(process) = state.sessions.take_interactive(id) else {
        return Outcome::done(out.single(StatusCode::BAD_REQUEST, b""));
    };
    let mut rest = match process.finish().await {
        Ok(rest) => rest,
        Err(err) => {
            return Outcome::done(out.single(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("interactive command: {err}\n").as_bytes(),
            ));
        }
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let cipher = Arc::clone(&out.cipher);
    let req_no = out.req_no;
    tokio::spawn(async move {
        let mut tok: i16 = 0;
        loop {
            let piece = match rest.next().await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            let magic = Magic {
                first: tok == 0,
                last: false,
            };
            let line = Responder::line(&cipher, &proto::response_plain(magic, req_no, tok, &piece));
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
            tok = tok.wrapping_add(1);
        }
        let magic = Magic {
            first: tok == 0,
            last: true,
        };
        let line = Responder::line(&cipher, &proto::response_plain(magic, req_no, tok, b""));
        let _ = tx.send(Ok(line)).await;
    });
    Outcome::done(out.stream(StatusCode::OK, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_pieces_keep_token_numbers_in_int16() {
        assert_eq!(get_piece_size(0), 16_384);
        assert_eq!(get_piece_size(512 << 20), 32_768);
        assert_eq!(get_piece_size(100 << 20), 16_384);
        for size in [1u64 << 30, 10 << 30, (1 << 40) + 7] {
            let piece = get_piece_size(size) as u64;
            assert!(size.div_ceil(piece) < MAX_TOKENS, "{size}");
            assert_eq!(piece % 16_384, 0);
        }
    }
}
