//! Attack pass F5: the HTTP front end of `ws-proxy-client connect` held any number of
//! connections for any time (200 half-sent requests for 75 s) and read a body of any
//! declared length before refusing it; any local user could use it. Now it has a connection
//! cap, a head and a body deadline, an early 413, a maximum age, and a Unix-socket listener.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use ws_proxy::client::front::{self, Front, FrontLimits, FrontListener};

const LIMITS: FrontLimits = FrontLimits {
    max_connections: 2,
    header_timeout: Duration::from_millis(500),
    max_age: Duration::from_secs(3),
};

/// A front end (never paired) with a 500 ms request timeout and a 1000-byte body limit on
/// `listener`.
fn start(listener: FrontListener, limits: FrontLimits) {
    let (front, _out) = Front::new(Duration::from_millis(500), 1000);
    let router = front.router();
    tokio::spawn(async move {
        let _keep = front;
        front::serve(listener, router, limits, common::daemon::Shutdown::new()).await;
    });
}

async fn tcp_front(limits: FrontLimits) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    start(FrontListener::Tcp(listener), limits);
    addr
}

/// Sends `request` and reads until the front end closes (or 5 s); the answer and when it
/// ended.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> (String, Duration) {
    let start = Instant::now();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    (
        String::from_utf8_lossy(&answer).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test]
async fn the_front_end_bounds_what_a_local_client_holds() {
    let addr = tcp_front(LIMITS).await;
    // A declared body over the limit: 413 before any of it is sent.
    let (answer, _) = exchange(
        TcpStream::connect(addr).await.unwrap(),
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    // A body that never completes: 408 at the request timeout.
    let (answer, took) = exchange(
        TcpStream::connect(addr).await.unwrap(),
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A head that never completes: closed at the header deadline.
    let (_, took) = exchange(
        TcpStream::connect(addr).await.unwrap(),
        b"GET /x HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// Two slots held by unfinished heads: a third connection does not get a third slot; it
/// evicts the older holder at once (however young) and is answered, and the other holder
/// keeps its slot (common::local_http: a newcomer is never kept out by idle holders).
#[tokio::test]
async fn the_front_end_caps_its_connections() {
    use tokio::io::AsyncReadExt as _;
    let addr = tcp_front(FrontLimits {
        header_timeout: Duration::from_secs(10),
        max_age: Duration::from_secs(20),
        ..LIMITS
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
        held.push(tcp);
    }
    // Let the front end take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (answer, took) = exchange(
        TcpStream::connect(addr).await.unwrap(),
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    // 503: no peer is paired behind this front end.
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let mut buf = [0u8; 64];
    let first = tokio::time::timeout(Duration::from_secs(2), held[0].read(&mut buf)).await;
    assert!(
        matches!(first, Ok(Ok(0) | Err(_))),
        "the oldest holder was not evicted: {first:?}"
    );
    let second = tokio::time::timeout(Duration::from_millis(300), held[1].read(&mut buf)).await;
    assert!(
        second.is_err(),
        "the younger holder lost its slot too: {second:?}"
    );
}

#[tokio::test]
async fn the_front_end_serves_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let listener = common::daemon::bind_unix(&path, 0o600).unwrap();
    start(FrontListener::Unix(listener), LIMITS);
    let (answer, _) = exchange(
        tokio::net::UnixStream::connect(&path).await.unwrap(),
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("not paired"), "{answer}");
}
