//! The metrics listener over a real socket: what it serves, and its pool and head deadline at
//! their defaults.

use std::sync::Arc;

use common::daemon::Shutdown;
use common::metrics::{Families, MetricsListen, MetricsListener, Reason, Registry};
use testkit::metrics::{assert_listener_bounded, assert_process_metrics, scrape, value};

#[tokio::test]
async fn the_listener_serves_the_registry_and_nothing_else() {
    let mut registry = Registry::new("demo");
    let families = Families::new(&mut registry);
    let registry = Arc::new(registry);
    let listen = MetricsListen::parse("127.0.0.1:0").unwrap();
    let listener = MetricsListener::bind(&listen).await.unwrap();
    let MetricsListen::Tcp(addr) = *listener.addr() else {
        panic!("not tcp: {}", listener.addr());
    };
    assert_ne!(addr.port(), 0);
    let shutdown = Shutdown::new();
    let scraped = registry.clone();
    tokio::spawn(listener.serve(Arc::new(move || scraped.encode()), shutdown.clone()));

    let before = scrape(addr).await;
    assert_eq!(value(&before, "demo_connections_accepted_total"), Some(0.0));
    assert_process_metrics(&before);
    let _open = families.connection();
    families.refused(Reason::RATE_LIMIT);
    let after = scrape(addr).await;
    assert_eq!(value(&after, "demo_connections_accepted_total"), Some(1.0));
    assert_eq!(value(&after, "demo_connections_open"), Some(1.0));
    assert_eq!(
        value(&after, "demo_refusals_total{reason=\"rate_limit\"}"),
        Some(1.0)
    );

    assert_listener_bounded(addr).await;
    shutdown.trigger();
    assert!(shutdown.drain(std::time::Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_unix_socket_listener_serves_too() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.sock");
    let listen = MetricsListen::parse(&format!("unix:{}", path.display())).unwrap();
    let listener = MetricsListener::bind(&listen).await.unwrap();
    assert_eq!(listener.addr(), &listen);
    let shutdown = Shutdown::new();
    let registry = Arc::new(Registry::new("demo"));
    tokio::spawn(listener.serve(Arc::new(move || registry.encode()), shutdown.clone()));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, common::metrics::listen::SOCKET_MODE);
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("process_open_fds"), "{answer}");
    shutdown.trigger();
}
