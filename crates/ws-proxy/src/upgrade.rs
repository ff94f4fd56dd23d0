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

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::io::write_through;

/// Largest request head accepted (tungstenite's own limit is 64 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the request head is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// A websocket upgrade of this path (without the query): hand the stream to tungstenite.
    Upgrade(String),
    /// Valid HTTP but not an upgrade: answer 426.
    NotUpgrade,
    /// Not HTTP, or over [`MAX_HEAD_BYTES`]: answer 400 or 431.
    Bad(u16),
}

/// Classifies a complete request head (`None`: more bytes needed).
pub(crate) fn classify(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Some(Head::Bad(431)),
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Head::Bad(431)),
        Err(_) => Some(Head::Bad(400)),
        Ok(httparse::Status::Complete(_)) => {
            let has = |name: &str, token: &str| {
                request.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case(name)
                        && std::str::from_utf8(h.value).is_ok_and(|v| {
                            v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
                        })
                })
            };
            let upgrade = request.method == Some("GET")
                && has("upgrade", "websocket")
                && has("connection", "upgrade");
            if !upgrade {
                return Some(Head::NotUpgrade);
            }
            // What tungstenite would refuse without an answer: it gets one here.
            let path = request.path.unwrap_or_default();
            let key = request
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"));
            if !has("sec-websocket-version", "13") || !key || !path.starts_with('/') {
                return Some(Head::Bad(400));
            }
            // As tungstenite's URI parser reads it: the path ends at a query or a fragment.
            let path = path.split(['?', '#']).next().unwrap_or(path);
            Some(Head::Upgrade(path.to_owned()))
        }
    }
}

/// Reads until the request head is complete; returns the bytes read and what they are.
///
/// # Errors
/// The connection fails or ends first.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Bytes, Head)> {
    // An upgrade request is a few hundred bytes; start small and grow only for larger heads.
    let mut buf = Vec::with_capacity(512);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(MAX_HEAD_BYTES));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(head) = classify(&buf) {
            return Ok((Bytes::from(buf), head));
        }
    }
}

/// Writes a short plain-text HTTP refusal and closes: the one place refusals are built.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, status: StatusCode, text: &str) {
    let _ = stream
        .write_all(&refusal(status, text, SystemTime::now()))
        .await;
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

    #[test]
    fn request_heads_are_classified() {
        let check = |text: &str, expected: Option<Head>| {
            assert_eq!(classify(text.as_bytes()), expected, "{text:?}");
        };
        check(
            "GET /x?q=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            Some(Head::Upgrade("/x".into())),
        );
        check(
            "GET /a/b#f HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a\r\n\r\n",
            Some(Head::Upgrade("/a/b".into())),
        );
        // An upgrade tungstenite would drop without an answer gets a 400.
        check(
            "GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            Some(Head::Bad(400)),
        );
        check(
            "GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: a\r\n\r\n",
            Some(Head::Bad(400)),
        );
        check("GET /x HTTP/1.1\r\nHost: a\r\n\r\n", Some(Head::NotUpgrade));
        check(
            "POST /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            Some(Head::NotUpgrade),
        );
        check("GET /x HTTP/1.1\r\nHost: a\r\n", None);
        check("\u{16}\u{3}\u{1} binary\r\n\r\n", Some(Head::Bad(400)));
        let long = format!("GET /x HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        check(&long, Some(Head::Bad(431)));
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
