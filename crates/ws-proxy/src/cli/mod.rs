//! The command-line tools other than the daemon, as library code their binaries call (and
//! tests can reach): each `src/bin/` file parses its arguments and runs one function here
//! through `common::cli::run`.
//!
//! - [`client`]: `ws-proxy-client`, a peer in the `connect` or `gateway` role.
//! - [`bench`]: `ws-proxy-bench`, the load generator `scripts/bench` runs.

pub mod bench;
pub mod client;
pub mod daemon;
