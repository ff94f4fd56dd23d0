//! The test daemon: a real broker (store, CA, socket) in this process on a temporary Unix
//! socket, on SQLite or, when `BROKER_TEST_PG` names a PostgreSQL server, on a fresh
//! database of its own there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use broker::client::Client;
use broker::config::{Config, HttpsSection};
use broker::server::{Server, bind_unix};
use broker::service::Broker;
use common::daemon::Shutdown;

/// Which store a test daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server URL for tests (`postgres://user@host:port/db`), when there is one.
pub fn pg_url() -> Option<String> {
    std::env::var("BROKER_TEST_PG")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Makes a fresh database on the test PostgreSQL server and returns its URL.
pub async fn fresh_pg_database() -> String {
    use sqlx::Connection as _;
    let admin = pg_url().expect("BROKER_TEST_PG is set");
    let name = format!("broker_t_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::Executor::execute(
        &mut conn,
        sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
    )
    .await
    .expect("create a test database");
    let (path, query) = match admin.split_once('?') {
        Some((path, query)) => (path, format!("?{query}")),
        None => (admin.as_str(), String::new()),
    };
    let (base, _) = path.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{name}{query}")
}

/// An HTTPS API section on 127.0.0.1 (a free port) with `tls`, mapping each certificate
/// subject to its user.
pub fn https_on_loopback(tls: common::tls::TlsSection, users: &[(&str, &str)]) -> HttpsSection {
    HttpsSection {
        listen: "127.0.0.1:0".parse().expect("an address"),
        tls,
        users: users
            .iter()
            .map(|(subject, user)| ((*subject).to_owned(), (*user).to_owned()))
            .collect(),
    }
}

/// A running broker.
pub struct Daemon {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub dir: tempfile::TempDir,
    pub broker: Arc<Broker>,
    pub config: Config,
    /// The HTTPS API's address, when the configuration has one.
    pub https: Option<std::net::SocketAddr>,
    /// The server (for `reload`, what SIGHUP calls).
    pub server: Server,
    shutdown: Shutdown,
    serving: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// SQLite, a random block of 400 ports in 21000-31999.
    pub async fn start() -> Daemon {
        Self::start_with(Backend::Sqlite, |_| {}).await
    }

    /// On `backend`, with `tweak` applied to the configuration before start.
    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Daemon {
        testkit::init_tracing();
        common::tls::install_default_provider();
        let dir = tempfile::Builder::new()
            .prefix("broker-test-")
            .tempdir()
            .expect("temp dir");
        // Other uids (the isolation tests) must reach the socket inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod temp dir");
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_pg_database().await),
        };
        let low = 21000 + 400 * (rand::random::<u16>() % 27);
        let mut config = Config::for_dir(dir.path(), database, [low, low + 399]);
        tweak(&mut config);
        let broker = Arc::new(Broker::open(config.clone()).await.expect("broker opens"));
        let listener = bind_unix(&config.socket, config.socket_mode).expect("bind socket");
        let shutdown = Shutdown::new();
        let tls = config.https.as_ref().map(|section| {
            Arc::new(
                common::tls::ServerTls::load(section.tls.files(
                    common::tls::ClientAuth::Required,
                    vec![b"http/1.1".to_vec()],
                ))
                .expect("https material loads"),
            )
        });
        let server = Server::new(broker.clone(), tls, shutdown.clone());
        let mut https = None;
        if let Some(section) = &config.https {
            let tcp = tokio::net::TcpListener::bind(section.listen)
                .await
                .expect("bind https");
            https = Some(tcp.local_addr().expect("https address"));
            tokio::spawn(server.clone().serve_https(tcp));
        }
        let serving = tokio::spawn(server.clone().serve_unix(listener));
        tokio::spawn(broker.clone().run_reaper(shutdown.clone()));
        Daemon {
            socket: config.socket.clone(),
            state: config.state_dir.clone(),
            dir,
            broker,
            config,
            https,
            server,
            shutdown,
            serving,
        }
    }

    /// A client on the socket, acting as this process's uid.
    pub fn client(&self) -> Client {
        Client::unix(&self.socket).with_timeout(Duration::from_secs(20))
    }

    /// Stops serving and waits for open connections.
    pub async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.serving.await;
        self.shutdown.drain(Duration::from_secs(5)).await;
        self.broker.store().close().await;
    }
}

/// broker-cli, as cargo built it for these tests.
pub const CLI: &str = env!("CARGO_BIN_EXE_broker-cli");
/// broker-run, as cargo built it for these tests.
pub const RUN: &str = env!("CARGO_BIN_EXE_broker-run");

/// A command for one of our binaries with nothing `BROKER_*` from the environment the tests
/// run in.
pub fn ours(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BROKER_") {
            command.env_remove(name);
        }
    }
    command
}

/// broker-run on the daemon's socket, its private files under `runtime_dir`, with `args`.
pub fn broker_run(daemon: &Daemon, runtime_dir: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = ours(RUN);
    command
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args);
    command
}

/// Retries `attempt` until its answer holds `hello` (the application may still be starting),
/// for at most `within`; the answer, which must be a 200.
pub async fn until_served<F, Fut>(hello: &str, within: Duration, mut attempt: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let answer = testkit::eventually("the application's answer", within, || {
        let answer = attempt();
        async move {
            let answer = String::from_utf8_lossy(&answer.await).into_owned();
            answer.contains(hello.trim_end()).then_some(answer)
        }
    })
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    answer
}

/// The JSON a test application wrote to `path` (atomically), once it is there.
pub async fn json_file(path: &Path, within: Duration) -> serde_json::Value {
    let text = testkit::eventually(&format!("{path:?}"), within, || async {
        std::fs::read_to_string(path).ok()
    })
    .await;
    serde_json::from_str(&text).expect("JSON")
}

/// Waits until the file at `path` holds `text`.
pub async fn file_holds(path: &Path, text: &str, within: Duration) {
    let what = format!("{path:?} to hold {text:?}");
    testkit::until(&what, within, || {
        std::fs::read_to_string(path).is_ok_and(|now| now.contains(text))
    })
    .await;
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn accepting(port: u16, within: Duration) {
    let what = format!("something accepting on port {port}");
    testkit::eventually(&what, within, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
}

/// Path of one of this workspace's binaries (built by cargo for the integration tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/it-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    dir.join(name)
}

/// Runs the same async test body against SQLite and, when configured, PostgreSQL: defines
/// `<name>_sqlite` and `<name>_postgres`. The postgres variant fails when `BROKER_TEST_PG` is
/// unset and `BROKER_TEST_REQUIRE_PG` is set (scripts/test sets both), and otherwise is
/// skipped with a note.
#[macro_export]
macro_rules! both_stores {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let daemon =
                    $crate::support::Daemon::start_with($crate::support::Backend::Sqlite, |_| {})
                        .await;
                ($body)(daemon).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::support::pg_url().is_none() {
                    assert!(
                        std::env::var_os("BROKER_TEST_REQUIRE_PG").is_none(),
                        "BROKER_TEST_REQUIRE_PG is set but BROKER_TEST_PG is not"
                    );
                    eprintln!("skipped: set BROKER_TEST_PG=postgres://... to run on PostgreSQL");
                    return;
                }
                let daemon =
                    $crate::support::Daemon::start_with($crate::support::Backend::Postgres, |_| {})
                        .await;
                ($body)(daemon).await;
            }
        }
    };
}

/// `curl --unix-socket SOCKET -X METHOD [body as JSON] OPTIONS http://broker/PATH` run as
/// `uid` (a second, real identity for the kernel): its standard output.
fn curl_output_as(
    uid: u32,
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    options: &[&str],
) -> String {
    use std::os::unix::process::CommandExt as _;
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "-X", method])
        .args(options)
        .arg("--unix-socket")
        .arg(socket)
        .arg(format!("http://broker{path}"));
    if let Some(body) = body {
        command.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let output = command.uid(uid).gid(uid).output().expect("run curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `curl --unix-socket SOCKET` as `uid`: the HTTP status and the body.
pub fn curl_as(
    uid: u32,
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let options = ["--max-time", "10", "-w", "\n%{http_code}"];
    let text = curl_output_as(uid, socket, method, path, body, &options);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// One `curl` as `uid` sending `method` to every URL of the glob `path` (curl's `[1-1000]`
/// ranges) over one connection: the HTTP status of each.
pub fn curl_many_as(
    uid: u32,
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Vec<u16> {
    let options = [
        "--max-time",
        "60",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
    ];
    curl_output_as(uid, socket, method, path, body, &options)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

/// Sends `preamble` and `GET /hello.txt` in one write; everything that comes back within
/// 20 s (nothing when the connection is refused or closed).
pub async fn http_get<S>(mut stream: S, preamble: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut request = preamble.to_vec();
    request.extend_from_slice(b"GET /hello.txt HTTP/1.0\r\nHost: localhost\r\n\r\n");
    if stream.write_all(&request).await.is_err() {
        return Vec::new();
    }
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the connection ends in time");
    answer
}

/// A small web server (python3) for gated applications, serving the directory `ROOT` over
/// HTTP/1.0 where only its owner reaches it:
/// `unix ROOT PATH` binds the Unix socket PATH (`{socket}`);
/// `fd ROOT REPORT` serves the listening socket on fd 3 (`--listen-fd`) and first writes what
/// it was handed (the `LISTEN_*` variables, the socket's family and address) as JSON to REPORT.
pub const SOCKET_WEB_APP: &str = r#"
import http.server, json, os, socket, socketserver, sys
mode, root = sys.argv[1], sys.argv[2]
class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def address_string(self):
        return "local"
    def log_message(self, *a):
        pass
if mode == "fd":
    sock = socket.socket(fileno=3)
    report = {"listen_pid_is_mine": os.environ.get("LISTEN_PID") == str(os.getpid()),
              "fds": os.environ.get("LISTEN_FDS"), "names": os.environ.get("LISTEN_FDNAMES"),
              "family": sock.family.name, "address": sock.getsockname(),
              "broker_port": os.environ.get("BROKER_PORT"),
              "app_socket": os.environ.get("BROKER_APP_SOCKET")}
    json.dump(report, open(sys.argv[3] + ".tmp", "w"))
    os.rename(sys.argv[3] + ".tmp", sys.argv[3])
    unix = sock.family == socket.AF_UNIX
else:
    unix = True
base = socketserver.UnixStreamServer if unix else socketserver.TCPServer
class Server(socketserver.ThreadingMixIn, base):
    daemon_threads = True
if mode == "fd":
    server = Server(None, Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
else:
    server = Server(sys.argv[3], Handler)
server.serve_forever()
"#;

/// A mutual-TLS client configuration from PEM text: trusting `ca`, presenting `cert`/`key`.
pub(crate) fn mtls_client(ca: &str, cert: &str, key: &str) -> rustls::ClientConfig {
    use common::tls::{ClientTlsPem, Pem};
    ClientTlsPem::mutual(
        Pem::new("CA", ca),
        Pem::new("client certificate", cert),
        Pem::new("client key", key),
    )
    .config()
    .unwrap()
}

/// A server configuration from PEM text that requires a client certificate from `ca`, with
/// `crls`.
pub(crate) fn mtls_server(cert: &str, key: &str, ca: &str, crls: &[&str]) -> rustls::ServerConfig {
    use common::tls::{Pem, ServerTlsPem};
    let crls = crls.iter().map(|crl| Pem::new("CRL", crl)).collect();
    ServerTlsPem::mutual(
        Pem::new("certificate", cert),
        Pem::new("key", key),
        Pem::new("CA", ca),
        crls,
    )
    .config()
    .unwrap()
}
