//! What the tests share: a proxy on 127.0.0.1:0 and peers that talk to it, the daemon as a
//! process with its configuration file, and the status listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::envelope::micronets::{Hello, Message as Envelope};
use common::tls::{self, ClientAuth, ClientTlsFiles, ServerTls, ServerTlsFiles};
use futures_util::{SinkExt as _, StreamExt as _};
use testkit::{Leaf, Spawned, test_pki};
use tokio_tungstenite::tungstenite::Message;
use ws_proxy::client::{self, ClientError, ConnectOptions, PeerStream};
use ws_proxy::{Config, Server};

/// Deadline for anything a test waits for.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A running proxy.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    pub(crate) server: Server,
    spawned: Spawned,
}

impl Proxy {
    /// A proxy with the test server certificate, the test CA and its CRL.
    pub(crate) async fn start(config: Config) -> Self {
        let pki = test_pki();
        Self::start_with(
            config,
            ServerTlsFiles {
                cert: pki.server.cert_path.clone(),
                key: Some(pki.server.key_path.clone()),
                client_ca: Some(pki.ca_path.clone()),
                crls: vec![pki.crl_path.clone()],
                client_auth: ClientAuth::Required,
                alpn: Vec::new(),
            },
        )
        .await
    }

    pub(crate) async fn start_with(config: Config, files: ServerTlsFiles) -> Self {
        testkit::init_tracing();
        tls::install_default_provider();
        let server_tls = Arc::new(ServerTls::load(files).expect("server tls"));
        let mut server = None;
        let spawned = testkit::spawn_tcp(|listener, shutdown| {
            let made = Server::new(config, server_tls, shutdown);
            server = Some(made.clone());
            async move { made.serve(listener).await }
        })
        .await;
        Self {
            addr: spawned.addr,
            server: server.expect("server made"),
            spawned,
        }
    }

    /// The URL of meet-up `id`.
    pub(crate) fn url(&self, id: &str) -> String {
        format!(
            "wss://localhost:{}/micronets/v1/ws-proxy/{id}",
            self.addr.port()
        )
    }

    /// Connects `leaf` (or no certificate) to `id`, without HELLO.
    pub(crate) async fn dial(
        &self,
        leaf: Option<&Leaf>,
        id: &str,
    ) -> Result<PeerStream, ClientError> {
        client::connect(&options(&self.url(id), leaf)).await
    }

    /// Connects `leaf` to `id`.
    pub(crate) async fn connect(&self, leaf: &Leaf, id: &str) -> PeerStream {
        self.dial(Some(leaf), id).await.expect("connect")
    }

    /// Two peers on `id` that have exchanged HELLOs.
    pub(crate) async fn pair(&self, id: &str) -> (PeerStream, PeerStream) {
        let pki = test_pki();
        let mut a = self.connect(&pki.alice, id).await;
        send(&mut a, &hello("a")).await;
        // Make sure `a` is the waiter before `b` says HELLO.
        self.wait_for(|s| s.meetups.iter().any(|m| m.id == id))
            .await;
        let mut b = self.connect(&pki.bob, id).await;
        send(&mut b, &hello("b")).await;
        assert_eq!(recv_text(&mut a).await, hello("b"));
        assert_eq!(recv_text(&mut b).await, hello("a"));
        (a, b)
    }

    /// Polls the status until `check` holds.
    pub(crate) async fn wait_for(&self, check: impl Fn(&ws_proxy::server::Status) -> bool) {
        testkit::until("the status condition", WAIT, || {
            check(&self.server.status())
        })
        .await;
    }

    /// Serves `/status` and `/metrics` for this proxy on a port of its own; returns the address.
    pub(crate) async fn serve_status(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(ws_proxy::status::serve(
            listener,
            self.server.clone(),
            common::daemon::Shutdown::new(),
        ));
        addr
    }

    /// Its shutdown handle (triggering it refuses new upgrades with 503).
    pub(crate) fn shutdown(&self) -> &common::daemon::Shutdown {
        &self.spawned.shutdown
    }

    pub(crate) async fn stop(self) {
        self.spawned.stop(WAIT).await.expect("proxy stops cleanly");
    }
}

/// The whole response to `GET path` from the HTTP server at `addr` (status line, headers, body).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    text
}

/// Client options for `leaf` (no certificate when `None`).
pub(crate) fn options(url: &str, leaf: Option<&Leaf>) -> ConnectOptions {
    let files = ClientTlsFiles {
        ca: Some(test_pki().ca_path.clone()),
        cert: leaf.map(|l| l.cert_path.clone()),
        key: leaf.map(|l| l.key_path.clone()),
        ..ClientTlsFiles::default()
    };
    let config = tls::client_config(&files).expect("client tls");
    let mut options = ConnectOptions::new(url, Arc::new(config)).expect("url");
    options.connect_timeout = WAIT;
    options
}

/// A HELLO text with peerId `id`.
pub(crate) fn hello(id: &str) -> String {
    Envelope::Hello(Hello::new(0, "test", id)).encode()
}

pub(crate) async fn send(ws: &mut PeerStream, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// The next data message (pings are answered by the library and skipped).
pub(crate) async fn recv(ws: &mut PeerStream) -> Message {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => return message,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    })
    .await
    .expect("message in time")
}

pub(crate) async fn recv_text(ws: &mut PeerStream) -> String {
    match recv(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the proxy closes the connection; returns the close code and reason.
pub(crate) async fn closed(ws: &mut PeerStream) -> (u16, String) {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Ok(_)) => {}
                Some(Err(err)) => return (0, err.to_string()),
            }
        }
    })
    .await
    .expect("close in time")
}

/// alice then bob on `url`, HELLOs exchanged; alice is the waiter.
pub(crate) async fn pair_at(url: &str) -> (PeerStream, PeerStream) {
    let pki = test_pki();
    let mut a = client::connect(&options(url, Some(&pki.alice)))
        .await
        .expect("alice connects");
    send(&mut a, &hello("a")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = client::connect(&options(url, Some(&pki.bob)))
        .await
        .expect("bob connects");
    send(&mut b, &hello("b")).await;
    assert_eq!(recv_text(&mut a).await, hello("b"));
    assert_eq!(recv_text(&mut b).await, hello("a"));
    (a, b)
}

/// A test config with short timers.
pub(crate) fn quick() -> Config {
    let mut config = Config::default();
    config.limits.close_timeout = Duration::from_secs(1);
    config
}

/// A temporary copy of a file, to swap contents under a running server.
pub(crate) fn copy_to(dir: &std::path::Path, from: &std::path::Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).expect("copy");
    to
}

/// A daemon configuration file in `dir`: listening on 127.0.0.1:0, `top` (more top-level
/// keys), `[tls]` with the test server certificate, the test CA and its CRL, `[limits]` with
/// `limits`.
pub(crate) fn write_config(dir: &std::path::Path, top: &str, limits: &str) -> PathBuf {
    let pki = test_pki();
    write_config_with(
        dir,
        &pki.server.cert_path,
        &pki.server.key_path,
        top,
        limits,
    )
}

/// As [`write_config`], with the server certificate and key at `cert` and `key`.
pub(crate) fn write_config_with(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    top: &str,
    limits: &str,
) -> PathBuf {
    let pki = test_pki();
    let path = dir.join("ws-proxy.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n{top}\n[tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\ncrls = [{crl:?}]\n[limits]\n{limits}\n",
            ca = pki.ca_path,
            crl = pki.crl_path,
        ),
    )
    .unwrap();
    path
}

/// The `ws-proxy` binary.
pub(crate) const DAEMON: &str = env!("CARGO_BIN_EXE_ws-proxy");

/// Starts the `ws-proxy` binary on `config` with `--print-address` and `args`, its stderr to
/// `stderr`; returns it (killed when dropped) and the port it printed.
pub(crate) async fn spawn_daemon(
    config: &std::path::Path,
    args: &[&str],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, u16) {
    spawn_command(tokio::process::Command::new(DAEMON), config, args, stderr).await
}

/// As [`spawn_daemon`], started with a soft and a hard open-file limit (through `prlimit`),
/// as on a host with a small descriptor limit.
pub(crate) async fn spawn_daemon_with_nofile(
    (soft, hard): (u32, u32),
    config: &std::path::Path,
    args: &[&str],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, u16) {
    let mut command = tokio::process::Command::new("prlimit");
    command.arg(format!("--nofile={soft}:{hard}")).arg(DAEMON);
    spawn_command(command, config, args, stderr).await
}

async fn spawn_command(
    mut command: tokio::process::Command,
    config: &std::path::Path,
    args: &[&str],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, u16) {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = command
        .arg("--config")
        .arg(config)
        .arg("--print-address")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let port = line.rsplit(':').next().unwrap().parse().unwrap();
    (child, port)
}
