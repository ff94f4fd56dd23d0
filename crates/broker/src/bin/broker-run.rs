//! broker-run: registers a job with the local broker, hands an application its port, secret
//! and certificates, runs it, heartbeats, forwards signals and deletes the job when the
//! application exits (the original `server.py` role). With `--gate` it also owns the public
//! port and admits only connections that prove they are the owner's ([`broker::gate`]).

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker::api::{Job, JobType, SaveRequest};
use broker::client::{Client, ClientError, DEFAULT_SOCKET, Endpoint};
use broker::gate::{BrokerKeyCheck, DEFAULT_VERIFY_POOL, Gate, GateMode, TlsCheck};
use clap::Parser;
use common::daemon::{LogArgs, Shutdown, exit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::TcpListener;
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

const AFTER_HELP: &str = "\
The application gets, in its environment:
  BROKER_JOB_ID        the job id
  BROKER_PORT          the port to listen on (with --gate: a private port on 127.0.0.1)
  BROKER_PUBLIC_PORT   the job's public port
  BROKER_SECRET_FILE   ssh: file holding the magic key (hex, no newline)
  BROKER_CERT, BROKER_KEY, BROKER_CA
                       ssl: the job's server certificate, its key, and the broker CA (PEM)
and the same in its arguments: {port} {public_port} {job_id} {secret_file} {cert} {key} {ca}
are replaced wherever they appear. The files live in a private directory (0700, under
$XDG_RUNTIME_DIR or the temporary directory) removed on exit. The application is run
directly, never through a shell, in its own process group; the secret is never put on a
command line.

Without --gate the application must itself check the key (ssh) or require client
certificates from BROKER_CA (ssl). With --gate it can be any unmodified TCP server on
127.0.0.1:{port}: broker-run binds the public port and lets through only connections that
first send the magic key and a newline (ssh; the broker verifies it) or present a client
certificate the broker issued to you (ssl, mutual TLS; the app sees plain TCP).

SIGTERM, SIGINT and SIGHUP are forwarded to the application; after SIGTERM or SIGINT it has
--stop-timeout (30 s) to exit before it is killed. The job is heartbeated every
third of its TTL and looked for in your job list every 2 s; once the broker no longer has it
(deleted, or expired while the broker was unreachable) the gate admits nobody new and the
application is stopped (SIGTERM, SIGKILL after 5 s).

Examples:
  broker-run --type ssh --gate -- python3 -m http.server --bind 127.0.0.1 {port}
  broker-run --type ssl --gate --ttl 8h --label notebook -- jupyter lab --ip 127.0.0.1 --port {port} --no-browser
  broker-run --type ssl -- my-server --listen 0.0.0.0:{port} --cert {cert} --key {key} --client-ca {ca}

Exit codes:
  the application's exit status (128+N when killed by signal N)
  64   bad flags, or the broker refused the request as malformed
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
    /// Front the application: broker-run binds the public port, runs the app on a private
    /// loopback port, and admits only connections with the key (ssh) or your client
    /// certificate (ssl).
    #[arg(long)]
    gate: bool,
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
    /// Address the gate binds the public port on (only with --gate).
    #[arg(long, value_name = "ADDR", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind: IpAddr,
    #[command(flatten)]
    log: LogArgs,
    /// The application and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "APP")]
    app: Vec<OsString>,
}

fn main() -> ExitCode {
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

    let outcome = run_job(&args, &mut client, &job, dir.path(), &mut signals).await;

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

    // The gate, when asked for: it owns the public port and the app gets a private one.
    let gate_shutdown = Shutdown::new();
    let mut tls_check = None;
    let (gate, app_port) = if args.gate {
        let listener = match TcpListener::bind((args.bind, public_port)).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!(
                    "broker-run: binding the public port {}: {err}",
                    SocketAddr::new(args.bind, public_port)
                );
                return Outcome::failed(exit::UNAVAILABLE);
            }
        };
        let private_port = match private_port() {
            Ok(port) => port,
            Err(err) => {
                eprintln!("broker-run: finding a free loopback port: {err}");
                return Outcome::failed(exit::UNAVAILABLE);
            }
        };
        let mode = match job.summary.job_type {
            JobType::Ssh => GateMode::Ssh(Arc::new(BrokerKeyCheck::new(
                id.clone(),
                &Endpoint::Unix(args.socket.clone()),
                DEFAULT_VERIFY_POOL,
            ))),
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
        let upstream = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), private_port);
        match Gate::spawn(listener, mode, upstream, gate_shutdown.clone()) {
            Ok(gate) => {
                info!(public = %gate.local_addr(), %upstream, "gate listening");
                (Some(gate), private_port)
            }
            Err(err) => {
                eprintln!("broker-run: starting the gate: {err}");
                return Outcome::failed(exit::SOFTWARE);
            }
        }
    } else {
        (None, public_port)
    };

    let mut command = app_command(args, job, &material, app_port);
    let mut child = match command.spawn() {
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
    if gate.is_some() {
        eprintln!(
            "broker-run: job {id} type {} port {public_port} (app on 127.0.0.1:{app_port})",
            job.summary.job_type
        );
    } else {
        eprintln!(
            "broker-run: job {id} type {} port {public_port}",
            job.summary.job_type
        );
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
    if let Some(gate) = gate {
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

/// A loopback port free right now, for the application behind the gate. Another process
/// could take it before the app binds it; the app then fails to start, which is visible.
fn private_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
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
    app_port: u16,
) -> tokio::process::Command {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let mut vars = vec![
        ("port", app_port.to_string()),
        ("public_port", job.summary.port.to_string()),
        ("job_id", job.summary.id.clone()),
    ];
    let mut env: Vec<(&str, String)> = vec![
        ("BROKER_JOB_ID", job.summary.id.clone()),
        ("BROKER_PORT", app_port.to_string()),
        ("BROKER_PUBLIC_PORT", job.summary.port.to_string()),
    ];
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
    let mut argv = args.app.iter().map(|arg| match arg.to_str() {
        Some(text) => OsString::from(expand(text, &vars)),
        None => arg.clone(),
    });
    let program = argv.next().unwrap_or_default();
    let mut command = tokio::process::Command::new(program);
    command.args(argv);
    for name in [
        "BROKER_SECRET_FILE",
        "BROKER_CERT",
        "BROKER_KEY",
        "BROKER_CA",
    ] {
        command.env_remove(name);
    }
    command
        .envs(env)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    command
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
