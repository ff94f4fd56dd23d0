//! Shared helpers: the server in process on 127.0.0.1:0 (the test PKI, a fresh Ed448 key,
//! alice's and bob's roots), an original-protocol client, an HTTPS client whose bodies can be
//! streamed, and a deterministic pseudo-random content generator.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::daemon::Shutdown;
use common::tls::{ClientAuth, ClientTlsFiles, TlsSection};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use signing_server::config::{ClientRule, FileConfig, KeySpec, Limits};
use signing_server::ed448::Ed448Key;
use signing_server::server::{ALPN_HTTP, Server};
use signing_server::service::Service;
use testkit::pki::{Leaf, TestPki};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Bound on one step of a test (a connection, a request, an answer).
pub(crate) const STEP: Duration = Duration::from_secs(10);
/// Name of the Ed448 key every test server has.
pub(crate) const KEY: &str = "release";

/// The test PKI, with tracing and the crypto provider set up once.
pub(crate) fn pki() -> &'static TestPki {
    testkit::init_tracing();
    common::tls::install_default_provider();
    testkit::pki::test_pki()
}

/// Limits for tests: short handshake and request deadlines.
pub(crate) fn test_limits() -> Limits {
    Limits {
        request_timeout_secs: 5,
        io_timeout_secs: 30,
        command_timeout_secs: 5,
        drain_grace_secs: 5,
        ..Limits::default()
    }
}

/// What a test server runs with besides the defaults.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Bounds ([`test_limits`] by default).
    pub(crate) limits: Limits,
    /// Keys besides [`KEY`].
    pub(crate) keys: Vec<KeySpec>,
    /// Client rules tried before alice's and bob's (first match wins).
    pub(crate) clients: Vec<ClientRule>,
    /// The `[tls]` client-certificate policy (`client_auth`); `None`: required.
    pub(crate) client_auth: Option<ClientAuth>,
    /// Adds a last `cn = "*"` rule with alice's root (for clients without a certificate).
    pub(crate) anyone_signs_pkgs: bool,
    /// The `[tls]` section; `None`: [`tls_section`].
    pub(crate) tls: Option<TlsSection>,
    /// `[tls] max_handshakes_per_address`: 32, above the default, as every test client comes
    /// from 127.0.0.1 and some tests connect 20 at once.
    pub(crate) max_handshakes_per_address: usize,
    /// The audit store: SQLite in the state directory by default.
    pub(crate) backend: Backend,
    /// `database` as configured, when set (overrides `backend`).
    pub(crate) database: Option<String>,
    /// `instance`; `None`: "test".
    pub(crate) instance: Option<String>,
}

/// Which audit store a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// `audit.sqlite` in the state directory.
    Sqlite,
    /// A fresh database of its own on the test PostgreSQL server ([`pg_url`]).
    Postgres,
}

/// The test PostgreSQL server's URL (`TEST_PG_URL`, set by scripts/with-postgres), when there
/// is one.
pub(crate) fn pg_url() -> Option<String> {
    std::env::var("TEST_PG_URL").ok().filter(|u| !u.is_empty())
}

/// Whether a PostgreSQL test may run: `false` (with a note) when there is no server, a failure
/// when `TEST_REQUIRE_PG` is set (scripts/test sets it).
pub(crate) fn pg_available() -> bool {
    if pg_url().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("TEST_REQUIRE_PG").is_none(),
        "TEST_REQUIRE_PG is set but TEST_PG_URL is not"
    );
    eprintln!(
        "skipped: set TEST_PG_URL=postgres://... (scripts/with-postgres) to run on PostgreSQL"
    );
    false
}

/// `url` with its database replaced by `name`.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, format!("?{query}")),
        None => (url, String::new()),
    };
    let (base, _) = path.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{name}{query}")
}

/// `url` connecting as `user` instead (trust authentication on the test cluster).
pub(crate) fn as_user(url: &str, user: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_username(user).unwrap();
    parsed.to_string()
}

/// Runs `sql` (several statements allowed) on the test server as its superuser, in `database`
/// (`None`: the server's default database).
pub(crate) async fn pg_admin(database: Option<&str>, sql: &str) {
    use sqlx::Connection as _;
    let admin = pg_url().expect("TEST_PG_URL is set");
    let url = database.map_or(admin.clone(), |db| with_database(&admin, db));
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    conn.close().await.unwrap();
}

/// Makes a fresh database on the test PostgreSQL server: its name and URL (as the superuser).
pub(crate) async fn fresh_pg_database() -> (String, String) {
    let name = format!("signing_t_{}", hex::encode(rand::random::<[u8; 8]>()));
    pg_admin(None, &format!("CREATE DATABASE {name}")).await;
    let url = with_database(&pg_url().expect("TEST_PG_URL is set"), &name);
    (name, url)
}

/// A fresh audit database set up as docs/signing-server.md says: an owner role that ran the
/// migrations, and a service role with only the documented grants.
#[derive(Debug, Clone)]
pub(crate) struct PgAudit {
    /// The database's name.
    pub(crate) name: String,
    /// The owner's URL.
    pub(crate) owner_url: String,
    /// The service role's name.
    pub(crate) service_role: String,
    /// The service role's URL (what the daemon is configured with).
    pub(crate) service_url: String,
}

impl PgAudit {
    /// A database with an owner role and a service role that may connect, not yet migrated.
    pub(crate) async fn unmigrated() -> Self {
        let (name, admin_url) = fresh_pg_database().await;
        let owner = format!("{name}_owner");
        let service_role = format!("{name}_svc");
        pg_admin(
            None,
            &format!(
                "CREATE ROLE {owner} LOGIN; CREATE ROLE {service_role} LOGIN; \
                 ALTER DATABASE {name} OWNER TO {owner}; \
                 REVOKE ALL ON DATABASE {name} FROM PUBLIC; \
                 GRANT CONNECT ON DATABASE {name} TO {service_role};"
            ),
        )
        .await;
        Self {
            owner_url: as_user(&admin_url, &owner),
            service_url: as_user(&admin_url, &service_role),
            name,
            service_role,
        }
    }

    /// [`Self::unmigrated`], migrated by the owner, with the service role's grants.
    pub(crate) async fn ready() -> Self {
        let pg = Self::unmigrated().await;
        let database = signing_server::config::Database::Postgres(pg.owner_url.clone());
        signing_server::audit::Audit::migrate(&database)
            .await
            .unwrap();
        pg.grant_service().await;
        pg
    }

    /// The grants of docs/signing-server.md, "Several instances", run by the owner.
    pub(crate) async fn grant_service(&self) {
        self.as_owner(&format!(
            "GRANT SELECT, INSERT ON signatures TO {role}; \
             GRANT USAGE ON SEQUENCE signatures_id_seq TO {role}; \
             GRANT SELECT ON _sqlx_migrations TO {role};",
            role = self.service_role
        ))
        .await
        .unwrap();
    }

    /// Runs `sql` as the owner: the error text, if any.
    pub(crate) async fn as_owner(&self, sql: &str) -> Result<(), String> {
        sql_as(&self.owner_url, sql).await
    }
}

/// Runs `sql` as the role of `url`: the error text, if any.
pub(crate) async fn sql_as(url: &str, sql: &str) -> Result<(), String> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs the same async test body (`|backend| async move { ... }`) on SQLite and on PostgreSQL:
/// defines `<name>::sqlite` and `<name>::postgres`; the latter is skipped without a server
/// ([`pg_available`]).
#[macro_export]
macro_rules! both_stores {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($body)($crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::support::pg_available() {
                    ($body)($crate::support::Backend::Postgres).await;
                }
            }
        }
    };
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: test_limits(),
            keys: Vec::new(),
            clients: Vec::new(),
            client_auth: None,
            anyone_signs_pkgs: false,
            tls: None,
            max_handshakes_per_address: 32,
            backend: Backend::Sqlite,
            database: None,
            instance: None,
        }
    }
}

/// A running in-process server.
///
/// Its directory holds `pkgs/` (alice's root), `bobs/` (bob's root), `state/` (signatures.txt,
/// the audit database, the spool) and `release.pem` (the key, mode 0600). alice and bob sign
/// with [`KEY`]; carol (and any other CN) has no rule.
#[derive(Debug)]
pub(crate) struct TestServer {
    /// Everything the server uses lives here.
    pub(crate) dir: tempfile::TempDir,
    /// The listener.
    pub(crate) addr: SocketAddr,
    /// alice's root.
    pub(crate) pkgs: PathBuf,
    /// bob's root.
    pub(crate) bobs: PathBuf,
    /// The state directory.
    pub(crate) state: PathBuf,
    /// The key's public PEM.
    pub(crate) public_pem: String,
    /// The key's id.
    pub(crate) keyid: String,
    /// The service (for `service.audit`).
    pub(crate) service: Arc<Service>,
    /// The PostgreSQL set-up, for [`Backend::Postgres`].
    pub(crate) pg: Option<PgAudit>,
    /// The server (for `reload`, what SIGHUP calls).
    pub(crate) server: Server,
    shutdown: Shutdown,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with `options`.
    pub(crate) async fn start(options: Options) -> Self {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_owned();
        let pkgs = base.join("pkgs");
        let bobs = base.join("bobs");
        let state = base.join("state");
        for d in [&pkgs, &bobs, &state] {
            std::fs::create_dir(d).unwrap();
        }
        let key = Ed448Key::generate();
        let key_file = base.join("release.pem");
        write_private(&key_file, key.to_pem().unwrap().as_bytes());
        let public_pem = signing_server::ed448::public_pem(&key.verifying_key());

        let mut keys = vec![KeySpec::Ed448 {
            name: KEY.into(),
            file: key_file.clone(),
        }];
        keys.extend(options.keys);
        let mut clients = options.clients;
        clients.push(ClientRule {
            cn: "alice".into(),
            key: KEY.into(),
            roots: vec![pkgs.clone()],
        });
        clients.push(ClientRule {
            cn: "bob".into(),
            key: KEY.into(),
            roots: vec![bobs.clone()],
        });
        if options.anyone_signs_pkgs {
            clients.push(ClientRule {
                cn: "*".into(),
                key: KEY.into(),
                roots: vec![pkgs.clone()],
            });
        }
        let mut section = options.tls.unwrap_or_else(|| tls_section(pki));
        section.client_auth = options.client_auth;
        section.max_handshakes_per_address = options.max_handshakes_per_address.try_into().unwrap();
        let (database, pg) = match (options.database, options.backend) {
            (Some(database), _) => (Some(database), None),
            (None, Backend::Sqlite) => (None, None),
            (None, Backend::Postgres) => {
                let pg = PgAudit::ready().await;
                (Some(pg.service_url.clone()), Some(pg))
            }
        };
        let config = FileConfig {
            listen: Some("127.0.0.1:0".into()),
            tls: Some(section),
            state_dir: Some(state.clone()),
            database,
            instance: Some(options.instance.unwrap_or_else(|| "test".into())),
            keys,
            clients,
            limits: Some(options.limits),
            ..FileConfig::default()
        }
        .into_config()
        .unwrap();
        let files = config
            .tls
            .files(ClientAuth::Required, vec![ALPN_HTTP.to_vec()]);
        let tls = Arc::new(common::tls::ServerTls::load(files).unwrap());
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = Service::open(config).await.unwrap();
        let shutdown = Shutdown::new();
        let server = Server::new(service.clone(), tls, shutdown.clone());
        let serving = server.clone();
        let task = tokio::spawn(async move { serving.serve(listener).await });
        Self {
            dir,
            addr,
            pkgs,
            bobs,
            state,
            public_pem,
            keyid: key.keyid().to_owned(),
            service,
            pg,
            server,
            shutdown,
            task: Some(task),
        }
    }

    /// Where the server writes signature lines.
    pub(crate) fn signatures_file(&self) -> PathBuf {
        self.service.config.signatures_file.clone()
    }

    /// The original protocol: sends `path` presenting `leaf`, returns everything until the
    /// server closes.
    pub(crate) async fn legacy(&self, leaf: Option<&Leaf>, path: &str) -> io::Result<Vec<u8>> {
        legacy(self.addr, leaf, path).await
    }

    /// [`Self::legacy`] for alice, as text; panics on failure.
    pub(crate) async fn alice_legacy(&self, path: &str) -> String {
        String::from_utf8(self.legacy(Some(&pki().alice), path).await.unwrap()).unwrap()
    }

    /// An HTTPS request presenting `leaf`.
    pub(crate) async fn https(
        &self,
        leaf: Option<&Leaf>,
        method: &str,
        uri: &str,
        body: Body,
    ) -> io::Result<Reply> {
        https(self.addr, leaf, method, uri, body, STEP).await
    }

    /// An HTTPS request as alice; panics on a transport failure.
    pub(crate) async fn alice(&self, method: &str, uri: &str, body: Body) -> Reply {
        self.https(Some(&pki().alice), method, uri, body)
            .await
            .unwrap()
    }

    /// Stops the server: triggers shutdown, drains, waits for the accept loop.
    pub(crate) async fn stop(mut self) {
        assert!(
            self.shutdown.drain(Duration::from_secs(5)).await,
            "connections drain"
        );
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP, task)
                .await
                .expect("the accept loop ends")
                .expect("the accept loop does not panic");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// The server's `[tls]` section: the test server certificate, client certificates required
/// and checked against the root CA and its CRL.
pub(crate) fn tls_section(pki: &TestPki) -> TlsSection {
    pki.server_tls_section()
}

/// Writes a file with mode 0600.
pub(crate) fn write_private(path: &Path, contents: &[u8]) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(contents).unwrap();
}

/// Writes an executable (mode 0755) file.
pub(crate) fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The key `aix`: the external signer `program`, called as `create_pkgsign` is
/// (`-a infile={file} {output}`), key id `aixkey`.
pub(crate) fn command_key(program: PathBuf) -> KeySpec {
    KeySpec::Command {
        name: "aix".into(),
        program,
        args: vec!["-a".into(), "infile={file}".into(), "{output}".into()],
        keyid: "aixkey".into(),
        public_key: None,
    }
}

/// SHA-256 of `data`, hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Standard base64, decoded; panics on bad input.
pub(crate) fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// A TLS client configuration trusting the test root, presenting `leaf`, offering
/// `http/1.1` when `http`.
pub(crate) fn client_config(leaf: Option<&Leaf>, http: bool) -> Arc<rustls::ClientConfig> {
    let pki = pki();
    let files = ClientTlsFiles {
        ca: Some(pki.ca_path.clone()),
        cert: leaf.map(|l| l.cert_path.clone()),
        key: leaf.map(|l| l.key_path.clone()),
        alpn: if http {
            vec![ALPN_HTTP.to_vec()]
        } else {
            Vec::new()
        },
        skip_hostname_check: false,
    };
    Arc::new(common::tls::client_config(&files).unwrap())
}

/// A TLS connection to `addr` as `leaf`.
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    leaf: Option<&Leaf>,
    http: bool,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    common::tls::connect(client_config(leaf, http), "localhost", tcp, STEP)
        .await
        .map_err(io::Error::other)
}

/// The original protocol, like the original's client: no ALPN, one write of `path`, then
/// everything until the server closes.
///
/// # Errors
/// The handshake, the write or a read failed (a refused certificate shows up here), or the
/// answer took longer than [`STEP`].
pub(crate) async fn legacy(
    addr: SocketAddr,
    leaf: Option<&Leaf>,
    path: &str,
) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut tls = tls_connect(addr, leaf, false).await?;
        tls.write_all(path.as_bytes()).await?;
        tls.flush().await?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

/// An original-protocol answer cut into its three messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// `List of files in <path>:\n` and the names, or `File to be signed: <path>\n`.
    pub(crate) listing: String,
    /// The per-file JSON object.
    pub(crate) json: String,
    /// `\nSignatures written to: <file>\n` (and the unsigned names, if any).
    pub(crate) trailer: String,
}

impl Answer {
    /// Cuts an answer: the trailer starts at the last `\nSignatures written to: `, the JSON
    /// is the line before it (it holds no raw newline), the listing is the rest.
    pub(crate) fn parse(text: &str) -> Self {
        let at = text
            .rfind("\nSignatures written to: ")
            .unwrap_or_else(|| panic!("no trailer in {text:?}"));
        let (head, trailer) = text.split_at(at);
        let cut = head.rfind('\n').map_or(0, |i| i + 1);
        let (listing, json) = head.split_at(cut);
        Self {
            listing: listing.to_owned(),
            json: json.to_owned(),
            trailer: trailer.to_owned(),
        }
    }

    /// The JSON object, parsed.
    pub(crate) fn files(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or_else(|e| panic!("{e}: {}", self.json))
    }
}

/// A request body.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A body held in memory.
pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).boxed_unsync()
}

/// No body.
pub(crate) fn empty() -> Body {
    Empty::new().boxed_unsync()
}

/// A body produced piece by piece, never held whole.
pub(crate) fn streamed(pieces: impl Iterator<Item = Bytes> + Send + 'static) -> Body {
    StreamBody::new(futures_util::stream::iter(
        pieces.map(|piece| Ok::<_, Infallible>(Frame::data(piece))),
    ))
    .boxed_unsync()
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// Status code.
    pub(crate) status: u16,
    /// Body.
    pub(crate) body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// The body as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTPS request (ALPN `http/1.1`) on a fresh connection as `leaf`, within `deadline`.
///
/// # Errors
/// The connection or the exchange failed, or took longer than `deadline`.
pub(crate) async fn https(
    addr: SocketAddr,
    leaf: Option<&Leaf>,
    method: &str,
    uri: &str,
    body: Body,
    deadline: Duration,
) -> io::Result<Reply> {
    let exchange = async {
        let tls = tls_connect(addr, leaf, true).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls))
                .await
                .map_err(io::Error::other)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .body(body)
            .map_err(io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        driver.abort();
        Ok(Reply { status, body })
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Deterministic pseudo-random content of a given length, produced piece by piece: as an
/// iterator of 1 MiB pieces or as a reader. The same seed and length give the same bytes.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    rng: rand::rngs::StdRng,
    remaining: u64,
}

impl Generated {
    /// `len` bytes from `seed`.
    pub(crate) fn new(seed: u64, len: u64) -> Self {
        use rand::SeedableRng as _;
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            remaining: len,
        }
    }
}

impl Iterator for Generated {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let mut piece = vec![0u8; usize::try_from(self.remaining.min(1 << 20)).unwrap()];
        if piece.is_empty() {
            return None;
        }
        io::Read::read_exact(self, &mut piece).unwrap();
        Some(Bytes::from(piece))
    }
}

impl io::Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rand::RngCore as _;
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        self.rng.fill_bytes(&mut buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A path as a TOML string.
pub(crate) fn quoted(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

/// Makes a key with `keygen` in `dir` and a TOML file for the daemon binary serving
/// `dir/pkgs` to alice, with `limits` as the body of its `[limits]` section.
pub(crate) fn daemon_setup(dir: &Path, limits: &str) -> (PathBuf, PathBuf) {
    let key = dir.join("release.pem");
    let out = std::process::Command::new(SERVER_BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pkgs = dir.join("pkgs");
    std::fs::create_dir(&pkgs).unwrap();
    let pki = pki();
    let toml = format!(
        r#"listen = "127.0.0.1:0"
state_dir = {state}
log = "warn"

[tls]
cert = {cert}
key = {tls_key}
client_ca = {ca}
crls = [{crl}]

[[keys]]
type = "ed448"
name = "release"
file = {key}

[[clients]]
cn = "alice"
key = "release"
roots = [{pkgs}]

[limits]
{limits}"#,
        state = quoted(&dir.join("state")),
        cert = quoted(&pki.server.cert_path),
        tls_key = quoted(&pki.server.key_path),
        ca = quoted(&pki.ca_path),
        crl = quoted(&pki.crl_path),
        key = quoted(&key),
        pkgs = quoted(&pkgs),
    );
    let config = dir.join("signing-server.toml");
    std::fs::write(&config, toml).unwrap();
    (config, key)
}

/// The daemon binary.
pub(crate) const SERVER_BIN: &str = env!("CARGO_BIN_EXE_signing-server");

/// The `signing-server` binary serving a TOML file, its stderr (the log) forwarded to the
/// test's and to [`Daemon::log_line`]. Killed when dropped.
#[derive(Debug)]
pub(crate) struct Daemon {
    child: tokio::process::Child,
    /// The address it printed.
    pub(crate) addr: SocketAddr,
    /// The metrics address it printed (`metrics on ADDR`), when started with
    /// [`Daemon::start_with_metrics`].
    pub(crate) metrics: Option<SocketAddr>,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Daemon {
    /// Starts `signing-server -c config --print-address` and waits (up to [`STEP`]) for its
    /// address.
    pub(crate) async fn start(config: &Path) -> Self {
        Self::spawn(config, false).await
    }

    /// [`Daemon::start`] for a configuration with `metrics_listen`: also waits for its
    /// `metrics on ADDR` line.
    pub(crate) async fn start_with_metrics(config: &Path) -> Self {
        Self::spawn(config, true).await
    }

    async fn spawn(config: &Path, metrics: bool) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(SERVER_BIN)
            .arg("-c")
            .arg(config)
            .args(["--print-address", "--log-format", "journal"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (sender, log) = tokio::sync::mpsc::unbounded_channel();
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("signing-server: {line}");
                let _ = sender.send(line);
            }
        });
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (addr, metrics) = tokio::time::timeout(STEP, async {
            let mut addr = None;
            while let Some(line) = stdout.next_line().await.unwrap() {
                if let Some(text) = line.strip_prefix("listening on ") {
                    addr = Some(text.parse::<SocketAddr>().unwrap());
                    if !metrics {
                        return (addr.unwrap(), None);
                    }
                } else if let Some(text) = line.strip_prefix("metrics on ") {
                    let address = addr.expect("`listening on` comes first");
                    return (address, Some(text.parse::<SocketAddr>().unwrap()));
                }
            }
            panic!("the daemon exited without printing its addresses");
        })
        .await
        .expect("the daemon prints its address");
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        Self {
            child,
            addr,
            metrics,
            log,
        }
    }

    /// Sends `signal` to the daemon.
    pub(crate) fn signal(&self, signal: rustix::process::Signal) {
        let pid = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
            .expect("the daemon is running");
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// The next log line containing `text`, skipping the others; panics after `deadline`.
    pub(crate) async fn log_line(&mut self, text: &str, deadline: Duration) -> String {
        tokio::time::timeout(deadline, async {
            while let Some(line) = self.log.recv().await {
                if line.contains(text) {
                    return line;
                }
            }
            panic!("the daemon's log ended without {text:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {text:?} within {deadline:?}"))
    }

    /// SIGTERM, then its exit status (within [`STEP`]).
    pub(crate) async fn stop(mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("the daemon stops after SIGTERM")
            .unwrap()
    }
}
