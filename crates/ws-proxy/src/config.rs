//! The proxy's configuration: the TOML file ([`FileConfig`], every key documented in
//! `deploy/config/ws-proxy.example.toml`) and the validated [`Config`] the server runs with.
//!
//! Defaults are the named constants below; they keep the original proxy's de-facto protocol
//! constants (1 MiB messages, a ping every 10 s with a 10 s pong deadline).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::daemon::{ConfigError, LogFormat};
use common::metrics::MetricsListen;
use common::tls::{ClientAuth, TlsSection};
use serde::Deserialize;

use crate::auth::{Rule, RuleSpec, Rules};
use crate::front::{Net, PeerUsers, Peers};
use crate::listen::ListenAddr;

/// Default WSS listen address (the deploy example uses 0.0.0.0:5050).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
/// Default URL path prefix in front of every meet-up id.
pub const DEFAULT_URL_PREFIX: &str = "/micronets/v1/ws-proxy/";
/// Largest accepted message, after reassembly (the original's websockets default).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Longest meet-up id in bytes.
pub const DEFAULT_MAX_ID_BYTES: usize = 256;
/// Time a connection has between the upgrade and its HELLO.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the client has to send its HTTP upgrade request after the TLS handshake.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between the proxy's websocket pings.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Time a peer has to answer a ping.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a peer that takes longer than this drops the peer.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the proxy waits for the peer's close frame after sending its own.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Live connections, all states together.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Messages a waiting peer may send before its partner arrives.
pub const DEFAULT_WAITING_QUEUE_MESSAGES: usize = 64;
/// Bytes a waiting peer may send before its partner arrives.
pub const DEFAULT_WAITING_QUEUE_BYTES: usize = 1 << 20;
/// Bytes queued towards one peer before its partner's reads pause (backpressure).
pub const DEFAULT_RELAY_QUEUE_BYTES: usize = 2 << 20;
/// Largest HELLO, and the most a connection may send before its HELLO (a Micronets HELLO is a
/// few hundred bytes; the envelope needs no more).
pub const DEFAULT_MAX_HELLO_BYTES: usize = 64 * 1024;
/// Live connections of one client certificate (by SHA-256 fingerprint).
pub const DEFAULT_MAX_CONNECTIONS_PER_IDENTITY: usize = 1024;
/// Bytes held for all connections together: stored and queued HELLOs, waiting and relay queues,
/// messages being read. Work that would need more is refused (close 1013).
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 256 << 20;
/// Of those, bytes held for the connections of one client certificate (what they are sending,
/// what waits for them), so that one client cannot spend the whole budget.
pub const DEFAULT_MAX_BUFFERED_BYTES_PER_IDENTITY: usize = 64 << 20;
/// What a queued message costs beyond its payload, so that empty messages count too. A relay
/// queue must hold one largest message and this.
pub const QUEUE_OVERHEAD: usize = 64;
/// Longest `peerClass` or `peerId` kept from a HELLO (for the status page and logs); the HELLO
/// itself is forwarded whole.
pub const MAX_PEER_FIELD_BYTES: usize = 128;
/// tungstenite's read buffer per connection (allocated eagerly, so it is the idle cost).
pub const DEFAULT_READ_BUFFER_BYTES: usize = 4096;
/// tungstenite's write buffer target per connection.
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Connections the status listener serves at once; one more evicts the oldest connection not
/// being answered (the oldest, at any age), or is closed at once (`common::local_http`).
pub const DEFAULT_MAX_STATUS_CONNECTIONS: usize = 16;
/// Time a status connection has to send a request head (each one, on keep-alive).
pub const DEFAULT_STATUS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Age at which a status connection is closed after the request in progress; one
/// header timeout later it is dropped whatever it is doing.
pub const DEFAULT_STATUS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Mode of the status Unix socket: owner and group (the monitoring group) may connect.
pub const DEFAULT_STATUS_SOCKET_MODE: u32 = 0o660;
/// Grace period for live connections on SIGTERM.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

/// What happens to a peer whose partner leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPartnerLeave {
    /// Close the survivor with 1002 "the peer websocket disconnected" (the original).
    #[default]
    Close,
    /// Keep the survivor connected, waiting for a new partner (its HELLO is kept).
    Wait,
}

/// The TOML file, as written; [`Config::from_file`] validates it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// WSS listen address; absent: [`DEFAULT_LISTEN`] when `[tls]` is set (without `[tls]`
    /// there is no WSS listener, and `listen` is an error).
    pub listen: Option<String>,
    /// URL path prefix.
    pub url_prefix: String,
    /// Plain-HTTP status listener (`/status`, `/metrics`): `ADDR:PORT` or `unix:PATH`;
    /// absent: off.
    pub status_listen: Option<String>,
    /// Octal mode of the status Unix socket (default `0660`).
    pub status_socket_mode: Option<String>,
    /// Metrics listener (`/metrics` only, for Prometheus): `127.0.0.1:PORT`, `[::1]:PORT` or
    /// `unix:/abs/path`; absent: off.
    pub metrics_listen: Option<MetricsListen>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter directives.
    pub log_filter: Option<String>,
    /// Seconds live connections may take to finish on SIGTERM.
    pub drain_grace_secs: u64,
    /// Most live connections.
    pub max_connections: usize,
    /// Runtime worker threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// `close` or `wait`.
    pub on_partner_leave: OnPartnerLeave,
    /// TLS material: the WSS listener. Required unless `[front]` is set (front only).
    pub tls: Option<TlsSection>,
    /// The front listener (plain HTTP from a trusted front such as HAProxy); absent: off.
    pub front: Option<FileFront>,
    /// Limits and timers.
    pub limits: FileLimits,
    /// Authorization rules; none means any valid certificate may join any id.
    pub authorize: Vec<RuleSpec>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: None,
            url_prefix: DEFAULT_URL_PREFIX.to_owned(),
            status_listen: None,
            status_socket_mode: None,
            metrics_listen: None,
            log_format: LogFormat::Auto,
            log_filter: None,
            drain_grace_secs: DEFAULT_DRAIN_GRACE.as_secs(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            worker_threads: 0,
            on_partner_leave: OnPartnerLeave::Close,
            tls: None,
            front: None,
            limits: FileLimits::default(),
            authorize: Vec::new(),
        }
    }
}

/// The `[front]` table: a plain-HTTP listener for a trusted front that terminated mutual
/// TLS and forwards the client certificate and address in request headers (docs/ws-proxy.md,
/// "Scaling out").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFront {
    /// Listen address, `HOST:PORT` as `listen`, or `unix:/abs/path` (a socket of mode 0660).
    pub listen: String,
    /// The front's source addresses: IP addresses or CIDR blocks; required, not empty, for a
    /// TCP listener; refused with a Unix one.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The users (names or uids) the front runs as: required, not empty, for a Unix
    /// listener; refused with a TCP one.
    #[serde(default)]
    pub peer_users: Vec<String>,
    /// The group the Unix socket is given to (e.g. "haproxy"); absent: the daemon's group.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// The CA bundle the forwarded certificates chain to; needed with `crls`.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// CRL files (as `[tls] crls`), each verified against `client_ca`: forwarded certificates
    /// they revoke are refused, and live ones closed when a reload revokes them.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// Mode of the front listener's Unix socket: the daemon's user and the socket's group.
pub const FRONT_SOCKET_MODE: u32 = 0o660;

/// `[front] listen`: TCP (`HOST:PORT`) or a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontListen {
    /// `HOST:PORT`, the peers by address.
    Tcp(ListenAddr),
    /// `unix:/abs/path`, the peers by user.
    Unix(PathBuf),
}

impl std::fmt::Display for FrontListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Who may connect to the front listener: by address (TCP) or by user (Unix socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontPeers {
    /// `[front] peers`.
    Addresses(Peers),
    /// `[front] peer_users`, resolved to uids.
    Users(PeerUsers),
}

impl std::fmt::Display for FrontPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addresses(peers) => write!(f, "{peers}"),
            Self::Users(users) => write!(f, "users {users}"),
        }
    }
}

/// A user name or uid of `peer_users`, resolved now.
fn resolve_user(text: &str) -> Result<u32, String> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(text) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err("no such user".into()),
        Err(err) => Err(format!("looking it up: {err}")),
    }
}

/// A group name or gid of `socket_group`, resolved now.
fn resolve_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err("no such group".into()),
        Err(err) => Err(format!("looking it up: {err}")),
    }
}

/// What `[front]` parses to: the listener, who may connect, the socket's group, and the
/// CRL files (CA bundle, CRLs).
type ParsedFront = (
    FrontListen,
    FrontPeers,
    Option<(String, u32)>,
    Option<(PathBuf, Vec<PathBuf>)>,
);

impl FileFront {
    fn parse(&self) -> Result<ParsedFront, ConfigError> {
        let invalid = |text: String| ConfigError::Invalid(text);
        let listen = match self.listen.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => FrontListen::Unix(PathBuf::from(path)),
            Some(_) => {
                return Err(invalid(format!(
                    "[front] listen {:?}: the socket path must be absolute (unix:/run/ws-proxy/front.sock)",
                    self.listen
                )));
            }
            None => FrontListen::Tcp(
                ListenAddr::parse(&self.listen)
                    .map_err(|err| invalid(format!("[front] listen {:?}: {err}", self.listen)))?,
            ),
        };
        let peers = match &listen {
            FrontListen::Tcp(_) => {
                if !self.peer_users.is_empty() || self.socket_group.is_some() {
                    return Err(invalid(
                        "[front] peer_users and socket_group are for a Unix-socket listen (unix:PATH); a TCP listener takes peers".into(),
                    ));
                }
                let nets = self
                    .peers
                    .iter()
                    .map(|peer| {
                        Net::parse(peer)
                            .map_err(|err| invalid(format!("[front] peers: {peer:?}: {err}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                FrontPeers::Addresses(Peers::new(nets).ok_or_else(|| {
                    invalid(
                        "[front] peers is required and not empty: the addresses the front (HAProxy) connects from".into(),
                    )
                })?)
            }
            FrontListen::Unix(_) => {
                if !self.peers.is_empty() {
                    return Err(invalid(
                        "[front] peers is for a TCP listen; a Unix-socket listener takes peer_users (the users the front runs as)".into(),
                    ));
                }
                let users = self
                    .peer_users
                    .iter()
                    .map(|user| {
                        resolve_user(user)
                            .map(|uid| (user.clone(), uid))
                            .map_err(|err| invalid(format!("[front] peer_users: {user:?}: {err}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                FrontPeers::Users(PeerUsers::new(users).ok_or_else(|| {
                    invalid(
                        "[front] peer_users is required and not empty with a Unix-socket listen: the users the front (HAProxy) runs as".into(),
                    )
                })?)
            }
        };
        let group = self
            .socket_group
            .as_ref()
            .map(|group| {
                resolve_group(group)
                    .map(|gid| (group.clone(), gid))
                    .map_err(|err| invalid(format!("[front] socket_group: {group:?}: {err}")))
            })
            .transpose()?;
        let crls = match (&self.client_ca, self.crls.is_empty()) {
            (_, true) => None,
            (Some(ca), false) => Some((ca.clone(), self.crls.clone())),
            (None, false) => {
                return Err(invalid(
                    "[front] crls needs [front] client_ca: the CA bundle the CRLs are verified against".into(),
                ));
            }
        };
        Ok((listen, peers, group, crls))
    }
}

/// The `[limits]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLimits {
    /// Seconds between the TLS handshake and the end of the HTTP upgrade request.
    pub upgrade_timeout_secs: u64,
    /// Seconds between the upgrade and the HELLO.
    pub hello_timeout_secs: u64,
    /// Seconds between pings.
    pub ping_interval_secs: u64,
    /// Seconds a pong may take.
    pub pong_timeout_secs: u64,
    /// Seconds a write to a peer may take.
    pub write_timeout_secs: u64,
    /// Seconds to wait for the peer's close frame.
    pub close_timeout_secs: u64,
    /// Largest message in bytes.
    pub max_message_bytes: usize,
    /// Largest HELLO in bytes, and the most read before it.
    pub max_hello_bytes: usize,
    /// Live connections of one client certificate.
    pub max_connections_per_identity: usize,
    /// Bytes buffered for all connections together.
    pub max_buffered_bytes: usize,
    /// Of those, bytes buffered for the connections of one identity.
    pub max_buffered_bytes_per_identity: usize,
    /// Longest meet-up id in bytes.
    pub max_id_bytes: usize,
    /// Messages queued from a waiting peer.
    pub waiting_queue_messages: usize,
    /// Bytes queued from a waiting peer.
    pub waiting_queue_bytes: usize,
    /// Bytes queued towards a peer before its partner is slowed down.
    pub relay_queue_bytes: usize,
    /// Read buffer per connection.
    pub read_buffer_bytes: usize,
    /// Write buffer target per connection.
    pub write_buffer_bytes: usize,
    /// Connections the status listener serves at once.
    pub max_status_connections: usize,
    /// Seconds a status connection has to send a request head.
    pub status_header_timeout_secs: u64,
    /// Seconds after which a status connection is closed.
    pub status_connection_timeout_secs: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            upgrade_timeout_secs: limits.upgrade_timeout.as_secs(),
            hello_timeout_secs: limits.hello_timeout.as_secs(),
            ping_interval_secs: limits.ping_interval.as_secs(),
            pong_timeout_secs: limits.pong_timeout.as_secs(),
            write_timeout_secs: limits.write_timeout.as_secs(),
            close_timeout_secs: limits.close_timeout.as_secs(),
            max_message_bytes: limits.max_message_bytes,
            max_hello_bytes: limits.max_hello_bytes,
            max_connections_per_identity: limits.max_connections_per_identity,
            max_buffered_bytes: limits.max_buffered_bytes,
            max_buffered_bytes_per_identity: limits.max_buffered_bytes_per_identity,
            max_id_bytes: limits.max_id_bytes,
            waiting_queue_messages: limits.waiting_queue_messages,
            waiting_queue_bytes: limits.waiting_queue_bytes,
            relay_queue_bytes: limits.relay_queue_bytes,
            read_buffer_bytes: limits.read_buffer_bytes,
            write_buffer_bytes: limits.write_buffer_bytes,
            max_status_connections: limits.max_status_connections,
            status_header_timeout_secs: limits.status_header_timeout.as_secs(),
            status_connection_timeout_secs: limits.status_connection_timeout.as_secs(),
        }
    }
}

/// Every limit and timer of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// HTTP upgrade request deadline, after the TLS handshake.
    pub upgrade_timeout: Duration,
    /// HELLO deadline, after the upgrade.
    pub hello_timeout: Duration,
    /// Interval between pings; the first goes right after the upgrade.
    pub ping_interval: Duration,
    /// Deadline for the pong.
    pub pong_timeout: Duration,
    /// Deadline for one flush towards a peer.
    pub write_timeout: Duration,
    /// Deadline for the peer's close frame.
    pub close_timeout: Duration,
    /// Largest message (and frame) payload.
    pub max_message_bytes: usize,
    /// Largest HELLO; also the most a connection may send before its HELLO (plus a little for
    /// frame headers and control frames).
    pub max_hello_bytes: usize,
    /// Live connections of one client certificate (SHA-256 fingerprint; without a certificate,
    /// of one source address); one more is refused with HTTP 429 before the upgrade.
    pub max_connections_per_identity: usize,
    /// Bytes held for all connections together (HELLOs, queues, messages being read); work
    /// that would need more is refused with close 1013.
    pub max_buffered_bytes: usize,
    /// Of those, what the connections of one identity (as for `max_connections_per_identity`)
    /// may hold: what they are reading and what is queued for them.
    pub max_buffered_bytes_per_identity: usize,
    /// Longest meet-up id.
    pub max_id_bytes: usize,
    /// Messages a waiting peer may queue.
    pub waiting_queue_messages: usize,
    /// Bytes a waiting peer may queue.
    pub waiting_queue_bytes: usize,
    /// Bytes in flight towards one peer.
    pub relay_queue_bytes: usize,
    /// tungstenite read buffer.
    pub read_buffer_bytes: usize,
    /// tungstenite write buffer target.
    pub write_buffer_bytes: usize,
    /// Age at which a connection is closed with 1001 (`[tls] max_connection_age_secs`).
    pub max_connection_age: Duration,
    /// Connections still in the TLS handshake at once (`[tls] max_handshakes`).
    pub max_handshakes: usize,
    /// Of those, from one source address (`[tls] max_handshakes_per_address`).
    pub max_handshakes_per_address: usize,
    /// Connections the status listener serves at once (a pool of its own, apart from
    /// `max_connections`); one more evicts the oldest idle one, at any age, or is closed at once.
    pub max_status_connections: usize,
    /// Time a status connection has to send each request head.
    pub status_header_timeout: Duration,
    /// Age at which a status connection is closed after the request in progress (and
    /// dropped one `status_header_timeout` later whatever it is doing).
    pub status_connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: common::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_hello_bytes: DEFAULT_MAX_HELLO_BYTES,
            max_connections_per_identity: DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_buffered_bytes_per_identity: DEFAULT_MAX_BUFFERED_BYTES_PER_IDENTITY,
            max_id_bytes: DEFAULT_MAX_ID_BYTES,
            waiting_queue_messages: DEFAULT_WAITING_QUEUE_MESSAGES,
            waiting_queue_bytes: DEFAULT_WAITING_QUEUE_BYTES,
            relay_queue_bytes: DEFAULT_RELAY_QUEUE_BYTES,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
            write_buffer_bytes: DEFAULT_WRITE_BUFFER_BYTES,
            max_connection_age: common::tls::DEFAULT_MAX_CONNECTION_AGE,
            max_handshakes: common::admission::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: common::admission::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            max_status_connections: DEFAULT_MAX_STATUS_CONNECTIONS,
            status_header_timeout: DEFAULT_STATUS_HEADER_TIMEOUT,
            status_connection_timeout: DEFAULT_STATUS_CONNECTION_TIMEOUT,
        }
    }
}

impl Limits {
    /// The front door: the stranger pool and its deadline (the handshake timeout) around
    /// `max_connections` slots for authenticated connections.
    pub fn admission(&self, max_connections: usize) -> common::admission::Limits {
        common::admission::Limits {
            max_connections,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_address: self.max_handshakes_per_address,
            deadline: self.handshake_timeout,
        }
    }

    /// tungstenite's configuration: every buffer and size set explicitly (its defaults are
    /// 64 MiB messages, 16 MiB frames and an unbounded write buffer).
    pub fn websocket(&self) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        let mut ws = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
        ws.read_buffer_size = self.read_buffer_bytes;
        ws.write_buffer_size = self.write_buffer_bytes;
        // Room for the target, one largest message and its frame header.
        ws.max_write_buffer_size = self.write_buffer_bytes + self.max_message_bytes + 64;
        ws.max_message_size = Some(self.max_message_bytes);
        ws.max_frame_size = Some(self.max_message_bytes);
        ws.accept_unmasked_frames = false;
        ws
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("handshake_timeout_secs", self.handshake_timeout),
            ("upgrade_timeout_secs", self.upgrade_timeout),
            ("hello_timeout_secs", self.hello_timeout),
            ("ping_interval_secs", self.ping_interval),
            ("pong_timeout_secs", self.pong_timeout),
            ("write_timeout_secs", self.write_timeout),
            ("close_timeout_secs", self.close_timeout),
            ("max_connection_age_secs", self.max_connection_age),
            ("status_header_timeout_secs", self.status_header_timeout),
            (
                "status_connection_timeout_secs",
                self.status_connection_timeout,
            ),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        let sizes = [
            ("max_message_bytes", self.max_message_bytes),
            ("max_hello_bytes", self.max_hello_bytes),
            (
                "max_connections_per_identity",
                self.max_connections_per_identity,
            ),
            ("max_id_bytes", self.max_id_bytes),
            ("waiting_queue_messages", self.waiting_queue_messages),
            ("read_buffer_bytes", self.read_buffer_bytes),
            ("max_status_connections", self.max_status_connections),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        // A forward takes the message's size plus QUEUE_OVERHEAD from the partner's relay
        // queue: a queue smaller than that could never take the largest message.
        let largest = self.max_message_bytes.saturating_add(QUEUE_OVERHEAD);
        if self.relay_queue_bytes < largest {
            return Err(ConfigError::Invalid(format!(
                "relay_queue_bytes ({}) must be at least max_message_bytes + {QUEUE_OVERHEAD} ({largest})",
                self.relay_queue_bytes
            )));
        }
        if self.relay_queue_bytes > u32::MAX as usize {
            return Err(ConfigError::Invalid(
                "relay_queue_bytes may be at most 4 GiB - 1".into(),
            ));
        }
        if self.max_hello_bytes > self.max_message_bytes {
            return Err(ConfigError::Invalid(format!(
                "max_hello_bytes ({}) may be at most max_message_bytes ({})",
                self.max_hello_bytes, self.max_message_bytes
            )));
        }
        if self.max_buffered_bytes_per_identity < self.relay_queue_bytes {
            return Err(ConfigError::Invalid(format!(
                "max_buffered_bytes_per_identity ({}) must be at least relay_queue_bytes ({})",
                self.max_buffered_bytes_per_identity, self.relay_queue_bytes
            )));
        }
        if self.max_buffered_bytes < self.max_buffered_bytes_per_identity {
            return Err(ConfigError::Invalid(format!(
                "max_buffered_bytes ({}) must be at least max_buffered_bytes_per_identity ({})",
                self.max_buffered_bytes, self.max_buffered_bytes_per_identity
            )));
        }
        if self.max_message_bytes > 256 << 20 {
            return Err(ConfigError::Invalid(
                "max_message_bytes may be at most 256 MiB".into(),
            ));
        }
        Ok(())
    }
}

/// The validated configuration [`crate::Server`] serves with.
#[derive(Debug, Clone)]
pub struct Config {
    /// URL path prefix, starting and ending with `/`.
    pub url_prefix: String,
    /// What happens to a peer whose partner leaves.
    pub on_partner_leave: OnPartnerLeave,
    /// Most live connections.
    pub max_connections: usize,
    /// Limits and timers.
    pub limits: Limits,
    /// Authorization rules.
    pub rules: Rules,
    /// Who the front is, when the front listener is on: only its addresses (TCP) or users
    /// (Unix socket) may connect to it, and the identity they forward is believed.
    pub front: Option<FrontPeers>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url_prefix: DEFAULT_URL_PREFIX.to_owned(),
            on_partner_leave: OnPartnerLeave::Close,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            limits: Limits::default(),
            rules: Rules::default(),
            front: None,
        }
    }
}

/// Where the status listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusListen {
    /// A TCP address: every local user can read it.
    Tcp(SocketAddr),
    /// A Unix socket (`unix:PATH`), created with `status_socket_mode`.
    Unix(PathBuf),
}

impl std::fmt::Display for StatusListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Everything `main` needs from the file besides [`Config`]: addresses and TLS files.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// WSS listen address (a host name is resolved at start); `None`: front only.
    pub listen: Option<ListenAddr>,
    /// Front listener address, if any.
    pub front_listen: Option<FrontListen>,
    /// The group (name, gid) the front's Unix socket is given to.
    pub front_socket_group: Option<(String, u32)>,
    /// `[front] client_ca` and `crls`, when forwarded certificates are checked here too.
    pub front_crls: Option<(PathBuf, Vec<PathBuf>)>,
    /// Status listener, if any.
    pub status_listen: Option<StatusListen>,
    /// Mode of the status Unix socket.
    pub status_socket_mode: u32,
    /// Metrics listener, if any.
    pub metrics_listen: Option<MetricsListen>,
    /// TLS section; `None`: front only.
    pub tls: Option<TlsSection>,
    /// Drain grace period.
    pub drain_grace: Duration,
    /// Runtime worker threads; 0 means one per CPU.
    pub worker_threads: usize,
}

impl Config {
    /// Validates a parsed file into the server configuration and the deployment settings.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for neither `[tls]` nor `[front]`, a bad address, prefix,
    /// limit or rule, a `[front]` without peers.
    pub fn from_file(file: &FileConfig) -> Result<(Self, Deployment), ConfigError> {
        let (front, front_listen, front_socket_group, front_crls) = match &file.front {
            None => (None, None, None, None),
            Some(section) => {
                let (listen, peers, group, crls) = section.parse()?;
                (Some(peers), Some(listen), group, crls)
            }
        };
        let listen = match (&file.tls, &file.listen) {
            (Some(_), listen) => Some(parse_listen(listen.as_deref().unwrap_or(DEFAULT_LISTEN))?),
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "listen is the WSS listener, which needs the [tls] section (cert, client_ca); without [tls] only [front] listens".into(),
                ));
            }
            (None, None) if front.is_some() => None,
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "the [tls] section (cert, client_ca) is required, or a [front] section for an instance behind a front".into(),
                ));
            }
        };
        let tls_or_default = file
            .tls
            .clone()
            .unwrap_or_else(|| TlsSection::new(PathBuf::new()));
        let tls = &tls_or_default;
        let status_listen = file
            .status_listen
            .as_deref()
            .map(parse_status_listen)
            .transpose()?;
        let status_socket_mode = match file.status_socket_mode.as_deref() {
            None => DEFAULT_STATUS_SOCKET_MODE,
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "status_socket_mode {text:?} is not an octal mode"
                    ))
                })?,
        };
        let l = &file.limits;
        let secs = Duration::from_secs;
        let limits = Limits {
            handshake_timeout: tls.handshake_timeout(),
            max_connection_age: tls.max_connection_age(),
            upgrade_timeout: secs(l.upgrade_timeout_secs),
            hello_timeout: secs(l.hello_timeout_secs),
            ping_interval: secs(l.ping_interval_secs),
            pong_timeout: secs(l.pong_timeout_secs),
            write_timeout: secs(l.write_timeout_secs),
            close_timeout: secs(l.close_timeout_secs),
            max_message_bytes: l.max_message_bytes,
            max_hello_bytes: l.max_hello_bytes,
            max_connections_per_identity: l.max_connections_per_identity,
            max_buffered_bytes: l.max_buffered_bytes,
            max_buffered_bytes_per_identity: l.max_buffered_bytes_per_identity,
            max_id_bytes: l.max_id_bytes,
            waiting_queue_messages: l.waiting_queue_messages,
            waiting_queue_bytes: l.waiting_queue_bytes,
            relay_queue_bytes: l.relay_queue_bytes,
            read_buffer_bytes: l.read_buffer_bytes,
            write_buffer_bytes: l.write_buffer_bytes,
            max_handshakes: tls.max_handshakes.get(),
            max_handshakes_per_address: tls.max_handshakes_per_address.get(),
            max_status_connections: l.max_status_connections,
            status_header_timeout: secs(l.status_header_timeout_secs),
            status_connection_timeout: secs(l.status_connection_timeout_secs),
        };
        let rules = file
            .authorize
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                Rule::compile(spec)
                    .map_err(|err| ConfigError::Invalid(format!("authorize rule {}: {err}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let config = Self {
            url_prefix: file.url_prefix.clone(),
            on_partner_leave: file.on_partner_leave,
            max_connections: file.max_connections,
            limits,
            rules: Rules::new(rules),
            front,
        };
        config.validate()?;
        if file.tls.is_some()
            && tls.client_auth.unwrap_or(DEFAULT_CLIENT_AUTH) != ClientAuth::Off
            && tls.client_ca.is_none()
        {
            return Err(ConfigError::Invalid(
                "[tls] client_ca (the CA bundle client certificates must chain to) is required unless client_auth = \"off\"".into(),
            ));
        }
        Ok((
            config,
            Deployment {
                listen,
                front_listen,
                front_socket_group,
                front_crls,
                status_listen,
                status_socket_mode,
                metrics_listen: file.metrics_listen.clone(),
                tls: file.tls.clone(),
                drain_grace: secs(file.drain_grace_secs),
                worker_threads: file.worker_threads,
            },
        ))
    }

    /// Checks the values [`crate::Server`] relies on.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url_prefix(&self.url_prefix)?;
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "max_connections must be at least 1".into(),
            ));
        }
        self.limits.validate()
    }
}

/// The client-certificate policy when `[tls]` does not set one.
pub const DEFAULT_CLIENT_AUTH: ClientAuth = ClientAuth::Required;

/// `listen`: `HOST:PORT`, an IP address or a host name (resolved at start).
///
/// # Errors
/// [`ConfigError::Invalid`] naming the value and what is wrong.
pub fn parse_listen(value: &str) -> Result<ListenAddr, ConfigError> {
    ListenAddr::parse(value).map_err(|err| ConfigError::Invalid(format!("listen {value:?}: {err}")))
}

/// `url_prefix` starts and ends with `/`.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the value.
pub fn check_url_prefix(prefix: &str) -> Result<(), ConfigError> {
    if prefix.starts_with('/') && prefix.ends_with('/') {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "url_prefix {prefix:?} must start and end with '/'"
        )))
    }
}

/// `status_listen`: `ADDR:PORT` (an IP address: the status listener is local, and a name is
/// not resolved for it) or `unix:PATH` (an absolute path).
///
/// # Errors
/// [`ConfigError::Invalid`] naming the value and what is wrong.
pub fn parse_status_listen(value: &str) -> Result<StatusListen, ConfigError> {
    match value.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') => Ok(StatusListen::Unix(PathBuf::from(path))),
        Some(_) => Err(ConfigError::Invalid(format!(
            "status_listen {value:?}: the socket path must be absolute"
        ))),
        None => value.parse().map(StatusListen::Tcp).map_err(|_| {
            ConfigError::Invalid(format!(
                "status_listen {value:?} is neither an IP address and port (127.0.0.1:5051, [::1]:5051; host names are not resolved here) nor unix:PATH"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(Config, Deployment), String> {
        let file: FileConfig = common::daemon::parse_toml(text).map_err(|e| e.to_string())?;
        Config::from_file(&file).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_keep_the_original_protocol_constants() {
        let (config, deploy) = parse("[tls]\ncert = \"s.pem\"\nclient_ca = \"ca.pem\"").unwrap();
        assert_eq!(deploy.listen.unwrap().to_string(), DEFAULT_LISTEN);
        assert_eq!(deploy.front_listen, None);
        assert_eq!(config.front, None);
        assert_eq!(deploy.status_listen, None);
        assert_eq!(config.url_prefix, "/micronets/v1/ws-proxy/");
        assert_eq!(config.limits.max_message_bytes, 1 << 20);
        assert_eq!(config.limits.ping_interval, Duration::from_secs(10));
        assert_eq!(config.limits.pong_timeout, Duration::from_secs(10));
        assert_eq!(config.limits.hello_timeout, Duration::from_secs(10));
        assert_eq!(config.on_partner_leave, OnPartnerLeave::Close);
        let ws = config.limits.websocket();
        assert_eq!(ws.max_message_size, Some(1 << 20));
        assert_eq!(ws.max_frame_size, Some(1 << 20));
        assert_eq!(ws.read_buffer_size, DEFAULT_READ_BUFFER_BYTES);
        assert!(ws.max_write_buffer_size < 2 << 20);
        assert_eq!(config.limits.max_hello_bytes, 64 * 1024);
        assert_eq!(config.limits.max_connections_per_identity, 1024);
        assert_eq!(config.limits.max_buffered_bytes, 256 << 20);
        assert_eq!(config.limits.max_buffered_bytes_per_identity, 64 << 20);
        assert_eq!(config.limits.max_status_connections, 16);
        assert_eq!(config.limits.status_header_timeout, Duration::from_secs(10));
        assert_eq!(deploy.status_socket_mode, 0o660);
        // The largest message fits the relay queue with its overhead.
        assert!(
            config.limits.relay_queue_bytes >= config.limits.max_message_bytes + QUEUE_OVERHEAD
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let cases = [
            ("", "[tls] section"),
            ("listen = \"nowhere\"\n[tls]\ncert = \"s\"", "listen"),
            ("url_prefix = \"/x\"\n[tls]\ncert = \"s\"", "url_prefix"),
            (
                "[tls]\ncert = \"s\"\n[limits]\nping_interval_secs = 0",
                "ping_interval_secs",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nrelay_queue_bytes = 10",
                "relay_queue_bytes",
            ),
            // A queue that takes exactly the largest message cannot take it with its overhead:
            // forwarding it would wait for ever.
            (
                "[tls]\ncert = \"s\"\n[limits]\nrelay_queue_bytes = 1048576",
                "relay_queue_bytes (1048576) must be at least max_message_bytes + 64",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nmax_hello_bytes = 2000000",
                "max_hello_bytes",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nmax_connections_per_identity = 0",
                "max_connections_per_identity",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nmax_buffered_bytes = 1048576",
                "max_buffered_bytes",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nmax_buffered_bytes_per_identity = 1048576",
                "max_buffered_bytes_per_identity",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nmax_mesage_bytes = 1",
                "unknown field",
            ),
            (
                "status_listen = \"unix:rel.sock\"\n[tls]\ncert = \"s\"",
                "must be absolute",
            ),
            (
                "status_socket_mode = \"999\"\n[tls]\ncert = \"s\"",
                "status_socket_mode",
            ),
            (
                "[tls]\ncert = \"s\"\n[limits]\nmax_status_connections = 0",
                "max_status_connections",
            ),
            (
                "on_partner_leave = \"stay\"\n[tls]\ncert = \"s\"",
                "unknown variant",
            ),
            (
                "[tls]\ncert = \"s\"\n[[authorize]]\nids = [\"gw/*\"]",
                "authorize rule 1",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn every_key_of_the_deploy_example_parses() {
        let text = include_str!("../../../deploy/config/ws-proxy.example.toml");
        let (config, deploy) = parse(text).unwrap();
        assert_eq!(deploy.listen.unwrap().to_string(), "0.0.0.0:5050");
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn the_front_examples_parse() {
        // The commented [front] section of the main example, switched on.
        let text = include_str!("../../../deploy/config/ws-proxy.example.toml")
            .replace("# [front]\n", "[front]\n")
            .replace(
                "# listen = \"10.0.0.11:7001\"",
                "listen = \"10.0.0.11:7001\"",
            )
            .replace("# peers = [\"10.0.0.5\"]", "peers = [\"10.0.0.5\"]");
        let (config, deploy) = parse(&text).unwrap();
        assert_eq!(deploy.front_listen.unwrap().to_string(), "10.0.0.11:7001");
        assert_eq!(config.front.unwrap().to_string(), "10.0.0.5");
        assert!(deploy.listen.is_some());
        // The instance behind HAProxy: front only.
        let text = include_str!("../../../deploy/config/ws-proxy.front.example.toml");
        let (config, deploy) = parse(text).unwrap();
        assert!(deploy.listen.is_none() && deploy.tls.is_none());
        assert_eq!(deploy.front_listen.unwrap().to_string(), "10.0.0.11:7001");
        assert_eq!(config.front.unwrap().to_string(), "10.0.0.5");
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn listen_takes_a_host_name_and_client_auth_off_needs_no_ca() {
        let (_, deploy) =
            parse("listen = \"localhost:5050\"\n[tls]\ncert = \"s\"\nclient_ca = \"c\"").unwrap();
        assert_eq!(deploy.listen.unwrap().to_string(), "localhost:5050");
        parse("[tls]\ncert = \"s\"\nclient_auth = \"off\"").unwrap();
    }

    #[test]
    fn a_unix_front_listener_takes_peer_users_and_crls_need_the_bundle() {
        let (config, deploy) = parse(
            "[front]\nlisten = \"unix:/run/ws-proxy/front.sock\"\npeer_users = [\"root\", \"4242\"]\nsocket_group = \"0\"\nclient_ca = \"ca.pem\"\ncrls = [\"crl.pem\"]",
        )
        .unwrap();
        assert_eq!(
            deploy.front_listen,
            Some(FrontListen::Unix(PathBuf::from("/run/ws-proxy/front.sock")))
        );
        let Some(FrontPeers::Users(users)) = &config.front else {
            panic!("peers by user");
        };
        assert!(users.contains(0) && users.contains(4242) && !users.contains(1));
        assert_eq!(users.to_string(), "root(0) 4242");
        assert_eq!(deploy.front_socket_group, Some(("0".to_owned(), 0)));
        assert_eq!(
            deploy.front_crls,
            Some((PathBuf::from("ca.pem"), vec![PathBuf::from("crl.pem")]))
        );
        // A TCP listener with CRLs.
        let (_, deploy) = parse(
            "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"127.0.0.1\"]\nclient_ca = \"ca.pem\"\ncrls = [\"a.pem\", \"b.pem\"]",
        )
        .unwrap();
        assert_eq!(deploy.front_crls.unwrap().1.len(), 2);
        let cases = [
            (
                "[front]\nlisten = \"unix:/run/f.sock\"",
                "[front] peer_users is required",
            ),
            (
                "[front]\nlisten = \"unix:/run/f.sock\"\npeer_users = []",
                "[front] peer_users is required",
            ),
            (
                "[front]\nlisten = \"unix:/run/f.sock\"\npeers = [\"127.0.0.1\"]\npeer_users = [\"root\"]",
                "[front] peers is for a TCP listen",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"127.0.0.1\"]\npeer_users = [\"root\"]",
                "peer_users and socket_group are for a Unix-socket listen",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"127.0.0.1\"]\nsocket_group = \"root\"",
                "peer_users and socket_group are for a Unix-socket listen",
            ),
            (
                "[front]\nlisten = \"unix:front.sock\"\npeer_users = [\"root\"]",
                "must be absolute",
            ),
            (
                "[front]\nlisten = \"unix:/run/f.sock\"\npeer_users = [\"no-such-user-here\"]",
                "no such user",
            ),
            (
                "[front]\nlisten = \"unix:/run/f.sock\"\npeer_users = [\"root\"]\nsocket_group = \"no-such-group-here\"",
                "no such group",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"127.0.0.1\"]\ncrls = [\"crl.pem\"]",
                "[front] crls needs [front] client_ca",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_front_listener_needs_peers_and_may_run_alone() {
        // Front only: no [tls], no WSS listener.
        let (config, deploy) =
            parse("[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"10.0.0.5\", \"10.0.0.0/24\", \"::1\"]")
                .unwrap();
        assert_eq!(deploy.listen, None);
        assert!(deploy.tls.is_none());
        assert_eq!(deploy.front_listen.unwrap().to_string(), "127.0.0.1:7001");
        let Some(FrontPeers::Addresses(peers)) = config.front else {
            panic!("peers by address");
        };
        assert_eq!(peers.to_string(), "10.0.0.5 10.0.0.0/24 ::1");
        assert!(peers.contains("10.0.0.77".parse().unwrap()));
        assert!(!peers.contains("10.0.1.1".parse().unwrap()));
        // Both listeners.
        let (config, deploy) = parse(
            "listen = \"0.0.0.0:5050\"\n[front]\nlisten = \"[::1]:7001\"\npeers = [\"::1\"]\n[tls]\ncert = \"s\"\nclient_ca = \"c\"",
        )
        .unwrap();
        assert_eq!(deploy.listen.unwrap().to_string(), "0.0.0.0:5050");
        assert!(deploy.front_listen.is_some() && config.front.is_some());
        let cases = [
            (
                "[front]\nlisten = \"127.0.0.1:7001\"",
                "[front] peers is required",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = []",
                "[front] peers is required",
            ),
            ("[front]\npeers = [\"10.0.0.5\"]", "listen"),
            (
                "[front]\nlisten = \"nowhere\"\npeers = [\"10.0.0.5\"]",
                "[front] listen",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"10.0.0.5/24\"]",
                "host bits",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"gateway\"]",
                "\"gateway\"",
            ),
            (
                "[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"10.0.0.5\"]\nport = 3",
                "unknown field",
            ),
            (
                "listen = \"127.0.0.1:5050\"\n[front]\nlisten = \"127.0.0.1:7001\"\npeers = [\"10.0.0.5\"]",
                "needs the [tls] section",
            ),
            ("", "or a [front] section"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
