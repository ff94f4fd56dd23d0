//! Tests of the envelope codecs.

mod ipc;
mod micronets;
mod talk;
mod ws;
