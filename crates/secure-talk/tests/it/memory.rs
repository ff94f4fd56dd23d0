//! Memory bounds: per-channel message caps (close 1009 at the frame header, before the bytes
//! are read), the global budget of bytes in flight (close 1013), uploads streamed to disk and
//! the daemon's RSS under clients that send unfinished big frames.

use std::time::Duration;

use common::envelope::talk::{BinaryMessage, Headers, md5_hex, method};
use futures_util::StreamExt as _;
use secure_talk::client::{self, ClientOptions, Stream};
use secure_talk::config::Limits;
use secure_talk::hub::Channel;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use futures_util::SinkExt as _;

use crate::support::{STEP, TestServer, connect, expect_reply, http};

/// A websocket on `path` with a fresh token, for writing raw frames.
pub(crate) async fn raw_ws(options: &ClientOptions, path: &str) -> WebSocketStream<Stream> {
    let (status, token) = http(options, "GET", "/", None).await;
    assert_eq!(status, 200);
    raw_ws_as(options, path, &token).await
}

/// A websocket on `path` with `token` (so two channels belong to one client).
async fn raw_ws_as(options: &ClientOptions, path: &str, token: &str) -> WebSocketStream<Stream> {
    let stream = client::open_stream(options).await.expect("open a stream");
    let mut request = format!("ws://localhost{path}")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("token", token.parse().expect("header value"));
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("upgraded in time")
        .expect("upgraded");
    ws
}

/// The header of a masked client frame (mask 0: the payload goes as is).
pub(crate) fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend_from_slice(&[0; 4]);
    out
}

/// Writes `bytes` (a write error means the server already closed: fine) and returns the close
/// code the server sends.
pub(crate) async fn close_code_after(ws: &mut WebSocketStream<Stream>, bytes: &[u8]) -> u16 {
    let _ = tokio::time::timeout(STEP, async {
        let _ = ws.get_mut().write_all(bytes).await;
        let _ = ws.get_mut().flush().await;
    })
    .await;
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the server closes in time")
}

/// A server with the default limits (the test configuration lowers them).
async fn default_server() -> TestServer {
    TestServer::start_with(|c| c.limits = Limits::default()).await
}

#[tokio::test]
async fn unfinished_big_frames_are_cut_off_at_the_channel_cap() {
    let server = default_server().await;
    let options = server.unix("raw");
    // /data: a 128 MiB frame is refused at its header, and so is a message that grows past
    // 4 KiB in small fragments.
    let mut data = raw_ws(&options, "/data").await;
    let mut bytes = frame_header(false, 0x2, 128 << 20);
    bytes.extend(vec![0u8; 64 << 10]);
    assert_eq!(close_code_after(&mut data, &bytes).await, 1009);
    let mut data = raw_ws(&options, "/data").await;
    let mut bytes = frame_header(false, 0x2, 1024);
    bytes.extend([0u8; 1024]);
    for _ in 0..8 {
        bytes.extend(frame_header(false, 0x0, 1024));
        bytes.extend([0u8; 1024]);
    }
    assert_eq!(close_code_after(&mut data, &bytes).await, 1009);
    // A data channel still takes a small message (and ignores it).
    let mut data = raw_ws(&options, "/data").await;
    data.send(WsMessage::text("ignored")).await.expect("send");

    // /: a text frame over max_message_bytes, at its header.
    let mut admin = raw_ws(&options, "/").await;
    let mut bytes = frame_header(false, 0x1, 128 << 20);
    bytes.extend(vec![b' '; 64 << 10]);
    assert_eq!(close_code_after(&mut admin, &bytes).await, 1009);
    // /: a binary message that is not an upload is held in memory, so it has the same cap:
    // refused once its headers say what it is.
    let mut admin = raw_ws(&options, "/").await;
    let mut bytes = frame_header(false, 0x2, 128 << 20);
    bytes.extend_from_slice(b"{\"method\":\"text\"}\x01");
    bytes.extend(vec![0u8; 64 << 10]);
    assert_eq!(close_code_after(&mut admin, &bytes).await, 1009);
    // Fragments adding up past the cap.
    let mut admin = raw_ws(&options, "/").await;
    let chunk = 256 << 10;
    let mut bytes = frame_header(false, 0x1, chunk);
    bytes.extend(vec![b' '; chunk as usize]);
    for _ in 0..4 {
        bytes.extend(frame_header(false, 0x0, chunk));
        bytes.extend(vec![b' '; chunk as usize]);
    }
    assert_eq!(close_code_after(&mut admin, &bytes).await, 1009);
    // Nothing stays charged.
    testkit::until("the budget is back to 0", STEP, || {
        server.server.bytes_in_flight() == 0
    })
    .await;
}

#[tokio::test]
async fn the_budget_of_bytes_in_flight_refuses_with_1013_instead_of_growing() {
    // Room for three unfinished 60 KiB messages (64 KiB steps), not four.
    let server = TestServer::start_with(|c| {
        c.limits.max_message_bytes = 64 << 10;
        c.limits.max_bytes_in_flight = 192 << 10;
    })
    .await;
    let options = server.unix("raw");
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut admin = raw_ws(&options, "/").await;
        let mut bytes = frame_header(false, 0x1, 64 << 10);
        bytes.extend(vec![b' '; 60 << 10]);
        admin.get_mut().write_all(&bytes).await.expect("write");
        holders.push(admin);
    }
    testkit::until("three messages charged", STEP, || {
        server.server.bytes_in_flight() == 192 << 10
    })
    .await;
    let mut fourth = raw_ws(&options, "/").await;
    let mut bytes = frame_header(false, 0x1, 64 << 10);
    bytes.extend(vec![b' '; 60 << 10]);
    assert_eq!(close_code_after(&mut fourth, &bytes).await, 1013);
    assert_eq!(server.server.bytes_in_flight(), 192 << 10);
    // Closing gives the bytes back: the next client gets through.
    drop(holders);
    testkit::until("the budget is back", STEP, || {
        server.server.bytes_in_flight() == 0
    })
    .await;
    let mut admin = connect(&server.alice("a"), Channel::Admin).await;
    admin
        .send_text(r#"{"headers":{"method":"text"},"payload":"hi"}"#)
        .await
        .expect("send");
    let reply = admin.recv_timeout(STEP).await.expect("recv");
    assert!(reply.is_some());
}

#[tokio::test]
async fn an_upload_is_streamed_in_fragments_and_verified() {
    let server = TestServer::start_with(|c| c.limits.max_upload_bytes = 4 << 20).await;
    let options = server.unix("raw");
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let message = BinaryMessage::new(
        Headers::method(method::MODEL).with_path("big/w.bin"),
        payload.clone(),
    )
    .encode();
    // Fragments of odd sizes, with a ping between two of them.
    let mut ws = raw_ws(&options, "/").await;
    let mut bytes = Vec::new();
    let pieces: Vec<&[u8]> = message.chunks(777_777).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 { 0x2 } else { 0x0 };
        bytes.extend(frame_header(
            i + 1 == pieces.len(),
            opcode,
            piece.len() as u64,
        ));
        bytes.extend_from_slice(piece);
        if i == 1 {
            bytes.extend(frame_header(true, 0x9, 0));
        }
    }
    ws.get_mut().write_all(&bytes).await.expect("write");
    let reply = tokio::time::timeout(STEP, async {
        loop {
            if let Some(Ok(WsMessage::Text(text))) = ws.next().await {
                if text.contains("\"code\"") {
                    return text.to_string();
                }
            }
        }
    })
    .await
    .expect("a reply");
    assert!(reply.contains("200"), "{reply}");
    assert!(reply.contains(&md5_hex(&payload)), "{reply}");
    let upload_dir = &server.config.upload_dir;
    assert_eq!(
        std::fs::read(upload_dir.join("big/w.bin")).expect("read"),
        payload
    );
    // No temporary file is left.
    let names: Vec<_> = std::fs::read_dir(upload_dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // An upload growing past max_upload_bytes is cut off with 1009 and its temporary file
    // (4 MiB written by then) is removed.
    let mut admin = raw_ws(&options, "/").await;
    let mut bytes = frame_header(false, 0x2, 1 << 20);
    let head = b"{\"method\":\"model\",\"path\":\"too/big\"}\x01";
    bytes.extend_from_slice(head);
    bytes.extend(vec![0u8; (1 << 20) - head.len()]);
    for _ in 0..4 {
        bytes.extend(frame_header(false, 0x0, 1 << 20));
        bytes.extend(vec![0u8; 1 << 20]);
    }
    assert_eq!(close_code_after(&mut admin, &bytes).await, 1009);
    testkit::until("the temporary file is removed", STEP, || {
        std::fs::read_dir(upload_dir).map_or(0, Iterator::count) == 2
    })
    .await;
    // A checksum mismatch is refused and leaves nothing either.
    let mut conn = connect(&server.alice("a"), Channel::Admin).await;
    let mut wrong = BinaryMessage::new(
        Headers::method(method::MODEL).with_path("bad.bin"),
        vec![1u8; 300_000],
    );
    wrong.check_sum = md5_hex(b"other");
    conn.send_binary(&wrong).await.expect("send");
    expect_reply(&mut conn, 422, "checksum").await;
    let names: Vec<_> = std::fs::read_dir(upload_dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn the_daemon_does_not_grow_with_unfinished_big_messages() {
    // The real binary at its default limits: two clients start 128 MiB messages on `/data`
    // and two stream 24 MiB into unfinished uploads on `/`.
    crate::support::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = crate::daemon::Daemon::start(&crate::daemon::write_config(dir.path(), "")).await;
    let pid = daemon.child.id().expect("running");
    let options = daemon.options(dir.path().join("token"));
    // Warm up (a token, an upgrade, an echo), then measure.
    let mut warm = connect(&options, Channel::Admin).await;
    warm.send_text(r#"{"headers":{"method":"text"},"payload":"hi"}"#)
        .await
        .expect("send");
    let _ = warm.recv_timeout(STEP).await;
    let before = rss_kib(pid);
    for _ in 0..2 {
        let mut data = raw_ws(&options, "/data").await;
        let mut bytes = frame_header(false, 0x2, 128 << 20);
        bytes.extend(vec![0u8; 1 << 20]);
        assert_eq!(close_code_after(&mut data, &bytes).await, 1009);
    }
    let mut uploads = Vec::new();
    for i in 0..2 {
        let mut admin = raw_ws(&options, "/").await;
        let mut bytes = frame_header(false, 0x2, 128 << 20);
        bytes.extend_from_slice(
            format!("{{\"method\":\"model\",\"path\":\"u{i}\"}}\x01").as_bytes(),
        );
        admin.get_mut().write_all(&bytes).await.expect("write");
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..24 {
            tokio::time::timeout(STEP, admin.get_mut().write_all(&chunk))
                .await
                .expect("the daemon keeps reading an upload")
                .expect("write");
        }
        uploads.push(admin);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(pid);
    let grown = after.saturating_sub(before);
    eprintln!("VmRSS {before} KiB -> {after} KiB (+{grown} KiB) with 48 MiB of unfinished uploads");
    assert!(grown < 16 << 10, "the daemon grew by {grown} KiB");
    drop(uploads);
    assert_eq!(daemon.terminate().await, 0);
}

#[tokio::test]
async fn checksum_broadcasts_to_admins_that_do_not_read_are_coalesced() {
    // The real binary at its default limits. model_info.json is near its bound (1 MiB), four
    // admin connections never read, and another controller uploads 64 files: each upload is
    // broadcast to every admin connection as a copy of the whole file. Each connection holds
    // only the latest broadcast it has not written, one copy shared by all.
    crate::support::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = crate::daemon::Daemon::start(&crate::daemon::write_config(dir.path(), "")).await;
    let pid = daemon.child.id().expect("running");
    let options = daemon.options(dir.path().join("token"));
    let upload_dir = dir.path().join("state/uploads");
    let text = model_info_near_its_bound(&upload_dir);
    assert!(
        text.len() > 700 << 10 && text.len() < 1 << 20,
        "{}",
        text.len()
    );
    let mut uploader = connect(&options, Channel::Admin).await;
    let upload = |i: usize| {
        BinaryMessage::new(
            Headers::method(method::MODEL).with_path(format!("n/{i}.bin")),
            vec![1u8],
        )
    };
    uploader.send_binary(&upload(0)).await.expect("send");
    expect_reply(&mut uploader, 200, "n/0.bin").await;
    // Admin connections that never read (their greeting push stalls, then the broadcasts).
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(raw_ws(&options, "/").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    for i in 1..=64 {
        uploader.send_binary(&upload(i)).await.expect("send");
        expect_reply(&mut uploader, 200, &format!("n/{i}.bin")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(pid);
    let grown = after.saturating_sub(before);
    eprintln!(
        "VmRSS {before} KiB -> {after} KiB (+{grown} KiB): 64 broadcasts of {} KiB to 4 admins that do not read",
        text.len() >> 10
    );
    // Queued copies (one per connection and upload) took 4 x 64 x ~1 MiB.
    assert!(grown < 32 << 10, "the daemon grew by {grown} KiB");
    // (The uploader stopped reading too: its last broadcast may still be being written.)
    drop((silent, uploader));
    assert_eq!(daemon.terminate().await, 0);
}

/// A pipe that checks in on the path socket, then writes `argv[3]` text frames of 8 MiB as
/// fast as the daemon reads them.
const FLOOD_PIPE: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[2])
def frame(kind, payload):
    return struct.pack(">II", len(payload) + 8, kind) + payload
s.sendall(frame(1, sys.argv[1].encode()))
chunk = b"a" * (8 << 20)
for _ in range(int(sys.argv[3])):
    s.sendall(frame(0, chunk))
time.sleep(60)
"#;

#[tokio::test]
async fn pipe_output_for_a_client_that_does_not_read_waits_in_the_pipe() {
    // At the default limits, a pipe writes 40 messages of 8 MiB for an owner whose data
    // channel never reads. The output queue holds `send_queue_bytes` (4 MiB) and one message
    // that is larger goes alone: the pipe waits instead of the daemon holding 320 MiB.
    let server = TestServer::start_with(|c| {
        c.limits = Limits::default();
        c.limits.max_ipc_frame_bytes = 9 << 20;
        c.pipe_program = "python3".into();
        c.pipe_args = vec![
            "-c".into(),
            FLOOD_PIPE.into(),
            "{id}".into(),
            "{ipc_socket}".into(),
            "40".into(),
        ];
    })
    .await;
    let options = server.alice("flood");
    let (status, token) = http(&options, "GET", "/", None).await;
    assert_eq!(status, 200);
    let data = raw_ws_as(&options, "/data", &token).await;
    let mut admin = raw_ws_as(&options, "/", &token).await;
    let before = rss_kib(std::process::id());
    admin
        .send(WsMessage::text(
            r#"{"headers":{"method":"create"},"payload":{"pipe_num":1,"launch":"x"}}"#,
        ))
        .await
        .expect("send");
    let reply = tokio::time::timeout(STEP, admin.next())
        .await
        .expect("a reply in time")
        .expect("a reply")
        .expect("a reply");
    assert!(
        reply.to_text().expect("text").contains("pipe_create 0"),
        "{reply:?}"
    );
    // Long enough for the whole flood to arrive when nothing holds it back (it takes well
    // under a second on loopback).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(std::process::id());
    let grown = after.saturating_sub(before);
    eprintln!(
        "VmRSS {before} KiB -> {after} KiB (+{grown} KiB) with 320 MiB of unread pipe output"
    );
    assert!(grown < 96 << 10, "the daemon grew by {grown} KiB");
    drop(data);
}

/// A pipe that checks in on the path socket and then never reads.
const DEAF_PIPE: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[2])
s.sendall(struct.pack(">II", len(sys.argv[1]) + 8, 1) + sys.argv[1].encode())
time.sleep(60)
"#;

/// The next reply with a code, whatever it says.
async fn reply_code(admin: &mut secure_talk::client::Connection) -> i64 {
    crate::support::recv_message(admin, "a text reply with a code", |m| {
        m.method() == method::TEXT && m.headers.code.is_some()
    })
    .await
    .headers
    .code
    .unwrap_or_default()
}

#[tokio::test]
async fn what_the_owner_sends_a_pipe_that_does_not_read_is_bounded_in_bytes() {
    // At the default limits: 64 `send`s of 900 KB to a pipe that never reads. The queue
    // towards a pipe holds `pipe_queue_bytes` (1 MiB) besides what the kernel buffers: the
    // rest get 503 instead of the daemon holding 64 frames (57 MB) per pipe.
    let server = TestServer::start_with(|c| {
        c.limits = Limits::default();
        c.pipe_program = "python3".into();
        c.pipe_args = vec![
            "-c".into(),
            DEAF_PIPE.into(),
            "{id}".into(),
            "{ipc_socket}".into(),
        ];
    })
    .await;
    let options = server.alice("deaf");
    let mut admin = connect(&options, Channel::Admin).await;
    admin
        .send_text(r#"{"headers":{"method":"create"},"payload":{"pipe_num":1,"launch":"x"}}"#)
        .await
        .expect("send");
    expect_reply(&mut admin, 200, "pipe_create 0").await;
    crate::support::wait_checked_in(&mut admin, 0).await;
    let before = rss_kib(std::process::id());
    let chunk = "a".repeat(900_000);
    let message = format!(r#"{{"headers":{{"method":"send","pipe_id":0}},"payload":"{chunk}"}}"#);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..64 {
        admin.send_text(&message).await.expect("send");
        match reply_code(&mut admin).await {
            200 => accepted += 1,
            503 => refused += 1,
            other => panic!("unexpected reply {other}"),
        }
    }
    let after = rss_kib(std::process::id());
    let grown = after.saturating_sub(before);
    eprintln!("{accepted} accepted, {refused} refused; VmRSS +{grown} KiB");
    assert!(refused > 0, "every send was queued");
    assert!(grown < 16 << 10, "the daemon grew by {grown} KiB");
}

#[tokio::test]
async fn one_identity_cannot_take_every_pipe_through_many_client_ids() {
    // Tokens are free: every `GET /` is a new client id. The pipes of all of them count
    // against the certificate's `max_pipes_per_identity`, and a create or property larger
    // than `max_pipe_spec_bytes` is refused.
    let server = TestServer::start_with(|c| {
        c.limits.max_pipes_per_client = 2;
        c.limits.max_pipes_per_identity = 3;
        c.limits.max_pipe_spec_bytes = 1024;
    })
    .await;
    let mut created = 0;
    let mut last = String::new();
    for i in 0..3 {
        let options = server.alice(&format!("id{i}"));
        let mut admin = connect(&options, Channel::Admin).await;
        for _ in 0..2 {
            admin
                .send_text(r#"{"headers":{"method":"create"},"payload":{"pipe_num":1,"launch":"sleep 30"}}"#)
                .await
                .expect("send");
            let reply = crate::support::recv_message(&mut admin, "a reply", |m| {
                m.method() == method::TEXT && m.headers.code.is_some()
            })
            .await;
            if reply.headers.code == Some(200) {
                created += 1;
            } else {
                last = reply
                    .payload
                    .and_then(|p| p.as_str().map(str::to_owned))
                    .unwrap_or_default();
            }
        }
    }
    assert_eq!(created, 3, "max_pipes_per_identity holds across client ids");
    assert!(last.contains("max_pipes_per_identity"), "{last}");
    // Bob, another certificate, still gets his pipe.
    let mut bob = connect(&server.bob("b"), Channel::Admin).await;
    let big = "x".repeat(2000);
    bob.send_text(&format!(
        r#"{{"headers":{{"method":"create"}},"payload":{{"pipe_num":1,"launch":"sleep 30","config":"{big}"}}}}"#
    ))
    .await
    .expect("send");
    expect_reply(&mut bob, 413, "max_pipe_spec_bytes").await;
    bob.send_text(
        r#"{"headers":{"method":"create"},"payload":{"pipe_num":1,"launch":"sleep 30"}}"#,
    )
    .await
    .expect("send");
    let text = expect_reply(&mut bob, 200, "pipe_create").await;
    let pipe: u64 = text
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("an id");
    bob.send_text(&format!(
        r#"{{"headers":{{"method":"property","pipe_id":{pipe}}},"payload":{{"p":"{big}"}}}}"#
    ))
    .await
    .expect("send");
    expect_reply(&mut bob, 413, "max_pipe_spec_bytes").await;
}

/// SIGTERM while an admin connection's write is stuck on a peer that never reads (the
/// broadcasts of a model_info.json near its bound fill the socket): the connection is dropped
/// two seconds into the drain and the daemon exits 0 within its grace, instead of waiting for
/// the write until `idle_timeout_secs` and exiting 70 with the task still running.
#[tokio::test]
async fn a_write_stuck_on_a_peer_that_does_not_read_does_not_hold_the_drain() {
    crate::support::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = crate::daemon::Daemon::start(&crate::daemon::write_config(dir.path(), "")).await;
    let options = daemon.options(dir.path().join("token"));
    let upload_dir = dir.path().join("state/uploads");
    model_info_near_its_bound(&upload_dir);
    let silent = raw_ws(&options, "/").await;
    let mut uploader = connect(&options, Channel::Admin).await;
    for i in 0..8 {
        let upload = BinaryMessage::new(
            Headers::method(method::MODEL).with_path(format!("n/{i}.bin")),
            vec![1u8],
        );
        uploader.send_binary(&upload).await.expect("send");
        expect_reply(&mut uploader, 200, &format!("n/{i}.bin")).await;
    }
    drop(uploader);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = std::time::Instant::now();
    assert_eq!(daemon.terminate().await, 0, "the drain ended in time");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(silent);
}

/// Writes `upload_dir/model_info.json` (flat, 14,000 entries: between 700 KiB and the 1 MiB
/// bound) and returns its text; every upload is then broadcast as a copy of nearly 1 MiB.
fn model_info_near_its_bound(upload_dir: &std::path::Path) -> String {
    std::fs::create_dir_all(upload_dir).expect("mkdir");
    let entries: serde_json::Map<String, serde_json::Value> = (0..14000)
        .map(|i| (format!("models/m{i:05}/weights.bin"), md5_hex(&[1]).into()))
        .collect();
    let text = serde_json::to_string_pretty(&entries).expect("json");
    std::fs::write(upload_dir.join("model_info.json"), &text).expect("write");
    text
}
