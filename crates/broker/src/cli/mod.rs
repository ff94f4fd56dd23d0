//! The command-line tools' logic, where tests reach it; their `main`s in `src/bin/` parse the
//! arguments and hand them to one function here through `common::cli::run`.
//!
//! [`broker_cli`] is the user's client (`broker-cli`), [`broker_run`] the launcher and gate
//! (`broker-run`, with its exec shim), [`bench`] the load generator (`broker-bench`).
//! [`failure`] is the failure type the two user tools exit with: a message and its code.
//!
//! The tools log under the targets `broker_run` and `broker_cli`, the names they had as
//! binaries, so a filter such as `RUST_LOG=info,broker_run=debug` keeps working.

pub mod bench;
pub mod broker_cli;
pub mod broker_run;
pub mod daemon;
pub mod failure;
