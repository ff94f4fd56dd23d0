//! The audit trail: an append-only SQLite table of every signature, and the original's
//! `signatures.txt`.
//!
//! The database file is created 0600 and runs in WAL mode with full fsync. One writer task
//! commits: it takes every request waiting at that moment into one transaction (group
//! commit), so concurrent requests share an fsync; a request's signatures are recorded
//! together or not at all, and none is handed out before its row is on disk. `signatures.txt`
//! holds the signature lines of the last request (the original truncated it per
//! connection), replaced atomically so a reader never sees half a file.

use std::path::Path;
use std::str::FromStr as _;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

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

/// A request's rows and where to say they are committed.
type Pending = (
    Vec<Record>,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Most requests committed in one transaction.
const GROUP: usize = 256;

/// The audit database.
#[derive(Debug, Clone)]
pub struct Audit {
    pool: SqlitePool,
    writer: tokio::sync::mpsc::Sender<Pending>,
}

impl Audit {
    /// Opens (creating 0600 when missing) and migrates the database.
    ///
    /// # Errors
    /// The file cannot be created or opened, or a migration fails.
    pub async fn open(path: &Path) -> Result<Self, sqlx::Error> {
        // Its directory may be shared (signatures.txt is world-readable): created 0755, and
        // like any directory of a private file it must be writable by us (or root) alone.
        common::daemon::create_private_file(path, 0o755)?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        // No ping before each use: a local file does not drop connections, and the ping is a
        // round trip to the database thread on every request.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        migrator().run(&pool).await?;
        let (writer, queue) = tokio::sync::mpsc::channel(GROUP * 4);
        tokio::spawn(write_loop(pool.clone(), queue));
        Ok(Self { pool, writer })
    }

    /// Records a request's signatures; returns once they are committed.
    ///
    /// # Errors
    /// The database refuses the rows, or the writer has stopped.
    pub async fn record(&self, records: &[Record]) -> Result<(), sqlx::Error> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.writer
            .send((records.to_vec(), ack))
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        done.await
            .map_err(|_| sqlx::Error::PoolClosed)?
            .map_err(sqlx::Error::Protocol)
    }

    /// Rows as `(identity, source, name, sha256, keyid, signature)`, oldest first (for tests and
    /// tools).
    ///
    /// # Errors
    /// The query fails.
    pub async fn rows(
        &self,
    ) -> Result<Vec<(String, String, String, String, String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT identity, source, name, sha256, keyid, signature FROM signatures ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The pool, for tools.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Commits waiting requests, as many as are queued (up to [`GROUP`]) per transaction.
async fn write_loop(pool: SqlitePool, mut queue: tokio::sync::mpsc::Receiver<Pending>) {
    // The writer keeps one connection: no pool acquire and release per commit.
    let mut conn: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>> = None;
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let result = match &mut conn {
            Some(conn) => Ok(conn),
            None => pool.acquire().await.map(|c| conn.insert(c)),
        };
        let result = match result {
            Ok(c) => insert(c, batch.iter().flat_map(|(records, _)| records)).await,
            Err(err) => Err(err),
        }
        .map_err(|e| e.to_string());
        if result.is_err() {
            // Start the next batch on a fresh connection.
            conn = None;
        }
        for (_, ack) in batch {
            let _ = ack.send(result.clone());
        }
    }
}

async fn insert(
    conn: &mut sqlx::SqliteConnection,
    records: impl Iterator<Item = &Record>,
) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let records: Vec<&Record> = records.collect();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if let [only] = records[..] {
        // One statement is its own transaction: one round trip to the database thread
        // instead of three.
        insert_query(&now, only).execute(&mut *conn).await?;
        return Ok(());
    }
    let mut tx = conn.begin().await?;
    for r in records {
        insert_query(&now, r).execute(&mut *tx).await?;
    }
    tx.commit().await
}

fn insert_query<'q>(
    now: &'q str,
    r: &'q Record,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(
        "INSERT INTO signatures (signed_at, identity, source, name, sha256, size, key_name, keyid, package, fileset, vrmf, ftype, timestamp, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(now)
    .bind(&r.identity)
    .bind(r.source)
    .bind(&r.name)
    .bind(&r.sha256)
    .bind(i64::try_from(r.size).unwrap_or(i64::MAX))
    .bind(&r.key_name)
    .bind(&r.fields.keyid)
    .bind(&r.fields.package)
    .bind(&r.fields.fileset)
    .bind(&r.fields.vrmf)
    .bind(&r.fields.ftype)
    .bind(&r.fields.timestamp)
    .bind(&r.fields.signature)
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

/// The schema's migrations, embedded in the binary: version, description (the file name's, as
/// `sqlx migrate` derives it) and SQL. They are listed here rather than read by sqlx's
/// `migrate!` macro, which would compile a second copy of sqlx (and of SQLite) for the build
/// host; a test checks this list against the `migrations/` directory, checksums included.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "signatures",
    include_str!("../migrations/0001_signatures.sql"),
)];

/// The migrator over [`MIGRATIONS`]; it records the same versions and checksums as
/// `sqlx::migrate!("./migrations")` would.
fn migrator() -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                let sql = sqlx::SqlStr::from_static(sql);
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql,
                    false,
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    /// The embedded list is the `migrations/` directory as sqlx reads it: same versions,
    /// descriptions and checksums, so databases migrated by earlier releases stay valid.
    #[tokio::test]
    async fn embedded_migrations_match_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let from_disk = sqlx::migrate::Migrator::new(dir).await.unwrap();
        let embedded = super::migrator();
        let key = |m: &sqlx::migrate::Migration| {
            (
                m.version,
                m.description.to_string(),
                m.checksum.to_vec(),
                m.no_tx,
            )
        };
        let disk: Vec<_> = from_disk.iter().map(key).collect();
        let ours: Vec<_> = embedded.iter().map(key).collect();
        assert!(!disk.is_empty());
        assert_eq!(ours, disk);
    }
}
