//! broker-run's flags, its help text, and the checks made on them before anything is
//! registered: where a gated application may listen, which placeholders its job type has.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use common::daemon::LogArgs;

use crate::api::JobType;
use crate::client::DEFAULT_SOCKET;

/// Longest label the broker accepts.
const MAX_LABEL: usize = 200;
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
pub struct Args {
    /// Job type: ssh (port + magic key) or ssl (port + certificates from the broker's CA).
    #[arg(long = "type", short = 't', value_enum, value_name = "TYPE")]
    pub(crate) job_type: JobType,
    /// Front the application: broker-run binds the public port and admits only connections
    /// with the key (ssh) or your client certificate (ssl); the application listens on
    /// {socket} or on the socket --listen-fd hands it.
    #[arg(long)]
    pub(crate) gate: bool,
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
    pub(crate) listen_fd: Option<ListenFd>,
    /// How long the job lives without a heartbeat, e.g. 90s, 1h (broker's default if
    /// omitted; capped by the broker).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Option<Duration>,
    /// Text shown by `broker-cli query` (default: the application's name).
    #[arg(long, value_name = "TEXT")]
    pub(crate) label: Option<String>,
    /// The broker daemon's socket.
    #[arg(long, env = "BROKER_SOCKET", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// After forwarding SIGTERM or SIGINT, how long the application may take to exit before
    /// it is killed (SIGKILL to its group), so the job is always deleted; 0 waits forever.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    pub(crate) stop_timeout: Duration,
    /// Address the gate binds the public port on (only with --gate). The default takes the
    /// port on every address, IPv4 and IPv6, so nobody else can listen on it anywhere; a
    /// specific address leaves the port free on the others.
    #[arg(long, value_name = "ADDR", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub(crate) bind: IpAddr,
    #[command(flatten)]
    pub(crate) log: LogArgs,
    /// The application and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "APP")]
    pub(crate) app: Vec<OsString>,
}

/// Which socket `--listen-fd` pre-binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ListenFd {
    /// A Unix socket in the private directory.
    Unix,
    /// 127.0.0.1 on a free port.
    Tcp,
}

/// Where the application listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AppListen {
    /// No gate: on the job's public port.
    PublicPort,
    /// Gated: it binds the Unix socket `{socket}` in the private directory.
    Socket,
    /// Gated: on fd 3, bound by broker-run.
    ListenFd(ListenFd),
}

pub(super) fn label(args: &Args) -> String {
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

/// Where the application listens, from the flags and its arguments; with --gate only a socket
/// only the owner can reach (or, with `--listen-fd tcp`, nobody can take).
pub(super) fn app_listen(
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
pub(super) fn check_placeholders(job_type: JobType, app: &[OsString]) -> Result<(), String> {
    for arg in app.iter().filter_map(|arg| arg.to_str()) {
        for name in foreign_placeholders(job_type) {
            if arg.contains(&format!("{{{name}}}")) {
                return Err(format!(
                    "{{{name}}} is not available for an {job_type} job (in argument {arg:?})"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_placeholders_are_refused() {
        let app = |s: &str| vec![OsString::from("app"), OsString::from(s)];
        assert!(check_placeholders(JobType::Ssh, &app("{secret_file}")).is_ok());
        assert!(check_placeholders(JobType::Ssh, &app("--cert={cert}")).is_err());
        assert!(check_placeholders(JobType::Ssl, &app("{secret_file}")).is_err());
        assert!(check_placeholders(JobType::Ssl, &app("{cert} {key} {ca}")).is_ok());
        assert_eq!(
            check_placeholders(JobType::Ssh, &app("{cert}")),
            Err("{cert} is not available for an ssh job (in argument \"{cert}\")".to_owned())
        );
        assert_eq!(
            check_placeholders(JobType::Ssl, &app("{secret_file}")),
            Err(
                "{secret_file} is not available for an ssl job (in argument \"{secret_file}\")"
                    .to_owned()
            )
        );
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
        let listen_fd = |flags: &[&str]| {
            let argv = ["broker-run", "--type", "ssh", "--gate"]
                .iter()
                .chain(flags);
            Args::try_parse_from(argv).expect("parses").listen_fd
        };
        assert_eq!(
            listen_fd(&["--listen-fd", "--", "srv"]),
            Some(ListenFd::Unix)
        );
        assert_eq!(
            listen_fd(&["--listen-fd", "tcp", "--", "srv"]),
            Some(ListenFd::Tcp)
        );
        assert!(
            Args::try_parse_from(["broker-run", "--type", "ssh", "--listen-fd", "--", "srv"])
                .is_err(),
            "--listen-fd needs --gate"
        );
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
