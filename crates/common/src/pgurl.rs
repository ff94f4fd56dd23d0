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
    Ok(endpoint)
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

/// A socket directory must exist and not be writable by everyone (anyone could plant the
/// socket there while the server is down).
///
/// # Errors
/// The directory cannot be read or is world-writable.
pub fn check_socket_dir(endpoint: &Endpoint) -> Result<(), String> {
    let Endpoint::Socket(dir) = endpoint else {
        return Ok(());
    };
    socket_dir_is_private(dir)
}

fn socket_dir_is_private(dir: &Path) -> Result<(), String> {
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
    Ok(())
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
}
