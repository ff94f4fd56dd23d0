//! The interactive shell: the original CLI's commands and a few more.
//!
//! rustyline is synchronous, so it runs on a thread of its own; the websocket stays in the
//! async task. The line reader sends requests through a channel; the task sends them, then
//! an echo barrier, and acknowledges the request when the barrier comes back, so each line's
//! replies are printed before the next prompt (and scripts piped into stdin behave). What
//! the server sends is printed as it arrives, above the prompt on a terminal.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, mpsc as std_mpsc};
use std::time::Duration;

use crate::admin::{LIST, SEND};
use crate::client::{ClientError, Connection, Incoming};
use crate::hub::Channel;
use common::envelope::talk::{BinaryMessage, Headers, Message, md5_hex, method};
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, ExternalPrinter, Helper};
use serde_json::Value;
use tokio::sync::mpsc;

use super::session::{Ctx, Failure, read_json, reply_code, sync_request};
use super::view;

const PROMPT: &str = "command> ";
const HISTORY_FILE: &str = ".secure_talk_history";
const COMMANDS: [&str; 21] = [
    "help", "c", "create", "p", "property", "d", "destroy", "pipe", "m", "model", "show", "list",
    "send", "echo", "q", "quit", "exit", "?", "h", "l", "s",
];
const HELP: &str = "\
commands:
  c|create <create.json>              create pipes (the file is uploaded as is)
  p|property <property.json> <id>     send a property JSON to a pipe
  d|destroy [<destroy.json>] <id>     destroy a pipe
  send <id> <text...>                 write text and a newline to a pipe
  pipe                                your pipe ids and what they were created with
  list                                clients and pipes as the server sees them
  m|model <model_dir>                 upload every file of each sub-folder whose MD5
                                      differs from the server's model information
  show                                the server's model information
  echo <text...>                      the server's echo
  help, q|quit";

/// What the shell knows from the server's messages.
#[derive(Debug, Default)]
struct State {
    pipes: BTreeSet<u64>,
    pipe_info: BTreeMap<u64, Value>,
    model_info: Option<Value>,
    closed: bool,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

enum Frame {
    Json(Message),
    Binary(BinaryMessage),
}

enum ToServer {
    /// Send these, then acknowledge once the server has answered them.
    Send {
        frames: Vec<Frame>,
        done: std_mpsc::Sender<()>,
    },
    Quit,
}

/// Why the websocket side ended.
enum End {
    Quit,
    Closed(String),
}

/// Runs the shell until `quit`, end of input or the server closing the connection.
pub(crate) async fn run(ctx: &Ctx) -> Result<u8, Failure> {
    let conn = ctx.connect(Channel::Admin).await?;
    let stdin_tty = std::io::stdin().is_terminal();
    let saved_mode = stdin_tty
        .then(|| rustix::termios::tcgetattr(std::io::stdin()).ok())
        .flatten();
    let mut editor: Editor<ShellHelper, FileHistory> =
        Editor::new().map_err(|err| Failure::Io(format!("terminal: {err}")))?;
    editor.set_helper(Some(ShellHelper {
        files: FilenameCompleter::new(),
    }));
    let history = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(HISTORY_FILE));
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    let external = if stdin_tty && std::io::stdout().is_terminal() {
        editor
            .create_external_printer()
            .ok()
            .map(|p| Box::new(p) as Box<dyn ExternalPrinter + Send>)
    } else {
        None
    };
    eprintln!(
        "connected as client {}; type help for the commands",
        conn.client_id
    );
    let state = Shared::default();
    let (tx, rx) = mpsc::channel(16);
    let reader = Reader {
        editor,
        history,
        tx,
        state: state.clone(),
        wait: ctx.wait(),
    };
    std::thread::spawn(move || reader.run());
    let printer = Printer {
        external,
        json: ctx.json,
    };
    match serve(conn, rx, &state, printer).await {
        End::Quit => Ok(0),
        End::Closed(why) => {
            // The reader thread may sit in raw mode; the process ends without it.
            if let Some(mode) = saved_mode {
                let _ = rustix::termios::tcsetattr(
                    std::io::stdin(),
                    rustix::termios::OptionalActions::Now,
                    &mode,
                );
                eprintln!();
            }
            Err(Failure::Unavailable(why))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The websocket side.

struct Printer {
    external: Option<Box<dyn ExternalPrinter + Send>>,
    json: bool,
}

impl Printer {
    fn out(&mut self, text: &str) {
        if let Some(printer) = &mut self.external {
            if printer.print(format!("{text}\n")).is_ok() {
                return;
            }
        }
        println!("{text}");
    }

    fn err(&mut self, text: &str) {
        if let Some(printer) = &mut self.external {
            if printer.print(format!("{text}\n")).is_ok() {
                return;
            }
        }
        eprintln!("{text}");
    }
}

async fn serve(
    mut conn: Connection,
    mut rx: mpsc::Receiver<ToServer>,
    state: &Shared,
    mut printer: Printer,
) -> End {
    let mut nonce = 0u64;
    let mut pending: VecDeque<(u64, std_mpsc::Sender<()>)> = VecDeque::new();
    let end = loop {
        tokio::select! {
            request = rx.recv() => match request {
                None | Some(ToServer::Quit) => break End::Quit,
                Some(ToServer::Send { frames, done }) => {
                    nonce += 1;
                    let mut sent = Ok(());
                    for frame in frames.into_iter().chain([Frame::Json(sync_request(nonce))]) {
                        sent = match &frame {
                            Frame::Json(message) => conn.send(message).await,
                            Frame::Binary(message) => conn.send_binary(message).await,
                        };
                        if sent.is_err() {
                            break;
                        }
                    }
                    if let Err(err) = sent {
                        break End::Closed(format!("the connection failed: {err}"));
                    }
                    pending.push_back((nonce, done));
                }
            },
            incoming = conn.recv() => match incoming {
                Ok(Some(incoming)) => {
                    let barrier = match &incoming {
                        Incoming::Message(message) => view::sync_nonce(message),
                        Incoming::Binary(_) => None,
                    };
                    match barrier {
                        Some(n) => {
                            while pending.front().is_some_and(|(p, _)| *p <= n) {
                                if let Some((_, done)) = pending.pop_front() {
                                    let _ = done.send(());
                                }
                            }
                        }
                        None => show(&incoming, state, &mut printer),
                    }
                }
                Ok(None) => break End::Closed(match &conn.closed {
                    Some((code, reason)) => format!("the server closed the connection ({code} {reason})"),
                    None => "the server closed the connection".into(),
                }),
                Err(ClientError::Protocol(err)) => printer.err(&format!("ignoring a message: {err}")),
                Err(err) => break End::Closed(format!("the connection failed: {err}")),
            }
        }
    };
    lock(state).closed = true;
    if matches!(end, End::Quit) {
        let _ = conn.close().await;
    }
    end
}

/// Prints what the server sent and remembers what the commands need.
fn show(incoming: &Incoming, state: &Shared, printer: &mut Printer) {
    if let Some(info) = view::model_info(incoming) {
        let files = info.as_object().map_or(0, serde_json::Map::len);
        lock(state).model_info = Some(info);
        if !printer.json {
            printer.out(&format!("model information: {files} files (see show)"));
        }
    }
    if printer.json {
        printer.out(&view::incoming_json(incoming).to_string());
    }
    let Incoming::Message(message) = incoming else {
        return;
    };
    let text = view::payload_text(message);
    match message.method() {
        method::PIPE_ID => {
            let ids = view::deleted_ids(message);
            let mut state = lock(state);
            state.pipes = ids.iter().copied().collect();
            state.pipe_info.retain(|id, _| ids.contains(id));
            drop(state);
            if !printer.json {
                printer.out(&format!("pipes: {ids:?}"));
            }
        }
        method::PIPE_DELETE => {
            let ids = view::deleted_ids(message);
            let mut state = lock(state);
            for id in &ids {
                state.pipes.remove(id);
                state.pipe_info.remove(id);
            }
            drop(state);
            if !printer.json {
                for id in ids {
                    printer.out(&format!("pipe {id} deleted"));
                }
            }
        }
        method::PIPE_INFO => {
            if let (Some(id), Some(info)) = (message.headers.pipe_id, &message.payload) {
                lock(state).pipe_info.insert(id, info.clone());
            }
        }
        _ if printer.json => {}
        method::TEXT => match reply_code(message) {
            code if code >= 400 => printer.err(&format!("error {code}: {text}")),
            _ => printer.out(&text),
        },
        method::ERROR => printer.err(&format!("error: {text}")),
        method::PIPE_MESSAGE => {
            let id = message
                .headers
                .pipe_id
                .map_or_else(|| "?".into(), |id| id.to_string());
            printer.err(&format!("pipe {id}: {text}"));
        }
        LIST => match reply_code(message) {
            code if code >= 400 => printer.err(&format!("error {code}: {text}")),
            _ => {
                let payload = message.payload.clone().unwrap_or(Value::Null);
                printer.out(view::list_table(&payload, view::unix_now()).trim_end());
            }
        },
        method::CHECK_SUM => {}
        _ => printer.out(&message.encode()),
    }
}

// ---------------------------------------------------------------------------------------------
// The line reader.

struct Reader {
    editor: Editor<ShellHelper, FileHistory>,
    history: Option<PathBuf>,
    tx: mpsc::Sender<ToServer>,
    state: Shared,
    wait: Duration,
}

enum Flow {
    Next,
    Quit,
}

impl Reader {
    fn run(mut self) {
        loop {
            if lock(&self.state).closed {
                break;
            }
            let line = match self.editor.readline(PROMPT) {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => continue,
                Err(_) => break,
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let _ = self.editor.add_history_entry(line);
            if let Some(path) = &self.history {
                let _ = self.editor.save_history(path);
            }
            let flow = match self.dispatch(line) {
                Ok(flow) => flow,
                Err(text) => {
                    eprintln!("{text}");
                    Flow::Next
                }
            };
            if matches!(flow, Flow::Quit) {
                break;
            }
        }
        let _ = self.tx.blocking_send(ToServer::Quit);
    }

    fn dispatch(&mut self, line: &str) -> Result<Flow, String> {
        let (verb, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let args: Vec<&str> = rest.split_whitespace().collect();
        match (verb, args.as_slice()) {
            ("help" | "h" | "?", _) => println!("{HELP}"),
            ("q" | "quit" | "exit", _) => return Ok(Flow::Quit),
            ("c" | "create", [file]) => {
                let bytes =
                    std::fs::read(file).map_err(|err| format!("cannot read {file}: {err}"))?;
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Object(_)) => {}
                    Ok(_) => return Err(format!("{file}: the create JSON must be an object")),
                    Err(err) => return Err(format!("{file} is not JSON: {err}")),
                }
                let message = BinaryMessage::new(Headers::method(method::CREATE), bytes);
                return Ok(self.request(vec![Frame::Binary(message)], self.wait));
            }
            ("p" | "property", [file, id]) => {
                let id = self.known_pipe(id)?;
                let value = read_json(Path::new(file)).map_err(|f| f.to_string())?;
                let message =
                    Message::new(Headers::method(method::PROPERTY).with_pipe_id(id), value);
                return Ok(self.request(vec![Frame::Json(message)], self.wait));
            }
            ("d" | "destroy", [id] | [_, id]) => {
                let id = self.known_pipe(id)?;
                let payload = match args.as_slice() {
                    [file, _] => read_json(Path::new(file)).map_err(|f| f.to_string())?,
                    _ => Value::Null,
                };
                let message =
                    Message::new(Headers::method(method::DESTROY).with_pipe_id(id), payload);
                return Ok(self.request(vec![Frame::Json(message)], self.wait));
            }
            ("send", [id, ..]) => {
                let id = self.known_pipe(id)?;
                let text = rest
                    .split_once(char::is_whitespace)
                    .map_or("", |(_, t)| t.trim_start());
                let message = Message::new(
                    Headers::method(SEND).with_pipe_id(id),
                    Value::String(format!("{text}\n")),
                );
                return Ok(self.request(vec![Frame::Json(message)], self.wait));
            }
            ("echo", _) => {
                let message = Message::new(
                    Headers::method(method::TEXT),
                    Value::String(rest.to_owned()),
                );
                return Ok(self.request(vec![Frame::Json(message)], self.wait));
            }
            ("l" | "list", []) => {
                let message = Message::new(Headers::method(LIST), Value::Null);
                return Ok(self.request(vec![Frame::Json(message)], self.wait));
            }
            ("pipe", []) => self.print_pipes(),
            ("s" | "show", []) => match &lock(&self.state).model_info {
                Some(info) => println!("{}", view::pretty(info)),
                None => println!("no model information from the server yet"),
            },
            ("m" | "model", [dir]) => return self.upload_models(Path::new(dir)),
            (verb, _) if COMMANDS.contains(&verb) => {
                return Err(format!("wrong arguments for {verb}; try help"));
            }
            (verb, _) => return Err(format!("unknown command {verb:?}; try help")),
        }
        Ok(Flow::Next)
    }

    /// Sends frames and waits until the server has answered them; `Quit` once the
    /// connection is gone.
    fn request(&self, frames: Vec<Frame>, wait: Duration) -> Flow {
        let (done, answered) = std_mpsc::channel();
        if self
            .tx
            .blocking_send(ToServer::Send { frames, done })
            .is_err()
        {
            return Flow::Quit;
        }
        match answered.recv_timeout(wait) {
            Ok(()) => Flow::Next,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                eprintln!("no answer within {} s; continuing", wait.as_secs());
                Flow::Next
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Flow::Quit,
        }
    }

    /// A pipe id the server has told about (as the original CLI, only those are addressed).
    fn known_pipe(&self, id: &str) -> Result<u64, String> {
        let id: u64 = id.parse().map_err(|_| format!("{id:?} is not a pipe id"))?;
        let state = lock(&self.state);
        if state.pipes.contains(&id) {
            return Ok(id);
        }
        let known: Vec<String> = state.pipes.iter().map(ToString::to_string).collect();
        if known.is_empty() {
            Err(format!("unknown pipe {id}: you have no pipes"))
        } else {
            Err(format!("unknown pipe {id}: yours are {}", known.join(", ")))
        }
    }

    fn print_pipes(&self) {
        let state = lock(&self.state);
        if state.pipes.is_empty() {
            println!("no pipes");
        }
        for id in &state.pipes {
            match state.pipe_info.get(id) {
                Some(info) => println!("pipe {id}: {info}"),
                None => println!("pipe {id}"),
            }
        }
    }

    /// Uploads `<dir>/<sub>/<file>` as `<sub>/<file>` when its MD5 differs from the server's
    /// (its `model_info.json` in either shape).
    fn upload_models(&self, dir: &Path) -> Result<Flow, String> {
        let known = lock(&self.state).model_info.clone().unwrap_or(Value::Null);
        let (mut sent, mut same) = (0, 0);
        for sub in sorted_entries(dir)? {
            if !sub.is_dir() {
                continue;
            }
            let Some(sub_name) = visible_name(&sub) else {
                continue;
            };
            for file in sorted_entries(&sub)? {
                let Some(file_name) = visible_name(&file).filter(|_| file.is_file()) else {
                    continue;
                };
                let remote = format!("{sub_name}/{file_name}");
                let bytes = std::fs::read(&file)
                    .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
                if crate::model_info::checksum_of(&known, &remote) == Some(md5_hex(&bytes).as_str())
                {
                    same += 1;
                    continue;
                }
                println!("uploading {remote} ({} bytes)", bytes.len());
                let wait = self.wait + Duration::from_secs((bytes.len() >> 20) as u64);
                let message =
                    BinaryMessage::new(Headers::method(method::MODEL).with_path(&remote), bytes);
                if let Flow::Quit = self.request(vec![Frame::Binary(message)], wait) {
                    return Ok(Flow::Quit);
                }
                sent += 1;
            }
        }
        println!("{sent} uploaded, {same} unchanged");
        Ok(Flow::Next)
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|err| format!("cannot read {}: {err}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    Ok(paths)
}

/// The file name, unless it is hidden (the server refuses those) or not UTF-8.
fn visible_name(path: &Path) -> Option<&str> {
    path.file_name()?.to_str().filter(|n| !n.starts_with('.'))
}

// ---------------------------------------------------------------------------------------------
// Completion: the first word from the commands, the second a file path.

struct ShellHelper {
    files: FilenameCompleter,
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let words = before.split_whitespace().count();
        let index = if before.is_empty() || before.ends_with(char::is_whitespace) {
            words
        } else {
            words - 1
        };
        match index {
            0 => {
                let prefix = before.trim_start();
                let candidates = COMMANDS
                    .iter()
                    .filter(|c| c.len() > 1 && c.starts_with(prefix))
                    .map(|c| Pair {
                        display: (*c).to_owned(),
                        replacement: format!("{c} "),
                    })
                    .collect();
                Ok((pos - prefix.len(), candidates))
            }
            1 => self.files.complete(line, pos, ctx),
            _ => Ok((pos, Vec::new())),
        }
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}
