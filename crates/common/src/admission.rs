//! The front door every daemon shares: who gets a connection slot, and when.
//!
//! A connection from the network is a *stranger* until it has authenticated (a TLS handshake
//! with a verified client certificate, or whatever the daemon's protocol calls a login). While
//! it is a stranger it holds a [`Stranger`] permit from a small pool of its own
//! ([`Limits::max_handshakes`]), of which one source address (an IPv4 address or an IPv6 /64)
//! may hold at most [`Limits::max_handshakes_per_address`], and it must authenticate before
//! its total deadline ([`Limits::deadline`], counted from TCP accept). Only then does it take a
//! [`Slot`] in the main pool (`max_connections`), giving back its stranger permit. So a client
//! without a certificate that opens hundreds of idle sockets fills at most its own share of the
//! stranger pool for at most the deadline, and never touches the slots of those who
//! authenticated.
//!
//! When the stranger pool is full, a newcomer makes room fairly by source key instead of being
//! refused. If some key holds more permits than the newcomer's key would once admitted, the
//! oldest stranger of the key holding the most is evicted (its connection is closed as a failed
//! handshake), however young: so an attacker who keeps reconnecting from a few addresses (16
//! addresses x 8 sockets, issue 16) cannot keep out a newcomer from an address of its own, and
//! a newcomer never takes a permit from a key holding no more than its own. Between equals
//! (the busiest key would hold as many as the newcomer's), the oldest stranger of such a key is
//! evicted only once it has waited [`EVICT_MIN_AGE`], so equals cannot thrash each other, and
//! idle strangers from many addresses (one each) are still evicted after that age; only when
//! no stranger qualifies is the newcomer refused. A real handshake takes milliseconds.
//!
//! What this does not hold: an attacker with at least `max_handshakes` source keys (IPv4
//! addresses or IPv6 /64s), each holding one permit and reopened faster than [`EVICT_MIN_AGE`],
//! can still keep a newcomer from a fresh key out (every key then holds one, as the newcomer
//! would, and every stranger is young). A local user has all of 127/8, so on a loopback
//! listener this is within reach of any local account; loopback peers are keyed by address,
//! not by uid (finding the uid means reading the whole of `/proc/net/tcp` per accept, a cost
//! the peers can inflate). Local users have the daemon's Unix socket, whose pool is its own.
//!
//! Local (Unix-socket) connections take their slots from a [`Pool`] of their own, so remote
//! strangers never starve local users, nor the reverse.
//!
//! Refusals are counted ([`Admission::stats`]) and logged at most once per pool per
//! [`WARN_INTERVAL`], with the number refused since the previous line: a flood of refused
//! connections never becomes a flood of log lines.
//!
//! This module knows nothing of any daemon's protocol; [`Stranger::accept_tls`] runs the
//! common case (TLS handshake under the deadline, then promotion) in one call.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use crate::limits::{
    DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_ADDRESS, DEFAULT_MAX_LOCAL_CONNECTIONS,
    Limits,
};
use crate::tls::{PeerIdentity, TlsError};

/// When the stranger pool is full and no key holds more permits than the newcomer's would, a
/// newcomer evicts the oldest stranger of an equal key only once it has held its permit this
/// long; if none has, the newcomer is refused. A TLS handshake (or a login) takes
/// milliseconds, so it is never evicted so; a socket kept idle is. (From a key holding more,
/// the oldest is evicted at any age.)
pub const EVICT_MIN_AGE: Duration = Duration::from_secs(1);
/// At most one "limit reached" warning per pool in this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why a connection was refused a permit or a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The stranger pool is full.
    #[error("max_handshakes reached")]
    Handshakes,
    /// The source address holds all the stranger permits it may.
    #[error("max_handshakes_per_address reached")]
    Address,
    /// The main pool (or a local pool) is full.
    #[error("max_connections reached")]
    Connections,
}

/// What [`Stranger::accept_tls`] can end with.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The handshake failed or missed the deadline.
    #[error(transparent)]
    Tls(TlsError),
    /// Authenticated, but the main pool is full.
    #[error("authenticated, but {0}")]
    Refused(Refused),
}

/// One log line per pool per [`WARN_INTERVAL`], carrying how many refusals it stands for.
///
/// Sans-IO: the caller passes `now` and logs when [`Warning::note`] says so.
#[derive(Debug, Default)]
pub struct Warning {
    state: Mutex<WarnState>,
}

#[derive(Debug, Default)]
struct WarnState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warning {
    /// Records one refusal at `now`; `Some(n)` when a line is due, `n` being the refusals it
    /// reports (this one and those since the previous line).
    pub fn note(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.suppressed = state.suppressed.saturating_add(1);
        let due = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= WARN_INTERVAL);
        if !due {
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

/// A pool of slots with a name, a rate-limited warning and a refusal counter: the main pool of
/// an [`Admission`], or a daemon's local (Unix-socket) pool.
#[derive(Debug)]
pub struct Pool {
    name: &'static str,
    key: &'static str,
    limit: usize,
    slots: Arc<Semaphore>,
    refused: AtomicU64,
    warning: Warning,
}

impl Pool {
    /// A pool of `limit` slots; `name` (e.g. `unix`) and `key` (the configuration key that
    /// sets the limit, e.g. `max_local_connections`) appear in the warning.
    pub fn new(name: &'static str, key: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            key,
            limit,
            slots: Arc::new(Semaphore::new(limit)),
            refused: AtomicU64::new(0),
            warning: Warning::default(),
        })
    }

    /// A slot now, or [`Refused::Connections`] (counted, and logged at most once per
    /// [`WARN_INTERVAL`]).
    ///
    /// # Errors
    /// The pool is full.
    pub fn try_admit(&self) -> Result<Slot, Refused> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(Slot { _permit: permit }),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(refused) = self.warning.note(Instant::now()) {
                    tracing::warn!(
                        pool = self.name,
                        limit = self.limit,
                        refused,
                        "refusing connections: {} reached",
                        self.key
                    );
                }
                Err(Refused::Connections)
            }
        }
    }

    /// A slot, waiting for one to be free (for local sockets whose clients prefer to queue);
    /// `None` only if the pool was closed, which nothing here does.
    pub async fn admit(&self) -> Option<Slot> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(Slot { _permit: permit })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.limit.saturating_sub(self.slots.available_permits())
    }

    /// Connections refused since start-up.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A slot in a pool; given back when dropped (with the connection it belongs to).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// The key a source address is counted under: an IPv4 address, or an IPv6 /64 (one host
/// usually holds a whole /64). IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKey {
    /// One IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl AddressKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => {
                    let octets = v6.octets();
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(octets.get(..8).unwrap_or(&[0; 8]));
                    Self::V6(prefix)
                }
            },
        }
    }
}

/// Counters of one front door since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Strangers refused because the stranger pool was full.
    pub refused_handshakes: u64,
    /// Strangers refused because their address held its share.
    pub refused_address: u64,
    /// Authenticated connections refused because the main pool was full.
    pub refused_connections: u64,
    /// Strangers evicted (closed) to make room for a newcomer when the stranger pool was full.
    pub evicted: u64,
    /// Strangers holding a permit now.
    pub strangers: usize,
    /// Authenticated connections holding a slot now.
    pub connections: usize,
}

/// The strangers holding a permit, oldest first, and how many each address holds.
#[derive(Default)]
struct Table {
    next: u64,
    strangers: BTreeMap<u64, Entry>,
    per_address: HashMap<AddressKey, usize>,
}

struct Entry {
    key: AddressKey,
    admitted: Instant,
    evict: CancellationToken,
}

impl Table {
    /// Takes `seq` out of the table with its address count; what it held, if it was there.
    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.strangers.remove(&seq)?;
        if let Some(held) = self.per_address.get_mut(&entry.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_address.remove(&entry.key);
            }
        }
        Some(entry)
    }

    /// Makes room in a full pool for a newcomer from `key`, fairly; whether it did.
    ///
    /// The newcomer's key would hold `after` permits once admitted. If some key holds more
    /// than that, the oldest stranger of a key holding the most goes at once, however young:
    /// an attacker spread over many addresses cannot keep out a newcomer from an address that
    /// holds fewer permits than its busiest one. Otherwise the oldest stranger of a key
    /// holding exactly `after` (one more than the newcomer's now) goes, but only once it has
    /// waited [`EVICT_MIN_AGE`]: between equals it is a swap, and the age keeps equals from
    /// thrashing each other (a real handshake is done long before). A key never loses a
    /// permit to a newcomer whose key holds as many or more. Seq order is admission order,
    /// so the first match is the oldest; one pass over at most `max_handshakes` strangers.
    fn evict_for(&mut self, key: AddressKey, now: Instant, evicted: &AtomicU64) -> bool {
        let held = |table: &Self, key: &AddressKey| table.per_address.get(key).copied();
        let after = held(self, &key).unwrap_or(0).saturating_add(1);
        let most = self.per_address.values().copied().max().unwrap_or(0);
        let victim = if most > after {
            self.strangers
                .iter()
                .find(|(_, entry)| held(self, &entry.key) == Some(most))
        } else {
            self.strangers
                .iter()
                .find(|(_, entry)| held(self, &entry.key) == Some(after))
                .filter(|(_, entry)| now.saturating_duration_since(entry.admitted) >= EVICT_MIN_AGE)
        };
        self.evict(victim.map(|(&seq, _)| seq), evicted)
    }

    /// At the per-address cap: makes room by evicting the oldest stranger of `key` itself once
    /// it is [`EVICT_MIN_AGE`] old, so that idle sockets from an address cannot keep out a
    /// client sharing it (a NAT, or every local user on loopback): the newcomer's handshake is
    /// done long before it could be evicted in turn.
    fn evict_own(&mut self, key: AddressKey, now: Instant, evicted: &AtomicU64) -> bool {
        let victim = self
            .strangers
            .iter()
            .find(|(_, entry)| entry.key == key)
            .filter(|(_, entry)| now.saturating_duration_since(entry.admitted) >= EVICT_MIN_AGE);
        self.evict(victim.map(|(&seq, _)| seq), evicted)
    }

    /// Removes stranger `seq`, cancelling its token: whether there was one.
    fn evict(&mut self, seq: Option<u64>, evicted: &AtomicU64) -> bool {
        match seq.and_then(|seq| self.remove(seq)) {
            Some(entry) => {
                entry.evict.cancel();
                evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

struct Inner {
    name: &'static str,
    limits: Limits,
    main: Arc<Pool>,
    table: Mutex<Table>,
    refused_handshakes: AtomicU64,
    refused_address: AtomicU64,
    evicted: AtomicU64,
    warn_handshakes: Warning,
    warn_address: Warning,
    warn_failed: Warning,
}

/// The front door of one network listener (or several sharing `max_connections`): the
/// stranger pool, the per-address cap, the deadline and the main pool. Cloning shares it.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("name", &self.inner.name)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// A front door named `name` (e.g. `https`, for the log lines) with `limits`. Limits of
    /// zero are configuration errors the daemon's configuration refuses; here they only refuse
    /// every connection.
    pub fn new(name: &'static str, limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                limits,
                main: Pool::new(name, "max_connections", limits.max_connections),
                table: Mutex::new(Table::default()),
                refused_handshakes: AtomicU64::new(0),
                refused_address: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                warn_handshakes: Warning::default(),
                warn_address: Warning::default(),
                warn_failed: Warning::default(),
            }),
        }
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// A stranger permit for a connection just accepted from `peer`, its deadline starting
    /// now; call it in the accept loop and close the connection on refusal (counted, and
    /// logged at most once per pool per [`WARN_INTERVAL`]). With the pool full, a stranger is
    /// evicted to make room, fairly by source key (see the module documentation): the oldest
    /// of the key holding the most if it holds more than `peer`'s would, else the oldest of
    /// an equal key of at least [`EVICT_MIN_AGE`]; its permit is this one's at once, its
    /// connection ends through [`Stranger::evicted`].
    ///
    /// # Errors
    /// [`Refused::Address`] or [`Refused::Handshakes`] (the pool is full, no key holds more
    /// than `peer`'s would, and the strangers of equal keys are younger than
    /// [`EVICT_MIN_AGE`]).
    pub fn stranger(&self, peer: SocketAddr) -> Result<Stranger, Refused> {
        self.stranger_at(peer, Instant::now())
    }

    /// A main-pool slot for a connection that is authenticated already and never was a
    /// stranger here: one from a trusted front (a load balancer that verified the client
    /// and forwards its identity), admitted by its source address before this call.
    ///
    /// # Errors
    /// [`Refused::Connections`] when the main pool is full (counted, and logged at most once
    /// per [`WARN_INTERVAL`]).
    pub fn authenticated(&self) -> Result<Slot, Refused> {
        self.inner.main.try_admit()
    }

    /// [`Admission::stranger`] at `now` (tests pass their own clock).
    fn stranger_at(&self, peer: SocketAddr, now: Instant) -> Result<Stranger, Refused> {
        let inner = &self.inner;
        let key = AddressKey::of(peer.ip());
        let refused = {
            let mut table = inner.table.lock().unwrap_or_else(|p| p.into_inner());
            let held = table.per_address.get(&key).copied().unwrap_or(0);
            if held >= inner.limits.max_handshakes_per_address
                && !table.evict_own(key, now, &inner.evicted)
            {
                Refused::Address
            } else if table.strangers.len() >= inner.limits.max_handshakes
                && !table.evict_for(key, now, &inner.evicted)
            {
                Refused::Handshakes
            } else {
                let seq = table.next;
                table.next = seq.wrapping_add(1);
                let evict = CancellationToken::new();
                table.strangers.insert(
                    seq,
                    Entry {
                        key,
                        admitted: now,
                        evict: evict.clone(),
                    },
                );
                let count = table.per_address.entry(key).or_insert(0);
                *count = count.saturating_add(1);
                return Ok(Stranger {
                    admission: self.clone(),
                    seq,
                    key,
                    deadline: now + inner.limits.deadline,
                    evict,
                });
            }
        };
        let (counter, warning, key_name, limit) = match refused {
            Refused::Address => (
                &inner.refused_address,
                &inner.warn_address,
                "max_handshakes_per_address",
                inner.limits.max_handshakes_per_address,
            ),
            _ => (
                &inner.refused_handshakes,
                &inner.warn_handshakes,
                "max_handshakes",
                inner.limits.max_handshakes,
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = warning.note(Instant::now()) {
            // The address of the refusal that triggered the line; the others are counted.
            tracing::warn!(
                pool = inner.name,
                limit,
                refused = count,
                last_peer = %peer,
                "refusing unauthenticated connections: {key_name} reached"
            );
        }
        Err(refused)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        Stats {
            refused_handshakes: inner.refused_handshakes.load(Ordering::Relaxed),
            refused_address: inner.refused_address.load(Ordering::Relaxed),
            refused_connections: inner.main.refused(),
            evicted: inner.evicted.load(Ordering::Relaxed),
            strangers: inner
                .table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .strangers
                .len(),
            connections: inner.main.in_use(),
        }
    }
}

/// A connection that has not authenticated yet: a permit from the stranger pool, counted
/// against its source address, with a deadline. Dropping it gives both back (unless an
/// eviction took them already). An evicted stranger must end its connection: see
/// [`Stranger::evicted`].
pub struct Stranger {
    admission: Admission,
    seq: u64,
    key: AddressKey,
    deadline: Instant,
    evict: CancellationToken,
}

impl fmt::Debug for Stranger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stranger")
            .field("key", &self.key)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Stranger {
    /// Logs a failed handshake: every one at debug, and at most one info line per
    /// [`WARN_INTERVAL`] with how many failed, so strangers cannot flood the log (and push
    /// the daemon's real lines out of journald's rate limit). A closed probe (a port probe:
    /// the peer closed before the handshake finished) is not a failure: one debug line.
    fn failed(&self, err: &TlsError) {
        let inner = &self.admission.inner;
        if matches!(err, TlsError::Closed) {
            tracing::debug!(
                listener = inner.name,
                "closed probe: closed before the tls handshake finished"
            );
            return;
        }
        tracing::debug!(listener = inner.name, err = %crate::log::Escaped(err), "tls handshake failed");
        if let Some(failed) = inner.warn_failed.note(Instant::now()) {
            tracing::info!(
                listener = inner.name,
                failed,
                last = %crate::log::Escaped(err),
                "tls handshakes failed (logged at most once per 10 s; each at debug)"
            );
        }
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        // An evicted stranger's permit and count were taken with its entry already.
        let _ = self
            .admission
            .inner
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.seq);
    }
}

impl Stranger {
    /// When the connection must have authenticated.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether a newcomer evicted this stranger (its permit is given away; close it).
    pub fn is_evicted(&self) -> bool {
        self.evict.is_cancelled()
    }

    /// Completes when a newcomer evicts this stranger from the full pool; never once it has
    /// authenticated. A daemon that runs its own authentication (not
    /// [`Stranger::accept_tls`]) takes this before moving the stranger and closes the
    /// connection when it completes.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.evict.clone().cancelled_owned()
    }

    /// The whole pre-authentication phase allowed (the configured deadline).
    pub fn allowed(&self) -> Duration {
        self.admission.inner.limits.deadline
    }

    /// The connection has authenticated: a slot in the main pool, the stranger permit given
    /// back either way.
    ///
    /// # Errors
    /// [`Refused::Connections`] when the main pool is full (counted, and logged at most once
    /// per [`WARN_INTERVAL`]); close the connection (or answer a clean 503).
    /// [`Refused::Handshakes`] when it was evicted first (not counted again).
    pub fn authenticated(self) -> Result<Slot, Refused> {
        if self.is_evicted() {
            return Err(Refused::Handshakes);
        }
        self.admission.inner.main.try_admit()
    }

    /// The whole TLS accept: the handshake under what is left of the deadline, then
    /// [`Stranger::authenticated`]. The stream, the verified peer and the main-pool slot.
    ///
    /// "Authenticated" here is the TLS layer's: the handshake finished under the acceptor's
    /// client-certificate policy (with `client_auth = required`, a verified certificate).
    /// A daemon whose authentication comes later (a login) keeps the [`Stranger`] instead and
    /// runs [`crate::tls::accept`] with [`Stranger::deadline`] itself.
    ///
    /// # Errors
    /// [`AcceptError::Tls`] (a timeout reports the whole deadline; an eviction is a failed
    /// handshake, [`TlsError::Evicted`]) or [`AcceptError::Refused`].
    pub async fn accept_tls<IO>(
        self,
        acceptor: &TlsAcceptor,
        io: IO,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<IO>,
            Option<PeerIdentity>,
            Slot,
        ),
        AcceptError,
    >
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let handshake = tokio::select! {
            accepted = crate::tls::accept(acceptor, io, left) => accepted,
            () = self.evict.cancelled() => Err(TlsError::Evicted),
        };
        let (stream, peer) = match handshake {
            Ok(accepted) => accepted,
            Err(err) => {
                let err = match err {
                    TlsError::HandshakeTimeout(_) => TlsError::HandshakeTimeout(self.allowed()),
                    other => other,
                };
                self.failed(&err);
                return Err(AcceptError::Tls(err));
            }
        };
        let slot = self.authenticated().map_err(AcceptError::Refused)?;
        Ok((stream, peer, slot))
    }
}

impl Stranger {
    /// For a protocol that authenticates inside the connection (a login on an HTTP
    /// connection): a handle its request handlers share, promoted by the first request that
    /// authenticates.
    pub fn pending(self) -> Pending {
        Pending {
            deadline: self.deadline,
            evict: self.evict.clone(),
            state: Mutex::new(PendingState::Stranger(self)),
        }
    }
}

/// A connection whose authentication is up to its protocol: a [`Stranger`] until
/// [`Pending::authenticated`] is first called, a [`Slot`] after. [`Pending::expired`]
/// completes at the deadline, or when the stranger is evicted, unless it has authenticated by
/// then; close the connection then.
#[derive(Debug)]
pub struct Pending {
    deadline: Instant,
    evict: CancellationToken,
    state: Mutex<PendingState>,
}

#[derive(Debug)]
enum PendingState {
    Stranger(Stranger),
    Admitted(Slot),
    Refused,
}

impl Pending {
    /// A request on this connection authenticated: the first call takes the main-pool slot
    /// (giving back the stranger permit), later calls are no-ops.
    ///
    /// # Errors
    /// [`Refused::Connections`]: the main pool was full when the connection first
    /// authenticated (then and on every later call), or [`Refused::Handshakes`] the first
    /// time if it had been evicted; close the connection.
    pub fn authenticated(&self) -> Result<(), Refused> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *state, PendingState::Refused) {
            PendingState::Stranger(stranger) => {
                let slot = stranger.authenticated()?;
                *state = PendingState::Admitted(slot);
                Ok(())
            }
            PendingState::Admitted(slot) => {
                *state = PendingState::Admitted(slot);
                Ok(())
            }
            PendingState::Refused => Err(Refused::Connections),
        }
    }

    /// When the connection must have authenticated.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the connection holds a main-pool slot.
    pub fn is_authenticated(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            PendingState::Admitted(_)
        )
    }

    /// Completes at the deadline, or when a newcomer evicts the stranger, if the connection
    /// has not authenticated by then; never completes for one that has (an authenticated
    /// connection has left the stranger pool and cannot be evicted).
    pub async fn expired(&self) {
        tokio::select! {
            () = tokio::time::sleep_until(self.deadline) => {}
            () = self.evict.cancelled() => {}
        }
        if self.is_authenticated() {
            std::future::pending::<()>().await;
        }
    }
}

mod per_key;
pub use per_key::{KeySlot, PerKey};

#[cfg(test)]
mod tests;
