//! Interactive commands (`/icm`, `/idt`, `/edt`) and what terminates them: a new `/icm`, a
//! logout, a session expiry (SIGTERM, then SIGKILL after the grace period).

use std::time::{Duration, Instant};

use remo_serv::client::{Client, ClientError};

use crate::harness::{Harness, RawSession, WAIT, numbers, process_ended, wait_ended};

/// Polls the interactive command until its output so far contains `needle`.
async fn read_until(client: &mut Client, mut output: Vec<u8>, needle: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    while !output.windows(needle.len()).any(|w| w == needle) {
        assert!(
            Instant::now() < deadline,
            "no {:?} in {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&output)
        );
        output.extend(client.idata(b"").await.unwrap());
    }
    output
}

/// Starts `line` on a raw session and returns the pids it prints (`want` of them).
async fn start_printing_pids(s: &mut RawSession, line: &str, want: usize) -> Vec<u32> {
    let icm = s.path("/icm/", line);
    let answer = s.call(&icm, b"").await;
    assert_eq!(answer.status, 200);
    let mut output = s.decode(&answer);
    let deadline = Instant::now() + WAIT;
    while numbers(&output).len() < want {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            String::from_utf8_lossy(&output)
        );
        let answer = s.call("/idt", b"").await;
        assert_eq!(answer.status, 200);
        output.extend(s.decode(&answer));
    }
    let pids = numbers(&output);
    for &pid in &pids {
        assert!(!process_ended(pid), "{pid} runs");
    }
    pids
}

#[tokio::test]
async fn interactive_commands_through_the_client() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let first = client
        .iexec("sh -c 'echo start; while read line; do echo \"<$line>\"; done; echo end'")
        .await
        .unwrap();
    read_until(&mut client, first, b"start\n").await;
    let out = client.idata(b"one\n").await.unwrap();
    read_until(&mut client, out, b"<one>\n").await;
    let out = client.idata(b"two\nthree\n").await.unwrap();
    read_until(&mut client, out, b"<three>\n").await;
    // The end: its input is closed and the rest of its output comes back.
    assert_eq!(client.iend().await.unwrap(), b"end\n");
    let err = client.idata(b"again\n").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 400, .. }),
        "detached after /edt: {err}"
    );

    // The process is kept while it runs; once it closed its output it is detached.
    let first = client
        .iexec("sh -c 'read x; echo \"got $x\"'")
        .await
        .unwrap();
    let out = client.idata(b"it\n").await.unwrap();
    let mut out = [first, out].concat();
    let deadline = Instant::now() + WAIT;
    loop {
        match client.idata(b"").await {
            Ok(more) => out.extend(more),
            Err(ClientError::Status { status: 400, .. }) => break,
            Err(err) => panic!("{err}"),
        }
        assert!(Instant::now() < deadline, "never detached");
    }
    assert_eq!(out, b"got it\n");
    h.stop().await;
}

#[tokio::test]
async fn edt_streams_long_output_in_many_tokens() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    let icm = s.path("/icm/", "sh -c 'read x; seq 1 30000'");
    let answer = s.call(&icm, b"").await;
    assert_eq!(s.decode(&answer), b"");
    let answer = s.call("/edt", b"ignored").await;
    assert_eq!(answer.status, 200);
    let lines = std::str::from_utf8(&answer.body).unwrap().lines().count();
    assert!(lines > 10, "{lines} tokens");
    let expected: String = (1..=30_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(s.decode(&answer)).unwrap(), expected);
    // Detached: nothing to end any more.
    assert_eq!(s.call("/edt", b"").await.status, 400);
    h.stop().await;
}

#[tokio::test]
async fn a_new_icm_terminates_the_previous_one() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    // The first one ignores SIGTERM: it must be killed after the grace period (300 ms here).
    let old =
        start_printing_pids(&mut s, "sh -c 'trap \"\" TERM; echo $$; exec sleep 60'", 1).await;
    let new = start_printing_pids(&mut s, "sh -c 'echo $$; exec sleep 60'", 1).await;
    wait_ended(old[0], Duration::from_secs(5), "a new /icm replaces it").await;
    assert!(!process_ended(new[0]), "the new command runs");
    // The whole process group goes, background children included.
    let group = start_printing_pids(&mut s, "sh -c 'echo $$; sleep 60 & echo $!; wait'", 2).await;
    wait_ended(new[0], Duration::from_secs(5), "a new /icm replaces it").await;
    let _ = s.logout().await;
    for pid in group {
        wait_ended(pid, Duration::from_secs(5), "logout ends the whole group").await;
    }
    h.stop().await;
}

#[tokio::test]
async fn logout_terminates_the_interactive_command() {
    let h = Harness::start().await;
    let mut s = h.raw().await;
    let pids = start_printing_pids(&mut s, "sh -c 'echo $$; exec sleep 60'", 1).await;
    let bye = s.logout().await;
    assert_eq!(bye.status, 200);
    wait_ended(pids[0], Duration::from_secs(5), "logout ends it").await;
    // Through the client library too.
    let mut client = h.client().await;
    let pids = numbers(
        &client
            .iexec("sh -c 'echo $$; exec sleep 60'")
            .await
            .unwrap(),
    );
    let pid = match pids.as_slice() {
        [pid] => *pid,
        _ => numbers(&read_until(&mut client, Vec::new(), b"\n").await)[0],
    };
    client.logout().await.unwrap();
    wait_ended(pid, Duration::from_secs(5), "the client's logout ends it").await;
    h.stop().await;
}

#[tokio::test]
async fn session_expiry_terminates_the_interactive_command() {
    let h = Harness::start_with(|c| c.session_timeout = Duration::from_secs(1)).await;
    let mut s = h.raw().await;
    let pids = start_printing_pids(&mut s, "sh -c 'echo $$; exec sleep 60'", 1).await;
    // Activity keeps the session alive past its timeout...
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.call("/idt", b"").await.status, 200);
    }
    assert!(!process_ended(pids[0]));
    // ...idleness ends it, and the command with it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cmd = s.path("/cmd/", "true");
    s.call(&cmd, b"").await.assert_plain(403, "");
    wait_ended(pids[0], Duration::from_secs(5), "its session expired").await;
    assert_eq!(h.server.sessions(), 0);
    h.stop().await;
}
