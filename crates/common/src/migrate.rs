//! sqlx migrations embedded in a binary (feature `migrate`), for the daemons with a database.
//!
//! A daemon lists its migrations as `(version, description, SQL)` with `include_str!` rather
//! than reading them with sqlx's `migrate!` macro, which would compile a second copy of sqlx
//! (and of SQLite) for the build host. [`migrator`] turns the list into the sqlx `Migrator`
//! that records the same versions and checksums as `sqlx::migrate!(DIR)` would, and
//! [`check_against_directory`] (called by each daemon's tests) proves the list is the directory
//! as sqlx reads it, so databases migrated by earlier releases stay valid.

use sqlx::migrate::{Migration, MigrationType, Migrator};

/// One embedded migration: version, description (the file name's, as `sqlx migrate` derives
/// it: `0002_audit_count.sql` is `audit count`) and SQL.
pub type Embedded = (i64, &'static str, &'static str);

/// The migrator over `list`.
pub fn migrator(list: &'static [Embedded]) -> Migrator {
    Migrator::with_migrations(
        list.iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sqlx::SqlStr::from_static(sql),
                    false,
                )
            })
            .collect(),
    )
}

/// Compares `list` with the migrations sqlx reads from `dir`: same versions, descriptions,
/// checksums and transaction modes.
///
/// # Errors
/// The directory cannot be read, is empty, or differs (both lists in the message).
pub async fn check_against_directory(
    list: &'static [Embedded],
    dir: &std::path::Path,
) -> Result<(), String> {
    let from_disk = Migrator::new(dir.to_owned())
        .await
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = |m: &Migration| {
        (
            m.version,
            m.description.to_string(),
            m.checksum.to_vec(),
            m.no_tx,
        )
    };
    let disk: Vec<_> = from_disk.iter().map(key).collect();
    let ours: Vec<_> = migrator(list).iter().map(key).collect();
    if disk.is_empty() {
        return Err(format!("{}: no migrations", dir.display()));
    }
    if ours != disk {
        return Err(format!(
            "{}: embedded {ours:?} but the directory has {disk:?}",
            dir.display()
        ));
    }
    Ok(())
}
