//! The original protocol's answer, taken apart: no I/O here, bytes in, an [`Reply`] out.
//!
//! The server answers three messages with no framing (the original's clients relied on one
//! TLS record per message): the listing, the per-file JSON object, and
//! `\nSignatures written to: FILE\n`. We read to the end and split on content instead: the
//! JSON object starts at a line beginning with `{` that parses as a whole object and is
//! followed by the "Signatures written to" line, so a listed name that starts with `{` does
//! not fool us.

use crate::fields::Fields;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What ends the JSON object.
const TRAILER: &[u8] = b"\nSignatures written to: ";

/// One file's entry in the JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Entry {
    /// Signed: the seven fields.
    Signed(Fields),
    /// Not signed, and why.
    Failed {
        /// The server's reason.
        error: String,
    },
}

/// Name → entry, in the server's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Files(pub(crate) Vec<(String, Entry)>);

impl Serialize for Files {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, entry) in &self.0 {
            map.serialize_entry(name, entry)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Files {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Files;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of file name -> signature fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Files, A::Error> {
                let mut files = Vec::new();
                while let Some(entry) = map.next_entry::<String, Entry>()? {
                    files.push(entry);
                }
                Ok(Files(files))
            }
        }
        deserializer.deserialize_map(Ordered)
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Answer {
    /// The path as the server echoed it.
    pub(crate) path: String,
    /// Whether it was a directory (`List of files in`) or a file (`File to be signed`).
    pub(crate) directory: bool,
    /// The directory's entries, one per line of the first message.
    pub(crate) listing: Vec<String>,
    /// The per-file fields.
    pub(crate) files: Files,
    /// Where the server wrote the signature lines.
    pub(crate) signatures_file: Option<String>,
    /// The third message, as sent (it may carry a "Not signed" line after the first).
    pub(crate) trailer: String,
    /// The first message, as sent.
    #[serde(skip)]
    pub(crate) first: String,
}

/// What the server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `Refused: <why>`.
    Refused(String),
    /// The three messages.
    Answer(Answer),
}

/// Whether a refusal is about permission (the certificate may not sign there) rather than
/// about the request (no such file, not absolute, ...). The original protocol carries no
/// status code, so this reads the server's wording.
pub(crate) fn is_permission(reason: &str) -> bool {
    reason.contains("outside the directories") || reason.contains("may not sign")
}

/// Splits and parses the whole answer.
///
/// # Errors
/// The bytes are not a refusal and hold no JSON object followed by the "Signatures written
/// to" line.
pub(crate) fn parse(data: &[u8]) -> Result<Reply, String> {
    if let Some(reason) = data.strip_prefix(b"Refused: ") {
        return Ok(Reply::Refused(
            String::from_utf8_lossy(reason).trim_end().to_owned(),
        ));
    }
    if data.is_empty() {
        return Err("the server closed the connection without answering".into());
    }
    let (start, end, files) = find_json(data).ok_or_else(|| {
        let shown: String = String::from_utf8_lossy(&data[..data.len().min(200)]).into_owned();
        format!("the answer is not the original protocol's three messages: {shown:?}")
    })?;
    let first = String::from_utf8_lossy(&data[..start]).into_owned();
    let trailer = String::from_utf8_lossy(&data[end..]).into_owned();
    let mut lines = first.lines();
    let header = lines.next().unwrap_or_default();
    let (path, directory) = if let Some(path) = header
        .strip_prefix("List of files in ")
        .and_then(|rest| rest.strip_suffix(':'))
    {
        (path.to_owned(), true)
    } else if let Some(path) = header.strip_prefix("File to be signed: ") {
        (path.to_owned(), false)
    } else {
        (String::new(), false)
    };
    let listing = if directory {
        lines.map(str::to_owned).collect()
    } else {
        Vec::new()
    };
    let signatures_file = trailer
        .lines()
        .find_map(|line| line.strip_prefix("Signatures written to: "))
        .map(str::to_owned);
    Ok(Reply::Answer(Answer {
        path,
        directory,
        listing,
        files,
        signatures_file,
        trailer,
        first,
    }))
}

/// The JSON object: its start, its end, its content. Candidates are the line starts that hold
/// `{`; the first whose object is followed by the trailer wins, else the first that parses.
fn find_json(data: &[u8]) -> Option<(usize, usize, Files)> {
    let mut fallback = None;
    let candidates = (1..data.len()).filter(|&i| data[i] == b'{' && data[i - 1] == b'\n');
    for start in candidates {
        let mut stream = serde_json::Deserializer::from_slice(&data[start..]).into_iter::<Files>();
        let Some(Ok(files)) = stream.next() else {
            continue;
        };
        let end = start + stream.byte_offset();
        if data[end..].starts_with(TRAILER) {
            return Some((start, end, files));
        }
        fallback.get_or_insert((start, end, files));
    }
    fallback
}

/// The seed's rendering: the listing, a blank line, `NAME: {json}` per file, the
/// "Signatures written to" message, `Disconnected from HOST`.
pub(crate) fn render(answer: &Answer, host: &str) -> String {
    let mut out = answer.first.clone();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
    for (name, entry) in &answer.files.0 {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(&crate::fields::python_json(entry));
        out.push('\n');
    }
    out.push_str(&answer.trailer);
    if !answer.trailer.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("Disconnected from ");
    out.push_str(host);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &str = r#"{"package": "bos", "fileset": "bos.rte", "vrmf": "7.3.0.0", "ftype": "I", "keyid": "0123456789abcdef", "timestamp": "2026-01-01T00:00:00Z", "signature": "AAAA"}"#;

    fn answer(listing: &str, json: &str, trailer: &str) -> Vec<u8> {
        format!("{listing}{json}{trailer}").into_bytes()
    }

    #[test]
    fn splits_the_three_messages() {
        let data = answer(
            "List of files in /srv/pkgs:\na.bff\n{odd\nsub\n",
            &format!(r#"{{"a.bff": {FIELDS}, "{{odd": {{"error": "unreadable"}}}}"#),
            "\nSignatures written to: /var/lib/signing-server/signatures.txt\n",
        );
        let Reply::Answer(answer) = parse(&data).unwrap() else {
            panic!("not an answer")
        };
        assert_eq!(answer.path, "/srv/pkgs");
        assert!(answer.directory);
        assert_eq!(answer.listing, ["a.bff", "{odd", "sub"]);
        assert_eq!(answer.files.0.len(), 2);
        assert_eq!(answer.files.0[0].0, "a.bff");
        assert!(matches!(&answer.files.0[1].1, Entry::Failed { error } if error == "unreadable"));
        assert_eq!(
            answer.signatures_file.as_deref(),
            Some("/var/lib/signing-server/signatures.txt")
        );
        let text = render(&answer, "host1");
        assert_eq!(
            text,
            format!(
                "List of files in /srv/pkgs:\na.bff\n{{odd\nsub\n\na.bff: {FIELDS}\n{{odd: {{\"error\": \"unreadable\"}}\n\nSignatures written to: /var/lib/signing-server/signatures.txt\nDisconnected from host1\n"
            )
        );
    }

    #[test]
    fn a_listed_name_that_is_json_does_not_fool_it() {
        let data = answer(
            "List of files in /p:\n{}\n",
            "{}",
            "\nSignatures written to: s.txt\n",
        );
        let Reply::Answer(answer) = parse(&data).unwrap() else {
            panic!("not an answer")
        };
        assert_eq!(answer.listing, ["{}"]);
        assert!(answer.files.0.is_empty());
    }

    #[test]
    fn single_file_refusals_and_garbage() {
        let data = answer(
            "File to be signed: /p/a.bff\n",
            &format!(r#"{{"a.bff": {FIELDS}}}"#),
            "\nSignatures written to: s.txt\nNot signed (more than max_files_per_request files): x\n",
        );
        let Reply::Answer(answer) = parse(&data).unwrap() else {
            panic!("not an answer")
        };
        assert!(!answer.directory);
        assert_eq!(answer.path, "/p/a.bff");
        assert!(answer.listing.is_empty());
        assert!(answer.trailer.contains("Not signed"));
        assert_eq!(
            parse(b"Refused: /etc is outside the directories this certificate may sign\n").unwrap(),
            Reply::Refused("/etc is outside the directories this certificate may sign".into())
        );
        assert!(is_permission(
            "/etc is outside the directories this certificate may sign"
        ));
        assert!(!is_permission("/p/x: no such file or directory"));
        assert!(parse(b"").is_err());
        assert!(parse(b"List of files in /p:\na\n").is_err());
    }
}
