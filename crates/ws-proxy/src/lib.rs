//! ws-proxy: the Micronets websocket relay.
//!
//! Two peers that both dial out (the Micronets manager and a home gateway) connect with client
//! certificates to `wss://HOST:5050/micronets/v1/ws-proxy/<id>`; the proxy pairs them by HELLO
//! and relays every message between them, opaquely and in order. The decisions that differ from
//! the original Python proxy (pairing by HELLO order, queued early messages, HTTP refusals before
//! the upgrade, authorization rules) are in `docs/ws-proxy.md`.
//!
//! - [`config`]: the TOML file and the validated [`Config`].
//! - [`listen`]: the WSS listen address (`HOST:PORT`, a host name resolved at start and every
//!   address it resolves to bound).
//! - [`server`]: the accept loops (TLS, and the front listener), the upgrade, status and
//!   reload ([`Server`]).
//! - [`front`]: front mode: the client identity and address a trusted front (HAProxy) forwards
//!   in request headers, and the front's addresses (no sockets).
//! - `state`: what every connection shares (the table, counters, budget, live connections)
//!   and the `/status` document drawn from it; it knows no sockets.
//! - `relay`: one connection's life: HELLO, waiting, relaying, keepalive, close.
//! - `queue`: a connection's outgoing queue and the `Handle` by which others fill it.
//! - [`registry`]: the meet-up table (no sockets).
//! - [`auth`]: authorization rules from certificate identity to meet-up ids.
//! - `budget`: the process-wide byte budget (`max_buffered_bytes`) and the read meter that
//!   charges messages being read and caps what is read before the HELLO.
//! - [`status`], [`metrics`]: the local `/status` and `/metrics` listener.
//! - [`cli`]: the client and benchmark command lines (`ws-proxy-client`, `ws-proxy-bench`).
//! - [`client`]: a peer (connect, HELLO, send, receive), the HTTP front end that turns HTTP
//!   requests into REST:REQUEST, and the gateway side that answers them from an upstream
//!   HTTP service.
//!
//! Choices made where the spec is silent (also in `docs/ws-proxy.md`):
//! - An empty or over-long meet-up id is refused with HTTP 400, a path outside the prefix with
//!   404, an identity the rules refuse with 403, a paired id with 409, a draining proxy with 503,
//!   a request that is not a websocket upgrade with 426 (the original dropped it).
//! - Two connections may both pass the 409 check before either says HELLO; the second HELLO
//!   then finds the id full and is closed with 1008 "meet-up id is full".
//! - The pong deadline runs from the moment the ping is queued, behind any data already queued
//!   for the peer: a peer that cannot take in its queue within `pong_timeout` is closed like
//!   one that does not answer.
//! - In `wait` mode, messages a survivor sends in the instant between its partner's departure
//!   and the proxy noticing it may go to the departed partner; afterwards they are queued for
//!   the next partner.
//! - A write that makes no progress for `write_timeout` drops the peer, so a stuck socket never
//!   holds its partner's reads forever.
//!
//! The library never reads argv, environment variables or signals; the binaries do.

pub mod auth;
mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod front;
mod io;
pub mod listen;
pub mod local_http;
pub mod metrics;
mod queue;
pub mod registry;
mod relay;
pub mod server;
mod state;
pub mod status;
mod upgrade;

pub use config::{Config, OnPartnerLeave};
pub use relay::PARTNER_LEFT_REASON;
pub use server::Server;
