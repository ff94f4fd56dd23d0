//! The two IPC dialects a pipe command may speak (`ipc_dialect`), sans-IO: what a check-in
//! looks like, what the server sends a pipe at check-in, on `property` and on `destroy`, and
//! where the pipe's output goes.
//!
//! | | `kmb` (default; the README's table) | `dlafs` (the original `hddlspipes`) |
//! |---|---|---|
//! | check-in | type 1, the id in ASCII decimal | type 0, the id in ASCII decimal |
//! | pipes per create | top-level `pipe_num` | `command_create.pipe_num` |
//! | at check-in | `config` as type 2, `launch` as type 3 | the whole create JSON as type 0 |
//! | `property` | the JSON as type 4 | the JSON with `command_set_property.pipe_id` set, as type 0 |
//! | `destroy` (asked first) | `destroy` as type 5 | the destroy JSON with `command_destroy.client_id` and `.pipe_id` set, as type 0 |
//! | output → data channel | 0 text, 6 binary, 7 error text | 4 JPEG (binary), 5 text, any other type |
//! | error text → admin `pipe_message` | 7 (also to the data channel) | 6 (only to the admin channel) |
//!
//! The dialect changes none of the rules around it: a check-in still has to come on the pipe's
//! own descriptor or from the spawned process itself, and a destroy escalates to SIGTERM and
//! SIGKILL of the pipe's process group whatever the pipe does with the request.

use common::envelope::ipc::{Frame, Kind, kind};
use serde_json::{Map, Value, json};

/// How a pipe command talks on the IPC socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// The README's numbering (1 check-in, 2 config, 3 launch, 4 property, 5 destroy), as
    /// `hddl_mediapipe2` and `secure-talk-pipe` speak it.
    #[default]
    Kmb,
    /// The dlafs numbering: type 0 for the check-in and for every command, 4/5/6 for output.
    Dlafs,
}

/// What a pipe's output frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Sent to the owner's data channel.
    pub data: bool,
    /// Sent there as a binary message even when it is UTF-8 (images).
    pub binary: bool,
    /// Sent to the owner's admin channel as `pipe_message`.
    pub owner: bool,
}

/// Why a first frame is not a check-in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckInRefusal {
    /// The other dialect's check-in type.
    #[error(
        "the first ipc frame is type {kind}, a {other} check-in; this pipe command speaks {ours} (ipc_dialect)"
    )]
    OtherDialect {
        /// Its type.
        kind: u32,
        /// The dialect whose check-in it looks like.
        other: &'static str,
        /// Ours.
        ours: &'static str,
    },
    /// Another type, or a payload that is not a pipe id.
    #[error("the first ipc frame is not a check-in (type {kind}, payload not a pipe id)")]
    NotCheckIn {
        /// Its type.
        kind: u32,
    },
}

impl Dialect {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kmb => "kmb",
            Self::Dlafs => "dlafs",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Kmb => Self::Dlafs,
            Self::Dlafs => Self::Kmb,
        }
    }

    fn check_in_kind(self) -> u32 {
        match self {
            Self::Kmb => kind::PIPE_ID,
            Self::Dlafs => kind::TEXT,
        }
    }

    /// The pipe id a first frame checks in with.
    ///
    /// # Errors
    /// Not this dialect's check-in type, or a payload that is not a decimal id.
    pub fn check_in_id(self, frame: &Frame) -> Result<u64, CheckInRefusal> {
        let number = frame.kind.number();
        let id = std::str::from_utf8(&frame.payload)
            .ok()
            .map(|s| s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\0'))
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok());
        match id {
            Some(id) if number == self.check_in_kind() => Ok(id),
            Some(_) if number == self.other().check_in_kind() => {
                Err(CheckInRefusal::OtherDialect {
                    kind: number,
                    other: self.other().name(),
                    ours: self.name(),
                })
            }
            _ => Err(CheckInRefusal::NotCheckIn { kind: number }),
        }
    }

    /// How many pipes a create request asks for (1 when it does not say).
    ///
    /// # Errors
    /// A count that is not a positive integer.
    pub fn pipe_count(self, create: &Value) -> Result<usize, String> {
        let (found, name) = match self {
            Self::Kmb => (create.get("pipe_num"), "pipe_num"),
            Self::Dlafs => (
                create.get("command_create").and_then(|c| c.get("pipe_num")),
                "command_create.pipe_num",
            ),
        };
        match found {
            None | Some(Value::Null) => Ok(1),
            Some(n) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{name} must be a positive integer")),
        }
    }

    /// The frames a pipe gets right after its check-in.
    ///
    /// # Errors
    /// A KMB `launch` that is not a string.
    pub fn first_frames(self, create: &Value) -> Result<Vec<Frame>, String> {
        match self {
            Self::Dlafs => Ok(vec![Frame::new(Kind::Text, create.to_string())]),
            Self::Kmb => {
                let mut frames = Vec::new();
                match create.get("config").or_else(|| create.get("Config")) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => frames.push(Frame::new(Kind::Config, s.clone())),
                    Some(other) => frames.push(Frame::new(Kind::Config, other.to_string())),
                }
                match create.get("launch").or_else(|| create.get("Launch")) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => frames.push(Frame::new(Kind::Launch, s.clone())),
                    Some(_) => return Err("launch must be a string".into()),
                }
                Ok(frames)
            }
        }
    }

    /// A `property` for pipe `pipe`: the frame, and the JSON it carries.
    ///
    /// # Errors
    /// A dlafs property without a `command_set_property` object.
    pub fn property(self, pipe: u64, mut json: Value) -> Result<(Frame, Value), String> {
        match self {
            Self::Kmb => Ok((Frame::new(Kind::Property, json.to_string()), json)),
            Self::Dlafs => {
                let Some(inner) = json
                    .get_mut("command_set_property")
                    .and_then(Value::as_object_mut)
                else {
                    return Err(
                        "a dlafs property needs a command_set_property object (ipc_dialect dlafs)"
                            .into(),
                    );
                };
                inner.insert("pipe_id".into(), Value::from(pipe));
                Ok((Frame::new(Kind::Text, json.to_string()), json))
            }
        }
    }

    /// The request to stop that a checked-in pipe gets first; `request` is the payload of the
    /// owner's `destroy` (`None` when the server stops the pipe itself).
    pub fn destroy(self, pipe: u64, client: u64, request: Option<&Value>) -> Frame {
        match self {
            Self::Kmb => Frame::new(Kind::Destroy, "destroy"),
            Self::Dlafs => {
                let mut json = match request {
                    Some(Value::Object(object)) => Value::Object(object.clone()),
                    _ => json!({"command_type": 1}),
                };
                let object = json.as_object_mut().map(|o| {
                    o.entry("command_destroy")
                        .or_insert_with(|| Value::Object(Map::new()))
                });
                if let Some(slot) = object {
                    if !slot.is_object() {
                        *slot = Value::Object(Map::new());
                    }
                    if let Some(inner) = slot.as_object_mut() {
                        inner.insert("client_id".into(), Value::from(client));
                        inner.insert("pipe_id".into(), Value::from(pipe));
                    }
                }
                Frame::new(Kind::Text, json.to_string())
            }
        }
    }

    /// Where an output frame of type `number` goes.
    pub fn route(self, number: u32) -> Route {
        match (self, number) {
            (Self::Kmb, kind::BINARY) => Route {
                data: true,
                binary: true,
                owner: false,
            },
            (Self::Kmb, kind::ERROR) => Route {
                data: true,
                binary: false,
                owner: true,
            },
            (Self::Dlafs, 4) => Route {
                data: true,
                binary: true,
                owner: false,
            },
            (Self::Dlafs, 6) => Route {
                data: false,
                binary: false,
                owner: true,
            },
            _ => Route {
                data: true,
                binary: false,
                owner: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_ins() {
        let kmb = Dialect::Kmb;
        let dlafs = Dialect::Dlafs;
        assert_eq!(kmb.check_in_id(&Frame::new(Kind::PipeId, "12")), Ok(12));
        assert_eq!(kmb.check_in_id(&Frame::new(Kind::PipeId, " 7\n\0")), Ok(7));
        assert_eq!(dlafs.check_in_id(&Frame::new(Kind::Text, "3")), Ok(3));
        // Each refuses the other's check-in, and says so.
        let refused = kmb.check_in_id(&Frame::new(Kind::Text, "3")).unwrap_err();
        assert!(
            refused.to_string().contains("a dlafs check-in"),
            "{refused}"
        );
        let refused = dlafs
            .check_in_id(&Frame::new(Kind::PipeId, "3"))
            .unwrap_err();
        assert!(refused.to_string().contains("a kmb check-in"), "{refused}");
        for (dialect, frame) in [
            (kmb, Frame::new(Kind::PipeId, "x")),
            (kmb, Frame::new(Kind::PipeId, "-1")),
            (kmb, Frame::new(Kind::PipeId, "+1")),
            (kmb, Frame::new(Kind::PipeId, "")),
            (dlafs, Frame::new(Kind::Text, "{\"a\":1}")),
            (dlafs, Frame::new(4u32, "1")),
        ] {
            assert!(
                matches!(
                    dialect.check_in_id(&frame),
                    Err(CheckInRefusal::NotCheckIn { .. })
                ),
                "{dialect:?} {frame:?}"
            );
        }
    }

    #[test]
    fn creates() {
        let create = json!({"pipe_num": 3, "command_create": {"pipe_num": 2}, "Config": {"a": 1}, "Launch": "x y"});
        assert_eq!(Dialect::Kmb.pipe_count(&create), Ok(3));
        assert_eq!(Dialect::Dlafs.pipe_count(&create), Ok(2));
        assert_eq!(Dialect::Dlafs.pipe_count(&json!({})), Ok(1));
        assert!(
            Dialect::Dlafs
                .pipe_count(&json!({"command_create": {"pipe_num": 0}}))
                .is_err()
        );
        let kinds = |frames: Vec<Frame>| {
            frames
                .iter()
                .map(|f| {
                    (
                        f.kind.number(),
                        String::from_utf8_lossy(&f.payload).into_owned(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(Dialect::Kmb.first_frames(&create).unwrap()),
            vec![(2, "{\"a\":1}".into()), (3, "x y".into())]
        );
        assert_eq!(
            kinds(Dialect::Dlafs.first_frames(&create).unwrap()),
            vec![(0, create.to_string())]
        );
        assert!(Dialect::Kmb.first_frames(&json!({"launch": 3})).is_err());
    }

    #[test]
    fn properties_and_destroys() {
        let property = json!({"command_type": 2, "command_set_property": {"pipe_id": 9, "x": 1}});
        let (frame, sent) = Dialect::Dlafs.property(4, property.clone()).unwrap();
        assert_eq!(frame.kind.number(), 0);
        assert_eq!(sent["command_set_property"], json!({"pipe_id": 4, "x": 1}));
        assert_eq!(frame.payload, sent.to_string().into_bytes());
        assert!(Dialect::Dlafs.property(4, json!({"x": 1})).is_err());
        let (frame, sent) = Dialect::Kmb.property(4, property.clone()).unwrap();
        assert_eq!((frame.kind.number(), sent), (4, property));

        let frame = Dialect::Kmb.destroy(4, 1, None);
        assert_eq!(
            (frame.kind.number(), &frame.payload[..]),
            (5, &b"destroy"[..])
        );
        let frame = Dialect::Dlafs.destroy(
            4,
            7,
            Some(&json!({"command_type": 1, "command_destroy": {"pipe_id": 3}})),
        );
        let sent: Value = serde_json::from_slice(&frame.payload).unwrap();
        assert_eq!(frame.kind.number(), 0);
        assert_eq!(
            sent,
            json!({"command_type": 1, "command_destroy": {"pipe_id": 4, "client_id": 7}})
        );
        let frame = Dialect::Dlafs.destroy(4, 7, Some(&json!("x")));
        let sent: Value = serde_json::from_slice(&frame.payload).unwrap();
        assert_eq!(
            sent["command_destroy"],
            json!({"pipe_id": 4, "client_id": 7})
        );
    }

    #[test]
    fn routes() {
        let r = |d: Dialect, n| {
            let r = d.route(n);
            (r.data, r.binary, r.owner)
        };
        assert_eq!(r(Dialect::Kmb, 0), (true, false, false));
        assert_eq!(r(Dialect::Kmb, 6), (true, true, false));
        assert_eq!(r(Dialect::Kmb, 7), (true, false, true));
        assert_eq!(r(Dialect::Dlafs, 4), (true, true, false));
        assert_eq!(r(Dialect::Dlafs, 5), (true, false, false));
        assert_eq!(r(Dialect::Dlafs, 6), (false, false, true));
        assert_eq!(r(Dialect::Dlafs, 0), (true, false, false));
    }
}
