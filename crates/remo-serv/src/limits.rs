//! Limits on unverified work: the byte budget for request bodies read before anything in them
//! was checked, and the login rate per source address.
//!
//! A body is *unverified* until its first token decrypts and checks under the session key
//! (or, for `/auth`, until the login signature verifies). Until then its bytes are charged to
//! the session the cookie named and to the whole server; a body that would go over either
//! budget is refused at once, so a valid cookie (or none) cannot make the server buffer more
//! than the budgets whatever the number of connections. No clock, no sockets: callers pass
//! `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::admission::AddressKey;

/// Which budget a body went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    /// The session's own share of unverified bytes.
    #[error("too much unverified data in flight for this session")]
    Session,
    /// The server-wide budget of unverified bytes.
    #[error("too much unverified data in flight on the server")]
    Server,
}

#[derive(Debug, Default)]
struct Ledger {
    used: usize,
    sessions: HashMap<String, usize>,
}

#[derive(Debug)]
struct Shared {
    total: usize,
    per_session: usize,
    ledger: Mutex<Ledger>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The byte budget for unverified request bodies: `total` bytes server-wide, `per_session` of
/// them for the bodies that name one session.
#[derive(Debug, Clone)]
pub struct Budget {
    shared: Arc<Shared>,
}

impl Budget {
    /// A budget with nothing charged.
    pub fn new(total: usize, per_session: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                total,
                per_session,
                ledger: Mutex::default(),
            }),
        }
    }

    /// An empty charge for one body; `session` is the session its cookie named, if any.
    pub fn charge(&self, session: Option<&str>) -> Charge {
        Charge {
            shared: Arc::clone(&self.shared),
            session: session.map(str::to_owned),
            held: 0,
        }
    }

    /// Unverified bytes held right now, server-wide.
    pub fn used(&self) -> usize {
        self.shared.lock().used
    }
}

/// The unverified bytes of one body; released when dropped (once the body verified, was
/// refused, or its connection went).
#[derive(Debug)]
pub struct Charge {
    shared: Arc<Shared>,
    session: Option<String>,
    held: usize,
}

impl Charge {
    /// Charges `bytes` more.
    ///
    /// # Errors
    /// [`OverBudget`] when that would exceed the session's or the server's budget; nothing is
    /// charged then.
    pub fn add(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let shared = Arc::clone(&self.shared);
        let mut ledger = shared.lock();
        if let Some(id) = &self.session {
            let mine = ledger.sessions.get(id).copied().unwrap_or(0);
            if mine.saturating_add(bytes) > shared.per_session {
                return Err(OverBudget::Session);
            }
        }
        if ledger.used.saturating_add(bytes) > shared.total {
            return Err(OverBudget::Server);
        }
        ledger.used += bytes;
        if let Some(id) = &self.session {
            *ledger.sessions.entry(id.clone()).or_insert(0) += bytes;
        }
        self.held += bytes;
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.held == 0 {
            return;
        }
        let mut ledger = self.shared.lock();
        ledger.used = ledger.used.saturating_sub(self.held);
        if let Some(id) = &self.session {
            if let Some(mine) = ledger.sessions.get_mut(id) {
                *mine = mine.saturating_sub(self.held);
                if *mine == 0 {
                    ledger.sessions.remove(id);
                }
            }
        }
    }
}

/// Addresses tracked at most; beyond, the fullest buckets (the least limited) are forgotten.
const MAX_TRACKED: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Login attempts per source address (IPv4 address or IPv6 /64): a token bucket holding
/// `burst` attempts, refilled at `per_minute` a minute.
#[derive(Debug)]
pub struct LoginRate {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<AddressKey, Bucket>>,
}

impl LoginRate {
    /// A limiter; `per_minute` and `burst` are at least 1.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute.max(1)) / 60.0,
            buckets: Mutex::default(),
        }
    }

    /// Takes one attempt for `ip`; `false` when its bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let key = AddressKey::of(ip);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&key) {
            self.forget_full(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops the buckets that refilled (as good as absent), and if that is not enough, the
    /// fullest half.
    fn forget_full(&self, buckets: &mut HashMap<AddressKey, Bucket>, now: Instant) {
        let refill = Duration::from_secs_f64(self.burst / self.per_second);
        buckets.retain(|_, b| now.saturating_duration_since(b.at) < refill);
        if buckets.len() >= MAX_TRACKED {
            let mut levels: Vec<(AddressKey, f64)> = buckets
                .iter()
                .map(|(k, b)| {
                    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                    (*k, b.tokens + elapsed * self.per_second)
                })
                .collect();
            levels.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            for (key, _) in levels.iter().take(MAX_TRACKED / 2) {
                buckets.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_per_session_and_in_total_and_released() {
        let budget = Budget::new(100, 60);
        let mut a1 = budget.charge(Some("a"));
        let mut a2 = budget.charge(Some("a"));
        let mut b = budget.charge(Some("b"));
        let mut anonymous = budget.charge(None);
        a1.add(50).unwrap();
        assert_eq!(a2.add(11), Err(OverBudget::Session));
        a2.add(10).unwrap();
        b.add(30).unwrap();
        assert_eq!(anonymous.add(11), Err(OverBudget::Server));
        anonymous.add(10).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a1);
        assert_eq!(budget.used(), 50);
        a2.add(50).unwrap();
        drop((a2, b, anonymous));
        assert_eq!(budget.used(), 0);
        assert!(budget.shared.lock().sessions.is_empty());
    }

    #[test]
    fn logins_per_address_follow_the_bucket() {
        let rate = LoginRate::new(60, 3);
        let t0 = Instant::now();
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert!(rate.allow(one, t0));
        }
        assert!(!rate.allow(one, t0));
        assert!(rate.allow(two, t0), "another address has its own bucket");
        // One a second refills.
        assert!(rate.allow(one, t0 + Duration::from_millis(1_100)));
        assert!(!rate.allow(one, t0 + Duration::from_millis(1_200)));
        for _ in 0..3 {
            assert!(rate.allow(v6a, t0));
        }
        assert!(!rate.allow(v6b, t0), "one IPv6 /64 is one address");
    }
}
