//! The command-line rules (`docs/ARCHITECTURE.md`, "Exit codes"): a bad flag exits 64 with
//! clap's message, and `certgen inspect ... | head -1` ends quietly (141) instead of
//! panicking on the broken pipe.

use std::process::Command;

use crate::certgen_ok;

const CERTGEN: &str = env!("CARGO_BIN_EXE_certgen");

#[test]
fn bad_flags_exit_64_and_help_exits_0() {
    testkit::usage::assert_flag_rules(&[CERTGEN]);
}

#[test]
fn a_closed_stdout_ends_inspect_quietly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    certgen_ok(tmp.path(), &["root", "--cert-basename", "root_ca"]);
    for args in [
        &["inspect", "root_ca.cert.pem"][..],
        &["inspect", "root_ca.cert.pem", "--json"],
    ] {
        testkit::usage::assert_quiet_on_closed_stdout(
            Command::new(CERTGEN).args(args).current_dir(tmp.path()),
        );
    }
}
