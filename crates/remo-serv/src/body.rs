//! Request bodies: raw bytes from hyper, split into token lines and checked.
//!
//! A Content-Length body is one token. A chunked body is tokens separated by line breaks;
//! the first carries the path hash, later ones count up (`tok_no`), all share the request
//! number, and the one whose magic ends in `E` closes the body. Every read is bounded in size
//! and in time: a stall deadline between pieces, and while nothing in the body was verified
//! yet, a total deadline and a byte charge against the unverified-body budget.

use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use crate::limits::{Charge, OverBudget};
use crate::proto::{Cipher, TokenHeader};

/// Longest token line accepted in a chunked body (a 16 MiB piece, base64-encoded, plus slack).
pub const MAX_TOKEN_LINE: usize = 24 << 20;

/// A body of bytes, of either side's streaming or full kind.
pub type BoxedBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A complete body (sent with a Content-Length).
pub fn full(bytes: impl Into<Bytes>) -> BoxedBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Seconds since the Unix epoch: the clock Fernet token times are checked against.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What went wrong reading a body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body exceeds the configured cap.
    #[error("request body too large")]
    TooLarge,
    /// The client stalled, or took longer than the total deadline of an unverified body.
    #[error("request body timed out")]
    Timeout,
    /// The unverified bytes would go over a budget.
    #[error("{0}")]
    OverBudget(OverBudget),
    /// The connection failed mid-body.
    #[error("reading the request body: {0}")]
    Io(String),
    /// A token is missing, out of sequence, undecryptable or expired.
    #[error("invalid encoding: {0}")]
    Encoding(&'static str),
}

/// Reads a body frame by frame with a stall deadline, and while it is unverified, a total
/// deadline and a budget charge.
#[derive(Debug)]
pub struct BodyReader {
    body: Incoming,
    buf: BytesMut,
    eof: bool,
    stall: Duration,
    deadline: Option<tokio::time::Instant>,
    charge: Option<Charge>,
}

impl BodyReader {
    /// Wraps a hyper body.
    pub fn new(body: Incoming, stall: Duration) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            eof: false,
            stall,
            deadline: None,
            charge: None,
        }
    }

    /// An unverified body: it must arrive within `total` however it trickles (the stall
    /// deadline restarts with each piece, this one does not), and its bytes go on `charge`.
    pub fn unverified(body: Incoming, stall: Duration, total: Duration, charge: Charge) -> Self {
        Self {
            deadline: Some(tokio::time::Instant::now() + total),
            charge: Some(charge),
            ..Self::new(body, stall)
        }
    }

    /// The body verified: the total deadline and the charge end.
    pub fn verified(&mut self) {
        self.deadline = None;
        self.charge = None;
    }

    async fn fill(&mut self) -> Result<bool, BodyError> {
        loop {
            if self.eof {
                return Ok(false);
            }
            let wait = match self.deadline {
                Some(deadline) => self
                    .stall
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                None => self.stall,
            };
            let frame = tokio::time::timeout(wait, self.body.frame())
                .await
                .map_err(|_| BodyError::Timeout)?;
            match frame {
                None => {
                    self.eof = true;
                    return Ok(false);
                }
                Some(Err(err)) => return Err(BodyError::Io(err.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            if let Some(charge) = self.charge.as_mut() {
                                charge.add(data.len()).map_err(BodyError::OverBudget)?;
                            }
                            self.buf.extend_from_slice(&data);
                            return Ok(true);
                        }
                    }
                }
            }
        }
    }

    /// The whole body, at most `max` bytes.
    ///
    /// # Errors
    /// [`BodyError`].
    pub async fn read_all(&mut self, max: usize) -> Result<Bytes, BodyError> {
        while self.fill().await? {
            if self.buf.len() > max {
                return Err(BodyError::TooLarge);
            }
        }
        Ok(self.buf.split().freeze())
    }

    /// The next line without its line break; `Ok(None)` at the end of the body. A line longer
    /// than `max` is an error.
    ///
    /// # Errors
    /// [`BodyError`].
    pub async fn next_line(&mut self, max: usize) -> Result<Option<Bytes>, BodyError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[scanned..]) {
                let mut line = self.buf.split_to(scanned + pos + 1);
                line.truncate(scanned + pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                return Ok(Some(line.freeze()));
            }
            scanned = self.buf.len();
            if scanned > max {
                return Err(BodyError::TooLarge);
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line = self.buf.split().freeze();
                return Ok(Some(line));
            }
        }
    }

    /// Whether only whitespace remains (read to the end).
    ///
    /// # Errors
    /// [`BodyError`].
    pub async fn only_whitespace_left(&mut self, max: usize) -> Result<bool, BodyError> {
        let rest = self.read_all(max).await?;
        Ok(rest.chunk().iter().all(u8::is_ascii_whitespace))
    }
}

/// The payload of a verified request: the first token's payload, then (chunked bodies) the
/// remaining tokens as they arrive.
#[derive(Debug)]
pub struct RequestBody {
    first: Option<Vec<u8>>,
    rest: Option<Tokens>,
}

/// The tokens after the first one of a chunked body.
#[derive(Debug)]
pub struct Tokens {
    reader: BodyReader,
    cipher: std::sync::Arc<Cipher>,
    req_no: i16,
    last_tok: i16,
}

impl RequestBody {
    /// A body that ended with its first token.
    pub fn complete(payload: Vec<u8>) -> Self {
        Self {
            first: Some(payload),
            rest: None,
        }
    }

    /// A chunked body whose first token (number 0) was checked; more tokens follow.
    pub fn streaming(
        payload: Vec<u8>,
        reader: BodyReader,
        cipher: std::sync::Arc<Cipher>,
        req_no: i16,
    ) -> Self {
        Self {
            first: Some(payload),
            rest: Some(Tokens {
                reader,
                cipher,
                req_no,
                last_tok: 0,
            }),
        }
    }

    /// The next payload piece; `Ok(None)` once the body's last token was read.
    ///
    /// # Errors
    /// [`BodyError`].
    pub async fn next_piece(
        &mut self,
        now: impl Fn() -> u64,
    ) -> Result<Option<Vec<u8>>, BodyError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        let Some(tokens) = self.rest.as_mut() else {
            return Ok(None);
        };
        let line = tokens
            .reader
            .next_line(MAX_TOKEN_LINE)
            .await?
            .ok_or(BodyError::Encoding("body ended without a last (E) token"))?;
        if line.is_empty() {
            return Err(BodyError::Encoding("blank line between tokens"));
        }
        let text = std::str::from_utf8(&line).map_err(|_| BodyError::Encoding("not base64"))?;
        let plain = tokens
            .cipher
            .decrypt_body(text, now())
            .map_err(|_| BodyError::Encoding("token does not decrypt or is expired"))?;
        let (header, _) =
            TokenHeader::split(&plain).map_err(|_| BodyError::Encoding("token too short"))?;
        if header.is_first() {
            return Err(BodyError::Encoding("a second first (B) token"));
        }
        // Token numbers are int16; a long upload may wrap, which is accepted.
        if header.tok_no != tokens.last_tok.wrapping_add(1) {
            return Err(BodyError::Encoding("token out of sequence"));
        }
        if header.req_no != tokens.req_no {
            return Err(BodyError::Encoding("token of another request"));
        }
        tokens.last_tok = header.tok_no;
        let last = header.is_last();
        let mut plain = plain;
        plain.drain(..crate::proto::HEADER_LEN);
        if last {
            let mut done = self.rest.take();
            if let Some(tokens) = done.as_mut() {
                // More than a little whitespace after `E` is an encoding error, not a size one.
                match tokens.reader.only_whitespace_left(64).await {
                    Ok(true) => {}
                    Ok(false) | Err(BodyError::TooLarge) => {
                        return Err(BodyError::Encoding("data after the last (E) token"));
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(Some(plain))
    }

    /// The whole payload, at most `max` bytes.
    ///
    /// # Errors
    /// [`BodyError`].
    pub async fn collect(
        mut self,
        max: usize,
        now: impl Fn() -> u64,
    ) -> Result<Vec<u8>, BodyError> {
        let mut all = Vec::new();
        while let Some(piece) = self.next_piece(&now).await? {
            if all.len() + piece.len() > max {
                return Err(BodyError::TooLarge);
            }
            if all.is_empty() {
                all = piece;
            } else {
                all.extend_from_slice(&piece);
            }
        }
        Ok(all)
    }
}
