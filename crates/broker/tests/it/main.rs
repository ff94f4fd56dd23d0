//! Integration tests: a real broker on a temporary Unix socket (SQLite, or PostgreSQL when
//! `BROKER_TEST_PG` is set), the real client library and the real binaries.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod support;

mod api;
mod cli;
mod e2e;
mod front;
mod isolation;
mod logs;
mod metrics;
mod revocation;
mod run;
mod timers;
mod usage;
