//! secure-talk pipe IPC frames, as exchanged on the daemon's Unix socket.
//!
//! Two encodings carry the same [`Frame`]:
//! - raw: a u32 big-endian total length that includes the 8-byte header, a u32 big-endian type,
//!   then the payload ([`decode`], [`Frame::encode`]);
//! - JSON: one `{"type": n, "payload": "..."}` object per line ([`decode_json_line`],
//!   [`Frame::encode_json_line`]).
//!
//! A pipe's first byte tells which one it speaks ([`Protocol::detect`]). Type numbers follow the
//! seed README's table plus the two documented extensions ([`kind`]). This module knows nothing
//! about what a payload means or which side of the socket sends which type.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value};

/// Length of the raw frame header: total length (u32 BE) and type (u32 BE).
pub const HEADER_LEN: usize = 8;

/// Default largest frame (header included) a reader accepts.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// IPC type numbers (seed README table, then the documented extensions).
pub mod kind {
    /// Text.
    pub const TEXT: u32 = 0;
    /// A pipe checking in with its id (ASCII decimal).
    pub const PIPE_ID: u32 = 1;
    /// Pipe configuration (JSON text).
    pub const CONFIG: u32 = 2;
    /// Launch line.
    pub const LAUNCH: u32 = 3;
    /// Property update (JSON text).
    pub const PROPERTY: u32 = 4;
    /// Destroy request.
    pub const DESTROY: u32 = 5;
    /// Extension: binary output from a pipe.
    pub const BINARY: u32 = 6;
    /// Extension: error text from a pipe.
    pub const ERROR: u32 = 7;
}

/// Errors from encoding or decoding IPC frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpcError {
    /// The length field is smaller than the header itself.
    #[error("frame length {0} is shorter than the {HEADER_LEN}-byte header")]
    TooShort(u32),
    /// The frame (or JSON line) is longer than the configured maximum.
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLong {
        /// The announced or accumulated length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The payload is too large for a u32 length field.
    #[error("payload of {0} bytes does not fit a frame")]
    Unencodable(usize),
    /// A JSON line did not hold a valid IPC object.
    #[error("invalid json ipc line: {0}")]
    Json(String),
}

/// An IPC message type: one of the known numbers, or any other value kept as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 0: text.
    Text,
    /// 1: pipe id (check-in).
    PipeId,
    /// 2: config.
    Config,
    /// 3: launch.
    Launch,
    /// 4: property.
    Property,
    /// 5: destroy.
    Destroy,
    /// 6: binary output from a pipe.
    Binary,
    /// 7: error text from a pipe.
    Error,
    /// Any other type number.
    Unknown(u32),
}

const NAMED: [(Kind, u32, &str); 8] = [
    (Kind::Text, kind::TEXT, "text"),
    (Kind::PipeId, kind::PIPE_ID, "pipe_id"),
    (Kind::Config, kind::CONFIG, "config"),
    (Kind::Launch, kind::LAUNCH, "launch"),
    (Kind::Property, kind::PROPERTY, "property"),
    (Kind::Destroy, kind::DESTROY, "destroy"),
    (Kind::Binary, kind::BINARY, "binary"),
    (Kind::Error, kind::ERROR, "error"),
];

impl Kind {
    /// The type number on the wire.
    pub fn number(self) -> u32 {
        match self {
            Self::Unknown(n) => n,
            known => NAMED
                .iter()
                .find(|(k, _, _)| *k == known)
                .map_or(u32::MAX, |(_, n, _)| *n),
        }
    }

    /// The kind for a type number (never fails: unknown numbers are kept).
    pub fn from_number(n: u32) -> Self {
        NAMED
            .iter()
            .find(|(_, number, _)| *number == n)
            .map_or(Self::Unknown(n), |(k, _, _)| *k)
    }

    /// The README name of a known kind (`text`, `pipe_id`, `config`, ...).
    pub fn name(self) -> Option<&'static str> {
        NAMED
            .iter()
            .find(|(k, _, _)| *k == self)
            .map(|(_, _, name)| *name)
    }

    /// The kind with a README name, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        NAMED
            .iter()
            .find(|(_, _, n)| *n == name)
            .map(|(k, _, _)| *k)
    }
}

impl From<u32> for Kind {
    fn from(n: u32) -> Self {
        Self::from_number(n)
    }
}

impl From<Kind> for u32 {
    fn from(kind: Kind) -> Self {
        kind.number()
    }
}

/// One IPC message: a type and an opaque payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type.
    pub kind: Kind,
    /// The payload bytes.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of `kind` carrying `payload`.
    pub fn new(kind: impl Into<Kind>, payload: impl Into<Bytes>) -> Self {
        Self {
            kind: kind.into(),
            payload: payload.into(),
        }
    }

    /// The raw encoding: total length and type as u32 big-endian, then the payload.
    ///
    /// # Errors
    /// [`IpcError::Unencodable`] when the payload does not fit a u32 length.
    pub fn encode(&self) -> Result<Vec<u8>, IpcError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the raw encoding to `dst`.
    ///
    /// # Errors
    /// [`IpcError::Unencodable`] when the payload does not fit a u32 length.
    pub fn encode_into(&self, dst: &mut Vec<u8>) -> Result<(), IpcError> {
        let total = self
            .payload
            .len()
            .checked_add(HEADER_LEN)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(IpcError::Unencodable(self.payload.len()))?;
        dst.reserve(HEADER_LEN + self.payload.len());
        dst.extend_from_slice(&total.to_be_bytes());
        dst.extend_from_slice(&self.kind.number().to_be_bytes());
        dst.extend_from_slice(&self.payload);
        Ok(())
    }

    /// The JSON-line encoding: `{"type":n,"payload":"..."}` and a newline.
    ///
    /// A payload that is not UTF-8 is sent base64-encoded with `"encoding":"base64"`.
    pub fn encode_json_line(&self) -> Vec<u8> {
        let mut object = Map::new();
        object.insert("type".into(), Value::from(self.kind.number()));
        match std::str::from_utf8(&self.payload) {
            Ok(text) => {
                object.insert("payload".into(), Value::from(text));
            }
            Err(_) => {
                object.insert("payload".into(), Value::from(BASE64.encode(&self.payload)));
                object.insert("encoding".into(), Value::from("base64"));
            }
        }
        let mut line = Value::Object(object).to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// Decodes one raw frame from the front of `buf`.
///
/// Returns `Ok(None)` while the frame is incomplete, else the frame and the number of bytes it
/// used. A length field below [`HEADER_LEN`] or above `max_frame` is an error as soon as the
/// four length bytes are there.
///
/// # Errors
/// [`IpcError::TooShort`] or [`IpcError::TooLong`] for an impossible length field.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, IpcError> {
    let Some(len_bytes) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let total = u32::from_be_bytes(*len_bytes);
    let len = usize::try_from(total).map_err(|_| IpcError::TooLong {
        len: usize::MAX,
        max: max_frame,
    })?;
    if len < HEADER_LEN {
        return Err(IpcError::TooShort(total));
    }
    if len > max_frame {
        return Err(IpcError::TooLong {
            len,
            max: max_frame,
        });
    }
    let Some(frame) = buf.get(..len) else {
        return Ok(None);
    };
    let (header, payload) = frame.split_at(HEADER_LEN);
    let mut kind = [0u8; 4];
    kind.copy_from_slice(&header[4..HEADER_LEN]);
    let frame = Frame::new(u32::from_be_bytes(kind), Bytes::copy_from_slice(payload));
    Ok(Some((frame, len)))
}

/// Decodes one JSON-line frame from the front of `buf`, skipping blank lines.
///
/// Returns `Ok(None)` until a whole line is there, else the frame and the bytes used (newline
/// included). `type` is a number or a README name; `payload` a string, base64 when
/// `"encoding":"base64"` is present. A line longer than `max_frame` is an error.
///
/// # Errors
/// [`IpcError::TooLong`] for an over-long line, [`IpcError::Json`] for an invalid one.
pub fn decode_json_line(buf: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, IpcError> {
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > max_frame {
                return Err(IpcError::TooLong {
                    len: rest.len(),
                    max: max_frame,
                });
            }
            return Ok(None);
        };
        if newline > max_frame {
            return Err(IpcError::TooLong {
                len: newline,
                max: max_frame,
            });
        }
        let line = &rest[..newline];
        let used = start + newline + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            start = used;
            continue;
        }
        return parse_json_frame(line).map(|frame| Some((frame, used)));
    }
}

fn parse_json_frame(line: &[u8]) -> Result<Frame, IpcError> {
    let invalid = |what: &str| IpcError::Json(what.to_owned());
    let value: Value =
        serde_json::from_slice(line).map_err(|err| IpcError::Json(err.to_string()))?;
    let Value::Object(object) = value else {
        return Err(invalid("not an object"));
    };
    let kind = match object.get("type") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Kind::from_number)
            .ok_or_else(|| invalid("\"type\" is not a u32"))?,
        Some(Value::String(name)) => {
            Kind::from_name(name).ok_or_else(|| invalid("\"type\" is not a known name"))?
        }
        _ => return Err(invalid("\"type\" is missing")),
    };
    let payload = match object.get("payload") {
        Some(Value::String(text)) => text.as_str(),
        None | Some(Value::Null) => "",
        Some(_) => return Err(invalid("\"payload\" is not a string")),
    };
    let payload = match object.get("encoding") {
        None | Some(Value::Null) => Bytes::copy_from_slice(payload.as_bytes()),
        Some(Value::String(enc)) if enc == "base64" => BASE64
            .decode(payload)
            .map(Bytes::from)
            .map_err(|_| invalid("\"payload\" is not base64"))?,
        Some(_) => return Err(invalid("unknown \"encoding\"")),
    };
    Ok(Frame { kind, payload })
}

/// Which encoding a pipe speaks on its IPC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Length-prefixed binary frames.
    Raw,
    /// One JSON object per line.
    Json,
}

impl Protocol {
    /// Tells the encoding from a connection's first byte (`{` or whitespace means JSON).
    pub fn detect(first_byte: u8) -> Self {
        if first_byte == b'{' || first_byte.is_ascii_whitespace() {
            Self::Json
        } else {
            Self::Raw
        }
    }

    /// Decodes one frame in this encoding (see [`decode`] and [`decode_json_line`]).
    ///
    /// # Errors
    /// As the underlying decoder.
    pub fn decode(self, buf: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, IpcError> {
        match self {
            Self::Raw => decode(buf, max_frame),
            Self::Json => decode_json_line(buf, max_frame),
        }
    }

    /// Encodes one frame in this encoding.
    ///
    /// # Errors
    /// [`IpcError::Unencodable`] for a raw payload that does not fit a u32 length.
    pub fn encode(self, frame: &Frame) -> Result<Vec<u8>, IpcError> {
        match self {
            Self::Raw => frame.encode(),
            Self::Json => Ok(frame.encode_json_line()),
        }
    }
}
