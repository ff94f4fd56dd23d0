//! remo-serv's metrics: the families every daemon shares ([`common::metrics::Families`]:
//! connections, TLS handshake failures when HTTPS is on, refusals, requests by route and
//! status with their latency) and its own: sessions, running commands, logins by outcome.
//! Served on `metrics_listen` by the daemon. Every label value is a fixed word: never a
//! user, a session id, a path or an address. A login refused for an unknown user and one
//! refused for a bad signature are one outcome (`refused`), as they are one answer: whoever
//! can read the metrics learns nothing about which users exist (invariant 9).

use common::metrics::{Families, Registry};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// A login's outcome: the `outcome` of `remo_serv_logins_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Login {
    /// A new session.
    ok,
    /// An unknown user, an unusable stored key or a bad signature (403, one answer).
    refused,
    /// Over `logins-per-minute` from the address (403).
    rate_limited,
    /// Not a login request, or a bad key agreement (400).
    malformed,
    /// The session table was full, or the user database failed (503).
    unavailable,
}

/// What runs a command: the `kind` of `remo_serv_commands_running`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Kind {
    /// A one-shot `/cmd`, for as long as the request runs it.
    cmd,
    /// An interactive `/icm` command, from its start until it is collected (its output read
    /// to the end, replaced, logged out or expired with its session).
    interactive,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabel {
    outcome: Login,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

/// Every family remo-serv exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    /// The families every daemon shares.
    pub shared: Families,
    sessions: Gauge,
    commands: Family<KindLabel, Gauge>,
    logins: Family<LoginLabel, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry under the `remo_serv` prefix with every family at zero.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::new("remo_serv");
        let shared = Families::new(&mut registry);
        let sessions = registry.register(
            "sessions",
            "Logged-in sessions (until they expire and are swept, or log out)",
            Gauge::default(),
        );
        let commands = registry.register(
            "commands_running",
            "Commands running, by kind",
            Family::<KindLabel, Gauge>::default(),
        );
        let logins = registry.register("logins", "Logins, by outcome", Family::default());
        for kind in [Kind::cmd, Kind::interactive] {
            let _ = commands.get_or_create(&KindLabel { kind });
        }
        Self {
            shared,
            sessions,
            commands,
            logins,
            registry,
        }
    }

    /// Counts a login.
    pub fn login(&self, outcome: Login) {
        self.logins.get_or_create(&LoginLabel { outcome }).inc();
    }

    /// A command of `kind` counted as running until the guard is dropped.
    #[must_use = "the command counts as running while the guard lives"]
    pub fn running(&self, kind: Kind) -> Running {
        let gauge = self.commands.get_or_create(&KindLabel { kind }).clone();
        gauge.inc();
        Running(gauge)
    }

    /// The exposition (OpenMetrics text) with `sessions` logged in now.
    #[must_use]
    pub fn encode(&self, sessions: usize) -> String {
        self.sessions
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
        self.registry.encode()
    }
}

/// A command counted in `remo_serv_commands_running` until dropped.
#[derive(Debug)]
pub struct Running(Gauge);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `route` label of a request: the endpoint its path names, `other` for anything else
/// (the argument in `/get/...` and the others is a token, never a label).
#[must_use]
pub fn route(path: &str) -> &'static str {
    match path {
        "/auth" => "auth",
        "/info" => "info",
        "/idt" => "idt",
        "/edt" => "edt",
        _ => match path.get(..5) {
            Some("/get/") => "get",
            Some("/put/") => "put",
            Some("/cmd/") => "cmd",
            Some("/icm/") => "icm",
            _ => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_the_endpoints_and_nothing_else() {
        for (path, expected) in [
            ("/auth", "auth"),
            ("/info", "info"),
            ("/idt", "idt"),
            ("/edt", "edt"),
            ("/get/gAAAAAB", "get"),
            ("/put/gAAAAAB", "put"),
            ("/cmd/gAAAAAB", "cmd"),
            ("/icm/gAAAAAB", "icm"),
            ("/get", "other"),
            ("/info/x", "other"),
            ("/", "other"),
            ("/é", "other"),
            ("/etc/passwd", "other"),
        ] {
            assert_eq!(route(path), expected, "{path}");
        }
    }

    #[test]
    fn the_remo_serv_families_are_exported() {
        let metrics = Metrics::new();
        metrics.login(Login::ok);
        metrics.login(Login::refused);
        let held = metrics.running(Kind::cmd);
        let text = metrics.encode(2);
        for line in [
            "remo_serv_sessions 2",
            "remo_serv_commands_running{kind=\"cmd\"} 1",
            "remo_serv_commands_running{kind=\"interactive\"} 0",
            "remo_serv_logins_total{outcome=\"ok\"} 1",
            "remo_serv_logins_total{outcome=\"refused\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        drop(held);
        let text = metrics.encode(0);
        assert!(
            text.lines()
                .any(|l| l == "remo_serv_commands_running{kind=\"cmd\"} 0"),
            "{text}"
        );
    }
}
