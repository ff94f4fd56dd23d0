//! The broker's metrics: the families every daemon shares ([`common::metrics::Families`]:
//! connections, TLS handshake failures of the HTTPS API, refusals, requests by route and
//! status with their latency) and its own: jobs saved by type, verifications by outcome, jobs
//! reaped. Served on `metrics_listen` by the daemon; every label value is a fixed word (a
//! route, a job type, an outcome), never a user, a job id or an address.

use common::metrics::{Families, Registry};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::api::JobType;

/// A verification's outcome: the `outcome` of `broker_verifies_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Verify {
    /// The secret was the job's.
    valid,
    /// The secret was wrong.
    invalid,
    /// Refused (429): too many failed verifications of the job this minute.
    rate_limited,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Verify,
}

/// Every family the broker exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    /// The families every daemon shares.
    pub shared: Families,
    jobs: Family<TypeLabel, Counter>,
    verifies: Family<OutcomeLabel, Counter>,
    reaped: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry under the `broker` prefix with every family at zero.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::new("broker");
        let shared = Families::new(&mut registry);
        let jobs = registry.register("jobs_saved", "Jobs saved, by type", Family::default());
        let verifies = registry.register(
            "verifies",
            "Verifications of a job's secret, by outcome",
            Family::default(),
        );
        let reaped = registry.register(
            "jobs_reaped",
            "Expired jobs deleted by the reaper",
            Counter::default(),
        );
        Self {
            shared,
            jobs,
            verifies,
            reaped,
            registry,
        }
    }

    /// Counts a job saved.
    pub fn job_saved(&self, job_type: JobType) {
        self.jobs
            .get_or_create(&TypeLabel {
                r#type: job_type.as_str(),
            })
            .inc();
    }

    /// Counts a verification.
    pub fn verified(&self, outcome: Verify) {
        self.verifies.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts jobs reaped.
    pub fn reaped(&self, jobs: usize) {
        self.reaped.inc_by(u64::try_from(jobs).unwrap_or(u64::MAX));
    }

    /// The exposition (OpenMetrics text), process metrics included.
    #[must_use]
    pub fn encode(&self) -> String {
        self.registry.encode()
    }
}

/// The `route` label of a request: the API operation its method and path name, `other` for
/// anything else (so a client cannot add series by inventing paths).
#[must_use]
pub fn route(method: &axum::http::Method, path: &str) -> &'static str {
    use axum::http::Method;
    let rest = path.strip_prefix("/v1/jobs/");
    match (method, path, rest) {
        (&Method::GET, "/v1/whoami", _) => "whoami",
        (&Method::GET, "/v1/jobs", _) => "query",
        (&Method::POST, "/v1/jobs", _) => "save",
        (&Method::GET, "/v1/ca", _) => "ca",
        (&Method::GET, "/v1/crl", _) => "crl",
        (&Method::GET, "/v1/health", _) => "health",
        (method, _, Some(rest)) => match (method, rest.split_once('/')) {
            (&Method::GET, None) if !rest.is_empty() => "load",
            (&Method::DELETE, None) if !rest.is_empty() => "delete",
            (&Method::POST, Some((id, "verify"))) if !id.is_empty() => "verify",
            (&Method::POST, Some((id, "heartbeat"))) if !id.is_empty() => "heartbeat",
            _ => "other",
        },
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn routes_are_the_api_operations_and_nothing_else() {
        for (method, path, expected) in [
            (Method::GET, "/v1/whoami", "whoami"),
            (Method::GET, "/v1/jobs", "query"),
            (Method::POST, "/v1/jobs", "save"),
            (Method::GET, "/v1/jobs/job_0123", "load"),
            (Method::DELETE, "/v1/jobs/job_0123", "delete"),
            (Method::POST, "/v1/jobs/job_0123/verify", "verify"),
            (Method::POST, "/v1/jobs/job_0123/heartbeat", "heartbeat"),
            (Method::GET, "/v1/ca", "ca"),
            (Method::GET, "/v1/crl", "crl"),
            (Method::GET, "/v1/health", "health"),
            (Method::GET, "/v1/jobs/", "other"),
            (Method::POST, "/v1/jobs//verify", "other"),
            (Method::GET, "/v1/jobs/job_0123/verify", "other"),
            (Method::POST, "/v1/jobs/a/b/verify", "other"),
            (Method::PUT, "/v1/jobs", "other"),
            (Method::GET, "/etc/passwd", "other"),
            (Method::GET, "/v1/whoami/x", "other"),
        ] {
            assert_eq!(route(&method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn the_broker_families_are_exported() {
        let metrics = Metrics::new();
        metrics.job_saved(JobType::Ssh);
        metrics.job_saved(JobType::Ssl);
        metrics.job_saved(JobType::Ssl);
        metrics.verified(Verify::rate_limited);
        metrics.reaped(3);
        let text = metrics.encode();
        for line in [
            "broker_jobs_saved_total{type=\"ssh\"} 1",
            "broker_jobs_saved_total{type=\"ssl\"} 2",
            "broker_verifies_total{outcome=\"rate_limited\"} 1",
            "broker_jobs_reaped_total 3",
            "broker_connections_open 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
    }
}
