//! Every ws-proxy timer at its default value, both ways (SECURITY.md invariant 8,
//! docs/TESTING.md): one proxy with `Config::default()`, every scenario at once, one wait past
//! the longest default covered (ping + pong, 20 s).
//!
//! Dies at about its default: a TCP stranger (handshake, 10 s), a TLS client that sends no
//! upgrade (10 s), an upgraded peer without HELLO (1008 at 10 s; one that does not answer the
//! close frame is dropped 5 s later, the close timeout), a peer that never reads and so never
//! answers a ping (1002 at 10 s). Lives: a pair whose HELLOs came just before the deadline, and a
//! peer that waits 24 s for its partner, both idle but reading (answering pings) the whole time.

use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt as _, StreamExt as _};
use testkit::test_pki;
use testkit::timers::{SLACK, assert_about, closed_at, sleep_until};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use ws_proxy::Config;
use ws_proxy::client::PeerStream;

use crate::support::{Proxy, closed, hello, send};

/// When the live peers are checked: past hello (10 s), upgrade (10 s) and two ping rounds.
const CHECK_AT: Duration = Duration::from_secs(24);

/// A peer as a real client runs it: a task reads all the time (so pings are answered), the
/// test sends through the sink and takes data messages from `rx`.
struct Reading {
    sink: SplitSink<PeerStream, Message>,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl Reading {
    fn new(ws: PeerStream) -> Self {
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    Ok(message) => {
                        let close = matches!(message, Message::Close(_));
                        if tx.send(message).is_err() || close {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Self { sink, rx }
    }

    async fn send(&mut self, text: &str) {
        self.sink.send(Message::text(text)).await.expect("send");
    }

    /// The next message, which must be `text`.
    async fn expect(&mut self, text: &str, what: &str) {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.recv()).await {
            Ok(Some(Message::Text(got))) => assert_eq!(got.as_str(), text, "{what}"),
            other => panic!("{what}: expected {text:?}, got {other:?}"),
        }
    }

    /// Nothing arrived (no close frame in particular) and the connection is open.
    fn assert_quiet(&mut self, what: &str) {
        match self.rx.try_recv() {
            Err(mpsc::error::TryRecvError::Empty) => {}
            other => panic!("{what}: expected nothing, got {other:?}"),
        }
    }
}

/// Polls the status until `gone` holds; the time from `start` when it did.
async fn gone_at(
    proxy: &Proxy,
    start: Instant,
    gone: impl Fn(&ws_proxy::server::Status) -> bool,
) -> Duration {
    testkit::until("the connection to be gone", Duration::from_secs(40), || {
        gone(&proxy.server.status())
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timer_at_its_default_cuts_what_it_should_and_nothing_else() {
    let config = Config::default();
    let limits = config.limits.clone();
    // The defaults this test is about (deploy/config/ws-proxy.example.toml).
    let ten = Duration::from_secs(10);
    assert_eq!(limits.handshake_timeout, ten);
    assert_eq!(limits.upgrade_timeout, ten);
    assert_eq!(limits.hello_timeout, ten);
    assert_eq!(limits.ping_interval, ten);
    assert_eq!(limits.pong_timeout, ten);
    assert_eq!(limits.close_timeout, Duration::from_secs(5));
    let proxy = Proxy::start(config).await;
    let pki = test_pki();
    let start = Instant::now();
    let within = Duration::from_secs(30);

    // Dies: a TCP connection that never starts TLS, at the handshake timeout.
    let stranger = async {
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let began = Instant::now();
        let at = closed_at(tcp, began, within).await;
        assert_about(
            "tcp stranger",
            at.expect("closed"),
            limits.handshake_timeout,
        );
    };

    // Dies: a verified client that never sends its upgrade request, at the upgrade timeout.
    let no_upgrade = async {
        let tls = testkit::front::tls_from_other_loopback(proxy.addr, &pki.alice, &[]).await;
        let began = Instant::now();
        let at = closed_at(tls, began, within).await;
        assert_about(
            "no upgrade request",
            at.expect("closed"),
            limits.upgrade_timeout,
        );
    };

    // Dies: an upgraded peer that reads but never says HELLO: 1008 at the HELLO timeout.
    let no_hello = async {
        let ws = proxy.connect(&pki.alice, "no-hello").await;
        let began = Instant::now();
        let mut peer = Reading::new(ws);
        let message = tokio::time::timeout(within, peer.rx.recv()).await;
        let at = began.elapsed();
        match message {
            Ok(Some(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
            }
            other => panic!("no HELLO: expected a 1008 close, got {other:?}"),
        }
        assert_about("no HELLO", at, limits.hello_timeout);
    };

    // Dies: a peer that neither says HELLO nor reads: closed at the HELLO timeout, and
    // dropped without its close frame after the close timeout.
    let silent = async {
        let mut ws = proxy.connect(&pki.bob, "silent").await;
        let began = Instant::now();
        let at = gone_at(&proxy, began, |s| {
            !s.awaiting_hello.iter().any(|p| p.id == "silent")
        })
        .await;
        assert_about(
            "silent peer dropped",
            at,
            limits.hello_timeout + limits.close_timeout,
        );
        // It never read: its close frame may be lost to a reset when the proxy drops the
        // socket (seen under load); if the frame arrives, it says why. It also never answered
        // the ping sent at the upgrade, and the pong deadline (10 s) ends with the HELLO
        // timeout (10 s): whichever the proxy sees first names the close, 1008 or 1002.
        let (code, reason) = closed(&mut ws).await;
        assert!(matches!(code, 1008 | 1002 | 1005 | 0), "{code} {reason}");
    };

    // Dies: a peer that says HELLO and then never reads, so never answers the ping sent at
    // the upgrade: 1002 at the pong timeout.
    let deaf = async {
        let mut ws = proxy.connect(&pki.chained_client, "deaf").await;
        let began = Instant::now();
        send(&mut ws, &hello("deaf")).await;
        proxy
            .wait_for(|s| s.meetups.iter().any(|m| m.id == "deaf"))
            .await;
        let at = gone_at(&proxy, began, |s| !s.meetups.iter().any(|m| m.id == "deaf")).await;
        assert_about("deaf peer", at, limits.pong_timeout);
        let (code, reason) = closed(&mut ws).await;
        if !matches!(code, 1005 | 0) {
            assert_eq!(
                (code, reason.as_str()),
                (1002, "Ping timed out (10 seconds)")
            );
        }
    };

    // Lives: two peers whose HELLOs arrive just before the HELLO deadline, then idle (reading)
    // past every timer, still relay both ways.
    let late_pair = async {
        let mut a = Reading::new(proxy.connect(&pki.alice, "late").await);
        let mut b = Reading::new(proxy.connect(&pki.bob, "late").await);
        sleep_until(start, Duration::from_secs(9)).await;
        a.send(&hello("a")).await;
        proxy
            .wait_for(|s| s.meetups.iter().any(|m| m.id == "late"))
            .await;
        b.send(&hello("b")).await;
        a.expect(&hello("b"), "late pair: a gets b's HELLO").await;
        b.expect(&hello("a"), "late pair: b gets a's HELLO").await;
        sleep_until(start, CHECK_AT).await;
        a.assert_quiet("late pair a");
        b.assert_quiet("late pair b");
        a.send("after the timers").await;
        b.expect("after the timers", "late pair: a to b").await;
        b.send("still here").await;
        a.expect("still here", "late pair: b to a").await;
    };

    // Lives: a peer waiting for its partner past every timer pairs with one that comes late.
    let waiter = async {
        let mut c = Reading::new(proxy.connect(&pki.chained_client, "waiter").await);
        c.send(&hello("c")).await;
        sleep_until(start, CHECK_AT).await;
        c.assert_quiet("waiter");
        let mut d = Reading::new(proxy.connect(&pki.alice, "waiter").await);
        d.send(&hello("d")).await;
        c.expect(&hello("d"), "waiter gets the late partner's HELLO")
            .await;
        d.expect(&hello("c"), "late partner gets the waiter's HELLO")
            .await;
        c.send("waited").await;
        d.expect("waited", "waiter to late partner").await;
    };

    tokio::join!(
        stranger, no_upgrade, no_hello, silent, deaf, late_pair, waiter
    );
    assert!(start.elapsed() < CHECK_AT + SLACK + Duration::from_secs(5));
    proxy.stop().await;
}
