//! Pipe processes: spawning one per pipe (no shell), supervising it, and stopping it.
//!
//! Each pipe leads its own process group, so signals reach whatever it started. Stopping
//! escalates: a destroy request first asks the pipe over IPC (its dialect's request: kmb type
//! 5, dlafs the destroy JSON as type 0), then after the kill grace sends SIGTERM to the group,
//! then SIGKILL; a pipe that has not checked in, or a server
//! shutdown, starts at SIGTERM. The supervisor holds the child until it is reaped, so a pid is
//! never signalled after it could have been reused. When the process exits the owner gets
//! `pipe_delete`.
//!
//! Each pipe also gets a socket of its own: one end of a `socketpair` is inherited as
//! descriptor [`IPC_FD`] (announced by `SECURE_TALK_IPC_FD` and the `{ipc_fd}` placeholder),
//! the other stays with the daemon. Only the spawned process, and what it starts, holds that
//! descriptor, so a check-in on it is the pipe's (see `ipc`). A check-in wakes the supervisor,
//! which disarms the check-in timer.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use command_fds::{CommandFdExt as _, FdMapping};
use common::envelope::talk::Message;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::hub::{NewPipe, Out, PipeId};
use crate::metrics::ExitReason;
use crate::state::Shared;

/// The descriptor number a pipe inherits its own IPC socket as.
pub const IPC_FD: i32 = 3;

/// Environment variables of the service manager that must not leak into pipes.
const SCRUBBED_ENV: [&str; 7] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "CREDENTIALS_DIRECTORY",
];

/// Longest wait, after a pipe exits, for its IPC connection to relay its last output.
const RELAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest line of a pipe's own stdout/stderr copied into the log.
const MAX_LOG_LINE: usize = 1024;

/// The IPC socket path as the pipe program's arguments and environment name it.
pub(crate) fn ipc_socket_arg(shared: &Shared) -> String {
    shared.config.ipc_socket.to_string_lossy().into_owned()
}

/// Starts the process of a new pipe with `args` (the bound `pipe_args`, see `argv`), its
/// supervisor and the listener on its own IPC socket; returns the process id.
///
/// # Errors
/// The socket pair cannot be made or the program cannot be started.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    pipe: &NewPipe,
    args: Vec<String>,
) -> std::io::Result<u32> {
    let id = pipe.id;
    let config = &shared.config;
    let socket = ipc_socket_arg(shared);
    // Blocking on the pipe's side (a status flag of the socket, not of the descriptor, so the
    // daemon's end is made non-blocking on its own); close-on-exec on both, so no other child
    // inherits either end.
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let ours = std::os::unix::net::UnixStream::from(ours);
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    let mut command = Command::new(&config.pipe_program);
    command
        .args(args)
        .env("SECURE_TALK_PIPE_ID", id.to_string())
        .env("SECURE_TALK_IPC_SOCKET", &socket)
        .env("SECURE_TALK_IPC_FD", IPC_FD.to_string())
        .fd_mappings(vec![FdMapping {
            parent_fd: theirs,
            child_fd: IPC_FD,
        }])
        .map_err(std::io::Error::other)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in SCRUBBED_ENV {
        command.env_remove(name);
    }
    let spawned = command.spawn();
    // The command holds the pipe's end until it is dropped: the daemon keeps none.
    drop(command);
    let mut child = spawned?;
    let pid = child.id().unwrap_or_default();
    let span = tracing::info_span!("pipe", pipe_id = id, pid);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_output(out, "stdout").instrument(span.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_output(err, "stderr").instrument(span.clone()));
    }
    // Not tracked by the drain, as connections on the path socket: the supervisor is.
    tokio::spawn(
        crate::ipc::on_descriptor(shared.clone(), id, ours, pipe.checked_in.clone())
            .instrument(tracing::info_span!("ipc", pipe_id = id, via = "descriptor")),
    );
    let shutdown = shared.shutdown.clone();
    let supervised = supervise(
        shared.clone(),
        id,
        child,
        pid,
        pipe.stop.clone(),
        pipe.checked_in.clone(),
    );
    shutdown.spawn(supervised.instrument(span));
    Ok(pid)
}

/// Where a stop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Asked over IPC; SIGTERM at the deadline.
    Asked,
    /// SIGTERM sent; SIGKILL at the deadline.
    Terminated,
    /// SIGKILL sent.
    Killed,
}

async fn supervise(
    shared: Arc<Shared>,
    id: PipeId,
    mut child: Child,
    pid: u32,
    stop: CancellationToken,
    checked_in: CancellationToken,
) {
    let limits = &shared.config.limits;
    let grace = limits.kill_grace();
    let checkin_by = Instant::now() + limits.pipe_checkin_timeout();
    let mut phase = Phase::Running;
    let mut deadline = checkin_by;
    // Why it is ending, for `secure_talk_pipe_exits_total`: the first cause wins.
    let mut reason = ExitReason::exited;
    let status: std::io::Result<ExitStatus> = loop {
        // Recomputed each turn; the check-in wakes this loop (below), so the timer is
        // disarmed as soon as the pipe has checked in, not only when something else happens.
        let waiting_checkin = phase == Phase::Running && !checked_in.is_cancelled();
        tokio::select! {
            status = child.wait() => break status,
            () = checked_in.cancelled(), if waiting_checkin => {}
            () = stop.cancelled(), if phase == Phase::Running => {
                reason = if shared.shutdown.is_triggered() {
                    ExitReason::shutdown
                } else {
                    ExitReason::stopped
                };
                if shared.hub.checked_in(id) {
                    phase = Phase::Asked;
                    deadline = Instant::now() + grace;
                } else {
                    signal_group(pid, Signal::TERM);
                    phase = Phase::Terminated;
                    deadline = Instant::now() + grace;
                }
            }
            () = shared.shutdown.triggered(), if matches!(phase, Phase::Running | Phase::Asked) => {
                if phase == Phase::Running {
                    reason = ExitReason::shutdown;
                }
                signal_group(pid, Signal::TERM);
                phase = Phase::Terminated;
                deadline = Instant::now() + grace;
            }
            () = sleep_until(deadline), if phase != Phase::Killed && (phase != Phase::Running || waiting_checkin) => {
                match phase {
                    Phase::Running => {
                        tracing::warn!(timeout_secs = limits.pipe_checkin_timeout_secs, "pipe did not check in; stopping it");
                        reason = ExitReason::checkin_timeout;
                        signal_group(pid, Signal::TERM);
                        phase = Phase::Terminated;
                        deadline = Instant::now() + grace;
                    }
                    Phase::Asked => {
                        tracing::info!("pipe still running after destroy; sending SIGTERM");
                        signal_group(pid, Signal::TERM);
                        phase = Phase::Terminated;
                        deadline = Instant::now() + grace;
                    }
                    Phase::Terminated => {
                        tracing::warn!("pipe still running after SIGTERM; sending SIGKILL");
                        signal_group(pid, Signal::KILL);
                        phase = Phase::Killed;
                    }
                    Phase::Killed => {}
                }
            }
        }
    };
    // Whatever the leader's fate, nothing of its group may outlive the pipe.
    signal_group(pid, Signal::KILL);
    // Let the IPC connection relay what the pipe wrote last before the owner hears of its end.
    if shared.hub.checked_in(id) {
        if let Some(relayed) = shared.hub.relayed(id) {
            let _ = tokio::time::timeout(RELAY_GRACE, relayed.cancelled()).await;
        }
    }
    shared
        .metrics
        .pipe_exited(reason, crate::metrics::ExitStatus::of(&status));
    match &status {
        Ok(status) => tracing::info!(%status, "pipe exited"),
        Err(err) => tracing::warn!(%err, "waiting for the pipe failed"),
    }
    if let Some((owner, admin)) = shared.hub.pipe_exited(id) {
        if let Some(admin) = admin {
            let _ = admin
                .tx
                .try_send(Out::Text(Message::pipe_delete(id).encode()));
        }
        tracing::debug!(owner, "pipe forgotten");
    }
}

/// Sends `signal` to the process group led by `pid`, ignoring "no such process".
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// Copies a pipe's own stdout or stderr into the log, a line at a time, bounded.
async fn log_output<R: AsyncRead + Unpin>(mut reader: R, stream: &'static str) {
    let mut buf = vec![0u8; 8192];
    let mut line = Vec::with_capacity(256);
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                tracing::info!(stream, line = ?String::from_utf8_lossy(&line), "pipe output");
                line.clear();
            } else if line.len() < MAX_LOG_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        tracing::info!(stream, line = ?String::from_utf8_lossy(&line), "pipe output");
    }
}
