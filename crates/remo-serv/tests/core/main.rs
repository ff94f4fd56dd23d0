//! Core end-to-end tests of remo-serv: the real server on 127.0.0.1:0, a real SQLite user
//! database, real keys, the real client library, and raw HTTP for the error rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use remo_serv::client::{Client, ClientConfig, ClientError};
use remo_serv::config::Config;
use remo_serv::keys::{PrivateKey, PublicKey};
use remo_serv::proto::{self, AuthRequest, Cipher, Magic};
use remo_serv::server::Server;
use remo_serv::users::Users;
use sha2::Digest as _;
use testkit::daemon::Spawned;

struct Harness {
    server: Spawned,
    dir: tempfile::TempDir,
    served: PathBuf,
    user_key_pem: String,
    server_pub: PublicKey,
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_tls(tweak, None).await
    }

    async fn start_with_tls(
        tweak: impl FnOnce(&mut Config),
        tls: Option<common::tls::ServerTls>,
    ) -> Self {
        testkit::daemon::init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("served");
        std::fs::create_dir(&served).unwrap();
        let server_key = PrivateKey::generate();
        let server_pub = PublicKey::Ed448(Box::new(server_key.verifying_key()));
        let user_key = PrivateKey::generate();
        let users = Users::open(&dir.path().join("users.sqlite")).await.unwrap();
        users
            .add(
                "alice",
                PublicKey::ed448_pem(&user_key.verifying_key()).as_bytes(),
            )
            .await
            .unwrap();
        let mut config = Config {
            workdir: served.clone(),
            put_fsync: false,
            ..Config::default()
        };
        tweak(&mut config);
        let server = Server::new(config, server_key, users, tls).unwrap();
        let spawned = testkit::daemon::spawn_tcp(move |listener, shutdown| async move {
            server.serve(listener, shutdown).await;
            Ok(())
        })
        .await;
        Self {
            server: spawned,
            dir,
            served,
            user_key_pem: user_key.to_pem(None).unwrap().to_string(),
            server_pub,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            url: format!("http://{}", self.addr()).parse().unwrap(),
            user: "alice".into(),
            ca: None,
            single_token_upload: false,
            timeout: Duration::from_secs(30),
        }
    }

    async fn client(&self) -> Client {
        let key = PrivateKey::from_pem(&self.user_key_pem, None).unwrap();
        Client::login(self.config(), key, self.server_pub.clone())
            .await
            .unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

type Body = BoxBody<Bytes, std::io::Error>;

struct Raw {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

/// One HTTP/1.1 request on a fresh connection; `body: None` sends a chunked body of `chunks`.
async fn raw(addr: SocketAddr, path: &str, cookie: Option<&str>, body: Body, chunked: bool) -> Raw {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut builder = hyper::Request::post(path).header("host", "x");
    if let Some(id) = cookie {
        builder = builder.header("cookie", format!("other=1; SESSION_ID={id}"));
    }
    if chunked {
        builder = builder.header("transfer-encoding", "chunked");
    }
    let response = sender
        .send_request(builder.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Raw {
        status,
        headers,
        body,
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn chunks(lines: Vec<String>) -> Body {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = lines
        .into_iter()
        .map(|l| Ok(Frame::data(Bytes::from(l))))
        .collect();
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// A raw logged-in session: cookie and cipher, built with the protocol functions.
struct RawSession {
    addr: SocketAddr,
    cookie: String,
    cipher: Cipher,
}

impl RawSession {
    async fn login(h: &Harness) -> Self {
        let key = PrivateKey::from_pem(&h.user_key_pem, None).unwrap();
        let secret = proto::x448_secret();
        let public = proto::x448_public(&secret);
        let body = AuthRequest {
            user: "alice".into(),
            key: public.to_vec(),
            sign: key.sign(&AuthRequest::signed_message("alice", &public)),
        }
        .to_json();
        let answer = raw(h.addr(), "/auth", None, full(body), false).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len(), 230);
        let cookie = answer.headers["set-cookie"].to_str().unwrap();
        let id = cookie
            .trim_start_matches("SESSION_ID=")
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let (server_public, signature) = proto::parse_auth_response(&answer.body).unwrap();
        assert!(h.server_pub.verify(&server_public, &signature));
        let shared = proto::x448_shared(&secret, &server_public).unwrap();
        Self {
            addr: h.addr(),
            cookie: id,
            cipher: Cipher::new(&proto::session_key(&shared)),
        }
    }

    fn path(&self, endpoint: &str, argument: &str) -> String {
        format!("{endpoint}{}", self.cipher.encrypt(argument.as_bytes()))
    }

    fn first(&self, path: &str, req_no: i16, last: bool, payload: &[u8]) -> String {
        let plain = proto::request_plain(
            Magic { first: true, last },
            req_no,
            0,
            Some(&proto::path_hash(path)),
            payload,
        );
        self.cipher.encrypt(&plain)
    }

    async fn send(&self, path: &str, token: String) -> Raw {
        raw(self.addr, path, Some(&self.cookie), full(token), false).await
    }

    /// Decrypts an encrypted answer's payload (all tokens).
    fn payload(&self, answer: &Raw) -> Vec<u8> {
        assert!(
            !answer.headers.contains_key("content-length"),
            "encrypted answers have no Content-Length"
        );
        let mut out = Vec::new();
        for (i, line) in answer
            .body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let plain = self
                .cipher
                .decrypt_body(std::str::from_utf8(line).unwrap(), now())
                .unwrap();
            let skip = if i == 0 { 9 } else { 6 };
            if i == 0 {
                assert_eq!(&plain[6..9], b"200");
            }
            out.extend_from_slice(&plain[skip..]);
        }
        out
    }
}

#[tokio::test]
async fn every_endpoint_through_the_client() {
    let h = Harness::start(|_| {}).await;
    let info = remo_serv::client::plain_info(&h.config()).await.unwrap();
    assert!(info.starts_with("remo_serv "), "{info}");
    let mut client = h.client().await;
    assert_eq!(client.info().await.unwrap(), info);

    let out = client
        .exec("sh -c 'echo out; echo err >&2; exit 3'", b"")
        .await
        .unwrap();
    assert_eq!(out.output, b"out\nerr\n");
    assert_eq!(out.exit_status, Some(3));
    let out = client.exec("cat", b"piped stdin").await.unwrap();
    assert_eq!(out.output, b"piped stdin");
    assert_eq!(out.exit_status, Some(0));
    // No shell: the metacharacters reach echo as words.
    let out = client.exec("echo $HOME && ls *", b"").await.unwrap();
    assert_eq!(out.output, b"$HOME && ls *\n");

    let local = h.dir.path().join("local.bin");
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();
    assert_eq!(
        client.put(&local, "remote.bin", |_| {}).await.unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(h.served.join("remote.bin")).unwrap(), data);
    let back = h.dir.path().join("back.bin");
    let mut last = (0, None);
    client
        .get("remote.bin", &back, |done, total| last = (done, total))
        .await
        .unwrap();
    assert_eq!(
        sha2::Sha256::digest(std::fs::read(&back).unwrap()),
        sha2::Sha256::digest(&data)
    );
    assert_eq!(last, (data.len() as u64, Some(data.len() as u64)));

    let empty = h.dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    client.put(&empty, "empty", |_| {}).await.unwrap();
    assert_eq!(std::fs::read(h.served.join("empty")).unwrap(), b"");
    client
        .get("empty", &h.dir.path().join("empty.back"), |_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(h.dir.path().join("empty.back")).unwrap(), b"");

    assert_eq!(client.iexec("cat").await.unwrap(), b"");
    assert_eq!(client.idata(b"one\n").await.unwrap(), b"one\n");
    assert_eq!(client.idata(b"two\n").await.unwrap(), b"two\n");
    client.idata(b"three\n").await.unwrap();
    let _ = client.iend().await.unwrap();
    let err = client.idata(b"x\n").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 400, .. }),
        "{err}"
    );

    let err = client
        .get("missing", &h.dir.path().join("m"), |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 404, .. }),
        "{err}"
    );
    assert!(!h.dir.path().join("m").exists());
    let err = client
        .get("../users.sqlite", &h.dir.path().join("m"), |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 403, .. }),
        "{err}"
    );
    let err = client.exec("no-such-program-x", b"").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status: 400, message } if message.contains("cannot run")),
        "{err}"
    );
    let err = client.exec("echo 'unbalanced", b"").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 400, .. }),
        "{err}"
    );

    // After a logout the client logs in again by itself.
    client.logout().await.unwrap();
    assert_eq!(
        client.exec("echo again", b"").await.unwrap().output,
        b"again\n"
    );
    h.server.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn auth_errors_are_clean() {
    let h = Harness::start(|_| {}).await;
    let addr = h.addr();
    let key = PrivateKey::from_pem(&h.user_key_pem, None).unwrap();
    let public = proto::x448_public(&proto::x448_secret());
    let good_sign = key.sign(&AuthRequest::signed_message("alice", &public));
    let body = |user: &str, key: &[u8], sign: &[u8]| {
        AuthRequest {
            user: user.into(),
            key: key.to_vec(),
            sign: sign.to_vec(),
        }
        .to_json()
    };
    let status =
        |text: String| async move { raw(addr, "/auth", None, full(text), false).await.status };
    assert_eq!(status(body("mallory", &public, &good_sign)).await, 403);
    assert_eq!(status(body("alice", &public, &[0u8; 114])).await, 403);
    let other = PrivateKey::generate().sign(&AuthRequest::signed_message("alice", &public));
    assert_eq!(status(body("alice", &public, &other)).await, 403);
    assert_eq!(status("{not json".into()).await, 400);
    assert_eq!(status("[1, 2]".into()).await, 400);
    assert_eq!(
        status(r#"{"user": "alice", "key": "AA", "sign": "AA=="}"#.into()).await,
        400
    );
    let short_key = key.sign(&AuthRequest::signed_message("alice", &public[..55]));
    assert_eq!(status(body("alice", &public[..55], &short_key)).await, 400);
    assert_eq!(status(body("alice", &public, &good_sign)).await, 200);

    // Not logged in: 403 everywhere but /info; /info-anything is 404.
    let anon = raw(addr, "/cmd/xyz", None, full(""), false).await;
    assert_eq!(
        (
            anon.status,
            anon.headers["content-length"].to_str().unwrap()
        ),
        (403, "0")
    );
    assert!(
        anon.headers["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("SESSION_ID=")
    );
    assert_eq!(raw(addr, "/infox", None, full(""), false).await.status, 404);
    let info = raw(addr, "/info", None, full(""), false).await;
    assert_eq!(info.status, 200);
    assert!(!info.headers.contains_key("content-length"));
}

#[tokio::test]
async fn token_rules_and_session_invalidation() {
    let h = Harness::start(|c| c.max_body = 1024).await;
    let s = RawSession::login(&h).await;
    let cmd = s.path("/cmd/", "echo hi");

    // Content-Length 0 or < 6 bytes: 400 Missing magic tokens, session kept.
    let answer = s.send(&cmd, String::new()).await;
    assert_eq!(answer.status, 400);
    assert_eq!(&answer.body[..], b"Missing magic tokens\n");

    let ok = s.send(&cmd, s.first(&cmd, 1, true, b"")).await;
    assert_eq!(ok.status, 200);
    assert_eq!(s.payload(&ok), b"hi\n");
    assert_eq!(ok.headers["x-remo-exit-status"], "0");

    // Expired token (older than 10 s) and garbage: 400, session kept.
    let plain = proto::request_plain(
        Magic {
            first: true,
            last: true,
        },
        2,
        0,
        Some(&proto::path_hash(&cmd)),
        b"",
    );
    assert_eq!(
        s.send(&cmd, s.cipher.encrypt_at(&plain, now() - 11))
            .await
            .status,
        400
    );
    assert_eq!(s.send(&cmd, "gAAAAA-garbage==".into()).await.status, 400);
    // Oversize body: 413.
    assert_eq!(
        s.send(&cmd, s.first(&cmd, 2, true, &[b'x'; 4096]))
            .await
            .status,
        413
    );

    // Unknown path, /idt and /edt without a process, bad name and command tokens.
    let unknown = s.send("/nowhere", s.first("/nowhere", 2, true, b"")).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(s.payload(&unknown), b"");
    assert_eq!(
        s.send("/idt", s.first("/idt", 3, true, b"x")).await.status,
        400
    );
    assert_eq!(
        s.send("/edt", s.first("/edt", 4, true, b"")).await.status,
        400
    );
    assert_eq!(
        s.send("/get/bogus", s.first("/get/bogus", 5, true, b""))
            .await
            .status,
        400
    );
    assert_eq!(
        s.send("/cmd/bogus", s.first("/cmd/bogus", 6, true, b""))
            .await
            .status,
        403
    );
    let non_utf8 = format!("/get/{}", s.cipher.encrypt(&[0xff, 0xfe, b'a']));
    assert_eq!(
        s.send(&non_utf8, s.first(&non_utf8, 7, true, b""))
            .await
            .status,
        400
    );

    // A replayed request (same number) is refused and kills the session, as the original.
    let replay = s.first(&cmd, 8, true, b"");
    assert_eq!(s.send(&cmd, replay.clone()).await.status, 200);
    let refused = s.send(&cmd, replay).await;
    assert_eq!(refused.status, 400);
    assert_eq!(&refused.body[..], b"Wrong initial token\n");
    assert_eq!(s.send(&cmd, s.first(&cmd, 9, true, b"")).await.status, 403);
}

#[tokio::test]
async fn wrong_hash_and_skipped_numbers_invalidate() {
    let h = Harness::start(|_| {}).await;
    let s = RawSession::login(&h).await;
    let cmd = s.path("/cmd/", "true");
    // Right after login any request number is accepted.
    assert_eq!(s.send(&cmd, s.first(&cmd, 5, true, b"")).await.status, 200);
    assert_eq!(s.send(&cmd, s.first(&cmd, 7, true, b"")).await.status, 400);
    assert_eq!(s.send(&cmd, s.first(&cmd, 8, true, b"")).await.status, 403);

    let s = RawSession::login(&h).await;
    let other = s.path("/cmd/", "false");
    assert_eq!(
        s.send(&cmd, s.first(&other, 1, true, b"")).await.status,
        400
    );
    assert_eq!(s.send(&cmd, s.first(&cmd, 2, true, b"")).await.status, 403);
}

#[tokio::test]
async fn chunked_errors_and_put_atomicity() {
    let h = Harness::start(|_| {}).await;
    std::fs::write(h.served.join("keep.txt"), b"precious").unwrap();
    let s = RawSession::login(&h).await;
    let put = s.path("/put/", "keep.txt");
    let token = |magic: Magic, tok: i16, payload: &[u8]| {
        let hash = proto::path_hash(&put);
        s.cipher.encrypt(&proto::request_plain(
            magic,
            1,
            tok,
            (tok == 0).then_some(&hash),
            payload,
        ))
    };
    let mid = Magic {
        first: false,
        last: false,
    };
    let end = Magic {
        first: false,
        last: true,
    };
    let first = token(
        Magic {
            first: true,
            last: false,
        },
        0,
        b"new ",
    );
    // Out of sequence, then a blank line, then no E token: 400, the old file intact.
    for body in [
        vec![
            format!("{first}\r\n"),
            format!("{}\r\n", token(mid, 2, b"x")),
            token(end, 3, b""),
        ],
        vec![format!("{first}\r\n\r\n"), token(end, 1, b"")],
        vec![format!("{first}\r\n"), token(mid, 1, b"x")],
        vec![format!("{first}\r\n"), "garbage".into()],
    ] {
        let answer = raw(h.addr(), &put, Some(&s.cookie), chunks(body), true).await;
        assert_eq!(answer.status, 400);
        assert_eq!(
            std::fs::read(h.served.join("keep.txt")).unwrap(),
            b"precious"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&h.served)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".remo-put-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The numbers did not advance on failures; a good upload replaces the file.
    let good = vec![
        format!("{first}\r\n"),
        format!("{}\r\n", token(mid, 1, b"data")),
        token(end, 2, b""),
    ];
    let answer = raw(h.addr(), &put, Some(&s.cookie), chunks(good), true).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        std::fs::read(h.served.join("keep.txt")).unwrap(),
        b"new data"
    );

    // Chunked-body errors on /cmd: 400 Invalid encoding.
    let cmd = s.path("/cmd/", "cat");
    let hash = proto::path_hash(&cmd);
    let first = s.cipher.encrypt(&proto::request_plain(
        Magic {
            first: true,
            last: false,
        },
        2,
        0,
        Some(&hash),
        b"a",
    ));
    let answer = raw(
        h.addr(),
        &cmd,
        Some(&s.cookie),
        chunks(vec![format!("{first}\r\n\r\n")]),
        true,
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(&answer.body[..], b"Invalid encoding\n");
}

#[tokio::test]
async fn session_expiry_ends_the_interactive_command() {
    let h = Harness::start(|c| {
        c.session_timeout = Duration::from_secs(1);
        c.kill_grace = Duration::from_millis(200);
    })
    .await;
    let s = RawSession::login(&h).await;
    let icm = s.path("/icm/", "sh -c 'echo $$; exec sleep 60'");
    let answer = s.send(&icm, s.first(&icm, 1, true, b"")).await;
    assert_eq!(answer.status, 200);
    let pid: u32 = String::from_utf8(s.payload(&answer))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // The next request finds the session expired (403) and the command is terminated.
    let cmd = s.path("/cmd/", "true");
    assert_eq!(s.send(&cmd, s.first(&cmd, 2, true, b"")).await.status, 403);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "interactive command survived expiry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn independent_python_client_round_trip() {
    let h = Harness::start(|_| {}).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/remo_client.py");
    let probe = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .status()
        .unwrap();
    assert!(
        probe.success(),
        "the Python `cryptography` package is missing (scripts/test installs it)"
    );
    let selftest = tokio::process::Command::new("python3")
        .arg(&script)
        .arg("selftest")
        .output()
        .await
        .unwrap();
    assert!(
        selftest.status.success(),
        "{}",
        String::from_utf8_lossy(&selftest.stderr)
    );

    let key = h.dir.path().join("alice_key.pem");
    std::fs::write(&key, &h.user_key_pem).unwrap();
    let server_pem = h.dir.path().join("remo_serv.pem");
    let PublicKey::Ed448(server_vk) = &h.server_pub else {
        unreachable!()
    };
    std::fs::write(&server_pem, PublicKey::ed448_pem(server_vk)).unwrap();
    let scratch = h.dir.path().join("py");
    std::fs::create_dir(&scratch).unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--url", &format!("http://{}", h.addr()), "--user", "alice"])
        .arg("--key")
        .arg(&key)
        .arg("--server-key")
        .arg(&server_pem)
        .arg("roundtrip")
        .arg("--dir")
        .arg(&scratch)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ok\": true"), "{stdout}");
}

#[tokio::test]
async fn shutdown_kills_interactive_commands_that_ignore_sigterm() {
    let h = Harness::start(|c| c.kill_grace = Duration::from_millis(300)).await;
    let mut client = h.client().await;
    let first = client
        .iexec("sh -c \"trap '' TERM; echo $$; exec sleep 60\"")
        .await
        .unwrap();
    let pid: u32 = String::from_utf8(first).unwrap().trim().parse().unwrap();
    let alive = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && !stat.contains(") Z")
    };
    assert!(alive());
    h.server.stop(Duration::from_secs(5)).await.unwrap();
    // serve() returns only after SIGTERM, the grace period and SIGKILL.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command survived the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn command_timeout_and_replaced_interactive_commands() {
    let h = Harness::start(|c| {
        c.command_timeout = Some(Duration::from_millis(500));
        c.kill_grace = Duration::from_millis(200);
    })
    .await;
    let mut client = h.client().await;
    let started = std::time::Instant::now();
    let out = client
        .exec("sh -c 'echo early; sleep 30'", b"")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((out.exit_status, out.timed_out), (Some(124), true));
    assert_eq!(out.output, b"early\n");

    let first = client
        .iexec("sh -c 'echo $$; exec sleep 60'")
        .await
        .unwrap();
    let pid: u32 = String::from_utf8(first).unwrap().trim().parse().unwrap();
    client.iexec("cat").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced command survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.idata(b"still cat\n").await.unwrap(), b"still cat\n");
}

#[tokio::test]
async fn client_recovers_after_an_early_rejection() {
    // A 413 is refused before the request counts; the client's counter is then one ahead,
    // the server answers "Wrong initial token" and the client logs in again by itself.
    let h = Harness::start(|c| c.max_body = 1024).await;
    let mut client = h.client().await;
    let err = client.exec("cat", &[b'x'; 4096]).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 413, .. }),
        "{err}"
    );
    assert_eq!(
        client.exec("echo fine", b"").await.unwrap().output,
        b"fine\n"
    );
}

#[tokio::test]
async fn https_mode() {
    let pki = testkit::pki::test_pki();
    common::tls::install_default_provider();
    let tls = common::tls::ServerTls::load(common::tls::ServerTlsFiles {
        cert: pki.server.cert_path.clone(),
        key: Some(pki.server.key_path.clone()),
        client_ca: None,
        crls: Vec::new(),
        client_auth: common::tls::ClientAuth::Off,
        alpn: vec![b"http/1.1".to_vec()],
    })
    .unwrap();
    let h = Harness::start_with_tls(|_| {}, Some(tls)).await;
    let mut config = h.config();
    config.url = format!("https://localhost:{}", h.addr().port())
        .parse()
        .unwrap();
    config.ca = Some(pki.ca_path.clone());
    let key = PrivateKey::from_pem(&h.user_key_pem, None).unwrap();
    let mut client = Client::login(config.clone(), key, h.server_pub.clone())
        .await
        .unwrap();
    assert_eq!(client.exec("echo tls", b"").await.unwrap().output, b"tls\n");
    // Plain HTTP on the HTTPS port gets nowhere.
    let mut plain = config;
    plain.url = format!("http://127.0.0.1:{}", h.addr().port())
        .parse()
        .unwrap();
    assert!(remo_serv::client::plain_info(&plain).await.is_err());
}
