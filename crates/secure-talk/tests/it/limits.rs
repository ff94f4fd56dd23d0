//! Per-client pipe limit and the client limit.

use secure_talk::client::{self, ClientError};
use secure_talk::hub::Channel;
use serde_json::json;

use crate::support::{TestServer, connect, create_pipe, expect_reply, http, send};

#[tokio::test]
async fn a_third_pipe_is_refused_with_503() {
    let server = TestServer::start_with(|c| c.limits.max_pipes_per_client = 2).await;
    let mut admin = connect(&server.alice("a"), Channel::Admin).await;
    create_pipe(&mut admin, "sleep 30").await;
    create_pipe(&mut admin, "sleep 30").await;
    send(
        &mut admin,
        json!({"headers": {"method": "create"}, "payload": {"launch": "sleep 30"}}),
    )
    .await;
    expect_reply(&mut admin, 503, "max_pipes_per_client").await;
    // pipe_num beyond the limit is refused as a whole.
    let mut other = connect(&server.bob("b"), Channel::Admin).await;
    send(
        &mut other,
        json!({"headers": {"method": "create"}, "payload": {"launch": "sleep 30", "pipe_num": 3}}),
    )
    .await;
    expect_reply(&mut other, 503, "max_pipes_per_client").await;
    assert_eq!(server.server.pipes(), 2);
}

#[tokio::test]
async fn a_second_client_beyond_max_clients_gets_503() {
    let server = TestServer::start_with(|c| c.limits.max_clients = 1).await;
    let first = server.alice("a");
    let admin = connect(&first, Channel::Admin).await;
    // The same client may open its other channel.
    let data = connect(&first, Channel::Data).await;

    let second = server.bob("b");
    let (_, token) = http(&second, "GET", "/", None).await;
    match client::upgrade(&second, Channel::Admin, &token).await {
        Err(ClientError::Refused { status: 503, body }) => {
            assert!(body.contains("too many clients"), "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // Once the first client leaves, the second gets in.
    admin.close().await.expect("close");
    drop(data);
    let deadline = tokio::time::Instant::now() + crate::support::STEP;
    loop {
        match client::upgrade(&second, Channel::Admin, &token).await {
            Ok(_) => break,
            Err(ClientError::Refused { status: 503, .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(err) => panic!("the second client never got in: {err}"),
        }
    }
}
