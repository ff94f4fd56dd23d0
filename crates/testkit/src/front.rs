//! The front-door attack and its checks: a crowd of idle sockets from 127.0.0.1 that never
//! start a handshake, and a legitimate client from another loopback address (127.0.0.2) so
//! the crowd's per-address cap does not apply to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};

/// The loopback address legitimate clients of front-door tests connect from.
pub const OTHER_LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to `addr` from `source` (port chosen by the kernel). Any 127.0.0.0/8
/// address works as a source on Linux without configuration.
///
/// # Errors
/// The bind or the connect failed.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// `count` TCP connections to `addr` from 127.0.0.1 that send nothing: the attack. Every
/// connect completes (the kernel accepts into the backlog); the daemon decides which it keeps.
///
/// # Panics
/// A connect fails.
pub async fn idle_crowd(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut crowd = Vec::with_capacity(count);
    for _ in 0..count {
        crowd.push(TcpStream::connect(addr).await.expect("idle connect"));
    }
    crowd
}

/// How many of `crowd` the daemon has closed within `within` (EOF or reset on read), and
/// when the last of them closed. Each socket is read until it closes or `within` has passed.
pub async fn closed_within(crowd: Vec<TcpStream>, within: Duration) -> (usize, Duration) {
    let start = Instant::now();
    let reads = crowd.into_iter().map(|mut stream| async move {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
        .then(Instant::now)
    });
    let ends = futures_util::future::join_all(reads).await;
    let closed = ends.iter().flatten().count();
    let last = ends
        .iter()
        .flatten()
        .max()
        .map_or(Duration::ZERO, |t| t.duration_since(start));
    (closed, last)
}

/// A client configuration with `leaf` as its certificate, trusting the test root.
///
/// # Panics
/// The test PKI files do not load.
pub fn client_config(leaf: &crate::Leaf, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let pki = crate::test_pki();
    let files = common::tls::ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: Some(leaf.cert_path.clone()),
        key: Some(leaf.key_path.clone()),
        alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        skip_hostname_check: false,
    };
    Arc::new(common::tls::client_config(&files).expect("client config"))
}

/// A mutual-TLS connection to `addr` from [`OTHER_LOOPBACK`] as `leaf`, name `localhost`.
///
/// # Panics
/// The connection or the handshake fails.
pub async fn tls_from_other_loopback(
    addr: SocketAddr,
    leaf: &crate::Leaf,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = connect_from(OTHER_LOOPBACK, addr)
        .await
        .expect("connect from 127.0.0.2");
    common::tls::connect(
        client_config(leaf, alpn),
        "localhost",
        tcp,
        Duration::from_secs(5),
    )
    .await
    .expect("tls handshake from 127.0.0.2")
}

/// The crowd of issue 15: `per_source` idle TCP connections to `addr` from each of
/// `sources` (sources bound before connect), each reopened as soon as the daemon closes it.
/// It runs until dropped.
#[derive(Debug)]
pub struct ReopeningCrowd {
    tasks: tokio::task::JoinSet<()>,
    reopened: Arc<std::sync::atomic::AtomicU64>,
}

impl ReopeningCrowd {
    /// Starts the crowd.
    pub fn start(addr: SocketAddr, sources: &[IpAddr], per_source: usize) -> Self {
        Self::start_with_pause(addr, sources, per_source, Duration::ZERO)
    }

    /// Starts a crowd that waits `pause` after the daemon closes a connection before it
    /// reopens it (issue 16's churn: `t_churn.py 16 20 8 0.5`).
    pub fn start_with_pause(
        addr: SocketAddr,
        sources: &[IpAddr],
        per_source: usize,
        pause: Duration,
    ) -> Self {
        let reopened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for &source in sources {
            for _ in 0..per_source {
                let reopened = Arc::clone(&reopened);
                tasks.spawn(async move {
                    loop {
                        if let Ok(mut stream) = connect_from(source, addr).await {
                            let mut buf = [0u8; 64];
                            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                            drop(stream);
                            tokio::time::sleep(pause).await;
                        } else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        reopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        }
        Self { tasks, reopened }
    }

    /// How many times a connection of the crowd was closed (and reopened).
    pub fn reopened(&self) -> u64 {
        self.reopened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the crowd, closing its connections.
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}
