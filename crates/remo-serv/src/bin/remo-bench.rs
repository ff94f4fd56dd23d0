//! remo-bench: latency and throughput of a remo-serv server (`remo_serv::cli::bench`).

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use remo_serv::cli::bench::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("remo-bench", Flavor::CurrentThread, || bench::run(args))
}
