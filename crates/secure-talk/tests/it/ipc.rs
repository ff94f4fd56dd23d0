//! The IPC sockets: only a spawned pipe may check in (on its own descriptor, or on the path
//! socket from its own process, never from its process group), and no byte sequence breaks the
//! server.

use std::time::Duration;

use common::envelope::ipc::{Frame, Kind};
use common::envelope::talk::method;
use rand::{Rng as _, SeedableRng as _};
use secure_talk::client::Incoming;
use secure_talk::hub::Channel;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::support::{
    PIPE, STEP, TestServer, connect, create_pipe, data_until, expect_reply, list, listed_pid,
    panics_on_this_thread, recv_message, recv_method, recv_until, send, wait_checked_in,
};

/// Writes `bytes` on a new IPC connection, closes our side and returns what the server sent
/// before it closed its side.
async fn ipc_exchange(socket: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket)
        .await
        .expect("connect to the ipc socket");
    // The server may close before taking everything (an over-long frame): that is fine.
    let _ = tokio::time::timeout(STEP, stream.write_all(bytes)).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("the server ends the connection after {bytes:?}"));
    answer
}

fn raw(kind: u32, payload: &[u8]) -> Vec<u8> {
    Frame::new(kind, payload.to_vec()).encode().expect("encode")
}

fn header(len: u32, kind: u32) -> Vec<u8> {
    [len.to_be_bytes(), kind.to_be_bytes()].concat()
}

/// A server directory and the path of a gate file in it, not yet there.
fn gated() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("gate");
    (dir, gate)
}

/// Pipes that wait for `gate` to exist before they exec the real pipe program (same pid).
fn gate_pipe(config: &mut secure_talk::config::Config, gate: &std::path::Path) {
    config.pipe_program = "sh".into();
    config.pipe_args = vec![
        "-c".into(),
        format!(
            "while [ ! -e '{}' ]; do sleep 0.05; done; exec '{PIPE}' -i {{id}} -u {{ipc_socket}}",
            gate.display()
        ),
    ];
}

#[tokio::test]
async fn a_process_that_is_not_the_pipe_cannot_check_in_for_it() {
    // The pipe program starts only once the impostor is done (the test opens the gate), so
    // its id is free when the impostor tries.
    let (dir, gate) = gated();
    let server = TestServer::start_in(dir, |c| gate_pipe(c, &gate)).await;
    let socket = server.config.ipc_socket.clone();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&socket)
            .expect("ipc socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "echo real").await;

    let claim = Frame::new(Kind::PipeId, id.to_string());
    for bytes in [claim.encode().expect("encode"), claim.encode_json_line()] {
        let answer = ipc_exchange(&socket, &bytes).await;
        assert!(answer.is_empty(), "the impostor was sent {answer:?}");
    }
    let listed = list(&mut admin).await;
    assert_eq!(listed["pipes"][0]["checked_in"], json!(false), "{listed}");
    // The real pipe checks in and runs its command.
    std::fs::write(&gate, b"").expect("open the gate");
    assert_eq!(data_until(&mut data, id, "real\n").await, "real\n");
}

/// A hostile process (Python, stdlib only): joins the victim pipe's process group, checks in
/// on the path socket with the victim's id and prints how many bytes the server sent it.
const GROUP_JOINER: &str = r#"
import os, socket, struct, sys
victim_pid, pipe_id, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.setpgid(0, victim_pid)
assert os.getpgid(0) == victim_pid
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(struct.pack(">II", 8 + len(pipe_id), 1) + pipe_id.encode())
answer = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    answer += chunk
print(len(answer))
"#;

#[tokio::test]
async fn a_process_that_joins_the_pipes_process_group_cannot_check_in_for_it() {
    // The victim starts only once the hostile process has finished (the test opens the
    // gate), so its id is free when the hostile process claims it, however slow the machine.
    let (dir, gate) = gated();
    let server = TestServer::start_in(dir, |c| gate_pipe(c, &gate)).await;
    let opts = server.alice("victim");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "echo real").await;
    let victim = listed_pid(&list(&mut admin).await, id);

    let hostile = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(GROUP_JOINER)
        .arg(victim.to_string())
        .arg(id.to_string())
        .arg(&server.config.ipc_socket)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(STEP, hostile)
        .await
        .expect("the hostile process ends")
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "0",
        "the server sent the victim's config and launch to a process of its group"
    );
    let listed = list(&mut admin).await;
    assert_eq!(listed["pipes"][0]["checked_in"], json!(false), "{listed}");
    // The real pipe still checks in, and its owner gets its output.
    std::fs::write(&gate, b"").expect("open the gate");
    assert_eq!(data_until(&mut data, id, "real\n").await, "real\n");
}

#[tokio::test]
async fn a_pipe_checks_in_on_its_own_descriptor() {
    // No socket path at all: the inherited descriptor is the only way in.
    let server = TestServer::start_with(|c| {
        c.pipe_args = ["-i", "{id}", "--ipc-fd", "{ipc_fd}"]
            .map(String::from)
            .to_vec();
    })
    .await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "echo via the descriptor").await;
    data_until(&mut data, id, "via the descriptor\n").await;
}

/// A pipe (Python, stdlib only) that claims its sibling's id on its own descriptor, then
/// checks in on the path socket with its own id and reports what the claim was answered.
const SIBLING_CLAIM: &str = r#"
import os, socket, struct, sys, time
me, path = int(sys.argv[1]), sys.argv[2]
def frame(kind, payload):
    return struct.pack(">II", 8 + len(payload), kind) + payload
own = socket.socket(fileno=int(os.environ["SECURE_TALK_IPC_FD"]))
own.sendall(frame(1, str(me ^ 1).encode()))
answer = b""
while True:
    chunk = own.recv(65536)
    if not chunk:
        break
    answer += chunk
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(frame(1, str(me).encode()))
s.sendall(frame(0, ("claim answered with %d bytes\n" % len(answer)).encode()))
time.sleep(30)
"#;

#[tokio::test]
async fn a_check_in_on_a_descriptor_with_another_pipes_id_is_refused() {
    let server = TestServer::start_with(|c| {
        c.pipe_program = "python3".into();
        c.pipe_args = vec![
            "-c".into(),
            SIBLING_CLAIM.into(),
            "{id}".into(),
            "{ipc_socket}".into(),
        ];
    })
    .await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    // Pipes 0 and 1, both recorded before either starts: each claims the other's id.
    send(
        &mut admin,
        json!({"headers": {"method": "create"}, "payload": {"pipe_num": 2, "launch": "x"}}),
    )
    .await;
    expect_reply(&mut admin, 200, "pipe_create 0").await;
    expect_reply(&mut admin, 200, "pipe_create 1").await;
    // Their outputs come in either order.
    let mut reported = std::collections::BTreeMap::new();
    while reported.len() < 2 {
        let output =
            recv_message(&mut data, "a pipe's report", |m| m.headers.kind == Some(0)).await;
        let text = output
            .payload
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_owned);
        reported.insert(output.headers.pipe_id, text);
    }
    let expected = Some("claim answered with 0 bytes\n".to_owned());
    assert_eq!(reported.get(&Some(0)), Some(&expected), "{reported:?}");
    assert_eq!(reported.get(&Some(1)), Some(&expected), "{reported:?}");
}

#[tokio::test]
async fn garbage_on_the_ipc_socket_never_breaks_the_server() {
    let server = TestServer::start().await;
    let socket = server.config.ipc_socket.clone();
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "cat").await;
    wait_checked_in(&mut admin, id).await;
    let max = u32::try_from(server.config.limits.max_ipc_frame_bytes).expect("fits");

    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        vec![0, 0, 0],
        header(0, 1),
        header(3, 1),
        header(7, 1),
        header(8, 1),
        header(u32::MAX, 1),
        header(max + 1, 0),
        header(max, 1),
        [header(max, 1), vec![b'0'; 1000]].concat(),
        raw(1, id.to_string().as_bytes()),
        raw(1, b"999999"),
        raw(1, b"-1"),
        raw(1, b"18446744073709551616"),
        raw(1, b"\xff\xfe"),
        raw(1, &[b'9'; 100_000]),
        raw(0, b"hello"),
        raw(5, b"destroy"),
        [raw(1, b"999"), raw(0, b"more")].concat(),
        b"{\n".to_vec(),
        b"{}\n".to_vec(),
        b"{\"type\":1}\n".to_vec(),
        format!("{{\"type\":1,\"payload\":\"{id}\"}}\n").into_bytes(),
        format!("{{\"type\":\"pipe_id\",\"payload\":\"{id}\"}}\n").into_bytes(),
        b"{\"type\":1,\"payload\":\"AA==\",\"encoding\":\"base64\"}\n".to_vec(),
        b"{\"type\":1,\"payload\":\"!!\",\"encoding\":\"base64\"}\n".to_vec(),
        b"{\"type\":-1,\"payload\":\"\"}\n".to_vec(),
        b"{\"type\":99999999999,\"payload\":[]}\n".to_vec(),
        b"   \n\n\t".to_vec(),
        b" ".repeat(usize::try_from(max).expect("fits") + 10),
        [
            b"{".to_vec(),
            vec![b'x'; usize::try_from(max).expect("fits") + 10],
        ]
        .concat(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ec_7a1c);
    for round in 0..300 {
        let len = rng.gen_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        match round % 4 {
            // A plausible header in front of random bytes.
            0 => {
                let total = rng.gen_range(0..80u32);
                let kind = rng.gen_range(0..9u32);
                bytes.splice(0..0, header(total, kind));
            }
            // A JSON-looking start.
            1 => bytes.insert(0, b'{'),
            _ => {}
        }
        inputs.push(bytes);
    }
    for input in &inputs {
        let answer = ipc_exchange(&socket, input).await;
        assert!(
            answer.is_empty(),
            "the server answered {:?}... with {answer:?}",
            &input[..input.len().min(40)]
        );
    }

    // Still serving: the checked-in pipe works, new pipes check in, echo works.
    send(
        &mut admin,
        json!({"headers": {"method": "send", "pipe_id": id}, "payload": "after\n"}),
    )
    .await;
    expect_reply(&mut admin, 200, "pipe_send").await;
    data_until(&mut data, id, "after\n").await;
    let second = create_pipe(&mut admin, "echo second").await;
    data_until(&mut data, second, "second\n").await;
    let text = r#"{"headers":{"method":"text"},"payload":"alive"}"#;
    admin.send_text(text).await.expect("send");
    recv_message(&mut admin, "echo", |m| m.payload == Some(json!("alive"))).await;
    assert_eq!(panics_on_this_thread(), 0, "a server task panicked");
}

/// A fake pipe (Python, stdlib only) that checks in, sends every kind of frame, then a broken
/// one: the output is routed, and the protocol error stops that pipe only.
const FAKE_PIPE: &str = r#"
import socket, struct, sys, time
pipe_id, path = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
def frame(kind, payload):
    return struct.pack(">II", 8 + len(payload), kind) + payload
s.sendall(frame(1, pipe_id.encode()))
s.sendall(frame(0, b"text ok\n") + frame(6, b"\xff\x00bin") + frame(0, b"\xc3\x28 bad")
          + frame(99, b"odd type") + frame(7, b"err text"))
time.sleep(0.3)
s.sendall(struct.pack(">II", 3, 0))
time.sleep(30)
"#;

#[tokio::test]
async fn a_pipe_that_breaks_the_protocol_is_stopped() {
    let server = TestServer::start_with(|c| {
        c.pipe_program = "python3".into();
        c.pipe_args = vec![
            "-c".into(),
            FAKE_PIPE.into(),
            "{id}".into(),
            "{ipc_socket}".into(),
        ];
    })
    .await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "unused").await;

    let text = |kind: u32| move |m: &Incoming| matches!(m, Incoming::Message(m) if m.headers.kind == Some(kind));
    let Incoming::Message(first) = recv_until(&mut data, "text output", text(0)).await else {
        unreachable!()
    };
    assert_eq!(first.payload, Some(json!("text ok\n")));
    assert_eq!(first.headers.pipe_id, Some(id));
    let mut binaries = Vec::new();
    while binaries.len() < 2 {
        if let Incoming::Binary(b) = recv_until(&mut data, "binary output", |m| {
            matches!(m, Incoming::Binary(_))
        })
        .await
        {
            assert_eq!(b.headers.pipe_id, Some(id));
            assert!(b.checksum_ok());
            binaries.push((b.headers.kind, b.payload.to_vec()));
        }
    }
    assert_eq!(
        binaries,
        vec![
            (Some(6), b"\xff\x00bin".to_vec()),
            (Some(0), b"\xc3\x28 bad".to_vec())
        ]
    );
    recv_until(&mut data, "type 99", text(99)).await;
    recv_until(&mut data, "type 7", text(7)).await;
    let message = recv_method(&mut admin, method::PIPE_MESSAGE).await;
    assert_eq!(
        message.payload.as_ref().and_then(Value::as_str),
        Some("err text")
    );
    // The broken frame ends it: destroy escalates to SIGTERM after the kill grace.
    let deleted = tokio::time::timeout(
        Duration::from_secs(5),
        recv_method(&mut admin, method::PIPE_DELETE),
    )
    .await
    .expect("pipe_delete in time");
    assert_eq!(deleted.payload, Some(json!([id])));
    server.assert_no_pipe_processes(STEP).await;
}
