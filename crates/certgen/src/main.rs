//! `certgen`: the PKI command line tool.
//!
//! Makes root and intermediate CAs, leaf certificates and CRLs, inspects certificate files
//! and writes a complete development PKI. It replaces the Micronets `gen-*-cert` scripts
//! and accepts their options. All X.509 work happens in [`common::pki`]; this crate only
//! parses arguments, decides file names, refuses to overwrite and prints.

#![expect(
    clippy::print_stdout,
    reason = "certgen is a command line tool; stdout is its interface"
)]

mod crl;
mod dev_pki;
mod files;
mod inspect;
mod issue;
mod report;

use std::process::ExitCode;

use certgen::cli;

use clap::Parser as _;
use common::cli::Failure;

use crate::cli::{Cli, Command};

/// An input file is missing or unreadable (EX_NOINPUT).
const EXIT_NO_INPUT: u8 = 66;
/// An output file exists or cannot be created (EX_CANTCREAT).
const EXIT_CANT_CREATE: u8 = 73;

fn main() -> ExitCode {
    let cli = common::cli::parse(Cli::try_parse);
    let result = run(&cli).map_err(|err| Failure::new(exit_code(&err), err));
    ExitCode::from(common::cli::conclude("certgen", result))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Root(args) => issue::root(args),
        Command::Intermediate(args) => issue::intermediate(args),
        Command::Leaf(args) => issue::leaf(args),
        Command::Crl(args) => crl::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::DevPki(args) => dev_pki::run(args),
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<files::Refused>() {
            return EXIT_CANT_CREATE;
        }
        if cause.is::<files::InputError>()
            || matches!(
                cause.downcast_ref(),
                Some(common::pki::PkiError::Read { .. })
            )
        {
            return EXIT_NO_INPUT;
        }
    }
    1
}
