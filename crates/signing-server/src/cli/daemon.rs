//! The `signing-server` daemon's command line, here rather than in its binary so that
//! crates/docgen renders its man page and completions from the definition it parses with.

use clap::{Parser, Subcommand};
use common::daemon::LogArgs;
use std::path::PathBuf;

/// TLS package-signing service.
///
/// Clients connect with TLS on port 6000 and present a certificate; its subject CN selects a
/// [[clients]] rule (the key it signs with, the directories it may have signed by path). A
/// client that offers no ALPN speaks the original protocol (send a path, get the listing, a
/// JSON object of per-file signature fields and a "Signatures written to" line); one that
/// offers http/1.1 gets the JSON API (POST /v1/sign, /v1/sign-path, /v1/verify; GET /v1/keys).
///
/// Every signature is recorded in an append-only audit table (SQLite, or PostgreSQL shared by
/// several instances) and in signatures.txt.
///
/// Signals: SIGHUP reloads the TLS certificate, key, client CA and CRLs; SIGTERM or SIGINT
/// stops accepting and lets running requests finish (drain_grace_secs).
///
/// Exit codes: 0 stopped cleanly, 64 bad flags or log filter, 78 bad configuration
/// (including a PostgreSQL URL over TCP without sslmode=verify-full or through a world-writable
/// socket directory), 66 a signing key cannot be loaded (missing, not Ed448, or readable by
/// others), 69 cannot bind, open (or migrate) the audit database or load TLS, 70 requests
/// still running after the grace period, 73 keygen cannot create its files, 77 the PostgreSQL
/// role could undo the audit trail (allow_privileged_role).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  signing-server -c /etc/signing-server/signing-server.toml\n  signing-server keygen --out /etc/signing-server/release.key.pem"
)]
pub struct Args {
    /// TOML configuration file (deploy/config/signing-server.example.toml documents every key).
    #[arg(long, short = 'c', env = "SIGNING_SERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:6000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Print `listening on ADDR` on stdout once bound, then `metrics on ADDR` when
    /// `metrics_listen` is set (for scripts using port 0).
    #[arg(long)]
    pub print_address: bool,
    /// Check the configuration, the keys, the audit database (connected and migrated) and the
    /// TLS material, then exit.
    #[arg(long)]
    pub check_config: bool,
    /// Audit database, overriding the file's `database`: a SQLite file or a postgres:// URL.
    /// Prefer the environment variable for a URL with a password (a command line is visible
    /// to every local user).
    #[arg(
        long,
        env = "SIGNING_SERVER_DATABASE",
        value_name = "PATH|URL",
        hide_env_values = true
    )]
    pub database: Option<String>,
    /// This instance's name on every audit row, overriding the file's `instance`.
    #[arg(long, env = "SIGNING_SERVER_INSTANCE", value_name = "NAME")]
    pub instance: Option<String>,
    /// Bring the audit database's schema to this release's version, then exit (run by the
    /// database's owner role: SIGNING_SERVER_DATABASE=postgres://OWNER@HOST/DB).
    #[arg(long)]
    pub migrate: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make an Ed448 key pair: OUT (PKCS#8 PEM, mode 0600) and OUT.pub (public PEM).
    Keygen {
        /// Private key file to create (never overwritten).
        #[arg(long, value_name = "PEM")]
        out: PathBuf,
    },
}
