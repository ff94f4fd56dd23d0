//! Timers at their default values, both ways (SECURITY.md invariant 8): what should live past
//! them lives, what should die at them dies.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use testkit::test_pki;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Proxy, quick, recv_text, send};

/// At the defaults (HELLO within 10 s, a ping every 10 s, 10 s for the pong): a pair that
/// relays and answers pings lives past every one of them, and a connection that never says
/// HELLO is closed at 10 s, not before.
#[tokio::test]
async fn default_timers_keep_live_pairs_and_close_silent_connections_at_10_s() {
    let pki = test_pki();
    let proxy = Proxy::start(quick()).await;
    let (mut a, mut b) = proxy.pair("timers").await;
    let mut silent = proxy.connect(&pki.bob, "silent").await;
    let started = Instant::now();
    let silent_closed = tokio::spawn(async move {
        // Past the harness's 10 s wait: the close is due at 10 s.
        let close = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match silent.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return (u16::from(frame.code), frame.reason.to_string());
                    }
                    Some(Ok(_)) => {}
                    other => return (0, format!("{other:?}")),
                }
            }
        })
        .await
        .expect("closed in time");
        (close, started.elapsed())
    });
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(12) {
        // Reading answers the proxy's pings.
        send(&mut a, &format!("a{n}")).await;
        assert_eq!(recv_text(&mut b).await, format!("a{n}"));
        send(&mut b, &format!("b{n}")).await;
        assert_eq!(recv_text(&mut a).await, format!("b{n}"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ((code, reason), at) = silent_closed.await.unwrap();
    assert_eq!(
        (code, reason.as_str()),
        (1008, "no HELLO within 10 seconds")
    );
    assert!(
        at >= Duration::from_millis(9_500) && at < Duration::from_secs(12),
        "closed after {at:?}"
    );
    let status = proxy.server.status();
    assert_eq!(status.meetups.len(), 1);
    assert_eq!(status.meetups[0].state, "paired");
    proxy.stop().await;
}
