//! Reads the HTTP request head before tungstenite does, so a request that is not a websocket
//! upgrade (a browser, `curl https://...`) gets a clear HTTP answer instead of a dropped
//! connection, and the head is bounded in size. The bytes read are replayed to tungstenite
//! through [`Rewind`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::io::write_through;

/// Largest request head accepted (tungstenite's own limit is 64 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the request head is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// A websocket upgrade: hand the stream to tungstenite.
    Upgrade,
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
            Some(if upgrade {
                Head::Upgrade
            } else {
                Head::NotUpgrade
            })
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

/// Writes a short plain-text HTTP error and closes.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, status: u16, text: &str) {
    let reason = match status {
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let body = format!("{text}\n");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nUpgrade: websocket\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
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
            "GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n",
            Some(Head::Upgrade),
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
