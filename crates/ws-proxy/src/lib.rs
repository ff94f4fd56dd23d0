//! ws-proxy: the Micronets websocket relay.
//!
//! Two peers that both dial out (the Micronets manager and a home gateway) connect with client
//! certificates to `wss://HOST:5050/micronets/v1/ws-proxy/<id>`; the proxy pairs them by HELLO
//! and relays every message between them, opaquely and in order. The decisions that differ from
//! the original Python proxy (pairing by HELLO order, queued early messages, HTTP refusals before
//! the upgrade, authorization rules) are in `docs/ws-proxy.md`.
//!
//! - [`config`]: the TOML file and the validated [`Config`].
//! - [`server`]: the accept loop, TLS, the upgrade, status and reload ([`Server`]).
//! - `relay`: one connection's life: HELLO, waiting, relaying, keepalive, close.
//! - [`registry`]: the meet-up table (no sockets).
//! - [`auth`]: authorization rules from certificate identity to meet-up ids.
//! - [`status`], [`metrics`]: the local `/status` and `/metrics` listener.
//! - [`client`]: a peer (connect, HELLO, send, receive), the HTTP front end that turns HTTP
//!   requests into REST:REQUEST, and the gateway side that answers them from an upstream
//!   HTTP service.
//!
//! The library never reads argv, environment variables or signals; the binaries do.

pub mod auth;
pub mod client;
pub mod config;
pub mod metrics;
pub mod registry;
mod relay;
pub mod server;
pub mod status;

pub use config::{Config, OnPartnerLeave};
pub use relay::PARTNER_LEFT_REASON;
pub use server::Server;
