//! remo: the remo-serv client (`remo_serv::cli::remo`).

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use remo_serv::cli::remo::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("remo", Flavor::Workers(2), || remo::run(args))
}
