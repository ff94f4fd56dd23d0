//! Authenticated connections: each is tied to the session it authenticated with, and one user
//! holds at most `max-connections-per-user` of them.
//!
//! A login (or a request on a live session) moves its connection from the stranger pool into a
//! `max-connections` slot. A captured `/auth` body can be replayed at will (its signature
//! covers only the user and the client's X448 key; the protocol must stay the original's), so
//! each replay would otherwise keep a slot for as long as its connection stayed open, and a few
//! hundred replays locked every user out. Two rules bound what one user's logins hold:
//!
//! - a connection is closed (after the request in progress) when the session it last
//!   authenticated with ends: logout, idle timeout, or ended by a newer login of the user;
//! - when a connection of a user who already holds `limit` authenticates, that user's oldest
//!   connection is closed the same way.
//!
//! "Closed" is a [`CancellationToken`] per connection that the connection loop watches.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFuture};

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Per user, their connections in the order they authenticated, with their close tokens.
    users: HashMap<String, BTreeMap<u64, CancellationToken>>,
}

/// How many authenticated connections each user holds, at most `limit` each.
#[derive(Debug)]
pub struct UserConnections {
    limit: usize,
    inner: Mutex<Inner>,
}

impl UserConnections {
    /// At most `limit` (at least 1) connections per user.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection of `user` whose `close` token ends it; the user's oldest
    /// connections beyond the limit are closed (their tokens cancelled) and no longer counted.
    fn admit(self: &Arc<Self>, user: &str, close: CancellationToken) -> UserSlot {
        let (seq, evicted) = {
            let mut inner = self.lock();
            let seq = inner.next;
            inner.next = seq.wrapping_add(1);
            let mine = inner.users.entry(user.to_owned()).or_default();
            mine.insert(seq, close);
            let mut evicted = 0usize;
            while mine.len() > self.limit {
                if let Some((_, oldest)) = mine.pop_first() {
                    oldest.cancel();
                    evicted += 1;
                }
            }
            (seq, evicted)
        };
        if evicted > 0 {
            tracing::debug!(
                user = %common::log::Clipped(&user),
                evicted,
                limit = self.limit,
                "oldest connection of the user closed: max-connections-per-user reached"
            );
        }
        UserSlot {
            owner: Arc::clone(self),
            user: user.to_owned(),
            seq,
        }
    }

    /// Connections `user` holds now.
    pub fn held(&self, user: &str) -> usize {
        self.lock().users.get(user).map_or(0, BTreeMap::len)
    }

    fn release(&self, user: &str, seq: u64) {
        let mut inner = self.lock();
        if let Some(mine) = inner.users.get_mut(user) {
            mine.remove(&seq);
            if mine.is_empty() {
                inner.users.remove(user);
            }
        }
    }
}

/// One connection counted against its user; given back when dropped.
struct UserSlot {
    owner: Arc<UserConnections>,
    user: String,
    seq: u64,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.owner.release(&self.user, self.seq);
    }
}

/// What a connection authenticated with last: its user's slot, the session, and the watcher
/// that closes the connection when that session ends (stopped when dropped).
struct Binding {
    session: String,
    slot: UserSlot,
    _watch: DropGuard,
}

/// One connection's tie to its user and session; the connection loop closes the connection
/// when [`Tie::closing`] completes.
pub struct Tie {
    users: Arc<UserConnections>,
    close: CancellationToken,
    bound: Mutex<Option<(String, Binding)>>,
}

impl fmt::Debug for Tie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tie")
            .field("closing", &self.close.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Tie {
    /// A connection not authenticated yet.
    pub fn new(users: &Arc<UserConnections>) -> Self {
        Self {
            users: Arc::clone(users),
            close: CancellationToken::new(),
            bound: Mutex::new(None),
        }
    }

    /// A request of `user` on session `session` authenticated on this connection (which holds
    /// its `max-connections` slot already): from now on the connection ends with that session,
    /// and counts against `user`'s share. Must be called within a Tokio runtime.
    pub fn bind(&self, user: &str, session: &str, ended: &CancellationToken) {
        let mut bound = self
            .bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = bound.take();
        let slot = match previous {
            Some((bound_user, binding)) if bound_user == user => {
                if binding.session == session {
                    *bound = Some((bound_user, binding));
                    return;
                }
                // Same user, another session: the connection keeps its age in the user's
                // order; the old session's watcher stops with the old binding.
                binding.slot
            }
            _ => self.users.admit(user, self.close.clone()),
        };
        let stop = CancellationToken::new();
        let (close, ended, stopped) = (self.close.clone(), ended.clone(), stop.clone());
        tokio::spawn(async move {
            // A binding replaced before this task first ran must not close the connection.
            tokio::select! {
                biased;
                () = stopped.cancelled() => {}
                () = ended.cancelled() => close.cancel(),
            }
        });
        *bound = Some((
            user.to_owned(),
            Binding {
                session: session.to_owned(),
                slot,
                _watch: stop.drop_guard(),
            },
        ));
    }

    /// Completes when the connection must close after its request in progress: its session
    /// ended, or a newer connection of its user took its place.
    pub fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_over_the_limit_loses_the_oldest_connection_only() {
        let users = UserConnections::new(2);
        let ties: Vec<Tie> = (0..4).map(|_| Tie::new(&users)).collect();
        let session = CancellationToken::new();
        for tie in &ties {
            tie.bind("alice", "s1", &session);
        }
        let bob = Tie::new(&users);
        bob.bind("bob", "s2", &CancellationToken::new());
        assert_eq!(users.held("alice"), 2);
        assert_eq!(users.held("bob"), 1);
        let closed: Vec<bool> = ties.iter().map(|t| t.close.is_cancelled()).collect();
        assert_eq!(closed, [true, true, false, false]);
        assert!(!bob.close.is_cancelled());
        // Binding again to the same session changes nothing; dropping gives the share back.
        ties[3].bind("alice", "s1", &session);
        assert_eq!(users.held("alice"), 2);
        drop(ties);
        assert_eq!(users.held("alice"), 0);
        assert!(users.lock().users.contains_key("bob"));
    }

    #[tokio::test]
    async fn a_connection_closes_when_its_latest_session_ends() {
        let users = UserConnections::new(8);
        let tie = Tie::new(&users);
        let (first, second) = (CancellationToken::new(), CancellationToken::new());
        tie.bind("alice", "s1", &first);
        tie.bind("alice", "s2", &second);
        assert_eq!(users.held("alice"), 1);
        first.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !tie.close.is_cancelled(),
            "a session it moved on from does not close it"
        );
        second.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), tie.closing())
            .await
            .unwrap();
    }
}
