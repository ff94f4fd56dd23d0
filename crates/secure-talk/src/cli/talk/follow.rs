//! `create --follow`: create pipes and stream their output until they are all gone.
//!
//! The data channel is opened before the create, so no output can miss it. Pipe output and
//! `pipe_delete` travel on different websockets, so once every pipe is gone the data channel
//! is drained until it has been quiet for a moment.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::time::Duration;

use crate::client::{ClientError, Incoming};
use crate::hub::Channel;
use common::envelope::talk::{Headers, Message, method};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use super::session::{Ctx, Failure, closed, created, lost};
use super::view::{self, Output};

/// How long the data channel must stay quiet after the last `pipe_delete`.
const QUIET: Duration = Duration::from_millis(300);
/// Longest drain after the last `pipe_delete`.
const DRAIN: Duration = Duration::from_secs(3);
/// Exit status after a second interrupt.
const INTERRUPTED: u8 = 130;

/// Creates the pipes, streams their output, and returns the exit status.
pub(crate) async fn run(ctx: &Ctx, create: Value, count: usize) -> Result<u8, Failure> {
    let mut interrupts = signal(SignalKind::interrupt())
        .map_err(|err| Failure::Io(format!("cannot handle SIGINT: {err}")))?;
    let mut data = ctx.connect(Channel::Data).await?;
    let mut admin = ctx.connect(Channel::Admin).await?;
    admin
        .send(&Message::new(Headers::method(method::CREATE), create))
        .await
        .map_err(|err| lost(&err))?;
    let (ids, refused) = created(&mut admin, count, ctx.wait()).await?;
    if ids.is_empty() {
        return Err(refused.unwrap_or_else(|| Failure::Unavailable("no pipe was created".into())));
    }
    if let Some(failure) = refused {
        eprintln!("secure-talk-cli: {failure}");
    }
    if ctx.json {
        println!("{}", json!({ "created": ids }));
    } else {
        for id in &ids {
            eprintln!("[pipe {id} created]");
        }
    }
    let mut follow = Follow {
        ids: ids.iter().copied().collect(),
        statuses: BTreeMap::new(),
        json: ctx.json,
    };
    let mut live = follow.ids.clone();
    let mut interrupted = false;
    while !live.is_empty() {
        tokio::select! {
            incoming = admin.recv() => match incoming {
                Ok(Some(Incoming::Message(message))) => match message.method() {
                    method::PIPE_DELETE => {
                        for id in view::deleted_ids(&message) {
                            live.remove(&id);
                        }
                    }
                    method::PIPE_MESSAGE => {
                        // The same text comes on the data channel; only its status counts here.
                        if let Some(id) = message.headers.pipe_id.filter(|id| follow.ids.contains(id)) {
                            if let Some(status) = view::exit_status(view::payload_text(&message).as_bytes()) {
                                follow.statuses.insert(id, status);
                            }
                        }
                    }
                    _ => {}
                },
                Ok(Some(Incoming::Binary(_))) | Err(ClientError::Protocol(_)) => {}
                Ok(None) => return Err(closed(&admin)),
                Err(err) => return Err(lost(&err)),
            },
            incoming = data.recv() => match incoming {
                Ok(Some(incoming)) => follow.emit(&incoming)?,
                Err(ClientError::Protocol(_)) => {}
                Ok(None) => return Err(closed(&data)),
                Err(err) => return Err(lost(&err)),
            },
            _ = interrupts.recv() => {
                if interrupted {
                    return Ok(INTERRUPTED);
                }
                interrupted = true;
                eprintln!("[interrupted: destroying the pipes; interrupt again to leave them running]");
                for id in &live {
                    let destroy = Message::new(Headers::method(method::DESTROY).with_pipe_id(*id), Value::Null);
                    admin.send(&destroy).await.map_err(|err| lost(&err))?;
                }
            }
        }
    }
    let drain = async {
        while let Ok(Ok(Some(incoming))) = tokio::time::timeout(QUIET, data.recv()).await {
            follow.emit(&incoming)?;
        }
        Ok::<(), Failure>(())
    };
    if let Ok(result) = tokio::time::timeout(DRAIN, drain).await {
        result?;
    }
    let _ = data.close().await;
    let _ = admin.close().await;
    if interrupted {
        return Ok(INTERRUPTED);
    }
    // One pipe: its status. Several: the first failure, in id order.
    Ok(follow
        .ids
        .iter()
        .filter_map(|id| follow.statuses.get(id).copied())
        .find(|status| *status != 0)
        .unwrap_or(0))
}

struct Follow {
    ids: BTreeSet<u64>,
    statuses: BTreeMap<u64, u8>,
    json: bool,
}

impl Follow {
    /// Writes one data-channel message of the followed pipes.
    fn emit(&mut self, incoming: &Incoming) -> Result<(), Failure> {
        let Some(output) = view::output(incoming) else {
            return Ok(());
        };
        let Some(id) = output.pipe_id.filter(|id| self.ids.contains(id)) else {
            return Ok(());
        };
        let status = (output.kind == view::ERROR)
            .then(|| view::exit_status(&output.bytes))
            .flatten();
        if let Some(status) = status {
            self.statuses.insert(id, status);
        }
        let result = if self.json {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{}", view::output_json(&output)).and_then(|()| stdout.flush())
        } else {
            write_raw(&output, status.is_some())
        };
        result.map_err(|err| Failure::Io(format!("cannot write the output: {err}")))
    }
}

/// Text and binary output to stdout, error text to stderr; a status line gets its newline.
fn write_raw(output: &Output, status_line: bool) -> std::io::Result<()> {
    let newline = status_line && !output.bytes.ends_with(b"\n");
    if output.kind == view::ERROR {
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(&output.bytes)?;
        if newline {
            stderr.write_all(b"\n")?;
        }
        stderr.flush()
    } else {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&output.bytes)?;
        stdout.flush()
    }
}
