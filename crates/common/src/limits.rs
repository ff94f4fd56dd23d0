//! The numbers of a daemon's front door ([`crate::admission`]): its default stranger budget and
//! the [`Limits`] of one listener.
//!
//! They live apart from `admission` so that configuration types (`tls::TlsSection`, each
//! daemon's `Config`) can name them without depending on the admission machinery, which itself
//! runs TLS handshakes.

use std::time::Duration;

/// Default size of the stranger (pre-authentication) pool.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default number of stranger permits one source address (IPv4 address, IPv6 /64) may hold.
pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Default size of a daemon's local (Unix-socket) pool.
pub const DEFAULT_MAX_LOCAL_CONNECTIONS: usize = 256;

/// The limits of one front door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Slots for authenticated connections.
    pub max_connections: usize,
    /// Permits for connections that have not authenticated yet.
    pub max_handshakes: usize,
    /// Stranger permits one source address may hold.
    pub max_handshakes_per_address: usize,
    /// Time from accept to authenticated; a stranger still there after it is closed.
    pub deadline: Duration,
}

impl Limits {
    /// The default stranger budget around `max_connections` and `deadline`.
    pub fn new(max_connections: usize, deadline: Duration) -> Self {
        Self {
            max_connections,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            deadline,
        }
    }
}
