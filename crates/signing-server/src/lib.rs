//! signing-server: a TLS package-signing service on port 6000.
//!
//! Clients present a certificate; its subject CN picks a `[[clients]]` rule: the key it signs
//! with and the directories it may have signed by path. Two protocols share the port, told
//! apart by ALPN: the original's (a path in, a listing, a JSON object of per-file fields and a
//! "Signatures written to" line out) and an HTTPS JSON API (uploads, paths, keys, verify).
//!
//! - [`ed448`]: keys and RFC 8032 pure Ed448 over streams;
//! - [`signer`]: the built-in signer and the external `create_pkgsign`-compatible one;
//! - [`fields`]: the per-file fields, AIX names, the signature line, Python-style JSON;
//! - [`service`]: identity rules, signing paths, recording;
//! - [`audit`]: the append-only audit table and `signatures.txt`;
//! - [`server`], [`api`]: the listener, the original protocol and the JSON API;
//! - [`config`]: the TOML file;
//! - [`metrics`]: the Prometheus families (shared ones, signatures by key, audit commit
//!   latency);
//! - [`cli`]: the command-line tools' logic (`signing-client`, `signing-bench`).
//!
//! The library never reads argv, the environment or signals; the binaries in `src/bin` do.

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod ed448;
pub mod fields;
pub mod listing;
pub mod metrics;
pub mod server;
pub mod service;
pub mod signer;
pub mod spool;
