//! Shared by every daemon in the workspace.
//!
//! - [`tls`]: rustls server and client configurations, mutual TLS with CRLs, certificates that
//!   reload from disk, handshakes with a deadline and the verified peer identity.
//! - [`pki`]: issue CAs, leaves and CRLs with rcgen; inspect certificates with x509-parser.
//! - [`envelope`]: sans-IO message types and framing codecs (no tokio, no sockets, no clocks).
//! - [`io`]: stream adapters ([`io::WriteDeadline`]: a deadline on every write).
//! - [`daemon`]: tracing set-up, layered TOML configuration, signals, systemd notifications and
//!   draining.
//! - [`log`]: client-controlled log fields escaped ([`log::Escaped`]) and the field formatter
//!   that keeps every `text` and `journal` log event on one line.
//!
//! This crate knows nothing about any one daemon's protocol beyond the shared envelopes.

pub mod daemon;
pub mod envelope;
pub mod io;
pub mod log;
pub mod pki;
pub mod tls;
