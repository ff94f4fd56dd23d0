//! Configuration: the TOML file (every key documented in
//! `deploy/config/secure-talk.example.toml`), validated once into [`Config`].

use common::metrics::MetricsListen;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tls::{ClientAuth, PeerIdentity, TlsSection};

use crate::dialect::Dialect;

/// Default TCP listener (the original's port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8445";
/// Default state directory (IPC socket, uploads) when none is configured.
pub const DEFAULT_STATE_DIR: &str = ".";
/// Default mode of the Unix-socket listener.
pub const DEFAULT_UNIX_MODE: u32 = 0o660;
/// Default token lifetime.
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;
/// Default pipe program.
pub const DEFAULT_PIPE_PROGRAM: &str = "secure-talk-pipe";
/// Default pipe argument template.
pub const DEFAULT_PIPE_ARGS: [&str; 4] = ["-i", "{id}", "-u", "{ipc_socket}"];

/// Every size and time bound, with its default.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most authenticated TCP connections (TLS handshake done); more are closed at once.
    /// Connections still in the handshake have their own pool (`[tls] max_handshakes`).
    pub max_connections: usize,
    /// Most distinct client ids with a live websocket.
    pub max_clients: usize,
    /// Most pipes one client id may own.
    pub max_pipes_per_client: usize,
    /// Most pipes on the server.
    pub max_pipes: usize,
    /// Pipes one identity (client certificate, local uid, or address without a certificate)
    /// may own across all its client ids.
    pub max_pipes_per_identity: usize,
    /// Bytes of frames queued towards one pipe (what the owner sends it) before `send` and
    /// `property` get 503.
    pub pipe_queue_bytes: usize,
    /// Largest create request (its JSON) and property a pipe keeps.
    pub max_pipe_spec_bytes: usize,
    /// Largest websocket text message on the admin channel, largest headers JSON of a binary
    /// one, and largest binary message that is not a `model` upload (held in memory), in
    /// bytes; a longer message closes the connection with 1009.
    pub max_message_bytes: usize,
    /// Largest `model` upload payload in bytes (streamed to disk, not held in memory).
    pub max_upload_bytes: usize,
    /// Largest `model_info.json`, in bytes: an upload that would make it larger is refused
    /// (413) and the file is left as it was; a larger file found on disk is neither pushed
    /// nor rewritten.
    pub max_model_info_bytes: usize,
    /// Largest IPC frame from a pipe, header included, in bytes.
    pub max_ipc_frame_bytes: usize,
    /// Largest HTTP request head in bytes.
    pub max_header_bytes: usize,
    /// Seconds to send an HTTP request head, and between requests on a kept-alive connection.
    pub request_timeout_secs: u64,
    /// Seconds between server pings on a websocket.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the peer (pongs count) before a websocket is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a spawned pipe has to check in on the IPC socket before it is killed.
    pub pipe_checkin_timeout_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when a pipe is destroyed or the server stops.
    pub kill_grace_secs: u64,
    /// Seconds a pipe may live while its owner has no connection (0: forever).
    pub orphan_pipe_timeout_secs: u64,
    /// Outgoing messages queued per websocket before the sender waits (data) or drops (admin).
    pub send_queue: usize,
    /// Bytes of pipe output queued per data channel before the pipe waits (a message larger
    /// than this waits for an empty queue and goes alone).
    pub send_queue_bytes: usize,
    /// Seconds to let connections finish after SIGTERM.
    pub drain_grace_secs: u64,
    /// Most open connections on the Unix socket, a pool apart from the TCP ones.
    pub max_local_connections: usize,
    /// Bytes of incoming messages held in memory by all connections together (text and
    /// binary messages being received, upload headers and spool buffers); a connection that
    /// would take more is closed with 1013.
    pub max_bytes_in_flight: usize,
    /// Of those, what the connections of one party (a certificate, a local uid, an address)
    /// may hold together; a connection that would take more is closed with 1013. A value
    /// above `max_bytes_in_flight` is the whole budget.
    pub max_bytes_in_flight_per_identity: usize,
    /// Seconds a message (all its frames) has to arrive, from its first frame header; a
    /// message not finished by then closes the connection with 1008. `model` uploads are held
    /// to `min_upload_bytes_per_sec` instead.
    pub message_timeout_secs: u64,
    /// Least average rate of a `model` upload, in bytes per second from its first frame
    /// header, once it is `message_timeout_secs` old; a slower one closes with 1008.
    pub min_upload_bytes_per_sec: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_clients: 512,
            max_pipes_per_client: 16,
            max_pipes: 256,
            max_pipes_per_identity: 64,
            pipe_queue_bytes: 1 << 20,
            max_pipe_spec_bytes: 16 << 10,
            max_message_bytes: 1 << 20,
            max_upload_bytes: 256 << 20,
            max_model_info_bytes: 1 << 20,
            max_ipc_frame_bytes: 16 << 20,
            max_header_bytes: 16 << 10,
            request_timeout_secs: 30,
            ping_interval_secs: 30,
            idle_timeout_secs: 90,
            pipe_checkin_timeout_secs: 10,
            kill_grace_secs: 5,
            orphan_pipe_timeout_secs: 24 * 3600,
            send_queue: 256,
            send_queue_bytes: 4 << 20,
            drain_grace_secs: 10,
            max_local_connections: common::admission::DEFAULT_MAX_LOCAL_CONNECTIONS,
            max_bytes_in_flight: 64 << 20,
            max_bytes_in_flight_per_identity: 16 << 20,
            message_timeout_secs: 30,
            min_upload_bytes_per_sec: 16 << 10,
        }
    }
}

impl Limits {
    /// HTTP request head deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    /// Ping period.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }
    /// Idle deadline.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// Deadline of one incoming message.
    pub fn message_timeout(&self) -> Duration {
        Duration::from_secs(self.message_timeout_secs)
    }
    /// Check-in deadline.
    pub fn pipe_checkin_timeout(&self) -> Duration {
        Duration::from_secs(self.pipe_checkin_timeout_secs)
    }
    /// SIGTERM → SIGKILL grace.
    pub fn kill_grace(&self) -> Duration {
        Duration::from_secs(self.kill_grace_secs)
    }
    /// Drain grace.
    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.drain_grace_secs)
    }
    /// Orphan deadline, `None` for never.
    pub fn orphan_pipe_timeout(&self) -> Option<Duration> {
        (self.orphan_pipe_timeout_secs > 0)
            .then(|| Duration::from_secs(self.orphan_pipe_timeout_secs))
    }
}

/// The TOML file as written.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// TCP address for HTTPS and WSS; `""` disables the TCP listener.
    pub listen: Option<String>,
    /// TLS material for the TCP listener.
    pub tls: Option<TlsSection>,
    /// Whether TCP clients must present a certificate (default true).
    pub require_client_cert: Option<bool>,
    /// Plain HTTP and WS on this Unix socket path.
    pub unix_socket: Option<PathBuf>,
    /// Octal mode of the Unix socket, e.g. `"0660"`.
    pub unix_socket_mode: Option<String>,
    /// Directory for the IPC socket and uploads (relative paths below are taken from it).
    pub state_dir: Option<PathBuf>,
    /// The pipes' IPC socket.
    pub ipc_socket: Option<PathBuf>,
    /// Where `model` uploads go.
    pub upload_dir: Option<PathBuf>,
    /// 0600 file holding the JWT key; absent: a random key per start.
    pub token_key_file: Option<PathBuf>,
    /// Token lifetime in seconds.
    pub token_lifetime_secs: Option<u64>,
    /// Program spawned per pipe.
    pub pipe_program: Option<String>,
    /// Its arguments; `{id}`, `{ipc_socket}`, `{ipc_fd}` and `{create.FIELD}` are replaced.
    pub pipe_args: Option<Vec<String>>,
    /// The IPC dialect the pipe program speaks (`kmb` or `dlafs`).
    pub ipc_dialect: Option<Dialect>,
    /// Client-certificate identities that may list everything and disconnect clients.
    pub admin_subjects: Option<Vec<String>>,
    /// Bounds.
    pub limits: Option<Limits>,
    /// Log filter.
    pub log: Option<String>,
    /// The local metrics listener (`GET /metrics`): `127.0.0.1:PORT`, `[::1]:PORT` or
    /// `unix:/abs/path`; off when absent. Off loopback is a warning.
    pub metrics_listen: Option<MetricsListen>,
}

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// An admin identity pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminSubject {
    /// Subject common name (`CN=name` or bare `name`).
    Cn(String),
    /// SHA-256 fingerprint of the certificate (`sha256:HEX`).
    Sha256(String),
}

impl AdminSubject {
    /// Parses `CN=name`, `sha256:HEX` or a bare common name.
    ///
    /// # Errors
    /// An empty pattern or a fingerprint that is not 64 hex digits.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let text = text.trim();
        if let Some(hex) = text.strip_prefix("sha256:") {
            let hex = hex.replace(':', "").to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError(format!(
                    "admin subject {text:?}: sha256 needs 64 hex digits"
                )));
            }
            return Ok(Self::Sha256(hex));
        }
        let cn = text.strip_prefix("CN=").unwrap_or(text);
        if cn.is_empty() {
            return Err(ConfigError("empty admin subject".into()));
        }
        Ok(Self::Cn(cn.to_owned()))
    }

    /// Whether a verified certificate identity matches.
    pub fn matches(&self, identity: &PeerIdentity) -> bool {
        match self {
            Self::Cn(cn) => identity.cn.as_deref() == Some(cn.as_str()),
            Self::Sha256(hex) => identity.sha256 == *hex,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP listener address, if any.
    pub listen: Option<SocketAddr>,
    /// TLS section for TCP (required when `listen` is set).
    pub tls: Option<TlsSection>,
    /// Client-certificate policy on TCP.
    pub client_auth: ClientAuth,
    /// Unix-socket listener path, if any.
    pub unix_socket: Option<PathBuf>,
    /// Its mode.
    pub unix_socket_mode: u32,
    /// IPC socket path.
    pub ipc_socket: PathBuf,
    /// Upload directory.
    pub upload_dir: PathBuf,
    /// JWT key file.
    pub token_key_file: Option<PathBuf>,
    /// Token lifetime.
    pub token_lifetime: Duration,
    /// Pipe program.
    pub pipe_program: String,
    /// Pipe argument template (checked by [`crate::argv::Template::parse`]).
    pub pipe_args: Vec<String>,
    /// The IPC dialect of the pipe program.
    pub ipc_dialect: Dialect,
    /// Admin identities.
    pub admin_subjects: Vec<AdminSubject>,
    /// Bounds.
    pub limits: Limits,
    /// See [`FileConfig::metrics_listen`].
    pub metrics_listen: Option<MetricsListen>,
}

impl Config {
    /// A configuration for tests and embedders: no listeners, everything under `state_dir`.
    pub fn local(state_dir: &Path) -> Self {
        Self {
            listen: None,
            tls: None,
            client_auth: ClientAuth::Required,
            unix_socket: None,
            unix_socket_mode: DEFAULT_UNIX_MODE,
            ipc_socket: state_dir.join("ipc.sock"),
            upload_dir: state_dir.join("uploads"),
            token_key_file: None,
            token_lifetime: Duration::from_secs(DEFAULT_TOKEN_LIFETIME_SECS),
            pipe_program: DEFAULT_PIPE_PROGRAM.to_owned(),
            pipe_args: DEFAULT_PIPE_ARGS.iter().map(|s| (*s).to_owned()).collect(),
            ipc_dialect: Dialect::Kmb,
            admin_subjects: Vec::new(),
            limits: Limits::default(),
            metrics_listen: None,
        }
    }

    /// Whether a certificate identity is an admin.
    pub fn is_admin(&self, identity: Option<&PeerIdentity>) -> bool {
        identity.is_some_and(|id| self.admin_subjects.iter().any(|s| s.matches(id)))
    }
}

impl FileConfig {
    /// Validates the file into a [`Config`].
    ///
    /// # Errors
    /// A bad address, mode or subject, no listener at all, TCP without TLS, or a zero limit.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let under = |p: PathBuf| {
            if p.is_absolute() {
                p
            } else {
                state_dir.join(p)
            }
        };
        let listen = match self.listen.as_deref().unwrap_or(DEFAULT_LISTEN).trim() {
            "" => None,
            text => Some(
                text.parse::<SocketAddr>()
                    .map_err(|e| ConfigError(format!("listen {text:?}: {e}")))?,
            ),
        };
        if listen.is_some() && self.tls.is_none() {
            return Err(ConfigError(
                "the TCP listener needs a [tls] section (cert, key, client_ca); set listen = \"\" to serve only the Unix socket".into(),
            ));
        }
        if listen.is_none() && self.unix_socket.is_none() {
            return Err(ConfigError(
                "nothing to serve: set listen, unix_socket or both".into(),
            ));
        }
        let unix_socket_mode = match self.unix_socket_mode.as_deref() {
            None => DEFAULT_UNIX_MODE,
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    ConfigError(format!("unix_socket_mode {text:?} is not an octal mode"))
                })?,
        };
        let client_auth = match self.require_client_cert {
            Some(false) => ClientAuth::Optional,
            _ => ClientAuth::Required,
        };
        let admin_subjects = self
            .admin_subjects
            .unwrap_or_default()
            .iter()
            .map(|s| AdminSubject::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = self.limits.unwrap_or_default();
        for (name, value) in [
            ("max_connections", limits.max_connections),
            ("max_clients", limits.max_clients),
            ("max_message_bytes", limits.max_message_bytes),
            ("max_ipc_frame_bytes", limits.max_ipc_frame_bytes),
            ("max_model_info_bytes", limits.max_model_info_bytes),
            ("max_header_bytes", limits.max_header_bytes),
            ("send_queue", limits.send_queue),
            ("send_queue_bytes", limits.send_queue_bytes),
            ("max_pipes_per_identity", limits.max_pipes_per_identity),
            ("pipe_queue_bytes", limits.pipe_queue_bytes),
            ("max_pipe_spec_bytes", limits.max_pipe_spec_bytes),
            ("max_local_connections", limits.max_local_connections),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("limits.{name} must be above 0")));
            }
        }
        // A zero ping period would panic every websocket task (tokio intervals need a period);
        // zero deadlines would time out every request, connection or pipe check-in at once.
        for (name, value) in [
            ("ping_interval_secs", limits.ping_interval_secs),
            ("idle_timeout_secs", limits.idle_timeout_secs),
            ("request_timeout_secs", limits.request_timeout_secs),
            ("message_timeout_secs", limits.message_timeout_secs),
            ("min_upload_bytes_per_sec", limits.min_upload_bytes_per_sec),
            (
                "pipe_checkin_timeout_secs",
                limits.pipe_checkin_timeout_secs,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("limits.{name} must be above 0")));
            }
        }
        // One message of the largest size, rounded up to the budget's steps, must fit.
        let least = limits
            .max_message_bytes
            .saturating_add(2 * crate::budget::STEP);
        if limits.max_bytes_in_flight < least {
            return Err(ConfigError(format!(
                "limits.max_bytes_in_flight must be at least max_message_bytes + 128 KiB ({least})"
            )));
        }
        if limits.max_bytes_in_flight_per_identity < least {
            return Err(ConfigError(format!(
                "limits.max_bytes_in_flight_per_identity must be at least max_message_bytes + 128 KiB ({least})"
            )));
        }
        if limits.max_ipc_frame_bytes < common::envelope::ipc::HEADER_LEN {
            return Err(ConfigError("limits.max_ipc_frame_bytes is below 8".into()));
        }
        let pipe_args = self
            .pipe_args
            .unwrap_or_else(|| DEFAULT_PIPE_ARGS.iter().map(|s| (*s).to_owned()).collect());
        crate::argv::Template::parse(&pipe_args).map_err(|e| ConfigError(e.to_string()))?;
        let token_lifetime = Duration::from_secs(
            self.token_lifetime_secs
                .unwrap_or(DEFAULT_TOKEN_LIFETIME_SECS),
        );
        if token_lifetime.is_zero() {
            return Err(ConfigError("token_lifetime_secs must be above 0".into()));
        }
        Ok(Config {
            listen,
            tls: self.tls,
            client_auth,
            unix_socket: self.unix_socket.map(under),
            unix_socket_mode,
            ipc_socket: under(
                self.ipc_socket
                    .unwrap_or_else(|| PathBuf::from("ipc/ipc.sock")),
            ),
            upload_dir: under(self.upload_dir.unwrap_or_else(|| PathBuf::from("uploads"))),
            token_key_file: self.token_key_file.map(under),
            token_lifetime,
            pipe_program: self
                .pipe_program
                .unwrap_or_else(|| DEFAULT_PIPE_PROGRAM.to_owned()),
            pipe_args,
            ipc_dialect: self.ipc_dialect.unwrap_or_default(),
            admin_subjects,
            limits,
            metrics_listen: self.metrics_listen,
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

    #[test]
    fn defaults_and_validation() {
        let config = parse("listen = \"\"\nunix_socket = \"/run/st.sock\"").unwrap();
        assert_eq!(config.listen, None);
        assert_eq!(config.unix_socket_mode, 0o660);
        assert_eq!(config.ipc_socket, PathBuf::from("./ipc/ipc.sock"));
        assert_eq!(config.client_auth, ClientAuth::Required);
        assert!(parse("").unwrap_err().0.contains("[tls]"));
        assert!(
            parse("listen = \"\"")
                .unwrap_err()
                .0
                .contains("nothing to serve")
        );
        assert!(parse("listen = \"\"\nunix_socket = \"s\"\nunix_socket_mode = \"999\"").is_err());
        assert!(parse("listen = \"\"\nunix_socket = \"s\"\nbogus = 1").is_err());
        let config = parse(
            "state_dir = \"/var/lib/st\"\nrequire_client_cert = false\nadmin_subjects = [\"CN=ops\", \"root\"]\n[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n[limits]\nmax_pipes = 3",
        )
        .unwrap();
        assert_eq!(config.listen, Some("127.0.0.1:8445".parse().unwrap()));
        assert_eq!(config.client_auth, ClientAuth::Optional);
        assert_eq!(config.upload_dir, PathBuf::from("/var/lib/st/uploads"));
        assert_eq!(config.limits.max_pipes, 3);
        assert_eq!(config.limits.max_clients, Limits::default().max_clients);
        assert_eq!(
            config.admin_subjects,
            vec![
                AdminSubject::Cn("ops".into()),
                AdminSubject::Cn("root".into())
            ]
        );
        assert!(AdminSubject::parse("sha256:abc").is_err());
        // The budget of bytes in flight must hold one message of the largest size.
        let small = "listen = \"\"\nunix_socket = \"s\"\n[limits]\nmax_bytes_in_flight = 1048576";
        assert!(parse(small).unwrap_err().0.contains("max_bytes_in_flight"));
        // And so must each party's share, which is part of it.
        let small = "listen = \"\"\nunix_socket = \"s\"\n[limits]\nmax_bytes_in_flight_per_identity = 1048576";
        assert!(
            parse(small)
                .unwrap_err()
                .0
                .contains("max_bytes_in_flight_per_identity")
        );
        // A share larger than the budget is the whole budget.
        let over = "listen = \"\"\nunix_socket = \"s\"\n[limits]\nmax_bytes_in_flight = 8388608";
        assert!(parse(over).is_ok());
        let zero = "listen = \"\"\nunix_socket = \"s\"\n[limits]\nmessage_timeout_secs = 0";
        assert!(parse(zero).unwrap_err().0.contains("message_timeout_secs"));
    }

    #[test]
    fn dialects_and_placeholders() {
        let base = "listen = \"\"\nunix_socket = \"s\"\n";
        assert_eq!(parse(base).unwrap().ipc_dialect, Dialect::Kmb);
        let dlafs = parse(&format!(
            "{base}ipc_dialect = \"dlafs\"\npipe_args = [\"-i\", \"{{id}}\", \"-l\", \"{{create.command_create.loop_times}}\"]"
        ))
        .unwrap();
        assert_eq!(dlafs.ipc_dialect, Dialect::Dlafs);
        assert!(parse(&format!("{base}ipc_dialect = \"json\"")).is_err());
        let err = parse(&format!("{base}pipe_args = [\"-l\", \"{{loop_times}}\"]")).unwrap_err();
        assert!(
            err.0.contains("pipe_args") && err.0.contains("{loop_times}"),
            "{err}"
        );
    }

    #[test]
    fn the_example_file_parses_and_validates() {
        let text = include_str!("../../../deploy/config/secure-talk.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.listen, Some(DEFAULT_LISTEN.parse().unwrap()));
    }
}
