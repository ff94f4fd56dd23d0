//! signing-client: the signing-server client (`signing_server::cli::client`).

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use signing_server::cli::client::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("signing-client", Flavor::Workers(2), || client::run(args))
}
