//! The remo_serv 0.6.0 wire format, free of sockets and clocks.
//!
//! - the session key: X448, then NIST Concat KDF (one SHA-256 round over `00000001 || Z ||
//!   "remo_serv"`), used as a Fernet key;
//! - body tokens: Fernet tokens whose plaintext starts with a 6-byte header (magic, request
//!   number, token number), the first one of a request carrying SHA-384 of the URL path and the
//!   first one of a response carrying the ASCII status `200`;
//! - the `/auth` JSON request and its two-line answer.
//!
//! Everything here takes bytes (and `now` where a TTL applies) and returns values, so the
//! test vectors of the original drive it directly.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use sha2::{Digest as _, Sha256, Sha384};

/// Seconds a body token stays valid (both directions).
pub const TOKEN_TTL_SECS: u64 = 10;
/// Plaintext bytes per token the server puts in a `/get` answer.
pub const GET_PIECE: usize = 16_384;
/// Plaintext bytes per token a client puts in an upload.
pub const UPLOAD_PIECE: usize = 8_192;
/// Length of the token header: magic (2), request number (2), token number (2).
pub const HEADER_LEN: usize = 6;
/// Length of the path hash in a request's first token.
pub const HASH_LEN: usize = 48;
/// Raw X448 public key length.
pub const X448_LEN: usize = 56;
/// Status text the first response token always carries (the original hard-codes it).
pub const STATUS_TEXT: &[u8] = b"200";

/// Errors of the wire format; every one maps to a clean 4xx answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The token did not authenticate, was malformed, expired or from the future.
    #[error("token does not decrypt (wrong key, damaged or older than {TOKEN_TTL_SECS} s)")]
    BadToken,
    /// Fewer bytes than a header.
    #[error("token too short")]
    Short,
    /// The first token does not carry a path hash.
    #[error("first token lacks the path hash")]
    NoHash,
    /// Not valid base64 (either alphabet, padding required).
    #[error("bad base64")]
    Base64,
    /// The /auth body is not the expected JSON object.
    #[error("bad /auth request: {0}")]
    AuthJson(&'static str),
    /// The X448 key has the wrong length or is a low-order point.
    #[error("bad X448 public key")]
    X448Key,
}

/// `K = SHA-256(00 00 00 01 || Z || "remo_serv")`: one round of the NIST SP 800-56A Concat
/// KDF, which is what `ConcatKDFHash(SHA256, 32, otherinfo=b"remo_serv")` computes.
pub fn session_key(shared: &[u8; X448_LEN]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(1u32.to_be_bytes());
    hash.update(shared);
    hash.update(b"remo_serv");
    hash.finalize().into()
}

/// The X448 public key of a 56-byte secret scalar (RFC 7748, base point u = 5).
pub fn x448_public(secret: &[u8; X448_LEN]) -> [u8; X448_LEN] {
    let mut base = [0u8; X448_LEN];
    base[0] = 5;
    x448::x448_unchecked(*secret, base)
}

/// The X448 shared secret; refuses a peer key of the wrong length or of low order.
///
/// # Errors
/// [`ProtoError::X448Key`].
pub fn x448_shared(secret: &[u8; X448_LEN], peer: &[u8]) -> Result<[u8; X448_LEN], ProtoError> {
    let peer: [u8; X448_LEN] = peer.try_into().map_err(|_| ProtoError::X448Key)?;
    x448::x448(*secret, peer).ok_or(ProtoError::X448Key)
}

/// A fresh random X448 secret scalar.
pub fn x448_secret() -> [u8; X448_LEN] {
    use rand::RngCore as _;
    let mut secret = [0u8; X448_LEN];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    secret
}

/// SHA-384 of the URL path (what the first request token carries).
pub fn path_hash(path: &str) -> [u8; HASH_LEN] {
    Sha384::digest(path.as_bytes()).into()
}

/// URL-safe base64 with `=` padding, as Python's `urlsafe_b64encode`.
pub fn b64u(bytes: &[u8]) -> String {
    URL_SAFE.encode(bytes)
}

/// Decodes base64 in either alphabet; the padding is required, as in the original.
///
/// # Errors
/// [`ProtoError::Base64`].
pub fn b64_decode(text: &str) -> Result<Vec<u8>, ProtoError> {
    let normalised: String = text
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE
        .decode(normalised.as_bytes())
        .map_err(|_| ProtoError::Base64)
}

/// A session's Fernet cipher.
#[derive(Clone)]
pub struct Cipher {
    fernet: fernet::Fernet,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    /// The cipher of a session key (the Fernet key is `b64u(key)`).
    pub fn new(key: &[u8; 32]) -> Self {
        let fernet = fernet::Fernet::new(&b64u(key)).expect("a 32-byte key is a valid Fernet key");
        Self { fernet }
    }

    /// Encrypts with the current time and a random IV.
    pub fn encrypt(&self, plain: &[u8]) -> String {
        self.fernet.encrypt(plain)
    }

    /// Encrypts with a given timestamp (tests of the TTL).
    pub fn encrypt_at(&self, plain: &[u8], now: u64) -> String {
        self.fernet.encrypt_at_time(plain, now)
    }

    /// Decrypts a body token: valid for [`TOKEN_TTL_SECS`] after it was made.
    ///
    /// # Errors
    /// [`ProtoError::BadToken`].
    pub fn decrypt_body(&self, token: &str, now: u64) -> Result<Vec<u8>, ProtoError> {
        self.fernet
            .decrypt_at_time(token.trim_end(), Some(TOKEN_TTL_SECS), now)
            .map_err(|_| ProtoError::BadToken)
    }

    /// Decrypts a URL-path token: no TTL, as in the original.
    ///
    /// # Errors
    /// [`ProtoError::BadToken`].
    pub fn decrypt_path(&self, token: &str, now: u64) -> Result<Vec<u8>, ProtoError> {
        self.fernet
            .decrypt_at_time(token, None, now)
            .map_err(|_| ProtoError::BadToken)
    }
}

/// The first two bytes of a token's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Magic {
    /// `B`: first token of a body (`.` otherwise).
    pub first: bool,
    /// `E`: last token of a body (`.` otherwise).
    pub last: bool,
}

impl Magic {
    /// The marks of token `t` of a body of `count` tokens: `B` on the first, `E` on the last.
    #[must_use]
    pub const fn nth(t: u64, count: u64) -> Self {
        Self {
            first: t == 0,
            last: t + 1 == count,
        }
    }

    fn bytes(self) -> [u8; 2] {
        [
            if self.first { b'B' } else { b'.' },
            if self.last { b'E' } else { b'.' },
        ]
    }
}

/// Token `t`'s number on the wire: an int16 that wraps past 32767, as the original's counter.
#[must_use]
pub fn token_no(t: u64) -> i16 {
    t as u16 as i16
}

/// A decoded token plaintext (request or response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    /// Raw first magic byte (`B` or anything else).
    pub magic0: u8,
    /// Raw second magic byte (`E` or anything else).
    pub magic1: u8,
    /// Request number (int16, big endian, signed).
    pub req_no: i16,
    /// Token number within the body.
    pub tok_no: i16,
}

impl TokenHeader {
    /// Whether the magic says "first token".
    pub fn is_first(&self) -> bool {
        self.magic0 == b'B'
    }

    /// Whether the magic says "last token".
    pub fn is_last(&self) -> bool {
        self.magic1 == b'E'
    }

    /// Splits a plaintext into its header and the rest.
    ///
    /// # Errors
    /// [`ProtoError::Short`].
    pub fn split(plain: &[u8]) -> Result<(Self, &[u8]), ProtoError> {
        if plain.len() < HEADER_LEN {
            return Err(ProtoError::Short);
        }
        let header = Self {
            magic0: plain[0],
            magic1: plain[1],
            req_no: i16::from_be_bytes([plain[2], plain[3]]),
            tok_no: i16::from_be_bytes([plain[4], plain[5]]),
        };
        Ok((header, &plain[HEADER_LEN..]))
    }
}

/// Builds a request token plaintext; the first token carries the path hash.
pub fn request_plain(
    magic: Magic,
    req_no: i16,
    tok_no: i16,
    hash: Option<&[u8; HASH_LEN]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut plain = Vec::with_capacity(HEADER_LEN + HASH_LEN + payload.len());
    plain.extend_from_slice(&magic.bytes());
    plain.extend_from_slice(&req_no.to_be_bytes());
    plain.extend_from_slice(&tok_no.to_be_bytes());
    if let Some(hash) = hash {
        plain.extend_from_slice(hash);
    }
    plain.extend_from_slice(payload);
    plain
}

/// Builds a response token plaintext; the first token carries `200`.
pub fn response_plain(magic: Magic, req_no: i16, tok_no: i16, payload: &[u8]) -> Vec<u8> {
    let mut plain = Vec::with_capacity(HEADER_LEN + STATUS_TEXT.len() + payload.len());
    plain.extend_from_slice(&magic.bytes());
    plain.extend_from_slice(&req_no.to_be_bytes());
    plain.extend_from_slice(&tok_no.to_be_bytes());
    if magic.first {
        plain.extend_from_slice(STATUS_TEXT);
    }
    plain.extend_from_slice(payload);
    plain
}

/// Splits a request's first-token remainder into the path hash and the payload.
///
/// # Errors
/// [`ProtoError::NoHash`].
pub fn split_hash(rest: &[u8]) -> Result<(&[u8; HASH_LEN], &[u8]), ProtoError> {
    if rest.len() < HASH_LEN {
        return Err(ProtoError::NoHash);
    }
    let (hash, payload) = rest.split_at(HASH_LEN);
    Ok((hash.try_into().map_err(|_| ProtoError::NoHash)?, payload))
}

/// The members of an `/auth` request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// Login name.
    pub user: String,
    /// Client ephemeral X448 public key (56 bytes once checked).
    pub key: Vec<u8>,
    /// Signature over `UTF-8(user) || key`.
    pub sign: Vec<u8>,
}

impl AuthRequest {
    /// The message the user's long-term key signs.
    pub fn signed_message(user: &str, key: &[u8]) -> Vec<u8> {
        let mut message = user.as_bytes().to_vec();
        message.extend_from_slice(key);
        message
    }

    /// Parses the JSON body: an object with string members `user`, `key`, `sign` (order and
    /// spacing free), base64 in either alphabet with padding.
    ///
    /// # Errors
    /// [`ProtoError::AuthJson`] or [`ProtoError::Base64`].
    pub fn parse(body: &[u8]) -> Result<Self, ProtoError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| ProtoError::AuthJson("not JSON"))?;
        let object = value
            .as_object()
            .ok_or(ProtoError::AuthJson("not a JSON object"))?;
        let member = |name: &'static str| {
            object
                .get(name)
                .ok_or(ProtoError::AuthJson("missing member"))?
                .as_str()
                .ok_or(ProtoError::AuthJson("member is not a string"))
        };
        Ok(Self {
            user: member("user")?.to_owned(),
            key: b64_decode(member("key")?)?,
            sign: b64_decode(member("sign")?)?,
        })
    }

    /// Serialises exactly as the original client (`json.dumps` defaults: `", "` and `": "`
    /// separators, this key order, non-ASCII escaped as `\uXXXX`).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"user\": {}, \"key\": \"{}\", \"sign\": \"{}\"}}",
            python_json_string(&self.user),
            b64u(&self.key),
            b64u(&self.sign)
        )
    }
}

/// A JSON string literal as Python's `json.dumps` writes it with `ensure_ascii=True`.
fn python_json_string(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// The `/auth` success body: `b64u(server X448 public)` CRLF `b64u(signature over it)`.
pub fn auth_response(server_public: &[u8; X448_LEN], signature: &[u8]) -> String {
    format!("{}\r\n{}", b64u(server_public), b64u(signature))
}

/// Splits an `/auth` answer into the server's X448 key and its signature.
///
/// The original client slices by position; this accepts any line break.
///
/// # Errors
/// [`ProtoError::Base64`] or [`ProtoError::X448Key`].
pub fn parse_auth_response(body: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ProtoError> {
    let text = std::str::from_utf8(body).map_err(|_| ProtoError::Base64)?;
    let mut lines = text.split(['\r', '\n']).filter(|line| !line.is_empty());
    let key = b64_decode(lines.next().ok_or(ProtoError::Base64)?)?;
    let sign = b64_decode(lines.next().ok_or(ProtoError::Base64)?)?;
    if key.len() != X448_LEN {
        return Err(ProtoError::X448Key);
    }
    Ok((key, sign))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(text: &str) -> Vec<u8> {
        hex::decode(text).unwrap()
    }

    fn arr<const N: usize>(text: &str) -> [u8; N] {
        h(text).try_into().unwrap()
    }

    const CLIENT_X: &str = "c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff07";
    const CLIENT_XPUB: &str = "507f546d22632d55e0a3ccc9b1e4cdab7b0d879e9468a1c2512d486d7fe371887edd621ab6d8c8c183390328f0ba23da10264e4dcdc915f3";
    const SERVER_X: &str = "030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dce3eaf1f8ff060d141b222930373e454c535a61686f767d84";
    const SERVER_XPUB: &str = "c5b1596ece3d97d391115a0493e8f3284466a6fc69b9baefe5321dc2d408dab2378dca8b03da2862898123f7b5ee8e09f112b26aa998af1a";
    const SHARED: &str = "5a5fd961d1ceb0a8e16f6dbb6f4848c45cb251f1b06d4b3158ba035b030774544d2a4aa7ffa2aef3680832d85b43ba8f2594829aca3e1600";
    const KEY: &str = "142e4f0490edbc08982d258dc2f661e6c2e41c2d8b55e7a9533e201b2e3ea5d0";
    const CMD_TOKEN: &str = "gAAAAABlU_EAAAECAwQFBgcICQoLDA0OD_Kqd3uut6iwFjEo4_dyEoLNRapNq5ZpbBaFaI3pk__IWAGZu9WKUnwITfxm7m3A1Q==";
    const FIRST_TOKEN: &str = "gAAAAABlU_EAAAECAwQFBgcICQoLDA0OD7gNp4XaIpEJz_YIn3ArepGxXwca2qn6lIJFL-H31NOq7nTI-ipydBZnMtFtu8ZkTcS-vSN1ki93TWFCmVv4-MP07wkvxrLZywQtDiLf0yldZD5Yw9Z1UchJRnTrTz9y4g==";
    const RESPONSE_TOKEN: &str = "gAAAAABlU_EAAAECAwQFBgcICQoLDA0ODw2v8qVy-JEB74NtxtvpwkzKjC5EU8iFAh_3HJgC2UtvTPEqhKus63Y0q5l1hnvBjA==";
    const T0: u64 = 1_700_000_000;

    #[test]
    fn token_marks_and_numbers() {
        let marks = |count| {
            (0..count)
                .map(|t| Magic::nth(t, count).bytes())
                .collect::<Vec<_>>()
        };
        assert_eq!(marks(1), [*b"BE"]);
        assert_eq!(marks(3), [*b"B.", *b"..", *b".E"]);
        assert_eq!(token_no(0), 0);
        assert_eq!(token_no(32_767), i16::MAX);
        assert_eq!(token_no(32_768), i16::MIN);
        assert_eq!(token_no(65_536), 0);
    }

    #[test]
    fn x448_and_kdf_match_the_vectors() {
        let client = arr::<56>(CLIENT_X);
        let server = arr::<56>(SERVER_X);
        assert_eq!(x448_public(&client).to_vec(), h(CLIENT_XPUB));
        assert_eq!(x448_public(&server).to_vec(), h(SERVER_XPUB));
        let z1 = x448_shared(&client, &h(SERVER_XPUB)).unwrap();
        let z2 = x448_shared(&server, &h(CLIENT_XPUB)).unwrap();
        assert_eq!(z1, z2);
        assert_eq!(z1.to_vec(), h(SHARED));
        assert_eq!(session_key(&z1).to_vec(), h(KEY));
        assert_eq!(
            b64u(&session_key(&z1)),
            "FC5PBJDtvAiYLSWNwvZh5sLkHC2LVeepUz4gGy4-pdA="
        );
    }

    #[test]
    fn low_order_and_short_peer_keys_are_refused() {
        let secret = x448_secret();
        assert_eq!(x448_shared(&secret, &[0u8; 56]), Err(ProtoError::X448Key));
        assert_eq!(x448_shared(&secret, &[9u8; 55]), Err(ProtoError::X448Key));
        let mut one = [0u8; 56];
        one[0] = 1;
        assert_eq!(x448_shared(&secret, &one), Err(ProtoError::X448Key));
    }

    #[test]
    fn tokens_of_the_vectors_decrypt_and_check() {
        let cipher = Cipher::new(&arr::<32>(KEY));
        assert_eq!(cipher.decrypt_path(CMD_TOKEN, T0).unwrap(), b"echo hello");
        // Path tokens have no TTL; body tokens expire after 10 s.
        assert!(cipher.decrypt_path(CMD_TOKEN, T0 + 86_400).is_ok());
        let path = format!("/cmd/{CMD_TOKEN}");
        assert_eq!(
            path_hash(&path).to_vec(),
            h(
                "e6b6374c8559864a40d3677dc6618cf63779f3777bde47b3797d391f269c8e83a983845e9c48071463f0d2f10bffe5f8"
            )
        );
        let plain = cipher.decrypt_body(FIRST_TOKEN, T0 + 10).unwrap();
        assert_eq!(
            plain,
            request_plain(
                Magic {
                    first: true,
                    last: true
                },
                1,
                0,
                Some(&path_hash(&path)),
                b""
            )
        );
        let (header, rest) = TokenHeader::split(&plain).unwrap();
        assert!(header.is_first() && header.is_last());
        assert_eq!((header.req_no, header.tok_no), (1, 0));
        let (hash, payload) = split_hash(rest).unwrap();
        assert_eq!(hash, &path_hash(&path));
        assert!(payload.is_empty());
        assert_eq!(
            cipher.decrypt_body(FIRST_TOKEN, T0 + 11),
            Err(ProtoError::BadToken)
        );
        assert_eq!(
            cipher.decrypt_body(FIRST_TOKEN, T0 - 61),
            Err(ProtoError::BadToken)
        );
        // A trailing line break is tolerated, as in Python's decoder.
        assert!(
            cipher
                .decrypt_body(&format!("{FIRST_TOKEN}\r\n"), T0)
                .is_ok()
        );

        let response = cipher.decrypt_body(RESPONSE_TOKEN, T0).unwrap();
        assert_eq!(response, h("422e0001000032303068656c6c6f0a"));
        assert_eq!(
            response,
            response_plain(
                Magic {
                    first: true,
                    last: false
                },
                1,
                0,
                b"hello\n"
            )
        );
        assert_eq!(
            response_plain(
                Magic {
                    first: true,
                    last: true
                },
                1,
                0,
                b""
            ),
            h("424500010000323030")
        );
        let other = Cipher::new(&[7u8; 32]);
        assert_eq!(
            other.decrypt_body(FIRST_TOKEN, T0),
            Err(ProtoError::BadToken)
        );
    }

    #[test]
    fn auth_request_matches_the_original_bytes() {
        let body = r#"{"user": "alice", "key": "UH9UbSJjLVXgo8zJseTNq3sNh56UaKHCUS1IbX_jcYh-3WIattjIwYM5AyjwuiPaECZOTc3JFfM=", "sign": "GGqNy8LXF6iP26j3mRQukbciuu2inlJ1Y7M3vVLZgFZx1p9VDEXkdIfQY684HEVh7pTg4cacf5EAacUXzB5LgufhBZUdR8xxZ9vD45zAwZui4gwSquKiekal2mVzgKQmBl1IGZtCeF139v1DnkJPkQUA"}"#;
        assert_eq!(body.len(), 268);
        let parsed = AuthRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(parsed.user, "alice");
        assert_eq!(parsed.key, h(CLIENT_XPUB));
        assert_eq!(parsed.sign.len(), 114);
        assert_eq!(parsed.to_json(), body);
        assert_eq!(
            AuthRequest::signed_message("alice", &parsed.key),
            h(
                "616c696365507f546d22632d55e0a3ccc9b1e4cdab7b0d879e9468a1c2512d486d7fe371887edd621ab6d8c8c183390328f0ba23da10264e4dcdc915f3"
            )
        );
    }

    #[test]
    fn auth_request_errors() {
        let check = |body: &str, expected: ProtoError| {
            assert_eq!(AuthRequest::parse(body.as_bytes()), Err(expected), "{body}");
        };
        check("not json", ProtoError::AuthJson("not JSON"));
        check("[1]", ProtoError::AuthJson("not a JSON object"));
        check(
            r#"{"user": "a", "key": "AA=="}"#,
            ProtoError::AuthJson("missing member"),
        );
        check(
            r#"{"user": 1, "key": "AA==", "sign": "AA=="}"#,
            ProtoError::AuthJson("member is not a string"),
        );
        check(
            r#"{"user": "a", "key": "AA", "sign": "AA=="}"#,
            ProtoError::Base64,
        );
        check(
            r#"{"user": "a", "key": "A*A=", "sign": "AA=="}"#,
            ProtoError::Base64,
        );
        // The standard alphabet decodes too.
        let ok = AuthRequest::parse(br#"{"sign": "+/8=", "key": "-_8=", "user": "b"}"#).unwrap();
        assert_eq!(ok.key, ok.sign);
    }

    #[test]
    fn python_json_escapes_non_ascii() {
        assert_eq!(
            python_json_string("h\u{e9}\"\u{1f600}"),
            r#""h\u00e9\"\ud83d\ude00""#
        );
    }

    #[test]
    fn auth_response_round_trip() {
        let body = auth_response(&arr::<56>(SERVER_XPUB), &[1u8; 114]);
        assert_eq!(body.len(), 230);
        assert_eq!(&body[76..78], "\r\n");
        let (key, sign) = parse_auth_response(body.as_bytes()).unwrap();
        assert_eq!(key, h(SERVER_XPUB));
        assert_eq!(sign, vec![1u8; 114]);
        assert!(parse_auth_response(b"").is_err());
        assert!(parse_auth_response(b"AA==\r\nAA==").is_err());
    }

    #[test]
    fn short_plaintexts_are_refused() {
        assert_eq!(TokenHeader::split(b"BE\0\x01\0"), Err(ProtoError::Short));
        assert_eq!(split_hash(&[0u8; 47]), Err(ProtoError::NoHash));
    }
}
