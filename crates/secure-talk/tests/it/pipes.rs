//! Pipes end to end over TLS: real `secure-talk-pipe` processes, output on the data channel,
//! errors on the admin channel, destroy, stdin, ownership, reconnection and the orphan reaper.

use std::time::Duration;

use common::envelope::talk::method;
use secure_talk::config::AdminSubject;
use secure_talk::hub::Channel;
use serde_json::{Value, json};

use crate::support::{
    STEP, TestServer, alive, closed, connect, create_pipe, data_until, expect_reply, list,
    listed_pid, listed_pipes, recv_message, recv_method, send, wait_checked_in,
};

#[tokio::test]
async fn output_reaches_data_stderr_reaches_admin_then_pipe_delete() {
    let server = TestServer::start().await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;

    let id = create_pipe(&mut admin, "sh -c 'echo hello; echo oops >&2'").await;
    let out = recv_message(&mut data, "stdout on the data channel", |m| {
        m.headers.kind == Some(0)
    })
    .await;
    assert_eq!(
        serde_json::to_value(&out).expect("json"),
        json!({"headers": {"type": 0, "pipe_id": id}, "payload": "hello\n"})
    );
    // stderr as pipe_message, and pipe_delete once it exited, in either order.
    let (mut stderr, mut deleted) = (String::new(), false);
    while !(deleted && stderr.contains("oops")) {
        let message = recv_message(&mut admin, "pipe_message and pipe_delete", |m| {
            matches!(m.method(), method::PIPE_MESSAGE | method::PIPE_DELETE)
        })
        .await;
        if message.method() == method::PIPE_DELETE {
            assert_eq!(message.payload, Some(json!([id])));
            deleted = true;
        } else {
            assert_eq!(message.headers.pipe_id, Some(id));
            stderr.push_str(
                message
                    .payload
                    .as_ref()
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            );
        }
    }
    assert_eq!(stderr, "oops\n");
    assert!(listed_pipes(&list(&mut admin).await).is_empty());
    server.assert_no_pipe_processes(STEP).await;
}

#[tokio::test]
async fn destroy_stops_a_long_running_pipe_and_its_process() {
    let server = TestServer::start().await;
    let mut admin = connect(&server.alice("a"), Channel::Admin).await;
    let id = create_pipe(&mut admin, "sleep 30").await;
    wait_checked_in(&mut admin, id).await;
    let pid = listed_pid(&list(&mut admin).await, id);
    assert!(alive(pid));
    testkit::until("the pipe to launch sleep", STEP, || {
        server.pipe_processes().len() >= 2
    })
    .await;

    let started = std::time::Instant::now();
    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": id}}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_destroy {id}")).await;
    let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    testkit::until("the pipe process to go", STEP, || !alive(pid)).await;
    server.assert_no_pipe_processes(STEP).await;
    // A second destroy finds nothing.
    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": id}}),
    )
    .await;
    expect_reply(&mut admin, 404, "has no pipes yet").await;
}

#[tokio::test]
async fn send_and_property_reach_the_commands_stdin() {
    let server = TestServer::start().await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "cat").await;

    send(
        &mut admin,
        json!({"headers": {"method": "send", "pipe_id": id}, "payload": "ping\n"}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_send {id}")).await;
    assert_eq!(data_until(&mut data, id, "ping\n").await, "ping\n");

    let property = json!({"stdin": "prop\n", "gain": 3});
    send(
        &mut admin,
        json!({"headers": {"method": "property", "pipe_id": id}, "payload": property}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_property {id}")).await;
    assert_eq!(data_until(&mut data, id, "prop\n").await, "prop\n");
    // Property as a JSON string works too, and the last one is listed.
    let text = json!({"stdin": "again\n"}).to_string();
    send(
        &mut admin,
        json!({"headers": {"method": "property", "pipe_id": id}, "payload": text}),
    )
    .await;
    expect_reply(&mut admin, 200, "pipe_property").await;
    data_until(&mut data, id, "again\n").await;
    let listed = list(&mut admin).await;
    assert_eq!(listed["pipes"][0]["property"], json!({"stdin": "again\n"}));
    // Not JSON: refused.
    send(
        &mut admin,
        json!({"headers": {"method": "property", "pipe_id": id}, "payload": "{"}),
    )
    .await;
    expect_reply(&mut admin, 400, "json format error").await;
    // Missing pipe id.
    send(
        &mut admin,
        json!({"headers": {"method": "send"}, "payload": "x"}),
    )
    .await;
    expect_reply(&mut admin, 400, "pipe_id is required").await;
}

#[tokio::test]
async fn ownership_is_enforced_and_an_admin_identity_sees_and_disconnects() {
    let server =
        TestServer::start_with(|c| c.admin_subjects = vec![AdminSubject::Cn("alice".into())]).await;
    let mut a = connect(&server.bob("a"), Channel::Admin).await;
    let mut b = connect(&server.bob("b"), Channel::Admin).await;
    let mut b_data = connect(&server.bob("b"), Channel::Data).await;
    assert_ne!(a.client_id, b.client_id);
    let pipe_a = create_pipe(&mut a, "sleep 30").await;

    // B owns nothing yet.
    for request in [
        json!({"headers": {"method": "property", "pipe_id": pipe_a}, "payload": {"stdin": "x\n"}}),
        json!({"headers": {"method": "destroy", "pipe_id": pipe_a}}),
        json!({"headers": {"method": "send", "pipe_id": pipe_a}, "payload": "x\n"}),
    ] {
        send(&mut b, request).await;
        let wanted = format!("client {} has no pipes yet", b.client_id);
        expect_reply(&mut b, 404, &wanted).await;
    }
    // With a pipe of its own, A's is still "not exists" to B.
    let pipe_b = create_pipe(&mut b, "sleep 30").await;
    for request in [
        json!({"headers": {"method": "property", "pipe_id": pipe_a}, "payload": {"stdin": "x\n"}}),
        json!({"headers": {"method": "destroy", "pipe_id": pipe_a}}),
        json!({"headers": {"method": "send", "pipe_id": pipe_a}, "payload": "x\n"}),
    ] {
        send(&mut b, request).await;
        expect_reply(&mut b, 404, &format!("pipe {pipe_a} not exists")).await;
    }
    let b_list = list(&mut b).await;
    assert_eq!(listed_pipes(&b_list), vec![pipe_b]);
    assert_eq!(b_list["admin"], json!(false));
    let clients: Vec<u64> = b_list["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["client_id"].as_u64().expect("id"))
        .collect();
    assert_eq!(clients, vec![b.client_id]);
    assert_eq!(listed_pipes(&list(&mut a).await), vec![pipe_a]);

    // Non-admins may not disconnect anyone.
    send(
        &mut b,
        json!({"headers": {"method": "disconnect", "client_id": a.client_id}}),
    )
    .await;
    expect_reply(&mut b, 403, "admin").await;

    // Alice is an admin: she sees everything and disconnects B.
    let mut admin = connect(&server.alice("admin"), Channel::Admin).await;
    let all = list(&mut admin).await;
    assert_eq!(all["admin"], json!(true));
    let mut pipes = listed_pipes(&all);
    pipes.sort_unstable();
    assert_eq!(pipes, vec![pipe_a, pipe_b]);
    for client in [a.client_id, b.client_id, admin.client_id] {
        assert!(
            all["clients"]
                .as_array()
                .expect("clients")
                .iter()
                .any(|c| c["client_id"] == json!(client)),
            "{client} missing from {all}"
        );
    }
    // An admin still cannot touch another client's pipe.
    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": pipe_a}}),
    )
    .await;
    expect_reply(&mut admin, 404, "").await;

    send(
        &mut admin,
        json!({"headers": {"method": "disconnect", "client_id": b.client_id}}),
    )
    .await;
    expect_reply(&mut admin, 200, "disconnected").await;
    assert_eq!(
        closed(&mut b).await.map(|c| c.0),
        Some(secure_talk::CLOSE_DISCONNECTED)
    );
    assert_eq!(
        closed(&mut b_data).await.map(|c| c.0),
        Some(secure_talk::CLOSE_DISCONNECTED)
    );
    send(
        &mut admin,
        json!({"headers": {"method": "disconnect", "client_id": 999_999}}),
    )
    .await;
    expect_reply(&mut admin, 404, "not connected").await;
    // A is untouched.
    send(
        &mut a,
        json!({"headers": {"method": "destroy", "pipe_id": pipe_a}}),
    )
    .await;
    expect_reply(&mut a, 200, "pipe_destroy").await;
}

#[tokio::test]
async fn pipes_survive_the_owners_disconnect_and_are_listed_on_reconnect() {
    let server = TestServer::start().await;
    let opts = server.alice("a");
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, "sleep 30").await;
    let client_id = admin.client_id;
    admin.close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.server.pipes(), 1);

    let mut admin = connect(&opts, Channel::Admin).await;
    assert_eq!(admin.client_id, client_id, "same token, same identity");
    let first = admin
        .recv_timeout(STEP)
        .await
        .expect("recv")
        .expect("a greeting");
    let secure_talk::client::Incoming::Message(first) = first else {
        panic!("expected pipe_id first, got {first:?}");
    };
    assert_eq!(first.method(), method::PIPE_ID);
    assert_eq!(first.payload, Some(json!([id])));

    send(
        &mut admin,
        json!({"headers": {"method": "destroy", "pipe_id": id}}),
    )
    .await;
    expect_reply(&mut admin, 200, &format!("pipe_destroy {id}")).await;
    let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
    server.assert_no_pipe_processes(STEP).await;
}

#[tokio::test]
async fn a_second_admin_connection_replaces_the_first() {
    let server = TestServer::start().await;
    let opts = server.alice("a");
    let mut first = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut first, "sleep 30").await;
    let mut second = connect(&opts, Channel::Admin).await;
    assert_eq!(second.client_id, first.client_id);
    assert_eq!(
        closed(&mut first).await.map(|c| c.0),
        Some(secure_talk::CLOSE_REPLACED)
    );
    let ids = recv_method(&mut second, method::PIPE_ID).await;
    assert_eq!(ids.payload, Some(json!([id])));
    // The old connection's end did not unregister the new one: pipe_delete still arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(
        &mut second,
        json!({"headers": {"method": "destroy", "pipe_id": id}}),
    )
    .await;
    expect_reply(&mut second, 200, "pipe_destroy").await;
    let deleted = recv_method(&mut second, method::PIPE_DELETE).await;
    assert_eq!(deleted.payload, Some(json!([id])));
}

#[tokio::test]
async fn orphan_pipes_are_reaped_after_the_timeout() {
    let server = TestServer::start_with(|c| c.limits.orphan_pipe_timeout_secs = 1).await;
    let mut admin = connect(&server.alice("a"), Channel::Admin).await;
    let id = create_pipe(&mut admin, "sleep 30").await;
    wait_checked_in(&mut admin, id).await;
    // While the owner is connected nothing is reaped.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(listed_pipes(&list(&mut admin).await), vec![id]);
    admin.close().await.expect("close");
    let gone = std::time::Instant::now();
    testkit::until("the orphan to be reaped", Duration::from_secs(6), || {
        server.server.pipes() == 0
    })
    .await;
    assert!(
        gone.elapsed() >= Duration::from_millis(900),
        "{:?}",
        gone.elapsed()
    );
    server.assert_no_pipe_processes(STEP).await;
}

/// Many pipes started at once on a multi-threaded runtime (as the daemon runs): every one
/// checks in and delivers its output, however quickly it connects after being spawned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_started_in_bursts_all_check_in() {
    let server = TestServer::start_with(|c| {
        c.limits.max_pipes_per_client = 16;
        c.limits.max_pipes = 16;
    })
    .await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    for round in 0..4 {
        send(
            &mut admin,
            json!({"headers": {"method": "create"}, "payload": {"launch": "echo burst", "pipe_num": 8}}),
        )
        .await;
        let mut ids = Vec::new();
        while ids.len() < 8 {
            let text = expect_reply(&mut admin, 200, "pipe_create ").await;
            ids.push(
                text.trim_start_matches("pipe_create ")
                    .parse::<u64>()
                    .expect("id"),
            );
        }
        let mut pending: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        while !pending.is_empty() {
            let message = recv_message(
                &mut data,
                &format!("round {round}: output of {pending:?}"),
                |m| m.headers.kind == Some(0),
            )
            .await;
            assert_eq!(message.payload, Some(json!("burst\n")));
            pending.remove(&message.headers.pipe_id.expect("pipe id"));
        }
        let mut deleted = 0;
        while deleted < 8 {
            recv_method(&mut admin, method::PIPE_DELETE).await;
            deleted += 1;
        }
    }
}

/// A second admin connection of a client attaches and closes while the first is still busy:
/// the first connection's creates, handled after the client's entry was dropped, still count
/// against `max_pipes_per_client`, and the orphan reaper stops every pipe they started.
#[tokio::test]
async fn creates_of_a_replaced_admin_connection_keep_the_limit_and_are_reaped() {
    use common::envelope::talk::Message;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::{Message as WsMessage, protocol::Role};

    const LISTS: usize = 50;
    const CREATES: usize = 8;
    let server = TestServer::start_with(|c| {
        c.admin_subjects = vec![AdminSubject::Cn("alice".into())];
        c.limits.max_pipes_per_client = 6;
        c.limits.max_pipe_spec_bytes = 64 << 10;
        c.limits.orphan_pipe_timeout_secs = 1;
    })
    .await;
    // Bob's six pipes, each with a 60 KB create JSON, make an admin's `list` reply 360 KB.
    let mut bob = connect(&server.bob("bob"), Channel::Admin).await;
    let pad = "y".repeat(60_000);
    send(
        &mut bob,
        json!({"headers": {"method": "create"},
               "payload": {"launch": "sleep 30", "pipe_num": 6, "pad": pad}}),
    )
    .await;
    for _ in 0..6 {
        expect_reply(&mut bob, 200, "pipe_create").await;
    }

    // Alice (an admin) sends, in one write, 50 lists (18 MB of replies she does not read:
    // the server blocks writing them) and 8 creates behind them, all in one batch.
    let alice = server.alice("alice");
    let first = connect(&alice, Channel::Admin).await;
    let mut ws = WebSocketStream::from_raw_socket(first.into_stream(), Role::Client, None).await;
    let listing = json!({"headers": {"method": "list"}}).to_string();
    let create =
        json!({"headers": {"method": "create"}, "payload": {"launch": "sleep 30"}}).to_string();
    for _ in 0..LISTS {
        ws.feed(WsMessage::text(listing.clone()))
            .await
            .expect("feed");
    }
    for _ in 0..CREATES {
        ws.feed(WsMessage::text(create.clone()))
            .await
            .expect("feed");
    }
    ws.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.server.pipes(),
        6,
        "the server is blocked before the creates"
    );
    // Her second admin connection attaches (replacing the busy one) and closes.
    let second = connect(&alice, Channel::Admin).await;
    second.close().await.expect("close");
    testkit::until("the second connection to detach", STEP, || {
        server.server.connected_clients() == 1
    })
    .await;

    // The busy connection goes on: its creates come after her client entry was removed.
    let (mut created, mut refused) = (0, 0);
    tokio::time::timeout(STEP, async {
        while created + refused < CREATES {
            let text = match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(WsMessage::Text(text))) => text,
                Some(Ok(_)) => continue,
            };
            let message = Message::decode(text.as_bytes(), 16 << 20).expect("a JSON reply");
            let text = message.payload.as_ref().and_then(Value::as_str);
            match message.headers.code {
                Some(200) if text.is_some_and(|t| t.starts_with("pipe_create")) => created += 1,
                Some(503) => refused += 1,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{created} created and {refused} refused in time"));
    assert_eq!(
        (created, refused),
        (6, CREATES - 6),
        "max_pipes_per_client holds"
    );
    assert_eq!(server.server.pipes(), 12);
    // Alice has no registered connection: the reaper stops every one of her pipes, and
    // only hers (Bob is connected).
    testkit::until("the orphans to be reaped", Duration::from_secs(6), || {
        server.server.pipes() == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.server.pipes(), 6, "the connected owner's pipes stay");
    assert_eq!(
        list(&mut bob).await["pipes"].as_array().map(Vec::len),
        Some(6)
    );
}
