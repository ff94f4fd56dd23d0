//! Key types and key generation.
//!
//! Ed25519 and ECDSA keys come from ring through rcgen; RSA keys come from the `rsa` crate
//! (ring cannot generate them) and are handed to rcgen as PKCS#8 DER. Keys are never
//! encrypted: protecting key files is the caller's business (mode 0600, no commits).

use std::fmt;
use std::str::FromStr;

use rcgen::KeyPair;
use rsa::pkcs8::EncodePrivateKey;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Serialize;

use super::{PkiError, Result};

/// The key algorithms certificates can be issued for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// Ed25519 (EdDSA).
    Ed25519,
    /// ECDSA on NIST P-256 with SHA-256: the default, as in the original scripts.
    #[default]
    P256,
    /// RSA 2048-bit, PKCS#1 v1.5 signatures with SHA-256.
    Rsa2048,
    /// RSA 3072-bit, PKCS#1 v1.5 signatures with SHA-256.
    Rsa3072,
}

impl KeyType {
    /// Every supported key type, in the order `--help` lists them.
    pub const ALL: [KeyType; 4] = [Self::Ed25519, Self::P256, Self::Rsa2048, Self::Rsa3072];

    /// The command-line spelling: `ed25519`, `p256`, `rsa2048`, `rsa3072`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::P256 => "p256",
            Self::Rsa2048 => "rsa2048",
            Self::Rsa3072 => "rsa3072",
        }
    }

    /// Whether this is an RSA key (leaves then also get keyEncipherment).
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072)
    }

    /// Generates a fresh key pair of this type.
    pub(crate) fn generate(self) -> Result<KeyPair> {
        let bits = match self {
            Self::Ed25519 => return ed25519_v1(&KeyPair::generate_for(&rcgen::PKCS_ED25519)?),
            Self::P256 => return Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
            Self::Rsa2048 => 2048,
            Self::Rsa3072 => 3072,
        };
        let key_gen = |reason: String| PkiError::KeyGen {
            key_type: self,
            reason,
        };
        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits)
            .map_err(|e| key_gen(e.to_string()))?;
        let der = private.to_pkcs8_der().map_err(|e| key_gen(e.to_string()))?;
        let pkcs8 = PrivatePkcs8KeyDer::from(der.as_bytes());
        KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
            .map_err(|e| key_gen(e.to_string()))
    }
}

/// The RFC 8410 PKCS#8 v1 prefix of an Ed25519 private key, followed by the 32-byte seed.
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Re-encodes a ring Ed25519 key as PKCS#8 v1.
///
/// ring writes PKCS#8 v2 (with the public key), which OpenSSL 3.0 and therefore Python's
/// `ssl` refuse to load; v1 carries only the seed and every library reads it.
fn ed25519_v1(key: &KeyPair) -> Result<KeyPair> {
    let der = key.serialized_der();
    let marker = [0x04, 0x22, 0x04, 0x20];
    let seed = der
        .windows(marker.len())
        .position(|w| w == marker)
        .and_then(|at| der.get(at + marker.len()..at + marker.len() + 32))
        .ok_or_else(|| PkiError::KeyGen {
            key_type: KeyType::Ed25519,
            reason: "unexpected pkcs#8 layout from ring".to_owned(),
        })?;
    let mut v1 = ED25519_V1_PREFIX.to_vec();
    v1.extend_from_slice(seed);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(v1.as_slice()),
        &rcgen::PKCS_ED25519,
    )?;
    Ok(key)
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" => Ok(Self::Ed25519),
            "p256" | "p-256" | "ecdsa" | "ecdsa-p256" | "prime256v1" => Ok(Self::P256),
            "rsa2048" | "rsa-2048" | "rsa" => Ok(Self::Rsa2048),
            "rsa3072" | "rsa-3072" => Ok(Self::Rsa3072),
            _ => Err(PkiError::UnknownKeyType(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::KeyPair;

    #[test]
    fn ed25519_keys_are_pkcs8_v1_with_the_same_key() {
        let original = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("generate");
        let v1 = super::ed25519_v1(&original).expect("re-encode");
        assert_eq!(v1.public_key_raw(), original.public_key_raw());
        assert_eq!(v1.serialized_der().len(), 48);
        assert_eq!(v1.serialized_der()[..16], super::ED25519_V1_PREFIX);
    }
}
