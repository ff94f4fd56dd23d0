//! Pairing and relaying: order, isolation, HELLO rules, queues, partner loss, keepalive, sizes.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use testkit::test_pki;
use tokio_tungstenite::tungstenite::Message;
use ws_proxy::OnPartnerLeave;
use ws_proxy::client::ClientError;
use ws_proxy::metrics::Ending;

use crate::support::{Proxy, WAIT, closed, hello, http_get, quick, recv, recv_text, send};

#[tokio::test]
async fn a_pair_exchanges_1000_messages_each_way_in_order() {
    let proxy = Proxy::start(quick()).await;
    let (a, b) = proxy.pair("gw/1").await;
    let (mut a_tx, a_rx) = a.split();
    let (mut b_tx, b_rx) = b.split();
    // Both directions at once, text and binary interleaved.
    let send_a = async {
        for i in 0..1000 {
            a_tx.feed(numbered("a", i)).await.unwrap();
        }
        a_tx.flush().await.unwrap();
    };
    let send_b = async {
        for i in 0..1000 {
            b_tx.feed(numbered("b", i)).await.unwrap();
        }
        b_tx.flush().await.unwrap();
    };
    tokio::time::timeout(
        WAIT,
        futures_util::future::join4(
            send_a,
            send_b,
            read_numbered(b_rx, "a"),
            read_numbered(a_rx, "b"),
        ),
    )
    .await
    .expect("relay in time");
    let counters = proxy.server.status().counters;
    assert_eq!(counters.messages_relayed, 2000);
    assert_eq!(counters.pairs, 1);
    proxy.stop().await;
}

fn numbered(from: &str, i: u32) -> Message {
    if i % 3 == 0 {
        Message::binary(format!("{from}{i}").into_bytes())
    } else {
        Message::text(format!("{{\"from\":\"{from}\",\"n\":{i}}}"))
    }
}

async fn read_numbered(
    mut rx: futures_util::stream::SplitStream<ws_proxy::client::PeerStream>,
    from: &str,
) {
    let mut i = 0;
    while i < 1000 {
        match rx.next().await.unwrap().unwrap() {
            Message::Ping(_) | Message::Pong(_) => continue,
            got => assert_eq!(got, numbered(from, i), "message {i} from {from}"),
        }
        i += 1;
    }
}

#[tokio::test]
async fn hello_is_forwarded_byte_for_byte_and_binary_stays_binary() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    let odd = "{ \"message\" : {\"requiresResponse\":false, \"messageType\":\"CONN:HELLO\",\n \"messageId\": 0, \"peerId\": \"caf\u{e9}\", \"zzz\": NaN}}";
    let mut a = proxy.connect(&pki.alice, "x").await;
    a.send(Message::text(odd)).await.unwrap();
    proxy.wait_for(|s| s.meetups.len() == 1).await;
    let mut b = proxy.connect(&pki.bob, "x").await;
    let binary = hello("b").into_bytes();
    b.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(recv(&mut b).await, Message::text(odd));
    assert_eq!(recv(&mut a).await, Message::binary(binary));
    proxy.stop().await;
}

#[tokio::test]
async fn ids_are_isolated_and_the_query_is_not_part_of_the_id() {
    let proxy = Proxy::start(quick()).await;
    let (mut a1, mut b1) = proxy.pair("gw/1").await;
    let (mut a2, mut b2) = proxy.pair("gw/2").await;
    send(&mut a1, "one").await;
    send(&mut a2, "two").await;
    assert_eq!(recv_text(&mut b1).await, "one");
    assert_eq!(recv_text(&mut b2).await, "two");
    // The id is the path: "gw/1?x=1" is "gw/1", which is full.
    let third = proxy.dial(Some(&test_pki().alice), "gw/1?x=1").await;
    assert!(
        matches!(third, Err(ClientError::Refused { status: 409, .. })),
        "{third:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_third_peer_gets_409_before_the_upgrade() {
    let proxy = Proxy::start(quick()).await;
    let (_a, _b) = proxy.pair("busy").await;
    match proxy.dial(Some(&test_pki().alice), "busy").await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 409);
            assert!(body.contains("two peers"), "{body}");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    proxy.stop().await;
}

#[tokio::test]
async fn pairing_follows_hello_order_not_connection_order() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    // Both connect before either says HELLO (the original's race); the later one speaks first.
    let mut early = proxy.connect(&pki.alice, "race").await;
    let mut late = proxy.connect(&pki.bob, "race").await;
    send(&mut late, &hello("late")).await;
    proxy
        .wait_for(|s| s.meetups.iter().any(|m| m.state == "waiting"))
        .await;
    send(&mut early, &hello("early")).await;
    assert_eq!(recv_text(&mut late).await, hello("early"));
    assert_eq!(recv_text(&mut early).await, hello("late"));
    send(&mut early, "ping").await;
    assert_eq!(recv_text(&mut late).await, "ping");
    proxy.stop().await;
}

#[tokio::test]
async fn a_waiting_peers_messages_are_queued_and_delivered_in_order() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    let mut a = proxy.connect(&pki.alice, "q").await;
    send(&mut a, &hello("a")).await;
    for i in 0..10 {
        send(&mut a, &format!("early {i}")).await;
    }
    proxy
        .wait_for(|s| {
            s.meetups
                .first()
                .is_some_and(|m| m.peers[0].messages_in == 11)
        })
        .await;
    let mut b = proxy.connect(&pki.bob, "q").await;
    send(&mut b, &hello("b")).await;
    assert_eq!(recv_text(&mut b).await, hello("a"));
    for i in 0..10 {
        assert_eq!(recv_text(&mut b).await, format!("early {i}"));
    }
    assert_eq!(recv_text(&mut a).await, hello("b"));
    proxy.stop().await;
}

#[tokio::test]
async fn an_overflowing_wait_queue_closes_with_1008() {
    let mut config = quick();
    config.limits.waiting_queue_messages = 3;
    let proxy = Proxy::start(config).await;
    let mut a = proxy.connect(&test_pki().alice, "q").await;
    send(&mut a, &hello("a")).await;
    for i in 0..4 {
        send(&mut a, &format!("early {i}")).await;
    }
    let (code, reason) = closed(&mut a).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("before a partner"), "{reason}");
    proxy.stop().await;
}

#[tokio::test]
async fn invalid_hellos_close_with_1008_and_a_reason() {
    let proxy = Proxy::start(quick()).await;
    let cases = [
        ("not json", "not json"),
        ("[1]", "not a json object"),
        (
            "{\"message\": {\"messageType\": \"CONN:HELLO\", \"messageId\": 1.0, \"requiresResponse\": false}}",
            "messageId",
        ),
        (
            "{\"message\": {\"messageType\": \"CONN:HELLO\", \"messageId\": 0, \"requiresResponse\": 0}}",
            "requiresResponse",
        ),
        (
            "{\"message\": {\"messageType\": \"conn:hello\", \"messageId\": 0, \"requiresResponse\": false}}",
            "CONN:HELLO",
        ),
    ];
    for (text, expected) in cases {
        let mut peer = proxy.connect(&test_pki().alice, "bad").await;
        send(&mut peer, text).await;
        let (code, reason) = closed(&mut peer).await;
        assert_eq!(code, 1008, "{text}");
        assert!(reason.contains(expected), "{text}: {reason}");
    }
    // A bad HELLO takes no slot.
    assert!(proxy.server.status().meetups.is_empty());
    assert_eq!(proxy.server.metrics().endings(Ending::invalid_hello), 5);
    proxy.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_hello_deadline() {
    let mut config = quick();
    config.limits.hello_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;
    let mut peer = proxy.connect(&test_pki().alice, "slow").await;
    let started = std::time::Instant::now();
    let (code, reason) = closed(&mut peer).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("no HELLO"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(3));
    proxy.stop().await;
}

#[tokio::test]
async fn partner_loss_closes_the_survivor_with_1002() {
    let proxy = Proxy::start(quick()).await;
    let (mut a, b) = proxy.pair("gw/9").await;
    drop(b);
    let (code, reason) = closed(&mut a).await;
    assert_eq!(code, 1002);
    assert_eq!(reason, ws_proxy::PARTNER_LEFT_REASON);
    // The id is free again at once.
    proxy.wait_for(|s| s.meetups.is_empty()).await;
    let (_a, _b) = proxy.pair("gw/9").await;
    proxy.stop().await;
}

#[tokio::test]
async fn in_wait_mode_the_survivor_pairs_again_with_its_hello() {
    let mut config = quick();
    config.on_partner_leave = OnPartnerLeave::Wait;
    let proxy = Proxy::start(config).await;
    let (mut a, mut b) = proxy.pair("gw/w").await;
    b.close(None).await.unwrap();
    proxy
        .wait_for(|s| s.meetups.first().is_some_and(|m| m.state == "waiting"))
        .await;
    send(&mut a, "while alone").await;
    let mut c = proxy.connect(&test_pki().bob, "gw/w").await;
    send(&mut c, &hello("c")).await;
    assert_eq!(recv_text(&mut c).await, hello("a"));
    assert_eq!(recv_text(&mut c).await, "while alone");
    assert_eq!(recv_text(&mut a).await, hello("c"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_peer_that_does_not_answer_pings_is_closed_with_1002() {
    let mut config = quick();
    config.limits.ping_interval = Duration::from_millis(200);
    config.limits.pong_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;
    let (mut a, mut b) = proxy.pair("ka").await;
    // `a` keeps reading (and so answering pings) in the background; `b` stops reading, so
    // its pongs are never sent.
    let reader = tokio::spawn(async move { closed(&mut a).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (code, reason) = closed(&mut b).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("Ping timed out"), "{reason}");
    let (code, reason) = reader.await.unwrap();
    assert_eq!(
        (code, reason.as_str()),
        (1002, ws_proxy::PARTNER_LEFT_REASON)
    );
    assert_eq!(proxy.server.metrics().endings(Ending::ping_timeout), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn an_oversize_message_closes_the_sender_with_1009() {
    let mut config = quick();
    config.limits.max_message_bytes = 64 * 1024;
    let proxy = Proxy::start(config).await;
    let (mut a, mut b) = proxy.pair("big").await;
    // Exactly the limit is relayed.
    let exact = Bytes::from(vec![7u8; 64 * 1024]);
    a.send(Message::Binary(exact.clone())).await.unwrap();
    assert_eq!(recv(&mut b).await, Message::Binary(exact));
    a.send(Message::Binary(Bytes::from(vec![7u8; 64 * 1024 + 1])))
        .await
        .unwrap();
    let (code, _) = closed(&mut a).await;
    assert_eq!(code, 1009);
    let (code, _) = closed(&mut b).await;
    assert_eq!(code, 1002);
    proxy.stop().await;
}

#[tokio::test]
async fn a_slow_reader_slows_its_partner_and_memory_stays_bounded() {
    let mut config = quick();
    config.limits.max_message_bytes = 64 * 1024;
    config.limits.relay_queue_bytes = 128 * 1024;
    let proxy = Proxy::start(config).await;
    let (mut a, mut b) = proxy.pair("slow").await;
    // `b` reads nothing: `a`'s sends must stall once the queue and the socket buffers are full.
    let chunk = Bytes::from(vec![1u8; 64 * 1024]);
    let mut sent = 0usize;
    loop {
        let send = a.send(Message::Binary(chunk.clone()));
        match tokio::time::timeout(Duration::from_millis(500), send).await {
            Ok(result) => result.unwrap(),
            Err(_) => break,
        }
        sent += chunk.len();
        assert!(sent < 256 << 20, "sent {sent} bytes without backpressure");
    }
    // Everything sent arrives once `b` reads.
    let expected = sent / chunk.len();
    let drained = tokio::time::timeout(WAIT, async {
        let mut got = 0;
        while got < expected {
            if let Message::Binary(_) = recv(&mut b).await {
                got += 1;
            }
        }
        got
    })
    .await
    .expect("drained in time");
    assert_eq!(drained, expected);
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_closes_peers_with_1001() {
    let proxy = Proxy::start(quick()).await;
    let (mut a, mut b) = proxy.pair("bye").await;
    let pki = test_pki();
    let mut waiting = proxy.connect(&pki.alice, "alone").await;
    send(&mut waiting, &hello("w")).await;
    proxy.wait_for(|s| s.meetups.len() == 2).await;
    let closing = tokio::spawn(async move {
        [
            closed(&mut a).await.0,
            closed(&mut b).await.0,
            closed(&mut waiting).await.0,
        ]
    });
    proxy.stop().await;
    assert_eq!(closing.await.unwrap(), [1001, 1001, 1001]);
}

#[tokio::test]
async fn status_and_metrics_are_served_over_http() {
    let proxy = Proxy::start(quick()).await;
    let (mut a, mut b) = proxy.pair("gw/s").await;
    send(&mut a, "x").await;
    recv(&mut b).await;
    let addr = proxy.serve_status().await;
    let get = |path: &'static str| http_get(addr, path);
    let status = get("/status").await;
    let body = status.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    let meetup = &json["meetups"][0];
    assert_eq!(meetup["id"], "gw/s");
    assert_eq!(meetup["state"], "paired");
    assert_eq!(meetup["peers"][0]["identity"]["cn"], "alice");
    assert_eq!(meetup["peers"][1]["identity"]["cn"], "bob");
    assert_eq!(meetup["peers"][0]["peer_id"], "a");
    assert!(
        meetup["peers"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(json["counters"]["messages_relayed"], 1);
    let metrics = get("/metrics").await;
    assert!(
        metrics.contains("ws_proxy_messages_relayed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ws_proxy_meetups_paired 1"), "{metrics}");
    proxy.stop().await;
}
