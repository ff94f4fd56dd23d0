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
        let connector = Connector::of(&stream);
        let span = tracing::info_span!("ipc", peer_pid = connector.pid);
        // Not tracked by the drain: the pipe supervisors are, and they end these connections.
        tokio::spawn(connection(shared, stream, Via::Path(connector), None).instrument(span));
    }
}

/// The process that connected to the path socket, named by a pidfd as well as by its pid.
///
/// A pid alone is no proof: once its process exits the kernel hands the number to a later
/// one. A process could connect, pass the socket to a child and exit, wait for a freshly
/// spawned pipe to be given its old pid, and check in as that pipe. A pidfd names one process
/// and no later holder of its pid, so a check-in counts only while the connector itself still
/// runs, and then no other process can have its pid.
pub(crate) struct Connector {
    pid: Option<u32>,
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Connector {
    /// Names the peer of an accepted connection. Since Linux 6.5 the kernel hands out a pidfd
    /// of the very process that called `connect` (`SO_PEERPIDFD`); before that, a pidfd is
    /// opened for the peer's pid at accept, which names whoever holds that pid now, a few
    /// microseconds after the connect.
    pub(crate) fn of(stream: &UnixStream) -> Self {
        let pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd)
            .ok()
            .or_else(|| {
                let raw = rustix::process::Pid::from_raw(i32::try_from(pid?).ok()?)?;
                rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()
            });
        Self { pid, pidfd }
    }

    /// The connector's pid while it still runs; `None` once it has exited (its pid may now
    /// be another process's) or when it could not be named at all.
    pub(crate) fn live_pid(&self) -> Option<u32> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let pidfd = self.pidfd.as_ref()?;
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // A pidfd polls readable once its process has exited.
        match rustix::event::poll(&mut fds, Some(&now)) {
            Ok(0) => self.pid,
            _ => None,
        }
    }
}

/// How a connection may check in: on a pipe's own descriptor, or on the path socket as the
/// process that connected.
enum Via {
    Descriptor(PipeId),
    Path(Connector),
}

impl Via {
    /// What the hub checks now: a path connector counts only while it runs.
    fn now(&self) -> CheckInVia {
        match self {
            Via::Descriptor(id) => CheckInVia::Descriptor(*id),
            Via::Path(connector) => CheckInVia::Path(connector.live_pid()),
        }
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
    connection(shared, stream, Via::Descriptor(id), Some(checked_in)).await;
}

/// One pipe connection, from its check-in to its end. `elsewhere`, for a pipe's descriptor,
/// is cancelled when the pipe has checked in by another way: waiting for a check-in here
/// then ends.
async fn connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    via: Via,
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
    let descriptor = matches!(via, Via::Descriptor(_));
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
        match shared.hub.check_in(id, via.now(), tx.clone()) {
            Ok(first) => break first,
            Err(CheckInError::Starting(_))
                if started.elapsed() < shared.config.limits.pipe_checkin_timeout() =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(err) => {
                if let Via::Path(connector) = &via {
                    if connector.pid.is_some() && connector.live_pid().is_none() {
                        tracing::warn!(
                            pipe_id = id,
                            "ipc check-in refused: the process that connected has exited, \
                             so its pid proves nothing"
                        );
                        return;
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A small program that connects to `path`; with `hand_over`, it forks, the child keeps
    /// the socket and the connector itself exits, as the attacker's did.
    fn connect_from_python(path: &std::path::Path, hand_over: bool) -> std::process::Child {
        let script = "import os, socket, sys, time\n\
                      s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
                      s.connect(sys.argv[1])\n\
                      if sys.argv[2] == '1' and os.fork() != 0:\n    os._exit(0)\n\
                      time.sleep(5)\n";
        std::process::Command::new("python3")
            .args(["-c", script])
            .arg(path)
            .arg(if hand_over { "1" } else { "0" })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs")
    }

    /// The pid-reuse attack: the connector passed its socket on and exited. Its pid (which
    /// the kernel reports for the socket and which a freshly spawned pipe could be given next)
    /// must no longer count, though the socket is still open in another process.
    #[tokio::test]
    async fn a_connector_that_has_exited_is_not_a_live_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ipc.sock");
        let listener = UnixListener::bind(&path).expect("bind");

        let mut handed = connect_from_python(&path, true);
        let (stream, _) = listener.accept().await.expect("accept");
        let connector = Connector::of(&stream);
        assert_eq!(
            connector.pid,
            Some(handed.id()),
            "the kernel names the connector"
        );
        assert!(
            handed.wait().expect("wait").success(),
            "the connector exits"
        );
        // The socket is still held (by the connector's child), yet the connector is gone.
        assert_eq!(connector.live_pid(), None);

        let mut stays = connect_from_python(&path, false);
        let (stream, _) = listener.accept().await.expect("accept");
        let connector = Connector::of(&stream);
        assert_eq!(connector.live_pid(), Some(stays.id()));
        stays.kill().expect("kill");
        stays.wait().expect("wait");
        testkit::until(
            "the killed connector no longer counts",
            std::time::Duration::from_secs(5),
            || connector.live_pid().is_none(),
        )
        .await;
        drop(stream);
    }
}
