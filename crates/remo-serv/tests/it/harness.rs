//! Servers on 127.0.0.1:0, raw sessions built with the protocol functions, answer decoding,
//! and small helpers about files and processes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use remo_serv::client::{Client, ClientConfig};
use remo_serv::config::Config;
use remo_serv::keys::{PrivateKey, PublicKey};
use remo_serv::proto::{self, AuthRequest, Cipher, Magic, TokenHeader};
use remo_serv::server::Server;
use remo_serv::users::Users;
use sha2::Digest as _;
use testkit::Spawned;

/// Deadline for anything a test waits for.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// The registered user.
pub(crate) const USER: &str = "alice";

/// `BE`: the only token of a body.
pub(crate) const ONLY: Magic = Magic::nth(0, 1);
/// `B.`: the first of several tokens.
pub(crate) const FIRST: Magic = Magic::nth(0, 3);
/// `..`: a middle token.
pub(crate) const MIDDLE: Magic = Magic::nth(1, 3);
/// `.E`: the last of several tokens.
pub(crate) const LAST: Magic = Magic::nth(2, 3);

/// The key material of one deployment, as PEM text.
pub(crate) struct Keys {
    pub(crate) user_pem: String,
    pub(crate) server_pem: String,
    pub(crate) server_pub: PublicKey,
}

impl Keys {
    pub(crate) fn generate() -> Self {
        let server = PrivateKey::generate();
        let user = PrivateKey::generate();
        Self {
            user_pem: user.to_pem(None).unwrap().to_string(),
            server_pem: server.to_pem(None).unwrap().to_string(),
            server_pub: PublicKey::Ed448(Box::new(server.verifying_key())),
        }
    }

    pub(crate) fn user_key(&self) -> PrivateKey {
        PrivateKey::from_pem(&self.user_pem, None).unwrap()
    }

    pub(crate) fn server_key(&self) -> PrivateKey {
        PrivateKey::from_pem(&self.server_pem, None).unwrap()
    }

    pub(crate) fn user_pub_pem(&self) -> String {
        PublicKey::ed448_pem(&self.user_key().verifying_key())
    }

    pub(crate) fn server_pub_pem(&self) -> String {
        PublicKey::ed448_pem(&self.server_key().verifying_key())
    }

    /// Writes `alice_key.pem`, `alice.pem`, `remo_serv_key.pem` (0600) and `remo_serv.pem`.
    pub(crate) fn write(&self, dir: &Path) {
        use std::os::unix::fs::PermissionsExt as _;
        let private = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        private("alice_key.pem", &self.user_pem);
        private("remo_serv_key.pem", &self.server_pem);
        std::fs::write(dir.join("alice.pem"), self.user_pub_pem()).unwrap();
        std::fs::write(dir.join("remo_serv.pem"), self.server_pub_pem()).unwrap();
    }

    /// A user database at `path` with alice registered.
    pub(crate) async fn users(&self, path: &Path) -> Users {
        let users = Users::open(path).await.unwrap();
        users
            .add(USER, self.user_pub_pem().as_bytes())
            .await
            .unwrap();
        users
    }
}

/// The configuration tests start from: served directory as working directory, no fsync,
/// quick kill grace.
pub(crate) fn test_config(workdir: &Path) -> Config {
    Config {
        workdir: workdir.to_path_buf(),
        put_fsync: false,
        kill_grace: Duration::from_millis(300),
        body_timeout: Duration::from_secs(5),
        // Tests log in far more often than people; the rate limit has tests of its own.
        login_burst: 10_000,
        ..Config::default()
    }
}

/// A server in this process, with its temporary directory:
/// `dir/served` (the working directory and only root) and `dir/users.sqlite`.
pub(crate) struct Harness {
    pub(crate) addr: SocketAddr,
    pub(crate) server: Server,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) served: PathBuf,
    pub(crate) keys: Keys,
    spawned: Spawned,
}

impl Harness {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        testkit::init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("served");
        std::fs::create_dir(&served).unwrap();
        let keys = Keys::generate();
        let users = keys.users(&dir.path().join("users.sqlite")).await;
        let mut config = test_config(&served);
        tweak(&mut config);
        let server = Server::new(config, keys.server_key(), users, None).unwrap();
        let serving = server.clone();
        let spawned = testkit::spawn_tcp(move |listener, shutdown| async move {
            serving.serve(listener, shutdown).await;
            Ok(())
        })
        .await;
        Self {
            addr: spawned.addr,
            server,
            dir,
            served,
            keys,
            spawned,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        ClientConfig {
            url: self.url().parse().unwrap(),
            user: USER.into(),
            ca: None,
            single_token_upload: false,
            timeout: WAIT,
        }
    }

    /// A logged-in client.
    pub(crate) async fn client(&self) -> Client {
        self.client_with(self.client_config()).await
    }

    pub(crate) async fn client_with(&self, config: ClientConfig) -> Client {
        Client::login(config, self.keys.user_key(), self.keys.server_pub.clone())
            .await
            .unwrap()
    }

    /// A session logged in by hand.
    pub(crate) async fn raw(&self) -> RawSession {
        RawSession::login(self.addr, &self.keys, None).await
    }

    /// Asserts the server still answers (plain `/info`).
    pub(crate) async fn assert_alive(&self) {
        let info = request(self.addr, "GET", "/info", None, RawBody::empty()).await;
        assert_eq!(info.status, 200, "the server no longer answers /info");
        assert_eq!(info.text(), remo_serv::server::info_text());
    }

    pub(crate) async fn stop(self) {
        self.assert_alive().await;
        self.spawned.stop(WAIT).await.unwrap();
    }
}

/// Request body of a raw request.
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// How a raw request sends its body.
pub(crate) enum RawBody {
    /// With Content-Length.
    Length(Bytes),
    /// `Transfer-Encoding: chunked`, one HTTP chunk per frame.
    Chunked(Body),
}

impl RawBody {
    pub(crate) fn empty() -> Self {
        Self::Length(Bytes::new())
    }

    /// A chunked body made of these pieces (each one HTTP chunk).
    pub(crate) fn pieces<I, P>(pieces: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<Bytes>,
    {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = pieces
            .into_iter()
            .map(|p| Ok(Frame::data(p.into())))
            .collect();
        Self::Chunked(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
    }

    /// A chunked body fed from a channel: the request stays open while the sender lives.
    pub(crate) fn channel() -> (tokio::sync::mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|data| (Ok::<_, std::io::Error>(Frame::data(data)), rx))
        });
        (tx, Self::Chunked(BodyExt::boxed(StreamBody::new(stream))))
    }
}

/// A raw answer, body read to the end.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body: Bytes,
}

impl Raw {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The session id of `Set-Cookie`.
    pub(crate) fn session_id(&self) -> Option<String> {
        let cookie = self.header("set-cookie")?;
        let id = cookie.strip_prefix("SESSION_ID=")?.split(';').next()?;
        Some(id.to_owned())
    }

    /// Asserts an answer the server made itself in plain text (Content-Length present).
    #[track_caller]
    pub(crate) fn assert_plain(&self, status: u16, text: &str) {
        assert_eq!((self.status, self.text().as_str()), (status, text));
        assert_eq!(
            self.header("content-length"),
            Some(text.len().to_string().as_str()),
            "plain answers carry Content-Length"
        );
    }
}

/// An HTTP/1.1 client connection over `tcp`, driven by a task of its own that ends when the
/// server closes the connection.
pub(crate) async fn http1<B>(
    tcp: tokio::net::TcpStream,
) -> (
    hyper::client::conn::http1::SendRequest<B>,
    tokio::task::JoinHandle<()>,
)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, driver)
}

/// One request on a fresh connection, with `Host: x` like the original client. `cookie` is
/// the whole Cookie header. Panics if no answer comes (a dropped connection would mean a
/// panicking handler).
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: RawBody,
) -> Raw {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, _) = http1(tcp).await;
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x");
        if let Some(cookie) = cookie {
            builder = builder.header("cookie", cookie);
        }
        let body = match body {
            RawBody::Length(bytes) => {
                builder = builder.header("content-length", bytes.len());
                Full::new(bytes).map_err(|never| match never {}).boxed()
            }
            RawBody::Chunked(body) => {
                builder = builder.header("transfer-encoding", "chunked");
                body
            }
        };
        let response = sender
            .send_request(builder.body(body).unwrap())
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: no answer ({err})"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: answer cut short ({err})"))
            .to_bytes();
        Raw {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
}

/// A session logged in by hand with the protocol functions.
pub(crate) struct RawSession {
    pub(crate) addr: SocketAddr,
    pub(crate) id: String,
    pub(crate) cipher: Cipher,
    /// The last request number used by [`RawSession::call`].
    pub(crate) last: i16,
}

impl RawSession {
    /// Logs in as alice; with `cookie`, into that session (a re-login).
    pub(crate) async fn login(addr: SocketAddr, keys: &Keys, cookie: Option<&str>) -> Self {
        let secret = proto::x448_secret();
        let public = proto::x448_public(&secret);
        let body = AuthRequest {
            user: USER.into(),
            key: public.to_vec(),
            sign: keys
                .user_key()
                .sign(&AuthRequest::signed_message(USER, &public)),
        }
        .to_json();
        let cookie = cookie.map(|id| format!("SESSION_ID={id}"));
        let answer = request(
            addr,
            "POST",
            "/auth",
            cookie.as_deref(),
            RawBody::Length(body.into()),
        )
        .await;
        assert_eq!(answer.status, 200, "login: {}", answer.text());
        assert_eq!(answer.body.len(), 230, "76 + CRLF + 152");
        assert_eq!(&answer.body[76..78], b"\r\n");
        let (server_public, signature) = proto::parse_auth_response(&answer.body).unwrap();
        assert!(keys.server_pub.verify(&server_public, &signature));
        let shared = proto::x448_shared(&secret, &server_public).unwrap();
        Self {
            addr,
            id: answer.session_id().unwrap(),
            cipher: Cipher::new(&proto::session_key(&shared)),
            last: 0,
        }
    }

    /// The Cookie header: the session id inside a longer header, as browsers send it.
    pub(crate) fn cookie(&self) -> String {
        format!("theme=dark; SESSION_ID={}; lang=en", self.id)
    }

    /// `endpoint` followed by the encrypted `argument`.
    pub(crate) fn path(&self, endpoint: &str, argument: &str) -> String {
        self.path_bytes(endpoint, argument.as_bytes())
    }

    pub(crate) fn path_bytes(&self, endpoint: &str, argument: &[u8]) -> String {
        format!("{endpoint}{}", self.cipher.encrypt(argument))
    }

    /// A first token (with the path hash) for `path`.
    pub(crate) fn first(&self, path: &str, magic: Magic, req_no: i16, payload: &[u8]) -> String {
        self.cipher.encrypt(&proto::request_plain(
            magic,
            req_no,
            0,
            Some(&proto::path_hash(path)),
            payload,
        ))
    }

    /// A later token of a chunked body.
    pub(crate) fn later(&self, magic: Magic, req_no: i16, tok_no: i16, payload: &[u8]) -> String {
        self.cipher
            .encrypt(&proto::request_plain(magic, req_no, tok_no, None, payload))
    }

    /// Sends one token with Content-Length.
    pub(crate) async fn send(&self, path: &str, token: impl Into<Bytes>) -> Raw {
        let cookie = self.cookie();
        request(
            self.addr,
            "POST",
            path,
            Some(&cookie),
            RawBody::Length(token.into()),
        )
        .await
    }

    /// Sends a chunked body made of `pieces`.
    pub(crate) async fn send_chunked<I, P>(&self, path: &str, pieces: I) -> Raw
    where
        I: IntoIterator<Item = P>,
        P: Into<Bytes>,
    {
        let cookie = self.cookie();
        request(
            self.addr,
            "POST",
            path,
            Some(&cookie),
            RawBody::pieces(pieces),
        )
        .await
    }

    /// A well-formed request with the next number and `payload` as its body.
    pub(crate) async fn call(&mut self, path: &str, payload: &[u8]) -> Raw {
        self.last += 1;
        self.send(path, self.first(path, ONLY, self.last, payload))
            .await
    }

    /// `POST /auth` with one token of the session for `/auth`: logout.
    pub(crate) async fn logout(&mut self) -> Raw {
        self.last += 1;
        let token = self.first("/auth", ONLY, self.last, b"");
        self.send("/auth", token).await
    }

    /// `POST /auth` with an empty body: the original's logout, which needs only the cookie
    /// (ignored now).
    pub(crate) async fn empty_logout(&self) -> Raw {
        let cookie = self.cookie();
        request(self.addr, "POST", "/auth", Some(&cookie), RawBody::empty()).await
    }

    /// The payload of an encrypted answer to request [`RawSession::last`].
    #[track_caller]
    pub(crate) fn decode(&self, answer: &Raw) -> Vec<u8> {
        self.decode_for(answer, self.last)
    }

    /// The payload of an encrypted answer to request `req_no`, checking the framing: no
    /// Content-Length, token lines separated by single CRLFs, the first token `B?` with
    /// number 0 and the status text `200`, then `..` tokens counting up, an `E` only on the
    /// last one.
    #[track_caller]
    pub(crate) fn decode_for(&self, answer: &Raw, req_no: i16) -> Vec<u8> {
        assert!(
            answer.header("content-length").is_none(),
            "encrypted answers have no Content-Length (status {}, body {:?})",
            answer.status,
            answer.text()
        );
        let text = std::str::from_utf8(&answer.body).unwrap();
        assert!(
            text.is_empty() || text.ends_with("\r\n"),
            "token lines end with CRLF"
        );
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert!(
            lines.iter().all(|l| !l.is_empty() && !l.contains('\n')),
            "a single CRLF between tokens, never blank lines: {text:?}"
        );
        let mut payload = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let plain = self.cipher.decrypt_body(line, now()).unwrap();
            let (header, rest) = TokenHeader::split(&plain).unwrap();
            assert_eq!(header.req_no, req_no, "answer token {i}: request number");
            assert_eq!(header.tok_no, i as i16, "answer token {i}: token number");
            assert_eq!(header.is_first(), i == 0, "answer token {i}: B only first");
            if header.is_last() {
                assert_eq!(i + 1, lines.len(), "nothing after the E token");
            }
            let rest = if i == 0 {
                let (status, rest) = rest.split_at(3);
                assert_eq!(status, b"200", "the first token always says 200");
                rest
            } else {
                rest
            };
            payload.extend_from_slice(rest);
        }
        payload
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `len` bytes from a seeded generator.
pub(crate) fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore as _, SeedableRng as _};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

pub(crate) fn sha256_file(path: &Path) -> [u8; 32] {
    let mut hash = sha2::Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hash).unwrap();
    hash.finalize().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// Names of upload temporaries (`.remo-put-*`) in `dir`.
pub(crate) fn put_temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".remo-put-"))
        .collect()
}

/// Whether `pid` has ended: no such process, or a zombie nobody reaped yet.
pub(crate) fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
    }
}

/// Waits up to `within` for `pid` to end; panics naming `what` (why it should have ended).
pub(crate) async fn wait_ended(pid: u32, within: Duration, what: &str) {
    let what = format!("process {pid} to end ({what})");
    testkit::until(&what, within, || process_ended(pid)).await;
}

/// The decimal numbers in a command's output (pids printed with `echo $$`).
pub(crate) fn numbers(output: &[u8]) -> Vec<u32> {
    String::from_utf8_lossy(output)
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect()
}
