//! The accept loop: TCP, the TLS handshake with a required client certificate, the HTTP upgrade
//! (refused with 404, 400, 403 or 409 before it happens), then the relay.
//!
//! [`Server`] is the handle tests and `main` hold: it serves a listener until shutdown, reloads
//! the TLS material, and reports status and metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::admission::{AcceptError, AddressKey, Admission, Stranger};
use common::daemon::{AcceptBackoff, Shutdown};
use common::tls::{LivePeer, PeerIdentity, ServerTls, TlsError};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tracing::Instrument as _;

use crate::budget::{Budget, Metered, ReadMeter};
use crate::config::{Config, MAX_PEER_FIELD_BYTES};
use crate::metrics::{Metrics, Refusal};
use crate::registry::{ConnId, Registry};
use crate::relay::{self, Handle};
use crate::upgrade::{self, Head, Rewind};

/// State shared by every connection.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Registry<Handle>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: Shutdown,
    /// Bumped by every successful TLS reload: live connections re-check their peer.
    pub(crate) trust: tokio::sync::watch::Sender<u64>,
    /// Every byte held for peers beyond their fixed cost (`max_buffered_bytes`).
    pub(crate) budget: Arc<Budget>,
    connections: Mutex<HashMap<ConnId, Arc<ConnInfo>>>,
    /// Live connections per identity (`max_connections_per_identity`) and the identity's
    /// share of the budget (`max_buffered_bytes_per_identity`).
    identities: Mutex<HashMap<IdentityKey, (usize, Arc<Budget>)>>,
    next_conn: AtomicU64,
}

/// Who a connection counts against for `max_connections_per_identity`: its certificate, or
/// without one its source address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdentityKey {
    Certificate(String),
    Address(AddressKey),
}

/// A connection counted against its identity's limit until dropped, with the identity's share
/// of the budget.
struct IdentitySlot {
    shared: Arc<Shared>,
    key: IdentityKey,
    budget: Arc<Budget>,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut identities = self
            .shared
            .identities
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((count, _)) = identities.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                identities.remove(&self.key);
            }
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut (a
/// client-chosen field kept for the status page).
fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The identity as kept for the status page: subject fields cut to [`MAX_PEER_FIELD_BYTES`],
/// at most [`MAX_KEPT_SANS`] subjectAltNames.
fn kept_identity(identity: &PeerIdentity) -> PeerIdentity {
    let cut = |field: &Option<String>| {
        field
            .as_deref()
            .map(|text| truncated(text, MAX_PEER_FIELD_BYTES))
    };
    PeerIdentity {
        cn: cut(&identity.cn),
        o: cut(&identity.o),
        ou: cut(&identity.ou),
        sans: identity
            .sans
            .iter()
            .take(MAX_KEPT_SANS)
            .map(|san| truncated(san, MAX_PEER_FIELD_BYTES))
            .collect(),
        sha256: identity.sha256.clone(),
    }
}

/// subjectAltNames kept per connection for the status page.
const MAX_KEPT_SANS: usize = 8;
/// Meet-up ids on a `/status` page when the request does not say.
pub const DEFAULT_STATUS_PAGE: usize = 100;
/// Most meet-up ids (and connections awaiting a HELLO) on one `/status` page.
pub const MAX_STATUS_PAGE: usize = 1000;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Upgraded, no HELLO yet.
    AwaitingHello,
    /// HELLO sent, no partner yet.
    Waiting,
    /// Relaying to a partner.
    Paired,
}

/// What the status page shows about one connection; counters are updated in place.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub(crate) conn: ConnId,
    addr: SocketAddr,
    identity: Option<PeerIdentity>,
    /// Re-checks the peer's certificate against the CRLs loaded now.
    pub(crate) live: LivePeer,
    id: String,
    since: SystemTime,
    state: AtomicU8,
    hello: Mutex<(Option<String>, Option<String>)>,
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
}

impl ConnInfo {
    pub(crate) fn set_state(&self, state: PeerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    fn state(&self) -> PeerState {
        match self.state.load(Ordering::Relaxed) {
            s if s == PeerState::Waiting as u8 => PeerState::Waiting,
            s if s == PeerState::Paired as u8 => PeerState::Paired,
            _ => PeerState::AwaitingHello,
        }
    }

    /// Keeps `peerClass` and `peerId` for the status page, each cut to
    /// [`MAX_PEER_FIELD_BYTES`].
    pub(crate) fn set_hello(&self, peer_class: Option<String>, peer_id: Option<String>) {
        let cut = |field: Option<String>| field.map(|text| truncated(&text, MAX_PEER_FIELD_BYTES));
        *self.hello.lock().unwrap_or_else(|p| p.into_inner()) = (cut(peer_class), cut(peer_id));
    }

    fn view(&self) -> PeerStatus {
        let (peer_class, peer_id) = self.hello.lock().unwrap_or_else(|p| p.into_inner()).clone();
        PeerStatus {
            conn: self.conn,
            id: self.id.clone(),
            address: self.addr.to_string(),
            identity: self.identity.clone(),
            peer_class,
            peer_id,
            state: self.state(),
            connected_at: self
                .since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
        }
    }
}

/// One connection on the status page.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Connection number, unique in this process.
    pub conn: ConnId,
    /// Meet-up id from the URL.
    pub id: String,
    /// Remote address.
    pub address: String,
    /// Verified client certificate identity.
    pub identity: Option<PeerIdentity>,
    /// `peerClass` from the HELLO, cut to 128 bytes.
    pub peer_class: Option<String>,
    /// `peerId` from the HELLO, cut to 128 bytes.
    pub peer_id: Option<String>,
    /// Life-cycle state.
    pub state: PeerState,
    /// Unix time of the upgrade.
    pub connected_at: u64,
    /// Messages received from this peer (HELLO included).
    pub messages_in: u64,
    /// Payload bytes received from this peer.
    pub bytes_in: u64,
    /// Messages written to this peer.
    pub messages_out: u64,
}

/// One meet-up id on the status page.
#[derive(Debug, Clone, Serialize)]
pub struct MeetupStatus {
    /// The id.
    pub id: String,
    /// `waiting` or `paired`.
    pub state: &'static str,
    /// Its peers, the first to say HELLO first.
    pub peers: Vec<PeerStatus>,
}

/// Process-wide counters on the status page.
#[derive(Debug, Clone, Serialize)]
pub struct Counters {
    /// TCP connections accepted.
    pub accepted: u64,
    /// Connections upgraded to websocket.
    pub upgraded: u64,
    /// Valid HELLOs.
    pub hellos: u64,
    /// Pairs formed.
    pub pairs: u64,
    /// Messages relayed.
    pub messages_relayed: u64,
    /// Payload bytes relayed.
    pub bytes_relayed: u64,
}

/// The `/status` document: one page of meet-up ids.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Live websocket connections.
    pub connections: usize,
    /// Meet-up ids in the table.
    pub meetups_total: usize,
    /// Index of the first id on this page.
    pub offset: usize,
    /// `offset` of the next page, or null on the last.
    pub next_offset: Option<usize>,
    /// This page's meet-up ids with their peers, sorted by id.
    pub meetups: Vec<MeetupStatus>,
    /// Connections that have not sent their HELLO yet.
    pub awaiting_hello_total: usize,
    /// The oldest of them, at most a page.
    pub awaiting_hello: Vec<PeerStatus>,
    /// Bytes held for peers now (HELLOs, queues, messages being read).
    pub buffered_bytes: usize,
    /// Their limit, `max_buffered_bytes`.
    pub max_buffered_bytes: usize,
    /// Counters since start-up.
    pub counters: Counters,
}

/// What a connection that passed the handshake and the upgrade holds.
struct Admitted {
    ws: relay::Ws,
    identity: Option<PeerIdentity>,
    live: LivePeer,
    id: String,
    /// The identity as logged.
    who: String,
    meter: Arc<ReadMeter>,
    _slot: common::admission::Slot,
    /// Counts against the identity's limits while the connection lives.
    identity_slot: IdentitySlot,
}

/// Removes a connection from the status list when its task ends, however it ends.
struct Listed<'a> {
    shared: &'a Shared,
    conn: ConnId,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.conn);
    }
}

/// The proxy: configuration, TLS material, the meet-up table and the counters.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    tls: Arc<ServerTls>,
    admission: Admission,
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
        let limits = config.limits.admission(config.max_connections);
        let admission = Admission::new("wss", limits);
        Self {
            shared: Arc::new(Shared {
                registry: Registry::new(config.on_partner_leave),
                budget: Budget::new(config.limits.max_buffered_bytes),
                config,
                metrics: Metrics::default(),
                shutdown,
                trust: tokio::sync::watch::Sender::new(0),
                connections: Mutex::new(HashMap::new()),
                identities: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
            }),
            tls,
            admission,
        }
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
    /// None today; accept errors are logged and retried with back-off.
    pub async fn serve(&self, listener: TcpListener) -> anyhow::Result<()> {
        let mut backoff = AcceptBackoff::default();
        let shutdown = self.shared.shutdown.clone();
        while let Some((tcp, addr)) = backoff.next(&shutdown, || listener.accept()).await {
            self.shared.metrics.accepted.inc();
            // Refusals are logged (rate-limited) by the admission, counted here.
            let stranger = match self.admission.stranger(addr) {
                Ok(stranger) => stranger,
                Err(refused) => {
                    self.shared.metrics.refused(Refusal::from(refused));
                    continue;
                }
            };
            let server = self.clone();
            let span = tracing::info_span!("conn", %addr);
            shutdown.spawn(
                async move { server.connection(tcp, addr, stranger).await }.instrument(span),
            );
        }
        Ok(())
    }

    /// TLS, then the HTTP upgrade: the websocket, the peer's identity, the meet-up id and the
    /// identity as logged; `None` when refused (already logged and counted).
    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        stranger: Stranger,
    ) -> Option<Admitted> {
        let shared = &self.shared;
        let limits = &shared.config.limits;
        // Small messages in both directions: latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        let acceptor = self.tls.acceptor();
        // A max_connections slot is taken once the client certificate is verified, not before.
        let (tls, identity, slot) = match stranger.accept_tls(&acceptor, tcp).await {
            Ok(accepted) => accepted,
            Err(AcceptError::Tls(err)) => {
                let reason = match err {
                    TlsError::HandshakeTimeout(_) => Refusal::tls_timeout,
                    TlsError::Evicted => Refusal::evicted,
                    _ => Refusal::tls,
                };
                shared.metrics.refused(reason);
                tracing::debug!(outcome = "refused", %err, "tls handshake failed");
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
        let live = self.tls.live_peer(tls.get_ref().1);

        // The whole upgrade, our look at the head included, has one deadline.
        let deadline = tokio::time::Instant::now() + limits.upgrade_timeout;
        let mut tls = tls;
        let head = tokio::time::timeout_at(deadline, upgrade::read_head(&mut tls)).await;
        let prefix = match head {
            Ok(Ok((prefix, Head::Upgrade))) => prefix,
            Ok(Ok((_, refused))) => {
                let (status, text) = match refused {
                    Head::Bad(status) => (status, "not an HTTP request head".to_owned()),
                    _ => (
                        426,
                        format!(
                            "this is a websocket relay: connect to wss://HOST:PORT{}ID",
                            shared.config.url_prefix
                        ),
                    ),
                };
                upgrade::refuse(&mut tls, status, &text).await;
                shared.metrics.refused(Refusal::upgrade);
                tracing::info!(peer = ?who, outcome = "refused", status, "not a websocket upgrade");
                return None;
            }
            Ok(Err(_)) | Err(_) => {
                shared.metrics.refused(Refusal::upgrade);
                tracing::info!(peer = ?who, outcome = "refused", "no upgrade request in time");
                return None;
            }
        };
        let Some(identity_slot) = self.identity_slot(identity.as_ref(), addr) else {
            let max = limits.max_connections_per_identity;
            upgrade::refuse(
                &mut tls,
                429,
                &format!(
                    "this certificate already has {max} connections (max_connections_per_identity)"
                ),
            )
            .await;
            shared.metrics.refused(Refusal::per_identity);
            tracing::info!(peer = ?who, outcome = "refused", max, "max_connections_per_identity reached");
            return None;
        };
        let meter = ReadMeter::new(identity_slot.budget.clone());
        let stream = Metered::new(Rewind::new(prefix, tls), meter.clone());

        let mut decision: Result<String, (Refusal, StatusCode, String)> =
            Err((Refusal::upgrade, StatusCode::BAD_REQUEST, String::new()));
        #[expect(clippy::result_large_err, reason = "tungstenite's callback signature")]
        let callback = |request: &Request, response: Response| {
            decision = self.admit(request.uri().path(), identity.as_ref());
            match &decision {
                Ok(_) => Ok(response),
                Err((_, status, text)) => {
                    let mut refusal = ErrorResponse::new(Some(format!("{text}\n")));
                    *refusal.status_mut() = *status;
                    Err(refusal)
                }
            }
        };
        let upgrading = tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            callback,
            Some(limits.websocket()),
        );
        let ws = match tokio::time::timeout_at(deadline, upgrading).await {
            Ok(Ok(ws)) => ws,
            outcome => {
                let (reason, text) = match (&decision, outcome) {
                    (Err((reason, _, text)), _) if *reason != Refusal::upgrade => {
                        (*reason, text.clone())
                    }
                    (_, Err(_)) => (Refusal::upgrade, "upgrade request timed out".to_owned()),
                    (_, Ok(Err(err))) => (Refusal::upgrade, format!("bad upgrade request: {err}")),
                    (_, Ok(Ok(_))) => (Refusal::upgrade, String::new()),
                };
                shared.metrics.refused(reason);
                tracing::info!(peer = ?who, outcome = "refused", reason = ?reason, detail = ?text, "upgrade refused");
                return None;
            }
        };
        let Ok(id) = decision else {
            return None;
        };
        Some(Admitted {
            ws,
            identity,
            live,
            id,
            who,
            meter,
            _slot: slot,
            identity_slot,
        })
    }

    /// Counts a connection against its identity's `max_connections_per_identity`; `None` when
    /// the identity has that many already.
    fn identity_slot(
        &self,
        identity: Option<&PeerIdentity>,
        addr: SocketAddr,
    ) -> Option<IdentitySlot> {
        let key = identity.map_or_else(
            || IdentityKey::Address(AddressKey::of(addr.ip())),
            |identity| IdentityKey::Certificate(identity.sha256.clone()),
        );
        let mut identities = self
            .shared
            .identities
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let limits = &self.shared.config.limits;
        let (count, budget) = identities.entry(key.clone()).or_insert_with(|| {
            (
                0,
                Budget::share(&self.shared.budget, limits.max_buffered_bytes_per_identity),
            )
        });
        if *count >= limits.max_connections_per_identity {
            return None;
        }
        *count += 1;
        Some(IdentitySlot {
            shared: self.shared.clone(),
            key,
            budget: budget.clone(),
        })
    }

    async fn connection(&self, tcp: TcpStream, addr: SocketAddr, stranger: Stranger) {
        // The handshake's state (TLS, HTTP parsing) is boxed and freed once it is done, so the
        // long-lived task keeps only what the relay needs.
        let Some(admitted) = Box::pin(self.handshake(tcp, addr, stranger)).await else {
            return;
        };
        let Admitted {
            ws,
            identity,
            live,
            id,
            who,
            meter,
            _slot,
            identity_slot,
        } = admitted;
        let shared = &self.shared;
        shared.metrics.upgraded.inc();
        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ConnInfo {
            conn,
            addr,
            live,
            identity: identity.as_ref().map(kept_identity),
            id: id.clone(),
            since: SystemTime::now(),
            state: AtomicU8::new(PeerState::AwaitingHello as u8),
            hello: Mutex::new((None, None)),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
        });
        shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, info.clone());
        let _listed = Listed { shared, conn };
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

    /// Rebuilds the TLS configuration from disk for new connections; live connections
    /// re-check their peer against the new CRLs (a revoked one is closed with 1008).
    ///
    /// # Errors
    /// The new material does not load; the old stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.tls.reload()?;
        self.shared.metrics.reloads.inc();
        self.shared.trust.send_modify(|generation| *generation += 1);
        Ok(())
    }

    /// The TLS material in use.
    pub fn tls(&self) -> &Arc<ServerTls> {
        &self.tls
    }

    /// Counters and gauges.
    pub fn metrics(&self) -> &Metrics {
        let shared = &self.shared;
        let occupancy = shared.registry.occupancy();
        let live = shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        shared
            .metrics
            .connections
            .set(i64::try_from(live).unwrap_or(i64::MAX));
        shared
            .metrics
            .waiting
            .set(i64::try_from(occupancy.waiting).unwrap_or(i64::MAX));
        shared
            .metrics
            .paired
            .set(i64::try_from(occupancy.paired).unwrap_or(i64::MAX));
        shared
            .metrics
            .buffered
            .set(i64::try_from(shared.budget.used()).unwrap_or(i64::MAX));
        &shared.metrics
    }

    /// The first page of the `/status` document.
    pub fn status(&self) -> Status {
        self.status_page(0, DEFAULT_STATUS_PAGE)
    }

    /// The `/status` page of at most `limit` meet-up ids (and connections awaiting a HELLO)
    /// from the `offset`th id; `limit` is capped at [`MAX_STATUS_PAGE`].
    pub fn status_page(&self, offset: usize, limit: usize) -> Status {
        let shared = &self.shared;
        let limit = limit.min(MAX_STATUS_PAGE);
        let infos = shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connections = infos.len();
        let (slots, meetups_total) = shared.registry.page(offset, limit);
        let meetups = slots
            .into_iter()
            .map(|slot| MeetupStatus {
                state: if slot.conns.len() == 2 {
                    "paired"
                } else {
                    "waiting"
                },
                peers: slot
                    .conns
                    .iter()
                    .filter_map(|conn| infos.get(conn))
                    .map(|info| info.view())
                    .collect(),
                id: slot.id,
            })
            .collect();
        let mut awaiting: Vec<&Arc<ConnInfo>> = infos
            .values()
            .filter(|info| info.state() == PeerState::AwaitingHello)
            .collect();
        let awaiting_hello_total = awaiting.len();
        awaiting.sort_unstable_by_key(|info| info.conn);
        let awaiting_hello = awaiting
            .into_iter()
            .take(limit)
            .map(|info| info.view())
            .collect();
        let next = offset.saturating_add(limit);
        let m = &shared.metrics;
        Status {
            connections,
            meetups_total,
            offset,
            next_offset: (next < meetups_total).then_some(next),
            meetups,
            awaiting_hello_total,
            awaiting_hello,
            buffered_bytes: shared.budget.used(),
            max_buffered_bytes: shared.budget.limit(),
            counters: Counters {
                accepted: m.accepted.get(),
                upgraded: m.upgraded.get(),
                hellos: m.hellos.get(),
                pairs: m.pairs.get(),
                messages_relayed: m.messages.get(),
                bytes_relayed: m.bytes.get(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn client_fields_are_cut_on_a_character_boundary() {
        let check = |text: &str, max: usize, expected: &str| {
            let cut = truncated(text, max);
            assert_eq!(cut, expected, "{text:?} to {max}");
            assert!(cut.len() <= max);
        };
        check("gw-17", 128, "gw-17");
        check(&"x".repeat(128), 128, &"x".repeat(128));
        check(&"x".repeat(129), 128, &format!("{}…", "x".repeat(125)));
        // 'é' is two bytes: the cut never splits it.
        check(&"é".repeat(100), 10, "ééé…");
        check("abcdef", 3, "…");
    }
}
