//! The command-line rule of every binary (`docs/ARCHITECTURE.md`, "Exit codes"): a bad flag
//! exits 64 with clap's message on stderr, `--help` exits 0 on stdout.

#[test]
fn bad_flags_exit_64_and_help_exits_0() {
    testkit::usage::assert_flag_rules(&[
        env!("CARGO_BIN_EXE_remo-serv"),
        env!("CARGO_BIN_EXE_remo"),
        env!("CARGO_BIN_EXE_remo-admin"),
        env!("CARGO_BIN_EXE_remo-bench"),
    ]);
}

/// `remo-admin users` writes its list with `writeln!`: the EPIPE of a closed stdout comes back
/// as an error, which ends the tool with 141 and no message.
#[test]
fn a_closed_stdout_ends_remo_admin_quietly() {
    const ADMIN: &str = env!("CARGO_BIN_EXE_remo-admin");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("users");
    let base = base.to_str().unwrap();
    for user in ["alice", "bob", "carol"] {
        let made = std::process::Command::new(ADMIN)
            .args(["keygen", user, "--no-passphrase"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let added = std::process::Command::new(ADMIN)
            .args(["useradd", "-b", base, user])
            .arg(dir.path().join(format!("{user}.pem")))
            .output()
            .unwrap();
        assert!(added.status.success(), "{added:?}");
    }
    testkit::usage::assert_quiet_on_closed_stdout(
        std::process::Command::new(ADMIN).args(["users", "-b", base]),
    );
}
