//! Shared helpers: the real server in process (TLS on 127.0.0.1:0, a Unix socket, real pipe
//! processes), client options for the test PKI's identities, bounded receives, raw HTTP and
//! websocket requests, and process checks through `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::daemon::Shutdown;
use common::envelope::talk::{Message, method};
use common::tls::{ClientTlsFiles, ServerTls};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use secure_talk::client::{self, ClientOptions, Connection, Incoming, Transport};
use secure_talk::config::Config;
use secure_talk::hub::Channel;
use secure_talk::server::{Listeners, Server};
use secure_talk::token::Tokens;
use serde_json::{Value, json};
use testkit::pki::{Leaf, TestPki};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// The pipe program the server spawns.
pub(crate) const PIPE: &str = env!("CARGO_BIN_EXE_secure-talk-pipe");
/// The daemon binary.
pub(crate) const DAEMON: &str = env!("CARGO_BIN_EXE_secure-talk");
/// Bound on one step of a test (a reply, a connection, a process exit).
pub(crate) const STEP: Duration = Duration::from_secs(8);
/// Drain grace when a test server stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The test PKI, and tracing and the crypto provider set up once.
pub(crate) fn pki() -> &'static TestPki {
    testkit::init_tracing();
    common::tls::install_default_provider();
    testkit::pki::test_pki()
}

/// A configuration under `dir` with small limits, the real pipe program and TLS material for
/// a TCP listener on 127.0.0.1:0 and a Unix socket.
pub(crate) fn test_config(dir: &Path) -> Config {
    let pki = pki();
    let mut config = Config::local(dir);
    config.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.tls = Some(pki.server_tls_section());
    config.unix_socket = Some(dir.join("talk.sock"));
    PIPE.clone_into(&mut config.pipe_program);
    let limits = &mut config.limits;
    limits.max_connections = 64;
    limits.max_clients = 16;
    limits.max_pipes_per_client = 8;
    limits.max_pipes = 32;
    limits.max_message_bytes = 64 << 10;
    limits.max_upload_bytes = 1 << 20;
    limits.max_ipc_frame_bytes = 1 << 20;
    limits.request_timeout_secs = 5;
    limits.pipe_checkin_timeout_secs = 5;
    limits.kill_grace_secs = 1;
    limits.drain_grace_secs = 5;
    config
}

/// A running in-process server.
pub(crate) struct TestServer {
    /// Its state directory (sockets, uploads, token files).
    pub(crate) dir: tempfile::TempDir,
    /// The TLS listener.
    pub(crate) addr: SocketAddr,
    /// The configuration it runs with.
    pub(crate) config: Config,
    /// The server itself.
    pub(crate) server: Server,
    shutdown: Shutdown,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A server with [`test_config`].
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with [`test_config`] changed by `tweak`.
    pub(crate) async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), tweak).await
    }

    /// A server in an existing directory.
    pub(crate) async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let tls = config.tls.as_ref().map(|section| {
            let files = section.files(config.client_auth, vec![b"http/1.1".to_vec()]);
            Arc::new(ServerTls::load(files).expect("the test TLS material loads"))
        });
        let listeners = Listeners::bind(&config).await.expect("listeners bind");
        let addr = listeners
            .tcp
            .as_ref()
            .map(|tcp| tcp.local_addr().expect("local address"))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let shutdown = Shutdown::new();
        let tokens = Tokens::random(config.token_lifetime);
        let server = Server::new(config.clone(), tokens, tls, shutdown.clone());
        let task = {
            let server = server.clone();
            tokio::spawn(async move { server.run(listeners).await })
        };
        Self {
            dir,
            addr,
            config,
            server,
            shutdown,
            task: Some(task),
        }
    }

    /// Where a client named `name` keeps its token.
    pub(crate) fn token_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.token"))
    }

    /// TLS client options presenting `leaf` (or no certificate), token in `name.token`.
    pub(crate) fn tls(&self, leaf: Option<&Leaf>, name: &str) -> ClientOptions {
        options(tls_transport(self.addr, leaf), Some(self.token_file(name)))
    }

    /// Client options for the Unix socket, token in `name.token`.
    pub(crate) fn unix(&self, name: &str) -> ClientOptions {
        let path = self.config.unix_socket.clone().expect("a unix socket");
        options(Transport::Unix(path), Some(self.token_file(name)))
    }

    /// Alice (an ordinary, trusted client certificate) with token file `name.token`.
    pub(crate) fn alice(&self, name: &str) -> ClientOptions {
        self.tls(Some(&pki().alice), name)
    }

    /// Bob, likewise.
    pub(crate) fn bob(&self, name: &str) -> ClientOptions {
        self.tls(Some(&pki().bob), name)
    }

    /// Triggers shutdown and waits for the drain and the server task; returns whether every
    /// tracked task finished within the grace.
    pub(crate) async fn stop(&mut self) -> bool {
        let drained = self.shutdown.drain(STOP_GRACE).await;
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP, task)
                .await
                .expect("the server task ends after shutdown")
                .expect("the server task does not panic");
        }
        drained
    }

    /// Live processes started for this server's pipes (the pipe programs and what they run:
    /// they all carry the IPC socket path in their environment).
    pub(crate) fn pipe_processes(&self) -> Vec<i32> {
        processes_with_env("SECURE_TALK_IPC_SOCKET", &self.config.ipc_socket)
    }

    /// Waits until no process of this server's pipes is left.
    pub(crate) async fn assert_no_pipe_processes(&self, within: Duration) {
        testkit::until("every pipe process to exit", within, || {
            self.pipe_processes().is_empty()
        })
        .await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A failed test must not leave pipes behind (the runtime drops their supervisors).
        self.shutdown.trigger();
        for pid in self.pipe_processes() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A TLS transport to `addr` expecting the test server certificate, presenting `leaf`.
pub(crate) fn tls_transport(addr: SocketAddr, leaf: Option<&Leaf>) -> Transport {
    let pki = pki();
    let files = ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: leaf.map(|l| l.cert_path.clone()),
        key: leaf.map(|l| l.key_path.clone()),
        ..ClientTlsFiles::default()
    };
    let config = common::tls::client_config(&files).expect("client TLS config");
    Transport::Tls {
        host: addr.ip().to_string(),
        port: addr.port(),
        server_name: "localhost".to_owned(),
        config: Arc::new(config),
    }
}

/// Client options with test timeouts.
pub(crate) fn options(transport: Transport, token_file: Option<PathBuf>) -> ClientOptions {
    ClientOptions {
        transport,
        token_file,
        timeout: Duration::from_secs(5),
        max_message_bytes: 16 << 20,
    }
}

/// Connects (token fetch, save, upgrade) within [`STEP`], panicking on failure.
pub(crate) async fn connect(options: &ClientOptions, channel: Channel) -> Connection {
    tokio::time::timeout(STEP, client::connect(options, channel))
        .await
        .expect("connect in time")
        .unwrap_or_else(|err| panic!("connect {:?} {channel:?}: {err}", options.transport))
}

/// Sends a JSON value as a text frame.
pub(crate) async fn send(conn: &mut Connection, value: Value) {
    conn.send_text(value.to_string()).await.expect("send");
}

/// Receives until `matches` accepts a message, within [`STEP`]; panics (listing what came)
/// when the connection closes or time runs out.
pub(crate) async fn recv_until(
    conn: &mut Connection,
    what: &str,
    mut matches: impl FnMut(&Incoming) -> bool,
) -> Incoming {
    let deadline = tokio::time::Instant::now() + STEP;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match conn.recv_timeout(left).await {
            Ok(Some(incoming)) if matches(&incoming) => return incoming,
            Ok(Some(incoming)) => seen.push(incoming),
            Ok(None) => panic!(
                "no {what} (closed: {:?}, timed out: {}); received {seen:#?}",
                conn.closed,
                left.is_zero() || tokio::time::Instant::now() >= deadline
            ),
            Err(err) => panic!("no {what}: {err}; received {seen:#?}"),
        }
    }
}

/// Receives until a JSON message matches.
pub(crate) async fn recv_message(
    conn: &mut Connection,
    what: &str,
    mut matches: impl FnMut(&Message) -> bool,
) -> Message {
    match recv_until(
        conn,
        what,
        |m| matches!(m, Incoming::Message(m) if matches(m)),
    )
    .await
    {
        Incoming::Message(message) => message,
        Incoming::Binary(_) => unreachable!("the predicate only accepts JSON messages"),
    }
}

/// The next message with `headers.method == method`.
pub(crate) async fn recv_method(conn: &mut Connection, wanted: &str) -> Message {
    recv_message(conn, wanted, |m| m.method() == wanted).await
}

/// The next `text` reply with a status (`headers.code`); asserts its code and that its text
/// contains `contains`. Returns the text.
pub(crate) async fn expect_reply(conn: &mut Connection, code: i64, contains: &str) -> String {
    let reply = recv_message(conn, "a text reply with a code", |m| {
        m.method() == method::TEXT && m.headers.code.is_some()
    })
    .await;
    let text = reply
        .payload
        .as_ref()
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    assert_eq!(reply.headers.code, Some(code), "reply {reply:?}");
    assert!(
        text.contains(contains),
        "reply {text:?} does not contain {contains:?}"
    );
    text
}

/// Reads until the server closes the websocket; returns its close code and reason.
pub(crate) async fn closed(conn: &mut Connection) -> Option<(u16, String)> {
    tokio::time::timeout(STEP, async {
        loop {
            match conn.recv().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await
    .expect("the server closes the connection in time");
    conn.closed.clone()
}

/// Creates one pipe running `launch`; checks the three replies and returns its id.
pub(crate) async fn create_pipe(conn: &mut Connection, launch: &str) -> u64 {
    send(
        conn,
        json!({"headers": {"method": "create"}, "payload": {"launch": launch}}),
    )
    .await;
    let text = expect_reply(conn, 200, "pipe_create ").await;
    let id: u64 = text
        .trim_start_matches("pipe_create ")
        .parse()
        .expect("pipe_create <id>");
    let ids = recv_method(conn, method::PIPE_ID).await;
    let ids: Vec<u64> = serde_json::from_value(ids.payload.unwrap_or_default()).expect("ids");
    assert!(ids.contains(&id), "pipe_id {ids:?} lacks {id}");
    let info = recv_method(conn, method::PIPE_INFO).await;
    assert_eq!(info.headers.pipe_id, Some(id));
    assert_eq!(info.payload, Some(json!({"launch": launch})));
    id
}

/// Sends `list` and returns the reply's payload.
pub(crate) async fn list(conn: &mut Connection) -> Value {
    send(conn, json!({"headers": {"method": "list"}})).await;
    let reply = recv_method(conn, "list").await;
    assert_eq!(reply.headers.code, Some(200));
    reply.payload.expect("list payload")
}

/// Pipe ids in a `list` payload.
pub(crate) fn listed_pipes(list: &Value) -> Vec<u64> {
    list["pipes"]
        .as_array()
        .expect("pipes array")
        .iter()
        .map(|p| p["pipe_id"].as_u64().expect("pipe_id"))
        .collect()
}

/// The pid of pipe `id` in a `list` payload.
pub(crate) fn listed_pid(list: &Value, id: u64) -> i32 {
    let pipe = list["pipes"]
        .as_array()
        .expect("pipes array")
        .iter()
        .find(|p| p["pipe_id"] == json!(id))
        .unwrap_or_else(|| panic!("pipe {id} not in {list}"));
    i32::try_from(pipe["pid"].as_u64().expect("pid")).expect("pid fits")
}

/// Polls `list` on `conn` (through [`testkit::eventually`]) until `done` holds for it;
/// returns that list.
pub(crate) async fn list_until(
    conn: &mut Connection,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let conn = &tokio::sync::Mutex::new(conn);
    let done = &done;
    testkit::eventually(what, STEP, || async move {
        let list = list(*conn.lock().await).await;
        done(&list).then_some(list)
    })
    .await
}

/// Waits until pipe `id` has checked in (polling `list`).
pub(crate) async fn wait_checked_in(conn: &mut Connection, id: u64) {
    list_until(conn, &format!("pipe {id} to check in"), |list| {
        list["pipes"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["pipe_id"] == json!(id)))
            .is_some_and(|p| p["checked_in"] == json!(true))
    })
    .await;
}

/// Receives data-channel output of pipe `id` until the text gathered (IPC type 0) contains
/// `wanted`; returns everything gathered.
pub(crate) async fn data_until(data: &mut Connection, id: u64, wanted: &str) -> String {
    let mut text = String::new();
    while !text.contains(wanted) {
        let message = recv_message(data, &format!("pipe {id} output {wanted:?}"), |m| {
            m.headers.pipe_id == Some(id) && m.headers.kind == Some(0)
        })
        .await;
        text.push_str(
            message
                .payload
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
    }
    text
}

/// A raw HTTP/1.1 request over a fresh connection; returns status and body.
pub(crate) async fn http(
    options: &ClientOptions,
    method: &str,
    target: &str,
    token: Option<&str>,
) -> (u16, String) {
    let work = async {
        let stream = client::open_stream(options).await.expect("open a stream");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("http handshake");
        let driver = tokio::spawn(conn);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header(hyper::header::HOST, "localhost");
        if let Some(token) = token {
            request = request.header("token", token);
        }
        let response = sender
            .send_request(request.body(Empty::new()).expect("request"))
            .await
            .expect("response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        driver.abort();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(STEP, work)
        .await
        .expect("an http answer in time")
}

/// A raw websocket upgrade of `path`; returns the HTTP status (101 when upgraded).
pub(crate) async fn upgrade_status(
    options: &ClientOptions,
    path: &str,
    token: Option<&str>,
) -> u16 {
    let stream = client::open_stream(options).await.expect("open a stream");
    let mut request = format!("ws://localhost{path}")
        .into_client_request()
        .expect("request");
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("token", token.parse().expect("header value"));
    }
    let upgrading = tokio_tungstenite::client_async(request, stream);
    match tokio::time::timeout(STEP, upgrading)
        .await
        .expect("an upgrade answer in time")
    {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("upgrade of {path}: {err}"),
    }
}

/// The daemon binary, without `SECURE_TALK_CONFIG` from outside, killed when dropped.
pub(crate) fn daemon() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(DAEMON);
    command.env_remove("SECURE_TALK_CONFIG").kill_on_drop(true);
    command
}

/// The daemon serving `config` with `--print-address` and `flags` (the log options), its
/// stdout piped for [`printed_address`].
pub(crate) fn daemon_serving(config: &Path, flags: &[&str]) -> tokio::process::Command {
    let mut command = daemon();
    command
        .arg("-c")
        .arg(config)
        .arg("--print-address")
        .args(flags)
        .stdout(std::process::Stdio::piped());
    command
}

/// `secure-talk --check-config -c CONFIG`, run to its end.
pub(crate) async fn check_config(config: &Path) -> std::process::Output {
    daemon()
        .args(["--check-config", "-c"])
        .arg(config)
        .output()
        .await
        .expect("run secure-talk")
}

/// Reads the daemon's stdout until the line that starts with `prefix` (its `--print-address`
/// line) and returns the rest of it; the stdout is then read on in the background, so the
/// daemon never blocks on it.
pub(crate) async fn printed_address(stdout: tokio::process::ChildStdout, prefix: &str) -> String {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let address = tokio::time::timeout(STEP, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(address) = line.strip_prefix(prefix) {
                return address.to_owned();
            }
        }
        panic!("secure-talk exited before listening");
    })
    .await
    .expect("secure-talk listens in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    address
}

/// Whether a process exists and is not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Live processes whose environment holds `name=value`.
pub(crate) fn processes_with_env(name: &str, value: &Path) -> Vec<i32> {
    let needle = format!("{name}={}", value.display()).into_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_slice()))
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// Panics seen so far on the current thread (a `#[tokio::test]` runs its tasks there, so this
/// counts panics of the server's tasks in that test, even those a `JoinHandle` swallows).
pub(crate) fn panics_on_this_thread() -> usize {
    use std::sync::{Mutex, OnceLock};
    static PANICS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let panics = PANICS.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            if let Some(panics) = PANICS.get() {
                panics.lock().unwrap_or_else(|p| p.into_inner()).push(name);
            }
            previous(info);
        }));
        Mutex::new(Vec::new())
    });
    let me = std::thread::current().name().unwrap_or_default().to_owned();
    panics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|name| **name == me)
        .count()
}
