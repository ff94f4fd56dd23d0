//! `ws-proxy-bench`: a native load generator for ws-proxy (used by `scripts/bench`); the
//! benchmarks are in [`ws_proxy::cli::bench`].

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use ws_proxy::cli::bench::Cli;

fn main() -> ExitCode {
    let cli = common::cli::parse(Cli::try_parse);
    // 0 threads: a current-thread runtime, the leanest for a single core.
    let flavor = Flavor::from_threads(cli.threads());
    common::cli::run("ws-proxy-bench", flavor, || {
        ws_proxy::cli::bench::run(cli.command)
    })
}
