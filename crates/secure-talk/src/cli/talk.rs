//! `secure-talk-cli`: the secure-talk client, for people (an interactive shell) and for
//! scripts (one command per run, `--json` lines, documented exit codes).
//!
//! Everything on the wire goes through [`crate::client`]; this module only turns arguments
//! into requests and replies into output. What every command shares (the run's context,
//! failures and their exit codes, reading replies) is in `session`; the shell lives in
//! `shell`, the data channel consumers in `follow` (`create --follow`) and `receive`,
//! formatting in `view`. None of them calls back into this module. The binary
//! parses [`Args`] and hands them to [`run`] through `common::cli::run`.
#![allow(clippy::print_stdout)] // a CLI: results go to stdout

mod follow;
mod receive;
mod session;
mod shell;
mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{DISCONNECT, LIST, SEND};
use crate::client::{self, ClientOptions, Connection, Incoming, Retry, Transport};
use crate::hub::Channel;
use clap::{Parser, Subcommand};
use common::envelope::talk::{BinaryMessage, Headers, Message, method};
use common::tls::ClientTlsFiles;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

pub use self::session::Failure;
use self::session::{
    Ctx, accepted, created, lost, next, pipe_count, read_json, reply, sync_request,
};

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
