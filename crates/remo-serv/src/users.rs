//! The user database: the original `SqliteUserService` schema, through sqlx.
//!
//! `users(id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT UNIQUE, key TEXT, pub TEXT)`; `pub`
//! holds the PEM public key, as TEXT or (what the original `add_user` writes) as a BLOB. The
//! table is created when missing and never altered, so a database the original tools made
//! works unchanged, in both directions.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

use crate::keys::PublicKey;

/// The original's schema, word for word where it matters.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                      user TEXT UNIQUE, key TEXT, pub TEXT)";

/// Errors of the user database.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// SQLite failed (file missing, locked, not a database...).
    #[error("user database {path}: {source}")]
    Db {
        /// The database file.
        path: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// `useradd` of a name that exists.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// `userdel` of a name that does not exist.
    #[error("no user {0:?}")]
    Missing(String),
    /// The `--user-service` value is not `SqliteUserService:PATH`.
    #[error("unsupported user service {0:?}: expected SqliteUserService:PATH")]
    Spec(String),
}

/// A registered user as listed by `remo-admin users`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserEntry {
    /// Row id.
    pub id: i64,
    /// Login name.
    pub user: String,
    /// Key algorithm of the stored public key (`ed448`, `rsa`) or `invalid`.
    pub key_type: &'static str,
}

/// Parses the original's `--user-service` value: `SqliteUserService:PATH` (the path may not
/// contain `:`, as in the original, which split on it).
///
/// # Errors
/// [`UserError::Spec`] for any other class, such as `MemoryUserService`.
pub fn parse_user_service(spec: &str) -> Result<PathBuf, UserError> {
    let mut parts = spec.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("SqliteUserService"), Some(path), None) if !path.is_empty() => Ok(path.into()),
        _ => Err(UserError::Spec(spec.to_owned())),
    }
}

/// The `add_user` naming rule: `.sqlite` appended unless present or `:memory:`.
pub fn admin_db_path(base: &str) -> PathBuf {
    if base.ends_with(".sqlite") || base == ":memory:" {
        PathBuf::from(base)
    } else {
        PathBuf::from(format!("{base}.sqlite"))
    }
}

/// A handle on the user database.
#[derive(Debug, Clone)]
pub struct Users {
    pool: SqlitePool,
    path: String,
}

impl Users {
    /// Opens (creating when missing, mode 0600) the database and the `users` table.
    ///
    /// # Errors
    /// [`UserError::Db`].
    pub async fn open(path: &Path) -> Result<Self, UserError> {
        Self::open_with(path, true).await
    }

    /// Opens the database; with `create` false a missing file is an error (for checks that
    /// must not leave a file behind, owned by whoever ran them).
    ///
    /// # Errors
    /// [`UserError::Db`].
    pub async fn open_with(path: &Path, create: bool) -> Result<Self, UserError> {
        let shown = path.display().to_string();
        let db = |source| UserError::Db {
            path: shown.clone(),
            source,
        };
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(db)?
            .filename(path)
            .create_if_missing(create)
            .busy_timeout(std::time::Duration::from_secs(5));
        let existed = path.exists();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(db)?;
        if !existed {
            restrict_mode(path);
        }
        if create {
            sqlx::query(SCHEMA).execute(&pool).await.map_err(db)?;
        }
        Ok(Self { pool, path: shown })
    }

    fn err(&self, source: sqlx::Error) -> UserError {
        UserError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// The stored public key PEM bytes of `user` (BLOB or TEXT), if registered.
    ///
    /// # Errors
    /// [`UserError::Db`].
    pub async fn public_pem(&self, user: &str) -> Result<Option<Vec<u8>>, UserError> {
        let row = sqlx::query("SELECT CAST(pub AS BLOB) FROM users WHERE user = ?1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        match row {
            Some(row) => Ok(Some(
                row.try_get::<Option<Vec<u8>>, _>(0)
                    .map_err(|e| self.err(e))?
                    .unwrap_or_default(),
            )),
            None => Ok(None),
        }
    }

    /// Registers `user` with the PEM bytes of its public key, stored as a BLOB like the
    /// original `add_user`.
    ///
    /// # Errors
    /// [`UserError::Exists`] or [`UserError::Db`].
    pub async fn add(&self, user: &str, pem: &[u8]) -> Result<(), UserError> {
        let result = sqlx::query("INSERT INTO users (user, pub) VALUES (?1, ?2)")
            .bind(user)
            .bind(pem)
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {
                Err(UserError::Exists(user.to_owned()))
            }
            Err(err) => Err(self.err(err)),
        }
    }

    /// Removes `user`.
    ///
    /// # Errors
    /// [`UserError::Missing`] or [`UserError::Db`].
    pub async fn remove(&self, user: &str) -> Result<(), UserError> {
        let done = sqlx::query("DELETE FROM users WHERE user = ?1")
            .bind(user)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        if done.rows_affected() == 0 {
            return Err(UserError::Missing(user.to_owned()));
        }
        Ok(())
    }

    /// Every user, by id.
    ///
    /// # Errors
    /// [`UserError::Db`].
    pub async fn list(&self) -> Result<Vec<UserEntry>, UserError> {
        let rows = sqlx::query("SELECT id, user, CAST(pub AS BLOB) FROM users ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let mut users = Vec::with_capacity(rows.len());
        for row in rows {
            let pem: Option<Vec<u8>> = row.try_get(2).map_err(|e| self.err(e))?;
            let key_type = match PublicKey::from_pem(&pem.unwrap_or_default()) {
                Ok(PublicKey::Ed448(_)) => "ed448",
                Ok(PublicKey::Rsa(_)) => "rsa",
                Err(_) => "invalid",
            };
            users.push(UserEntry {
                id: row.try_get(0).map_err(|e| self.err(e))?,
                user: row
                    .try_get::<Option<String>, _>(1)
                    .map_err(|e| self.err(e))?
                    .unwrap_or_default(),
                key_type,
            });
        }
        Ok(users)
    }

    /// Closes the pool (waits for connections to finish).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A database the daemon creates holds public keys only, but it is still nobody else's
/// business: 0600.
fn restrict_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), %err, "could not restrict the user database to 0600");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_service_specs() {
        assert_eq!(
            parse_user_service("SqliteUserService:users_db.sqlite").unwrap(),
            PathBuf::from("users_db.sqlite")
        );
        assert!(parse_user_service("MemoryUserService:a:b").is_err());
        assert!(parse_user_service("SqliteUserService:").is_err());
        assert!(parse_user_service("SqliteUserService:a:b").is_err());
        assert_eq!(admin_db_path("users_db"), PathBuf::from("users_db.sqlite"));
        assert_eq!(admin_db_path("x.sqlite"), PathBuf::from("x.sqlite"));
        assert_eq!(admin_db_path(":memory:"), PathBuf::from(":memory:"));
    }

    #[tokio::test]
    async fn add_lookup_list_remove_with_blob_and_text_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users_db.sqlite");
        let users = Users::open(&path).await.unwrap();
        let key = crate::keys::PrivateKey::generate();
        let pem = PublicKey::ed448_pem(&key.verifying_key());
        users.add("alice", pem.as_bytes()).await.unwrap();
        assert!(matches!(
            users.add("alice", pem.as_bytes()).await,
            Err(UserError::Exists(_))
        ));
        // A row stored as TEXT (by hand or by another tool) reads the same.
        sqlx::query("INSERT INTO users (user, pub) VALUES ('bob', ?1)")
            .bind(pem.as_str())
            .execute(&users.pool)
            .await
            .unwrap();
        assert_eq!(
            users.public_pem("alice").await.unwrap().unwrap(),
            pem.as_bytes()
        );
        assert_eq!(
            users.public_pem("bob").await.unwrap().unwrap(),
            pem.as_bytes()
        );
        assert!(users.public_pem("Alice").await.unwrap().is_none());
        let typeof_alice: String =
            sqlx::query_scalar("SELECT typeof(pub) FROM users WHERE user = 'alice'")
                .fetch_one(&users.pool)
                .await
                .unwrap();
        assert_eq!(typeof_alice, "blob");
        let listed = users.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].key_type, "ed448");
        users.remove("bob").await.unwrap();
        assert!(matches!(
            users.remove("bob").await,
            Err(UserError::Missing(_))
        ));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
