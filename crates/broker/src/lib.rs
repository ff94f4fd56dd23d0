//! The broker: hands a user's application a port plus a secret (ssh mode) or a certificate
//! from the broker's own CA (ssl mode), so that only that user can reach it.
//!
//! The daemon ([`server`]) answers an HTTP/JSON API on a Unix socket, where the caller is the
//! uid the kernel reports (`SO_PEERCRED`), and optionally over HTTPS, where the caller is the
//! user its client certificate maps to. Jobs live in a SQL store ([`store`]: SQLite by
//! default, PostgreSQL by URL). [`client`] is the library `broker-cli`, `broker-run` and the
//! tests use; [`cli`] holds those tools' logic (their binaries only parse arguments). [`gate`]
//! fronts an unmodified application; [`tunnel`] is the user's side of it ([`peer`] tells it
//! which uid owns a TCP peer on this host). [`tally`] counts refusals (wrong keys, another
//! user's or no such job) per caller and job per interval, so a flood of them makes a few
//! audit rows with a count, not a row each. [`metrics`] holds the Prometheus families the
//! daemon serves on `metrics_listen` (below `service` and `server`, which record into them).
//!
//! This crate knows nothing of ssh itself except that `broker-cli connect --host` runs the
//! system's `ssh` binary.

pub mod api;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod gate;
pub mod identity;
pub mod metrics;
pub mod peer;
pub mod server;
pub mod service;
pub mod store;
pub mod tally;
pub mod tunnel;
