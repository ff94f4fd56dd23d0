//! ws-proxy integration tests: the real proxy on 127.0.0.1:0 with real TLS and certificates
//! from the test PKI, real peers from the client library, real processes for the CLI.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failures, like the tests"
)]

mod e2e;
mod framing;
mod front;
mod front_trust;
mod haproxy;
mod heads;
mod interop;
mod logs;
mod memory;
mod metrics;
mod process;
mod refusals;
mod relay;
mod revocation;
mod startup;
mod status;
mod support;
mod timers;
mod usage;
