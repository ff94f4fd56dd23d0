//! Log fields a client controls, escaped (SECURITY.md, invariant 7).
//!
//! A client sends paths, names, user names, meet-up ids, commands and certificate subjects
//! that end up in log fields. Written as they are, a newline in one of them forges a whole log
//! line and an escape sequence reaches the terminal of whoever reads the log. Two things keep
//! the `text` and `journal` formats safe (`json` escapes by itself):
//!
//! - At the call site, every client-controlled field is logged quoted and escaped: a string
//!   with `?` (`name = ?name`, or a bare `name` for a `&str`/`String`, which tracing records as
//!   a quoted string), any other [`Display`](fmt::Display) value (an error whose message embeds
//!   a path, a [`PeerIdentity`](crate::tls::PeerIdentity) whose CN comes from a certificate)
//!   with [`Escaped`]: `err = %Escaped(&err)`. Quoting also keeps a value from forging
//!   another field on the same line (`path=x identity=bob`). A value a stranger can make as
//!   long as a request allows is logged with [`Clipped`] (escaped and cut to
//!   [`MAX_FIELD_CHARS`] characters, with its length), so one request cannot buy kilobytes of
//!   log.
//! - Underneath, [`EscapingFields`] formats every field and message of the `text` and
//!   `journal` formats with control characters escaped, so a call site that slips still cannot
//!   break a line.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// A [`Display`](fmt::Display) value written as a quoted string with `"`, `\` and control
/// characters escaped the way Rust's `Debug` for `str` escapes them (`\n`, `\r`, `\t`,
/// `\u{1b}`); Unicode line separators and bidirectional controls are escaped too.
///
/// `tracing::info!(err = %Escaped(&err), "refused")` logs `err="/a\n b: not found"`, on one
/// line, whatever the error's message embeds.
#[derive(Clone, Copy)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        write!(
            Escaper {
                inner: &mut *f,
                quotes: true
            },
            "{}",
            self.0
        )?;
        f.write_char('"')
    }
}

impl<T: fmt::Display> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Characters of a value [`Clipped`] writes at most.
pub const MAX_FIELD_CHARS: usize = 256;

/// [`Escaped`], cut after [`MAX_FIELD_CHARS`] characters of the value: a longer value is
/// written as its first characters, then `…` and its whole length in bytes after the closing
/// quote (`"aaaa"…(10007 bytes)`). For fields a stranger can make as long as a request allows
/// (user names of failed logins, paths, commands, error texts embedding them), so that one
/// request cannot buy kilobytes of log.
#[derive(Clone, Copy)]
pub struct Clipped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Clipped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        let (cut, total) = {
            let mut limit = Limit {
                inner: Escaper {
                    inner: &mut *f,
                    quotes: true,
                },
                left: MAX_FIELD_CHARS,
                total: 0,
                cut: false,
            };
            write!(limit, "{}", self.0)?;
            (limit.cut, limit.total)
        };
        f.write_char('"')?;
        if cut {
            write!(f, "…({total} bytes)")?;
        }
        Ok(())
    }
}

impl<T: fmt::Display> fmt::Debug for Clipped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Passes the first `left` characters through to `inner` and counts every byte.
struct Limit<W> {
    inner: W,
    left: usize,
    total: usize,
    cut: bool,
}

impl<W: fmt::Write> fmt::Write for Limit<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.total = self.total.saturating_add(s.len());
        let end = s
            .char_indices()
            .nth(self.left)
            .map_or(s.len(), |(at, _)| at);
        if end < s.len() {
            self.cut = true;
        }
        let kept = &s[..end];
        self.left -= kept.chars().count();
        self.inner.write_str(kept)
    }
}

/// Whether `c` must not reach a log line as it is: C0 and C1 controls and DEL (newlines,
/// carriage returns, escape sequences), Unicode line and paragraph separators, and the
/// invisible format characters that reorder or hide text (bidirectional overrides, zero
/// widths, the byte order mark).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// Writes through to `inner`, escaping what [`needs_escape`]; with `quotes`, also `"` and `\`
/// (inside a quoted string).
struct Escaper<W> {
    inner: W,
    quotes: bool,
}

impl<W: fmt::Write> fmt::Write for Escaper<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (at, c) in s.char_indices() {
            let escape = needs_escape(c) || (self.quotes && matches!(c, '"' | '\\'));
            if !escape {
                continue;
            }
            self.inner.write_str(&s[start..at])?;
            start = at + c.len_utf8();
            match c {
                '\n' => self.inner.write_str("\\n")?,
                '\r' => self.inner.write_str("\\r")?,
                '\t' => self.inner.write_str("\\t")?,
                '"' => self.inner.write_str("\\\"")?,
                '\\' => self.inner.write_str("\\\\")?,
                c => write!(self.inner, "\\u{{{:x}}}", u32::from(c))?,
            }
        }
        self.inner.write_str(&s[start..])
    }
}

/// The field formatter of the `text` and `journal` log formats: like tracing-subscriber's
/// default (`message` bare, then `name=value` separated by spaces, `log.*` fields of bridged
/// `log` records left out), with every control character in a message or value escaped.
///
/// Install with `tracing_subscriber::fmt().fmt_fields(EscapingFields)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapingFields;

impl<'writer> FormatFields<'writer> for EscapingFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = FieldVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct FieldVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl FieldVisitor<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) -> fmt::Result {
        let name = field.name();
        if name.starts_with("log.") {
            return Ok(());
        }
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            if self.writer.has_ansi_escapes() {
                write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?;
            } else {
                write!(self.writer, "{name}=")?;
            }
        }
        Escaper {
            inner: &mut self.writer,
            quotes: false,
        }
        .write_fmt(value)
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = if field.name() == "message" {
                self.write(field, format_args!("{value}"))
            } else {
                self.write(field, format_args!("{value:?}"))
            };
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_ok() {
            self.result = self.write(field, format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.write(field, format_args!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expected: &str) {
        assert_eq!(Escaped(input).to_string(), expected);
    }

    #[test]
    fn escaped_quotes_and_escapes_like_debug_for_str() {
        check("plain", r#""plain""#);
        check("a\nb\rc\td", r#""a\nb\rc\td""#);
        check("\x1b[31mred", r#""\u{1b}[31mred""#);
        check("say \"hi\" \\ bye", r#""say \"hi\" \\ bye""#);
        check("\u{85}\u{9b}\u{7f}\0", r#""\u{85}\u{9b}\u{7f}\u{0}""#);
        check("evil\u{202e}txt.exe", r#""evil\u{202e}txt.exe""#);
        check("a\u{2028}b", r#""a\u{2028}b""#);
        check("café ünïcode 名前", r#""café ünïcode 名前""#);
        // Debug for str escapes newlines, quotes and ESC the same way.
        for text in ["a\nb", "q\"q", "e\x1be", "back\\slash"] {
            assert_eq!(Escaped(text).to_string(), format!("{text:?}"));
        }
    }

    #[test]
    fn clipped_cuts_long_values_and_says_how_long_they_were() {
        assert_eq!(Clipped("alice").to_string(), r#""alice""#);
        let exact = "x".repeat(MAX_FIELD_CHARS);
        assert_eq!(Clipped(&exact).to_string(), format!("\"{exact}\""));
        let long = format!("{}{}", "\n".repeat(10_000), "x");
        let out = Clipped(&long).to_string();
        assert_eq!(
            out,
            format!("\"{}\"…(10001 bytes)", "\\n".repeat(MAX_FIELD_CHARS))
        );
        // Characters, not bytes: never a cut inside one.
        let wide = "名".repeat(MAX_FIELD_CHARS + 1);
        let out = Clipped(&wide).to_string();
        assert!(out.starts_with(&format!("\"{}\"…", "名".repeat(MAX_FIELD_CHARS))));
        assert!(out.ends_with(&format!("({} bytes)", wide.len())));
        let err = std::io::Error::other(long);
        assert!(Clipped(&err).to_string().len() < 4 * MAX_FIELD_CHARS);
    }

    #[test]
    fn escaped_takes_any_display() {
        let err = std::io::Error::other("/srv/x\n2026-01-01T00:00:00Z  INFO signed");
        assert_eq!(
            format!("{}", Escaped(&err)),
            r#""/srv/x\n2026-01-01T00:00:00Z  INFO signed""#
        );
        assert_eq!(format!("{:?}", Escaped(7)), r#""7""#);
    }

    /// Formats one event with the given formatter, as the `journal` format does.
    fn journal_line(emit: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .fmt_fields(EscapingFields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    const FORGED: &str = "\n2026-01-01T00:00:00Z  INFO signed identity=\"bob\" \x1b[2J\r";

    #[test]
    fn the_formatter_keeps_every_event_on_one_line() {
        let err = std::io::Error::other(FORGED);
        let out = journal_line(|| {
            tracing::info!(path = %FORGED, name = FORGED, err = %err, "refused {}", FORGED);
            tracing::info_span!("conn", peer = %FORGED).in_scope(|| tracing::info!("inside"));
        });
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains(['\r', '\x1b']), "{out:?}");
        assert!(
            out.lines().next().unwrap().starts_with(
                r#" INFO refused \n2026-01-01T00:00:00Z  INFO signed identity="bob" \u{1b}[2J\r path=\n2026"#
            ),
            "{out}"
        );
        // A string field keeps tracing's quoting.
        assert!(
            out.contains(
                r#"name="\n2026-01-01T00:00:00Z  INFO signed identity=\"bob\" \u{1b}[2J\r""#
            ),
            "{out}"
        );
        assert!(out.contains(r#"conn{peer=\n2026"#), "{out}");
    }

    #[test]
    fn the_formatter_writes_plain_fields_like_the_default() {
        let out = journal_line(
            || tracing::warn!(count = 3, ok = true, r#type = "ssl", who = ?Some("x"), "done"),
        );
        assert_eq!(
            out,
            " WARN done count=3 ok=true type=\"ssl\" who=Some(\"x\")\n"
        );
    }
}
