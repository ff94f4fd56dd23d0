//! Reading messages and rendering them: reply text, the `list` table, model information,
//! data-channel output.

use std::fmt::Write as _;

use crate::client::Incoming;
use base64::Engine as _;
use common::envelope::talk::{Message, method};
use serde_json::{Value, json};

/// The payload member of the echo requests used as barriers.
pub(crate) const SYNC_KEY: &str = "secure_talk_cli_sync";
/// IPC type of a pipe's text output.
pub(crate) const TEXT: u32 = 0;
/// IPC type of a pipe's binary output.
pub(crate) const BINARY: u32 = 6;
/// IPC type of a pipe's error text.
pub(crate) const ERROR: u32 = 7;

/// A message's payload as text: strings as they are, other JSON serialised.
pub(crate) fn payload_text(message: &Message) -> String {
    match &message.payload {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The nonce of an echoed barrier request.
pub(crate) fn sync_nonce(message: &Message) -> Option<u64> {
    if message.method() != method::TEXT || message.headers.code.is_some() {
        return None;
    }
    message.payload.as_ref()?.get(SYNC_KEY)?.as_u64()
}

/// The ids in a `pipe_id` or `pipe_delete` payload.
pub(crate) fn deleted_ids(message: &Message) -> Vec<u64> {
    match &message.payload {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).collect(),
        Some(Value::Number(id)) => id.as_u64().into_iter().collect(),
        _ => Vec::new(),
    }
}

/// The model information a `checkSum` message carries: a binary message with the file, or a
/// JSON message whose payload is the file's text (or the object itself).
pub(crate) fn model_info(incoming: &Incoming) -> Option<Value> {
    match incoming {
        Incoming::Binary(binary) if binary.headers.method.as_deref() == Some(method::CHECK_SUM) => {
            serde_json::from_slice(&binary.payload).ok()
        }
        Incoming::Message(message) if message.method() == method::CHECK_SUM => {
            match message.payload.as_ref()? {
                Value::String(text) => serde_json::from_str(text).ok(),
                other => Some(other.clone()),
            }
        }
        _ => None,
    }
}

/// Pretty JSON.
pub(crate) fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Any message as JSON (binary payloads in base64).
pub(crate) fn incoming_json(incoming: &Incoming) -> Value {
    match incoming {
        Incoming::Message(message) => serde_json::to_value(message).unwrap_or(Value::Null),
        Incoming::Binary(binary) => json!({
            "headers": binary.headers,
            "payload": base64::engine::general_purpose::STANDARD.encode(&binary.payload),
            "encoding": "base64",
            "checkSum": binary.check_sum,
        }),
    }
}

/// A piece of a pipe's output from the data channel.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) pipe_id: Option<u64>,
    /// IPC type: 0 text, 6 binary, 7 error text.
    pub(crate) kind: u32,
    pub(crate) bytes: Vec<u8>,
    /// It came as a binary message.
    pub(crate) binary: bool,
}

/// A data-channel message as pipe output.
pub(crate) fn output(incoming: &Incoming) -> Option<Output> {
    match incoming {
        Incoming::Message(message) => {
            let bytes = match &message.payload {
                Some(Value::String(text)) => text.clone().into_bytes(),
                Some(Value::Null) | None => Vec::new(),
                Some(other) => other.to_string().into_bytes(),
            };
            Some(Output {
                pipe_id: message.headers.pipe_id,
                kind: message.headers.kind?,
                bytes,
                binary: false,
            })
        }
        Incoming::Binary(binary) => Some(Output {
            pipe_id: binary.headers.pipe_id,
            kind: binary.headers.kind.unwrap_or(BINARY),
            bytes: binary.payload.to_vec(),
            binary: true,
        }),
    }
}

/// Output as a JSON line: text as text, other bytes in base64.
pub(crate) fn output_json(output: &Output) -> Value {
    match std::str::from_utf8(&output.bytes) {
        Ok(text) if !output.binary => {
            json!({"pipe_id": output.pipe_id, "type": output.kind, "payload": text})
        }
        _ => json!({
            "pipe_id": output.pipe_id,
            "type": output.kind,
            "payload": base64::engine::general_purpose::STANDARD.encode(&output.bytes),
            "encoding": "base64",
        }),
    }
}

/// The exit status a pipe reports in its error text: "command exited with status N", 128+S
/// for "command killed by signal S", and 127 or 126 (as a shell) for "cannot run PROGRAM: ..."
/// (not found, or not executable).
pub(crate) fn exit_status(text: &[u8]) -> Option<u8> {
    let text = String::from_utf8_lossy(text);
    text.lines().find_map(|line| {
        let line = line.trim();
        if let Some(code) = line.strip_prefix("command exited with status ") {
            let code: i64 = code.parse().ok()?;
            return Some(u8::try_from(code).unwrap_or(1));
        }
        if line.starts_with("cannot run ") {
            return Some(if line.contains("No such file") {
                127
            } else {
                126
            });
        }
        let signal: u8 = line
            .strip_prefix("command killed by signal ")?
            .parse()
            .ok()?;
        Some(128u8.saturating_add(signal))
    })
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn yes(value: &Value) -> &'static str {
    if value.as_bool().unwrap_or(false) {
        "yes"
    } else {
        "no"
    }
}

fn ids(value: &Value) -> String {
    let ids: Vec<String> = value
        .as_array()
        .map(|ids| ids.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        "-".into()
    } else {
        ids.join(",")
    }
}

fn age(created: u64, now: u64) -> String {
    let secs = now.saturating_sub(created);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `list` payload as two tables, clients then pipes.
pub(crate) fn list_table(payload: &Value, now: u64) -> String {
    let me = payload["client_id"].as_u64();
    let mut clients = vec![
        ["CLIENT", "ADMIN", "DATA", "IDENTITY", "PIPES"]
            .map(String::from)
            .to_vec(),
    ];
    for client in payload["clients"].as_array().into_iter().flatten() {
        let id = client["client_id"].as_u64();
        let mut name = client["client_id"].to_string();
        if id.is_some() && id == me {
            name.push_str(" (you)");
        }
        clients.push(vec![
            name,
            yes(&client["admin_connected"]).into(),
            yes(&client["data_connected"]).into(),
            client["identity"].as_str().unwrap_or("-").into(),
            ids(&client["pipes"]),
        ]);
    }
    let mut pipes = vec![
        ["PIPE", "OWNER", "PID", "CHECKED-IN", "AGE", "LAUNCH"]
            .map(String::from)
            .to_vec(),
    ];
    for pipe in payload["pipes"].as_array().into_iter().flatten() {
        let create = &pipe["create"];
        let launch = create
            .get("launch")
            .or_else(|| create.get("Launch"))
            .and_then(Value::as_str)
            .unwrap_or("-");
        pipes.push(vec![
            pipe["pipe_id"].to_string(),
            pipe["owner"].to_string(),
            pipe["pid"]
                .as_u64()
                .map_or_else(|| "-".into(), |p| p.to_string()),
            yes(&pipe["checked_in"]).into(),
            pipe["created"]
                .as_u64()
                .map_or_else(|| "-".into(), |c| age(c, now)),
            launch.into(),
        ]);
    }
    let mut out = table(&clients);
    out.push('\n');
    if pipes.len() == 1 {
        out.push_str("no pipes\n");
    } else {
        out.push_str(&table(&pipes));
    }
    out
}

/// A spinner with the upload's size, on stderr when it is a terminal.
pub(crate) fn upload_progress(name: &str, size: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes}/{total_bytes} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(format!("{name}: sending"));
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(b"command exited with status 3"), Some(3));
        assert_eq!(exit_status(b"x\ncommand exited with status 1\n"), Some(1));
        assert_eq!(exit_status(b"command killed by signal 9"), Some(137));
        assert_eq!(exit_status(b"command exited with status x"), None);
        assert_eq!(exit_status(b"err"), None);
        assert_eq!(
            exit_status(b"cannot run nope: No such file or directory (os error 2)"),
            Some(127)
        );
    }

    #[test]
    fn list_tables() {
        let payload = json!({
            "client_id": 7,
            "clients": [{"client_id": 7, "admin_connected": true, "data_connected": false,
                         "identity": null, "pipes": [0, 1]}],
            "pipes": [{"pipe_id": 0, "owner": 7, "pid": 42, "checked_in": true,
                       "created": 100, "create": {"launch": "sleep 9"}, "property": null}],
        });
        let text = list_table(&payload, 190);
        assert!(
            text.contains("7 (you)  yes    no    -         0,1"),
            "{text}"
        );
        assert!(
            text.contains("0     7      42   yes         1m   sleep 9"),
            "{text}"
        );
    }
}
