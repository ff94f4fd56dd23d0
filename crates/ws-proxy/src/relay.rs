//! One upgraded websocket connection: HELLO, waiting, relaying, keepalive and closing.
//!
//! Each connection runs two tasks. The *reader* (this module's [`run`]) owns the receiving half:
//! it validates the HELLO, joins the meet-up table, queues messages while the peer waits, and
//! forwards each message to the partner's writer. The *writer* owns the sending half and drains
//! a queue that the partner, the table (HELLOs) and the reader itself (pings, close frames)
//! fill. The queue is bounded in bytes by a semaphore: a forward waits for room, so a slow
//! reader slows its partner down and memory stays bounded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::config::OnPartnerLeave;
use crate::metrics::Ending;
use crate::registry::{ConnId, Join, Peer};
use crate::server::{ConnInfo, PeerState, Shared};
use crate::upgrade::Rewind;

/// The websocket stream of an accepted connection.
pub(crate) type Ws = WebSocketStream<Rewind<TlsStream<TcpStream>>>;

/// The reason sent to a survivor whose partner left (the original's text).
pub const PARTNER_LEFT_REASON: &str = "the peer websocket disconnected";

/// Semaphore permits a queued message costs beyond its payload, so empty messages count.
const QUEUE_OVERHEAD: usize = 64;
/// Most queued items the writer feeds before it flushes.
const WRITE_BATCH: usize = 64;

/// What a writer sends.
pub(crate) enum Out {
    /// A data message (or a HELLO), with the queue room it holds until written.
    Data(Message, Option<OwnedSemaphorePermit>),
    /// A keepalive ping.
    Ping(Bytes),
    /// A close frame; later data is dropped.
    Close(CloseFrame),
    /// Flush and stop.
    End,
}

/// What the table tells a reader.
pub(crate) enum Ctrl {
    Paired(Handle),
    PartnerLeft,
}

/// Another task's way to reach this connection.
#[derive(Clone)]
pub(crate) struct Handle {
    conn: ConnId,
    out: mpsc::UnboundedSender<Out>,
    room: Arc<Semaphore>,
    ctrl: mpsc::UnboundedSender<Ctrl>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("conn", &self.conn).finish()
    }
}

impl Peer for Handle {
    fn deliver_hello(&self, hello: &Message) {
        let _ = self.out.send(Out::Data(hello.clone(), None));
    }

    fn paired(&self, partner: Self) {
        let _ = self.ctrl.send(Ctrl::Paired(partner));
    }

    fn partner_left(&self) {
        let _ = self.ctrl.send(Ctrl::PartnerLeft);
    }
}

impl Handle {
    /// Queues `message` for this peer once there is room; gives it back when the peer's
    /// writer has gone.
    async fn forward(&self, message: Message) -> Result<(), Message> {
        let cost = u32::try_from(message.len() + QUEUE_OVERHEAD).unwrap_or(u32::MAX);
        let permit = match self.room.clone().try_acquire_many_owned(cost) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(message),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                match self.room.clone().acquire_many_owned(cost).await {
                    Ok(permit) => permit,
                    Err(_) => return Err(message),
                }
            }
        };
        self.out
            .send(Out::Data(message, Some(permit)))
            .map_err(|err| match err.0 {
                Out::Data(message, _) => message,
                _ => Message::Binary(Bytes::new()),
            })
    }
}

enum State {
    AwaitHello,
    Waiting {
        queue: VecDeque<Message>,
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
pub(crate) async fn run(shared: Arc<Shared>, ws: Ws, info: Arc<ConnInfo>, id: String) {
    let limits = &shared.config.limits;
    let (sink, mut stream) = ws.split();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(limits.relay_queue_bytes));
    let handle = Handle {
        conn: info.conn,
        out: out_tx.clone(),
        room: room.clone(),
        ctrl: ctrl_tx,
    };
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
                if let Err(err) = info.live.check() {
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
                    for message in queued {
                        if !forward(&shared, &info, &partner, message).await {
                            state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                            break;
                        }
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
                    Some(Err(err)) => break read_error(&err),
                };
                match message {
                    Message::Text(_) | Message::Binary(_) => {}
                    Message::Pong(payload) => {
                        if ping.as_ref() == Some(&payload) {
                            ping = None;
                        }
                        continue;
                    }
                    // tungstenite answers pings itself; a close frame is answered too, and the
                    // stream ends after it.
                    Message::Ping(_) | Message::Close(_) | Message::Frame(_) => continue,
                }
                // Relaying is the privileged action: the peer is checked against the CRLs
                // loaded now (a hash lookup).
                if let Err(err) = info.live.check() {
                    tracing::warn!(conn = info.conn, %id, %err, "closing: certificate no longer valid");
                    break Stop::close(Ending::revoked, CloseCode::Policy, "client certificate revoked");
                }
                let len = message.len();
                info.messages_in.fetch_add(1, Ordering::Relaxed);
                info.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
                match &mut state {
                    State::AwaitHello => match check_hello(&message) {
                        Err(reason) => {
                            tracing::info!(conn = info.conn, id = ?id, reason = ?reason, "invalid hello");
                            break Stop::close(Ending::invalid_hello, CloseCode::Policy, reason);
                        }
                        Ok((peer_class, peer_id)) => {
                            shared.metrics.hellos.inc();
                            info.set_hello(peer_class, peer_id);
                            match shared.registry.join(&id, info.conn, message, handle.clone()) {
                                Join::Full => {
                                    tracing::info!(conn = info.conn, id = ?id, "meet-up id is full");
                                    break Stop::close(Ending::full, CloseCode::Policy, "meet-up id is full");
                                }
                                Join::Waiting => {
                                    joined = true;
                                    info.set_state(PeerState::Waiting);
                                    tracing::info!(conn = info.conn, id = ?id, "waiting for a partner");
                                    state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                                }
                                Join::Paired(partner) => {
                                    joined = true;
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
                        queue.push_back(message);
                        if queue.len() > limits.waiting_queue_messages || *bytes > limits.waiting_queue_bytes {
                            break Stop::close(
                                Ending::queue_overflow,
                                CloseCode::Policy,
                                "too many messages before a partner joined",
                            );
                        }
                    }
                    State::Paired(partner) => {
                        if !forward(&shared, &info, partner, message).await {
                            // The partner's writer is gone; its departure is on the way.
                            state = State::Waiting { queue: VecDeque::new(), bytes: 0 };
                        }
                    }
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

/// Forwards one message to the partner; `false` when the partner's writer has gone.
async fn forward(shared: &Shared, info: &ConnInfo, partner: &Handle, message: Message) -> bool {
    let len = message.len() as u64;
    match partner.forward(message).await {
        Ok(()) => {
            shared.metrics.messages.inc();
            shared.metrics.bytes.inc_by(len);
            tracing::debug!(conn = info.conn, to = partner.conn, len, "relayed");
            true
        }
        Err(_) => false,
    }
}

fn read_error(err: &WsError) -> Stop {
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
        let batch = async {
            let mut item = Some(first);
            let mut fed = 0;
            while let Some(out) = item.take() {
                match out {
                    Out::Data(message, permit) => {
                        if !closed {
                            sink.feed(message).await?;
                            info.messages_out.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(permit);
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
        match tokio::time::timeout(write_timeout, batch).await {
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
