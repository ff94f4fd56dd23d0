//! The `remo-serv` daemon's command line, here rather than in its binary so that
//! crates/docgen renders its man page and completions from the definition it parses with.

use clap::Parser;
use common::daemon::LogFormat;
use std::net::IpAddr;
use std::path::PathBuf;

/// Encrypted remote administration server, wire-compatible with remo_serv 0.6.0.
///
/// Users log in with their Ed448 key (registered with `remo-admin useradd`); the session is
/// encrypted with a key agreed over X448, and every request is a Fernet token. Logged-in users
/// run commands (no shell) and get and put files inside the served directories.
///
/// The options are the original server's; every one also has a TOML key (see
/// deploy/config/remo-serv.example.toml). Flags override the file.
///
/// Signals: SIGHUP reloads the HTTPS certificate and key; SIGTERM or SIGINT stops accepting,
/// lets running requests finish (drain-grace) and terminates interactive commands.
///
/// Exit codes: 0 stopped cleanly, 64 bad flags or log filter, 78 bad configuration, 66 key file unreadable,
/// 69 cannot bind, open the user database or load TLS, 70 requests still running after the
/// grace period.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  remo-serv -k remo_serv_key.pem -u SqliteUserService:users_db.sqlite\n  remo-serv -c /etc/remo-serv/remo-serv.toml\n  remo-serv -p 8443 --tls-cert server.crt --tls-key server.key"
)]
pub struct Args {
    /// TOML configuration file (keys: port, host, timeout, log, user-service, key-file, ...).
    #[arg(
        long = "conf",
        short = 'c',
        env = "REMO_SERV_CONFIG",
        value_name = "FILE"
    )]
    pub conf: Option<PathBuf>,
    /// TCP port [default: 8080].
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
    /// Address to bind [default: 127.0.0.1; the original bound 0.0.0.0].
    #[arg(long, short = 'i', value_name = "ADDR")]
    pub interface: Option<IpAddr>,
    /// User service: SqliteUserService:PATH [default: SqliteUserService:users_db.sqlite].
    #[arg(long, short = 'u', value_name = "SPEC")]
    pub user_service: Option<String>,
    /// Server Ed448 private key, PKCS#8 PEM, unencrypted [default: remo_serv_key.pem].
    #[arg(long, short = 'k', value_name = "PEM")]
    pub key_file: Option<PathBuf>,
    /// Session idle timeout in seconds [default: 600].
    #[arg(long, short = 's', value_name = "SECS")]
    pub session: Option<u64>,
    /// Debug logging (same as --log debug).
    #[arg(long, short = 'd')]
    pub debug: bool,
    /// Log filter, e.g. `info` or `info,remo_serv=debug` (the original took a logging
    /// config file here).
    #[arg(long = "log", short = 'l', value_name = "FILTER")]
    pub log: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// HTTPS certificate chain (PEM); with --tls-key the server speaks HTTPS only.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// HTTPS private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Working directory of commands and base of relative file names [default: the current
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Print `listening on ADDR` on stdout once bound (for scripts that use port 0).
    #[arg(long)]
    pub print_address: bool,
    /// Check the configuration, the server key and the user database, then exit.
    #[arg(long)]
    pub check_config: bool,
}
