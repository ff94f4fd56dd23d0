//! The real `secure-talk-pipe` binary against a Unix listener playing the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use bytes::{Buf as _, BytesMut};
use common::envelope::ipc::{DEFAULT_MAX_FRAME, Frame, Kind, Protocol, kind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;

const PIPE: &str = env!("CARGO_BIN_EXE_secure-talk-pipe");
/// Bound on every single step of a test.
const STEP: Duration = Duration::from_secs(5);
const ID: &str = "7";

/// A pipe process, in its own process group (as the daemon does), and its IPC connection.
struct Pipe {
    child: Child,
    pgid: Option<rustix::process::Pid>,
    conn: Conn,
    dir: tempfile::TempDir,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Like the daemon: whatever the pipe left behind in its group goes too.
        if let Some(pgid) = self.pgid {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Pipe {
    /// Starts the pipe with `extra` flags and accepts its connection.
    async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("ipc.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let child = spawn_pipe(&socket, extra);
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        let (stream, _) = tokio::time::timeout(STEP, listener.accept())
            .await
            .expect("the pipe connects in time")
            .expect("accept");
        let protocol = if extra.contains(&"--json") {
            Protocol::Json
        } else {
            Protocol::Raw
        };
        Self {
            child,
            pgid,
            conn: Conn::new(stream, protocol),
            dir,
        }
    }

    /// Starts the pipe and consumes its check-in.
    async fn checked_in(extra: &[&str]) -> Self {
        let mut pipe = Self::start(extra).await;
        let check_in = pipe.conn.recv().await.expect("check-in frame");
        assert_eq!(check_in, frame(kind::PIPE_ID, ID));
        pipe
    }

    async fn send(&mut self, kind: u32, payload: &str) {
        self.conn.send(&frame(kind, payload)).await;
    }

    async fn launch(&mut self, line: &str) {
        self.send(kind::LAUNCH, line).await;
    }

    /// Every frame until the pipe closes the connection.
    async fn frames_until_eof(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.conn.recv().await {
            frames.push(frame);
        }
        frames
    }

    async fn exit_status(&mut self) -> ExitStatus {
        tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("the pipe exits in time")
            .expect("wait")
    }

    async fn exit_code(&mut self) -> i32 {
        let status = self.exit_status().await;
        status
            .code()
            .unwrap_or_else(|| panic!("pipe died: {status}"))
    }
}

fn spawn_pipe(socket: &Path, extra: &[&str]) -> Child {
    tokio::process::Command::new(PIPE)
        .args(["-i", ID, "-u"])
        .arg(socket)
        .args(extra)
        .args(["--log", "debug"])
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn secure-talk-pipe")
}

/// The test's side of the IPC socket.
struct Conn {
    stream: UnixStream,
    buf: BytesMut,
    protocol: Protocol,
}

impl Conn {
    fn new(stream: UnixStream, protocol: Protocol) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            protocol,
        }
    }

    async fn send(&mut self, frame: &Frame) {
        let bytes = self.protocol.encode(frame).expect("encode");
        self.stream.write_all(&bytes).await.expect("send a frame");
    }

    /// The next frame, `None` when the pipe closed the connection.
    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = self
                .protocol
                .decode(&self.buf, DEFAULT_MAX_FRAME)
                .expect("the pipe sends valid frames")
            {
                self.buf.advance(used);
                return Some(frame);
            }
            self.buf.reserve(64 * 1024);
            let n = tokio::time::timeout(STEP, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a frame or EOF in time")
                .expect("read");
            if n == 0 {
                assert!(self.buf.is_empty(), "EOF in the middle of a frame");
                return None;
            }
        }
    }

    /// Receives until the concatenated TEXT payloads reach `want`; fails on anything else.
    async fn expect_text(&mut self, want: &str) {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = self.recv().await.expect("more text");
            assert_eq!(frame.kind, Kind::Text, "{frame:?}");
            got.extend_from_slice(&frame.payload);
        }
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
}

fn frame(kind: u32, payload: &str) -> Frame {
    Frame::new(kind, payload.to_owned())
}

/// Concatenated payloads of the frames of one kind.
fn joined(frames: &[Frame], kind: Kind) -> Vec<u8> {
    frames
        .iter()
        .filter(|f| f.kind == kind)
        .flat_map(|f| f.payload.to_vec())
        .collect()
}

fn sh(script: &str) -> String {
    format!("sh -c '{script}'")
}

#[tokio::test]
async fn check_in_is_a_pipe_id_frame_with_the_decimal_id() {
    let mut pipe = Pipe::start(&[]).await;
    let first = pipe.conn.recv().await.expect("check-in");
    assert_eq!(first.kind, Kind::PipeId);
    assert_eq!(&first.payload[..], b"7");
    drop(pipe.conn.stream.shutdown().await);
}

#[tokio::test]
async fn output_streams_then_failure_status_and_exit_code() {
    let mut pipe = Pipe::checked_in(&[]).await;
    pipe.launch(&sh("echo hello; echo oops >&2; exit 3")).await;
    let frames = pipe.frames_until_eof().await;
    assert_eq!(joined(&frames, Kind::Text), b"hello\n", "{frames:?}");
    let (last, rest) = frames.split_last().expect("frames");
    assert_eq!(*last, frame(kind::ERROR, "command exited with status 3"));
    assert_eq!(joined(rest, Kind::Error), b"oops\n", "{frames:?}");
    assert_eq!(pipe.exit_code().await, 3);
}

#[tokio::test]
async fn launch_line_never_goes_through_a_shell() {
    let mut pipe = Pipe::checked_in(&[]).await;
    let marker: PathBuf = pipe.dir.path().join("x");
    let line = format!("echo a; touch {}", marker.display());
    pipe.launch(&line).await;
    let frames = pipe.frames_until_eof().await;
    assert_eq!(
        frames,
        vec![frame(
            kind::TEXT,
            &format!("a; touch {}\n", marker.display())
        )]
    );
    assert_eq!(pipe.exit_code().await, 0);
    assert!(!marker.exists(), "a shell ran the launch line");
}

#[tokio::test]
async fn text_and_property_stdin_reach_the_command() {
    let mut pipe = Pipe::checked_in(&[]).await;
    // Sent before the launch: buffered, then written first.
    pipe.send(kind::TEXT, "early\n").await;
    pipe.send(kind::CONFIG, r#"{"env": {"X": "1"}}"#).await;
    pipe.launch("cat").await;
    pipe.send(kind::TEXT, "ping\n").await;
    pipe.conn.expect_text("early\nping\n").await;
    pipe.send(kind::PROPERTY, r#"{"stdin": "pong\n", "other": 1}"#)
        .await;
    pipe.conn.expect_text("pong\n").await;
    pipe.launch("echo twice").await;
    assert_eq!(
        pipe.conn.recv().await,
        Some(frame(kind::ERROR, "already launched"))
    );
    pipe.send(kind::DESTROY, "destroy").await;
    assert_eq!(pipe.frames_until_eof().await, vec![]);
    assert_eq!(pipe.exit_code().await, 0);
}

#[tokio::test]
async fn config_env_and_cwd_apply_to_the_launch() {
    let mut pipe = Pipe::checked_in(&[]).await;
    let dir = pipe.dir.path().to_owned();
    let config = serde_json::json!({"env": {"GREETING": "hi there"}, "cwd": dir});
    pipe.send(kind::CONFIG, &config.to_string()).await;
    pipe.launch(&sh("echo \"$GREETING\"; pwd")).await;
    let frames = pipe.frames_until_eof().await;
    let want = format!("hi there\n{}\n", dir.display());
    assert_eq!(String::from_utf8_lossy(&joined(&frames, Kind::Text)), want);
    assert_eq!(pipe.exit_code().await, 0);
}

#[tokio::test]
async fn destroy_stops_a_long_running_command_with_sigterm() {
    let mut pipe = Pipe::checked_in(&[]).await;
    pipe.launch("sleep 30").await;
    let start = Instant::now();
    pipe.send(kind::DESTROY, "destroy").await;
    assert_eq!(pipe.frames_until_eof().await, vec![]);
    assert_eq!(pipe.exit_code().await, 0);
    // Well inside the default 3 s grace: SIGTERM did it.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn command_ignoring_sigterm_is_killed_after_the_grace() {
    let mut pipe = Pipe::checked_in(&["--kill-grace-ms", "300"]).await;
    pipe.launch(&sh("trap \"\" TERM; echo ready; sleep 30"))
        .await;
    pipe.conn.expect_text("ready\n").await;
    let start = Instant::now();
    pipe.send(kind::DESTROY, "destroy").await;
    assert_eq!(pipe.frames_until_eof().await, vec![]);
    assert_eq!(pipe.exit_code().await, 0);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(1300), "{took:?}");
}

#[tokio::test]
async fn non_utf8_output_arrives_as_binary_frames() {
    let mut pipe = Pipe::checked_in(&[]).await;
    pipe.launch(r"printf '\377\376'").await;
    let frames = pipe.frames_until_eof().await;
    assert_eq!(frames, vec![Frame::new(kind::BINARY, &b"\xff\xfe"[..])]);
    assert_eq!(pipe.exit_code().await, 0);
}

#[tokio::test]
async fn multibyte_characters_survive_read_boundaries() {
    let mut pipe = Pipe::checked_in(&[]).await;
    // 120 000 bytes of 3-byte units: reads of any power-of-two size cut through an "é".
    pipe.launch(&sh("yes é | head -n 40000")).await;
    let frames = pipe.frames_until_eof().await;
    assert!(frames.len() > 1, "expected several frames");
    for frame in &frames {
        assert_eq!(frame.kind, Kind::Text);
        assert!(frame.payload.len() <= 64 * 1024);
        assert!(std::str::from_utf8(&frame.payload).is_ok(), "split char");
    }
    assert_eq!(joined(&frames, Kind::Text), "é\n".repeat(40_000).as_bytes());
    assert_eq!(pipe.exit_code().await, 0);
}

#[tokio::test]
async fn json_mode_checks_in_and_streams_output() {
    let mut pipe = Pipe::start(&["--json"]).await;
    // The daemon tells the protocol from the first byte.
    let conn = &mut pipe.conn;
    tokio::time::timeout(STEP, conn.stream.read_buf(&mut conn.buf))
        .await
        .expect("check-in in time")
        .expect("read");
    assert_eq!(conn.buf.first(), Some(&b'{'));
    assert_eq!(pipe.conn.recv().await, Some(frame(kind::PIPE_ID, ID)));
    // Base64 in JSON for the non-UTF-8 payload.
    pipe.launch(&sh(r#"echo hi >&2; printf "\377"; exit 4"#))
        .await;
    let frames = pipe.frames_until_eof().await;
    let (last, rest) = frames.split_last().expect("frames");
    assert_eq!(*last, frame(kind::ERROR, "command exited with status 4"));
    assert_eq!(joined(rest, Kind::Binary), b"\xff", "{frames:?}");
    assert_eq!(joined(rest, Kind::Error), b"hi\n", "{frames:?}");
    assert_eq!(pipe.exit_code().await, 4);
}

#[tokio::test]
async fn daemon_closing_the_socket_kills_the_command() {
    let mut pipe = Pipe::checked_in(&[]).await;
    // exec keeps the shell's pid, so the printed pid is the sleeping command's.
    pipe.launch(&sh("echo $$; exec sleep 30")).await;
    let frame = pipe.conn.recv().await.expect("pid");
    let pid: i32 = std::str::from_utf8(&frame.payload)
        .expect("utf-8")
        .trim()
        .parse()
        .expect("pid");
    let pid = rustix::process::Pid::from_raw(pid).expect("non-zero pid");
    assert!(rustix::process::test_kill_process(pid).is_ok());
    let start = Instant::now();
    pipe.conn.stream.shutdown().await.expect("shutdown");
    drop(std::mem::replace(&mut pipe.conn.buf, BytesMut::new()));
    assert_eq!(pipe.exit_code().await, 0);
    assert!(start.elapsed() < Duration::from_secs(2));
    // The pipe reaped it, so the pid is gone (not a zombie).
    assert!(rustix::process::test_kill_process(pid).is_err());
}

#[tokio::test]
async fn bad_launch_line_is_refused_with_exit_65() {
    for line in ["", "   ", "echo 'unterminated"] {
        let mut pipe = Pipe::checked_in(&[]).await;
        pipe.launch(line).await;
        let frames = pipe.frames_until_eof().await;
        assert_eq!(frames.len(), 1, "{line:?}: {frames:?}");
        assert_eq!(frames[0].kind, Kind::Error);
        assert_eq!(pipe.exit_code().await, 65, "{line:?}");
    }
}

#[tokio::test]
async fn protocol_error_from_the_daemon_exits_76() {
    let mut pipe = Pipe::checked_in(&[]).await;
    pipe.launch("sleep 30").await;
    // A length field shorter than the header.
    pipe.conn
        .stream
        .write_all(&[0, 0, 0, 3, 0, 0, 0, 0])
        .await
        .expect("write");
    let frames = pipe.frames_until_eof().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].kind, Kind::Error);
    assert_eq!(pipe.exit_code().await, 76);
}

#[tokio::test]
async fn unreachable_socket_exits_69() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_pipe(&dir.path().join("missing.sock"), &[]);
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert_eq!(status.code(), Some(69));
}

/// `--ipc-fd 3` (or `SECURE_TALK_IPC_FD=3`) with no descriptor 3 inherited: the pipe falls
/// back to `-u`, or exits 69 without one; it never takes a descriptor it opened itself (the
/// socket pair it passes the descriptor through would get number 3, and be closed under it:
/// an abort).
#[tokio::test]
async fn an_ipc_descriptor_that_was_not_inherited_is_not_used() {
    let mut pipe = Pipe::checked_in(&["--ipc-fd", "3"]).await;
    pipe.launch("echo fell back").await;
    let frames = pipe.frames_until_eof().await;
    assert_eq!(joined(&frames, Kind::Text), b"fell back\n");
    assert_eq!(pipe.exit_code().await, 0);
    let mut child = tokio::process::Command::new(PIPE)
        .args(["-i", ID])
        .env("SECURE_TALK_IPC_FD", "3")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn secure-talk-pipe");
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert_eq!(status.code(), Some(69), "{status:?}");
}
