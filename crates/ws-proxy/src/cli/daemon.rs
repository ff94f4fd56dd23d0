//! The `ws-proxy` daemon's command line, here rather than in its binary so that
//! crates/docgen renders its man page and completions from the definition it parses with.

use std::path::PathBuf;

use clap::Parser;
use common::daemon::LogArgs;

/// The Micronets websocket relay.
///
/// Peers connect with client certificates to wss://HOST:PORT/micronets/v1/ws-proxy/ID; two
/// peers on the same id are paired by HELLO and every message is relayed between them, in
/// order. Every setting lives in the TOML file (see deploy/config/ws-proxy.example.toml);
/// the flags below override it. Without a file, --cert and --ca (and --key unless the
/// certificate file holds the key too) are enough.
///
/// Signals: SIGHUP reloads the certificate, key, CA bundle and CRLs (live pairs stay);
/// SIGTERM or SIGINT closes every peer with 1001 and drains.
///
/// Exit codes: 0 stopped cleanly, 64 bad or missing flags (a bad value on the command line),
/// 78 bad configuration file (the same mistake in the file), 69 cannot resolve or bind the
/// listen address or load the TLS material, 70 connections still open after the grace period.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  ws-proxy --config /etc/ws-proxy/ws-proxy.toml\n  ws-proxy --config dev.toml --listen 127.0.0.1:0 --status-listen unix:/run/ws-proxy/status.sock"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "WS_PROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// WSS listen address, an IP address or a host name (overrides `listen`). A name is
    /// resolved at start and every address it resolves to is bound (`localhost:5050`: 127.0.0.1
    /// and ::1 where the host has both).
    #[arg(long, short = 'a', env = "WS_PROXY_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Status listener for /status and /metrics, `unix:PATH` or `ADDR:PORT` with an IP
    /// address (overrides `status_listen`). A TCP listener is readable by every local user.
    #[arg(
        long,
        env = "WS_PROXY_STATUS_LISTEN",
        value_name = "unix:PATH|ADDR:PORT"
    )]
    pub status_listen: Option<String>,
    /// URL path prefix in front of meet-up ids (overrides `url_prefix`).
    #[arg(long, value_name = "PATH")]
    pub url_prefix: Option<String>,
    /// Server certificate, or the Micronets pkeycert (certificate then key) (overrides
    /// `tls.cert`). Without a `[tls]` section in a file, --ca is needed too.
    #[arg(long, value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Server key, when not in the certificate file (overrides `tls.key`; needs --cert or
    /// a `[tls]` section).
    #[arg(long, value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// CA bundle client certificates must chain to (overrides `tls.client_ca`; needs --cert
    /// or a `[tls]` section).
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// CRL file; repeat for several (replaces `tls.crls`; needs --cert or a `[tls]` section).
    #[arg(long, value_name = "PEM")]
    pub crl: Vec<PathBuf>,
    /// `close` (the original) or `wait`: what happens to a peer whose partner leaves.
    #[arg(long, value_name = "MODE")]
    pub on_partner_leave: Option<String>,
    /// Print `listening on ADDR` on stdout once bound, one line per address, then
    /// `metrics on ADDR` when `metrics_listen` is set (for scripts that start it on port 0).
    #[arg(long)]
    pub print_address: bool,
    /// Check the configuration, the TLS material and that the listen address resolves, print
    /// a summary and exit (0: good, 64: bad flags, 78: bad configuration file, 69: TLS
    /// material unusable or the listen name does not resolve). Nothing is bound.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub log: LogArgs,
}
