//! remo-serv's wire format (`remo_serv::proto`, `remo_serv::session`): the `/auth` JSON and
//! its answer, Fernet body and path tokens, token plaintexts and the session cookie.

use std::sync::OnceLock;

use remo_serv::proto::{
    self, AuthRequest, Cipher, HASH_LEN, Magic, TOKEN_TTL_SECS, TokenHeader, X448_LEN,
};
use remo_serv::session::cookie_session_id;

/// The clock the tokens are checked against.
const NOW: u64 = 1_700_000_000;

fn cipher() -> &'static Cipher {
    static CIPHER: OnceLock<Cipher> = OnceLock::new();
    CIPHER.get_or_init(|| Cipher::new(&[7u8; 32]))
}

/// A body through every remo-serv parser that reads a peer's bytes.
pub fn remo(data: &[u8]) {
    auth(data);
    if let Some(id) = cookie_session_id(data.split(|&b| b == b'\n')) {
        assert!(!id.is_empty() && id.len() <= 64);
    }
    token_plain(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A token of a stranger's making: no key, so it must be refused, never panic.
    let _ = proto::b64_decode(text);
    let _ = cipher().decrypt_body(text, NOW);
    let _ = cipher().decrypt_path(text, NOW);
}

/// `/auth`: the request the server parses and the answer the client parses.
fn auth(data: &[u8]) {
    if let Ok(request) = AuthRequest::parse(data) {
        let json = request.to_json();
        assert_eq!(
            AuthRequest::parse(json.as_bytes()).as_ref(),
            Ok(&request),
            "{json}"
        );
    }
    if let Ok((key, sign)) = proto::parse_auth_response(data) {
        let key: [u8; X448_LEN] = key.try_into().expect("a checked key has its length");
        let body = proto::auth_response(&key, &sign);
        assert_eq!(
            proto::parse_auth_response(body.as_bytes()),
            Ok((key.to_vec(), sign))
        );
    }
}

/// A decrypted token's plaintext: header, path hash, payload; and the token round trip.
fn token_plain(plain: &[u8]) {
    let token = cipher().encrypt_at(plain, NOW);
    let decrypted = cipher().decrypt_body(&token, NOW + TOKEN_TTL_SECS);
    assert_eq!(decrypted.as_deref(), Ok(plain));
    assert!(
        cipher()
            .decrypt_body(&token, NOW + TOKEN_TTL_SECS + 1)
            .is_err()
    );
    let Ok((header, rest)) = TokenHeader::split(plain) else {
        assert!(plain.len() < proto::HEADER_LEN);
        return;
    };
    let canonical = matches!(header.magic0, b'B' | b'.') && matches!(header.magic1, b'E' | b'.');
    let magic = Magic {
        first: header.is_first(),
        last: header.is_last(),
    };
    if let Ok((hash, payload)) = proto::split_hash(rest) {
        assert_eq!(hash.len(), HASH_LEN);
        if canonical {
            let again =
                proto::request_plain(magic, header.req_no, header.tok_no, Some(hash), payload);
            assert_eq!(again, plain);
        }
    }
}
