//! broker-cli's exit codes and how the library's errors map to them.

use common::daemon::exit;

use crate::cli::failure::Failure;
use crate::client::ClientError;
use crate::tunnel::TunnelError;

/// Exit status: verify said the secret does not match.
pub(crate) const MISMATCH: u8 = 1;
/// Exit status: the job does not exist or is not yours (HTTP 404).
pub(crate) const NOT_FOUND: u8 = exit::DATAERR;
/// Exit status: the broker's answer made no sense.
pub(crate) const PROTOCOL: u8 = 76;

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        let code = match &err {
            ClientError::BadJobId(_) => exit::USAGE,
            ClientError::Protocol(_) => PROTOCOL,
            ClientError::Status { status, .. } => match status {
                400 => exit::USAGE,
                403 => exit::NOPERM,
                404 => NOT_FOUND,
                _ => exit::UNAVAILABLE,
            },
            ClientError::Connect { .. }
            | ClientError::Tls(_)
            | ClientError::Http(_)
            | ClientError::Timeout(_) => exit::UNAVAILABLE,
        };
        let message = if err.is_not_found() {
            String::from("no such job (or not yours)")
        } else {
            err.to_string()
        };
        Self::new(code, message)
    }
}

impl From<TunnelError> for Failure {
    fn from(err: TunnelError) -> Self {
        let code = match &err {
            TunnelError::Invalid(_) => exit::USAGE,
            TunnelError::Tls(_) => PROTOCOL,
            TunnelError::Bind { .. } => exit::IOERR,
            TunnelError::Spawn { .. } | TunnelError::Ssh { .. } => exit::UNAVAILABLE,
        };
        Self::new(code, err.to_string())
    }
}
