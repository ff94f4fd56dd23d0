//! The HTTP/JSON wire types, shared by the daemon and the client library.
//!
//! Every route lives under `/v1`; errors are `{"error": "...", "code": "..."}` with a
//! meaningful status. A job that exists but belongs to someone else is answered exactly like
//! one that does not exist (404), so the API never tells a caller which ids are taken.

use serde::{Deserialize, Serialize};

/// Longest job id accepted anywhere (`job_` plus 32 hex digits).
pub const JOB_ID_LEN: usize = 36;

/// Whether `id` has the shape of a job id (`job_` and 32 lowercase hex digits).
pub fn valid_job_id(id: &str) -> bool {
    id.len() == JOB_ID_LEN
        && id.starts_with("job_")
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How a job's application is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// A port plus a 4096-bit secret the client presents first (the "magic key").
    Ssh,
    /// A port plus a certificate from the broker's CA; the client authenticates with a client
    /// certificate issued to the owner.
    Ssl,
}

impl JobType {
    /// `ssh` or `ssl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ssh => "ssh",
            Self::Ssl => "ssl",
        }
    }

    /// Parses `ssh` or `ssl`, case-insensitively (as the original did).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "ssh" => Some(Self::Ssh),
            "ssl" => Some(Self::Ssl),
            _ => None,
        }
    }
}

impl std::fmt::Display for JobType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    /// `ssh` or `ssl`.
    #[serde(rename = "type")]
    pub job_type: Option<JobType>,
    /// Seconds the job lives without a heartbeat; the daemon's default when absent, capped at
    /// its `max_ttl_secs`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Free text shown by `query` (at most 200 characters), e.g. the application's name.
    #[serde(default)]
    pub label: Option<String>,
}

/// `POST /v1/jobs/{id}/verify`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The secret to compare with the job's, hex as handed out.
    pub secret: String,
}

impl std::fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerifyRequest { secret: [elided] }")
    }
}

/// The answer to a verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// Whether the secret matches (an expired job is answered 404, like a missing one).
    pub valid: bool,
}

/// A job's public facts: what `query` lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// `job_` and 32 hex digits, random.
    pub id: String,
    /// `ssh` or `ssl`.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The owner's user name.
    pub owner: String,
    /// The host the port is on (the broker's configured host name).
    pub host: String,
    /// The allocated port.
    pub port: u16,
    /// `active` or `expired` (expired jobs are reaped shortly).
    pub status: String,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339; moved forward by each heartbeat.
    pub expires: String,
    /// Seconds each heartbeat extends the job by.
    pub ttl_secs: u64,
    /// The label given at save, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Certificate material of an `ssl` job, all PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    /// The job's server certificate (SAN: the broker's host names and IPs, and localhost).
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
    /// The owner's client certificate (CN = owner).
    pub client_cert: String,
    /// Its private key (PKCS#8).
    pub client_key: String,
    /// The broker CA certificate that issued both.
    pub ca: String,
    /// Serial of the server certificate, hex.
    pub cert_serial: String,
    /// Serial of the client certificate, hex.
    pub client_serial: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_serial", &self.cert_serial)
            .field("client_serial", &self.client_serial)
            .finish_non_exhaustive()
    }
}

/// A job with its secret material: what `save` and `load` return, only to the owner.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The public facts.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// ssh mode: the 1024 hex characters of the 512-byte secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// ssl mode: the certificates and keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMaterial>,
}

impl Job {
    /// Checks an answer from a broker (local, HTTPS or a remote `broker-cli`) before its
    /// fields are used as file names or sent anywhere: a valid job id, equal to `requested`
    /// when one was asked for, and the material of its type (an ssh secret in hex).
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn check_answer(&self, requested: Option<&str>) -> Result<(), String> {
        let id = &self.summary.id;
        if !valid_job_id(id) {
            return Err(format!("{id:?} is not a job id"));
        }
        if let Some(requested) = requested {
            if id != requested {
                return Err(format!("asked for job {requested}, got {id:?}"));
            }
        }
        match self.summary.job_type {
            JobType::Ssh => match &self.secret {
                Some(secret)
                    if !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_hexdigit()) => {}
                Some(_) => return Err(format!("the secret of job {id} is not hex")),
                None => return Err(format!("job {id} came without its secret")),
            },
            JobType::Ssl => {
                if self.tls.is_none() {
                    return Err(format!("job {id} came without its certificates"));
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("summary", &self.summary)
            .field("secret", &self.secret.as_ref().map(|_| "[elided]"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    /// The caller's jobs, oldest first.
    pub jobs: Vec<JobSummary>,
}

/// `POST /v1/jobs/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The new expiry, RFC 3339.
    pub expires: String,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The user the broker acts for.
    pub user: String,
    /// `unix` (SO_PEERCRED) or `https` (client certificate).
    pub via: String,
    /// The host name jobs are registered on.
    pub host: String,
}

/// Every error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable, lower case.
    pub error: String,
    /// Stable machine-readable code: `bad_request`, `not_found`, `forbidden`, `conflict`,
    /// `too_many_requests`, `unavailable`, `internal`.
    pub code: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        assert!(valid_job_id("job_0123456789abcdef0123456789abcdef"));
        assert!(!valid_job_id("job_0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_job_id("job_8000"));
        assert!(!valid_job_id("job_0123456789abcdef0123456789abcdeg"));
        assert!(!valid_job_id("../etc/passwd"));
    }

    #[test]
    fn types_parse_case_insensitively() {
        assert_eq!(JobType::parse("SSH"), Some(JobType::Ssh));
        assert_eq!(JobType::parse("ssl"), Some(JobType::Ssl));
        assert_eq!(JobType::parse("tls"), None);
    }
}
