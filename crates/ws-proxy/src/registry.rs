//! The meet-up table: which peer waits on which id, and who is paired with whom.
//!
//! A slot is taken only when a valid HELLO arrives ([`Registry::join`]), so pairing follows
//! HELLO order, not connection order. Joining and leaving notify the peers involved through
//! the [`Peer`] trait while the table is locked, so every peer sees its partner's HELLO before
//! anything else from that partner, and sees "partner left" and "paired again" in the order
//! they happened. A HELLO takes room in the queue it is delivered to like any other message:
//! both HELLOs are reserved before either is delivered, and a pairing whose waiter has no room
//! is refused ([`Join::Busy`]), so a waiter that does not read cannot be made to hold more
//! than its queue. The table knows nothing about sockets; tests drive it with a recording peer.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_tungstenite::tungstenite::Message;

use crate::config::OnPartnerLeave;

/// Identifies one connection for the lifetime of the process.
pub type ConnId = u64;

/// What the table needs to tell a peer; implemented by the connection's handle.
pub trait Peer: Clone {
    /// Room taken in this peer's queue for one HELLO.
    type Room;
    /// Takes room for `hello` in this peer's queue now, or `None` when there is none.
    fn reserve(&self, hello: &Message) -> Option<Self::Room>;
    /// Queue the partner's HELLO for this peer, ahead of anything else from the partner.
    fn deliver_hello(&self, hello: &Message, room: Self::Room);
    /// This waiting peer now has `partner`.
    fn paired(&self, partner: Self);
    /// This peer's partner has gone.
    fn partner_left(&self);
}

/// The outcome of [`Registry::join`].
#[derive(Debug)]
pub enum Join<P> {
    /// First on the id: wait for a partner.
    Waiting,
    /// Paired with the peer that was waiting; HELLOs have been exchanged.
    Paired(P),
    /// The id already has two peers.
    Full,
    /// A peer is waiting, but one of the two queues has no room for the other's HELLO (the
    /// waiter is not reading); nothing changed.
    Busy,
}

#[derive(Debug)]
struct Member<P> {
    conn: ConnId,
    hello: Message,
    peer: P,
}

#[derive(Debug)]
enum Slot<P> {
    Waiting(Member<P>),
    Paired(Member<P>, Member<P>),
}

/// Counts for the status page and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Occupancy {
    /// Ids with one waiting peer.
    pub waiting: usize,
    /// Ids with a pair.
    pub paired: usize,
}

/// One id's state for the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// The meet-up id.
    pub id: String,
    /// Connection ids; one while waiting, two when paired (the waiter first).
    pub conns: Vec<ConnId>,
}

/// The meet-up table.
#[derive(Debug)]
pub struct Registry<P> {
    on_partner_leave: OnPartnerLeave,
    slots: Mutex<HashMap<String, Slot<P>>>,
}

impl<P: Peer> Registry<P> {
    /// An empty table.
    pub fn new(on_partner_leave: OnPartnerLeave) -> Self {
        Self {
            on_partner_leave,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<P>>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a new connection could still join `id` (it is not paired already).
    pub fn has_room(&self, id: &str) -> bool {
        !matches!(self.lock().get(id), Some(Slot::Paired(..)))
    }

    /// Takes a slot on `id` for `conn`, whose valid HELLO is `hello`.
    ///
    /// When a peer is waiting, the two are paired: the waiter gets `hello` queued and a
    /// [`Peer::paired`] call, and the joiner gets the waiter's HELLO queued.
    pub fn join(&self, id: &str, conn: ConnId, hello: Message, peer: P) -> Join<P> {
        let mut slots = self.lock();
        let joiner = Member { conn, hello, peer };
        match slots.remove(id) {
            None => {
                slots.insert(id.to_owned(), Slot::Waiting(joiner));
                Join::Waiting
            }
            Some(Slot::Waiting(waiter)) => {
                let rooms = joiner
                    .peer
                    .reserve(&waiter.hello)
                    .zip(waiter.peer.reserve(&joiner.hello));
                let Some((joiner_room, waiter_room)) = rooms else {
                    slots.insert(id.to_owned(), Slot::Waiting(waiter));
                    return Join::Busy;
                };
                joiner.peer.deliver_hello(&waiter.hello, joiner_room);
                waiter.peer.deliver_hello(&joiner.hello, waiter_room);
                waiter.peer.paired(joiner.peer.clone());
                let partner = waiter.peer.clone();
                slots.insert(id.to_owned(), Slot::Paired(waiter, joiner));
                Join::Paired(partner)
            }
            Some(full @ Slot::Paired(..)) => {
                slots.insert(id.to_owned(), full);
                Join::Full
            }
        }
    }

    /// Frees `conn`'s slot on `id`; its partner, if any, is told and either waits again with
    /// its HELLO kept (`wait`) or is expected to close (`close`). Unknown `conn`: no effect.
    pub fn leave(&self, id: &str, conn: ConnId) {
        let mut slots = self.lock();
        let Some(slot) = slots.remove(id) else {
            return;
        };
        match slot {
            Slot::Waiting(member) if member.conn == conn => {}
            Slot::Paired(a, b) if a.conn == conn || b.conn == conn => {
                let survivor = if a.conn == conn { b } else { a };
                survivor.peer.partner_left();
                if self.on_partner_leave == OnPartnerLeave::Wait {
                    slots.insert(id.to_owned(), Slot::Waiting(survivor));
                }
            }
            other => {
                slots.insert(id.to_owned(), other);
            }
        }
    }

    /// How many ids wait and how many are paired.
    pub fn occupancy(&self) -> Occupancy {
        let slots = self.lock();
        let paired = slots
            .values()
            .filter(|slot| matches!(slot, Slot::Paired(..)))
            .count();
        Occupancy {
            waiting: slots.len() - paired,
            paired,
        }
    }

    /// Every id and its connections, sorted by id.
    pub fn snapshot(&self) -> Vec<SlotView> {
        self.page(0, usize::MAX).0
    }

    /// At most `limit` ids from the `offset`th in id order, with their connections, and the
    /// number of ids in the table. Only the page's ids are copied.
    pub fn page(&self, offset: usize, limit: usize) -> (Vec<SlotView>, usize) {
        let slots = self.lock();
        let mut ids: Vec<&String> = slots.keys().collect();
        ids.sort_unstable();
        let total = ids.len();
        let views = ids
            .into_iter()
            .skip(offset)
            .take(limit)
            .filter_map(|id| {
                let conns = match slots.get(id)? {
                    Slot::Waiting(m) => vec![m.conn],
                    Slot::Paired(a, b) => vec![a.conn, b.conn],
                };
                Some(SlotView {
                    id: id.clone(),
                    conns,
                })
            })
            .collect();
        (views, total)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Records what the table told it, as text; takes HELLOs while it has `room` (bytes).
    #[derive(Clone, Debug)]
    struct Recorder {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        room: Arc<Mutex<usize>>,
    }

    impl Peer for Recorder {
        type Room = ();
        fn reserve(&self, hello: &Message) -> Option<()> {
            let mut room = self.room.lock().unwrap();
            *room = room.checked_sub(hello.len())?;
            Some(())
        }
        fn deliver_hello(&self, hello: &Message, (): ()) {
            let text = hello.to_text().unwrap_or("?").to_owned();
            self.push(format!("{} <- hello {text}", self.name));
        }
        fn paired(&self, partner: Self) {
            self.push(format!("{} paired with {}", self.name, partner.name));
        }
        fn partner_left(&self) {
            self.push(format!("{} partner left", self.name));
        }
    }

    impl Recorder {
        fn push(&self, line: String) {
            self.log.lock().unwrap().push(line);
        }
    }

    fn cast(names: &[&'static str]) -> (Vec<Recorder>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let peers = names
            .iter()
            .map(|name| Recorder {
                name,
                log: log.clone(),
                room: Arc::new(Mutex::new(usize::MAX)),
            })
            .collect();
        (peers, log)
    }

    fn take(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn pairs_in_hello_order_and_refuses_a_third() {
        let registry = Registry::new(OnPartnerLeave::Close);
        let (p, log) = cast(&["a", "b", "c"]);
        assert!(matches!(
            registry.join("x", 1, Message::text("A"), p[0].clone()),
            Join::Waiting
        ));
        assert!(registry.has_room("x"));
        let Join::Paired(partner) = registry.join("x", 2, Message::text("B"), p[1].clone()) else {
            panic!("expected a pair");
        };
        assert_eq!(partner.name, "a");
        assert_eq!(
            take(&log),
            ["b <- hello A", "a <- hello B", "a paired with b"]
        );
        assert!(!registry.has_room("x"));
        assert!(matches!(
            registry.join("x", 3, Message::text("C"), p[2].clone()),
            Join::Full
        ));
        assert_eq!(
            registry.occupancy(),
            Occupancy {
                waiting: 0,
                paired: 1
            }
        );
        assert_eq!(registry.snapshot()[0].conns, [1, 2]);
    }

    #[test]
    fn ids_are_isolated() {
        let registry = Registry::new(OnPartnerLeave::Close);
        let (p, _) = cast(&["a", "b"]);
        registry.join("x", 1, Message::text("A"), p[0].clone());
        assert!(matches!(
            registry.join("x?q=1", 2, Message::text("B"), p[1].clone()),
            Join::Waiting
        ));
        assert_eq!(registry.occupancy().waiting, 2);
    }

    #[test]
    fn close_mode_frees_the_id_and_tells_the_survivor() {
        let registry = Registry::new(OnPartnerLeave::Close);
        let (p, log) = cast(&["a", "b"]);
        registry.join("x", 1, Message::text("A"), p[0].clone());
        registry.join("x", 2, Message::text("B"), p[1].clone());
        take(&log);
        registry.leave("x", 2);
        assert_eq!(take(&log), ["a partner left"]);
        assert_eq!(registry.occupancy(), Occupancy::default());
        // The survivor's own leave afterwards is harmless.
        registry.leave("x", 1);
        assert!(take(&log).is_empty());
    }

    #[test]
    fn wait_mode_keeps_the_survivor_with_its_hello() {
        let registry = Registry::new(OnPartnerLeave::Wait);
        let (p, log) = cast(&["a", "b", "c"]);
        registry.join("x", 1, Message::text("A"), p[0].clone());
        registry.join("x", 2, Message::text("B"), p[1].clone());
        registry.leave("x", 1);
        take(&log);
        assert_eq!(registry.occupancy().waiting, 1);
        registry.join("x", 3, Message::text("C"), p[2].clone());
        assert_eq!(
            take(&log),
            ["c <- hello B", "b <- hello C", "b paired with c"]
        );
    }

    #[test]
    fn a_waiter_without_room_for_the_hello_is_not_paired_and_keeps_waiting() {
        let registry = Registry::new(OnPartnerLeave::Wait);
        let (p, log) = cast(&["a", "b", "c"]);
        *p[0].room.lock().unwrap() = 3;
        registry.join("x", 1, Message::text("A"), p[0].clone());
        assert!(matches!(
            registry.join("x", 2, Message::text("BBBB"), p[1].clone()),
            Join::Busy
        ));
        assert!(take(&log).is_empty(), "nothing delivered to either side");
        assert_eq!(registry.snapshot()[0].conns, [1]);
        // A HELLO that fits still pairs.
        assert!(matches!(
            registry.join("x", 3, Message::text("CC"), p[2].clone()),
            Join::Paired(_)
        ));
        assert_eq!(*p[0].room.lock().unwrap(), 1);
    }

    #[test]
    fn a_waiter_leaving_frees_the_id_and_strangers_change_nothing() {
        let registry = Registry::new(OnPartnerLeave::Close);
        let (p, log) = cast(&["a"]);
        registry.join("x", 1, Message::text("A"), p[0].clone());
        registry.leave("x", 9);
        registry.leave("y", 1);
        assert_eq!(registry.occupancy().waiting, 1);
        registry.leave("x", 1);
        assert_eq!(registry.occupancy(), Occupancy::default());
        assert!(take(&log).is_empty());
    }
}
