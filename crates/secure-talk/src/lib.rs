//! secure-talk: a TLS websocket server with JWT reconnection tokens, admin and data channels,
//! a Unix-socket mode and worker "pipes".
//!
//! - [`config`]: the TOML file and its validation;
//! - [`token`]: HS256 reconnection tokens;
//! - `state`: what every connection shares (`Shared`, `Peer`); below every handler, it calls
//!   none of them;
//! - [`server`]: listeners, the token endpoint and websocket upgrades;
//! - [`hub`]: clients, channels, pipes and who owns what;
//! - [`admin`]: the admin channel's methods;
//! - `channel`, `inbound`, `budget`: one websocket's loop, the messages it receives (capped
//!   per channel, uploads streamed) and the budget of bytes in flight they share;
//! - [`upload`]: upload files, spooled to disk and moved beneath the upload directory
//!   without following symlinks;
//! - [`pipes`], [`ipc`]: pipe processes and the IPC socket they check in on;
//! - [`argv`], [`dialect`]: the pipe program's argument template and its placeholders, and
//!   the two IPC dialects (`kmb`, `dlafs`) a pipe command may speak, both sans-IO;
//! - [`model_info`]: `model_info.json` in our flat shape and the original's nested one;
//! - [`client`]: the client library behind `secure-talk-cli`;
//! - [`metrics`]: the Prometheus families the daemon serves on `metrics_listen` (below
//!   `state`; gauges set from the hub when scraped);
//! - [`cli`]: the command-line tools (`secure-talk-cli`, `secure-talk-pipe`,
//!   `secure-talk-bench`) their thin binaries run.
//!
//! Message formats and IPC framing are in `common::envelope::{talk, ipc}`. The library never
//! reads argv, the environment or signals (but for the tools in [`cli`], which handle
//! SIGINT and SIGTERM while they stream); the binaries in `src/bin` parse them.

pub mod admin;
pub mod argv;
mod budget;
mod channel;
pub mod cli;
pub mod client;
pub mod config;
pub mod dialect;
pub mod hub;
mod inbound;
pub mod ipc;
pub mod metrics;
pub mod model_info;
pub mod pipes;
pub mod server;
mod state;
pub mod token;
pub mod upload;

pub use hub::{CLOSE_DISCONNECTED, CLOSE_REPLACED};
