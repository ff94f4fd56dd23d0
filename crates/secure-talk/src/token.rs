//! Reconnection tokens: HS256 JWTs `{client_id, iat, exp}` under a 256-bit key.
//!
//! The key is random per start (tokens die with the process, as in the original) unless a
//! 0600 key file is configured, in which case tokens survive restarts. Only HS256 verifies:
//! `alg: none`, the other HMAC sizes and every asymmetric algorithm are refused. With a key
//! file, client ids are random 53-bit numbers (so ids minted before a restart are not handed
//! out again); with a random key they count from 1 like the original's.

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;

/// Shortest key a key file may hold, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// Largest client id: integers above 2^53 do not survive a JavaScript client.
pub const MAX_CLIENT_ID: u64 = (1 << 53) - 1;
/// Longest token accepted in a `token` header.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// The identity.
    pub client_id: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

/// Errors loading a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unreadable.
    #[error("token key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may read it.
    #[error("token key file {0} must not be readable by group or others (chmod 600)")]
    Mode(String),
    /// Too short.
    #[error("token key file {0} holds fewer than {MIN_KEY_BYTES} bytes")]
    Short(String),
}

/// Issues and verifies tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    lifetime: Duration,
    next_id: Option<AtomicU64>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("key", &"[secret]")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens under a fresh random 256-bit key; ids count from 1.
    pub fn random(lifetime: Duration) -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self::with_key(&key, lifetime, true)
    }

    /// Tokens under the key in `path` (0600, at least 32 bytes; a trailing newline is part of
    /// nothing); ids are random.
    ///
    /// # Errors
    /// Unreadable, too open or too short.
    pub fn from_file(path: &Path, lifetime: Duration) -> Result<Self, KeyError> {
        Self::from_file_in(path, lifetime, None)
    }

    /// [`Tokens::from_file`], except that a file inside `credentials` (systemd's
    /// `$CREDENTIALS_DIRECTORY`) may show group read: systemd grants the service user access
    /// there with an ACL, and `stat` reports the ACL mask in the group bits.
    ///
    /// # Errors
    /// As [`Tokens::from_file`].
    pub fn from_file_in(
        path: &Path,
        lifetime: Duration,
        credentials: Option<&Path>,
    ) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let read_err = |source| KeyError::Read {
            path: shown.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !common::daemon::secret_mode_ok(path, meta.permissions().mode(), credentials) {
            return Err(KeyError::Mode(shown));
        }
        let mut key = std::fs::read(path).map_err(read_err)?;
        while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            key.pop();
        }
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::Short(shown));
        }
        Ok(Self::with_key(&key, lifetime, false))
    }

    /// Writes a new random key file (base64 text of 32 random bytes, mode 0600).
    ///
    /// # Errors
    /// The file exists or cannot be written.
    pub fn write_key_file(path: &Path) -> std::io::Result<()> {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let text = base64::engine::general_purpose::STANDARD.encode(key);
        common::daemon::write_new_private(path, format!("{text}\n").as_bytes())
    }

    fn with_key(key: &[u8], lifetime: Duration, sequential: bool) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            lifetime,
            next_id: sequential.then(|| AtomicU64::new(1)),
        }
    }

    /// A new identity and its token.
    pub fn issue(&self, now: SystemTime) -> (u64, String) {
        let client_id = match &self.next_id {
            Some(counter) => counter.fetch_add(1, Ordering::Relaxed),
            None => (rand::rngs::OsRng.next_u64() & MAX_CLIENT_ID).max(1),
        };
        (client_id, self.issue_for(client_id, now))
    }

    /// A token for an existing identity.
    pub fn issue_for(&self, client_id: u64, now: SystemTime) -> String {
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            client_id,
            iat,
            exp: iat.saturating_add(self.lifetime.as_secs()),
        };
        // Encoding HS256 claims of plain integers cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// The claims of a valid, unexpired HS256 token; `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        let claims = data.claims;
        (claims.client_id <= MAX_CLIENT_ID).then_some(claims)
    }
}

/// The claims of a token read without checking it: for clients, which cannot.
pub fn peek(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    #[test]
    fn issue_verify_and_refusals() {
        let tokens = Tokens::random(Duration::from_secs(60));
        let now = SystemTime::now();
        let (id, token) = tokens.issue(now);
        assert_eq!(id, 1);
        assert_eq!(tokens.issue(now).0, 2);
        let claims = tokens.verify(&token).unwrap();
        assert_eq!(claims.client_id, 1);
        assert_eq!(claims.exp, claims.iat + 60);
        assert_eq!(peek(&token), Some(claims.clone()));

        // Another key.
        let other = Tokens::random(Duration::from_secs(60));
        assert!(other.verify(&token).is_none());
        // Expired.
        let old = tokens.issue_for(5, now - Duration::from_secs(120));
        assert!(tokens.verify(&old).is_none());
        // alg none, with the same claims.
        let body = b64(serde_json::to_string(&claims).unwrap().as_bytes());
        let none = format!("{}.{body}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert!(tokens.verify(&none).is_none());
        // HS512 under the right key.
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &tokens.encoding)
            .unwrap();
        assert!(tokens.verify(&hs512).is_none());
        // Missing exp.
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"client_id": 3, "iat": 1}),
            &tokens.encoding,
        )
        .unwrap();
        assert!(tokens.verify(&no_exp).is_none());
        for junk in ["", "null", "a.b.c", &"x".repeat(5000)] {
            assert!(tokens.verify(junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        Tokens::write_key_file(&path).unwrap();
        assert!(Tokens::write_key_file(&path).is_err());
        let a = Tokens::from_file(&path, Duration::from_secs(60)).unwrap();
        let b = Tokens::from_file(&path, Duration::from_secs(60)).unwrap();
        let (id, token) = a.issue(SystemTime::now());
        assert!((1..=MAX_CLIENT_ID).contains(&id));
        assert_eq!(b.verify(&token).unwrap().client_id, id);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            Tokens::from_file(&path, Duration::from_secs(60)),
            Err(KeyError::Mode(_))
        ));
        assert!(Tokens::from_file_in(&path, Duration::from_secs(60), Some(dir.path())).is_ok());
        let short = dir.path().join("short");
        std::fs::write(&short, b"tooshort\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Tokens::from_file(&short, Duration::from_secs(60)),
            Err(KeyError::Short(_))
        ));
    }
}
