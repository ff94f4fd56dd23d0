//! secure-talk websocket messages, in both directions of the admin and data channels.
//!
//! - [`Message`]: the JSON text form `{"headers": {"method", "pipe_id", ...}, "payload",
//!   "checkSum"?, "code"?}`, with builders for the server's replies.
//! - [`BinaryMessage`]: the binary form `headers JSON | 0x01 | payload | 0x01 | md5 hex` used for
//!   uploads and the connect-time `checkSum` push; [`BinaryMessage::verify`] checks the MD5.
//!
//! Decoders take the limits as parameters and never panic on any input. This module does not
//! know what a method does, who may call it, or where uploads go.

use bytes::Bytes;
use md5::{Digest, Md5};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// `headers.method` values.
pub mod method {
    /// Echo request, and the server's text replies.
    pub const TEXT: &str = "text";
    /// Create pipes (binary upload of the create JSON).
    pub const CREATE: &str = "create";
    /// Forward a property JSON to a pipe.
    pub const PROPERTY: &str = "property";
    /// Destroy a pipe.
    pub const DESTROY: &str = "destroy";
    /// Upload a model file.
    pub const MODEL: &str = "model";
    /// The caller's pipe ids.
    pub const PIPE_ID: &str = "pipe_id";
    /// A created pipe's create JSON.
    pub const PIPE_INFO: &str = "pipe_info";
    /// A pipe has gone.
    pub const PIPE_DELETE: &str = "pipe_delete";
    /// Error text a pipe reported.
    pub const PIPE_MESSAGE: &str = "pipe_message";
    /// The model information (`model_info.json`).
    pub const CHECK_SUM: &str = "checkSum";
    /// An error not tied to a pipe.
    pub const ERROR: &str = "error";
}

/// The byte between header, payload and checksum in a binary message.
pub const SEPARATOR: u8 = 0x01;

/// Length of an MD5 checksum in hex.
pub const CHECKSUM_HEX_LEN: usize = 32;

/// Longest checksum field a decoder accepts (the real one is [`CHECKSUM_HEX_LEN`]).
pub const MAX_CHECKSUM_LEN: usize = 64;

/// Size limits for decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest JSON text message, or headers JSON of a binary message, in bytes.
    pub max_header: usize,
    /// Largest payload of a binary message in bytes.
    pub max_payload: usize,
}

impl Limits {
    /// 64 KiB of JSON headers or text, 64 MiB of binary payload.
    pub const DEFAULT: Self = Self {
        max_header: 64 * 1024,
        max_payload: 64 * 1024 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Errors from decoding a websocket message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TalkError {
    /// A part of the message is over its limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// Its length (or a lower bound).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid JSON, or a member of the wrong type.
    #[error("invalid json message: {0}")]
    Json(String),
    /// The message (or the binary header) is not a JSON object.
    #[error("message is not a json object")]
    NotObject,
    /// A JSON text message without a `headers` object.
    #[error("message has no \"headers\" object")]
    NoHeaders,
    /// A binary message without two 0x01 separators.
    #[error("binary message lacks the 0x01 separators")]
    Separator,
    /// The checksum field is not short ASCII text.
    #[error("binary message checksum is not hex text")]
    ChecksumText,
    /// The payload's MD5 does not match the checksum sent with it.
    #[error("checksum mismatch: sent {sent}, computed {computed}")]
    ChecksumMismatch {
        /// The checksum in the message.
        sent: String,
        /// The MD5 of the payload.
        computed: String,
    },
}

/// The `headers` object of a message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Headers {
    /// What the message is (see [`method`]); absent on data-channel messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The pipe concerned (a number; a decimal string is accepted on input).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "pipe_id"
    )]
    pub pipe_id: Option<u64>,
    /// Status of a reply (200, 400, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// A file path (`model` uploads, the `checkSum` push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The IPC type of a data-channel message.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<u32>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Headers {
    /// Headers with only a method.
    pub fn method(method: impl Into<String>) -> Self {
        Self {
            method: Some(method.into()),
            ..Self::default()
        }
    }

    /// Sets `pipe_id`.
    #[must_use]
    pub fn with_pipe_id(mut self, pipe_id: u64) -> Self {
        self.pipe_id = Some(pipe_id);
        self
    }

    /// Sets `path`.
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

/// A JSON text message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The headers.
    pub headers: Headers,
    /// The payload: a string, array or object (`null` is kept when present).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub payload: Option<Value>,
    /// `checkSum`, not checked for text messages.
    #[serde(rename = "checkSum", default, skip_serializing_if = "Option::is_none")]
    pub check_sum: Option<String>,
    /// Top-level `code`, where the original put it for non-`text` replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message with these headers and payload.
    pub fn new(headers: Headers, payload: Value) -> Self {
        Self {
            headers,
            payload: Some(payload),
            check_sum: None,
            code: None,
            extra: Map::new(),
        }
    }

    /// A `text` reply with `headers.code` (200 or 400 in the original).
    pub fn text(code: i64, text: impl Into<String>) -> Self {
        let mut headers = Headers::method(method::TEXT);
        headers.code = Some(code);
        Self::new(headers, Value::String(text.into()))
    }

    /// The caller's pipe ids.
    pub fn pipe_ids(ids: &[u64]) -> Self {
        Self::new(Headers::method(method::PIPE_ID), Value::from(ids.to_vec()))
    }

    /// A created pipe's create JSON.
    pub fn pipe_info(pipe_id: u64, create: Value) -> Self {
        Self::new(
            Headers::method(method::PIPE_INFO).with_pipe_id(pipe_id),
            create,
        )
    }

    /// A pipe has gone: payload `[pipe_id]`.
    pub fn pipe_delete(pipe_id: u64) -> Self {
        Self::new(
            Headers::method(method::PIPE_DELETE),
            Value::from(vec![pipe_id]),
        )
    }

    /// Error text reported by a pipe.
    pub fn pipe_message(pipe_id: u64, text: impl Into<String>) -> Self {
        Self::new(
            Headers::method(method::PIPE_MESSAGE).with_pipe_id(pipe_id),
            Value::String(text.into()),
        )
    }

    /// The model information after an upload.
    pub fn check_sum(model_info: Value) -> Self {
        Self::new(Headers::method(method::CHECK_SUM), model_info)
    }

    /// An error not tied to a pipe.
    pub fn error(text: impl Into<String>) -> Self {
        Self::new(Headers::method(method::ERROR), Value::String(text.into()))
    }

    /// A data-channel message: a pipe's output of IPC type `kind`.
    pub fn data(kind: u32, pipe_id: u64, payload: Value) -> Self {
        let headers = Headers {
            pipe_id: Some(pipe_id),
            kind: Some(kind),
            ..Headers::default()
        };
        Self::new(headers, payload)
    }

    /// The method, or `""` when there is none.
    pub fn method(&self) -> &str {
        self.headers.method.as_deref().unwrap_or_default()
    }

    /// JSON text for a text frame.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes a text frame of at most `max_len` bytes.
    ///
    /// # Errors
    /// Too long, not JSON, not an object, no `headers` object, or a member of the wrong type.
    pub fn decode(text: &[u8], max_len: usize) -> Result<Self, TalkError> {
        if text.len() > max_len {
            return Err(TalkError::TooLarge {
                what: "text message",
                len: text.len(),
                max: max_len,
            });
        }
        let value: Value = serde_json::from_slice(text).map_err(json_error)?;
        let Value::Object(object) = &value else {
            return Err(TalkError::NotObject);
        };
        if !matches!(object.get("headers"), Some(Value::Object(_))) {
            return Err(TalkError::NoHeaders);
        }
        serde_json::from_value(value).map_err(json_error)
    }
}

/// A binary message: headers, raw payload and the checksum sent with it.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryMessage {
    /// The headers (the JSON before the first 0x01).
    pub headers: Headers,
    /// The payload bytes.
    pub payload: Bytes,
    /// The checksum text after the last 0x01 (MD5 lowercase hex when well-formed).
    pub check_sum: String,
}

impl BinaryMessage {
    /// A message with the MD5 of `payload` as its checksum.
    pub fn new(headers: Headers, payload: impl Into<Bytes>) -> Self {
        let payload = payload.into();
        let check_sum = md5_hex(&payload);
        Self {
            headers,
            payload,
            check_sum,
        }
    }

    /// Whether the checksum is the payload's MD5 (hex compared case-insensitively).
    pub fn checksum_ok(&self) -> bool {
        self.check_sum.eq_ignore_ascii_case(&md5_hex(&self.payload))
    }

    /// Checks the payload against its checksum.
    ///
    /// # Errors
    /// [`TalkError::ChecksumMismatch`].
    pub fn verify(&self) -> Result<(), TalkError> {
        let computed = md5_hex(&self.payload);
        if self.check_sum.eq_ignore_ascii_case(&computed) {
            Ok(())
        } else {
            Err(TalkError::ChecksumMismatch {
                sent: self.check_sum.clone(),
                computed,
            })
        }
    }

    /// The wire form: headers JSON, 0x01, payload, 0x01, checksum.
    pub fn encode(&self) -> Vec<u8> {
        // serde_json escapes every control character, so the headers never hold a raw 0x01.
        let header = serde_json::to_vec(&self.headers).unwrap_or_default();
        let mut out =
            Vec::with_capacity(header.len() + self.payload.len() + self.check_sum.len() + 2);
        out.extend_from_slice(&header);
        out.push(SEPARATOR);
        out.extend_from_slice(&self.payload);
        out.push(SEPARATOR);
        out.extend_from_slice(self.check_sum.as_bytes());
        out
    }

    /// Decodes one whole binary message; the checksum is kept, not verified.
    ///
    /// # Errors
    /// A part over its limit, missing separators, headers that are not a JSON object, or a
    /// checksum that is not short ASCII text.
    pub fn decode(buf: &[u8], limits: Limits) -> Result<Self, TalkError> {
        let max_total = limits
            .max_header
            .saturating_add(limits.max_payload)
            .saturating_add(MAX_CHECKSUM_LEN + 2);
        if buf.len() > max_total {
            return Err(TalkError::TooLarge {
                what: "binary message",
                len: buf.len(),
                max: max_total,
            });
        }
        let scan = &buf[..buf.len().min(limits.max_header.saturating_add(1))];
        let Some(first) = scan.iter().position(|&b| b == SEPARATOR) else {
            if scan.len() > limits.max_header {
                return Err(TalkError::TooLarge {
                    what: "binary message headers",
                    len: scan.len(),
                    max: limits.max_header,
                });
            }
            return Err(TalkError::Separator);
        };
        let last = buf.iter().rposition(|&b| b == SEPARATOR).unwrap_or(first);
        if last == first {
            return Err(TalkError::Separator);
        }
        let (header, payload, check_sum) = (&buf[..first], &buf[first + 1..last], &buf[last + 1..]);
        if payload.len() > limits.max_payload {
            return Err(TalkError::TooLarge {
                what: "binary message payload",
                len: payload.len(),
                max: limits.max_payload,
            });
        }
        if check_sum.len() > MAX_CHECKSUM_LEN || !check_sum.iter().all(u8::is_ascii_graphic) {
            return Err(TalkError::ChecksumText);
        }
        let value: Value = serde_json::from_slice(header).map_err(json_error)?;
        if !value.is_object() {
            return Err(TalkError::NotObject);
        }
        let headers = serde_json::from_value(value).map_err(json_error)?;
        Ok(Self {
            headers,
            payload: Bytes::copy_from_slice(payload),
            check_sum: String::from_utf8_lossy(check_sum).into_owned(),
        })
    }
}

/// MD5 of `data` as 32 lowercase hex digits.
pub fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

/// MD5 computed piece by piece, for a payload that is never whole in memory.
#[derive(Clone, Default)]
pub struct Md5Stream(Md5);

impl Md5Stream {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        Md5::update(&mut self.0, data);
    }

    /// The MD5 of everything added, as 32 lowercase hex digits.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

impl std::fmt::Debug for Md5Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Md5Stream")
    }
}

fn json_error(err: serde_json::Error) -> TalkError {
    TalkError::Json(err.to_string())
}

/// Deserialises a member that is present (even as `null`) into `Some`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// A pipe id: a non-negative integer or its decimal string (what a CLI may send); `null` is none.
fn pipe_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("pipe_id is not a non-negative integer")),
        Value::String(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("pipe_id is not a decimal number")),
        _ => Err(serde::de::Error::custom("pipe_id is not a number")),
    }
}
