//! One upgraded websocket connection: HELLO, waiting, relaying, keepalive and closing.
//!
//! Each connection runs two tasks. The *reader* (this module's [`run`]) owns the receiving half:
//! it validates the HELLO, joins the meet-up table, queues messages while the peer waits, and
//! forwards each message to the partner's writer. The *writer* owns the sending half and drains
//! a queue that the partner, the table (HELLOs) and the reader itself (pings, close frames)
//! fill. The queue is bounded in bytes by a semaphore: a forward waits for room, so a slow
//! reader slows its partner down and memory stays bounded. HELLOs take room like any other
//! message. Every queued byte is also charged to the budget (`crate::budget`) of the identity
//! it is queued for, and through it to the process-wide one, as are the bytes of a message
//! still being read (to the reader's identity); a charge that does not fit closes the
//! connection that asked with 1013 instead of growing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::budget::{Budget, Charge, Metered, Overrun, ReadMeter};
use crate::config::{OnPartnerLeave, QUEUE_OVERHEAD};
use crate::io::Conn;
use crate::metrics::Ending;
use crate::queue::{Ctrl, Handle, Held, Out, Refused};
use crate::registry::Join;
use crate::state::{ConnInfo, PeerState, Shared};
use crate::upgrade::Rewind;

/// The websocket stream of an accepted connection.
pub(crate) type Ws = WebSocketStream<Metered<Rewind<Conn>>>;

/// The reason sent to a survivor whose partner left (the original's text).
pub const PARTNER_LEFT_REASON: &str = "the peer websocket disconnected";

/// What a connection may read before its HELLO beyond `max_hello_bytes`: frame headers and a
/// few control frames (pongs to our first ping).
const PRE_HELLO_SLACK: usize = 1024;
/// Most queued items the writer feeds before it flushes.
const WRITE_BATCH: usize = 64;

enum State {
    AwaitHello,
    Waiting {
        queue: VecDeque<(Message, Charge)>,
        bytes: usize,
    },
    Paired(Handle),
}

/// Why the reader loop stopped, and what to tell the peer.
struct Stop {
    ending: Ending,
    /// Close frame to send, if the connection can still take one.
    close: Option<CloseFrame>,
    /// Whether the receiving half can still be read for the peer's close frame.
    readable: bool,
}

impl Stop {
    fn close(ending: Ending, code: CloseCode, reason: impl Into<Utf8Bytes>) -> Self {
        Self {
            ending,
            close: Some(CloseFrame {
                code,
                reason: reason.into(),
            }),
            readable: true,
        }
    }

    fn gone(ending: Ending) -> Self {
        Self {
            ending,
            close: None,
            readable: false,
        }
    }
}

/// Runs an upgraded connection on meet-up `id` until it ends.
pub(crate) async fn run(
    shared: Arc<Shared>,
    ws: Ws,
    info: Arc<ConnInfo>,
    id: String,
    meter: Arc<ReadMeter>,
    budget: Arc<Budget>,
) {
    let limits = &shared.config.limits;
    // Before the HELLO, a connection may send little more than the HELLO cap; tungstenite's
    // own limit (max_message_bytes) is fixed when the websocket is made.
    meter.set_cap(limits.max_hello_bytes.saturating_add(PRE_HELLO_SLACK));
    let (sink, mut stream) = ws.split();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(limits.relay_queue_bytes));
    let handle = Handle {
        conn: info.conn,
        out: out_tx.clone(),
        room: room.clone(),
        capacity: limits.relay_queue_bytes,
        budget: budget.clone(),
        ctrl: ctrl_tx,
    };
    // The budget's share for this peer's HELLO, kept in the table until it leaves.
    let mut hello_charge: Option<Charge> = None;
    let mut writer = tokio::spawn(write_loop(sink, out_rx, limits.write_timeout, info.clone()));

    let started = Instant::now();
    let mut ping: Option<Bytes> = None;
    let mut state = State::AwaitHello;
    let mut joined = false;
    let mut writer_done = false;
    // Timers live across iterations: resetting a pinned sleep is cheaper than a new one per
    // message. The pong timer only counts while a ping is outstanding.
    let hello_timer = sleep_until(started + limits.hello_timeout);
    let too_old = sleep_until(started + limits.max_connection_age);
    let mut trust = shared.trust.subscribe();
    let ping_timer = sleep_until(started);
    let pong_timer = sleep_until(started);
    let shutdown = shared.shutdown.triggered();
    tokio::pin!(hello_timer, ping_timer, pong_timer, too_old, shutdown);

    let stop = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => {
                break Stop::close(Ending::shutdown, CloseCode::Away, "server shutting down");
            }
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                break Stop::gone(Ending::write_failed);
            }
            Ok(()) = trust.changed() => {
                if let Err(err) = info.check() {
                    tracing::warn!(conn = info.conn, %id, %err, "closing: certificate no longer valid");
                    break Stop::close(Ending::revoked, CloseCode::Policy, "client certificate revoked");
                }
            }
            () = &mut too_old => {
                break Stop::close(Ending::max_age, CloseCode::Away, "maximum connection age reached; reconnect");
            }
            Some(ctrl) = ctrl_rx.recv() => match ctrl {
                Ctrl::Paired(partner) => {
                    info.set_state(PeerState::Paired);
                    tracing::info!(conn = info.conn, id = ?id, "paired");
                    let queued = match std::mem::replace(&mut state, State::AwaitHello) {
                        State::Waiting { queue, .. } => queue,
                        _ => VecDeque::new(),
                    };
                    state = State::Paired(partner.clone());
                    let mut refused = None;
                    for (message, charge) in queued {
                        // The forward charges the budget again; give this share back first.
                        drop(charge);
                        match forward(&shared, &info, &partner, message).await {
                            Ok(()) => {}
                            Err(Refused::Gone) => {
                                state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                                break;
                            }
                            Err(other) => {
                                refused = Some(other);
                                break;
                            }
                        }
                    }
                    if let Some(refused) = refused {
                        break refused_stop(&refused);
                    }
                }
                Ctrl::PartnerLeft => match shared.config.on_partner_leave {
                    OnPartnerLeave::Close => {
                        break Stop::close(Ending::partner_left, CloseCode::Protocol, PARTNER_LEFT_REASON);
                    }
                    OnPartnerLeave::Wait => {
                        tracing::info!(conn = info.conn, id = ?id, "partner left; waiting for a new one");
                        info.set_state(PeerState::Waiting);
                        state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                    }
                },
            },
            item = stream.next() => {
                let message = match item {
                    None => break Stop::gone(Ending::peer_closed),
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        let awaiting_hello = matches!(state, State::AwaitHello);
                        break read_error(&err, meter.overrun(), awaiting_hello);
                    }
                };
                match message {
                    Message::Text(_) | Message::Binary(_) => meter.data_done(),
                    Message::Pong(payload) => {
                        meter.control_done(payload.len());
                        if ping.as_ref() == Some(&payload) {
                            ping = None;
                        }
                        continue;
                    }
                    // tungstenite answers pings itself; a close frame is answered too, and the
                    // stream ends after it.
                    Message::Ping(payload) => {
                        meter.control_done(payload.len());
                        continue;
                    }
                    Message::Close(_) | Message::Frame(_) => continue,
                }
                // Relaying is the privileged action: the peer is checked against the CRLs
                // loaded now (a hash lookup).
                if let Err(err) = info.check() {
                    tracing::warn!(conn = info.conn, %id, %err, "closing: certificate no longer valid");
                    break Stop::close(Ending::revoked, CloseCode::Policy, "client certificate revoked");
                }
                let len = message.len();
                info.messages_in.fetch_add(1, Ordering::Relaxed);
                info.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
                match &mut state {
                    State::AwaitHello if len > limits.max_hello_bytes => {
                        tracing::info!(conn = info.conn, id = ?id, len, "hello too big");
                        break Stop::close(Ending::too_big, CloseCode::Size, "HELLO too big");
                    }
                    State::AwaitHello => match check_hello(&message) {
                        Err(reason) => {
                            tracing::info!(conn = info.conn, id = ?id, reason = ?reason, "invalid hello");
                            break Stop::close(Ending::invalid_hello, CloseCode::Policy, reason);
                        }
                        Ok((peer_class, peer_id)) => {
                            shared.metrics.hellos.inc();
                            info.set_hello(peer_class, peer_id);
                            let Some(charge) = budget.charge(len.saturating_add(QUEUE_OVERHEAD)) else {
                                break over_budget();
                            };
                            hello_charge = Some(charge);
                            match shared.registry.join(&id, info.conn, message, handle.clone()) {
                                Join::Full => {
                                    tracing::info!(conn = info.conn, id = ?id, "meet-up id is full");
                                    break Stop::close(Ending::full, CloseCode::Policy, "meet-up id is full");
                                }
                                Join::Busy => {
                                    tracing::info!(conn = info.conn, id = ?id, "the waiting peer has no room for the hello");
                                    break Stop::close(
                                        Ending::busy,
                                        CloseCode::Again,
                                        "no room for the HELLO now; try again later",
                                    );
                                }
                                Join::Waiting => {
                                    joined = true;
                                    meter.set_cap(message_cap(limits.max_message_bytes));
                                    info.set_state(PeerState::Waiting);
                                    tracing::info!(conn = info.conn, id = ?id, "waiting for a partner");
                                    state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                                }
                                Join::Paired(partner) => {
                                    joined = true;
                                    meter.set_cap(message_cap(limits.max_message_bytes));
                                    shared.metrics.pairs.inc();
                                    info.set_state(PeerState::Paired);
                                    tracing::info!(conn = info.conn, id = ?id, partner = partner.conn, "paired");
                                    state = State::Paired(partner);
                                }
                            }
                        }
                    },
                    State::Waiting { queue, bytes } => {
                        *bytes += len;
                        if queue.len() >= limits.waiting_queue_messages || *bytes > limits.waiting_queue_bytes {
                            break Stop::close(
                                Ending::queue_overflow,
                                CloseCode::Policy,
                                "too many messages before a partner joined",
                            );
                        }
                        let Some(charge) = budget.charge(len.saturating_add(QUEUE_OVERHEAD)) else {
                            break over_budget();
                        };
                        queue.push_back((message, charge));
                    }
                    State::Paired(partner) => match forward(&shared, &info, partner, message).await {
                        Ok(()) => {}
                        // The partner's writer is gone; its departure is on the way.
                        Err(Refused::Gone) => {
                            state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                        }
                        Err(refused) => break refused_stop(&refused),
                    },
                }
            }
            () = &mut ping_timer => {
                let now = Instant::now();
                if ping.is_none() {
                    let payload = Bytes::copy_from_slice(&rand::random::<[u8; 4]>());
                    ping = Some(payload.clone());
                    pong_timer.as_mut().reset(now + limits.pong_timeout);
                    let _ = out_tx.send(Out::Ping(payload));
                }
                ping_timer.as_mut().reset(now + limits.ping_interval);
            }
            () = &mut pong_timer, if ping.is_some() => {
                let secs = limits.pong_timeout.as_secs_f64();
                break Stop::close(Ending::ping_timeout, CloseCode::Protocol, format!("Ping timed out ({secs} seconds)"));
            }
            () = &mut hello_timer, if matches!(state, State::AwaitHello) => {
                let secs = limits.hello_timeout.as_secs_f64();
                break Stop::close(Ending::hello_timeout, CloseCode::Policy, format!("no HELLO within {secs} seconds"));
            }
        }
    };

    // Leave the table first, so the partner hears about it without waiting for our close.
    if joined {
        shared.registry.leave(&id, info.conn);
    }
    drop(handle);
    drop(hello_charge);
    drop(state);
    shared.metrics.ended(stop.ending);
    let code = stop.close.as_ref().map(|frame| u16::from(frame.code));
    tracing::info!(
        conn = info.conn,
        id = ?id,
        outcome = ?stop.ending,
        close_code = code,
        messages_in = info.messages_in.load(Ordering::Relaxed),
        "connection ended"
    );
    finish(
        stop,
        out_tx,
        (!writer_done).then_some(writer),
        stream,
        limits.close_timeout,
    )
    .await;
    room.close();
}

/// Sends our close frame, waits (bounded) for the peer's, and makes sure the writer stops.
async fn finish(
    stop: Stop,
    out: mpsc::UnboundedSender<Out>,
    writer: Option<tokio::task::JoinHandle<()>>,
    mut stream: SplitStream<Ws>,
    close_timeout: Duration,
) {
    let deadline = Instant::now() + close_timeout;
    if let Some(frame) = stop.close {
        let _ = out.send(Out::Close(frame));
    }
    let _ = out.send(Out::End);
    drop(out);
    if stop.readable {
        // Read until the peer's close frame ends the stream, discarding anything else.
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
    if let Some(mut writer) = writer {
        if tokio::time::timeout_at(deadline, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
}

/// Forwards one message to the partner.
async fn forward(
    shared: &Shared,
    info: &ConnInfo,
    partner: &Handle,
    message: Message,
) -> Result<(), Refused> {
    let len = message.len() as u64;
    partner.forward(message).await?;
    shared.metrics.messages.inc();
    shared.metrics.bytes.inc_by(len);
    tracing::debug!(conn = info.conn, to = partner.conn, len, "relayed");
    Ok(())
}

/// The cap on bytes read between two data messages once the HELLO is in: tungstenite enforces
/// `max_message_bytes` per message; this leaves room for fragment headers and control frames.
fn message_cap(max_message_bytes: usize) -> usize {
    max_message_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
}

fn over_budget() -> Stop {
    // The "connection ended" line says it (outcome over_budget); no line of its own, which
    // would multiply under the load that caused it.
    tracing::debug!("refusing work: max_buffered_bytes reached");
    Stop::close(
        Ending::over_budget,
        CloseCode::Again,
        "the proxy is out of buffer space; try again later",
    )
}

/// Why a forward that did not succeed ends the sender (a gone partner does not).
fn refused_stop(refused: &Refused) -> Stop {
    match refused {
        Refused::Budget => over_budget(),
        Refused::TooBig | Refused::Gone => {
            tracing::warn!(
                "a message larger than the relay queue (relay_queue_bytes) cannot be forwarded"
            );
            Stop::close(
                Ending::too_big,
                CloseCode::Size,
                "message too big for the relay queue",
            )
        }
    }
}

fn read_error(err: &WsError, overrun: Option<Overrun>, awaiting_hello: bool) -> Stop {
    match overrun {
        Some(Overrun::Cap) => {
            let reason = if awaiting_hello {
                "HELLO too big"
            } else {
                "message too big"
            };
            tracing::info!(reason, "read cap reached");
            return Stop {
                readable: false,
                ..Stop::close(Ending::too_big, CloseCode::Size, reason)
            };
        }
        Some(Overrun::Budget) => {
            return Stop {
                readable: false,
                ..over_budget()
            };
        }
        None => {}
    }
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            tracing::info!(size, max_size, "message too big");
            Stop {
                readable: false,
                ..Stop::close(Ending::too_big, CloseCode::Size, "message too big")
            }
        }
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) => {
            tracing::info!(%err, "websocket protocol error");
            Stop {
                readable: false,
                ..Stop::close(
                    Ending::protocol_error,
                    CloseCode::Protocol,
                    "protocol error",
                )
            }
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed => Stop::gone(Ending::peer_closed),
        other => {
            tracing::debug!(err = %other, "connection lost");
            Stop::gone(Ending::peer_closed)
        }
    }
}

/// Validates a HELLO; `Ok((peerClass, peerId))` or the close reason.
fn check_hello(message: &Message) -> Result<(Option<String>, Option<String>), String> {
    use common::envelope::micronets::{validate_hello, validate_hello_binary};
    let hello = match message {
        Message::Text(text) => validate_hello(text.as_str()),
        Message::Binary(bytes) => validate_hello_binary(bytes),
        _ => return Err("the first message must be a HELLO".into()),
    };
    hello
        .map(|hello| (hello.peer_class, hello.peer_id))
        .map_err(|err| err.close_reason())
}

/// Drains the queue into the socket: feeds what is queued (up to a batch), then flushes.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut queue: mpsc::UnboundedReceiver<Out>,
    write_timeout: Duration,
    info: Arc<ConnInfo>,
) {
    let mut closed = false;
    let mut end = false;
    while !end {
        let Some(first) = queue.recv().await else {
            break;
        };
        // A fed message sits in tungstenite's write buffer until the flush: it keeps its queue
        // room and budget until then, so a peer that does not read holds no more than its queue.
        let mut written: Vec<Held> = Vec::new();
        let batch = async {
            let mut item = Some(first);
            let mut fed = 0;
            while let Some(out) = item.take() {
                match out {
                    Out::Data(message, held) => {
                        if !closed {
                            sink.feed(message).await?;
                            info.messages_out.fetch_add(1, Ordering::Relaxed);
                        }
                        written.extend(held);
                    }
                    Out::Ping(payload) if !closed => sink.feed(Message::Ping(payload)).await?,
                    Out::Ping(_) => {}
                    Out::Close(frame) => {
                        if !closed {
                            closed = true;
                            sink.feed(Message::Close(Some(frame))).await?;
                        }
                    }
                    Out::End => {
                        end = true;
                        break;
                    }
                }
                fed += 1;
                if fed < WRITE_BATCH {
                    item = queue.try_recv().ok();
                }
            }
            sink.flush().await
        };
        let flushed = tokio::time::timeout(write_timeout, batch).await;
        drop(written);
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(conn = info.conn, %err, "write failed");
                break;
            }
            Err(_) => {
                tracing::info!(conn = info.conn, "write timed out; dropping the peer");
                break;
            }
        }
    }
    // Release the queue room held by whatever is still queued.
    queue.close();
    while queue.try_recv().is_ok() {}
}
