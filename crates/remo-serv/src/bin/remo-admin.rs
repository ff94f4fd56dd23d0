//! remo-admin: key pairs and the user database (`remo_serv::cli::admin`).

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use remo_serv::cli::admin::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("remo-admin", Flavor::CurrentThread, || admin::run(args))
}
