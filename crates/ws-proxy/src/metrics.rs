//! Counters and gauges, exported in the Prometheus text format on `/metrics`.
//!
//! Message and byte counters are updated by the connection tasks; gauges are read from the
//! meet-up table and the connection list when scraped, so they can never drift.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: Refusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndingLabel {
    reason: Ending,
}

/// Every metric the proxy exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted at TCP level.
    pub accepted: Counter,
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

impl Metrics {
    /// Counts a refusal.
    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&RefusalLabel { reason }).inc();
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

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("ws_proxy");
        let counters = [
            (
                "connections_accepted",
                "TCP connections accepted",
                &self.accepted,
            ),
            (
                "connections_upgraded",
                "connections upgraded to websocket",
                &self.upgraded,
            ),
            ("hellos", "valid HELLO messages", &self.hellos),
            ("pairs", "pairs formed", &self.pairs),
            (
                "messages_relayed",
                "messages forwarded to a partner",
                &self.messages,
            ),
            (
                "bytes_relayed",
                "payload bytes forwarded to a partner",
                &self.bytes,
            ),
            ("reloads", "successful certificate reloads", &self.reloads),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "connections_refused",
            "connections refused, by reason",
            self.refused.clone(),
        );
        registry.register(
            "connections_ended",
            "websocket connections ended, by reason",
            self.ended.clone(),
        );
        registry.register("connections", "live connections", self.connections.clone());
        registry.register(
            "meetups_waiting",
            "meet-up ids with one waiting peer",
            self.waiting.clone(),
        );
        registry.register(
            "meetups_paired",
            "meet-up ids with a pair",
            self.paired.clone(),
        );
        registry.register(
            "buffered_bytes",
            "bytes held for peers (HELLOs, queues, messages being read)",
            self.buffered.clone(),
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}
