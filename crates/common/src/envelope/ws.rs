//! The server side of websocket framing (RFC 6455), streaming: payload bytes come out as they
//! arrive, never a whole message.
//!
//! A message library that returns whole messages has to hold each one in memory until its
//! last fragment, so the largest message it may accept is the memory one connection can
//! pin. [`Decoder`] instead hands out [`Event::Data`] pieces of the current data message,
//! unmasked, as soon as they are in; the caller decides where they go (a capped buffer, a
//! file, nowhere) and when a message is too large. Control frames (at most 125 bytes) come
//! out whole. What the decoder itself holds is a frame header and one control frame's
//! payload.
//!
//! [`encode_frame_header`] writes the header of an unmasked server frame.

use bytes::{Buf as _, Bytes, BytesMut};

/// Opcode of a continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: a protocol error.
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code: a text message that is not UTF-8.
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code: a message too big to process.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: try again later (the server is short of something).
pub const CLOSE_TRY_AGAIN: u16 = 1013;

/// Largest payload of a control frame.
pub const MAX_CONTROL: usize = 125;

/// The kind of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text (checked by the caller once the message is whole).
    Text,
    /// Bytes.
    Binary,
}

/// What the decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A data message begins; `declared` is the length its first frame announces (a lower
    /// bound of the message's length).
    Start {
        /// Text or binary.
        kind: Kind,
        /// Length of the first frame's payload.
        declared: u64,
    },
    /// A continuation frame begins, announcing `declared` more bytes of the current message.
    More {
        /// Length of this frame's payload.
        declared: u64,
    },
    /// Payload bytes of the current data message, unmasked.
    Data(Bytes),
    /// The current data message is complete.
    End,
    /// A ping with its payload (answer with a pong carrying the same bytes).
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame: the code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// A frame that breaks the protocol: answer with close 1002 (1007 for a bad close reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("websocket protocol error: {0}")]
pub struct ProtocolError(pub &'static str);

#[derive(Debug, Clone, Copy)]
struct Payload {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    /// Bytes of the payload still to come.
    left: u64,
    /// Bytes of the payload already unmasked (for the mask's phase).
    done: u64,
}

/// The streaming decoder of client frames (masked, as a server must require).
#[derive(Debug, Default)]
pub struct Decoder {
    /// The frame being read, once its header is in.
    frame: Option<Payload>,
    /// Whether a data message is in progress (a continuation is expected).
    in_message: bool,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a data message has begun and not ended.
    pub fn in_message(&self) -> bool {
        self.in_message
    }

    /// Takes the next event from the front of `buf`, consuming what it used; `Ok(None)` when
    /// `buf` holds no whole event yet (read more and call again). Call until `Ok(None)`.
    ///
    /// # Errors
    /// A frame that breaks the protocol; the connection must be closed with 1002.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        let Some(frame) = self.frame.as_mut() else {
            return self.header(buf);
        };
        if frame.opcode >= OP_CLOSE {
            // A control frame, read whole (at most 125 bytes).
            let want = usize::try_from(frame.left).unwrap_or(MAX_CONTROL);
            if buf.len() < want {
                return Ok(None);
            }
            let mut payload = buf.split_to(want).to_vec();
            unmask(&mut payload, frame.mask, 0);
            let opcode = frame.opcode;
            self.frame = None;
            return control(opcode, payload).map(Some);
        }
        if frame.left == 0 {
            let fin = frame.fin;
            self.frame = None;
            if fin {
                self.in_message = false;
                return Ok(Some(Event::End));
            }
            return self.decode(buf);
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let take = usize::try_from(frame.left).map_or(buf.len(), |left| left.min(buf.len()));
        let mut data = buf.split_to(take);
        unmask(&mut data, frame.mask, frame.done);
        frame.left -= take as u64;
        frame.done += take as u64;
        Ok(Some(Event::Data(data.freeze())))
    }

    fn header(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        let Some((head_len, fin, opcode, len, mask)) = parse_header(buf)? else {
            return Ok(None);
        };
        buf.advance(head_len);
        let payload = Payload {
            opcode,
            fin,
            mask,
            left: len,
            done: 0,
        };
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(ProtocolError("fragmented control frame"));
                }
                if len > MAX_CONTROL as u64 {
                    return Err(ProtocolError("control frame over 125 bytes"));
                }
                self.frame = Some(payload);
                self.decode(buf)
            }
            OP_TEXT | OP_BINARY => {
                if self.in_message {
                    return Err(ProtocolError("a new message before the last one ended"));
                }
                self.in_message = true;
                self.frame = Some(payload);
                let kind = if opcode == OP_TEXT {
                    Kind::Text
                } else {
                    Kind::Binary
                };
                Ok(Some(Event::Start {
                    kind,
                    declared: len,
                }))
            }
            OP_CONTINUATION => {
                if !self.in_message {
                    return Err(ProtocolError("a continuation frame outside a message"));
                }
                self.frame = Some(payload);
                Ok(Some(Event::More { declared: len }))
            }
            _ => Err(ProtocolError("unknown opcode")),
        }
    }
}

/// A parsed frame header: its own length, fin, opcode, payload length and mask.
type Header = (usize, bool, u8, u64, [u8; 4]);

/// Parses a frame header at the front of `buf`, or `None` when incomplete.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(ProtocolError("reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(ProtocolError("unmasked frame from a client"));
    }
    let (len, at) = match b1 & 0x7f {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut eight = [0u8; 8];
            eight.copy_from_slice(bytes);
            let len = u64::from_be_bytes(eight);
            if len >> 63 != 0 {
                return Err(ProtocolError("frame length with the top bit set"));
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    Ok(Some((at + 4, b0 & 0x80 != 0, b0 & 0x0f, len, mask)))
}

fn unmask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let phase = (offset % 4) as usize;
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= mask[(phase + i) % 4];
    }
}

fn control(opcode: u8, payload: Vec<u8>) -> Result<Event, ProtocolError> {
    match opcode {
        OP_PING => Ok(Event::Ping(Bytes::from(payload))),
        OP_PONG => Ok(Event::Pong),
        _ => match payload.as_slice() {
            [] => Ok(Event::Close(None)),
            [_] => Err(ProtocolError("close frame with a one-byte payload")),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                let reason = std::str::from_utf8(reason)
                    .map_err(|_| ProtocolError("close reason is not UTF-8"))?;
                Ok(Event::Close(Some((code, reason.to_owned()))))
            }
        },
    }
}

/// The header of an unmasked, final server frame of `len` payload bytes.
pub fn encode_frame_header(opcode: u8, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.push(0x80 | (opcode & 0x0f));
    match len {
        0..=125 => out.push(len as u8),
        126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out
}

/// A close frame's payload: the code, then the reason cut to fit 125 bytes on a character
/// boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = code.to_be_bytes().to_vec();
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}
