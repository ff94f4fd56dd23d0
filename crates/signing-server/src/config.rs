//! Configuration: the TOML file (every key documented in
//! `deploy/config/signing-server.example.toml`), validated once into [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::metrics::MetricsListen;
use common::tls::TlsSection;

/// Default listener: the original's port, loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6000";
/// Default most files signed per request (the original's ten).
pub const DEFAULT_MAX_FILES: usize = 10;
/// Default deadline of one signature: 15 minutes, enough for a 64 GiB file read twice from a
/// slow NFS server at 150 MB/s.
pub const DEFAULT_SIGN_TIMEOUT_SECS: u64 = 900;
/// Default slowest average upload rate: 16 KiB/s.
pub const DEFAULT_MIN_UPLOAD_RATE: u64 = 16 << 10;

/// Bounds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most files signed per request; the rest of a directory is listed, not signed.
    pub max_files_per_request: usize,
    /// Longest path a client may send, in bytes.
    pub max_path_bytes: usize,
    /// Most entries of a directory listed (and considered for signing) per request.
    pub max_listing_entries: usize,
    /// Largest upload in bytes.
    pub max_upload_bytes: u64,
    /// Largest JSON request body in bytes.
    pub max_json_bytes: usize,
    /// Most open connections.
    pub max_connections: usize,
    /// Most signatures computed at once (each holds a core while it hashes).
    pub max_concurrent_signatures: usize,
    /// Seconds for the original protocol's path, and for an HTTP request head.
    pub request_timeout_secs: u64,
    /// Seconds an upload may stall between two pieces, and an answer between two writes.
    pub io_timeout_secs: u64,
    /// Seconds an external signing command may run.
    pub command_timeout_secs: u64,
    /// Seconds to let requests finish after SIGTERM.
    pub drain_grace_secs: u64,
    /// Seconds one signature may take (reading and hashing the content, or copying it for a
    /// signing command); then the request gets an error and the work is stopped.
    pub sign_timeout_secs: u64,
    /// Slowest average upload rate, in bytes per second, after the first `io_timeout_secs`:
    /// an upload (or content to verify) that falls behind is cut off with 408.
    pub min_upload_bytes_per_sec: u64,
    /// Largest content to verify for an identity with a `[[clients]]` rule.
    pub max_verify_bytes: u64,
    /// Largest content to verify for an identity without a rule (or without a certificate).
    pub max_verify_bytes_without_rule: u64,
    /// Most bytes all spool files together may hold (uploads being signed, copies for a
    /// signing command).
    pub max_spool_bytes: u64,
    /// Free space the spool always leaves on its file system (for the audit database).
    pub spool_reserve_bytes: u64,
    /// Seconds a request waits for its audit rows to be committed; then it is refused and no
    /// signature leaves (the rows may still be committed later).
    pub audit_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files_per_request: DEFAULT_MAX_FILES,
            max_path_bytes: 4096,
            max_listing_entries: 10_000,
            max_upload_bytes: 64 << 30,
            max_json_bytes: 64 << 10,
            max_connections: 256,
            max_concurrent_signatures: std::thread::available_parallelism().map_or(2, |n| n.get()),
            request_timeout_secs: 10,
            io_timeout_secs: 60,
            command_timeout_secs: 120,
            drain_grace_secs: 30,
            sign_timeout_secs: DEFAULT_SIGN_TIMEOUT_SECS,
            min_upload_bytes_per_sec: DEFAULT_MIN_UPLOAD_RATE,
            max_verify_bytes: 1 << 30,
            max_verify_bytes_without_rule: 16 << 20,
            max_spool_bytes: 64 << 30,
            spool_reserve_bytes: 512 << 20,
            audit_timeout_secs: 10,
        }
    }
}

impl Limits {
    /// Request deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    /// Stall deadline.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.io_timeout_secs)
    }
    /// External command deadline.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs)
    }
    /// Drain grace.
    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.drain_grace_secs)
    }
    /// Deadline of one signature.
    pub fn sign_timeout(&self) -> Duration {
        Duration::from_secs(self.sign_timeout_secs)
    }
    /// Deadline of an audit commit.
    pub fn audit_timeout(&self) -> Duration {
        Duration::from_secs(self.audit_timeout_secs)
    }
    /// How long a body may have taken once `received` bytes have arrived: the first
    /// `io_timeout_secs`, plus the time those bytes need at `min_upload_bytes_per_sec`.
    pub fn body_allowance(&self, received: u64) -> Duration {
        self.io_timeout()
            + Duration::from_secs_f64(received as f64 / self.min_upload_bytes_per_sec as f64)
    }
}

/// A signing key as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
pub enum KeySpec {
    /// The built-in Ed448 signer.
    Ed448 {
        /// Name clients are mapped to.
        name: String,
        /// PKCS#8 PEM private key, mode 0600.
        file: PathBuf,
    },
    /// An external `create_pkgsign`-compatible program.
    Command {
        /// Name clients are mapped to.
        name: String,
        /// The program (no shell).
        program: PathBuf,
        /// Its arguments; `{file}` is the file to sign, `{output}` a fresh file for the
        /// signature line (without `{output}`, the line is read from standard output).
        args: Vec<String>,
        /// The key id the program signs with (checked against its output).
        keyid: String,
        /// PEM public key served by `GET /v1/keys/{keyid}`.
        #[serde(default)]
        public_key: Option<PathBuf>,
    },
}

impl KeySpec {
    /// The configured name.
    pub fn name(&self) -> &str {
        match self {
            Self::Ed448 { name, .. } | Self::Command { name, .. } => name,
        }
    }
}

/// What a client identity may do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRule {
    /// Certificate subject CN, or `*` for any verified certificate.
    pub cn: String,
    /// Name of the key this identity signs with.
    pub key: String,
    /// Directories whose files it may have signed by path (none: uploads only).
    #[serde(default)]
    pub roots: Vec<PathBuf>,
}

/// The TOML file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Listen address.
    pub listen: Option<String>,
    /// Metrics listener (`/metrics` for Prometheus): `127.0.0.1:PORT`, `[::1]:PORT` or
    /// `unix:/abs/path`; absent: off.
    pub metrics_listen: Option<MetricsListen>,
    /// TLS material.
    pub tls: Option<TlsSection>,
    /// Directory for signatures.txt, the audit database and upload spool files.
    pub state_dir: Option<PathBuf>,
    /// The signatures file (relative to state_dir).
    pub signatures_file: Option<PathBuf>,
    /// The audit database: a SQLite file (relative to state_dir) or a `postgres://` URL.
    pub database: Option<String>,
    /// This instance's name, written on every audit row (default: the host name).
    pub instance: Option<String>,
    /// Start on PostgreSQL even when the role could undo the trail (superuser, owner, or
    /// UPDATE, DELETE, TRUNCATE on `signatures`): for a test database only.
    pub allow_privileged_role: bool,
    /// Signing keys.
    pub keys: Vec<KeySpec>,
    /// Identity rules, first match wins.
    pub clients: Vec<ClientRule>,
    /// Bounds.
    pub limits: Option<Limits>,
    /// Log filter.
    pub log: Option<String>,
}

/// Longest instance name.
pub const MAX_INSTANCE_LEN: usize = 64;

/// Where the audit trail lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, created 0600 when missing.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user:password@host:port/db?...`), shared by instances.
    Postgres(String),
}

impl Database {
    /// A `postgres://` or `postgresql://` URL, or else a SQLite file under `state_dir` (when
    /// relative).
    ///
    /// # Errors
    /// A PostgreSQL URL that does not parse, or that breaks `common::pgurl`'s rule (TCP
    /// without `sslmode=verify-full`, a world-writable socket directory); the message masks
    /// its password.
    pub fn parse(text: &str, state_dir: &std::path::Path) -> Result<Self, ConfigError> {
        if common::pgurl::is_postgres_url(text) {
            url::Url::parse(text)
                .map_err(|e| ConfigError(format!("database {}: {e}", masked_url(text))))?;
            common::pgurl::check(text)
                .map_err(|e| ConfigError(format!("database {}: {e}", masked_url(text))))?;
            return Ok(Self::Postgres(text.to_owned()));
        }
        if text.is_empty() {
            return Err(ConfigError("database must not be empty".into()));
        }
        let path = PathBuf::from(text);
        Ok(Self::Sqlite(if path.is_absolute() {
            path
        } else {
            state_dir.join(path)
        }))
    }
}

/// Shows the path, or the URL with its password as `***`.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&masked_url(url)),
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(_) => f.debug_tuple("Postgres").field(&self.to_string()).finish(),
        }
    }
}

/// `url` with its password (in the user part or a `password=` parameter) replaced by `***`;
/// an unparsable URL is shown as `postgres://***`.
pub fn masked_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "postgres://***".into();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("password") {
                "***".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if !pairs.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Checks an instance name: 1 to [`MAX_INSTANCE_LEN`] ASCII letters, digits, `.`, `-`, `_`.
///
/// # Errors
/// Any other name.
pub fn check_instance(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_INSTANCE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "instance {name:?}: 1 to {MAX_INSTANCE_LEN} letters, digits, '.', '-' or '_'"
        )))
    }
}

/// The host name (the default instance name): uname(2)'s node name, which the unit's
/// `ProcSubset=pid` leaves readable where it hides `/proc/sys/kernel/hostname`.
fn host_name() -> Option<String> {
    let name = rustix::system::uname().nodename().to_str().ok()?.to_owned();
    (!name.is_empty()).then_some(name)
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Metrics listener, if any.
    pub metrics_listen: Option<MetricsListen>,
    /// TLS material.
    pub tls: TlsSection,
    /// State directory.
    pub state_dir: PathBuf,
    /// signatures.txt.
    pub signatures_file: PathBuf,
    /// Audit database.
    pub database: Database,
    /// This instance's name, written on every audit row.
    pub instance: String,
    /// See [`FileConfig::allow_privileged_role`].
    pub allow_privileged_role: bool,
    /// Keys.
    pub keys: Vec<KeySpec>,
    /// Identity rules.
    pub clients: Vec<ClientRule>,
    /// Bounds.
    pub limits: Limits,
    /// systemd's `$CREDENTIALS_DIRECTORY`, set by the daemon's `main` (not a file key): key
    /// files there may show the group read bit systemd's ACL puts in their mode.
    pub credentials_dir: Option<PathBuf>,
}

impl Config {
    /// Checks that every rule's roots can be opened as directories now, as each request opens
    /// them (`open(O_RDONLY | O_DIRECTORY)`, symlinks followed): a missing root would
    /// otherwise be found only by the first request under it.
    ///
    /// # Errors
    /// The first rule whose root is missing, not a directory or not readable, with its path.
    pub fn check_roots(&self) -> Result<(), ConfigError> {
        for rule in &self.clients {
            for root in &rule.roots {
                if let Err(err) = std::fs::read_dir(root) {
                    return Err(ConfigError(format!(
                        "client {:?}: root {} cannot be opened as a directory: {err}",
                        rule.cn,
                        root.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The rule for a certificate CN (first match; `*` matches any).
    pub fn rule_for(&self, cn: Option<&str>) -> Option<&ClientRule> {
        self.clients
            .iter()
            .find(|rule| rule.cn == "*" || Some(rule.cn.as_str()) == cn)
    }
}

impl FileConfig {
    /// Validates the file.
    ///
    /// # Errors
    /// No TLS section, a bad address, no key, a rule naming an unknown key, duplicate names,
    /// relative roots, or a zero limit.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text
            .parse()
            .map_err(|e| ConfigError(format!("listen {listen_text:?}: {e}")))?;
        let tls = self.tls.ok_or_else(|| {
            ConfigError("a [tls] section (cert, key, client_ca) is required".into())
        })?;
        let state_dir = self.state_dir.unwrap_or_else(|| PathBuf::from("."));
        let under = |p: PathBuf| {
            if p.is_absolute() {
                p
            } else {
                state_dir.join(p)
            }
        };
        if self.keys.is_empty() {
            return Err(ConfigError(
                "no [[keys]]: configure at least one signing key".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for key in &self.keys {
            if !names.insert(key.name()) {
                return Err(ConfigError(format!("two keys are named {:?}", key.name())));
            }
        }
        for rule in &self.clients {
            if !names.contains(rule.key.as_str()) {
                return Err(ConfigError(format!(
                    "client {:?} uses key {:?}, which is not configured",
                    rule.cn, rule.key
                )));
            }
            if let Some(root) = rule.roots.iter().find(|r| !r.is_absolute()) {
                return Err(ConfigError(format!(
                    "client {:?}: root {} must be absolute",
                    rule.cn,
                    root.display()
                )));
            }
        }
        let defaulted = self.instance.is_none();
        let instance = match self.instance {
            Some(name) => name,
            None => host_name()
                .ok_or_else(|| ConfigError("the host name cannot be read: set instance".into()))?,
        };
        check_instance(&instance).map_err(|ConfigError(e)| {
            ConfigError(if defaulted {
                format!("{e} (the host name; set instance to another name)")
            } else {
                e
            })
        })?;
        let limits = self.limits.unwrap_or_default();
        for (name, value) in [
            ("io_timeout_secs", limits.io_timeout_secs),
            ("request_timeout_secs", limits.request_timeout_secs),
            ("command_timeout_secs", limits.command_timeout_secs),
            ("sign_timeout_secs", limits.sign_timeout_secs),
            ("audit_timeout_secs", limits.audit_timeout_secs),
            ("min_upload_bytes_per_sec", limits.min_upload_bytes_per_sec),
            ("max_verify_bytes", limits.max_verify_bytes),
            ("max_spool_bytes", limits.max_spool_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("limits.{name} must be above 0")));
            }
        }
        for (name, value) in [
            ("max_files_per_request", limits.max_files_per_request),
            ("max_path_bytes", limits.max_path_bytes),
            ("max_listing_entries", limits.max_listing_entries),
            ("max_json_bytes", limits.max_json_bytes),
            ("max_connections", limits.max_connections),
            (
                "max_concurrent_signatures",
                limits.max_concurrent_signatures,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("limits.{name} must be above 0")));
            }
        }
        Ok(Config {
            listen,
            metrics_listen: self.metrics_listen,
            tls,
            signatures_file: under(
                self.signatures_file
                    .unwrap_or_else(|| PathBuf::from("signatures.txt")),
            ),
            database: Database::parse(
                self.database.as_deref().unwrap_or("audit.sqlite"),
                &state_dir,
            )?,
            instance,
            allow_privileged_role: self.allow_privileged_role,
            state_dir: state_dir.clone(),
            keys: self.keys,
            clients: self.clients,
            limits,
            credentials_dir: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        common::daemon::parse_toml::<FileConfig>(text)
            .map_err(|e| ConfigError(e.to_string()))?
            .into_config()
    }

    const BASE: &str = "[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n[[keys]]\ntype = \"ed448\"\nname = \"release\"\nfile = \"release.pem\"\n";

    #[test]
    fn validation() {
        let config = parse(&format!(
            "{BASE}[[clients]]\ncn = \"alice\"\nkey = \"release\"\nroots = [\"/srv\"]\n"
        ))
        .unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.limits.max_files_per_request, 10);
        assert_eq!(config.signatures_file, PathBuf::from("./signatures.txt"));
        assert!(config.rule_for(Some("alice")).is_some());
        assert!(config.rule_for(Some("bob")).is_none());
        assert!(parse(&format!("{BASE}[[clients]]\ncn = \"a\"\nkey = \"nope\"\n")).is_err());
        assert!(
            parse(&format!(
                "{BASE}[[clients]]\ncn = \"a\"\nkey = \"release\"\nroots = [\"rel\"]\n"
            ))
            .is_err()
        );
        assert!(
            parse("[tls]\ncert = \"c\"\n")
                .unwrap_err()
                .0
                .contains("no [[keys]]")
        );
        assert!(parse(&format!("{BASE}bogus = 1\n")).is_err());
        let command = parse(&format!("{BASE}[[keys]]\ntype = \"command\"\nname = \"aix\"\nprogram = \"/usr/sbin/create_pkgsign\"\nargs = [\"-a\", \"infile={{file}}\", \"{{output}}\"]\nkeyid = \"k1\"\n")).unwrap();
        assert_eq!(command.keys.len(), 2);
    }

    #[test]
    fn database_is_a_sqlite_file_or_a_postgres_url_whose_password_is_masked() {
        let config = parse(&format!("state_dir = \"/var/lib/s\"\n{BASE}")).unwrap();
        assert_eq!(
            config.database,
            Database::Sqlite("/var/lib/s/audit.sqlite".into())
        );
        let config = parse(&format!("database = \"/srv/a.db\"\n{BASE}")).unwrap();
        assert_eq!(config.database, Database::Sqlite("/srv/a.db".into()));
        let url = "postgres://svc:pa55word@db.example:5432/audit?sslmode=verify-full";
        let config = parse(&format!("database = {url:?}\n{BASE}")).unwrap();
        assert_eq!(config.database, Database::Postgres(url.into()));
        for shown in [
            config.database.to_string(),
            format!("{:?}", config.database),
            format!("{config:?}"),
        ] {
            assert!(!shown.contains("pa55word"), "{shown}");
        }
        assert_eq!(
            config.database.to_string(),
            "postgres://svc:***@db.example:5432/audit?sslmode=verify-full"
        );
        assert_eq!(
            masked_url("postgresql://svc@h/db?password=pa55word&host=/run"),
            "postgresql://svc@h/db?password=***&host=%2Frun"
        );
        let err = parse(&format!(
            "database = \"postgres://svc:pa55word@[bad/db\"\n{BASE}"
        ))
        .unwrap_err()
        .0;
        assert!(!err.contains("pa55word"), "{err}");
        assert!(parse(&format!("database = \"\"\n{BASE}")).is_err());
    }

    /// The URL rule of `common::pgurl` applies: plaintext TCP and a world-writable socket
    /// directory are refused, with the fix named and the password masked.
    #[test]
    fn a_postgres_url_must_verify_the_server_or_use_a_private_socket() {
        for url in [
            "postgres://svc:pa55word@db.example:5432/audit",
            "postgres://svc:pa55word@db.example:5432/audit?sslmode=require",
            "postgres://svc:pa55word@127.0.0.1/audit?sslmode=verify-ca",
            "postgres://svc:pa55word@db.example/audit?host=/tmp",
            // Any case of the scheme is a URL, not a SQLite file named after the password.
            "POSTGRES://svc:pa55word@db.example:5432/audit",
            "Postgresql://svc:pa55word@db.example:5432/audit?sslmode=require",
        ] {
            let err = parse(&format!("database = {url:?}\n{BASE}")).unwrap_err().0;
            assert!(!err.contains("pa55word"), "{err}");
            assert!(err.contains("host=/run/postgresql"), "{url}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("postgres:///audit?user=svc&host={}", dir.path().display());
        let config = parse(&format!("database = {url:?}\n{BASE}")).unwrap();
        assert_eq!(config.database, Database::Postgres(url));
    }

    #[test]
    fn instance_is_a_short_printable_name_defaulting_to_the_host_name() {
        let config = parse(BASE).unwrap();
        assert_eq!(Some(config.instance.clone()), host_name());
        assert!(check_instance(&config.instance).is_ok());
        let config = parse(&format!("instance = \"east-1.dc_2\"\n{BASE}")).unwrap();
        assert_eq!(config.instance, "east-1.dc_2");
        for bad in [
            "",
            "a b",
            "a\\nb",
            "café",
            &"x".repeat(MAX_INSTANCE_LEN + 1),
        ] {
            let err = parse(&format!("instance = \"{bad}\"\n{BASE}"))
                .unwrap_err()
                .0;
            assert!(err.contains("instance"), "{bad:?}: {err}");
        }
        assert!(
            parse(&format!(
                "instance = \"{}\"\n{BASE}",
                "x".repeat(MAX_INSTANCE_LEN)
            ))
            .is_ok()
        );
    }

    #[test]
    fn roots_must_be_directories_the_server_can_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let with_root = |root: &std::path::Path| {
            parse(&format!(
                "{BASE}[[clients]]\ncn = \"alice\"\nkey = \"release\"\nroots = [{root:?}]\n"
            ))
            .unwrap()
        };
        assert!(with_root(dir.path()).check_roots().is_ok());
        let missing = dir.path().join("missing");
        let err = with_root(&missing).check_roots().unwrap_err().0;
        assert!(err.contains("client \"alice\""), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("No such file or directory"), "{err}");
        let err = with_root(&file).check_roots().unwrap_err().0;
        assert!(err.contains("Not a directory"), "{err}");
        // Uploads only: nothing to open.
        assert!(parse(BASE).unwrap().check_roots().is_ok());
    }

    #[test]
    fn the_example_file_parses_and_validates() {
        let text = include_str!("../../../deploy/config/signing-server.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.keys.len(), 2);
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
    }
}
