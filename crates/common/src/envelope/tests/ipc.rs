use bytes::Bytes;
use proptest::prelude::*;

use crate::envelope::ipc::{
    DEFAULT_MAX_FRAME, Frame, HEADER_LEN, IpcError, Kind, Protocol, decode, decode_json_line, kind,
};

fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text.replace(' ', "")).unwrap()
}

#[test]
fn readme_example_encodes() {
    let frame = Frame::new(kind::CONFIG, &b"hello world"[..]);
    assert_eq!(
        frame.encode().unwrap(),
        unhex("00 00 00 13 00 00 00 02 68 65 6c 6c 6f 20 77 6f 72 6c 64")
    );
}

#[test]
fn raw_decode_table() {
    type Expected = Result<Option<(Kind, &'static [u8], usize)>, IpcError>;
    let check = |input: &str, max: usize, expected: Expected| {
        let got = decode(&unhex(input), max)
            .map(|o| o.map(|(frame, used)| (frame.kind, frame.payload.to_vec(), used)));
        let expected = expected.map(|o| o.map(|(k, p, used)| (k, p.to_vec(), used)));
        assert_eq!(got, expected, "input {input}");
    };
    let max = DEFAULT_MAX_FRAME;
    let hello = "00 00 00 13 00 00 00 02 68 65 6c 6c 6f 20 77 6f 72 6c 64";
    check(hello, max, Ok(Some((Kind::Config, b"hello world", 19))));
    check(
        &format!("{hello} 00 00"),
        max,
        Ok(Some((Kind::Config, b"hello world", 19))),
    );
    check(hello, 19, Ok(Some((Kind::Config, b"hello world", 19))));
    check(hello, 18, Err(IpcError::TooLong { len: 19, max: 18 }));
    check("", max, Ok(None));
    check("00 00 00", max, Ok(None));
    check("00 00 00 13", max, Ok(None));
    check("00 00 00 13 00 00 00 02 68 65", max, Ok(None));
    check(
        "00 00 00 08 00 00 00 00",
        max,
        Ok(Some((Kind::Text, b"", 8))),
    );
    check(
        "00 00 00 09 00 00 00 01 30",
        max,
        Ok(Some((Kind::PipeId, b"0", 9))),
    );
    check(
        "00 00 00 08 00 00 00 63",
        max,
        Ok(Some((Kind::Unknown(99), b"", 8))),
    );
    check("00 00 00 07 00 00 00 00", max, Err(IpcError::TooShort(7)));
    check("00 00 00 00", max, Err(IpcError::TooShort(0)));
    check(
        "ff ff ff ff",
        max,
        Err(IpcError::TooLong {
            len: 0xffff_ffff,
            max,
        }),
    );
}

#[test]
fn kind_numbers_and_names() {
    let table = [
        (Kind::Text, 0, "text"),
        (Kind::PipeId, 1, "pipe_id"),
        (Kind::Config, 2, "config"),
        (Kind::Launch, 3, "launch"),
        (Kind::Property, 4, "property"),
        (Kind::Destroy, 5, "destroy"),
        (Kind::Binary, 6, "binary"),
        (Kind::Error, 7, "error"),
    ];
    for (k, n, name) in table {
        assert_eq!(k.number(), n);
        assert_eq!(Kind::from_number(n), k);
        assert_eq!(k.name(), Some(name));
        assert_eq!(Kind::from_name(name), Some(k));
    }
    assert_eq!(Kind::from_number(8), Kind::Unknown(8));
    assert_eq!(u32::from(Kind::Unknown(8)), 8);
    assert_eq!(Kind::Unknown(8).name(), None);
    assert_eq!(Kind::from_name("nope"), None);
}

#[test]
fn json_line_table() {
    type Expected = Result<Option<(Kind, &'static [u8], usize)>, ()>;
    let check = |input: &str, max: usize, expected: Expected| {
        let got = decode_json_line(input.as_bytes(), max)
            .map(|o| o.map(|(frame, used)| (frame.kind, frame.payload.to_vec(), used)))
            .map_err(|_| ());
        let expected = expected.map(|o| o.map(|(k, p, used)| (k, p.to_vec(), used)));
        assert_eq!(got, expected, "input {input:?}");
    };
    let max = 1024;
    check(
        "{\"type\": 2, \"payload\": \"hello world\"}\n",
        max,
        Ok(Some((Kind::Config, b"hello world", 38))),
    );
    check(
        "{\"type\":\"launch\",\"payload\":\"x\"}\nmore",
        max,
        Ok(Some((Kind::Launch, b"x", 32))),
    );
    check(
        "\n  \r\n{\"type\":1,\"payload\":\"7\"}\r\n",
        max,
        Ok(Some((Kind::PipeId, b"7", 31))),
    );
    check(
        "{\"type\":6,\"payload\":\"AAH/\",\"encoding\":\"base64\"}\n",
        max,
        Ok(Some((Kind::Binary, b"\x00\x01\xff", 48))),
    );
    check("{\"type\":5}\n", max, Ok(Some((Kind::Destroy, b"", 11))));
    check("{\"type\":2,\"payload\":\"x\"}", max, Ok(None));
    check("\n\n", max, Ok(None));
    check("", max, Ok(None));
    check("{\"type\":2,\"payload\":\"x\"}", 10, Err(()));
    check("{\"type\":2,\"payload\":\"xxxxxxxxxx\"}\n", 10, Err(()));
    check("not json\n", max, Err(()));
    check("[1]\n", max, Err(()));
    check("{\"payload\":\"x\"}\n", max, Err(()));
    check("{\"type\":-1}\n", max, Err(()));
    check("{\"type\":\"bogus\"}\n", max, Err(()));
    check("{\"type\":0,\"payload\":5}\n", max, Err(()));
    check(
        "{\"type\":0,\"payload\":\"!\",\"encoding\":\"base64\"}\n",
        max,
        Err(()),
    );
    check(
        "{\"type\":0,\"payload\":\"x\",\"encoding\":\"rot13\"}\n",
        max,
        Err(()),
    );
}

#[test]
fn json_line_encoding() {
    let line = Frame::new(kind::CONFIG, &b"hello world"[..]).encode_json_line();
    let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"type": 2, "payload": "hello world"})
    );
    assert_eq!(line.last(), Some(&b'\n'));
    let line = Frame::new(kind::BINARY, vec![0xff_u8, 0]).encode_json_line();
    let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"type": 6, "payload": "/wA=", "encoding": "base64"})
    );
}

#[test]
fn protocol_detection() {
    assert_eq!(Protocol::detect(0x00), Protocol::Raw);
    assert_eq!(Protocol::detect(b'{'), Protocol::Json);
    assert_eq!(Protocol::detect(b'\n'), Protocol::Json);
    let frame = Frame::new(Kind::Property, &b"{}"[..]);
    for protocol in [Protocol::Raw, Protocol::Json] {
        let wire = protocol.encode(&frame).unwrap();
        assert_eq!(Protocol::detect(wire[0]), protocol);
        let (back, used) = protocol.decode(&wire, 64).unwrap().unwrap();
        assert_eq!((back, used), (frame.clone(), wire.len()));
    }
}

fn any_frame() -> impl Strategy<Value = Frame> {
    (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(k, payload)| Frame::new(k, Bytes::from(payload)))
}

proptest! {
    #[test]
    fn raw_round_trip(frame in any_frame(), tail in proptest::collection::vec(any::<u8>(), 0..20)) {
        let mut wire = frame.encode().unwrap();
        let len = wire.len();
        prop_assert_eq!(len, HEADER_LEN + frame.payload.len());
        for cut in 0..len {
            prop_assert_eq!(decode(&wire[..cut], len), Ok(None));
        }
        wire.extend_from_slice(&tail);
        prop_assert_eq!(decode(&wire, len), Ok(Some((frame, len))));
    }

    #[test]
    fn json_round_trip(frame in any_frame()) {
        let line = frame.encode_json_line();
        prop_assert_eq!(decode_json_line(&line, line.len()), Ok(Some((frame, line.len()))));
        prop_assert_eq!(decode_json_line(&line[..line.len() - 1], line.len()), Ok(None));
    }

    #[test]
    fn raw_decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..100) {
        if let Ok(Some((frame, used))) = decode(&buf, max) {
            prop_assert!(used >= HEADER_LEN && used <= max && used <= buf.len());
            prop_assert_eq!(frame.payload.len(), used - HEADER_LEN);
        }
    }

    #[test]
    fn json_decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..100) {
        if let Ok(Some((_, used))) = decode_json_line(&buf, max) {
            prop_assert!(used <= buf.len());
        }
    }

    #[test]
    fn json_decode_never_panics_on_jsonish(text in "[{}\":,a-z0-9 \n\\\\]{0,60}") {
        let _ = decode_json_line(text.as_bytes(), 64);
    }
}
