//! Every endpoint through the client library, the request-number rules, logout and re-login.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use remo_serv::client::{ClientConfig, ClientError, plain_info};
use remo_serv::proto::{self, AuthRequest};
use remo_serv::server::info_text;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{
    FIRST, Harness, LAST, MIDDLE, ONLY, RawBody, RawSession, USER, random_bytes, request, sha256,
    sha256_file,
};

#[tokio::test]
async fn info_is_plain_before_login_and_encrypted_after() {
    let h = Harness::start().await;
    let text = info_text();
    assert!(
        text.starts_with("remo_serv ") && text.ends_with(" here"),
        "{text}"
    );

    // Before login: any method, no Content-Length (as the original), a session cookie.
    for method in ["GET", "POST"] {
        let answer = request(h.addr, method, "/info", None, RawBody::empty()).await;
        assert_eq!((answer.status, answer.text()), (200, text.clone()));
        assert_eq!(answer.header("content-length"), None);
        assert_eq!(answer.session_id().unwrap().len(), 11);
    }
    // HTTP/1.0: the same text, delimited by the end of the connection.
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(b"GET /info HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(crate::harness::WAIT, tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.ends_with(&format!("\r\n\r\n{text}")), "{answer}");
    assert_eq!(plain_info(&h.client_config()).await.unwrap(), text);

    // After login the text comes back encrypted.
    let mut client = h.client().await;
    assert_eq!(client.info().await.unwrap(), text);
    let mut s = h.raw().await;
    let answer = s.call("/info", b"").await;
    assert_eq!(answer.status, 200);
    assert!(!answer.text().contains("remo_serv"));
    assert_eq!(s.decode(&answer), text.as_bytes());
    // A logged-in /info needs its token like any other request.
    s.send("/info", "")
        .await
        .assert_plain(400, "Missing magic tokens\n");
    h.stop().await;
}

#[tokio::test]
async fn exec_merges_output_reports_the_exit_status_and_feeds_stdin() {
    let h = Harness::start().await;
    let mut client = h.client().await;

    let out = client
        .exec("sh -c 'echo out; echo err >&2; echo more; exit 3'", b"")
        .await
        .unwrap();
    assert_eq!(out.output, b"out\nerr\nmore\n", "stdout and stderr merged");
    assert_eq!(out.exit_status, Some(3));
    assert!(!out.timed_out);

    let out = client.exec("true", b"").await.unwrap();
    assert_eq!(
        (out.output.as_slice(), out.exit_status),
        (&b""[..], Some(0))
    );

    let input = random_bytes(300_000, 1);
    let out = client.exec("cat", &input).await.unwrap();
    assert_eq!(sha256(&out.output), sha256(&input), "stdin fed whole");
    assert_eq!(out.exit_status, Some(0));
    let out = client.exec("wc -c", b"12345").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.output).trim(), "5");

    // Shell-word quoting, but no shell: no variables, globs or operators.
    let out = client
        .exec("printf '%s|' 'a b' \"c d\" $HOME * && ;", b"")
        .await
        .unwrap();
    assert_eq!(out.output, b"a b|c d|$HOME|*|&&|;|");

    // Commands run in the working directory.
    let out = client.exec("pwd", b"").await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.output).trim(),
        h.served.canonicalize().unwrap().to_str().unwrap()
    );
    // Killed by a signal: 128 + the signal number.
    let out = client.exec("sh -c 'kill -9 $$'", b"").await.unwrap();
    assert_eq!(out.exit_status, Some(137));

    // On the wire: the header, and the output as one encrypted token.
    let mut s = h.raw().await;
    let path = s.path("/cmd/", "sh -c 'echo raw; exit 42'");
    let answer = s.call(&path, b"").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-remo-exit-status"), Some("42"));
    assert_eq!(s.decode(&answer), b"raw\n");
    h.stop().await;
}

#[tokio::test]
async fn a_command_timeout_kills_the_process_group() {
    let h = Harness::start_with(|c| c.command_timeout = Some(Duration::from_secs(1))).await;
    let mut client = h.client().await;
    let started = std::time::Instant::now();
    let out = client
        .exec("sh -c 'echo $$; sleep 30 & echo $!; wait'", b"")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(out.exit_status, Some(124));
    assert!(out.timed_out);
    let pids = crate::harness::numbers(&out.output);
    assert_eq!(pids.len(), 2, "{:?}", String::from_utf8_lossy(&out.output));
    for pid in pids {
        crate::harness::wait_ended(
            pid,
            Duration::from_secs(3),
            "the command timed out: its whole group is killed",
        )
        .await;
    }
    h.stop().await;
}

#[tokio::test]
async fn too_much_command_output_is_refused() {
    let h = Harness::start_with(|c| c.max_output = 10_000).await;
    let mut client = h.client().await;
    let err = client
        .exec("head -c 50000 /dev/zero", b"")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status: 507, message } if message.contains("10000")),
        "{err}"
    );
    let out = client.exec("head -c 10000 /dev/zero", b"").await.unwrap();
    assert_eq!(out.output.len(), 10_000);
    h.stop().await;
}

#[tokio::test]
async fn chunked_bodies_are_joined() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    assert_eq!(s.call(&s.path("/cmd/", "true"), b"").await.status, 200);
    let cmd = s.path("/cmd/", "cat");
    // Three tokens, CRLF between them (the original client), no line break after the last.
    let body = [
        format!("{}\r\n", s.first(&cmd, FIRST, 2, b"one ")),
        format!("{}\r\n", s.later(MIDDLE, 2, 1, b"two ")),
        s.later(LAST, 2, 2, b"three"),
    ];
    let answer = s.send_chunked(&cmd, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(s.decode_for(&answer, 2), b"one two three");
    // Bare LF separators, a token split over several HTTP chunks, and a final line break.
    let first = s.first(&cmd, FIRST, 3, b"a");
    let (head, tail) = first.split_at(first.len() / 2);
    let body = [
        head.to_owned(),
        format!("{tail}\n"),
        format!("{}\n", s.later(LAST, 3, 1, b"b")),
    ];
    let answer = s.send_chunked(&cmd, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(s.decode_for(&answer, 3), b"ab");
    // A chunked body of a single `BE` token.
    let answer = s
        .send_chunked(&cmd, [s.first(&cmd, ONLY, 4, b"solo")])
        .await;
    assert_eq!(s.decode_for(&answer, 4), b"solo");
    h.stop().await;
}

#[tokio::test]
async fn get_and_put_small_empty_and_large_files() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let local = h.dir.path();

    // Small.
    std::fs::write(local.join("small.txt"), b"hello remo\n").unwrap();
    let sent = client
        .put(&local.join("small.txt"), "small.txt", |_| {})
        .await
        .unwrap();
    assert_eq!(sent, 11);
    assert_eq!(
        std::fs::read(h.served.join("small.txt")).unwrap(),
        b"hello remo\n"
    );
    let got = client
        .get("small.txt", &local.join("small.back"), |_, _| {})
        .await
        .unwrap();
    assert_eq!(got, 11);
    assert_eq!(
        std::fs::read(local.join("small.back")).unwrap(),
        b"hello remo\n"
    );

    // Empty, both ways.
    std::fs::write(local.join("empty"), b"").unwrap();
    assert_eq!(
        client
            .put(&local.join("empty"), "empty.bin", |_| {})
            .await
            .unwrap(),
        0
    );
    assert_eq!(std::fs::read(h.served.join("empty.bin")).unwrap(), b"");
    assert_eq!(
        client
            .get("empty.bin", &local.join("empty.back"), |_, _| {})
            .await
            .unwrap(),
        0
    );
    assert_eq!(std::fs::read(local.join("empty.back")).unwrap(), b"");

    // 5 MiB of random bytes (many tokens each way), with progress reports.
    let data = random_bytes(5 * 1024 * 1024 + 3, 5);
    std::fs::write(local.join("big.bin"), &data).unwrap();
    let reported = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&reported);
    let sent = client
        .put(&local.join("big.bin"), "big.bin", move |done| {
            seen.store(done, Ordering::SeqCst);
        })
        .await
        .unwrap();
    assert_eq!(sent, data.len() as u64);
    assert_eq!(reported.load(Ordering::SeqCst), data.len() as u64);
    assert_eq!(sha256_file(&h.served.join("big.bin")), sha256(&data));
    let mut last = (0, None);
    let got = client
        .get("big.bin", &local.join("big.back"), |done, total| {
            last = (done, total);
        })
        .await
        .unwrap();
    assert_eq!(got, data.len() as u64);
    assert_eq!(last, (data.len() as u64, Some(data.len() as u64)));
    assert_eq!(sha256_file(&local.join("big.back")), sha256(&data));

    // A put replaces an existing file; subdirectories work.
    std::fs::create_dir(h.served.join("sub")).unwrap();
    client
        .put(&local.join("small.txt"), "sub/x.txt", |_| {})
        .await
        .unwrap();
    client
        .put(&local.join("empty"), "small.txt", |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(h.served.join("small.txt")).unwrap(), b"");
    assert_eq!(
        std::fs::read(h.served.join("sub/x.txt")).unwrap(),
        b"hello remo\n"
    );
    assert!(crate::harness::put_temporaries(&h.served).is_empty());
    h.stop().await;
}

#[tokio::test]
async fn single_token_uploads_work_too() {
    let h = Harness::start().await;
    let mut client = h
        .client_with(ClientConfig {
            single_token_upload: true,
            ..h.client_config()
        })
        .await;
    let data = random_bytes(200_000, 7);
    std::fs::write(h.dir.path().join("one.bin"), &data).unwrap();
    client
        .put(&h.dir.path().join("one.bin"), "one.bin", |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(h.served.join("one.bin")).unwrap(), data);
    h.stop().await;
}

#[tokio::test]
async fn after_a_logout_the_client_logs_in_again_and_raw_requests_get_403() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    assert_eq!(client.exec("echo one", b"").await.unwrap().output, b"one\n");
    assert_eq!(h.server.sessions(), 1);
    client.logout().await.unwrap();
    assert_eq!(h.server.sessions(), 0);
    // The client notices it is logged out and logs in again by itself.
    assert_eq!(client.exec("echo two", b"").await.unwrap().output, b"two\n");
    assert_eq!(h.server.sessions(), 1);

    let mut s = h.raw().await;
    let cmd = s.path("/cmd/", "echo three");
    assert_eq!(s.call(&cmd, b"").await.status, 200);
    let bye = s.logout().await;
    assert_eq!((bye.status, bye.text().as_str()), (200, "Disconnected"));
    assert_eq!(bye.session_id().as_deref(), Some(s.id.as_str()));
    assert_eq!(h.server.sessions(), 1, "only the raw session went");
    let after = s.call(&cmd, b"").await;
    after.assert_plain(403, "");
    assert_ne!(
        after.session_id().unwrap(),
        s.id,
        "a gone session gets a new id"
    );
    h.stop().await;
}

#[tokio::test]
async fn the_client_logs_in_again_when_its_session_expired() {
    let h = Harness::start_with(|c| c.session_timeout = Duration::from_secs(1)).await;
    let mut client = h.client().await;
    assert_eq!(client.exec("echo a", b"").await.unwrap().output, b"a\n");
    // A raw session idling alongside shows that sessions did expire meanwhile.
    let mut witness = h.raw().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cmd = witness.path("/cmd/", "true");
    witness.call(&cmd, b"").await.assert_plain(403, "");
    // The server answers 403 to the old session; the client logs in and repeats the request.
    assert_eq!(client.exec("echo b", b"").await.unwrap().output, b"b\n");
    // A chunked upload starts over after a new login too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let data = random_bytes(1 << 20, 9);
    std::fs::write(h.dir.path().join("up.bin"), &data).unwrap();
    client
        .put(&h.dir.path().join("up.bin"), "up.bin", |_| {})
        .await
        .unwrap();
    assert_eq!(sha256_file(&h.served.join("up.bin")), sha256(&data));
    h.stop().await;
}

/// A request the server refuses before reading its token leaves the client's counter one
/// ahead; the next request gets "Wrong initial token" (which kills the session) and the
/// client logs in again and repeats it.
#[tokio::test]
async fn the_client_recovers_after_an_early_refusal() {
    let h = Harness::start_with(|c| c.max_body = 1024).await;
    let mut client = h
        .client_with(ClientConfig {
            single_token_upload: true,
            ..h.client_config()
        })
        .await;
    assert_eq!(client.exec("echo a", b"").await.unwrap().output, b"a\n");
    std::fs::write(h.dir.path().join("big.bin"), random_bytes(10_000, 4)).unwrap();
    let err = client
        .put(&h.dir.path().join("big.bin"), "big.bin", |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 413, .. }),
        "{err}"
    );
    assert_eq!(client.exec("echo b", b"").await.unwrap().output, b"b\n");
    assert_eq!(client.exec("echo c", b"").await.unwrap().output, b"c\n");
    assert_eq!(h.server.sessions(), 1);
    h.stop().await;
}

#[tokio::test]
async fn request_numbers_follow_the_window_rules() {
    let h = Harness::start().await;
    let s = h.raw().await;
    let cmd = s.path("/cmd/", "echo ok");
    let send = |req: i16| {
        let s = &s;
        let cmd = &cmd;
        async move { s.send(cmd, s.first(cmd, ONLY, req, b"")).await }
    };
    // Right after login any number is accepted; then each is the previous plus one.
    let answer = send(5).await;
    assert_eq!(answer.status, 200);
    assert_eq!(s.decode_for(&answer, 5), b"ok\n");
    assert_eq!(send(6).await.status, 200);
    // Early refusals do not use up a number.
    s.send(&cmd, "")
        .await
        .assert_plain(400, "Missing magic tokens\n");
    assert_eq!(send(7).await.status, 200);
    // Skipping one within the window kills the session.
    send(9).await.assert_plain(400, "Wrong initial token\n");
    send(8).await.assert_plain(403, "");

    // A new login with the cookie of a live session opens a new session (new id, numbering
    // from the start); the session the cookie named is left as it is.
    let s = h.raw().await;
    let used = s.path("/cmd/", "true");
    assert_eq!(
        s.send(&used, s.first(&used, ONLY, 1, b"")).await.status,
        200
    );
    let again = RawSession::login(h.addr, &h.keys, Some(&s.id)).await;
    assert_ne!(again.id, s.id);
    let cmd = again.path("/cmd/", "echo again");
    let answer = again.send(&cmd, again.first(&cmd, ONLY, 300, b"")).await;
    assert_eq!(again.decode_for(&answer, 300), b"again\n");
    let old = s.path("/cmd/", "true");
    assert_eq!(s.send(&old, s.first(&old, ONLY, 2, b"")).await.status, 200);
    h.stop().await;
}

#[tokio::test]
async fn rsa_users_log_in_with_pkcs1_sha512_signatures() {
    use rsa::pkcs8::EncodePublicKey as _;
    use rsa::signature::{SignatureEncoding as _, Signer as _};
    let h = Harness::start().await;
    let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = private
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let users = remo_serv::users::Users::open(&h.dir.path().join("users.sqlite"))
        .await
        .unwrap();
    users.add("card", pem.as_bytes()).await.unwrap();
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new(private);
    let public = proto::x448_public(&proto::x448_secret());
    let body = |user: &str, message_user: &str| {
        AuthRequest {
            user: user.into(),
            key: public.to_vec(),
            sign: signer
                .sign(&AuthRequest::signed_message(message_user, &public))
                .to_vec(),
        }
        .to_json()
    };
    let ok = request(
        h.addr,
        "POST",
        "/auth",
        None,
        RawBody::Length(body("card", "card").into()),
    )
    .await;
    assert_eq!(ok.status, 200);
    let bad = request(
        h.addr,
        "POST",
        "/auth",
        None,
        RawBody::Length(body("card", "other").into()),
    )
    .await;
    bad.assert_plain(403, "");
    // An RSA signature for an Ed448 user is refused too.
    let mixed = request(
        h.addr,
        "POST",
        "/auth",
        None,
        RawBody::Length(body(USER, USER).into()),
    )
    .await;
    mixed.assert_plain(403, "");
    h.stop().await;
}
