//! broker-run: registers a job with the local broker and runs an application on its port,
//! optionally behind the gate ([`broker::cli::broker_run`]).

use std::ffi::OsStr;
use std::process::ExitCode;

use broker::cli::broker_run::{Args, EXEC_SHIM, exec_shim, run};
use clap::Parser;
use common::cli::Flavor;

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    // The exec shim runs before anything else: no flags, no runtime, no tracing.
    if argv.nth(1).as_deref() == Some(OsStr::new(EXEC_SHIM)) {
        return ExitCode::from(exec_shim(argv));
    }
    let args = common::cli::parse(Args::try_parse);
    common::cli::run("broker-run", Flavor::MultiThread, || run(args))
}
