//! Load generator for `scripts/bench broker` ([`broker::cli::bench`]).

use std::process::ExitCode;

use broker::cli::bench::{Args, run};
use clap::Parser;
use common::cli::Flavor;

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("broker-bench", Flavor::Workers(2), || run(args))
}
