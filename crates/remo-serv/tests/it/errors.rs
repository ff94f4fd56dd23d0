//! Every row of the status table (spec §11 as modified by the decisions): clean 4xx answers,
//! never a 500, never a dropped connection, and the server still answers afterwards.

use bytes::Bytes;
use remo_serv::client::ClientError;
use remo_serv::keys::PrivateKey;
use remo_serv::proto::{self, AuthRequest, Cipher, Magic};

use crate::harness::{
    FIRST, Harness, LAST, MIDDLE, ONLY, Raw, RawBody, RawSession, USER, now, random_bytes, request,
};

/// Not logged in: 403 with an empty body (Content-Length 0) everywhere but `/auth` and
/// `/info`; other `/info…` paths are 404. Each answer hands out a session cookie.
#[tokio::test]
async fn anonymous_requests_get_403_or_404() {
    let h = Harness::start().await;
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("POST", "/cmd/anything", None, 403),
        ("GET", "/get/anything", None, 403),
        ("POST", "/put/name", None, 403),
        ("POST", "/icm/x", None, 403),
        ("POST", "/idt", None, 403),
        ("POST", "/edt", None, 403),
        ("POST", "/", None, 403),
        ("POST", "/nowhere", None, 403),
        ("POST", "/cmd/x", Some("SESSION_ID=unknown"), 403),
        ("POST", "/cmd/x", Some("SESSION_ID="), 403),
        ("POST", "/infox", None, 404),
        ("GET", "/info/", None, 404),
        ("POST", "/info.txt", None, 404),
        ("POST", "/info/x", Some("SESSION_ID=unknown"), 404),
    ];
    for &(method, path, cookie, status) in cases {
        let answer = request(
            h.addr,
            method,
            path,
            cookie,
            RawBody::Length("a body".into()),
        )
        .await;
        assert_eq!(answer.status, status, "{method} {path}");
        assert_eq!(answer.header("content-length"), Some("0"), "{path}");
        assert!(answer.session_id().is_some(), "{path}: a cookie");
    }
    assert_eq!(h.server.sessions(), 0, "anonymous requests store nothing");
    h.stop().await;
}

#[tokio::test]
async fn login_refusals() {
    let h = Harness::start().await;
    let user = h.keys.user_key();
    let public = proto::x448_public(&proto::x448_secret());
    let other_public = proto::x448_public(&proto::x448_secret());
    let sign = |name: &str, key: &[u8]| user.sign(&AuthRequest::signed_message(name, key));
    let json = |name: &str, key: &[u8], signature: &[u8]| {
        AuthRequest {
            user: name.into(),
            key: key.to_vec(),
            sign: signature.to_vec(),
        }
        .to_json()
    };
    let good_sign = sign(USER, &public);
    let key_b64 = proto::b64u(&public);
    let sign_b64 = proto::b64u(&good_sign);
    let long_key = [public.as_slice(), &[1]].concat();
    let stranger = PrivateKey::generate().sign(&AuthRequest::signed_message(USER, &public));
    let cases: Vec<(&str, Bytes, u16)> = vec![
        (
            "unknown user",
            json("mallory", &public, &sign("mallory", &public)).into(),
            403,
        ),
        (
            "user names are case-sensitive",
            json("Alice", &public, &sign("Alice", &public)).into(),
            403,
        ),
        (
            "signature of zeros",
            json(USER, &public, &[0; 114]).into(),
            403,
        ),
        (
            "signature by another key",
            json(USER, &public, &stranger).into(),
            403,
        ),
        (
            "signature over another user name",
            json(USER, &public, &sign("bob", &public)).into(),
            403,
        ),
        (
            "signature over another X448 key",
            json(USER, &public, &sign(USER, &other_public)).into(),
            403,
        ),
        (
            "truncated signature",
            json(USER, &public, &good_sign[..113]).into(),
            403,
        ),
        ("not JSON", "{\"user\": ".into(), 400),
        (
            "missing member",
            format!(r#"{{"user": "alice", "key": "{key_b64}"}}"#).into(),
            400,
        ),
        (
            "member not a string",
            format!(r#"{{"user": ["alice"], "key": "{key_b64}", "sign": "{sign_b64}"}}"#).into(),
            400,
        ),
        ("JSON array", r#"["alice"]"#.into(), 400),
        ("JSON string", r#""alice""#.into(), 400),
        ("JSON number", "42".into(), 400),
        ("JSON null", "null".into(), 400),
        (
            "base64 without its padding",
            format!(
                r#"{{"user": "alice", "key": "{}", "sign": "{sign_b64}"}}"#,
                key_b64.trim_end_matches('=')
            )
            .into(),
            400,
        ),
        (
            "not base64",
            format!(r#"{{"user": "alice", "key": "*not*base64*", "sign": "{sign_b64}"}}"#).into(),
            400,
        ),
        (
            "X448 key of 55 bytes",
            json(USER, &public[..55], &sign(USER, &public[..55])).into(),
            400,
        ),
        (
            "X448 key of 57 bytes",
            json(USER, &long_key, &sign(USER, &long_key)).into(),
            400,
        ),
        (
            "low-order X448 key",
            json(USER, &[0; 56], &sign(USER, &[0; 56])).into(),
            400,
        ),
        (
            "body not UTF-8",
            Bytes::from_static(b"{\"user\": \"\xff\xfe\", \"key\": \"AA==\", \"sign\": \"AA==\"}"),
            400,
        ),
    ];
    for (name, body, status) in cases {
        let answer = request(h.addr, "POST", "/auth", None, RawBody::Length(body)).await;
        assert_eq!(answer.status, status, "{name}: {}", answer.text());
        assert_eq!(answer.header("content-length"), Some("0"), "{name}");
        assert_eq!(h.server.sessions(), 0, "{name}: nobody logged in");
    }
    // A body over 16 KiB is refused before parsing.
    let huge = format!(r#"{{"user": "{}"}}"#, "a".repeat(20_000));
    let answer = request(h.addr, "POST", "/auth", None, RawBody::Length(huge.into())).await;
    assert_eq!(answer.status, 413);
    // The well-formed login still works.
    let answer = request(
        h.addr,
        "POST",
        "/auth",
        None,
        RawBody::Length(json(USER, &public, &good_sign).into()),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(h.server.sessions(), 1);
    h.stop().await;
}

/// A first token that is missing, does not decrypt or expired: 400, the session stays and
/// the request number is not used up.
#[tokio::test]
async fn unreadable_first_tokens_get_400_and_keep_the_session() {
    let h = Harness::start().await;
    let s = h.raw().await;
    let cmd = s.path("/cmd/", "echo alive");
    let plain = proto::request_plain(ONLY, 1, 0, Some(&proto::path_hash(&cmd)), b"");
    let good = s.cipher.encrypt(&plain);
    let mut damaged = good.clone().into_bytes();
    damaged[60] = if damaged[60] == b'A' { b'B' } else { b'A' };
    let cases: Vec<(&str, Bytes, &str)> = vec![
        ("empty body", Bytes::new(), "Missing magic tokens\n"),
        ("five bytes", "gAAAA".into(), "Missing magic tokens\n"),
        (
            "not a token",
            "this is not a fernet token".into(),
            "Bad or expired token\n",
        ),
        (
            "made 11 s ago",
            s.cipher.encrypt_at(&plain, now() - 11).into(),
            "Bad or expired token\n",
        ),
        (
            "made 2 min in the future",
            s.cipher.encrypt_at(&plain, now() + 120).into(),
            "Bad or expired token\n",
        ),
        (
            "another session's key",
            Cipher::new(&[7; 32]).encrypt(&plain).into(),
            "Bad or expired token\n",
        ),
        (
            "one character changed",
            damaged.into(),
            "Bad or expired token\n",
        ),
        (
            "not UTF-8",
            Bytes::from_static(b"\xff\xfe\xfd\xfc\xfb\xfa\xf9"),
            "Bad or expired token\n",
        ),
    ];
    for (name, body, text) in cases {
        let answer = s.send(&cmd, body).await;
        assert_eq!(
            (answer.status, answer.text().as_str()),
            (400, text),
            "{name}"
        );
        assert_eq!(h.server.sessions(), 1, "{name}: the session stays");
    }
    // Number 1 was never used up.
    let answer = s.send(&cmd, good).await;
    assert_eq!(s.decode_for(&answer, 1), b"alive\n");
    h.stop().await;
}

type MakeToken = Box<dyn Fn(&RawSession, &str) -> String>;

/// A decryptable first token that breaks a rule: 400 `Wrong initial token`, and the session
/// is invalidated (the next request gets 403).
#[tokio::test]
async fn a_wrong_initial_token_invalidates_the_session() {
    let h = Harness::start().await;
    let with = |magic: Magic, req: i16, tok: i16| {
        move |s: &RawSession, path: &str| -> String {
            s.cipher.encrypt(&proto::request_plain(
                magic,
                req,
                tok,
                Some(&proto::path_hash(path)),
                b"",
            ))
        }
    };
    // Request 1 went through; these are request "2".
    let cases: Vec<(&str, MakeToken)> = vec![
        ("magic B. in one token", Box::new(with(FIRST, 2, 0))),
        ("magic .E", Box::new(with(LAST, 2, 0))),
        ("magic ..", Box::new(with(MIDDLE, 2, 0))),
        ("token number 1", Box::new(with(ONLY, 2, 1))),
        ("number skipped (+2)", Box::new(with(ONLY, 3, 0))),
        ("number repeated", Box::new(with(ONLY, 1, 0))),
        ("number behind", Box::new(with(ONLY, 0, 0))),
        ("negative number", Box::new(with(ONLY, -1, 0))),
        (
            "hash of another path",
            Box::new(|s: &RawSession, _: &str| {
                let other = s.path("/cmd/", "echo other");
                s.first(&other, ONLY, 2, b"")
            }),
        ),
        (
            "no hash at all",
            Box::new(|s: &RawSession, _: &str| {
                s.cipher
                    .encrypt(&proto::request_plain(ONLY, 2, 0, None, b""))
            }),
        ),
        (
            "hash cut short",
            Box::new(|s: &RawSession, path: &str| {
                let hash = proto::path_hash(path);
                let mut plain = proto::request_plain(ONLY, 2, 0, None, b"");
                plain.extend_from_slice(&hash[..40]);
                s.cipher.encrypt(&plain)
            }),
        ),
        (
            "header only",
            Box::new(|s: &RawSession, _: &str| s.cipher.encrypt(b"BE\x00\x02\x00\x00")),
        ),
        (
            "shorter than a header",
            Box::new(|s: &RawSession, _: &str| s.cipher.encrypt(b"BE\x00")),
        ),
    ];
    for (name, make) in cases {
        let mut s = h.raw().await;
        let cmd = s.path("/cmd/", "true");
        assert_eq!(s.call(&cmd, b"").await.status, 200, "{name}");
        let sessions = h.server.sessions();
        let refused = s.send(&cmd, make(&s, &cmd)).await;
        refused.assert_plain(400, "Wrong initial token\n");
        assert_eq!(h.server.sessions(), sessions - 1, "{name}: invalidated");
        s.call(&cmd, b"").await.assert_plain(403, "");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_replayed_request_is_refused() {
    let h = Harness::start().await;
    let s = h.raw().await;
    let cmd = s.path("/cmd/", "echo once");
    let token = s.first(&cmd, ONLY, 1, b"");
    let answer = s.send(&cmd, token.clone()).await;
    assert_eq!(s.decode_for(&answer, 1), b"once\n");
    s.send(&cmd, token)
        .await
        .assert_plain(400, "Wrong initial token\n");
    s.send(&cmd, s.first(&cmd, ONLY, 2, b""))
        .await
        .assert_plain(403, "");
    // A token replayed on another session does not decrypt there.
    let other = h.raw().await;
    let token = s.first(&cmd, ONLY, 1, b"");
    other
        .send(&cmd, token)
        .await
        .assert_plain(400, "Bad or expired token\n");
    h.stop().await;
}

type MakeBody = fn(&RawSession, &str, i16) -> Vec<String>;

/// Chunked bodies that break the token rules, on `/cmd` (which reads its body): 400 `Invalid
/// encoding`; no invalidation in this mode. The number is used up when the first token checked
/// (it is recorded when the request is accepted, so a copy cannot run), not otherwise.
#[tokio::test]
async fn chunked_body_errors_are_invalid_encoding() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    let cmd = s.path("/cmd/", "cat");
    assert_eq!(s.call(&cmd, b"").await.status, 200);
    let cases: &[(&str, MakeBody)] = &[
        ("blank line between tokens", |s, p, r| {
            vec![
                format!("{}\r\n\r\n", s.first(p, FIRST, r, b"a")),
                s.later(LAST, r, 1, b""),
            ]
        }),
        ("token number skipped", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                format!("{}\r\n", s.later(MIDDLE, r, 2, b"b")),
                s.later(LAST, r, 3, b""),
            ]
        }),
        ("token number repeated", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                format!("{}\r\n", s.later(MIDDLE, r, 1, b"b")),
                format!("{}\r\n", s.later(MIDDLE, r, 1, b"b")),
                s.later(LAST, r, 2, b""),
            ]
        }),
        ("no E token", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                s.later(MIDDLE, r, 1, b"b"),
            ]
        }),
        ("nothing after a B. token", |s, p, r| {
            vec![s.first(p, FIRST, r, b"a")]
        }),
        ("a second B token", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                s.cipher
                    .encrypt(&proto::request_plain(ONLY, r, 1, None, b"b")),
            ]
        }),
        ("a token of another request", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                s.later(LAST, r + 1, 1, b""),
            ]
        }),
        ("garbage line", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                "garbage".into(),
            ]
        }),
        ("an expired later token", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                s.cipher
                    .encrypt_at(&proto::request_plain(LAST, r, 1, None, b""), now() - 11),
            ]
        }),
        ("a later token shorter than a header", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                s.cipher.encrypt(b".E"),
            ]
        }),
        ("data after the E token", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r, b"a")),
                format!("{}\r\n", s.later(LAST, r, 1, b"")),
                s.later(MIDDLE, r, 2, b"c"),
            ]
        }),
        ("first token with the hash of another path", |s, _, r| {
            let other = s.path("/cmd/", "cat");
            vec![
                format!("{}\r\n", s.first(&other, FIRST, r, b"a")),
                s.later(LAST, r, 1, b""),
            ]
        }),
        ("first token number skipped", |s, p, r| {
            vec![
                format!("{}\r\n", s.first(p, FIRST, r + 1, b"a")),
                s.later(LAST, r + 1, 1, b""),
            ]
        }),
        ("first token not decryptable", |_, _, _| {
            vec!["gAAAAABgarbage-garbage-garbage\r\n".into()]
        }),
        ("first token is a later token", |s, _, r| {
            vec![format!("{}\r\n", s.later(LAST, r, 0, b"a"))]
        }),
    ];
    for &(name, make) in cases {
        let req = s.last + 1;
        let refused = s.send_chunked(&cmd, make(&s, &cmd, req)).await;
        refused.assert_plain(400, "Invalid encoding\n");
        assert_eq!(h.server.sessions(), 1, "{name}: no invalidation");
        // The session lives on; the number is taken if the first token checked.
        if !name.starts_with("first token") {
            s.last = req;
        }
        let answer = s.call(&cmd, b"still here").await;
        assert_eq!(s.decode(&answer), b"still here", "{name}");
    }
    // An empty chunked body has no token at all.
    s.send_chunked(&cmd, Vec::<String>::new())
        .await
        .assert_plain(400, "Missing magic tokens\n");
    h.stop().await;
}

/// `/get` and `/put` with an undecryptable name: 400; `/cmd` and `/icm` with an
/// undecryptable command: 403; names that are not UTF-8: 400. All encrypted.
#[tokio::test]
async fn bad_argument_tokens() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    let other = Cipher::new(&[9; 32]);
    for (endpoint, status) in [
        ("/get/", 400),
        ("/put/", 400),
        ("/cmd/", 403),
        ("/icm/", 403),
    ] {
        for path in [
            format!("{endpoint}not-a-token"),
            format!("{endpoint}{}", other.encrypt(b"true")),
            endpoint.to_owned(),
        ] {
            let answer = s.call(&path, b"").await;
            assert_eq!(answer.status, status, "{path}");
            assert_eq!(s.decode(&answer), b"", "{path}: an empty encrypted answer");
        }
        let path = s.path_bytes(endpoint, b"name-\xff\xfe");
        let answer = s.call(&path, b"").await;
        assert_eq!(answer.status, 400, "{endpoint} with a non-UTF-8 argument");
        assert!(!s.decode(&answer).is_empty());
    }
    assert_eq!(h.server.sessions(), 1);
    h.stop().await;
}

#[tokio::test]
async fn command_refusals_carry_an_encrypted_reason() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let refused = |err: ClientError| match err {
        ClientError::Status {
            status: 400,
            message,
        } => message,
        other => panic!("expected 400, got {other}"),
    };
    let cases = [
        ("no-such-program-xyz --flag", "cannot run"),
        ("echo 'unbalanced", "cannot split"),
        ("   ", "empty command line"),
        ("/", "cannot run"),
    ];
    for (line, reason) in cases {
        let message = refused(client.exec(line, b"").await.unwrap_err());
        assert!(message.contains(reason), "{line}: {message}");
        let message = refused(client.iexec(line).await.unwrap_err());
        assert!(message.contains(reason), "iexec {line}: {message}");
    }
    // On the wire: 400 with an encrypted text, the session kept.
    let mut s = h.raw().await;
    let path = s.path("/cmd/", "no-such-program-xyz");
    let answer = s.call(&path, b"").await;
    assert_eq!(answer.status, 400);
    let text = String::from_utf8(s.decode(&answer)).unwrap();
    assert!(text.contains("no-such-program-xyz"), "{text}");
    assert_eq!(s.call(&s.path("/cmd/", "true"), b"").await.status, 200);
    // The client's session survived all of it.
    assert_eq!(client.exec("echo ok", b"").await.unwrap().output, b"ok\n");
    h.stop().await;
}

#[tokio::test]
async fn no_interactive_command_and_unknown_paths() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    for (path, status) in [
        ("/idt", 400),
        ("/edt", 400),
        ("/nowhere", 404),
        ("/", 404),
        ("/get", 404),
        ("/cmdx/abc", 404),
        ("/info/x", 404),
    ] {
        let answer = s.call(path, b"payload").await;
        assert_eq!(answer.status, status, "{path}");
        assert_eq!(s.decode(&answer), b"", "{path}: encrypted BE");
    }
    let mut client = h.client().await;
    let err = client.idata(b"x\n").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 400, .. }),
        "{err}"
    );
    let err = client.iend().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 400, .. }),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test]
async fn get_of_a_missing_file_is_404_before_any_body() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    let path = s.path("/get/", "missing.txt");
    let answer = s.call(&path, b"").await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.header("x-remo-size"), None);
    let text = String::from_utf8(s.decode(&answer)).unwrap();
    assert!(text.contains("missing.txt"), "{text}");

    let mut client = h.client().await;
    let local = h.dir.path().join("local.txt");
    let err = client
        .get("missing.txt", &local, |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 404, .. }),
        "{err}"
    );
    assert!(!local.exists(), "no local file for a missing remote one");
    let leftovers: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".remo-get-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    h.stop().await;
}

#[tokio::test]
async fn oversize_bodies_get_413() {
    let h = Harness::start_with(|c| c.max_body = 1024).await;
    let mut s = h.raw().await;
    let cat = s.path("/cmd/", "cat");
    // At the limit: fine.
    let answer = s.call(&cat, &[b'x'; 1024]).await;
    assert_eq!(s.decode(&answer).len(), 1024);
    // One token over the limit, with Content-Length: refused before decrypting.
    let big = s.first(&cat, ONLY, s.last + 1, &[b'x'; 8192]);
    s.send(&cat, big)
        .await
        .assert_plain(413, "Request body too large\n");
    // Just over the limit: the token is read and checked, so (Content-Length mode, as the
    // original) its number is used up although the command is refused.
    let answer = s
        .send(&cat, s.first(&cat, ONLY, s.last + 1, &[b'x'; 1025]))
        .await;
    answer.assert_plain(413, "Request body too large\n");
    s.last += 1;
    // Several chunked tokens adding up to more than the limit.
    let req = s.last + 1;
    let body = vec![
        format!("{}\r\n", s.first(&cat, FIRST, req, &[b'a'; 600])),
        format!("{}\r\n", s.later(MIDDLE, req, 1, &[b'b'; 600])),
        s.later(LAST, req, 2, b""),
    ];
    s.send_chunked(&cat, body)
        .await
        .assert_plain(413, "Request body too large\n");
    // Its first token checked: the number was taken when the request was accepted.
    s.last = req;
    // /idt too, and the session is still usable.
    let idt = s.first("/idt", ONLY, s.last + 1, &[b'x'; 4096]);
    s.send("/idt", idt)
        .await
        .assert_plain(413, "Request body too large\n");
    let answer = s.call(&cat, b"ok").await;
    assert_eq!(s.decode(&answer), b"ok");
    h.stop().await;
}

/// Random and malformed requests, logged in and not, in both body modes: never a 5xx, never
/// a dropped connection.
#[tokio::test]
async fn garbage_never_gets_a_server_error() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    let paths = [
        "/auth",
        "/info",
        "/cmd/",
        "/cmd/%FF%FE",
        "/get/..",
        "/put/",
        "/icm/gAAAAA==",
        "/idt",
        "/edt",
        "/x",
    ];
    let bodies: Vec<Bytes> = vec![
        Bytes::new(),
        random_bytes(5, 1).into(),
        random_bytes(300, 2).into(),
        random_bytes(20_000, 3).into(),
        "\r\n\r\n\r\n".into(),
        "gAAAAAB\r\ngAAAAAB\r\n".into(),
        format!("{}\r\n", s.cipher.encrypt(b"B.\x00\x01\x00\x00")).into(),
    ];
    for path in paths {
        for (i, body) in bodies.iter().enumerate() {
            for chunked in [false, true] {
                for logged_in in [false, true] {
                    let cookie = logged_in.then(|| s.cookie());
                    let raw_body = if chunked {
                        RawBody::pieces([body.clone()])
                    } else {
                        RawBody::Length(body.clone())
                    };
                    let answer: Raw =
                        request(h.addr, "POST", path, cookie.as_deref(), raw_body).await;
                    assert!(
                        answer.status < 500,
                        "{path} body {i} chunked {chunked} logged in {logged_in}: {}",
                        answer.status
                    );
                    if logged_in && h.server.sessions() == 0 {
                        s = h.raw().await;
                    }
                }
            }
        }
    }
    h.stop().await;
}
