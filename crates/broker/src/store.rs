//! The job registry in SQL, through sqlx's `Any` driver: SQLite (default) or PostgreSQL, with
//! one set of migrations and the same statements for both (`$n` placeholders, `ON CONFLICT`,
//! `RETURNING`).
//!
//! Invariants kept by the schema rather than by code: a host's port belongs to at most one
//! job (`UNIQUE (host, port)`), so concurrent saves, even from several brokers sharing one
//! PostgreSQL, cannot hand out the same port; a job row and its audit record are committed
//! together.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};

use crate::config::Config;
use crate::identity::Caller;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The state directory or database file could not be prepared.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A group commit failed (the message of the database error).
    #[error("database: {0}")]
    Writer(String),
    /// A row holds something the code never writes.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A job as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct JobRow {
    /// Job id.
    pub id: String,
    /// Owner's user name.
    pub owner: String,
    /// Owner's uid when saved over the socket.
    pub owner_uid: Option<u32>,
    /// `ssh` or `ssl`.
    pub job_type: String,
    /// Host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// ssh secret, hex.
    pub secret: Option<String>,
    /// ssl: server certificate, key, client certificate, client key (PEM).
    pub cert_pem: Option<String>,
    /// See `cert_pem`.
    pub key_pem: Option<String>,
    /// See `cert_pem`.
    pub client_cert_pem: Option<String>,
    /// See `cert_pem`.
    pub client_key_pem: Option<String>,
    /// The issuing CA's certificate (PEM).
    pub ca_pem: Option<String>,
    /// Serial of the server certificate, hex.
    pub cert_serial: Option<String>,
    /// Serial of the client certificate, hex.
    pub client_serial: Option<String>,
    /// Free text.
    pub label: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Seconds per heartbeat.
    pub ttl_secs: i64,
}

impl std::fmt::Debug for JobRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRow")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("job_type", &self.job_type)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The job columns in one order, for `SELECT` and `RETURNING` (a macro so statements stay
/// `&'static str`, which sqlx requires of SQL text).
macro_rules! job_columns {
    () => {
        "id, owner, owner_uid, job_type, host, port, secret, cert_pem, key_pem, \
         client_cert_pem, client_key_pem, ca_pem, cert_serial, client_serial, label, created_at, \
         expires_at, ttl_secs"
    };
}

fn job_from_row(row: &AnyRow) -> Result<JobRow, StoreError> {
    let port: i64 = row.try_get("port")?;
    let owner_uid: Option<i64> = row.try_get("owner_uid")?;
    Ok(JobRow {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        owner_uid: owner_uid.and_then(|u| u32::try_from(u).ok()),
        job_type: row.try_get("job_type")?,
        host: row.try_get("host")?,
        port: u16::try_from(port).map_err(|_| StoreError::Corrupt(format!("port {port}")))?,
        secret: row.try_get("secret")?,
        cert_pem: row.try_get("cert_pem")?,
        key_pem: row.try_get("key_pem")?,
        client_cert_pem: row.try_get("client_cert_pem")?,
        client_key_pem: row.try_get("client_key_pem")?,
        ca_pem: row.try_get("ca_pem")?,
        cert_serial: row.try_get("cert_serial")?,
        client_serial: row.try_get("client_serial")?,
        label: row.try_get("label")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        ttl_secs: row.try_get("ttl_secs")?,
    })
}

/// One audit record.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    /// Who.
    pub caller: &'a Caller,
    /// `save`, `load`, `verify`, `heartbeat`, `delete`, `reap`.
    pub action: &'static str,
    /// Which job, when known.
    pub job_id: Option<&'a str>,
    /// `ok`, `valid`, `invalid`, `not_found`, `refused`, ...
    pub result: &'a str,
    /// Anything else worth keeping (never a secret).
    pub detail: Option<String>,
}

/// An audit row read back (tests and `broker audit`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `unix` or `https` or `broker`.
    pub via: String,
    /// User name.
    pub user: String,
    /// Uid, when on the socket.
    pub uid: Option<i64>,
    /// What was done.
    pub action: String,
    /// To which job.
    pub job_id: Option<String>,
    /// With what result.
    pub result: String,
    /// Extra.
    pub detail: Option<String>,
    /// How many attempts the row stands for: 1, or more for refusals counted together over
    /// `audit_interval_secs`.
    pub count: i64,
}

/// The registry.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// SQLite allows one writer at a time, and a connection that finds the database locked
    /// sleeps in SQLite's busy handler (1, 2, 5, 10 ... 100 ms). Writers queue here instead,
    /// in this process, and are woken the moment the previous one commits. `None` for
    /// PostgreSQL, which has row locks.
    write_lock: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// The group-commit writer: saves and audit records waiting at the same moment share
    /// one transaction (and one fsync), written with one multi-row statement per table.
    batcher: tokio::sync::mpsc::Sender<Pending>,
}

/// An audit record owned by the writer queue.
#[derive(Debug, Clone)]
struct OwnedAudit {
    at_ms: i64,
    via: &'static str,
    user: String,
    uid: Option<i64>,
    action: &'static str,
    job_id: Option<String>,
    result: String,
    detail: Option<String>,
    count: i64,
}

impl From<&AuditRecord<'_>> for OwnedAudit {
    fn from(record: &AuditRecord<'_>) -> Self {
        Self {
            at_ms: now_ms(),
            via: record.caller.via,
            user: record.caller.user.clone(),
            uid: record.caller.uid.map(i64::from),
            action: record.action,
            job_id: record.job_id.map(str::to_owned),
            result: record.result.to_owned(),
            detail: record.detail.clone(),
            count: 1,
        }
    }
}

/// One queued write.
#[derive(Debug)]
enum Write {
    /// A new job and its `save` record; answered whether the job was inserted.
    Job(Box<JobRow>, OwnedAudit),
    /// An audit record alone.
    Audit(OwnedAudit),
}

type Pending = (Write, tokio::sync::oneshot::Sender<Result<bool, String>>);

/// Most writes committed together (18 columns x 64 rows stays far below SQLite's bound
/// variable limit).
const BATCH: usize = 64;

/// Placeholders `($1, ..., $cols), ($cols+1, ...)` for `rows` rows.
fn placeholders(rows: usize, cols: usize) -> String {
    let mut text = String::with_capacity(rows * cols * 5);
    for row in 0..rows {
        if row > 0 {
            text.push_str(", ");
        }
        text.push('(');
        for col in 0..cols {
            if col > 0 {
                text.push_str(", ");
            }
            text.push('$');
            text.push_str(&(row * cols + col + 1).to_string());
        }
        text.push(')');
    }
    text
}

async fn write_batch(
    pool: &AnyPool,
    lock: Option<&tokio::sync::Mutex<()>>,
    batch: &[Pending],
) -> Result<HashSet<String>, sqlx::Error> {
    let _writer = match lock {
        Some(lock) => Some(lock.lock().await),
        None => None,
    };
    let mut tx = pool.begin().await?;
    let jobs: Vec<&JobRow> = batch
        .iter()
        .filter_map(|(write, _)| match write {
            Write::Job(job, _) => Some(&**job),
            Write::Audit(_) => None,
        })
        .collect();
    let mut inserted = HashSet::new();
    if !jobs.is_empty() {
        let sql = format!(
            "INSERT INTO jobs ({}) VALUES {} ON CONFLICT DO NOTHING RETURNING id",
            job_columns!(),
            placeholders(jobs.len(), 18)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for job in &jobs {
            query = query
                .bind(job.id.as_str())
                .bind(job.owner.as_str())
                .bind(job.owner_uid.map(i64::from))
                .bind(job.job_type.as_str())
                .bind(job.host.as_str())
                .bind(i64::from(job.port))
                .bind(job.secret.as_deref())
                .bind(job.cert_pem.as_deref())
                .bind(job.key_pem.as_deref())
                .bind(job.client_cert_pem.as_deref())
                .bind(job.client_key_pem.as_deref())
                .bind(job.ca_pem.as_deref())
                .bind(job.cert_serial.as_deref())
                .bind(job.client_serial.as_deref())
                .bind(job.label.as_deref())
                .bind(job.created_at)
                .bind(job.expires_at)
                .bind(job.ttl_secs);
        }
        for row in query.fetch_all(&mut *tx).await? {
            inserted.insert(row.try_get::<String, _>(0)?);
        }
    }
    let audits: Vec<&OwnedAudit> = batch
        .iter()
        .filter_map(|(write, _)| match write {
            Write::Job(job, audit) => inserted.contains(&job.id).then_some(audit),
            Write::Audit(audit) => Some(audit),
        })
        .collect();
    if !audits.is_empty() {
        let sql = format!(
            "INSERT INTO audit (at_ms, via, user_name, uid, action, job_id, result, detail, \
             count) VALUES {}",
            placeholders(audits.len(), 9)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for audit in &audits {
            query = query
                .bind(audit.at_ms)
                .bind(audit.via)
                .bind(audit.user.as_str())
                .bind(audit.uid)
                .bind(audit.action)
                .bind(audit.job_id.as_deref())
                .bind(audit.result.as_str())
                .bind(audit.detail.as_deref())
                .bind(audit.count);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

async fn run_writer(
    pool: AnyPool,
    lock: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    mut queue: tokio::sync::mpsc::Receiver<Pending>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match write_batch(&pool, lock.as_deref(), &batch).await {
            Ok(inserted) => {
                for (write, reply) in batch.drain(..) {
                    let answer = match &write {
                        Write::Job(job, _) => inserted.contains(&job.id),
                        Write::Audit(_) => true,
                    };
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, writes = batch.len(), "group commit failed");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(err.to_string()));
                }
            }
        }
    }
}

/// Unix milliseconds now (the audit table's clock).
pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(i64::MAX)
}

async fn insert_audit<'e, E>(executor: E, record: &AuditRecord<'_>) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO audit (at_ms, via, user_name, uid, action, job_id, result, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(now_ms())
    .bind(record.caller.via)
    .bind(record.caller.user.as_str())
    .bind(record.caller.uid.map(i64::from))
    .bind(record.action)
    .bind(record.job_id)
    .bind(record.result)
    .bind(record.detail.as_deref())
    .execute(executor)
    .await?;
    Ok(())
}

impl Store {
    /// Opens the store `config.database` names, creating the SQLite file 0600 (and the state
    /// directory 0700) when missing, and runs the migrations.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn open(config: &Config) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = config.is_sqlite();
        if sqlite {
            let path = config
                .database
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or(path);
            prepare_sqlite_file(std::path::Path::new(path))?;
        }
        let full_sync = config.sqlite_full_sync;
        let pool = AnyPoolOptions::new()
            .max_connections(config.database_connections)
            .acquire_timeout(Duration::from_secs(10))
            // A local file or a LAN database: pinging before every use costs a round trip.
            .test_before_acquire(false)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if sqlite {
                        let pragmas = if full_sync {
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
                             PRAGMA mmap_size = 268435456;"
                        } else {
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
                             PRAGMA mmap_size = 268435456;"
                        };
                        sqlx::raw_sql(pragmas).execute(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&config.database)
            .await?;
        migrator().run(&pool).await?;
        let write_lock = sqlite.then(|| std::sync::Arc::new(tokio::sync::Mutex::new(())));
        let (batcher, queue) = tokio::sync::mpsc::channel(4 * BATCH);
        tokio::spawn(run_writer(pool.clone(), write_lock.clone(), queue));
        Ok(Self {
            pool,
            write_lock,
            batcher,
        })
    }

    /// Waits for this process's turn to write (SQLite only).
    async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Inserts a job and its audit record in one transaction. `Ok(false)` when the port is
    /// already taken on that host (nothing is written).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn insert_job(
        &self,
        job: &JobRow,
        audit: &AuditRecord<'_>,
    ) -> Result<bool, StoreError> {
        self.queue(Write::Job(Box::new(job.clone()), audit.into()))
            .await
    }

    async fn queue(&self, write: Write) -> Result<bool, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.batcher
            .send((write, reply))
            .await
            .map_err(|_| StoreError::Writer("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Writer("the writer has stopped".into()))?
            .map_err(StoreError::Writer)
    }

    /// Ports held on `host` by jobs, live or awaiting the reaper.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn used_ports(&self, host: &str) -> Result<HashSet<u16>, StoreError> {
        let rows = sqlx::query("SELECT port FROM jobs WHERE host = $1")
            .bind(host)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let port: i64 = row.try_get(0)?;
                u16::try_from(port).map_err(|_| StoreError::Corrupt(format!("port {port}")))
            })
            .collect()
    }

    /// How many live jobs `owner` holds, counting up to `limit`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn count_live(&self, owner: &str, now: i64, limit: i64) -> Result<i64, StoreError> {
        // Counting stops at `limit`: the cost is bounded by the quota, not by the table.
        let row = sqlx::query(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE owner = $1 AND expires_at >= $2 \
             LIMIT $3) AS live",
        )
        .bind(owner)
        .bind(now)
        .bind(limit)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get(0)?)
    }

    /// The job `id`, whoever owns it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// `owner`'s live jobs, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn jobs_of(&self, owner: &str, now: i64) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE owner = $1 AND expires_at >= $2 ORDER BY created_at, id"
        ))
        .bind(owner)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Moves a live job's expiry to `now + ttl`; its new expiry, or `None` when `owner` has
    /// no such live job.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn heartbeat(
        &self,
        id: &str,
        owner: &str,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let _writer = self.writer().await;
        let row = sqlx::query(
            "UPDATE jobs SET expires_at = $3 + ttl_secs \
             WHERE id = $1 AND owner = $2 AND expires_at >= $3 RETURNING expires_at",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?)
    }

    /// Deletes `owner`'s job `id`, records its certificates as revoked and the audit record,
    /// in one transaction. The deleted row, or `None` when there was no such job.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn delete(
        &self,
        id: &str,
        owner: &str,
        cert_lifetime_secs: i64,
        audit: &AuditRecord<'_>,
    ) -> Result<Option<JobRow>, StoreError> {
        let _writer = self.writer().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "DELETE FROM jobs WHERE id = $1 AND owner = $2 RETURNING ",
            job_columns!()
        ))
        .bind(id)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let job = job_from_row(&row)?;
        revoke(&mut tx, &job, cert_lifetime_secs).await?;
        insert_audit(&mut *tx, audit).await?;
        tx.commit().await?;
        Ok(Some(job))
    }

    /// Deletes every job expired at `now` (any host), revoking certificates and auditing
    /// each; also forgets revocations of certificates expired by now, and audit records older
    /// than `audit_before_ms` when given. The reaped jobs.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn reap(
        &self,
        now: i64,
        cert_lifetime_secs: i64,
        audit_before_ms: Option<i64>,
    ) -> Result<Vec<JobRow>, StoreError> {
        let _writer = self.writer().await;
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(concat!(
            "DELETE FROM jobs WHERE expires_at < $1 RETURNING ",
            job_columns!()
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let broker = Caller {
            user: "broker".into(),
            uid: None,
            via: "broker",
        };
        for job in &jobs {
            revoke(&mut tx, job, cert_lifetime_secs).await?;
            insert_audit(
                &mut *tx,
                &AuditRecord {
                    caller: &broker,
                    action: "reap",
                    job_id: Some(&job.id),
                    result: "expired",
                    detail: Some(format!("owner {} port {}", job.owner, job.port)),
                },
            )
            .await?;
        }
        sqlx::query("DELETE FROM revoked WHERE not_after < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if let Some(before) = audit_before_ms {
            sqlx::query("DELETE FROM audit WHERE at_ms < $1")
                .bind(before)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(jobs)
    }

    /// Appends one audit record.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit(&self, record: &AuditRecord<'_>) -> Result<(), StoreError> {
        self.queue(Write::Audit(record.into())).await.map(|_| ())
    }

    /// Appends one audit record standing for `count` attempts, the last at `at_ms`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit_counted(
        &self,
        record: &AuditRecord<'_>,
        at_ms: i64,
        count: i64,
    ) -> Result<(), StoreError> {
        let mut owned = OwnedAudit::from(record);
        owned.at_ms = at_ms;
        owned.count = count;
        self.queue(Write::Audit(owned)).await.map(|_| ())
    }

    /// Moves `user`'s audit records `by_ms` into the past (tests of the retention rule).
    ///
    /// # Errors
    /// [`StoreError`].
    #[doc(hidden)]
    pub async fn backdate_audit_for_tests(&self, user: &str, by_ms: i64) -> Result<(), StoreError> {
        let _writer = self.writer().await;
        sqlx::query("UPDATE audit SET at_ms = at_ms - $1 WHERE user_name = $2")
            .bind(by_ms)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Serials revoked and not yet expired, for the CRL.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT serial FROM revoked ORDER BY serial")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// The newest `limit` audit rows, newest last.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit_rows(&self, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, via, user_name, uid, action, job_id, result, detail, count \
             FROM audit ORDER BY at_ms DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(AuditRow {
                    at_ms: row.try_get(0)?,
                    via: row.try_get(1)?,
                    user: row.try_get(2)?,
                    uid: row.try_get(3)?,
                    action: row.try_get(4)?,
                    job_id: row.try_get(5)?,
                    result: row.try_get(6)?,
                    detail: row.try_get(7)?,
                    count: row.try_get(8)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        out.reverse();
        Ok(out)
    }
}

async fn revoke(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &JobRow,
    cert_lifetime_secs: i64,
) -> Result<(), StoreError> {
    for serial in [&job.cert_serial, &job.client_serial].into_iter().flatten() {
        sqlx::query(
            "INSERT INTO revoked (serial, job_id, revoked_at, not_after) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(serial.as_str())
        .bind(job.id.as_str())
        .bind(now_ms() / 1000)
        .bind(job.created_at.saturating_add(cert_lifetime_secs))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn prepare_sqlite_file(path: &std::path::Path) -> Result<(), StoreError> {
    // The state directory is the broker's alone (0700).
    common::daemon::create_private_file(path, 0o700).map_err(|source| StoreError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The schema's migrations, embedded in the binary (`common::migrate`); a test checks this list
/// against the `migrations/` directory, checksums included.
const MIGRATIONS: &[common::migrate::Embedded] = &[
    (1, "jobs", include_str!("../migrations/0001_jobs.sql")),
    (
        2,
        "audit count",
        include_str!("../migrations/0002_audit_count.sql"),
    ),
];

/// The migrator over [`MIGRATIONS`].
fn migrator() -> sqlx::migrate::Migrator {
    common::migrate::migrator(MIGRATIONS)
}

#[cfg(test)]
mod tests {
    /// The embedded list is the `migrations/` directory as sqlx reads it: same versions,
    /// descriptions and checksums, so databases migrated by earlier releases stay valid.
    #[tokio::test]
    async fn embedded_migrations_match_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        common::migrate::check_against_directory(super::MIGRATIONS, &dir)
            .await
            .unwrap();
    }
}
