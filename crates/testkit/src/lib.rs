//! Dev-only helpers for tests across the workspace.
//!
//! - [`metrics`]: scraping a metrics listener, finding a series, and the checks every metrics
//!   listener must pass (pool, head deadline, 404/405).
//! - [`pki`]: the process-wide test PKI ([`test_pki`]): CAs, server and client certificates,
//!   an expired and a revoked client, a CRL, all as PEM strings and files.
//! - [`daemon`]: start a server on 127.0.0.1:0 with a shutdown handle ([`spawn_tcp`]); test
//!   tracing.
//! - [`logs`]: log injection checks: a value that forges a log line, a capture of a child's
//!   stderr, and the assertion that nothing was forged.
//! - [`front`]: the front-door attack (a crowd of idle sockets from 127.0.0.1) and a
//!   legitimate mutual-TLS client from 127.0.0.2.
//! - [`poll`]: [`eventually`], the one polling loop for whatever happens in another task or
//!   process.
//! - [`timers`]: timer tests at the defaults: when a connection was cut, and whether that was
//!   about at its default.
//! - [`usage`]: the command-line rules of every binary: a bad flag exits 64 with clap's
//!   message, `--help` exits 0, a closed stdout exits 141 quietly.
//!
//! Nothing here is used by a shipped binary.

pub mod daemon;
pub mod front;
pub mod logs;
pub mod metrics;
pub mod pki;
pub mod poll;
pub mod timers;
pub mod usage;

pub use daemon::{Spawned, init_tracing, spawn_tcp};
pub use pki::{Attr, Leaf, TestPki, test_pki};
pub use poll::{eventually, until};
