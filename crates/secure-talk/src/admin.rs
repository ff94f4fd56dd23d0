//! The admin channel's methods.
//!
//! | method | request | reply (`headers.code` is the one place for a status) |
//! |---|---|---|
//! | `text` | any payload | the message itself, unchanged |
//! | `create` | create JSON (text payload or binary upload) | per pipe: `text` 200 `pipe_create <id>`, `pipe_id`, `pipe_info` |
//! | `property` | `headers.pipe_id`, JSON | `text` 200 `pipe_property <id>`; forwarded as the dialect says (kmb: type 4; dlafs: type 0 with `command_set_property.pipe_id` set) |
//! | `destroy` | `headers.pipe_id` (dlafs: the destroy JSON as payload) | `text` 200 `pipe_destroy <id>`; `pipe_delete` when it has exited |
//! | `send` | `headers.pipe_id`, text | `text` 200 `pipe_send <id>`; forwarded as IPC type 0 |
//! | `model` | binary upload, `headers.path` | `text` 200; `checkSum` broadcast to every admin connection (coalesced: the latest, one shared copy) |
//! | `list` | - | `list` with `{clients, pipes}`: the caller's, or everything for an admin identity |
//! | `disconnect` | `headers.client_id` (admin identity only) | `text` 200; the client's sockets close with 4003 |
//!
//! A create whose values do not fill the `{create.…}` placeholders of `pipe_args` gets 400 and
//! spawns nothing (`argv`).
//!
//! Errors are `text` replies with code 400 (bad request), 403 (not an admin), 404 (no such
//! pipe or client, or not the caller's), 413 (too large),
//! 422 (checksum mismatch), 500 (the pipe program cannot start, an upload
//! cannot be written, `model_info.json` is not a regular file) or 503 (a limit); a second
//! upload to a path being written gets the original's `error` method, with code 409.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use common::envelope::ipc::{Frame, Kind};
use common::envelope::talk::{BinaryMessage, Headers, Limits, Message, md5_hex, method};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::argv::Template;
use crate::dialect::Dialect;
use crate::hub::{ClientId, Out, PipeError, PipeId, PipeLimits, PipeSpec};
use crate::state::Shared;
use crate::upload::Spool;

/// Name of the model information file in the upload directory.
pub const MODEL_INFO: &str = "model_info.json";
/// Method of the `list` reply and request.
pub const LIST: &str = "list";
/// Method to disconnect a client.
pub const DISCONNECT: &str = "disconnect";
/// Method to write text to a pipe.
pub const SEND: &str = "send";

/// Who is asking.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: ClientId,
    pub(crate) is_admin: bool,
    /// Who pays for its pipes ([`crate::state::Peer::key`]).
    pub(crate) party: String,
}

pub(crate) fn text(code: i64, text: impl Into<String>) -> WsMessage {
    WsMessage::text(Message::text(code, text).encode())
}

fn reply(message: &Message) -> WsMessage {
    WsMessage::text(message.encode())
}

/// Only what dispatch needs, borrowed: the payload is skipped, not built.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    headers: PeekHeaders<'a>,
}

#[derive(serde::Deserialize)]
struct PeekHeaders<'a> {
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
}

/// A text frame on the admin channel.
pub(crate) async fn on_text(ctx: &Ctx, frame: Utf8Bytes) -> Vec<WsMessage> {
    let max = ctx.shared.config.limits.max_message_bytes;
    if frame.len() > max {
        return vec![text(413, format!("message larger than {max} bytes"))];
    }
    let is_echo = match serde_json::from_str::<Peek<'_>>(frame.as_str()) {
        Ok(peek) => peek.headers.method.as_deref() == Some(method::TEXT),
        Err(_) => return vec![text(400, "json format error")],
    };
    if is_echo {
        // The original's echo: the message as it came.
        return vec![WsMessage::Text(frame)];
    }
    match Message::decode(frame.as_bytes(), max) {
        Ok(message) => {
            let payload = message.payload.clone().unwrap_or(Value::Null);
            dispatch(ctx, &message.headers, Body::Json(payload)).await
        }
        Err(_) => vec![text(400, "json format error")],
    }
}

/// A binary frame on the admin channel: `headers | 0x01 | payload | 0x01 | md5`.
pub(crate) async fn on_binary(ctx: &Ctx, frame: Bytes) -> Vec<WsMessage> {
    let limits = &ctx.shared.config.limits;
    // Uploads are streamed (`inbound`); what comes here is a message held whole.
    let limits = Limits {
        max_header: limits.max_message_bytes,
        max_payload: limits.max_message_bytes,
    };
    let message = match BinaryMessage::decode(&frame, limits) {
        Ok(message) => message,
        Err(err @ common::envelope::talk::TalkError::TooLarge { .. }) => {
            return vec![text(413, err.to_string())];
        }
        Err(err) => return vec![text(400, format!("bad binary message: {err}"))],
    };
    if let Err(err) = message.verify() {
        return vec![text(422, err.to_string())];
    }
    if message.headers.method.as_deref() == Some(method::TEXT) {
        // Echo, as clean JSON: text payloads stay text, other bytes go as base64.
        let mut headers = message.headers.clone();
        let payload = match std::str::from_utf8(&message.payload) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => {
                headers
                    .extra
                    .insert("encoding".into(), Value::from("base64"));
                Value::String(base64::engine::general_purpose::STANDARD.encode(&message.payload))
            }
        };
        let mut echo = Message::new(headers, payload);
        echo.check_sum = Some(message.check_sum.clone());
        echo.extra.insert("checkSumPass".into(), Value::Bool(true));
        return vec![reply(&echo)];
    }
    let headers = message.headers.clone();
    dispatch(ctx, &headers, Body::Bytes(message.payload)).await
}

/// A request's payload: parsed JSON (text frames) or raw bytes (binary frames).
enum Body {
    Json(Value),
    Bytes(Bytes),
}

impl Body {
    /// The payload as JSON: an object as is, a string or bytes parsed as JSON text.
    fn json(&self) -> Option<Value> {
        match self {
            Self::Json(Value::String(s)) => serde_json::from_str(s).ok(),
            Self::Json(value) => Some(value.clone()),
            Self::Bytes(bytes) => serde_json::from_slice(bytes).ok(),
        }
    }

    /// The payload as text for a pipe: strings as they are, other JSON serialised.
    fn text(&self) -> Vec<u8> {
        match self {
            Self::Json(Value::String(s)) => s.clone().into_bytes(),
            Self::Json(Value::Null) => Vec::new(),
            Self::Json(value) => value.to_string().into_bytes(),
            Self::Bytes(bytes) => bytes.to_vec(),
        }
    }
}

async fn dispatch(ctx: &Ctx, headers: &Headers, body: Body) -> Vec<WsMessage> {
    let method = headers.method.as_deref().unwrap_or_default();
    match method {
        method::TEXT => vec![reply(&Message::new(
            headers.clone(),
            match body {
                Body::Json(value) => value,
                Body::Bytes(bytes) => Value::String(String::from_utf8_lossy(&bytes).into()),
            },
        ))],
        method::CREATE => create(ctx, &body),
        method::PROPERTY => with_pipe(ctx, headers, |pipe| property(ctx, pipe, &body)),
        method::DESTROY => with_pipe(ctx, headers, |pipe| {
            match ctx
                .shared
                .destroy_pipe(Some(ctx.client), pipe, body.json().as_ref())
            {
                Ok(()) => vec![text(200, format!("pipe_destroy {pipe}"))],
                Err(err) => vec![pipe_error(ctx, &err)],
            }
        }),
        SEND => with_pipe(ctx, headers, |pipe| {
            match ctx.shared.hub.send_to_pipe(
                Some(ctx.client),
                pipe,
                Frame::new(Kind::Text, body.text()),
            ) {
                Ok(()) => vec![text(200, format!("pipe_send {pipe}"))],
                Err(err) => vec![pipe_error(ctx, &err)],
            }
        }),
        method::MODEL => model(ctx, headers, body).await,
        LIST => list(ctx),
        DISCONNECT => disconnect(ctx, headers, &body),
        "" => vec![text(400, "headers.method is missing")],
        other => vec![text(400, format!("unknown method {other:?}"))],
    }
}

fn with_pipe(
    ctx: &Ctx,
    headers: &Headers,
    then: impl FnOnce(PipeId) -> Vec<WsMessage>,
) -> Vec<WsMessage> {
    match headers.pipe_id {
        Some(pipe) => then(pipe),
        None if ctx.shared.hub.pipes_of(ctx.client).is_empty() => {
            vec![text(404, format!("client {} has no pipes yet", ctx.client))]
        }
        None => vec![text(400, "headers.pipe_id is required")],
    }
}

fn pipe_error(ctx: &Ctx, err: &PipeError) -> WsMessage {
    match err {
        PipeError::NotFound(_) if ctx.shared.hub.pipes_of(ctx.client).is_empty() => {
            text(404, format!("client {} has no pipes yet", ctx.client))
        }
        PipeError::NotFound(_) => text(404, err.to_string()),
        PipeError::ClientLimit { .. } | PipeError::PartyLimit(_) | PipeError::ServerLimit(_) => {
            text(503, err.to_string())
        }
        PipeError::QueueFull(_) | PipeError::Unavailable(_) => text(503, err.to_string()),
    }
}

/// Reads the create JSON as the pipe command's dialect does: how many pipes, and what each
/// gets at check-in.
fn create_spec(dialect: Dialect, create: Value) -> Result<(PipeSpec, usize), String> {
    if !create.is_object() {
        return Err("the create payload must be a JSON object".into());
    }
    let count = dialect.pipe_count(&create)?;
    let first = dialect.first_frames(&create)?;
    Ok((PipeSpec { create, first }, count))
}

fn create(ctx: &Ctx, body: &Body) -> Vec<WsMessage> {
    let shared = &ctx.shared;
    let Some(create) = body.json() else {
        return vec![text(400, "json format error")];
    };
    // The request is kept with each pipe it creates (and shown by `list`): bounded.
    let max = shared.config.limits.max_pipe_spec_bytes;
    if create.to_string().len() > max {
        return vec![text(
            413,
            format!("the create request is larger than {max} bytes (max_pipe_spec_bytes)"),
        )];
    }
    let (spec, count) = match create_spec(shared.config.ipc_dialect, create) {
        Ok(found) => found,
        Err(err) => return vec![text(400, err)],
    };
    // The arguments take values from the request: a missing or unsafe one refuses the whole
    // create before any pipe is recorded or spawned.
    let bound = match Template::parse(&shared.config.pipe_args) {
        Ok(template) => template.bind(&spec.create),
        Err(err) => return vec![text(500, err.to_string())],
    };
    let bound = match bound {
        Ok(bound) => bound,
        Err(err) => return vec![text(400, err.to_string())],
    };
    let socket = crate::pipes::ipc_socket_arg(shared);
    let limits = &shared.config.limits;
    let pipe_limits = PipeLimits {
        per_client: limits.max_pipes_per_client,
        per_party: limits.max_pipes_per_identity,
        total: limits.max_pipes,
        queue_bytes: limits.pipe_queue_bytes,
    };
    let created = match shared
        .hub
        .create_pipes(ctx.client, &ctx.party, &spec, count, &pipe_limits)
    {
        Ok(created) => created,
        Err(err) => return vec![pipe_error(ctx, &err)],
    };
    let mut replies = Vec::new();
    for new in created {
        let pipe = new.id;
        let args = bound.arguments(pipe, &socket, crate::pipes::IPC_FD);
        match crate::pipes::spawn(shared, &new, args) {
            Ok(pid) => {
                shared.hub.set_pid(pipe, pid);
                tracing::info!(pipe_id = pipe, pid, owner = ctx.client, "pipe created");
                replies.push(text(200, format!("pipe_create {pipe}")));
                replies.push(reply(&Message::pipe_ids(&shared.hub.pipes_of(ctx.client))));
                replies.push(reply(&Message::pipe_info(pipe, spec.create.clone())));
            }
            Err(err) => {
                shared.hub.pipe_exited(pipe);
                tracing::error!(%err, program = shared.config.pipe_program, "cannot start the pipe program");
                replies.push(text(500, format!("cannot start the pipe program: {err}")));
            }
        }
    }
    replies
}

fn property(ctx: &Ctx, pipe: PipeId, body: &Body) -> Vec<WsMessage> {
    let Some(json) = body.json() else {
        return vec![text(400, "json format error")];
    };
    let (frame, json) = match ctx.shared.config.ipc_dialect.property(pipe, json) {
        Ok(found) => found,
        Err(err) => return vec![text(400, err)],
    };
    let payload = frame.payload.clone();
    // The last property is kept with the pipe (and shown by `list`): bounded.
    let max = ctx.shared.config.limits.max_pipe_spec_bytes;
    if payload.len() > max {
        return vec![text(
            413,
            format!("the property is larger than {max} bytes (max_pipe_spec_bytes)"),
        )];
    }
    match ctx.shared.hub.send_to_pipe(Some(ctx.client), pipe, frame) {
        Ok(()) => {
            ctx.shared.hub.set_property(ctx.client, pipe, json);
            vec![text(200, format!("pipe_property {pipe}"))]
        }
        Err(err) => vec![pipe_error(ctx, &err)],
    }
}

fn list(ctx: &Ctx) -> Vec<WsMessage> {
    let scope = (!ctx.is_admin).then_some(ctx.client);
    let (clients, pipes) = ctx.shared.hub.list(scope);
    let mut headers = Headers::method(LIST);
    headers.code = Some(200);
    let mut message = Message::new(
        headers,
        json!({"clients": clients, "pipes": pipes, "admin": ctx.is_admin, "client_id": ctx.client}),
    );
    message.extra = Map::new();
    vec![reply(&message)]
}

fn disconnect(ctx: &Ctx, headers: &Headers, body: &Body) -> Vec<WsMessage> {
    if !ctx.is_admin {
        return vec![text(403, "disconnect needs an admin identity")];
    }
    let target = headers
        .extra
        .get("client_id")
        .and_then(Value::as_u64)
        .or_else(|| match body {
            Body::Json(value) => value.as_u64(),
            Body::Bytes(_) => None,
        });
    let Some(target) = target else {
        return vec![text(400, "headers.client_id is required")];
    };
    let conns = ctx.shared.hub.conns_of(target);
    if conns.is_empty() {
        return vec![text(404, format!("client {target} is not connected"))];
    }
    for conn in conns {
        let _ = conn.tx.try_send(Out::Close(
            crate::hub::CLOSE_DISCONNECTED,
            "disconnected by an administrator".into(),
        ));
    }
    tracing::info!(
        by = ctx.client,
        client_id = target,
        "client disconnected by an administrator"
    );
    vec![text(200, format!("client {target} disconnected"))]
}

/// Checks an upload name: relative, no `..`, `.`, empty or hidden components, at most 8 deep.
pub fn sanitize_upload_path(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.len() > 1024 || name.contains(['\0', '\\']) {
        return None;
    }
    let path = Path::new(name);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                let part = part.to_str()?;
                if part.starts_with('.') || part.len() > 255 {
                    return None;
                }
                clean.push(part);
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    let depth = clean.components().count();
    // Not model_info.json, nor anything beneath a directory of that name, which would take
    // the place of the file every client's upload records into.
    (depth > 0 && depth <= 8 && !clean.starts_with(MODEL_INFO)).then_some(clean)
}

/// Holds an upload path while it is written (a second writer gets an `error`); released on
/// drop, however the upload ends.
#[derive(Debug)]
pub(crate) struct UploadLock {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        self.shared
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.path);
    }
}

/// Starts a `model` upload: checks the name, takes its lock and creates the spool. The
/// replies are the refusal (400, 409, 500).
pub(crate) async fn begin_upload(
    ctx: &Ctx,
    headers: &Headers,
) -> Result<(PathBuf, UploadLock, Spool), Vec<WsMessage>> {
    let shared = &ctx.shared;
    let Some(name) = headers.path.as_deref() else {
        return Err(vec![text(400, "headers.path is required")]);
    };
    let Some(relative) = sanitize_upload_path(name) else {
        tracing::warn!(path = name, client_id = ctx.client, "upload path refused");
        return Err(vec![text(
            400,
            format!(
                "upload path {name:?} refused: relative names inside the upload directory only"
            ),
        )]);
    };
    {
        let mut uploads = shared.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if !uploads.insert(relative.clone()) {
            // The original's `error` method, with the code where every reply carries it.
            let mut busy = Message::error(format!(
                "model file {name} is being written by another controller"
            ));
            busy.headers.code = Some(409);
            return Err(vec![reply(&busy)]);
        }
    }
    let lock = UploadLock {
        shared: shared.clone(),
        path: relative.clone(),
    };
    let dir = shared.config.upload_dir.clone();
    match tokio::task::spawn_blocking(move || Spool::create(&dir)).await {
        Ok(Ok(spool)) => Ok((relative, lock, spool)),
        Ok(Err(err)) => {
            tracing::error!(%err, path = ?relative, "cannot create an upload file");
            Err(vec![text(
                500,
                format!("cannot write {}: {err}", relative.display()),
            )])
        }
        Err(err) => Err(vec![text(500, format!("upload task failed: {err}"))]),
    }
}

/// Ends a verified upload: moves it to its name, records it in `model_info.json` and tells
/// every admin connection.
pub(crate) async fn finish_upload(
    ctx: &Ctx,
    spool: Spool,
    relative: PathBuf,
    size: u64,
    checksum: String,
) -> Vec<WsMessage> {
    let shared = &ctx.shared;
    let max = shared.config.limits.max_model_info_bytes;
    // A name model_info.json cannot record (its shape, its size, the file itself) is refused
    // before it is moved in.
    let checked = {
        let dir = shared.config.upload_dir.clone();
        let relative = relative.clone();
        let checksum = checksum.clone();
        tokio::task::spawn_blocking(move || check_model_info(&dir, &relative, &checksum, max))
            .await
            .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())))
    };
    if let Err(err) = checked {
        tracing::warn!(err = %common::log::Escaped(&err), path = ?relative, "upload refused by model_info.json");
        return vec![text(info_code(&err), err.to_string())];
    }
    let written = match spool.finish(relative.clone()).await {
        Ok(()) => {
            let dir = shared.config.upload_dir.clone();
            let relative = relative.clone();
            let checksum = checksum.clone();
            let info_lock = shared.clone();
            tokio::task::spawn_blocking(move || {
                let _guard = info_lock
                    .model_info_lock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                update_model_info(&dir, &relative, &checksum, max)
            })
            .await
            .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())))
        }
        Err(err) => Err(err),
    };
    match written {
        Ok(info) => {
            tracing::info!(path = ?relative, size, md5 = checksum, client_id = ctx.client, "model uploaded");
            // One copy for every admin connection; each writes the latest it has not sent
            // (an unsent older one is replaced, never queued behind it).
            let broadcast = Message::check_sum(Value::String(info)).encode();
            shared.model_info.send_replace(Some(Bytes::from(broadcast)));
            vec![text(
                200,
                format!(
                    "model {} saved ({size} bytes, md5 {checksum})",
                    relative.display()
                ),
            )]
        }
        Err(err) => {
            tracing::error!(err = %common::log::Escaped(&err), path = ?relative, "writing an upload failed");
            let code = if err.kind() == std::io::ErrorKind::PermissionDenied {
                400
            } else {
                info_code(&err)
            };
            vec![text(
                code,
                format!("cannot write {}: {err}", relative.display()),
            )]
        }
    }
}

/// The reply code for a refusal of `model_info.json`: 400 for a shape it cannot record, 413
/// past `max_model_info_bytes`, 500 otherwise (the file is not one the daemon reads).
fn info_code(err: &std::io::Error) -> i64 {
    match err.kind() {
        std::io::ErrorKind::InvalidData => 400,
        std::io::ErrorKind::FileTooLarge => 413,
        _ => 500,
    }
}

/// A `model` request held whole (a string payload in a text message).
async fn model(ctx: &Ctx, headers: &Headers, body: Body) -> Vec<WsMessage> {
    let bytes = match body {
        Body::Bytes(bytes) => bytes,
        Body::Json(Value::String(s)) => Bytes::from(s.into_bytes()),
        Body::Json(_) => return vec![text(400, "a model upload needs a binary message")],
    };
    let (relative, _lock, mut spool) = match begin_upload(ctx, headers).await {
        Ok(begun) => begun,
        Err(replies) => return replies,
    };
    let checksum = md5_hex(&bytes);
    if let Err(err) = spool.write(&bytes).await {
        return vec![text(
            500,
            format!("cannot write {}: {err}", relative.display()),
        )];
    }
    finish_upload(ctx, spool, relative, bytes.len() as u64, checksum).await
}

/// How `model_info.json` is opened: never through a symlink, never blocking on a FIFO,
/// never becoming the controlling terminal.
const INFO_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// `model_info.json` is not something the daemon reads (a 500: the operator's to fix).
fn not_readable(what: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "{MODEL_INFO} {what}; it is not read: the operator must replace it with a regular file or remove it"
    ))
}

/// `model_info.json` is (`is`: "is", or "would be" after an upload) past its bound (413).
fn too_large(is: &str, max: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::FileTooLarge,
        format!("{MODEL_INFO} {is} larger than max_model_info_bytes ({max} bytes)"),
    )
}

/// Reads `dir/model_info.json` (`None`: there is none yet), at most `max` bytes: opened
/// beneath the upload directory's descriptor without following a symlink and without
/// blocking (`O_NOFOLLOW | O_NONBLOCK`, `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), then
/// `fstat`ed: anything but a regular file of at most `max` bytes is an error, never followed
/// and never waited on.
fn read_model_info(dir: &Path, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let root = match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(root) => root,
        Err(Errno::NOENT) => return Ok(None),
        Err(errno) => return Err(errno.into()),
    };
    let opened = rustix::io::retry_on_intr(|| {
        rustix::fs::openat2(
            &root,
            MODEL_INFO,
            INFO_FLAGS,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    });
    let fd = match opened {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP | Errno::XDEV) => return Err(not_readable("is a symlink")),
        Err(errno) => return Err(errno.into()),
    };
    let stat = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(not_readable("is not a regular file"));
    }
    if usize::try_from(stat.st_size).map_or(true, |size| size > max) {
        return Err(too_large("is", max));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(too_large("is", max));
    }
    Ok(Some(bytes))
}

/// The text of `dir/model_info.json` with `relative → checksum` recorded (in the shape the
/// file has), at most `max` bytes.
fn recorded(dir: &Path, relative: &Path, checksum: &str, max: usize) -> std::io::Result<String> {
    let found = read_model_info(dir, max)?;
    let (mut info, shape) = crate::model_info::parse(found.as_deref()).map_err(invalid)?;
    crate::model_info::record(&mut info, shape, &relative.to_string_lossy(), checksum)
        .map_err(invalid)?;
    let text = crate::model_info::render(info, shape);
    if text.len() > max {
        return Err(too_large("would be", max));
    }
    Ok(text)
}

/// Whether `relative → checksum` can be recorded in `dir/model_info.json` as it is now (its
/// shape, see `model_info`, and `max_model_info_bytes`); checked before an upload is moved to
/// its name, so a refusal writes nothing. [`update_model_info`], under the lock, is the
/// authority.
fn check_model_info(
    dir: &Path,
    relative: &Path,
    checksum: &str,
    max: usize,
) -> std::io::Result<()> {
    recorded(dir, relative, checksum, max).map(drop)
}

fn invalid(err: crate::model_info::ModelInfoError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, err)
}

/// Records `relative → md5` in `dir/model_info.json` (atomically, in the shape the file has,
/// at most `max` bytes) and returns its new text.
fn update_model_info(
    dir: &Path,
    relative: &Path,
    checksum: &str,
    max: usize,
) -> std::io::Result<String> {
    use std::io::Write as _;
    let text = recorded(dir, relative, checksum, max)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".model_info-")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    // A rename replaces whatever has the name (a symlink is replaced, never written through).
    tmp.persist(dir.join(MODEL_INFO)).map_err(|e| e.error)?;
    Ok(text)
}

/// The connect-time push: `model_info.json` as one binary `checkSum` message, when it exists
/// and is readable (see [`read_model_info`]; otherwise the refusal is logged and nothing is
/// pushed). The path header names the file, not where it lives on the server.
pub(crate) async fn model_info_push(shared: &Shared) -> Option<Vec<u8>> {
    let dir = shared.config.upload_dir.clone();
    let max = shared.config.limits.max_model_info_bytes;
    let read = tokio::task::spawn_blocking(move || read_model_info(&dir, max))
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())));
    let bytes = match read {
        Ok(bytes) => bytes?,
        Err(err) => {
            tracing::warn!(err = %common::log::Escaped(&err), "model_info.json not pushed");
            return None;
        }
    };
    let headers = Headers::method(method::CHECK_SUM).with_path(MODEL_INFO);
    Some(BinaryMessage::new(headers, bytes).encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names() {
        for good in [
            "a.bin",
            "m1/weights.bin",
            "./a/b",
            "a/b/c/d/e/f/g/h",
            "model_info.json.bak",
            "m/model_info.json",
        ] {
            assert!(sanitize_upload_path(good).is_some(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./../x",
            ".hidden",
            "a/.git/config",
            "a\\b",
            "a\0b",
            "model_info.json",
            "model_info.json/x.bin",
            "./model_info.json/a",
            "a/b/c/d/e/f/g/h/i",
            ".",
        ] {
            assert!(sanitize_upload_path(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn create_json() {
        let kmb = Dialect::Kmb;
        let (spec, n) = create_spec(
            kmb,
            json!({"pipe_num": 2, "Config": {"a": 1}, "Launch": "x y"}),
        )
        .unwrap();
        assert_eq!(n, 2);
        let first: Vec<_> = spec.first.iter().map(|f| f.kind.number()).collect();
        assert_eq!(first, vec![2, 3]);
        let (spec, n) = create_spec(kmb, json!({"launch": "echo"})).unwrap();
        assert_eq!((n, spec.first.len()), (1, 1));
        assert!(create_spec(kmb, json!({"pipe_num": 0})).is_err());
        assert!(create_spec(kmb, json!({"launch": 3})).is_err());
        assert!(create_spec(kmb, json!([1])).is_err());
        let (spec, n) =
            create_spec(Dialect::Dlafs, json!({"command_create": {"pipe_num": 3}})).unwrap();
        assert_eq!((n, spec.first.len()), (3, 1));
    }

    #[test]
    fn model_info_records_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let info = update_model_info(
            dir.path(),
            Path::new("m/a.bin"),
            "900150983cd24fb0d6963f7d28e17f72",
            1 << 20,
        )
        .unwrap();
        assert!(info.contains("m/a.bin"));
    }
}
