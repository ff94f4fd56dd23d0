//! The Micronets envelope (`common::envelope::micronets`): ws-proxy's HELLO check and the
//! peers' message parser, on text and binary frames.

use common::envelope::micronets::{
    self, HelloError, MAX_CLOSE_REASON, Message, validate_hello, validate_hello_binary,
};

/// A frame's bytes through the HELLO check and the message parser, as text and as binary.
pub fn micronets(data: &[u8]) {
    check_hello(validate_hello_binary(data));
    if let Ok(message) = micronets::parse_binary(data) {
        round_trip(&message);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let hello = validate_hello(text);
    check_hello(hello.clone());
    if let Ok(message) = micronets::parse(text) {
        round_trip(&message);
        // The HELLO rules are looser than the strict parser (Python's JSON), never stricter.
        if let Message::Hello(strict) = &message {
            let loose = hello.expect("a HELLO the strict parser takes passes the HELLO check");
            assert_eq!(loose.message_id, strict.message_id);
            assert_eq!(loose.requires_response, strict.requires_response);
            assert_eq!(loose.peer_class, strict.peer_class);
            assert_eq!(loose.peer_id, strict.peer_id);
        }
    }
}

fn check_hello(hello: Result<micronets::Hello, HelloError>) {
    match hello {
        Ok(hello) => {
            // What passed passes again once re-encoded, unchanged.
            let text = Message::Hello(hello.clone()).encode();
            assert_eq!(validate_hello(&text), Ok(hello));
        }
        Err(err) => assert!(err.close_reason().len() <= MAX_CLOSE_REASON),
    }
}

fn round_trip(message: &Message) {
    let text = message.encode();
    let again = micronets::parse(&text).expect("an encoded message parses");
    assert_eq!(&again, message, "{text}");
    let _ = message.message_id();
    let _ = message.in_response_to();
    let _ = match message {
        Message::RestRequest(m) => m.body_bytes().map(drop),
        Message::RestResponse(m) => m.body_bytes().map(drop),
        Message::Hello(_) | Message::Event(_) | Message::Other(_) => Ok(()),
    };
}
