//! The signing server's metrics: the families every daemon shares (`common::metrics`), the
//! signatures it hands out by key and how long their audit commit takes.
//!
//! Routes are fixed words, not the paths clients send: `path` (the original protocol),
//! `sign`, `sign-path`, `keys`, `key`, `verify` (the JSON API) and `other` (an unknown
//! endpoint, answered 404). The key label is a configured key name.

use std::time::Duration;

use common::metrics::{Families, Reason, Registry, latency_histogram};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// The route of a request of the original protocol (a path in, signatures out).
pub const PATH_ROUTE: &str = "path";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

/// Every metric the signing server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections, TLS handshake failures, refusals, requests by route and status.
    pub shared: Families,
    signatures: Family<KeyLabel, Counter>,
    audit_commit: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::new("signing_server");
        let shared = Families::new(&mut registry);
        let signatures = registry.register(
            "signatures",
            "signatures handed out (committed to the audit table), by key",
            Family::default(),
        );
        let audit_commit = registry.register_seconds(
            "audit_commit_duration",
            "time a request waits for its signatures' audit commit (queue and transaction)",
            latency_histogram(),
        );
        Self {
            registry,
            shared,
            signatures,
            audit_commit,
        }
    }
}

impl Metrics {
    /// Counts `count` signatures made with the key named `key`.
    pub fn signed(&self, key: &str, count: u64) {
        self.signatures
            .get_or_create(&KeyLabel {
                key: key.to_owned(),
            })
            .inc_by(count);
    }

    /// Records one audit commit's latency.
    pub fn audit_committed(&self, elapsed: Duration) {
        self.audit_commit.observe(elapsed.as_secs_f64());
    }

    /// Counts a request answered with `status` on `route` after `elapsed`, and a refusal
    /// when the status is one (4xx).
    pub fn answered(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.shared.request(route, status, elapsed);
        if let Some(reason) = refusal(status) {
            self.shared.refused(reason);
        }
    }

    /// Signatures so far with the key named `key`.
    pub fn signatures(&self, key: &str) -> u64 {
        self.signatures
            .get_or_create(&KeyLabel {
                key: key.to_owned(),
            })
            .get()
    }

    /// The exposition (OpenMetrics text).
    pub fn encode(&self) -> String {
        self.registry.encode()
    }
}

/// The refusal reason of an answer's status: none for a success or a server error.
fn refusal(status: u16) -> Option<Reason> {
    if !(400..500).contains(&status) {
        return None;
    }
    Some(match status {
        400 => Reason::BAD_REQUEST,
        403 => Reason::AUTHORIZATION,
        404 => Reason::new("not_found"),
        405 => Reason::new("method_not_allowed"),
        408 => Reason::new("timeout"),
        413 => Reason::LIMITS,
        429 => Reason::RATE_LIMIT,
        _ => Reason::new("other"),
    })
}

/// The route label of an API request.
pub fn route(method: &hyper::Method, path: &str) -> &'static str {
    use hyper::Method;
    match (method, path) {
        (&Method::POST, "/v1/sign") => "sign",
        (&Method::POST, "/v1/sign-path") => "sign-path",
        (&Method::GET, "/v1/keys") => "keys",
        (&Method::POST, "/v1/verify") => "verify",
        (&Method::GET, p) if p.starts_with("/v1/keys/") => "key",
        (_, "/v1/sign") => "sign",
        (_, "/v1/sign-path") => "sign-path",
        (_, "/v1/keys") => "keys",
        (_, "/v1/verify") => "verify",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_fixed_words_and_refusals_come_from_4xx() {
        use hyper::Method;
        for (method, path, expected) in [
            (Method::POST, "/v1/sign", "sign"),
            (Method::GET, "/v1/sign", "sign"),
            (Method::GET, "/v1/keys/abc", "key"),
            (Method::GET, "/../../etc/passwd", "other"),
        ] {
            assert_eq!(route(&method, path), expected);
        }
        let metrics = Metrics::default();
        metrics.answered("sign", 403, Duration::from_millis(1));
        metrics.answered("sign", 200, Duration::from_millis(1));
        metrics.answered("sign", 500, Duration::from_millis(1));
        metrics.signed("release", 2);
        let text = metrics.encode();
        for line in [
            "signing_server_refusals_total{reason=\"authorization\"} 1",
            "signing_server_requests_total{route=\"sign\",status=\"500\"} 1",
            "signing_server_signatures_total{key=\"release\"} 2",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert_eq!(
            text.matches("signing_server_refusals_total{").count(),
            1,
            "{text}"
        );
    }
}
