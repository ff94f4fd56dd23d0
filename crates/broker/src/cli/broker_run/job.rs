//! A registered job's life: the gate, the application, signals forwarded to it, heartbeats
//! and the CRL, and the stop when the application exits or the broker drops the job.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{Shutdown, exit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::app::{APP_SOCKET, app_command, cannot_start_code, pre_bind, write_material};
use super::args::{AppListen, Args, ListenFd};
use crate::api::{Job, JobType};
use crate::cli::failure::Failure;
use crate::client::{Client, Endpoint};
use crate::gate::{BrokerKeyCheck, DEFAULT_VERIFY_POOL, Gate, GateMode, TlsCheck, Upstream};

/// Between SIGTERM and SIGKILL when broker-run stops the application itself.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Shortest and longest heartbeat period (a third of the TTL otherwise).
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// How often the job's existence is checked between heartbeats.
const LIVENESS_PERIOD: Duration = Duration::from_secs(2);
/// Deadline of each heartbeat or CRL request.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open gate connections may finish once the application has exited.
const GATE_DRAIN: Duration = Duration::from_secs(1);

/// The signals forwarded to the application.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(super) async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.hup.recv() => Signal::SIGHUP,
        }
    }
}

/// How a registered job ended.
pub(super) struct Outcome {
    /// The application's exit status as ours, or why broker-run stopped it or never started it.
    pub(super) result: Result<u8, Failure>,
    /// The broker said the job no longer exists.
    pub(super) job_gone: bool,
}

impl Outcome {
    fn failed(code: u8, message: impl Into<String>) -> Self {
        Self {
            result: Err(Failure::new(code, message)),
            job_gone: false,
        }
    }
}

/// A running gate: its task, where it sends admitted connections, and what the application
/// needs from it.
struct Front {
    gate: Gate,
    upstream: Upstream,
    /// The socket pre-bound for `--listen-fd`, handed to the application as fd 3.
    listen_fd: Option<OwnedFd>,
    /// The ssl gate's certificate check, whose CRL the heartbeat refreshes.
    tls_check: Option<Arc<TlsCheck>>,
}

/// Binds the public port, the application's socket for `--listen-fd`, and starts the gate.
async fn start_gate(
    args: &Args,
    listen: AppListen,
    client: &mut Client,
    job: &Job,
    dir: &Path,
    shutdown: Shutdown,
) -> Result<Front, Outcome> {
    let public_port = job.summary.port;
    let listener = crate::gate::bind_public(args.bind, public_port).map_err(|err| {
        Outcome::failed(
            exit::UNAVAILABLE,
            format!(
                "binding the public port {}: {err}",
                SocketAddr::new(args.bind, public_port)
            ),
        )
    })?;
    let app_socket = dir.join(APP_SOCKET);
    let mut listen_fd = None;
    let upstream = match listen {
        AppListen::PublicPort | AppListen::Socket => Upstream::Unix(app_socket),
        AppListen::ListenFd(family) => {
            let (fd, upstream) = pre_bind(family, &app_socket).map_err(|err| {
                let code = match family {
                    ListenFd::Unix => exit::CANTCREAT,
                    ListenFd::Tcp => exit::UNAVAILABLE,
                };
                Outcome::failed(code, format!("binding the application's socket: {err}"))
            })?;
            listen_fd = Some(fd);
            upstream
        }
    };
    let mut tls_check = None;
    let mode = match job.summary.job_type {
        JobType::Ssh => {
            let check = BrokerKeyCheck::new(
                job.summary.id.clone(),
                &Endpoint::Unix(args.socket.clone()),
                DEFAULT_VERIFY_POOL,
            );
            let check = match &job.secret {
                Some(secret) => check.with_secret(secret.clone()),
                None => check,
            };
            GateMode::Ssh(Arc::new(check))
        }
        JobType::Ssl => {
            let Some(tls) = &job.tls else {
                return Err(Outcome::failed(
                    exit::UNAVAILABLE,
                    "the broker returned an ssl job without certificates",
                ));
            };
            let crl = client.crl_pem().await.map_err(|err| {
                Outcome::failed(
                    exit::UNAVAILABLE,
                    format!("fetching the broker's CRL: {err}"),
                )
            })?;
            let check = TlsCheck::new(tls, &job.summary.owner, &crl).map_err(|err| {
                Outcome::failed(
                    exit::UNAVAILABLE,
                    format!("the job's certificates are unusable: {err}"),
                )
            })?;
            let check = Arc::new(check);
            tls_check = Some(check.clone());
            GateMode::Ssl(check)
        }
    };
    let gate = Gate::spawn(listener, mode, upstream.clone(), shutdown)
        .map_err(|err| Outcome::failed(exit::SOFTWARE, format!("starting the gate: {err}")))?;
    info!(target: "broker_run", public = %gate.local_addr(), %upstream, "gate listening");
    Ok(Front {
        gate,
        upstream,
        listen_fd,
        tls_check,
    })
}

/// The line on stderr that says what runs where.
fn announce(job: &Job, front: Option<&Front>, listen: AppListen) {
    let id = &job.summary.id;
    let kind = job.summary.job_type;
    let public_port = job.summary.port;
    match (front.map(|front| &front.upstream), listen) {
        (None, _) => eprintln!("broker-run: job {id} type {kind} port {public_port}"),
        (Some(upstream), AppListen::ListenFd(ListenFd::Tcp)) => eprintln!(
            "broker-run: job {id} type {kind} port {public_port} (gate; app on fd 3, {upstream}: \
             partial protection, other local users can connect to it)"
        ),
        (Some(upstream), AppListen::ListenFd(ListenFd::Unix)) => {
            eprintln!(
                "broker-run: job {id} type {kind} port {public_port} (gate; app on fd 3, {upstream})"
            );
        }
        (Some(upstream), _) => {
            eprintln!(
                "broker-run: job {id} type {kind} port {public_port} (gate; app on {upstream})"
            );
        }
    }
}

/// Runs the registered job: its files, the gate when asked for, the application until it
/// exits (signals forwarded, killed once the broker no longer has the job).
pub(super) async fn run_job(
    args: &Args,
    listen: AppListen,
    client: &mut Client,
    job: &Job,
    dir: &Path,
    signals: &mut Signals,
) -> Outcome {
    let id = &job.summary.id;
    let material = match write_material(dir, job) {
        Ok(material) => material,
        Err(err) => {
            return Outcome::failed(
                exit::CANTCREAT,
                format!("writing the job's files into {}: {err}", dir.display()),
            );
        }
    };

    // The gate, when asked for: it owns the public port, and the app listens where only the
    // owner can reach it.
    let gate_shutdown = Shutdown::new();
    let mut front = None;
    if args.gate {
        match start_gate(args, listen, client, job, dir, gate_shutdown.clone()).await {
            Ok(started) => front = Some(started),
            Err(outcome) => return outcome,
        }
    }
    let listen_fd = front.as_mut().and_then(|front| front.listen_fd.take());
    let tls_check = front.as_ref().and_then(|front| front.tls_check.clone());

    let mut command = match app_command(args, job, &material, dir, listen_fd) {
        Ok(command) => command,
        Err(err) => {
            gate_shutdown.drain(GATE_DRAIN).await;
            return Outcome::failed(exit::SOFTWARE, format!("preparing the application: {err}"));
        }
    };
    let spawned = command.spawn();
    // The command holds our copy of a pre-bound socket: only the application keeps one.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            let program = args.app.first().map(|p| p.to_string_lossy().into_owned());
            gate_shutdown.drain(GATE_DRAIN).await;
            return Outcome::failed(
                cannot_start_code(&err),
                format!("cannot start {}: {err}", program.unwrap_or_default()),
            );
        }
    };
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    announce(job, front.as_ref(), listen);

    let period = heartbeat_period(job.summary.ttl_secs);
    let (gone_tx, mut gone_rx) = oneshot::channel();
    let heartbeat = tokio::spawn(heartbeat(
        args.socket.clone(),
        id.clone(),
        period,
        tls_check,
        gone_tx,
    ));

    let mut job_gone = false;
    let mut heartbeat_over = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = signals.recv() => {
                info!(target: "broker_run", signal = signal.as_str(), "forwarding to the application");
                signal_group(group, signal);
                let stopping = matches!(signal, Signal::SIGTERM | Signal::SIGINT);
                if stopping && kill_at.is_none() && !args.stop_timeout.is_zero() {
                    kill_at = Some(tokio::time::Instant::now() + args.stop_timeout);
                }
            }
            gone = &mut gone_rx, if !heartbeat_over => {
                heartbeat_over = true;
                if gone.is_ok() {
                    job_gone = true;
                    error!(target: "broker_run", job = %id, "the broker no longer has this job (deleted or expired); stopping the application");
                    // Nobody new gets through a gate whose job is gone.
                    gate_shutdown.trigger();
                    signal_group(group, Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                }
            }
            () = sleep_until(kill_at), if kill_at.is_some() => {
                warn!(target: "broker_run", "the application did not exit after SIGTERM; killing it");
                signal_group(group, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    heartbeat.abort();
    if let Some(front) = front {
        gate_shutdown.drain(GATE_DRAIN).await;
        front.gate.stopped().await;
    }

    let code = match status {
        Ok(status) => {
            let code = status_code(status);
            info!(target: "broker_run", code, "application exited");
            code
        }
        Err(err) => {
            error!(target: "broker_run", %err, "waiting for the application");
            exit::SOFTWARE
        }
    };
    Outcome {
        result: Ok(if job_gone { exit::UNAVAILABLE } else { code }),
        job_gone,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Heartbeats every `period`; tells `gone` and ends when the broker no longer has the job.
/// With an ssl gate it also refreshes the CRL the gate checks client certificates against.
async fn heartbeat(
    socket: PathBuf,
    id: String,
    period: Duration,
    tls: Option<Arc<TlsCheck>>,
    gone: oneshot::Sender<()>,
) {
    let mut client = Client::unix(socket).with_timeout(HEARTBEAT_TIMEOUT);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Between heartbeats, a cheap look at the job list (no write, no audit record) notices a
    // job deleted from outside within LIVENESS_PERIOD, so its gate stops admitting anyone:
    // an ssl gate cannot learn it from the key check the way an ssh gate does.
    let mut liveness = tokio::time::interval_at(
        tokio::time::Instant::now() + LIVENESS_PERIOD,
        LIVENESS_PERIOD,
    );
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = liveness.tick() => {
                match client.query().await {
                    Ok(jobs) if !jobs.iter().any(|job| job.id == id) => {
                        let _ = gone.send(());
                        return;
                    }
                    Ok(_) => {}
                    Err(err) => debug!(target: "broker_run", job = %id, %err, "liveness check failed; retrying"),
                }
                continue;
            }
        }
        match client.heartbeat(&id).await {
            Ok(answer) => {
                debug!(target: "broker_run", job = %id, expires = %answer.expires, "heartbeat")
            }
            Err(err) if err.is_not_found() => {
                let _ = gone.send(());
                return;
            }
            Err(err) => {
                warn!(target: "broker_run", job = %id, %err, "heartbeat failed; retrying");
                continue;
            }
        }
        if let Some(tls) = &tls {
            match client.crl_pem().await {
                Ok(crl) => match tls.refresh_crl(&crl) {
                    Ok(true) => info!(target: "broker_run", "gate: CRL updated"),
                    Ok(false) => {}
                    Err(err) => {
                        warn!(target: "broker_run", %err, "gate: unusable CRL from the broker; keeping the old one")
                    }
                },
                Err(err) => {
                    warn!(target: "broker_run", %err, "gate: fetching the CRL failed; keeping the old one")
                }
            }
        }
    }
}

/// A third of the TTL, between one second and a minute.
fn heartbeat_period(ttl_secs: u64) -> Duration {
    (Duration::from_secs(ttl_secs) / 3).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        if let Err(err) = killpg(group, signal) {
            debug!(target: "broker_run", %err, signal = signal.as_str(), "signalling the application's group");
        }
    }
}

pub(super) fn signal_code(signal: Signal) -> u8 {
    u8::try_from(128 + signal as i32).unwrap_or(u8::MAX)
}

/// The application's exit status as ours: its code, or 128+N for signal N.
fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(u8::MAX),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(u8::MAX),
        (None, None) => exit::SOFTWARE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_periods() {
        assert_eq!(heartbeat_period(0), MIN_HEARTBEAT);
        assert_eq!(heartbeat_period(3), Duration::from_secs(1));
        assert_eq!(heartbeat_period(90), Duration::from_secs(30));
        assert_eq!(heartbeat_period(3600), MAX_HEARTBEAT);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(status_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(status_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(signal_code(Signal::SIGINT), 130);
    }
}
