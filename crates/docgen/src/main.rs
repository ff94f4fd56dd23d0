//! `docgen OUT_DIR`: writes every packaged binary's man page and completions under OUT_DIR
//! (see the library); `scripts/package` runs it before cargo-deb.

#![expect(
    clippy::print_stdout,
    reason = "docgen is a command line tool; its one line of output is its interface"
)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes the man page and the bash, zsh and fish completions of every packaged binary.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory to write man/ and completions/ into (made when missing).
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    match docgen::generate(&args.out_dir) {
        Ok(count) => {
            println!(
                "{count} binaries: man pages and completions in {}",
                args.out_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("docgen: {err:#}");
            ExitCode::from(common::exit::CANTCREAT)
        }
    }
}
