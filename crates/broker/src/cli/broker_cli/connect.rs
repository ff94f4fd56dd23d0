//! `connect`: the tunnel from a local socket or port to the job, through `ssh -L` with
//! `--host`; runs until Ctrl-C or SIGTERM.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::daemon::{Shutdown, exit};
use tokio::signal::unix::{SignalKind, signal};

use super::args::{Conn, Connect};
use super::ask::load_job;
use crate::cli::failure::Failure;
use crate::tunnel::{LOCAL_SOCKET, Listen, Ssh, SshForward, Target, Tunnel, TunnelError};

pub(crate) async fn run_connect(
    conn: &Conn,
    ssh: Option<&Ssh>,
    connect: &Connect,
) -> Result<u8, Failure> {
    if ssh.is_some() && connect.target.is_some() {
        return Err(Failure::usage("--target and --host exclude each other"));
    }
    // Installed before the URL is printed: from then on Ctrl-C and SIGTERM end us cleanly.
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("signal handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("signal handler: {e}")))?;
    let job = load_job(conn, ssh, &connect.job).await?;
    if job.summary.status != "active" {
        tracing::warn!(target: "broker_cli", job = %job.summary.id, status = %job.summary.status, "the job is not active");
    }
    let private = private_dir(connect)?;
    let mut forward: Option<SshForward> = None;
    let target = match (ssh, &connect.target) {
        (Some(ssh), _) => {
            let forward_host = connect
                .forward_host
                .clone()
                .unwrap_or_else(|| job.summary.host.clone());
            let opened = ssh
                .forward(private.path(), &forward_host, job.summary.port)
                .await?;
            let target = opened.target(&job.summary, &forward_host);
            forward = Some(opened);
            target
        }
        (None, Some(address)) => Target::for_job(address.as_str(), &job.summary),
        (None, None) => Target::job(&job.summary),
    };
    let listen = if connect.local_port.is_some() || connect.bind.is_some() {
        Listen::Tcp(SocketAddr::new(
            connect.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            connect.local_port.unwrap_or(0),
        ))
    } else {
        Listen::Unix(private.path().join(LOCAL_SOCKET))
    };
    let tunnel = Tunnel::bind(&job, target.clone(), listen).await?;
    let via = match ssh {
        Some(ssh) => format!("via {}", ssh.host()),
        None => format!("to {}", target.address()),
    };
    let what = format!(
        "job {}, {} mode, {via}",
        job.summary.id, job.summary.job_type
    );
    // One write: a reader that takes the first line and goes does not kill us with EPIPE.
    let announcement = match tunnel.local() {
        Listen::Tcp(local) => {
            if !local.ip().is_loopback() {
                tracing::warn!(target: "broker_cli", %local, "listening beyond loopback: whoever reaches this port from another host uses the job as you");
            }
            let url = format!("http://{local}/");
            if conn.json {
                serde_json::json!({ "local_port": local.port(), "url": url, "job": job.summary.id })
                    .to_string()
            } else {
                format!("open {url}  ({what})")
            }
        }
        Listen::Unix(path) => {
            let quoted = shlex::try_quote(&path.to_string_lossy())
                .map(|q| q.into_owned())
                .unwrap_or_else(|_| path.display().to_string());
            let curl = format!("curl --unix-socket {quoted} http://localhost/");
            if conn.json {
                serde_json::json!({ "socket": path, "url": "http://localhost/", "curl": curl, "job": job.summary.id })
                    .to_string()
            } else {
                format!(
                    "socket {}  ({what})\n  e.g. {curl}  (a browser: --local-port N)",
                    path.display()
                )
            }
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(format!("{announcement}\n").as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::new(exit::IOERR, format!("stdout: {e}")))?;
    drop(stdout);

    let shutdown = Shutdown::new();
    let result = tokio::select! {
        () = tunnel.run(shutdown.clone()) => Ok(0),
        _ = term.recv() => Ok(0),
        _ = int.recv() => Ok(0),
        err = ssh_exit(forward.as_mut()) => Err(Failure::from(err)),
    };
    shutdown.drain(Duration::from_secs(1)).await;
    if let Some(forward) = forward {
        forward.stop().await;
    }
    drop(private);
    result
}

/// The 0700 directory for the local socket, ssh's forward and its control socket.
fn private_dir(connect: &Connect) -> Result<tempfile::TempDir, Failure> {
    let base = connect
        .runtime_dir
        .clone()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or_else(std::env::temp_dir);
    Ok(crate::tunnel::private_dir(&base)?)
}

/// Completes when the forward's ssh exits; never without one.
async fn ssh_exit(forward: Option<&mut SshForward>) -> TunnelError {
    match forward {
        Some(forward) => forward.exited().await,
        None => std::future::pending().await,
    }
}
