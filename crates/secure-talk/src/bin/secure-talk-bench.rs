//! secure-talk-bench: the load generator for `scripts/bench secure-talk` (in
//! `secure_talk::cli::bench`).

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use secure_talk::cli::bench::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("secure-talk-bench", Flavor::MultiThread, || {
        bench::run(args)
    })
}
