//! The command-line tools other than the daemon, as library code the binaries in `src/bin`
//! call (each `main` parses its arguments and hands them to one `run` here through
//! `common::cli`):
//!
//! - [`talk`]: `secure-talk-cli`, the client for people (a shell) and scripts;
//! - [`pipe`]: `secure-talk-pipe`, the worker process the daemon spawns per pipe;
//! - [`bench`]: `secure-talk-bench`, the load generator of `scripts/bench`.
//!
//! They reach the server through [`crate::client`] (or, for the pipe, the IPC framing of
//! `common::envelope::ipc`) and know nothing of its state.

pub mod bench;
pub mod daemon;
pub mod pipe;
pub mod talk;
