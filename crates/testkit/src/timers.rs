//! Timers tested at their defaults (docs/TESTING.md, SECURITY.md invariant 8): when the daemon
//! cut a connection, and whether that was about at the default it was meant to fire at.
//!
//! A timer test runs every scenario of one daemon at once and sleeps once, past the longest
//! default it covers; these helpers measure each scenario's end against one start instant.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// How late a timer may fire and still be "at its default": the daemon's timers run on a
/// busy 2-core CI machine next to other tests.
pub const SLACK: Duration = Duration::from_secs(3);

/// How early a measured end may be: the client starts its clock a little before the daemon
/// starts its timer, never after, so only rounding needs room.
const EARLY: Duration = Duration::from_millis(100);

/// Reads `stream` until the peer closes it (EOF, reset or a TLS error); returns the time from
/// `since` at which it was closed, or `None` when it is still open after `within` (from now).
/// Bytes read on the way are discarded.
pub async fn closed_at<S: AsyncRead + Unpin>(
    mut stream: S,
    since: Instant,
    within: Duration,
) -> Option<Duration> {
    let mut buf = vec![0u8; 16 * 1024];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()
}

/// Asserts that `elapsed` (from the scenario's start) is about `default`: not before it, and
/// at most [`SLACK`] after it.
///
/// # Panics
/// The timer fired early or late.
pub fn assert_about(what: &str, elapsed: Duration, default: Duration) {
    assert!(
        elapsed + EARLY >= default,
        "{what}: cut after {elapsed:?}, before its default of {default:?}"
    );
    assert!(
        elapsed <= default + SLACK,
        "{what}: cut after {elapsed:?}, well after its default of {default:?}"
    );
}

/// Sleeps until `at` after `since` (no-op when that has passed).
pub async fn sleep_until(since: Instant, at: Duration) {
    let deadline = since + at;
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
}

/// Sends `GET target` (HTTP/1.1, kept alive) on a raw connection and reads its whole answer,
/// which must have a `Content-Length`; returns the status.
///
/// # Panics
/// The connection fails or closes, or no answer comes within 5 s.
pub async fn http_get<S>(stream: &mut S, target: &str) -> u16
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("content-length");
        if body.len() >= length {
            return head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .expect("a status line");
        }
    }
}
