//! The Micronets message envelope carried through ws-proxy: `{"message": {...}}`.
//!
//! - [`validate_hello`] and [`validate_hello_binary`] apply the original proxy's HELLO rules
//!   exactly, including its Python quirks (JSON `true`/`false` pass as integer ids, `NaN` and
//!   `Infinity` are accepted anywhere else, binary frames are UTF-8/16/32 auto-detected); the
//!   [`HelloError`] says what is wrong and fits a websocket close reason.
//! - [`Message`] types the messages the peers exchange ([`Hello`], [`RestRequest`],
//!   [`RestResponse`], [`Event`], anything else as an [`Envelope`]), with builders, [`parse`]
//!   and [`Message::encode`]. Members this module does not know are kept in `extra` maps.
//! - [`body_from_bytes`] and [`body_to_bytes`] convert between an HTTP body and its
//!   `dataFormat`/`messageBody` pair (JSON parsed, `application/octet-stream` as base64, other
//!   types as UTF-8 text).
//!
//! The proxy itself only validates the HELLO; matching replies to requests and performing HTTP
//! requests belong to the peers. Nothing here reads a socket or a clock.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// `messageType` values.
pub mod message_type {
    /// The first message of every peer.
    pub const HELLO: &str = "CONN:HELLO";
    /// Connection information the gateway emits.
    pub const INFO: &str = "CONN:INFO";
    /// An HTTP request to perform.
    pub const REST_REQUEST: &str = "REST:REQUEST";
    /// The answer to a REST:REQUEST.
    pub const REST_RESPONSE: &str = "REST:RESPONSE";
    /// Prefix of every event type (`EVENT:<name>` or `EVENT:<namespace>:<name>`).
    pub const EVENT_PREFIX: &str = "EVENT:";
}

/// `dataFormat` values with special meaning.
pub mod data_format {
    /// `messageBody` is a JSON value (only for exactly this string, no parameters).
    pub const JSON: &str = "application/json";
    /// `messageBody` is the body in standard base64.
    pub const OCTET_STREAM: &str = "application/octet-stream";
}

/// Largest websocket close reason in bytes (125-byte control payload minus the code).
pub const MAX_CLOSE_REASON: usize = 123;

/// Why a HELLO was refused; the message is meant to be the websocket close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// A binary frame that is not text in any JSON encoding.
    #[error("hello is not utf-8, utf-16 or utf-32 text")]
    Encoding,
    /// Not JSON at all.
    #[error("hello is not json: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("hello is not a json object")]
    NotObject,
    /// No `message` member.
    #[error("hello has no \"message\" member")]
    NoMessage,
    /// `message` is not an object.
    #[error("hello \"message\" is not an object")]
    MessageNotObject,
    /// `message.messageType` is missing or not exactly `CONN:HELLO`.
    #[error("hello \"messageType\" is not \"CONN:HELLO\"")]
    NotHello,
    /// `message.messageId` is missing or not an integer (or boolean).
    #[error("hello \"messageId\" is not an integer")]
    MessageId,
    /// `message.requiresResponse` is missing or not a boolean.
    #[error("hello \"requiresResponse\" is not a boolean")]
    RequiresResponse,
}

impl HelloError {
    /// The error text cut to fit a websocket close frame.
    pub fn close_reason(&self) -> String {
        truncate_utf8(self.to_string(), MAX_CLOSE_REASON)
    }
}

/// Errors from parsing a message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// A binary frame that is not text in any JSON encoding.
    #[error("message is not utf-8, utf-16 or utf-32 text")]
    Encoding,
    /// Not JSON.
    #[error("message is not json: {0}")]
    Json(#[source] serde_json::Error),
    /// No `message` object inside a top-level object.
    #[error("no \"message\" object")]
    NoMessage,
    /// A `message` member of the wrong type or missing.
    #[error("invalid {message_type}: {source}")]
    Invalid {
        /// The `messageType`, or `message` when unknown.
        message_type: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A CONN:HELLO that breaks the HELLO rules.
    #[error(transparent)]
    Hello(#[from] HelloError),
}

/// Errors converting between HTTP bodies and `dataFormat`/`messageBody`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// An `application/json` body that does not parse.
    #[error("body is not valid json: {0}")]
    Json(String),
    /// A text body that is not UTF-8.
    #[error("body of type {0} is not utf-8 text")]
    NotUtf8(String),
    /// An `application/octet-stream` body that is not a base64 string.
    #[error("octet-stream body is not a base64 string")]
    Base64,
}

/// A `{name, value}` pair of `headers` or `queryStrings`; `val` is accepted for `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NameValue {
    /// Header or parameter name.
    pub name: String,
    /// Its value.
    pub value: String,
}

impl NameValue {
    /// A pair.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

impl<'de> Deserialize<'de> for NameValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            name: String,
            #[serde(default)]
            value: Option<Value>,
            #[serde(default)]
            val: Option<Value>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let value = match raw.value.or(raw.val) {
            Some(Value::String(s)) => s,
            Some(scalar @ (Value::Number(_) | Value::Bool(_))) => scalar.to_string(),
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "{:?} has no string \"value\"",
                    raw.name
                )));
            }
        };
        Ok(Self {
            name: raw.name,
            value,
        })
    }
}

/// A CONN:HELLO.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// `messageId` (conventionally 0; a JSON boolean reads as 0 or 1).
    pub message_id: i64,
    /// `requiresResponse` (conventionally false).
    pub requires_response: bool,
    /// `peerClass` when it is a string, e.g. `micronets-gateway-service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_class: Option<String>,
    /// `peerId` when it is a string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Hello {
    /// A HELLO with the given id, `requiresResponse` false, peer class and peer id.
    pub fn new(message_id: i64, peer_class: impl Into<String>, peer_id: impl Into<String>) -> Self {
        Self {
            message_id,
            requires_response: false,
            peer_class: Some(peer_class.into()),
            peer_id: Some(peer_id.into()),
            extra: Map::new(),
        }
    }

    /// Applies the HELLO rules to a `message` object and takes its members apart.
    fn from_message(mut message: Map<String, Value>) -> Result<Self, HelloError> {
        match message.remove("messageType") {
            Some(Value::String(t)) if t == message_type::HELLO => {}
            _ => return Err(HelloError::NotHello),
        }
        // Python's isinstance(x, int) is true for booleans; so is True == 1.
        let message_id = match message.remove("messageId") {
            Some(Value::Number(n)) => n.as_i64().ok_or(HelloError::MessageId)?,
            Some(Value::Bool(b)) => i64::from(b),
            _ => return Err(HelloError::MessageId),
        };
        let requires_response = match message.remove("requiresResponse") {
            Some(Value::Bool(b)) => b,
            _ => return Err(HelloError::RequiresResponse),
        };
        Ok(Self {
            message_id,
            requires_response,
            peer_class: take_string(&mut message, "peerClass"),
            peer_id: take_string(&mut message, "peerId"),
            extra: message,
        })
    }
}

/// A REST:REQUEST: an HTTP request for the partner to perform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestRequest {
    /// `messageId`.
    pub message_id: i64,
    /// `requiresResponse` (true for requests).
    #[serde(default = "yes")]
    pub requires_response: bool,
    /// HTTP method.
    pub method: String,
    /// Request path, possibly with its query string.
    pub path: String,
    /// Optional `queryStrings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_strings: Option<Vec<NameValue>>,
    /// Request headers (without Content-Length/Type/Encoding, which travel as the body).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub headers: Vec<NameValue>,
    /// MIME type of `messageBody`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_format: Option<String>,
    /// The body: a JSON value for `application/json`, else a string.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub message_body: Option<Value>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RestRequest {
    /// A request with no headers and no body.
    pub fn new(message_id: i64, method: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            message_id,
            requires_response: true,
            method: method.into(),
            path: path.into(),
            query_strings: None,
            headers: Vec::new(),
            data_format: None,
            message_body: None,
            extra: Map::new(),
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(NameValue::new(name, value));
        self
    }

    /// Sets `dataFormat`/`messageBody` from an HTTP body (see [`body_from_bytes`]).
    ///
    /// # Errors
    /// As [`body_from_bytes`].
    pub fn with_body(mut self, content_type: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        let (format, value) = body_from_bytes(content_type, body)?;
        self.data_format = Some(format);
        self.message_body = Some(value);
        Ok(self)
    }

    /// The first header with this name, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as HTTP bytes, if there is one (see [`body_to_bytes`]).
    ///
    /// # Errors
    /// As [`body_to_bytes`].
    pub fn body_bytes(&self) -> Result<Option<Vec<u8>>, BodyError> {
        self.message_body
            .as_ref()
            .map(|body| body_to_bytes(self.data_format.as_deref(), body))
            .transpose()
    }
}

/// A REST:RESPONSE: the answer to the request with id `in_response_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestResponse {
    /// `messageId`.
    pub message_id: i64,
    /// `requiresResponse` (false for responses).
    #[serde(default)]
    pub requires_response: bool,
    /// The request's `messageId`.
    pub in_response_to: i64,
    /// HTTP status code.
    pub status_code: u16,
    /// HTTP reason phrase; emitted as `null` when absent.
    #[serde(default)]
    pub reason_phrase: Option<String>,
    /// Optional response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<NameValue>>,
    /// MIME type of `messageBody`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_format: Option<String>,
    /// The body: a JSON value for `application/json`, else a string.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub message_body: Option<Value>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RestResponse {
    /// A response with no reason phrase, no headers and no body.
    pub fn new(message_id: i64, in_response_to: i64, status_code: u16) -> Self {
        Self {
            message_id,
            requires_response: false,
            in_response_to,
            status_code,
            reason_phrase: None,
            headers: None,
            data_format: None,
            message_body: None,
            extra: Map::new(),
        }
    }

    /// Sets the reason phrase.
    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason_phrase = Some(reason.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers
            .get_or_insert_with(Vec::new)
            .push(NameValue::new(name, value));
        self
    }

    /// Sets `dataFormat`/`messageBody` from an HTTP body (see [`body_from_bytes`]).
    ///
    /// # Errors
    /// As [`body_from_bytes`].
    pub fn with_body(mut self, content_type: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        let (format, value) = body_from_bytes(content_type, body)?;
        self.data_format = Some(format);
        self.message_body = Some(value);
        Ok(self)
    }

    /// The first header with this name, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(self.headers.as_deref().unwrap_or_default(), name)
    }

    /// The body as HTTP bytes, if there is one (see [`body_to_bytes`]).
    ///
    /// # Errors
    /// As [`body_to_bytes`].
    pub fn body_bytes(&self) -> Result<Option<Vec<u8>>, BodyError> {
        self.message_body
            .as_ref()
            .map(|body| body_to_bytes(self.data_format.as_deref(), body))
            .transpose()
    }
}

/// An `EVENT:*` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `messageId`.
    pub message_id: i64,
    /// The full `messageType`, e.g. `EVENT:DEVICE:CONNECTED`.
    pub message_type: String,
    /// `requiresResponse` (false for events).
    #[serde(default)]
    pub requires_response: bool,
    /// MIME type of `messageBody`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_format: Option<String>,
    /// The event data.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub message_body: Option<Value>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Event {
    /// An event named `name` (with or without the `EVENT:` prefix) and no body.
    pub fn new(message_id: i64, name: &str) -> Self {
        let message_type = if name.starts_with(message_type::EVENT_PREFIX) {
            name.to_owned()
        } else {
            format!("{}{name}", message_type::EVENT_PREFIX)
        };
        Self {
            message_id,
            message_type,
            requires_response: false,
            data_format: None,
            message_body: None,
            extra: Map::new(),
        }
    }

    /// Sets `dataFormat`/`messageBody` from an HTTP body (see [`body_from_bytes`]).
    ///
    /// # Errors
    /// As [`body_from_bytes`].
    pub fn with_body(mut self, content_type: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        let (format, value) = body_from_bytes(content_type, body)?;
        self.data_format = Some(format);
        self.message_body = Some(value);
        Ok(self)
    }

    /// Sets a JSON body directly (`dataFormat` `application/json`).
    #[must_use]
    pub fn with_json(mut self, body: Value) -> Self {
        self.data_format = Some(data_format::JSON.to_owned());
        self.message_body = Some(body);
        self
    }

    /// The name without the `EVENT:` prefix.
    pub fn name(&self) -> &str {
        self.message_type
            .strip_prefix(message_type::EVENT_PREFIX)
            .unwrap_or(&self.message_type)
    }
}

/// Any other message (CONN:INFO, unknown types): the common members and the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// `messageId`.
    pub message_id: i64,
    /// `messageType`.
    pub message_type: String,
    /// `requiresResponse`.
    #[serde(default)]
    pub requires_response: bool,
    /// `inResponseTo`, for replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_response_to: Option<i64>,
    /// Every other member.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One message, typed by its `messageType`.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `CONN:HELLO`.
    Hello(Hello),
    /// `REST:REQUEST`.
    RestRequest(RestRequest),
    /// `REST:RESPONSE`.
    RestResponse(RestResponse),
    /// `EVENT:*`.
    Event(Event),
    /// Anything else.
    Other(Envelope),
}

impl Message {
    /// `messageId`.
    pub fn message_id(&self) -> i64 {
        match self {
            Self::Hello(m) => m.message_id,
            Self::RestRequest(m) => m.message_id,
            Self::RestResponse(m) => m.message_id,
            Self::Event(m) => m.message_id,
            Self::Other(m) => m.message_id,
        }
    }

    /// `messageType`.
    pub fn message_type(&self) -> &str {
        match self {
            Self::Hello(_) => message_type::HELLO,
            Self::RestRequest(_) => message_type::REST_REQUEST,
            Self::RestResponse(_) => message_type::REST_RESPONSE,
            Self::Event(m) => &m.message_type,
            Self::Other(m) => &m.message_type,
        }
    }

    /// `inResponseTo`, for replies.
    pub fn in_response_to(&self) -> Option<i64> {
        match self {
            Self::RestResponse(m) => Some(m.in_response_to),
            Self::Other(m) => m.in_response_to,
            Self::Hello(_) | Self::RestRequest(_) | Self::Event(_) => None,
        }
    }

    /// The whole envelope as a JSON value: `{"message": {...}}`.
    pub fn to_value(&self) -> Value {
        let inner = match self {
            Self::Hello(m) => with_type(serde_json::to_value(m), message_type::HELLO),
            Self::RestRequest(m) => with_type(serde_json::to_value(m), message_type::REST_REQUEST),
            Self::RestResponse(m) => {
                with_type(serde_json::to_value(m), message_type::REST_RESPONSE)
            }
            Self::Event(m) => serde_json::to_value(m).unwrap_or(Value::Null),
            Self::Other(m) => serde_json::to_value(m).unwrap_or(Value::Null),
        };
        let mut outer = Map::new();
        outer.insert("message".into(), inner);
        Value::Object(outer)
    }

    /// Compact JSON text, for a text frame.
    pub fn encode(&self) -> String {
        self.to_value().to_string()
    }

    /// JSON text indented by two spaces (what the original test client sends).
    pub fn encode_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).unwrap_or_default()
    }
}

impl From<Hello> for Message {
    fn from(m: Hello) -> Self {
        Self::Hello(m)
    }
}

impl From<RestRequest> for Message {
    fn from(m: RestRequest) -> Self {
        Self::RestRequest(m)
    }
}

impl From<RestResponse> for Message {
    fn from(m: RestResponse) -> Self {
        Self::RestResponse(m)
    }
}

impl From<Event> for Message {
    fn from(m: Event) -> Self {
        Self::Event(m)
    }
}

impl From<Envelope> for Message {
    fn from(m: Envelope) -> Self {
        Self::Other(m)
    }
}

/// Parses a text frame into a typed [`Message`] (strict JSON).
///
/// # Errors
/// Not JSON, no `message` object, a member of the wrong type, or a HELLO breaking the rules.
pub fn parse(text: &str) -> Result<Message, MessageError> {
    let value: Value = serde_json::from_str(text).map_err(MessageError::Json)?;
    from_value(value)
}

/// Parses a binary frame (UTF-8/16/32 auto-detected) into a typed [`Message`].
///
/// # Errors
/// As [`parse`], or [`MessageError::Encoding`].
pub fn parse_binary(bytes: &[u8]) -> Result<Message, MessageError> {
    let text = json_text(bytes).ok_or(MessageError::Encoding)?;
    parse(&text)
}

/// Types an already parsed `{"message": {...}}` value.
///
/// # Errors
/// As [`parse`].
pub fn from_value(value: Value) -> Result<Message, MessageError> {
    let Value::Object(mut outer) = value else {
        return Err(MessageError::NoMessage);
    };
    let Some(Value::Object(mut message)) = outer.remove("message") else {
        return Err(MessageError::NoMessage);
    };
    let kind = match message.get("messageType") {
        Some(Value::String(t)) => t.clone(),
        _ => {
            return Err(invalid(
                "message",
                serde::de::Error::missing_field("messageType"),
            ));
        }
    };
    match kind.as_str() {
        message_type::HELLO => Ok(Message::Hello(Hello::from_message(message)?)),
        message_type::REST_REQUEST => {
            message.remove("messageType");
            typed(message, &kind).map(Message::RestRequest)
        }
        message_type::REST_RESPONSE => {
            message.remove("messageType");
            typed(message, &kind).map(Message::RestResponse)
        }
        t if t.starts_with(message_type::EVENT_PREFIX) => typed(message, &kind).map(Message::Event),
        _ => typed(message, &kind).map(Message::Other),
    }
}

/// Validates a HELLO received in a text frame with the original proxy's rules.
///
/// # Errors
/// A [`HelloError`] naming the first rule broken.
pub fn validate_hello(text: &str) -> Result<Hello, HelloError> {
    // Python's json accepts NaN/Infinity, lone surrogates and integers of any size; rewrite
    // those so serde_json gives the same verdict. The rewritten text is only looked at, never
    // forwarded.
    let compat = python_compatible(text);
    let value: Value =
        serde_json::from_str(&compat).map_err(|err| HelloError::Json(err.to_string()))?;
    let Value::Object(mut outer) = value else {
        return Err(HelloError::NotObject);
    };
    match outer.remove("message") {
        Some(Value::Object(message)) => Hello::from_message(message),
        Some(_) => Err(HelloError::MessageNotObject),
        None => Err(HelloError::NoMessage),
    }
}

/// Validates a HELLO received in a binary frame (UTF-8/16/32 auto-detected as Python does).
///
/// # Errors
/// [`HelloError::Encoding`], or as [`validate_hello`].
pub fn validate_hello_binary(bytes: &[u8]) -> Result<Hello, HelloError> {
    let text = json_text(bytes).ok_or(HelloError::Encoding)?;
    if text.starts_with('\u{feff}') {
        return Err(HelloError::Json("unexpected byte order mark".into()));
    }
    validate_hello(&text)
}

/// Decodes JSON bytes the way Python's `json.loads` does: a UTF-32/16/8 byte order mark, else
/// the pattern of zero bytes at the start, else UTF-8. `None` when the bytes do not decode.
pub fn json_text(bytes: &[u8]) -> Option<Cow<'_, str>> {
    const BOM8: &[u8] = b"\xef\xbb\xbf";
    let utf16 = |b: &[u8], big: bool| -> Option<Cow<'_, str>> {
        if b.len() % 2 != 0 {
            return None;
        }
        let units = b.chunks_exact(2).map(|c| {
            let pair = [c[0], c[1]];
            if big {
                u16::from_be_bytes(pair)
            } else {
                u16::from_le_bytes(pair)
            }
        });
        char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .ok()
            .map(Cow::Owned)
    };
    let utf32 = |b: &[u8], big: bool| -> Option<Cow<'_, str>> {
        if b.len() % 4 != 0 {
            return None;
        }
        b.chunks_exact(4)
            .map(|c| {
                let quad = [c[0], c[1], c[2], c[3]];
                char::from_u32(if big {
                    u32::from_be_bytes(quad)
                } else {
                    u32::from_le_bytes(quad)
                })
            })
            .collect::<Option<String>>()
            .map(Cow::Owned)
    };
    let utf8 = |b| std::str::from_utf8(b).ok().map(Cow::Borrowed);
    match bytes {
        [0, 0, 0xfe, 0xff, rest @ ..] => utf32(rest, true),
        [0xff, 0xfe, 0, 0, rest @ ..] => utf32(rest, false),
        [0xfe, 0xff, rest @ ..] => utf16(rest, true),
        [0xff, 0xfe, rest @ ..] => utf16(rest, false),
        _ if bytes.starts_with(BOM8) => utf8(&bytes[BOM8.len()..]),
        [0, 0, _, _, ..] => utf32(bytes, true),
        [0, _, _, _, ..] => utf16(bytes, true),
        [_, 0, 0, 0, ..] => utf32(bytes, false),
        [_, 0, _, _, ..] => utf16(bytes, false),
        [0, _] => utf16(bytes, true),
        [_, 0] => utf16(bytes, false),
        _ => utf8(bytes),
    }
}

/// Turns an HTTP body and its Content-Type into `(dataFormat, messageBody)`.
///
/// `dataFormat` is the content type verbatim, `application/json` when there is none. The body
/// is parsed JSON when the format is exactly `application/json`, standard base64 for
/// `application/octet-stream` (parameters and case ignored), UTF-8 text otherwise. An empty
/// body is the empty string in every format.
///
/// # Errors
/// Invalid JSON, or text that is not UTF-8.
pub fn body_from_bytes(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(String, Value), BodyError> {
    let format = content_type.unwrap_or(data_format::JSON).to_owned();
    if body.is_empty() {
        return Ok((format, Value::String(String::new())));
    }
    let value = if format == data_format::JSON {
        serde_json::from_slice(body).map_err(|err| BodyError::Json(err.to_string()))?
    } else if is_octet_stream(&format) {
        Value::String(BASE64.encode(body))
    } else {
        let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8(format.clone()))?;
        Value::String(text.to_owned())
    };
    Ok((format, value))
}

/// Turns `dataFormat` and `messageBody` back into HTTP body bytes.
///
/// A string is sent as is (base64-decoded for `application/octet-stream`); any other JSON value
/// is serialised with two-space indentation, as the original test client does.
///
/// # Errors
/// [`BodyError::Base64`] for an octet-stream body that is not a base64 string.
pub fn body_to_bytes(
    data_format: Option<&str>,
    message_body: &Value,
) -> Result<Vec<u8>, BodyError> {
    let octets = data_format.is_some_and(is_octet_stream);
    match message_body {
        Value::String(s) if octets => BASE64.decode(s).map_err(|_| BodyError::Base64),
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        _ if octets => Err(BodyError::Base64),
        other => serde_json::to_vec_pretty(other).map_err(|err| BodyError::Json(err.to_string())),
    }
}

fn is_octet_stream(format: &str) -> bool {
    let media = format.split(';').next().unwrap_or_default().trim();
    media.eq_ignore_ascii_case(data_format::OCTET_STREAM)
}

fn find_header<'a>(headers: &'a [NameValue], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::String(_)) => match map.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    message: Map<String, Value>,
    kind: &str,
) -> Result<T, MessageError> {
    serde_json::from_value(Value::Object(message)).map_err(|source| invalid(kind, source))
}

fn invalid(kind: &str, source: serde_json::Error) -> MessageError {
    MessageError::Invalid {
        message_type: kind.to_owned(),
        source,
    }
}

fn with_type(value: Result<Value, serde_json::Error>, kind: &str) -> Value {
    match value {
        Ok(Value::Object(mut map)) => {
            map.insert("messageType".into(), Value::from(kind));
            Value::Object(map)
        }
        _ => Value::Null,
    }
}

fn yes() -> bool {
    true
}

/// Deserialises a member that is present (even as `null`) into `Some`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// Deserialises a list where `null` means empty.
fn null_as_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<NameValue>, D::Error> {
    Option::<Vec<NameValue>>::deserialize(deserializer).map(Option::unwrap_or_default)
}

fn truncate_utf8(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Rewrites what Python's `json` accepts and serde_json does not into strict JSON with the
/// same HELLO verdict: `NaN`/`Infinity`/`-Infinity` and overflowing floats become `null` (not
/// integers, booleans or strings, like the floats they are), integers beyond i64 are clamped
/// (still integers), lone surrogate escapes become U+FFFD. Anything invalid is left for
/// serde_json to reject.
fn python_compatible(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (replacement, used) = match c {
            '"' => (None, string_len(rest, &mut out)),
            'N' if rest.starts_with("NaN") => (Some("null"), 3),
            'I' if rest.starts_with("Infinity") => (Some("null"), 8),
            '-' if rest.starts_with("-Infinity") => (Some("null"), 9),
            '-' | '0'..='9' => {
                let len = rest
                    .find(|c: char| !matches!(c, '0'..='9' | '-' | '+' | '.' | 'e' | 'E'))
                    .unwrap_or(rest.len());
                (compat_number(&rest[..len]), len)
            }
            _ => (None, c.len_utf8()),
        };
        if c != '"' {
            out.push_str(replacement.unwrap_or(&rest[..used]));
        }
        rest = &rest[used..];
    }
    out
}

/// A replacement for a number literal serde_json would refuse or not read as an integer:
/// the i64 bound for a plain integer beyond i64, `null` for a float that overflows to infinity
/// (Python reads it as `inf`). `None` keeps the token.
fn compat_number(token: &str) -> Option<&'static str> {
    let plain = json_number(token)?;
    if !plain {
        let overflows = token.parse::<f64>().is_ok_and(f64::is_infinite);
        return overflows.then_some("null");
    }
    if token.parse::<i64>().is_ok() {
        return None;
    }
    Some(if token.starts_with('-') {
        "-9223372036854775808"
    } else {
        "9223372036854775807"
    })
}

/// Whether `token` is a JSON number: `Some(true)` for an integer, `Some(false)` for one with a
/// fraction or exponent, `None` when it is not a number at all.
fn json_number(token: &str) -> Option<bool> {
    fn digits(s: &[u8]) -> usize {
        s.iter().take_while(|b| b.is_ascii_digit()).count()
    }
    let b = token.strip_prefix('-').unwrap_or(token).as_bytes();
    let int = digits(b);
    if int == 0 || (int > 1 && b[0] == b'0') {
        return None;
    }
    let mut rest = &b[int..];
    if rest.is_empty() {
        return Some(true);
    }
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = digits(fraction);
        if n == 0 {
            return None;
        }
        rest = &fraction[n..];
    }
    if let Some(exponent) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
        let exponent = exponent
            .strip_prefix(b"+")
            .or_else(|| exponent.strip_prefix(b"-"))
            .unwrap_or(exponent);
        let n = digits(exponent);
        if n == 0 {
            return None;
        }
        rest = &exponent[n..];
    }
    rest.is_empty().then_some(false)
}

/// Copies the JSON string at the start of `text` into `out`, replacing lone surrogate escapes,
/// and returns its length in `text` (the rest of the text when it is unterminated).
fn string_len(text: &str, out: &mut String) -> usize {
    let bytes = text.as_bytes();
    let mut i = 1;
    let mut copied = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                out.push_str(&text[copied..=i]);
                return i + 1;
            }
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                let unit = hex4(bytes, i + 2);
                let paired = unit.is_some_and(|u| (0xd800..0xdc00).contains(&u))
                    && bytes.get(i + 6) == Some(&b'\\')
                    && bytes.get(i + 7) == Some(&b'u')
                    && hex4(bytes, i + 8).is_some_and(|u| (0xdc00..0xe000).contains(&u));
                if paired {
                    i += 12;
                } else if unit.is_some_and(|u| (0xd800..0xe000).contains(&u)) {
                    out.push_str(&text[copied..i]);
                    out.push_str("\\ufffd");
                    i += 6;
                    copied = i;
                } else {
                    i += 2;
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    out.push_str(&text[copied..]);
    text.len()
}

fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = bytes.get(at..at.checked_add(4)?)?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let digits = std::str::from_utf8(digits).ok()?;
    u16::from_str_radix(digits, 16).ok()
}
