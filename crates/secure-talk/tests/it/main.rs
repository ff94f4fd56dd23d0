//! Integration tests: the real daemon pieces on 127.0.0.1:0 and Unix sockets, real pipes.
//!
//! - `support`: the in-process server, client options, bounded receives, raw requests;
//! - `tokens`: the token endpoint and the upgrade's token check;
//! - `tls`: client certificates (missing, untrusted, expired, revoked, optional);
//! - `unix`: the Unix-socket listener, its mode, stale and live socket files;
//! - `echo`: `text` echo and error replies;
//! - `pipes`: pipes end to end, ownership, admin identities, reconnection, orphans;
//! - `uploads`: `model` uploads, traversal, checksums, the `checkSum` push, the original's
//!   nested `model_info.json`;
//! - `limits`: per-client pipes and clients, `max_connections`, pings and the idle timeout,
//!   data-channel backpressure, the upload lock, SIGHUP reloading the TLS certificate;
//! - `memory`: per-channel message caps, the budget of bytes in flight, streamed uploads and
//!   the daemon's RSS under unfinished big messages;
//! - `ipc`: impostor check-ins (another process, a process of the pipe's group, another
//!   pipe's id on a descriptor), check-in on the descriptor, garbage on the IPC socket;
//! - `checkin`: the check-in timer at its default, both ways;
//! - `dialects`: a kmb and a dlafs pipe stand-in end to end, the other dialect's check-in,
//!   `{create.…}` placeholders;
//! - `shutdown`: shutdown with pipes that ignore SIGTERM;
//! - `daemon`: the `secure-talk` binary;
//! - `pipe_program`: the `secure-talk-pipe` binary against a fake daemon;
//! - `python`: the independent Python client;
//! - `timers`: every timer at its default value, both ways;
//! - `usage`: bad flags exit 64 in every binary.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failures, like the tests"
)]

mod checkin;
mod cli;
mod daemon;
mod dialects;
mod echo;
mod inflight;
mod ipc;
mod limits;
mod memory;
mod metrics;
mod pipe_program;
mod pipes;
mod python;
mod shutdown;
mod support;
mod timers;
mod tls;
mod tokens;
mod unix;
mod uploads;
mod usage;
