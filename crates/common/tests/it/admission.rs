//! The front door over real sockets: idle strangers from one address cannot lock out a
//! client with a certificate, and are closed at the deadline.

use std::sync::Arc;
use std::time::Duration;

use common::admission::{AcceptError, Admission, Limits};
use common::tls::{self, ClientAuth, ServerTls, ServerTlsFiles};
use testkit::front::{OTHER_LOOPBACK, closed_within, connect_from, idle_crowd};
use testkit::{Spawned, test_pki};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const DEADLINE: Duration = Duration::from_millis(600);

/// A server that greets each authenticated client with its CN, through the front door.
async fn spawn_greeter(door: Admission) -> Spawned {
    testkit::init_tracing();
    tls::install_default_provider();
    let pki = test_pki();
    let server = Arc::new(
        ServerTls::load(ServerTlsFiles {
            cert: pki.server.cert_path.clone(),
            key: Some(pki.server.key_path.clone()),
            client_ca: Some(pki.ca_path.clone()),
            crls: Vec::new(),
            client_auth: ClientAuth::Required,
            alpn: Vec::new(),
        })
        .unwrap(),
    );
    testkit::spawn_tcp(move |listener, shutdown| async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = shutdown.triggered() => return Ok(()),
            };
            let Ok(stranger) = door.stranger(peer) else {
                continue;
            };
            let acceptor = server.acceptor();
            shutdown.spawn(async move {
                match stranger.accept_tls(&acceptor, tcp).await {
                    Ok((mut stream, identity, _slot)) => {
                        let cn = identity.and_then(|i| i.cn).unwrap_or_default();
                        let _ = stream.write_all(format!("hello {cn}\n").as_bytes()).await;
                        let _ = stream.flush().await;
                        // Hold the slot until the client closes.
                        let mut buf = [0u8; 16];
                        let _ = stream.read(&mut buf).await;
                    }
                    Err(AcceptError::Tls(err)) => tracing::debug!(%err, "handshake failed"),
                    Err(AcceptError::Refused(why)) => tracing::debug!(%why, "refused"),
                }
            });
        }
    })
    .await
}

async fn greeting(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn idle_strangers_cannot_lock_out_a_client_with_a_certificate() {
    let door = Admission::new(
        "test",
        Limits {
            max_connections: 4,
            max_handshakes: 16,
            max_handshakes_per_address: 3,
            deadline: DEADLINE,
        },
    );
    let server = spawn_greeter(door.clone()).await;
    let crowd = idle_crowd(server.addr, 40).await;
    let pki = test_pki();
    let mut alice = testkit::front::tls_from_other_loopback(server.addr, &pki.alice, &[]).await;
    assert_eq!(greeting(&mut alice).await, "hello alice\n");
    let stats = door.stats();
    assert_eq!(stats.strangers, 3, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(stats.refused_address, 37, "{stats:?}");
    // Refused ones are closed at once, the three held ones at the deadline: no later.
    let (closed, last) = closed_within(crowd, DEADLINE * 4).await;
    assert_eq!(closed, 40);
    assert!(last >= DEADLINE / 2 && last < DEADLINE * 3, "{last:?}");
    assert_eq!(door.stats().strangers, 0);
    drop(alice);
    server.stop(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn a_full_main_pool_closes_the_newly_authenticated() {
    let door = Admission::new(
        "test",
        Limits {
            max_connections: 1,
            ..Limits::new(1, DEADLINE)
        },
    );
    let server = spawn_greeter(door.clone()).await;
    let pki = test_pki();
    let mut alice = testkit::front::tls_from_other_loopback(server.addr, &pki.alice, &[]).await;
    assert_eq!(greeting(&mut alice).await, "hello alice\n");
    let mut bob = testkit::front::tls_from_other_loopback(server.addr, &pki.bob, &[]).await;
    assert_eq!(greeting(&mut bob).await, "");
    assert_eq!(door.stats().refused_connections, 1);
    drop(alice);
    server.stop(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn a_stranger_that_never_finishes_the_handshake_times_out_with_the_whole_deadline() {
    let door = Admission::new("test", Limits::new(4, DEADLINE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _idle = connect_from(OTHER_LOOPBACK, addr).await.unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    assert_eq!(peer.ip(), OTHER_LOOPBACK);
    let stranger = door.stranger(peer).unwrap();
    assert_eq!(stranger.allowed(), DEADLINE);
    tls::install_default_provider();
    let pki = test_pki();
    let server = ServerTls::load(ServerTlsFiles {
        cert: pki.server.cert_path.clone(),
        key: Some(pki.server.key_path.clone()),
        client_ca: Some(pki.ca_path.clone()),
        crls: Vec::new(),
        client_auth: ClientAuth::Required,
        alpn: Vec::new(),
    })
    .unwrap();
    let started = std::time::Instant::now();
    let err = stranger
        .accept_tls(&server.acceptor(), tcp)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AcceptError::Tls(tls::TlsError::HandshakeTimeout(d)) if d == DEADLINE),
        "{err:?}"
    );
    assert!(started.elapsed() < DEADLINE * 2);
    assert_eq!(door.stats().strangers, 0);
    assert!(matches!(
        door.stranger(peer).map(|s| s.authenticated()),
        Ok(Ok(_))
    ));
}
