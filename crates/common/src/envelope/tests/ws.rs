use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::envelope::ws::{
    Decoder, Event, Kind, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT, close_payload,
    encode_frame_header,
};

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = encode_frame_header(opcode, payload.len());
    if !fin {
        out[0] &= 0x7f;
    }
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Every event, feeding `input` in pieces of `step` bytes; data pieces joined per message.
fn events(input: &[u8], step: usize) -> Result<Vec<Event>, String> {
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::new();
    let mut out: Vec<Event> = Vec::new();
    for piece in input.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(event) = decoder.decode(&mut buf).map_err(|e| e.to_string())? {
            match (out.last_mut(), event) {
                (Some(Event::Data(have)), Event::Data(more)) => {
                    *have = Bytes::from([have.as_ref(), more.as_ref()].concat());
                }
                (_, event) => out.push(event),
            }
        }
    }
    Ok(out)
}

#[test]
fn a_fragmented_message_with_a_ping_between() {
    let mask = [1, 2, 3, 4];
    let mut input = frame(false, OP_BINARY, b"head\x01", mask);
    input.extend(frame(true, OP_PING, b"p", mask));
    input.extend(frame(false, OP_CONTINUATION, b"", mask));
    input.extend(frame(true, OP_CONTINUATION, b"tail", [9, 8, 7, 6]));
    input.extend(frame(true, OP_TEXT, "é".as_bytes(), mask));
    input.extend(frame(true, OP_CLOSE, &close_payload(1000, "bye"), mask));
    let expected = vec![
        Event::Start {
            kind: Kind::Binary,
            declared: 5,
        },
        Event::Data(Bytes::from_static(b"head\x01")),
        Event::Ping(Bytes::from_static(b"p")),
        Event::More { declared: 0 },
        Event::More { declared: 4 },
        Event::Data(Bytes::from_static(b"tail")),
        Event::End,
        Event::Start {
            kind: Kind::Text,
            declared: 2,
        },
        Event::Data(Bytes::from("é".as_bytes().to_vec())),
        Event::End,
        Event::Close(Some((1000, "bye".into()))),
    ];
    for step in [1, 2, 3, 7, 1000] {
        assert_eq!(events(&input, step).unwrap(), expected, "step {step}");
    }
}

#[test]
fn a_big_frame_is_announced_before_its_bytes() {
    // The header alone says 128 MiB are coming: a caller can refuse before any arrive.
    let mut header = encode_frame_header(OP_BINARY, 128 << 20);
    header[1] |= 0x80;
    header.extend_from_slice(&[0; 4]);
    assert_eq!(
        events(&header, 100).unwrap(),
        [Event::Start {
            kind: Kind::Binary,
            declared: 128 << 20
        }]
    );
}

#[test]
fn protocol_errors() {
    let mask = [0; 4];
    let unmasked = encode_frame_header(OP_TEXT, 1)
        .into_iter()
        .chain(*b"x")
        .collect::<Vec<_>>();
    let mut reserved = frame(true, OP_TEXT, b"x", mask);
    reserved[0] |= 0x40;
    for (input, why) in [
        (unmasked, "unmasked"),
        (reserved, "reserved"),
        (frame(false, OP_PING, b"", mask), "fragmented control"),
        (frame(true, OP_PING, &[0; 126], mask), "over 125"),
        (frame(true, OP_CONTINUATION, b"x", mask), "continuation"),
        (
            [
                frame(false, OP_TEXT, b"x", mask),
                frame(true, OP_TEXT, b"x", mask),
            ]
            .concat(),
            "new message",
        ),
        (frame(true, 0x3, b"", mask), "unknown opcode"),
        (frame(true, OP_CLOSE, b"\x03", mask), "one-byte"),
        (frame(true, OP_CLOSE, b"\x03\xe8\xff", mask), "not UTF-8"),
    ] {
        let err = events(&input, 1000).unwrap_err();
        assert!(err.contains(why), "{why}: {err}");
    }
}

#[test]
fn close_reasons_are_cut_on_a_character_boundary() {
    let payload = close_payload(1009, &"é".repeat(100));
    assert!(payload.len() <= 125);
    assert!(std::str::from_utf8(&payload[2..]).is_ok());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512), step in 1usize..64) {
        let _ = events(&input, step);
    }

    #[test]
    fn any_split_gives_the_same_message(
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(0usize..2000, 0..4),
        mask in any::<[u8; 4]>(),
        step in 1usize..300,
    ) {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(payload.len())).collect();
        cuts.sort_unstable();
        cuts.push(payload.len());
        let mut input = Vec::new();
        let mut from = 0;
        for (i, to) in cuts.iter().enumerate() {
            let opcode = if i == 0 { OP_BINARY } else { OP_CONTINUATION };
            input.extend(frame(i + 1 == cuts.len(), opcode, &payload[from..*to], mask));
            from = *to;
        }
        let got = events(&input, step).unwrap();
        let data: Vec<u8> = got
            .iter()
            .filter_map(|e| match e { Event::Data(d) => Some(d.to_vec()), _ => None })
            .flatten()
            .collect();
        prop_assert_eq!(data, payload);
        prop_assert_eq!(got.last(), Some(&Event::End));
    }
}
