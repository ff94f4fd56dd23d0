//! Asking the broker: the client for the socket or the HTTPS API, and `broker-cli` run on
//! `--host` over ssh.

use common::daemon::exit;

use super::args::Conn;
use super::failure::{NOT_FOUND, PROTOCOL};
use crate::api::{Job, valid_job_id};
use crate::cli::failure::Failure;
use crate::client::{Client, Endpoint};
use crate::tunnel::Ssh;

pub(crate) fn check_job_id(job: &str) -> Result<(), Failure> {
    if valid_job_id(job) {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "{job:?} is not a job id (job_ and 32 hex digits; see `broker-cli query`)"
        )))
    }
}

/// A client for the socket, or for the HTTPS API with --url.
pub(crate) fn client(conn: &Conn) -> Result<Client, Failure> {
    let Some(url) = &conn.url else {
        return Ok(Client::unix(&conn.socket));
    };
    let (Some(cert), Some(key), Some(ca)) = (&conn.cert, &conn.key, &conn.ca) else {
        return Err(Failure::usage("--url needs --cert, --key and --ca"));
    };
    if !url.starts_with("https://") {
        return Err(Failure::usage(format!("{url:?} is not an https:// URL")));
    }
    let endpoint = Endpoint::https(url, ca, cert, key)
        .map_err(|e| Failure::new(exit::NOINPUT, e.to_string()))?;
    Ok(Client::new(endpoint))
}

/// Runs `broker-cli --json ARGS` on the --host and parses its answer.
pub(crate) async fn remote<T: serde::de::DeserializeOwned>(
    conn: &Conn,
    ssh: &Ssh,
    args: &[&str],
) -> Result<T, Failure> {
    let mut words = vec!["--json"];
    if let Some(socket) = &conn.remote_socket {
        words.extend(["--socket", socket.as_str()]);
    }
    words.extend_from_slice(args);
    let output = ssh.run_cli(&conn.remote_cli, &words).await?;
    let host = ssh.host();
    let stderr = output.stderr.trim();
    match output.code {
        Some(0) => serde_json::from_slice(&output.stdout).map_err(|e| {
            Failure::new(
                PROTOCOL,
                format!("the answer of {} on {host}: {e}", conn.remote_cli),
            )
        }),
        Some(127) => Err(Failure::unavailable(format!(
            "{host} has no {:?} (use --remote-cli PATH): {stderr}",
            conn.remote_cli
        ))),
        Some(255) | None => Err(Failure::unavailable(format!(
            "ssh to {host} failed: {stderr}"
        ))),
        Some(code) => {
            // The remote broker-cli's own exit codes mean the same here.
            let code = match u8::try_from(code) {
                Ok(c @ (exit::USAGE | NOT_FOUND | exit::UNAVAILABLE | PROTOCOL | exit::NOPERM)) => {
                    c
                }
                _ => exit::UNAVAILABLE,
            };
            let message = stderr.strip_prefix("broker-cli: ").unwrap_or(stderr);
            Err(Failure::new(code, format!("on {host}: {message}")))
        }
    }
}

/// The job, checked: the one asked for, with material of its type ([`Job::check_answer`]).
pub(crate) async fn load_job(conn: &Conn, ssh: Option<&Ssh>, job: &str) -> Result<Job, Failure> {
    let loaded: Job = match ssh {
        Some(ssh) => remote(conn, ssh, &["load", job]).await?,
        None => client(conn)?.load(job).await?,
    };
    loaded
        .check_answer(Some(job))
        .map_err(|e| Failure::new(PROTOCOL, format!("unexpected answer from the broker: {e}")))?;
    Ok(loaded)
}
