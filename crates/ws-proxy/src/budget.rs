//! Memory accounting: the process-wide byte budget ([`Budget`]), each identity's share of it,
//! and what draws on them.
//!
//! Every byte the proxy holds for a peer beyond its fixed per-connection cost is charged here:
//! the buffer of a request head being read (`crate::upgrade::read_head`), a stored HELLO, a
//! HELLO queued for a partner, a waiting peer's queue, the relay queue towards a peer, and the
//! bytes of a message still being read ([`ReadMeter`], which counts what the socket delivers
//! to tungstenite). A charge that does not fit is refused, never waited for: the connection
//! that asked is closed with 1013 "try again later" (a request head: HTTP 503), so the total
//! stays under
//! `max_buffered_bytes` whatever the peers do. The meter also enforces the small cap on what a
//! connection may send before its HELLO, below tungstenite, whose message limit cannot change
//! once the websocket exists.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::io::write_through;

/// A byte budget: the process-wide one, or one identity's share of it (a budget with a
/// parent takes every byte from both).
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    parent: Option<Arc<Budget>>,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            parent: None,
        })
    }

    /// A share of at most `limit` bytes of `parent`.
    pub(crate) fn share(parent: &Arc<Self>, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            parent: Some(parent.clone()),
        })
    }

    /// Takes `bytes` from the budget (and its parent), or nothing if they do not fit.
    fn take(&self, bytes: usize) -> bool {
        let mine = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if !mine {
            return false;
        }
        if let Some(parent) = &self.parent {
            if !parent.take(bytes) {
                self.used.fetch_sub(bytes, Ordering::AcqRel);
                return false;
            }
        }
        true
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(parent) = &self.parent {
            parent.give_back(bytes);
        }
    }

    /// A charge of `bytes`, held until dropped; `None` when the budget cannot take them.
    pub(crate) fn charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        self.take(bytes).then(|| Charge {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes charged now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// Bytes taken from the [`Budget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charge {
    /// Takes `more` bytes into this charge, or nothing (and `false`) if they do not fit.
    pub(crate) fn grow(&mut self, more: usize) -> bool {
        let taken = self.budget.take(more);
        if taken {
            self.bytes += more;
        }
        taken
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Why the [`ReadMeter`] stopped a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overrun {
    /// More than the cap since the last message (before the HELLO: the HELLO cap).
    Cap,
    /// The budget could not take the bytes.
    Budget,
}

/// Counts the bytes a connection's socket delivers to tungstenite since the last complete
/// message, charges them to the budget, and fails the read past a cap.
///
/// Unarmed (during the upgrade) it counts nothing. The relay arms it with the HELLO cap, then
/// raises the cap once the HELLO is in; each complete message gives its bytes back
/// ([`ReadMeter::data_done`], [`ReadMeter::control_done`]).
#[derive(Debug)]
pub(crate) struct ReadMeter {
    budget: Arc<Budget>,
    state: Mutex<MeterState>,
    overrun: AtomicU8,
}

#[derive(Debug, Default)]
struct MeterState {
    /// `None`: unarmed.
    cap: Option<usize>,
    /// Bytes read (and charged) since the last complete message.
    read: usize,
}

const NO_OVERRUN: u8 = 0;
const OVERRUN_CAP: u8 = 1;
const OVERRUN_BUDGET: u8 = 2;

impl ReadMeter {
    pub(crate) fn new(budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            state: Mutex::new(MeterState::default()),
            overrun: AtomicU8::new(NO_OVERRUN),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MeterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or changes) the cap on bytes read since the last complete message.
    pub(crate) fn set_cap(&self, cap: usize) {
        self.lock().cap = Some(cap);
    }

    /// A data message is complete: what was read for it is no longer held by tungstenite
    /// (at most one read buffer of the next message may be, which the fixed cost covers).
    pub(crate) fn data_done(&self) {
        let mut state = self.lock();
        self.budget.give_back(std::mem::take(&mut state.read));
    }

    /// A control frame with `payload` bytes is complete: its frame (header, mask, payload)
    /// is given back, and what belongs to a data message in progress stays charged.
    pub(crate) fn control_done(&self, payload: usize) {
        // A client's control frame: 2 header bytes, 4 mask bytes, at most 125 payload bytes.
        let mut state = self.lock();
        let frame = (payload + 6).min(state.read);
        state.read -= frame;
        self.budget.give_back(frame);
    }

    /// Why the last read failed, if the meter failed it.
    pub(crate) fn overrun(&self) -> Option<Overrun> {
        match self.overrun.load(Ordering::Acquire) {
            OVERRUN_CAP => Some(Overrun::Cap),
            OVERRUN_BUDGET => Some(Overrun::Budget),
            _ => None,
        }
    }

    /// How many bytes the next read may deliver (at most `room`, the reader's free space):
    /// `Ok(None)` unmetered, else the bytes taken from the budget for it, given back by
    /// [`ReadMeter::settle`] for what the read did not deliver.
    fn allow(&self, room: usize) -> io::Result<Option<usize>> {
        let mut state = self.lock();
        let Some(cap) = state.cap else {
            return Ok(None);
        };
        let left = cap.saturating_sub(state.read);
        let overrun = if left == 0 && room > 0 {
            OVERRUN_CAP
        } else {
            let want = left.min(room).min(READ_CHUNK);
            if self.budget.take(want) {
                state.read += want;
                return Ok(Some(want));
            }
            OVERRUN_BUDGET
        };
        self.overrun.store(overrun, Ordering::Release);
        Err(io::Error::other(if overrun == OVERRUN_CAP {
            "read cap reached"
        } else {
            "max_buffered_bytes reached"
        }))
    }

    /// A read allowed `allowed` bytes and delivered `got`.
    fn settle(&self, allowed: usize, got: usize) {
        let unused = allowed.saturating_sub(got);
        let mut state = self.lock();
        state.read = state.read.saturating_sub(unused);
        self.budget.give_back(unused);
    }
}

/// Most bytes one metered read may deliver: a TLS record.
const READ_CHUNK: usize = 16 * 1024;

impl Drop for ReadMeter {
    fn drop(&mut self) {
        let read = self.lock().read;
        self.budget.give_back(read);
    }
}

/// A stream whose reads are counted by a [`ReadMeter`]; writes pass through.
#[derive(Debug)]
pub(crate) struct Metered<S> {
    inner: S,
    meter: Arc<ReadMeter>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, meter: Arc<ReadMeter>) -> Self {
        Self { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let allowed = match this.meter.allow(buf.remaining()) {
            Ok(None) => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Ok(Some(allowed)) => allowed,
            Err(err) => return Poll::Ready(Err(err)),
        };
        // Never more than allowed reaches the reader's buffer.
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(allowed));
        let polled = Pin::new(&mut this.inner).poll_read(cx, &mut part);
        let got = part.filled().len();
        this.meter.settle(allowed, got);
        buf.advance(got);
        polled
    }
}

write_through!(Metered);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn charges_fit_or_are_refused_and_come_back_when_dropped() {
        let budget = Budget::new(100);
        let a = budget.charge(60).unwrap();
        assert!(budget.charge(41).is_none());
        let b = budget.charge(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_share_takes_from_its_parent_and_is_capped_by_both() {
        let total = Budget::new(100);
        let mine = Budget::share(&total, 60);
        let theirs = Budget::share(&total, 60);
        let a = mine.charge(50).unwrap();
        assert!(mine.charge(11).is_none(), "over the share");
        let b = theirs.charge(50).unwrap();
        assert!(theirs.charge(1).is_none(), "over the total");
        assert_eq!((mine.used(), theirs.used(), total.used()), (50, 50, 100));
        drop(a);
        assert_eq!((mine.used(), total.used()), (0, 50));
        let c = theirs.charge(10).unwrap();
        drop((b, c));
        assert_eq!(total.used(), 0);
    }

    #[tokio::test]
    async fn the_meter_counts_only_when_armed_and_fails_past_its_cap() {
        let budget = Budget::new(1 << 20);
        let meter = ReadMeter::new(budget.clone());
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut stream = Metered::new(rx, meter.clone());
        let mut buf = [0u8; 100];
        tx.write_all(&[1; 50]).await.unwrap();
        stream.read_exact(&mut buf[..50]).await.unwrap();
        assert_eq!(budget.used(), 0);
        meter.set_cap(60);
        tx.write_all(&[1; 50]).await.unwrap();
        stream.read_exact(&mut buf[..50]).await.unwrap();
        assert_eq!(budget.used(), 50);
        meter.control_done(4);
        assert_eq!(budget.used(), 40);
        // 20 more fit the cap of 60 (10 were given back); the rest fails the next read.
        tx.write_all(&[1; 30]).await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 20);
        assert_eq!(budget.used(), 60);
        assert!(stream.read(&mut buf).await.is_err());
        assert_eq!(meter.overrun(), Some(Overrun::Cap));
        meter.data_done();
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn the_meter_fails_a_read_the_budget_cannot_take_and_gives_back_on_drop() {
        let budget = Budget::new(100);
        let held = budget.charge(80).unwrap();
        let meter = ReadMeter::new(budget.clone());
        meter.set_cap(1000);
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut stream = Metered::new(rx, meter.clone());
        let mut buf = [0u8; 100];
        tx.write_all(&[1; 10]).await.unwrap();
        stream.read_exact(&mut buf[..10]).await.unwrap();
        tx.write_all(&[1; 20]).await.unwrap();
        // A read asks the budget for what the buffer could take (100), which it cannot give.
        assert!(stream.read(&mut buf).await.is_err());
        assert_eq!(meter.overrun(), Some(Overrun::Budget));
        drop(held);
        drop(stream);
        drop(meter);
        assert_eq!(budget.used(), 0);
    }
}
