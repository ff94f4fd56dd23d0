//! One websocket, admin or data, from registration to close.
//!
//! The task reads frames, answers them in place (replies are written in batches: everything
//! already received is handled before one flush), writes what the hub queues for it, pings
//! the peer and closes it when idle, replaced, disconnected or when the server stops.

use std::sync::Arc;

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::admin::{self, Ctx};
use crate::hub::{Channel, ClientId, Conn, Out};
use crate::server::{Peer, Shared, next_conn};

/// Close code for a connection replaced by a newer one of the same client and channel.
pub const CLOSE_REPLACED: u16 = 4001;
/// Close code for a client disconnected by an administrator.
pub const CLOSE_DISCONNECTED: u16 = 4003;
/// Close code for a client whose certificate was revoked since it connected (policy).
pub(crate) const CLOSE_REVOKED: u16 = 1008;
/// Close code at `max_connection_age_secs` (going away: reconnect).
pub(crate) const CLOSE_TOO_OLD: u16 = 1001;

/// Most frames handled before the replies are flushed.
const BATCH: usize = 64;

fn close_frame(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }))
}

/// Runs a connection of `client` on `channel` until it ends.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    mut ws: WebSocketStream<S>,
    client: ClientId,
    channel: Channel,
    peer: Peer,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = shared.config.limits.clone();
    let conn = next_conn(&shared);
    let (tx, mut rx) = mpsc::channel(limits.send_queue);
    let is_admin = shared.config.is_admin(peer.identity.as_ref());
    let identity = peer.identity.as_ref().map(ToString::to_string);
    let attached = shared.hub.attach(
        client,
        channel,
        Conn { id: conn, tx },
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
            let _ = ws.send(close_frame(1013, &err.to_string())).await;
            return;
        }
    };
    tracing::info!(conn, peer = %peer.addr, identity, admin = is_admin, "connected");
    let ctx = Ctx {
        shared: shared.clone(),
        client,
        is_admin,
    };
    // A peer that stops reading cannot hold this task: every write has the idle deadline.
    let write_limit = limits.idle_timeout();
    if channel == Channel::Admin {
        let mut greeting = Vec::new();
        if !pipes.is_empty() {
            greeting.push(WsMessage::text(
                common::envelope::talk::Message::pipe_ids(&pipes).encode(),
            ));
        }
        if let Some(push) = admin::model_info_push(&shared).await {
            greeting.push(WsMessage::binary(push));
        }
        let mut delivered = true;
        for message in greeting {
            if !within(write_limit, ws.feed(message)).await {
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

    let too_old = tokio::time::sleep(crate::server::max_connection_age(&shared.config));
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
    let mut last_seen = Instant::now();
    let mut ping = tokio::time::interval_at(
        Instant::now() + limits.ping_interval(),
        limits.ping_interval(),
    );
    let reason = loop {
        tokio::select! {
            incoming = ws.next() => {
                let Some(Ok(first)) = incoming else {
                    break "closed by the peer";
                };
                if revoked() {
                    close(&mut ws, CLOSE_REVOKED, "client certificate revoked").await;
                    break "certificate revoked";
                }
                last_seen = Instant::now();
                let mut batch = 0;
                let mut next = Some(first);
                let mut failed = false;
                while let Some(message) = next.take() {
                    if matches!(message, WsMessage::Close(_)) {
                        failed = true;
                        break;
                    }
                    for reply in handle(&ctx, channel, message).await {
                        if !within(write_limit, ws.feed(reply)).await {
                            failed = true;
                        }
                    }
                    batch += 1;
                    if failed || batch >= BATCH {
                        break;
                    }
                    next = match ws.next().now_or_never() {
                        Some(Some(Ok(message))) => Some(message),
                        _ => None,
                    };
                }
                if failed || !within(write_limit, ws.flush()).await {
                    break "closed";
                }
            }
            out = rx.recv() => {
                let message = match out {
                    Some(Out::Text(_) | Out::Binary(_)) if revoked() => {
                        close(&mut ws, CLOSE_REVOKED, "client certificate revoked").await;
                        break "certificate revoked";
                    }
                    Some(Out::Text(text)) => WsMessage::text(text),
                    Some(Out::Binary(bytes)) => WsMessage::binary(bytes),
                    Some(Out::Close(code, reason)) => {
                        close(&mut ws, code, &reason).await;
                        break "closed by the server";
                    }
                    None => {
                        close(&mut ws, CLOSE_REPLACED, "replaced").await;
                        break "unregistered";
                    }
                };
                if !within(write_limit, ws.send(message)).await {
                    break "write failed or stalled";
                }
            }
            _ = ping.tick() => {
                if revoked() {
                    close(&mut ws, CLOSE_REVOKED, "client certificate revoked").await;
                    break "certificate revoked";
                }
                if last_seen.elapsed() > limits.idle_timeout() {
                    close(&mut ws, 1001, "idle timeout").await;
                    break "idle";
                }
                if !within(write_limit, ws.send(WsMessage::Ping(Default::default()))).await {
                    break "write failed or stalled";
                }
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
    shared.hub.detach(client, channel, conn);
    tracing::info!(conn, reason, "disconnected");
}

/// Runs a write with a deadline; false when it failed or stalled.
async fn within<F, E>(limit: std::time::Duration, write: F) -> bool
where
    F: std::future::Future<Output = Result<(), E>>,
{
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

async fn handle(ctx: &Ctx, channel: Channel, message: WsMessage) -> Vec<WsMessage> {
    match (channel, message) {
        (Channel::Admin, WsMessage::Text(text)) => admin::on_text(ctx, text).await,
        (Channel::Admin, WsMessage::Binary(bytes)) => admin::on_binary(ctx, bytes).await,
        (Channel::Data, WsMessage::Text(_) | WsMessage::Binary(_)) => {
            tracing::debug!("ignoring a message on the data channel");
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Sends a close frame and waits briefly for the peer's.
async fn close<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !within(
        std::time::Duration::from_secs(1),
        ws.send(close_frame(code, reason)),
    )
    .await
    {
        return;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
