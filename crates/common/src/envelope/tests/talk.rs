use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::envelope::talk::{
    BinaryMessage, Headers, Limits, MAX_CHECKSUM_LEN, Message, TalkError, md5_hex, method,
};

const MAX: usize = 4096;

#[test]
fn text_decode_table() {
    let check = |input: &str, expected: Result<Value, TalkError>| {
        let got = Message::decode(input.as_bytes(), MAX);
        match (got, expected) {
            (Ok(message), Ok(value)) => {
                assert_eq!(
                    serde_json::to_value(&message).unwrap(),
                    value,
                    "input {input}"
                );
            }
            (Err(TalkError::Json(_)), Err(TalkError::Json(_))) => {}
            (got, expected) => assert_eq!(got.map(|_| ()), expected.map(|_| ()), "input {input}"),
        }
    };
    let json_err = || Err(TalkError::Json(String::new()));

    check(
        r#"{"headers":{"method":"text","code":200},"payload":"pipe_create 0"}"#,
        Ok(json!({"headers": {"method": "text", "code": 200}, "payload": "pipe_create 0"})),
    );
    check(
        r#"{"headers":{"method":"pipe_id"},"payload":[0,1],"code":200}"#,
        Ok(json!({"headers": {"method": "pipe_id"}, "payload": [0, 1], "code": 200})),
    );
    check(
        r#"{"headers":{"method":"property","pipe_id":"3"},"payload":{"a":1},"checkSum":"x"}"#,
        Ok(
            json!({"headers": {"method": "property", "pipe_id": 3}, "payload": {"a": 1},
            "checkSum": "x"}),
        ),
    );
    check(
        r#"{"headers":{"type":4,"pipe_id":0,"extra":true},"payload":"AA==","more":1}"#,
        Ok(
            json!({"headers": {"type": 4, "pipe_id": 0, "extra": true}, "payload": "AA==",
            "more": 1}),
        ),
    );
    check(
        r#"{"headers":{"method":"text","pipe_id":null},"payload":null}"#,
        Ok(json!({"headers": {"method": "text"}, "payload": null})),
    );
    check(r#"{"headers":{}}"#, Ok(json!({"headers": {}})));
    check("not json", json_err());
    check("", json_err());
    check("[]", Err(TalkError::NotObject));
    check(r#"{"payload":"x"}"#, Err(TalkError::NoHeaders));
    check(r#"{"headers":"text"}"#, Err(TalkError::NoHeaders));
    check(r#"{"headers":{"method":"d","pipe_id":-1}}"#, json_err());
    check(r#"{"headers":{"method":"d","pipe_id":"x"}}"#, json_err());
    check(r#"{"headers":{"method":5}}"#, json_err());
    check(r#"{"headers":{},"code":"200"}"#, json_err());
    assert_eq!(
        Message::decode(b"{\"headers\":{}}", 5),
        Err(TalkError::TooLarge {
            what: "text message",
            len: 14,
            max: 5
        })
    );
}

#[test]
fn reply_builders() {
    let check = |message: Message, expected: Value| {
        let text = message.encode();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, expected);
        assert_eq!(Message::decode(text.as_bytes(), MAX).unwrap(), message);
    };
    check(
        Message::text(400, "pipe 9 not exists"),
        json!({"headers": {"method": "text", "code": 400}, "payload": "pipe 9 not exists"}),
    );
    check(
        Message::pipe_ids(&[0, 2]),
        json!({"headers": {"method": "pipe_id"}, "payload": [0, 2]}),
    );
    check(
        Message::pipe_info(2, json!({"pipe_num": 1})),
        json!({"headers": {"method": "pipe_info", "pipe_id": 2}, "payload": {"pipe_num": 1}}),
    );
    check(
        Message::pipe_delete(2),
        json!({"headers": {"method": "pipe_delete"}, "payload": [2]}),
    );
    check(
        Message::pipe_message(2, "boom"),
        json!({"headers": {"method": "pipe_message", "pipe_id": 2}, "payload": "boom"}),
    );
    check(
        Message::check_sum(json!({"m": {"f": "abc"}})),
        json!({"headers": {"method": "checkSum"}, "payload": {"m": {"f": "abc"}}}),
    );
    check(
        Message::error("busy"),
        json!({"headers": {"method": "error"}, "payload": "busy"}),
    );
    check(
        Message::data(5, 1, json!("text out")),
        json!({"headers": {"type": 5, "pipe_id": 1}, "payload": "text out"}),
    );
    assert_eq!(Message::data(5, 1, Value::Null).method(), "");
    assert_eq!(Message::error("x").method(), method::ERROR);
}

fn framed(header: &str, payload: &[u8], check_sum: &str) -> Vec<u8> {
    [header.as_bytes(), &[1], payload, &[1], check_sum.as_bytes()].concat()
}

#[test]
fn md5_vectors() {
    // RFC 1321 test suite.
    assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    assert_eq!(
        md5_hex(b"message digest"),
        "f96b697d7cb7938d525a2f31aaf161d0"
    );
}

#[test]
fn binary_decode_table() {
    let limits = Limits {
        max_header: 64,
        max_payload: 16,
    };
    let check = |input: Vec<u8>, expected: Result<(Headers, &[u8], &str), TalkError>| {
        let got = BinaryMessage::decode(&input, limits);
        match (got, expected) {
            (Ok(m), Ok((headers, payload, check_sum))) => {
                assert_eq!(m.headers, headers, "input {input:02x?}");
                assert_eq!(&m.payload[..], payload);
                assert_eq!(m.check_sum, check_sum);
            }
            (Err(TalkError::Json(_)), Err(TalkError::Json(_))) => {}
            (got, expected) => {
                assert_eq!(got.map(|_| ()), expected.map(|_| ()), "input {input:02x?}");
            }
        }
    };
    let push = Headers::method(method::CHECK_SUM).with_path("/srv/models/model_info.json");
    let sum = md5_hex(b"{\"a\":1}");
    check(
        framed(
            r#"{"method":"checkSum","path":"/srv/models/model_info.json"}"#,
            b"{\"a\":1}",
            &sum,
        ),
        Ok((push, b"{\"a\":1}", &sum)),
    );
    check(
        framed(r#"{"method":"create"}"#, b"\x01\x01", "x"),
        Ok((Headers::method("create"), b"\x01\x01", "x")),
    );
    check(
        framed(r#"{"method":"model","path":"a/b.bin"}"#, b"", ""),
        Ok((Headers::method("model").with_path("a/b.bin"), b"", "")),
    );
    check(
        framed(r#"{"method":"property","pipe_id":"7"}"#, b"{}", "Z"),
        Ok((Headers::method("property").with_pipe_id(7), b"{}", "Z")),
    );
    check(b"{}".to_vec(), Err(TalkError::Separator));
    check(b"{}\x01abc".to_vec(), Err(TalkError::Separator));
    check(Vec::new(), Err(TalkError::Separator));
    check(framed("[]", b"", ""), Err(TalkError::NotObject));
    check(framed("{", b"", ""), Err(TalkError::Json(String::new())));
    check(
        framed(r#"{"method":"x","pipe_id":-1}"#, b"", ""),
        Err(TalkError::Json(String::new())),
    );
    check(framed("{}", b"", "not hex"), Err(TalkError::ChecksumText));
    check(
        framed("{}", b"", &"a".repeat(MAX_CHECKSUM_LEN + 1)),
        Err(TalkError::ChecksumText),
    );
    check(framed("{}", b"", "\u{e9}"), Err(TalkError::ChecksumText));
    check(
        framed("{}", &[0; 17], ""),
        Err(TalkError::TooLarge {
            what: "binary message payload",
            len: 17,
            max: 16,
        }),
    );
    let long_header = format!(r#"{{"method":"{}"}}"#, "m".repeat(60));
    check(
        framed(&long_header, b"", ""),
        Err(TalkError::TooLarge {
            what: "binary message headers",
            len: 65,
            max: 64,
        }),
    );
    check(
        vec![b' '; 64 + 16 + MAX_CHECKSUM_LEN + 3],
        Err(TalkError::TooLarge {
            what: "binary message",
            len: 64 + 16 + MAX_CHECKSUM_LEN + 3,
            max: 64 + 16 + MAX_CHECKSUM_LEN + 2,
        }),
    );
}

#[test]
fn checksum_verification() {
    let message = BinaryMessage::new(Headers::method(method::MODEL), &b"hello world"[..]);
    assert_eq!(message.check_sum, "5eb63bbbe01eeed093cb22bb8f5acdc3");
    assert!(message.checksum_ok());
    assert_eq!(message.verify(), Ok(()));
    let upper = BinaryMessage {
        check_sum: message.check_sum.to_uppercase(),
        ..message.clone()
    };
    assert!(upper.checksum_ok());
    let wrong = BinaryMessage {
        payload: Bytes::from_static(b"hello worle"),
        ..message.clone()
    };
    assert!(!wrong.checksum_ok());
    assert_eq!(
        wrong.verify(),
        Err(TalkError::ChecksumMismatch {
            sent: message.check_sum.clone(),
            computed: md5_hex(b"hello worle"),
        })
    );
    let wire = message.encode();
    assert!(wire.starts_with(b"{\"method\":\"model\"}\x01hello world\x01"));
    assert!(wire.ends_with(b"5eb63bbbe01eeed093cb22bb8f5acdc3"));
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn extra() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map("x-[a-z]{1,6}", json_value(), 0..3)
        .prop_map(|m| m.into_iter().collect())
}

fn any_headers() -> impl Strategy<Value = Headers> {
    (
        proptest::option::of(".{0,10}"),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<i64>()),
        proptest::option::of(".{0,10}"),
        proptest::option::of(any::<u32>()),
        extra(),
    )
        .prop_map(|(method, pipe_id, code, path, kind, extra)| Headers {
            method,
            pipe_id,
            code,
            path,
            kind,
            extra,
        })
}

fn any_message() -> impl Strategy<Value = Message> {
    (
        any_headers(),
        proptest::option::of(json_value()),
        proptest::option::of("[0-9a-f]{32}"),
        proptest::option::of(any::<i64>()),
        extra(),
    )
        .prop_map(|(headers, payload, check_sum, code, extra)| Message {
            headers,
            payload,
            check_sum,
            code,
            extra,
        })
}

proptest! {
    #[test]
    fn text_round_trip(message in any_message()) {
        let text = message.encode();
        prop_assert_eq!(Message::decode(text.as_bytes(), text.len()).unwrap(), message);
    }

    #[test]
    fn binary_round_trip(headers in any_headers(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let message = BinaryMessage::new(headers, payload);
        let wire = message.encode();
        let limits = Limits { max_header: wire.len(), max_payload: message.payload.len() };
        let back = BinaryMessage::decode(&wire, limits).unwrap();
        prop_assert!(back.checksum_ok());
        prop_assert_eq!(back, message);
    }

    #[test]
    fn text_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), max in 0usize..100) {
        let _ = Message::decode(&bytes, max);
    }

    #[test]
    fn text_decode_never_panics_on_jsonish(text in r#"[{}\[\]":,0-9a-z_ \-]{0,80}"#) {
        let _ = Message::decode(text.as_bytes(), MAX);
        let _ = Message::decode(format!(r#"{{"headers":{{"pipe_id":{text}}}}}"#).as_bytes(), MAX);
    }

    #[test]
    fn binary_decode_never_panics(
        bytes in proptest::collection::vec(prop_oneof![Just(1u8), any::<u8>()], 0..80),
        max_header in 0usize..40,
        max_payload in 0usize..40,
    ) {
        let limits = Limits { max_header, max_payload };
        if let Ok(message) = BinaryMessage::decode(&bytes, limits) {
            prop_assert!(message.payload.len() <= max_payload);
        }
    }
}

#[test]
fn md5_by_pieces_is_md5_of_the_whole() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let mut stream = crate::envelope::talk::Md5Stream::default();
    for piece in data.chunks(333) {
        stream.update(piece);
    }
    assert_eq!(stream.finish(), crate::envelope::talk::md5_hex(&data));
}
