//! The command-line tools' logic, one module per binary: [`remo`] is the client, [`admin`]
//! is `remo-admin`, [`bench`] is `remo-bench`. Each binary parses its module's `Args`, calls
//! its `run` and exits through `common::cli::run`.

pub mod admin;
pub mod bench;
pub mod daemon;
pub mod remo;
