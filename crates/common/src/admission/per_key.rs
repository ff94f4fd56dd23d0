//! A cap on how many connections one key holds at once: a uid on a Unix socket
//! (`SO_PEERCRED`), a source address on TCP. It sits beside a pool (a [`super::Pool`] or the
//! main pool of an [`super::Admission`]) so that one key can never take every slot of it.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::Warning;

/// How many connections each key holds, with a limit per key. Refusals are counted and logged
/// at most once per [`super::WARN_INTERVAL`] with their number.
pub struct PerKey<K> {
    name: &'static str,
    key_name: &'static str,
    limit: usize,
    held: Mutex<HashMap<K, usize>>,
    refused: AtomicU64,
    warning: Warning,
}

impl<K> fmt::Debug for PerKey<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerKey")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + fmt::Debug> PerKey<K> {
    /// At most `limit` connections per key; `name` (e.g. `unix`) and `key_name` (the
    /// configuration key that sets the limit) appear in the warning.
    pub fn new(name: &'static str, key_name: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            key_name,
            limit,
            held: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            warning: Warning::default(),
        })
    }

    /// A slot for `key`, or `None` when it holds `limit` already (counted, and logged at most
    /// once per [`super::WARN_INTERVAL`]).
    pub fn try_admit(self: &Arc<Self>, key: K) -> Option<KeySlot<K>> {
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.get(&key).copied().unwrap_or(0) < self.limit {
                let count = held.entry(key.clone()).or_insert(0);
                *count = count.saturating_add(1);
                return Some(KeySlot {
                    owner: self.clone(),
                    key,
                });
            }
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(refused) = self.warning.note(Instant::now()) {
            tracing::warn!(
                pool = self.name,
                limit = self.limit,
                refused,
                last = ?key,
                "refusing connections: {} reached",
                self.key_name
            );
        }
        None
    }

    /// Connections `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// The limit per key.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Connections refused since start-up.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn release(&self, key: &K) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(key);
            }
        }
    }
}

/// One connection counted against its key; given back when dropped.
pub struct KeySlot<K: Hash + Eq + Clone + fmt::Debug> {
    owner: Arc<PerKey<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone + fmt::Debug> fmt::Debug for KeySlot<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySlot").field("key", &self.key).finish()
    }
}

impl<K: Hash + Eq + Clone + fmt::Debug> Drop for KeySlot<K> {
    fn drop(&mut self) {
        self.owner.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_cannot_take_more_than_its_share() {
        let cap = PerKey::new("unix", "max_local_connections_per_uid", 2);
        let a1 = cap.try_admit(1000u32).unwrap();
        let _a2 = cap.try_admit(1000).unwrap();
        assert!(cap.try_admit(1000).is_none(), "third for the same key");
        assert_eq!(cap.refused(), 1);
        let _b = cap.try_admit(1001).expect("another key has its own share");
        assert_eq!(cap.held(&1000), 2);
        drop(a1);
        assert_eq!(cap.held(&1000), 1);
        let _a3 = cap
            .try_admit(1000)
            .expect("a slot given back is free again");
        assert_eq!(cap.held(&7), 0);
    }

    #[test]
    fn keys_are_forgotten_when_their_last_slot_goes() {
        let cap = PerKey::new("https", "max_connections_per_address", 1);
        for key in 0..1000u32 {
            drop(cap.try_admit(key).unwrap());
        }
        assert!(cap.held.lock().unwrap().is_empty());
    }
}
