//! An independent peer: Python's `websockets` library, which the original Micronets peers use
//! (it offers permessage-deflate, which the proxy declines), paired with our client library.

use std::process::Stdio;

use bytes::Bytes;
use futures_util::SinkExt as _;
use testkit::test_pki;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Proxy, WAIT, hello, quick, recv, recv_text, send};

#[tokio::test]
async fn a_python_websockets_peer_pairs_relays_and_sees_the_1002() {
    let proxy = Proxy::start(quick()).await;
    let pki = test_pki();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/peer.py");
    let mut python = Command::new("python3")
        .arg(script)
        .arg(proxy.url("gw/py"))
        .arg(&pki.bob.cert_path)
        .arg(&pki.bob.key_path)
        .arg(&pki.ca_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (scripts/test installs the websockets package)");
    proxy
        .wait_for(|s| s.meetups.first().is_some_and(|m| m.state == "waiting"))
        .await;
    let mut ours = proxy.connect(&pki.alice, "gw/py").await;
    send(&mut ours, &hello("rust")).await;
    let theirs = recv_text(&mut ours).await;
    assert!(theirs.contains("\"peerId\": \"py\""), "{theirs}");

    let mut lines = tokio::io::BufReader::new(python.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.as_deref(),
        Some("HELLO rust extensions []"),
        "no compression negotiated"
    );

    // Text and binary, small and at the 1 MiB limit, echoed in order with their types.
    let mut sent = Vec::new();
    for i in 0..100u32 {
        let message = if i % 2 == 0 {
            Message::text(format!("{{\"message\": {{\"messageId\": {i}}}}}"))
        } else {
            Message::Binary(Bytes::from(i.to_be_bytes().repeat(i as usize)))
        };
        ours.feed(message.clone()).await.unwrap();
        sent.push(message);
    }
    let big = Message::Binary(Bytes::from(vec![0x5a; 1 << 20]));
    ours.feed(big.clone()).await.unwrap();
    sent.push(big);
    ours.flush().await.unwrap();
    for (i, expected) in sent.iter().enumerate() {
        assert_eq!(&recv(&mut ours).await, expected, "echo {i}");
    }

    drop(ours);
    let last = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        last.as_deref(),
        Some("CLOSED 1002 the peer websocket disconnected")
    );
    let status = tokio::time::timeout(WAIT, python.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    proxy.stop().await;
}
