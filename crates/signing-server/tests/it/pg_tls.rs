//! The audit store over TCP with TLS: a PostgreSQL cluster of the test's own (the one of
//! scripts/with-postgres listens only on a Unix socket), on loopback with `ssl = on` and a
//! server certificate from testkit's CA. `sslmode=verify-full` with that CA connects, through
//! the daemon's own connection path, and the session is encrypted; a wrong CA or a certificate
//! for another host name is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pki::{LeafParams, Name, San, Usage};

use crate::support::{pg_available, pki};

/// A PostgreSQL binary of the installed server (`/usr/lib/postgresql/*/bin` on Debian).
fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|v| v.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from(name))
}

/// A throwaway cluster serving TLS on 127.0.0.1; stopped on drop.
struct TlsCluster {
    dir: tempfile::TempDir,
    port: u16,
    runas: Vec<String>,
}

impl TlsCluster {
    /// Starts a cluster whose server certificate is `cert_pem` (key `key_pem`).
    fn start(cert_pem: &str, key_pem: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // PostgreSQL refuses to run as root: as root, the cluster runs as `postgres`.
        let owner = is_root().then(|| {
            let out = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .unwrap();
            let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            let out = Command::new("id")
                .args(["-g", "postgres"])
                .output()
                .unwrap();
            let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            (uid, gid)
        });
        let runas: Vec<String> = if owner.is_some() {
            vec![
                "runuser".into(),
                "-u".into(),
                "postgres".into(),
                "--".into(),
            ]
        } else {
            Vec::new()
        };
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = owner {
            for path in [dir.path(), &cert, &key] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            }
        }
        let port = free_port();
        let cluster = Self { dir, port, runas };
        let data = cluster.dir.path().join("data");
        cluster.run(
            &pg_bin("initdb"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={dir} \
             -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}",
            dir = cluster.dir.path().display(),
            cert = cert.display(),
            key = key.display(),
        );
        let log = cluster.dir.path().join("server.log");
        cluster.run(
            &pg_bin("pg_ctl"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
        );
        cluster
    }

    fn run(&self, program: &Path, args: &[&std::ffi::OsStr]) {
        let mut command = match self.runas.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let out = command.args(args).output().unwrap();
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{}: {}{}\n{log}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The URL of `host` with `query`.
    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let program = pg_bin("pg_ctl");
        let mut command = match self.runas.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let _ = command
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Opens the audit store as the daemon does (the superuser of this throwaway cluster, so
/// `allow_privileged_role`); the error text when it fails.
async fn open(url: &str) -> Result<signing_server::audit::Audit, String> {
    let database = signing_server::config::Database::parse(url, Path::new("/nonexistent"))
        .map_err(|e| e.to_string())?;
    signing_server::audit::Audit::open(
        &database,
        "tls",
        signing_server::audit::OpenOptions {
            allow_privileged_role: true,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_over_tls_and_a_wrong_ca_or_host_is_refused() {
    use sqlx::Row as _;
    if !pg_available() {
        return;
    }
    let pki = pki();
    // Valid for 127.0.0.1 only: "localhost" is then the wrong host name.
    let issued = pki
        .ca
        .issue_leaf(
            &LeafParams::new(Name::new("audit-db"), Usage::Server)
                .with_sans([San::Ip([127, 0, 0, 1].into())]),
        )
        .unwrap();
    let cluster = TlsCluster::start(&issued.chain_pem, &issued.key_pem);
    let ca = pki.ca_path.display();

    let audit = open(&cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    let row = sqlx::query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(audit.pool())
        .await
        .unwrap();
    assert!(row.get::<bool, _>(0), "the session is not encrypted");
    let version: String = row.get(1);
    assert!(version.starts_with("TLSv1."), "{version}");

    let untrusted = pki.untrusted_ca_path.display();
    let err = open(&cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={untrusted}"),
    ))
    .await
    .err()
    .unwrap();
    assert!(err.contains("UnknownIssuer"), "wrong CA: {err}");
    // Without sslrootcert only the system's CAs are trusted, which do not include testkit's.
    let err = open(&cluster.url("127.0.0.1", "sslmode=verify-full"))
        .await
        .err()
        .unwrap();
    assert!(err.contains("UnknownIssuer"), "no CA: {err}");
    let err = open(&cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .err()
    .unwrap();
    assert!(
        err.contains("certificate not valid for name \"localhost\""),
        "wrong host name: {err}"
    );
    // And the plaintext URL never gets as far as connecting.
    let err = open(&cluster.url("127.0.0.1", "sslmode=prefer"))
        .await
        .err()
        .unwrap();
    assert!(err.contains("sslmode=verify-full"), "{err}");
}
