//! The audit trail on both stores (SQLite, PostgreSQL): append-only, no signature before its
//! row is committed, a request's rows together or not at all, several instances into one
//! PostgreSQL, the schema migrations and who may run them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::both_stores;
use crate::support::{
    Backend, Options, PgAudit, TestServer, daemon_setup, full, pg_available, pki, sha256_hex,
    sql_as,
};

const BIN: &str = env!("CARGO_BIN_EXE_signing-server");

/// Runs `sql` as the table's owner (the owner role on PostgreSQL; on SQLite, the server's own
/// pool: the file's owner); the database's error text when it fails.
async fn try_sql(server: &TestServer, sql: &str) -> Result<(), String> {
    if let Some(pg) = &server.pg {
        return pg.as_owner(sql).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(server.service.audit.pool())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

both_stores!(
    every_signature_is_in_the_append_only_audit_table,
    |backend| async move {
        let server = TestServer::start(Options {
            backend,
            ..Options::default()
        })
        .await;
        let file = server.pkgs.join("one.bin");
        std::fs::write(&file, b"signed by path").unwrap();
        let answer =
            crate::support::Answer::parse(&server.alice_legacy(file.to_str().unwrap()).await);
        let by_path = answer.files()["one.bin"]["signature"]
            .as_str()
            .unwrap()
            .to_owned();
        let reply = server
            .alice(
                "POST",
                "/v1/sign?name=up.bin",
                full(&b"signed by upload"[..]),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let by_upload = reply.json()["signature"].as_str().unwrap().to_owned();

        let rows = server.service.audit.rows().await.unwrap();
        let keyid = server.keyid.clone();
        assert_eq!(
            rows,
            [
                (
                    "alice".to_owned(),
                    "path".to_owned(),
                    file.to_str().unwrap().to_owned(),
                    sha256_hex(b"signed by path"),
                    keyid.clone(),
                    by_path,
                ),
                (
                    "alice".to_owned(),
                    "upload".to_owned(),
                    "up.bin".to_owned(),
                    sha256_hex(b"signed by upload"),
                    keyid,
                    by_upload,
                ),
            ]
        );
        let trail = server.service.audit.trail().await.unwrap();
        assert!(trail.iter().all(|r| r.instance == "test"), "{trail:?}");

        let mut statements = vec![
            "UPDATE signatures SET identity = 'mallory'",
            "UPDATE signatures SET signature = 'forged' WHERE source = 'upload'",
            "DELETE FROM signatures",
            "DELETE FROM signatures WHERE id = 1",
        ];
        if backend == Backend::Postgres {
            statements.push("TRUNCATE signatures");
        }
        for statement in statements {
            let err = try_sql(&server, statement).await.unwrap_err();
            assert!(err.contains("append-only"), "{statement}: {err}");
        }
        assert_eq!(server.service.audit.rows().await.unwrap(), rows);
    }
);

both_stores!(
    a_request_whose_rows_are_refused_gets_no_signature_and_leaves_no_row,
    |backend| async move {
        let server = TestServer::start(Options {
            backend,
            ..Options::default()
        })
        .await;
        // The second of three files of one request is refused by the database.
        let trigger = match backend {
            Backend::Sqlite => {
                "CREATE TRIGGER poison BEFORE INSERT ON signatures WHEN NEW.name LIKE '%poison%' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;"
            }
            Backend::Postgres => {
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.name LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned row'; END IF; \
                 RETURN NEW; END; $$; \
                 CREATE TRIGGER poison BEFORE INSERT ON signatures FOR EACH ROW \
                 EXECUTE FUNCTION poison();"
            }
        };
        try_sql(&server, trigger).await.unwrap();
        for name in ["a.bin", "b-poison.bin", "c.bin"] {
            std::fs::write(server.pkgs.join(name), name.as_bytes()).unwrap();
        }
        let text = server.alice_legacy(server.pkgs.to_str().unwrap()).await;
        assert!(!text.contains("\"signature\""), "{text}");
        assert!(text.contains("audit"), "{text}");
        let reply = server
            .alice("POST", "/v1/sign?name=poison.bin", full(&b"x"[..]))
            .await;
        assert_eq!(reply.status, 500, "{}", reply.text());
        assert!(!reply.text().contains("\"signature\""), "{}", reply.text());
        assert!(server.service.audit.rows().await.unwrap().is_empty());
        // The writer goes on: the next request is recorded.
        let reply = server
            .alice("POST", "/v1/sign?name=fine.bin", full(&b"x"[..]))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(server.service.audit.rows().await.unwrap().len(), 1);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_owner_hits_the_triggers_and_the_service_role_lacks_the_privilege() {
    if !pg_available() {
        return;
    }
    let pg = PgAudit::unmigrated().await;
    let (owner_url, service_url) = (pg.owner_url.clone(), pg.service_url.clone());
    let database = signing_server::config::Database::Postgres(owner_url.clone());
    assert_eq!(
        signing_server::audit::Audit::migrate(&database)
            .await
            .unwrap(),
        2
    );
    pg.grant_service().await;
    let server = TestServer::start(Options {
        database: Some(service_url.clone()),
        ..Options::default()
    })
    .await;
    let reply = server
        .alice("POST", "/v1/sign?name=a.bin", full(&b"a"[..]))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    for statement in [
        "UPDATE signatures SET identity = 'mallory'",
        "DELETE FROM signatures",
        "TRUNCATE signatures",
    ] {
        let err = sql_as(&owner_url, statement).await.unwrap_err();
        assert!(
            err.contains("the audit table is append-only"),
            "owner: {statement}: {err}"
        );
        let err = sql_as(&service_url, statement).await.unwrap_err();
        assert!(
            err.contains("permission denied"),
            "service: {statement}: {err}"
        );
    }
    // Nor may the service role undo the triggers or the schema.
    for statement in [
        "DROP TRIGGER signatures_no_update_or_delete ON signatures",
        "ALTER TABLE signatures DISABLE TRIGGER ALL",
        "DROP TABLE signatures",
    ] {
        let err = sql_as(&service_url, statement).await.unwrap_err();
        assert!(err.contains("must be owner"), "service: {statement}: {err}");
    }
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_no_signature_is_handed_out_when_the_insert_is_refused() {
    if !pg_available() {
        return;
    }
    let pg = PgAudit::ready().await;
    let (owner_url, service_url, service_role) = (
        pg.owner_url.clone(),
        pg.service_url.clone(),
        pg.service_role.clone(),
    );
    let server = TestServer::start(Options {
        database: Some(service_url.clone()),
        ..Options::default()
    })
    .await;
    let reply = server
        .alice("POST", "/v1/sign?name=before.bin", full(&b"a"[..]))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    sql_as(
        &owner_url,
        &format!("REVOKE INSERT ON signatures FROM {service_role}"),
    )
    .await
    .unwrap();
    std::fs::write(server.pkgs.join("x.bin"), b"x").unwrap();
    std::fs::write(server.pkgs.join("y.bin"), b"y").unwrap();
    let text = server.alice_legacy(server.pkgs.to_str().unwrap()).await;
    assert!(!text.contains("\"signature\""), "{text}");
    let reply = server
        .alice("POST", "/v1/sign?name=after.bin", full(&b"b"[..]))
        .await;
    assert_eq!(reply.status, 500, "{}", reply.text());
    assert!(!reply.text().contains("\"signature\""), "{}", reply.text());
    let rows = server.service.audit.rows().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].2, "before.bin");
}

/// A role that can add a trigger (one the role check refuses; here granted after the start,
/// as with `allow_privileged_role`) adds a `BEFORE INSERT` trigger returning NULL, in
/// `pg_temp`: the INSERT then succeeds writing no row. The writer counts the rows written, so
/// the request fails and no signature leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_trigger_that_drops_rows_fails_the_request() {
    if !pg_available() {
        return;
    }
    let pg = PgAudit::ready().await;
    let server = TestServer::start(Options {
        database: Some(pg.service_url.clone()),
        ..Options::default()
    })
    .await;
    let reply = server
        .alice("POST", "/v1/sign?name=before.bin", full(&b"a"[..]))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The function is the owner's here (an attacker's own lives in pg_temp); the trigger is
    // the service role's, which TRIGGER allows.
    pg.as_owner(&format!(
        "GRANT TRIGGER ON signatures TO {}; \
         CREATE FUNCTION drop_row() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RETURN NULL; END $$;",
        pg.service_role
    ))
    .await
    .unwrap();
    sql_as(
        &pg.service_url,
        "CREATE TRIGGER aaa_drop BEFORE INSERT ON signatures FOR EACH ROW \
         EXECUTE FUNCTION drop_row();",
    )
    .await
    .unwrap();
    let reply = server
        .alice("POST", "/v1/sign?name=after.bin", full(&b"b"[..]))
        .await;
    assert_eq!(reply.status, 500, "{}", reply.text());
    assert!(!reply.text().contains("\"signature\""), "{}", reply.text());
    std::fs::write(server.pkgs.join("x.bin"), b"x").unwrap();
    std::fs::write(server.pkgs.join("y.bin"), b"y").unwrap();
    let text = server.alice_legacy(server.pkgs.to_str().unwrap()).await;
    assert!(!text.contains("\"signature\""), "{text}");
    let rows = server.service.audit.rows().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].2, "before.bin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sign_concurrently_into_one_postgres_trail() {
    if !pg_available() {
        return;
    }
    let url = PgAudit::ready().await.service_url;
    let mut servers = Vec::new();
    for instance in ["east", "west"] {
        servers.push(Arc::new(
            TestServer::start(Options {
                database: Some(url.clone()),
                instance: Some(instance.into()),
                ..Options::default()
            })
            .await,
        ));
    }
    const CLIENTS: usize = 8;
    const EACH: usize = 12;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let servers = servers.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for n in 0..EACH {
                let (instance, server) = if (client + n) % 2 == 0 {
                    ("east", &servers[0])
                } else {
                    ("west", &servers[1])
                };
                let name = format!("c{client}-{n}.bin");
                let reply = server
                    .alice(
                        "POST",
                        &format!("/v1/sign?name={name}"),
                        full(name.clone().into_bytes()),
                    )
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                let signature = reply.json()["signature"].as_str().unwrap().to_owned();
                got.push((signature, instance, name));
            }
            got
        }));
    }
    let mut handed_out = Vec::new();
    for task in tasks {
        handed_out.extend(task.await.unwrap());
    }
    assert_eq!(handed_out.len(), CLIENTS * EACH);
    let trail = servers[0].service.audit.trail().await.unwrap();
    assert_eq!(trail.len(), handed_out.len());
    let mut by_signature: HashMap<&str, Vec<&signing_server::audit::Row>> = HashMap::new();
    for row in &trail {
        by_signature.entry(&row.signature).or_default().push(row);
    }
    for (signature, instance, name) in &handed_out {
        let rows = &by_signature[signature.as_str()];
        assert_eq!(rows.len(), 1, "{signature}");
        assert_eq!(rows[0].instance, *instance);
        assert_eq!(rows[0].name, *name);
    }
    for instance in ["east", "west"] {
        assert_eq!(
            trail.iter().filter(|r| r.instance == instance).count(),
            CLIENTS * EACH / 2
        );
    }
}

#[tokio::test]
async fn a_sqlite_database_from_before_instances_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.sqlite");
    common::daemon::create_private_file(&file, 0o755).unwrap();
    {
        // What the release before issue 20 made: migration 1 only, and a row.
        use sqlx::ConnectOptions as _;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&file)
            .connect()
            .await
            .unwrap();
        const OLD: &[common::migrate::Embedded] = &[(
            1,
            "signatures",
            include_str!("../../migrations/0001_signatures.sql"),
        )];
        common::migrate::migrator(OLD).run(&mut conn).await.unwrap();
        sqlx::query(
            "INSERT INTO signatures (signed_at, identity, source, name, sha256, size, key_name, \
             keyid, package, fileset, vrmf, ftype, timestamp, signature) VALUES \
             ('2026-01-01T00:00:00Z', 'alice', 'upload', 'old.bin', 'aa', 1, 'release', 'k', \
             'p', 'f', 'v', 'I', 't', 'old-signature')",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let server = TestServer::start(Options {
        database: Some(file.to_str().unwrap().to_owned()),
        ..Options::default()
    })
    .await;
    let reply = server
        .alice("POST", "/v1/sign?name=new.bin", full(&b"new"[..]))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let trail = server.service.audit.trail().await.unwrap();
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert_eq!(
        (
            trail[0].instance.as_str(),
            trail[0].name.as_str(),
            trail[0].signature.as_str()
        ),
        ("", "old.bin", "old-signature")
    );
    assert_eq!(
        (trail[1].instance.as_str(), trail[1].name.as_str()),
        ("test", "new.bin")
    );
    // Still append-only after the migration.
    let err = try_sql(&server, "UPDATE signatures SET instance = 'x'")
        .await
        .unwrap_err();
    assert!(err.contains("append-only"), "{err}");
}

/// The service role cannot migrate: the daemon refuses to start on an old schema and names
/// `--migrate`; the owner runs it; then the service role starts without running any DDL. The
/// URL's password never reaches the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_an_owner_migrates_and_the_service_role_only_checks_the_version() {
    if !pg_available() {
        return;
    }
    let pg = PgAudit::unmigrated().await;
    let (owner_url, service_url) = (pg.owner_url.clone(), pg.service_url.clone());
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = daemon_setup(dir.path(), "");
    let with_password = |url: &str| {
        let mut parsed = url::Url::parse(url).unwrap();
        parsed.set_password(Some("s3cret-pw")).unwrap();
        parsed.to_string()
    };
    let run = |url: &str, flag: &str| {
        std::process::Command::new(BIN)
            .arg(flag)
            .arg("-c")
            .arg(&config)
            .env("SIGNING_SERVER_DATABASE", with_password(url))
            .env("SIGNING_SERVER_INSTANCE", "east-1")
            .output()
            .unwrap()
    };
    let out = run(&service_url, "--check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("signing-server --migrate"), "{stderr}");
    assert!(
        !stderr.contains("s3cret-pw") && stderr.contains("***"),
        "{stderr}"
    );

    // The owner's host need not have the package roots.
    std::fs::remove_dir(dir.path().join("pkgs")).unwrap();
    let out = run(&owner_url, "--migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("schema version 2"), "{stdout}");
    assert!(!stdout.contains("s3cret-pw"), "{stdout}");
    pg.grant_service().await;
    std::fs::create_dir(dir.path().join("pkgs")).unwrap();

    let out = run(&service_url, "--check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(stdout.contains("(instance east-1)"), "{stdout}");
    assert!(!stdout.contains("s3cret-pw"), "{stdout}");
    // Migrating again is a no-op.
    assert!(run(&owner_url, "--migrate").status.success());
    let _ = pki();
}

/// The SQLite store as before PostgreSQL came: created 0600, WAL, `synchronous = FULL`, and a
/// planted file (a symbolic link) refused.
#[tokio::test]
async fn the_sqlite_file_is_private_durable_and_never_a_planted_link() {
    use sqlx::Row as _;
    use std::os::unix::fs::PermissionsExt as _;
    let server = TestServer::start(Options::default()).await;
    let file = server.state.join("audit.sqlite");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut conn = server.service.audit.pool().acquire().await.unwrap();
    let journal: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(journal, "wal");
    let synchronous: i64 = sqlx::query("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(synchronous, 2, "FULL");
    drop(conn);

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere.sqlite");
    std::fs::write(&target, b"").unwrap();
    let link = dir.path().join("audit.sqlite");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let database = signing_server::config::Database::Sqlite(link);
    let err = signing_server::audit::Audit::open(&database, "test", Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing") || err.contains("symbolic"),
        "{err}"
    );
}

/// A role that could undo the trail (a superuser, the table's owner, or one granted UPDATE,
/// DELETE, TRUNCATE or TRIGGER, itself or through a role it is a member of, or SET on
/// session_replication_role) is refused at start and by `--check-config` with 77, naming the
/// documented grants; `allow_privileged_role = true` lets it start, with a warning; the
/// service role of the documented set-up starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_role_that_could_undo_the_trail_is_refused() {
    if !pg_available() {
        return;
    }
    let pg = PgAudit::ready().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = daemon_setup(dir.path(), "");
    let allowing = dir.path().join("allowing.toml");
    std::fs::write(
        &allowing,
        format!(
            "allow_privileged_role = true\n{}",
            std::fs::read_to_string(&config).unwrap()
        ),
    )
    .unwrap();
    let run = |config: &std::path::Path, url: &str| {
        std::process::Command::new(BIN)
            .arg("--check-config")
            .arg("-c")
            .arg(config)
            .env("SIGNING_SERVER_DATABASE", url)
            .env("SIGNING_SERVER_INSTANCE", "east-1")
            .output()
            .unwrap()
    };
    let out = run(&config, &pg.service_url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let superuser = crate::support::with_database(&crate::support::pg_url().unwrap(), &pg.name);
    for (url, reason) in [
        (&pg.owner_url, "owns the signatures table"),
        (&superuser, "is a superuser"),
    ] {
        let out = run(&config, url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
        assert!(
            stderr.contains("GRANT SELECT, INSERT ON signatures")
                && stderr.contains("allow_privileged_role"),
            "{stderr}"
        );
        let out = run(&allowing, url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("allow_privileged_role") && stderr.contains(reason),
            "the warning: {stderr}"
        );
    }
    for privilege in ["UPDATE", "DELETE", "TRUNCATE", "TRIGGER"] {
        pg.as_owner(&format!(
            "GRANT {privilege} ON signatures TO {}",
            pg.service_role
        ))
        .await
        .unwrap();
        let out = run(&config, &pg.service_url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{privilege}: {stderr}");
        assert!(
            stderr.contains(&format!("may {privilege}")),
            "{privilege}: {stderr}"
        );
        pg.as_owner(&format!(
            "REVOKE {privilege} ON signatures FROM {}",
            pg.service_role
        ))
        .await
        .unwrap();
    }
    assert!(run(&config, &pg.service_url).status.success());
    // Membership counts, even without inheriting: SET ROLE reaches the role's privileges.
    let admin = crate::support::pg_url().unwrap();
    let role = &pg.service_role;
    let mut memberships = vec![
        ("postgres".to_owned(), "is a superuser"),
        ("pg_write_all_data".to_owned(), "may UPDATE"),
        (format!("{}_owner", pg.name), "owns the signatures table"),
    ];
    let writer = format!("{}_writer", pg.name);
    crate::support::sql_as(
        &admin,
        &format!("CREATE ROLE {writer} NOLOGIN; ALTER ROLE {role} NOINHERIT"),
    )
    .await
    .unwrap();
    pg.as_owner(&format!("GRANT DELETE ON signatures TO {writer}"))
        .await
        .unwrap();
    memberships.push((writer, "may DELETE"));
    for (member_of, reason) in memberships {
        crate::support::sql_as(&admin, &format!("GRANT {member_of} TO {role}"))
            .await
            .unwrap();
        let out = run(&config, &pg.service_url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{member_of}: {stderr}");
        assert!(stderr.contains(reason), "{member_of}: {stderr}");
        crate::support::sql_as(&admin, &format!("REVOKE {member_of} FROM {role}"))
            .await
            .unwrap();
        assert!(run(&config, &pg.service_url).status.success());
    }
    // From PostgreSQL 15 SET on session_replication_role (which turns triggers off).
    let granted = crate::support::sql_as(
        &admin,
        &format!("GRANT SET ON PARAMETER session_replication_role TO {role}"),
    )
    .await;
    if granted.is_ok() {
        let out = run(&config, &pg.service_url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{stderr}");
        assert!(stderr.contains("session_replication_role"), "{stderr}");
        crate::support::sql_as(
            &admin,
            &format!("REVOKE SET ON PARAMETER session_replication_role FROM {role}"),
        )
        .await
        .unwrap();
    }
    assert!(run(&config, &pg.service_url).status.success());
}

/// A URL that reaches PostgreSQL over TCP without `sslmode=verify-full`, or through a socket
/// directory anyone can write, is refused before any connection: 78, the fix named, the
/// password masked.
#[test]
fn a_plaintext_or_squattable_postgres_url_is_refused_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = daemon_setup(dir.path(), "");
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    for (url, needle) in [
        (
            "postgres://svc:s3cret-pw@127.0.0.1:5432/audit".to_owned(),
            "sslmode=verify-full",
        ),
        (
            "postgres://svc:s3cret-pw@db.example.org/audit?sslmode=require".to_owned(),
            "sslmode=verify-full",
        ),
        (
            format!(
                "postgres://svc:s3cret-pw@x/audit?host={}",
                open_dir.display()
            ),
            "writable by everyone",
        ),
    ] {
        for flag in ["--check-config", "--migrate"] {
            let out = std::process::Command::new(BIN)
                .arg(flag)
                .arg("-c")
                .arg(&config)
                .env("SIGNING_SERVER_DATABASE", &url)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{flag} {url}: {stderr}");
            assert!(stderr.contains(needle), "{stderr}");
            assert!(stderr.contains("host=/run/postgresql"), "{stderr}");
            assert!(!stderr.contains("s3cret-pw"), "{stderr}");
        }
    }
}

/// A commit that does not come within `audit_timeout_secs` (the table locked by another
/// session) fails the request with the usual refusal and hands out no signature; once the
/// lock is gone, signing goes on, and every signature handed out has its row.
mod a_stuck_audit_commit_times_out_and_hands_out_nothing {
    use super::*;

    async fn run(backend: Backend) {
        let limits = signing_server::config::Limits {
            audit_timeout_secs: 2,
            ..crate::support::test_limits()
        };
        let server = TestServer::start(Options {
            backend,
            limits,
            ..Options::default()
        })
        .await;
        let ok = server
            .alice("POST", "/v1/sign?name=before.bin", full(&b"a"[..]))
            .await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        let before = ok.json()["signature"].as_str().unwrap().to_owned();
        let lock = Locker::take(&server).await;
        let started = std::time::Instant::now();
        let reply = server
            .alice("POST", "/v1/sign?name=stuck.bin", full(&b"b"[..]))
            .await;
        let waited = started.elapsed();
        assert_eq!(reply.status, 500, "{}", reply.text());
        assert!(
            reply.text().contains("nothing was signed"),
            "{}",
            reply.text()
        );
        assert!(!reply.text().contains("\"signature\""), "{}", reply.text());
        assert!(
            waited >= std::time::Duration::from_secs(2)
                && waited < std::time::Duration::from_secs(8),
            "{waited:?}"
        );
        lock.release().await;
        let after = server
            .alice("POST", "/v1/sign?name=after.bin", full(&b"c"[..]))
            .await;
        assert_eq!(after.status, 200, "{}", after.text());
        let after = after.json()["signature"].as_str().unwrap().to_owned();
        let rows = server.service.audit.rows().await.unwrap();
        for handed_out in [&before, &after] {
            assert_eq!(
                rows.iter().filter(|r| &r.5 == handed_out).count(),
                1,
                "{rows:?}"
            );
        }
        // The stuck row may have been committed once the lock went, never anything else.
        assert!(rows.len() <= 3, "{rows:?}");
    }

    /// Another session holding the table in an open transaction.
    struct Locker(sqlx::AnyConnection);

    impl Locker {
        async fn take(server: &TestServer) -> Self {
            use sqlx::Connection as _;
            let (url, lock) = match &server.pg {
                Some(pg) => (
                    pg.owner_url.clone(),
                    "BEGIN; LOCK TABLE signatures IN ACCESS EXCLUSIVE MODE;",
                ),
                None => (
                    format!("sqlite://{}", server.state.join("audit.sqlite").display()),
                    "BEGIN EXCLUSIVE;",
                ),
            };
            sqlx::any::install_default_drivers();
            let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(lock).execute(&mut conn).await.unwrap();
            Self(conn)
        }

        async fn release(mut self) {
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut self.0)
                .await
                .unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if pg_available() {
            run(Backend::Postgres).await;
        }
    }
}
