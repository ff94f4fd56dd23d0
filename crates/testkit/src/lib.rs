//! Dev-only helpers for tests across the workspace.
//!
//! - [`pki`]: the process-wide test PKI ([`test_pki`]): CAs, server and client certificates,
//!   an expired and a revoked client, a CRL, all as PEM strings and files.
//!
//! Nothing here is used by a shipped binary.

pub mod pki;

pub use pki::{Leaf, TestPki, test_pki};
