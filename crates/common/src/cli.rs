//! The one start-up path of every command-line tool and benchmark: build the tokio runtime, run
//! the tool's `run` function on it, print its failure as `name: error` and turn the outcome into
//! the process's exit code.
//!
//! The exit-code rule lives here and nowhere else (`docs/ARCHITECTURE.md`, "Exit codes"):
//! - the command line is parsed by [`parse`], the first call of every binary's `main`
//!   (daemons too): `--help` and `--version` print on stdout and exit 0; a usage error prints
//!   clap's own message on stderr and exits 64 (`EX_USAGE`), not clap's 2;
//! - success is the code the tool's outcome names ([`Outcome`]: `()` is 0, a `u8` is itself, so
//!   `verify` can answer 1 for "not valid" without it being an error);
//! - a failure is printed once on stderr, as `name: error` with its causes (`{:#}`), and exits
//!   with its [`Report::exit_code`]: a sysexits code from [`crate::exit`], or 1 for a
//!   plain [`anyhow::Error`] (benchmarks, helpers with nothing more precise to say);
//! - a runtime that cannot be built exits 70 (`EX_SOFTWARE`);
//! - a closed stdout (the reader of a pipe went away, as `head` does) ends the tool quietly
//!   with 141 ([`exit::PIPE`], what a shell reports for a process killed by SIGPIPE): a
//!   `println!` that fails with EPIPE, or any failure while stdout is closed, prints nothing.
//!   SIGPIPE itself stays ignored (Rust's default), so a write to a socket whose peer left is
//!   an error the tool reports, never a silent death.
//!
//! Daemons go through [`crate::daemon::run_daemon`], which shares [`Flavor`] and the runtime
//! builder with this module.

use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::process::ExitCode;
use std::sync::Once;

use clap::error::ErrorKind;

use crate::exit;

/// Parses the command line: the first call of every binary's `main`, as
/// `let args = common::cli::parse(Args::try_parse);` (or a closure around
/// `Args::try_parse_from`).
///
/// `--help` and `--version` print on stdout and exit 0; any other error prints clap's message
/// on stderr and exits 64 ([`exit::USAGE`]). It first installs the closed-stdout rule of this
/// module (a `println!` that fails with EPIPE exits 141 quietly instead of panicking), so every
/// binary has it from its first line.
pub fn parse<T>(parse: impl FnOnce() -> Result<T, clap::Error>) -> T {
    exit_quietly_on_closed_stdout();
    match parse() {
        Ok(args) => args,
        Err(err) => {
            let code = usage(&err);
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(code));
        }
    }
}

/// Prints a clap error where clap would (help and version on stdout, the rest on stderr) and
/// returns its exit code: 0 for `--help` and `--version` ([`exit::PIPE`] when stdout's reader
/// was gone before they were written), 64 ([`exit::USAGE`]) for the rest.
pub fn usage(err: &clap::Error) -> u8 {
    let printed = err.print();
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion if printed.is_err() => exit::PIPE,
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        _ => exit::USAGE,
    }
}

/// Whether stdout is a pipe or socket whose reader has gone (poll reports an error or a hang
/// up on it): what a `head` at the other end leaves behind.
#[must_use]
pub fn stdout_closed() -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdout = std::io::stdout();
    let fd = stdout.as_fd();
    let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(1))
        && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
}

/// Makes the panic of a `println!` on a closed stdout (std's "failed printing to stdout")
/// exit with [`exit::PIPE`] and no message, in whichever thread it happens; every other
/// panic goes to the previous hook. Installed once by [`parse`].
fn exit_quietly_on_closed_stdout() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied());
            if message.is_some_and(|m| m.starts_with("failed printing to stdout"))
                && stdout_closed()
            {
                std::process::exit(i32::from(exit::PIPE));
            }
            previous(info);
        }));
    });
}

/// Which tokio runtime a tool runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// One thread: the leanest, for tools that wait on one peer at a time.
    CurrentThread,
    /// A work-stealing pool of one worker thread per core.
    #[default]
    MultiThread,
    /// A work-stealing pool with this many worker threads (at least one).
    Workers(usize),
}

impl Flavor {
    /// `0` means a current-thread runtime, any other number that many workers (the convention
    /// of the benchmarks' `--threads`).
    #[must_use]
    pub fn from_threads(threads: usize) -> Self {
        if threads == 0 {
            Self::CurrentThread
        } else {
            Self::Workers(threads)
        }
    }

    /// Builds the runtime, with every driver (I/O, time) enabled.
    ///
    /// # Errors
    /// The operating system refused a thread or an epoll instance.
    pub fn build(self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self {
            Self::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Self::MultiThread => tokio::runtime::Builder::new_multi_thread(),
            Self::Workers(workers) => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(workers.max(1));
                builder
            }
        };
        builder.enable_all().build()
    }
}

/// What a tool's `run` returns on success: the exit code it wants.
pub trait Outcome {
    /// The exit code.
    fn exit_code(self) -> u8;
}

impl Outcome for () {
    fn exit_code(self) -> u8 {
        0
    }
}

impl Outcome for u8 {
    fn exit_code(self) -> u8 {
        self
    }
}

impl Outcome for ExitCode {
    fn exit_code(self) -> u8 {
        if self == ExitCode::SUCCESS { 0 } else { 1 }
    }
}

/// A tool's failure: how it is printed and which exit code it means.
pub trait Report: fmt::Display {
    /// The exit code, preferably from [`crate::exit`].
    fn exit_code(&self) -> u8;

    /// Whether the message is printed after `name: ` (the default). A tool that relays a
    /// server's own text verbatim answers false.
    fn prefixed(&self) -> bool {
        true
    }
}

impl Report for anyhow::Error {
    fn exit_code(&self) -> u8 {
        // A tool that wants a precise code wraps it in `Failure`; anyhow's own chain may hold
        // one further down.
        self.downcast_ref::<Failure>()
            .map_or(1, |failure| failure.code)
    }
}

/// An error with the exit code it means, for tools whose errors are [`anyhow::Error`]s.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// `error` exits with `code`.
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }

    /// A bad command line or option value (64).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self::new(exit::USAGE, error)
    }

    /// The exit code.
    #[must_use]
    pub fn code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{:#}", self.error)
        } else {
            write!(f, "{}", self.error)
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl Report for Failure {
    fn exit_code(&self) -> u8 {
        self.code
    }
}

/// Runs a command-line tool: `main` on a runtime of `flavor`, its failure printed and mapped to
/// the exit code by the rule in this module's documentation.
///
/// The runtime is dropped without waiting for blocking tasks (an interactive line reader may
/// still block on stdin).
pub fn run<F, Fut, T, E>(name: &str, flavor: Flavor, main: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    T: Outcome,
    E: Report,
{
    let runtime = match flavor.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name}: starting the runtime: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let result = runtime.block_on(main());
    runtime.shutdown_background();
    ExitCode::from(conclude(name, result))
}

/// The exit code of a finished tool, its failure printed on stderr; a failure while stdout is
/// closed ([`stdout_closed`]) prints nothing and exits 141 ([`exit::PIPE`]).
pub fn conclude<T: Outcome, E: Report>(name: &str, result: Result<T, E>) -> u8 {
    match result {
        Ok(outcome) => outcome.exit_code(),
        // The reader went away: nothing more was asked for, as with a process that SIGPIPE
        // killed. The tool's write error (or whatever failed after) is not news to anyone.
        Err(_) if stdout_closed() => exit::PIPE,
        Err(failure) => {
            if failure.prefixed() {
                eprintln!("{name}: {failure:#}");
            } else {
                eprintln!("{failure:#}");
            }
            failure.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_failures_map_to_their_codes() {
        assert_eq!(conclude::<(), anyhow::Error>("t", Ok(())), 0);
        assert_eq!(conclude::<u8, anyhow::Error>("t", Ok(1)), 1);
        assert_eq!(
            conclude::<(), anyhow::Error>("t", Err(anyhow::anyhow!("plain"))),
            1
        );
        assert_eq!(
            conclude::<(), Failure>("t", Err(Failure::usage(anyhow::anyhow!("bad flag")))),
            exit::USAGE
        );
        let wrapped: anyhow::Error = Failure::new(exit::NOINPUT, anyhow::anyhow!("gone")).into();
        assert_eq!(
            conclude::<(), anyhow::Error>("t", Err(wrapped)),
            exit::NOINPUT
        );
    }

    #[test]
    fn flavors_build_runtimes_that_run() {
        for flavor in [
            Flavor::CurrentThread,
            Flavor::MultiThread,
            Flavor::Workers(1),
            Flavor::from_threads(0),
        ] {
            let code = run("t", flavor, || async { Ok::<u8, anyhow::Error>(7) });
            assert_eq!(code, ExitCode::from(7));
        }
    }
}
