//! The budget of bytes in flight: what every connection together holds of messages it is
//! still receiving (text being assembled, binary messages handled in memory, headers and
//! spool buffers of uploads), and each party's share of it ([`Shares`]).
//!
//! A connection charges its party's share (which takes from the global budget too) as a
//! message grows, in steps of [`STEP`], and gives the charge back when the message is handled
//! or the connection ends ([`Charge`] releases on drop). When the share or the budget is
//! spent, the growing message's connection is closed with 1013 (try again later) instead of
//! the server growing. The share keeps one party (a certificate, a local uid, an address:
//! `Peer::key`) from taking the whole budget with many connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Granularity of charges (so a message growing 8 KiB at a time does not touch the counter
/// on every read).
pub(crate) const STEP: usize = 64 * 1024;

/// Bytes in flight: all connections together, or one party's share (a budget with a parent
/// takes every byte from both).
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    max: usize,
    parent: Option<Arc<Budget>>,
}

/// Which budget refused a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spent {
    /// The party's share.
    Share,
    /// The global budget.
    Total,
}

impl Budget {
    /// A budget of `max` bytes.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
            parent: None,
        })
    }

    /// A share of at most `max` bytes of `parent`.
    fn share(parent: &Arc<Self>, max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
            parent: Some(parent.clone()),
        })
    }

    /// Bytes charged now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> Result<(), Spent> {
        let spent = if self.parent.is_some() {
            Spent::Share
        } else {
            Spent::Total
        };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.max)
            })
            .map_err(|_| spent)?;
        if let Some(parent) = &self.parent {
            if let Err(spent) = parent.take(n) {
                self.used.fetch_sub(n, Ordering::AcqRel);
                return Err(spent);
            }
        }
        Ok(())
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        if let Some(parent) = &self.parent {
            parent.give(n);
        }
    }
}

/// Each party's share of the global budget, kept while the party has a connection.
#[derive(Debug)]
pub(crate) struct Shares {
    total: Arc<Budget>,
    per_party: usize,
    /// Each party's share and its connections.
    live: Mutex<HashMap<String, (Arc<Budget>, usize)>>,
}

impl Shares {
    /// Shares of at most `per_party` bytes of `total`.
    pub(crate) fn new(total: Arc<Budget>, per_party: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_party,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// The global budget.
    pub(crate) fn total(&self) -> &Arc<Budget> {
        &self.total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Budget>, usize)>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The share of the party `key`, for one connection (the share is forgotten when its
    /// party's last connection ends).
    pub(crate) fn of(self: &Arc<Self>, key: String) -> Share {
        let mut live = self.lock();
        let entry = live
            .entry(key.clone())
            .or_insert_with(|| (Budget::share(&self.total, self.per_party), 0));
        entry.1 += 1;
        let budget = entry.0.clone();
        drop(live);
        Share {
            shares: self.clone(),
            key,
            budget,
        }
    }

    /// Parties with a share now.
    #[cfg(test)]
    fn parties(&self) -> usize {
        self.lock().len()
    }
}

/// One connection's hold on its party's share.
#[derive(Debug)]
pub(crate) struct Share {
    shares: Arc<Shares>,
    key: String,
    budget: Arc<Budget>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut live = self.shares.lock();
        if let Some(entry) = live.get_mut(&self.key) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                live.remove(&self.key);
            }
        }
    }
}

/// What one message holds of the budget; released on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    held: usize,
}

impl Charge {
    /// Nothing charged yet, to `share`.
    pub(crate) fn new(share: &Share) -> Self {
        Self {
            budget: share.budget.clone(),
            held: 0,
        }
    }

    /// Makes the charge cover `bytes`; which budget is spent when it cannot (the charge is
    /// unchanged).
    pub(crate) fn cover(&mut self, bytes: usize) -> Result<(), Spent> {
        if bytes <= self.held {
            return Ok(());
        }
        let target = bytes.div_ceil(STEP).saturating_mul(STEP);
        self.budget.take(target - self.held)?;
        self.held = target;
        Ok(())
    }

    /// Gives everything back.
    pub(crate) fn release(&mut self) {
        self.budget.give(self.held);
        self.held = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_in_steps_refuses_past_the_max_and_releases() {
        let budget = Budget::new(3 * STEP);
        let shares = Shares::new(budget.clone(), 3 * STEP);
        let (one, two) = (shares.of("a".into()), shares.of("b".into()));
        let mut a = Charge::new(&one);
        assert_eq!(a.cover(1), Ok(()));
        assert_eq!(budget.used(), STEP);
        assert_eq!(a.cover(STEP + 1), Ok(()));
        assert_eq!(budget.used(), 2 * STEP);
        let mut b = Charge::new(&two);
        assert_eq!(b.cover(STEP), Ok(()));
        assert_eq!(b.cover(STEP + 1), Err(Spent::Total));
        assert_eq!(budget.used(), 3 * STEP);
        drop(a);
        assert_eq!(budget.used(), STEP);
        assert_eq!(b.cover(3 * STEP), Ok(()));
        b.release();
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_party_is_held_to_its_share_and_the_share_is_forgotten_with_its_last_connection() {
        let budget = Budget::new(4 * STEP);
        let shares = Shares::new(budget.clone(), 2 * STEP);
        let (first, second) = (shares.of("alice".into()), shares.of("alice".into()));
        let mut a = Charge::new(&first);
        let mut b = Charge::new(&second);
        assert_eq!(a.cover(STEP), Ok(()));
        assert_eq!(b.cover(STEP), Ok(()));
        // Alice's share is spent; the budget is not.
        assert_eq!(b.cover(2 * STEP), Err(Spent::Share));
        assert_eq!(budget.used(), 2 * STEP);
        let bob = shares.of("bob".into());
        let mut c = Charge::new(&bob);
        assert_eq!(c.cover(2 * STEP), Ok(()));
        assert_eq!(budget.used(), 4 * STEP);
        drop((a, b, c));
        assert_eq!(budget.used(), 0);
        assert_eq!(shares.parties(), 2);
        drop(first);
        assert_eq!(shares.parties(), 2);
        drop((second, bob));
        assert_eq!(shares.parties(), 0);
    }
}
