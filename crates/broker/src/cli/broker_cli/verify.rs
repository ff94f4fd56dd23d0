//! `verify`: the secret read from stdin or `--secret-file`, never from the command line.

use std::io::{IsTerminal as _, Read as _};

use common::daemon::exit;

use super::args::{Conn, Verify};
use super::ask::client;
use super::failure::MISMATCH;
use super::show::print_json;
use crate::api::VerifyResponse;
use crate::cli::failure::Failure;

/// Largest secret read from stdin or --secret-file.
const MAX_SECRET: u64 = 64 * 1024;

/// The secret from --secret-file or stdin, without one trailing newline.
fn read_secret(verify: &Verify) -> Result<String, Failure> {
    let mut raw = Vec::new();
    let read = match &verify.secret_file {
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SECRET + 1).read_to_end(&mut raw))
            .map_err(|e| Failure::new(exit::NOINPUT, format!("{}: {e}", path.display()))),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("broker-cli: reading the secret from stdin (end with Ctrl-D)");
            }
            stdin
                .lock()
                .take(MAX_SECRET + 1)
                .read_to_end(&mut raw)
                .map_err(|e| Failure::new(exit::NOINPUT, format!("stdin: {e}")))
        }
    };
    read?;
    if raw.len() as u64 > MAX_SECRET {
        return Err(Failure::usage(format!(
            "the secret is longer than {MAX_SECRET} bytes"
        )));
    }
    let mut secret = String::from_utf8(raw)
        .map_err(|_| Failure::usage("the secret is not text (hex, as load prints it)"))?;
    if secret.ends_with('\n') {
        secret.pop();
        if secret.ends_with('\r') {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(Failure::usage(
            "no secret: pipe it into stdin or give --secret-file",
        ));
    }
    Ok(secret)
}

#[allow(clippy::print_stdout)] // a CLI: results go to stdout
pub(crate) async fn run_verify(conn: &Conn, verify: &Verify) -> Result<u8, Failure> {
    if verify.secret_arg.is_some() {
        return Err(Failure::usage(
            "the secret is not taken from the command line (ps and the shell history would show it): pipe it into stdin or use --secret-file",
        ));
    }
    let secret = read_secret(verify)?;
    let valid = client(conn)?.verify(&verify.job, &secret).await?;
    if conn.json {
        print_json(&VerifyResponse { valid })?;
    } else {
        println!("{}", if valid { "valid" } else { "invalid" });
    }
    Ok(if valid { 0 } else { MISMATCH })
}
