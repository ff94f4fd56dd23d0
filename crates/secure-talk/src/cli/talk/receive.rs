//! `receive`: the data channel into files, like the original receiver, until SIGINT/SIGTERM.
//!
//! `DIR/pipe_<id>/output.txt` gets text output (type 0) appended, `errors.txt` error text
//! (type 7), `binary_<n>.bin` one file per binary message (type 6), `type_<k>.txt` anything
//! else. A dropped connection is reopened with back-off; one replaced by another data
//! connection of the same client, or closed by an administrator, ends the run.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{ClientError, Connection, Incoming, Retry};
use crate::hub::Channel;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use super::session::{Ctx, Failure};
use super::view::{self, Output};

/// Close codes after which reconnecting would be wrong.
const FINAL_CLOSES: [u16; 2] = [crate::CLOSE_REPLACED, crate::CLOSE_DISCONNECTED];

/// Receives until a signal; returns the exit status.
pub(crate) async fn run(ctx: &Ctx, dir: &Path, quiet: bool) -> Result<u8, Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|err| Failure::Io(format!("cannot create {}: {err}", dir.display())))?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|err| Failure::Io(format!("cannot handle SIGTERM: {err}")))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|err| Failure::Io(format!("cannot handle SIGINT: {err}")))?;
    let mut store = Store {
        dir: dir.to_owned(),
        next_binary: HashMap::new(),
        quiet,
        json: ctx.json,
    };
    // The first connection fails fast; later ones keep trying.
    let mut retry = ctx.retry;
    loop {
        let connecting = ctx.connect_with(Channel::Data, retry);
        let mut conn = tokio::select! {
            conn = connecting => conn?,
            _ = terminate.recv() => return Ok(0),
            _ = interrupt.recv() => return Ok(0),
        };
        retry = Retry {
            attempts: None,
            ..ctx.retry
        };
        if !quiet {
            eprintln!(
                "receiving as client {} into {}",
                conn.client_id,
                dir.display()
            );
        }
        let ended = tokio::select! {
            ended = receive(&mut conn, &mut store) => ended,
            _ = terminate.recv() => None,
            _ = interrupt.recv() => None,
        };
        let Some(ended) = ended else {
            let _ = conn.close().await;
            return Ok(0);
        };
        match (ended, &conn.closed) {
            (Err(failure), _) => return Err(failure),
            (Ok(()), Some((code, reason))) if FINAL_CLOSES.contains(code) => {
                return Err(Failure::Unavailable(format!(
                    "the server closed the data channel ({code} {reason})"
                )));
            }
            (Ok(()), closed) => {
                if !quiet {
                    match closed {
                        Some((code, reason)) => {
                            eprintln!("connection closed ({code} {reason}); reconnecting");
                        }
                        None => eprintln!("connection lost; reconnecting"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Stores messages until the connection ends (`Ok`) or a file cannot be written.
async fn receive(conn: &mut Connection, store: &mut Store) -> Option<Result<(), Failure>> {
    loop {
        match conn.recv().await {
            Ok(Some(incoming)) => {
                if let Err(failure) = store.save(&incoming) {
                    return Some(Err(failure));
                }
            }
            Err(ClientError::Protocol(err)) => {
                eprintln!("secure-talk-cli: ignoring a message: {err}")
            }
            Ok(None) | Err(_) => return Some(Ok(())),
        }
    }
}

struct Store {
    dir: PathBuf,
    next_binary: HashMap<u64, u64>,
    quiet: bool,
    json: bool,
}

impl Store {
    fn save(&mut self, incoming: &Incoming) -> Result<(), Failure> {
        let Some(Output {
            pipe_id: Some(id),
            kind,
            bytes,
            binary,
        }) = view::output(incoming)
        else {
            return Ok(());
        };
        let pipe_dir = self.dir.join(format!("pipe_{id}"));
        let io = |err: std::io::Error, path: &Path| {
            Failure::Io(format!("cannot write {}: {err}", path.display()))
        };
        std::fs::create_dir_all(&pipe_dir).map_err(|err| io(err, &pipe_dir))?;
        let path = if binary && kind == view::BINARY {
            // Never overwrite what an earlier run stored.
            let n = self.next_binary.entry(id).or_insert(0);
            loop {
                let path = pipe_dir.join(format!("binary_{n}.bin"));
                *n += 1;
                if !path.exists() {
                    break path;
                }
            }
        } else {
            pipe_dir.join(match kind {
                view::TEXT => "output.txt".to_owned(),
                view::ERROR => "errors.txt".to_owned(),
                other => format!("type_{other}.txt"),
            })
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|err| io(err, &path))?;
        file.write_all(&bytes).map_err(|err| io(err, &path))?;
        if self.json {
            println!(
                "{}",
                json!({"pipe_id": id, "type": kind, "bytes": bytes.len(), "file": path})
            );
        } else if !self.quiet {
            eprintln!(
                "pipe {id} type {kind}: {} bytes -> {}",
                bytes.len(),
                path.display()
            );
        }
        Ok(())
    }
}
