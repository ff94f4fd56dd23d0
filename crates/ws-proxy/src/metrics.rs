//! Counters and gauges, exported in the OpenMetrics text format on `/metrics` (of the status
//! listener and of the metrics listener, `metrics_listen`), through `common::metrics`.
//!
//! Message and byte counters are updated by the connection tasks; gauges are read from the
//! meet-up table and the connection list when scraped, so they can never drift.

use common::metrics::{Families, Reason, Registry};
use common::tls::TlsError;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Why a connection was refused before or during the upgrade.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(non_camel_case_types)]
pub enum Refusal {
    /// TLS handshake failed (no, untrusted, revoked or expired certificate; not TLS).
    tls,
    /// TLS handshake not finished in time.
    tls_timeout,
    /// Still in the TLS handshake, the oldest stranger (1 s or more) when the stranger pool
    /// was full: closed to make room for a newcomer.
    evicted,
    /// Path outside the prefix.
    not_found,
    /// Empty or too long meet-up id.
    bad_id,
    /// Authorization rules refused the identity for the id.
    forbidden,
    /// The id already has two peers.
    full,
    /// Too many live connections (refused once authenticated).
    max_connections,
    /// Too many connections still in the TLS handshake.
    max_handshakes,
    /// Too many connections in the TLS handshake from one source address.
    max_handshakes_per_address,
    /// The HTTP upgrade was invalid or too slow.
    upgrade,
    /// The server is shutting down.
    shutting_down,
    /// The certificate (or, without one, the address) has `max_connections_per_identity`.
    per_identity,
    /// A connection to the front listener from an address not in `[front] peers` (a user
    /// not in `[front] peer_users`).
    not_front,
    /// A certificate forwarded by the front that `[front] crls` revoke.
    revoked,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(non_camel_case_types)]
pub enum Ending {
    /// The peer closed or dropped the connection.
    peer_closed,
    /// The HELLO was invalid.
    invalid_hello,
    /// No HELLO in time.
    hello_timeout,
    /// The id filled up between upgrade and HELLO.
    full,
    /// Too much queued while waiting.
    queue_overflow,
    /// The partner left (close mode).
    partner_left,
    /// No pong in time.
    ping_timeout,
    /// A message over the size limit.
    too_big,
    /// A websocket protocol violation.
    protocol_error,
    /// Writing to the peer failed or timed out.
    write_failed,
    /// Server shutdown.
    shutdown,
    /// The peer's certificate was revoked by a CRL loaded since the handshake.
    revoked,
    /// The connection reached `max_connection_age_secs`.
    max_age,
    /// `max_buffered_bytes` could not take what the peer sent (close 1013).
    over_budget,
    /// The waiting peer had no room for this peer's HELLO (close 1013).
    busy,
}

impl From<common::admission::Refused> for Refusal {
    fn from(refused: common::admission::Refused) -> Self {
        match refused {
            common::admission::Refused::Handshakes => Self::max_handshakes,
            common::admission::Refused::Address => Self::max_handshakes_per_address,
            common::admission::Refused::Connections => Self::max_connections,
        }
    }
}

impl Refusal {
    /// The `reason` of `ws_proxy_refusals_total` (the shared vocabulary of
    /// `common::metrics::Reason` where it has a word for it); `None` for a failed TLS
    /// handshake, which `ws_proxy_tls_handshake_failures_total` counts instead.
    fn shared(self) -> Option<Reason> {
        Some(match self {
            Self::tls | Self::tls_timeout => return None,
            Self::forbidden => Reason::AUTHORIZATION,
            Self::max_connections => Reason::MAX_CONNECTIONS,
            Self::max_handshakes => Reason::MAX_HANDSHAKES,
            Self::max_handshakes_per_address => Reason::MAX_HANDSHAKES_PER_ADDRESS,
            Self::shutting_down => Reason::SHUTTING_DOWN,
            Self::upgrade | Self::bad_id => Reason::BAD_REQUEST,
            Self::evicted => Reason::new("evicted"),
            Self::not_found => Reason::new("not_found"),
            Self::full => Reason::new("meetup_full"),
            Self::per_identity => Reason::new("max_connections_per_identity"),
            Self::not_front => Reason::new("not_front"),
            Self::revoked => Reason::new("revoked"),
        })
    }
}

/// The route of `ws_proxy_requests_total` and `ws_proxy_request_duration_seconds`: the HTTP
/// upgrade request, answered 101 or refused with its status.
pub const UPGRADE_ROUTE: &str = "upgrade";
/// The route of the front's health check on the front listener (`GET /healthz`).
pub const HEALTH_ROUTE: &str = "health";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: Refusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndingLabel {
    reason: Ending,
}

/// Every metric the proxy exports: the families every daemon shares ([`Families`]) and the
/// proxy's own, in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The shared families: connections open and accepted, TLS handshake failures, refusals,
    /// upgrade requests and their latency.
    pub shared: Families,
    /// Connections upgraded to websocket.
    pub upgraded: Counter,
    /// Valid HELLOs.
    pub hellos: Counter,
    /// Pairs formed.
    pub pairs: Counter,
    /// Messages forwarded to a partner (HELLOs not included).
    pub messages: Counter,
    /// Payload bytes forwarded to a partner.
    pub bytes: Counter,
    refused: Family<RefusalLabel, Counter>,
    ended: Family<EndingLabel, Counter>,
    /// Live connections (set when scraped).
    pub connections: Gauge,
    /// Ids with a waiting peer (set when scraped).
    pub waiting: Gauge,
    /// Ids with a pair (set when scraped).
    pub paired: Gauge,
    /// Successful certificate reloads.
    pub reloads: Counter,
    /// Bytes charged to `max_buffered_bytes` (set when scraped).
    pub buffered: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::new("ws_proxy");
        let shared = Families::new(&mut r);
        Self {
            upgraded: r.register(
                "connections_upgraded",
                "connections upgraded to websocket",
                Counter::default(),
            ),
            hellos: r.register("hellos", "valid HELLO messages", Counter::default()),
            pairs: r.register("pairs", "pairs formed", Counter::default()),
            messages: r.register(
                "messages_relayed",
                "messages forwarded to a partner",
                Counter::default(),
            ),
            bytes: r.register(
                "bytes_relayed",
                "payload bytes forwarded to a partner",
                Counter::default(),
            ),
            reloads: r.register(
                "reloads",
                "successful certificate reloads",
                Counter::default(),
            ),
            refused: r.register(
                "connections_refused",
                "connections refused, by reason",
                Family::default(),
            ),
            ended: r.register(
                "connections_ended",
                "websocket connections ended, by reason",
                Family::default(),
            ),
            connections: r.register("connections", "live connections", Gauge::default()),
            waiting: r.register(
                "meetups_waiting",
                "meet-up ids with one waiting peer",
                Gauge::default(),
            ),
            paired: r.register(
                "meetups_paired",
                "meet-up ids with a pair",
                Gauge::default(),
            ),
            buffered: r.register(
                "buffered_bytes",
                "bytes held for peers (HELLOs, queues, messages being read)",
                Gauge::default(),
            ),
            shared,
            registry: r,
        }
    }
}

impl Metrics {
    /// Counts a refusal (in `ws_proxy_connections_refused` and, but for a failed TLS
    /// handshake, `ws_proxy_refusals_total`).
    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&RefusalLabel { reason }).inc();
        if let Some(shared) = reason.shared() {
            self.shared.refused(shared);
        }
    }

    /// Counts a failed TLS handshake (in `ws_proxy_connections_refused` as `tls`,
    /// `tls_timeout` or `evicted`, and in `ws_proxy_tls_handshake_failures_total`).
    pub fn tls_failed(&self, err: &TlsError) {
        let reason = match err {
            TlsError::HandshakeTimeout(_) => Refusal::tls_timeout,
            TlsError::Evicted => Refusal::evicted,
            _ => Refusal::tls,
        };
        self.refused.get_or_create(&RefusalLabel { reason }).inc();
        self.shared.tls_failure(err);
    }

    /// Counts a connection's end.
    pub fn ended(&self, reason: Ending) {
        self.ended.get_or_create(&EndingLabel { reason }).inc();
    }

    /// The count of refusals for one reason.
    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.refused.get_or_create(&RefusalLabel { reason }).get()
    }

    /// The count of endings for one reason.
    pub fn endings(&self, reason: Ending) -> u64 {
        self.ended.get_or_create(&EndingLabel { reason }).get()
    }

    /// The exposition of every metric (OpenMetrics text, `common::metrics::CONTENT_TYPE`);
    /// the gauges are as last set (`Server::metrics` sets them).
    pub fn encode(&self) -> String {
        self.registry.encode()
    }
}
