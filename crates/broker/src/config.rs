//! Configuration: the TOML file (every key documented in `deploy/config/broker.example.toml`),
//! validated once into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::metrics::MetricsListen;
use common::pki::San;
use common::tls::TlsSection;

/// Default socket path (the unit's `RuntimeDirectory=broker`).
pub const DEFAULT_SOCKET: &str = crate::client::DEFAULT_SOCKET;
/// Default state directory (the unit's `StateDirectory=broker`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/broker";
/// Default port range: registered ports, below Linux's default ephemeral range (32768-60999).
pub const DEFAULT_PORT_RANGE: [u16; 2] = [20000, 29999];
/// Default seconds a job lives without a heartbeat.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Default cap on a job's TTL (7 days).
pub const DEFAULT_MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// Most Unix-socket connections one uid holds at once, by default (and at most a quarter of
/// `max_local_connections`): one uid never takes the other users' slots. A running
/// `broker-run` holds one kept-alive connection, and its gate up to four more while it checks
/// keys, so a user with `max_jobs_per_user` (100) gated jobs stays below it.
pub const DEFAULT_MAX_LOCAL_CONNECTIONS_PER_UID: usize = 256;
/// Most authenticated HTTPS connections one IPv4 address or IPv6 /64 holds at once, by
/// default (and at most a quarter of `max_connections`).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// Default seconds over which refusals of one caller and job share an audit row.
pub const DEFAULT_AUDIT_INTERVAL_SECS: u64 = 60;

/// The default of a per-key cap beside a pool of `pool` slots: a quarter of it, at most
/// `ceiling`, at least one.
fn default_share(pool: usize, ceiling: usize) -> usize {
    (pool / 4).clamp(1, ceiling)
}

/// The file as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Unix socket of the local API.
    pub socket: PathBuf,
    /// Octal mode of the socket; `0666` lets every local user reach it (identity comes from
    /// the kernel, not from the file mode).
    pub socket_mode: String,
    /// Directory for the SQLite database and the CA (created 0700).
    pub state_dir: PathBuf,
    /// `sqlite:PATH` or `postgres://...`; empty means `sqlite:<state_dir>/broker.db`.
    pub database: String,
    /// SQLite `synchronous`: `full` (every commit survives power loss) or `normal` (every
    /// commit survives a crash of the daemon; the last ones may be lost with the machine).
    pub sqlite_synchronous: String,
    /// Most pooled database connections.
    pub database_connections: u32,
    /// Host name jobs are registered under; empty means the machine's host name.
    pub host: String,
    /// Extra names and addresses put in ssl jobs' certificates (localhost and `host` are
    /// always there).
    pub cert_names: Vec<String>,
    /// Inclusive range ports are allocated from; it must not overlap the kernel's ephemeral
    /// range.
    pub port_range: [u16; 2],
    /// TTL of a job saved without one, seconds.
    pub default_ttl_secs: u64,
    /// Longest TTL a job may ask for, seconds.
    pub max_ttl_secs: u64,
    /// Seconds between two reaper passes.
    pub reap_interval_secs: u64,
    /// Days an ssl job's certificates are valid (they are revoked when the job ends).
    pub cert_days: u32,
    /// Days audit records are kept; 0 keeps them forever.
    pub audit_retention_days: u32,
    /// Most live jobs per user.
    pub max_jobs_per_user: u32,
    /// Failed verifications per job per minute before verify answers 429.
    pub max_failed_verifies_per_minute: u32,
    /// Most authenticated HTTPS connections (client certificate verified), and the cap of
    /// the Unix socket's own pool unless `max_local_connections` is set. Connections still in
    /// the TLS handshake have a pool of their own (`[https.tls] max_handshakes`).
    pub max_connections: usize,
    /// Seconds to read a request head, and again to read its body (a total for each, not per
    /// piece); an idle keep-alive connection is closed after it too.
    pub request_timeout_secs: u64,
    /// Seconds to let requests finish after SIGTERM.
    pub drain_grace_secs: u64,
    /// Log filter (flags and `RUST_LOG` override it).
    pub log: Option<String>,
    /// The optional HTTPS API.
    pub https: Option<HttpsSection>,
    /// Most open connections on the Unix socket, a pool apart from HTTPS (further local
    /// clients wait in the listen backlog). Default: `max_connections`.
    pub max_local_connections: Option<usize>,
    /// Most Unix-socket connections one uid (`SO_PEERCRED`) holds at once; further ones are
    /// answered 503 and closed. Default: a quarter of `max_local_connections`, at most 256.
    pub max_local_connections_per_uid: Option<usize>,
    /// Most authenticated HTTPS connections one IPv4 address or IPv6 /64 holds at once;
    /// further ones are closed. Default: a quarter of `max_connections`, at most 256.
    pub max_connections_per_address: Option<usize>,
    /// Refusals (`invalid`, `rate_limited`, `refused_not_owner`, `not_found`, `expired`,
    /// `no_port`) of one caller, action and job within this many seconds share audit rows:
    /// the first is written at once, the rest as one row with their count.
    pub audit_interval_secs: u64,
    /// The local metrics listener (`GET /metrics`, Prometheus): `127.0.0.1:PORT`,
    /// `[::1]:PORT` or `unix:/abs/path`; off when absent. Off loopback is a warning.
    pub metrics_listen: Option<MetricsListen>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0666".into(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            database: String::new(),
            sqlite_synchronous: "full".into(),
            database_connections: 8,
            host: String::new(),
            cert_names: Vec::new(),
            port_range: DEFAULT_PORT_RANGE,
            default_ttl_secs: DEFAULT_TTL_SECS,
            max_ttl_secs: DEFAULT_MAX_TTL_SECS,
            reap_interval_secs: 15,
            cert_days: 30,
            audit_retention_days: 365,
            max_jobs_per_user: 100,
            max_failed_verifies_per_minute: 20,
            max_connections: 1024,
            request_timeout_secs: 10,
            drain_grace_secs: 10,
            log: None,
            https: None,
            max_local_connections: None,
            max_local_connections_per_uid: None,
            max_connections_per_address: None,
            audit_interval_secs: DEFAULT_AUDIT_INTERVAL_SECS,
            metrics_listen: None,
        }
    }
}

/// `[https]`: the remote API, with required client certificates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsSection {
    /// Listen address, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Certificate, key, client CA and CRLs (`client_auth` is always `required`).
    pub tls: TlsSection,
    /// Certificate subject → user name: keys are `CN=name` or `sha256:<hex of the DER>`.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`FileConfig::socket`].
    pub socket: PathBuf,
    /// Parsed [`FileConfig::socket_mode`].
    pub socket_mode: u32,
    /// See [`FileConfig::state_dir`].
    pub state_dir: PathBuf,
    /// Database URL, defaulted.
    pub database: String,
    /// Whether SQLite commits with `synchronous = FULL`.
    pub sqlite_full_sync: bool,
    /// See [`FileConfig::database_connections`].
    pub database_connections: u32,
    /// Host name, defaulted.
    pub host: String,
    /// SANs of ssl job certificates.
    pub cert_sans: Vec<San>,
    /// Inclusive port range.
    pub ports: std::ops::RangeInclusive<u16>,
    /// See [`FileConfig::default_ttl_secs`].
    pub default_ttl: Duration,
    /// See [`FileConfig::max_ttl_secs`].
    pub max_ttl: Duration,
    /// See [`FileConfig::reap_interval_secs`].
    pub reap_interval: Duration,
    /// See [`FileConfig::cert_days`].
    pub cert_days: u32,
    /// See [`FileConfig::audit_retention_days`].
    pub audit_retention_days: u32,
    /// See [`FileConfig::max_jobs_per_user`].
    pub max_jobs_per_user: u32,
    /// See [`FileConfig::max_failed_verifies_per_minute`].
    pub max_failed_verifies_per_minute: u32,
    /// See [`FileConfig::max_connections`].
    pub max_connections: usize,
    /// See [`FileConfig::request_timeout_secs`].
    pub request_timeout: Duration,
    /// See [`FileConfig::drain_grace_secs`].
    pub drain_grace: Duration,
    /// See [`FileConfig::https`].
    pub https: Option<HttpsSection>,
    /// See [`FileConfig::max_local_connections`].
    pub max_local_connections: usize,
    /// See [`FileConfig::max_local_connections_per_uid`].
    pub max_local_connections_per_uid: usize,
    /// See [`FileConfig::max_connections_per_address`].
    pub max_connections_per_address: usize,
    /// See [`FileConfig::audit_interval_secs`].
    pub audit_interval: Duration,
    /// See [`FileConfig::metrics_listen`].
    pub metrics_listen: Option<MetricsListen>,
}

impl FileConfig {
    /// Validates the file into a [`Config`]; `hostname` is the machine's name, used when
    /// `host` is empty.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn into_config(self, hostname: &str) -> Result<Config, String> {
        let socket_mode = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("socket_mode {:?} is not an octal mode", self.socket_mode))?;
        let [low, high] = self.port_range;
        if low == 0 || low > high {
            return Err(format!(
                "port_range [{low}, {high}] is empty or starts at 0"
            ));
        }
        if low < 1024 {
            return Err(format!(
                "port_range starts at {low}: privileged ports are not handed to users"
            ));
        }
        if self.default_ttl_secs == 0 || self.max_ttl_secs < self.default_ttl_secs {
            return Err("default_ttl_secs must be positive and at most max_ttl_secs".into());
        }
        let sqlite_full_sync = match self.sqlite_synchronous.as_str() {
            "full" => true,
            "normal" => false,
            other => return Err(format!("sqlite_synchronous {other:?}: use full or normal")),
        };
        let host = if self.host.is_empty() {
            hostname.to_owned()
        } else {
            self.host
        };
        let mut cert_sans = vec![San::Dns("localhost".into())];
        cert_sans.push(San::Ip(std::net::Ipv4Addr::LOCALHOST.into()));
        for name in std::iter::once(&host).chain(&self.cert_names) {
            let san: San = name
                .parse()
                .map_err(|e| format!("cert_names: {name:?}: {e}"))?;
            if !cert_sans.contains(&san) {
                cert_sans.push(san);
            }
        }
        if let Some(https) = &self.https {
            for (subject, user) in &https.users {
                if !(subject.starts_with("CN=") || subject.starts_with("sha256:")) {
                    return Err(format!(
                        "https.users: {subject:?} must start with CN= or sha256:"
                    ));
                }
                if !crate::identity::valid_user_name(user) {
                    return Err(format!("https.users: {user:?} is not a user name"));
                }
            }
        }
        let max_connections = self.max_connections.max(1);
        let max_local_connections = match self.max_local_connections {
            Some(0) => return Err("max_local_connections must be above 0".into()),
            Some(n) => n,
            None => max_connections,
        };
        let max_local_connections_per_uid = match self.max_local_connections_per_uid {
            Some(0) => return Err("max_local_connections_per_uid must be above 0".into()),
            Some(n) => n,
            None => default_share(max_local_connections, DEFAULT_MAX_LOCAL_CONNECTIONS_PER_UID),
        };
        let max_connections_per_address = match self.max_connections_per_address {
            Some(0) => return Err("max_connections_per_address must be above 0".into()),
            Some(n) => n,
            None => default_share(max_connections, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS),
        };
        let database = if self.database.is_empty() {
            format!("sqlite://{}", self.state_dir.join("broker.db").display())
        } else {
            self.database
        };
        if common::pgurl::is_postgres_url(&database) {
            common::pgurl::check(&database).map_err(|e| format!("database: {e}"))?;
        }
        Ok(Config {
            socket: self.socket,
            socket_mode,
            state_dir: self.state_dir,
            database,
            sqlite_full_sync,
            database_connections: self.database_connections.max(1),
            host,
            cert_sans,
            ports: low..=high,
            default_ttl: Duration::from_secs(self.default_ttl_secs),
            max_ttl: Duration::from_secs(self.max_ttl_secs),
            reap_interval: Duration::from_secs(self.reap_interval_secs.max(1)),
            cert_days: self.cert_days.max(1),
            audit_retention_days: self.audit_retention_days,
            max_jobs_per_user: self.max_jobs_per_user,
            max_failed_verifies_per_minute: self.max_failed_verifies_per_minute,
            max_connections,
            request_timeout: Duration::from_secs(self.request_timeout_secs.max(1)),
            drain_grace: Duration::from_secs(self.drain_grace_secs),
            https: self.https,
            max_local_connections,
            max_local_connections_per_uid,
            max_connections_per_address,
            audit_interval: Duration::from_secs(self.audit_interval_secs.max(1)),
            metrics_listen: self.metrics_listen,
        })
    }
}

impl Config {
    /// A configuration for tests and benchmarks: everything under `dir`, SQLite unless
    /// `database` is given, the ports in `ports`.
    pub fn for_dir(dir: &Path, database: Option<String>, ports: [u16; 2]) -> Self {
        let file = FileConfig {
            socket: dir.join("broker.sock"),
            state_dir: dir.join("state"),
            database: database.unwrap_or_default(),
            host: "localhost".into(),
            port_range: ports,
            reap_interval_secs: 1,
            ..FileConfig::default()
        };
        #[allow(clippy::expect_used)] // the values above are valid by construction
        file.into_config("localhost")
            .expect("test configuration is valid")
    }

    /// Whether the store is SQLite.
    pub fn is_sqlite(&self) -> bool {
        self.database.starts_with("sqlite:")
    }
}

/// The kernel's ephemeral port range, from procfs.
pub fn ephemeral_range() -> Option<std::ops::RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let low = parts.next()?.ok()?;
    let high = parts.next()?.ok()?;
    Some(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let config = FileConfig::default().into_config("node1").unwrap();
        assert_eq!(config.host, "node1");
        assert_eq!(config.socket_mode, 0o666);
        assert!(config.database.ends_with("/var/lib/broker/broker.db"));
        assert!(config.cert_sans.contains(&San::Dns("node1".into())));
        // The connection caps at their defaults: no uid or address takes more than a quarter
        // of its pool (issue 16).
        assert_eq!(config.max_connections, 1024);
        assert_eq!(config.max_local_connections, 1024);
        assert_eq!(config.max_local_connections_per_uid, 256);
        assert_eq!(config.max_connections_per_address, 256);
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.audit_interval, Duration::from_secs(60));
        let small = FileConfig {
            max_connections: 8,
            ..FileConfig::default()
        }
        .into_config("h")
        .unwrap();
        assert_eq!(small.max_local_connections_per_uid, 2);
        assert_eq!(small.max_connections_per_address, 2);
    }

    #[test]
    fn bad_values_are_named() {
        let check = |file: FileConfig, needle: &str| {
            let err = file.into_config("h").unwrap_err();
            assert!(err.contains(needle), "{err}");
        };
        check(
            FileConfig {
                port_range: [30000, 20000],
                ..FileConfig::default()
            },
            "port_range",
        );
        check(
            FileConfig {
                port_range: [80, 90],
                ..FileConfig::default()
            },
            "privileged",
        );
        check(
            FileConfig {
                socket_mode: "rw".into(),
                ..FileConfig::default()
            },
            "socket_mode",
        );
        check(
            FileConfig {
                sqlite_synchronous: "off".into(),
                ..FileConfig::default()
            },
            "sqlite_synchronous",
        );
        // A PostgreSQL URL follows common::pgurl's rule: TCP only with verify-full.
        for url in [
            "postgres://broker:pw@db.example.org/broker",
            "postgres://broker@db.example.org/broker?sslmode=require",
            "postgresql:///broker?host=/tmp",
            // Any case of the scheme meets the rule too.
            "POSTGRES://broker:pw@db.example.org/broker",
            "Postgresql://broker@db.example.org/broker?sslmode=require",
        ] {
            let err = FileConfig {
                database: url.into(),
                ..FileConfig::default()
            }
            .into_config("h")
            .unwrap_err();
            assert!(err.starts_with("database: "), "{url}: {err}");
            assert!(err.contains("host=/run/postgresql"), "{url}: {err}");
            assert!(!err.contains("pw"), "{url}: {err}");
        }
        let ok = FileConfig {
            database: "postgres://broker@db.example.org/broker?sslmode=verify-full".into(),
            ..FileConfig::default()
        }
        .into_config("h")
        .unwrap();
        assert!(ok.database.ends_with("verify-full"));
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../deploy/config/broker.example.toml");
        let file: FileConfig = common::daemon::parse_toml(text).unwrap();
        file.into_config("h").unwrap();
    }
}
