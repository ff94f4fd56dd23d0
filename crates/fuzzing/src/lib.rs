//! The parsers that read bytes from a peer, each driven by one function that fuzz targets
//! (`fuzz/`, cargo-fuzz on nightly) and the replay test (`tests/it`, stable) both call.
//!
//! A function takes arbitrary bytes, feeds them to one parser (or a few that read the same
//! input) and checks what holds beyond "no panic" where it is cheap: what decodes encodes and
//! decodes to the same value, a streaming decoder gives the same result whatever the pieces,
//! an incomplete prefix is incomplete, not an error, and sizes stay within their limits. A
//! broken invariant panics, which is what libFuzzer reports as a crash.
//!
//! Kept inputs live in `fuzz/corpus/<target>/` (a few seeds) and `fuzz/regressions/<target>/`
//! (every input that found a bug); [`TARGETS`] names them. This crate knows nothing about
//! sockets: the async readers it drives read from memory.

mod broker;
mod cert;
mod ipc;
mod micronets;
mod remo;
mod signing;
mod talk;
mod ws;

pub use broker::broker;
pub use cert::cert_identity;
pub use ipc::ipc;
pub use micronets::micronets;
pub use remo::remo;
pub use signing::signing_path;
pub use talk::talk;
pub use ws::ws;

/// A target's function: arbitrary bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus` and `fuzz/regressions`, and the
/// file under `fuzz/fuzz_targets`) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("micronets", micronets),
    ("talk", talk),
    ("ipc", ipc),
    ("remo", remo),
    ("signing_path", signing_path),
    ("broker", broker),
    ("cert_identity", cert_identity),
    ("ws", ws),
];
