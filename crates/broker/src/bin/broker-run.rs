//! broker-run: registers a job with the local broker and runs an application on its port,
//! optionally behind the gate ([`broker::cli::broker_run`]).

use std::ffi::OsStr;
use std::process::ExitCode;

use broker::cli::broker_run::{Args, EXEC_SHIM, exec_shim, run};
use clap::Parser;
use common::cli::Flavor;
use common::daemon::exit;

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    // The exec shim runs before anything else: no flags, no runtime, no tracing.
    if argv.nth(1).as_deref() == Some(OsStr::new(EXEC_SHIM)) {
        return ExitCode::from(exec_shim(argv));
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            // Bad flags exit 64, not clap's 2; --help and --version exit 0.
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    common::cli::run("broker-run", Flavor::MultiThread, || run(args))
}
