//! Limits on unverified work (issue 16): bodies read before anything in them verified have a
//! total deadline and a byte budget, logins are rate-limited per address and capped per user,
//! a login never takes over the session its cookie names, a body token runs once, and an
//! unknown user costs what a known one does.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use remo_serv::keys::{PrivateKey, PublicKey};
use remo_serv::proto::{self, AuthRequest, Cipher};
use testkit::front::{OTHER_LOOPBACK, connect_from};

use crate::harness::{self, Harness, ONLY, RawBody, RawSession, USER, WAIT};

/// A login body for `user`, signed with `key`.
fn login_body(user: &str, key: &PrivateKey) -> (Bytes, [u8; proto::X448_LEN]) {
    let secret = proto::x448_secret();
    let public = proto::x448_public(&secret);
    let body = AuthRequest {
        user: user.into(),
        key: public.to_vec(),
        sign: key.sign(&AuthRequest::signed_message(user, &public)),
    }
    .to_json();
    (body.into(), secret)
}

/// A keep-alive connection from `source`.
async fn connection(source: IpAddr, addr: SocketAddr) -> SendRequest<harness::Body> {
    let tcp = connect_from(source, addr).await.unwrap();
    crate::harness::http1(tcp).await.0
}

/// One request on `sender` with a Content-Length body: status, body, elapsed time.
async fn exchange(
    sender: &mut SendRequest<harness::Body>,
    path: &str,
    cookie: Option<&str>,
    body: Bytes,
) -> (u16, Bytes, Option<String>, Duration) {
    sender.ready().await.unwrap();
    let mut request = hyper::Request::post(path)
        .header("host", "x")
        .header("content-length", body.len());
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let request = request
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status().as_u16();
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body, cookie, started.elapsed())
}

/// A request whose chunked body trickles: `piece` every `every`, `pieces` times, then ends.
/// Returns the status and when the answer came.
async fn trickle(
    sender: &mut SendRequest<harness::Body>,
    path: &str,
    cookie: Option<&str>,
    pieces: Vec<Bytes>,
    every: Duration,
) -> (u16, Bytes, Duration) {
    let (tx, body) = RawBody::channel();
    let RawBody::Chunked(body) = body else {
        unreachable!()
    };
    sender.ready().await.unwrap();
    let mut request = hyper::Request::post(path)
        .header("host", "x")
        .header("transfer-encoding", "chunked");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let feeder = tokio::spawn(async move {
        for piece in pieces {
            if tx.send(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let started = Instant::now();
    let response = tokio::time::timeout(WAIT * 2, sender.send_request(request.body(body).unwrap()))
        .await
        .expect("an answer in time")
        .unwrap();
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    feeder.abort();
    (status, body, elapsed)
}

/// Splits `body` into one-byte pieces.
fn bytewise(body: &[u8]) -> Vec<Bytes> {
    body.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect()
}

/// Slowloris: an `/auth` body one byte at a time kept the request alive for as long as the
/// bytes kept coming (the stall deadline restarts with each piece). The body now has a total
/// deadline, on a connection that authenticated already (so `auth-timeout` is not what ends
/// it), and so has the first token of a request on a live session.
#[tokio::test]
async fn a_trickled_unverified_body_is_cut_at_its_total_deadline() {
    let deadline = Duration::from_secs(1);
    let h = Harness::start_with(|config| {
        config.unverified_body_timeout = deadline;
        config.auth_timeout = Duration::from_secs(60);
    })
    .await;
    let mut conn = connection(OTHER_LOOPBACK, h.addr).await;
    let (body, _) = login_body(USER, &h.keys.user_key());
    let (status, _, _, _) = exchange(&mut conn, "/auth", None, body.clone()).await;
    assert_eq!(status, 200);
    // One byte every 100 ms: 268 bytes would take 27 s.
    let (status, text, elapsed) = trickle(
        &mut conn,
        "/auth",
        None,
        bytewise(&body),
        Duration::from_millis(100),
    )
    .await;
    assert_eq!((status, &text[..]), (400, &b"incomplete auth body\n"[..]));
    assert!(elapsed >= deadline && elapsed < deadline * 3, "{elapsed:?}");

    // The first token of a request on a live session, with nothing but the cookie.
    let s = h.raw().await;
    let path = s.path("/cmd/", "true");
    let token = s.first(&path, ONLY, 1, b"");
    let mut conn = connection(OTHER_LOOPBACK, h.addr).await;
    let (status, text, elapsed) = trickle(
        &mut conn,
        &path,
        Some(&s.cookie()),
        bytewise(token.as_bytes()),
        Duration::from_millis(100),
    )
    .await;
    assert_eq!((status, &text[..]), (400, &b"Invalid encoding\n"[..]));
    assert!(elapsed >= deadline && elapsed < deadline * 3, "{elapsed:?}");
    h.stop().await;
}

/// The default total deadline, 10 s, both ways: a login whose body trickles in over 8 s
/// lives; an `/auth` body still trickling at 10 s (on an authenticated connection, which
/// `auth-timeout` does not close) is cut there.
#[tokio::test]
async fn the_unverified_body_deadline_is_ten_seconds_by_default() {
    assert_eq!(
        remo_serv::config::Config::default().unverified_body_timeout,
        Duration::from_secs(remo_serv::config::DEFAULT_UNVERIFIED_BODY_TIMEOUT_SECS)
    );
    assert_eq!(remo_serv::config::DEFAULT_UNVERIFIED_BODY_TIMEOUT_SECS, 10);
    let h = Harness::start().await;
    let (body, _) = login_body(USER, &h.keys.user_key());
    let pieces = |count: usize| -> Vec<Bytes> {
        let size = body.len().div_ceil(count);
        body.chunks(size).map(Bytes::copy_from_slice).collect()
    };
    let lives = async {
        let mut conn = connection(OTHER_LOOPBACK, h.addr).await;
        trickle(&mut conn, "/auth", None, pieces(8), Duration::from_secs(1)).await
    };
    let dies = async {
        let mut conn = connection(IpAddr::from([127, 0, 0, 3]), h.addr).await;
        let (status, _, _, _) = exchange(&mut conn, "/auth", None, body.clone()).await;
        assert_eq!(status, 200);
        trickle(&mut conn, "/auth", None, pieces(30), Duration::from_secs(1)).await
    };
    let (lived, died) = tokio::join!(lives, dies);
    assert_eq!(lived.0, 200, "{lived:?}");
    assert!(lived.2 >= Duration::from_secs(7), "{lived:?}");
    assert_eq!(died.0, 400, "{died:?}");
    assert!(
        died.2 >= Duration::from_millis(9_500) && died.2 < Duration::from_secs(13),
        "{died:?}"
    );
    h.stop().await;
}

/// Registers a second user `name` with a fresh Ed448 key in the harness's user database: the
/// key.
async fn add_user(h: &Harness, name: &str) -> PrivateKey {
    let key = PrivateKey::generate();
    let users = remo_serv::users::Users::open(&h.dir.path().join("users.sqlite"))
        .await
        .unwrap();
    users
        .add(name, PublicKey::ed448_pem(&key.verifying_key()).as_bytes())
        .await
        .unwrap();
    key
}

/// A captured `/auth` body replayed 25 times used to fill `max-sessions = 20`, and the next
/// user got 503. A user now holds at most `max-sessions-per-user` sessions (their oldest
/// goes), so another user still logs in.
#[tokio::test]
async fn replayed_logins_do_not_fill_the_session_table() {
    let h = Harness::start_with(|config| config.max_sessions = 20).await;
    let bob = add_user(&h, "bob").await;
    let (captured, _) = login_body(USER, &h.keys.user_key());
    for _ in 0..25 {
        let answer = harness::request(
            h.addr,
            "POST",
            "/auth",
            None,
            RawBody::Length(captured.clone()),
        )
        .await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(
        h.server.sessions(),
        remo_serv::config::DEFAULT_MAX_SESSIONS_PER_USER
    );
    let (body, _) = login_body("bob", &bob);
    let answer = harness::request(h.addr, "POST", "/auth", None, RawBody::Length(body)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    h.stop().await;
}

/// One captured `/auth` body replayed on 530 connections, 20 per source address (under the
/// login burst), each kept open: every replay that verified took a `max-connections` slot for
/// as long as its connection lived (its session was soon ended by the per-user session cap,
/// the connection was not), and after 512 every login of every user got 503. A connection now
/// lives only as long as the session it authenticated with, and one user holds at most
/// `max-connections-per-user` connections (their oldest closed for a newcomer): at the
/// defaults, alice and bob still log in and work.
#[tokio::test]
async fn a_replayed_login_cannot_take_the_connection_slots() {
    use remo_serv::config::{
        DEFAULT_LOGIN_BURST, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_SESSIONS_PER_USER,
    };
    let h = Harness::start_with(|config| config.login_burst = DEFAULT_LOGIN_BURST).await;
    let bob = add_user(&h, "bob").await;
    let (captured, _) = login_body(USER, &h.keys.user_key());
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..DEFAULT_MAX_CONNECTIONS + 18 {
        let per = DEFAULT_LOGIN_BURST as usize;
        let source = IpAddr::from([127, 0, 20 + (i / per) as u8, (i % per + 1) as u8]);
        let mut sender = connection(source, h.addr).await;
        let (status, ..) = exchange(&mut sender, "/auth", None, captured.clone()).await;
        if status != 200 {
            refused += 1;
        }
        held.push(sender);
    }
    // Not one replay is refused (each closes an older connection of alice's instead), and
    // alice's connections shrink to her share.
    assert_eq!(refused, 0, "replays refused");
    let cap = 16;
    testkit::until(
        "the replayed connections to shrink to alice's share",
        WAIT,
        || {
            let open = held.iter().filter(|s| !s.is_closed()).count();
            let stats = h.server.admission().stats();
            open <= DEFAULT_MAX_SESSIONS_PER_USER && stats.connections <= cap
        },
    )
    .await;
    // A fresh login of alice (the real one) and one of bob get in and are served.
    let mut alice = h.client().await;
    assert_eq!(alice.exec("true", b"").await.unwrap().exit_status, Some(0));
    let mut bob_conn = connection(OTHER_LOOPBACK, h.addr).await;
    let (body, _) = login_body("bob", &bob);
    let (status, text, ..) = exchange(&mut bob_conn, "/auth", None, body).await;
    assert_eq!(status, 200, "{text:?}");
    drop(held);
    h.stop().await;
}

/// Login attempts from one address beyond the burst are refused as the original refuses a
/// login (403, empty), before any signature is checked; another address is not affected.
#[tokio::test]
async fn logins_are_rate_limited_per_address() {
    let h = Harness::start_with(|config| {
        config.login_burst = 3;
        config.logins_per_minute = 1;
    })
    .await;
    let mut conn = connection(OTHER_LOOPBACK, h.addr).await;
    for _ in 0..3 {
        let (body, _) = login_body(USER, &h.keys.user_key());
        let (status, _, _, _) = exchange(&mut conn, "/auth", None, body).await;
        assert_eq!(status, 200);
    }
    let (body, _) = login_body(USER, &h.keys.user_key());
    let (status, text, _, _) = exchange(&mut conn, "/auth", None, body).await;
    assert_eq!((status, &text[..]), (403, &b""[..]));
    let mut other = connection(IpAddr::from([127, 0, 0, 4]), h.addr).await;
    let (body, _) = login_body(USER, &h.keys.user_key());
    let (status, _, _, _) = exchange(&mut other, "/auth", None, body).await;
    assert_eq!(status, 200);
    h.stop().await;
}

/// Bodies that only carry a valid cookie were buffered up to 87 MiB each before anything was
/// checked. Now their bytes are charged to the session and to the server until the first
/// token verifies: several sessions each streaming big unverifiable first tokens hold at
/// most the budget, and what goes over is refused at once with a clear answer.
#[tokio::test]
async fn unverified_bodies_stay_within_the_budget() {
    const PER_SESSION: usize = 128 << 10;
    const TOTAL: usize = 256 << 10;
    const PIECE: usize = 60 << 10;
    let h = Harness::start_with(|config| {
        config.max_body = 64 << 10;
        config.unverified_bytes_per_session = Some(PER_SESSION);
        config.unverified_bytes = Some(TOTAL);
        config.max_handshakes_per_address = 32;
    })
    .await;
    let sessions = [h.raw().await, h.raw().await, h.raw().await];
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for s in &sessions {
        let path = s.path("/cmd/", "true");
        for _ in 0..3 {
            let mut conn = connection(OTHER_LOOPBACK, h.addr).await;
            let (tx, body) = RawBody::channel();
            let RawBody::Chunked(body) = body else {
                unreachable!()
            };
            let request = hyper::Request::post(&path)
                .header("host", "x")
                .header("cookie", s.cookie())
                .header("transfer-encoding", "chunked")
                .body(body)
                .unwrap();
            conn.ready().await.unwrap();
            let mut answer = tokio::spawn(conn.send_request(request));
            let before = h.server.unverified_bytes();
            // Base64-looking garbage without a line break: a first token still coming.
            tx.send(Bytes::from(vec![b'A'; PIECE])).await.unwrap();
            // Either the bytes are held, or the request is refused at once.
            let deadline = Instant::now() + WAIT;
            loop {
                if let Ok(response) =
                    tokio::time::timeout(Duration::from_millis(20), &mut answer).await
                {
                    let response = response.unwrap().unwrap();
                    let status = response.status().as_u16();
                    let text = response.into_body().collect().await.unwrap().to_bytes();
                    refused.push((status, String::from_utf8_lossy(&text).into_owned()));
                    break;
                }
                if h.server.unverified_bytes() >= before + PIECE {
                    held.push((tx, conn));
                    break;
                }
                assert!(Instant::now() < deadline, "neither held nor refused");
            }
            assert!(h.server.unverified_bytes() <= TOTAL);
        }
    }
    // Two held per session for the first two sessions (240 KiB); the third session's go over
    // the server's budget, each session's third over its own.
    assert_eq!(held.len(), 4, "{refused:?}");
    assert_eq!(h.server.unverified_bytes(), 4 * PIECE);
    let session_refusal = (
        429,
        "too much unverified data in flight for this session\n".to_owned(),
    );
    let server_refusal = (
        503,
        "server busy: too much unverified data in flight\n".to_owned(),
    );
    assert_eq!(
        refused,
        vec![
            session_refusal.clone(),
            session_refusal,
            server_refusal.clone(),
            server_refusal.clone(),
            server_refusal
        ]
    );
    // Gone bodies give their bytes back; the sessions still work.
    drop(held);
    testkit::until("the budget to be given back", WAIT, || {
        h.server.unverified_bytes() == 0
    })
    .await;
    for mut s in sessions {
        let path = s.path("/cmd/", "echo ok");
        let answer = s.call(&path, b"").await;
        assert_eq!(s.decode(&answer), b"ok\n");
    }
    h.stop().await;
}

/// The same body token sent twice while the first copy still runs (right after login, when
/// any request number is accepted): only one copy runs.
#[tokio::test]
async fn a_token_replayed_while_its_request_runs_runs_once() {
    let h = Harness::start().await;
    let s = h.raw().await;
    let path = s.path("/cmd/", "sh -c 'echo ran >> ran.txt; sleep 1'");
    let token = s.first(&path, ONLY, 1, b"");
    let (first, second) = tokio::join!(s.send(&path, token.clone()), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.send(&path, token.clone()).await
    });
    assert_eq!(first.status, 200);
    second.assert_plain(400, "Wrong initial token\n");
    assert_eq!(
        std::fs::read_to_string(h.served.join("ran.txt")).unwrap(),
        "ran\n"
    );
    h.stop().await;
}

/// Another user's login with the victim's cookie used to re-key the victim's session (and
/// inherit its interactive command), and an empty `/auth` with the cookie logged the victim
/// out. A login now always opens a new session, and an empty `/auth` changes nothing.
#[tokio::test]
async fn a_cookie_alone_neither_takes_over_nor_ends_a_session() {
    let h = Harness::start().await;
    let mut alice = h.raw().await;
    let icm = alice.path("/icm/", "cat");
    assert_eq!(alice.call(&icm, b"").await.status, 200);

    // Mallory (a registered user) logs in with alice's cookie.
    let mallory_key = PrivateKey::generate();
    let users = remo_serv::users::Users::open(&h.dir.path().join("users.sqlite"))
        .await
        .unwrap();
    users
        .add(
            "mallory",
            PublicKey::ed448_pem(&mallory_key.verifying_key()).as_bytes(),
        )
        .await
        .unwrap();
    let (body, secret) = login_body("mallory", &mallory_key);
    let answer = harness::request(
        h.addr,
        "POST",
        "/auth",
        Some(&alice.cookie()),
        RawBody::Length(body),
    )
    .await;
    assert_eq!(answer.status, 200);
    let mallory_id = answer.session_id().unwrap();
    assert_ne!(mallory_id, alice.id, "a login gets a new session id");
    let (server_public, _) = proto::parse_auth_response(&answer.body).unwrap();
    let shared = proto::x448_shared(&secret, &server_public).unwrap();
    let mut mallory = RawSession {
        addr: h.addr,
        id: mallory_id,
        cipher: Cipher::new(&proto::session_key(&shared)),
        last: 0,
    };
    // Mallory's session has no interactive command; alice's still runs hers.
    let idt = mallory.call("/idt", b"from mallory\n").await;
    assert_eq!(idt.status, 400);
    // An empty /auth with alice's cookie is answered as before but logs nobody out.
    let bye = alice.empty_logout().await;
    assert_eq!((bye.status, bye.text().as_str()), (200, "Disconnected"));
    let idt = alice.call("/idt", b"still mine\n").await;
    assert_eq!(alice.decode(&idt), b"still mine\n");
    assert_eq!(h.server.sessions(), 2);
    // A logout that proves the key does end the session.
    let bye = alice.logout().await;
    assert_eq!((bye.status, bye.text().as_str()), (200, "Disconnected"));
    assert_eq!(h.server.sessions(), 1);
    h.stop().await;
}

/// A known user with a bad signature took 1.57 ms, an unknown one 0.34 ms: the names could be
/// told apart. An unknown user is now verified against a key of the server's own, with the
/// same key agreement after it. Unloaded, the medians are within 5 % of each other (1.96 ms,
/// 1.92 ms); the bound is a factor of 2, loose enough for a loaded 2-core CI running other
/// tests beside this one, and far below the factor of 9 the old code showed (1.59 ms, 0.18 ms).
#[tokio::test]
async fn unknown_and_known_users_cost_the_same() {
    let h = Harness::start_with(|config| config.auth_timeout = Duration::from_secs(120)).await;
    let stranger = PrivateKey::generate();
    let mut conn = connection(OTHER_LOOPBACK, h.addr).await;
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for round in 0..41 {
        for (user, times) in [(USER, &mut known), ("nobody-here", &mut unknown)] {
            let (body, _) = login_body(user, &stranger);
            let (status, _, _, elapsed) = exchange(&mut conn, "/auth", None, body).await;
            assert_eq!(status, 403);
            if round > 0 {
                times.push(elapsed);
            }
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (known, unknown) = (median(&mut known), median(&mut unknown));
    let (low, high) = (known.min(unknown), known.max(unknown));
    assert!(
        high.as_secs_f64() <= low.as_secs_f64() * 2.0,
        "known user {known:?}, unknown user {unknown:?}"
    );
    h.stop().await;
}
