//! One websocket, admin or data, from registration to close.
//!
//! The task reads frames, answers them in place (replies are written in batches: everything
//! already received is handled before one flush), writes what the hub queues for it (and,
//! on `/`, the latest `checkSum` broadcast it has not written: one shared copy), pings
//! the peer and closes it when idle, replaced, disconnected or when the server stops.
//!
//! Frames are read with the streaming decoder of `common::envelope::ws`, never a whole
//! message at a time: [`Inbound`] keeps what a message needs (nothing on `/data`, a capped
//! buffer for JSON, a spool file for uploads) and closes the connection with 1009 past the
//! channel's cap, 1013 when the party's share or the budget of bytes in flight is spent, and
//! 1008 when a message is not finished by its deadline (a timer of its own: the bytes of an
//! unfinished message do not keep it alive). Server frames are written unmasked and
//! unfragmented.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use common::envelope::ws::{self, Decoder, Event, ProtocolError};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::admin::{self, Ctx};
use crate::budget::Charge;
use crate::hub::{CLOSE_REPLACED, Channel, ClientId, Conn, Out};
use crate::inbound::{Inbound, Refusal};
use crate::state::{Peer, Shared};

/// Close code for a client whose certificate was revoked since it connected (policy).
pub(crate) const CLOSE_REVOKED: u16 = 1008;
/// Close code at `max_connection_age_secs` (going away: reconnect).
pub(crate) const CLOSE_TOO_OLD: u16 = 1001;

/// Most bytes read from the socket at once, and so held of it before they are decoded.
pub(crate) const READ_BUFFER: usize = 8 * 1024;
/// Replies gathered before they are written out (a batch may hold more: it is written as it
/// passes this).
const WRITE_BUFFER: usize = 64 * 1024;

/// The socket: frames in through the decoder, frames out through a small buffer.
struct Wire<S> {
    io: S,
    decoder: Decoder,
    read: BytesMut,
    write: Vec<u8>,
}

/// What ended a read.
enum ReadError {
    /// The peer closed the socket, or it failed.
    Gone,
    /// A frame broke the protocol.
    Protocol(ProtocolError),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            decoder: Decoder::new(),
            read: BytesMut::with_capacity(READ_BUFFER),
            write: Vec::new(),
        }
    }

    /// The next event, reading when none is buffered. Cancel-safe: bytes are either read
    /// into the buffer or left in the socket.
    async fn next(&mut self) -> Result<Event, ReadError> {
        loop {
            if let Some(event) = self.buffered()? {
                return Ok(event);
            }
            let mut chunk = [0u8; READ_BUFFER];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(ReadError::Gone),
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// An event from what was already read, without reading.
    fn buffered(&mut self) -> Result<Option<Event>, ReadError> {
        self.decoder
            .decode(&mut self.read)
            .map_err(ReadError::Protocol)
    }

    /// Queues a frame; writes the queue out once it passes [`WRITE_BUFFER`].
    async fn feed(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.write
            .extend_from_slice(&ws::encode_frame_header(opcode, payload.len()));
        if payload.len() > WRITE_BUFFER {
            // Large frames go out from where they are, not through a copy.
            self.io.write_all(&std::mem::take(&mut self.write)).await?;
            return self.io.write_all(payload).await;
        }
        self.write.extend_from_slice(payload);
        if self.write.len() > WRITE_BUFFER {
            self.io.write_all(&std::mem::take(&mut self.write)).await?;
        }
        Ok(())
    }

    async fn feed_message(&mut self, message: &WsMessage) -> std::io::Result<()> {
        match message {
            WsMessage::Text(text) => self.feed(ws::OP_TEXT, text.as_bytes()).await,
            WsMessage::Binary(bytes) => self.feed(ws::OP_BINARY, bytes).await,
            _ => Ok(()),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write.is_empty() {
            self.io.write_all(&std::mem::take(&mut self.write)).await?;
        }
        self.io.flush().await
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.feed(opcode, payload).await?;
        self.flush().await
    }
}

/// After shutdown, the longest a connection gets to end: its close frame (1 s) and the peer's
/// answer (1 s). A connection stuck in a write to a peer that does not read sees the shutdown
/// only when the write ends (up to `idle_timeout_secs`), and would hold the drain past its
/// grace; it is dropped here instead.
const CLOSE_AT_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a connection of `client` on `channel` until it ends, or until [`CLOSE_AT_SHUTDOWN`]
/// after shutdown.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    io: S,
    client: ClientId,
    channel: Channel,
    peer: Peer,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stopping = shared.shutdown.clone();
    let cut = async {
        stopping.triggered().await;
        tokio::time::sleep(CLOSE_AT_SHUTDOWN).await;
    };
    tokio::select! {
        () = serve(shared, io, client, channel, peer) => {}
        () = cut => tracing::info!(
            reason = "server stopping",
            "disconnected: a write to the peer was still pending"
        ),
    }
}

/// One connection of `client` on `channel`, from its greeting to its end.
async fn serve<S>(shared: Arc<Shared>, io: S, client: ClientId, channel: Channel, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ws = Wire::new(io);
    let limits = shared.config.limits.clone();
    let conn = shared.next_conn();
    let (tx, mut rx) = mpsc::channel(limits.send_queue);
    let is_admin = shared.config.is_admin(peer.identity.as_ref());
    let identity = peer.identity.as_ref().map(ToString::to_string);
    let attached = shared.hub.attach(
        client,
        channel,
        Conn::new(conn, tx, limits.send_queue_bytes),
        peer.identity.clone(),
        limits.max_clients,
    );
    let pipes = match attached {
        Ok((old, pipes)) => {
            if let Some(old) = old {
                let _ = old.tx.try_send(Out::Close(
                    CLOSE_REPLACED,
                    "replaced by a newer connection".into(),
                ));
            }
            pipes
        }
        Err(err) => {
            let payload = ws::close_payload(ws::CLOSE_TRY_AGAIN, &err.to_string());
            let _ = within(
                std::time::Duration::from_secs(1),
                ws.send(ws::OP_CLOSE, &payload),
            )
            .await;
            return;
        }
    };
    // Admin connections hear of every upload from here on (the latest only: see `next_info`).
    let mut info = (channel == Channel::Admin).then(|| shared.model_info.subscribe());
    tracing::info!(conn, peer = %peer.addr, identity, admin = is_admin, "connected");
    let ctx = Ctx {
        shared: shared.clone(),
        client,
        is_admin,
        party: peer.key(),
    };
    // A peer that stops reading cannot hold this task: every write has the idle deadline.
    let write_limit = limits.idle_timeout();
    let share = shared.budget.of(peer.key());
    if channel == Channel::Admin {
        let mut greeting = Vec::new();
        if !pipes.is_empty() {
            greeting.push(WsMessage::text(
                common::envelope::talk::Message::pipe_ids(&pipes).encode(),
            ));
        }
        // The push is held until it is written: charged to the party's share of the bytes
        // in flight, and left out when that is spent.
        let mut charge = Charge::new(&share);
        if let Some(push) = admin::model_info_push(&shared).await {
            if charge.cover(push.len()).is_ok() {
                greeting.push(WsMessage::binary(push));
            } else {
                tracing::warn!(
                    conn,
                    "model_info.json not pushed: the budget of bytes in flight is spent"
                );
            }
        }
        let mut delivered = true;
        for message in &greeting {
            if !within(write_limit, ws.feed_message(message)).await {
                delivered = false;
                break;
            }
        }
        if !delivered || !within(write_limit, ws.flush()).await {
            shared.hub.detach(client, channel, conn);
            tracing::info!(
                conn,
                reason = "greeting write failed or stalled",
                "disconnected"
            );
            return;
        }
    }

    let too_old = tokio::time::sleep(shared.max_connection_age());
    tokio::pin!(too_old);
    // Before each command, each data frame out and each ping: a certificate revoked since
    // the handshake ends the connection.
    let revoked = || match peer.live.as_ref().map(common::tls::LivePeer::check) {
        Some(Err(err)) => {
            tracing::warn!(conn, %err, "closing: certificate no longer valid");
            true
        }
        _ => false,
    };
    let mut inbound = Inbound::new(channel, share);
    // Idle is counted from the peer's last frame (pongs included), to the second: not
    // checked only at ping ticks, which closed a peer up to a ping period late.
    let idle = tokio::time::sleep(limits.idle_timeout());
    tokio::pin!(idle);
    let mut ping = tokio::time::interval_at(
        Instant::now() + limits.ping_interval(),
        limits.ping_interval(),
    );
    let reason = loop {
        let deadline = inbound.deadline(&limits);
        tokio::select! {
            first = ws.next() => {
                let first = match first {
                    Ok(event) => event,
                    Err(ReadError::Gone) => break "closed by the peer",
                    Err(ReadError::Protocol(err)) => {
                        tracing::info!(conn, %err, "closing: protocol error");
                        close(&mut ws, ws::CLOSE_PROTOCOL, "protocol error").await;
                        break "protocol error";
                    }
                };
                idle.as_mut().reset(Instant::now() + limits.idle_timeout());
                // Everything already read is handled before one flush.
                let mut next = Some(Ok(first));
                let mut ended = None;
                while let Some(event) = next.take() {
                    let event = match event {
                        Ok(event) => event,
                        Err(ReadError::Gone) => {
                            ended = Some("closed by the peer");
                            break;
                        }
                        Err(ReadError::Protocol(err)) => {
                            tracing::info!(conn, %err, "closing: protocol error");
                            close(&mut ws, ws::CLOSE_PROTOCOL, "protocol error").await;
                            ended = Some("protocol error");
                            break;
                        }
                    };
                    match on_event(&ctx, &mut ws, &mut inbound, event, write_limit, &revoked).await {
                        Ok(()) => {}
                        Err(why) => {
                            ended = Some(why);
                            break;
                        }
                    }
                    next = ws.buffered().transpose();
                }
                if let Some(why) = ended {
                    break why;
                }
                if let Some(refusal) = inbound.overdue(&limits, Instant::now()) {
                    break refuse(&ctx, &mut ws, &mut inbound, refusal).await;
                }
                if !within(write_limit, ws.flush()).await {
                    break "write failed or stalled";
                }
            }
            out = rx.recv() => {
                // Pipe output gives its room back once it is written (or dropped).
                let (out, _room) = match out {
                    Some(Out::Held(out, room)) => (Some(*out), Some(room)),
                    other => (other, None),
                };
                let sent = match out {
                    Some(Out::Text(_) | Out::Binary(_)) if revoked() => {
                        close(&mut ws, CLOSE_REVOKED, "client certificate revoked").await;
                        break "certificate revoked";
                    }
                    Some(Out::Text(text)) => {
                        within(write_limit, ws.send(ws::OP_TEXT, text.as_bytes())).await
                    }
                    Some(Out::Binary(bytes)) => {
                        within(write_limit, ws.send(ws::OP_BINARY, &bytes)).await
                    }
                    Some(Out::Close(code, reason)) => {
                        close(&mut ws, code, &reason).await;
                        break "closed by the server";
                    }
                    Some(Out::Held(..)) => true,
                    None => {
                        close(&mut ws, CLOSE_REPLACED, "replaced").await;
                        break "unregistered";
                    }
                };
                if !sent {
                    break "write failed or stalled";
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if let Some(refusal) = inbound.overdue(&limits, Instant::now()) {
                    break refuse(&ctx, &mut ws, &mut inbound, refusal).await;
                }
            }
            _ = ping.tick() => {
                if revoked() {
                    close(&mut ws, CLOSE_REVOKED, "client certificate revoked").await;
                    break "certificate revoked";
                }
                if !within(write_limit, ws.send(ws::OP_PING, &[])).await {
                    break "write failed or stalled";
                }
            }
            latest = next_info(&mut info) => {
                if revoked() {
                    close(&mut ws, CLOSE_REVOKED, "client certificate revoked").await;
                    break "certificate revoked";
                }
                if !within(write_limit, ws.send(ws::OP_TEXT, &latest)).await {
                    break "write failed or stalled";
                }
            }
            () = &mut idle => {
                close(&mut ws, 1001, "idle timeout").await;
                break "idle";
            }
            () = shared.shutdown.triggered() => {
                close(&mut ws, 1001, "server shutting down").await;
                break "server stopping";
            }
            () = &mut too_old => {
                close(&mut ws, CLOSE_TOO_OLD, "maximum connection age reached; reconnect").await;
                break "max connection age";
            }
        }
    };
    drop(inbound);
    shared.hub.detach(client, channel, conn);
    tracing::info!(conn, reason, "disconnected");
}

/// The latest `checkSum` broadcast this admin connection has not written (an older one it
/// had not written yet is skipped: one copy, shared, per connection at most); never on
/// `/data`.
async fn next_info(info: &mut Option<watch::Receiver<Option<Bytes>>>) -> Bytes {
    if let Some(info) = info {
        while info.changed().await.is_ok() {
            if let Some(latest) = info.borrow_and_update().clone() {
                return latest;
            }
        }
    }
    std::future::pending().await
}

/// Handles one event; `Err` with the reason when the connection must end (already closed).
async fn on_event<S>(
    ctx: &Ctx,
    ws: &mut Wire<S>,
    inbound: &mut Inbound,
    event: Event,
    write_limit: std::time::Duration,
    revoked: &impl Fn() -> bool,
) -> Result<(), &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = &ctx.shared;
    let step = match event {
        Event::Start { kind, declared } => inbound.start(shared, kind, declared),
        Event::More { declared } => inbound.more(shared, declared),
        Event::Data(data) => inbound.data(ctx, data).await,
        Event::End => {
            if revoked() {
                close(ws, CLOSE_REVOKED, "client certificate revoked").await;
                return Err("certificate revoked");
            }
            match inbound.end(ctx).await {
                Ok(replies) => {
                    for reply in &replies {
                        if !within(write_limit, ws.feed_message(reply)).await {
                            return Err("write failed or stalled");
                        }
                    }
                    Ok(())
                }
                Err(refusal) => Err(refusal),
            }
        }
        Event::Ping(payload) => {
            if within(write_limit, ws.feed(ws::OP_PONG, &payload)).await {
                Ok(())
            } else {
                return Err("write failed or stalled");
            }
        }
        Event::Pong => Ok(()),
        Event::Close(_) => {
            // Answer the close and end.
            let payload = ws::close_payload(ws::CLOSE_NORMAL, "");
            let _ = within(
                std::time::Duration::from_secs(1),
                ws.send(ws::OP_CLOSE, &payload),
            )
            .await;
            return Err("closed by the peer");
        }
    };
    match step {
        Ok(()) => Ok(()),
        Err(refusal) => Err(refuse(ctx, ws, inbound, refusal).await),
    }
}

/// Closes the connection for `refusal`, giving the message's bytes back first; the reason.
async fn refuse<S>(
    ctx: &Ctx,
    ws: &mut Wire<S>,
    inbound: &mut Inbound,
    refusal: Refusal,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    inbound.abandon();
    let (code, reason) = refusal.close();
    tracing::info!(
        client_id = ctx.client,
        code,
        reason,
        "closing: message refused"
    );
    close(ws, code, &reason).await;
    match refusal {
        Refusal::TooBig(_) => "message too big",
        Refusal::Busy(_) => "bytes in flight exhausted",
        Refusal::NotUtf8 => "text not UTF-8",
        Refusal::TooSlow(_) => "message too slow",
    }
}

/// Runs a write with a deadline; false when it failed or stalled.
async fn within<F, E>(limit: std::time::Duration, write: F) -> bool
where
    F: std::future::Future<Output = Result<(), E>>,
{
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

/// Sends a close frame and waits briefly for the peer's, dropping whatever else comes.
async fn close<S>(ws: &mut Wire<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let payload = ws::close_payload(code, reason);
    if !within(
        std::time::Duration::from_secs(1),
        ws.send(ws::OP_CLOSE, &payload),
    )
    .await
    {
        return;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Ok(event) = ws.next().await {
            if matches!(event, Event::Close(_)) {
                break;
            }
        }
    })
    .await;
    let _ = ws.io.shutdown().await;
}
