//! Scaling out: three `ws-proxy` daemons (front only) behind a real HAProxy running the
//! shipped `deploy/haproxy/ws-proxy.cfg` (test addresses and paths substituted), all on
//! loopback, peers from the client library through HAProxy's mutual TLS.
//!
//! Skipped, with a message, where `haproxy` is not installed, unless
//! `WS_PROXY_TEST_REQUIRE_HAPROXY=1` (scripts/test sets it and installs the package).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use common::tls::{self, ClientTlsFiles, Pem};
use rand::seq::SliceRandom as _;
use testkit::{Leaf, test_pki};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio::process::{Child, Command};
use ws_proxy::client::{self, ClientError, PeerStream};

use crate::support::{WAIT, closed, hello, options, recv_text, send, spawn_daemon};

/// The shipped configuration.
const SHIPPED: &str = include_str!("../../../../deploy/haproxy/ws-proxy.cfg");
const PREFIX: &str = "/micronets/v1/ws-proxy/";

/// Whether to run: `haproxy` is installed, or the test fails when it must be.
pub(crate) fn haproxy_present() -> bool {
    let present = std::process::Command::new("haproxy")
        .arg("-v")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        assert!(
            std::env::var_os("WS_PROXY_TEST_REQUIRE_HAPROXY").is_none_or(|v| v != "1"),
            "haproxy is not installed and WS_PROXY_TEST_REQUIRE_HAPROXY=1"
        );
        eprintln!("skipped: haproxy is not installed (apt-get install haproxy)");
    }
    present
}

/// One ws-proxy daemon with a front listener and a status socket.
struct Instance {
    child: Child,
    front: SocketAddr,
    status: PathBuf,
}

impl Instance {
    /// The `/status` document (every id: one page of 1000).
    async fn status(&self) -> serde_json::Value {
        let text = unix_get(&self.status, "/status?limit=1000").await;
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    /// The meet-up ids it holds.
    async fn ids(&self) -> BTreeSet<String> {
        self.status().await["meetups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn metrics(&self) -> String {
        unix_get(&self.status, "/metrics").await
    }
}

/// HAProxy and its instances; every process is killed when dropped.
struct Cluster {
    instances: Vec<Instance>,
    _haproxy: Child,
    port: u16,
    admin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Three instances with `extra` in their configuration (e.g. `[[authorize]]` rules),
    /// then HAProxy in front of them, once it has every instance up.
    async fn start(extra: &str) -> Self {
        Self::start_with(extra, 1).await
    }

    /// As [`Cluster::start`], the instances waiting `close_secs` for a peer's close frame.
    async fn start_with(extra: &str, close_secs: u64) -> Self {
        Self::start_caps(extra, close_secs, Caps::Raised).await
    }

    /// As [`Cluster::start_with`], HAProxy's per-address caps as `caps` says.
    async fn start_caps(extra: &str, close_secs: u64, caps: Caps) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut instances = Vec::new();
        for i in 0..3 {
            let status = dir.path().join(format!("status{i}.sock"));
            let config = dir.path().join(format!("ws-proxy{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "status_listen = \"unix:{}\"\n{extra}\n[front]\nlisten = \"127.0.0.1:0\"\npeers = [\"127.0.0.1\"]\n[limits]\nclose_timeout_secs = {close_secs}\n",
                    status.display()
                ),
            )
            .unwrap();
            let (child, port) = spawn_daemon(&config, &[], std::process::Stdio::null()).await;
            instances.push(Instance {
                child,
                front: SocketAddr::from(([127, 0, 0, 1], port)),
                status,
            });
        }
        let port = free_port();
        let admin = dir.path().join("admin.sock");
        let cfg = dir.path().join("haproxy.cfg");
        let fronts: Vec<SocketAddr> = instances.iter().map(|i| i.front).collect();
        std::fs::write(&cfg, haproxy_cfg(dir.path(), port, &admin, &fronts, caps)).unwrap();
        let haproxy = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy starts");
        let cluster = Self {
            instances,
            _haproxy: haproxy,
            port,
            admin,
            _dir: dir,
        };
        for name in ["ws1", "ws2", "ws3"] {
            cluster.wait_server(name, "UP").await;
        }
        cluster
    }

    /// Waits until HAProxy reports server `name` in `state` (`UP`, `DOWN`).
    async fn wait_server(&self, name: &str, state: &str) {
        let line = format!("ws_proxy_instances,{name},");
        testkit::eventually(&format!("haproxy has {name} {state}"), WAIT, || async {
            let Ok(mut admin) = UnixStream::connect(&self.admin).await else {
                return None;
            };
            admin.write_all(b"show stat\n").await.unwrap();
            let mut text = String::new();
            let _ = admin.read_to_string(&mut text).await;
            // Field 18 of `show stat` is the status.
            text.lines()
                .any(|l| {
                    l.starts_with(&line)
                        && l.split(',').nth(17).is_some_and(|s| s.starts_with(state))
                })
                .then_some(())
        })
        .await;
    }

    async fn dial(&self, leaf: &Leaf, id: &str) -> Result<PeerStream, ClientError> {
        dial(self.port, leaf, id).await
    }

    /// Which instance holds each id.
    async fn placement(&self) -> BTreeMap<String, usize> {
        let mut placed = BTreeMap::new();
        for (i, instance) in self.instances.iter().enumerate() {
            for id in instance.ids().await {
                assert!(placed.insert(id, i).is_none(), "an id on two instances");
            }
        }
        placed
    }
}

/// Connects `leaf` to `id` through HAProxy on `port`.
pub(crate) async fn dial(port: u16, leaf: &Leaf, id: &str) -> Result<PeerStream, ClientError> {
    let url = format!("wss://localhost:{port}{PREFIX}{id}");
    client::connect(&options(&url, Some(leaf))).await
}

/// HAProxy's per-address caps on strangers in a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caps {
    /// As shipped (20 unauthenticated connections at once, 200 new ones in 10 s).
    Shipped,
    /// Out of the way: the load tests open hundreds of connections at once from 127.0.0.1.
    Raised,
    /// A rate cap of 5 new connections a second (the concurrent cap as shipped).
    FiveASecond,
}

/// The shipped configuration for this test: the same file, with the global lines a
/// non-root process cannot use (chroot, user, syslog, daemon) left out, and addresses,
/// certificate paths, the admin socket and a short check interval substituted (and the
/// per-address caps raised, unless `caps` is [`Caps::Shipped`]). Every substitution must
/// match, so the test fails if the shipped file changes shape.
pub(crate) fn haproxy_cfg(
    dir: &Path,
    port: u16,
    admin: &Path,
    fronts: &[SocketAddr],
    caps: Caps,
) -> String {
    let pki = test_pki();
    // HAProxy's certificate file holds the certificate and then its key.
    let pem = dir.join("haproxy.pem");
    std::fs::write(
        &pem,
        format!("{}{}", pki.server.cert_pem, pki.server.key_pem),
    )
    .unwrap();
    let dropped = ["log /dev/log", "chroot ", "user ", "group ", "daemon"];
    let mut text: String = SHIPPED
        .lines()
        .filter(|line| !dropped.iter().any(|d| line.trim_start().starts_with(d)))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(
        SHIPPED.lines().count() - text.lines().count(),
        dropped.len(),
        "the global lines the test leaves out"
    );
    let mut substitutions = vec![
        (
            "bind :5050 ssl crt /etc/haproxy/certs/ws-proxy.pem ca-file /etc/haproxy/certs/ca.pem crl-file /etc/haproxy/certs/crl.pem".to_owned(),
            format!(
                "bind 127.0.0.1:{port} ssl crt {} ca-file {} crl-file {}",
                pem.display(),
                pki.ca_path.display(),
                pki.crl_path.display()
            ),
        ),
        (
            "stats socket /run/haproxy/admin.sock".to_owned(),
            format!("stats socket {}", admin.display()),
        ),
        ("maxconn 50000".to_owned(), "maxconn 2000".to_owned()),
        // Checks every 100 ms: a killed instance is down within a few hundred.
        ("check inter 2s".to_owned(), "check inter 100ms".to_owned()),
    ];
    for (i, front) in fronts.iter().enumerate() {
        substitutions.push((
            format!("server ws{n} 10.0.0.1{n}:7001", n = i + 1),
            format!("server ws{} {front}", i + 1),
        ));
    }
    const CONCURRENT: &str = "src,table_conn_cur(ws_proxy),sub(sess.authenticated) ge ";
    const RATE: &str = "src,table_conn_rate(ws_proxy) ge ";
    match caps {
        Caps::Shipped => {}
        Caps::Raised => {
            substitutions.push((
                format!("{CONCURRENT}20 }}"),
                format!("{CONCURRENT}100000 }}"),
            ));
            substitutions.push((format!("{RATE}200 }}"), format!("{RATE}100000 }}")));
        }
        Caps::FiveASecond => {
            substitutions.push((format!("{RATE}200 }}"), format!("{RATE}5 }}")));
            substitutions.push(("conn_rate(10s)".to_owned(), "conn_rate(1s)".to_owned()));
        }
    }
    for (from, to) in substitutions {
        assert_eq!(
            text.matches(&from).count(),
            1,
            "{from:?} in the shipped file"
        );
        text = text.replace(&from, &to);
    }
    text
}

/// A port free now on 127.0.0.1 (HAProxy binds it a moment later).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole answer to `GET target` on the Unix socket at `path`.
async fn unix_get(path: &Path, target: &str) -> String {
    let mut stream = UnixStream::connect(path).await.unwrap();
    stream
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// The DER certificate of `leaf` in base64, as HAProxy forwards it.
pub(crate) fn cert_header(leaf: &Leaf) -> String {
    let der = Pem::new("leaf", &leaf.cert_pem).certs().unwrap().remove(0);
    base64::engine::general_purpose::STANDARD.encode(der.as_ref())
}

/// An upgrade request for `id` with `headers` (each ending in CRLF).
pub(crate) fn upgrade_request(id: &str, headers: &str) -> String {
    format!(
        "GET {PREFIX}{id} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    )
}

/// Sends `request` on `stream` and returns the status line of the answer ("" if the
/// connection closed without one).
pub(crate) async fn status_line<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
) -> String {
    let _ = stream.write_all(request.as_bytes()).await;
    let mut buf = vec![0; 4096];
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `request` sent through HAProxy with `leaf`'s certificate: the answer's status line and
/// the connection.
async fn through_haproxy(
    cluster: &Cluster,
    leaf: &Leaf,
    request: &str,
) -> (String, impl Drop + use<>) {
    let files = ClientTlsFiles {
        ca: Some(test_pki().ca_path.clone()),
        cert: Some(leaf.cert_path.clone()),
        key: Some(leaf.key_path.clone()),
        ..ClientTlsFiles::default()
    };
    let config = Arc::new(tls::client_config(&files).unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", cluster.port))
        .await
        .unwrap();
    let mut stream = tls::connect(config, "localhost", tcp, WAIT).await.unwrap();
    (status_line(&mut stream, request).await, Keep(stream))
}

/// Holds a connection open until dropped.
struct Keep<T>(T);

impl<T> Drop for Keep<T> {
    fn drop(&mut self) {}
}

async fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

/// A TCP connection to `to` from the local address `from`.
async fn tcp_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// One side of a meet-up: HELLO, the partner's HELLO, `count` numbered messages each way in
/// order. Returns the stream, still open.
async fn meet(mut ws: PeerStream, id: &str, side: &str, other: &str, count: usize) -> PeerStream {
    send(&mut ws, &hello(&format!("{id} {side}"))).await;
    assert_eq!(recv_text(&mut ws).await, hello(&format!("{id} {other}")));
    for n in 0..count {
        send(&mut ws, &format!("{id} {side} {n}")).await;
    }
    for n in 0..count {
        assert_eq!(
            recv_text(&mut ws).await,
            format!("{id} {other} {n}"),
            "in order"
        );
    }
    ws
}

/// Connects both peers of every id through HAProxy, all at once in random order, and
/// relays `count` messages each way; the open streams by id.
async fn meet_all(
    port: u16,
    ids: &[String],
    count: usize,
) -> BTreeMap<String, (PeerStream, PeerStream)> {
    let pki = test_pki();
    let mut sides: Vec<(String, bool)> = ids
        .iter()
        .flat_map(|id| [(id.clone(), true), (id.clone(), false)])
        .collect();
    sides.shuffle(&mut rand::thread_rng());
    let tasks: Vec<_> = sides
        .into_iter()
        .map(|(id, first)| {
            tokio::spawn(async move {
                let (leaf, side, other) = if first {
                    (&pki.alice, "a", "b")
                } else {
                    (&pki.bob, "b", "a")
                };
                let ws = dial(port, leaf, &id)
                    .await
                    .expect("connects through haproxy");
                (id.clone(), first, meet(ws, &id, side, other, count).await)
            })
        })
        .collect();
    let mut halves: BTreeMap<String, (Option<PeerStream>, Option<PeerStream>)> = BTreeMap::new();
    for task in tasks {
        let (id, first, ws) = task.await.unwrap();
        let entry = halves.entry(id).or_default();
        if first {
            entry.0 = Some(ws);
        } else {
            entry.1 = Some(ws);
        }
    }
    halves
        .into_iter()
        .map(|(id, (a, b))| (id, (a.unwrap(), b.unwrap())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_ids_meet_through_haproxy_spread_over_three_instances() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start("").await;
    let ids: Vec<String> = (0..200).map(|n| format!("gw/{n}")).collect();
    let pairs = meet_all(cluster.port, &ids, 3).await;
    assert_eq!(pairs.len(), 200);
    let placement = cluster.placement().await;
    assert_eq!(
        placement.keys().cloned().collect::<Vec<_>>(),
        pairs.keys().cloned().collect::<Vec<_>>(),
        "every id on exactly one instance"
    );
    for (i, instance) in cluster.instances.iter().enumerate() {
        let held = placement.values().filter(|&&at| at == i).count();
        assert!(held > 0, "instance {i} holds no id");
        let status = instance.status().await;
        assert_eq!(status["connections"], 2 * held);
        // The forwarded identity and address, as with direct TLS.
        let peer = &status["meetups"][0]["peers"][0];
        assert!(["alice", "bob"].contains(&peer["identity"]["cn"].as_str().unwrap()));
        assert_eq!(peer["address"], "127.0.0.1:0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_closes_only_its_pairs_which_meet_again_elsewhere() {
    if !haproxy_present() {
        return;
    }
    let mut cluster = Cluster::start("").await;
    let ids: Vec<String> = (0..30).map(|n| format!("gw/{n}")).collect();
    let mut pairs = meet_all(cluster.port, &ids, 1).await;
    let before = cluster.placement().await;
    let victim = *before.values().next().unwrap();
    let doomed: BTreeSet<String> = before
        .iter()
        .filter(|(_, at)| **at == victim)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(!doomed.is_empty() && doomed.len() < ids.len());
    // SIGKILL: no drain, no close frames from the instance.
    cluster.instances[victim].child.start_kill().unwrap();
    cluster.instances[victim].child.wait().await.unwrap();
    for id in &doomed {
        let (a, b) = pairs.get_mut(id).unwrap();
        closed(a).await;
        closed(b).await;
    }
    // The others relay on, undisturbed, after the kill.
    for (id, (a, b)) in pairs.iter_mut().filter(|(id, _)| !doomed.contains(*id)) {
        send(a, &format!("{id} after")).await;
        assert_eq!(recv_text(b).await, format!("{id} after"));
        send(b, &format!("{id} back")).await;
        assert_eq!(recv_text(a).await, format!("{id} back"));
    }
    // Once HAProxy has marked it down, the closed pairs' peers reconnect and meet again on
    // the other instances; nothing else moved.
    cluster
        .wait_server(&format!("ws{}", victim + 1), "DOWN")
        .await;
    let doomed_ids: Vec<String> = doomed.iter().cloned().collect();
    let again = meet_all(cluster.port, &doomed_ids, 2).await;
    assert_eq!(again.len(), doomed.len());
    let mut after = BTreeMap::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        if i != victim {
            for id in instance.ids().await {
                after.insert(id, i);
            }
        }
    }
    for (id, at) in &before {
        if doomed.contains(id) {
            assert_ne!(after[id], victim);
        } else {
            assert_eq!(after[id], *at, "{id} stayed where it was");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_stop_at_haproxy() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start("").await;
    let pki = test_pki();
    for leaf in [&pki.mallory, &pki.revoked, &pki.expired] {
        match cluster.dial(leaf, "gw/1").await {
            // With TLS 1.3 the alert comes after the client's side of the handshake.
            Err(ClientError::Tls(_) | ClientError::CertificateRefused(_)) => {}
            Err(other) => panic!("{leaf:?}: not a failed handshake: {other}"),
            Ok(_) => panic!("{leaf:?} was let through"),
        }
    }
    // The instances saw nothing: no upgrade request, no connection but health checks.
    for instance in &cluster.instances {
        let status = instance.status().await;
        assert_eq!(status["counters"]["upgraded"], 0);
        assert!(!instance.metrics().await.contains("route=\"upgrade\""));
    }
}

/// alice may join only `gw/alice`; bob, the manager, any id.
const RULES: &str = "[[authorize]]\ncn = \"alice\"\nids = [\"gw/{cn}\"]\n[[authorize]]\ncn = \"bob\"\nids = [\"**\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_apply_to_the_forwarded_identity_and_forged_headers_are_replaced() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start(RULES).await;
    let pki = test_pki();
    match cluster.dial(&pki.alice, "gw/bob").await {
        Err(ClientError::Refused { status: 403, .. }) => {}
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    // alice sends bob's certificate and another address in the identity headers: HAProxy
    // replaces them with her own, so bob's ids stay closed to her...
    let forged = format!(
        "X-Client-Cert: {}\r\nX-Client-Addr: 203.0.113.9\r\n",
        cert_header(&pki.bob)
    );
    for id in ["gw/bob", "gw/alice2", "other"] {
        let (answer, _) =
            through_haproxy(&cluster, &pki.alice, &upgrade_request(id, &forged)).await;
        assert_eq!(answer, "HTTP/1.1 403 Forbidden", "{id}");
    }
    // ...and her own id is hers, from her real address.
    let (answer, _open) =
        through_haproxy(&cluster, &pki.alice, &upgrade_request("gw/alice", &forged)).await;
    assert_eq!(answer, "HTTP/1.1 101 Switching Protocols");
    // Listed right after the 101 is written.
    let waiting = testkit::eventually("alice is listed", WAIT, || async {
        let mut waiting = Vec::new();
        for instance in &cluster.instances {
            let status = instance.status().await;
            waiting.extend(status["awaiting_hello"].as_array().unwrap().iter().cloned());
        }
        (!waiting.is_empty()).then_some(waiting)
    })
    .await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["identity"]["cn"], "alice");
    assert_eq!(waiting[0]["address"], "127.0.0.1:0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_listener_takes_only_the_front() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start(RULES).await;
    let pki = test_pki();
    let instance = &cluster.instances[0];
    let forged = format!(
        "X-Client-Cert: {}\r\nX-Client-Addr: 203.0.113.9\r\n",
        cert_header(&pki.bob)
    );
    // From 127.0.0.2, not a front address: closed before a byte is read, no answer.
    let mut stranger = tcp_from([127, 0, 0, 2], instance.front).await;
    assert_eq!(
        status_line(&mut stranger, &upgrade_request("gw/x", &forged)).await,
        ""
    );
    assert!(
        instance
            .metrics()
            .await
            .contains("ws_proxy_refusals_total{reason=\"not_front\"} 1"),
        "{}",
        instance.metrics().await
    );
    // From 127.0.0.1, the front's address, the same headers are believed: whoever reaches
    // the front listener from a front address IS the front (docs/ws-proxy.md).
    let mut front = tcp_from([127, 0, 0, 1], instance.front).await;
    let answer = status_line(&mut front, &upgrade_request("gw/x", &forged)).await;
    assert_eq!(answer, "HTTP/1.1 101 Switching Protocols");
    let peer = testkit::eventually("bob is listed", WAIT, || async {
        let status = instance.status().await;
        let peer = &status["awaiting_hello"][0];
        (!peer.is_null()).then(|| peer.clone())
    })
    .await;
    assert_eq!(peer["identity"]["cn"], "bob");
    assert_eq!(peer["address"], "203.0.113.9:0");
    // The health check HAProxy sends: 200, not a refusal.
    let mut front = tcp_from([127, 0, 0, 1], instance.front).await;
    let answer = status_line(
        &mut front,
        "GET /healthz HTTP/1.1\r\nHost: ws-proxy\r\n\r\n",
    )
    .await;
    assert_eq!(answer, "HTTP/1.1 200 OK");
    let metrics = instance.metrics().await;
    assert!(
        metrics.contains("route=\"health\",status=\"200\""),
        "{metrics}"
    );
    assert!(!metrics.contains("reason=\"bad_request\""), "{metrics}");
    // SIGHUP on a front-only instance reloads nothing and it serves on.
    signal(instance.child.id().unwrap(), "HUP").await;
    let mut front = tcp_from([127, 0, 0, 1], instance.front).await;
    let answer = status_line(
        &mut front,
        "GET /healthz HTTP/1.1\r\nHost: ws-proxy\r\n\r\n",
    )
    .await;
    assert_eq!(answer, "HTTP/1.1 200 OK");
    // Without the address header, or with a broken certificate: 400.
    for headers in [
        String::new(),
        "X-Client-Addr: 127.0.0.1\r\nX-Client-Cert: bm90IGEgY2VydA==\r\n".to_owned(),
    ] {
        let mut front = tcp_from([127, 0, 0, 1], instance.front).await;
        let answer = status_line(&mut front, &upgrade_request("gw/y", &headers)).await;
        assert_eq!(answer, "HTTP/1.1 400 Bad Request", "{headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_fails_its_health_check_while_it_drains() {
    if !haproxy_present() {
        return;
    }
    // Peers that do not read keep the drain going for the 5 s close timeout.
    let mut cluster = Cluster::start_with("", 5).await;
    let pki = test_pki();
    let mut a = cluster.dial(&pki.alice, "gw/drain").await.unwrap();
    send(&mut a, &hello("a")).await;
    let victim = testkit::eventually("gw/drain is listed", WAIT, || async {
        cluster.placement().await.get("gw/drain").copied()
    })
    .await;
    signal(cluster.instances[victim].child.id().unwrap(), "TERM").await;
    // The listener closes at once, so HAProxy's checks fail while the instance still drains.
    cluster
        .wait_server(&format!("ws{}", victim + 1), "DOWN")
        .await;
    assert!(
        cluster.instances[victim]
            .child
            .try_wait()
            .unwrap()
            .is_none(),
        "still draining"
    );
    assert_eq!(
        closed(&mut a).await,
        (1001, "server shutting down".to_owned())
    );
}

/// Whether HAProxy has closed `stream`, or refused it (`None`), without waiting: no data
/// and not closed is open.
fn is_closed(stream: &Option<TcpStream>) -> bool {
    let mut buf = [0; 64];
    !stream.as_ref().is_some_and(|stream| {
        matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    })
}

/// A TCP connection to `to` from the local address `from`, sent `first`; `None` if it was
/// reset while connecting.
async fn try_tcp_from(from: [u8; 4], to: SocketAddr, first: &[u8]) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut stream = socket.connect(to).await.ok()?;
    let _ = stream.write_all(first).await;
    Some(stream)
}

/// SECURITY.md invariant 3 at HAProxy, with the shipped caps and handshake deadline: one
/// address opening idle connections (a stranger, no TLS) holds at most 20, each at most
/// 10 s, while clients from other addresses connect and relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_holds_at_most_its_cap_and_clients_still_connect() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start_caps("", 1, Caps::Shipped).await;
    let pki = test_pki();
    let haproxy = SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let opened = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..30 {
        // The first byte of a ClientHello, then nothing.
        idle.push(try_tcp_from([127, 0, 0, 3], haproxy, &[0x16]).await);
    }
    // Beyond 20, each is closed at accept; 20 are held.
    testkit::eventually("10 of 30 closed at accept", WAIT, || async {
        (idle.iter().filter(|s| is_closed(s)).count() == 10).then_some(())
    })
    .await;
    // Which 20 depends on the order HAProxy accepted them in.
    let held: Vec<Option<TcpStream>> = idle.into_iter().filter(|s| !is_closed(s)).collect();
    assert_eq!(held.len(), 20, "20 held");
    // Meanwhile clients from another address get in and relay.
    let (a, b) = tokio::join!(
        cluster.dial(&pki.alice, "gw/held"),
        cluster.dial(&pki.bob, "gw/held")
    );
    let (a, b) = (a.expect("alice connects"), b.expect("bob connects"));
    tokio::join!(
        meet(a, "gw/held", "a", "b", 3),
        meet(b, "gw/held", "b", "a", 3)
    );
    assert!(held.iter().all(|s| !is_closed(s)), "still held");
    // The handshake deadline (`timeout client`, 10 s) is a total one: they all die by then.
    testkit::eventually(
        "the held ones closed at the handshake deadline",
        std::time::Duration::from_secs(15),
        || async { held.iter().all(is_closed).then_some(()) },
    )
    .await;
    let lived = opened.elapsed();
    assert!(
        lived >= std::time::Duration::from_secs(9) && lived < std::time::Duration::from_secs(13),
        "{lived:?}"
    );
    // The address's budget is free again.
    let again = try_tcp_from([127, 0, 0, 3], haproxy, &[0x16]).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!is_closed(&again));
}

/// Second attack pass: refused attempts counted against an address's rate, so a stranger
/// connecting and closing in a loop from an address it shares with clients (a NAT) shut
/// the address out for as long as it kept on. Now only connections let in count: at a cap
/// of 5 a second, an address trying 10 times a second for 3 s gets about 15 in, not 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_attempts_do_not_count_against_the_rate() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start_caps("", 1, Caps::FiveASecond).await;
    let haproxy = SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let started = std::time::Instant::now();
    let (mut let_in, mut refused) = (0, 0);
    while started.elapsed() < std::time::Duration::from_secs(3) {
        let stream = try_tcp_from([127, 0, 0, 5], haproxy, &[0x16]).await;
        // A refused connection is closed at accept; one let in waits for its handshake.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if is_closed(&stream) {
            refused += 1;
        } else {
            let_in += 1;
        }
    }
    assert!(refused > 0, "the cap refused some ({let_in} let in)");
    assert!(
        let_in >= 9,
        "{let_in} let in, {refused} refused: the refused attempts counted"
    );
}

/// `openssl s_client` to HAProxy on `port` as `leaf` with `version` (`-tls1_2`, `-tls1_3`),
/// saving the session in `save` or resuming the one in `resume`: whether the handshake
/// reused a session.
fn openssl_reused(port: u16, leaf: &Leaf, version: &str, session: (&str, &Path)) -> bool {
    let pki = test_pki();
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            version,
        ])
        .arg("-CAfile")
        .arg(&pki.ca_path)
        .arg("-cert")
        .arg(&leaf.cert_path)
        .arg("-key")
        .arg(&leaf.key_path)
        .arg(session.0)
        .arg(session.1)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = text
        .lines()
        .find(|l| l.starts_with("New, ") || l.starts_with("Reused, "))
        .unwrap_or_else(|| panic!("no handshake: {text}"));
    verdict.starts_with("Reused, ")
}

/// No TLS session is resumed: a client revoked through the runtime API cannot come back on
/// a session it had before (every connection is a full handshake against the current CRL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tls_session_is_resumed() {
    if !haproxy_present() {
        return;
    }
    let cluster = Cluster::start("").await;
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    for version in ["-tls1_2", "-tls1_3"] {
        let session = dir.path().join(format!("session{version}"));
        let port = cluster.port;
        let first = openssl_reused(port, &pki.alice, version, ("-sess_out", &session));
        assert!(!first, "{version}: the first is new");
        if !session.exists() {
            // Nothing to resume with (no ticket, no session id was sent).
            continue;
        }
        let second = openssl_reused(port, &pki.alice, version, ("-sess_in", &session));
        assert!(!second, "{version}: the session was resumed");
    }
}

/// Needs no HAProxy: an instance with both listeners, the front's requests made by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_share_the_per_identity_limits() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = crate::support::write_config(
        dir.path(),
        &format!("[front]\nlisten = \"{front}\"\npeers = [\"127.0.0.1\"]"),
        "max_connections_per_identity = 1",
    );
    let (_child, port) = spawn_daemon(&config, &[], std::process::Stdio::null()).await;
    let url = format!("wss://localhost:{port}{PREFIX}gw/a");
    let _alice = client::connect(&options(&url, Some(&pki.alice)))
        .await
        .unwrap();
    // alice's one connection is taken over TLS: through the front, 429; bob's is free.
    let mut tcp = tcp_from([127, 0, 0, 1], front).await;
    let alice = format!(
        "X-Client-Cert: {}\r\nX-Client-Addr: 192.0.2.1\r\n",
        cert_header(&pki.alice)
    );
    let answer = status_line(&mut tcp, &upgrade_request("gw/a", &alice)).await;
    assert_eq!(answer, "HTTP/1.1 429 Too Many Requests");
    let mut tcp = tcp_from([127, 0, 0, 1], front).await;
    let bob = format!(
        "X-Client-Cert: {}\r\nX-Client-Addr: 192.0.2.1\r\n",
        cert_header(&pki.bob)
    );
    let answer = status_line(&mut tcp, &upgrade_request("gw/a", &bob)).await;
    assert_eq!(answer, "HTTP/1.1 101 Switching Protocols");
}

/// Needs no HAProxy: `[front]` without peers exits 78; front only is a valid configuration.
#[tokio::test]
async fn a_front_listener_without_peers_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("ws-proxy.toml");
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(crate::support::DAEMON)
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .unwrap()
    };
    for text in [
        "[front]\nlisten = \"127.0.0.1:0\"\n",
        "[front]\nlisten = \"127.0.0.1:0\"\npeers = []\n",
    ] {
        let out = check(text);
        assert_eq!(out.status.code(), Some(78), "{text:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("[front] peers is required"), "{stderr}");
    }
    let out = check("[front]\nlisten = \"127.0.0.1:0\"\npeers = [\"127.0.0.1\"]\n");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("front peers 127.0.0.1"), "{stdout}");
}
