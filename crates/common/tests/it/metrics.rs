//! The metrics listener over a real socket: what it serves, and its pool and head deadline at
//! their defaults.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    tokio::spawn(listener.serve(
        Arc::new(move || scraped.encode()),
        families.clone(),
        shutdown.clone(),
    ));

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
    assert!(shutdown.drain(Duration::from_secs(5)).await);
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
    let mut registry = Registry::new("demo");
    let families = Families::new(&mut registry);
    let registry = Arc::new(registry);
    tokio::spawn(listener.serve(
        Arc::new(move || registry.encode()),
        families,
        shutdown.clone(),
    ));
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

/// A demo metrics listener on loopback: its address, the families it counts into, and the
/// shutdown that ends it.
async fn demo_listener() -> (std::net::SocketAddr, Families, Shutdown) {
    let mut registry = Registry::new("demo");
    let families = Families::new(&mut registry);
    let registry = Arc::new(registry);
    let listen = MetricsListen::parse("127.0.0.1:0").unwrap();
    let listener = MetricsListener::bind(&listen).await.unwrap();
    let MetricsListen::Tcp(addr) = *listener.addr() else {
        panic!("not tcp");
    };
    let shutdown = Shutdown::new();
    tokio::spawn(listener.serve(
        Arc::new(move || registry.encode()),
        families.clone(),
        shutdown.clone(),
    ));
    (addr, families, shutdown)
}

/// Fills the pool with `MAX_CONNECTIONS` connections that either hold an unfinished head or
/// sit idle on keep-alive after one answer (F3): a scrape is answered at once, by evicting the
/// oldest of them, however young they are (a minimum age let a holder that reopens its
/// connections keep scrapes out: second attack pass), and the eviction is counted.
async fn a_scrape_gets_through_a_pool_held_by(keep_alive: bool) {
    use common::metrics::listen::MAX_CONNECTIONS;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (addr, families, shutdown) = demo_listener().await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        if keep_alive {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            // Read the whole answer (its body ends with `# EOF`); the connection stays open.
            let mut answer = Vec::new();
            while !answer.ends_with(b"# EOF\n") {
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&buf[..n]);
            }
        } else {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    // The listener admits in accept order; give it time to take all eight.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(families.refusals(Reason::METRICS_POOL), 0);

    // A scrape evicts the oldest and is answered at once.
    let started = Instant::now();
    let text = scrape(addr).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        value(&text, "demo_refusals_total{reason=\"metrics_pool\"}"),
        Some(1.0),
        "{text}"
    );
    // The oldest held connection is the one that was closed; the next one is still open.
    let mut buf = [0u8; 64];
    let mut first = held.remove(0);
    let end = tokio::time::timeout(Duration::from_secs(2), first.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0) | Err(_))), "{end:?}");
    let still = tokio::time::timeout(Duration::from_millis(200), held[0].read(&mut buf)).await;
    assert!(
        still.is_err(),
        "the second held connection was closed too: {still:?}"
    );
    shutdown.trigger();
}

#[tokio::test]
async fn unfinished_heads_do_not_keep_a_scrape_out() {
    a_scrape_gets_through_a_pool_held_by(false).await;
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_keep_a_scrape_out() {
    a_scrape_gets_through_a_pool_held_by(true).await;
}
