//! Configuration: the original server's TOML keys and flags, plus ours, validated once.
//!
//! Every key is documented in `deploy/config/remo-serv.example.toml`. Keys are hyphenated like
//! the original's (`user-service`, `key-file`), so an original TOML file loads unchanged.

use common::metrics::MetricsListen;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default TCP port (the original's).
pub const DEFAULT_PORT: u16 = 8080;
/// Default bind address: loopback (the original bound every interface).
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Default session idle timeout (the original's `-s`).
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 600;
/// Default user service (the original's).
pub const DEFAULT_USER_SERVICE: &str = "SqliteUserService:users_db.sqlite";
/// Default server key file (the original's).
pub const DEFAULT_KEY_FILE: &str = "remo_serv_key.pem";
/// Largest one-token body (plaintext) accepted, and largest first token of any body.
pub const DEFAULT_MAX_BODY: u64 = 4 << 20;
/// Largest `/cmd` output kept.
pub const DEFAULT_MAX_OUTPUT: u64 = 64 << 20;
/// Most logged-in sessions at once.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;
/// Most authenticated connections at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Most authenticated connections one user holds; one more closes their oldest.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 16;
/// Seconds after which a connection is closed (after the request in progress): a day, as the
/// other daemons' `max_connection_age_secs`.
pub const DEFAULT_MAX_CONNECTION_AGE_SECS: u64 = common::tls::DEFAULT_MAX_CONNECTION_AGE.as_secs();
/// Most sessions one user holds; a login beyond ends their oldest.
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 8;
/// Login attempts one source address may make in a burst...
pub const DEFAULT_LOGIN_BURST: u32 = 20;
/// ...and a minute after that.
pub const DEFAULT_LOGINS_PER_MINUTE: u32 = 60;
/// Seconds an unverified body (an `/auth` body, the first token of any body) may take in all.
/// Body tokens expire 10 s after they were made, so a slower one is refused anyway.
pub const DEFAULT_UNVERIFIED_BODY_TIMEOUT_SECS: u64 = 10;
/// Unverified-body bytes per session, in first tokens of `max-body` (the default allows two).
pub const DEFAULT_UNVERIFIED_TOKENS_PER_SESSION: usize = 2;
/// Unverified-body bytes server-wide, in first tokens of `max-body`.
pub const DEFAULT_UNVERIFIED_TOKENS: usize = 8;
/// Seconds from TCP accept to the first authenticated request (a login that verified, or a
/// request on a valid session); a connection still unauthenticated then is closed.
pub const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 10;

/// The TOML file, as written (every key optional).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct FileConfig {
    /// TCP port.
    pub port: Option<u16>,
    /// Bind address.
    pub host: Option<IpAddr>,
    /// Session idle timeout, seconds.
    pub timeout: Option<u64>,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log: Option<String>,
    /// Debug logging.
    pub debug: Option<bool>,
    /// `SqliteUserService:PATH`.
    pub user_service: Option<String>,
    /// Server Ed448 private key (PKCS#8 PEM, unencrypted).
    pub key_file: Option<PathBuf>,
    /// HTTPS certificate chain (PEM); with `tls-key`, the server speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// HTTPS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Working directory of commands and base of relative file names.
    pub workdir: Option<PathBuf>,
    /// Directories `/get` and `/put` may touch.
    pub file_roots: Option<Vec<PathBuf>>,
    /// Seconds a `/cmd` may run (0: no limit).
    pub command_timeout: Option<u64>,
    /// Largest request body in Content-Length mode, bytes.
    pub max_body: Option<u64>,
    /// Largest `/cmd` output, bytes.
    pub max_output: Option<u64>,
    /// Most logged-in sessions.
    pub max_sessions: Option<usize>,
    /// Most authenticated connections.
    pub max_connections: Option<usize>,
    /// Most authenticated connections of one user.
    pub max_connections_per_user: Option<usize>,
    /// Seconds after which a connection is closed after the request in progress.
    pub max_connection_age: Option<u64>,
    /// fsync uploads before renaming them into place.
    pub put_fsync: Option<bool>,
    /// Milliseconds `/icm` and `/idt` wait for output.
    pub interactive_wait_ms: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL for stopped commands.
    pub kill_grace: Option<u64>,
    /// Seconds a client may take to send request headers.
    pub header_timeout: Option<u64>,
    /// Seconds a request body may stall between two pieces.
    pub body_timeout: Option<u64>,
    /// Seconds to let requests finish on SIGTERM.
    pub drain_grace: Option<u64>,
    /// Most connections not authenticated yet.
    pub max_handshakes: Option<usize>,
    /// Most of those from one source address (IPv4 address or IPv6 /64).
    pub max_handshakes_per_address: Option<usize>,
    /// Seconds from accept to the first authenticated request.
    pub auth_timeout: Option<u64>,
    /// Most sessions of one user.
    pub max_sessions_per_user: Option<usize>,
    /// Login attempts per source address in a burst.
    pub login_burst: Option<u32>,
    /// Login attempts per source address and minute, after the burst.
    pub logins_per_minute: Option<u32>,
    /// Seconds an unverified body may take in all.
    pub unverified_body_timeout: Option<u64>,
    /// Bytes of unverified bodies held at once, server-wide.
    pub unverified_bytes: Option<u64>,
    /// Bytes of unverified bodies held at once for one session.
    pub unverified_bytes_per_session: Option<u64>,
    /// The local metrics listener (`GET /metrics`): `127.0.0.1:PORT`, `[::1]:PORT` or
    /// `unix:/abs/path`; off when absent. Hyphenated like every key of this file; the other
    /// daemons' spelling, `metrics_listen`, is accepted too.
    #[serde(alias = "metrics_listen")]
    pub metrics_listen: Option<MetricsListen>,
}

/// Validated configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Session idle timeout.
    pub session_timeout: Duration,
    /// SQLite user database.
    pub users_db: PathBuf,
    /// Server Ed448 key file.
    pub key_file: PathBuf,
    /// HTTPS certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Working directory.
    pub workdir: PathBuf,
    /// File roots (relative ones against `workdir`).
    pub file_roots: Vec<PathBuf>,
    /// `/cmd` time limit.
    pub command_timeout: Option<Duration>,
    /// Content-Length body cap.
    pub max_body: u64,
    /// `/cmd` output cap.
    pub max_output: u64,
    /// Logged-in session cap.
    pub max_sessions: usize,
    /// Authenticated-connection cap.
    pub max_connections: usize,
    /// Authenticated connections of one user.
    pub max_connections_per_user: usize,
    /// Age at which a connection is closed after the request in progress.
    pub max_connection_age: Duration,
    /// fsync uploads.
    pub put_fsync: bool,
    /// `/icm`, `/idt` output wait.
    pub interactive_wait: Duration,
    /// SIGTERM → SIGKILL grace.
    pub kill_grace: Duration,
    /// Header read deadline.
    pub header_timeout: Duration,
    /// Body stall deadline.
    pub body_timeout: Duration,
    /// Drain grace on SIGTERM.
    pub drain_grace: Duration,
    /// Unauthenticated-connection cap.
    pub max_handshakes: usize,
    /// Unauthenticated-connection cap per source address.
    pub max_handshakes_per_address: usize,
    /// Accept to first authenticated request.
    pub auth_timeout: Duration,
    /// Sessions of one user.
    pub max_sessions_per_user: usize,
    /// Login attempts per address in a burst.
    pub login_burst: u32,
    /// Login attempts per address and minute after the burst.
    pub logins_per_minute: u32,
    /// Total deadline of an unverified body.
    pub unverified_body_timeout: Duration,
    /// Unverified-body bytes server-wide (`None`: [`DEFAULT_UNVERIFIED_TOKENS`] first tokens).
    pub unverified_bytes: Option<usize>,
    /// Unverified-body bytes per session (`None`: [`DEFAULT_UNVERIFIED_TOKENS_PER_SESSION`]
    /// first tokens).
    pub unverified_bytes_per_session: Option<usize>,
    /// See [`FileConfig::metrics_listen`].
    pub metrics_listen: Option<MetricsListen>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(DEFAULT_HOST, DEFAULT_PORT),
            session_timeout: Duration::from_secs(DEFAULT_SESSION_TIMEOUT_SECS),
            users_db: PathBuf::from("users_db.sqlite"),
            key_file: PathBuf::from(DEFAULT_KEY_FILE),
            tls: None,
            workdir: PathBuf::from("."),
            file_roots: vec![PathBuf::from(".")],
            command_timeout: None,
            max_body: DEFAULT_MAX_BODY,
            max_output: DEFAULT_MAX_OUTPUT,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            max_connection_age: Duration::from_secs(DEFAULT_MAX_CONNECTION_AGE_SECS),
            put_fsync: true,
            interactive_wait: Duration::from_millis(100),
            kill_grace: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            drain_grace: Duration::from_secs(10),
            max_handshakes: common::admission::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: common::admission::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            auth_timeout: Duration::from_secs(DEFAULT_AUTH_TIMEOUT_SECS),
            max_sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
            login_burst: DEFAULT_LOGIN_BURST,
            logins_per_minute: DEFAULT_LOGINS_PER_MINUTE,
            unverified_body_timeout: Duration::from_secs(DEFAULT_UNVERIFIED_BODY_TIMEOUT_SECS),
            unverified_bytes: None,
            unverified_bytes_per_session: None,
            metrics_listen: None,
        }
    }
}

/// Characters of the Fernet token carrying `plain` bytes of plaintext (base64 of version,
/// time, IV, the padded ciphertext and the MAC).
pub fn token_len(plain: u64) -> u64 {
    let raw = 1 + 8 + 16 + (plain / 16 + 1) * 16 + 32;
    raw.div_ceil(3) * 4
}

impl Config {
    /// Longest first token of a body (one-token bodies are nothing else): a token of
    /// `max_body` bytes of payload, its header and path hash, and a line break.
    pub fn max_first_token(&self) -> usize {
        let header = (crate::proto::HEADER_LEN + 48) as u64;
        usize::try_from(token_len(self.max_body.saturating_add(header)).saturating_add(2))
            .unwrap_or(usize::MAX)
    }

    /// The unverified-body budget: `(server-wide, per session)` bytes.
    pub fn unverified_budget(&self) -> (usize, usize) {
        let token = self.max_first_token();
        let per_session = self
            .unverified_bytes_per_session
            .unwrap_or_else(|| token.saturating_mul(DEFAULT_UNVERIFIED_TOKENS_PER_SESSION));
        let total = self
            .unverified_bytes
            .unwrap_or_else(|| token.saturating_mul(DEFAULT_UNVERIFIED_TOKENS));
        (total, per_session)
    }

    /// The front door: unauthenticated connections in a small pool of their own (capped per
    /// address, closed at `auth_timeout`), `max_connections` for authenticated ones.
    pub fn admission(&self) -> common::admission::Limits {
        common::admission::Limits {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_address: self.max_handshakes_per_address,
            deadline: self.auth_timeout,
        }
    }
}

impl Config {
    /// Checks what depends on more than one key.
    ///
    /// # Errors
    /// A message naming the keys.
    pub fn checked(self) -> Result<Self, String> {
        let (total, per_session) = self.unverified_budget();
        let token = self.max_first_token();
        if per_session < token {
            return Err(format!(
                "unverified-bytes-per-session ({per_session}) must hold one first token of max-body ({token} bytes): raise it with max-body"
            ));
        }
        if total < per_session {
            return Err(format!(
                "unverified-bytes ({total}) must be at least unverified-bytes-per-session ({per_session})"
            ));
        }
        Ok(self)
    }
}

impl FileConfig {
    /// Validates the file's values over the defaults.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn into_config(self) -> Result<Config, String> {
        let defaults = Config::default();
        let users_db = crate::users::parse_user_service(
            self.user_service.as_deref().unwrap_or(DEFAULT_USER_SERVICE),
        )
        .map_err(|e| format!("user-service: {e}"))?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("tls-cert and tls-key go together".into()),
        };
        let timeout = self.timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT_SECS);
        if timeout == 0 {
            return Err("timeout must be at least 1 second".into());
        }
        let positive = |name: &str, value: Option<u64>, default: u64| match value {
            Some(0) => Err(format!("{name} must be positive")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let file_roots = self.file_roots.unwrap_or(defaults.file_roots);
        if file_roots.is_empty() {
            return Err("file-roots must name at least one directory".into());
        }
        Config {
            listen: SocketAddr::new(
                self.host.unwrap_or(DEFAULT_HOST),
                self.port.unwrap_or(DEFAULT_PORT),
            ),
            session_timeout: Duration::from_secs(timeout),
            users_db,
            key_file: self.key_file.unwrap_or(defaults.key_file),
            tls,
            workdir: self.workdir.unwrap_or(defaults.workdir),
            file_roots,
            command_timeout: self
                .command_timeout
                .filter(|&secs| secs > 0)
                .map(Duration::from_secs),
            max_body: positive("max-body", self.max_body, DEFAULT_MAX_BODY)?,
            max_output: positive("max-output", self.max_output, DEFAULT_MAX_OUTPUT)?,
            max_sessions: positive(
                "max-sessions",
                self.max_sessions.map(|v| v as u64),
                DEFAULT_MAX_SESSIONS as u64,
            )? as usize,
            max_connections: positive(
                "max-connections",
                self.max_connections.map(|v| v as u64),
                DEFAULT_MAX_CONNECTIONS as u64,
            )? as usize,
            max_connections_per_user: positive(
                "max-connections-per-user",
                self.max_connections_per_user.map(|v| v as u64),
                DEFAULT_MAX_CONNECTIONS_PER_USER as u64,
            )? as usize,
            max_connection_age: Duration::from_secs(positive(
                "max-connection-age",
                self.max_connection_age,
                DEFAULT_MAX_CONNECTION_AGE_SECS,
            )?),
            put_fsync: self.put_fsync.unwrap_or(defaults.put_fsync),
            interactive_wait: Duration::from_millis(self.interactive_wait_ms.unwrap_or(100)),
            kill_grace: Duration::from_secs(self.kill_grace.unwrap_or(5)),
            header_timeout: Duration::from_secs(positive(
                "header-timeout",
                self.header_timeout,
                10,
            )?),
            body_timeout: Duration::from_secs(positive("body-timeout", self.body_timeout, 30)?),
            drain_grace: Duration::from_secs(self.drain_grace.unwrap_or(10)),
            max_handshakes: positive(
                "max-handshakes",
                self.max_handshakes.map(|v| v as u64),
                defaults.max_handshakes as u64,
            )? as usize,
            max_handshakes_per_address: positive(
                "max-handshakes-per-address",
                self.max_handshakes_per_address.map(|v| v as u64),
                defaults.max_handshakes_per_address as u64,
            )? as usize,
            auth_timeout: Duration::from_secs(positive(
                "auth-timeout",
                self.auth_timeout,
                DEFAULT_AUTH_TIMEOUT_SECS,
            )?),
            max_sessions_per_user: positive(
                "max-sessions-per-user",
                self.max_sessions_per_user.map(|v| v as u64),
                DEFAULT_MAX_SESSIONS_PER_USER as u64,
            )? as usize,
            login_burst: positive(
                "login-burst",
                self.login_burst.map(u64::from),
                u64::from(DEFAULT_LOGIN_BURST),
            )? as u32,
            logins_per_minute: positive(
                "logins-per-minute",
                self.logins_per_minute.map(u64::from),
                u64::from(DEFAULT_LOGINS_PER_MINUTE),
            )? as u32,
            unverified_body_timeout: Duration::from_secs(positive(
                "unverified-body-timeout",
                self.unverified_body_timeout,
                DEFAULT_UNVERIFIED_BODY_TIMEOUT_SECS,
            )?),
            unverified_bytes: self
                .unverified_bytes
                .map(|v| positive("unverified-bytes", Some(v), 0))
                .transpose()?
                .map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
            unverified_bytes_per_session: self
                .unverified_bytes_per_session
                .map(|v| positive("unverified-bytes-per-session", Some(v), 0))
                .transpose()?
                .map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
            metrics_listen: self.metrics_listen,
        }
        .checked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_toml_loads_and_validates() {
        let file: FileConfig = common::daemon::parse_toml(
            "port = 9000\nhost = \"0.0.0.0\"\ntimeout = 30\n\"user-service\" = \"SqliteUserService:/var/lib/remo/users.sqlite\"\n\"key-file\" = \"/etc/remo/remo_serv_key.pem\"\n",
        )
        .unwrap();
        let config = file.into_config().unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.session_timeout, Duration::from_secs(30));
        assert_eq!(config.users_db, PathBuf::from("/var/lib/remo/users.sqlite"));
        let defaults = FileConfig::default().into_config().unwrap();
        assert_eq!(defaults.listen.to_string(), "127.0.0.1:8080");
        assert!(common::daemon::parse_toml::<FileConfig>("prot = 1").is_err());
        let bad = |text: &str| {
            common::daemon::parse_toml::<FileConfig>(text)
                .unwrap()
                .into_config()
                .unwrap_err()
        };
        assert!(bad("timeout = 0").contains("timeout"));
        assert!(bad("max-handshakes = 0").contains("max-handshakes"));
        assert!(bad("max-handshakes-per-address = 0").contains("max-handshakes-per-address"));
        assert!(bad("auth-timeout = 0").contains("auth-timeout"));
        let front = defaults.admission();
        assert_eq!(front.deadline, Duration::from_secs(10));
        assert_eq!(front.max_handshakes, 64);
        assert_eq!(front.max_handshakes_per_address, 8);
        assert_eq!(front.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(bad("\"tls-cert\" = \"a\"").contains("together"));
        assert!(bad("\"user-service\" = \"MemoryUserService:a\"").contains("user-service"));
        assert!(bad("\"file-roots\" = []").contains("file-roots"));
        assert!(bad("max-sessions-per-user = 0").contains("max-sessions-per-user"));
        assert!(bad("max-connections-per-user = 0").contains("max-connections-per-user"));
        assert!(bad("max-connection-age = 0").contains("max-connection-age"));
        assert_eq!(defaults.max_connections_per_user, 16);
        assert_eq!(defaults.max_connection_age, Duration::from_secs(86_400));
        assert!(bad("unverified-body-timeout = 0").contains("unverified-body-timeout"));
        assert!(bad("unverified-bytes-per-session = 1000").contains("max-body"));
        assert!(
            bad("unverified-bytes = 20000000\nunverified-bytes-per-session = 30000000")
                .contains("at least")
        );
        // Raising max-body raises the derived budgets with it.
        let big = common::daemon::parse_toml::<FileConfig>("max-body = 67108864")
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(big.unverified_budget().1, 2 * big.max_first_token());
    }

    #[test]
    fn token_lengths_match_fernet() {
        let cipher = crate::proto::Cipher::new(&[7u8; 32]);
        for plain in [0usize, 1, 15, 16, 54, 1000, 65_536] {
            assert_eq!(
                token_len(plain as u64) as usize,
                cipher.encrypt(&vec![0u8; plain]).len(),
                "{plain}"
            );
        }
        let defaults = Config::default();
        assert!(defaults.max_first_token() < 6 << 20);
        // The figures the example file gives.
        assert_eq!(defaults.unverified_budget(), (44_740_560, 11_185_140));
        assert_eq!(
            defaults.unverified_budget(),
            (
                8 * defaults.max_first_token(),
                2 * defaults.max_first_token()
            )
        );
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_takes_either_spelling() {
        let config = FileConfig::default().into_config().unwrap();
        assert_eq!(config.metrics_listen, None);
        for text in [
            "\"metrics-listen\" = \"127.0.0.1:9102\"",
            "metrics_listen = \"127.0.0.1:9102\"",
        ] {
            let file: FileConfig = common::daemon::parse_toml(text).unwrap();
            assert_eq!(
                file.into_config().unwrap().metrics_listen,
                Some(MetricsListen::Tcp("127.0.0.1:9102".parse().unwrap())),
                "{text}"
            );
        }
        assert!(
            common::daemon::parse_toml::<FileConfig>("\"metrics-listen\" = \"localhost:1\"")
                .is_err()
        );
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../../../deploy/config/remo-serv.example.toml");
        let file: FileConfig = common::daemon::parse_toml(text).unwrap();
        file.into_config().unwrap();
    }
}
