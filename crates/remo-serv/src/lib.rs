//! remo-serv: encrypted remote administration, wire-compatible with remo_serv 0.6.0.
//!
//! Users log in with an Ed448 key registered in a SQLite database; the session key comes from
//! an X448 agreement (Concat KDF) and every request and answer is made of Fernet tokens with
//! the original's headers, request numbers and path hashes. Logged-in users run commands
//! (never through a shell), drive interactive commands and get and put files inside the
//! configured roots.
//!
//! - [`proto`]: the wire format, sans-IO (test vectors in its tests);
//! - [`keys`], [`users`]: key files and the user database, as the original tools write them;
//! - [`session`], [`body`], [`server`]: sessions, request bodies and the HTTP server;
//! - [`conns`]: authenticated connections, each tied to its session and capped per user;
//! - [`limits`]: the budget of unverified body bytes and the login rate per address;
//! - [`exec`], [`files`], [`pipeline`]: commands, file access and parallel encryption;
//! - [`client`]: the client library behind `remo`;
//! - [`config`]: the TOML file and its validation;
//! - [`metrics`]: the Prometheus families the daemon serves on `metrics_listen`;
//! - [`cli`]: the command-line tools' logic (`remo`, `remo-admin`, `remo-bench`).
//!
//! The library never reads argv, the environment or signals; the binaries in `src/bin` do.
pub mod body;
pub mod cli;
pub mod client;
pub mod config;
pub mod conns;
pub mod exec;
pub mod files;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod proto;
pub mod server;
pub mod session;
pub mod users;
