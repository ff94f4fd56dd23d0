//! `secure-talk-pipe`: the worker ("pipe") process the secure-talk daemon spawns, one per pipe.
//!
//! It checks in over its own IPC descriptor (inherited from the daemon, `SECURE_TALK_IPC_FD`)
//! or, without one, the daemon's IPC socket, takes config/launch/property/destroy frames, runs
//! the launched command (split with shell-word rules, never through a shell) and streams the
//! command's stdout and stderr back as frames. Framing is `common::envelope::ipc`; this module
//! only knows what each type means for a pipe. The binary takes the inherited descriptor
//! ([`take_inherited_socket`]) first, sets up tracing and runs [`run`] in a `pipe` span.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use clap::Parser;
use common::daemon::{LogArgs, exit};
use common::envelope::ipc::{DEFAULT_MAX_FRAME, Frame, IpcError, Kind, Protocol, kind};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, warn};

/// Largest chunk of command output sent in one frame.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// Output frames queued for the socket; when full, the command's output is no longer read.
const OUTPUT_QUEUE: usize = 16;
/// Stdin bytes kept for a command not launched yet; more is dropped with an error frame.
const MAX_PENDING_STDIN: usize = 1024 * 1024;
/// Stdin bytes queued for a running command before the socket is no longer read.
const STDIN_HIGH_WATER: usize = 1024 * 1024;
/// After the command ended, how long its stdout/stderr may stay silent before we stop reading
/// (a background process it left behind may hold them open forever).
const OUTPUT_IDLE_AFTER_EXIT: Duration = Duration::from_millis(300);
/// After the command ended, the longest we spend relaying its remaining output.
const OUTPUT_DRAIN_MAX: Duration = Duration::from_secs(10);
/// The longest we wait for queued frames to reach the daemon before exiting.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Bad command line (a bad log filter; clap's own errors exit with the same code).
pub const EXIT_USAGE: u8 = common::exit::USAGE;
/// The daemon broke the IPC protocol.
const EXIT_PROTOCOL: u8 = 76;
/// The launched program exists but could not be started (as in shells).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The launched program was not found (as in shells).
const EXIT_NOT_FOUND: u8 = 127;

/// Worker ("pipe") process of the secure-talk daemon: runs one command and relays it over IPC.
///
/// The daemon starts one per pipe as `secure-talk-pipe -i <ID> -u <SOCKET>`, with the pipe's
/// own socket inherited as descriptor 3 and SECURE_TALK_IPC_FD=3 in the environment. It checks
/// in with its id on that descriptor (holding it is what proves to the daemon that this is the
/// pipe), or, when no descriptor is given, on the daemon's Unix socket (accepted only from the
/// process the daemon spawned), then obeys the daemon's frames. The descriptor is closed before
/// the command starts, and SECURE_TALK_IPC_FD is not passed on to it.
///
/// Framing: raw by default (u32 big-endian total length including the 8-byte header, u32
/// big-endian type, payload); with --json one {"type": n, "payload": "..."} object per line,
/// non-UTF-8 payloads base64-encoded with "encoding": "base64".
///
/// Frames from the daemon:
///   2 config    JSON, kept. Optional members used by a later launch:
///               "env": {"NAME": "value", ...} adds environment variables,
///               "cwd": "DIR" sets the working directory.
///   3 launch    The command line. Split with shell-word rules and run directly, NEVER through
///               a shell (write `sh -c '...'` to get one). Only the first launch counts; a
///               second one gets an error frame "already launched".
///   0 text      Bytes for the command's stdin (kept, up to 1 MiB, until the launch).
///   4 property  JSON. A string member "stdin" is written to the running command's stdin;
///               nothing else is acted on or acknowledged.
///   5 destroy   SIGTERM to the command, SIGKILL after --kill-grace-ms, send what output is
///               left, exit 0.
///
/// Frames to the daemon:
///   1 pipe_id   Check-in, the first frame: the id in ASCII decimal.
///   0 text      The command's stdout when it is UTF-8 (a character is never split across
///               frames; at most 64 KiB per frame).
///   6 binary    A stdout chunk that is not UTF-8, bytes as they came.
///   7 error     The command's stderr (invalid UTF-8 replaced), the pipe's own errors, and
///               "command exited with status N" / "command killed by signal S" when the
///               command fails by itself.
///
/// When the command ends by itself its remaining output is sent, then the pipe closes the
/// connection and exits with the command's status. When the daemon closes the connection, the
/// command is stopped as for destroy. The command inherits the pipe's process group, so the
/// daemon can signal both at once. Logs go to stderr.
///
/// Exit codes: the command's exit status (128+S for signal S) once it ended by itself;
/// 0 after destroy or when the daemon closed the connection; 64 bad flags or log filter; 65 empty or
/// unparsable launch line; 69 cannot connect to the socket; 76 protocol error from the
/// daemon; 126 the command could not be started, 127 it was not found.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
pub struct Args {
    /// Pipe id, sent in the check-in frame.
    #[arg(long, short = 'i')]
    pub id: u64,
    /// The daemon's IPC Unix socket, used when no --ipc-fd is given.
    #[arg(
        long = "socket",
        short = 'u',
        value_name = "PATH",
        required_unless_present = "ipc_fd"
    )]
    socket: Option<PathBuf>,
    /// The pipe's own IPC socket, an inherited descriptor (the daemon passes 3).
    #[arg(long, env = "SECURE_TALK_IPC_FD", value_name = "FD")]
    pub ipc_fd: Option<RawFd>,
    /// Speak the JSON-lines form of the IPC protocol instead of raw frames.
    #[arg(long)]
    json: bool,
    /// Milliseconds between SIGTERM and SIGKILL when stopping the command.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    kill_grace_ms: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The inherited descriptor's number and what taking it gave.
pub type Inherited = Option<(RawFd, io::Result<std::os::unix::net::UnixStream>)>;

/// Connects, checks in, serves the daemon's frames; returns the process exit code.
pub async fn run(args: Args, inherited: Inherited) -> u8 {
    let protocol = if args.json {
        Protocol::Json
    } else {
        Protocol::Raw
    };
    let Some(stream) = ipc_stream(&args, inherited).await else {
        return exit::UNAVAILABLE;
    };
    debug!(?protocol, "connected");
    let (rd, wr) = stream.into_split();
    let (out, out_rx) = mpsc::channel(OUTPUT_QUEUE);
    let writer = tokio::spawn(write_frames(wr, protocol, out_rx).in_current_span());

    let mut pipe = Pipe {
        out,
        kill_grace: Duration::from_millis(args.kill_grace_ms),
        config: None,
        queue: VecDeque::new(),
        queued: 0,
        stdin: None,
        command: None,
        launched: false,
    };
    pipe.emit(Frame::new(kind::PIPE_ID, args.id.to_string()))
        .await;
    let code = pipe.serve(FrameReader::new(rd, protocol)).await;
    drop(pipe);

    // Every sender is gone now (the output relays ended with the command), so the writer
    // finishes once the queue has reached the socket.
    match tokio::time::timeout(FLUSH_TIMEOUT, writer).await {
        Ok(_) => {}
        Err(_) => warn!("the daemon did not take the last frames in time; closing anyway"),
    }
    code
}

/// The connection to the daemon: the inherited descriptor when one is given, else the path
/// socket (also when the descriptor cannot be used and a socket was named).
async fn ipc_stream(args: &Args, inherited: Inherited) -> Option<UnixStream> {
    if let Some((fd, taken)) = inherited {
        match taken.and_then(UnixStream::from_std) {
            Ok(stream) => return Some(stream),
            Err(err) if args.socket.is_some() => {
                warn!(fd, %err, "cannot use the inherited ipc descriptor; connecting by path");
            }
            Err(err) => {
                tracing::error!(fd, %err, "cannot use the inherited ipc descriptor");
                return None;
            }
        }
    }
    let socket = args.socket.as_ref()?;
    match UnixStream::connect(socket).await {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::error!(socket = %socket.display(), %err, "cannot connect to the daemon");
            None
        }
    }
}

/// Takes the Unix stream socket inherited as descriptor `fd`, without `unsafe`; call it
/// before the process opens any descriptor.
///
/// std offers no safe way to own a descriptor known only by its number, so it is passed to
/// ourselves: sent with `SCM_RIGHTS` over a fresh socketpair (the kernel checks the number
/// and duplicates it) and received as an owned, close-on-exec descriptor. The inherited
/// number is then closed, so the command launched later does not inherit the daemon's
/// socket. Sound because the number is checked to be an open Unix socket before this
/// process has opened anything (so it was inherited: std's start-up only fills 0 to 2), and
/// nothing else in the process knows it.
pub fn take_inherited_socket(fd: RawFd) -> io::Result<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr};
    use rustix::net::{
        AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags,
        SocketType,
    };
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the ipc descriptor must not be standard input, output or error",
        ));
    }
    // Open and a Unix socket, before anything below takes a number (a closed `fd` would
    // otherwise be reused by the socketpair, and closed under it).
    nix::sys::socket::getsockname::<UnixAddr>(fd).map_err(io::Error::from)?;
    let (tx, rx) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    nix::sys::socket::sendmsg::<UnixAddr>(
        tx.as_raw_fd(),
        &[io::IoSlice::new(b"fd")],
        &[ControlMessage::ScmRights(&[fd])],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 2];
    rustix::net::recvmsg(
        &rx,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let owned: Option<OwnedFd> = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    let owned = owned.ok_or_else(|| io::Error::other("no descriptor came back"))?;
    nix::unistd::close(fd).map_err(io::Error::from)?;
    if rustix::net::sockopt::socket_type(&owned)? != SocketType::STREAM
        || rustix::net::getsockname(&owned)?.address_family() != AddressFamily::UNIX
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the ipc descriptor is not a Unix stream socket",
        ));
    }
    let stream = std::os::unix::net::UnixStream::from(owned);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// The pipe's state between frames.
struct Pipe {
    out: mpsc::Sender<Frame>,
    kill_grace: Duration,
    /// The last config frame, as JSON when it parsed.
    config: Option<Value>,
    /// Bytes for the command's stdin not written yet.
    queue: VecDeque<Bytes>,
    queued: usize,
    stdin: Option<ChildStdin>,
    command: Option<Running>,
    launched: bool,
}

/// A launched command that has not been reaped by us yet.
struct Running {
    /// Asks the supervisor to stop the command (dropping it does too).
    stop: oneshot::Sender<()>,
    /// Ends once the command has ended and its output has been relayed.
    supervisor: JoinHandle<io::Result<ExitStatus>>,
}

/// What woke the main loop.
enum Event {
    Frame(Result<Option<Frame>, ReadError>),
    StdinWritten(io::Result<usize>),
    Exited(io::Result<ExitStatus>),
}

/// What to do after a frame.
enum Flow {
    Continue,
    Exit(u8),
}

impl Pipe {
    async fn serve(&mut self, mut reader: FrameReader) -> u8 {
        loop {
            // A command that does not read its stdin stalls the socket (backpressure), but
            // its exit is still noticed.
            let reading = !(self.stdin.is_some() && self.queued >= STDIN_HIGH_WATER);
            let event = tokio::select! {
                biased;
                status = wait_supervisor(&mut self.command) => Event::Exited(status),
                written = write_front(&mut self.stdin, &self.queue),
                    if self.stdin.is_some() && !self.queue.is_empty() => Event::StdinWritten(written),
                frame = reader.next(), if reading => Event::Frame(frame),
            };
            match event {
                Event::Exited(status) => {
                    self.command = None;
                    return self.command_ended(status).await;
                }
                Event::StdinWritten(written) => self.stdin_written(written),
                Event::Frame(Ok(Some(frame))) => {
                    if let Flow::Exit(code) = self.on_frame(frame).await {
                        return code;
                    }
                }
                Event::Frame(Ok(None)) => {
                    info!("the daemon closed the connection; stopping");
                    self.stop_command().await;
                    return 0;
                }
                Event::Frame(Err(ReadError::Io(err))) => {
                    warn!(%err, "reading from the daemon failed; stopping");
                    self.stop_command().await;
                    return 0;
                }
                Event::Frame(Err(ReadError::Truncated(left))) => {
                    warn!(
                        bytes = left,
                        "the daemon closed the connection in the middle of a frame; stopping"
                    );
                    self.stop_command().await;
                    return EXIT_PROTOCOL;
                }
                Event::Frame(Err(ReadError::Protocol(err))) => {
                    warn!(%err, "protocol error from the daemon; stopping");
                    self.error(format!("protocol error: {err}")).await;
                    self.stop_command().await;
                    return EXIT_PROTOCOL;
                }
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Flow {
        match frame.kind {
            Kind::Config => self.on_config(&frame.payload),
            Kind::Launch => return self.on_launch(&frame.payload).await,
            Kind::Property => self.on_property(&frame.payload),
            Kind::Text => self.on_text(frame.payload).await,
            Kind::Destroy => {
                info!("destroy requested");
                self.stop_command().await;
                return Flow::Exit(0);
            }
            other => warn!(
                kind = other.number(),
                "ignoring a frame type a pipe does not take"
            ),
        }
        Flow::Continue
    }

    fn on_config(&mut self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        debug!(config = ?text, "config");
        match serde_json::from_slice::<Value>(payload) {
            Ok(config) => {
                if self.launched {
                    debug!("config after launch: env and cwd no longer apply");
                }
                self.config = Some(config);
            }
            Err(err) => {
                warn!(err = %common::log::Escaped(&err), "config is not JSON; keeping it unused");
                self.config = Some(Value::String(text.into_owned()));
            }
        }
    }

    fn on_property(&mut self, payload: &[u8]) {
        debug!(property = ?String::from_utf8_lossy(payload), "property");
        let Ok(Value::Object(property)) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if let Some(Value::String(text)) = property.get("stdin") {
            if self.stdin.is_some() {
                self.enqueue_stdin(Bytes::copy_from_slice(text.as_bytes()));
            } else {
                debug!("property \"stdin\" ignored: no command is running");
            }
        }
    }

    async fn on_text(&mut self, payload: Bytes) {
        if self.launched {
            if self.stdin.is_some() {
                self.enqueue_stdin(payload);
            } else {
                warn!(
                    bytes = payload.len(),
                    "the command's stdin is closed; dropping text"
                );
            }
        } else if self.queued + payload.len() > MAX_PENDING_STDIN {
            warn!(
                bytes = payload.len(),
                "stdin buffer full before launch; dropping text"
            );
            self.error(format!(
                "not launched yet and {MAX_PENDING_STDIN} bytes of stdin already buffered: dropped {} bytes",
                payload.len()
            ))
            .await;
        } else {
            self.enqueue_stdin(payload);
        }
    }

    fn enqueue_stdin(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued += bytes.len();
            self.queue.push_back(bytes);
        }
    }

    fn stdin_written(&mut self, written: io::Result<usize>) {
        match written {
            Ok(n) if n > 0 => {
                self.queued -= n;
                if let Some(front) = self.queue.front_mut() {
                    front.advance(n);
                    if front.is_empty() {
                        self.queue.pop_front();
                    }
                }
            }
            // A write of 0 bytes or EPIPE: the command no longer reads its stdin.
            Ok(_) | Err(_) => {
                let err = written.err().map(|err| err.to_string());
                debug!(err, "the command's stdin is closed");
                if self.queued > 0 {
                    warn!(
                        bytes = self.queued,
                        "the command closed its stdin; dropping text"
                    );
                }
                self.stdin = None;
                self.queue.clear();
                self.queued = 0;
            }
        }
    }

    async fn on_launch(&mut self, payload: &[u8]) -> Flow {
        if self.launched {
            warn!("second launch refused");
            self.error("already launched").await;
            return Flow::Continue;
        }
        let argv = match std::str::from_utf8(payload)
            .map_err(|_| "the launch line is not UTF-8".to_owned())
            .and_then(|line| {
                shell_words::split(line)
                    .map_err(|err| format!("cannot parse the launch line: {err}"))
            }) {
            Ok(argv) if argv.is_empty() => Err("empty launch line".to_owned()),
            other => other,
        };
        let argv = match argv {
            Ok(argv) => argv,
            Err(message) => {
                warn!(line = ?String::from_utf8_lossy(payload), "{message}");
                self.error(message).await;
                return Flow::Exit(exit::DATAERR);
            }
        };
        self.launched = true;
        let (program, rest) = argv.split_at(1);
        let program = &program[0];
        let mut command = tokio::process::Command::new(program);
        command
            .args(rest)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("SECURE_TALK_IPC_FD")
            .kill_on_drop(true);
        self.apply_config(&mut command);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                warn!(program, %err, "cannot run the command");
                self.error(format!("cannot run {program}: {err}")).await;
                let code = if err.kind() == io::ErrorKind::NotFound {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_CANNOT_EXECUTE
                };
                return Flow::Exit(code);
            }
        };
        info!(program, args = ?rest, pid = child.id(), "launched");
        let exited = CancellationToken::new();
        let mut relays = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            let relay = relay(stdout, Stream::Stdout, self.out.clone(), exited.clone());
            relays.push(tokio::spawn(relay.in_current_span()));
        }
        if let Some(stderr) = child.stderr.take() {
            let relay = relay(stderr, Stream::Stderr, self.out.clone(), exited.clone());
            relays.push(tokio::spawn(relay.in_current_span()));
        }
        self.stdin = child.stdin.take();
        let (stop, stop_rx) = oneshot::channel();
        let supervisor = supervise(child, stop_rx, self.kill_grace, exited, relays);
        self.command = Some(Running {
            stop,
            supervisor: tokio::spawn(supervisor.in_current_span()),
        });
        Flow::Continue
    }

    /// Applies the config's optional `env` and `cwd` members.
    fn apply_config(&self, command: &mut tokio::process::Command) {
        let Some(Value::Object(config)) = &self.config else {
            return;
        };
        if let Some(env) = config.get("env") {
            match env {
                Value::Object(vars) => {
                    for (name, value) in vars {
                        match value {
                            Value::String(value) => {
                                command.env(name, value);
                            }
                            _ => warn!(name, "config env value is not a string; ignored"),
                        }
                    }
                }
                _ => warn!("config \"env\" is not an object; ignored"),
            }
        }
        match config.get("cwd") {
            Some(Value::String(dir)) => {
                command.current_dir(dir);
            }
            Some(_) => warn!("config \"cwd\" is not a string; ignored"),
            None => {}
        }
    }

    /// The command ended by itself: report a failure, exit with its status.
    async fn command_ended(&mut self, status: io::Result<ExitStatus>) -> u8 {
        self.stdin = None;
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                warn!(%err, "waiting for the command failed");
                self.error(format!("waiting for the command failed: {err}"))
                    .await;
                return exit::SOFTWARE;
            }
        };
        info!(%status, "the command ended");
        if let Some(signal) = status.signal() {
            self.error(format!("command killed by signal {signal}"))
                .await;
            return u8::try_from(signal).map_or(u8::MAX, |s| 128u8.saturating_add(s));
        }
        let code = status.code().unwrap_or(1);
        if code != 0 {
            self.error(format!("command exited with status {code}"))
                .await;
        }
        u8::try_from(code).unwrap_or(1)
    }

    /// Stops the command (SIGTERM, SIGKILL after the grace period), if one runs, and waits
    /// until its output has been relayed.
    async fn stop_command(&mut self) {
        self.stdin = None;
        let Some(Running { stop, supervisor }) = self.command.take() else {
            return;
        };
        let _ = stop.send(());
        match supervisor.await {
            Ok(Ok(status)) => info!(%status, "the command stopped"),
            Ok(Err(err)) => warn!(%err, "waiting for the command failed"),
            Err(err) => warn!(%err, "the command's supervisor failed"),
        }
    }

    /// Sends a type-7 frame.
    async fn error(&self, message: impl Into<String>) {
        self.emit(Frame::new(kind::ERROR, message.into())).await;
    }

    async fn emit(&self, frame: Frame) {
        if self.out.send(frame).await.is_err() {
            debug!("the connection to the daemon is gone; frame dropped");
        }
    }
}

async fn wait_supervisor(command: &mut Option<Running>) -> io::Result<ExitStatus> {
    match command {
        Some(running) => match (&mut running.supervisor).await {
            Ok(status) => status,
            Err(err) => Err(io::Error::other(err)),
        },
        None => std::future::pending().await,
    }
}

/// Writes some of the first queued chunk to the command's stdin (cancel-safe).
async fn write_front(stdin: &mut Option<ChildStdin>, queue: &VecDeque<Bytes>) -> io::Result<usize> {
    match (stdin, queue.front()) {
        (Some(stdin), Some(front)) => stdin.write(front).await,
        _ => std::future::pending().await,
    }
}

/// Owns the command: waits for it, stops it on request, then lets the relays finish.
async fn supervise(
    mut child: Child,
    stop: oneshot::Receiver<()>,
    grace: Duration,
    exited: CancellationToken,
    relays: Vec<JoinHandle<()>>,
) -> io::Result<ExitStatus> {
    let status = tokio::select! {
        biased;
        status = child.wait() => status,
        // A dropped sender means the pipe is going away: stop the command too.
        _ = stop => terminate(&mut child, grace).await,
    };
    exited.cancel();
    finish_relays(relays).await;
    status
}

/// Waits for the output relays, aborting them after [`OUTPUT_DRAIN_MAX`].
async fn finish_relays(mut relays: Vec<JoinHandle<()>>) {
    let wait_all = async {
        for relay in &mut relays {
            let _ = relay.await;
        }
    };
    if tokio::time::timeout(OUTPUT_DRAIN_MAX, wait_all)
        .await
        .is_err()
    {
        warn!("the daemon is not taking the command's output; dropping the rest");
        for relay in &relays {
            relay.abort();
        }
    }
}

/// SIGTERM, then SIGKILL when the command is still there after `grace`.
async fn terminate(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    use rustix::process::{Pid, Signal, kill_process};
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    if let Some(pid) = pid {
        if let Err(err) = kill_process(pid, Signal::TERM) {
            debug!(%err, "SIGTERM failed");
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            warn!(
                grace_ms = grace.as_millis(),
                "the command ignored SIGTERM; sending SIGKILL"
            );
            child.start_kill()?;
            child.wait().await
        }
    }
}

/// Which of the command's output streams a relay carries.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn frame(self, chunk: Chunk) -> Frame {
        match (self, chunk) {
            (Self::Stdout, Chunk::Text(bytes)) => Frame::new(kind::TEXT, bytes),
            (Self::Stdout, Chunk::Binary(bytes)) => Frame::new(kind::BINARY, bytes),
            (Self::Stderr, Chunk::Text(bytes)) => Frame::new(kind::ERROR, bytes),
            (Self::Stderr, Chunk::Binary(bytes)) => {
                Frame::new(kind::ERROR, String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

/// Reads one of the command's output streams and sends it as frames, in order.
///
/// Waits for room in the output queue before reading on (backpressure). Once `exited` is
/// cancelled, a stream silent for [`OUTPUT_IDLE_AFTER_EXIT`] is given up.
async fn relay<R>(
    mut source: R,
    stream: Stream,
    out: mpsc::Sender<Frame>,
    exited: CancellationToken,
) where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut splitter = Utf8Splitter::default();
    loop {
        let room = OUTPUT_CHUNK - splitter.held();
        let read = if exited.is_cancelled() {
            match tokio::time::timeout(OUTPUT_IDLE_AFTER_EXIT, source.read(&mut buf[..room])).await
            {
                Ok(read) => read,
                Err(_) => {
                    debug!(
                        ?stream,
                        "output still open after the command ended; no longer reading it"
                    );
                    break;
                }
            }
        } else {
            tokio::select! {
                read = source.read(&mut buf[..room]) => read,
                () = exited.cancelled() => continue,
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => {
                warn!(?stream, %err, "reading the command's output failed");
                break;
            }
        };
        if let Some(chunk) = splitter.push(&buf[..n]) {
            if out.send(stream.frame(chunk)).await.is_err() {
                return;
            }
        }
    }
    if let Some(chunk) = splitter.finish() {
        let _ = out.send(stream.frame(chunk)).await;
    }
}

/// A piece of output ready to be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Valid UTF-8 ending on a character boundary.
    Text(Bytes),
    /// Bytes that are not valid UTF-8.
    Binary(Bytes),
}

/// Cuts a byte stream into chunks without splitting a UTF-8 character across two of them.
///
/// An incomplete character at the end of a read (at most 3 bytes) is held back and put in
/// front of the next read.
#[derive(Debug, Default)]
struct Utf8Splitter {
    held: Vec<u8>,
}

impl Utf8Splitter {
    /// Bytes held back from the previous read.
    fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes one read; returns what can be sent now.
    fn push(&mut self, input: &[u8]) -> Option<Chunk> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(input);
        match std::str::from_utf8(&data) {
            Ok(_) => Some(Chunk::Text(data.into())),
            // Only an incomplete character at the very end: keep it for the next read.
            Err(err) if err.error_len().is_none() => {
                self.held = data.split_off(err.valid_up_to());
                (!data.is_empty()).then(|| Chunk::Text(data.into()))
            }
            Err(_) => Some(Chunk::Binary(data.into())),
        }
    }

    /// End of the stream: whatever is held back is an incomplete character.
    fn finish(&mut self) -> Option<Chunk> {
        let held = std::mem::take(&mut self.held);
        (!held.is_empty()).then(|| Chunk::Binary(held.into()))
    }
}

/// Why reading the daemon's frames stopped.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Protocol(IpcError),
    /// The connection ended with this many bytes of an unfinished frame.
    Truncated(usize),
}

/// Reads frames from the daemon.
struct FrameReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    protocol: Protocol,
}

impl FrameReader {
    fn new(rd: OwnedReadHalf, protocol: Protocol) -> Self {
        Self {
            rd,
            buf: BytesMut::with_capacity(8 * 1024),
            protocol,
        }
    }

    /// The next frame, or `None` at a clean end of the connection. Cancel-safe: bytes read
    /// stay in the buffer.
    async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            match self.protocol.decode(&self.buf, DEFAULT_MAX_FRAME) {
                Ok(Some((frame, used))) => {
                    self.buf.advance(used);
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(err) => return Err(ReadError::Protocol(err)),
            }
            self.buf.reserve(8 * 1024);
            let n = self
                .rd
                .read_buf(&mut self.buf)
                .await
                .map_err(ReadError::Io)?;
            if n == 0 {
                let rest_is_blank =
                    self.protocol == Protocol::Json && self.buf.iter().all(u8::is_ascii_whitespace);
                if self.buf.is_empty() || rest_is_blank {
                    return Ok(None);
                }
                return Err(ReadError::Truncated(self.buf.len()));
            }
        }
    }
}

/// Sends queued frames to the daemon until every sender is gone, then closes the write side.
async fn write_frames(
    mut wr: OwnedWriteHalf,
    protocol: Protocol,
    mut frames: mpsc::Receiver<Frame>,
) {
    while let Some(frame) = frames.recv().await {
        let bytes = match protocol.encode(&frame) {
            Ok(bytes) => bytes,
            Err(err) => {
                warn!(%err, "cannot encode a frame; dropped");
                continue;
            }
        };
        if let Err(err) = wr.write_all(&bytes).await {
            warn!(%err, "writing to the daemon failed");
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &[u8]) -> Option<Chunk> {
        Some(Chunk::Text(Bytes::copy_from_slice(s)))
    }

    #[test]
    fn splitter_never_cuts_a_character() {
        let e = "é".as_bytes(); // c3 a9
        let euro = "€".as_bytes(); // e2 82 ac
        let mut s = Utf8Splitter::default();
        assert_eq!(s.push(b"ab"), text(b"ab"));
        assert_eq!(s.push(&[b'x', e[0]]), text(b"x"));
        assert_eq!(s.held(), 1);
        assert_eq!(s.push(&[e[1]]), text(e));
        assert_eq!(s.push(&euro[..1]), None);
        assert_eq!(s.push(&euro[1..2]), None);
        assert_eq!(s.push(&euro[2..]), text(euro));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn splitter_sends_invalid_bytes_as_binary() {
        let mut s = Utf8Splitter::default();
        assert_eq!(
            s.push(b"a\xffb"),
            Some(Chunk::Binary(Bytes::from_static(b"a\xffb")))
        );
        assert_eq!(s.push(b"ok"), text(b"ok"));
        // A character cut off by the end of the stream.
        assert_eq!(s.push(b"\xc3"), None);
        assert_eq!(s.finish(), Some(Chunk::Binary(Bytes::from_static(b"\xc3"))));
    }
}
