//! broker-cli's flags: clap's structures, the help text and the original's action flags
//! (`-q`, `-l JOB`, `-s TYPE`, `-v JOB`) rewritten into subcommands.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use common::daemon::LogArgs;

use crate::api::JobType;
use crate::client::DEFAULT_SOCKET;

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
  64  bad flags or usage: not a job id, a secret on the command line, conflicting options
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
pub struct Args {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(flatten)]
    pub(crate) log: LogArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the broker is and how output looks.
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Broker")]
pub(crate) struct Conn {
    /// The broker's Unix socket (your identity is your uid).
    #[arg(long, env = "BROKER_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH", global = true)]
    pub(crate) socket: PathBuf,
    /// Use the HTTPS API at this URL instead (`https://host:port`; needs --cert, --key, --ca).
    #[arg(long, env = "BROKER_URL", value_name = "URL", global = true)]
    pub(crate) url: Option<String>,
    /// Client certificate for --url (PEM).
    #[arg(long, env = "BROKER_CERT", value_name = "PEM", global = true)]
    pub(crate) cert: Option<PathBuf>,
    /// Client key for --url (PEM).
    #[arg(long, env = "BROKER_KEY", value_name = "PEM", global = true)]
    pub(crate) key: Option<PathBuf>,
    /// CA certificate the broker's HTTPS certificate must chain to, for --url (PEM).
    #[arg(long, env = "BROKER_CA", value_name = "PEM", global = true)]
    pub(crate) ca: Option<PathBuf>,
    /// Print the API's JSON objects (secrets included) instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// query, load, connect: ask the broker on HOST, by running broker-cli there over ssh.
    #[arg(long, value_name = "HOST", global = true)]
    pub(crate) host: Option<String>,
    /// The broker-cli program on --host.
    #[arg(long, default_value = "broker-cli", value_name = "PATH", global = true)]
    pub(crate) remote_cli: String,
    /// The broker's socket on --host [default: the remote broker-cli's own default, i.e.
    /// its BROKER_SOCKET or /run/broker/broker.sock].
    #[arg(long, value_name = "PATH", global = true)]
    pub(crate) remote_socket: Option<String>,
    /// The ssh program.
    #[arg(long, default_value = "ssh", value_name = "PATH", global = true)]
    pub(crate) ssh: PathBuf,
    /// Extra ssh option, as for `ssh -o` (repeatable), e.g. Port=2222 or
    /// IdentityFile=~/.ssh/cluster.
    #[arg(long = "ssh-option", value_name = "OPT", global = true)]
    pub(crate) ssh_options: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct JobArg {
    /// The job id (job_ and 32 hex digits).
    pub(crate) job: String,
}

#[derive(Debug, ClapArgs)]
pub(crate) struct Material {
    /// Print the secret or the certificates and keys in the text output too.
    #[arg(long)]
    pub(crate) show_secret: bool,
    /// Write the secret (JOB.secret) or the certificates and keys (JOB.crt, JOB.key,
    /// JOB.client.crt, JOB.client.key, JOB.ca.crt) into DIR, mode 0600 (DIR is created 0700;
    /// an existing DIR must be yours and closed to group and others).
    #[arg(long, value_name = "DIR")]
    pub(crate) out_dir: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub(crate) struct Load {
    /// The job id (job_ and 32 hex digits).
    pub(crate) job: String,
    #[command(flatten)]
    pub(crate) material: Material,
}

#[derive(Debug, ClapArgs)]
pub(crate) struct Save {
    /// ssh: a port and a secret; ssl: a port and certificates.
    #[arg(value_enum, ignore_case = true, value_name = "TYPE")]
    pub(crate) job_type: JobType,
    /// How long the job lives without a heartbeat, e.g. 30m, 8h [default: the broker's].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) ttl: Option<Duration>,
    /// Free text shown by query, e.g. the application's name.
    #[arg(long, value_name = "TEXT")]
    pub(crate) label: Option<String>,
    #[command(flatten)]
    pub(crate) material: Material,
}

#[derive(Debug, ClapArgs)]
pub(crate) struct Verify {
    /// The job id (job_ and 32 hex digits).
    pub(crate) job: String,
    /// Read the secret from FILE instead of stdin (one trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    pub(crate) secret_file: Option<PathBuf>,
    /// Refused: the secret would be visible in ps and the shell history.
    #[arg(hide = true)]
    pub(crate) secret_arg: Option<String>,
}

#[derive(Debug, ClapArgs)]
pub(crate) struct Connect {
    /// The job id (job_ and 32 hex digits).
    pub(crate) job: String,
    /// Listen on this TCP port instead of a Unix socket (0: any free port). Connections from
    /// other users' processes on this host are refused.
    #[arg(long, value_name = "N")]
    pub(crate) local_port: Option<u16>,
    /// Listen on TCP at this address [default with --local-port: 127.0.0.1]. Beyond
    /// loopback, anyone on another host who reaches it uses the job as you.
    #[arg(long, value_name = "ADDR")]
    pub(crate) bind: Option<IpAddr>,
    /// Where the private directory for the sockets is made [default: $XDG_RUNTIME_DIR, else
    /// the temporary directory].
    #[arg(long, env = "XDG_RUNTIME_DIR", value_name = "DIR")]
    pub(crate) runtime_dir: Option<PathBuf>,
    /// Connect here instead of the job's host:port (without --host).
    #[arg(long, value_name = "ADDR", conflicts_with = "forward_host")]
    pub(crate) target: Option<String>,
    /// With --host: where HOST's ssh server forwards to [default: the host the job is
    /// registered on, so a job on a compute node behind a login host is reached].
    #[arg(long, value_name = "NAME")]
    pub(crate) forward_host: Option<String>,
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
pub fn rewrite_aliases(args: Vec<OsString>) -> Vec<OsString> {
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
