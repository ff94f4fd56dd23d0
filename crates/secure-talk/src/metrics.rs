//! secure-talk's metrics: the families every daemon shares ([`common::metrics::Families`]:
//! connections, TLS handshake failures on the TCP listener, refusals, requests by route and
//! status with their latency) and its own: clients connected by channel, pipes running, pipe
//! exits by reason and status. Served on `metrics_listen` by the daemon. Every label value is
//! a fixed word: never a client id, a pipe id, a certificate name or an address.
//!
//! The gauges are set from the hub when scraped ([`Metrics::encode`]), so they never drift
//! from what the hub holds.

use common::metrics::{Families, Registry};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Why a pipe ended: the `reason` of `secure_talk_pipe_exits_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ExitReason {
    /// It exited on its own, nobody having asked it to.
    exited,
    /// It was stopped: destroyed by its owner or an admin, or its owner was gone longer than
    /// `orphan_pipe_timeout_secs`.
    stopped,
    /// It did not check in within `pipe_checkin_timeout_secs`.
    checkin_timeout,
    /// The server was shutting down.
    shutdown,
}

/// How a pipe's process ended: the `status` of `secure_talk_pipe_exits_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ExitStatus {
    /// Exit code 0.
    success,
    /// Another exit code.
    failure,
    /// Killed by a signal (SIGTERM or SIGKILL from the stop escalation among them).
    signal,
    /// Waiting for it failed.
    unknown,
}

impl ExitStatus {
    /// The status of a process's end.
    #[must_use]
    pub fn of(status: &std::io::Result<std::process::ExitStatus>) -> Self {
        match status.as_ref().map(std::process::ExitStatus::code) {
            Ok(Some(0)) => Self::success,
            Ok(Some(_)) => Self::failure,
            Ok(None) => Self::signal,
            Err(_) => Self::unknown,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabel {
    reason: ExitReason,
    status: ExitStatus,
}

/// Every family secure-talk exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    /// The families every daemon shares.
    pub shared: Families,
    clients: Family<ChannelLabel, Gauge>,
    pipes: Gauge,
    exits: Family<ExitLabel, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry under the `secure_talk` prefix with every family at zero.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::new("secure_talk");
        let shared = Families::new(&mut registry);
        let clients = registry.register(
            "clients_connected",
            "Client ids with a live websocket, by channel",
            Family::<ChannelLabel, Gauge>::default(),
        );
        let pipes = registry.register("pipes_running", "Pipes alive", Gauge::default());
        let exits = registry.register(
            "pipe_exits",
            "Pipe processes ended, by why and how",
            Family::default(),
        );
        Self {
            shared,
            clients,
            pipes,
            exits,
            registry,
        }
    }

    /// Counts a pipe's end.
    pub fn pipe_exited(&self, reason: ExitReason, status: ExitStatus) {
        self.exits
            .get_or_create(&ExitLabel { reason, status })
            .inc();
    }

    /// The exposition (OpenMetrics text), with the gauges set from `counts` (clients with an
    /// admin channel, with a data channel, pipes), as the hub has them now.
    #[must_use]
    pub fn encode(&self, (admin, data, pipes): (usize, usize, usize)) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (channel, n) in [("admin", admin), ("data", data)] {
            self.clients
                .get_or_create(&ChannelLabel { channel })
                .set(gauge(n));
        }
        self.pipes.set(gauge(pipes));
        self.registry.encode()
    }
}

/// The `route` label of a request: `token` (`GET /` or `/data`), `post` (`POST /` or
/// `/data`), `upgrade_admin` and `upgrade_data` (the websocket upgrades), `other` for anything
/// else (so a client cannot add series by inventing paths).
#[must_use]
pub fn route(method: &hyper::Method, path: &str, upgrade: bool) -> &'static str {
    use hyper::Method;
    match (path, upgrade, method) {
        ("/", true, _) => "upgrade_admin",
        ("/data", true, _) => "upgrade_data",
        ("/" | "/data", false, &Method::GET) => "token",
        ("/" | "/data", false, &Method::POST) => "post",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    #[test]
    fn routes_are_the_endpoints_and_nothing_else() {
        for (method, path, upgrade, expected) in [
            (Method::GET, "/", true, "upgrade_admin"),
            (Method::GET, "/data", true, "upgrade_data"),
            (Method::GET, "/", false, "token"),
            (Method::GET, "/data", false, "token"),
            (Method::POST, "/data", false, "post"),
            (Method::PUT, "/", false, "other"),
            (Method::GET, "/x", true, "other"),
            (Method::GET, "/data/", false, "other"),
        ] {
            assert_eq!(route(&method, path, upgrade), expected, "{method} {path}");
        }
    }

    #[test]
    fn exit_statuses_are_told_apart() {
        use std::os::unix::process::ExitStatusExt as _;
        let of = |raw: i32| ExitStatus::of(&Ok(std::process::ExitStatus::from_raw(raw)));
        assert_eq!(of(0), ExitStatus::success);
        assert_eq!(of(3 << 8), ExitStatus::failure);
        assert_eq!(of(9), ExitStatus::signal);
        assert_eq!(
            ExitStatus::of(&Err(std::io::Error::other("x"))),
            ExitStatus::unknown
        );
    }

    #[test]
    fn the_secure_talk_families_are_exported() {
        let metrics = Metrics::new();
        metrics.pipe_exited(ExitReason::stopped, ExitStatus::signal);
        let text = metrics.encode((2, 1, 3));
        for line in [
            "secure_talk_clients_connected{channel=\"admin\"} 2",
            "secure_talk_clients_connected{channel=\"data\"} 1",
            "secure_talk_pipes_running 3",
            "secure_talk_pipe_exits_total{reason=\"stopped\",status=\"signal\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
    }
}
