//! Files that hold secrets: what their permission bits may be (SECURITY.md: owner-only).
//! Below `daemon` and `tls`, which both check keys they read.

use std::path::Path;

/// Whether the permission bits `mode` of the secret file at `path` are private: no bit for
/// group or others, except that inside `credentials` (systemd's `$CREDENTIALS_DIRECTORY`)
/// group read is allowed, because systemd grants the service user access there with an ACL
/// and `stat` reports the ACL mask in the group bits.
pub fn secret_mode_ok(path: &Path, mode: u32, credentials: Option<&Path>) -> bool {
    let forbidden = if credentials.is_some_and(|dir| path.starts_with(dir)) {
        0o037
    } else {
        0o077
    };
    mode & forbidden == 0
}
