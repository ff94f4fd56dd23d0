//! The command-line rule of every binary (`docs/ARCHITECTURE.md`, "Exit codes"): a bad flag
//! exits 64 with clap's message on stderr, `--help` exits 0 on stdout.

#[test]
fn bad_flags_exit_64_and_help_exits_0() {
    testkit::usage::assert_flag_rules(&[
        env!("CARGO_BIN_EXE_ws-proxy"),
        env!("CARGO_BIN_EXE_ws-proxy-client"),
        env!("CARGO_BIN_EXE_ws-proxy-bench"),
    ]);
}
