//! Exit codes from sysexits.h, so scripts and systemd can tell failures apart.
//!
//! Shared by [`crate::cli`] (tools) and [`crate::daemon`] (daemons, which re-export it as
//! `daemon::exit`).

/// Bad command line or configuration value.
pub const USAGE: u8 = 64;
/// Input data was malformed.
pub const DATAERR: u8 = 65;
/// An input file did not exist or was unreadable.
pub const NOINPUT: u8 = 66;
/// A service (server, peer) was unavailable.
pub const UNAVAILABLE: u8 = 69;
/// An internal error.
pub const SOFTWARE: u8 = 70;
/// An output file could not be created (or exists and overwriting was not allowed).
pub const CANTCREAT: u8 = 73;
/// An I/O error.
pub const IOERR: u8 = 74;
/// Permission denied by the server.
pub const NOPERM: u8 = 77;
/// The configuration file is invalid.
pub const CONFIG: u8 = 78;
/// Not sysexits: stdout was closed by its reader (EPIPE), the tool stopped quietly. 128 + 13,
/// what a shell reports for a process killed by SIGPIPE, so `set -o pipefail` scripts see the
/// same code as for any other program.
pub const PIPE: u8 = 141;
