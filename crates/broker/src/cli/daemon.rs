//! The `broker` daemon's command line, here rather than in its binary so that
//! crates/docgen renders its man page and completions from the definition it parses with.

use clap::Parser;
use common::daemon::LogArgs;
use std::path::PathBuf;

/// Hands users' applications a port plus a secret (ssh mode) or a certificate from the
/// broker's own CA (ssl mode), so that only their owner can reach them.
///
/// Local users talk to it over a Unix socket (`broker-cli`, `broker-run`, or
/// `curl --unix-socket /run/broker/broker.sock http://broker/v1/jobs`); who they are comes from
/// the kernel (SO_PEERCRED). An optional HTTPS API maps client certificates to users.
/// Jobs live in SQLite (default, in the state directory) or PostgreSQL (`--database URL`).
///
/// Signals: SIGHUP reloads the HTTPS certificate, key, client CA and CRLs; SIGTERM or SIGINT
/// stops accepting and lets running requests finish (drain_grace_secs).
///
/// Exit codes: 0 stopped cleanly, 64 bad flags or log filter, 78 bad configuration
/// (including a port range overlapping the kernel's ephemeral range, and a PostgreSQL URL
/// over TCP without sslmode=verify-full or through a world-writable socket directory), 69
/// cannot open the store or the CA, load the HTTPS material or bind, 70 requests still
/// running after the grace period.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  broker -c /etc/broker/broker.toml\n  broker --socket /tmp/b.sock --state-dir /tmp/b --port-range 21000-21999\n  broker --database postgres:///broker?host=/run/postgresql -c /etc/broker/broker.toml"
)]
pub struct Args {
    /// TOML configuration file (deploy/config/broker.example.toml documents every key).
    #[arg(long, short = 'c', env = "BROKER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket of the local API [default: /run/broker/broker.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory: SQLite database and CA [default: /var/lib/broker].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Store URL: sqlite://PATH or postgres://... [default: SQLite in the state directory].
    #[arg(
        long,
        env = "BROKER_DATABASE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database: Option<String>,
    /// Host name jobs are registered under [default: the machine's].
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Ports handed out, inclusive, e.g. 20000-29999.
    #[arg(long, value_name = "LOW-HIGH", value_parser = parse_range)]
    pub port_range: Option<[u16; 2]>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Print `listening on unix:PATH` (and the HTTPS address) on stdout once bound.
    #[arg(long)]
    pub print_address: bool,
    /// Check the configuration, open the store (running migrations) and the CA, then exit.
    #[arg(long)]
    pub check_config: bool,
}

/// A `--port-range` value, `LOW-HIGH`.
pub(crate) fn parse_range(text: &str) -> Result<[u16; 2], String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected LOW-HIGH"))?;
    let low = low.trim().parse().map_err(|e| format!("{low:?}: {e}"))?;
    let high = high.trim().parse().map_err(|e| format!("{high:?}: {e}"))?;
    Ok([low, high])
}
