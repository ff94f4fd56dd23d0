//! The front path's trust, issue 20 follow-up: `[front] crls` apply to forwarded
//! certificates at the upgrade and, on SIGHUP, to live front connections (SECURITY.md
//! invariant 5); a Unix-socket front listener takes only `[front] peer_users`.
//!
//! The CRL tests need no HAProxy: the front's requests are made by hand from a front address.

use std::net::SocketAddr;
use std::path::Path;

use futures_util::{SinkExt as _, StreamExt as _};
use testkit::{Leaf, test_pki};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::haproxy::{cert_header, status_line, upgrade_request};
use crate::support::{DAEMON, WAIT, hello, spawn_daemon};

const PREFIX: &str = "/micronets/v1/ws-proxy/";

/// A websocket through the front listener at `front` as `leaf`, from 127.0.0.1.
async fn front_ws(front: SocketAddr, leaf: &Leaf, id: &str) -> WebSocketStream<TcpStream> {
    let mut request = format!("ws://{front}{PREFIX}{id}")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("X-Client-Cert", cert_header(leaf).parse().unwrap());
    headers.insert("X-Client-Addr", "192.0.2.10".parse().unwrap());
    let tcp = TcpStream::connect(front).await.unwrap();
    tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("upgraded")
        .0
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

async fn recv_text<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected text, got {other:?}"),
            }
        }
    })
    .await
    .expect("a message in time")
}

async fn closed<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> (u16, String) {
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

/// alice then bob meet on `id` through the front and relay one message.
async fn meet(
    front: SocketAddr,
    id: &str,
) -> (WebSocketStream<TcpStream>, WebSocketStream<TcpStream>) {
    let pki = test_pki();
    let mut alice = front_ws(front, &pki.alice, id).await;
    send(&mut alice, &hello("a")).await;
    let mut bob = front_ws(front, &pki.bob, id).await;
    send(&mut bob, &hello("b")).await;
    assert_eq!(recv_text(&mut alice).await, hello("b"));
    assert_eq!(recv_text(&mut bob).await, hello("a"));
    send(&mut alice, "before").await;
    assert_eq!(recv_text(&mut bob).await, "before");
    (alice, bob)
}

async fn signal(pid: u32, name: &str) {
    let status = tokio::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

/// The status line of an upgrade of `leaf` on `id` through the front.
async fn upgrade_status(front: SocketAddr, leaf: &Leaf, id: &str) -> String {
    let mut tcp = TcpStream::connect(front).await.unwrap();
    let headers = format!(
        "X-Client-Cert: {}\r\nX-Client-Addr: 192.0.2.10\r\n",
        cert_header(leaf)
    );
    status_line(&mut tcp, &upgrade_request(id, &headers)).await
}

fn front_crl_config(dir: &Path, ca: &Path, crl: &Path) -> std::path::PathBuf {
    let config = dir.join("ws-proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[front]\nlisten = \"127.0.0.1:0\"\npeers = [\"127.0.0.1\"]\nclient_ca = \"{}\"\ncrls = [\"{}\"]\n[limits]\nclose_timeout_secs = 1\n",
            ca.display(),
            crl.display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_crls_refuse_at_the_upgrade_and_close_live_peers_on_sighup() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("crl.pem");
    std::fs::write(&crl, &pki.crl_pem).unwrap();
    let config = front_crl_config(dir.path(), &pki.ca_path, &crl);
    let (child, port) = spawn_daemon(&config, &[], std::process::Stdio::null()).await;
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    // The test PKI's CRL revokes "revoked": refused at the upgrade, 403.
    assert_eq!(
        upgrade_status(front, &pki.revoked, "gw/r").await,
        "HTTP/1.1 403 Forbidden"
    );
    let (mut alice, mut bob) = meet(front, "gw/crl").await;

    // A CRL revoking alice, then SIGHUP: alice is closed with 1008, bob hears she left.
    std::fs::write(&crl, pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    signal(child.id().unwrap(), "HUP").await;
    let (code, reason) = closed(&mut alice).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "client certificate revoked")
    );
    let (code, reason) = closed(&mut bob).await;
    assert_eq!(
        (code, reason.as_str()),
        (1002, ws_proxy::PARTNER_LEFT_REASON)
    );
    assert_eq!(
        upgrade_status(front, &pki.alice, "gw/again").await,
        "HTTP/1.1 403 Forbidden"
    );

    // A bad CRL on SIGHUP keeps the old one: alice is still refused, bob still admitted.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    signal(child.id().unwrap(), "HUP").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        upgrade_status(front, &pki.alice, "gw/again2").await,
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        upgrade_status(front, &pki.bob, "gw/again2").await,
        "HTTP/1.1 101 Switching Protocols"
    );
}

#[tokio::test]
async fn front_crls_are_verified_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki();
    // The root's CRL, against a bundle of another CA: not used, the daemon does not start.
    let config = front_crl_config(dir.path(), &pki.untrusted_ca_path, &pki.crl_path);
    let out = std::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[front] client_ca and crls"), "{stderr}");
}

/// A front-only instance on a Unix socket in `dir` (made 0755: others may enter, not
/// write), peer_users root, the socket given to nogroup (so that nobody may connect and be
/// refused by its uid, not by the socket's mode); metrics on TCP for the printed port.
async fn unix_instance(dir: &Path) -> (tokio::process::Child, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("front.sock");
    let config = dir.join("ws-proxy.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:0\"\n[front]\nlisten = \"unix:{}\"\npeer_users = [\"root\"]\nsocket_group = \"nogroup\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let (child, _) = spawn_daemon(&config, &[], std::process::Stdio::null()).await;
    (child, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_front_listener_serves_haproxy_and_refuses_other_users() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    let (_child, socket) = unix_instance(dir.path()).await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534, "socket_group nogroup");
    // From uid nobody (in the socket's group): closed before a byte is read, no answer.
    let out = std::process::Command::new("runuser")
        .args([
            "-u",
            "nobody",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}", "--unix-socket"])
        .arg(&socket)
        .arg("http://ws-proxy/healthz")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000", "{out:?}");
    // From root, a peer user: the health check answers.
    let mut unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    assert_eq!(
        status_line(&mut unix, "GET /healthz HTTP/1.1\r\nHost: ws-proxy\r\n\r\n").await,
        "HTTP/1.1 200 OK"
    );

    // Through HAProxy (running as root, a peer user), the shipped file with its one
    // server on the socket: a pair meets and relays.
    if !crate::haproxy::haproxy_present() {
        return;
    }
    let port = crate::haproxy::free_port();
    let admin = dir.path().join("admin.sock");
    let placeholders: Vec<SocketAddr> = (1..=3)
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect();
    let cfg = crate::haproxy::haproxy_cfg(
        dir.path(),
        port,
        &admin,
        &placeholders,
        crate::haproxy::Caps::Raised,
    )
    .replace(
        "server ws1 127.0.0.1:1",
        &format!("server ws1 {}", socket.display()),
    )
    .lines()
    .filter(|l| !l.contains("server ws2 127.0.0.1:2") && !l.contains("server ws3 127.0.0.1:3"))
    .map(|l| format!("{l}\n"))
    .collect::<String>();
    let cfg_path = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).unwrap();
    let _haproxy = tokio::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy starts");
    let pki = test_pki();
    let mut alice = testkit::eventually("haproxy serves", WAIT, || async {
        crate::haproxy::dial(port, &pki.alice, "gw/unix").await.ok()
    })
    .await;
    crate::support::send(&mut alice, &hello("a")).await;
    let mut bob = crate::haproxy::dial(port, &pki.bob, "gw/unix")
        .await
        .unwrap();
    crate::support::send(&mut bob, &hello("b")).await;
    assert_eq!(crate::support::recv_text(&mut alice).await, hello("b"));
    assert_eq!(crate::support::recv_text(&mut bob).await, hello("a"));
    crate::support::send(&mut alice, "over the socket").await;
    assert_eq!(crate::support::recv_text(&mut bob).await, "over the socket");
}

#[tokio::test]
async fn a_front_socket_in_a_directory_others_may_write_exits_78() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = dir.path().join("ws-proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[front]\nlisten = \"unix:{}\"\npeer_users = [\"root\"]\n",
            dir.path().join("front.sock").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("writable by nobody else"), "{stderr}");
    assert!(!dir.path().join("front.sock").exists());
}

/// The attacker's layout: the socket's directory is root's 0755, but the one above it is
/// `nobody`'s, who could rename it away and plant a socket of their own at the path.
#[tokio::test]
async fn a_front_socket_below_a_directory_another_user_owns_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("u");
    let run = theirs.join("run");
    std::fs::create_dir_all(&run).unwrap();
    // nobody: uid and gid 65534.
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let config = dir.path().join("ws-proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[front]\nlisten = \"unix:{}\"\npeer_users = [\"root\"]\n",
            run.join("front.sock").display()
        ),
    )
    .unwrap();
    // Before the check the daemon served on; it must exit at once.
    let child = tokio::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(crate::support::WAIT, child.wait_with_output())
        .await
        .expect("exits at start")
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "refusing {}: every directory above",
            theirs.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("owner uid 65534"), "{stderr}");
    assert!(!run.join("front.sock").exists());
}
