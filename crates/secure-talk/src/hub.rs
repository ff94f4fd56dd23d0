//! The server's bookkeeping: clients and their two channels, pipes and their owners.
//!
//! One mutex guards it all; every operation is a few map updates and never awaits while
//! holding it. Messages to websockets go through bounded per-connection queues ([`Out`]);
//! what the hub returns is what the caller should send, so the rules are testable without
//! sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use common::envelope::ipc::Frame;
use common::tls::PeerIdentity;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// A client identity (the token's `client_id`).
pub type ClientId = u64;
/// A pipe id, from 0, never reused within a run.
pub type PipeId = u64;
/// A websocket connection number, unique in the process.
pub type ConnId = u64;

/// Frames queued for a pipe before it checks in.
pub const MAX_PENDING_FRAMES: usize = 64;

/// Close code for a connection replaced by a newer one of the same client and channel.
pub const CLOSE_REPLACED: u16 = 4001;
/// Close code for a client disconnected by an administrator.
pub const CLOSE_DISCONNECTED: u16 = 4003;

/// Something to write on a websocket.
#[derive(Debug)]
pub enum Out {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// Close with this code and reason.
    Close(u16, String),
    /// Pipe output holding its share of the connection's [`Conn::room`] until it is written.
    Held(Box<Out>, OwnedSemaphorePermit),
}

impl Out {
    /// Bytes of payload it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Binary(bytes) => bytes.len(),
            Self::Close(_, reason) => reason.len(),
            Self::Held(out, _) => out.len(),
        }
    }

    /// Whether it holds no payload.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message itself, without the room it held.
    #[must_use]
    pub fn unheld(self) -> Self {
        match self {
            Self::Held(out, _) => *out,
            other => other,
        }
    }
}

/// Which websocket of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// `/`: commands and replies.
    Admin,
    /// `/data`: pipe output.
    Data,
}

/// A live websocket's queue.
#[derive(Debug, Clone)]
pub struct Conn {
    /// Its number.
    pub id: ConnId,
    /// Its queue.
    pub tx: mpsc::Sender<Out>,
    /// Bytes of pipe output that may wait in its queue (`send_queue_bytes` permits): a pipe
    /// whose output does not fit waits, so a client that does not read stops its pipes
    /// instead of growing the daemon.
    pub room: Arc<Semaphore>,
}

impl Conn {
    /// A connection numbered `id` with its queue and `room_bytes` of room for pipe output.
    #[must_use]
    pub fn new(id: ConnId, tx: mpsc::Sender<Out>, room_bytes: usize) -> Self {
        let permits = room_bytes.min(Semaphore::MAX_PERMITS);
        Self {
            id,
            tx,
            room: Arc::new(Semaphore::new(permits)),
        }
    }
}

#[derive(Debug)]
struct Client {
    admin: Option<Conn>,
    data: Option<Conn>,
    identity: Option<PeerIdentity>,
    pipes: BTreeSet<PipeId>,
    /// When its last connection closed; `None` while connected.
    gone_since: Option<Instant>,
}

impl Client {
    fn connected(&self) -> bool {
        self.admin.is_some() || self.data.is_some()
    }
}

/// What a pipe was created with.
#[derive(Debug, Clone)]
pub struct PipeSpec {
    /// The create JSON as sent.
    pub create: Value,
    /// Sent right after the check-in, before anything queued (the dialect's
    /// [`crate::dialect::Dialect::first_frames`]).
    pub first: Vec<Frame>,
}

#[derive(Debug)]
struct Pipe {
    owner: ClientId,
    /// Who pays for it (see [`PipeLimits::per_party`]).
    party: String,
    /// Bytes that may wait for the pipe (`pipe_queue_bytes` permits).
    room: Arc<Semaphore>,
    /// Its size.
    room_bytes: usize,
    spec: PipeSpec,
    property: Option<Value>,
    pid: Option<u32>,
    to_pipe: Option<mpsc::Sender<ToPipe>>,
    pending: Vec<ToPipe>,
    created: SystemTime,
    stop: CancellationToken,
    /// Cancelled when the pipe's IPC connection has relayed everything it read.
    relayed: CancellationToken,
    /// Cancelled when the pipe checks in: wakes its supervisor, which disarms the check-in
    /// timer, and the listener on its descriptor when it checked in over the path socket.
    checked_in: CancellationToken,
    /// When it was recorded (an orphan's clock when its owner has no entry).
    since: Instant,
    destroying: bool,
}

/// The limits [`Hub::create_pipes`] keeps.
#[derive(Debug, Clone, Copy)]
pub struct PipeLimits {
    /// Pipes one client id may own (`max_pipes_per_client`).
    pub per_client: usize,
    /// Pipes one party (certificate, local uid or address) may own across all its client ids
    /// (`max_pipes_per_identity`): tokens are free, client ids are not a party.
    pub per_party: usize,
    /// Pipes in the server (`max_pipes`).
    pub total: usize,
    /// Bytes of frames queued towards one pipe (`pipe_queue_bytes`).
    pub queue_bytes: usize,
}

/// A frame on its way to a pipe, holding its share of the pipe's queue room until it has been
/// written to the pipe.
#[derive(Debug)]
pub struct ToPipe {
    /// The frame.
    pub frame: Frame,
    _room: Option<OwnedSemaphorePermit>,
}

impl ToPipe {
    fn unheld(frame: Frame) -> Self {
        Self { frame, _room: None }
    }
}

/// A pipe just recorded by [`Hub::create_pipes`].
#[derive(Debug, Clone)]
pub struct NewPipe {
    /// Its id.
    pub id: PipeId,
    /// Cancelled to stop it (destroy, orphan reaper, protocol error).
    pub stop: CancellationToken,
    /// Cancelled when it has checked in.
    pub checked_in: CancellationToken,
}

/// How a check-in reached the server, which decides what proves it comes from the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckInVia {
    /// On the socket the daemon made for pipe `PipeId` and handed to its process only (its
    /// inherited descriptor): only that pipe's id may check in on it.
    Descriptor(PipeId),
    /// On the shared path socket, from the process `SO_PEERCRED` names: only the exact
    /// process that was spawned may check in (never its process group, which another
    /// process may join).
    Path(Option<u32>),
}

/// Why a request about a pipe was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    /// No such pipe, or not the caller's (the two are not told apart to non-owners).
    #[error("pipe {0} not exists")]
    NotFound(PipeId),
    /// The owner's limit.
    #[error("client {client} already has {max} pipes (max_pipes_per_client)")]
    ClientLimit {
        /// The client.
        client: ClientId,
        /// The limit.
        max: usize,
    },
    /// The limit of one party across its client ids.
    #[error("this identity already has {0} pipes (max_pipes_per_identity)")]
    PartyLimit(usize),
    /// The server's limit.
    #[error("the server already runs {0} pipes (max_pipes)")]
    ServerLimit(usize),
    /// Too many frames queued before check-in.
    #[error("pipe {0} has not checked in and its queue is full")]
    QueueFull(PipeId),
    /// The pipe's queue is closed or full.
    #[error("pipe {0} is not accepting messages")]
    Unavailable(PipeId),
}

/// Why a check-in was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckInError {
    /// No pipe has this id.
    #[error("no pipe {0}")]
    Unknown(PipeId),
    /// The id has checked in already.
    #[error("pipe {0} has already checked in")]
    Duplicate(PipeId),
    /// The connecting process is not the process spawned for the pipe.
    #[error("pipe {0} is not run by the connecting process")]
    WrongProcess(PipeId),
    /// The check-in came on another pipe's descriptor.
    #[error("pipe {0} checked in on the descriptor of pipe {1}")]
    WrongDescriptor(PipeId, PipeId),
    /// The pipe's process id is not recorded yet: it connected while still being spawned.
    #[error("pipe {0} is still being started")]
    Starting(PipeId),
}

/// Refused attach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many clients (max_clients {0})")]
pub struct TooManyClients(pub usize);

/// One client in a `list` answer.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    /// Its id.
    pub client_id: ClientId,
    /// Admin channel connected.
    pub admin_connected: bool,
    /// Data channel connected.
    pub data_connected: bool,
    /// Certificate subject CN, when it came over TLS with one.
    pub identity: Option<String>,
    /// Its pipes.
    pub pipes: Vec<PipeId>,
}

/// One pipe in a `list` answer.
#[derive(Debug, Clone, Serialize)]
pub struct PipeView {
    /// Its id.
    pub pipe_id: PipeId,
    /// Its owner.
    pub owner: ClientId,
    /// Its process id.
    pub pid: Option<u32>,
    /// Whether it has checked in.
    pub checked_in: bool,
    /// Unix seconds of creation.
    pub created: u64,
    /// The create JSON.
    pub create: Value,
    /// The last property JSON.
    pub property: Option<Value>,
}

#[derive(Debug, Default)]
struct State {
    clients: BTreeMap<ClientId, Client>,
    pipes: BTreeMap<PipeId, Pipe>,
    next_pipe: PipeId,
}

/// The shared bookkeeping.
#[derive(Debug, Default)]
pub struct Hub {
    state: Mutex<State>,
    /// Woken whenever a data channel attaches.
    pub data_attached: Notify,
}

impl State {
    /// Pipe `pipe` when `client` owns it (`None`: any owner).
    fn owned_pipe(
        &mut self,
        client: Option<ClientId>,
        pipe: PipeId,
    ) -> Result<&mut Pipe, PipeError> {
        self.pipes
            .get_mut(&pipe)
            .filter(|p| client.is_none_or(|c| p.owner == c))
            .ok_or(PipeError::NotFound(pipe))
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection as `client`'s `channel`; an earlier one is returned so the
    /// caller can close it. Returns the client's pipe ids too.
    ///
    /// # Errors
    /// A new client id beyond `max_clients` connected ones.
    pub fn attach(
        &self,
        client: ClientId,
        channel: Channel,
        conn: Conn,
        identity: Option<PeerIdentity>,
        max_clients: usize,
    ) -> Result<(Option<Conn>, Vec<PipeId>), TooManyClients> {
        let mut state = self.lock();
        let connected = state.clients.values().filter(|c| c.connected()).count();
        let entry = state.clients.get(&client);
        if !entry.is_some_and(Client::connected) && connected >= max_clients {
            return Err(TooManyClients(max_clients));
        }
        let entry = state.clients.entry(client).or_insert_with(|| Client {
            admin: None,
            data: None,
            identity: None,
            pipes: BTreeSet::new(),
            gone_since: None,
        });
        if identity.is_some() {
            entry.identity = identity;
        }
        entry.gone_since = None;
        let slot = match channel {
            Channel::Admin => &mut entry.admin,
            Channel::Data => &mut entry.data,
        };
        let old = slot.replace(conn);
        let pipes = entry.pipes.iter().copied().collect();
        drop(state);
        if channel == Channel::Data {
            self.data_attached.notify_waiters();
        }
        Ok((old, pipes))
    }

    /// Whether [`Hub::attach`] would accept `client` now (for a clean refusal before the
    /// upgrade; attach checks again).
    pub fn would_admit(&self, client: ClientId, max_clients: usize) -> bool {
        let state = self.lock();
        state.clients.get(&client).is_some_and(Client::connected)
            || state.clients.values().filter(|c| c.connected()).count() < max_clients
    }

    /// Unregisters a connection, if it is still the registered one.
    pub fn detach(&self, client: ClientId, channel: Channel, conn: ConnId) {
        let mut state = self.lock();
        let Some(entry) = state.clients.get_mut(&client) else {
            return;
        };
        let slot = match channel {
            Channel::Admin => &mut entry.admin,
            Channel::Data => &mut entry.data,
        };
        if slot.as_ref().is_some_and(|c| c.id == conn) {
            *slot = None;
        }
        if !entry.connected() {
            if entry.pipes.is_empty() {
                state.clients.remove(&client);
            } else {
                entry.gone_since = Some(Instant::now());
            }
        }
    }

    /// The queue of `client`'s channel, if connected.
    pub fn conn(&self, client: ClientId, channel: Channel) -> Option<Conn> {
        let state = self.lock();
        let entry = state.clients.get(&client)?;
        match channel {
            Channel::Admin => entry.admin.clone(),
            Channel::Data => entry.data.clone(),
        }
    }

    /// Every connection of `client` (to disconnect it).
    pub fn conns_of(&self, client: ClientId) -> Vec<Conn> {
        let state = self.lock();
        state
            .clients
            .get(&client)
            .map(|c| c.admin.iter().chain(c.data.iter()).cloned().collect())
            .unwrap_or_default()
    }

    /// Every live connection (for shutdown).
    pub fn all_conns(&self) -> Vec<Conn> {
        let state = self.lock();
        state
            .clients
            .values()
            .flat_map(|c| c.admin.iter().chain(c.data.iter()).cloned())
            .collect()
    }

    /// Number of clients with a live connection.
    pub fn connected_clients(&self) -> usize {
        self.lock()
            .clients
            .values()
            .filter(|c| c.connected())
            .count()
    }

    /// Records new pipes for `owner` and returns them; nothing is recorded when a limit would
    /// be passed. The owner's entry is made when it has none (its last connection may have
    /// closed while this request was being handled), so every pipe is counted against its
    /// owner's limit and seen by the orphan reaper.
    ///
    /// # Errors
    /// Per-client or server limit.
    pub fn create_pipes(
        &self,
        owner: ClientId,
        party: &str,
        spec: &PipeSpec,
        count: usize,
        limits: &PipeLimits,
    ) -> Result<Vec<NewPipe>, PipeError> {
        let mut state = self.lock();
        let owned = state.clients.get(&owner).map_or(0, |c| c.pipes.len());
        if owned.saturating_add(count) > limits.per_client {
            return Err(PipeError::ClientLimit {
                client: owner,
                max: limits.per_client,
            });
        }
        let of_party = state.pipes.values().filter(|p| p.party == party).count();
        if of_party.saturating_add(count) > limits.per_party {
            return Err(PipeError::PartyLimit(limits.per_party));
        }
        if state.pipes.len().saturating_add(count) > limits.total {
            return Err(PipeError::ServerLimit(limits.total));
        }
        let room_bytes = limits.queue_bytes.min(Semaphore::MAX_PERMITS);
        let now = Instant::now();
        let mut created = Vec::with_capacity(count);
        for _ in 0..count {
            let id = state.next_pipe;
            state.next_pipe += 1;
            let new = NewPipe {
                id,
                stop: CancellationToken::new(),
                checked_in: CancellationToken::new(),
            };
            state.pipes.insert(
                id,
                Pipe {
                    owner,
                    party: party.to_owned(),
                    room: Arc::new(Semaphore::new(room_bytes)),
                    room_bytes,
                    spec: spec.clone(),
                    property: None,
                    pid: None,
                    to_pipe: None,
                    pending: Vec::new(),
                    created: SystemTime::now(),
                    stop: new.stop.clone(),
                    relayed: CancellationToken::new(),
                    checked_in: new.checked_in.clone(),
                    since: now,
                    destroying: false,
                },
            );
            created.push(new);
        }
        let client = state.clients.entry(owner).or_insert_with(|| Client {
            admin: None,
            data: None,
            identity: None,
            pipes: BTreeSet::new(),
            // No connection is registered for it: the reaper's clock starts now.
            gone_since: Some(now),
        });
        client.pipes.extend(created.iter().map(|p| p.id));
        Ok(created)
    }

    /// Records the process id of a spawned pipe.
    pub fn set_pid(&self, pipe: PipeId, pid: u32) {
        if let Some(p) = self.lock().pipes.get_mut(&pipe) {
            p.pid = Some(pid);
        }
    }

    /// Pipe ids owned by `client`.
    pub fn pipes_of(&self, client: ClientId) -> Vec<PipeId> {
        self.lock()
            .clients
            .get(&client)
            .map(|c| c.pipes.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The owner of a pipe.
    pub fn owner(&self, pipe: PipeId) -> Option<ClientId> {
        self.lock().pipes.get(&pipe).map(|p| p.owner)
    }

    /// Accepts a pipe's check-in that came `via` the path socket or a pipe's descriptor;
    /// returns the frames to send it first (its dialect's first frames, then queued ones).
    ///
    /// # Errors
    /// Unknown id, second check-in, a check-in on another pipe's descriptor, or a process
    /// that is not the one spawned for the pipe.
    pub fn check_in(
        &self,
        pipe: PipeId,
        via: CheckInVia,
        tx: mpsc::Sender<ToPipe>,
    ) -> Result<Vec<ToPipe>, CheckInError> {
        let mut state = self.lock();
        let p = state
            .pipes
            .get_mut(&pipe)
            .ok_or(CheckInError::Unknown(pipe))?;
        if p.to_pipe.is_some() {
            return Err(CheckInError::Duplicate(pipe));
        }
        match via {
            // Only the pipe's process (and what it started) holds its descriptor.
            CheckInVia::Descriptor(holder) if holder != pipe => {
                return Err(CheckInError::WrongDescriptor(pipe, holder));
            }
            CheckInVia::Descriptor(_) => {}
            // The kernel vouches for the peer's pid; a process group can be joined by any
            // process of the same user, a pid cannot be taken while the pipe runs.
            CheckInVia::Path(peer) => match p.pid {
                None => return Err(CheckInError::Starting(pipe)),
                Some(pid) if peer == Some(pid) => {}
                Some(_) => return Err(CheckInError::WrongProcess(pipe)),
            },
        }
        p.to_pipe = Some(tx);
        p.checked_in.cancel();
        let mut frames: Vec<ToPipe> = p.spec.first.iter().cloned().map(ToPipe::unheld).collect();
        frames.append(&mut p.pending);
        Ok(frames)
    }

    /// Queues a frame for a pipe owned by `client` (`None`: any owner, for the server).
    ///
    /// # Errors
    /// Not found or not owned, queue full, or the pipe is not reading.
    pub fn send_to_pipe(
        &self,
        client: Option<ClientId>,
        pipe: PipeId,
        frame: Frame,
    ) -> Result<(), PipeError> {
        let mut state = self.lock();
        let p = state.owned_pipe(client, pipe)?;
        // Counted in bytes as well as frames: a frame larger than the whole room waits for
        // an empty queue and goes alone.
        let want = frame.payload.len().min(p.room_bytes);
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        let room = p.room.clone().try_acquire_many_owned(want);
        match (&p.to_pipe, room) {
            (Some(tx), Ok(room)) => {
                let queued = ToPipe {
                    frame,
                    _room: Some(room),
                };
                tx.try_send(queued)
                    .map_err(|_| PipeError::Unavailable(pipe))
            }
            (Some(_), Err(_)) => Err(PipeError::Unavailable(pipe)),
            (None, Ok(room)) if p.pending.len() < MAX_PENDING_FRAMES => {
                p.pending.push(ToPipe {
                    frame,
                    _room: Some(room),
                });
                Ok(())
            }
            (None, _) => Err(PipeError::QueueFull(pipe)),
        }
    }

    /// Records the last property JSON of a pipe owned by `client`.
    pub fn set_property(&self, client: ClientId, pipe: PipeId, property: Value) {
        if let Some(p) = self
            .lock()
            .pipes
            .get_mut(&pipe)
            .filter(|p| p.owner == client)
        {
            p.property = Some(property);
        }
    }

    /// Marks a pipe owned by `client` (`None`: any) as being destroyed; returns its stop token
    /// and whether it has checked in. A second call finds it already destroying and returns
    /// the same.
    ///
    /// # Errors
    /// Not found or not owned.
    pub fn begin_destroy(
        &self,
        client: Option<ClientId>,
        pipe: PipeId,
    ) -> Result<(CancellationToken, bool), PipeError> {
        let mut state = self.lock();
        let p = state.owned_pipe(client, pipe)?;
        p.destroying = true;
        Ok((p.stop.clone(), p.to_pipe.is_some()))
    }

    /// The token an IPC connection cancels once it has relayed all the pipe's output, so
    /// `pipe_delete` does not overtake the pipe's last frames.
    pub fn relayed(&self, pipe: PipeId) -> Option<CancellationToken> {
        self.lock().pipes.get(&pipe).map(|p| p.relayed.clone())
    }

    /// Whether the pipe has checked in.
    pub fn checked_in(&self, pipe: PipeId) -> bool {
        self.lock()
            .pipes
            .get(&pipe)
            .is_some_and(|p| p.to_pipe.is_some())
    }

    /// Forgets a pipe whose process has exited; returns its owner's admin queue (to send
    /// `pipe_delete`) and the owner id.
    pub fn pipe_exited(&self, pipe: PipeId) -> Option<(ClientId, Option<Conn>)> {
        let mut state = self.lock();
        let p = state.pipes.remove(&pipe)?;
        let owner = p.owner;
        let mut admin = None;
        let mut forget = false;
        if let Some(client) = state.clients.get_mut(&owner) {
            client.pipes.remove(&pipe);
            admin = client.admin.clone();
            forget = !client.connected() && client.pipes.is_empty();
        }
        if forget {
            state.clients.remove(&owner);
        }
        Some((owner, admin))
    }

    /// Pipes whose owner has had no connection for longer than `after`, found by each pipe's
    /// owner (a pipe whose owner has no entry at all counts from its creation); pipes already
    /// being destroyed are left to their supervisor.
    pub fn orphans(&self, after: std::time::Duration) -> Vec<PipeId> {
        let state = self.lock();
        state
            .pipes
            .iter()
            .filter(|(_, p)| !p.destroying)
            .filter(|(_, p)| {
                let gone_since = match state.clients.get(&p.owner) {
                    Some(client) => client.gone_since,
                    None => Some(p.since),
                };
                gone_since.is_some_and(|t| t.elapsed() > after)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every pipe's stop token (for shutdown).
    pub fn all_pipes(&self) -> Vec<(PipeId, CancellationToken)> {
        self.lock()
            .pipes
            .iter()
            .map(|(id, p)| (*id, p.stop.clone()))
            .collect()
    }

    /// Clients with an admin channel, clients with a data channel, and pipes, now (what
    /// `/metrics` reports).
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.lock();
        let admin = state.clients.values().filter(|c| c.admin.is_some()).count();
        let data = state.clients.values().filter(|c| c.data.is_some()).count();
        (admin, data, state.pipes.len())
    }

    /// Clients and pipes, all of them or only `client`'s.
    pub fn list(&self, client: Option<ClientId>) -> (Vec<ClientView>, Vec<PipeView>) {
        let state = self.lock();
        let clients = state
            .clients
            .iter()
            .filter(|(id, _)| client.is_none_or(|c| c == **id))
            .map(|(id, c)| ClientView {
                client_id: *id,
                admin_connected: c.admin.is_some(),
                data_connected: c.data.is_some(),
                identity: c.identity.as_ref().and_then(|i| i.cn.clone()),
                pipes: c.pipes.iter().copied().collect(),
            })
            .collect();
        let pipes = state
            .pipes
            .iter()
            .filter(|(_, p)| client.is_none_or(|c| c == p.owner))
            .map(|(id, p)| PipeView {
                pipe_id: *id,
                owner: p.owner,
                pid: p.pid,
                checked_in: p.to_pipe.is_some(),
                created: p
                    .created
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                create: p.spec.create.clone(),
                property: p.property.clone(),
            })
            .collect();
        (clients, pipes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: ConnId) -> (Conn, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(4);
        (Conn::new(id, tx, 1 << 20), rx)
    }

    /// A hub with `client`'s admin channel attached (connection 1).
    fn with_admin(client: ClientId) -> (Hub, mpsc::Receiver<Out>) {
        let hub = Hub::default();
        let (a, ra) = conn(1);
        hub.attach(client, Channel::Admin, a, None, 10).unwrap();
        (hub, ra)
    }

    fn limits(per_client: usize, total: usize) -> PipeLimits {
        PipeLimits {
            per_client,
            per_party: usize::MAX,
            total,
            queue_bytes: 1 << 20,
        }
    }

    fn spec() -> PipeSpec {
        PipeSpec {
            create: Value::Null,
            first: vec![Frame::new(2u32, "{}"), Frame::new(3u32, "true")],
        }
    }

    #[test]
    fn attach_replace_detach_and_limits() {
        let hub = Hub::default();
        let (a1, _r1) = conn(1);
        let (a2, _r2) = conn(2);
        assert!(
            hub.attach(7, Channel::Admin, a1, None, 1)
                .unwrap()
                .0
                .is_none()
        );
        let (old, _) = hub.attach(7, Channel::Admin, a2, None, 1).unwrap();
        assert_eq!(old.map(|c| c.id), Some(1));
        // A second client id is over max_clients = 1.
        let (b, _rb) = conn(3);
        assert_eq!(
            hub.attach(8, Channel::Admin, b, None, 1).unwrap_err(),
            TooManyClients(1)
        );
        // Closing the replaced connection does not unregister the newer one.
        hub.detach(7, Channel::Admin, 1);
        assert_eq!(hub.conn(7, Channel::Admin).map(|c| c.id), Some(2));
        hub.detach(7, Channel::Admin, 2);
        assert!(hub.conn(7, Channel::Admin).is_none());
        assert_eq!(hub.connected_clients(), 0);
    }

    #[test]
    fn pipes_ownership_checkin_and_exit() {
        let (hub, _ra) = with_admin(1);
        let ids: Vec<_> = hub
            .create_pipes(1, "party", &spec(), 2, &limits(2, 10))
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, vec![0, 1]);
        assert!(matches!(
            hub.create_pipes(1, "party", &spec(), 1, &limits(2, 10)),
            Err(PipeError::ClientLimit { .. })
        ));
        assert!(matches!(
            hub.create_pipes(2, "party", &spec(), 1, &limits(5, 2)),
            Err(PipeError::ServerLimit(2))
        ));
        // Someone else's pipe looks like no pipe.
        assert_eq!(
            hub.send_to_pipe(Some(2), 0, Frame::new(0u32, "x")),
            Err(PipeError::NotFound(0))
        );
        assert!(hub.begin_destroy(Some(2), 0).is_err());
        // Queued before check-in, delivered after config and launch.
        hub.send_to_pipe(Some(1), 0, Frame::new(4u32, "{\"p\":1}"))
            .unwrap();
        let (tx, _rx) = mpsc::channel(4);
        assert_eq!(
            hub.check_in(0, CheckInVia::Path(Some(100)), tx.clone())
                .err(),
            Some(CheckInError::Starting(0))
        );
        hub.set_pid(0, 100);
        // A process that joined the pipe's process group is not the pipe.
        assert_eq!(
            hub.check_in(0, CheckInVia::Path(Some(101)), tx.clone())
                .err(),
            Some(CheckInError::WrongProcess(0))
        );
        assert_eq!(
            hub.check_in(0, CheckInVia::Path(None), tx.clone()).err(),
            Some(CheckInError::WrongProcess(0))
        );
        // Pipe 1's descriptor cannot check in pipe 0.
        assert_eq!(
            hub.check_in(0, CheckInVia::Descriptor(1), tx.clone()).err(),
            Some(CheckInError::WrongDescriptor(0, 1))
        );
        assert!(!hub.checked_in(0));
        let frames = hub
            .check_in(0, CheckInVia::Path(Some(100)), tx.clone())
            .unwrap();
        let kinds: Vec<u32> = frames.iter().map(|q| q.frame.kind.number()).collect();
        assert_eq!(kinds, vec![2, 3, 4]);
        assert!(hub.checked_in(0));
        assert_eq!(
            hub.check_in(0, CheckInVia::Descriptor(0), tx.clone()).err(),
            Some(CheckInError::Duplicate(0))
        );
        // On its own descriptor a pipe checks in before its pid is even recorded.
        assert_eq!(
            hub.check_in(1, CheckInVia::Descriptor(1), tx)
                .map(|f| f.len()),
            Ok(2)
        );
        assert_eq!(
            hub.check_in(9, CheckInVia::Path(Some(1)), mpsc::channel(1).0)
                .err(),
            Some(CheckInError::Unknown(9))
        );
        let (owner, admin) = hub.pipe_exited(0).unwrap();
        assert_eq!((owner, admin.map(|c| c.id)), (1, Some(1)));
        assert_eq!(hub.pipes_of(1), vec![1]);
        let (clients, pipes) = hub.list(Some(1));
        assert_eq!(clients.len(), 1);
        assert_eq!(pipes.len(), 1);
    }

    #[test]
    fn orphans_after_owner_leaves() {
        let (hub, _ra) = with_admin(1);
        hub.create_pipes(1, "party", &spec(), 1, &limits(4, 4))
            .unwrap();
        assert!(hub.orphans(std::time::Duration::ZERO).is_empty());
        hub.detach(1, Channel::Admin, 1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(hub.orphans(std::time::Duration::ZERO), vec![0]);
        // The owner comes back and sees its pipe.
        let (a, _ra) = conn(2);
        let (_, pipes) = hub.attach(1, Channel::Admin, a, None, 10).unwrap();
        assert_eq!(pipes, vec![0]);
        assert!(hub.orphans(std::time::Duration::ZERO).is_empty());
    }

    #[test]
    fn check_in_wakes_whoever_waits_for_it() {
        let hub = Hub::default();
        let new = hub
            .create_pipes(1, "party", &spec(), 1, &limits(4, 4))
            .unwrap()
            .remove(0);
        assert!(!new.checked_in.is_cancelled());
        hub.check_in(new.id, CheckInVia::Descriptor(new.id), mpsc::channel(1).0)
            .unwrap();
        assert!(new.checked_in.is_cancelled());
    }

    /// A second admin connection of the client attaches and closes while the first is still
    /// creating pipes: the client entry was removed, and every later create recorded no id,
    /// so neither the limit nor the orphan reaper saw those pipes.
    #[test]
    fn creates_after_the_last_registered_connection_closed_still_count() {
        let hub = Hub::default();
        let (first, _r1) = conn(1);
        let (second, _r2) = conn(2);
        hub.attach(7, Channel::Admin, first, None, 10).unwrap();
        hub.attach(7, Channel::Admin, second, None, 10).unwrap();
        hub.detach(7, Channel::Admin, 2);
        // The first connection, replaced but still handling its batch, creates 30 pipes.
        let created = (0..30)
            .filter(|_| {
                hub.create_pipes(7, "party", &spec(), 1, &limits(16, 256))
                    .is_ok()
            })
            .count();
        assert_eq!(created, 16, "max_pipes_per_client holds");
        assert_eq!(hub.pipes_of(7).len(), 16);
        hub.detach(7, Channel::Admin, 1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(hub.orphans(std::time::Duration::ZERO).len(), 16);
        // A pipe being destroyed is left to its supervisor.
        hub.begin_destroy(None, 0).unwrap();
        assert_eq!(hub.orphans(std::time::Duration::ZERO).len(), 15);
    }
}
