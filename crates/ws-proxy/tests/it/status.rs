//! The status listener as the daemon runs it: its own small pool of connections and its
//! timeouts (so that local users cannot take the TLS port's descriptors), and the Unix socket.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ws_proxy::client::PeerStream;

use crate::support::{
    WAIT, pair_at, recv_text, send, spawn_daemon, spawn_daemon_with_nofile, write_config,
};

/// A configuration file in `dir` with `top` (top-level keys) and the test PKI.
fn status_config(dir: &std::path::Path, top: &str) -> std::path::PathBuf {
    write_config(dir, &format!("drain_grace_secs = 1\n{top}"), "")
}

/// alice and bob pair on `id` through the proxy on `port` and relay one message; returns
/// them, still paired.
async fn pair_and_relay(port: u16, id: &str) -> (PeerStream, PeerStream) {
    let (mut a, mut b) = pair_at(&format!(
        "wss://localhost:{port}/micronets/v1/ws-proxy/{id}"
    ))
    .await;
    send(&mut a, "through").await;
    assert_eq!(recv_text(&mut b).await, "through");
    (a, b)
}

/// The attack: 300 connections to a TCP status listener that send a partial `GET /status`
/// head and wait, against a proxy with 256 descriptors and `max_connections = 64`. Before, the
/// listener took every one (the TLS port then failed with "accept failed err=Too many open
/// files" and certificate holders' handshakes timed out) and kept them open for minutes. Now
/// at the default settings it keeps 16 (`max_status_connections`) and drops the rest at once,
/// and closes the 16 at the 10 s header timeout.
#[tokio::test]
async fn idle_status_connections_neither_starve_the_tls_port_nor_stay_open() {
    common::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let status_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = status_config(
        dir.path(),
        &format!("max_connections = 64\nstatus_listen = \"127.0.0.1:{status_port}\""),
    );
    let (mut child, port) = spawn_daemon_with_nofile((256, 256), &config, &[], Stdio::null()).await;

    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", status_port))
            .await
            .unwrap();
        // A head that never ends; a refused connection may already be gone.
        let _ = tcp.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").await;
        idle.push(tcp);
    }
    let started = Instant::now();
    let closings: Vec<_> = idle
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut sink))
                    .await
                    .ok()
                    .map(|_| started.elapsed())
            })
        })
        .collect();

    // A certificate holder still gets through while the 300 are open.
    tokio::time::timeout(Duration::from_secs(8), pair_and_relay(port, "status/p"))
        .await
        .expect("a certificate holder pairs and relays while status connections idle");

    let mut late = Vec::new();
    for closing in closings {
        let closed = closing.await.unwrap().expect("closed within 20 s");
        if closed > Duration::from_secs(2) {
            late.push(closed);
        }
    }
    println!("{} of 300 kept, closed after {late:?}", late.len());
    // Only the admitted ones waited, and only until the header timeout.
    assert!(late.len() <= 16, "{} connections were kept", late.len());
    for closed in &late {
        assert!(
            *closed >= Duration::from_secs(8) && *closed <= Duration::from_secs(13),
            "closed after {closed:?}, expected about 10 s"
        );
    }
    // And the listener serves again.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", status_port))
        .await
        .unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    child.kill().await.unwrap();
}

/// `status_listen = "unix:PATH"`: the socket has `status_socket_mode` (default 0660) and serves
/// `/status`.
#[tokio::test]
async fn status_is_served_on_a_unix_socket_with_its_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    common::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("status.sock");
    let config = status_config(
        dir.path(),
        &format!("status_listen = \"unix:{}\"", socket.display()),
    );
    let (mut child, port) = spawn_daemon(&config, &[], Stdio::null()).await;
    let _pair = pair_and_relay(port, "unix/p").await;

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    let mut unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    unix.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, unix.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["meetups"][0]["id"], "unix/p");
    child.kill().await.unwrap();

    // A configured mode.
    let socket = dir.path().join("status2.sock");
    let config = status_config(
        dir.path(),
        &format!(
            "status_listen = \"unix:{}\"\nstatus_socket_mode = \"0600\"",
            socket.display()
        ),
    );
    let (mut child, _) = spawn_daemon(&config, &[], Stdio::null()).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    child.kill().await.unwrap();
}
