//! secure-talk-cli: the secure-talk client, for people (an interactive shell) and for scripts
//! (one command per run, `--json` lines, documented exit codes). The commands live in
//! `secure_talk::cli::talk`.

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use secure_talk::cli::talk::{self, Args};

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("secure-talk-cli", Flavor::Workers(2), || talk::run(args))
}
