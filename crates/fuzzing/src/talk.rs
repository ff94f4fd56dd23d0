//! The secure-talk websocket messages (`common::envelope::talk`): JSON text messages and the
//! binary upload form.

use common::envelope::talk::{BinaryMessage, Limits, Message};

/// Small limits, so inputs of a few KiB reach them.
const LIMITS: Limits = Limits {
    max_header: 2048,
    max_payload: 4096,
};

/// A message's bytes through both decoders.
pub fn talk(data: &[u8]) {
    if let Ok(message) = Message::decode(data, LIMITS.max_header) {
        let text = message.encode();
        let again = Message::decode(text.as_bytes(), usize::MAX).expect("re-decodes");
        assert_eq!(again, message, "{text}");
        let _ = message.method();
    }
    if let Ok(binary) = BinaryMessage::decode(data, LIMITS) {
        assert!(binary.payload.len() <= LIMITS.max_payload);
        let bytes = binary.encode();
        let again = BinaryMessage::decode(&bytes, Limits::DEFAULT).expect("re-decodes");
        assert_eq!(again, binary);
        assert_eq!(binary.verify().is_ok(), binary.checksum_ok());
    }
}
