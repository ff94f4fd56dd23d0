//! Load generator for `scripts/bench signing-server` (`signing_server::cli::bench`).

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use signing_server::cli::bench::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("signing-bench", Flavor::MultiThread, || bench::run(args))
}
