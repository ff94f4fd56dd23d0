//! `signing-client`: sends a server-side path over the original protocol and prints what the
//! original client printed; uploads local files, lists keys and fetches public keys over the
//! JSON API; verifies Ed448 signatures locally.
//!
//! [`args`] is the command line, [`conn`] where to connect and the exit statuses, [`original`]
//! the original protocol's answer (no I/O), [`http`] the API connection, [`commands`] what
//! each command does. The binary parses [`Args`] and hands them to [`run`].

mod args;
mod commands;
mod conn;
mod http;
mod original;

pub use args::Args;
use args::Command;
pub use conn::Failure;

/// Runs the command `args` names; the exit status on success (1: a bad signature or a file
/// the server would not sign).
///
/// # Errors
/// The [`Failure`] that stopped the client, with its exit status.
pub async fn run(args: Args) -> Result<u8, Failure> {
    match &args.command {
        Some(Command::Verify(verify)) => commands::run_verify(&args.conn, verify).await,
        Some(Command::Keys) => commands::run_keys(&args.conn).await,
        None if !args.sign.upload.is_empty() => commands::run_upload(&args.conn, &args.sign).await,
        None => commands::run_original(&args.conn, args.sign.path.as_deref()).await,
    }
}
