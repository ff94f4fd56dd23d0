//! The broker's API bodies (`broker::api`, parsed by `broker::server::parse_json` on the
//! daemon's side and by serde in the client) and broker-run's gate key line
//! (`broker::gate::key_line`).

use broker::api::{
    ErrorBody, HeartbeatResponse, Job, JobList, JobType, SaveRequest, VerifyRequest,
    VerifyResponse, WhoAmI, valid_job_id,
};
use broker::gate::{KeyLine, MAX_KEY_LINE, key_line, plausible_key};
use broker::server::parse_json;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A body through every request and answer type, and as the bytes a gate reads first.
pub fn broker(data: &[u8]) {
    // What the daemon parses.
    if let Ok(save) = parse_json::<SaveRequest>(data) {
        let again: SaveRequest = round_trip_value(&save);
        assert_eq!(again.job_type, save.job_type);
        assert_eq!(again.ttl_secs, save.ttl_secs);
        assert_eq!(again.label, save.label);
    }
    if let Ok(verify) = parse_json::<VerifyRequest>(data) {
        let again: VerifyRequest = round_trip_value(&verify);
        assert_eq!(again.secret, verify.secret);
    }
    // What the client parses.
    if let Ok(job) = serde_json::from_slice::<Job>(data) {
        assert_eq!(round_trip_value::<Job>(&job), job);
        if job.check_answer(None).is_ok() {
            assert!(valid_job_id(&job.summary.id));
        }
    }
    round_trip::<JobList>(data);
    round_trip::<ErrorBody>(data);
    round_trip::<WhoAmI>(data);
    round_trip::<HeartbeatResponse>(data);
    round_trip::<VerifyResponse>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if valid_job_id(text) {
            assert!(text.len() == 36 && text.is_ascii());
        }
        if let Some(kind) = JobType::parse(text) {
            assert!(kind.as_str().eq_ignore_ascii_case(text));
        }
    }
    gate(data);
}

fn round_trip_value<T: Serialize + DeserializeOwned>(value: &T) -> T {
    let json = serde_json::to_vec(value).expect("serialises");
    serde_json::from_slice(&json).expect("what was parsed parses again")
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        assert_eq!(round_trip_value(&value), value);
    }
}

/// The key line read as the gate reads it, in pieces of the size the first byte says: the
/// verdict on what has arrived agrees with the verdict on the whole stream.
fn gate(data: &[u8]) {
    let whole = key_line(data);
    if let KeyLine::Complete { key, rest } = whole {
        assert!(key.len() < MAX_KEY_LINE && !key.contains(&b'\n'));
        assert!(data.ends_with(rest));
        let _ = plausible_key(key);
    }
    let Some(&piece) = data.first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut end = 0;
    let verdict = loop {
        end = (end + piece).min(data.len());
        match key_line(&data[..end]) {
            KeyLine::Incomplete if end < data.len() => {}
            verdict => break verdict,
        }
    };
    match (verdict, whole) {
        (KeyLine::Complete { key, rest }, KeyLine::Complete { key: k, rest: r }) => {
            assert_eq!(key, k);
            assert!(r.starts_with(rest));
        }
        (KeyLine::TooLong, KeyLine::TooLong) | (KeyLine::Incomplete, KeyLine::Incomplete) => {}
        (verdict, whole) => panic!("in pieces {verdict:?}, whole {whole:?}"),
    }
}
