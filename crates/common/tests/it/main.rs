//! Integration tests of `common` over real sockets with the test PKI.
#![allow(clippy::unwrap_used, reason = "test helpers fail loudly")]

mod admission;
mod daemon;
mod metrics;
mod tls;
mod usage;
