//! Both IPC dialects end to end with a pipe stand-in of each (Python, stdlib only, run
//! directly, never through a shell), connecting by path as `hddlspipes` and
//! `hddl_mediapipe2` do: create → check-in → what the pipe gets first → output to the data
//! channel (and error text to the admin channel) → property → destroy → `pipe_delete`. Then
//! the refusals: the other dialect's check-in, a malformed frame, a dlafs property without
//! its object, and the `{create.…}` placeholders (substituted argv, missing and unsafe
//! values, no process spawned).

use std::time::Duration;

use common::envelope::talk::{Message, method};
use secure_talk::client::{Connection, Incoming};
use secure_talk::config::Config;
use secure_talk::dialect::Dialect;
use secure_talk::hub::Channel;
use serde_json::{Value, json};

use crate::support::{
    STEP, TestServer, connect, expect_reply, list, recv_method, recv_until, send,
};

/// The stand-in: `python3 -c STANDIN <speaks> <mode> ARGS...`. It connects to the socket after
/// `-u`, checks in with the id after `-i` in the dialect it speaks, reports what it got as
/// text output, sends an image and an error text, answers each property and stops on a
/// destroy request. Mode `garbage` sends a malformed frame after its check-in; when the
/// server closes its connection it waits (to be stopped by the server).
const STANDIN: &str = r#"
import json, socket, struct, sys, time
speaks, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
pipe_id, path = args[args.index("-i") + 1], args[args.index("-u") + 1]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
def send(kind, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    s.sendall(struct.pack(">II", 8 + len(payload), kind) + payload)
def exact(n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            time.sleep(60)
            sys.exit(3)
        data += chunk
    return data
def recv():
    length, kind = struct.unpack(">II", exact(8))
    return kind, exact(length - 8)
text, image, error = (5, 4, 6) if speaks == "dlafs" else (0, 6, 7)
send(0 if speaks == "dlafs" else 1, pipe_id)
got = [recv()]
if speaks == "kmb":
    got.append(recv())
send(text, "argv " + json.dumps(args))
for kind, payload in got:
    send(text, "got %d %s" % (kind, payload.decode()))
if mode == "garbage":
    s.sendall(struct.pack(">II", 3, text))
    time.sleep(60)
send(image, b"\xff\xd8\xff\xe0JFIF\x00\xff\xd9")
send(error, "no such model")
while True:
    kind, payload = recv()
    send(text, "command %d %s" % (kind, payload.decode()))
    if kind == 5 or (kind == 0 and b"command_destroy" in payload):
        sys.exit(0)
"#;

/// A configuration running the stand-in speaking `speaks` (`mode`: `ok` or `garbage`) under
/// a server of `dialect`, with `extra` arguments after the standard ones.
fn standin(config: &mut Config, dialect: Dialect, speaks: &str, mode: &str, extra: &[&str]) {
    config.ipc_dialect = dialect;
    config.pipe_program = "python3".into();
    config.pipe_args = [
        "-c",
        STANDIN,
        speaks,
        mode,
        "-i",
        "{id}",
        "-u",
        "{ipc_socket}",
    ]
    .iter()
    .chain(extra)
    .map(|s| (*s).to_owned())
    .collect();
}

/// Sends `create` with `payload`; returns the pipe id.
async fn create(admin: &mut Connection, payload: &Value) -> u64 {
    send(
        admin,
        json!({"headers": {"method": "create"}, "payload": payload}),
    )
    .await;
    let text = expect_reply(admin, 200, "pipe_create ").await;
    text.trim_start_matches("pipe_create ")
        .parse()
        .expect("pipe_create <id>")
}

/// The next data-channel message of pipe `id`: its type and its payload (text, or bytes).
async fn output(data: &mut Connection, id: u64) -> (u32, Vec<u8>) {
    let incoming = recv_until(data, &format!("output of pipe {id}"), |m| match m {
        Incoming::Message(m) => m.headers.pipe_id == Some(id),
        Incoming::Binary(b) => b.headers.pipe_id == Some(id),
    })
    .await;
    match incoming {
        Incoming::Message(m) => (
            m.headers.kind.expect("type"),
            m.payload
                .as_ref()
                .and_then(Value::as_str)
                .expect("text")
                .as_bytes()
                .to_vec(),
        ),
        Incoming::Binary(b) => (b.headers.kind.expect("type"), b.payload.to_vec()),
    }
}

/// The next text output of pipe `id`, checked to be of type `kind`.
async fn text_output(data: &mut Connection, id: u64, kind: u32) -> String {
    let (got, bytes) = output(data, id).await;
    let text = String::from_utf8(bytes).expect("utf-8");
    assert_eq!(got, kind, "{text}");
    text
}

fn json_after(text: &str, prefix: &str) -> Value {
    let rest = text
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{text:?} does not start with {prefix:?}"));
    serde_json::from_str(rest).expect("json")
}

const JPEG: &[u8] = b"\xff\xd8\xff\xe0JFIF\x00\xff\xd9";

#[tokio::test]
async fn a_dlafs_pipe_runs_end_to_end() {
    let server = TestServer::start_with(|c| {
        standin(
            c,
            Dialect::Dlafs,
            "dlafs",
            "ok",
            &["-l", "{create.command_create.loop_times}"],
        );
    })
    .await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    // The original's create request.
    let request = json!({
        "client_id": 1, "command_type": 0,
        "command_create": {"pipe_num": 1, "stream_source": "a.mp4", "codec_type": "H.264",
                           "cvdlfilter0": {"algopipeline": "yolov1tiny ! googlenetv2"},
                           "loop_times": 100}
    });
    let id = create(&mut admin, &request).await;
    let info = recv_method(&mut admin, method::PIPE_INFO).await;
    assert_eq!(info.payload, Some(request.clone()));

    // The argv took -l from the request; the pipe got the whole request as one type-0 frame.
    let argv = json_after(&text_output(&mut data, id, 5).await, "argv ");
    assert_eq!(
        argv,
        json!([
            "-i",
            id.to_string(),
            "-u",
            server.config.ipc_socket,
            "-l",
            "100"
        ])
    );
    let got = text_output(&mut data, id, 5).await;
    assert_eq!(json_after(&got, "got 0 "), request);
    // Type 4 (JPEG) arrives as bytes on the data channel; type 6 (error text) on the admin
    // channel as pipe_message, not on the data channel.
    assert_eq!(output(&mut data, id).await, (4, JPEG.to_vec()));
    let message = recv_method(&mut admin, method::PIPE_MESSAGE).await;
    assert_eq!(message.headers.pipe_id, Some(id));
    assert_eq!(message.payload, Some(json!("no such model")));

    // property: the request with command_set_property.pipe_id set, as type 0.
    let property = json!({"client_id": 1, "command_type": 2, "command_set_property": {"pipe_id": 99, "cvdlfilter0": {"algopipeline": "detection"}}});
    send(
        &mut admin,
        json!({"headers": {"method": "property", "pipe_id": id}, "payload": property}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_property {id}")).await;
    let got = json_after(&text_output(&mut data, id, 5).await, "command 0 ");
    assert_eq!(got["command_set_property"]["pipe_id"], json!(id));
    assert_eq!(
        got["command_set_property"]["cvdlfilter0"],
        property["command_set_property"]["cvdlfilter0"]
    );
    // A dlafs property without its object is refused.
    send(
        &mut admin,
        json!({"headers": {"method": "property", "pipe_id": id}, "payload": {"x": 1}}),
    )
    .await;
    expect_reply(&mut admin, 400, "command_set_property").await;

    // destroy: the pipe is asked with the destroy request (ids set), as type 0, and exits.
    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": id},
               "payload": {"client_id": 1, "command_type": 1, "command_destroy": {"pipe_id": 3}}}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_destroy {id}")).await;
    let got = json_after(&text_output(&mut data, id, 5).await, "command 0 ");
    assert_eq!(got["command_destroy"]["pipe_id"], json!(id));
    assert!(got["command_destroy"]["client_id"].is_u64(), "{got}");
    let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
    server.assert_no_pipe_processes(STEP).await;
}

#[tokio::test]
async fn a_kmb_pipe_runs_end_to_end() {
    let server = TestServer::start_with(|c| standin(c, Dialect::Kmb, "kmb", "ok", &[])).await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let request =
        json!({"pipe_num": 1, "Config": {"model": "m"}, "Launch": "videotestsrc ! fakesink"});
    let id = create(&mut admin, &request).await;

    text_output(&mut data, id, 0).await; // argv
    assert_eq!(
        text_output(&mut data, id, 0).await,
        "got 2 {\"model\":\"m\"}"
    );
    assert_eq!(
        text_output(&mut data, id, 0).await,
        "got 3 videotestsrc ! fakesink"
    );
    assert_eq!(output(&mut data, id).await, (6, JPEG.to_vec()));
    // Type 7 goes to both channels.
    assert_eq!(text_output(&mut data, id, 7).await, "no such model");
    let message = recv_method(&mut admin, method::PIPE_MESSAGE).await;
    assert_eq!(message.payload, Some(json!("no such model")));

    send(
        &mut admin,
        json!({"headers": {"method": "property", "pipe_id": id}, "payload": {"x": 1}}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_property {id}")).await;
    assert_eq!(text_output(&mut data, id, 0).await, "command 4 {\"x\":1}");

    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": id}}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_destroy {id}")).await;
    assert_eq!(text_output(&mut data, id, 0).await, "command 5 destroy");
    let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
    server.assert_no_pipe_processes(STEP).await;
}

/// Creates one pipe under `server` and checks that it never checks in (it is stopped by the
/// check-in timer, having had nothing) and sent nothing to the data channel.
async fn never_checks_in(server: &TestServer, create_payload: Value) {
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create(&mut admin, &create_payload).await;
    let listed = list(&mut admin).await;
    assert_eq!(listed["pipes"][0]["checked_in"], json!(false), "{listed}");
    let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
    match data.recv_timeout(Duration::from_millis(200)).await {
        Ok(Some(Incoming::Message(m))) => panic!("the pipe had output: {m:?}"),
        Ok(Some(Incoming::Binary(b))) => panic!("the pipe had output: {b:?}"),
        _ => {}
    }
}

#[tokio::test]
async fn the_other_dialects_check_in_is_refused() {
    let checkin_timeout = |c: &mut Config| c.limits.pipe_checkin_timeout_secs = 2;
    // A KMB pipe under a dlafs command, and a dlafs pipe under a KMB command.
    let dlafs = TestServer::start_with(|c| {
        standin(c, Dialect::Dlafs, "kmb", "ok", &[]);
        checkin_timeout(c);
    })
    .await;
    let kmb = TestServer::start_with(|c| {
        standin(c, Dialect::Kmb, "dlafs", "ok", &[]);
        checkin_timeout(c);
    })
    .await;
    tokio::join!(
        never_checks_in(&dlafs, json!({"command_create": {"pipe_num": 1}})),
        never_checks_in(&kmb, json!({"launch": "x"})),
    );
}

#[tokio::test]
async fn a_malformed_frame_from_a_dlafs_pipe_stops_it() {
    let server =
        TestServer::start_with(|c| standin(c, Dialect::Dlafs, "dlafs", "garbage", &[])).await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create(&mut admin, &json!({"command_create": {"pipe_num": 1}})).await;
    text_output(&mut data, id, 5).await; // argv
    text_output(&mut data, id, 5).await; // the create request
    let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
    server.assert_no_pipe_processes(STEP).await;
}

#[tokio::test]
async fn create_placeholders_are_validated_and_nothing_is_spawned_for_a_refusal() {
    let server = TestServer::start_with(|c| {
        standin(
            c,
            Dialect::Dlafs,
            "dlafs",
            "ok",
            &[
                "-l",
                "{create.command_create.loop_times}",
                "--model={create.model}",
            ],
        );
    })
    .await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    for (payload, wanted) in [
        (
            json!({"command_create": {"pipe_num": 2}, "model": "m"}),
            "has no command_create.loop_times",
        ),
        (
            json!({"command_create": {"loop_times": null}, "model": "m"}),
            "has no command_create.loop_times",
        ),
        (
            json!({"command_create": {"loop_times": 1}, "model": "$(reboot)"}),
            "create.model must be",
        ),
        (
            json!({"command_create": {"loop_times": 1}, "model": "-rf"}),
            "create.model must be",
        ),
        (
            json!({"command_create": {"loop_times": 1}, "model": ""}),
            "create.model must be",
        ),
        (
            json!({"command_create": {"loop_times": [1]}, "model": "m"}),
            "create.command_create.loop_times must be",
        ),
        (
            json!({"command_create": {"loop_times": {"a": 1}}, "model": "m"}),
            "create.command_create.loop_times must be",
        ),
    ] {
        send(
            &mut admin,
            json!({"headers": {"method": "create"}, "payload": payload}),
        )
        .await;
        expect_reply(&mut admin, 400, wanted).await;
    }
    // Numbers: only plain non-negative integers of 64 bits, as the client wrote them (a larger
    // one became `1.8446744073709552e+19` on argv, a negative one a leading `-`).
    for number in ["18446744073709551616", "-1", "-0", "2.5", "1.0", "1e3"] {
        let request = format!(
            r#"{{"headers":{{"method":"create"}},"payload":{{"command_create":{{"loop_times":{number}}},"model":"m"}}}}"#
        );
        admin.send_text(&request).await.expect("send");
        expect_reply(
            &mut admin,
            400,
            "create.command_create.loop_times must be an integer from 0 to 18446744073709551615",
        )
        .await;
    }
    let listed = list(&mut admin).await;
    assert_eq!(listed["pipes"], json!([]), "{listed}");
    assert!(server.pipe_processes().is_empty(), "nothing was spawned");

    // Valid values are substituted as they are, inside a longer argument too.
    let id = create(
        &mut admin,
        &json!({"command_create": {"loop_times": 7}, "model": "yolo_v1.tiny-2"}),
    )
    .await;
    let argv = json_after(&text_output(&mut data, id, 5).await, "argv ");
    assert_eq!(
        argv,
        json!([
            "-i",
            id.to_string(),
            "-u",
            server.config.ipc_socket,
            "-l",
            "7",
            "--model=yolo_v1.tiny-2"
        ])
    );
    let _: Message = recv_method(&mut admin, method::PIPE_INFO).await;
}
