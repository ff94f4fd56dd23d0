//! signing-client: the signing-server client. Sends a server-side path over the original
//! protocol and prints what the original client printed; uploads local files, lists keys and
//! fetches public keys over the JSON API; verifies Ed448 signatures locally.
//!
//! The answer parsing lives in `original.rs` (no I/O), the HTTP connection in `http.rs`.
#![allow(clippy::print_stdout)] // a CLI: results go to stdout

#[path = "signing-client/http.rs"]
mod http;
#[path = "signing-client/original.rs"]
mod original;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use common::daemon::exit;
use common::tls::{ClientTlsFiles, TlsError};
use signing_server::fields::{Fields, python_json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::http::Api;
use crate::original::Reply;

/// Uploads larger than this get a progress bar (when stderr is a terminal).
const PROGRESS_THRESHOLD: u64 = 1 << 20;
/// Largest original-protocol answer we read.
const MAX_ORIGINAL_ANSWER: usize = 64 << 20;
/// Exit status: a signature did not verify, or the server refused a file or a request.
const REJECTED: u8 = 1;
/// Exit status: bad flags (clap's own).
const USAGE: u8 = 2;
/// Exit status: the server's answer made no sense.
const PROTOCOL: u8 = 76;

const AFTER_HELP: &str = "\
Credentials: an administrator issues each client a certificate and key signed by the CA the
server trusts, plus that CA's certificate; put them in ~/.ssh/ as signing-client.crt,
signing-client.key and signing-ca.crt (key mode 0600), or point --cert, --key and --ca (or
SIGNING_CERT, SIGNING_KEY, SIGNING_CA) elsewhere. The server's certificate must chain to --ca
and carry --server-name (default: --host). The server decides what your certificate may sign.

PATH names a file or directory ON THE SERVER, not a local one: a relative PATH is joined to
the current directory (the original client's \"default: the current directory\"), so run it
from the same path the server sees (an NFS mount, say). To sign local files, use --upload.
Subcommands come first: `signing-client keys --host h`, not `signing-client --host h keys`.

Examples:
  signing-client /export/nim/installp/ppc
  signing-client --host signer.example.com bos.rte.7.3.0.0.bff
  signing-client --upload build/mytool.1.0.0.0.bff --ftype I
  signing-client verify mytool.1.0.0.0.bff --signature BASE64 --keyid 0123456789abcdef
  signing-client verify mytool.1.0.0.0.bff --signature BASE64 --public-key release.pub
  signing-client keys

Exit codes:
  0   done (verify: the signature is good)
  1   the signature is bad, or the server refused a file or the request
  2   bad usage
  65  bad input: a local file is missing, bad base64, a bad key or credential file
  69  cannot connect, TLS failure (certificate not trusted either way), timeout
  74  a local file cannot be read
  76  the server's answer is not what the protocol says
  77  refused by the server: the certificate may not sign, or not there";

/// Client for signing-server: have files signed with the organisation's package key.
///
/// Without a subcommand, sends PATH (a directory or a file on the server; default: the
/// current directory) over the original protocol and prints the listing, one
/// `NAME: {fields}` line per signed file, and where the server wrote the signatures. With
/// --upload, sends the content of local files instead (streamed, over HTTPS).
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true, after_help = AFTER_HELP)]
struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    sign: Sign,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where the server is and who we are.
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Connection")]
struct Conn {
    /// Server host name or address.
    #[arg(long, env = "SIGNING_HOST", default_value = "localhost", global = true)]
    host: String,
    /// Server port.
    #[arg(long, env = "SIGNING_PORT", default_value_t = 6000, global = true)]
    port: u16,
    /// Client certificate (PEM) [default: ~/.ssh/signing-client.crt].
    #[arg(long, env = "SIGNING_CERT", value_name = "PEM", global = true)]
    cert: Option<PathBuf>,
    /// Client key (PEM) [default: ~/.ssh/signing-client.key; with --cert, in that file].
    #[arg(long, env = "SIGNING_KEY", value_name = "PEM", global = true)]
    key: Option<PathBuf>,
    /// CA certificate the server's certificate must chain to [default: ~/.ssh/signing-ca.crt].
    #[arg(long, env = "SIGNING_CA", value_name = "PEM", global = true)]
    ca: Option<PathBuf>,
    /// Name the server certificate must carry [default: --host].
    #[arg(long, env = "SIGNING_SERVER_NAME", value_name = "NAME", global = true)]
    server_name: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds for connecting, the TLS handshake and each wait for the server (it signs a
    /// whole directory before it answers: raise this for big files).
    #[arg(
        long,
        env = "SIGNING_TIMEOUT",
        default_value_t = 30,
        value_name = "SECS",
        global = true
    )]
    timeout: u64,
}

/// The default command.
#[derive(Debug, Clone, ClapArgs)]
struct Sign {
    /// Server-side file or directory to sign [default: the current directory].
    #[arg(value_name = "PATH", conflicts_with = "upload")]
    path: Option<PathBuf>,
    /// Sign these local files by sending their content (one connection for all).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    upload: Vec<PathBuf>,
    /// Package name for uploads [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    package: Option<String>,
    /// Fileset for uploads [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    fileset: Option<String>,
    /// Version.Release.Modification.Fix for uploads [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    vrmf: Option<String>,
    /// Image type for uploads (I, S, SR, ML) [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    ftype: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check an Ed448 signature of a local file, here (the file is not sent anywhere).
    ///
    /// The public key comes from --public-key, or from the server by key id (--keyid).
    /// Prints `Signature OK` (exit 0) or `Signature BAD` (exit 1).
    Verify(Verify),
    /// List the server's keys; `*` marks the one your certificate signs with.
    Keys,
}

#[derive(Debug, ClapArgs)]
#[command(group(clap::ArgGroup::new("sig").required(true).args(["signature", "signature_arg"])))]
#[command(group(clap::ArgGroup::new("pub").required(true).args(["public_key", "keyid"])))]
struct Verify {
    /// The signed file.
    file: PathBuf,
    /// The signature (base64), instead of --signature.
    #[arg(value_name = "SIGNATURE")]
    signature_arg: Option<String>,
    /// The signature (base64), as printed by signing.
    #[arg(long, short = 's', value_name = "B64")]
    signature: Option<String>,
    /// Public key (PEM, as `GET /v1/keys/KEYID` or `signing-server keygen` writes it).
    #[arg(long, value_name = "PEM")]
    public_key: Option<PathBuf>,
    /// Fetch the public key with this id from the server (its id is checked).
    #[arg(long, value_name = "ID")]
    keyid: Option<String>,
}

/// Why the client stops, with its exit status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Rejected(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Usage(_) => USAGE,
            Self::Input(_) => exit::DATAERR,
            Self::Connect(_) => exit::UNAVAILABLE,
            Self::Io(_) => exit::IOERR,
            Self::Protocol(_) => PROTOCOL,
            Self::Refused(_) => exit::NOPERM,
            Self::Rejected(_) => REJECTED,
        }
    }
}

/// Where to connect, with the TLS configuration for one protocol.
#[derive(Clone)]
pub(crate) struct Target {
    host: String,
    port: u16,
    server_name: String,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Target {
    fn new(conn: &Conn, alpn: Vec<Vec<u8>>) -> Result<Self, Failure> {
        let home = || {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".ssh"))
                .ok_or_else(|| {
                    Failure::Usage("$HOME is not set: pass --cert, --key and --ca".into())
                })
        };
        let or_home = |given: &Option<PathBuf>, name: &str| match given {
            Some(path) => Ok(path.clone()),
            None => home().map(|dir| dir.join(name)),
        };
        let files = ClientTlsFiles {
            ca: Some(or_home(&conn.ca, "signing-ca.crt")?),
            cert: Some(or_home(&conn.cert, "signing-client.crt")?),
            // --cert without --key: the key is in the --cert file.
            key: match (&conn.key, &conn.cert) {
                (Some(key), _) => Some(key.clone()),
                (None, Some(_)) => None,
                (None, None) => Some(home()?.join("signing-client.key")),
            },
            alpn,
            skip_hostname_check: false,
        };
        let tls = common::tls::client_config(&files).map_err(|err| match err {
            TlsError::Read { .. } | TlsError::Pem { .. } => Failure::Input(format!(
                "{err} (an administrator issues the client certificate, key and CA: see --help)"
            )),
            other => Failure::Input(format!("client TLS configuration: {other}")),
        })?;
        Ok(Self {
            host: conn.host.clone(),
            port: conn.port,
            server_name: conn
                .server_name
                .clone()
                .unwrap_or_else(|| conn.host.clone()),
            tls: Arc::new(tls),
            timeout: Duration::from_secs(conn.timeout.max(1)),
        })
    }

    /// `host:port` for the Host header.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// TCP, then TLS, each under the timeout.
pub(crate) async fn open_tls(
    target: &Target,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Failure> {
    let where_ = format!("{}:{}", target.host, target.port);
    let tcp = tokio::time::timeout(
        target.timeout,
        tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| Failure::Connect(format!("connecting to {where_}: timed out")))?
    .map_err(|e| Failure::Connect(format!("connecting to {where_}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    common::tls::connect(target.tls.clone(), &target.server_name, tcp, target.timeout)
        .await
        .map_err(|e| Failure::Connect(format!("{where_}: {e}")))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("signing-client: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("signing-client: {failure}");
            failure.code()
        }
    };
    runtime.shutdown_background();
    ExitCode::from(code)
}

async fn run(args: Args) -> Result<u8, Failure> {
    match &args.command {
        Some(Command::Verify(verify)) => run_verify(&args.conn, verify).await,
        Some(Command::Keys) => run_keys(&args.conn).await,
        None if !args.sign.upload.is_empty() => run_upload(&args.conn, &args.sign).await,
        None => run_original(&args.conn, args.sign.path.as_deref()).await,
    }
}

/// The path to send: absolute as given, relative joined to the current directory.
fn server_path(path: Option<&Path>) -> Result<String, Failure> {
    if let Some(given) = path {
        // With args_conflicts_with_subcommands, `--host h keys` makes "keys" the PATH.
        if matches!(given.to_str(), Some("keys" | "verify")) {
            return Err(Failure::Usage(format!(
                "{0:?} would be sent as a path: put subcommands first (`signing-client {0} --host ...`), or write ./{0} for a server directory of that name",
                given.display().to_string()
            )));
        }
    }
    let absolute = match path {
        Some(p) if p.is_absolute() => p.to_owned(),
        _ => {
            let cwd = std::env::current_dir()
                .map_err(|e| Failure::Io(format!("the current directory: {e}")))?;
            path.map_or(cwd.clone(), |p| cwd.join(p))
        }
    };
    let text = absolute
        .to_str()
        .ok_or_else(|| Failure::Input(format!("{} is not UTF-8", absolute.display())))?;
    if text.contains(['\n', '\r', '\0']) {
        return Err(Failure::Input(format!(
            "{text:?} holds a line break or NUL"
        )));
    }
    Ok(text.to_owned())
}

async fn run_original(conn: &Conn, path: Option<&Path>) -> Result<u8, Failure> {
    let path = server_path(path)?;
    let target = Target::new(conn, Vec::new())?;
    let mut stream = open_tls(&target).await?;
    let idle = target.timeout;
    let net = |e: std::io::Error| Failure::Connect(tls_hint(&e));
    // One write, as the original; the newline tells the server the path is complete.
    tokio::time::timeout(idle, async {
        stream.write_all(format!("{path}\n").as_bytes()).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| Failure::Connect("sending the path timed out".into()))?
    .map_err(net)?;
    let mut data = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(idle, stream.read(&mut chunk))
            .await
            .map_err(|_| {
                Failure::Connect(format!(
                    "no answer from the server for {}s (it signs everything before it answers; raise --timeout)",
                    idle.as_secs()
                ))
            })?;
        match read {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&chunk[..n]);
                if data.len() > MAX_ORIGINAL_ANSWER {
                    return Err(Failure::Protocol(format!(
                        "the answer is over {MAX_ORIGINAL_ANSWER} bytes"
                    )));
                }
            }
            // The server drops the connection after a refusal of an unreadable request.
            Err(err)
                if err.kind() == std::io::ErrorKind::UnexpectedEof
                    && data.starts_with(b"Refused: ") =>
            {
                break;
            }
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Failure::Connect(
                    "the server closed the connection before finishing its answer".into(),
                ));
            }
            Err(err) => return Err(net(err)),
        }
    }
    match original::parse(&data).map_err(Failure::Protocol)? {
        Reply::Refused(reason) => Err(if original::is_permission(&reason) {
            Failure::Refused(format!("refused: {reason}"))
        } else {
            Failure::Rejected(format!("refused: {reason}"))
        }),
        Reply::Answer(answer) => {
            if conn.json {
                println!(
                    "{}",
                    serde_json::to_string(&answer).map_err(|e| Failure::Protocol(e.to_string()))?
                );
            } else {
                print!("{}", original::render(&answer, &conn.host));
            }
            let failed: Vec<&str> = answer
                .files
                .0
                .iter()
                .filter(|(_, e)| matches!(e, original::Entry::Failed { .. }))
                .map(|(name, _)| name.as_str())
                .collect();
            if failed.is_empty() {
                Ok(0)
            } else {
                eprintln!("signing-client: not signed: {}", failed.join(", "));
                Ok(REJECTED)
            }
        }
    }
}

/// An I/O error from the TLS stream, with a hint when the server sent an alert (with TLS 1.3
/// a refused client certificate shows up on the first read, not in the handshake).
fn tls_hint(err: &std::io::Error) -> String {
    let alert = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)));
    if alert {
        format!(
            "the server ended the TLS session: {err} (is --cert issued by the CA the server trusts?)"
        )
    } else {
        err.to_string()
    }
}

fn progress_bar(size: u64, name: &str) -> Option<indicatif::ProgressBar> {
    if size <= PROGRESS_THRESHOLD || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_owned());
    Some(bar)
}

/// What `POST /v1/sign` answers.
#[derive(Debug, serde::Deserialize)]
struct Uploaded {
    name: String,
    #[serde(flatten)]
    fields: Fields,
}

async fn run_upload(conn: &Conn, sign: &Sign) -> Result<u8, Failure> {
    // Every file must be there before anything is sent.
    let mut files = Vec::with_capacity(sign.upload.len());
    for path in &sign.upload {
        let meta = std::fs::metadata(path)
            .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(Failure::Input(format!("{} is not a file", path.display())));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Failure::Input(format!("{} has no file name", path.display())))?;
        files.push((path, name, meta.len()));
    }
    let target = Target::new(conn, vec![signing_server::server::ALPN_HTTP.to_vec()])?;
    let mut api = Api::connect(target).await?;
    let mut code = 0;
    for (path, name, size) in files {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("name", &name);
        for (key, value) in [
            ("package", &sign.package),
            ("fileset", &sign.fileset),
            ("vrmf", &sign.vrmf),
            ("ftype", &sign.ftype),
        ] {
            if let Some(value) = value {
                query.append_pair(key, value);
            }
        }
        let uri = format!("/v1/sign?{}", query.finish());
        let bar = progress_bar(size, &name);
        let answer = api.post_file(&uri, path, size, bar.clone()).await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let answer = answer?;
        if answer.status != 200 {
            let failure = answer.failure(&name);
            if matches!(failure, Failure::Refused(_)) {
                return Err(failure);
            }
            eprintln!("signing-client: {failure}");
            code = REJECTED;
            continue;
        }
        if conn.json {
            println!("{}", answer.json()?);
        } else {
            let uploaded: Uploaded = serde_json::from_slice(&answer.body)
                .map_err(|e| Failure::Protocol(format!("the answer for {name}: {e}")))?;
            println!("{}: {}", uploaded.name, python_json(&uploaded.fields));
        }
    }
    Ok(code)
}

async fn run_keys(conn: &Conn) -> Result<u8, Failure> {
    let target = Target::new(conn, vec![signing_server::server::ALPN_HTTP.to_vec()])?;
    let mut api = Api::connect(target).await?;
    let answer = api.get("/v1/keys").await?;
    if answer.status != 200 {
        return Err(answer.failure("listing keys"));
    }
    let value = answer.json()?;
    if conn.json {
        println!("{value}");
        return Ok(0);
    }
    let mine = value.get("key").and_then(|k| k.as_str());
    let keys = value
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| Failure::Protocol("the answer has no \"keys\"".into()))?;
    let text = |key: &serde_json::Value, field: &str| {
        key.get(field)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_owned()
    };
    let rows: Vec<[String; 3]> = keys
        .iter()
        .map(|k| [text(k, "name"), text(k, "keyid"), text(k, "algorithm")])
        .collect();
    let width = |i: usize, title: &str| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1) = (width(0, "NAME"), width(1, "KEYID"));
    println!("  {:w0$}  {:w1$}  ALGORITHM", "NAME", "KEYID");
    for row in &rows {
        let mark = if Some(row[0].as_str()) == mine {
            '*'
        } else {
            ' '
        };
        println!("{mark} {:w0$}  {:w1$}  {}", row[0], row[1], row[2]);
    }
    Ok(0)
}

async fn run_verify(conn: &Conn, verify: &Verify) -> Result<u8, Failure> {
    let encoded = verify
        .signature
        .as_deref()
        .or(verify.signature_arg.as_deref())
        .unwrap_or_default();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| Failure::Input(format!("the signature is not base64: {e}")))?;
    let file = std::fs::File::open(&verify.file)
        .map_err(|e| Failure::Input(format!("{}: {e}", verify.file.display())))?;
    let pem = match (&verify.public_key, &verify.keyid) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?,
        (None, Some(keyid)) => fetch_key(conn, keyid).await?,
        (None, None) => return Err(Failure::Usage("--public-key or --keyid is required".into())),
    };
    let key = signing_server::ed448::parse_public_pem(&pem)
        .map_err(|e| Failure::Input(format!("the public key: {e}")))?;
    if let Some(keyid) = &verify.keyid {
        let actual = signing_server::ed448::keyid(&key);
        if verify.public_key.is_none() && &actual != keyid {
            return Err(Failure::Protocol(format!(
                "the server's key for id {keyid} has id {actual}"
            )));
        }
    }
    let path = verify.file.clone();
    let valid = tokio::task::spawn_blocking(move || {
        signing_server::ed448::verify_stream(&key, &signature, std::io::BufReader::new(file))
    })
    .await
    .map_err(|e| Failure::Io(e.to_string()))?
    .map_err(|e| Failure::Io(format!("{}: {e}", path.display())))?;
    if conn.json {
        println!("{}", serde_json::json!({ "valid": valid }));
    } else {
        println!("Signature {}", if valid { "OK" } else { "BAD" });
    }
    Ok(if valid { 0 } else { REJECTED })
}

async fn fetch_key(conn: &Conn, keyid: &str) -> Result<String, Failure> {
    if keyid.is_empty()
        || !keyid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Failure::Input(format!("{keyid:?} is not a key id")));
    }
    let target = Target::new(conn, vec![signing_server::server::ALPN_HTTP.to_vec()])?;
    let mut api = Api::connect(target).await?;
    let answer = api.get(&format!("/v1/keys/{keyid}")).await?;
    match answer.status {
        200 => Ok(String::from_utf8_lossy(&answer.body).into_owned()),
        404 => Err(Failure::Input(format!(
            "the server has no public key with id {keyid}"
        ))),
        _ => Err(answer.failure("fetching the key")),
    }
}
