//! The check-in timer at its default (10 s), both ways: a pipe that checked in lives past it
//! and keeps streaming; a pipe that never checks in is stopped at it. The two run side by side
//! in one test, so the suite waits for the default once.

use std::time::Duration;

use common::envelope::talk::{Message, method};
use secure_talk::client::{Connection, Incoming};
use secure_talk::config::Limits;
use secure_talk::hub::Channel;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{TestServer, alive, connect, create_pipe, data_until, list, listed_pid};

/// The timers under test at their defaults (the test configuration shortens them).
fn default_timers(limits: &mut Limits) {
    let defaults = Limits::default();
    limits.pipe_checkin_timeout_secs = defaults.pipe_checkin_timeout_secs;
    limits.kill_grace_secs = defaults.kill_grace_secs;
}

/// The next message matching `matches` within `within`, or `None`.
async fn message_within(
    conn: &mut Connection,
    within: Duration,
    mut matches: impl FnMut(&Message) -> bool,
) -> Option<Message> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv_timeout(left).await {
            Ok(Some(Incoming::Message(m))) if matches(&m) => return Some(m),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn the_checkin_timer_at_its_default_spares_a_checked_in_pipe_and_stops_a_silent_one() {
    let timeout = Duration::from_secs(Limits::default().pipe_checkin_timeout_secs);
    let live = TestServer::start_with(|c| default_timers(&mut c.limits)).await;
    let silent = TestServer::start_with(|c| {
        default_timers(&mut c.limits);
        // A program that never checks in.
        c.pipe_program = "sleep".into();
        c.pipe_args = vec!["60".into()];
    })
    .await;

    let runs_past_the_timer = async {
        let opts = live.alice("a");
        let mut data = connect(&opts, Channel::Data).await;
        let mut admin = connect(&opts, Channel::Admin).await;
        let started = Instant::now();
        let launch = "sh -c 'echo before; sleep 12; echo after; sleep 1; echo done'";
        let id = create_pipe(&mut admin, launch).await;
        data_until(&mut data, id, "before\n").await;
        // Past the 10 s mark the pipe still streams to its owner's data channel.
        let after = message_within(&mut data, Duration::from_secs(16), |m| {
            m.headers.pipe_id == Some(id)
                && m.payload.as_ref().and_then(Value::as_str) == Some("after\n")
        })
        .await;
        assert!(
            after.is_some(),
            "no output after the check-in timeout (the pipe was stopped at {:?})",
            started.elapsed()
        );
        assert!(started.elapsed() > timeout, "{:?}", started.elapsed());
        data_until(&mut data, id, "done\n").await;
        // It ends by itself, with its command, and only then is deleted.
        let deleted = message_within(&mut admin, Duration::from_secs(5), |m| {
            m.method() == method::PIPE_DELETE
        })
        .await
        .expect("pipe_delete once the command has ended");
        assert_eq!(deleted.payload, Some(json!([id])));
        assert!(started.elapsed() >= Duration::from_secs(13));
    };

    let stopped_at_the_timer = async {
        let opts = silent.alice("s");
        let mut admin = connect(&opts, Channel::Admin).await;
        let started = Instant::now();
        let id = create_pipe(&mut admin, "unused").await;
        let pid = listed_pid(&list(&mut admin).await, id);
        let deleted = message_within(&mut admin, timeout + Duration::from_secs(4), |m| {
            m.method() == method::PIPE_DELETE
        })
        .await
        .expect("a pipe that never checks in is stopped at the default timeout");
        assert_eq!(deleted.payload, Some(json!([id])));
        let waited = started.elapsed();
        assert!(
            waited >= timeout - Duration::from_millis(500),
            "stopped after {waited:?}"
        );
        assert!(!alive(pid), "the process is gone");
    };

    tokio::join!(runs_past_the_timer, stopped_at_the_timer);
    silent
        .assert_no_pipe_processes(Duration::from_secs(2))
        .await;
}
