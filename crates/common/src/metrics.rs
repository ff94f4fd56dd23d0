//! Prometheus metrics for every daemon: a registry holder, the families every daemon shares,
//! process metrics, and the local listener that serves `GET /metrics`.
//!
//! - [`Registry`]: a daemon's families under its prefix (`ws_proxy_`, `signing_server_`, ...)
//!   and the unprefixed `process_*` families ([`process`]), encoded together in the
//!   OpenMetrics text format ([`CONTENT_TYPE`]).
//! - [`Families`]: what every daemon exports, named by Prometheus conventions:
//!   `<daemon>_connections_open`, `<daemon>_connections_accepted_total`,
//!   `<daemon>_tls_handshake_failures_total{reason}`, `<daemon>_refusals_total{reason}`,
//!   `<daemon>_requests_total{route,status}` and `<daemon>_request_duration_seconds{route}`.
//!   Each event is one call ([`Families::connection`], [`Families::tls_failure`],
//!   [`Families::refused`], [`Families::request`]).
//! - [`listen`]: the `metrics_listen` key ([`MetricsListen`]: `127.0.0.1:PORT`, `[::1]:PORT`
//!   or `unix:/abs/path`), binding it ([`MetricsListener`]) and serving `/metrics` on it with
//!   a pool and deadlines of its own ([`crate::local_http`]).
//!
//! Label values are chosen by the daemon (`&'static str` routes and reasons, status codes),
//! never copied from what a client sent, so no client can grow the number of series.

pub mod listen;
pub mod process;

use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Unit};

pub use listen::{MetricsListen, MetricsListener};
pub use prometheus_client;

use crate::admission::Refused;
use crate::tls::TlsError;

/// The Content-Type of the exposition: OpenMetrics text (what prometheus-client writes, with
/// counters' `_total` suffix and the closing `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Histogram buckets for request and commit latencies, in seconds: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`].
#[must_use]
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A family of latency histograms ([`latency_histogram`]) by the labels `L`.
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A new [`LatencyFamily`].
#[must_use]
pub fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    Family::new_with_constructor(latency_histogram)
}

/// A daemon's metrics: its own families under its prefix and the process metrics.
#[derive(Debug)]
pub struct Registry {
    daemon: prometheus_client::registry::Registry,
    process: prometheus_client::registry::Registry,
}

impl Registry {
    /// An empty registry whose families are named `<prefix>_<name>` (the crate name with `_`:
    /// `ws_proxy`), with the process metrics.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let mut process = prometheus_client::registry::Registry::default();
        process.register_collector(Box::new(process::ProcessCollector));
        Self {
            daemon: prometheus_client::registry::Registry::with_prefix(prefix),
            process,
        }
    }

    /// Registers `metric` as `<prefix>_<name>` (a counter gets `_total` too) and returns it,
    /// a handle onto the same values. `help` is a phrase; the encoder adds the final period.
    pub fn register<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.daemon.register(name, help, metric.clone());
        metric
    }

    /// [`Registry::register`] for a metric in seconds: named `<prefix>_<name>_seconds`.
    pub fn register_seconds<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.daemon
            .register_with_unit(name, help, Unit::Seconds, metric.clone());
        metric
    }

    /// Registers a collector whose families are read at every scrape (under the prefix).
    pub fn register_collector(
        &mut self,
        collector: Box<dyn prometheus_client::collector::Collector>,
    ) {
        self.daemon.register_collector(collector);
    }

    /// The exposition of every family, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    #[must_use]
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.daemon)
            .and_then(|()| text::encode_registry(&mut out, &self.process))
            .and_then(|()| text::encode_eof(&mut out));
        out
    }
}

/// Why a TLS handshake failed: the `reason` of `<daemon>_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TlsFailure {
    /// The client presented no certificate where one is required.
    no_certificate,
    /// The client's certificate was refused (untrusted, revoked, expired, wrong use).
    bad_certificate,
    /// Not TLS, or TLS we do not speak (version, cipher suites, malformed messages).
    protocol,
    /// Not finished within the handshake deadline.
    timeout,
    /// Closed to make room in the full stranger pool.
    evicted,
    /// Closed by the peer before the handshake finished without an alert, within
    /// [`crate::tls::PROBE_WINDOW`] (1 s) of its start: a port probe (a health check, `nc -z`);
    /// alerts should leave it out. A later close is `io`.
    probe,
    /// The connection failed underneath (reset, broken pipe).
    io,
}

impl TlsFailure {
    /// The reason for a handshake error.
    #[must_use]
    pub fn of(err: &TlsError) -> Self {
        match err {
            TlsError::HandshakeTimeout(_) => Self::timeout,
            TlsError::Evicted => Self::evicted,
            TlsError::Closed => Self::probe,
            TlsError::Handshake(io) => Self::of_io(io),
            TlsError::Rustls(err) => Self::of_rustls(err),
            _ => Self::protocol,
        }
    }

    fn of_io(io: &std::io::Error) -> Self {
        match io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(err) => Self::of_rustls(err),
            None if io.kind() == std::io::ErrorKind::InvalidData => Self::protocol,
            None => Self::io,
        }
    }

    fn of_rustls(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::NoCertificatesPresented => Self::no_certificate,
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::InvalidCertRevocationList(_)
            | rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate) => {
                Self::bad_certificate
            }
            _ => Self::protocol,
        }
    }
}

/// Why a connection or request was refused: the `reason` of `<daemon>_refusals_total`. The
/// constants are the reasons every daemon shares; a daemon names its own with
/// [`Reason::new`] (snake case, a fixed word, never a client's text).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct Reason(&'static str);

impl Reason {
    /// The authorization rules refused the identity.
    pub const AUTHORIZATION: Self = Self("authorization");
    /// A per-identity or per-address rate limit.
    pub const RATE_LIMIT: Self = Self("rate_limit");
    /// `max_connections` reached (after authentication).
    pub const MAX_CONNECTIONS: Self = Self("max_connections");
    /// The stranger pool (`max_handshakes`) was full.
    pub const MAX_HANDSHAKES: Self = Self("max_handshakes");
    /// One address had `max_handshakes_per_address` already.
    pub const MAX_HANDSHAKES_PER_ADDRESS: Self = Self("max_handshakes_per_address");
    /// A size or count limit (body, message, queue).
    pub const LIMITS: Self = Self("limits");
    /// The request was malformed.
    pub const BAD_REQUEST: Self = Self("bad_request");
    /// The daemon is shutting down.
    pub const SHUTTING_DOWN: Self = Self("shutting_down");
    /// The metrics listener's pool was full: a connection was closed at once, or an idle one
    /// was evicted to make room ([`listen::MetricsListener::serve`]).
    pub const METRICS_POOL: Self = Self("metrics_pool");

    /// A daemon's own reason.
    #[must_use]
    pub const fn new(reason: &'static str) -> Self {
        Self(reason)
    }

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl From<Refused> for Reason {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Handshakes => Self::MAX_HANDSHAKES,
            Refused::Address => Self::MAX_HANDSHAKES_PER_ADDRESS,
            Refused::Connections => Self::MAX_CONNECTIONS,
        }
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0, encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabel {
    reason: TlsFailure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Reason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    route: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// The families every daemon exports (see the module documentation); cheap to clone, every
/// clone counting into the same series.
#[derive(Debug, Clone)]
pub struct Families {
    connections_open: Gauge,
    connections_accepted: Counter,
    tls_failures: Family<TlsLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    requests: Family<RequestLabel, Counter>,
    durations: LatencyFamily<RouteLabel>,
}

impl Families {
    /// Registers the shared families in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        Self {
            connections_open: registry.register(
                "connections_open",
                "Connections open now (from accept to close)",
                Gauge::default(),
            ),
            connections_accepted: registry.register(
                "connections_accepted",
                "Connections accepted",
                Counter::default(),
            ),
            tls_failures: registry.register(
                "tls_handshake_failures",
                "TLS handshakes that failed, by reason",
                Family::default(),
            ),
            refusals: registry.register(
                "refusals",
                "Connections and requests refused, by reason",
                Family::default(),
            ),
            requests: registry.register(
                "requests",
                "Requests answered, by route and status",
                Family::default(),
            ),
            durations: registry.register_seconds(
                "request_duration",
                "Time from a request's arrival to its answer, by route",
                latency_family(),
            ),
        }
    }

    /// Counts an accepted connection and holds it in `connections_open` until the guard is
    /// dropped.
    #[must_use = "the connection counts as open while the guard lives"]
    pub fn connection(&self) -> OpenConnection {
        self.connections_accepted.inc();
        self.connections_open.inc();
        OpenConnection {
            open: self.connections_open.clone(),
        }
    }

    /// Counts a failed TLS handshake.
    pub fn tls_failure(&self, err: &TlsError) {
        self.tls_failed(TlsFailure::of(err));
    }

    /// Counts a failed TLS handshake by its reason.
    pub fn tls_failed(&self, reason: TlsFailure) {
        self.tls_failures.get_or_create(&TlsLabel { reason }).inc();
    }

    /// Counts a refusal.
    pub fn refused(&self, reason: impl Into<Reason>) {
        let reason = reason.into();
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a request answered with `status` after `elapsed`.
    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabel { route, status })
            .inc();
        self.durations
            .get_or_create(&RouteLabel { route })
            .observe(elapsed.as_secs_f64());
    }

    /// A request starting now on `route`; [`RequestTimer::done`] counts it.
    #[must_use]
    pub fn start(&self, route: &'static str) -> RequestTimer {
        RequestTimer {
            families: self.clone(),
            route,
            started: Instant::now(),
        }
    }

    /// Connections open now.
    #[must_use]
    pub fn open(&self) -> i64 {
        self.connections_open.get()
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn accepted(&self) -> u64 {
        self.connections_accepted.get()
    }

    /// Handshake failures so far for `reason`.
    #[must_use]
    pub fn tls_failures(&self, reason: TlsFailure) -> u64 {
        self.tls_failures.get_or_create(&TlsLabel { reason }).get()
    }

    /// Refusals so far for `reason`.
    #[must_use]
    pub fn refusals(&self, reason: impl Into<Reason>) -> u64 {
        let reason = reason.into();
        self.refusals.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Requests so far on `route` answered with `status`.
    #[must_use]
    pub fn requests(&self, route: &'static str, status: u16) -> u64 {
        self.requests
            .get_or_create(&RequestLabel { route, status })
            .get()
    }
}

/// A connection counted in `connections_open` until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    open: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A request being timed ([`Families::start`]).
#[derive(Debug)]
pub struct RequestTimer {
    families: Families,
    route: &'static str,
    started: Instant,
}

impl RequestTimer {
    /// Counts the request with its `status` and the time since it started.
    pub fn done(self, status: u16) {
        self.families
            .request(self.route, status, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn the_shared_families_are_named_by_convention() {
        let mut registry = Registry::new("demo_daemon");
        let families = Families::new(&mut registry);
        {
            let _open = families.connection();
            let _two = families.connection();
            families.tls_failed(TlsFailure::bad_certificate);
            families.refused(Reason::AUTHORIZATION);
            families.refused(Refused::Address);
            families.request("sign", 200, Duration::from_millis(3));
            families.start("sign").done(403);
            let text = registry.encode();
            for expected in [
                "demo_daemon_connections_open 2",
                "demo_daemon_connections_accepted_total 2",
                "demo_daemon_tls_handshake_failures_total{reason=\"bad_certificate\"} 1",
                "demo_daemon_refusals_total{reason=\"authorization\"} 1",
                "demo_daemon_refusals_total{reason=\"max_handshakes_per_address\"} 1",
                "demo_daemon_requests_total{route=\"sign\",status=\"200\"} 1",
                "demo_daemon_requests_total{route=\"sign\",status=\"403\"} 1",
                "demo_daemon_request_duration_seconds_bucket{le=\"0.005\",route=\"sign\"} 2",
                "demo_daemon_request_duration_seconds_count{route=\"sign\"} 2",
            ] {
                assert!(
                    sample_lines(&text).contains(&expected),
                    "{expected}\n{text}"
                );
            }
            assert!(text.contains("# TYPE demo_daemon_request_duration_seconds histogram"));
            assert!(text.contains("# UNIT demo_daemon_request_duration_seconds seconds"));
        }
        // The guards are gone: nothing is open.
        assert_eq!(families.open(), 0);
        assert_eq!(families.accepted(), 2);
        assert!(sample_lines(&registry.encode()).contains(&"demo_daemon_connections_open 0"));
    }

    #[test]
    fn process_metrics_are_unprefixed_and_the_exposition_ends_with_eof() {
        let registry = Registry::new("demo");
        let text = registry.encode();
        for family in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
        ] {
            let line = sample_lines(&text)
                .into_iter()
                .find(|line| line.starts_with(&format!("{family} ")))
                .unwrap_or_else(|| panic!("{family} missing\n{text}"));
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(value >= 0.0, "{line}");
        }
        let rss = sample_lines(&text)
            .into_iter()
            .find(|l| l.starts_with("process_resident_memory_bytes "))
            .unwrap();
        assert!(!rss.ends_with(" 0"), "{rss}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn a_daemons_own_families_share_the_prefix() {
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Key {
            key: &'static str,
        }
        let mut registry = Registry::new("signer");
        let signatures: Family<Key, Counter> =
            registry.register("signatures", "signatures made", Family::default());
        let commits = registry.register_seconds(
            "audit_commit_duration",
            "audit commits",
            latency_histogram(),
        );
        signatures.get_or_create(&Key { key: "release" }).inc();
        commits.observe(0.002);
        let text = registry.encode();
        assert!(
            text.contains("signer_signatures_total{key=\"release\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("signer_audit_commit_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn tls_errors_map_to_reasons() {
        use std::io::{Error, ErrorKind};
        let wrapped =
            |err: rustls::Error| TlsError::Handshake(Error::new(ErrorKind::InvalidData, err));
        for (err, expected) in [
            (
                TlsError::HandshakeTimeout(Duration::from_secs(1)),
                TlsFailure::timeout,
            ),
            (TlsError::Evicted, TlsFailure::evicted),
            (TlsError::Closed, TlsFailure::probe),
            (
                wrapped(rustls::Error::NoCertificatesPresented),
                TlsFailure::no_certificate,
            ),
            (
                wrapped(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked,
                )),
                TlsFailure::bad_certificate,
            ),
            (
                wrapped(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                TlsFailure::protocol,
            ),
            (
                TlsError::Handshake(Error::new(ErrorKind::InvalidData, "corrupt message")),
                TlsFailure::protocol,
            ),
            (
                TlsError::Handshake(Error::from(ErrorKind::ConnectionReset)),
                TlsFailure::io,
            ),
        ] {
            assert_eq!(TlsFailure::of(&err), expected, "{err}");
        }
    }
}
