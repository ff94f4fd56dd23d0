//! Reads the HTTP request head before tungstenite does, so a request that is not a websocket
//! upgrade (a browser, `curl https://...`) gets a clear HTTP answer instead of a dropped
//! connection, the head is bounded in size, and the path is known before the upgrade. The
//! bytes read are replayed to tungstenite through [`Rewind`].
//!
//! Every refusal before the upgrade (400, 403, 404, 409, 426, 429, 431, 503) is written by
//! [`refuse`], so each carries the same headers: Date, Content-Type, Content-Length and
//! `Connection: close` (and `Upgrade: websocket` on the 426).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::SystemTime;

use std::sync::Arc;

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::budget::{Budget, Charge};
use crate::io::write_through;

/// Largest request head accepted (tungstenite's own limit is 64 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in a request head (past them: 431).
pub(crate) const MAX_HEADERS: usize = 64;
/// The first read buffer; it grows (doubling, up to [`MAX_HEAD_BYTES`]) only when it is full.
const FIRST_READ: usize = 512;

/// What the request head is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// A websocket upgrade of this path (without the query): hand the stream to tungstenite.
    Upgrade(String),
    /// Valid HTTP but not an upgrade: answer 426.
    NotUpgrade,
    /// Not an HTTP request head, or not an upgrade tungstenite would take: answer with this
    /// status (400 or 431) and this text.
    Bad(u16, &'static str),
}

/// Classifies the bytes read so far (`None`: the head is not complete yet).
pub(crate) fn classify(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let too_large = Head::Bad(
        431,
        "request head too large: at most 16 KiB and 64 header lines",
    );
    let end = match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Some(too_large),
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => return Some(too_large),
        Err(_) => return Some(Head::Bad(400, "not an HTTP request head")),
        Ok(httparse::Status::Complete(end)) => end,
    };
    let values = |name: &str| -> Vec<&[u8]> {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let has = |name: &str, token: &str| {
        values(name).into_iter().any(|value| {
            std::str::from_utf8(value)
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let upgrade = request.method == Some("GET")
        && has("upgrade", "websocket")
        && has("connection", "upgrade");
    if !upgrade {
        return Some(Head::NotUpgrade);
    }
    // What tungstenite would refuse without an answer (or take wrongly) gets one here.
    if request.version != Some(1) {
        return Some(Head::Bad(400, "a websocket upgrade needs HTTP/1.1"));
    }
    let path = request.path.unwrap_or_default();
    if !path.starts_with('/') {
        return Some(Head::Bad(400, "the request target must be a path"));
    }
    if values("sec-websocket-version") != [b"13".as_slice()] {
        return Some(Head::Bad(
            400,
            "a websocket upgrade needs one Sec-WebSocket-Version: 13",
        ));
    }
    if !matches!(values("sec-websocket-key")[..], [key] if is_websocket_key(key)) {
        return Some(Head::Bad(
            400,
            "a websocket upgrade needs one Sec-WebSocket-Key: 16 bytes in base64",
        ));
    }
    if buf.len() > end {
        return Some(Head::Bad(
            400,
            "bytes after the upgrade request: no body, and no frame before the 101",
        ));
    }
    // As tungstenite's URI parser reads it: the path ends at a query or a fragment.
    let path = path.split(['?', '#']).next().unwrap_or(path);
    Some(Head::Upgrade(path.to_owned()))
}

/// RFC 6455 4.1: the key is 16 bytes in base64, so 22 characters, the last of them carrying
/// only two bits (`A`, `Q`, `g` or `w`), then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let alphabet = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    key.len() == 24
        && key[..22].iter().all(alphabet)
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

/// Whether the request (complete or not) is a `HEAD`, whose answer has no body.
pub(crate) fn is_head_request(buf: &[u8]) -> bool {
    buf.starts_with(b"HEAD ")
}

/// Why [`read_head`] stopped before the head was complete.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The connection failed or ended.
    Closed,
    /// The budget could not take the bytes read (`max_buffered_bytes`).
    Budget,
}

/// Reads until the request head is complete; returns the bytes read and what they are. The
/// buffer starts at 512 bytes and doubles only when full, up to [`MAX_HEAD_BYTES`]; all of it
/// is charged to `budget` until the returned charge is dropped.
///
/// # Errors
/// The connection fails or ends first, or the budget has no room.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    budget: &Arc<Budget>,
) -> Result<(Bytes, Head, Charge), HeadError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut charge = budget.charge(0).ok_or(HeadError::Budget)?;
    loop {
        if buf.len() == buf.capacity() {
            let want = (buf.capacity() * 2).clamp(FIRST_READ, MAX_HEAD_BYTES);
            if !charge.grow(want - buf.capacity()) {
                return Err(HeadError::Budget);
            }
            buf.reserve_exact(want - buf.len());
        }
        // Never past the capacity charged: `read_buf` fills only the spare room.
        let room = buf.capacity() - buf.len();
        let mut limited = (&mut *stream).take(room as u64);
        if limited
            .read_buf(&mut buf)
            .await
            .map_err(|_| HeadError::Closed)?
            == 0
        {
            return Err(HeadError::Closed);
        }
        if let Some(head) = classify(&buf) {
            return Ok((Bytes::from(buf), head, charge));
        }
    }
}

/// Writes a short plain-text HTTP refusal and closes: the one place refusals are built. The
/// answer to a `HEAD` request has the headers only.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: StatusCode,
    text: &str,
    head_request: bool,
) {
    let mut bytes = refusal(status, text, SystemTime::now());
    if head_request {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            bytes.truncate(end + 4);
        }
    }
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

/// The bytes of a refusal: status line, Date, Content-Type, Content-Length, `Connection:
/// close` (and `Upgrade: websocket` on a 426, which must name the protocol to upgrade to),
/// then `text` and a newline.
pub(crate) fn refusal(status: StatusCode, text: &str, now: SystemTime) -> Vec<u8> {
    let reason = status.canonical_reason().unwrap_or("Refused");
    let upgrade = if status == StatusCode::UPGRADE_REQUIRED {
        "Upgrade: websocket\r\n"
    } else {
        ""
    };
    let body = format!("{text}\n");
    format!(
        "HTTP/1.1 {code} {reason}\r\nDate: {date}\r\n{upgrade}Connection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len}\r\n\r\n{body}",
        code = status.as_u16(),
        date = httpdate::fmt_http_date(now),
        len = body.len(),
    )
    .into_bytes()
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go to `inner`.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Release the buffer: an idle connection should not keep it.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_through!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;

    /// The head `text` with the upgrade headers of a valid request and `extra` lines.
    fn upgrade(first: &str, extra: &str) -> String {
        format!(
            "{first}\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n{extra}\r\n"
        )
    }

    const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    const V13: &str = "Sec-WebSocket-Version: 13\r\n";

    #[test]
    fn request_heads_are_classified() {
        let check = |text: &str, expected: Option<Head>| {
            assert_eq!(classify(text.as_bytes()), expected, "{text:?}");
        };
        let status = |text: &str| match classify(text.as_bytes()) {
            Some(Head::Bad(status, _)) => status,
            other => panic!("{text:?}: {other:?}"),
        };
        check(
            &upgrade("GET /x?q=1 HTTP/1.1", &format!("{V13}{KEY}")),
            Some(Head::Upgrade("/x".into())),
        );
        check(
            &upgrade("GET /a/b#f HTTP/1.1", &format!("{KEY}{V13}")),
            Some(Head::Upgrade("/a/b".into())),
        );
        check("GET /x HTTP/1.1\r\nHost: a\r\n\r\n", Some(Head::NotUpgrade));
        check(
            "POST /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            Some(Head::NotUpgrade),
        );
        check("GET /x HTTP/1.1\r\nHost: a\r\n", None);
        // Upgrades tungstenite would drop without an answer, or take wrongly, get a 400.
        for (what, text) in [
            ("no key", upgrade("GET /x HTTP/1.1", V13)),
            (
                "version 8",
                upgrade(
                    "GET /x HTTP/1.1",
                    &format!("{KEY}Sec-WebSocket-Version: 8\r\n"),
                ),
            ),
            (
                "two versions",
                upgrade(
                    "GET /x HTTP/1.1",
                    &format!("{KEY}{V13}Sec-WebSocket-Version: 12\r\n"),
                ),
            ),
            (
                "key x",
                upgrade("GET /x HTTP/1.1", &format!("{V13}Sec-WebSocket-Key: x\r\n")),
            ),
            (
                "two keys",
                upgrade("GET /x HTTP/1.1", &format!("{V13}{KEY}{KEY}")),
            ),
            (
                "HTTP/1.0",
                upgrade("GET /x HTTP/1.0", &format!("{V13}{KEY}")),
            ),
            (
                "not a path",
                upgrade("GET x HTTP/1.1", &format!("{V13}{KEY}")),
            ),
            (
                "a body",
                upgrade("GET /x HTTP/1.1", &format!("{V13}{KEY}")) + "hello",
            ),
            (
                "a frame",
                upgrade("GET /x HTTP/1.1", &format!("{V13}{KEY}")) + "\u{81}\u{85}abcd",
            ),
            ("not http", "\u{16}\u{3}\u{1} binary\r\n\r\n".to_owned()),
        ] {
            assert_eq!(status(&text), 400, "{what}");
        }
        assert!(is_websocket_key(b"AAAAAAAAAAAAAAAAAAAAAA=="));
        assert!(
            !is_websocket_key(b"AAAAAAAAAAAAAAAAAAAAAB=="),
            "bits past 16 bytes"
        );
        let long = format!("GET /x HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(status(&long), 431);
        let many = format!(
            "GET /x HTTP/1.1\r\n{}\r\n",
            "X: a\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(status(&many), 431);
        let Some(Head::Bad(_, text)) = classify(many.as_bytes()) else {
            unreachable!()
        };
        assert!(text.contains("64 header lines"), "{text}");
    }

    #[tokio::test]
    async fn a_head_is_read_into_a_buffer_charged_to_the_budget() {
        let budget = Budget::new(1 << 20);
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        let text = upgrade("GET /x HTTP/1.1", &format!("{V13}{KEY}"));
        tx.write_all(text.as_bytes()).await.unwrap();
        let (bytes, head, charge) = read_head(&mut rx, &budget).await.unwrap();
        assert_eq!(
            (bytes.len(), head),
            (text.len(), Head::Upgrade("/x".into()))
        );
        assert_eq!(budget.used(), FIRST_READ, "only the first buffer");
        drop(charge);
        assert_eq!(budget.used(), 0);
        // A head that grows to the limit holds (and is charged) 16 KiB, not more.
        let big = format!("GET /x HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        tx.write_all(big.as_bytes()).await.unwrap();
        let (bytes, head, charge) = read_head(&mut rx, &budget).await.unwrap();
        assert_eq!(
            (bytes.len(), head),
            (MAX_HEAD_BYTES, classify(&bytes).unwrap())
        );
        assert_eq!(budget.used(), MAX_HEAD_BYTES);
        drop(charge);
        // No room in the budget: the read stops.
        let small = Budget::new(FIRST_READ * 2);
        tx.write_all(&big.as_bytes()[..2000]).await.unwrap();
        assert!(matches!(
            read_head(&mut rx, &small).await,
            Err(HeadError::Budget)
        ));
        assert_eq!(small.used(), 0);
    }

    #[tokio::test]
    async fn a_head_request_is_answered_without_a_body() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        refuse(&mut a, StatusCode::UPGRADE_REQUIRED, "use wss", true).await;
        drop(a);
        let mut out = String::new();
        b.read_to_string(&mut out).await.unwrap();
        assert!(out.ends_with("Content-Length: 8\r\n\r\n"), "{out}");
        assert!(is_head_request(b"HEAD /x HTTP/1.1\r\n") && !is_head_request(b"GET /"));
    }

    #[test]
    fn every_refusal_has_the_same_headers() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_000_000);
        let text = String::from_utf8(refusal(StatusCode::CONFLICT, "full", now)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 409 Conflict\r\nDate: Mon, 24 Nov 2025 16:00:00 GMT\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nfull\n"
        );
        let text =
            String::from_utf8(refusal(StatusCode::UPGRADE_REQUIRED, "use wss", now)).unwrap();
        assert!(text.contains("\r\nUpgrade: websocket\r\n"), "{text}");
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        let mut rewind = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut out = vec![0u8; 11];
        rewind.read_exact(&mut out).await.unwrap();
        assert_eq!(out, b"hello world");
    }
}
