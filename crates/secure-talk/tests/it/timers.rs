//! Every secure-talk timer at its default value, both ways (SECURITY.md invariant 8,
//! docs/TESTING.md), except `pipe_checkin_timeout_secs` (tests/it/pipes.rs). One server with
//! the default limits and TLS section runs the connection scenarios at once and is checked
//! once, past the longest default covered (`request_timeout_secs` and `ping_interval_secs`,
//! 30 s); a second server, whose pipe program ignores SIGTERM and waits long for its command,
//! runs the stop escalation (`kill_grace_secs`) alongside.
//!
//! Dies at about its default: a TCP stranger (handshake, 10 s); a verified TLS connection and
//! a Unix-socket connection that send no request, and a kept-alive connection idle after its
//! answer (request timeout, 30 s); a command that ignores SIGTERM after `destroy` (the pipe
//! program's SIGKILL, 3 s); a pipe whose program ignores both `destroy` and SIGTERM (SIGTERM
//! at one kill grace, SIGKILL at two: 10 s). Lives: an admin websocket (TLS) and a data
//! websocket (Unix socket) idle but reading past the first ping and the request timeout, a
//! kept-alive connection whose second request comes at 25 s, and a command that takes 2 s to
//! finish after `destroy`'s SIGTERM (its last output arrives, nothing is killed).
//!
//! `idle_timeout_secs` (90 s) has a test of its own below, at its default too (~100 s).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Shutdown;
use common::envelope::talk::method;
use common::tls::ServerTls;
use secure_talk::client::{self, ClientOptions, Connection};
use secure_talk::config::Config;
use secure_talk::hub::Channel;
use secure_talk::server::{Listeners, Server};
use secure_talk::token::Tokens;
use serde_json::json;
use testkit::timers::{SLACK, assert_about, closed_at, http_get, sleep_until};

use crate::support::{
    PIPE, alive, connect, create_pipe, data_until, expect_reply, list, listed_pid, listed_pipes,
    options, pki, recv_method, send, tls_transport, wait_checked_in,
};

/// When the live connections are checked: past the request timeout and two ping intervals.
const CHECK_AT: Duration = Duration::from_secs(33);

/// A server with the default configuration (TLS section included): only the listeners, the
/// state directory and the pipe program are set. Stopped (its pipes killed) when dropped.
struct Defaults {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    config: Config,
    shutdown: Shutdown,
}

impl Defaults {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::local(dir.path());
        config.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut section = pki.server_tls_section();
        // The test PKI's section shortens the handshake timeout; this test is about defaults.
        section.handshake_timeout_secs =
            common::tls::TlsSection::new(pki.server.cert_path.clone()).handshake_timeout_secs;
        config.tls = Some(section);
        config.unix_socket = Some(dir.path().join("talk.sock"));
        PIPE.clone_into(&mut config.pipe_program);
        tweak(&mut config);
        let tls = config.tls.as_ref().map(|section| {
            let files = section.files(config.client_auth, vec![b"http/1.1".to_vec()]);
            Arc::new(ServerTls::load(files).unwrap())
        });
        let listeners = Listeners::bind(&config).await.unwrap();
        let addr = listeners.tcp.as_ref().unwrap().local_addr().unwrap();
        let shutdown = Shutdown::new();
        let server = Server::new(
            config.clone(),
            Tokens::random(config.token_lifetime),
            tls,
            shutdown.clone(),
        );
        tokio::spawn(async move { server.run(listeners).await });
        Self {
            dir,
            addr,
            config,
            shutdown,
        }
    }

    fn client(&self, leaf: &testkit::Leaf, name: &str) -> ClientOptions {
        let token = self.dir.path().join(format!("{name}.token"));
        options(tls_transport(self.addr, Some(leaf)), Some(token))
    }

    fn unix(&self, name: &str) -> ClientOptions {
        let token = self.dir.path().join(format!("{name}.token"));
        let path = self.config.unix_socket.clone().unwrap();
        options(client::Transport::Unix(path), Some(token))
    }
}

impl Drop for Defaults {
    fn drop(&mut self) {
        self.shutdown.trigger();
        let ipc = self.config.ipc_socket.clone();
        for pid in crate::support::processes_with_env("SECURE_TALK_IPC_SOCKET", &ipc) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Reads everything that comes on `conn` until `at` after `since` (answering pings); panics
/// when the server closes it.
async fn idle_reading(conn: &mut Connection, since: Instant, at: Duration, what: &str) {
    loop {
        let left = (since + at).saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match conn.recv_timeout(left).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                // A timeout at `at`, or the connection ended.
                let early = Instant::now() + Duration::from_millis(50) < since + at;
                assert!(
                    conn.closed.is_none() && !early,
                    "{what}: closed while idle ({:?})",
                    conn.closed
                );
                return;
            }
            Err(err) => panic!("{what}: failed while idle: {err}"),
        }
    }
}

/// Sends `destroy` for pipe `id`; the instant it was sent.
async fn destroy(admin: &mut Connection, id: u64) -> Instant {
    let sent = Instant::now();
    send(
        admin,
        json!({"headers": {"method": "destroy", "pipe_id": id}}),
    )
    .await;
    expect_reply(admin, 200, &format!("pipe_destroy {id}")).await;
    sent
}

/// When process `pid` died, from `since`.
async fn died_at(pid: i32, since: Instant) -> Duration {
    testkit::until(
        &format!("process {pid} to die"),
        Duration::from_secs(30),
        || !alive(pid),
    )
    .await;
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timer_at_its_default_cuts_what_it_should_and_nothing_else() {
    let server = Defaults::start(|_| {}).await;
    let limits = server.config.limits.clone();
    // The defaults this test is about (deploy/config/secure-talk.example.toml).
    assert_eq!(limits.request_timeout(), Duration::from_secs(30));
    assert_eq!(limits.ping_interval(), Duration::from_secs(30));
    assert_eq!(limits.kill_grace(), Duration::from_secs(5));
    let handshake = server.config.tls.as_ref().unwrap().handshake_timeout();
    assert_eq!(handshake, Duration::from_secs(10));
    let request_timeout = limits.request_timeout();
    let kill_grace = limits.kill_grace();
    // The pipe program waits 60 s for its command after destroy, and (through the shell's
    // `trap`, inherited across exec) ignores SIGTERM: only the daemon's escalation stops it.
    let stubborn = Defaults::start(|c| {
        c.pipe_program = "sh".into();
        c.pipe_args = [
            "-c",
            "trap '' TERM; exec \"$0\" \"$@\"",
            PIPE,
            "-i",
            "{id}",
            "-u",
            "{ipc_socket}",
            "--kill-grace-ms",
            "60000",
        ]
        .map(str::to_owned)
        .to_vec();
    })
    .await;
    let pki = pki();
    let start = Instant::now();
    let within = CHECK_AT + SLACK;

    // Dies: a TCP connection that never starts TLS, at the handshake timeout.
    let stranger = async {
        // The server's timer starts at its accept, which may come before connect returns
        // here: the clock starts before the connect, so a loaded machine cannot make the
        // timer look early.
        let began = Instant::now();
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let at = closed_at(tcp, began, within).await;
        assert_about("tcp stranger", at.expect("closed"), handshake);
    };

    // Dies: a verified TLS connection, and a Unix-socket one, that never send a request.
    let no_request_tls = async {
        let stream = client::open_stream(&server.client(&pki.alice, "quiet"))
            .await
            .unwrap();
        let began = Instant::now();
        let at = closed_at(stream, began, within).await;
        assert_about(
            "tls without a request",
            at.expect("closed"),
            request_timeout,
        );
    };
    let no_request_unix = async {
        let stream = client::open_stream(&server.unix("quiet")).await.unwrap();
        let began = Instant::now();
        let at = closed_at(stream, began, within).await;
        assert_about(
            "unix without a request",
            at.expect("closed"),
            request_timeout,
        );
    };

    // Dies: a kept-alive connection idle after its answer. Lives: one whose second request
    // comes before the timeout.
    let kept_alive_idle = async {
        let mut stream = client::open_stream(&server.client(&pki.bob, "ka1"))
            .await
            .unwrap();
        assert_eq!(http_get(&mut stream, "/nothing").await, 404);
        let began = Instant::now();
        let at = closed_at(stream, began, within).await;
        assert_about("idle kept-alive", at.expect("closed"), request_timeout);
    };
    let kept_alive_busy = async {
        let mut stream = client::open_stream(&server.client(&pki.bob, "ka2"))
            .await
            .unwrap();
        assert_eq!(http_get(&mut stream, "/nothing").await, 404);
        sleep_until(start, Duration::from_secs(25)).await;
        assert_eq!(
            http_get(&mut stream, "/nothing").await,
            404,
            "second request at 25 s"
        );
    };

    // Lives: an idle admin websocket over TLS and an idle data websocket over the Unix
    // socket, both reading, past the request timeout and two ping intervals. Dies (on the
    // way): a command that ignores SIGTERM after destroy, at the pipe program's 3 s.
    let websockets = async {
        let opts = server.client(&pki.alice, "ws");
        let mut admin = connect(&opts, Channel::Admin).await;
        let unix_opts = server.unix("ws-unix");
        let mut data = connect(&unix_opts, Channel::Data).await;
        let mut unix_admin = connect(&unix_opts, Channel::Admin).await;

        let id = create_pipe(&mut admin, r#"sh -c 'trap "" TERM; sleep 60'"#).await;
        wait_checked_in(&mut admin, id).await;
        let pid = listed_pid(&list(&mut admin).await, id);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = destroy(&mut admin, id).await;
        let deleted = recv_method(&mut admin, method::PIPE_DELETE).await;
        assert_eq!(deleted.payload, Some(json!([id])));
        let at = died_at(pid, sent).await;
        assert_about("command ignoring SIGTERM", at, Duration::from_secs(3));

        idle_reading(&mut admin, start, CHECK_AT, "admin over TLS").await;
        idle_reading(&mut data, start, CHECK_AT, "data over unix").await;
        assert!(listed_pipes(&list(&mut admin).await).is_empty());
        let id = create_pipe(&mut unix_admin, "echo still-here").await;
        data_until(&mut data, id, "still-here").await;
    };

    // The stop escalation at the default kill grace: a pipe whose program ignores destroy
    // and SIGTERM gets SIGTERM at one grace and SIGKILL at two.
    let escalation = async {
        let opts = stubborn.client(&pki.bob, "stubborn");
        let mut admin = connect(&opts, Channel::Admin).await;
        let stuck = create_pipe(&mut admin, r#"sh -c 'trap "" TERM; sleep 60'"#).await;
        wait_checked_in(&mut admin, stuck).await;
        let pid = listed_pid(&list(&mut admin).await, stuck);
        let sent = destroy(&mut admin, stuck).await;
        let at = died_at(pid, sent).await;
        assert_about("pipe ignoring destroy and SIGTERM", at, 2 * kill_grace);
    };

    // Lives: after destroy, a command that needs 2 s after SIGTERM (within the pipe program's
    // 3 s and the daemon's 5 s) finishes by itself and its last words arrive.
    let polite = async {
        let opts = server.client(&pki.chained_client, "polite");
        let mut data = connect(&opts, Channel::Data).await;
        let mut admin = connect(&opts, Channel::Admin).await;
        let id = create_pipe(
            &mut admin,
            r#"sh -c 'trap "sleep 2; echo goodbye; exit 0" TERM; echo ready; while :; do sleep 0.1; done'"#,
        )
        .await;
        wait_checked_in(&mut admin, id).await;
        data_until(&mut data, id, "ready").await;
        let pid = listed_pid(&list(&mut admin).await, id);
        let sent = destroy(&mut admin, id).await;
        let at = died_at(pid, sent).await;
        assert_about(
            "command that finishes after SIGTERM",
            at,
            Duration::from_secs(2),
        );
        data_until(&mut data, id, "goodbye").await;
    };

    tokio::join!(
        stranger,
        no_request_tls,
        no_request_unix,
        kept_alive_idle,
        kept_alive_busy,
        websockets,
        escalation,
        polite,
    );
    assert!(start.elapsed() < CHECK_AT + SLACK + Duration::from_secs(5));
}

/// When the idle timeout's live connections are checked: past the default idle timeout
/// (90 s) and three ping rounds, with a margin.
const IDLE_CHECK_AT: Duration = Duration::from_secs(100);

/// A masked, empty pong: the least frame a peer can send.
const PONG: [u8; 6] = [0x8a, 0x80, 0x1f, 0x2e, 0x3d, 0x4c];

/// `limits.idle_timeout_secs` (90 s) with `ping_interval_secs` (30 s) at their defaults, both
/// ways, in one ~100 s sleep. Lives: an admin websocket over TLS and a data websocket over
/// the Unix socket that send nothing but answer the pings (the client library does) are still
/// served at 100 s. Dies: a websocket that never answers a ping (a bare stream: the pings are
/// read and dropped, nothing is ever written) is closed at 90 s; one whose last frame is a
/// pong at 10 s is closed 90 s after that pong, at 100 s (it used to be closed at the first
/// ping tick past the timeout, 120 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_at_its_default_closes_silent_peers_and_spares_answering_ones() {
    let server = Defaults::start(|_| {}).await;
    let limits = server.config.limits.clone();
    // The defaults this test is about (deploy/config/secure-talk.example.toml).
    assert_eq!(limits.idle_timeout(), Duration::from_secs(90));
    assert_eq!(limits.ping_interval(), Duration::from_secs(30));
    let idle = limits.idle_timeout();
    let pki = pki();
    let start = Instant::now();
    let within = IDLE_CHECK_AT + SLACK;

    // A websocket upgrade on a bare stream: nothing answers the server's pings.
    let bare = |name: &'static str| {
        let opts = server.client(&pki.bob, name);
        async move {
            let (_, token) = crate::support::http(&opts, "GET", "/", None).await;
            let conn = client::upgrade(&opts, Channel::Admin, &token)
                .await
                .expect("upgrade");
            (conn.into_stream(), Instant::now())
        }
    };

    // Dies: never a frame from the peer, at the idle timeout from the upgrade.
    let silent = async {
        let (stream, began) = bare("silent").await;
        let at = closed_at(stream, began, within).await;
        assert_about("a peer that never answers pings", at.expect("closed"), idle);
    };

    // Dies: one pong at 10 s, then silence: at the idle timeout from that pong.
    let silent_after_a_pong = async {
        let (mut stream, _) = bare("pong-once").await;
        sleep_until(start, Duration::from_secs(10)).await;
        tokio::io::AsyncWriteExt::write_all(&mut stream, &PONG)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::flush(&mut stream).await.unwrap();
        let ponged = Instant::now();
        let at = closed_at(stream, ponged, within).await;
        assert_about(
            "a peer silent after a pong at 10 s",
            at.expect("closed"),
            idle,
        );
    };

    // Lives: idle clients that answer pings, over TLS and over the Unix socket, still work
    // past the idle timeout.
    let answering = async {
        let opts = server.client(&pki.alice, "answering");
        let mut admin = connect(&opts, Channel::Admin).await;
        let unix_opts = server.unix("answering-unix");
        let mut data = connect(&unix_opts, Channel::Data).await;
        let mut unix_admin = connect(&unix_opts, Channel::Admin).await;
        // All three read (and so answer pings) at once.
        tokio::join!(
            idle_reading(&mut admin, start, IDLE_CHECK_AT, "admin over TLS"),
            idle_reading(&mut data, start, IDLE_CHECK_AT, "data over unix"),
            idle_reading(&mut unix_admin, start, IDLE_CHECK_AT, "admin over unix"),
        );
        send(
            &mut admin,
            json!({"headers": {"method": "text"}, "payload": "still here"}),
        )
        .await;
        crate::support::recv_message(&mut admin, "the echo", |m| {
            m.payload == Some(json!("still here"))
        })
        .await;
        let id = create_pipe(&mut unix_admin, "echo still-here").await;
        data_until(&mut data, id, "still-here").await;
    };

    tokio::join!(silent, silent_after_a_pong, answering);
    assert!(start.elapsed() < IDLE_CHECK_AT + SLACK + Duration::from_secs(5));
}
