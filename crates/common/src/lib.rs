//! Shared by every daemon in the workspace.
//!
//! - [`admission`]: the front door: connections that have not authenticated get a small pool
//!   of their own with a per-address cap and a deadline, and take a `max_connections` slot only
//!   once authenticated; local sockets get a pool of their own; refusals are logged at most
//!   once per pool per 10 s.
//! - [`tls`]: rustls server and client configurations, mutual TLS with CRLs, certificates that
//!   reload from disk, handshakes with a deadline and the verified peer identity.
//! - [`pki`]: issue CAs, leaves and CRLs with rcgen; inspect certificates with x509-parser.
//! - [`envelope`]: sans-IO message types and framing codecs (no tokio, no sockets, no clocks).
//! - [`beneath`]: client-named paths opened once beneath a directory descriptor of their root
//!   (`openat2` with `RESOLVE_BENEATH`, `O_NONBLOCK`), and temporary files moved into place
//!   with `renameat` (removed when dropped).
//! - [`io`]: stream adapters ([`io::WriteDeadline`]: a deadline on every write).
//! - [`cli`]: the start-up path of every command-line tool and benchmark (runtime, `name: error`,
//!   the exit-code rule).
//! - [`limits`]: the front door's numbers (default stranger budget, a listener's [`limits::Limits`]),
//!   named by configuration types without the admission machinery.
//! - [`exit`]: the sysexits codes every tool and daemon exits with.
//! - [`daemon`]: tracing set-up, layered TOML configuration, signals, systemd notifications and
//!   draining.
//! - [`metrics`]: Prometheus metrics: a registry with the families every daemon shares and the
//!   process metrics, and the `metrics_listen` listener that serves `GET /metrics`.
//! - [`local_http`]: the small plain-HTTP server behind every local listener (metrics, ws-proxy's
//!   status and front end): a pool of its own and deadlines on every connection.
//! - `migrate` (feature `migrate`): sqlx migrations embedded in a binary, with the check
//!   that they are the `migrations/` directory as sqlx reads it; `pgurl` (same feature): the
//!   rule a `postgres://` URL must meet (TCP with `sslmode=verify-full`, or a Unix socket in a
//!   directory not everyone can write).
//! - [`log`]: client-controlled log fields escaped ([`log::Escaped`]) and the field formatter
//!   that keeps every `text` and `journal` log event on one line.
//!
//! This crate knows nothing about any one daemon's protocol beyond the shared envelopes.

pub mod admission;
pub mod beneath;
pub mod cli;
pub mod daemon;
pub mod envelope;
pub mod exit;
pub mod io;
pub mod limits;
pub mod local_http;
pub mod log;
pub mod metrics;
#[cfg(feature = "migrate")]
pub mod migrate;
#[cfg(feature = "migrate")]
pub mod pgurl;
pub mod pki;
pub mod secret;
pub mod tls;
