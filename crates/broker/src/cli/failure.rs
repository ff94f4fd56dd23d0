//! Why a command-line tool stops: a message and the exit code it means, printed once by
//! `common::cli` as `tool: message`.

use std::fmt;

use common::daemon::exit;

/// A tool's failure: its message and its exit status.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// `message`, exiting with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A bad command line or option value (64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::USAGE, message)
    }

    /// Somebody else (the broker, ssh, the tunnel's target) cannot do it now (69).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(exit::UNAVAILABLE, message)
    }

    /// The exit status.
    #[must_use]
    pub fn code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl common::cli::Report for Failure {
    fn exit_code(&self) -> u8 {
        self.code
    }
}
