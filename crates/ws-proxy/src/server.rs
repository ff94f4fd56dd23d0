//! The accept loop: TCP, the TLS handshake with a required client certificate, the HTTP upgrade
//! (refused with 400, 403, 404, 409, 426, 429, 431 or 503 before it happens, every refusal
//! written by `upgrade::refuse`), then the relay.
//!
//! While it sends its upgrade request a connection holds its `max_connections` slot and its
//! identity's slot (taken right after the handshake), or, without a certificate, a stranger
//! permit again; one the rules refuse, or over its identity's cap, is refused right after the
//! handshake: no client fills `max_connections` by sending its request slowly.
//!
//! The front listener (`[front]`, [`Server::serve_front`]) takes plain TCP from the front's
//! addresses only (any other is closed before a byte is read), reads the request head, takes
//! the client's identity and address from the headers the front set (`crate::front`) and
//! from there goes the same way as a TLS connection: the same rules, refusals, limits and
//! relay. Its connections hold a `max_connections` slot from accept: the front has finished
//! the TLS handshake and read the request head before it connects, so nothing waits here
//! for a stranger.
//!
//! [`Server`] is the handle tests and `main` hold: it serves a listener until shutdown, reloads
//! the TLS material, and reports status and metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use common::admission::{AcceptError, Admission, Pool, Slot, Stranger, Warning};
use common::daemon::{AcceptBackoff, Shutdown};
use common::metrics::RequestTimer;
use common::tls::{Crls, LivePeer, PeerIdentity, ServerTls, TlsError};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tracing::Instrument as _;

use crate::budget::{Metered, ReadMeter};
use crate::config::{Config, FrontPeers};
use crate::front::{self, PeerUsers, Peers};
use crate::io::Conn;
use crate::metrics::{HEALTH_ROUTE, Metrics, Refusal, UPGRADE_ROUTE};
use crate::relay;
pub use crate::state::{
    Counters, DEFAULT_STATUS_PAGE, MAX_STATUS_PAGE, MeetupStatus, PeerState, PeerStatus, Status,
};
use crate::state::{IdentitySlot, Shared};
use crate::upgrade::{self, Head, HeadError, Rewind};

/// What a connection holds while it sends its request head.
enum Door {
    /// Its `max_connections` slot and its identity's slot: a certificate the rules admit.
    Counted(Slot, IdentitySlot),
    /// A stranger permit: no certificate.
    Stranger(Stranger),
}

/// How long a connection refused right after its handshake (403, 429) may take to send its
/// request head before the answer is written and the connection closed.
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// The 429 for an identity that has `max` connections already.
fn per_identity_refusal(max: usize) -> (Refusal, StatusCode, String) {
    (
        Refusal::per_identity,
        StatusCode::TOO_MANY_REQUESTS,
        format!("this certificate already has {max} connections (max_connections_per_identity)"),
    )
}

/// What a connection that passed the handshake and the upgrade holds.
struct Admitted {
    ws: relay::Ws,
    identity: Option<PeerIdentity>,
    live: Option<LivePeer>,
    /// The client's address: the TCP peer's, or the one the front forwarded.
    addr: SocketAddr,
    id: String,
    /// The identity as logged.
    who: String,
    meter: Arc<ReadMeter>,
    _slot: Slot,
    /// Counts against the identity's limits while the connection lives.
    identity_slot: IdentitySlot,
}

/// The proxy: configuration, TLS material, the meet-up table and the counters.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    /// `None`: front only, no WSS listener.
    tls: Option<Arc<ServerTls>>,
    admission: Admission,
    /// Connections refused right after their handshake, waiting [`REFUSAL_LINGER`] at most
    /// for their request head before the answer.
    refusing: Arc<Pool>,
    /// Rate-limits the log line for connections to the front listener from other addresses.
    not_front: Arc<Warning>,
    /// `[front] crls`: forwarded certificates are checked against them too.
    front_crls: Option<Arc<Crls>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server with a validated configuration and loaded TLS material; `shutdown` ends
    /// [`Server::serve`] and closes every connection with 1001.
    pub fn new(config: Config, tls: Arc<ServerTls>, shutdown: Shutdown) -> Self {
        Self::build(config, Some(tls), shutdown)
    }

    /// A server without TLS material, for the front listener only ([`Server::serve_front`]);
    /// `config.front` names the front's addresses.
    pub fn front_only(config: Config, shutdown: Shutdown) -> Self {
        Self::build(config, None, shutdown)
    }

    fn build(config: Config, tls: Option<Arc<ServerTls>>, shutdown: Shutdown) -> Self {
        let limits = config.limits.admission(config.max_connections);
        let admission = Admission::new("wss", limits);
        let refusing = Pool::new("wss-refusals", "tls.max_handshakes", limits.max_handshakes);
        Self {
            shared: Arc::new(Shared::new(config, shutdown)),
            tls,
            admission,
            refusing,
            not_front: Arc::new(Warning::default()),
            front_crls: None,
        }
    }

    /// The same server, checking the certificates the front forwards against `crls` too: at
    /// the upgrade, and on every reload for live connections (`[front] crls`).
    #[must_use]
    pub fn with_front_crls(mut self, crls: Arc<Crls>) -> Self {
        self.front_crls = Some(crls);
        self
    }

    /// The configuration it serves with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The front door (pools and their counters).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Accepts connections until shutdown; connection tasks are tracked by the shutdown handle,
    /// so [`Shutdown::drain`] waits for them.
    ///
    /// # Errors
    /// A server made with [`Server::front_only`] (no TLS material); accept errors are logged
    /// and retried with back-off.
    pub async fn serve(&self, listener: TcpListener) -> anyhow::Result<()> {
        let Some(tls) = self.tls.clone() else {
            anyhow::bail!("no TLS material: this instance serves the front listener only");
        };
        let mut backoff = AcceptBackoff::default();
        let shutdown = self.shared.shutdown.clone();
        while let Some((tcp, addr)) = backoff.next(&shutdown, || listener.accept()).await {
            // Counted in connections_open until the connection task ends.
            let open = self.shared.metrics.shared.connection();
            // Refusals are logged (rate-limited) by the admission, counted here.
            let stranger = match self.admission.stranger(addr) {
                Ok(stranger) => stranger,
                Err(refused) => {
                    self.shared.metrics.refused(Refusal::from(refused));
                    continue;
                }
            };
            let server = self.clone();
            let tls = tls.clone();
            let span = tracing::info_span!("conn", %addr);
            shutdown.spawn(
                async move {
                    let admitted = Box::pin(server.handshake(&tls, tcp, addr, stranger)).await;
                    server.connection(admitted).await;
                    drop(open);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    /// Accepts connections from the front (`config.front` addresses) until shutdown. One from
    /// any other address is closed before a byte is read (refusal `not_front`, logged at most
    /// once per 10 s with the count).
    ///
    /// # Errors
    /// The configuration has no front peers by address.
    pub async fn serve_front(&self, listener: TcpListener) -> anyhow::Result<()> {
        let Some(FrontPeers::Addresses(peers)) = self.shared.config.front.clone() else {
            anyhow::bail!("no [front] peers configured");
        };
        let mut backoff = AcceptBackoff::default();
        let shutdown = self.shared.shutdown.clone();
        while let Some((tcp, addr)) = backoff.next(&shutdown, || listener.accept()).await {
            let open = self.shared.metrics.shared.connection();
            let Some(slot) = self.front_door(&peers, addr) else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let server = self.clone();
            let span = tracing::info_span!("front", front = %addr, client = tracing::field::Empty);
            shutdown.spawn(
                async move {
                    let admitted = Box::pin(server.front_upgrade(Conn::Plain(tcp), slot)).await;
                    server.connection(admitted).await;
                    drop(open);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    /// Accepts connections from the front on a Unix socket (`config.front` users) until
    /// shutdown. One whose peer credentials (SO_PEERCRED) name another uid is closed before a
    /// byte is read (refusal `not_front`, logged as for [`Server::serve_front`]).
    ///
    /// # Errors
    /// The configuration has no front peers by user.
    pub async fn serve_front_unix(&self, listener: UnixListener) -> anyhow::Result<()> {
        let Some(FrontPeers::Users(users)) = self.shared.config.front.clone() else {
            anyhow::bail!("no [front] peer_users configured");
        };
        let mut backoff = AcceptBackoff::default();
        let shutdown = self.shared.shutdown.clone();
        while let Some((unix, _)) = backoff.next(&shutdown, || listener.accept()).await {
            let open = self.shared.metrics.shared.connection();
            let uid = unix.peer_cred().ok().map(|cred| cred.uid());
            let Some(slot) = self.front_user_door(&users, uid) else {
                drop(unix);
                continue;
            };
            let server = self.clone();
            let span =
                tracing::info_span!("front", front_uid = uid, client = tracing::field::Empty);
            shutdown.spawn(
                async move {
                    let admitted = Box::pin(server.front_upgrade(Conn::Unix(unix), slot)).await;
                    server.connection(admitted).await;
                    drop(open);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    /// As [`Server::front_door`], for a Unix-socket connection from `uid` (`None`: its
    /// credentials could not be read).
    fn front_user_door(&self, users: &PeerUsers, uid: Option<u32>) -> Option<Slot> {
        if !uid.is_some_and(|uid| users.contains(uid)) {
            self.not_front(format_args!("{uid:?}"));
            return None;
        }
        self.front_slot()
    }

    /// Counts and logs (rate-limited) a connection to the front listener that is not the front.
    fn not_front(&self, peer: std::fmt::Arguments<'_>) {
        self.shared.metrics.refused(Refusal::not_front);
        if let Some(refused) = self.not_front.note(Instant::now()) {
            tracing::warn!(%peer, refused, "refusing connections to the front listener from addresses or users not in [front] peers / peer_users");
        }
    }

    /// A `max_connections` slot for a connection from `addr` to the front listener; `None`
    /// (counted, logged rate-limited) for an address not in `peers` or no slot free.
    fn front_door(&self, peers: &Peers, addr: SocketAddr) -> Option<Slot> {
        if !peers.contains(addr.ip()) {
            self.not_front(format_args!("{addr}"));
            return None;
        }
        self.front_slot()
    }

    /// A `max_connections` slot for a front connection; `None` (counted) when none is free.
    fn front_slot(&self) -> Option<Slot> {
        match self.admission.authenticated() {
            Ok(slot) => Some(slot),
            Err(refused) => {
                self.shared.metrics.refused(Refusal::from(refused));
                None
            }
        }
    }

    /// A connection from the front: its request head (under `upgrade_timeout` and the head
    /// cap), the health check, or the client's forwarded identity and address, then the same
    /// decisions as for a TLS client. `None` when refused (already answered, logged, counted).
    async fn front_upgrade(&self, mut stream: Conn, slot: Slot) -> Option<Admitted> {
        let shared = &self.shared;
        let request = shared.metrics.shared.start(UPGRADE_ROUTE);
        let deadline = Instant::now() + shared.config.limits.upgrade_timeout;
        let head =
            tokio::time::timeout_at(deadline, upgrade::read_head(&mut stream, &shared.budget))
                .await;
        let (prefix, head, charge) = match head {
            Ok(Ok(read)) => read,
            Ok(Err(HeadError::Budget)) => {
                self.refuse(
                    &mut stream,
                    request,
                    "-",
                    (
                        Refusal::upgrade,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the proxy is out of buffer space; try again later".into(),
                    ),
                    false,
                )
                .await;
                return None;
            }
            Ok(Err(HeadError::Closed)) | Err(_) => {
                shared.metrics.refused(Refusal::upgrade);
                tracing::info!(outcome = "refused", "no request from the front in time");
                return None;
            }
        };
        let head_request = upgrade::is_head_request(&prefix);
        if head == Head::NotUpgrade && front::is_health_check(&prefix) {
            drop(request);
            self.health(&mut stream, head_request).await;
            return None;
        }
        if let Head::Bad(status, text) = head {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            self.refuse(
                &mut stream,
                request,
                "-",
                (Refusal::upgrade, status, text.to_owned()),
                head_request,
            )
            .await;
            return None;
        }
        let forwarded = match front::forwarded(&prefix) {
            Ok(forwarded) => forwarded,
            Err(err) => {
                self.refuse(
                    &mut stream,
                    request,
                    "-",
                    (Refusal::upgrade, StatusCode::BAD_REQUEST, err.to_string()),
                    head_request,
                )
                .await;
                return None;
            }
        };
        let addr = SocketAddr::new(forwarded.addr, 0);
        tracing::Span::current().record("client", tracing::field::display(forwarded.addr));
        let identity = forwarded.identity;
        let who = identity
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        // With [front] crls, the certificate is checked here as well as at the front, and
        // kept for the checks before each message and at every reload.
        let live = match (&self.front_crls, &forwarded.cert) {
            (Some(crls), Some(der)) => {
                let live = crls.live_peer(&rustls::pki_types::CertificateDer::from(der.as_slice()));
                if let Err(err) = live.check() {
                    tracing::info!(peer = ?who, %err, "forwarded certificate refused");
                    let refusal = (
                        Refusal::revoked,
                        StatusCode::FORBIDDEN,
                        "client certificate revoked".to_owned(),
                    );
                    self.refuse(&mut stream, request, &who, refusal, head_request)
                        .await;
                    return None;
                }
                Some(live)
            }
            _ => None,
        };
        // As right after a TLS handshake: a certificate no rule admits is refused, and the
        // identity (without a certificate: the client's address) takes its slot.
        let early = if self.shared.config.rules.admits(identity.as_ref()) {
            shared
                .identity_slot(identity.as_ref(), addr)
                .ok_or_else(|| {
                    per_identity_refusal(shared.config.limits.max_connections_per_identity)
                })
        } else {
            Err((
                Refusal::forbidden,
                StatusCode::FORBIDDEN,
                "this certificate may not join any meet-up id".to_owned(),
            ))
        };
        let identity_slot = match early {
            Ok(identity_slot) => identity_slot,
            Err(refusal) => {
                self.refuse(&mut stream, request, &who, refusal, head_request)
                    .await;
                return None;
            }
        };
        let read = (prefix, head, charge);
        self.answer(
            stream,
            read,
            identity,
            live,
            who,
            Door::Counted(slot, identity_slot),
            addr,
            deadline,
            request,
        )
        .await
    }

    /// The front's health check: 200 while the instance takes connections, 503 once it
    /// drains (by then the listener is closed too, so the next check cannot connect).
    async fn health(&self, stream: &mut Conn, head_request: bool) {
        let started = Instant::now();
        let (status, text) = if self.shared.shutdown.is_triggered() {
            (StatusCode::SERVICE_UNAVAILABLE, "draining")
        } else {
            (StatusCode::OK, "ok")
        };
        upgrade::refuse(stream, status, text, head_request).await;
        self.shared
            .metrics
            .shared
            .request(HEALTH_ROUTE, status.as_u16(), started.elapsed());
    }

    /// Writes a refusal decided once the request head is in, counts and logs it.
    async fn refuse(
        &self,
        stream: &mut Conn,
        request: RequestTimer,
        who: &str,
        (reason, status, text): (Refusal, StatusCode, String),
        head_request: bool,
    ) {
        upgrade::refuse(stream, status, &text, head_request).await;
        request.done(status.as_u16());
        self.shared.metrics.refused(reason);
        tracing::info!(peer = ?who, outcome = "refused", reason = ?reason, status = status.as_u16(), detail = ?text, "upgrade refused");
    }

    /// TLS, then the HTTP upgrade: the websocket, the peer's identity, the meet-up id and the
    /// identity as logged; `None` when refused (already logged and counted).
    async fn handshake(
        &self,
        server_tls: &Arc<ServerTls>,
        tcp: TcpStream,
        addr: SocketAddr,
        stranger: Stranger,
    ) -> Option<Admitted> {
        let shared = &self.shared;
        let limits = &shared.config.limits;
        // Small messages in both directions: latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        let acceptor = server_tls.acceptor();
        // A max_connections slot is taken once the client certificate is verified, not before.
        let (tls, identity, slot) = match stranger.accept_tls(&acceptor, tcp).await {
            Ok(accepted) => accepted,
            Err(AcceptError::Tls(err)) => {
                shared.metrics.tls_failed(&err);
                // A closed probe was logged where it was accepted.
                if !matches!(err, TlsError::Closed) {
                    tracing::debug!(outcome = "refused", %err, "tls handshake failed");
                }
                return None;
            }
            Err(AcceptError::Refused(refused)) => {
                shared.metrics.refused(Refusal::from(refused));
                return None;
            }
        };
        let who = identity
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        let live = Some(server_tls.live_peer(tls.get_ref().1));

        // Who the connection counts against while it sends its request head, decided as
        // soon as the handshake has named the client: a certificate the rules admit takes its
        // per-identity slot now, keeping its max_connections slot; one no rule admits, or
        // over its cap, is refused now (it holds neither); without a certificate the
        // connection goes back to the stranger pool (max_handshakes, per address) and gives
        // its max_connections slot back until its upgrade request is complete.
        let rules = &shared.config.rules;
        let early = if !rules.admits(identity.as_ref()) {
            Some((
                Refusal::forbidden,
                StatusCode::FORBIDDEN,
                "this certificate may not join any meet-up id".to_owned(),
            ))
        } else if identity.is_some() {
            match shared.identity_slot(identity.as_ref(), addr) {
                Some(identity_slot) => {
                    return self
                        .upgrade(
                            tls,
                            identity,
                            live,
                            who,
                            Door::Counted(slot, identity_slot),
                            addr,
                        )
                        .await;
                }
                None => Some(per_identity_refusal(limits.max_connections_per_identity)),
            }
        } else {
            None
        };
        drop(slot);
        if let Some(refusal) = early {
            self.refuse_soon(tls, &who, refusal).await;
            return None;
        }
        match self.admission.stranger(addr) {
            Ok(stranger) => {
                self.upgrade(tls, identity, live, who, Door::Stranger(stranger), addr)
                    .await
            }
            Err(refused) => {
                shared.metrics.refused(Refusal::from(refused));
                None
            }
        }
    }

    /// Answers a refusal decided right after the handshake. The connection holds no slot nor
    /// stranger permit meanwhile, only one of a small pool of its own (`tls.max_handshakes`;
    /// with none free it is closed at once): it gets [`REFUSAL_LINGER`] to send its request
    /// head, so that the answer is not lost to a reset by a request still arriving.
    async fn refuse_soon(
        &self,
        mut tls: tokio_rustls::server::TlsStream<TcpStream>,
        who: &str,
        (reason, status, text): (Refusal, StatusCode, String),
    ) {
        let shared = &self.shared;
        let started = Instant::now();
        shared.metrics.refused(reason);
        let Ok(_lane) = self.refusing.try_admit() else {
            tracing::debug!(peer = ?who, outcome = "refused", status = status.as_u16(), "refusal pool full: closed without an answer");
            return;
        };
        let head =
            tokio::time::timeout(REFUSAL_LINGER, upgrade::read_head(&mut tls, &shared.budget))
                .await;
        let head_request =
            matches!(&head, Ok(Ok((prefix, _, _))) if upgrade::is_head_request(prefix));
        drop(head);
        upgrade::refuse(&mut tls, status, &text, head_request).await;
        shared
            .metrics
            .shared
            .request(UPGRADE_ROUTE, status.as_u16(), started.elapsed());
        tracing::info!(peer = ?who, outcome = "refused", reason = ?reason, status = status.as_u16(), detail = ?text, "upgrade refused");
    }

    /// The HTTP upgrade of a connection that holds `door` while it sends its request head.
    async fn upgrade(
        &self,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        identity: Option<PeerIdentity>,
        live: Option<LivePeer>,
        who: String,
        door: Door,
        addr: SocketAddr,
    ) -> Option<Admitted> {
        let mut tls = Conn::Tls(tls);
        let shared = &self.shared;
        let limits = &shared.config.limits;
        let request = shared.metrics.shared.start(UPGRADE_ROUTE);
        // The whole upgrade, our look at the head included, has one deadline (a stranger's
        // is also its own).
        let mut deadline = tokio::time::Instant::now() + limits.upgrade_timeout;
        let (budget, evicted) = match &door {
            Door::Counted(_, identity_slot) => (identity_slot.budget.clone(), None),
            Door::Stranger(stranger) => {
                deadline = deadline.min(stranger.deadline());
                (shared.budget.clone(), Some(stranger.evicted()))
            }
        };
        let reading = tokio::time::timeout_at(deadline, upgrade::read_head(&mut tls, &budget));
        let head = match evicted {
            None => reading.await,
            Some(evicted) => tokio::select! {
                head = reading => head,
                () = evicted => {
                    shared.metrics.refused(Refusal::evicted);
                    tracing::debug!(peer = ?who, outcome = "refused", "evicted while sending its request head");
                    return None;
                }
            },
        };
        let (prefix, head, charge) = match head {
            Ok(Ok(read)) => read,
            Ok(Err(HeadError::Budget)) => {
                upgrade::refuse(
                    &mut tls,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the proxy is out of buffer space; try again later",
                    false,
                )
                .await;
                request.done(StatusCode::SERVICE_UNAVAILABLE.as_u16());
                shared.metrics.refused(Refusal::upgrade);
                tracing::info!(peer = ?who, outcome = "refused", "no buffer space for the request head");
                return None;
            }
            Ok(Err(HeadError::Closed)) | Err(_) => {
                shared.metrics.refused(Refusal::upgrade);
                tracing::info!(peer = ?who, outcome = "refused", "no upgrade request in time");
                return None;
            }
        };
        self.answer(
            tls,
            (prefix, head, charge),
            identity,
            live,
            who,
            door,
            addr,
            deadline,
            request,
        )
        .await
    }

    /// The answer to a complete request head, for a TLS client or one from the front: a
    /// refusal, or the websocket.
    #[expect(
        clippy::too_many_arguments,
        reason = "one connection's state, passed on once"
    )]
    async fn answer(
        &self,
        mut stream: Conn,
        (prefix, head, charge): (bytes::Bytes, Head, crate::budget::Charge),
        identity: Option<PeerIdentity>,
        live: Option<LivePeer>,
        who: String,
        door: Door,
        addr: SocketAddr,
        deadline: Instant,
        request: RequestTimer,
    ) -> Option<Admitted> {
        let shared = &self.shared;
        let limits = &shared.config.limits;
        let head_request = upgrade::is_head_request(&prefix);
        let admitted = match head {
            Head::Upgrade(path) => {
                self.promote(door, identity.as_ref(), addr)
                    .and_then(|(slot, identity_slot)| {
                        // Decided here, not in tungstenite's callback, so the refusal is ours.
                        let id = self.admit(&path, identity.as_ref())?;
                        Ok((id, slot, identity_slot))
                    })
            }
            Head::Bad(status, text) => Err((
                Refusal::upgrade,
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                text.to_owned(),
            )),
            Head::NotUpgrade => Err((
                Refusal::upgrade,
                StatusCode::UPGRADE_REQUIRED,
                format!(
                    "this is a websocket relay: connect to wss://HOST:PORT{}ID",
                    shared.config.url_prefix
                ),
            )),
        };
        let (id, slot, identity_slot) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                self.refuse(&mut stream, request, &who, refusal, head_request)
                    .await;
                return None;
            }
        };
        let meter = ReadMeter::new(identity_slot.budget.clone());
        let stream = Metered::new(Rewind::new(prefix, stream), meter.clone());
        let upgrading =
            tokio_tungstenite::accept_async_with_config(stream, Some(limits.websocket()));
        let upgraded = tokio::time::timeout_at(deadline, upgrading).await;
        // Tungstenite has read the head (and freed it) by now.
        drop(charge);
        let ws = match upgraded {
            Ok(Ok(ws)) => {
                request.done(StatusCode::SWITCHING_PROTOCOLS.as_u16());
                ws
            }
            outcome => {
                let text = match outcome {
                    Err(_) => "upgrade request timed out".to_owned(),
                    Ok(Err(err)) => format!("bad upgrade request: {err}"),
                    Ok(Ok(_)) => String::new(),
                };
                shared.metrics.refused(Refusal::upgrade);
                tracing::info!(peer = ?who, outcome = "refused", reason = ?Refusal::upgrade, detail = ?text, "upgrade refused");
                return None;
            }
        };
        Some(Admitted {
            ws,
            identity,
            live,
            addr,
            id,
            who,
            meter,
            _slot: slot,
            identity_slot,
        })
    }

    /// The relay of an admitted connection. The handshake's state (TLS, HTTP parsing) was
    /// boxed and is freed by now, so the long-lived task keeps only what the relay needs.
    async fn connection(&self, admitted: Option<Admitted>) {
        let Some(admitted) = admitted else {
            return;
        };
        let Admitted {
            ws,
            identity,
            live,
            addr,
            id,
            who,
            meter,
            _slot,
            identity_slot,
        } = admitted;
        let shared = &self.shared;
        shared.metrics.upgraded.inc();
        let (info, _listed) = shared.list(addr, live, identity.as_ref(), &id);
        let conn = info.conn;
        tracing::info!(conn, peer = ?who, id = ?id, "connected");
        relay::run(
            shared.clone(),
            ws,
            info,
            id,
            meter,
            identity_slot.budget.clone(),
        )
        .await;
        drop(identity_slot);
    }

    /// The slots a connection holds once its upgrade request is complete: those it holds
    /// already, or, out of the stranger pool, its identity's (without a certificate: its
    /// address's) and one of `max_connections`.
    fn promote(
        &self,
        door: Door,
        identity: Option<&PeerIdentity>,
        addr: SocketAddr,
    ) -> Result<(Slot, IdentitySlot), (Refusal, StatusCode, String)> {
        let stranger = match door {
            Door::Counted(slot, identity_slot) => return Ok((slot, identity_slot)),
            Door::Stranger(stranger) => stranger,
        };
        let limits = &self.shared.config.limits;
        let identity_slot = self
            .shared
            .identity_slot(identity, addr)
            .ok_or_else(|| per_identity_refusal(limits.max_connections_per_identity))?;
        let slot = stranger.authenticated().map_err(|refused| {
            (
                Refusal::from(refused),
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy has all the connections it takes (max_connections); try again later"
                    .to_owned(),
            )
        })?;
        Ok((slot, identity_slot))
    }

    /// Decides on an upgrade request: the meet-up id, or why not.
    fn admit(
        &self,
        path: &str,
        identity: Option<&PeerIdentity>,
    ) -> Result<String, (Refusal, StatusCode, String)> {
        let config = &self.shared.config;
        if self.shared.shutdown.is_triggered() {
            return Err((
                Refusal::shutting_down,
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy is shutting down".into(),
            ));
        }
        let Some(id) = path.strip_prefix(config.url_prefix.as_str()) else {
            return Err((
                Refusal::not_found,
                StatusCode::NOT_FOUND,
                format!("not found: paths start with {}", config.url_prefix),
            ));
        };
        if id.is_empty() || id.len() > config.limits.max_id_bytes {
            return Err((
                Refusal::bad_id,
                StatusCode::BAD_REQUEST,
                format!(
                    "the meet-up id must be 1 to {} bytes",
                    config.limits.max_id_bytes
                ),
            ));
        }
        if !config.rules.allows(identity, id) {
            return Err((
                Refusal::forbidden,
                StatusCode::FORBIDDEN,
                "this certificate may not join this meet-up id".into(),
            ));
        }
        if !self.shared.registry.has_room(id) {
            return Err((
                Refusal::full,
                StatusCode::CONFLICT,
                "this meet-up id already has two peers".into(),
            ));
        }
        Ok(id.to_owned())
    }

    /// Rebuilds the TLS configuration from disk for new connections, and reloads `[front]
    /// crls`; live connections re-check their peer against the new CRLs (a revoked one is
    /// closed with 1008). A front-only instance without `[front] crls` has nothing to reload.
    ///
    /// # Errors
    /// The new material does not load; the old stays in use. When one of the two loads and
    /// the other does not, the one that loaded is in use (and live peers re-checked).
    pub fn reload(&self) -> Result<(), TlsError> {
        let tls = self.tls.as_ref().map(|tls| tls.reload());
        let front = self.front_crls.as_ref().map(|crls| crls.reload());
        let results = [tls, front].into_iter().flatten().collect::<Vec<_>>();
        if results.iter().any(Result::is_ok) {
            self.shared.metrics.reloads.inc();
            self.shared.trust.send_modify(|generation| *generation += 1);
        }
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    /// The TLS material in use; `None` for a front-only server.
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// Counters and gauges.
    pub fn metrics(&self) -> &Metrics {
        self.shared.update_gauges();
        &self.shared.metrics
    }

    /// The first page of the `/status` document.
    pub fn status(&self) -> Status {
        self.status_page(0, DEFAULT_STATUS_PAGE)
    }

    /// The `/status` page of at most `limit` meet-up ids (and connections awaiting a HELLO)
    /// from the `offset`th id; `limit` is capped at [`MAX_STATUS_PAGE`].
    pub fn status_page(&self, offset: usize, limit: usize) -> Status {
        self.shared.status_page(offset, limit)
    }
}
