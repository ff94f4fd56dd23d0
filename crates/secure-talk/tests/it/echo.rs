//! The admin channel's `text` echo and its error replies.

use common::envelope::talk::{BinaryMessage, Headers};
use secure_talk::client::Incoming;
use secure_talk::hub::Channel;
use serde_json::json;

use crate::support::{STEP, TestServer, connect, expect_reply, recv_until, send};

async fn next_text(conn: &mut secure_talk::client::Connection) -> String {
    let frame = tokio::time::timeout(STEP, conn.recv_frame())
        .await
        .expect("a frame in time")
        .expect("recv")
        .expect("a frame");
    frame.into_text().expect("a text frame").as_str().to_owned()
}

#[tokio::test]
async fn text_comes_back_identical() {
    let server = TestServer::start().await;
    let mut admin = connect(&server.alice("a"), Channel::Admin).await;
    for text in [
        r#"{"headers":{"method":"text"},"payload":"hi"}"#,
        r#"{ "headers" : { "method" : "text", "x": [1, 2.50] }, "payload": {"é": null}, "checkSum": "z" }"#,
        r#"{"headers":{"method":"text"}}"#,
    ] {
        admin.send_text(text).await.expect("send");
        assert_eq!(next_text(&mut admin).await, text);
    }
    // A binary `text` message is checked and echoed as clean JSON.
    let message = BinaryMessage::new(Headers::method("text"), &b"bin hi"[..]);
    admin.send_binary(&message).await.expect("send");
    let echo = recv_until(&mut admin, "binary echo", |m| {
        matches!(m, Incoming::Message(_))
    })
    .await;
    let Incoming::Message(echo) = echo else {
        unreachable!()
    };
    assert_eq!(echo.payload, Some(json!("bin hi")));
    assert_eq!(echo.check_sum.as_deref(), Some(message.check_sum.as_str()));
    assert_eq!(echo.extra.get("checkSumPass"), Some(&json!(true)));
}

#[tokio::test]
async fn bad_messages_get_400_and_the_channel_stays_usable_until_one_is_too_big() {
    let server = TestServer::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let mut admin = connect(&server.alice("a"), Channel::Admin).await;
    for (text, code, contains) in [
        ("not json".to_owned(), 400, "json format error"),
        ("[1,2]".to_owned(), 400, "json format error"),
        (
            r#"{"payload":"no headers"}"#.to_owned(),
            400,
            "json format error",
        ),
        (r#"{"headers":"text"}"#.to_owned(), 400, "json format error"),
        (r#"{"headers":{}}"#.to_owned(), 400, "method is missing"),
        (
            r#"{"headers":{"method":"nope"}}"#.to_owned(),
            400,
            "unknown method",
        ),
        (
            r#"{"headers":{"method":"destroy","pipe_id":"x"}}"#.to_owned(),
            400,
            "json format error",
        ),
    ] {
        admin.send_text(text.as_str()).await.expect("send");
        expect_reply(&mut admin, code, contains).await;
    }
    // A broken binary message.
    admin
        .send_binary(&BinaryMessage {
            headers: Headers::method("text"),
            payload: bytes::Bytes::from_static(b"x"),
            check_sum: "0".repeat(32),
        })
        .await
        .expect("send");
    expect_reply(&mut admin, 422, "checksum").await;
    send(
        &mut admin,
        json!({"headers": {"method": "text"}, "payload": "still here"}),
    )
    .await;
    let text = next_text(&mut admin).await;
    assert!(text.contains("still here"), "{text}");
    // A message over max_message_bytes is not read into memory: the connection closes (1009).
    send(
        &mut admin,
        json!({"headers": {"method": "text"}, "payload": "x".repeat(2000)}),
    )
    .await;
    let (code, reason) = crate::support::closed(&mut admin)
        .await
        .expect("a close frame");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("larger than 1024"), "{reason}");
}
