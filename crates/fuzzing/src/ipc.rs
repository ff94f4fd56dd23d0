//! The secure-talk pipe IPC framing (`common::envelope::ipc`), raw and JSON lines: what a pipe
//! program writes to the daemon's socket.

use common::envelope::ipc::{self, Frame, Protocol};

/// A small largest frame, so inputs of a few KiB reach it.
const MAX_FRAME: usize = 1024;

/// A connection's bytes: the protocol its first byte picks, frames decoded until the buffer
/// runs out or breaks; then both decoders on the same bytes.
pub fn ipc(data: &[u8]) {
    let Some(&first) = data.first() else {
        return;
    };
    let protocol = Protocol::detect(first);
    let mut rest = data;
    while let Ok(Some((frame, used))) = protocol.decode(rest, MAX_FRAME) {
        assert!(
            used > 0 && used <= rest.len(),
            "used {used} of {}",
            rest.len()
        );
        let (taken, after) = rest.split_at(used);
        // One byte less is incomplete, never an error.
        assert_eq!(protocol.decode(&taken[..used - 1], MAX_FRAME), Ok(None));
        check(protocol, &frame, taken);
        rest = after;
    }
    for protocol in [Protocol::Raw, Protocol::Json] {
        if let Ok(Some((frame, used))) = protocol.decode(data, MAX_FRAME) {
            check(protocol, &frame, &data[..used]);
        }
    }
}

fn check(protocol: Protocol, frame: &Frame, taken: &[u8]) {
    match protocol {
        Protocol::Raw => {
            assert!(taken.len() <= MAX_FRAME);
            // The raw form is canonical: re-encoding gives the very bytes.
            assert_eq!(frame.encode().as_deref(), Ok(taken));
        }
        Protocol::Json => {
            let line = frame.encode_json_line();
            let again = ipc::decode_json_line(&line, usize::MAX);
            assert_eq!(again, Ok(Some((frame.clone(), line.len()))));
        }
    }
}
