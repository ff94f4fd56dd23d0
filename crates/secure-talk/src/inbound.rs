//! Messages from a client as they arrive, piece by piece, with the channel's caps, the budget
//! of bytes in flight (the party's share and the global one) and the message's deadline.
//!
//! | channel, message | held in memory | cap (close 1009 past it) |
//! |---|---|---|
//! | `/data`, any | nothing (client messages there are ignored) | [`DATA_MAX_MESSAGE`] |
//! | `/`, text | the message | `max_message_bytes` |
//! | `/`, binary, until its first 0x01 | the headers JSON | `max_message_bytes` |
//! | `/`, binary, not a `model` upload | the message | `max_message_bytes` + separator and checksum |
//! | `/`, binary `model` upload | a spool buffer and the last 65 bytes | `max_message_bytes` + `max_upload_bytes` + separators and checksum |
//!
//! A message's frames announce their lengths before their bytes, so a frame that would take
//! the message past its cap closes the connection at its header, before it is read. What is
//! held in memory is charged to the party's [`Share`] of the budget; when it or the budget is
//! spent the connection is closed with 1013. Uploads are streamed to a [`Spool`] and verified
//! (MD5) before they are moved to their name.
//!
//! A message has `message_timeout_secs` from its first frame header to its end; a `model`
//! upload (and the rest of a binary message refused at its headers, which is read and
//! dropped) must instead average `min_upload_bytes_per_sec` once it is that old. Past its
//! [`Inbound::deadline`] the connection is closed with 1008, so a trickle of bytes never
//! holds a message's memory for longer.

use std::path::PathBuf;

use bytes::Bytes;
use common::envelope::talk::{Headers, MAX_CHECKSUM_LEN, Md5Stream, SEPARATOR, TalkError, method};
use common::envelope::ws::{self, Kind};
use tokio::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::admin::{self, Ctx};
use crate::budget::{Charge, Share, Spent};
use crate::config::Limits;
use crate::hub::Channel;
use crate::state::Shared;
use crate::upload::{SPOOL_BUFFER, Spool};

/// Largest message a client may send on `/data` (where its messages are ignored).
pub(crate) const DATA_MAX_MESSAGE: usize = 4 * 1024;

/// Close code for a message that did not arrive in time (policy violation).
const CLOSE_POLICY: u16 = 1008;

/// The separators and checksum around a binary message's payload.
const TRAILER: usize = 2 + MAX_CHECKSUM_LEN;

/// Bytes of an upload held back until the message ends: the last 0x01 and the checksum.
const HOLD: usize = 1 + MAX_CHECKSUM_LEN;

/// Why a connection must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over the channel's cap: 1009.
    TooBig(String),
    /// The party's share or the global budget of bytes in flight is spent: 1013.
    Busy(Spent),
    /// The message did not arrive in time (or an upload too slowly): 1008.
    TooSlow(String),
    /// A text message that is not UTF-8: 1007.
    NotUtf8,
}

impl Refusal {
    /// The close code and reason.
    pub(crate) fn close(&self) -> (u16, String) {
        match self {
            Self::TooBig(why) => (ws::CLOSE_TOO_BIG, why.clone()),
            Self::Busy(Spent::Total) => (
                ws::CLOSE_TRY_AGAIN,
                "server busy: too many bytes in flight; try again later".into(),
            ),
            Self::Busy(Spent::Share) => (
                ws::CLOSE_TRY_AGAIN,
                "server busy: too many bytes in flight from this client; try again later".into(),
            ),
            Self::TooSlow(why) => (CLOSE_POLICY, why.clone()),
            Self::NotUtf8 => (ws::CLOSE_INVALID_DATA, "text message is not UTF-8".into()),
        }
    }
}

/// A `model` upload being streamed.
#[derive(Debug)]
struct Upload {
    /// Bytes before the payload: the headers JSON and its 0x01.
    before: usize,
    spool: Spool,
    relative: PathBuf,
    md5: Md5Stream,
    /// The last bytes seen: the checksum and its separator, once the message ends.
    tail: Vec<u8>,
    _lock: admin::UploadLock,
}

#[derive(Debug)]
enum State {
    /// Nothing in progress.
    Idle,
    /// A message that is counted, not kept (the data channel).
    Ignored,
    /// A text message.
    Text(Vec<u8>),
    /// A binary message before its first 0x01.
    Headers(Vec<u8>),
    /// A binary message handled in memory (every method but `model`).
    Memory(Vec<u8>),
    /// A `model` upload.
    Upload(Box<Upload>),
    /// Refused once its headers were read: the rest is read and dropped, then these replies.
    Dropped(Vec<WsMessage>),
}

/// The message a connection is receiving.
#[derive(Debug)]
pub(crate) struct Inbound {
    channel: Channel,
    state: State,
    /// Bytes the message's frames have announced so far.
    announced: u64,
    /// When the message's first frame header came (`None`: no message in progress).
    started: Option<Instant>,
    /// Payload bytes of the message received so far.
    received: u64,
    /// Dropped before the share it is charged to.
    charge: Charge,
    _share: Share,
}

impl Inbound {
    /// Nothing received yet on `channel`; messages are charged to `share`.
    pub(crate) fn new(channel: Channel, share: Share) -> Self {
        Self {
            channel,
            state: State::Idle,
            announced: 0,
            started: None,
            received: 0,
            charge: Charge::new(&share),
            _share: share,
        }
    }

    /// When the message in progress must have ended, or (for an upload) when it falls below
    /// the minimum rate unless more bytes come; `None` when no message is in progress.
    pub(crate) fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let started = self.started?;
        let rated = matches!(self.state, State::Upload(_) | State::Dropped(_));
        let allowed = if rated {
            let rate = limits.min_upload_bytes_per_sec.max(1);
            let earned = Duration::from_millis(self.received.saturating_mul(1000) / rate);
            limits.message_timeout().max(earned)
        } else {
            limits.message_timeout()
        };
        Some(started + allowed)
    }

    /// Why the message in progress is past its [`Inbound::deadline`] at `now`, if it is.
    pub(crate) fn overdue(&self, limits: &Limits, now: Instant) -> Option<Refusal> {
        let deadline = self.deadline(limits)?;
        if now < deadline {
            return None;
        }
        Some(Refusal::TooSlow(
            if matches!(self.state, State::Upload(_) | State::Dropped(_)) {
                format!(
                    "upload slower than {} bytes/s",
                    limits.min_upload_bytes_per_sec
                )
            } else {
                format!(
                    "message not finished within {} s",
                    limits.message_timeout_secs
                )
            },
        ))
    }

    /// Abandons the message in progress and gives its bytes back (the connection is closing).
    pub(crate) fn abandon(&mut self) {
        self.state = State::Idle;
        self.started = None;
        self.charge.release();
    }

    /// The largest message the current state allows.
    fn cap(&self, shared: &Shared) -> u64 {
        let limits = &shared.config.limits;
        let cap = match (&self.state, self.channel) {
            (_, Channel::Data) => DATA_MAX_MESSAGE,
            (State::Text(_), _) => limits.max_message_bytes,
            (State::Memory(_), _) => limits.max_message_bytes.saturating_add(TRAILER),
            (State::Upload(upload), _) => upload
                .before
                .saturating_add(limits.max_upload_bytes)
                .saturating_add(HOLD),
            _ => limits
                .max_message_bytes
                .saturating_add(limits.max_upload_bytes)
                .saturating_add(TRAILER),
        };
        cap as u64
    }

    fn announce(&mut self, shared: &Shared, declared: u64) -> Result<(), Refusal> {
        self.announced = self.announced.saturating_add(declared);
        self.check(shared)
    }

    fn check(&self, shared: &Shared) -> Result<(), Refusal> {
        let cap = self.cap(shared);
        if self.announced > cap {
            return Err(Refusal::TooBig(format!("message larger than {cap} bytes")));
        }
        Ok(())
    }

    /// Holds `buf`'s capacity against the budget.
    fn cover(&mut self, bytes: usize) -> Result<(), Refusal> {
        self.charge.cover(bytes).map_err(Refusal::Busy)
    }

    /// A message begins; its first frame announces `declared` bytes.
    pub(crate) fn start(
        &mut self,
        shared: &Shared,
        kind: Kind,
        declared: u64,
    ) -> Result<(), Refusal> {
        self.announced = 0;
        self.started = Some(Instant::now());
        self.received = 0;
        self.state = match (self.channel, kind) {
            (Channel::Data, _) => State::Ignored,
            (Channel::Admin, Kind::Text) => State::Text(Vec::new()),
            (Channel::Admin, Kind::Binary) => State::Headers(Vec::new()),
        };
        self.announce(shared, declared)
    }

    /// A continuation frame announces `declared` more bytes.
    pub(crate) fn more(&mut self, shared: &Shared, declared: u64) -> Result<(), Refusal> {
        self.announce(shared, declared)
    }

    /// Payload bytes of the current message.
    pub(crate) async fn data(&mut self, ctx: &Ctx, data: Bytes) -> Result<(), Refusal> {
        let cap = usize::try_from(self.cap(&ctx.shared)).unwrap_or(usize::MAX);
        self.received = self
            .received
            .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        let held = match &mut self.state {
            State::Idle | State::Ignored | State::Dropped(_) => return Ok(()),
            State::Text(buf) | State::Memory(buf) => {
                grow(buf, &data, cap);
                buf.capacity()
            }
            State::Headers(buf) => {
                let before = buf.len();
                grow(buf, &data, cap);
                let held = buf.capacity();
                if let Some(at) = data.iter().position(|&b| b == SEPARATOR) {
                    // The state keeps the 0x01 and what follows; the headers JSON comes out.
                    let rest = buf.split_off(before + at);
                    let headers = std::mem::replace(buf, rest);
                    self.cover(held)?;
                    return self.headers_done(ctx, &headers).await;
                }
                let max = ctx.shared.config.limits.max_message_bytes;
                if buf.len() > max {
                    return Err(Refusal::TooBig(format!(
                        "binary message headers larger than {max} bytes"
                    )));
                }
                held
            }
            State::Upload(upload) => {
                upload.tail.extend_from_slice(&data);
                if let Err(reply) = spill(upload).await {
                    self.state = State::Dropped(vec![reply]);
                }
                return Ok(());
            }
        };
        self.cover(held)
    }

    /// The first 0x01 of a binary message: decide where the rest goes. `buf` (the state's)
    /// now holds the 0x01 and what came after it.
    async fn headers_done(&mut self, ctx: &Ctx, headers: &[u8]) -> Result<(), Refusal> {
        let State::Headers(rest) = std::mem::replace(&mut self.state, State::Idle) else {
            return Ok(());
        };
        let max = ctx.shared.config.limits.max_message_bytes;
        if headers.len() > max {
            return Err(Refusal::TooBig(format!(
                "binary message headers larger than {max} bytes"
            )));
        }
        let parsed = serde_json::from_slice::<serde_json::Value>(headers)
            .map_err(|e| TalkError::Json(e.to_string()))
            .and_then(|v| {
                if v.is_object() {
                    serde_json::from_value::<Headers>(v).map_err(|e| TalkError::Json(e.to_string()))
                } else {
                    Err(TalkError::NotObject)
                }
            });
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(err) => {
                self.state =
                    State::Dropped(vec![admin::text(400, format!("bad binary message: {err}"))]);
                return Ok(());
            }
        };
        if parsed.method.as_deref() != Some(method::MODEL) {
            let mut whole = Vec::with_capacity(headers.len() + rest.len());
            whole.extend_from_slice(headers);
            whole.extend_from_slice(&rest);
            let held = whole.capacity();
            self.state = State::Memory(whole);
            self.check(&ctx.shared)?;
            return self.cover(held);
        }
        match admin::begin_upload(ctx, &parsed).await {
            Ok((relative, lock, spool)) => {
                self.cover(SPOOL_BUFFER + HOLD + 1)?;
                let mut upload = Box::new(Upload {
                    before: headers.len() + 1,
                    spool,
                    relative,
                    md5: Md5Stream::default(),
                    tail: Vec::with_capacity(HOLD + 1),
                    _lock: lock,
                });
                // `rest` starts with the 0x01 after the headers.
                upload
                    .tail
                    .extend_from_slice(rest.get(1..).unwrap_or_default());
                match spill(&mut upload).await {
                    Ok(()) => self.state = State::Upload(upload),
                    Err(reply) => self.state = State::Dropped(vec![reply]),
                }
                self.check(&ctx.shared)
            }
            Err(replies) => {
                self.state = State::Dropped(replies);
                Ok(())
            }
        }
    }

    /// The message is complete: handle it and return the replies.
    pub(crate) async fn end(&mut self, ctx: &Ctx) -> Result<Vec<WsMessage>, Refusal> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.announced = 0;
        self.started = None;
        let replies = match state {
            State::Idle => Vec::new(),
            State::Ignored => {
                tracing::debug!("ignoring a message on the data channel");
                Vec::new()
            }
            State::Dropped(replies) => replies,
            State::Text(buf) => {
                let text = String::from_utf8(buf).map_err(|_| Refusal::NotUtf8)?;
                admin::on_text(ctx, Utf8Bytes::from(text)).await
            }
            State::Headers(_) => vec![admin::text(
                400,
                format!("bad binary message: {}", TalkError::Separator),
            )],
            State::Memory(buf) => admin::on_binary(ctx, Bytes::from(buf)).await,
            State::Upload(upload) => finish_upload(ctx, *upload).await,
        };
        self.charge.release();
        Ok(replies)
    }
}

/// Moves what is past the hold-back of an upload to its spool; the reply when writing fails.
async fn spill(upload: &mut Upload) -> Result<(), WsMessage> {
    if upload.tail.len() <= HOLD {
        return Ok(());
    }
    let rest = upload.tail.split_off(upload.tail.len() - HOLD);
    let payload = std::mem::replace(&mut upload.tail, rest);
    upload.md5.update(&payload);
    if let Err(err) = upload.spool.write(&payload).await {
        tracing::error!(%err, path = ?upload.relative, "writing an upload failed");
        return Err(admin::text(
            500,
            format!("cannot write {}: {err}", upload.relative.display()),
        ));
    }
    Ok(())
}

/// Appends `data`, growing `buf` by doubling but never past `cap` bytes of capacity (what is
/// held is what is charged).
fn grow(buf: &mut Vec<u8>, data: &[u8], cap: usize) {
    let needed = buf.len() + data.len();
    if needed > buf.capacity() {
        let want = needed.max(buf.capacity() * 2).min(cap.max(needed));
        buf.reserve_exact(want - buf.len());
    }
    buf.extend_from_slice(data);
}

/// The end of a streamed upload: split off the checksum, verify, move into place, record.
async fn finish_upload(ctx: &Ctx, upload: Upload) -> Vec<WsMessage> {
    let Upload {
        before: _,
        mut spool,
        relative,
        mut md5,
        tail,
        _lock,
    } = upload;
    let Some(at) = tail.iter().rposition(|&b| b == SEPARATOR) else {
        let err = if tail.len() >= HOLD {
            TalkError::ChecksumText
        } else {
            TalkError::Separator
        };
        return vec![admin::text(400, format!("bad binary message: {err}"))];
    };
    let (payload, check_sum) = (&tail[..at], &tail[at + 1..]);
    if !check_sum.iter().all(u8::is_ascii_graphic) {
        return vec![admin::text(
            400,
            format!("bad binary message: {}", TalkError::ChecksumText),
        )];
    }
    md5.update(payload);
    if let Err(err) = spool.write(payload).await {
        return vec![admin::text(
            500,
            format!("cannot write {}: {err}", relative.display()),
        )];
    }
    let computed = md5.finish();
    let sent = String::from_utf8_lossy(check_sum).into_owned();
    if !sent.eq_ignore_ascii_case(&computed) {
        return vec![admin::text(
            422,
            TalkError::ChecksumMismatch { sent, computed }.to_string(),
        )];
    }
    let size = spool.len();
    admin::finish_upload(ctx, spool, relative, size, computed).await
}
