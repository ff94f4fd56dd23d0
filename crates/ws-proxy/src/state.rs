//! The state every connection shares: the configuration, the meet-up table, the counters, the
//! byte budget, the list of live connections and the per-identity limits, and the `/status`
//! document drawn from them.
//!
//! It knows no sockets: `crate::server` admits connections into it and `crate::relay` runs
//! them against it; neither is imported here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::admission::AddressKey;
use common::daemon::Shutdown;
use common::tls::{LivePeer, PeerIdentity};
use serde::Serialize;

use crate::budget::Budget;
use crate::config::{Config, MAX_PEER_FIELD_BYTES};
use crate::metrics::Metrics;
use crate::queue::Handle;
use crate::registry::{ConnId, Registry};

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

impl Shared {
    pub(crate) fn new(config: Config, shutdown: Shutdown) -> Self {
        Self {
            registry: Registry::new(config.on_partner_leave),
            budget: Budget::new(config.limits.max_buffered_bytes),
            config,
            metrics: Metrics::default(),
            shutdown,
            trust: tokio::sync::watch::Sender::new(0),
            connections: Mutex::new(HashMap::new()),
            identities: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Counts a connection against its identity's `max_connections_per_identity`; `None` when
    /// the identity has that many already.
    pub(crate) fn identity_slot(
        self: &Arc<Self>,
        identity: Option<&PeerIdentity>,
        addr: SocketAddr,
    ) -> Option<IdentitySlot> {
        let key = identity.map_or_else(
            || IdentityKey::Address(AddressKey::of(addr.ip())),
            |identity| IdentityKey::Certificate(identity.sha256.clone()),
        );
        let mut identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        let limits = &self.config.limits;
        let (count, budget) = identities.entry(key.clone()).or_insert_with(|| {
            (
                0,
                Budget::share(&self.budget, limits.max_buffered_bytes_per_identity),
            )
        });
        if *count >= limits.max_connections_per_identity {
            return None;
        }
        *count += 1;
        Some(IdentitySlot {
            shared: self.clone(),
            key,
            budget: budget.clone(),
        })
    }

    /// Numbers an upgraded connection and puts it on the status list until the returned guard
    /// is dropped.
    pub(crate) fn list(
        &self,
        addr: SocketAddr,
        live: Option<LivePeer>,
        identity: Option<&PeerIdentity>,
        id: &str,
    ) -> (Arc<ConnInfo>, Listed<'_>) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ConnInfo {
            conn,
            addr,
            live,
            identity: identity.map(kept_identity),
            id: id.to_owned(),
            since: SystemTime::now(),
            state: AtomicU8::new(PeerState::AwaitingHello as u8),
            hello: Mutex::new((None, None)),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
        });
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, info.clone());
        (info, Listed { shared: self, conn })
    }

    /// Sets the gauges (connections, meet-ups, buffered bytes) to their values now.
    pub(crate) fn update_gauges(&self) {
        let occupancy = self.registry.occupancy();
        let live = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let gauge = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        self.metrics.connections.set(gauge(live));
        self.metrics.waiting.set(gauge(occupancy.waiting));
        self.metrics.paired.set(gauge(occupancy.paired));
        self.metrics.buffered.set(gauge(self.budget.used()));
    }

    /// The `/status` page of at most `limit` meet-up ids (and connections awaiting a HELLO)
    /// from the `offset`th id; `limit` is capped at [`MAX_STATUS_PAGE`].
    pub(crate) fn status_page(&self, offset: usize, limit: usize) -> Status {
        let limit = limit.min(MAX_STATUS_PAGE);
        let infos = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connections = infos.len();
        let (slots, meetups_total) = self.registry.page(offset, limit);
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
        let m = &self.metrics;
        Status {
            connections,
            meetups_total,
            offset,
            next_offset: (next < meetups_total).then_some(next),
            meetups,
            awaiting_hello_total,
            awaiting_hello,
            buffered_bytes: self.budget.used(),
            max_buffered_bytes: self.budget.limit(),
            counters: Counters {
                accepted: m.shared.accepted(),
                upgraded: m.upgraded.get(),
                hellos: m.hellos.get(),
                pairs: m.pairs.get(),
                messages_relayed: m.messages.get(),
                bytes_relayed: m.bytes.get(),
            },
        }
    }
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
pub(crate) struct IdentitySlot {
    shared: Arc<Shared>,
    key: IdentityKey,
    /// The identity's share of the budget.
    pub(crate) budget: Arc<Budget>,
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
    /// Re-checks the peer's certificate against the CRLs loaded now; `None` for a peer
    /// whose certificate the front verified (the front checks CRLs at its handshake).
    live: Option<LivePeer>,
    id: String,
    since: SystemTime,
    state: AtomicU8,
    hello: Mutex<(Option<String>, Option<String>)>,
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
}

impl ConnInfo {
    /// Whether the peer may still act: its certificate is not revoked by the CRLs loaded now
    /// (a peer from the front always may: see `live`).
    pub(crate) fn check(&self) -> Result<(), common::tls::TlsError> {
        self.live.as_ref().map_or(Ok(()), LivePeer::check)
    }

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

/// Removes a connection from the status list when its task ends, however it ends.
pub(crate) struct Listed<'a> {
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
