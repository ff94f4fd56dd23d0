//! The audit trail: an append-only SQLite table of every signature, and the original's
//! `signatures.txt`.
//!
//! The database file is created 0600 and runs in WAL mode; rows go in one transaction per
//! request, so a request's signatures are recorded together or not at all. `signatures.txt`
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

/// The audit database.
#[derive(Debug, Clone)]
pub struct Audit {
    pool: SqlitePool,
}

impl Audit {
    /// Opens (creating 0600 when missing) and migrates the database.
    ///
    /// # Errors
    /// The file cannot be created or opened, or a migration fails.
    pub async fn open(path: &Path) -> Result<Self, sqlx::Error> {
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt as _;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)?;
        }
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Records a request's signatures in one transaction.
    ///
    /// # Errors
    /// The database refuses the rows.
    pub async fn record(&self, records: &[Record]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        for r in records {
            sqlx::query(
                "INSERT INTO signatures (signed_at, identity, source, name, sha256, size, key_name, keyid, package, fileset, vrmf, ftype, timestamp, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&now)
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
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
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
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    // Readable like the original's file: signatures are public.
    use std::os::unix::fs::PermissionsExt as _;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
