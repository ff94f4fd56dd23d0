//! What the API does, independent of transport: save, load, verify, query, heartbeat, delete
//! and the reaper, each acting for a [`Caller`] and refusing anything of another user's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore as _;
use rand::rngs::OsRng;
use subtle::ConstantTimeEq as _;

use crate::api::{Job, JobSummary, JobType, SaveRequest, TlsMaterial, valid_job_id};
use crate::ca::BrokerCa;
use crate::config::Config;
use crate::identity::{Caller, UserNames};
use crate::metrics::{Metrics, Verify};
use crate::store::{AuditRecord, JobRow, Store};
use crate::tally::{self, Tally};
use common::metrics::Reason;

/// Bytes of an ssh-mode secret (4096 bits, as the original).
pub const SECRET_BYTES: usize = 512;
/// Longest label accepted.
pub const MAX_LABEL: usize = 200;
/// Random ports tried before falling back to a scan of the free ones.
const RANDOM_TRIES: usize = 32;

/// What a request can fail with; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such job, or not the caller's, or expired.
    #[error("no such job")]
    NotFound,
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 409: e.g. no free port.
    #[error("{0}")]
    Conflict(String),
    /// 429.
    #[error("{0}")]
    TooMany(String),
    /// 503: the store failed.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for BrokerError {
    fn from(err: crate::store::StoreError) -> Self {
        tracing::error!(error = %err, "store failed");
        Self::Unavailable("the job store is unavailable".into())
    }
}

impl From<crate::ca::CaError> for BrokerError {
    fn from(err: crate::ca::CaError) -> Self {
        tracing::error!(error = %err, "CA failed");
        Self::Internal("issuing certificates failed".into())
    }
}

/// The broker's state, shared by every connection.
#[derive(Debug)]
pub struct Broker {
    config: Arc<Config>,
    store: Store,
    ca: BrokerCa,
    names: UserNames,
    failures: Mutex<HashMap<String, (Instant, u32)>>,
    /// Refusals counted per caller and job per `audit_interval`.
    tally: Mutex<Tally>,
    /// What `/metrics` exports.
    metrics: Arc<Metrics>,
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// RFC 3339 of Unix seconds.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Whether nothing on this host listens on `port` (IPv4 and, where there is one, IPv6).
pub fn port_free(port: u16) -> bool {
    if std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).is_err() {
        return false;
    }
    match std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        // No IPv6 on this host: nothing can listen there either.
        Err(err) => {
            matches!(
                err.kind(),
                std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
            ) || err.raw_os_error() == Some(97)
        } // EAFNOSUPPORT
    }
}

impl Broker {
    /// Opens the store and the CA.
    ///
    /// # Errors
    /// The store or the CA cannot be opened.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use std::os::unix::fs::DirBuilderExt as _;
        if !config.state_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.state_dir)
                .with_context(|| format!("creating {}", config.state_dir.display()))?;
        }
        let store = Store::open(&config)
            .await
            .with_context(|| format!("opening the store {}", redact_url(&config.database)))?;
        let ca = BrokerCa::load_or_create(&config.state_dir, &config.host)?;
        Ok(Self {
            store,
            ca,
            names: UserNames::default(),
            failures: Mutex::new(HashMap::new()),
            tally: Mutex::new(Tally::new(config.audit_interval)),
            metrics: Arc::new(Metrics::new()),
            config: Arc::new(config),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics the API records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store (tests read the audit table through it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The same broker resolving uids with `names` (tests inject a user database).
    #[must_use]
    pub fn with_user_names(mut self, names: UserNames) -> Self {
        self.names = names;
        self
    }

    /// The caller behind a socket peer's uid.
    ///
    /// # Errors
    /// The user database failed (503): never another identity.
    pub async fn unix_caller(&self, uid: u32) -> Result<Caller, BrokerError> {
        let user = self
            .names
            .name(uid)
            .await
            .map_err(|err| BrokerError::Unavailable(err.to_string()))?;
        Ok(Caller {
            user,
            uid: Some(uid),
            via: "unix",
        })
    }

    /// The broker CA certificate.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The current CRL.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn crl_pem(&self) -> Result<String, BrokerError> {
        let revoked = self.store.revoked_serials().await?;
        Ok(self.ca.crl_pem(revoked)?)
    }

    fn cert_lifetime_secs(&self) -> i64 {
        i64::from(self.config.cert_days) * 86_400
    }

    /// Registers a job for `caller`.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn save(&self, caller: &Caller, request: SaveRequest) -> Result<Job, BrokerError> {
        let job_type = request
            .job_type
            .ok_or_else(|| BrokerError::BadRequest("usage: save (ssh/ssl)".into()))?;
        let ttl = match request.ttl_secs {
            None => self.config.default_ttl,
            Some(0) => return Err(BrokerError::BadRequest("ttl_secs must be positive".into())),
            Some(secs) if Duration::from_secs(secs) > self.config.max_ttl => {
                return Err(BrokerError::BadRequest(format!(
                    "ttl_secs {secs} is above this broker's limit of {}",
                    self.config.max_ttl.as_secs()
                )));
            }
            Some(secs) => Duration::from_secs(secs),
        };
        let label = request.label.filter(|l| !l.is_empty());
        if let Some(label) = &label {
            if label.chars().count() > MAX_LABEL || label.chars().any(char::is_control) {
                return Err(BrokerError::BadRequest(format!(
                    "label must be at most {MAX_LABEL} printable characters"
                )));
            }
        }
        let now = unix_now();
        let live = self
            .store
            .count_live(&caller.user, now, i64::from(self.config.max_jobs_per_user))
            .await?;
        if live >= i64::from(self.config.max_jobs_per_user) {
            self.metrics.shared.refused(Reason::LIMITS);
            return Err(BrokerError::TooMany(format!(
                "{} holds {live} jobs, the most this broker allows; delete some first",
                caller.user
            )));
        }
        let id = format!("job_{}", random_hex(16));
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let mut row = JobRow {
            id: id.clone(),
            owner: caller.user.clone(),
            owner_uid: caller.uid,
            job_type: job_type.as_str().into(),
            host: self.config.host.clone(),
            port: 0,
            secret: None,
            cert_pem: None,
            key_pem: None,
            client_cert_pem: None,
            client_key_pem: None,
            ca_pem: None,
            cert_serial: None,
            client_serial: None,
            label,
            created_at: now,
            expires_at: now.saturating_add(ttl_secs),
            ttl_secs,
        };
        match job_type {
            JobType::Ssh => row.secret = Some(random_hex(SECRET_BYTES)),
            JobType::Ssl => {
                let certs = self.ca.issue_job(
                    &id,
                    &caller.user,
                    &self.config.cert_sans,
                    self.config.cert_days,
                )?;
                row.cert_pem = Some(certs.server.cert_pem);
                row.key_pem = Some(certs.server.key_pem);
                row.client_cert_pem = Some(certs.client.cert_pem);
                row.client_key_pem = Some(certs.client.key_pem);
                row.ca_pem = Some(self.ca.cert_pem().to_owned());
                row.cert_serial = Some(certs.server.serial_hex);
                row.client_serial = Some(certs.client.serial_hex);
            }
        }
        let range = self.config.ports.clone();
        let span = u32::from(range.end() - range.start()) + 1;
        let mut tried = std::collections::HashSet::new();
        // Random ports first; when the range is crowded, a scan of what the store says is
        // free, from a random point. Either way the store's unique (host, port) decides.
        let random = (0..RANDOM_TRIES)
            .map(|_| range.start() + u16::try_from(OsRng.next_u32() % span).unwrap_or(0))
            .filter(|port| tried.insert(*port))
            .collect::<Vec<_>>();
        for port in random {
            if self.claim(caller, &mut row, port).await? {
                return Ok(self.to_job(&row, true));
            }
        }
        let used = self.store.used_ports(&self.config.host).await?;
        let offset = OsRng.next_u32() % span;
        for step in 0..span {
            let port = range.start() + u16::try_from((offset + step) % span).unwrap_or(0);
            if used.contains(&port) || tried.contains(&port) {
                continue;
            }
            if self.claim(caller, &mut row, port).await? {
                return Ok(self.to_job(&row, true));
            }
        }
        self.audit_repeatable(caller, "save", None, "no_port")
            .await?;
        Err(BrokerError::Conflict(format!(
            "no free port in {}-{}",
            range.start(),
            range.end()
        )))
    }

    /// Tries to register `row` on `port`: false when something listens there or another job
    /// holds it.
    async fn claim(
        &self,
        caller: &Caller,
        row: &mut JobRow,
        port: u16,
    ) -> Result<bool, BrokerError> {
        if !port_free(port) {
            return Ok(false);
        }
        row.port = port;
        let audit = AuditRecord {
            caller,
            action: "save",
            job_id: Some(&row.id),
            result: "ok",
            detail: Some(format!(
                "type {} port {port} ttl {}",
                row.job_type, row.ttl_secs
            )),
        };
        Ok(self.store.insert_job(row, &audit).await?)
    }

    /// The caller's live job `id`, or NotFound (also for someone else's job).
    async fn owned(
        &self,
        caller: &Caller,
        id: &str,
        action: &'static str,
    ) -> Result<JobRow, BrokerError> {
        if !valid_job_id(id) {
            return Err(BrokerError::BadRequest(format!("{id:?} is not a job id")));
        }
        let row = self.store.job(id).await?;
        let result = match &row {
            None => "not_found",
            Some(row) if row.owner != caller.user => "refused_not_owner",
            Some(row) if row.expires_at < unix_now() => "expired",
            Some(_) => "ok",
        };
        match row {
            Some(row) if result == "ok" => Ok(row),
            _ => {
                if result == "refused_not_owner" {
                    self.metrics.shared.refused(Reason::AUTHORIZATION);
                    tracing::warn!(user = ?caller.user, via = caller.via, job = id, action, "refused: not the owner");
                }
                self.audit_repeatable(caller, action, Some(id), result)
                    .await?;
                Err(BrokerError::NotFound)
            }
        }
    }

    /// The caller's job with its secret material.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn load(&self, caller: &Caller, id: &str) -> Result<Job, BrokerError> {
        let row = self.owned(caller, id, "load").await?;
        // Repeatable at will and changing nothing: counted, like a refusal.
        self.audit_repeatable(caller, "load", Some(id), "ok")
            .await?;
        Ok(self.to_job(&row, true))
    }

    /// Whether `secret` is the caller's job's secret.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn verify(
        &self,
        caller: &Caller,
        id: &str,
        secret: &str,
    ) -> Result<bool, BrokerError> {
        let row = self.owned(caller, id, "verify").await?;
        let Some(stored) = &row.secret else {
            return Err(BrokerError::BadRequest(
                "an ssl job has no secret; its clients authenticate with certificates".into(),
            ));
        };
        // The right secret always passes: counting only failures, and comparing first,
        // means nobody can lock the owner out by sending wrong keys to their gate.
        let valid: bool = stored.as_bytes().ct_eq(secret.as_bytes()).into();
        let limit = self.config.max_failed_verifies_per_minute;
        if !valid && limit > 0 {
            if self.rate_limited(id, limit) {
                self.metrics.verified(Verify::rate_limited);
                self.metrics.shared.refused(Reason::RATE_LIMIT);
                self.audit_repeatable(caller, "verify", Some(id), "rate_limited")
                    .await?;
                return Err(BrokerError::TooMany(
                    "too many failed verifications of this job; wait a minute".into(),
                ));
            }
            self.record_failure(id);
        }
        if !valid {
            self.metrics.verified(Verify::invalid);
            // Strangers at the owner's gate decide how often this happens: counted per job
            // per interval, not a row each.
            self.audit_repeatable(caller, "verify", Some(id), "invalid")
                .await?;
            return Ok(false);
        }
        self.metrics.verified(Verify::valid);
        self.audit_repeatable(caller, "verify", Some(id), "valid")
            .await?;
        Ok(true)
    }

    /// Records an outcome the caller can repeat at will (a refusal, or a load or verify of
    /// their own job, which changes nothing) through the tally: the first of an interval at
    /// once, the rest as one counted row when the interval ends. A `not_found` is counted
    /// without its id (the caller invents those), the others per job.
    async fn audit_repeatable(
        &self,
        caller: &Caller,
        action: &'static str,
        id: Option<&str>,
        result: &'static str,
    ) -> Result<(), BrokerError> {
        let key = tally::Key {
            job_id: id.filter(|_| result != "not_found").map(str::to_owned),
            action,
            result,
            user: caller.user.clone(),
            uid: caller.uid,
            via: caller.via,
        };
        let noted = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .note(key, id, crate::store::now_ms());
        for row in noted.closed.iter().chain(&noted.first) {
            self.write_tallied(row).await?;
        }
        Ok(())
    }

    async fn write_tallied(&self, row: &tally::Row) -> Result<(), BrokerError> {
        let caller = Caller {
            user: row.key.user.clone(),
            uid: row.key.uid,
            via: row.key.via,
        };
        let detail = (row.count > 1 || row.first_ms != row.at_ms).then(|| {
            format!(
                "{} attempts from {} to {}",
                row.count,
                rfc3339(row.first_ms / 1000),
                rfc3339(row.at_ms / 1000)
            )
        });
        let record = AuditRecord {
            caller: &caller,
            action: row.key.action,
            job_id: row.job_id.as_deref(),
            result: row.key.result,
            detail,
        };
        self.store
            .audit_counted(&record, row.at_ms, row.count)
            .await?;
        Ok(())
    }

    /// Writes the counted refusals of every interval that has ended, or of all of them with
    /// `all` (at shutdown, and in tests).
    ///
    /// # Errors
    /// [`BrokerError`] (the rows not written are lost; the store is failing anyway).
    pub async fn flush_audit(&self, all: bool) -> Result<(), BrokerError> {
        let rows = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .due((!all).then(crate::store::now_ms));
        for row in &rows {
            self.write_tallied(row).await?;
        }
        Ok(())
    }

    fn rate_limited(&self, id: &str, limit: u32) -> bool {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failures.get(id).is_some_and(|(since, count)| {
            since.elapsed() < Duration::from_secs(60) && *count >= limit
        })
    }

    fn record_failure(&self, id: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if failures.len() > 100_000 {
            failures.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
        }
        let entry = failures.entry(id.to_owned()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= Duration::from_secs(60) {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }

    /// The caller's live jobs.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn query(&self, caller: &Caller) -> Result<Vec<JobSummary>, BrokerError> {
        let rows = self.store.jobs_of(&caller.user, unix_now()).await?;
        Ok(rows
            .iter()
            .map(|row| self.to_job(row, false).summary)
            .collect())
    }

    /// Extends the caller's job by its TTL; the new expiry.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn heartbeat(&self, caller: &Caller, id: &str) -> Result<String, BrokerError> {
        if !valid_job_id(id) {
            return Err(BrokerError::BadRequest(format!("{id:?} is not a job id")));
        }
        match self.store.heartbeat(id, &caller.user, unix_now()).await? {
            Some(expires) => Ok(rfc3339(expires)),
            None => {
                let result = self.miss_reason(caller, id, "heartbeat").await?;
                self.audit_repeatable(caller, "heartbeat", Some(id), result)
                    .await?;
                Err(BrokerError::NotFound)
            }
        }
    }

    /// Deletes the caller's job, freeing its port and revoking its certificates.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), BrokerError> {
        if !valid_job_id(id) {
            return Err(BrokerError::BadRequest(format!("{id:?} is not a job id")));
        }
        let audit = AuditRecord {
            caller,
            action: "delete",
            job_id: Some(id),
            result: "ok",
            detail: None,
        };
        match self
            .store
            .delete(id, &caller.user, self.cert_lifetime_secs(), &audit)
            .await?
        {
            Some(row) => {
                tracing::info!(user = ?caller.user, job = id, port = row.port, "job deleted");
                Ok(())
            }
            None => {
                let result = self.miss_reason(caller, id, "delete").await?;
                self.audit_repeatable(caller, "delete", Some(id), result)
                    .await?;
                Err(BrokerError::NotFound)
            }
        }
    }

    /// Why `caller` found no job `id`, for the audit trail (the answer is 404 either way).
    async fn miss_reason(
        &self,
        caller: &Caller,
        id: &str,
        action: &'static str,
    ) -> Result<&'static str, BrokerError> {
        Ok(match self.store.job(id).await? {
            None => "not_found",
            Some(row) if row.owner != caller.user => {
                tracing::warn!(user = ?caller.user, via = caller.via, job = id, action, "refused: not the owner");
                "refused_not_owner"
            }
            Some(_) => "expired",
        })
    }

    /// Deletes expired jobs; how many.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn reap(&self) -> Result<usize, BrokerError> {
        self.flush_audit(false).await?;
        let reaped = self
            .store
            .reap(
                unix_now(),
                self.cert_lifetime_secs(),
                (self.config.audit_retention_days > 0).then(|| {
                    (unix_now() - i64::from(self.config.audit_retention_days) * 86_400) * 1000
                }),
            )
            .await?;
        for job in &reaped {
            tracing::info!(job = %job.id, owner = ?job.owner, port = job.port, "expired job reaped");
        }
        self.metrics.reaped(reaped.len());
        {
            let mut failures = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            failures.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
        }
        Ok(reaped.len())
    }

    /// Runs the reaper every `reap_interval` until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, shutdown: common::daemon::Shutdown) {
        let mut ticker = tokio::time::interval(self.config.reap_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(err) = self.reap().await {
                        tracing::warn!(error = %err, "reaper pass failed");
                    }
                }
                () = shutdown.triggered() => {
                    if let Err(err) = self.flush_audit(true).await {
                        tracing::warn!(error = %err, "writing the counted refusals failed");
                    }
                    return;
                }
            }
        }
    }

    fn to_job(&self, row: &JobRow, with_secrets: bool) -> Job {
        let job_type = JobType::parse(&row.job_type).unwrap_or(JobType::Ssh);
        let summary = JobSummary {
            id: row.id.clone(),
            job_type,
            owner: row.owner.clone(),
            host: row.host.clone(),
            port: row.port,
            status: if row.expires_at >= unix_now() {
                "active".into()
            } else {
                "expired".into()
            },
            created: rfc3339(row.created_at),
            expires: rfc3339(row.expires_at),
            ttl_secs: u64::try_from(row.ttl_secs).unwrap_or(0),
            label: row.label.clone(),
        };
        if !with_secrets {
            return Job {
                summary,
                secret: None,
                tls: None,
            };
        }
        let tls = match (
            &row.cert_pem,
            &row.key_pem,
            &row.client_cert_pem,
            &row.client_key_pem,
        ) {
            (Some(cert), Some(key), Some(client_cert), Some(client_key)) => Some(TlsMaterial {
                cert: cert.clone(),
                key: key.clone(),
                client_cert: client_cert.clone(),
                client_key: client_key.clone(),
                ca: row
                    .ca_pem
                    .clone()
                    .unwrap_or_else(|| self.ca.cert_pem().to_owned()),
                cert_serial: row.cert_serial.clone().unwrap_or_default(),
                client_serial: row.client_serial.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        Job {
            summary,
            secret: row.secret.clone(),
            tls,
        }
    }
}

/// A database URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***{}", &url[..scheme], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("sqlite:///var/lib/b.db"),
            "sqlite:///var/lib/b.db"
        );
    }

    #[test]
    fn a_listening_port_is_not_free() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!port_free(port));
        drop(listener);
        assert!(port_free(port));
    }
}
