//! The `secure-talk` daemon's command line, here rather than in its binary so that
//! crates/docgen renders its man page and completions from the definition it parses with.

use clap::{Parser, Subcommand};
use common::daemon::LogArgs;
use std::path::PathBuf;

/// TLS websocket server with reconnection tokens, admin and data channels, and worker pipes.
///
/// Clients fetch a token with `GET /` (HTTPS on TCP, client certificate required by default,
/// or plain HTTP on the Unix socket), then open the admin websocket `/` and the data websocket
/// `/data` with the token in a `token` header. Admin commands create pipes: one process per
/// pipe (`pipe_program`, default secure-talk-pipe), which checks in on the IPC socket and
/// streams its output to the owner's data channel.
///
/// Every setting is a key of the TOML file (deploy/config/secure-talk.example.toml); the flags
/// below override it.
///
/// Signals: SIGHUP reloads the TLS certificate, key, client CA and CRLs; SIGTERM or SIGINT
/// closes websockets (1001), stops pipes (SIGTERM, then SIGKILL after kill_grace_secs) and
/// removes the socket files.
///
/// Exit codes: 0 stopped cleanly, 64 bad flags or log filter, 78 bad configuration,
/// 66 token key file unusable, 69 cannot bind or load TLS, 70 tasks still running after the
/// drain grace, 73 gen-token-key cannot create the file.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  secure-talk -c /etc/secure-talk/secure-talk.toml\n  secure-talk --listen '' --unix-socket ./talk.sock --state-dir ./state\n  secure-talk gen-token-key /etc/secure-talk/token.key"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SECURE_TALK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TCP address for HTTPS/WSS (`''` disables TCP) [default: 127.0.0.1:8445].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Also serve plain HTTP/WS on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub unix_socket: Option<PathBuf>,
    /// Directory for the IPC socket and uploads [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Program started for each pipe [default: secure-talk-pipe].
    #[arg(long, value_name = "PROGRAM")]
    pub pipe_program: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Print the bound addresses on stdout (`listening on ...`), for scripts using port 0.
    #[arg(long)]
    pub print_address: bool,
    /// Validate the configuration, token key and TLS material, then exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new random token key file (mode 0600) for `token_key_file`.
    GenTokenKey {
        /// The file to create; an existing file is never overwritten.
        path: PathBuf,
    },
}
