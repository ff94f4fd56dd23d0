//! The application broker-run starts: its private directory and files, its arguments with
//! the placeholders filled in, its environment, the listening socket handed over as fd 3 and
//! the exec shim that sets `LISTEN_PID`.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use command_fds::{CommandFdExt as _, FdMapping};
use common::daemon::exit;

use super::args::{Args, ListenFd};
use crate::api::Job;
use crate::gate::Upstream;

/// The application exists but could not be started (as in shells).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The application was not found (as in shells).
const EXIT_NOT_FOUND: u8 = 127;
/// The hidden first argument of the exec shim: `broker-run __exec-with-listen-pid APP ARGS`
/// sets `LISTEN_PID` to its own pid and execs the application (same pid), which cannot be
/// done between fork and exec without `unsafe`.
pub const EXEC_SHIM: &str = "__exec-with-listen-pid";
/// The descriptor a socket-activated application gets its listening socket on (systemd's
/// `SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;
/// `LISTEN_FDNAMES` for that descriptor.
const LISTEN_FD_NAME: &str = "broker-gate";
/// The application's socket in the private directory.
pub(super) const APP_SOCKET: &str = "app.sock";

/// The exec shim: `LISTEN_PID` is the pid the application will have, which is this one's;
/// fd 3 and the other `LISTEN_*` variables were set up by the parent broker-run. `argv` is
/// what follows [`EXEC_SHIM`]: the application and its arguments. Returns only when the exec
/// failed, with the exit code (64 without an application, 127 not found, 126 otherwise).
pub fn exec_shim(mut argv: impl Iterator<Item = OsString>) -> u8 {
    let Some(program) = argv.next() else {
        eprintln!("broker-run: {EXEC_SHIM} needs an application");
        return exit::USAGE;
    };
    let err = std::process::Command::new(&program)
        .args(argv)
        .env("LISTEN_PID", std::process::id().to_string())
        .exec();
    eprintln!(
        "broker-run: cannot start {}: {err}",
        program.to_string_lossy()
    );
    cannot_start_code(&err)
}

/// The exit code for an application that could not be started: 127 when it was not found,
/// 126 otherwise (as in shells).
pub(super) fn cannot_start_code(err: &std::io::Error) -> u8 {
    if err.kind() == std::io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXECUTE
    }
}

/// Files written for the application.
pub(super) struct Material {
    secret: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

/// `$XDG_RUNTIME_DIR` (per-user tmpfs, 0700) or the temporary directory, then a fresh
/// directory of ours, 0700.
pub(super) fn private_dir() -> std::io::Result<tempfile::TempDir> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute() && dir.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("broker-run-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(base)
}

pub(super) fn write_material(dir: &Path, job: &Job) -> std::io::Result<Material> {
    let mut material = Material {
        secret: None,
        cert: None,
        key: None,
        ca: None,
    };
    if let Some(secret) = &job.secret {
        let path = dir.join("secret");
        common::daemon::write_new_private(&path, secret.as_bytes())?;
        material.secret = Some(path);
    }
    if let Some(tls) = &job.tls {
        for (name, pem, slot) in [
            ("cert.pem", &tls.cert, &mut material.cert),
            ("key.pem", &tls.key, &mut material.key),
            ("ca.pem", &tls.ca, &mut material.ca),
        ] {
            let path = dir.join(name);
            common::daemon::write_new_private(&path, pem.as_bytes())?;
            *slot = Some(path);
        }
    }
    Ok(material)
}

/// Binds the application's listening socket for `--listen-fd`: a Unix socket at `path` (in
/// the private directory) or 127.0.0.1 on a free port. Nobody can take it from now on; the
/// descriptor goes to the application as fd 3, and the gate connects to it.
pub(super) fn pre_bind(family: ListenFd, path: &Path) -> std::io::Result<(OwnedFd, Upstream)> {
    Ok(match family {
        ListenFd::Unix => {
            let listener = std::os::unix::net::UnixListener::bind(path)?;
            (listener.into(), Upstream::Unix(path.to_owned()))
        }
        ListenFd::Tcp => {
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let addr = listener.local_addr()?;
            (listener.into(), Upstream::Tcp(addr))
        }
    })
}

/// Replaces every `{name}` of `vars` in `arg` in one pass (a value is never re-expanded);
/// other braces are left as they are.
fn expand(arg: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let (before, from_brace) = rest.split_at(open);
        out.push_str(before);
        let hit = vars.iter().find_map(|(name, value)| {
            from_brace
                .strip_prefix('{')
                .and_then(|s| s.strip_prefix(name))
                .and_then(|s| s.strip_prefix('}'))
                .map(|after| (value, after))
        });
        match hit {
            Some((value, after)) => {
                out.push_str(value);
                rest = after;
            }
            None => {
                out.push('{');
                rest = from_brace.get(1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

pub(super) fn app_command(
    args: &Args,
    job: &Job,
    material: &Material,
    dir: &Path,
    listen_fd: Option<OwnedFd>,
) -> std::io::Result<tokio::process::Command> {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let mut vars = vec![
        ("public_port", job.summary.port.to_string()),
        ("job_id", job.summary.id.clone()),
    ];
    let mut env: Vec<(&str, String)> = vec![
        ("BROKER_JOB_ID", job.summary.id.clone()),
        ("BROKER_PUBLIC_PORT", job.summary.port.to_string()),
    ];
    if args.gate {
        // The gate's application never gets a port: it would be one every local user reaches.
        if listen_fd.is_none() {
            let socket = dir.join(APP_SOCKET).display().to_string();
            vars.push(("socket", socket.clone()));
            env.push(("BROKER_APP_SOCKET", socket));
        }
    } else {
        vars.push(("port", job.summary.port.to_string()));
        env.push(("BROKER_PORT", job.summary.port.to_string()));
    }
    if material.secret.is_some() {
        vars.push(("secret_file", path(&material.secret)));
        env.push(("BROKER_SECRET_FILE", path(&material.secret)));
    }
    if material.cert.is_some() {
        vars.push(("cert", path(&material.cert)));
        vars.push(("key", path(&material.key)));
        vars.push(("ca", path(&material.ca)));
        env.push(("BROKER_CERT", path(&material.cert)));
        env.push(("BROKER_KEY", path(&material.key)));
        env.push(("BROKER_CA", path(&material.ca)));
    }
    let argv = args.app.iter().map(|arg| match arg.to_str() {
        Some(text) => OsString::from(expand(text, &vars)),
        None => arg.clone(),
    });
    let mut command = match &listen_fd {
        // Through the exec shim (this binary), which sets LISTEN_PID to the application's pid.
        Some(_) => {
            let mut command = tokio::process::Command::new(std::env::current_exe()?);
            command.arg(EXEC_SHIM).args(argv);
            command
        }
        None => {
            let mut argv = argv;
            let program = argv.next().unwrap_or_default();
            let mut command = tokio::process::Command::new(program);
            command.args(argv);
            command
        }
    };
    for name in [
        "BROKER_PORT",
        "BROKER_APP_SOCKET",
        "BROKER_SECRET_FILE",
        "BROKER_CERT",
        "BROKER_KEY",
        "BROKER_CA",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        command.env_remove(name);
    }
    if let Some(fd) = listen_fd {
        command
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", LISTEN_FD_NAME)
            .fd_mappings(vec![FdMapping {
                parent_fd: fd,
                child_fd: LISTEN_FD,
            }])
            .map_err(std::io::Error::other)?;
    }
    command
        .envs(env)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(&'static str, String)> {
        vec![
            ("port", "8000".into()),
            ("public_port", "23001".into()),
            ("cert", "/run/x/{port}".into()),
        ]
    }

    #[test]
    fn placeholders_expand_in_one_pass() {
        for (input, expected) in [
            ("{port}", "8000"),
            ("--listen=127.0.0.1:{port}", "--listen=127.0.0.1:8000"),
            ("{port}{public_port}", "800023001"),
            ("{cert}", "/run/x/{port}"),
            ("{unknown} {port", "{unknown} {port"),
            ("{{port}}", "{8000}"),
            ("", ""),
            ("{", "{"),
            ("é{port}é", "é8000é"),
        ] {
            assert_eq!(expand(input, &vars()), expected, "input {input:?}");
        }
    }
}
