//! Connections still sending their upgrade request (issue 18, attack pass F1 and F2): they
//! count against their identity's `max_connections_per_identity` from the end of the TLS
//! handshake, those the rules or the cap refuse are refused right then, those without a
//! certificate wait in the stranger pool instead of taking `max_connections` slots, and the
//! bytes of their heads are charged to the budget.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use common::tls::{ClientAuth, ClientTlsFiles, ServerTlsFiles};
use testkit::{Leaf, test_pki};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ws_proxy::auth::{Rule, RuleSpec, Rules};

use crate::support::{Proxy, WAIT, hello, quick, send};

/// The start of an upgrade request, never finished: the attack's held head.
const PARTIAL: &[u8] = b"GET /micronets/v1/ws-proxy/x HTTP/1.1\r\nHost: a\r\n";

/// A TLS connection as `leaf` (no certificate when `None`) from `source`, handshake done.
async fn tls_from(proxy: &Proxy, leaf: Option<&Leaf>, source: IpAddr) -> TlsStream<TcpStream> {
    let files = ClientTlsFiles {
        ca: Some(test_pki().ca_path.clone()),
        cert: leaf.map(|l| l.cert_path.clone()),
        key: leaf.map(|l| l.key_path.clone()),
        ..ClientTlsFiles::default()
    };
    let config = Arc::new(common::tls::client_config(&files).unwrap());
    let tcp = testkit::front::connect_from(source, proxy.addr)
        .await
        .unwrap();
    common::tls::connect(config, "localhost", tcp, WAIT)
        .await
        .unwrap()
}

const HERE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `count` connections as `leaf` from 127.0.0.1, each having sent [`PARTIAL`].
async fn holders(proxy: &Proxy, leaf: Option<&Leaf>, count: usize) -> Vec<TlsStream<TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..count {
        let mut tls = tls_from(proxy, leaf, HERE).await;
        tls.write_all(PARTIAL).await.unwrap();
        tls.flush().await.unwrap();
        held.push(tls);
    }
    held
}

/// Sends the rest of the upgrade request after [`PARTIAL`]; the answer (a 101's head, or a
/// refusal up to the close).
async fn finish(mut tls: TlsStream<TcpStream>) -> String {
    tls.write_all(b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 1024];
        while let Ok(n @ 1..) = tls.read(&mut chunk).await {
            answer.extend_from_slice(&chunk[..n]);
            if answer.starts_with(b"HTTP/1.1 101 ") && answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Waits until the admission counts `strangers` strangers and `connections` slots.
async fn admission_is(proxy: &Proxy, strangers: usize, connections: usize) {
    let what = format!("{strangers} strangers and {connections} connections");
    testkit::until(&what, WAIT, || {
        let stats = proxy.server.admission().stats();
        (stats.strangers, stats.connections) == (strangers, connections)
    })
    .await;
}

/// Bob, from another loopback address, upgrades and says HELLO; his connection.
async fn bob_gets_in(
    proxy: &Proxy,
    id: &str,
) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
    let tls = testkit::front::tls_from_other_loopback(proxy.addr, &test_pki().bob, &[]).await;
    let (mut bob, _) = tokio_tungstenite::client_async(proxy.url(id), tls)
        .await
        .expect("bob upgrades while the heads are held");
    send(&mut bob, &hello("bob")).await;
    proxy
        .wait_for(|s| s.meetups.iter().any(|m| m.id == id))
        .await;
    bob
}

/// Reads the answer the proxy sends without being asked further, up to its close.
async fn answer(mut tls: TlsStream<TcpStream>) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// F1: alice (cap 3) held every one of the 6 slots by sending two request lines on each;
/// bob, from the same address, was closed after his handshake. Now her fourth and later
/// connections are refused with 429 right after the handshake (given a second to send their
/// request), holding no slot meanwhile.
#[tokio::test]
async fn unfinished_heads_count_against_the_identity_cap() {
    let pki = test_pki();
    let mut config = quick();
    config.max_connections = 6;
    config.limits.max_connections_per_identity = 3;
    let proxy = Proxy::start(config).await;
    let mut held = holders(&proxy, Some(&pki.alice), 6).await;
    let over = held.split_off(3);
    let _bob = proxy.connect(&pki.bob, "victim").await;
    admission_is(&proxy, 0, 4).await;
    for tls in over {
        let answer = answer(tls).await;
        assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
        assert!(answer.contains("max_connections_per_identity"), "{answer}");
    }
    // One of her counted connections finishes its request and is upgraded.
    let answer = finish(held.remove(0)).await;
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    drop(held);
    proxy.stop().await;
}

/// F1 with `client_auth = "optional"`: connections without a certificate took all the slots
/// with unfinished heads. Now they send their heads as strangers (per address at most
/// `max_handshakes_per_address`) and take a slot only with a complete upgrade request.
#[tokio::test]
async fn heads_without_a_certificate_are_read_in_the_stranger_pool() {
    let pki = test_pki();
    let mut config = quick();
    config.max_connections = 4;
    config.limits.max_handshakes_per_address = 4;
    let files = ServerTlsFiles {
        cert: pki.server.cert_path.clone(),
        key: Some(pki.server.key_path.clone()),
        client_ca: Some(pki.ca_path.clone()),
        crls: vec![pki.crl_path.clone()],
        client_auth: ClientAuth::Optional,
        alpn: Vec::new(),
    };
    let proxy = Proxy::start_with(config, files).await;
    let mut held = holders(&proxy, None, 4).await;
    admission_is(&proxy, 4, 0).await;
    let _bob = bob_gets_in(&proxy, "victim").await;
    // A complete request takes its slot then (and counts against its address).
    let answer = finish(held.pop().unwrap()).await;
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    admission_is(&proxy, 3, 2).await;
    drop(held);
    proxy.stop().await;
}

/// F1 with rules: a certificate no rule matches held 100 slots, since its 403 waited for a
/// complete request. Now it is refused right after its handshake, holding no slot.
#[tokio::test]
async fn a_certificate_no_rule_admits_holds_no_slot() {
    let pki = test_pki();
    let mut config = quick();
    config.max_connections = 4;
    config.rules = Rules::new(vec![
        Rule::compile(&RuleSpec {
            cn: Some("bob".into()),
            ids: vec!["**".into()],
            ..RuleSpec::default()
        })
        .unwrap(),
    ]);
    let proxy = Proxy::start(config).await;
    let held = holders(&proxy, Some(&pki.alice), 6).await;
    let _bob = proxy.connect(&pki.bob, "victim").await;
    admission_is(&proxy, 0, 1).await;
    for tls in held {
        let answer = answer(tls).await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains("may not join any meet-up id"), "{answer}");
    }
    proxy.stop().await;
}

/// F2: the bytes of unfinished heads were outside `max_buffered_bytes`. Now the head buffer
/// (512 bytes, doubling as it fills, at most 16 KiB) is charged while it is held.
#[tokio::test]
async fn unfinished_heads_are_charged_to_the_budget() {
    let proxy = Proxy::start(quick()).await;
    let mut held = holders(&proxy, Some(&test_pki().alice), 2).await;
    proxy.wait_for(|s| s.buffered_bytes == 2 * 512).await;
    let filler = format!("X: {}\r\n", "a".repeat(10_000));
    held[0].write_all(filler.as_bytes()).await.unwrap();
    proxy
        .wait_for(|s| s.buffered_bytes == 16 * 1024 + 512)
        .await;
    drop(held);
    proxy.wait_for(|s| s.buffered_bytes == 0).await;
    proxy.stop().await;
}
