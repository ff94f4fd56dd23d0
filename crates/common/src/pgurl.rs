//! The rule every daemon applies to a `postgres://` URL before it connects (feature
//! `migrate`): the server is reached either over TCP with `sslmode=verify-full` or over a Unix
//! socket in a directory that not everyone can write.
//!
//! Anything weaker lets a local user who binds the port (or plants the socket) while
//! PostgreSQL restarts take the daemon's password (cleartext or MD5 authentication) and
//! acknowledge its writes: a signature handed out with no audit row, a job registered nowhere.
//! `verify-ca` is not enough: it accepts any certificate of the CA, whichever host it names.
//!
//! The host is read as sqlx reads it (the URL's host, then `host=` and `hostaddr=` in order,
//! the last one winning; a value starting with `/` is a socket directory), and so is the TLS
//! mode (`sslmode=` or `ssl-mode=`, else `PGSSLMODE`). A URL that names no host is refused:
//! sqlx would then pick a socket in `/tmp` when one exists, at each connection.

use std::path::{Path, PathBuf};

/// Where a valid URL reaches the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP to this host (name or address), with `sslmode=verify-full`.
    Tcp(String),
    /// The Unix socket in this directory.
    Socket(PathBuf),
}

/// What the daemon's message names as the fix.
const FIX: &str = "add sslmode=verify-full (with sslrootcert=CA-FILE when the server's \
                   certificate is not from a CA in the system store), or use the local \
                   socket: ?host=/run/postgresql";

/// Checks `url` with the process's `PGSSLMODE` (see the module's documentation).
///
/// # Errors
/// The rule's message: what is wrong and how to fix it (the URL's password is not in it).
pub fn check(url: &str) -> Result<Endpoint, String> {
    let env = std::env::var("PGSSLMODE").ok();
    let endpoint = check_with(url, env.as_deref())?;
    check_socket_dir(&endpoint)?;
    let root_cert = root_cert(url).or_else(|| std::env::var("PGSSLROOTCERT").ok());
    if let Some(file) = root_cert.filter(|f| !f.starts_with("-----BEGIN")) {
        check_root_cert(Path::new(&file))?;
    }
    Ok(endpoint)
}

/// Whether `text` is a PostgreSQL URL: its scheme, in any case, is `postgres` or
/// `postgresql` (as `url` reads it: leading spaces and control characters are skipped). Every
/// daemon decides with this one test, so `POSTGRES://` meets the URL rule too.
#[must_use]
pub fn is_postgres_url(text: &str) -> bool {
    let text = text.trim_start_matches(|c: char| c <= ' ');
    text.split_once(':').is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
    })
}

/// The URL's CA file (`sslrootcert=`, `ssl-root-cert=` or `ssl-ca=`, the last one winning,
/// as in sqlx).
fn root_cert(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    parsed
        .query_pairs()
        .filter(|(key, _)| matches!(&**key, "sslrootcert" | "ssl-root-cert" | "ssl-ca"))
        .map(|(_, value)| value.into_owned())
        .last()
}

/// The CA file that `verify-full` trusts must be one nobody else can replace: it (and a link
/// to it) belongs to root or to us and neither its group nor others may write to it, and its
/// directories pass [`crate::daemon::check_trusted_ancestors`].
///
/// # Errors
/// The file cannot be read or another user could change it.
pub fn check_root_cert(file: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let why = "the sslrootcert file must be one only root or this user can change, else \
               whoever can change it picks the server the daemon trusts";
    let euid = rustix::process::geteuid().as_raw();
    let shown = |e: &dyn std::fmt::Display| format!("sslrootcert {}: {e}", file.display());
    let canonical = std::fs::canonicalize(file).map_err(|e| shown(&e))?;
    for path in [file, canonical.as_path()] {
        let link = std::fs::symlink_metadata(path).map_err(|e| shown(&e))?;
        let meta = std::fs::metadata(path).map_err(|e| shown(&e))?;
        for m in [&link, &meta] {
            if (m.uid() != euid && m.uid() != 0) || (!m.is_symlink() && m.mode() & 0o022 != 0) {
                return Err(shown(&format!(
                    "{why} (owner uid {}, mode {:o})",
                    m.uid(),
                    m.mode() & 0o7777
                )));
            }
        }
        let parent = std::path::absolute(path).map_err(|e| shown(&e))?;
        if let Some(dir) = parent.parent() {
            crate::daemon::check_trusted_ancestors(dir, why).map_err(|e| shown(&e))?;
        }
    }
    Ok(())
}

/// The URL rule alone, with `pgsslmode` as the environment's `PGSSLMODE` (no file system
/// check).
///
/// # Errors
/// See [`check`].
pub fn check_with(url: &str, pgsslmode: Option<&str>) -> Result<Endpoint, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("the URL does not parse: {e}"))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(format!("{}://: not a postgres:// URL", parsed.scheme()));
    }
    let mut host: Option<String> = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .map(percent_decode);
    let mut sslmode: Option<String> = None;
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "host" | "hostaddr" => host = Some(value.into_owned()),
            "sslmode" | "ssl-mode" => sslmode = Some(value.into_owned()),
            _ => {}
        }
    }
    let Some(host) = host else {
        return Err(format!(
            "the URL names no server: name it, over TCP with sslmode=verify-full, or {}",
            "the local socket: ?host=/run/postgresql"
        ));
    };
    if host.contains(',') {
        return Err(format!(
            "several hosts ({host}) are not supported: name one server"
        ));
    }
    if host.starts_with('/') {
        return Ok(Endpoint::Socket(PathBuf::from(host)));
    }
    let mode = sslmode.or_else(|| pgsslmode.map(str::to_owned));
    match mode.as_deref() {
        Some(m) if m.eq_ignore_ascii_case("verify-full") => Ok(Endpoint::Tcp(host)),
        other => Err(format!(
            "the server {host} is reached over TCP with sslmode={}, which lets anyone who \
             binds its port take the password and acknowledge writes: {FIX}",
            other.unwrap_or("prefer (the default)")
        )),
    }
}

/// A socket directory must exist, belong to root, to us or to the `postgres` user (as in
/// `/etc/passwd`), not be writable by everyone (anyone could plant the socket there while the
/// server is down; its group may write: `/run/postgresql` is `postgres:postgres 2775`), and its
/// directories above pass [`crate::daemon::check_trusted_ancestors`].
///
/// # Errors
/// The directory cannot be read, is world-writable, belongs to another user, or sits under a
/// directory another user could replace.
pub fn check_socket_dir(endpoint: &Endpoint) -> Result<(), String> {
    let Endpoint::Socket(dir) = endpoint else {
        return Ok(());
    };
    socket_dir_is_private(dir)
}

fn socket_dir_is_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("the socket directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "the socket directory {} is not a directory",
            dir.display()
        ));
    }
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(format!(
            "the socket directory {} is writable by everyone, so anyone could plant the \
             server's socket there: use the server's own directory (Debian: \
             ?host=/run/postgresql) or TCP with sslmode=verify-full",
            dir.display()
        ));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid && Some(meta.uid()) != postgres_uid() {
        return Err(format!(
            "the socket directory {} belongs to uid {}, not to root, this user or postgres, \
             so its owner could plant the server's socket there",
            dir.display(),
            meta.uid()
        ));
    }
    let shown = |e: std::io::Error| format!("the socket directory {}: {e}", dir.display());
    let why = "the socket directory's path must be one only root or this user can change";
    for path in [
        std::path::absolute(dir).map_err(shown)?,
        std::fs::canonicalize(dir).map_err(shown)?,
    ] {
        let link = std::fs::symlink_metadata(&path).map_err(shown)?;
        if link.is_symlink() && link.uid() != 0 && link.uid() != euid {
            return Err(format!(
                "the socket directory {} is a link of uid {}: {why}",
                dir.display(),
                link.uid()
            ));
        }
        if let Some(parent) = path.parent() {
            crate::daemon::check_trusted_ancestors(parent, why).map_err(shown)?;
        }
    }
    Ok(())
}

/// The `postgres` user's uid, from `/etc/passwd` (none when it has no such line).
fn postgres_uid() -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == "postgres").then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| text.to_owned(), |(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Endpoint {
        check_with(url, None).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str, env: Option<&str>) -> String {
        match check_with(url, env) {
            Ok(e) => panic!("{url} accepted as {e:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn tcp_needs_verify_full_whatever_the_host_form() {
        for url in [
            "postgres://svc:pw@db.example.org/audit",
            "postgres://svc:pw@db.example.org:5433/audit",
            "postgresql://svc@127.0.0.1:5432/audit",
            "postgres://svc@[::1]:5432/audit",
            "postgres://svc@[2001:db8::1]/audit",
            "postgres:///audit?host=db.example.org",
            "postgres:///audit?hostaddr=10.0.0.5",
            "postgres:///audit?user=svc&hostaddr=::1",
            // The last host wins (as in sqlx): a socket first does not make TCP safe.
            "postgres:///audit?host=/run/postgresql&host=db.example.org",
        ] {
            for mode in ["", "disable", "allow", "prefer", "require", "verify-ca"] {
                let sep = if url.contains('?') { '&' } else { '?' };
                let with = if mode.is_empty() {
                    url.to_owned()
                } else {
                    format!("{url}{sep}sslmode={mode}")
                };
                let err = refused(&with, None);
                assert!(err.contains("sslmode=verify-full"), "{with}: {err}");
                assert!(err.contains("host=/run/postgresql"), "{with}: {err}");
                assert!(!err.contains("pw"), "{with}: the password is in {err}");
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            assert!(matches!(
                ok(&format!(
                    "{url}{sep}sslmode=verify-full&sslrootcert=/etc/ca.pem"
                )),
                Endpoint::Tcp(_)
            ));
            assert!(matches!(
                ok(&format!("{url}{sep}ssl-mode=VERIFY-FULL")),
                Endpoint::Tcp(_)
            ));
        }
        assert_eq!(
            ok("postgres://svc@[::1]:5432/audit?sslmode=verify-full"),
            Endpoint::Tcp("[::1]".into())
        );
    }

    #[test]
    fn pgsslmode_applies_when_the_url_says_nothing() {
        let url = "postgres://svc@db.example.org/audit";
        assert!(matches!(
            check_with(url, Some("verify-full")),
            Ok(Endpoint::Tcp(_))
        ));
        refused(url, Some("require"));
        refused(url, Some("verify-ca"));
        // The URL's own mode wins over the environment, as in sqlx.
        refused(&format!("{url}?sslmode=require"), Some("verify-full"));
        assert!(check_with(&format!("{url}?sslmode=verify-full"), Some("disable")).is_ok());
    }

    #[test]
    fn a_socket_is_accepted_by_the_url_rule_whatever_the_mode() {
        assert_eq!(
            ok("postgres:///audit?host=/run/postgresql"),
            Endpoint::Socket("/run/postgresql".into())
        );
        assert_eq!(
            ok("postgres://svc@%2Frun%2Fpostgresql/audit"),
            Endpoint::Socket("/run/postgresql".into())
        );
        assert_eq!(
            ok("postgres://svc@db.example.org/audit?host=/run/postgresql&sslmode=disable"),
            Endpoint::Socket("/run/postgresql".into())
        );
    }

    #[test]
    fn no_host_and_several_hosts_are_refused() {
        let err = refused("postgres:///audit", Some("verify-full"));
        assert!(err.contains("names no server"), "{err}");
        let err = refused("postgres:///audit?user=svc&sslmode=verify-full", None);
        assert!(err.contains("names no server"), "{err}");
        for url in [
            "postgres:///audit?host=a.example,b.example&sslmode=verify-full",
            "postgres:///audit?host=/run/postgresql,db.example",
        ] {
            let err = refused(url, None);
            assert!(err.contains("several hosts"), "{url}: {err}");
        }
        let err = refused("mysql://x@y/z", None);
        assert!(err.contains("not a postgres"), "{err}");
        refused("postgres://svc@[bad/db", None);
    }

    #[test]
    fn the_socket_directory_must_exist_and_not_be_world_writable() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let set = |mode| {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let socket = Endpoint::Socket(dir.path().to_owned());
        for mode in [0o700, 0o755, 0o775, 0o2775] {
            set(mode);
            check_socket_dir(&socket).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
        }
        for mode in [0o777, 0o1777, 0o703] {
            set(mode);
            let err = check_socket_dir(&socket).unwrap_err();
            assert!(err.contains("writable by everyone"), "{mode:o}: {err}");
        }
        let missing = Endpoint::Socket(dir.path().join("missing"));
        assert!(check_socket_dir(&missing).is_err());
        let file = dir.path().join("file");
        set(0o755);
        std::fs::write(&file, "").unwrap();
        assert!(check_socket_dir(&Endpoint::Socket(file)).is_err());
        // TCP endpoints have no directory to check.
        check_socket_dir(&Endpoint::Tcp("db".into())).unwrap();
        // The full check reads the directory from the URL.
        let url = format!("postgres:///audit?host={}", dir.path().display());
        assert!(check(&url).is_ok());
        set(0o1777);
        assert!(check(&url).is_err());
        set(0o700);
    }

    #[test]
    fn any_case_of_the_scheme_is_a_postgres_url() {
        for url in [
            "postgres://x@h/db",
            "POSTGRES://x:pw@h/db",
            "Postgresql://x@h/db",
            " postgresql:///db?host=/run/postgresql",
            "postgres:///db",
        ] {
            assert!(is_postgres_url(url), "{url}");
        }
        for text in [
            "audit.db",
            "sqlite://x.db",
            "postgres",
            "/var/lib/postgres://x",
            "",
        ] {
            assert!(!is_postgres_url(text), "{text}");
        }
        // And the rule then applies to it.
        let err = refused("POSTGRES://svc:pw@db.example.org/audit", None);
        assert!(err.contains("sslmode=verify-full"), "{err}");
    }

    fn as_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn chown(path: &Path, uid: u32) {
        rustix::fs::chown(path, Some(rustix::process::Uid::from_raw(uid)), None).unwrap();
    }

    #[test]
    fn the_socket_directory_belongs_to_root_us_or_postgres_under_trusted_parents() {
        use std::os::unix::fs::PermissionsExt as _;
        if !as_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("sock");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = Endpoint::Socket(dir.clone());
        check_socket_dir(&socket).unwrap();
        chown(&dir, 65534);
        let err = check_socket_dir(&socket).unwrap_err();
        assert!(err.contains("belongs to uid 65534"), "{err}");
        if let Some(uid) = postgres_uid() {
            // As scripts/with-postgres makes it: postgres-owned 0755 (or Debian's 2775).
            chown(&dir, uid);
            check_socket_dir(&socket).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
            check_socket_dir(&socket).unwrap();
        }
        // A parent another user owns could swap the directory.
        chown(&dir, 0);
        chown(top.path(), 65534);
        let err = check_socket_dir(&socket).unwrap_err();
        assert!(err.contains("refusing"), "{err}");
        chown(top.path(), 0);
        // A link another user owns, in a sticky directory, could be repointed.
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        check_socket_dir(&Endpoint::Socket(link.clone())).unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            &link,
            Some(rustix::process::Uid::from_raw(65534)),
            None,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(check_socket_dir(&Endpoint::Socket(link)).is_err());
    }

    #[test]
    fn the_sslrootcert_file_must_be_one_only_root_or_we_can_change() {
        use std::os::unix::fs::PermissionsExt as _;
        let top = tempfile::tempdir().unwrap();
        let ca = top.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_root_cert(&ca).unwrap();
        let url = format!(
            "postgres://svc@db.example.org/audit?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        check(&url).unwrap();
        for mode in [0o664, 0o646] {
            std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(check_root_cert(&ca).is_err(), "{mode:o}");
        }
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
        let missing = format!("{url}&ssl-root-cert=/nonexistent/ca.pem");
        assert!(check(&missing).unwrap_err().contains("sslrootcert"));
        // An inline certificate names no file.
        check(&format!(
            "postgres://svc@db.example.org/audit?sslmode=verify-full&sslrootcert={}",
            "-----BEGIN%20CERTIFICATE-----"
        ))
        .unwrap();
        if !as_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        chown(&ca, 65534);
        let err = check(&url).unwrap_err();
        assert!(err.contains("owner uid 65534"), "{err}");
        chown(&ca, 0);
        let dir = top.path().join("nobody");
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(&ca, dir.join("ca.pem")).unwrap();
        chown(&dir, 65534);
        assert!(check_root_cert(&dir.join("ca.pem")).is_err());
    }
}
