//! Integration tests: the real server on 127.0.0.1:0 (in process, and the daemon binary),
//! real TLS clients, the original's Python client, `openssl`, a stand-in `create_pkgsign`.
//!
//! - `support`: the in-process server, the original-protocol and HTTPS clients, generated
//!   content;
//! - `legacy`: the original protocol byte for byte, the Python client, single files, the
//!   file limit, concurrent and silent clients;
//! - `refusals`: certificates, roots, symlinks, shell metacharacters;
//! - `signatures`: verification with the library and with `openssl pkeyutl`;
//! - `audit`: the audit trail on SQLite and PostgreSQL (`<name>::sqlite`, `<name>::postgres`):
//!   append-only, nothing handed out before its row commits, two instances into one PostgreSQL,
//!   migrations;
//! - `api`: the HTTPS JSON API;
//! - `upload`: a 2 GiB upload with bounded memory;
//! - `command`: the external `create_pkgsign`-compatible signer;
//! - `daemon`: the `signing-server` binary;
//! - `hardening`: issue 14's attacks on the signer (a file changed between the two passes,
//!   swapped directories and FIFOs, unsafe names, deadlines, the spool quota, verify);
//! - `logs`: no log line forged by a client;
//! - `limits`: `max_connections`, SIGHUP certificate reloads, stalled (408) and over-size
//!   (413) uploads;
//! - `revocation`: a certificate revoked after the handshake on a live connection, and
//!   `max_connection_age_secs`;
//! - `timers`: every timer whose default fits a test, at that default, both ways;
//! - `usage`: bad flags exit 64 in every binary.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failures, like the tests"
)]

mod api;
mod audit;
mod client;
mod command;
mod daemon;
mod hardening;
mod legacy;
mod limits;
mod logs;
mod metrics;
mod pg_tls;
mod refusals;
mod revocation;
mod signatures;
mod support;
mod timers;
mod upload;
mod usage;
