//! remo-serv integration tests: the real server on 127.0.0.1:0 (in process, or the real
//! `remo-serv` binary as a child), a real SQLite user database in a temporary directory, real
//! Ed448 keys, the real client library and CLIs, raw HTTP requests built with the `proto`
//! functions for the error rows, and the independent Python client.
//!
//! - `harness`: servers, raw sessions, answer decoding, process helpers;
//! - `protocol`: every endpoint through the client, request numbers, logout and re-login;
//! - `errors`: every error row of the status table, none of them a 500;
//! - `front`: the front door: unauthenticated connections in their own pool until a login,
//!   closed at `auth-timeout`;
//! - `files`: roots, symlinks, modes, failed and stalled uploads;
//! - `interactive`: /icm, /idt, /edt, and who terminates the attached command;
//! - `process`: the daemon, `remo` and `remo-admin` binaries (exit codes, HTTPS, SIGTERM,
//!   256 MiB with bounded memory, a killed upload);
//! - `original`: our client against the original server's framing and upload limits;
//! - `python`: the independent Python client;
//! - `timers`: every timer whose default fits a test, at that default, both ways;
//! - `usage`: bad flags exit 64, and a closed stdout ends `remo-admin` quietly;
//! - `unverified`: limits on unverified work: body deadlines and budget, login rate and
//!   per-user cap, no takeover by cookie, one run per token, equal cost for unknown users.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failures, like the tests"
)]

mod errors;
mod files;
mod front;
mod harness;
mod interactive;
mod metrics;
mod original;
mod process;
mod protocol;
mod python;
mod timers;
mod unverified;
mod usage;
