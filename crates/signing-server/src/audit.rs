//! The audit trail: an append-only table of every signature, in SQLite or PostgreSQL, and the
//! original's `signatures.txt`.
//!
//! The store goes through sqlx's `Any` driver, as the broker's does: the same statements for
//! both (`$n` placeholders), one migration list with the same versions for both, each version
//! a SQL file per backend (`migrations/` for SQLite, `migrations-postgres/` for PostgreSQL):
//! the tables are the same, the append-only triggers are each dialect's own. A SQLite file is
//! created 0600 and runs in WAL mode with full fsync; PostgreSQL keeps its own durability
//! (`synchronous_commit` as the server sets it, on by default).
//!
//! One writer task commits, on one connection: it takes every request waiting at that moment
//! into one transaction (group commit), written as multi-row `INSERT`s, so concurrent requests
//! share an fsync and a round trip; a request's signatures are recorded together or not at
//! all, and none is handed out before its row is committed. Every row carries the instance
//! name, so several instances can share one PostgreSQL trail.
//!
//! Migrations: SQLite's are run at start (the daemon owns its file). On PostgreSQL the daemon
//! first reads which migrations the database has; when it is current, it runs no DDL at all
//! (the service role needs none); when not, it tries to migrate, and a role without the
//! privilege gets an error naming `signing-server --migrate`, which an owner runs with the
//! owner's URL.
//!
//! `signatures.txt` holds the signature lines of the last request (the original truncated it
//! per connection), replaced atomically so a reader never sees half a file.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row as _};

use crate::config::Database;
use crate::fields::{Fields, HEADER, line};

/// One audit row.
#[derive(Debug, Clone)]
pub struct Record {
    /// Client identity (certificate CN).
    pub identity: String,
    /// `path` or `upload`.
    pub source: &'static str,
    /// The path signed, or the upload's name.
    pub name: String,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Content length.
    pub size: u64,
    /// Configured key name.
    pub key_name: String,
    /// The signature fields.
    pub fields: Fields,
}

/// A row read back: the columns tools and tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The row's id (order of commit within one database).
    pub id: i64,
    /// The instance that made the signature (`''` for rows from before instances).
    pub instance: String,
    /// Client identity.
    pub identity: String,
    /// `path` or `upload`.
    pub source: String,
    /// Path or upload name.
    pub name: String,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Key id.
    pub keyid: String,
    /// The signature.
    pub signature: String,
}

/// Errors opening or migrating the audit store.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database failed.
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The service's PostgreSQL role could undo the trail (see [`Audit::privileges`]), and
    /// the configuration does not allow it.
    #[error(
        "the role {role} {reasons}, so it could rewrite or disable the append-only trail: \
         run the daemon as a service role with only the grants of docs/signing-server.md \
         (GRANT SELECT, INSERT ON signatures; GRANT USAGE ON SEQUENCE signatures_id_seq; \
         GRANT SELECT ON _sqlx_migrations), or set allow_privileged_role = true on a test \
         database"
    )]
    Privileged {
        /// The role (`current_user`).
        role: String,
        /// What it may do, e.g. "is a superuser, may UPDATE".
        reasons: String,
    },
    /// The PostgreSQL schema is not at this release's version, and this role cannot migrate it.
    #[error(
        "the schema is not at this release's version {expected} ({cause}); \
         an owner of the database runs `signing-server --migrate` with the owner's URL \
         (SIGNING_SERVER_DATABASE=postgres://OWNER@...)"
    )]
    Schema {
        /// The newest migration this release knows.
        expected: i64,
        /// Why migrating failed.
        cause: String,
    },
}

/// A request's rows and where to say they are committed.
type Pending = (
    Vec<Record>,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Most requests committed in one transaction.
const GROUP: usize = 256;
/// Most rows in one `INSERT` (15 columns: 3,750 parameters, below SQLite's 32,766).
const ROWS_PER_INSERT: usize = 250;
/// Columns of one row.
const COLUMNS: usize = 15;

/// The audit database.
#[derive(Debug, Clone)]
pub struct Audit {
    pool: AnyPool,
    writer: tokio::sync::mpsc::Sender<Pending>,
    timeout: Duration,
}

/// How the store is opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Longest wait for a request's rows to be committed ([`Audit::record`]); the writer also
    /// gives up a transaction after it and starts the next on a fresh connection.
    pub timeout: Duration,
    /// Start even when the PostgreSQL role could undo the trail (a test database only).
    pub allow_privileged_role: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            allow_privileged_role: false,
        }
    }
}

impl Audit {
    /// Opens the store and brings its schema to this release's version: a SQLite file is
    /// created 0600 when missing and migrated; a PostgreSQL database is migrated only when it
    /// is behind (see the module's documentation).
    ///
    /// On PostgreSQL the role must not be able to undo the trail (a superuser, a member of the
    /// table's owner, or UPDATE, DELETE, TRUNCATE or TRIGGER on it, in any role it is a member
    /// of, or may SET `session_replication_role`), unless
    /// `options.allow_privileged_role` (then a warning is logged).
    ///
    /// # Errors
    /// The file cannot be created or opened, the server cannot be reached, the schema
    /// cannot be brought to this version, or the role is privileged ([`AuditError::Privileged`]).
    pub async fn open(
        database: &Database,
        instance: &str,
        options: OpenOptions,
    ) -> Result<Self, AuditError> {
        let pool = connect(database).await?;
        match database {
            Database::Sqlite(_) => migrator(database).run(&pool).await?,
            Database::Postgres(_) => {
                if !is_current(&pool, database).await {
                    migrator(database)
                        .run(&pool)
                        .await
                        .map_err(|e| AuditError::Schema {
                            expected: latest(database),
                            cause: e.to_string(),
                        })?;
                }
                let (role, reasons) = privileges(&pool).await?;
                if !reasons.is_empty() {
                    let reasons = reasons.join(", ");
                    if !options.allow_privileged_role {
                        return Err(AuditError::Privileged { role, reasons });
                    }
                    tracing::warn!(
                        role,
                        reasons,
                        "allow_privileged_role: the audit role could rewrite or disable the \
                         append-only trail (use it on a test database only)"
                    );
                }
            }
        }
        let (writer, queue) = tokio::sync::mpsc::channel(GROUP * 4);
        tokio::spawn(write_loop(
            pool.clone(),
            Arc::from(instance),
            queue,
            options.timeout,
        ));
        Ok(Self {
            pool,
            writer,
            timeout: options.timeout,
        })
    }

    /// Runs every pending migration (`signing-server --migrate`); the schema's version after.
    ///
    /// # Errors
    /// The database cannot be reached or a migration fails.
    pub async fn migrate(database: &Database) -> Result<i64, AuditError> {
        let pool = connect(database).await?;
        migrator(database).run(&pool).await?;
        pool.close().await;
        Ok(latest(database))
    }

    /// Records a request's signatures; returns once they are committed, or fails after the
    /// timeout of [`OpenOptions`] (the rows may then still be committed later: the trail can
    /// hold a row for a signature never handed out, never the reverse).
    ///
    /// # Errors
    /// The database refuses the rows, does not commit them in time, or the writer has stopped.
    pub async fn record(&self, records: &[Record]) -> Result<(), sqlx::Error> {
        let waited = tokio::time::timeout(self.timeout, async {
            let (ack, done) = tokio::sync::oneshot::channel();
            self.writer
                .send((records.to_vec(), ack))
                .await
                .map_err(|_| sqlx::Error::PoolClosed)?;
            done.await
                .map_err(|_| sqlx::Error::PoolClosed)?
                .map_err(sqlx::Error::Protocol)
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(sqlx::Error::Protocol(format!(
                "not committed within {:?}",
                self.timeout
            )))
        })
    }

    /// Rows as `(identity, source, name, sha256, keyid, signature)`, oldest first (for tests and
    /// tools).
    ///
    /// # Errors
    /// The query fails.
    pub async fn rows(
        &self,
    ) -> Result<Vec<(String, String, String, String, String, String)>, sqlx::Error> {
        Ok(self
            .trail()
            .await?
            .into_iter()
            .map(|r| (r.identity, r.source, r.name, r.sha256, r.keyid, r.signature))
            .collect())
    }

    /// Every row, in id order.
    ///
    /// # Errors
    /// The query fails.
    pub async fn trail(&self) -> Result<Vec<Row>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, instance, identity, source, name, sha256, keyid, signature \
             FROM signatures ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Row {
                    id: row.try_get(0)?,
                    instance: row.try_get(1)?,
                    identity: row.try_get(2)?,
                    source: row.try_get(3)?,
                    name: row.try_get(4)?,
                    sha256: row.try_get(5)?,
                    keyid: row.try_get(6)?,
                    signature: row.try_get(7)?,
                })
            })
            .collect()
    }

    /// The pool, for tools.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Connects: a SQLite file (created 0600 when missing, WAL, full fsync) or PostgreSQL.
async fn connect(database: &Database) -> Result<AnyPool, AuditError> {
    sqlx::any::install_default_drivers();
    let (options, sqlite) = match database {
        Database::Sqlite(path) => {
            // Its directory may be shared (signatures.txt is world-readable): created 0755,
            // and like any directory of a private file it must be writable by us (or root)
            // alone.
            common::daemon::create_private_file(path, 0o755).map_err(sqlx::Error::Io)?;
            let file = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
            let url = sqlx::ConnectOptions::to_url_lossy(&file);
            (
                <AnyConnectOptions as sqlx::ConnectOptions>::from_url(&url)?,
                true,
            )
        }
        Database::Postgres(url) => (url.parse::<AnyConnectOptions>()?, false),
    };
    // No ping before each use: a local file does not drop connections, and on a LAN the ping
    // is a round trip on every request.
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if sqlite {
                    sqlx::raw_sql(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 10000;",
                    )
                    .execute(conn)
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Whether every migration of this release is recorded as applied, with its checksum, and no
/// other (read-only: the service role may lack every other privilege).
async fn is_current(pool: &AnyPool, database: &Database) -> bool {
    let Ok(rows) = sqlx::query("SELECT version, checksum FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
    else {
        return false;
    };
    let mut applied: Vec<(i64, Vec<u8>)> = rows
        .iter()
        .filter_map(|row| Some((row.try_get(0).ok()?, row.try_get(1).ok()?)))
        .collect();
    applied.sort();
    let ours: Vec<(i64, Vec<u8>)> = migrator(database)
        .iter()
        .map(|m| (m.version, m.checksum.to_vec()))
        .collect();
    applied == ours
}

/// What the role could do to undo the trail: `current_user` and the reasons (empty when it is
/// a plain service role). Every role the user is a member of counts, whether or not it
/// inherits from it (`SET ROLE` reaches a `NOINHERIT` one): a superuser, the table's owner, one
/// with UPDATE, DELETE, TRUNCATE or TRIGGER on it (a trigger can drop rows before they are
/// written; `pg_write_all_data` counts as its members' UPDATE and DELETE), or, from PostgreSQL
/// 15, one that may SET `session_replication_role` (which turns triggers off).
async fn privileges(pool: &AnyPool) -> Result<(String, Vec<&'static str>), sqlx::Error> {
    // `EXISTS (SELECT 1 FROM <every role current_user is a member of> AND $cond)`.
    macro_rules! any_role {
        ($cond:literal) => {
            concat!(
                "EXISTS (SELECT 1 FROM pg_roles r WHERE ",
                "pg_has_role(current_user, r.oid, 'MEMBER') AND ",
                $cond,
                ")"
            )
        };
    }
    let row = sqlx::query(concat!(
        "SELECT current_user::text, ",
        any_role!("r.rolsuper"),
        ", pg_has_role(current_user, c.relowner, 'MEMBER'), ",
        any_role!("has_table_privilege(r.oid, c.oid, 'UPDATE')"),
        ", ",
        any_role!("has_table_privilege(r.oid, c.oid, 'DELETE')"),
        ", ",
        any_role!("has_table_privilege(r.oid, c.oid, 'TRUNCATE')"),
        ", ",
        any_role!("has_table_privilege(r.oid, c.oid, 'TRIGGER')"),
        ", current_setting('server_version_num')::int ",
        "FROM pg_class c WHERE c.oid = 'signatures'::regclass"
    ))
    .fetch_one(pool)
    .await?;
    let role: String = row.try_get(0)?;
    let mut reasons = Vec::new();
    for (index, reason) in [
        (1, "is a superuser (or a member of one)"),
        (2, "owns the signatures table (or is a member of its owner)"),
        (3, "may UPDATE"),
        (4, "may DELETE"),
        (5, "may TRUNCATE"),
        (6, "may TRIGGER (add a trigger)"),
    ] {
        if row.try_get::<Option<bool>, _>(index)?.unwrap_or(false) {
            reasons.push(reason);
        }
    }
    // has_parameter_privilege is new in PostgreSQL 15; before it, only a superuser may SET
    // session_replication_role.
    if row.try_get::<i32, _>(7)? >= 150_000 {
        let set: Option<bool> = sqlx::query_scalar(concat!(
            "SELECT ",
            any_role!("has_parameter_privilege(r.oid, 'session_replication_role', 'SET')")
        ))
        .fetch_one(pool)
        .await?;
        if set.unwrap_or(false) {
            reasons.push("may SET session_replication_role");
        }
    }
    Ok((role, reasons))
}

/// Commits waiting requests, as many as are queued (up to [`GROUP`]) per transaction; gives a
/// transaction up after `timeout` (its requests fail; the connection is closed, and the next
/// batch starts on a fresh one).
async fn write_loop(
    pool: AnyPool,
    instance: Arc<str>,
    mut queue: tokio::sync::mpsc::Receiver<Pending>,
    timeout: Duration,
) {
    // The writer keeps one connection: no pool acquire and release per commit.
    let mut conn: Option<sqlx::pool::PoolConnection<sqlx::Any>> = None;
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let records: Vec<&Record> = batch.iter().flat_map(|(records, _)| records).collect();
        let attempt = async {
            let c = match &mut conn {
                Some(conn) => conn,
                None => conn.insert(pool.acquire().await?),
            };
            insert(c, &instance, &records).await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(done) => done.map_err(|e| e.to_string()),
            Err(_) => Err(format!("not committed within {timeout:?}")),
        };
        drop(records);
        if result.is_err() {
            // Start the next batch on a fresh connection; one cut off mid-statement is closed,
            // not returned to the pool.
            if let Some(c) = conn.take() {
                drop(c.detach());
            }
        }
        for (_, ack) in batch {
            let _ = ack.send(result.clone());
        }
    }
}

async fn insert(
    conn: &mut sqlx::AnyConnection,
    instance: &str,
    records: &[&Record],
) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if records.len() <= ROWS_PER_INSERT {
        // One statement is its own transaction: one round trip instead of three. A row that
        // did not land (a trigger returned NULL) fails the group: nothing is handed out (the
        // rows that did land stay: a row for a signature never handed out is harmless).
        let done = insert_query(&now, instance, records)
            .execute(&mut *conn)
            .await?;
        return all_rows(done.rows_affected(), records.len());
    }
    let mut tx = conn.begin().await?;
    for chunk in records.chunks(ROWS_PER_INSERT) {
        let done = insert_query(&now, instance, chunk)
            .execute(&mut *tx)
            .await?;
        // Dropping `tx` on an error rolls the group back.
        all_rows(done.rows_affected(), chunk.len())?;
    }
    tx.commit().await
}

/// The `INSERT` wrote every row it sent, else an error that fails the whole group (a row the
/// database silently dropped, as a `BEFORE INSERT` trigger returning NULL does, is a signature
/// with no trail).
fn all_rows(written: u64, sent: usize) -> Result<(), sqlx::Error> {
    if usize::try_from(written).ok() == Some(sent) {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "the audit INSERT wrote {written} of {sent} rows (a trigger dropped rows?)"
        )))
    }
}

/// `INSERT INTO signatures (...) VALUES ($1, ...), ...` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO signatures (signed_at, instance, identity, source, name, sha256, size, \
         key_name, keyid, package, fileset, vrmf, ftype, timestamp, signature) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..COLUMNS {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(row * COLUMNS + col + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

fn insert_query<'q>(
    now: &'q str,
    instance: &'q str,
    records: &[&'q Record],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(insert_sql(records.len())));
    for r in records {
        query = query
            .bind(now)
            .bind(instance)
            .bind(r.identity.as_str())
            .bind(r.source)
            .bind(r.name.as_str())
            .bind(r.sha256.as_str())
            .bind(i64::try_from(r.size).unwrap_or(i64::MAX))
            .bind(r.key_name.as_str())
            .bind(r.fields.keyid.as_str())
            .bind(r.fields.package.as_str())
            .bind(r.fields.fileset.as_str())
            .bind(r.fields.vrmf.as_str())
            .bind(r.fields.ftype.as_str())
            .bind(r.fields.timestamp.as_str())
            .bind(r.fields.signature.as_str());
    }
    query
}

/// Replaces `path` with the header and a line per signature, atomically.
///
/// # Errors
/// The file cannot be written.
pub fn write_signatures_file(path: &Path, fields: &[&Fields]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".signatures-")
        .tempfile_in(dir)?;
    let mut text = String::from(HEADER);
    text.push('\n');
    for f in fields {
        text.push_str(&line(f));
        text.push('\n');
    }
    // No fsync: the audit table is the durable record; this file only has to be whole.
    tmp.write_all(text.as_bytes())?;
    // Readable like the original's file: signatures are public.
    use std::os::unix::fs::PermissionsExt as _;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The SQLite schema's migrations, embedded in the binary (`common::migrate`).
const SQLITE_MIGRATIONS: &[common::migrate::Embedded] = &[
    (
        1,
        "signatures",
        include_str!("../migrations/0001_signatures.sql"),
    ),
    (
        2,
        "instance",
        include_str!("../migrations/0002_instance.sql"),
    ),
];

/// PostgreSQL's: the same versions and descriptions, each in PostgreSQL's dialect.
const POSTGRES_MIGRATIONS: &[common::migrate::Embedded] = &[
    (
        1,
        "signatures",
        include_str!("../migrations-postgres/0001_signatures.sql"),
    ),
    (
        2,
        "instance",
        include_str!("../migrations-postgres/0002_instance.sql"),
    ),
];

fn migrations(database: &Database) -> &'static [common::migrate::Embedded] {
    match database {
        Database::Sqlite(_) => SQLITE_MIGRATIONS,
        Database::Postgres(_) => POSTGRES_MIGRATIONS,
    }
}

/// The migrator for the database's backend.
fn migrator(database: &Database) -> sqlx::migrate::Migrator {
    common::migrate::migrator(migrations(database))
}

/// The newest version this release knows.
fn latest(database: &Database) -> i64 {
    migrations(database).last().map_or(0, |m| m.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-384 of `migrations/0001_signatures.sql` as released before issue 20.
    const FIRST_CHECKSUM: &str = "746474989a7bdfbeac30513ac93e3ac536f91e3fd9be5802fd4e143f768dc8f5a48b3b5aaeccd716b47cbb6de0de7272";

    /// Each embedded list is its directory as sqlx reads it: same versions, descriptions and
    /// checksums, so databases migrated by earlier releases stay valid; and both backends
    /// have the same versions and descriptions.
    #[tokio::test]
    async fn embedded_migrations_match_the_directories() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        common::migrate::check_against_directory(SQLITE_MIGRATIONS, &root.join("migrations"))
            .await
            .unwrap();
        common::migrate::check_against_directory(
            POSTGRES_MIGRATIONS,
            &root.join("migrations-postgres"),
        )
        .await
        .unwrap();
        let names = |list: &[common::migrate::Embedded]| -> Vec<(i64, &str)> {
            list.iter().map(|m| (m.0, m.1)).collect()
        };
        assert_eq!(names(SQLITE_MIGRATIONS), names(POSTGRES_MIGRATIONS));
    }

    /// Version 1's checksum is the one earlier releases recorded: existing databases stay
    /// valid.
    #[test]
    fn the_first_migration_is_unchanged() {
        let first = migrator(&Database::Sqlite("x".into()));
        let first = first.iter().next().unwrap();
        assert_eq!(
            hex::encode(&first.checksum[..]),
            FIRST_CHECKSUM,
            "migrations/0001_signatures.sql must never change"
        );
    }

    #[test]
    fn insert_statements_number_every_parameter() {
        assert!(
            insert_sql(1)
                .ends_with("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)")
        );
        assert!(insert_sql(2).ends_with(
            "($16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)"
        ));
    }
}
