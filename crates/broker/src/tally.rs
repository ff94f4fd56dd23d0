//! Outcomes a caller can repeat at will, counted per caller (and job) per interval, so that
//! nobody can fill the audit table by repeating a request: failed verifications (`invalid`,
//! `rate_limited`, caused by strangers at a gate), another user's job (`refused_not_owner`),
//! no such job (`not_found`), an expired job (`expired`), a save with no free port
//! (`no_port`), and the caller's own loads (`ok`) and verifications (`valid`), which change
//! nothing. The
//! first refusal of a key in an interval is recorded at once, the others of that interval as
//! one row with their count when it ends. Keys are bounded: a `not_found` is keyed without
//! its (caller-chosen) id, so random ids make one key per caller and action, and every other
//! key names a job that exists. Sans-IO: times are passed in, and what to write is returned.

use std::collections::HashMap;

/// Most keys tallied at once; past it, everything is flushed (each key names a caller and a
/// job that exists, or none, so this is far above any real load).
const MAX_KEYS: usize = 100_000;

/// What is counted together: one job (or none), one action, one result, one caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The job; `None` for ids that name no job (the caller chooses those at will).
    pub job_id: Option<String>,
    /// `verify`, `load`, `heartbeat`, `delete` or `save`.
    pub action: &'static str,
    /// `invalid`, `rate_limited`, `refused_not_owner`, `not_found`, `expired`, `no_port`,
    /// `ok` (a load) or `valid` (a verification).
    pub result: &'static str,
    /// The caller's user name.
    pub user: String,
    /// The caller's uid, on the socket.
    pub uid: Option<u32>,
    /// `unix` or `https`.
    pub via: &'static str,
}

/// One interval of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    /// When the first failure of the interval happened (Unix milliseconds).
    start_ms: i64,
    /// Failures after the first, not yet written.
    pending: i64,
    /// When the last of them happened.
    last_ms: i64,
}

/// A row to write: `count` failures of `key` between `first_ms` and `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// What failed.
    pub key: Key,
    /// The job the row names: the key's, or for the first refusal of an interval, the id
    /// the caller sent.
    pub job_id: Option<String>,
    /// How many times.
    pub count: i64,
    /// The first of them (Unix milliseconds).
    pub first_ms: i64,
    /// The last of them (the row's time).
    pub at_ms: i64,
}

/// What [`Tally::note`] asks the caller to write.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Noted {
    /// Failures of closed intervals: the key's previous one (and, in the unlikely case the
    /// tally was full, every other).
    pub closed: Vec<Row>,
    /// The first failure of a new interval, to record at once.
    pub first: Option<Row>,
}

/// The open intervals.
#[derive(Debug)]
pub struct Tally {
    interval_ms: i64,
    windows: HashMap<Key, Window>,
}

impl Tally {
    /// Failures of one key within `interval` share a row.
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval_ms: i64::try_from(interval.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
            windows: HashMap::new(),
        }
    }

    /// One failure of `key` at `now_ms`; `job_id` is the id the caller sent (written in the
    /// row of the first failure of an interval).
    pub fn note(&mut self, key: Key, job_id: Option<&str>, now_ms: i64) -> Noted {
        let mut noted = Noted::default();
        if let Some(window) = self.windows.get_mut(&key) {
            if now_ms.saturating_sub(window.start_ms) < self.interval_ms {
                window.pending = window.pending.saturating_add(1);
                window.last_ms = now_ms;
                return noted;
            }
            noted.closed.extend(Self::row(&key, *window));
        }
        if self.windows.len() >= MAX_KEYS && !self.windows.contains_key(&key) {
            // Cannot happen with real jobs; if it does, the rows are written now, not lost.
            noted.closed.extend(self.due(None));
        }
        self.windows.insert(
            key.clone(),
            Window {
                start_ms: now_ms,
                pending: 0,
                last_ms: now_ms,
            },
        );
        noted.first = Some(Row {
            key,
            job_id: job_id.map(str::to_owned),
            count: 1,
            first_ms: now_ms,
            at_ms: now_ms,
        });
        noted
    }

    /// The rows of intervals ended by `now_ms` (all of them when `now_ms` is `None`: at
    /// shutdown); those keys are forgotten.
    pub fn due(&mut self, now_ms: Option<i64>) -> Vec<Row> {
        let interval = self.interval_ms;
        let mut rows = Vec::new();
        self.windows.retain(|key, window| {
            let ended = now_ms.is_none_or(|now| now.saturating_sub(window.start_ms) >= interval);
            if ended {
                rows.extend(Self::row(key, *window));
            }
            !ended
        });
        rows
    }

    /// Keys with an open interval.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no interval is open.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    fn row(key: &Key, window: Window) -> Option<Row> {
        (window.pending > 0).then(|| Row {
            key: key.clone(),
            job_id: key.job_id.clone(),
            count: window.pending,
            first_ms: window.start_ms,
            at_ms: window.last_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(job: &str, result: &'static str) -> Key {
        Key {
            job_id: Some(job.into()),
            action: "verify",
            result,
            user: "alice".into(),
            uid: Some(1000),
            via: "unix",
        }
    }

    #[test]
    fn failures_of_an_interval_share_a_row() {
        let mut tally = Tally::new(Duration::from_secs(60));
        let noted = tally.note(key("a", "invalid"), None, 0);
        assert_eq!(
            noted.first.unwrap().count,
            1,
            "the first is written at once"
        );
        assert!(noted.closed.is_empty());
        for t in 1..1000 {
            assert_eq!(tally.note(key("a", "invalid"), None, t), Noted::default());
        }
        // Another job and another result count apart.
        assert!(tally.note(key("b", "invalid"), None, 5).first.is_some());
        assert!(
            tally
                .note(key("a", "rate_limited"), None, 5)
                .first
                .is_some()
        );
        assert!(tally.due(Some(59_999)).is_empty(), "nothing has ended yet");
        let rows = tally.due(Some(60_000));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].count, rows[0].first_ms, rows[0].at_ms),
            (999, 0, 999)
        );
        assert_eq!(
            tally.len(),
            2,
            "b and rate_limited (opened at 5 ms) are still open"
        );
        assert!(
            tally.due(Some(60_005)).is_empty(),
            "they had nothing pending"
        );
        assert!(tally.is_empty());
    }

    #[test]
    fn a_failure_after_the_interval_closes_it_and_opens_the_next() {
        let mut tally = Tally::new(Duration::from_secs(1));
        tally.note(key("a", "invalid"), None, 0);
        tally.note(key("a", "invalid"), None, 10);
        tally.note(key("a", "invalid"), None, 20);
        let noted = tally.note(key("a", "invalid"), None, 1000);
        assert_eq!(noted.closed.len(), 1);
        assert_eq!(noted.closed[0].count, 2);
        assert_eq!(noted.first.unwrap().count, 1);
        assert!(
            tally.due(None).is_empty(),
            "the new interval has nothing pending"
        );
        assert!(tally.is_empty());
    }

    #[test]
    fn random_ids_share_one_key() {
        let mut tally = Tally::new(Duration::from_secs(60));
        let not_found = Key {
            job_id: None,
            action: "load",
            result: "not_found",
            user: "mallory".into(),
            uid: Some(2002),
            via: "unix",
        };
        let first = tally
            .note(not_found.clone(), Some("job_0"), 0)
            .first
            .unwrap();
        assert_eq!(
            first.job_id.as_deref(),
            Some("job_0"),
            "the first names its id"
        );
        for t in 1..10_000 {
            let id = format!("job_{t}");
            assert_eq!(
                tally.note(not_found.clone(), Some(&id), t),
                Noted::default()
            );
        }
        assert_eq!(tally.len(), 1, "random ids hold no memory");
        let rows = tally.due(None);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].count, rows[0].job_id.as_deref()), (9_999, None));
    }
}
