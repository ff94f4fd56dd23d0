//! secure-talk-pipe: the worker ("pipe") process the secure-talk daemon spawns, one per pipe.
//! What it does is `secure_talk::cli::pipe`; this file takes the inherited IPC descriptor,
//! sets up tracing and runs the pipe in its span.

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::{Failure, Flavor};
use secure_talk::cli::pipe::{self, Args};
use tracing::Instrument as _;

const NAME: &str = "secure-talk-pipe";

fn main() -> ExitCode {
    let args = common::cli::parse(Args::try_parse);
    // First, before this process opens any descriptor of its own: the number is then still
    // the inherited one (see `take_inherited_socket`).
    let inherited = args.ipc_fd.map(|fd| (fd, pipe::take_inherited_socket(fd)));
    if let Err(err) = common::daemon::init_tracing(&args.log, "info") {
        let failure = Failure::new(pipe::EXIT_USAGE, err);
        return ExitCode::from(common::cli::conclude::<(), _>(NAME, Err(failure)));
    }
    let span = tracing::info_span!("pipe", id = args.id);
    common::cli::run(NAME, Flavor::CurrentThread, || async move {
        Ok::<_, anyhow::Error>(pipe::run(args, inherited).instrument(span).await)
    })
}
