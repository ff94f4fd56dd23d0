//! The command-line rules every binary keeps (`docs/ARCHITECTURE.md`, "Exit codes"), checked
//! on the real binaries: a bad flag exits 64 with clap's own message on stderr, `--help` exits
//! 0 on stdout, and a closed stdout ends a tool quietly with 141.

use std::process::{Command, Output, Stdio};

use common::exit;

/// Runs each binary with an unknown flag, with `--help` and with `--version`, and asserts the
/// rule: 64 and clap's message (on stderr only) for the first, 0 and the help (on stdout only)
/// for the second, 0 for the third, and 141 with nothing on stderr for both of the last two
/// when stdout's reader is gone.
pub fn assert_flag_rules(binaries: &[&str]) {
    for bin in binaries {
        let bad = run(Command::new(bin).arg("--no-such-flag"));
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(
            bad.status.code(),
            Some(i32::from(exit::USAGE)),
            "{bin} --no-such-flag: {stderr}"
        );
        assert!(
            stderr.contains("unexpected argument '--no-such-flag'") && stderr.contains("Usage:"),
            "{bin}: not clap's message: {stderr}"
        );
        assert!(
            bad.stdout.is_empty(),
            "{bin}: a usage error wrote to stdout"
        );

        let help = run(Command::new(bin).arg("--help"));
        assert_eq!(help.status.code(), Some(0), "{bin} --help: {help:?}");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Usage:"),
            "{bin} --help: {help:?}"
        );
        assert!(help.stderr.is_empty(), "{bin} --help wrote to stderr");

        let version = run(Command::new(bin).arg("--version"));
        assert_eq!(
            version.status.code(),
            Some(0),
            "{bin} --version: {version:?}"
        );
        // Help and version to a reader that has gone: 141, like any other output.
        for flag in ["--help", "--version"] {
            assert_quiet_on_closed_stdout(Command::new(bin).arg(flag));
        }
    }
}

/// A stdout whose reader is already gone: the read end of a new pipe, closed before the child
/// starts, so the child's first write fails with EPIPE as after `| head -1`, without a race.
///
/// # Panics
/// The pipe cannot be made.
#[must_use]
pub fn closed_stdout() -> Stdio {
    let (read, write) = rustix::pipe::pipe().expect("pipe");
    drop(read);
    Stdio::from(write)
}

/// Runs `command` with a closed stdout ([`closed_stdout`]) and asserts that it ended quietly:
/// exit 141, nothing on stderr (no panic, no `name: Broken pipe`).
pub fn assert_quiet_on_closed_stdout(command: &mut Command) {
    let out = run(command.stdout(closed_stdout()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit::PIPE)),
        "{command:?}: {stderr}"
    );
    assert!(stderr.is_empty(), "{command:?} wrote to stderr: {stderr}");
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("running {command:?}: {err}"))
}
