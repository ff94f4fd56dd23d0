//! broker-run: registers a job with the local broker, hands an application its port, secret
//! and certificates, runs it, heartbeats, forwards signals and deletes the job when the
//! application exits (the original `server.py` role). With `--gate` it also owns the public
//! port and admits only connections that prove they are the owner's ([`crate::gate`]), and
//! gives the application a listening socket only the owner can reach: a Unix socket in the
//! private 0700 directory (`{socket}`), or one broker-run binds itself and passes as fd 3,
//! systemd-style (`--listen-fd`). A private TCP port the application binds is refused: any
//! local user could reach it around the gate, or bind it first.
//!
//! [`args`] holds the flags and the checks made before anything is registered, [`app`] the
//! application's files, command line and environment (and the exec shim), [`job`] the life of
//! the registered job.

mod app;
mod args;
mod job;

pub use app::{EXEC_SHIM, exec_shim};
pub use args::Args;

use common::daemon::exit;
use tracing::{debug, info, warn};

use crate::api::SaveRequest;
use crate::cli::failure::Failure;
use crate::client::{Client, ClientError};
use app::private_dir;
use args::{app_listen, check_placeholders, label};
use job::{Signals, run_job, signal_code};

/// Registers the job, runs the application, cleans up: the application's exit status
/// (128+N when killed by signal N).
///
/// Sets up tracing (info by default) first.
///
/// # Errors
/// Why broker-run stopped on its own, with the exit code `--help` names for it (64, 69, 73,
/// 77, 126, 127, 128+N for a stop signal before the job was registered).
pub async fn run(args: Args) -> Result<u8, Failure> {
    common::daemon::init_tracing(&args.log, "info")
        .map_err(|err| Failure::usage(format!("{err:#}")))?;
    check_placeholders(args.job_type, &args.app).map_err(Failure::usage)?;
    let listen = app_listen(args.gate, args.listen_fd, &args.app).map_err(Failure::usage)?;
    // Installed before anything is registered, so a stop signal is queued for the
    // application instead of killing broker-run with a job left behind.
    let mut signals = Signals::install().map_err(|err| {
        Failure::new(exit::SOFTWARE, format!("installing signal handlers: {err}"))
    })?;
    let dir = private_dir().map_err(|err| {
        Failure::new(
            exit::CANTCREAT,
            format!("creating the private directory: {err}"),
        )
    })?;

    let mut client = Client::unix(&args.socket);
    let request = SaveRequest {
        job_type: Some(args.job_type),
        ttl_secs: args.ttl.map(|ttl| ttl.as_secs().max(1)),
        label: Some(label(&args)),
    };
    let saved = tokio::select! {
        saved = client.save(&request) => saved,
        signal = signals.recv() => {
            return Err(Failure::new(
                signal_code(signal),
                format!("{} before the job was registered", signal.as_str()),
            ));
        }
    };
    let job = saved.map_err(|err| {
        Failure::new(
            save_exit_code(&err),
            format!(
                "cannot register an {} job with the broker at {}: {err}",
                args.job_type,
                args.socket.display()
            ),
        )
    })?;
    let id = job.summary.id.clone();
    info!(target: "broker_run", job = %id, r#type = %job.summary.job_type, port = job.summary.port, "job registered");

    let outcome = run_job(&args, listen, &mut client, &job, dir.path(), &mut signals).await;

    if outcome.job_gone {
        debug!(target: "broker_run", job = %id, "not deleting: the broker no longer has the job");
    } else {
        match client.delete(&id).await {
            Ok(()) => info!(target: "broker_run", job = %id, "job deleted"),
            Err(err) if err.is_not_found() => {
                debug!(target: "broker_run", job = %id, "job already gone")
            }
            Err(err) => {
                warn!(target: "broker_run", job = %id, %err, "cannot delete the job; it expires with its ttl")
            }
        }
    }
    let dir_path = dir.path().to_owned();
    if let Err(err) = dir.close() {
        warn!(target: "broker_run", dir = %dir_path.display(), %err, "cannot remove the private directory");
    }
    outcome.result
}

fn save_exit_code(err: &ClientError) -> u8 {
    match err.status() {
        Some(400 | 413 | 422) => exit::USAGE,
        Some(401 | 403) => exit::NOPERM,
        _ => exit::UNAVAILABLE,
    }
}
