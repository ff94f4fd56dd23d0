//! Memory bounds (issue 15): HELLOs take queue room, the HELLO cap holds before the HELLO,
//! stored peer fields and `/status` stay small, a relay queue too small for the largest
//! message is an error rather than a hang, connections per identity and the global byte budget
//! are capped. Where the finding was about the daemon's memory, the real `ws-proxy` binary runs
//! and its VmRSS is read from /proc.

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::envelope::micronets::{Hello, Message as Envelope};
use futures_util::{SinkExt as _, StreamExt as _};
use testkit::test_pki;
use tokio::io::AsyncWriteExt as _;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use ws_proxy::OnPartnerLeave;
use ws_proxy::client::{self, ClientError, PeerStream};

use crate::support::{
    Proxy, WAIT, closed, hello, http_get, options, quick, recv_text, send, spawn_daemon,
    write_config,
};

/// The `ws-proxy` binary with the test PKI and `extra` TOML (top-level keys, then tables).
struct Daemon {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(top: &str, limits: &str) -> Self {
        common::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &format!("worker_threads = 1\n{top}"), limits);
        let (child, port) = spawn_daemon(&config, &[], Stdio::null()).await;
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, id: &str) -> String {
        format!("wss://localhost:{}/micronets/v1/ws-proxy/{id}", self.port)
    }

    async fn dial(&self, leaf: &testkit::Leaf, id: &str) -> Result<PeerStream, ClientError> {
        client::connect(&options(&self.url(id), Some(leaf))).await
    }

    /// The daemon's resident set size in bytes.
    fn rss(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        kib * 1024
    }
}

/// A HELLO whose peerId is `len` bytes of `x`.
fn big_hello(len: usize) -> String {
    Envelope::Hello(Hello::new(0, "test", "x".repeat(len))).encode()
}

/// The next data or close message, pings skipped; `None` when the connection ends without one.
async fn next_message(ws: &mut PeerStream) -> Option<Message> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => return Some(message),
                _ => return None,
            }
        }
    })
    .await
    .expect("an answer in time")
}

/// How a joiner fared.
#[derive(Debug, PartialEq, Eq)]
enum Joined {
    /// Got the survivor's HELLO, then left cleanly.
    Paired,
    /// Closed with this code (0: no close frame, the connection was reset).
    Refused(u16),
    /// HTTP 409: the previous joiner's departure was still on its way.
    Full,
}

/// One joiner: connects, sends `hello`, and leaves cleanly once it has the survivor's HELLO.
async fn join_and_leave(
    dial: impl std::future::Future<Output = Result<PeerStream, ClientError>>,
    hello: &str,
    survivor_hello: &str,
) -> Joined {
    let mut joiner = match dial.await {
        Ok(joiner) => joiner,
        Err(ClientError::Refused { status: 409, .. }) => return Joined::Full,
        Err(err) => panic!("{err}"),
    };
    if joiner.send(Message::text(hello)).await.is_err() {
        return Joined::Refused(0);
    }
    match next_message(&mut joiner).await {
        Some(Message::Text(text)) => {
            assert_eq!(text.as_str(), survivor_hello);
            let _ = joiner.close(None).await;
            while let Some(Ok(_)) = joiner.next().await {}
            Joined::Paired
        }
        Some(Message::Close(frame)) => Joined::Refused(frame.map_or(1005, |f| u16::from(f.code))),
        None => Joined::Refused(0),
        Some(other) => panic!("joiner got {other:?}"),
    }
}

/// The attack on the daemon at its defaults, in `wait` mode: a survivor that never
/// reads, and peers that join with a 1 MiB HELLO and leave (248 times in 9 s took the proxy
/// from 7 MB to 265 MB). The HELLO cap (64 KiB) refuses them now; the survivor's pong
/// deadline (10 s) bounds how long the attack can run.
#[tokio::test]
async fn one_mib_hellos_for_a_survivor_that_never_reads_do_not_grow_the_daemon() {
    let pki = test_pki();
    let daemon = Daemon::start("on_partner_leave = \"wait\"", "").await;
    let mut survivor = daemon.dial(&pki.alice, "survivor").await.unwrap();
    send(&mut survivor, &hello("survivor")).await;
    // The survivor now stops reading, and never reads again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = daemon.rss();
    let joiner_hello = big_hello((1 << 20) - 200);
    let started = Instant::now();
    let (mut paired, mut refused) = (0, 0);
    while paired + refused < 120 && started.elapsed() < Duration::from_secs(8) {
        match join_and_leave(
            daemon.dial(&pki.bob, "survivor"),
            &joiner_hello,
            &hello("survivor"),
        )
        .await
        {
            Joined::Paired => paired += 1,
            Joined::Refused(_) => refused += 1,
            Joined::Full => {}
        }
    }
    let grown = daemon.rss().saturating_sub(before);
    eprintln!(
        "{paired} paired, {refused} refused in {:?}; RSS grew by {} KiB",
        started.elapsed(),
        grown / 1024
    );
    assert_eq!(paired, 0, "1 MiB HELLOs were accepted");
    assert!(grown < 16 << 20, "the proxy grew by {grown} bytes");
    drop(survivor);
}

/// HELLOs take the survivor's relay queue room like any other message: with joiners sending
/// the largest HELLO allowed to a survivor that never reads, once its queue (and the socket
/// buffers below it) are full the next joiner is closed with 1013 instead of the HELLO being
/// queued without bound.
#[tokio::test]
async fn hellos_for_a_survivor_that_never_reads_take_its_queue_room() {
    let pki = test_pki();
    let mut config = quick();
    config.on_partner_leave = OnPartnerLeave::Wait;
    // The survivor does not read, so it cannot answer pings either: keep it alive for the test.
    config.limits.ping_interval = Duration::from_secs(60);
    let proxy = Proxy::start(config).await;
    let mut survivor = proxy.connect(&pki.alice, "survivor").await;
    send(&mut survivor, &hello("survivor")).await;
    proxy
        .wait_for(|s| s.meetups.iter().any(|m| m.id == "survivor"))
        .await;
    let joiner_hello = big_hello(60 * 1024);
    let mut paired = 0;
    // 600 HELLOs of 60 KiB are 36 MB: more than the survivor's queue and socket buffers.
    let refused = loop {
        match join_and_leave(
            proxy.dial(Some(&pki.bob), "survivor"),
            &joiner_hello,
            &hello("survivor"),
        )
        .await
        {
            Joined::Paired if paired < 600 => paired += 1,
            Joined::Paired => {
                panic!("{paired} joiners paired: the HELLOs were queued without bound")
            }
            Joined::Refused(code) => break code,
            Joined::Full => {}
        }
    };
    eprintln!("{paired} paired before the first refusal");
    assert_eq!(refused, 1013);
    // The survivor still waits on the id, with its queue full.
    assert_eq!(proxy.server.status().meetups[0].state, "waiting");
    drop(survivor);
    proxy.stop().await;
}

/// A HELLO over `max_hello_bytes` (64 KiB) closes the sender with 1009 and is never stored.
#[tokio::test]
async fn a_hello_over_64_kib_is_refused_with_1009() {
    let pki = test_pki();
    let proxy = Proxy::start(quick()).await;
    let mut big = proxy.connect(&pki.alice, "big-hello").await;
    send(&mut big, &big_hello(64 * 1024)).await;
    let (code, reason) = closed(&mut big).await;
    assert_eq!((code, reason.as_str()), (1009, "HELLO too big"));
    assert!(proxy.server.status().meetups.is_empty());
    // One just under the cap is a HELLO like any other.
    let mut fits = proxy.connect(&pki.alice, "big-hello").await;
    send(&mut fits, &big_hello(60 * 1024)).await;
    proxy
        .wait_for(|s| s.meetups.iter().any(|m| m.id == "big-hello"))
        .await;
    proxy.stop().await;
}

/// Writes a masked binary frame header announcing `len` bytes, then `sent` of them, straight
/// onto the TLS stream under the websocket.
async fn unfinished_frame(ws: &mut PeerStream, len: u64, sent: usize) {
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + sent, b'x');
    let tls = ws.get_mut();
    // The proxy may stop reading (and close) before it has everything.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tls.write_all(&frame).await;
        let _ = tls.flush().await;
    })
    .await;
}

/// The proxy's close frame, read from the TLS stream under the websocket (whose own reader
/// would answer it, and fail on the socket the proxy has already shut).
async fn raw_close(ws: &mut PeerStream) -> (u16, String) {
    use tokio::io::AsyncReadExt as _;
    let tls = ws.get_mut();
    tokio::time::timeout(WAIT, async {
        loop {
            let mut head = [0u8; 2];
            tls.read_exact(&mut head).await.unwrap();
            // Frames from the proxy are unmasked; control frames are under 126 bytes.
            let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
            tls.read_exact(&mut payload).await.unwrap();
            if head[0] & 0x0f == 0x8 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
    })
    .await
    .expect("a close frame in time")
}

/// Before its HELLO a connection may send little more than the HELLO cap: one holding an
/// unfinished 1 MiB frame is closed with 1009 once 64 KiB are in, instead of waiting (with
/// the bytes buffered) for the rest. 100 such connections used to hold 100 x 512 KiB.
#[tokio::test]
async fn an_unfinished_frame_before_the_hello_is_cut_at_the_hello_cap() {
    let pki = test_pki();
    let daemon = Daemon::start("", "").await;
    let before = daemon.rss();
    let mut peers = Vec::new();
    for i in 0..100 {
        let mut ws = daemon
            .dial(&pki.alice, &format!("frame-{i}"))
            .await
            .unwrap();
        unfinished_frame(&mut ws, 1 << 20, 512 * 1024).await;
        peers.push(ws);
    }
    // Every connection is still open on our side: the proxy holds what it has read of them.
    let grown = daemon.rss().saturating_sub(before);
    eprintln!("RSS grew by {} KiB for 100 unfinished frames", grown / 1024);
    let started = Instant::now();
    let (code, reason) = raw_close(&mut peers[0]).await;
    assert_eq!((code, reason.as_str()), (1009, "HELLO too big"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(grown < 20 << 20, "the proxy grew by {grown} bytes");
}

/// `peerClass` and `peerId` are cut to 128 bytes where they are kept, and `/status` is a page
/// of at most 100 ids (by default) with the total and the next offset: 150 waiting peers with
/// 60 KiB peerIds used to make a 9 MB page.
#[tokio::test]
async fn status_is_a_small_page_whatever_the_peers_sent() {
    let pki = test_pki();
    let proxy = Proxy::start(quick()).await;
    let status_addr = proxy.serve_status().await;
    let mut peers = Vec::new();
    for i in 0..150 {
        let mut ws = proxy.connect(&pki.alice, &format!("long/{i:03}")).await;
        send(&mut ws, &big_hello(60 * 1024)).await;
        peers.push(ws);
    }
    proxy.wait_for(|s| s.meetups_total == 150).await;

    let get = |path: &'static str| async move {
        let text = http_get(status_addr, path).await;
        let body = text.split("\r\n\r\n").nth(1).unwrap().to_owned();
        serde_json::from_str::<serde_json::Value>(&body)
            .map(|json| (body.len(), json))
            .unwrap()
    };
    let (size, first) = get("/status").await;
    eprintln!("the first /status page is {size} bytes");
    assert!(size < 256 * 1024, "the page is {size} bytes");
    assert_eq!(first["meetups"].as_array().unwrap().len(), 100);
    assert_eq!(first["meetups_total"], 150);
    assert_eq!(first["next_offset"], 100);
    let peer_id = first["meetups"][0]["peers"][0]["peer_id"].as_str().unwrap();
    assert!(peer_id.len() <= 128 && peer_id.ends_with('…'), "{peer_id}");
    let (_, second) = get("/status?offset=100&limit=1000").await;
    assert_eq!(second["meetups"].as_array().unwrap().len(), 50);
    assert_eq!(second["meetups"][0]["id"], "long/100");
    assert!(second["next_offset"].is_null());
    drop(peers);
    proxy.stop().await;
}

/// `relay_queue_bytes = max_message_bytes` is refused at load; a server given such a queue
/// anyway closes the sender of a message that can never fit (1009) and its partner, instead
/// of hanging with the pair stuck in the table.
#[tokio::test]
async fn a_message_that_can_never_fit_the_relay_queue_closes_the_pair() {
    let mut config = quick();
    config.limits.relay_queue_bytes = config.limits.max_message_bytes;
    assert!(config.validate().is_err());
    let proxy = Proxy::start(config).await;
    let (mut alice, mut bob) = proxy.pair("tight").await;
    alice
        .send(Message::binary(vec![0u8; 1 << 20]))
        .await
        .unwrap();
    let (code, reason) = closed(&mut alice).await;
    assert_eq!(
        (code, reason.as_str()),
        (1009, "message too big for the relay queue")
    );
    assert_eq!(closed(&mut bob).await.0, 1002);
    proxy.wait_for(|s| s.meetups.is_empty()).await;
    proxy.stop().await;
}

/// One certificate may hold `max_connections_per_identity` connections; one more gets HTTP
/// 429 before the upgrade, other certificates are not affected, and a closed connection
/// gives its place back.
#[tokio::test]
async fn connections_per_identity_are_capped() {
    let pki = test_pki();
    let mut config = quick();
    config.limits.max_connections_per_identity = 3;
    let proxy = Proxy::start(config).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(proxy.connect(&pki.alice, &format!("mine-{i}")).await);
    }
    match proxy.dial(Some(&pki.alice), "one-more").await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 429, "{body}");
            assert!(body.contains("max_connections_per_identity"), "{body}");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    let _bob = proxy.connect(&pki.bob, "bobs").await;
    let mut first = held.remove(0);
    first.close(None).await.unwrap();
    while let Some(Ok(_)) = first.next().await {}
    proxy.wait_for(|s| s.connections == 3).await;
    let _again = proxy.connect(&pki.alice, "mine-again").await;
    proxy.stop().await;
}

/// Work that the global budget (`max_buffered_bytes`) cannot take is refused with 1013: here
/// waiting peers queue messages until the budget is spent. The budget comes back when they go.
#[tokio::test]
async fn new_work_over_the_global_budget_is_refused_with_1013() {
    let pki = test_pki();
    let mut config = quick();
    config.on_partner_leave = OnPartnerLeave::Close;
    config.limits.max_buffered_bytes = 4 << 20;
    let proxy = Proxy::start(config).await;
    let chunk = vec![7u8; 512 * 1024];
    let mut waiters = Vec::new();
    let mut refused = None;
    'fill: for i in 0..8 {
        let mut ws = proxy.connect(&pki.alice, &format!("budget-{i}")).await;
        send(&mut ws, &hello("w")).await;
        proxy
            .wait_for(|s| s.meetups.iter().any(|m| m.id == format!("budget-{i}")))
            .await;
        for _ in 0..2 {
            ws.send(Message::binary(chunk.clone())).await.unwrap();
            let used = proxy.server.status().buffered_bytes;
            assert!(used <= 4 << 20, "{used}");
            if let Ok(Some(Ok(Message::Close(Some(frame))))) =
                tokio::time::timeout(Duration::from_millis(200), async {
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                            other => return other,
                        }
                    }
                })
                .await
            {
                refused = Some((u16::from(frame.code), frame.reason.to_string()));
                break 'fill;
            }
        }
        waiters.push(ws);
    }
    let (code, reason) = refused.expect("the budget refused a message");
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("try again later"), "{reason}");
    drop(waiters);
    proxy.wait_for(|s| s.buffered_bytes == 0).await;
    // And the proxy works again.
    let (mut a, mut b) = proxy.pair("after").await;
    send(&mut a, "ok").await;
    assert_eq!(recv_text(&mut b).await, "ok");
    proxy.stop().await;
}

/// The total bound at the defaults, on the daemon: 400 waiting peers each hold an unfinished
/// 1 MiB message (400 MiB before the budget existed). The bytes being read are charged to
/// `max_buffered_bytes` (256 MiB), so once it is spent the next peers are closed with 1013 and
/// the daemon grows by about the budget, not by what the peers send.
#[tokio::test]
async fn the_daemon_stays_within_max_buffered_bytes_at_the_defaults() {
    let pki = test_pki();
    let daemon = Daemon::start("", "").await;
    let before = daemon.rss();
    let started = Instant::now();
    let mut peers = Vec::new();
    for i in 0..400 {
        let leaf = if i % 2 == 0 { &pki.alice } else { &pki.bob };
        let mut ws = daemon.dial(leaf, &format!("total-{i}")).await.unwrap();
        send(&mut ws, &hello("w")).await;
        unfinished_frame(&mut ws, 1 << 20, (1 << 20) - 1).await;
        peers.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grown = daemon.rss().saturating_sub(before);
    eprintln!(
        "400 unfinished 1 MiB messages in {:?}: RSS grew by {} MiB",
        started.elapsed(),
        grown >> 20
    );
    let (code, reason) = raw_close(peers.last_mut().unwrap()).await;
    assert_eq!(code, 1013, "{reason}");
    // The budget, the fixed cost of 400 connections (~23 KiB each) and allocator slack.
    assert!(grown < 300 << 20, "the proxy grew by {} MiB", grown >> 20);
}

/// One identity cannot spend the whole budget, at the defaults: alice's 300 connections each
/// holding an unfinished 1 MiB message would take all 256 MiB and every other peer would be
/// refused (1013); her share is `max_buffered_bytes_per_identity` (64 MiB), past which only
/// her own connections are refused, and bob still relays 1 MiB messages.
#[tokio::test]
async fn one_identity_cannot_spend_the_whole_budget() {
    let pki = test_pki();
    let proxy = Proxy::start(quick()).await;
    let mut hers = Vec::new();
    for i in 0..300 {
        let mut ws = proxy.connect(&pki.alice, &format!("hers-{i}")).await;
        send(&mut ws, &hello("alice")).await;
        unfinished_frame(&mut ws, 1 << 20, (1 << 20) - 1).await;
        hers.push(ws);
    }
    // The proxy reads her 300 connections in no set order (under load, the last one may be
    // read early): wait until her share is spent, then find one that was refused.
    let held = testkit::eventually("alice's share is spent", WAIT, || async {
        let held = proxy.server.status().buffered_bytes;
        (held >= 60 << 20).then_some(held)
    })
    .await;
    eprintln!("alice's connections hold {} MiB", held >> 20);
    assert!(held <= 65 << 20, "{held}");
    let mut refused = None;
    for ws in hers.iter_mut().rev() {
        let quick = Duration::from_millis(300);
        if let Ok(close) = tokio::time::timeout(quick, raw_close(ws)).await {
            refused = Some(close);
            break;
        }
    }
    let (code, reason) = refused.expect("one of her connections was refused");
    assert_eq!(code, 1013, "{reason}");

    let mut b1 = proxy.connect(&pki.bob, "his").await;
    send(&mut b1, &hello("b1")).await;
    proxy
        .wait_for(|s| s.meetups.iter().any(|m| m.id == "his"))
        .await;
    let mut b2 = proxy.connect(&pki.chained_client, "his").await;
    send(&mut b2, &hello("b2")).await;
    assert_eq!(recv_text(&mut b1).await, hello("b2"));
    assert_eq!(recv_text(&mut b2).await, hello("b1"));
    let big = vec![1u8; 1 << 20];
    b1.send(Message::binary(big.clone())).await.unwrap();
    b2.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(
        crate::support::recv(&mut b2).await,
        Message::binary(big.clone())
    );
    assert_eq!(crate::support::recv(&mut b1).await, Message::binary(big));
    drop(hers);
    proxy.stop().await;
}
