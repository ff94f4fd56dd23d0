//! `model_info.json`, sans-IO: the two shapes it comes in, and recording an upload in the
//! shape the file already has.
//!
//! - **flat** (ours): `{"<relative path>": "<md5>", ...}`;
//! - **nested** (the original's): `{"<model>": {"model_file": {"<file>": "<md5>"},
//!   "has_model": "Yes"}, ...}`, where `<model>` is the upload's directory name and `<file>`
//!   its file name (the original kept one file per parent of the model directories).
//!
//! A file keeps its shape: an upload into a nested file is recorded nested (written compact,
//! as the original wrote it), into a flat one flat (pretty-printed); an empty or new file is
//! flat. A file that is neither (not a JSON object, or a mix of the two) is not rewritten:
//! the upload is refused until the operator fixes it.

use serde_json::{Map, Value};

/// The shape of a `model_info.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Relative path → MD5.
    Flat,
    /// Model → `{"model_file": {file → MD5}, "has_model": "Yes"}`.
    Nested,
}

/// Why an upload cannot be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelInfoError {
    /// The file is not one of the two shapes.
    #[error(
        "model_info.json is neither a map of path to MD5 nor the original's nested shape; fix or remove it"
    )]
    Unknown,
    /// A nested file records `<model>/<file>` names only.
    #[error(
        "model_info.json has the original's nested shape, which records MODEL/FILE names: upload {0:?} as MODEL/FILE"
    )]
    NotModelFile(String),
}

/// Reads a file's text (`None`: no file yet) into its entries and shape.
///
/// # Errors
/// Not a JSON object of one of the two shapes.
pub fn parse(bytes: Option<&[u8]>) -> Result<(Map<String, Value>, Shape), ModelInfoError> {
    let Some(bytes) = bytes else {
        return Ok((Map::new(), Shape::Flat));
    };
    let Ok(Value::Object(info)) = serde_json::from_slice::<Value>(bytes) else {
        return Err(ModelInfoError::Unknown);
    };
    let shape = shape(&info)?;
    Ok((info, shape))
}

fn shape(info: &Map<String, Value>) -> Result<Shape, ModelInfoError> {
    if info.values().all(Value::is_string) {
        Ok(Shape::Flat)
    } else if info
        .values()
        .all(|v| v.get("model_file").is_some_and(Value::is_object))
    {
        Ok(Shape::Nested)
    } else {
        Err(ModelInfoError::Unknown)
    }
}

/// The `(model, file)` a relative upload name is recorded under in a nested file: its last
/// directory and its file name.
fn model_and_file(relative: &str) -> Result<(&str, &str), ModelInfoError> {
    let mut parts = relative.rsplit('/');
    match (parts.next(), parts.next()) {
        (Some(file), Some(model)) if !file.is_empty() && !model.is_empty() => Ok((model, file)),
        _ => Err(ModelInfoError::NotModelFile(relative.to_owned())),
    }
}

/// Checks that `relative` can be recorded in a file of `shape`.
///
/// # Errors
/// A nested file and a name without a directory.
pub fn check(shape: Shape, relative: &str) -> Result<(), ModelInfoError> {
    match shape {
        Shape::Flat => Ok(()),
        Shape::Nested => model_and_file(relative).map(|_| ()),
    }
}

/// Records `relative → md5` in the entries of a file of `shape`.
///
/// # Errors
/// As [`check`].
pub fn record(
    info: &mut Map<String, Value>,
    shape: Shape,
    relative: &str,
    md5: &str,
) -> Result<(), ModelInfoError> {
    match shape {
        Shape::Flat => {
            info.insert(relative.to_owned(), Value::String(md5.to_owned()));
        }
        Shape::Nested => {
            let (model, file) = model_and_file(relative)?;
            let entry = info
                .entry(model.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(entry) = entry.as_object_mut() {
                let files = entry
                    .entry("model_file")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(files) = files.as_object_mut() {
                    files.insert(file.to_owned(), Value::String(md5.to_owned()));
                }
                entry.insert("has_model".into(), Value::from("Yes"));
            }
        }
    }
    Ok(())
}

/// The file's text in its shape.
pub fn render(info: Map<String, Value>, shape: Shape) -> String {
    let info = Value::Object(info);
    match shape {
        Shape::Flat => serde_json::to_string_pretty(&info),
        Shape::Nested => serde_json::to_string(&info),
    }
    .unwrap_or_default()
}

/// The MD5 a file of either shape records for `relative` (`<model>/<file>` for the nested one).
pub fn checksum_of<'a>(info: &'a Value, relative: &str) -> Option<&'a str> {
    if let Some(flat) = info.get(relative).and_then(Value::as_str) {
        return Some(flat);
    }
    let (model, file) = model_and_file(relative).ok()?;
    info.get(model)?.get("model_file")?.get(file)?.as_str()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const A: &str = "900150983cd24fb0d6963f7d28e17f72";
    const B: &str = "5d41402abc4b2a76b9719d911017c592";

    fn bytes(value: &Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    #[test]
    fn a_new_or_empty_file_is_flat() {
        for found in [None, Some(&b"{}"[..]), Some(&b" {\n}\n"[..])] {
            let (mut info, shape) = parse(found).unwrap();
            assert_eq!(shape, Shape::Flat);
            record(&mut info, shape, "m/a.bin", A).unwrap();
            let text = render(info, shape);
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, json!({"m/a.bin": A}));
        }
    }

    #[test]
    fn a_flat_file_stays_flat() {
        let (mut info, shape) = parse(Some(&bytes(&json!({"x": B})))).unwrap();
        assert_eq!(shape, Shape::Flat);
        record(&mut info, shape, "a.bin", A).unwrap();
        assert_eq!(Value::Object(info), json!({"x": B, "a.bin": A}));
    }

    #[test]
    fn the_originals_nested_file_stays_nested() {
        let original = json!({
            "yolov1tiny": {"model_file": {"yolov1tiny.xml": B}, "has_model": "Yes"},
            "empty": {"model_file": {}, "has_model": "No"}
        });
        let (mut info, shape) = parse(Some(&bytes(&original))).unwrap();
        assert_eq!(shape, Shape::Nested);
        record(&mut info, shape, "yolov1tiny/yolov1tiny.bin", A).unwrap();
        record(&mut info, shape, "models/empty/e.bin", B).unwrap();
        record(&mut info, shape, "new/n.bin", A).unwrap();
        let text = render(info, shape);
        assert!(!text.contains('\n'), "compact, as the original writes it");
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back,
            json!({
                "yolov1tiny": {"model_file": {"yolov1tiny.xml": B, "yolov1tiny.bin": A}, "has_model": "Yes"},
                "empty": {"model_file": {"e.bin": B}, "has_model": "Yes"},
                "new": {"model_file": {"n.bin": A}, "has_model": "Yes"}
            })
        );
        assert_eq!(checksum_of(&back, "yolov1tiny/yolov1tiny.xml"), Some(B));
        assert_eq!(checksum_of(&back, "new/n.bin"), Some(A));
        assert_eq!(checksum_of(&back, "new/x.bin"), None);
        // A name without a model directory cannot be recorded there.
        let (mut info, shape) = parse(Some(&bytes(&original))).unwrap();
        assert_eq!(
            check(shape, "top.bin"),
            Err(ModelInfoError::NotModelFile("top.bin".into()))
        );
        assert!(record(&mut info, shape, "top.bin", A).is_err());
    }

    #[test]
    fn anything_else_is_not_rewritten() {
        for bad in [
            json!({"a": B, "m": {"model_file": {}}}),
            json!({"m": {"has_model": "Yes"}}),
            json!([1]),
            json!({"a": 1}),
        ] {
            assert_eq!(
                parse(Some(&bytes(&bad))).unwrap_err(),
                ModelInfoError::Unknown,
                "{bad}"
            );
        }
        assert_eq!(
            parse(Some(b"{not json")).unwrap_err(),
            ModelInfoError::Unknown
        );
    }

    #[test]
    fn checksums_of_a_flat_file() {
        let info = json!({"m/a.bin": A});
        assert_eq!(checksum_of(&info, "m/a.bin"), Some(A));
        assert_eq!(checksum_of(&info, "m/b.bin"), None);
        assert_eq!(checksum_of(&Value::Null, "m/b.bin"), None);
    }
}
