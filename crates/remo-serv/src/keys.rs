//! Key files as the original tools write them: PKCS#8 PEM Ed448 private keys (optionally
//! PBES2-encrypted), SubjectPublicKeyInfo PEM public keys; RSA public keys for smart-card users.

use std::path::Path;

use ed448_goldilocks::{Signature, SigningKey, VerifyingKey};
use pkcs8::der::Decode as _;
use pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _};
use zeroize_shim::Zeroizing;

/// PBKDF2-HMAC-SHA256 iterations used when we encrypt a private key.
pub const PBKDF2_ITERATIONS: u32 = 600_000;

/// Errors reading or writing key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a PEM key we understand.
    #[error("not a PKCS#8 PEM key: {0}")]
    Format(String),
    /// The key is encrypted and no passphrase was given.
    #[error("the private key is encrypted: a passphrase is needed")]
    NeedPassphrase,
    /// The passphrase does not decrypt the key.
    #[error("wrong passphrase (or damaged encrypted key)")]
    WrongPassphrase,
    /// A key of another algorithm where Ed448 is required.
    #[error("not an Ed448 key")]
    NotEd448,
}

/// A user's (or the server's) long-term public key.
#[derive(Debug, Clone)]
pub enum PublicKey {
    /// Ed448 (the normal case).
    Ed448(Box<VerifyingKey>),
    /// RSA (smart-card users): PKCS#1 v1.5 signatures over SHA-512.
    Rsa(Box<rsa::RsaPublicKey>),
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM (as text or bytes, the way `users.pub` holds it).
    ///
    /// # Errors
    /// [`KeyError::Format`] for anything but an Ed448 or RSA public key.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::Format("not UTF-8".into()))?;
        if let Ok(key) = VerifyingKey::from_public_key_pem(text.trim()) {
            return Ok(Self::Ed448(Box::new(key)));
        }
        use rsa::pkcs8::DecodePublicKey as _;
        match rsa::RsaPublicKey::from_public_key_pem(text.trim()) {
            Ok(key) => Ok(Self::Rsa(Box::new(key))),
            Err(err) => Err(KeyError::Format(err.to_string())),
        }
    }

    /// Reads a public key file.
    ///
    /// # Errors
    /// I/O or [`KeyError::Format`].
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        Self::from_pem(&read(path)?)
    }

    /// Checks a signature over `message`; `false` for any failure.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Ed448(key) => Signature::try_from(signature)
                .map(|sig| key.verify_raw(&sig, message).is_ok())
                .unwrap_or(false),
            Self::Rsa(key) => {
                use sha2::Digest as _;
                let digest = sha2::Sha512::digest(message);
                key.verify(rsa::Pkcs1v15Sign::new::<sha2::Sha512>(), &digest, signature)
                    .is_ok()
            }
        }
    }

    /// PEM SubjectPublicKeyInfo of an Ed448 key.
    pub fn ed448_pem(key: &VerifyingKey) -> String {
        key.to_public_key_pem(pkcs8::LineEnding::LF)
            .expect("an Ed448 key always encodes")
    }
}

/// An Ed448 private key.
pub struct PrivateKey {
    key: SigningKey,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(Ed448, ..)")
    }
}

impl PrivateKey {
    /// A new random key.
    pub fn generate() -> Self {
        use rand::RngCore as _;
        let mut seed = Zeroizing::new([0u8; 57]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// The key of a 57-byte RFC 8032 seed.
    pub fn from_seed(seed: &[u8; 57]) -> Self {
        let key = SigningKey::try_from(&seed[..]).expect("57 bytes is an Ed448 seed");
        Self { key }
    }

    /// Parses a PKCS#8 PEM private key, decrypting it with `passphrase` when it is encrypted.
    ///
    /// # Errors
    /// [`KeyError::NeedPassphrase`], [`KeyError::WrongPassphrase`], [`KeyError::NotEd448`] or
    /// [`KeyError::Format`].
    pub fn from_pem(pem: &str, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        let (label, der) = pkcs8::Document::from_pem(pem.trim())
            .map_err(|err| KeyError::Format(err.to_string()))?;
        let plain = match label {
            "PRIVATE KEY" => Zeroizing::new(der.as_bytes().to_vec()),
            "ENCRYPTED PRIVATE KEY" => {
                let passphrase = passphrase.ok_or(KeyError::NeedPassphrase)?;
                let info = pkcs8::EncryptedPrivateKeyInfoRef::from_der(der.as_bytes())
                    .map_err(|err| KeyError::Format(err.to_string()))?;
                let doc = info
                    .decrypt(passphrase)
                    .map_err(|_| KeyError::WrongPassphrase)?;
                Zeroizing::new(doc.as_bytes().to_vec())
            }
            other => return Err(KeyError::Format(format!("unexpected PEM label {other}"))),
        };
        let info = pkcs8::PrivateKeyInfoRef::from_der(&plain)
            .map_err(|err| KeyError::Format(err.to_string()))?;
        if info.algorithm.oid != ed448_goldilocks::ALGORITHM_OID {
            return Err(KeyError::NotEd448);
        }
        let key =
            SigningKey::from_pkcs8_der(&plain).map_err(|err| KeyError::Format(err.to_string()))?;
        Ok(Self { key })
    }

    /// Reads a private key file.
    ///
    /// # Errors
    /// As [`PrivateKey::from_pem`], plus I/O.
    pub fn read(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(read(path)?);
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Format("not UTF-8".into()))?;
        Self::from_pem(text, passphrase)
    }

    /// Whether a PEM private key is encrypted (so a passphrase must be asked for).
    pub fn is_encrypted_pem(pem: &str) -> bool {
        pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    }

    /// Signs `message` (pure Ed448, empty context).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign_raw(message).to_bytes().to_vec()
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// PKCS#8 v1 PEM (what Python's cryptography writes), PBES2-encrypted (PBKDF2-SHA256,
    /// AES-256-CBC) when a non-empty passphrase is given.
    ///
    /// # Errors
    /// Encoding failures (none expected).
    pub fn to_pem(&self, passphrase: Option<&[u8]>) -> Result<Zeroizing<String>, KeyError> {
        use pkcs8::EncodePrivateKey as _;
        let bytes = ed448::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes().into(),
            public_key: None,
        };
        let der = bytes
            .to_pkcs8_der()
            .map_err(|err| KeyError::Format(err.to_string()))?;
        let pem = match passphrase.filter(|p| !p.is_empty()) {
            None => der
                .to_pem("PRIVATE KEY", pkcs8::LineEnding::LF)
                .map_err(|err| KeyError::Format(err.to_string()))?,
            Some(passphrase) => {
                use rand::RngCore as _;
                let mut salt = [0u8; 16];
                let mut iv = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut salt);
                rand::rngs::OsRng.fill_bytes(&mut iv);
                let params = pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(
                    PBKDF2_ITERATIONS,
                    &salt,
                    iv,
                )
                .map_err(|err| KeyError::Format(err.to_string()))?;
                let info = pkcs8::PrivateKeyInfoRef::from_der(der.as_bytes())
                    .map_err(|err| KeyError::Format(err.to_string()))?;
                let encrypted = info
                    .encrypt_with_params(params, passphrase)
                    .map_err(|err| KeyError::Format(err.to_string()))?;
                encrypted
                    .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
                    .map_err(|err| KeyError::Format(err.to_string()))?
            }
        };
        Ok(pem)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })
}

mod zeroize_shim {
    //! Wipes secrets on drop, through the zeroize the key crates already use.
    pub(crate) use ed448_goldilocks::elliptic_curve::zeroize::Zeroizing;
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_SEED: &str = "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233343536373839";
    const USER_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMEMwBQYDK2VxAzoA2pGLo+V/3KAyb0bH7IQ7qPyw1X+hXyWIpXuunfVYIQNR5+FV\ngbJEWcCnzeHoNVgtcXwGmepy6MkA\n-----END PUBLIC KEY-----\n";

    fn user() -> PrivateKey {
        PrivateKey::from_seed(&hex::decode(USER_SEED).unwrap().try_into().unwrap())
    }

    #[test]
    fn vector_keys_and_signature() {
        let key = user();
        assert_eq!(
            hex::encode(key.verifying_key().to_bytes()),
            "da918ba3e57fdca0326f46c7ec843ba8fcb0d57fa15f2588a57bae9df558210351e7e15581b24459c0a7cde1e835582d717c0699ea72e8c900"
        );
        assert_eq!(PublicKey::ed448_pem(&key.verifying_key()), USER_PEM);
        let message = hex::decode("616c696365507f546d22632d55e0a3ccc9b1e4cdab7b0d879e9468a1c2512d486d7fe371887edd621ab6d8c8c183390328f0ba23da10264e4dcdc915f3").unwrap();
        let signature = key.sign(&message);
        assert_eq!(
            hex::encode(&signature),
            "186a8dcbc2d717a88fdba8f799142e91b722baeda29e527563b337bd52d9805671d69f550c45e47487d063af381c4561ee94e0e1c69c7f910069c517cc1e4b82e7e105951d47cc7167dbc3e39cc0c19ba2e20c12aae2a27a46a5da657380a426065d48199b42785d77f6fd439e424f910500"
        );
        let public = PublicKey::from_pem(USER_PEM.as_bytes()).unwrap();
        assert!(public.verify(&message, &signature));
        assert!(!public.verify(b"other", &signature));
        assert!(!public.verify(&message, &signature[1..]));
    }

    #[test]
    fn private_pem_round_trips_plain_and_encrypted() {
        let key = user();
        let plain = key.to_pem(None).unwrap();
        assert!(plain.starts_with("-----BEGIN PRIVATE KEY-----"));
        // PKCS#8 v1 without the public key, as Python's cryptography writes it.
        let der = pkcs8::Document::from_pem(&plain).unwrap().1;
        assert_eq!(
            &der.as_bytes()[..16],
            &hex::decode("3047020100300506032b6571043b0439").unwrap()[..]
        );
        let back = PrivateKey::from_pem(&plain, None).unwrap();
        assert_eq!(back.verifying_key(), key.verifying_key());

        let encrypted = key.to_pem(Some(b"foo")).unwrap();
        assert!(PrivateKey::is_encrypted_pem(&encrypted));
        assert!(matches!(
            PrivateKey::from_pem(&encrypted, None),
            Err(KeyError::NeedPassphrase)
        ));
        assert!(matches!(
            PrivateKey::from_pem(&encrypted, Some(b"bar")),
            Err(KeyError::WrongPassphrase)
        ));
        let back = PrivateKey::from_pem(&encrypted, Some(b"foo")).unwrap();
        assert_eq!(back.verifying_key(), key.verifying_key());
    }

    #[test]
    fn garbage_and_foreign_keys_are_refused() {
        assert!(PublicKey::from_pem(b"nonsense").is_err());
        assert!(PublicKey::from_pem(&[0xff, 0xfe]).is_err());
        assert!(
            PrivateKey::from_pem(
                "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
                None
            )
            .is_err()
        );
    }
}
