//! broker-cli: the user's client of the broker ([`broker::cli::broker_cli`]): jobs over the
//! daemon's socket or HTTPS API, `--host` over ssh, and the tunnel (`connect`).

use std::process::ExitCode;

use broker::cli::broker_cli::{Args, rewrite_aliases, run};
use clap::Parser;
use common::cli::Flavor;

fn main() -> ExitCode {
    // The original's -q, -l JOB, -s TYPE, -v JOB become subcommands first.
    let args =
        common::cli::parse(|| Args::try_parse_from(rewrite_aliases(std::env::args_os().collect())));
    common::cli::run("broker-cli", Flavor::MultiThread, || run(args))
}
