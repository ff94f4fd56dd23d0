//! `secure-talk-cli`: the secure-talk client, for people (an interactive shell) and for
//! scripts (one command per run, `--json` lines, documented exit codes).
//!
//! Everything on the wire goes through [`crate::client`]; this module only turns arguments
//! into requests and replies into output. The shell lives in `shell`, the data channel
//! consumers in `follow` (`create --follow`) and `receive`, formatting in `view`. The binary
//! parses [`Args`] and hands them to [`run`] through `common::cli::run`.
#![allow(clippy::print_stdout)] // a CLI: results go to stdout

mod follow;
mod receive;
mod shell;
mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{DISCONNECT, LIST, SEND};
use crate::client::{self, ClientError, ClientOptions, Connection, Incoming, Retry, Transport};
use crate::hub::Channel;
use clap::{Parser, Subcommand};
use common::daemon::exit;
use common::envelope::talk::{BinaryMessage, Headers, Message, method};
use common::tls::ClientTlsFiles;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

/// Exit status: the server refused the request (a reply with code 400 or more).
const REFUSED: u8 = 1;
/// Exit status: bad usage (clap uses it too).
const USAGE: u8 = 2;
/// Uploads larger than this get a progress display.
const PROGRESS_THRESHOLD: u64 = 1 << 20;

const AFTER_HELP: &str = "\
Examples:
  secure-talk-cli --ca ca.pem --cert me.pem --key me.key token
  secure-talk-cli --unix /run/secure-talk/talk.sock echo hello
  secure-talk-cli --unix talk.sock create --launch \"sh -c 'make test'\" --follow
  id=$(secure-talk-cli --unix talk.sock create --launch 'tail -f /var/log/syslog')
  secure-talk-cli --unix talk.sock receive --dir out/ &
  secure-talk-cli --unix talk.sock property \"$id\" '{\"stdin\": \"line\\n\"}'
  secure-talk-cli --unix talk.sock destroy \"$id\"
  secure-talk-cli --unix talk.sock --json list
  secure-talk-cli --unix talk.sock model weights.bin --name m1/weights.bin
  secure-talk-cli --unix talk.sock            (interactive shell; type help)

Exit codes:
  0   done
  1   the server refused the request (reply code >= 400; its text goes to stderr)
  2   bad usage
  65  bad input file or JSON
  69  cannot connect or the connection failed (refused, TLS failure, timeout)
  74  a local file cannot be read or written (token file, receive directory)
  77  the server refused the token or the websocket upgrade (HTTP 401/403)
  create --follow exits with the command's status instead (128+N if killed by signal N,
  127/126 if it cannot be run, 130 when interrupted twice).";

/// Client for secure-talk: one command per run, or an interactive shell.
///
/// Tokens: the server knows a client by a token (a signed JWT holding a client id). The first
/// connection fetches one and saves it in --token-file (mode 0600); later runs present it and
/// keep the same identity, so runs sharing a token file are one client (a shell, a receiver,
/// scripts). Remove the file to become a new client.
///
/// Channels: each client has an admin channel (commands and their replies) and a data
/// channel (the output of its pipes). A client has one connection per channel; a newer one
/// replaces the older.
///
/// Pipes: `create` starts worker processes on the server. Each runs the launch command line,
/// split like a shell would but not run by one (write `sh -c '...'` for shell syntax). Their
/// stdout and stderr go to the owner's data channel (`receive`, or `create --follow`);
/// `property`, `send` and `destroy` address a running pipe by id. Pipes outlive the
/// connection that made them and are listed again when the owner comes back with its token.
///
/// Transport: TLS over TCP (--host/--port with --ca, and --cert/--key when the server asks
/// for a client certificate), or plain HTTP on the server's Unix socket (--unix).
#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP)]
pub struct Args {
    /// Server host name or address (TLS).
    #[arg(
        long,
        env = "SECURE_TALK_HOST",
        default_value = "127.0.0.1",
        global = true
    )]
    host: String,
    /// Server port (TLS).
    #[arg(long, env = "SECURE_TALK_PORT", default_value_t = 8445, global = true)]
    port: u16,
    /// Use the server's Unix socket (plain HTTP/WS) instead of TLS.
    #[arg(long, env = "SECURE_TALK_UNIX", value_name = "PATH", global = true)]
    unix: Option<PathBuf>,
    /// CA bundle (PEM) that signed the server certificate; required for TLS.
    #[arg(long, env = "SECURE_TALK_CA", value_name = "PEM", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate chain (PEM), when the server asks for one.
    #[arg(long, env = "SECURE_TALK_CERT", value_name = "PEM", global = true)]
    cert: Option<PathBuf>,
    /// Client key (PEM) [default: in the --cert file].
    #[arg(long, env = "SECURE_TALK_KEY", value_name = "PEM", global = true)]
    key: Option<PathBuf>,
    /// Name the server certificate must carry [default: --host].
    #[arg(
        long,
        env = "SECURE_TALK_SERVER_NAME",
        value_name = "NAME",
        global = true
    )]
    server_name: Option<String>,
    /// Where the token is kept (written 0600).
    #[arg(
        long,
        env = "SECURE_TALK_TOKEN_FILE",
        default_value = client::DEFAULT_TOKEN_FILE,
        value_name = "FILE",
        global = true
    )]
    token_file: PathBuf,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, env = "SECURE_TALK_JSON", global = true)]
    json: bool,
    /// Seconds allowed for each step: connecting, the TLS handshake, a reply.
    #[arg(
        long,
        env = "SECURE_TALK_TIMEOUT",
        default_value_t = 10,
        value_name = "SECS",
        global = true
    )]
    timeout: u64,
    /// Connection attempts before giving up (with back-off between them).
    #[arg(
        long,
        env = "SECURE_TALK_ATTEMPTS",
        default_value_t = 3,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    attempts: u32,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Interactive shell (the default): `command>` prompt, type `help`.
    ///
    /// Reads commands line by line (plain lines when stdin is not a terminal), prints what
    /// the server sends as it arrives, and waits for each request's replies before the next
    /// line. History is kept in $HOME/.secure_talk_history.
    Shell,
    /// Fetch (or reuse) the token; print the client id and the token file.
    Token,
    /// Send TEXT to the server's echo and print what comes back.
    Echo {
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Create pipes and print their ids (one per line).
    ///
    /// The create JSON is {"pipe_num", "config", "launch"}: --file gives a starting object,
    /// the flags override its members.
    Create(CreateArgs),
    /// Send a property JSON to a pipe (the pipe program writes a "stdin" member to the
    /// command's input).
    Property {
        /// The pipe.
        pipe_id: u64,
        /// The JSON, or @FILE to read it from a file.
        #[arg(value_name = "JSON")]
        property: String,
    },
    /// Destroy a pipe (it gets a destroy request, then SIGTERM, then SIGKILL).
    Destroy {
        /// The pipe.
        pipe_id: u64,
        /// Wait until the pipe has exited.
        #[arg(long)]
        wait: bool,
    },
    /// Write TEXT and a newline to a pipe (its command's standard input).
    Send {
        /// The pipe.
        pipe_id: u64,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Do not add a newline.
        #[arg(short = 'n', long)]
        no_newline: bool,
    },
    /// List clients and pipes (yours; everything for an admin identity).
    List,
    /// Disconnect a client (admin identities only).
    Disconnect {
        /// The client to disconnect.
        client_id: u64,
    },
    /// Print the server's model information (file -> MD5).
    Show,
    /// Upload files into the server's upload directory.
    Model {
        /// Files to upload.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Name on the server [default: the file name]; one file only.
        #[arg(long)]
        name: Option<String>,
    },
    /// Store the output of your pipes under DIR until SIGINT or SIGTERM.
    ///
    /// Text output goes to DIR/pipe_<id>/output.txt, error text to errors.txt, binary output
    /// to binary_<n>.bin. Reconnects with back-off when the connection drops.
    Receive {
        /// Where to store the output.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// No line per message on stderr.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Command line each pipe runs (split like a shell would; no shell runs it).
    #[arg(long, value_name = "CMD")]
    launch: Option<String>,
    /// Configuration JSON for the pipes, or @FILE (the pipe program reads "env" and "cwd").
    #[arg(long, value_name = "JSON")]
    config: Option<String>,
    /// How many pipes [default: pipe_num of --file, else 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pipes: Option<u64>,
    /// A create JSON file to start from.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Stream the pipes' output (stdout, stderr) until they end; exit with the command's
    /// status.
    #[arg(long)]
    follow: bool,
}

/// Why a run failed; each kind has its exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage.
    Usage(String),
    /// A bad input file or JSON.
    Input(String),
    /// Cannot connect, or the connection failed.
    Unavailable(String),
    /// The token or the upgrade was refused.
    NoPerm(String),
    /// The server refused the request.
    Refused {
        /// The reply's code.
        code: i64,
        /// The reply's text.
        text: String,
    },
    /// A local file cannot be read or written.
    Io(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Usage(_) => USAGE,
            Self::Input(_) => exit::DATAERR,
            Self::Unavailable(_) => exit::UNAVAILABLE,
            Self::NoPerm(_) => exit::NOPERM,
            Self::Refused { .. } => REFUSED,
            Self::Io(_) => exit::IOERR,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(text)
            | Self::Input(text)
            | Self::Unavailable(text)
            | Self::NoPerm(text)
            | Self::Io(text) => f.write_str(text),
            Self::Refused { text, .. } => f.write_str(text),
        }
    }
}

/// What every command needs.
pub(crate) struct Ctx {
    pub(crate) options: ClientOptions,
    pub(crate) json: bool,
    pub(crate) retry: Retry,
    /// Appended to connection failures (what to check).
    hint: &'static str,
}

impl Ctx {
    /// Deadline of one step.
    pub(crate) fn wait(&self) -> Duration {
        self.options.timeout
    }

    /// Fetches (or reuses) the token and opens `channel`, retrying transient failures.
    pub(crate) async fn connect(&self, channel: Channel) -> Result<Connection, Failure> {
        self.connect_with(channel, self.retry).await
    }

    /// [`Ctx::connect`] with another retry policy.
    pub(crate) async fn connect_with(
        &self,
        channel: Channel,
        retry: Retry,
    ) -> Result<Connection, Failure> {
        client::connect_with_retry(&self.options, channel, retry)
            .await
            .map_err(|err| self.failure(err))
    }

    /// The failure for a client error.
    pub(crate) fn failure(&self, err: ClientError) -> Failure {
        match err {
            ClientError::Refused {
                status: status @ (401 | 403),
                body,
            } => Failure::NoPerm(format!(
                "the server refused the token or the upgrade ({status}): {body}"
            )),
            ClientError::TokenFile { .. } => Failure::Io(err.to_string()),
            err => Failure::Unavailable(format!(
                "cannot talk to the server at {:?}: {err}{}",
                self.options.transport, self.hint
            )),
        }
    }
}

impl common::cli::Report for Failure {
    fn exit_code(&self) -> u8 {
        self.code()
    }

    /// A refusal is the server's text as it is, without the `secure-talk-cli:` prefix.
    fn prefixed(&self) -> bool {
        !matches!(self, Self::Refused { .. })
    }
}

/// Runs one command (the shell by default); the exit code on success.
///
/// # Errors
/// The failure, with its exit code; with `--json`, a refusal's code and text are printed on
/// stdout as one JSON line first.
pub async fn run(args: Args) -> Result<u8, Failure> {
    common::tls::install_default_provider();
    let json = args.json;
    let result = execute(args).await;
    if let (true, Err(Failure::Refused { code, text })) = (json, &result) {
        println!("{}", json!({"code": code, "payload": text}));
    }
    result
}

fn context(args: &Args) -> Result<Ctx, Failure> {
    let (transport, hint) = match &args.unix {
        Some(path) => (Transport::Unix(path.clone()), ""),
        None => {
            let Some(ca) = &args.ca else {
                return Err(Failure::Usage(
                    "TLS needs --ca PEM (the CA that signed the server certificate), and \
                     --cert PEM --key PEM when the server asks for a client certificate; \
                     or use --unix PATH for the server's Unix socket"
                        .into(),
                ));
            };
            if args.key.is_some() && args.cert.is_none() {
                return Err(Failure::Usage("--key needs --cert".into()));
            }
            let files = ClientTlsFiles {
                ca: Some(ca.clone()),
                cert: args.cert.clone(),
                key: args.key.clone(),
                ..ClientTlsFiles::default()
            };
            let config = common::tls::client_config(&files)
                .map_err(|err| Failure::Input(format!("TLS files: {err}")))?;
            let hint = if args.cert.is_none() {
                " (no client certificate was offered: if the server requires one, pass --cert \
                 and --key)"
            } else {
                " (check --host, --port, --server-name and that the server trusts --cert)"
            };
            let transport = Transport::Tls {
                host: args.host.clone(),
                port: args.port,
                server_name: args
                    .server_name
                    .clone()
                    .unwrap_or_else(|| args.host.clone()),
                config: Arc::new(config),
            };
            (transport, hint)
        }
    };
    let mut options = ClientOptions::new(transport);
    options.token_file = Some(args.token_file.clone());
    options.timeout = Duration::from_secs(args.timeout.max(1));
    Ok(Ctx {
        options,
        json: args.json,
        retry: Retry {
            attempts: Some(args.attempts),
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        },
        hint,
    })
}

async fn execute(args: Args) -> Result<u8, Failure> {
    let ctx = context(&args)?;
    match args.command.unwrap_or(Command::Shell) {
        Command::Shell => shell::run(&ctx).await,
        Command::Token => token(&ctx).await,
        Command::Echo { text } => echo(&ctx, text.join(" ")).await,
        Command::Create(create) => {
            let (json, count) = create_json(&create)?;
            if create.follow {
                follow::run(&ctx, json, count).await
            } else {
                create_pipes(&ctx, json, count).await
            }
        }
        Command::Property { pipe_id, property } => {
            let value = json_argument(&property, "the property")?;
            let message = Message::new(
                Headers::method(method::PROPERTY).with_pipe_id(pipe_id),
                value,
            );
            simple(&ctx, &message).await
        }
        Command::Destroy { pipe_id, wait } => destroy(&ctx, pipe_id, wait).await,
        Command::Send {
            pipe_id,
            text,
            no_newline,
        } => {
            let mut text = text.join(" ");
            if !no_newline {
                text.push('\n');
            }
            let message = Message::new(
                Headers::method(SEND).with_pipe_id(pipe_id),
                Value::String(text),
            );
            simple(&ctx, &message).await
        }
        Command::List => list(&ctx).await,
        Command::Disconnect { client_id } => {
            let mut headers = Headers::method(DISCONNECT);
            headers.extra.insert("client_id".into(), json!(client_id));
            simple(&ctx, &Message::new(headers, Value::Null)).await
        }
        Command::Show => show(&ctx).await,
        Command::Model { files, name } => model(&ctx, &files, name).await,
        Command::Receive { dir, quiet } => receive::run(&ctx, &dir, quiet).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and replies.

/// The failure for a connection that broke.
pub(crate) fn lost(err: &ClientError) -> Failure {
    Failure::Unavailable(format!("the connection failed: {err}"))
}

/// The failure for a connection the server closed.
pub(crate) fn closed(conn: &Connection) -> Failure {
    match &conn.closed {
        Some((code, reason)) => Failure::Unavailable(format!(
            "the server closed the connection ({code} {reason})"
        )),
        None => Failure::Unavailable("the server closed the connection".into()),
    }
}

/// The next message, by `deadline`; skips (with a warning) what cannot be decoded.
pub(crate) async fn next(conn: &mut Connection, deadline: Instant) -> Result<Incoming, Failure> {
    loop {
        match tokio::time::timeout_at(deadline, conn.recv()).await {
            Err(_) => {
                return Err(Failure::Unavailable(
                    "no answer from the server in time (see --timeout)".into(),
                ));
            }
            Ok(Ok(Some(incoming))) => return Ok(incoming),
            Ok(Ok(None)) => return Err(closed(conn)),
            Ok(Err(ClientError::Protocol(err))) => {
                eprintln!("secure-talk-cli: ignoring a message: {err}");
            }
            Ok(Err(err)) => return Err(lost(&err)),
        }
    }
}

/// The reply to a request: the next `text`, `list` or `error` message.
pub(crate) async fn reply(conn: &mut Connection, wait: Duration) -> Result<Message, Failure> {
    let deadline = Instant::now() + wait;
    loop {
        if let Incoming::Message(message) = next(conn, deadline).await? {
            if matches!(message.method(), method::TEXT | LIST | method::ERROR) {
                return Ok(message);
            }
        }
    }
}

/// The reply's status: `headers.code`, else the top-level one; an `error` message is 409.
pub(crate) fn reply_code(message: &Message) -> i64 {
    let default = if message.method() == method::ERROR {
        409
    } else {
        200
    };
    message.headers.code.or(message.code).unwrap_or(default)
}

/// The reply, or [`Failure::Refused`] when its code is 400 or more.
pub(crate) fn accepted(message: Message) -> Result<Message, Failure> {
    let code = reply_code(&message);
    if code >= 400 {
        return Err(Failure::Refused {
            code,
            text: view::payload_text(&message),
        });
    }
    Ok(message)
}

async fn send(conn: &mut Connection, message: &Message) -> Result<(), Failure> {
    conn.send(message).await.map_err(|err| lost(&err))
}

/// Prints a reply: its text, or the whole message as JSON.
fn print_reply(ctx: &Ctx, message: &Message) {
    if ctx.json {
        println!("{}", message.encode());
    } else {
        println!("{}", view::payload_text(message));
    }
}

/// One request, one `text` reply: printed, or the failure.
async fn simple(ctx: &Ctx, message: &Message) -> Result<u8, Failure> {
    let mut conn = ctx.connect(Channel::Admin).await?;
    send(&mut conn, message).await?;
    let answer = accepted(reply(&mut conn, ctx.wait()).await?)?;
    print_reply(ctx, &answer);
    let _ = conn.close().await;
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// Input files.

/// Reads a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|err| Failure::Input(format!("cannot read {}: {err}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|err| Failure::Input(format!("{} is not JSON: {err}", path.display())))
}

/// A JSON argument: inline, or `@FILE`.
fn json_argument(text: &str, what: &str) -> Result<Value, Failure> {
    match text.strip_prefix('@') {
        Some(path) => read_json(Path::new(path)),
        None => serde_json::from_str(text)
            .map_err(|err| Failure::Input(format!("{what} is not JSON ({err}): {text}"))),
    }
}

/// Builds the create JSON; returns it with the number of pipes it asks for.
fn create_json(args: &CreateArgs) -> Result<(Value, usize), Failure> {
    let mut object = match &args.file {
        Some(path) => match read_json(path)? {
            Value::Object(object) => object,
            _ => {
                return Err(Failure::Input(format!(
                    "{}: the create JSON must be an object",
                    path.display()
                )));
            }
        },
        None => Map::new(),
    };
    if let Some(n) = args.pipes {
        object.insert("pipe_num".into(), json!(n));
    }
    if let Some(config) = &args.config {
        object.insert("config".into(), json_argument(config, "--config")?);
    }
    if let Some(launch) = &args.launch {
        object.insert("launch".into(), json!(launch));
    }
    let count = pipe_count(&object)?;
    Ok((Value::Object(object), count))
}

/// `pipe_num` of a create JSON (default 1).
pub(crate) fn pipe_count(object: &Map<String, Value>) -> Result<usize, Failure> {
    match object.get("pipe_num") {
        None | Some(Value::Null) => Ok(1),
        Some(n) => n
            .as_u64()
            .filter(|n| *n >= 1)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Failure::Input("pipe_num must be a positive integer".into())),
    }
}

// ---------------------------------------------------------------------------------------------
// Commands.

async fn token(ctx: &Ctx) -> Result<u8, Failure> {
    let path = ctx
        .options
        .token_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(client::DEFAULT_TOKEN_FILE));
    let saved = client::read_token(&path).map_err(|err| ctx.failure(err))?;
    // The same back-off as connections, without opening a channel (which would replace a
    // running shell's or receiver's).
    let mut wait = ctx.retry.initial;
    let mut attempt = 0;
    let token = loop {
        attempt += 1;
        match client::fetch_token(&ctx.options, saved.as_deref()).await {
            Ok(token) => break token,
            Err(err) if err.is_transient() && ctx.retry.attempts.is_none_or(|n| attempt < n) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(ctx.retry.max);
            }
            Err(err) => return Err(ctx.failure(err)),
        }
    };
    let reused = saved.as_deref() == Some(token.as_str());
    if !reused {
        client::save_token(&path, &token).map_err(|err| ctx.failure(err))?;
    }
    let client_id = crate::token::peek(&token)
        .map(|claims| claims.client_id)
        .ok_or_else(|| Failure::Unavailable("the server's token is not a JWT".into()))?;
    let shown = std::path::absolute(&path).unwrap_or(path);
    if ctx.json {
        println!(
            "{}",
            json!({"client_id": client_id, "token_file": shown, "reused": reused})
        );
    } else {
        println!("client {client_id}");
        println!("token file {}", shown.display());
    }
    Ok(0)
}

async fn echo(ctx: &Ctx, text: String) -> Result<u8, Failure> {
    let mut conn = ctx.connect(Channel::Admin).await?;
    let request = Message::new(Headers::method(method::TEXT), Value::String(text));
    send(&mut conn, &request).await?;
    let answer = accepted(reply(&mut conn, ctx.wait()).await?)?;
    print_reply(ctx, &answer);
    let _ = conn.close().await;
    Ok(0)
}

/// Reads the replies to a create of `count` pipes: the ids created, and the first refusal.
pub(crate) async fn created(
    conn: &mut Connection,
    count: usize,
    wait: Duration,
) -> Result<(Vec<u64>, Option<Failure>), Failure> {
    let mut ids = Vec::new();
    let mut refused = None;
    let mut answered = 0;
    while answered < count {
        let answer = reply(conn, wait).await?;
        if answer.method() != method::TEXT || answer.headers.code.is_none() {
            continue;
        }
        answered += 1;
        let code = reply_code(&answer);
        if code >= 400 {
            refused.get_or_insert(Failure::Refused {
                code,
                text: view::payload_text(&answer),
            });
            // 500 is one pipe failing to start; anything else refuses the whole request.
            if code != 500 {
                break;
            }
            continue;
        }
        let text = view::payload_text(&answer);
        match text.strip_prefix("pipe_create ").map(str::parse) {
            Some(Ok(id)) => ids.push(id),
            _ => eprintln!("secure-talk-cli: unexpected reply: {text}"),
        }
    }
    Ok((ids, refused))
}

async fn create_pipes(ctx: &Ctx, create: Value, count: usize) -> Result<u8, Failure> {
    let mut conn = ctx.connect(Channel::Admin).await?;
    send(
        &mut conn,
        &Message::new(Headers::method(method::CREATE), create),
    )
    .await?;
    let (ids, refused) = created(&mut conn, count, ctx.wait()).await?;
    if ctx.json {
        if !ids.is_empty() || refused.is_none() {
            println!("{}", json!({ "created": ids }));
        }
    } else {
        for id in &ids {
            println!("{id}");
        }
    }
    let _ = conn.close().await;
    match refused {
        Some(failure) => Err(failure),
        None => Ok(0),
    }
}

async fn destroy(ctx: &Ctx, pipe_id: u64, wait: bool) -> Result<u8, Failure> {
    let mut conn = ctx.connect(Channel::Admin).await?;
    let request = Message::new(
        Headers::method(method::DESTROY).with_pipe_id(pipe_id),
        Value::Null,
    );
    send(&mut conn, &request).await?;
    let answer = accepted(reply(&mut conn, ctx.wait()).await?)?;
    print_reply(ctx, &answer);
    if wait {
        let deadline = Instant::now() + ctx.wait();
        loop {
            if let Incoming::Message(message) = next(&mut conn, deadline).await? {
                if message.method() == method::PIPE_DELETE
                    && view::deleted_ids(&message).contains(&pipe_id)
                {
                    break;
                }
            }
        }
        if ctx.json {
            println!("{}", Message::pipe_delete(pipe_id).encode());
        } else {
            println!("pipe {pipe_id} deleted");
        }
    }
    let _ = conn.close().await;
    Ok(0)
}

async fn list(ctx: &Ctx) -> Result<u8, Failure> {
    let mut conn = ctx.connect(Channel::Admin).await?;
    send(&mut conn, &Message::new(Headers::method(LIST), Value::Null)).await?;
    let answer = accepted(reply(&mut conn, ctx.wait()).await?)?;
    let payload = answer.payload.unwrap_or(Value::Null);
    if ctx.json {
        println!("{payload}");
    } else {
        print!("{}", view::list_table(&payload, view::unix_now()));
    }
    let _ = conn.close().await;
    Ok(0)
}

/// An echo request the server answers after everything sent before it.
pub(crate) fn sync_request(nonce: u64) -> Message {
    Message::new(
        Headers::method(method::TEXT),
        json!({ view::SYNC_KEY: nonce }),
    )
}

async fn show(ctx: &Ctx) -> Result<u8, Failure> {
    let mut conn = ctx.connect(Channel::Admin).await?;
    // The server pushes model_info.json (when there is one) on connect, before any reply.
    send(&mut conn, &sync_request(1)).await?;
    let deadline = Instant::now() + ctx.wait();
    let mut info = None;
    loop {
        let incoming = next(&mut conn, deadline).await?;
        if let Some(found) = view::model_info(&incoming) {
            info = Some(found);
        }
        if let Incoming::Message(message) = &incoming {
            if view::sync_nonce(message) == Some(1) {
                break;
            }
        }
    }
    let _ = conn.close().await;
    if ctx.json {
        println!("{}", json!({ "model_info": info }));
    } else {
        match info {
            Some(info) => println!("{}", view::pretty(&info)),
            None => eprintln!("the server has no model information yet"),
        }
    }
    Ok(0)
}

async fn model(ctx: &Ctx, files: &[PathBuf], name: Option<String>) -> Result<u8, Failure> {
    if name.is_some() && files.len() > 1 {
        return Err(Failure::Usage("--name needs exactly one file".into()));
    }
    // Read everything first: a bad file fails before anything is sent.
    let mut uploads = Vec::new();
    for path in files {
        let bytes = std::fs::read(path)
            .map_err(|err| Failure::Input(format!("cannot read {}: {err}", path.display())))?;
        let remote = match &name {
            Some(name) => name.clone(),
            None => path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| {
                    Failure::Usage(format!("{} has no file name; use --name", path.display()))
                })?
                .to_owned(),
        };
        uploads.push((remote, bytes));
    }
    let mut conn = ctx.connect(Channel::Admin).await?;
    for (remote, bytes) in uploads {
        let size = bytes.len() as u64;
        let message = BinaryMessage::new(Headers::method(method::MODEL).with_path(&remote), bytes);
        let bar = (size > PROGRESS_THRESHOLD && !ctx.json)
            .then(|| view::upload_progress(&remote, size))
            .flatten();
        let sent = conn.send_binary(&message).await;
        if let Some(bar) = &bar {
            bar.set_position(size);
            bar.set_message(format!("{remote}: waiting for the server"));
        }
        // Writing a large file takes the server a while too.
        let wait = ctx.wait() + Duration::from_secs(size >> 20);
        let answer = match sent {
            Ok(()) => reply(&mut conn, wait).await,
            Err(err) => Err(lost(&err)),
        };
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        print_reply(ctx, &accepted(answer?)?);
    }
    let _ = conn.close().await;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_consistent() {
        <Args as clap::CommandFactory>::command().debug_assert();
    }
}
