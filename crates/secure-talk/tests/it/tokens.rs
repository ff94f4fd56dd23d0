//! The token endpoint and the upgrade's token check, over TLS with real HTTP requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secure_talk::client::{self, ClientError};
use secure_talk::hub::Channel;
use secure_talk::token::{Tokens, peek};
use serde_json::{Value, json};

use crate::support::{TestServer, connect, expect_reply, http, send, upgrade_status};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn jwt_header(token: &str) -> Value {
    let part = token.split('.').next().expect("a header part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

#[tokio::test]
async fn get_issues_a_jwt_and_returns_a_valid_one_unchanged() {
    let server = TestServer::start().await;
    let opts = server.alice("a");

    let (status, token) = http(&opts, "GET", "/", None).await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(jwt_header(&token), json!({"alg": "HS256", "typ": "JWT"}));
    let claims = peek(&token).expect("claims");
    assert!(claims.client_id >= 1);
    assert!(claims.iat.abs_diff(now()) <= 5, "iat {}", claims.iat);
    assert_eq!(
        claims.exp,
        claims.iat + server.config.token_lifetime.as_secs()
    );

    // A valid token comes back byte for byte, on / and on /data.
    for path in ["/", "/data"] {
        let (status, again) = http(&opts, "GET", path, Some(&token)).await;
        assert_eq!((status, again.as_str()), (200, token.as_str()), "{path}");
    }
    // /data issues too, a new identity each time.
    let (status, other) = http(&opts, "GET", "/data", None).await;
    assert_eq!(status, 200);
    let other_id = peek(&other).expect("claims").client_id;
    assert_ne!(other_id, claims.client_id);

    // Forged: the victim's id under another key; alg none; junk. Each gets a new identity.
    let forged =
        Tokens::random(Duration::from_secs(3600)).issue_for(claims.client_id, SystemTime::now());
    let body = b64(serde_json::to_string(&claims).expect("json").as_bytes());
    let none = format!("{}.{body}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    let mut seen = vec![claims.client_id, other_id];
    for bad in [forged.as_str(), none.as_str(), "null", "a.b.c"] {
        let (status, answer) = http(&opts, "GET", "/", Some(bad)).await;
        assert_eq!(status, 200, "{bad}");
        assert_ne!(answer, bad);
        let id = peek(&answer).expect("a new token").client_id;
        assert!(!seen.contains(&id), "{bad}: id {id} handed out before");
        seen.push(id);
        // And it opens no websocket.
        assert_eq!(upgrade_status(&opts, "/", Some(bad)).await, 401, "{bad}");
    }

    // The original token still works for a websocket.
    let mut conn = client::upgrade(&opts, Channel::Admin, &token)
        .await
        .expect("upgrade with the issued token");
    assert_eq!(conn.client_id, claims.client_id);
    send(&mut conn, json!({"headers": {"method": "nope"}})).await;
    expect_reply(&mut conn, 400, "unknown method").await;
}

#[tokio::test]
async fn other_requests_are_404_post_is_empty_200() {
    let server = TestServer::start().await;
    let opts = server.alice("a");
    for (method, target, status) in [
        ("GET", "/?x=1", 404),
        ("GET", "/data?x=1", 404),
        ("GET", "/data/", 404),
        ("GET", "/DATA", 404),
        ("GET", "/other", 404),
        ("POST", "/other", 404),
        ("PUT", "/", 404),
    ] {
        let (got, _) = http(&opts, method, target, None).await;
        assert_eq!(got, status, "{method} {target}");
    }
    for target in ["/", "/data"] {
        let (status, body) = http(&opts, "POST", target, None).await;
        assert_eq!((status, body.as_str()), (200, ""), "POST {target}");
    }
    // Over the Unix socket too.
    let (status, _) = http(&server.unix("u"), "GET", "/?x=1", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_expired_token_is_replaced() {
    let server = TestServer::start_with(|c| c.token_lifetime = Duration::from_secs(1)).await;
    let opts = server.alice("a");
    let (_, token) = http(&opts, "GET", "/", None).await;
    let claims = peek(&token).expect("claims");
    assert_eq!(claims.exp, claims.iat + 1);
    let (_, same) = http(&opts, "GET", "/", Some(&token)).await;
    assert_eq!(same, token, "still valid at first");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(upgrade_status(&opts, "/", Some(&token)).await, 401);
    let (status, fresh) = http(&opts, "GET", "/", Some(&token)).await;
    assert_eq!(status, 200);
    assert_ne!(fresh, token);
    assert_ne!(peek(&fresh).expect("claims").client_id, claims.client_id);
}

#[tokio::test]
async fn upgrades_need_a_valid_token_and_a_known_path() {
    let server = TestServer::start().await;
    let opts = server.alice("a");
    let (_, token) = http(&opts, "GET", "/", None).await;

    for path in ["/", "/data"] {
        assert_eq!(upgrade_status(&opts, path, None).await, 401, "{path}");
        assert_eq!(upgrade_status(&opts, path, Some("garbage")).await, 401);
        assert_eq!(
            upgrade_status(&opts, path, Some(&token)).await,
            101,
            "{path}"
        );
    }
    assert_eq!(upgrade_status(&opts, "/other", Some(&token)).await, 404);
    assert_eq!(upgrade_status(&opts, "/data/x", Some(&token)).await, 404);
    let (status, _) = http(&opts, "GET", "/other", Some(&token)).await;
    assert_eq!(status, 404);

    // Through the client library: a JWT the server did not sign is a 401.
    let forged = Tokens::random(Duration::from_secs(60))
        .issue(SystemTime::now())
        .1;
    for channel in [Channel::Admin, Channel::Data] {
        match client::upgrade(&opts, channel, &forged).await {
            Err(ClientError::Refused { status: 401, .. }) => {}
            other => panic!("{channel:?}: expected 401, got {other:?}"),
        }
    }
    // A refused client gets a fresh token through connect and then succeeds.
    std::fs::write(server.token_file("a"), &forged).expect("plant a forged token");
    let conn = connect(&opts, Channel::Data).await;
    assert_ne!(conn.token, forged);
    assert_eq!(
        std::fs::read_to_string(server.token_file("a")).expect("token file"),
        conn.token
    );
}
