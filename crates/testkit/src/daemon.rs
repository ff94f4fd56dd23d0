//! Start a server on 127.0.0.1:0 and get back its address and a shutdown handle.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use common::daemon::Shutdown;
use tokio::net::TcpListener;

/// A server running in the background of a test.
#[derive(Debug)]
pub struct Spawned {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Triggers and drains it.
    pub shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Spawned {
    /// Triggers shutdown, drains for up to `grace` and returns the server's result.
    ///
    /// # Panics
    /// The server task panicked or did not stop within `grace` plus one second.
    pub async fn stop(self, grace: Duration) -> anyhow::Result<()> {
        self.shutdown.drain(grace).await;
        tokio::time::timeout(grace + Duration::from_secs(1), self.task)
            .await
            .expect("server stops after shutdown")
            .expect("server task does not panic")
    }
}

/// Binds 127.0.0.1:0 and runs `serve(listener, shutdown)` in a task.
///
/// # Panics
/// The port cannot be bound.
pub async fn spawn_tcp<F, Fut>(serve: F) -> Spawned
where
    F: FnOnce(TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve(listener, shutdown.clone()));
    Spawned {
        addr,
        shutdown,
        task,
    }
}

/// Sets up tracing for a test binary once; output is captured by the test harness.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
