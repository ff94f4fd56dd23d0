//! broker-run: registers a job with the local broker, hands an application its port, secret
//! and certificates, runs it, heartbeats, forwards signals and deletes the job when the
//! application exits (the original `server.py` role). With `--gate` it also owns the public
//! port and admits only connections that prove they are the owner's ([`broker::gate`]), and
//! gives the application a listening socket only the owner can reach: a Unix socket in the
//! private 0700 directory (`{socket}`), or one broker-run binds itself and passes as fd 3,
//! systemd-style (`--listen-fd`). A private TCP port the application binds is refused: any
//! local user could reach it around the gate, or bind it first.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker::api::{Job, JobType, SaveRequest};
use broker::client::{Client, ClientError, DEFAULT_SOCKET, Endpoint};
use broker::gate::{BrokerKeyCheck, DEFAULT_VERIFY_POOL, Gate, GateMode, TlsCheck, Upstream};
use clap::{Parser, ValueEnum};
use command_fds::{CommandFdExt as _, FdMapping};
use common::daemon::{LogArgs, Shutdown, exit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

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
/// Longest label the broker accepts.
const MAX_LABEL: usize = 200;
/// The application exists but could not be started (as in shells).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The application was not found (as in shells).
const EXIT_NOT_FOUND: u8 = 127;
/// The hidden first argument of the exec shim: `broker-run __exec-with-listen-pid APP ARGS`
/// sets `LISTEN_PID` to its own pid and execs the application (same pid), which cannot be
/// done between fork and exec without `unsafe`.
const EXEC_SHIM: &str = "__exec-with-listen-pid";
/// The descriptor a socket-activated application gets its listening socket on (systemd's
/// `SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;
/// `LISTEN_FDNAMES` for that descriptor.
const LISTEN_FD_NAME: &str = "broker-gate";
/// The application's socket in the private directory.
const APP_SOCKET: &str = "app.sock";
/// Why a gated application may not listen on a TCP port of its own.
const GATE_NEEDS_A_SOCKET: &str = "\
--gate needs the application on a socket only you can reach; a TCP port the application binds
on 127.0.0.1 ({port}) can be reached by every local user around the gate, or bound by one of
them first. Either put {socket} where the application listens (a Unix socket in broker-run's
private 0700 directory), or add --listen-fd (broker-run binds the listening socket and hands
it to the application as fd 3, systemd-style: LISTEN_FDS, LISTEN_PID; --listen-fd tcp for an
application that only accepts TCP, reachable by local users but not hijackable)";

const AFTER_HELP: &str = "\
The application gets, in its environment:
  BROKER_JOB_ID        the job id
  BROKER_PORT          the port to listen on (not with --gate)
  BROKER_PUBLIC_PORT   the job's public port
  BROKER_APP_SOCKET    with --gate and {socket}: the Unix socket path to listen on
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES
                       with --listen-fd: the listening socket is fd 3 (systemd's protocol)
  BROKER_SECRET_FILE   ssh: file holding the magic key (hex, no newline)
  BROKER_CERT, BROKER_KEY, BROKER_CA
                       ssl: the job's server certificate, its key, and the broker CA (PEM)
and the same in its arguments: {port} {public_port} {job_id} {secret_file} {cert} {key} {ca}
{socket} are replaced wherever they appear. The files live in a private directory (0700, under
$XDG_RUNTIME_DIR or the temporary directory) removed on exit. The application is run
directly, never through a shell, in its own process group; the secret is never put on a
command line.

Without --gate the application must itself check the key (ssh) or require client
certificates from BROKER_CA (ssl). With --gate, broker-run binds the public port and lets
through only connections that first send the magic key and a newline (ssh; the broker
verifies it) or present a client certificate the broker issued to you (ssl, mutual TLS; the
app sees plain bytes), and the application listens where only you can reach it:
  {socket}            it binds a Unix socket at this path, in the 0700 private directory
                      (full protection: other users cannot traverse the directory)
  --listen-fd         broker-run binds a Unix socket there itself and passes it as fd 3
                      (full protection; the app must accept socket activation)
  --listen-fd tcp     broker-run binds 127.0.0.1 on a free port and passes it as fd 3:
                      nobody can take the port first, but other local users can connect
                      to it (partial protection)
A gated application on a TCP port of its own ({port}) is refused (exit 64).

SIGTERM, SIGINT and SIGHUP are forwarded to the application; after SIGTERM or SIGINT it has
--stop-timeout (30 s) to exit before it is killed. The job is heartbeated every
third of its TTL and looked for in your job list every 2 s; once the broker no longer has it
(deleted, or expired while the broker was unreachable) the gate admits nobody new and the
application is stopped (SIGTERM, SIGKILL after 5 s).

Examples:
  broker-run --type ssh --gate -- uvicorn app:app --uds {socket}
  broker-run --type ssl --gate --ttl 8h --label notebook -- jupyter lab --no-browser --ServerApp.sock={socket}
  broker-run --type ssh --gate --listen-fd tcp -- my-socket-activated-server
  broker-run --type ssl -- my-server --listen 0.0.0.0:{port} --cert {cert} --key {key} --client-ca {ca}

Exit codes:
  the application's exit status (128+N when killed by signal N)
  64   bad flags (--gate without {socket} or --listen-fd included), or the broker refused
       the request as malformed
  69   the broker is unreachable or could not register the job, the public port could not
       be bound, or the job vanished from the broker while the application ran
  73   the private directory or its files could not be written
  77   the broker refused the request (permission denied)
  126  the application could not be started; 127 it was not found";

/// Runs an application on a port from the broker, with a secret or certificates only you
/// hold.
#[derive(Debug, Parser)]
#[command(name = "broker-run", version, after_help = AFTER_HELP)]
struct Args {
    /// Job type: ssh (port + magic key) or ssl (port + certificates from the broker's CA).
    #[arg(long = "type", short = 't', value_enum, value_name = "TYPE")]
    job_type: JobType,
    /// Front the application: broker-run binds the public port and admits only connections
    /// with the key (ssh) or your client certificate (ssl); the application listens on
    /// {socket} or on the socket --listen-fd hands it.
    #[arg(long)]
    gate: bool,
    /// With --gate: bind the application's listening socket here and pass it as fd 3
    /// (LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES, as systemd does). unix (the default): a
    /// Unix socket in the private 0700 directory, only you can connect. tcp: 127.0.0.1 on a
    /// free port, nobody can bind it first but other local users can connect to it.
    #[arg(
        long,
        value_enum,
        value_name = "FAMILY",
        num_args = 0..=1,
        default_missing_value = "unix",
        requires = "gate"
    )]
    listen_fd: Option<ListenFd>,
    /// How long the job lives without a heartbeat, e.g. 90s, 1h (broker's default if
    /// omitted; capped by the broker).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Text shown by `broker-cli query` (default: the application's name).
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// The broker daemon's socket.
    #[arg(long, env = "BROKER_SOCKET", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// After forwarding SIGTERM or SIGINT, how long the application may take to exit before
    /// it is killed (SIGKILL to its group), so the job is always deleted; 0 waits forever.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    stop_timeout: Duration,
    /// Address the gate binds the public port on (only with --gate). The default takes the
    /// port on every address, IPv4 and IPv6, so nobody else can listen on it anywhere; a
    /// specific address leaves the port free on the others.
    #[arg(long, value_name = "ADDR", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind: IpAddr,
    #[command(flatten)]
    log: LogArgs,
    /// The application and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "APP")]
    app: Vec<OsString>,
}

/// Which socket `--listen-fd` pre-binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListenFd {
    /// A Unix socket in the private directory.
    Unix,
    /// 127.0.0.1 on a free port.
    Tcp,
}

/// Where the application listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppListen {
    /// No gate: on the job's public port.
    PublicPort,
    /// Gated: it binds the Unix socket `{socket}` in the private directory.
    Socket,
    /// Gated: on fd 3, bound by broker-run.
    ListenFd(ListenFd),
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    if argv.nth(1).as_deref() == Some(OsStr::new(EXEC_SHIM)) {
        return exec_shim(argv);
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(err) = common::daemon::init_tracing(&args.log, "info") {
        eprintln!("broker-run: {err:#}");
        return ExitCode::from(exit::USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("broker-run: starting the runtime: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = runtime.block_on(run(args));
    // Gate connections still copying must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::from(code)
}

/// The exec shim: `LISTEN_PID` is the pid the application will have, which is this one's;
/// fd 3 and the other `LISTEN_*` variables were set up by the parent broker-run.
fn exec_shim(mut argv: std::env::ArgsOs) -> ExitCode {
    let Some(program) = argv.next() else {
        eprintln!("broker-run: {EXEC_SHIM} needs an application");
        return ExitCode::from(exit::USAGE);
    };
    let err = std::process::Command::new(&program)
        .args(argv)
        .env("LISTEN_PID", std::process::id().to_string())
        .exec();
    eprintln!(
        "broker-run: cannot start {}: {err}",
        program.to_string_lossy()
    );
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXECUTE
    })
}

/// The signals forwarded to the application.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.hup.recv() => Signal::SIGHUP,
        }
    }
}

/// Registers, runs, cleans up; returns the exit code.
async fn run(args: Args) -> u8 {
    if let Err(message) = check_placeholders(args.job_type, &args.app) {
        eprintln!("broker-run: {message}");
        return exit::USAGE;
    }
    let listen = match app_listen(args.gate, args.listen_fd, &args.app) {
        Ok(listen) => listen,
        Err(message) => {
            eprintln!("broker-run: {message}");
            return exit::USAGE;
        }
    };
    // Installed before anything is registered, so a stop signal is queued for the
    // application instead of killing broker-run with a job left behind.
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("broker-run: installing signal handlers: {err}");
            return exit::SOFTWARE;
        }
    };
    let dir = match private_dir() {
        Ok(dir) => dir,
        Err(err) => {
            eprintln!("broker-run: creating the private directory: {err}");
            return exit::CANTCREAT;
        }
    };

    let mut client = Client::unix(&args.socket);
    let request = SaveRequest {
        job_type: Some(args.job_type),
        ttl_secs: args.ttl.map(|ttl| ttl.as_secs().max(1)),
        label: Some(label(&args)),
    };
    let saved = tokio::select! {
        saved = client.save(&request) => saved,
        signal = signals.recv() => {
            eprintln!("broker-run: {} before the job was registered", signal.as_str());
            return signal_code(signal);
        }
    };
    let job = match saved {
        Ok(job) => job,
        Err(err) => {
            eprintln!(
                "broker-run: cannot register a {} job with the broker at {}: {err}",
                args.job_type,
                args.socket.display()
            );
            return save_exit_code(&err);
        }
    };
    let id = job.summary.id.clone();
    info!(job = %id, r#type = %job.summary.job_type, port = job.summary.port, "job registered");

    let outcome = run_job(&args, listen, &mut client, &job, dir.path(), &mut signals).await;

    if outcome.job_gone {
        debug!(job = %id, "not deleting: the broker no longer has the job");
    } else {
        match client.delete(&id).await {
            Ok(()) => info!(job = %id, "job deleted"),
            Err(err) if err.is_not_found() => debug!(job = %id, "job already gone"),
            Err(err) => warn!(job = %id, %err, "cannot delete the job; it expires with its ttl"),
        }
    }
    let dir_path = dir.path().to_owned();
    if let Err(err) = dir.close() {
        warn!(dir = %dir_path.display(), %err, "cannot remove the private directory");
    }
    outcome.code
}

/// How a registered job ended.
struct Outcome {
    code: u8,
    /// The broker said the job no longer exists.
    job_gone: bool,
}

impl Outcome {
    fn failed(code: u8) -> Self {
        Self {
            code,
            job_gone: false,
        }
    }
}

/// Files written for the application.
struct Material {
    secret: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

async fn run_job(
    args: &Args,
    listen: AppListen,
    client: &mut Client,
    job: &Job,
    dir: &Path,
    signals: &mut Signals,
) -> Outcome {
    let id = &job.summary.id;
    let public_port = job.summary.port;
    let material = match write_material(dir, job) {
        Ok(material) => material,
        Err(err) => {
            eprintln!(
                "broker-run: writing the job's files into {}: {err}",
                dir.display()
            );
            return Outcome::failed(exit::CANTCREAT);
        }
    };

    // The gate, when asked for: it owns the public port, and the app listens where only the
    // owner can reach it.
    let gate_shutdown = Shutdown::new();
    let mut tls_check = None;
    let mut listen_fd = None;
    let gate = if args.gate {
        let listener = match broker::gate::bind_public(args.bind, public_port) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!(
                    "broker-run: binding the public port {}: {err}",
                    SocketAddr::new(args.bind, public_port)
                );
                return Outcome::failed(exit::UNAVAILABLE);
            }
        };
        let app_socket = dir.join(APP_SOCKET);
        let upstream = match listen {
            AppListen::PublicPort | AppListen::Socket => Upstream::Unix(app_socket),
            AppListen::ListenFd(family) => match pre_bind(family, &app_socket) {
                Ok((fd, upstream)) => {
                    listen_fd = Some(fd);
                    upstream
                }
                Err(err) => {
                    eprintln!("broker-run: binding the application's socket: {err}");
                    return Outcome::failed(match family {
                        ListenFd::Unix => exit::CANTCREAT,
                        ListenFd::Tcp => exit::UNAVAILABLE,
                    });
                }
            },
        };
        let mode = match job.summary.job_type {
            JobType::Ssh => {
                let check = BrokerKeyCheck::new(
                    id.clone(),
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
                    eprintln!("broker-run: the broker returned an ssl job without certificates");
                    return Outcome::failed(exit::UNAVAILABLE);
                };
                let crl = match client.crl_pem().await {
                    Ok(crl) => crl,
                    Err(err) => {
                        eprintln!("broker-run: fetching the broker's CRL: {err}");
                        return Outcome::failed(exit::UNAVAILABLE);
                    }
                };
                match TlsCheck::new(tls, &job.summary.owner, &crl) {
                    Ok(check) => {
                        let check = Arc::new(check);
                        tls_check = Some(check.clone());
                        GateMode::Ssl(check)
                    }
                    Err(err) => {
                        eprintln!("broker-run: the job's certificates are unusable: {err}");
                        return Outcome::failed(exit::UNAVAILABLE);
                    }
                }
            }
        };
        match Gate::spawn(listener, mode, upstream.clone(), gate_shutdown.clone()) {
            Ok(gate) => {
                info!(public = %gate.local_addr(), %upstream, "gate listening");
                Some((gate, upstream))
            }
            Err(err) => {
                eprintln!("broker-run: starting the gate: {err}");
                return Outcome::failed(exit::SOFTWARE);
            }
        }
    } else {
        None
    };

    let mut command = match app_command(args, job, &material, dir, listen_fd) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("broker-run: preparing the application: {err}");
            gate_shutdown.drain(GATE_DRAIN).await;
            return Outcome::failed(exit::SOFTWARE);
        }
    };
    let spawned = command.spawn();
    // The command holds our copy of a pre-bound socket: only the application keeps one.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            let program = args.app.first().map(|p| p.to_string_lossy().into_owned());
            eprintln!(
                "broker-run: cannot start {}: {err}",
                program.unwrap_or_default()
            );
            gate_shutdown.drain(GATE_DRAIN).await;
            return Outcome::failed(if err.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            });
        }
    };
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    let kind = job.summary.job_type;
    match (&gate, listen) {
        (None, _) => eprintln!("broker-run: job {id} type {kind} port {public_port}"),
        (Some((_, upstream)), AppListen::ListenFd(ListenFd::Tcp)) => eprintln!(
            "broker-run: job {id} type {kind} port {public_port} (gate; app on fd 3, {upstream}: \
             partial protection, other local users can connect to it)"
        ),
        (Some((_, upstream)), AppListen::ListenFd(ListenFd::Unix)) => {
            eprintln!(
                "broker-run: job {id} type {kind} port {public_port} (gate; app on fd 3, {upstream})"
            );
        }
        (Some((_, upstream)), _) => {
            eprintln!(
                "broker-run: job {id} type {kind} port {public_port} (gate; app on {upstream})"
            );
        }
    }

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
                info!(signal = signal.as_str(), "forwarding to the application");
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
                    error!(job = %id, "the broker no longer has this job (deleted or expired); stopping the application");
                    // Nobody new gets through a gate whose job is gone.
                    gate_shutdown.trigger();
                    signal_group(group, Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                }
            }
            () = sleep_until(kill_at), if kill_at.is_some() => {
                warn!("the application did not exit after SIGTERM; killing it");
                signal_group(group, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    heartbeat.abort();
    if let Some((gate, _)) = gate {
        gate_shutdown.drain(GATE_DRAIN).await;
        gate.stopped().await;
    }

    let code = match status {
        Ok(status) => {
            let code = status_code(status);
            info!(code, "application exited");
            code
        }
        Err(err) => {
            error!(%err, "waiting for the application");
            exit::SOFTWARE
        }
    };
    Outcome {
        code: if job_gone { exit::UNAVAILABLE } else { code },
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
                    Err(err) => debug!(job = %id, %err, "liveness check failed; retrying"),
                }
                continue;
            }
        }
        match client.heartbeat(&id).await {
            Ok(answer) => debug!(job = %id, expires = %answer.expires, "heartbeat"),
            Err(err) if err.is_not_found() => {
                let _ = gone.send(());
                return;
            }
            Err(err) => {
                warn!(job = %id, %err, "heartbeat failed; retrying");
                continue;
            }
        }
        if let Some(tls) = &tls {
            match client.crl_pem().await {
                Ok(crl) => match tls.refresh_crl(&crl) {
                    Ok(true) => info!("gate: CRL updated"),
                    Ok(false) => {}
                    Err(err) => {
                        warn!(%err, "gate: unusable CRL from the broker; keeping the old one")
                    }
                },
                Err(err) => warn!(%err, "gate: fetching the CRL failed; keeping the old one"),
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
            debug!(%err, signal = signal.as_str(), "signalling the application's group");
        }
    }
}

fn signal_code(signal: Signal) -> u8 {
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

fn save_exit_code(err: &ClientError) -> u8 {
    match err.status() {
        Some(400 | 413 | 422) => exit::USAGE,
        Some(401 | 403) => exit::NOPERM,
        _ => exit::UNAVAILABLE,
    }
}

fn label(args: &Args) -> String {
    let text = match &args.label {
        Some(label) => label.clone(),
        None => args
            .app
            .first()
            .map(Path::new)
            .and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    text.chars().take(MAX_LABEL).collect()
}

/// `$XDG_RUNTIME_DIR` (per-user tmpfs, 0700) or the temporary directory, then a fresh
/// directory of ours, 0700.
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute() && dir.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("broker-run-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(base)
}

fn write_material(dir: &Path, job: &Job) -> std::io::Result<Material> {
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
fn pre_bind(family: ListenFd, path: &Path) -> std::io::Result<(OwnedFd, Upstream)> {
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

/// Where the application listens, from the flags and its arguments; with --gate only a socket
/// only the owner can reach (or, with `--listen-fd tcp`, nobody can take).
fn app_listen(
    gate: bool,
    listen_fd: Option<ListenFd>,
    app: &[OsString],
) -> Result<AppListen, String> {
    let uses = |name: &str| {
        app.iter()
            .filter_map(|arg| arg.to_str())
            .any(|arg| arg.contains(&format!("{{{name}}}")))
    };
    match (gate, listen_fd) {
        (false, _) if uses("socket") => Err(
            "{socket} is the gated application's socket: it needs --gate (without --gate the \
             application listens on the job's port, {port})"
                .to_owned(),
        ),
        (false, _) => Ok(AppListen::PublicPort),
        (true, _) if uses("port") => Err(GATE_NEEDS_A_SOCKET.to_owned()),
        (true, Some(_)) if uses("socket") => Err(
            "{socket} and --listen-fd exclude each other: with --listen-fd the application \
             gets its socket as fd 3"
                .to_owned(),
        ),
        (true, Some(family)) => Ok(AppListen::ListenFd(family)),
        (true, None) if uses("socket") => Ok(AppListen::Socket),
        (true, None) => Err(GATE_NEEDS_A_SOCKET.to_owned()),
    }
}

/// Placeholders only the other job type has.
fn foreign_placeholders(job_type: JobType) -> &'static [&'static str] {
    match job_type {
        JobType::Ssh => &["cert", "key", "ca"],
        JobType::Ssl => &["secret_file"],
    }
}

/// Refuses placeholders that belong to the other job type before anything is registered.
fn check_placeholders(job_type: JobType, app: &[OsString]) -> Result<(), String> {
    for arg in app.iter().filter_map(|arg| arg.to_str()) {
        for name in foreign_placeholders(job_type) {
            if arg.contains(&format!("{{{name}}}")) {
                return Err(format!(
                    "{{{name}}} is not available for a {job_type} job (in argument {arg:?})"
                ));
            }
        }
    }
    Ok(())
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

fn app_command(
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

    #[test]
    fn foreign_placeholders_are_refused() {
        let app = |s: &str| vec![OsString::from("app"), OsString::from(s)];
        assert!(check_placeholders(JobType::Ssh, &app("{secret_file}")).is_ok());
        assert!(check_placeholders(JobType::Ssh, &app("--cert={cert}")).is_err());
        assert!(check_placeholders(JobType::Ssl, &app("{secret_file}")).is_err());
        assert!(check_placeholders(JobType::Ssl, &app("{cert} {key} {ca}")).is_ok());
    }

    #[test]
    fn a_gated_app_needs_a_socket_only_the_owner_reaches() {
        let app = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        let served = app(&["srv", "--uds", "{socket}"]);
        let on_port = app(&["srv", "--port", "{port}"]);
        let plain = app(&["srv"]);
        assert_eq!(app_listen(false, None, &on_port), Ok(AppListen::PublicPort));
        assert_eq!(app_listen(true, None, &served), Ok(AppListen::Socket));
        assert_eq!(
            app_listen(true, Some(ListenFd::Tcp), &plain),
            Ok(AppListen::ListenFd(ListenFd::Tcp))
        );
        assert_eq!(
            app_listen(true, Some(ListenFd::Unix), &app(&["srv", "x{public_port}"])),
            Ok(AppListen::ListenFd(ListenFd::Unix))
        );
        // The old private port, nothing at all, {socket} without a gate or with --listen-fd.
        for (gate, fd, argv) in [
            (true, None, &on_port),
            (true, Some(ListenFd::Unix), &on_port),
            (true, None, &plain),
            (false, None, &served),
            (true, Some(ListenFd::Unix), &served),
        ] {
            assert!(
                app_listen(gate, fd, argv).is_err(),
                "{gate} {fd:?} {argv:?}"
            );
        }
        let message = app_listen(true, None, &on_port).unwrap_err();
        assert!(
            message.contains("{socket}") && message.contains("--listen-fd"),
            "{message}"
        );
        let args = Args::try_parse_from([
            "broker-run",
            "--type",
            "ssh",
            "--gate",
            "--listen-fd",
            "--",
            "srv",
        ])
        .expect("parses");
        assert_eq!(args.listen_fd, Some(ListenFd::Unix));
        let args = Args::try_parse_from([
            "broker-run",
            "--type",
            "ssh",
            "--gate",
            "--listen-fd",
            "tcp",
            "--",
            "srv",
        ])
        .expect("parses");
        assert_eq!(args.listen_fd, Some(ListenFd::Tcp));
        assert!(
            Args::try_parse_from(["broker-run", "--type", "ssh", "--listen-fd", "--", "srv"])
                .is_err(),
            "--listen-fd needs --gate"
        );
    }

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

    #[test]
    fn flags_parse() {
        let args = Args::try_parse_from([
            "broker-run",
            "--type",
            "ssh",
            "--gate",
            "--ttl",
            "1h",
            "--",
            "python3",
            "-m",
            "http.server",
            "{port}",
        ])
        .expect("parses");
        assert_eq!(args.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(args.app.len(), 4);
        assert_eq!(label(&args), "python3");
        assert!(Args::try_parse_from(["broker-run", "--type", "ssh"]).is_err());
    }
}
