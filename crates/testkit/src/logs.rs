//! Log injection checks: a client-controlled value that would forge a log line, and a capture
//! of a daemon's stderr to look for the forgery in.
//!
//! A test puts [`INJECTION`] (or [`injection`] around a prefix) into a field the daemon logs,
//! then calls [`LogCapture::assert_not_forged`]: no line may start with [`FORGED`], no raw ESC
//! or CR may reach the log, and the escaped value must be there (so the test proves the field
//! was logged at all).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// The line an attacker wants a log reader to believe the daemon wrote.
pub const FORGED: &str = "2026-01-01T00:00:00Z  INFO signed identity=\"bob\"";

/// A value that forges [`FORGED`] on a line of its own if logged unescaped, and carries an
/// ANSI escape sequence (clear screen, red) and a carriage return.
pub const INJECTION: &str =
    "\n2026-01-01T00:00:00Z  INFO signed identity=\"bob\" \x1b[2J\x1b[31m\rhidden";

/// `prefix` followed by [`INJECTION`].
pub fn injection(prefix: &str) -> String {
    format!("{prefix}{INJECTION}")
}

/// What an escaped [`INJECTION`] looks like in a line: the newline written as `\n`.
pub const ESCAPED: &str = "\\n2026-01-01T00:00:00Z";

/// A child's stderr (its log), collected as raw bytes and echoed to the test's stderr.
#[derive(Debug, Clone)]
pub struct LogCapture {
    name: &'static str,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl LogCapture {
    /// Starts collecting everything `stderr` writes until it closes.
    pub fn start<R>(name: &'static str, mut stderr: R) -> Self
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let capture = Self {
            name,
            bytes: Arc::default(),
        };
        let bytes = capture.bytes.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                eprint!("{name}: {}", String::from_utf8_lossy(&buf[..n]));
                bytes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]);
            }
        });
        capture
    }

    /// Everything logged so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until the log contains `text` (panics after `deadline`).
    pub async fn wait_for(&self, text: &str, deadline: Duration) {
        let waited = tokio::time::timeout(deadline, async {
            loop {
                if String::from_utf8_lossy(&self.bytes()).contains(text) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{}: no {text:?} in the log within {deadline:?}:\n{}",
            self.name,
            String::from_utf8_lossy(&self.bytes())
        );
    }

    /// Waits until [`ESCAPED`] has been logged `times` times, then checks that nothing was
    /// forged (see [`assert_not_forged`]).
    pub async fn assert_not_forged(&self, times: usize, deadline: Duration) {
        let waited = tokio::time::timeout(deadline, async {
            loop {
                let log = String::from_utf8_lossy(&self.bytes()).into_owned();
                if log.matches(ESCAPED).count() >= times || log.contains(&format!("\n{FORGED}")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let log = self.bytes();
        assert_not_forged(&log);
        assert!(
            waited.is_ok(),
            "{}: the injected value was not logged {times} time(s) within {deadline:?}:\n{}",
            self.name,
            String::from_utf8_lossy(&log)
        );
    }
}

/// Panics if a line of `log` starts with [`FORGED`] or `log` holds a raw ESC or CR.
pub fn assert_not_forged(log: &[u8]) {
    let text = String::from_utf8_lossy(log);
    for line in text.split('\n') {
        assert!(
            !line.starts_with(FORGED),
            "a client forged a log line: {line:?}\nin:\n{text}"
        );
    }
    assert!(!log.contains(&0x1b), "a raw ESC reached the log:\n{text:?}");
    assert!(!log.contains(&b'\r'), "a raw CR reached the log:\n{text:?}");
}

/// A client certificate by the test root whose CN is `cn` (for instance one holding
/// [`INJECTION`]), O [`TEST_ORG`](crate::pki::TEST_ORG), written into the test PKI's directory
/// as `file_stem.*.pem`.
///
/// # Panics
/// If issuing or writing fails.
pub fn client_with_cn(pki: &crate::TestPki, file_stem: &str, cn: &str) -> crate::Leaf {
    use common::pki::{LeafParams, Name, Usage};
    use std::os::unix::fs::PermissionsExt as _;
    let issued = pki
        .ca
        .issue_leaf(&LeafParams::new(
            Name::new(cn).with_organization(crate::pki::TEST_ORG),
            Usage::Client,
        ))
        .unwrap_or_else(|e| panic!("issuing a client certificate: {e:#}"));
    let write = |suffix: &str, contents: &str, private: bool| {
        let path = pki.dir.join(format!("{file_stem}.{suffix}.pem"));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        if private {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
        }
        path
    };
    crate::Leaf {
        cert_path: write("cert", &issued.chain_pem, false),
        key_path: write("key", &issued.key_pem, true),
        pkeycert_path: write(
            "pkeycert",
            &format!("{}{}", issued.chain_pem, issued.key_pem),
            true,
        ),
        cert_pem: issued.chain_pem,
        key_pem: issued.key_pem,
        serial_hex: issued.serial_hex,
    }
}
