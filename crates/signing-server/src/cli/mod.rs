//! The command-line tools' logic, one module per binary: [`client`] is `signing-client`,
//! [`bench`] is `signing-bench`. Each binary parses its module's `Args`, calls its `run` and
//! exits through `common::cli::run`.

pub mod bench;
pub mod client;
pub mod daemon;
