//! Issue and inspect X.509 material: root and intermediate CAs, leaf certificates, CRLs.
//!
//! Issuing goes through rcgen (RSA keys come from the `rsa` crate because ring cannot
//! generate them); inspection goes through x509-parser. Every certificate made here carries
//! the extensions OpenSSL, rustls and Python's `ssl` expect (basicConstraints, keyUsage,
//! extendedKeyUsage on leaves, subject and authority key identifiers, random serials).
//!
//! This module knows nothing about files beyond reading a CA's PEM pair, nothing about TLS
//! configuration (see [`crate::tls`]) and nothing about any daemon. Time comes in through
//! [`Validity`] and [`CrlParams`], so tests can make certificates that are already expired.

mod inspect;
mod issue;
mod keys;
mod pem;
#[cfg(test)]
mod tests;

pub use inspect::{CertInfo, CrlInfo, inspect_crl_der, inspect_crl_pem, inspect_der, inspect_pem};
pub use issue::{
    BACKDATE, Ca, CaParams, Crl, CrlParams, Issued, LeafParams, Name, San, Usage, Validity,
};
pub use keys::KeyType;
pub use pem::{PemBlock, pem_decode, pem_encode, serial_from_hex};

use std::path::PathBuf;

/// Everything that can go wrong while issuing, loading or inspecting PKI material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or could not sign.
    #[error("cannot build certificate")]
    Rcgen(#[from] rcgen::Error),
    /// Key generation or key encoding failed.
    #[error("cannot generate {key_type} key: {reason}")]
    KeyGen {
        /// The requested key type.
        key_type: KeyType,
        /// What the key library reported.
        reason: String,
    },
    /// The key type name is not one we support.
    #[error("unknown key type {0:?} (expected ed25519, p256, rsa2048 or rsa3072)")]
    UnknownKeyType(String),
    /// The PEM text is malformed.
    #[error("malformed pem: {0}")]
    Pem(String),
    /// No `CERTIFICATE` block where one was required.
    #[error("no certificate found")]
    NoCertificate,
    /// No usable private key block (PKCS#8, SEC1 P-256 or PKCS#1 RSA) where one was required.
    #[error("no private key found (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)")]
    NoPrivateKey,
    /// A SEC1 or PKCS#1 key that cannot be converted.
    #[error("unsupported private key: {0}")]
    UnsupportedKey(String),
    /// The private key is not one rcgen can sign with.
    #[error("unsupported or malformed private key")]
    BadKey(#[source] rcgen::Error),
    /// The DER of a certificate does not parse.
    #[error("cannot parse certificate: {0}")]
    ParseCert(String),
    /// The DER of a CRL does not parse.
    #[error("cannot parse crl: {0}")]
    ParseCrl(String),
    /// A certificate was used as a CA but is not one.
    #[error("certificate {0:?} is not a ca (basicConstraints CA:TRUE missing)")]
    NotCa(String),
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// A serial number is not hexadecimal.
    #[error("invalid serial number {0:?}: expected hexadecimal digits")]
    InvalidSerial(String),
    /// A subject alternative name is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// `not_after` is not after `not_before`, or `next_update` not after `this_update`.
    #[error("validity period ends before it starts")]
    InvalidValidity,
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;
