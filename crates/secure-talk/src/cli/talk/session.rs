//! What every `secure-talk-cli` command shares: the run's [`Ctx`] (client options, output
//! form, retry policy), [`Failure`] and its exit codes, and reading requests' replies. The
//! commands (`talk`), the shell, `follow` and `receive` build on it; it calls none of them.

use std::path::Path;
use std::time::Duration;

use common::daemon::exit;
use common::envelope::talk::{Headers, Message, method};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::view;
use crate::admin::LIST;
use crate::client::{self, ClientError, ClientOptions, Connection, Incoming, Retry};
use crate::hub::Channel;

/// Exit status: the server refused the request (a reply with code 400 or more).
pub(crate) const REFUSED: u8 = 1;
/// Exit status: bad usage (clap's own errors exit with the same code).
pub(crate) const USAGE: u8 = common::exit::USAGE;

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
    pub(crate) hint: &'static str,
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

/// Reads a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|err| Failure::Input(format!("cannot read {}: {err}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|err| Failure::Input(format!("{} is not JSON: {err}", path.display())))
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

/// An echo request the server answers after everything sent before it.
pub(crate) fn sync_request(nonce: u64) -> Message {
    Message::new(
        Headers::method(method::TEXT),
        json!({ view::SYNC_KEY: nonce }),
    )
}
