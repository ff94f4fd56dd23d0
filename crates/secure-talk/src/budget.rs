//! The global budget of bytes in flight: what every connection together holds of messages it
//! is still receiving (text being assembled, binary messages handled in memory, headers and
//! spool buffers of uploads).
//!
//! A connection charges the budget as a message grows, in steps of [`STEP`], and gives the
//! charge back when the message is handled or the connection ends ([`Charge`] releases on
//! drop). When the budget is spent, the growing message's connection is closed with 1013 (try
//! again later) instead of the server growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Granularity of charges (so a message growing 8 KiB at a time does not touch the counter
/// on every read).
pub(crate) const STEP: usize = 64 * 1024;

/// Bytes in flight, all connections together.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes charged now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What one message holds of the budget; released on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    held: usize,
}

impl Charge {
    /// Nothing charged yet.
    pub(crate) fn new(budget: &Arc<Budget>) -> Self {
        Self {
            budget: budget.clone(),
            held: 0,
        }
    }

    /// Makes the charge cover `bytes`; false when the budget cannot (the charge is unchanged).
    pub(crate) fn cover(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            return true;
        }
        let target = bytes.div_ceil(STEP).saturating_mul(STEP);
        if self.budget.take(target - self.held) {
            self.held = target;
            true
        } else {
            false
        }
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
        let mut a = Charge::new(&budget);
        assert!(a.cover(1));
        assert_eq!(budget.used(), STEP);
        assert!(a.cover(STEP + 1));
        assert_eq!(budget.used(), 2 * STEP);
        let mut b = Charge::new(&budget);
        assert!(b.cover(STEP));
        assert!(!b.cover(STEP + 1));
        assert_eq!(budget.used(), 3 * STEP);
        drop(a);
        assert_eq!(budget.used(), STEP);
        assert!(b.cover(3 * STEP));
        b.release();
        assert_eq!(budget.used(), 0);
    }
}
