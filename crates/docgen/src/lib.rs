//! The man pages and shell completions of every packaged binary, rendered from the same clap
//! definitions the binaries parse their arguments with (never written by hand).
//!
//! [`binaries`] lists them; [`generate`] writes, under one directory, `man/NAME.1`,
//! `completions/bash/NAME`, `completions/zsh/_NAME` and `completions/fish/NAME.fish` for each:
//! the paths the `[package.metadata.deb]` assets of each crate name (`scripts/package`).

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

/// Every packaged binary by name, with its command line.
pub fn binaries() -> Vec<(&'static str, clap::Command)> {
    vec![
        ("ws-proxy", ws_proxy::cli::daemon::Args::command()),
        ("remo-serv", remo_serv::cli::daemon::Args::command()),
        ("secure-talk", secure_talk::cli::daemon::Args::command()),
        (
            "signing-server",
            signing_server::cli::daemon::Args::command(),
        ),
        ("broker", broker::cli::daemon::Args::command()),
        ("certgen", certgen::cli::Cli::command()),
        ("ws-proxy-client", ws_proxy::cli::client::Cli::command()),
        ("remo", remo_serv::cli::remo::Args::command()),
        ("remo-admin", remo_serv::cli::admin::Args::command()),
        ("secure-talk-cli", secure_talk::cli::talk::Args::command()),
        ("secure-talk-pipe", secure_talk::cli::pipe::Args::command()),
        (
            "signing-client",
            signing_server::cli::client::Args::command(),
        ),
        ("broker-cli", broker::cli::broker_cli::Args::command()),
        ("broker-run", broker::cli::broker_run::Args::command()),
    ]
}

/// The shells completions are written for, with each one's file name for `name`.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// A completion file's path under `out`, for `shell` (`bash`, `zsh` or `fish`).
pub fn completion_path(out: &Path, shell: &str, name: &str) -> std::path::PathBuf {
    let dir = out.join("completions").join(shell);
    match shell {
        "zsh" => dir.join(format!("_{name}")),
        "fish" => dir.join(format!("{name}.fish")),
        _ => dir.join(name),
    }
}

/// Writes every binary's man page and completions under `out`; returns how many binaries.
pub fn generate(out: &Path) -> anyhow::Result<usize> {
    let man = out.join("man");
    fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    for (_, shell) in SHELLS {
        let dir = out.join("completions").join(shell);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let all = binaries();
    for (name, command) in &all {
        // The derive names a command after its crate; the page and the completions are for
        // the binary.
        let mut command = command.clone().name(*name).bin_name(*name);
        command.build();
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone())
            .render(&mut page)
            .with_context(|| format!("cannot render the man page of {name}"))?;
        let path = man.join(format!("{name}.1"));
        fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        for (shell, shell_name) in SHELLS {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, *name, &mut script);
            let path = completion_path(out, shell_name, name);
            fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(all.len())
}
