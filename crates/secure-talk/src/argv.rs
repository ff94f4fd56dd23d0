//! The pipe program's argument template (`pipe_args`) and its placeholders, sans-IO.
//!
//! | placeholder | becomes |
//! |---|---|
//! | `{id}` | the pipe id |
//! | `{ipc_socket}` | the IPC socket path |
//! | `{ipc_fd}` | the number of the pipe's own IPC descriptor |
//! | `{create.a.b}` | the create request's member `a.b` (a dotted path into its objects) |
//!
//! A placeholder is `{` + a name of `[A-Za-z0-9_.]` + `}`; other braces are literal text. An
//! unknown name is refused when the configuration is read ([`Template::parse`]). A `create`
//! value must be a non-negative integer that fits in 64 bits (written as plain decimal: a
//! float, a negative number, an exponent or a larger integer is refused), or a string of 1 to [`MAX_VALUE_LEN`] characters from
//! `[A-Za-z0-9._-]` that does not start with `-` (it would read as an option) or `.` (a path
//! step such as `..`). Anything else, a missing member included, refuses the create before
//! any process is spawned ([`Template::bind`]): an argument is never empty or made up. The
//! arguments go to `execve` as they are, never through a shell.

use serde_json::Value;

/// Longest string a `{create.…}` placeholder takes.
pub const MAX_VALUE_LEN: usize = 128;

/// One piece of an argument.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Id,
    IpcSocket,
    IpcFd,
    /// A member of the create request: the dotted path, split.
    Create(Vec<String>),
}

/// A parsed argument template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    args: Vec<Vec<Piece>>,
}

/// The template with the create request's values filled in; only the pipe's own values
/// (`{id}`, `{ipc_socket}`, `{ipc_fd}`) are left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    args: Vec<Vec<Piece>>,
}

/// A template that names an unknown placeholder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pipe_args: unknown placeholder {{{0}}} (known: {{id}}, {{ipc_socket}}, {{ipc_fd}}, {{create.FIELD}})"
)]
pub struct UnknownPlaceholder(pub String);

/// Why a create request cannot fill the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The member is absent (or `null`).
    #[error("the create request has no {0} (pipe_args placeholder {{create.{0}}})")]
    Missing(String),
    /// The member is not a non-negative 64-bit integer or a safe string.
    #[error(
        "create.{0} must be an integer from 0 to 18446744073709551615 (no sign, fraction or exponent) or a string of 1 to 128 characters from [A-Za-z0-9._-] not starting with - or . (pipe_args placeholder {{create.{0}}})"
    )]
    Unsafe(String),
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
}

impl Template {
    /// Parses `pipe_args`.
    ///
    /// # Errors
    /// A placeholder with an unknown name, or a `{create.…}` path with an empty part.
    pub fn parse(args: &[String]) -> Result<Self, UnknownPlaceholder> {
        args.iter()
            .map(|arg| parse_arg(arg))
            .collect::<Result<_, _>>()
            .map(|args| Self { args })
    }

    /// Fills in the create request's values.
    ///
    /// # Errors
    /// A member that is missing, or not a number or a safe string.
    pub fn bind(&self, create: &Value) -> Result<Bound, BindError> {
        let args = self
            .args
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|piece| match piece {
                        Piece::Create(path) => create_value(create, path).map(Piece::Text),
                        other => Ok(other.clone()),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        Ok(Bound { args })
    }
}

impl Bound {
    /// The argument list of pipe `id`.
    pub fn arguments(&self, id: u64, ipc_socket: &str, ipc_fd: i32) -> Vec<String> {
        self.args
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|piece| match piece {
                        Piece::Text(text) => text.clone(),
                        Piece::Id => id.to_string(),
                        Piece::IpcSocket => ipc_socket.to_owned(),
                        Piece::IpcFd => ipc_fd.to_string(),
                        // `bind` replaced every one.
                        Piece::Create(_) => String::new(),
                    })
                    .collect()
            })
            .collect()
    }
}

fn parse_arg(arg: &str) -> Result<Vec<Piece>, UnknownPlaceholder> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after.bytes().take_while(|b| is_name_byte(*b)).count();
        if name_len == 0 || after.as_bytes().get(name_len) != Some(&b'}') {
            // Not a placeholder: the brace is text.
            text.push_str(&rest[..=open]);
            rest = after;
            continue;
        }
        text.push_str(&rest[..open]);
        let name = &after[..name_len];
        let piece = match name {
            "id" => Piece::Id,
            "ipc_socket" => Piece::IpcSocket,
            "ipc_fd" => Piece::IpcFd,
            _ => match name.strip_prefix("create.") {
                Some(path) if path.split('.').all(|part| !part.is_empty()) => {
                    Piece::Create(path.split('.').map(str::to_owned).collect())
                }
                _ => return Err(UnknownPlaceholder(name.to_owned())),
            },
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(piece);
        rest = &after[name_len + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn create_value(create: &Value, path: &[String]) -> Result<String, BindError> {
    let dotted = || path.join(".");
    let mut value = create;
    for part in path {
        value = match value.get(part.as_str()) {
            Some(found) => found,
            None => return Err(BindError::Missing(dotted())),
        };
    }
    match value {
        Value::Null => Err(BindError::Missing(dotted())),
        // Only what reads back as the number itself: a larger integer would be rounded to a
        // float (`1.8446744073709552e+19`), a negative one would read as an option.
        Value::Number(n) => n
            .as_u64()
            .map(|n| n.to_string())
            .ok_or_else(|| BindError::Unsafe(dotted())),
        Value::String(s) if safe(s) => Ok(s.clone()),
        _ => Err(BindError::Unsafe(dotted())),
    }
}

fn safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_VALUE_LEN
        && !s.starts_with(['-', '.'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template(args: &[&str]) -> Result<Template, UnknownPlaceholder> {
        Template::parse(&args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn the_pipes_own_values() {
        let t = template(&[
            "-i",
            "{id}",
            "-u",
            "{ipc_socket}",
            "x{id}y",
            "--fd={ipc_fd}",
        ])
        .unwrap();
        let args = t
            .bind(&json!({}))
            .unwrap()
            .arguments(12, "/run/st/ipc.sock", 3);
        assert_eq!(
            args,
            vec!["-i", "12", "-u", "/run/st/ipc.sock", "x12y", "--fd=3"]
        );
    }

    #[test]
    fn braces_that_are_not_placeholders_are_text() {
        let t = template(&["{\"a\":1}", "{}", "{", "a}b", "{ id}", ""]).unwrap();
        let args = t.bind(&json!({})).unwrap().arguments(1, "s", 3);
        assert_eq!(args, vec!["{\"a\":1}", "{}", "{", "a}b", "{ id}", ""]);
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        for (arg, name) in [
            ("{ID}", "ID"),
            ("-l{loop_times}", "loop_times"),
            ("{create}", "create"),
            ("{create.}", "create."),
            ("{create.a..b}", "create.a..b"),
            ("{ipc_socket.x}", "ipc_socket.x"),
        ] {
            assert_eq!(
                template(&["-i", arg]).unwrap_err(),
                UnknownPlaceholder(name.into()),
                "{arg}"
            );
        }
        assert!(
            UnknownPlaceholder("x".into())
                .to_string()
                .contains("unknown placeholder {x}")
        );
    }

    #[test]
    fn create_values() {
        let t = template(&[
            "-l",
            "{create.command_create.loop_times}",
            "m={create.model}",
        ])
        .unwrap();
        let create = json!({"command_create": {"loop_times": 100}, "model": "yolo_v1.tiny-2"});
        assert_eq!(
            t.bind(&create).unwrap().arguments(0, "s", 3),
            vec!["-l", "100", "m=yolo_v1.tiny-2"]
        );
        let largest = json!({"command_create": {"loop_times": u64::MAX}, "model": "m"});
        assert_eq!(
            t.bind(&largest).unwrap().arguments(0, "s", 3)[1],
            "18446744073709551615"
        );
        let zero = json!({"command_create": {"loop_times": 0}, "model": "m"});
        assert_eq!(t.bind(&zero).unwrap().arguments(0, "s", 3)[1], "0");
    }

    #[test]
    fn numbers_other_than_plain_u64_are_refused() {
        let t = template(&["-l", "{create.n}"]).unwrap();
        // As a client writes them: parsed from the request's text.
        for bad in [
            "18446744073709551616",
            "-1",
            "-0",
            "-9223372036854775808",
            "-1.5",
            "1.5",
            "1.0",
            "1e3",
            "1E3",
            "0e0",
        ] {
            let create: Value =
                serde_json::from_str(&format!("{{\"n\": {bad}}}")).expect("valid JSON");
            let err = t.bind(&create).unwrap_err();
            assert_eq!(err, BindError::Unsafe("n".into()), "{bad}");
            assert!(err.to_string().contains("integer from 0"), "{err}");
        }
    }

    #[test]
    fn create_values_that_are_refused() {
        let t = template(&["-l", "{create.a.b}"]).unwrap();
        for missing in [
            json!({}),
            json!({"a": {}}),
            json!({"a": {"b": null}}),
            json!({"a": 3}),
        ] {
            assert_eq!(
                t.bind(&missing).unwrap_err(),
                BindError::Missing("a.b".into()),
                "{missing}"
            );
        }
        for bad in [
            json!(""),
            json!("a b"),
            json!("a/b"),
            json!("$(id)"),
            json!("-rf"),
            json!(".."),
            json!("é"),
            json!(true),
            json!([1]),
            json!({"x": 1}),
            json!("x".repeat(MAX_VALUE_LEN + 1)),
        ] {
            assert_eq!(
                t.bind(&json!({"a": {"b": bad}})).unwrap_err(),
                BindError::Unsafe("a.b".into()),
                "{bad}"
            );
        }
        let longest = "x".repeat(MAX_VALUE_LEN);
        assert!(t.bind(&json!({"a": {"b": longest}})).is_ok());
    }
}
