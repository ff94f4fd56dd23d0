//! The IPC sockets pipes talk on: check-in, commands to the pipe, output from it.
//!
//! A pipe checks in on one of two sockets. Its own descriptor (one end of a socketpair the
//! daemon made for it alone, inherited as descriptor 3): holding it is the proof, and only
//! that pipe's id may check in on it. Or the shared path socket (`ipc_socket`), for pipe
//! programs that connect by path: there only the exact process that was spawned for the id
//! may check in (`SO_PEERCRED` pid, which the kernel vouches for; never its process group,
//! which any process of the same user can join).
//!
//! A connection's first byte tells raw frames from JSON lines. Its first frame must be a
//! check-in in the pipe command's dialect (`crate::dialect`: type 1 for kmb, type 0 for dlafs,
//! the pipe id in ASCII decimal), within the check-in timeout; the other dialect's check-in is
//! refused like any other frame. After that the server sends what the dialect sends first
//! (kmb: config 2 and launch 3; dlafs: the create JSON as type 0), then whatever the owner
//! asks; what the pipe sends goes to its owner's data channel, error text (kmb 7, dlafs 6) to
//! the admin channel as `pipe_message`. A malformed frame ends the connection and the pipe
//! with it.

use std::sync::Arc;

use bytes::{Buf as _, BytesMut};
use common::daemon::AcceptBackoff;
use common::envelope::ipc::{Frame, IpcError, Protocol};
use common::envelope::talk::{BinaryMessage, Headers, Message};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use tokio_util::sync::CancellationToken;

use crate::hub::{Channel, CheckInError, CheckInVia, ClientId, Out, PipeId, ToPipe};
use crate::state::Shared;

/// Frames queued towards one pipe.
const TO_PIPE_QUEUE: usize = 64;
/// After a pipe has gone, the longest its last frames may take to be relayed.
const DRAIN_AFTER_EXIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts pipe connections until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let mut backoff = AcceptBackoff::default();
    let shutdown = shared.shutdown.clone();
    while let Some((stream, _)) = backoff.next(&shutdown, || listener.accept()).await {
        let shared = shared.clone();
        let cred = stream.peer_cred().ok();
        let pid = cred
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let span = tracing::info_span!("ipc", peer_pid = pid);
        // Not tracked by the drain: the pipe supervisors are, and they end these connections.
        tokio::spawn(connection(shared, stream, CheckInVia::Path(pid), None).instrument(span));
    }
}

/// Serves pipe `id`'s own socket (the daemon's end of the pair whose other end the pipe
/// inherited). Gives up quietly when the pipe checks in over the path socket instead, or
/// sends nothing before the check-in timeout (its supervisor deals with that).
pub(crate) async fn on_descriptor(
    shared: Arc<Shared>,
    id: PipeId,
    stream: UnixStream,
    checked_in: CancellationToken,
) {
    connection(shared, stream, CheckInVia::Descriptor(id), Some(checked_in)).await;
}

/// One pipe connection, from its check-in to its end. `elsewhere`, for a pipe's descriptor,
/// is cancelled when the pipe has checked in by another way: waiting for a check-in here
/// then ends.
async fn connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    via: CheckInVia,
    elsewhere: Option<CancellationToken>,
) {
    let max = shared.config.limits.max_ipc_frame_bytes;
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = BytesMut::with_capacity(8192);

    let checked_in_elsewhere = async {
        match &elsewhere {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let checkin = tokio::time::timeout(shared.config.limits.pipe_checkin_timeout(), async {
        loop {
            if let Some(first) = buf.first() {
                let protocol = Protocol::detect(*first);
                if let Some((frame, used)) = protocol.decode(&buf, max)? {
                    buf.advance(used);
                    return Ok::<_, IpcError>(Some((protocol, frame)));
                }
            }
            if reader.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return Ok(None);
            }
        }
    });
    let checkin = tokio::select! {
        checkin = checkin => checkin,
        () = checked_in_elsewhere => {
            tracing::debug!("the pipe checked in over the path socket; closing its descriptor");
            return;
        }
    };
    let descriptor = matches!(via, CheckInVia::Descriptor(_));
    let (protocol, frame) = match checkin {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return,
        Ok(Err(err)) => {
            tracing::warn!(err = %common::log::Escaped(&err), "ipc check-in is malformed");
            return;
        }
        Err(_) if descriptor => {
            tracing::debug!("no check-in on the pipe's descriptor in time");
            return;
        }
        Err(_) => {
            tracing::warn!("no ipc check-in in time");
            return;
        }
    };
    let id = match shared.config.ipc_dialect.check_in_id(&frame) {
        Ok(id) => id,
        Err(err) => {
            tracing::warn!(err = %err, "ipc check-in refused");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<ToPipe>(TO_PIPE_QUEUE);
    // A pipe may connect before its spawner has recorded its pid: ask again until the
    // check-in deadline.
    let started = tokio::time::Instant::now();
    let first = loop {
        match shared.hub.check_in(id, via, tx.clone()) {
            Ok(first) => break first,
            Err(CheckInError::Starting(_))
                if started.elapsed() < shared.config.limits.pipe_checkin_timeout() =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(err) => {
                tracing::warn!(err = %common::log::Escaped(&err), "ipc check-in refused");
                return;
            }
        }
    };
    // Only the hub's copy may keep the writer below alive.
    drop(tx);
    // The supervisor announces the pipe's end only after this connection is done.
    let _relayed = shared.hub.relayed(id).map(|t| t.drop_guard());
    tracing::info!(pipe_id = id, ?protocol, descriptor, "pipe checked in");

    // Writer: frames to the pipe, until the hub forgets the pipe (the sender drops).
    let write = async move {
        for queued in first {
            write_frame(&mut writer, protocol, &queued.frame).await?;
        }
        // Each frame gives its room back once written.
        while let Some(queued) = rx.recv().await {
            write_frame(&mut writer, protocol, &queued.frame).await?;
        }
        writer.shutdown().await
    };
    // The owner is kept: output the pipe wrote just before exiting is still delivered after
    // its supervisor has seen the exit and the hub has forgotten the pipe.
    let Some(owner) = shared.hub.owner(id) else {
        return;
    };
    let read = async {
        loop {
            while let Some((frame, used)) = protocol.decode(&buf, max)? {
                buf.advance(used);
                route(&shared, owner, id, frame).await;
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => return Ok::<(), IpcError>(()),
                Ok(_) => {}
                Err(err) => {
                    // A reset from a pipe that was killed is an end, not a protocol error.
                    tracing::debug!(%err, pipe_id = id, "ipc read ended");
                    return Ok(());
                }
            }
        }
    };
    tokio::pin!(read);
    let result = tokio::select! {
        result = write => {
            if let Err(err) = result {
                tracing::debug!(%err, pipe_id = id, "ipc write ended");
            }
            // The pipe has gone (the hub dropped our sender) or stopped reading: relay what it
            // wrote before, which the news of its exit may have overtaken.
            match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut read).await {
                Ok(result) => result,
                Err(_) => return,
            }
        },
        result = &mut read => result,
    };
    match result {
        Ok(()) => tracing::debug!(pipe_id = id, "pipe closed its ipc connection"),
        Err(err) => {
            tracing::warn!(err = %common::log::Escaped(&err), pipe_id = id, "ipc protocol error; stopping the pipe");
            if let Ok((stop, _)) = shared.hub.begin_destroy(None, id) {
                stop.cancel();
            }
        }
    }
}

async fn write_frame(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    protocol: Protocol,
    frame: &Frame,
) -> std::io::Result<()> {
    let bytes = protocol
        .encode(frame)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    writer.write_all(&bytes).await
}

/// Sends one frame from pipe `id` where it belongs, waiting for room (backpressure reaches
/// the pipe) and for the owner's data channel when it is not connected.
async fn route(shared: &Arc<Shared>, owner: ClientId, id: PipeId, frame: Frame) {
    let kind = frame.kind.number();
    let to = shared.config.ipc_dialect.route(kind);
    if to.owner {
        if let Some(admin) = shared.hub.conn(owner, Channel::Admin) {
            let text = String::from_utf8_lossy(&frame.payload).into_owned();
            let _ = admin
                .tx
                .try_send(Out::Text(Message::pipe_message(id, text).encode()));
        }
    }
    if !to.data {
        return;
    }
    let out = match (to.binary, std::str::from_utf8(&frame.payload)) {
        (true, _) | (_, Err(_)) => {
            let headers = Headers {
                pipe_id: Some(id),
                kind: Some(kind),
                ..Headers::default()
            };
            Out::Binary(BinaryMessage::new(headers, frame.payload.clone()).encode())
        }
        (_, Ok(text)) => {
            Out::Text(Message::data(kind, id, Value::String(text.to_owned())).encode())
        }
    };
    // A message bigger than the whole room waits for all of it, then goes alone.
    let room_bytes = shared.config.limits.send_queue_bytes;
    let want = u32::try_from(out.len().min(room_bytes)).unwrap_or(u32::MAX);
    let mut out = out;
    loop {
        // Register interest before looking, so an attach between the two is not missed.
        let attached = shared.hub.data_attached.notified();
        if let Some(data) = shared.hub.conn(owner, Channel::Data) {
            let room = tokio::select! {
                room = data.room.clone().acquire_many_owned(want) => room,
                () = shared.shutdown.triggered() => return,
            };
            let Ok(room) = room else { return };
            match data.tx.send(Out::Held(Box::new(out), room)).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    // The channel is closing; its task detaches it in a moment.
                    out = back.unheld();
                    tokio::task::yield_now().await;
                    continue;
                }
            }
        }
        tokio::select! {
            () = attached => {}
            () = shared.shutdown.triggered() => return,
        }
        if shared.hub.owner(id).is_none() {
            return;
        }
    }
}
