//! The seven per-file fields, AIX file-name parsing, the `create_pkgsign` line format and the
//! Python-compatible JSON the original's clients print.

use serde::{Deserialize, Serialize};

/// Header line of a signatures file.
pub const HEADER: &str = "#package:fileset:vrmf:ftype:keyid:timestamp:signature";

/// What the signer says about one file, in the original's key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fields {
    /// installp package (LPP) name, e.g. `bos`.
    pub package: String,
    /// Fileset name, e.g. `bos.rte.libc`.
    pub fileset: String,
    /// Version.Release.Modification.Fix.
    pub vrmf: String,
    /// Image type (`I` install, `S` update, ...).
    pub ftype: String,
    /// The key's id.
    pub keyid: String,
    /// When it was signed (RFC 3339 UTC for the built-in signer).
    pub timestamp: String,
    /// Base64 signature, as the signer made it (Ed448: 152 characters, no `=`; a command's
    /// line: kept whole, padding included).
    pub signature: String,
}

/// Package, fileset, vrmf and ftype, from the request or the file name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Names {
    /// Package.
    #[serde(default)]
    pub package: Option<String>,
    /// Fileset.
    #[serde(default)]
    pub fileset: Option<String>,
    /// Version.Release.Modification.Fix.
    #[serde(default)]
    pub vrmf: Option<String>,
    /// Image type.
    #[serde(default)]
    pub ftype: Option<String>,
}

impl Names {
    /// Fills what is missing from the file name: `fileset.V.R.M.F[.bff|.I|.U]` gives the
    /// fileset, the vrmf, the package (the fileset's first component) and the type (`I` for
    /// `.I` and `.bff`, `S` for `.U`); any other name is the fileset, with the package the
    /// part before the first dot. Values given by the client win.
    pub fn complete(&self, file_name: &str) -> (String, String, String, String) {
        let parsed = parse_aix_name(file_name);
        let pick = |given: &Option<String>, parsed: Option<String>| {
            given
                .clone()
                .filter(|v| !v.is_empty())
                .or(parsed)
                .unwrap_or_default()
        };
        let (p_package, p_fileset, p_vrmf, p_ftype) = match parsed {
            Some((package, fileset, vrmf, ftype)) => {
                (Some(package), Some(fileset), Some(vrmf), Some(ftype))
            }
            None => {
                let package = file_name.split('.').next().map(str::to_owned);
                (package, Some(file_name.to_owned()), None, None)
            }
        };
        (
            pick(&self.package, p_package),
            pick(&self.fileset, p_fileset),
            pick(&self.vrmf, p_vrmf),
            pick(&self.ftype, p_ftype),
        )
    }

    /// Whether a value holds a character the line format cannot carry.
    pub fn invalid(&self) -> Option<&'static str> {
        for (name, value) in [
            ("package", &self.package),
            ("fileset", &self.fileset),
            ("vrmf", &self.vrmf),
            ("ftype", &self.ftype),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| v.len() > 145 || v.contains([':', '\n', '\r', '\0']))
            {
                return Some(name);
            }
        }
        None
    }
}

/// `fileset.V.R.M.F` with an optional `.bff`, `.I` or `.U`.
fn parse_aix_name(name: &str) -> Option<(String, String, String, String)> {
    let (stem, ftype) = if let Some(stem) = name.strip_suffix(".bff") {
        (stem, "I")
    } else if let Some(stem) = name.strip_suffix(".I") {
        (stem, "I")
    } else if let Some(stem) = name.strip_suffix(".U") {
        (stem, "S")
    } else {
        (name, "I")
    };
    let parts: Vec<&str> = stem.split('.').collect();
    if parts.len() < 5 {
        return None;
    }
    let (fileset, vrmf) = parts.split_at(parts.len() - 4);
    if !vrmf
        .iter()
        .all(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    if fileset.iter().any(|p| p.is_empty()) {
        return None;
    }
    let fileset = fileset.join(".");
    let package = fileset.split('.').next().unwrap_or_default().to_owned();
    Some((package, fileset, vrmf.join("."), ftype.to_owned()))
}

/// The `signatures.txt` line of a signature. The timestamp goes in its basic ISO 8601 form
/// (`20261129T091504Z`), which has no colon to break the line's fields; a `:` or line break
/// in another field (a file name can hold one) is written as `_`. The audit table keeps the
/// exact values.
pub fn line(fields: &Fields) -> String {
    let compact = time::OffsetDateTime::parse(
        &fields.timestamp,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
    .and_then(|t| {
        t.format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .ok()
    })
    .unwrap_or_else(|| fields.timestamp.clone());
    let clean = |v: &str| v.replace([':', '\n', '\r'], "_");
    format!(
        "{}:{}:{}:{}:{}:{}:{}",
        clean(&fields.package),
        clean(&fields.fileset),
        clean(&fields.vrmf),
        clean(&fields.ftype),
        clean(&fields.keyid),
        clean(&compact),
        clean(&fields.signature)
    )
}

/// Parses a `create_pkgsign` line `package:fileset:vrmf:ftype:keyid:timestamp:signature`. The
/// first five fields and the signature cannot hold a colon; the timestamp may.
pub fn parse_line(line: &str) -> Option<Fields> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut head = line.splitn(6, ':');
    let package = head.next()?.to_owned();
    let fileset = head.next()?.to_owned();
    let vrmf = head.next()?.to_owned();
    let ftype = head.next()?.to_owned();
    let keyid = head.next()?.to_owned();
    let rest = head.next()?;
    let (timestamp, signature) = rest.rsplit_once(':')?;
    if signature.is_empty() || keyid.is_empty() {
        return None;
    }
    Some(Fields {
        package,
        fileset,
        vrmf,
        ftype,
        keyid,
        timestamp: timestamp.to_owned(),
        signature: signature.to_owned(),
    })
}

/// JSON as Python's `json.dumps` writes it by default: `", "` and `": "` separators and
/// non-ASCII escaped as `\uXXXX`, so the original's clients print what they always printed.
pub fn python_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    if value.serialize(&mut serializer).is_err() {
        return String::from("{}");
    }
    String::from_utf8(out).unwrap_or_default()
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    /// Keys are separated like array values: `", "`, as `json.dumps` does.
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        Fields {
            package: "bos".into(),
            fileset: "bos.rte.libc".into(),
            vrmf: "7.3.2.1".into(),
            ftype: "I".into(),
            keyid: "0123456789abcdef".into(),
            timestamp: "2026-11-29T09:15:04Z".into(),
            signature: "AAAA==".into(),
        }
    }

    #[test]
    fn aix_names() {
        let none = Names::default();
        assert_eq!(
            none.complete("bos.rte.libc.7.3.2.1.bff"),
            (
                "bos".into(),
                "bos.rte.libc".into(),
                "7.3.2.1".into(),
                "I".into()
            )
        );
        assert_eq!(
            none.complete("X11.base.rte.7.2.0.0.U"),
            (
                "X11".into(),
                "X11.base.rte".into(),
                "7.2.0.0".into(),
                "S".into()
            )
        );
        assert_eq!(
            none.complete("notes.txt"),
            (
                "notes".into(),
                "notes.txt".into(),
                String::new(),
                String::new()
            )
        );
        let given = Names {
            vrmf: Some("1.0.0.0".into()),
            ftype: Some("S".into()),
            ..Names::default()
        };
        assert_eq!(given.complete("tool.tar").2, "1.0.0.0");
        assert_eq!(
            Names {
                package: Some("a:b".into()),
                ..Names::default()
            }
            .invalid(),
            Some("package")
        );
    }

    #[test]
    fn lines_round_trip_and_parse_colon_timestamps() {
        let line = line(&fields());
        assert_eq!(
            line,
            "bos:bos.rte.libc:7.3.2.1:I:0123456789abcdef:20261129T091504Z:AAAA=="
        );
        let parsed = parse_line(&line).unwrap();
        assert_eq!(parsed.timestamp, "20261129T091504Z");
        let colons = parse_line("bos:bos.rte:7.3.0.0:S:key1:2023-03-10 18:15:04:c2ln").unwrap();
        assert_eq!(colons.timestamp, "2023-03-10 18:15:04");
        assert_eq!(colons.signature, "c2ln");
        assert!(parse_line(HEADER).is_none());
        let mut odd = fields();
        odd.fileset = "a:b\nc".into();
        assert_eq!(parse_line(&super::line(&odd)).unwrap().fileset, "a_b_c");
        assert!(parse_line("a:b:c").is_none());
    }

    #[test]
    fn python_json_matches_json_dumps() {
        let mut map = std::collections::BTreeMap::new();
        map.insert("é.bff", fields());
        // python3 -c 'import json; print(json.dumps({"é.bff": {...}}))'
        assert_eq!(
            python_json(&map),
            r#"{"\u00e9.bff": {"package": "bos", "fileset": "bos.rte.libc", "vrmf": "7.3.2.1", "ftype": "I", "keyid": "0123456789abcdef", "timestamp": "2026-11-29T09:15:04Z", "signature": "AAAA=="}}"#
        );
        assert_eq!(python_json(&vec!["😀"]), r#"["\ud83d\ude00"]"#);
    }
}
