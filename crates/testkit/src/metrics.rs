//! Scraping a daemon's metrics listener (`common::metrics`) and the checks every daemon's
//! listener must pass: `GET /metrics` only, a pool of its own, a deadline on the request head.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::metrics::listen::{HEADER_TIMEOUT, MAX_CONNECTIONS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Sends `METHOD path` on a new connection (closed after the answer) and returns the status
/// line's code, the head and the body.
///
/// # Panics
/// The connection fails or no whole answer comes within 5 s.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    let head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8(answer).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, head.to_owned(), body.to_owned())
}

/// `GET /metrics`: the exposition, after checking the status and the Content-Type.
///
/// # Panics
/// Not a 200 with the OpenMetrics Content-Type.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, head, body) = request(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{head}");
    let expected = format!("content-type: {}", common::metrics::CONTENT_TYPE);
    assert!(head.to_ascii_lowercase().contains(&expected), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The value of one series, written exactly as in the exposition (`name` or
/// `name{label="value",...}`, labels in the exposition's order).
#[must_use]
pub fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The sum of every series of the family `name` (whatever their labels); 0 when there is none.
#[must_use]
pub fn total(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let family = series.split_once('{').map_or(series, |(family, _)| family);
            (family == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Asserts that the process metrics are in the exposition with plausible values.
///
/// # Panics
/// One is missing or implausible.
pub fn assert_process_metrics(exposition: &str) {
    for family in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        let found = value(exposition, family).unwrap_or_else(|| panic!("{family}\n{exposition}"));
        assert!(found > 0.0, "{family} {found}");
    }
    assert!(
        value(exposition, "process_cpu_seconds_total").is_some(),
        "{exposition}"
    );
}

/// Asserts what every metrics listener does: 404 for another path, 405 for another method,
/// a pool of [`MAX_CONNECTIONS`] of its own (when it is full, a newcomer evicts the oldest
/// holder that is not being answered, at any age, and is answered itself: F3), counted in
/// `<daemon>_refusals_total{reason="metrics_pool"}`, a connection that does not finish its
/// request head closed at [`HEADER_TIMEOUT`] (the default, tested as it is), and scrapes again
/// once they are gone. Takes about [`HEADER_TIMEOUT`].
///
/// # Panics
/// The listener does otherwise.
pub async fn assert_listener_bounded(addr: SocketAddr) {
    let (status, head, _) = request(addr, "GET", "/status").await;
    assert_eq!(status, 404, "{head}");
    let (status, head, _) = request(addr, "POST", "/metrics").await;
    assert_eq!(status, 405, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    let counted = |text: &str| {
        text.lines()
            .filter_map(|line| line.rsplit_once(' '))
            .find(|(series, _)| series.ends_with("_refusals_total{reason=\"metrics_pool\"}"))
            .and_then(|(_, value)| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = counted(&scrape(addr).await);

    // The pool filled with slow heads: each has sent part of its request head.
    let start = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET /metr").await.expect("write");
        slow.push(stream);
    }
    // The listener admits in accept order: the scrape comes after the eight, finds the pool
    // full, evicts the oldest slow head (the first) at once, however young, and is answered;
    // the eviction is counted.
    let text = scrape(addr).await;
    let after = counted(&text);
    assert!(after > before, "{before} -> {after}\n{text}");
    let mut slow = slow.into_iter();
    let evicted = slow.next().expect("eight slow heads");
    let end = crate::timers::closed_at(evicted, start, Duration::from_secs(2))
        .await
        .expect("the oldest slow head was not evicted");
    assert!(end < HEADER_TIMEOUT / 2, "evicted after {end:?}");

    // The other slow heads are cut at the header deadline, at its default.
    let ends = futures_util::future::join_all(slow.map(|stream| {
        crate::timers::closed_at(stream, start, HEADER_TIMEOUT + Duration::from_secs(10))
    }))
    .await;
    for end in ends {
        let end = end.expect("a slow head was never closed");
        crate::timers::assert_about("metrics header timeout", end, HEADER_TIMEOUT);
    }
    // The pool is free again.
    let text = crate::eventually(
        "a scrape after the pool drained",
        Duration::from_secs(5),
        || async {
            let (status, _, body) = request(addr, "GET", "/metrics").await;
            (status == 200).then_some(body)
        },
    )
    .await;
    assert!(text.contains("process_open_fds"), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_found_by_their_exact_name_and_families_summed() {
        let text = "# TYPE a_total counter\na_total{reason=\"x\"} 2\na_total{reason=\"y\"} 3\nab_total 7\nb 1.5\n# EOF\n";
        assert_eq!(value(text, "a_total{reason=\"x\"}"), Some(2.0));
        assert_eq!(value(text, "b"), Some(1.5));
        assert_eq!(value(text, "a_total"), None);
        assert!((total(text, "a_total") - 5.0).abs() < f64::EPSILON);
        assert!(total(text, "c").abs() < f64::EPSILON);
    }
}
