//! Sans-IO message types and framing codecs shared by the daemons.
//!
//! - [`micronets`]: the Micronets `{"message": {...}}` envelope carried through ws-proxy: HELLO
//!   validation with the original proxy's rules, REST:REQUEST, REST:RESPONSE and EVENT:*
//!   messages, and the body conversions between HTTP bytes and `dataFormat`/`messageBody`.
//! - [`talk`]: secure-talk websocket messages, both the JSON text form and the binary
//!   `header 0x01 payload 0x01 md5` upload framing.
//! - [`ipc`]: secure-talk's pipe IPC frames, raw (big-endian length and type) and one JSON object
//!   per line.
//! - [`ws`]: the server side of websocket framing, streaming: payload bytes as they arrive, so
//!   a daemon holds what it chooses of a message, not the whole of it.
//!
//! Everything here takes bytes or text and returns values: no tokio, no sockets, no clocks.
//! Size limits are parameters; the callers choose them. This module does not know which daemon
//! uses a message or what a pipe does with it.

pub mod ipc;
pub mod micronets;
pub mod talk;
pub mod ws;

#[cfg(test)]
mod tests;
