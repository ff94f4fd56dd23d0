//! broker-cli: the user's client of the broker. Registers, lists, loads, verifies and deletes
//! jobs over the daemon's socket (or its HTTPS API), runs itself on another host over ssh for
//! `--host` as the original client did, and builds the tunnel (`connect`): a Unix socket in a
//! private directory (`curl --unix-socket`), or a TCP port only the user's own processes get
//! through (a browser on the laptop opens `http://127.0.0.1:PORT/`).
//!
//! The tunnel lives in `broker::tunnel`; this file is flags, output and exit codes.
#![allow(clippy::print_stdout)] // a CLI: results go to stdout

use std::ffi::OsString;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use broker::api::{Job, JobList, JobSummary, JobType, SaveRequest, VerifyResponse, valid_job_id};
use broker::client::{Client, ClientError, DEFAULT_SOCKET, Endpoint};
use broker::tunnel::{LOCAL_SOCKET, Listen, Ssh, SshForward, Target, Tunnel, TunnelError};
use clap::{Args as ClapArgs, Parser, Subcommand};
use common::daemon::{LogArgs, Shutdown, exit};
use tokio::signal::unix::{SignalKind, signal};

/// Exit status: verify said the secret does not match.
const MISMATCH: u8 = 1;
/// Exit status: the job does not exist or is not yours (HTTP 404).
const NOT_FOUND: u8 = exit::DATAERR;
/// Exit status: the broker's answer made no sense.
const PROTOCOL: u8 = 76;
/// Largest secret read from stdin or --secret-file.
const MAX_SECRET: u64 = 64 * 1024;

const AFTER_HELP: &str = "\
Workflows:
  ssh mode (a port plus a secret the client sends first; the gate fronts any app):
    on the server:   broker-run --type ssh --gate -- app --unix-socket {socket}
    on the laptop:   broker-cli connect JOB --host login1
                     -> socket /run/user/1000/broker-connect-XXXX/tunnel.sock  (job JOB, ...)
                     curl --unix-socket /run/user/1000/broker-connect-XXXX/tunnel.sock http://localhost/
    or, for a browser: broker-cli connect JOB --host login1 --local-port 8888
                     -> open http://127.0.0.1:8888/  (only your own uid's connections pass)
  ssl mode (a certificate from the broker's CA; the client presents yours):
    on the server:   broker-run --type ssl --gate --listen-fd -- app   (socket-activated app)
    on the laptop:   broker-cli connect JOB --host login1
  JOB is printed by broker-run and listed by `broker-cli query` (on the server, or here
  with --host). connect runs `ssh -N -L` itself (host keys are checked as usual) to a Unix
  socket in a private (0700) directory, listens on a Unix socket there (or on the TCP port
  asked for) and sends the secret or does mTLS (accepting only the job's own certificate)
  for every connection; Ctrl-C ends it. The forward goes to the host the job is registered
  on (a compute node behind login1 works when their brokers share a registry);
  --forward-host NAME overrides it.

Other examples:
  broker-cli query                      your jobs (-q, as the original)
  broker-cli save ssh --ttl 8h          register a job (-s ssh); add --out-dir DIR for files
  broker-cli load JOB --out-dir ~/.broker   write the secret or certificates, mode 0600
                                        (DIR must be yours and 0700 if it exists)
  broker-cli --json load JOB            everything, secret included, as JSON (-l JOB)
  broker-cli verify JOB < secret.txt    does the secret match? (-v JOB; exit 0 or 1)
  broker-cli --host login1 query        the jobs on login1 (runs broker-cli there over ssh)
  broker-cli delete JOB                 free the port and revoke the certificates

Secrets never go on the command line: verify reads stdin or --secret-file, and load/save
print them only with --json or --show-secret (a screenshot of a terminal should not leak).

Exit codes:
  0   done (verify: the secret matches; connect: ended by Ctrl-C or SIGTERM)
  1   verify: the secret does not match
  2   bad flags (clap)
  64  bad usage: not a job id, a secret on the command line, conflicting options
  65  no such job (or not yours)
  66  a local input file (secret, certificate, key) cannot be read
  69  the broker, ssh or the tunnel target cannot be reached, or cannot do it now
  74  local I/O failed: writing --out-dir files, an existing --out-dir open to others or
      not yours, binding the local socket or port
  76  the broker's answer makes no sense (also: another job than asked for, an id that is
      not a job id, a secret that is not hex)
  77  refused by the broker";

/// Client of the broker: ports, secrets and certificates for your applications, and the
/// tunnel to reach them.
///
/// The original's flags work too: -q (query), -l JOB (load), -s TYPE (save), -v JOB (verify,
/// secret on stdin).
#[derive(Debug, Parser)]
#[command(name = "broker-cli", version, after_help = AFTER_HELP)]
struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where the broker is and how output looks.
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Broker")]
struct Conn {
    /// The broker's Unix socket (your identity is your uid).
    #[arg(long, env = "BROKER_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH", global = true)]
    socket: PathBuf,
    /// Use the HTTPS API at this URL instead (`https://host:port`; needs --cert, --key, --ca).
    #[arg(long, env = "BROKER_URL", value_name = "URL", global = true)]
    url: Option<String>,
    /// Client certificate for --url (PEM).
    #[arg(long, env = "BROKER_CERT", value_name = "PEM", global = true)]
    cert: Option<PathBuf>,
    /// Client key for --url (PEM).
    #[arg(long, env = "BROKER_KEY", value_name = "PEM", global = true)]
    key: Option<PathBuf>,
    /// CA certificate the broker's HTTPS certificate must chain to, for --url (PEM).
    #[arg(long, env = "BROKER_CA", value_name = "PEM", global = true)]
    ca: Option<PathBuf>,
    /// Print the API's JSON objects (secrets included) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// query, load, connect: ask the broker on HOST, by running broker-cli there over ssh.
    #[arg(long, value_name = "HOST", global = true)]
    host: Option<String>,
    /// The broker-cli program on --host.
    #[arg(long, default_value = "broker-cli", value_name = "PATH", global = true)]
    remote_cli: String,
    /// The broker's socket on --host [default: the remote broker-cli's own default, i.e.
    /// its BROKER_SOCKET or /run/broker/broker.sock].
    #[arg(long, value_name = "PATH", global = true)]
    remote_socket: Option<String>,
    /// The ssh program.
    #[arg(long, default_value = "ssh", value_name = "PATH", global = true)]
    ssh: PathBuf,
    /// Extra ssh option, as for `ssh -o` (repeatable), e.g. Port=2222 or
    /// IdentityFile=~/.ssh/cluster.
    #[arg(long = "ssh-option", value_name = "OPT", global = true)]
    ssh_options: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List your jobs (no secrets). Alias: -q, --query.
    Query,
    /// Show a job; the secret or certificates with --json, --show-secret or --out-dir.
    /// Alias: -l JOB, --load JOB.
    Load(Load),
    /// Register a job: a port plus a secret (ssh) or certificates (ssl). Alias: -s TYPE.
    Save(Save),
    /// Check a secret against a job's (read from stdin or --secret-file, never from the
    /// command line). Prints valid or invalid; exit 0 or 1. Alias: -v JOB.
    Verify(Verify),
    /// Delete a job: frees its port and revokes its certificates.
    Delete(JobArg),
    /// Who the broker thinks you are.
    Whoami,
    /// Print the broker's CA certificate (PEM): what ssl jobs' certificates chain to.
    Ca,
    /// Open a local socket (or, with --local-port, a TCP port) that reaches the job's
    /// application: sends the secret (ssh mode) or does mTLS with your client certificate
    /// (ssl mode) for each connection. With --host, runs `ssh -N -L` to HOST. Runs until
    /// Ctrl-C.
    Connect(Connect),
}

#[derive(Debug, ClapArgs)]
struct JobArg {
    /// The job id (job_ and 32 hex digits).
    job: String,
}

#[derive(Debug, ClapArgs)]
struct Material {
    /// Print the secret or the certificates and keys in the text output too.
    #[arg(long)]
    show_secret: bool,
    /// Write the secret (JOB.secret) or the certificates and keys (JOB.crt, JOB.key,
    /// JOB.client.crt, JOB.client.key, JOB.ca.crt) into DIR, mode 0600 (DIR is created 0700;
    /// an existing DIR must be yours and closed to group and others).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
struct Load {
    /// The job id (job_ and 32 hex digits).
    job: String,
    #[command(flatten)]
    material: Material,
}

#[derive(Debug, ClapArgs)]
struct Save {
    /// ssh: a port and a secret; ssl: a port and certificates.
    #[arg(value_enum, ignore_case = true, value_name = "TYPE")]
    job_type: JobType,
    /// How long the job lives without a heartbeat, e.g. 30m, 8h [default: the broker's].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    ttl: Option<Duration>,
    /// Free text shown by query, e.g. the application's name.
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    #[command(flatten)]
    material: Material,
}

#[derive(Debug, ClapArgs)]
struct Verify {
    /// The job id (job_ and 32 hex digits).
    job: String,
    /// Read the secret from FILE instead of stdin (one trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Refused: the secret would be visible in ps and the shell history.
    #[arg(hide = true)]
    secret_arg: Option<String>,
}

#[derive(Debug, ClapArgs)]
struct Connect {
    /// The job id (job_ and 32 hex digits).
    job: String,
    /// Listen on this TCP port instead of a Unix socket (0: any free port). Connections from
    /// other users' processes on this host are refused.
    #[arg(long, value_name = "N")]
    local_port: Option<u16>,
    /// Listen on TCP at this address [default with --local-port: 127.0.0.1]. Beyond
    /// loopback, anyone on another host who reaches it uses the job as you.
    #[arg(long, value_name = "ADDR")]
    bind: Option<IpAddr>,
    /// Where the private directory for the sockets is made [default: $XDG_RUNTIME_DIR, else
    /// the temporary directory].
    #[arg(long, env = "XDG_RUNTIME_DIR", value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Connect here instead of the job's host:port (without --host).
    #[arg(long, value_name = "ADDR", conflicts_with = "forward_host")]
    target: Option<String>,
    /// With --host: where HOST's ssh server forwards to [default: the host the job is
    /// registered on, so a job on a compute node behind a login host is reached].
    #[arg(long, value_name = "NAME")]
    forward_host: Option<String>,
}

/// Why the client stops, with its exit status.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::USAGE, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(exit::UNAVAILABLE, message)
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        let code = match &err {
            ClientError::BadJobId(_) => exit::USAGE,
            ClientError::Protocol(_) => PROTOCOL,
            ClientError::Status { status, .. } => match status {
                400 => exit::USAGE,
                403 => exit::NOPERM,
                404 => NOT_FOUND,
                _ => exit::UNAVAILABLE,
            },
            ClientError::Connect { .. }
            | ClientError::Tls(_)
            | ClientError::Http(_)
            | ClientError::Timeout(_) => exit::UNAVAILABLE,
        };
        let message = if err.is_not_found() {
            String::from("no such job (or not yours)")
        } else {
            err.to_string()
        };
        Self::new(code, message)
    }
}

impl From<TunnelError> for Failure {
    fn from(err: TunnelError) -> Self {
        let code = match &err {
            TunnelError::Invalid(_) => exit::USAGE,
            TunnelError::Tls(_) => PROTOCOL,
            TunnelError::Bind { .. } => exit::IOERR,
            TunnelError::Spawn { .. } | TunnelError::Ssh { .. } => exit::UNAVAILABLE,
        };
        Self::new(code, err.to_string())
    }
}

/// Options that take a value and may come before the subcommand.
const GLOBAL_WITH_VALUE: &[&str] = &[
    "--socket",
    "--url",
    "--cert",
    "--key",
    "--ca",
    "--host",
    "--remote-cli",
    "--remote-socket",
    "--ssh",
    "--ssh-option",
    "--log",
    "--log-format",
];

/// The original's action flags and the subcommands they stand for.
const ALIASES: &[(&str, &str, &str)] = &[
    ("-q", "--query", "query"),
    ("-l", "--load", "load"),
    ("-s", "--save", "save"),
    ("-v", "--verify", "verify"),
];

/// Turns the original's `-q`, `-l JOB`, `-s TYPE`, `-v JOB` (and long forms, also `--load=JOB`)
/// into subcommands when they come where the subcommand would: after global options only.
fn rewrite_aliases(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut rest = args.into_iter();
    out.extend(rest.next()); // argv[0]
    while let Some(arg) = rest.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            break;
        };
        let (name, value) = match text.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value)),
            _ => (text, None),
        };
        if let Some((_, _, command)) = ALIASES
            .iter()
            .find(|(short, long, _)| name == *short || name == *long)
        {
            out.push(OsString::from(*command));
            out.extend(value.map(OsString::from));
            break;
        }
        if text == "--" || !text.starts_with('-') {
            // The subcommand (or something clap will complain about).
            out.push(arg);
            break;
        }
        let takes_value = value.is_none() && GLOBAL_WITH_VALUE.contains(&name);
        out.push(arg);
        if takes_value {
            out.extend(rest.next());
        }
    }
    out.extend(rest);
    out
}

fn main() -> ExitCode {
    let args = Args::parse_from(rewrite_aliases(std::env::args_os().collect()));
    if let Err(err) = common::daemon::init_tracing(&args.log, "warn") {
        eprintln!("broker-cli: {err:#}");
        return ExitCode::from(exit::USAGE);
    }
    common::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("broker-cli: starting the runtime: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("broker-cli: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(args: &Args) -> Result<u8, Failure> {
    let conn = &args.conn;
    // Everything that can be checked without contacting anybody is checked first.
    let job = match &args.command {
        Command::Load(Load { job, .. })
        | Command::Verify(Verify { job, .. })
        | Command::Delete(JobArg { job })
        | Command::Connect(Connect { job, .. }) => Some(job.as_str()),
        Command::Query | Command::Save(_) | Command::Whoami | Command::Ca => None,
    };
    if let Some(job) = job {
        check_job_id(job)?;
    }
    if conn.host.is_some()
        && !matches!(
            args.command,
            Command::Query | Command::Load(_) | Command::Connect(_)
        )
    {
        return Err(Failure::usage(
            "--host works with query, load and connect; run the others on that host",
        ));
    }
    let ssh = match &conn.host {
        Some(host) => Some(Ssh::new(
            &conn.ssh,
            conn.ssh_options.clone(),
            host.as_str(),
        )?),
        None => None,
    };
    match &args.command {
        Command::Query => run_query(conn, ssh.as_ref()).await,
        Command::Load(load) => {
            let job = load_job(conn, ssh.as_ref(), &load.job).await?;
            show_job(conn, &job, &load.material)
        }
        Command::Save(save) => run_save(conn, save).await,
        Command::Verify(verify) => run_verify(conn, verify).await,
        Command::Delete(JobArg { job }) => {
            client(conn)?.delete(job).await?;
            if conn.json {
                println!("{}", serde_json::json!({ "id": job, "deleted": true }));
            } else {
                println!("deleted {job}");
            }
            Ok(0)
        }
        Command::Whoami => {
            let me = client(conn)?.whoami().await?;
            if conn.json {
                print_json(&me)?;
            } else {
                println!("{} (via {}) on {}", me.user, me.via, me.host);
            }
            Ok(0)
        }
        Command::Ca => {
            let pem = client(conn)?.ca_pem().await?;
            if conn.json {
                println!("{}", serde_json::json!({ "ca": pem }));
            } else {
                print!("{pem}");
                if !pem.ends_with('\n') {
                    println!();
                }
            }
            Ok(0)
        }
        Command::Connect(connect) => run_connect(conn, ssh.as_ref(), connect).await,
    }
}

fn check_job_id(job: &str) -> Result<(), Failure> {
    if valid_job_id(job) {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "{job:?} is not a job id (job_ and 32 hex digits; see `broker-cli query`)"
        )))
    }
}

/// A client for the socket, or for the HTTPS API with --url.
fn client(conn: &Conn) -> Result<Client, Failure> {
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

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let text =
        serde_json::to_string(value).map_err(|e| Failure::new(exit::SOFTWARE, e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Runs `broker-cli --json ARGS` on the --host and parses its answer.
async fn remote<T: serde::de::DeserializeOwned>(
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
async fn load_job(conn: &Conn, ssh: Option<&Ssh>, job: &str) -> Result<Job, Failure> {
    let loaded: Job = match ssh {
        Some(ssh) => remote(conn, ssh, &["load", job]).await?,
        None => client(conn)?.load(job).await?,
    };
    loaded
        .check_answer(Some(job))
        .map_err(|e| Failure::new(PROTOCOL, format!("unexpected answer from the broker: {e}")))?;
    Ok(loaded)
}

async fn run_query(conn: &Conn, ssh: Option<&Ssh>) -> Result<u8, Failure> {
    let jobs = match ssh {
        Some(ssh) => remote::<JobList>(conn, ssh, &["query"]).await?.jobs,
        None => client(conn)?.query().await?,
    };
    if conn.json {
        print_json(&JobList { jobs })?;
        return Ok(0);
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(0);
    }
    print!("{}", job_table(&jobs));
    Ok(0)
}

/// The query table: one line per job, columns padded.
fn job_table(jobs: &[JobSummary]) -> String {
    let header = ["ID", "TYPE", "HOST", "PORT", "STATUS", "EXPIRES", "LABEL"];
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|j| {
            [
                j.id.clone(),
                j.job_type.to_string(),
                j.host.clone(),
                j.port.to_string(),
                j.status.clone(),
                j.expires.clone(),
                j.label.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        text.push_str(&line(&cells));
    }
    text
}

/// The non-secret facts of a job, one `name  value` line each.
fn facts(job: &JobSummary) -> String {
    let mut lines = vec![
        ("job", job.id.clone()),
        ("type", job.job_type.to_string()),
        ("owner", job.owner.clone()),
        ("host", job.host.clone()),
        ("port", job.port.to_string()),
        ("status", job.status.clone()),
        ("created", job.created.clone()),
        ("expires", job.expires.clone()),
    ];
    if let Some(label) = &job.label {
        lines.push(("label", label.clone()));
    }
    lines
        .iter()
        .map(|(name, value)| format!("{name:<9}{value}\n"))
        .collect()
}

/// load and save: the job as JSON, or its facts plus where the secret is.
fn show_job(conn: &Conn, job: &Job, material: &Material) -> Result<u8, Failure> {
    let written = match &material.out_dir {
        Some(dir) => write_material(dir, job)?,
        None => Vec::new(),
    };
    if conn.json {
        print_json(job)?;
        return Ok(0);
    }
    let mut text = facts(&job.summary);
    let what = match job.summary.job_type {
        JobType::Ssh => "secret",
        JobType::Ssl => "certs",
    };
    if !written.is_empty() {
        let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        text.push_str(&format!("{what:<9}{}\n", names.join(" ")));
    } else if !material.show_secret {
        text.push_str(&format!(
            "{what:<9}not shown: --out-dir DIR writes it (mode 0600), --show-secret or --json prints it\n"
        ));
    }
    if material.show_secret {
        if let Some(secret) = &job.secret {
            text.push_str(&format!("{:<9}{secret}\n", "secret"));
        }
        if let Some(tls) = &job.tls {
            for (name, pem) in [
                ("certificate", &tls.cert),
                ("key", &tls.key),
                ("client certificate", &tls.client_cert),
                ("client key", &tls.client_key),
                ("CA certificate", &tls.ca),
            ] {
                text.push_str(&format!("\n# {name}\n{}", pem.trim_end()));
                text.push('\n');
            }
        }
    }
    print!("{text}");
    Ok(0)
}

/// The files `--out-dir` writes for a job: name and content.
fn material_files(job: &Job) -> Result<Vec<(String, String)>, Failure> {
    // The id becomes a file name: never one that leaves the directory.
    job.check_answer(None)
        .map_err(|e| Failure::new(PROTOCOL, format!("unexpected answer from the broker: {e}")))?;
    let id = &job.summary.id;
    let missing = || {
        Failure::new(
            PROTOCOL,
            format!("the broker sent job {id} without its material"),
        )
    };
    Ok(match job.summary.job_type {
        JobType::Ssh => {
            let secret = job.secret.as_ref().ok_or_else(missing)?;
            vec![(format!("{id}.secret"), format!("{secret}\n"))]
        }
        JobType::Ssl => {
            let tls = job.tls.as_ref().ok_or_else(missing)?;
            vec![
                (format!("{id}.crt"), tls.cert.clone()),
                (format!("{id}.key"), tls.key.clone()),
                (format!("{id}.client.crt"), tls.client_cert.clone()),
                (format!("{id}.client.key"), tls.client_key.clone()),
                (format!("{id}.ca.crt"), tls.ca.clone()),
            ]
        }
    })
}

/// Writes the job's material into `dir` (created 0700), each file 0600, atomically. An
/// existing `dir` must be a directory of ours that group and others cannot enter or list:
/// the files are private, and so are their names and the moments they change. `dir` itself
/// must not be a symbolic link (exit 74): it is opened once with `O_NOFOLLOW`, that
/// descriptor is checked, and every file is created and renamed relative to it, so what is
/// checked is where the files land, whatever happens to the path meanwhile; a temporary file
/// is removed on any failure.
fn write_material(dir: &Path, job: &Job) -> Result<Vec<PathBuf>, Failure> {
    let files = material_files(job)?;
    let io = |what: &Path, e: std::io::Error| {
        Failure::new(exit::IOERR, format!("{}: {e}", what.display()))
    };
    let held = open_out_dir(dir)?;
    let mut written = Vec::with_capacity(files.len());
    for (name, content) in files {
        let path = dir.join(&name);
        let held = held.try_clone().map_err(|e| io(dir, e))?;
        let mut temp =
            common::beneath::TempFile::create_in(held, &format!(".{name}."), ".tmp", 0o600)
                .map_err(|e| io(&path, e))?;
        // The umask can only have removed bits from 0600; make it exactly 0600.
        temp.file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .and_then(|()| temp.file_mut().write_all(content.as_bytes()))
            .and_then(|()| temp.file().sync_all())
            .and_then(|()| temp.persist(std::ffi::OsStr::new(&name)))
            .map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Opens `--out-dir` once, never through a symlink as its last component, creating it (0700)
/// when missing, and checks the descriptor: a directory of ours, closed to others.
fn open_out_dir(dir: &Path) -> Result<std::os::fd::OwnedFd, Failure> {
    use rustix::fs::{Mode, OFlags};
    let fail = |message: String| Failure::new(exit::IOERR, message);
    let io = |e: std::io::Error| fail(format!("{}: {e}", dir.display()));
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let open = || rustix::io::retry_on_intr(|| rustix::fs::open(dir, flags, Mode::empty()));
    let opened = match open() {
        Err(rustix::io::Errno::NOENT) => {
            // mkdir never follows a symlink in the last component; the open below checks
            // whatever is there now.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            open()
        }
        other => other,
    };
    let held = opened.map_err(|errno| {
        let symlink = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        if symlink {
            fail(format!(
                "--out-dir {} is a symbolic link; give the directory itself",
                dir.display()
            ))
        } else if errno == rustix::io::Errno::NOTDIR {
            fail(format!("{} is not a directory", dir.display()))
        } else {
            io(errno.into())
        }
    })?;
    let stat = rustix::fs::fstat(&held).map_err(|e| io(e.into()))?;
    if stat.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(fail(format!(
            "--out-dir {} belongs to uid {}, not to you; choose a directory of your own",
            dir.display(),
            stat.st_uid
        )));
    }
    if stat.st_mode & 0o077 != 0 {
        return Err(fail(format!(
            "--out-dir {} is open to others (mode {:04o}); run `chmod 700 {}` or choose another directory",
            dir.display(),
            stat.st_mode & 0o7777,
            dir.display()
        )));
    }
    Ok(held)
}

async fn run_save(conn: &Conn, save: &Save) -> Result<u8, Failure> {
    if let Some(label) = &save.label {
        if label.chars().count() > 200 {
            return Err(Failure::usage("--label is longer than 200 characters"));
        }
    }
    let request = SaveRequest {
        job_type: Some(save.job_type),
        ttl_secs: save.ttl.map(|t| t.as_secs().max(1)),
        label: save.label.clone(),
    };
    let job = client(conn)?.save(&request).await?;
    show_job(conn, &job, &save.material)
}

/// The secret from --secret-file or stdin, without one trailing newline.
fn read_secret(verify: &Verify) -> Result<String, Failure> {
    let mut raw = Vec::new();
    let read = match &verify.secret_file {
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SECRET + 1).read_to_end(&mut raw))
            .map_err(|e| Failure::new(exit::NOINPUT, format!("{}: {e}", path.display()))),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("broker-cli: reading the secret from stdin (end with Ctrl-D)");
            }
            stdin
                .lock()
                .take(MAX_SECRET + 1)
                .read_to_end(&mut raw)
                .map_err(|e| Failure::new(exit::NOINPUT, format!("stdin: {e}")))
        }
    };
    read?;
    if raw.len() as u64 > MAX_SECRET {
        return Err(Failure::usage(format!(
            "the secret is longer than {MAX_SECRET} bytes"
        )));
    }
    let mut secret = String::from_utf8(raw)
        .map_err(|_| Failure::usage("the secret is not text (hex, as load prints it)"))?;
    if secret.ends_with('\n') {
        secret.pop();
        if secret.ends_with('\r') {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(Failure::usage(
            "no secret: pipe it into stdin or give --secret-file",
        ));
    }
    Ok(secret)
}

async fn run_verify(conn: &Conn, verify: &Verify) -> Result<u8, Failure> {
    if verify.secret_arg.is_some() {
        return Err(Failure::usage(
            "the secret is not taken from the command line (ps and the shell history would show it): pipe it into stdin or use --secret-file",
        ));
    }
    let secret = read_secret(verify)?;
    let valid = client(conn)?.verify(&verify.job, &secret).await?;
    if conn.json {
        print_json(&VerifyResponse { valid })?;
    } else {
        println!("{}", if valid { "valid" } else { "invalid" });
    }
    Ok(if valid { 0 } else { MISMATCH })
}

async fn run_connect(conn: &Conn, ssh: Option<&Ssh>, connect: &Connect) -> Result<u8, Failure> {
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
        tracing::warn!(job = %job.summary.id, status = %job.summary.status, "the job is not active");
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
                tracing::warn!(%local, "listening beyond loopback: whoever reaches this port from another host uses the job as you");
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
    Ok(broker::tunnel::private_dir(&base)?)
}

/// Completes when the forward's ssh exits; never without one.
async fn ssh_exit(forward: Option<&mut SshForward>) -> TunnelError {
    match forward {
        Some(forward) => forward.exited().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> Vec<String> {
        let args = std::iter::once("broker-cli")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        rewrite_aliases(args)
            .into_iter()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn original_flags_become_subcommands() {
        let check = |given: &[&str], expected: &[&str]| {
            assert_eq!(rewrite(given), expected, "{given:?}");
        };
        check(&["-q"], &["query"]);
        check(&["--query", "--json"], &["query", "--json"]);
        check(&["-l", "job_x"], &["load", "job_x"]);
        check(&["--load=job_x"], &["load", "job_x"]);
        check(&["-s", "SSH"], &["save", "SSH"]);
        check(
            &["--save", "ssl", "--ttl", "1h"],
            &["save", "ssl", "--ttl", "1h"],
        );
        check(&["-v", "job_x"], &["verify", "job_x"]);
        // After global options, with and without values.
        check(&["--json", "-l", "j"], &["--json", "load", "j"]);
        check(&["--socket", "/s", "-q"], &["--socket", "/s", "query"]);
        check(&["--socket=/s", "-q"], &["--socket=/s", "query"]);
        check(&["--host", "-q", "-q"], &["--host", "-q", "query"]);
        // A subcommand stops the search: its own -v or -s stay as they are.
        check(&["load", "-v"], &["load", "-v"]);
        check(&["query", "-q"], &["query", "-q"]);
        check(&["--", "-q"], &["--", "-q"]);
        check(&[], &[]);
    }

    #[test]
    fn parses_the_aliases() {
        let parse = |args: &[&str]| {
            let argv = std::iter::once("broker-cli")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect();
            Args::try_parse_from(rewrite_aliases(argv)).map(|a| a.command)
        };
        assert!(matches!(parse(&["-q"]), Ok(Command::Query)));
        assert!(matches!(
            parse(&["-s", "SSL"]),
            Ok(Command::Save(Save {
                job_type: JobType::Ssl,
                ..
            }))
        ));
        assert!(matches!(
            parse(&["--json", "-l", "j"]),
            Ok(Command::Load(_))
        ));
        assert!(matches!(parse(&["-v", "j"]), Ok(Command::Verify(_))));
        assert!(parse(&["-s", "tls"]).is_err());
    }

    #[test]
    fn help_is_consistent() {
        use clap::CommandFactory as _;
        Args::command().debug_assert();
    }
}
