//! The server side of websocket framing (`common::envelope::ws`): secure-talk's streaming
//! decoder of client frames.

use bytes::BytesMut;
use common::envelope::ws::{Decoder, Event, ProtocolError};

/// A client's bytes decoded whole and in pieces of the size the first byte says: the events
/// are the same, up to how the payload is cut into `Data` pieces.
pub fn ws(data: &[u8]) {
    let Some((&piece, bytes)) = data.split_first() else {
        return;
    };
    let whole = events(bytes, bytes.len().max(1));
    let pieces = events(bytes, usize::from(piece).max(1));
    assert_eq!(whole, pieces);
}

/// The events until the decoder wants more than there is or fails, `Data` pieces joined.
fn events(bytes: &[u8], piece: usize) -> (Vec<Event>, Option<ProtocolError>) {
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::new();
    let mut out: Vec<Event> = Vec::new();
    for chunk in bytes.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Event::Data(data))) => {
                    if let Some(Event::Data(last)) = out.last_mut() {
                        let mut joined = BytesMut::from(&last[..]);
                        joined.extend_from_slice(&data);
                        *last = joined.freeze();
                    } else if !data.is_empty() {
                        out.push(Event::Data(data));
                    }
                }
                Ok(Some(event)) => out.push(event),
                Ok(None) => break,
                Err(err) => return (out, Some(err)),
            }
        }
    }
    (out, None)
}
