//! Bytes in flight at the default limits: one party's connections together hold at most its
//! share (`max_bytes_in_flight_per_identity`, 16 MiB), so others still get through, and a
//! message must arrive within `message_timeout_secs` (30 s) of its first frame header, or, for
//! a `model` upload, at `min_upload_bytes_per_sec` (16 KiB/s) on average once that old.

use std::time::{Duration, Instant};

use common::envelope::talk::{BinaryMessage, Headers, md5_hex, method};
use futures_util::StreamExt as _;
use secure_talk::client::Stream;
use secure_talk::config::Limits;
use secure_talk::hub::Channel;
use testkit::timers::{assert_about, sleep_until};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::memory::{frame_header, raw_ws};
use crate::support::{STEP, TestServer, connect, expect_reply};

/// What the attacker announced and sent per connection: a text frame of 1,048,000 bytes, all
/// but 8,000 of them sent (1 MiB held by the daemon, in 64 KiB steps).
const ANNOUNCED: u64 = 1_048_000;
const SENT: usize = 1_040_000;

#[tokio::test]
async fn one_certificate_holds_its_share_of_bytes_in_flight_and_others_still_get_through() {
    let server = TestServer::start_with(|c| c.limits = Limits::default()).await;
    let alice = server.alice("alice");
    // Alice opens 70 admin websockets (a fresh token each) and leaves a 1 MiB text message
    // unfinished on each: with no share, 64 of them held the whole 64 MiB budget.
    let mut opened = Vec::new();
    for _ in 0..70 {
        let mut ws = raw_ws(&alice, "/").await;
        let mut bytes = frame_header(false, 0x1, ANNOUNCED);
        bytes.extend(vec![b' '; SENT]);
        let _ = tokio::time::timeout(STEP, async {
            let _ = ws.get_mut().write_all(&bytes).await;
            let _ = ws.get_mut().flush().await;
        })
        .await;
        opened.push(ws);
    }
    let share = Limits::default().max_bytes_in_flight_per_identity;
    testkit::until("alice's messages are charged", STEP, || {
        server.server.bytes_in_flight() >= share
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A refused one has been closed; a held one has been sent nothing.
    let mut held = Vec::new();
    let mut refused = 0;
    for mut ws in opened {
        match tokio::time::timeout(Duration::from_millis(20), ws.next()).await {
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                assert_eq!(u16::from(frame.code), 1013, "{frame:?}");
                refused += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => held.push(ws),
        }
    }
    eprintln!(
        "alice: {} connections held, {refused} refused with 1013; {} bytes in flight",
        held.len(),
        server.server.bytes_in_flight()
    );
    assert_eq!(held.len(), 16);
    assert_eq!(server.server.bytes_in_flight(), share);

    // Bob's echo and his 200 KB upload go through.
    let mut bob = connect(&server.bob("bob"), Channel::Admin).await;
    bob.send_text(r#"{"headers":{"method":"text"},"payload":"hello, bob"}"#)
        .await
        .expect("send");
    let reply = bob.recv_timeout(STEP).await.expect("recv");
    assert!(format!("{reply:?}").contains("hello, bob"), "{reply:?}");
    let payload = vec![42u8; 200_000];
    let upload = BinaryMessage::new(
        Headers::method(method::MODEL).with_path("bob/w.bin"),
        payload.clone(),
    );
    bob.send_binary(&upload).await.expect("send");
    expect_reply(&mut bob, 200, &md5_hex(&payload)).await;
    assert_eq!(
        std::fs::read(server.config.upload_dir.join("bob/w.bin")).expect("read"),
        payload
    );

    // Alice gets room back as her messages go.
    drop(held);
    testkit::until("the budget is back to 0", STEP, || {
        server.server.bytes_in_flight() == 0
    })
    .await;
}

/// Writes `piece` every `every` until the server closes; its close code and when (from
/// `since`).
async fn trickle_until_closed(
    ws: &mut WebSocketStream<Stream>,
    since: Instant,
    every: Duration,
    piece: &[u8],
    within: Duration,
) -> (u16, Duration) {
    let ended = tokio::time::timeout(within, async {
        loop {
            tokio::select! {
                next = ws.next() => match next {
                    Some(Ok(WsMessage::Close(Some(frame)))) => {
                        return (u16::from(frame.code), since.elapsed());
                    }
                    Some(Ok(_)) => {}
                    other => panic!("no close frame: {other:?}"),
                },
                () = tokio::time::sleep(every) => {
                    let _ = ws.get_mut().write_all(piece).await;
                    let _ = ws.get_mut().flush().await;
                }
            }
        }
    })
    .await;
    ended.expect("the server closes in time")
}

/// Sends `message` as `pieces` frames, one every `every` from `since`; the first reply that
/// is a text message (other than a `checkSum` push).
async fn send_over_time(
    ws: &mut WebSocketStream<Stream>,
    since: Instant,
    opcode: u8,
    message: &[u8],
    pieces: usize,
    every: Duration,
) -> String {
    let size = message.len().div_ceil(pieces);
    let chunks: Vec<&[u8]> = message.chunks(size).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        sleep_until(since, every * i as u32).await;
        let mut bytes = frame_header(
            i + 1 == chunks.len(),
            if i == 0 { opcode } else { 0x0 },
            chunk.len() as u64,
        );
        bytes.extend_from_slice(chunk);
        ws.get_mut().write_all(&bytes).await.expect("write");
        ws.get_mut().flush().await.expect("flush");
    }
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                // Uploads push the new `checkSum` list to every admin connection.
                Some(Ok(WsMessage::Text(text))) if !text.contains(r#""method":"checkSum""#) => {
                    return text.to_string();
                }
                Some(Ok(_)) => {}
                other => panic!("no reply: {other:?}"),
            }
        }
    })
    .await
    .expect("a reply in time")
}

#[tokio::test]
async fn a_message_must_arrive_within_the_message_timeout_and_an_upload_at_the_minimum_rate() {
    let server = TestServer::start_with(|c| c.limits = Limits::default()).await;
    let limits = Limits::default();
    let timeout = limits.message_timeout();
    let alice = server.alice("alice");
    let bob = server.bob("bob");
    let mut trickled = raw_ws(&alice, "/").await;
    let mut slow_upload = raw_ws(&alice, "/").await;
    let mut upload = raw_ws(&bob, "/").await;
    let mut text = raw_ws(&bob, "/").await;
    let since = Instant::now();

    // Dies at 30 s: the attack's text message, then one byte every 5 s (each of which kept
    // the connection from being idle, and its megabyte held, for ever).
    let trickle = async {
        let mut bytes = frame_header(false, 0x1, ANNOUNCED);
        bytes.extend(vec![b' '; SENT]);
        trickled.get_mut().write_all(&bytes).await.expect("write");
        trickle_until_closed(
            &mut trickled,
            since,
            Duration::from_secs(5),
            b" ",
            timeout + STEP,
        )
        .await
    };
    // Dies at 30 s: an upload at 4 KiB/s (a quarter of the minimum rate).
    let slow = async {
        let mut bytes = frame_header(false, 0x2, 64 << 20);
        bytes.extend_from_slice(b"{\"method\":\"model\",\"path\":\"slow\"}\x01");
        slow_upload
            .get_mut()
            .write_all(&bytes)
            .await
            .expect("write");
        trickle_until_closed(
            &mut slow_upload,
            since,
            Duration::from_secs(1),
            &[7u8; 4 << 10],
            timeout + STEP,
        )
        .await
    };
    // Lives: a 1.1 MB upload at about 32 KiB/s, 34 s from its first frame to its last.
    let payload: Vec<u8> = (0..34 * 32 * 1024u32).map(|i| (i % 251) as u8).collect();
    let good = async {
        let message = BinaryMessage::new(
            Headers::method(method::MODEL).with_path("steady.bin"),
            payload.clone(),
        )
        .encode();
        send_over_time(
            &mut upload,
            since,
            0x2,
            &message,
            35,
            Duration::from_secs(1),
        )
        .await
    };
    // Lives: a text message in five fragments over 24 s.
    let fragmented = async {
        let message = br#"{"headers":{"method":"text"},"payload":"slow but in time"}"#;
        send_over_time(&mut text, since, 0x1, message, 5, Duration::from_secs(6)).await
    };
    let ((trickle_code, trickle_at), (slow_code, slow_at), good_reply, text_reply) =
        tokio::join!(trickle, slow, good, fragmented);
    eprintln!(
        "trickled text: {trickle_code} at {trickle_at:?}; 4 KiB/s upload: {slow_code} at {slow_at:?}"
    );
    assert_eq!(trickle_code, 1008);
    assert_about("a trickled text message", trickle_at, timeout);
    assert_eq!(slow_code, 1008);
    assert_about("an upload at 4 KiB/s", slow_at, timeout);
    assert!(good_reply.contains("200"), "{good_reply}");
    assert!(good_reply.contains(&md5_hex(&payload)), "{good_reply}");
    assert!(text_reply.contains("slow but in time"), "{text_reply}");
    // Both connections that lived still work.
    for ws in [&mut upload, &mut text] {
        let reply = send_over_time(
            ws,
            Instant::now(),
            0x1,
            br#"{"headers":{"method":"text"},"payload":"again"}"#,
            1,
            Duration::ZERO,
        )
        .await;
        assert!(reply.contains("again"), "{reply}");
    }
    // The cut messages gave their bytes back.
    testkit::until("the budget is back to 0", STEP, || {
        server.server.bytes_in_flight() == 0
    })
    .await;
    drop((trickled, slow_upload));
}
