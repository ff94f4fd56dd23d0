//! Server shutdown: websockets close with 1001, pipes die even when they ignore SIGTERM,
//! socket files go.

use std::time::{Duration, Instant};

use secure_talk::hub::Channel;

use crate::support::{STEP, TestServer, alive, closed, connect, create_pipe, wait_checked_in};

#[tokio::test]
async fn shutdown_kills_pipes_that_ignore_sigterm_and_closes_with_1001() {
    let mut server = TestServer::start_with(|c| c.limits.kill_grace_secs = 1).await;
    let opts = server.alice("a");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    let id = create_pipe(&mut admin, r#"sh -c 'trap "" TERM; sleep 60'"#).await;
    wait_checked_in(&mut admin, id).await;
    // The pipe program and the command it launched.
    testkit::until("the command to start", STEP, || {
        server.pipe_processes().len() >= 2
    })
    .await;
    let pids = server.pipe_processes();

    let admin_closed = tokio::spawn(async move { closed(&mut admin).await });
    let data_closed = tokio::spawn(async move { closed(&mut data).await });
    let grace = Duration::from_secs(server.config.limits.kill_grace_secs);
    let started = Instant::now();
    assert!(server.stop().await, "every task drained");
    testkit::until(
        "the pipe processes to die",
        (grace + Duration::from_secs(2)).saturating_sub(started.elapsed()),
        || pids.iter().all(|pid| !alive(*pid)),
    )
    .await;
    assert!(
        started.elapsed() < grace + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(server.pipe_processes().is_empty());

    for (name, task) in [("admin", admin_closed), ("data", data_closed)] {
        let code = task.await.expect("reader").map(|c| c.0);
        assert_eq!(code, Some(1001), "{name}");
    }
    assert!(!server.config.ipc_socket.exists(), "ipc socket removed");
    assert!(
        !server.config.unix_socket.as_ref().expect("unix").exists(),
        "unix socket removed"
    );
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}
