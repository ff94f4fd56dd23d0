//! A connection's outgoing queue and the [`Handle`] by which other tasks fill it.
//!
//! The connection's writer (in `crate::relay`) drains the queue; its partner's reader, the
//! meet-up table (HELLOs) and its own reader (pings, close frames) fill it. The queue is
//! bounded in bytes by a semaphore: a forward waits for room, so a slow reader slows its
//! partner down. Every queued byte is also charged to the budget of the identity it is queued
//! for; a charge that does not fit is refused, never waited for.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::budget::{Budget, Charge};
use crate::config::QUEUE_OVERHEAD;
use crate::registry::{ConnId, Peer};

/// What a writer sends.
pub(crate) enum Out {
    /// A data message (or a HELLO), with the queue room and budget it holds until written.
    Data(Message, Option<Held>),
    /// A keepalive ping.
    Ping(Bytes),
    /// A close frame; later data is dropped.
    Close(CloseFrame),
    /// Flush and stop.
    End,
}

/// Room in a peer's queue and in the budget, held by a queued message until it is written.
pub(crate) struct Held {
    _room: OwnedSemaphorePermit,
    _charge: Charge,
}

/// Why a forward did not queue the message.
pub(crate) enum Refused {
    /// The partner's writer has gone.
    Gone,
    /// The message can never fit the partner's queue (a configuration the validation refuses).
    TooBig,
    /// The budget cannot take it now.
    Budget,
}

/// What the table tells a reader.
pub(crate) enum Ctrl {
    Paired(Handle),
    PartnerLeft,
}

/// Another task's way to reach this connection.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) conn: ConnId,
    pub(crate) out: mpsc::UnboundedSender<Out>,
    pub(crate) room: Arc<Semaphore>,
    /// The queue's size: a message that costs more can never be queued.
    pub(crate) capacity: usize,
    pub(crate) budget: Arc<Budget>,
    pub(crate) ctrl: mpsc::UnboundedSender<Ctrl>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("conn", &self.conn).finish()
    }
}

impl Peer for Handle {
    type Room = Held;

    fn reserve(&self, hello: &Message) -> Option<Held> {
        let cost = hello.len().saturating_add(QUEUE_OVERHEAD);
        let room = self
            .room
            .clone()
            .try_acquire_many_owned(u32::try_from(cost).ok()?)
            .ok()?;
        let charge = self.budget.charge(cost)?;
        Some(Held {
            _room: room,
            _charge: charge,
        })
    }

    fn deliver_hello(&self, hello: &Message, room: Held) {
        let _ = self.out.send(Out::Data(hello.clone(), Some(room)));
    }

    fn paired(&self, partner: Self) {
        let _ = self.ctrl.send(Ctrl::Paired(partner));
    }

    fn partner_left(&self) {
        let _ = self.ctrl.send(Ctrl::PartnerLeft);
    }
}

impl Handle {
    /// Queues `message` for this peer once there is room in its queue. A message that can
    /// never fit is an error at once, not a wait; so is one the budget cannot take now.
    pub(crate) async fn forward(&self, message: Message) -> Result<(), Refused> {
        let cost = message.len().saturating_add(QUEUE_OVERHEAD);
        if cost > self.capacity {
            return Err(Refused::TooBig);
        }
        let permits = u32::try_from(cost).map_err(|_| Refused::TooBig)?;
        let room = match self.room.clone().try_acquire_many_owned(permits) {
            Ok(room) => room,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Refused::Gone),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                match self.room.clone().acquire_many_owned(permits).await {
                    Ok(room) => room,
                    Err(_) => return Err(Refused::Gone),
                }
            }
        };
        let charge = self.budget.charge(cost).ok_or(Refused::Budget)?;
        let held = Held {
            _room: room,
            _charge: charge,
        };
        self.out
            .send(Out::Data(message, Some(held)))
            .map_err(|_| Refused::Gone)
    }
}
