//! The API through the client library: save, load, verify, query, heartbeat, delete, the
//! reaper, port allocation, certificates and the audit trail, on SQLite and PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use broker::api::{JobType, SaveRequest};
use broker::client::Client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::both_stores;
use crate::support::Daemon;

/// Sends raw bytes on the socket and returns the raw answer (for malformed requests the
/// client library would never send).
pub async fn raw(daemon: &Daemon, request: &[u8]) -> String {
    let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

both_stores!(ssh_job_round_trip, |daemon: Daemon| async move {
    let mut client = daemon.client();
    let me = client.whoami().await.unwrap();
    assert_eq!(me.via, "unix");
    let job = client.save_type(JobType::Ssh, None).await.unwrap();
    let secret = job.secret.clone().expect("ssh job has a secret");
    assert_eq!(secret.len(), 1024, "512 bytes, hex");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(broker::api::valid_job_id(&job.summary.id));
    assert!(daemon.config.ports.contains(&job.summary.port));
    assert_eq!(job.summary.owner, me.user);
    assert_eq!(job.summary.status, "active");
    assert!(job.tls.is_none());

    let loaded = client.load(&job.summary.id).await.unwrap();
    assert_eq!(loaded, job);
    assert!(client.verify(&job.summary.id, &secret).await.unwrap());
    let mut wrong = secret.clone().into_bytes();
    wrong[1023] = if wrong[1023] == b'0' { b'1' } else { b'0' };
    assert!(
        !client
            .verify(&job.summary.id, std::str::from_utf8(&wrong).unwrap())
            .await
            .unwrap()
    );
    assert!(!client.verify(&job.summary.id, "").await.unwrap());

    let listed = client.query().await.unwrap();
    assert_eq!(listed, vec![job.summary.clone()]);
    let raw_list = raw(
        &daemon,
        b"GET /v1/jobs HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!raw_list.contains(&secret), "query never carries secrets");

    client.delete(&job.summary.id).await.unwrap();
    let gone = client.load(&job.summary.id).await.unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
    assert!(
        client
            .delete(&job.summary.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(client.query().await.unwrap().is_empty());

    // The trail: every action, and never the secret.
    let audit = daemon.broker.store().audit_rows(100).await.unwrap();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|r| (r.action.as_str(), r.result.as_str()))
        .collect();
    for expected in [
        ("save", "ok"),
        ("load", "ok"),
        ("verify", "valid"),
        ("verify", "invalid"),
        ("delete", "ok"),
        ("load", "not_found"),
        ("delete", "not_found"),
    ] {
        assert!(
            actions.contains(&expected),
            "{expected:?} missing from {actions:?}"
        );
    }
    assert!(audit.iter().all(|r| r.uid.is_some() && r.user == me.user));
    let dump = format!("{audit:?}");
    assert!(!dump.contains(&secret[..64]));
    daemon.stop().await;
});

both_stores!(ssl_job_certificates_and_crl, |daemon: Daemon| async move {
    let mut client = daemon.client();
    let me = client.whoami().await.unwrap();
    let job = client
        .save_type(JobType::Ssl, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert!(job.secret.is_none());
    let tls = job.tls.clone().expect("ssl material");
    assert_eq!(tls.ca, client.ca_pem().await.unwrap());

    let server = &common::pki::inspect_pem(&tls.cert).unwrap()[0];
    let sans = format!("{:?} {:?}", server.dns_names, server.ip_addresses);
    assert!(sans.contains("localhost"), "{sans}");
    assert!(sans.contains("127.0.0.1"), "{sans}");
    let client_cert = &common::pki::inspect_pem(&tls.client_cert).unwrap()[0];
    assert_eq!(client_cert.common_name.as_deref(), Some(me.user.as_str()));

    // The material works: a TLS handshake with the job's server certificate and the owner's
    // client certificate, both checked against the broker CA.
    let server_config = crate::support::mtls_server(&tls.cert, &tls.key, &tls.ca, &[]);
    let client_config = crate::support::mtls_client(&tls.ca, &tls.client_cert, &tls.client_key);
    handshake(server_config, client_config)
        .await
        .expect("owner's certificate is accepted");

    // Not revoked yet; after delete both serials are on the CRL, and the gate-side
    // configuration built with it refuses the client certificate.
    let crl = common::pki::inspect_crl_pem(&client.crl_pem().await.unwrap()).unwrap();
    assert!(!crl.is_revoked(&tls.client_serial));
    client.delete(&job.summary.id).await.unwrap();
    let crl_pem = client.crl_pem().await.unwrap();
    let crl = common::pki::inspect_crl_pem(&crl_pem).unwrap();
    assert!(crl.is_revoked(&tls.client_serial));
    assert!(crl.is_revoked(&tls.cert_serial));
    let server_config =
        crate::support::mtls_server(&tls.cert, &tls.key, &tls.ca, &[crl_pem.as_str()]);
    let client_config = crate::support::mtls_client(&tls.ca, &tls.client_cert, &tls.client_key);
    assert!(
        handshake(server_config, client_config).await.is_err(),
        "revoked certificate refused"
    );

    // The CA key never leaves the state directory, and is private.
    use std::os::unix::fs::MetadataExt as _;
    let mode = std::fs::metadata(daemon.state.join("ca.key"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    daemon.stop().await;
});

/// Runs a TLS handshake (and one byte each way) between the two configurations.
pub async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(&byte).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let outcome = async {
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    }
    .await;
    let server_side = served.await.unwrap();
    outcome.and(server_side)
}

both_stores!(
    concurrent_saves_never_share_a_port,
    |daemon: Daemon| async move {
        let saves = (0..100).map(|i| {
            let mut client = daemon.client();
            async move {
                let job_type = if i % 10 == 0 {
                    JobType::Ssl
                } else {
                    JobType::Ssh
                };
                client.save_type(job_type, None).await.unwrap()
            }
        });
        let jobs = futures_util::future::join_all(saves).await;
        let ports: HashSet<u16> = jobs.iter().map(|j| j.summary.port).collect();
        let ids: HashSet<&str> = jobs.iter().map(|j| j.summary.id.as_str()).collect();
        assert_eq!(ports.len(), 100, "every save got its own port");
        assert_eq!(ids.len(), 100);
        assert_eq!(daemon.client().query().await.unwrap().len(), 100);
        daemon.stop().await;
    }
);

both_stores!(ttl_heartbeat_and_reaper, |daemon: Daemon| async move {
    let mut client = daemon.client();
    let short = client
        .save_type(JobType::Ssh, Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let kept = client
        .save_type(JobType::Ssl, Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let before = time::OffsetDateTime::parse(
        &kept.summary.expires,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let beat = client.heartbeat(&kept.summary.id).await.unwrap();
    let after = time::OffsetDateTime::parse(
        &beat.expires,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(after > before, "heartbeat moves the expiry");
    // Keep one alive with heartbeats while the other expires and is reaped (interval 1 s).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        client.heartbeat(&kept.summary.id).await.unwrap();
    }
    let secret = short.secret.clone().unwrap();
    assert!(
        client
            .load(&short.summary.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        client
            .verify(&short.summary.id, &secret)
            .await
            .unwrap_err()
            .is_not_found(),
        "an expired job verifies nothing"
    );
    assert!(
        client
            .heartbeat(&short.summary.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    let listed: Vec<String> = client
        .query()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(listed, vec![kept.summary.id.clone()]);
    let audit = daemon.broker.store().audit_rows(100).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|r| r.action == "reap" && r.job_id.as_deref() == Some(short.summary.id.as_str())),
        "{audit:?}"
    );
    // Once heartbeats stop, the ssl job expires too (within TTL + 1 s) and reaping revokes
    // its certificates.
    let serial = kept.tls.unwrap().client_serial;
    let mut revoked = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let crl = common::pki::inspect_crl_pem(&client.crl_pem().await.unwrap()).unwrap();
        if crl.is_revoked(&serial) {
            revoked = true;
            break;
        }
    }
    assert!(revoked, "reaping revokes");
    daemon.stop().await;
});

#[tokio::test]
async fn ports_in_use_are_skipped_and_exhaustion_is_a_clear_error() {
    // A range of three ports, one held by a listener that is no job.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let _ = listener;
    let low = 31000 + (rand::random::<u16>() % 500) * 3;
    let held = std::net::TcpListener::bind(("0.0.0.0", low + 1)).expect("test port free");
    let daemon = Daemon::start_with(crate::support::Backend::Sqlite, |c| {
        c.ports = low..=low + 2;
    })
    .await;
    let mut client = daemon.client();
    let a = client.save_type(JobType::Ssh, None).await.unwrap();
    let b = client.save_type(JobType::Ssh, None).await.unwrap();
    let mut got = vec![a.summary.port, b.summary.port];
    got.sort_unstable();
    assert_eq!(got, vec![low, low + 2], "the held port is never handed out");
    let err = client.save_type(JobType::Ssh, None).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("no free port"), "{err}");
    // Deleting frees the port for the next save.
    client.delete(&a.summary.id).await.unwrap();
    let c = client.save_type(JobType::Ssh, None).await.unwrap();
    assert_eq!(c.summary.port, a.summary.port);
    drop(held);
    daemon.stop().await;
}

#[tokio::test]
async fn hostile_requests_get_clear_errors() {
    let daemon = Daemon::start().await;
    let check = |request: String, status: &'static str| {
        let daemon = &daemon;
        async move {
            let answer = raw(daemon, request.as_bytes()).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{request:?} -> {answer}"
            );
            answer
        }
    };
    let post = |body: &str| {
        format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
    let answer = check(post(r#"{bad}"#), "400").await;
    assert!(answer.contains("\"code\":\"bad_request\""), "{answer}");
    check(post(r#"{"type":"tls"}"#), "400").await;
    check(post(r#"{}"#), "400").await;
    check(post(r#"{"type":"ssh","ttl_secs":99999999999}"#), "400").await;
    check(post(r#"{"type":"ssh","owner":"root"}"#), "400").await;
    check(get("/v1/jobs/..%2F..%2Fetc"), "400").await;
    check(get("/v1/jobs/job_00000000000000000000000000000000"), "404").await;
    check(get("/nowhere"), "400").await;
    check(post(&"a".repeat(100_000)), "413").await;
    // Garbage instead of HTTP: the connection is closed, the daemon keeps serving.
    let _ = raw(&daemon, b"\x00\x01\x02 not http\r\n\r\n").await;
    assert!(daemon.client().whoami().await.is_ok());
    // A label with control characters is refused.
    let err = daemon
        .client()
        .save(&SaveRequest {
            job_type: Some(JobType::Ssh),
            ttl_secs: None,
            label: Some("a\nb".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    daemon.stop().await;
}

#[tokio::test]
async fn failed_verifications_are_rate_limited() {
    let daemon = Daemon::start_with(crate::support::Backend::Sqlite, |c| {
        c.max_failed_verifies_per_minute = 5;
    })
    .await;
    let mut client = daemon.client();
    let job = client.save_type(JobType::Ssh, None).await.unwrap();
    for _ in 0..5 {
        assert!(!client.verify(&job.summary.id, "nope").await.unwrap());
    }
    let err = client
        .verify(&job.summary.id, "still wrong")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(429), "{err}");
    // Wrong keys sent by someone else never lock the owner out: the right one still passes.
    assert!(
        client
            .verify(&job.summary.id, job.secret.as_deref().unwrap())
            .await
            .unwrap()
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_job_survives_kill_dash_nine_of_the_daemon() {
    survives_kill_dash_nine(None).await;
}

#[tokio::test]
async fn a_job_survives_kill_dash_nine_of_the_daemon_on_postgres() {
    if crate::support::pg_url().is_none() {
        assert!(std::env::var_os("BROKER_TEST_REQUIRE_PG").is_none());
        eprintln!("skipped: set BROKER_TEST_PG=postgres://... to run on PostgreSQL");
        return;
    }
    survives_kill_dash_nine(Some(crate::support::fresh_pg_database().await)).await;
}

/// The real daemon binary, SIGKILLed right after acknowledging saves, then restarted.
async fn survives_kill_dash_nine(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("b.sock");
    let start = |dir: &std::path::Path| {
        let mut command = std::process::Command::new(crate::support::bin("broker"));
        if let Some(url) = &database {
            command.args(["--database", url]);
        }
        command
            .args(["--socket", socket.to_str().unwrap(), "--state-dir"])
            .arg(dir.join("state"))
            .args([
                "--port-range",
                "30000-30999",
                "--host",
                "localhost",
                "--log",
                "warn",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_ready = |socket: &std::path::Path| {
        let socket = socket.to_owned();
        async move {
            for _ in 0..200 {
                if Client::unix(&socket).whoami().await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("broker did not come up");
        }
    };
    let mut child = start(dir.path());
    wait_ready(&socket).await;
    let mut client = Client::unix(&socket);
    let mut saved = Vec::new();
    for _ in 0..20 {
        saved.push(client.save_type(JobType::Ssh, None).await.unwrap());
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut child = start(dir.path());
    wait_ready(&socket).await;
    let mut client = Client::unix(&socket);
    for job in &saved {
        assert_eq!(
            &client.load(&job.summary.id).await.unwrap(),
            job,
            "acknowledged job kept"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM drains and exits 0: {status:?}");
    assert!(!socket.exists(), "socket removed on exit");
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed() {
    let daemon = Daemon::start_with(crate::support::Backend::Sqlite, |c| {
        c.request_timeout = Duration::from_secs(1);
    })
    .await;
    let started = std::time::Instant::now();
    // Silent, then a head that never ends: both closed after the request timeout.
    for opening in [&b""[..], b"GET /v1/whoami HTTP/1.1\r\nHost: b\r\n"] {
        let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        stream.write_all(opening).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "connection still open after 5 s");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A kept-alive connection that goes quiet after a request is closed too.
    let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "idle keep-alive connection still open after 5 s"
    );
    assert!(String::from_utf8_lossy(&buf).contains("ok"));
    daemon.stop().await;
}

#[tokio::test]
async fn the_daemon_binary_checks_its_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(crate::support::bin("broker"))
            .args(args)
            .output()
            .unwrap()
    };
    let state = dir.path().join("state");
    let socket = dir.path().join("b.sock");
    let base = [
        "--socket",
        socket.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    // A range inside the kernel's ephemeral range is refused (78) before anything is made.
    if let Some(ephemeral) = broker::config::ephemeral_range() {
        let inside = format!("{}-{}", ephemeral.start(), ephemeral.start() + 10);
        let out = run(&[&base[..], &["--port-range", &inside]].concat());
        assert_eq!(
            out.status.code(),
            Some(78),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("ephemeral"));
        assert!(!state.exists());
    }
    let out = run(&[
        &base[..],
        &["--port-range", "22000-22999", "--check-config"],
    ]
    .concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
    // --check-config made the private state: directory 0700, database and CA key 0600.
    use std::os::unix::fs::MetadataExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("broker.db")), 0o600);
    assert_eq!(mode(&state.join("ca.key")), 0o600);
    assert!(!socket.exists(), "--check-config binds nothing");
    // A CA key readable by others is refused.
    std::fs::set_permissions(
        state.join("ca.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = run(&[
        &base[..],
        &["--port-range", "22000-22999", "--check-config"],
    ]
    .concat());
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    // Unknown keys in the file are an error (78).
    let file = dir.path().join("b.toml");
    std::fs::write(&file, "port_rnage = [1, 2]\n").unwrap();
    let out = run(&["-c", file.to_str().unwrap(), "--check-config"]);
    assert_eq!(out.status.code(), Some(78));
    // A PostgreSQL URL over plaintext or unverified TCP is refused (78) before connecting,
    // the fix named and the password kept out (common::pgurl).
    for url in [
        "postgres://broker:s3cret-pw@127.0.0.1:5432/broker",
        "postgres://broker:s3cret-pw@db.example.org/broker?sslmode=verify-ca",
    ] {
        let out = run(&[
            &base[..],
            &[
                "--port-range",
                "22000-22999",
                "--database",
                url,
                "--check-config",
            ],
        ]
        .concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{url}: {stderr}");
        assert!(stderr.contains("sslmode=verify-full"), "{stderr}");
        assert!(stderr.contains("host=/run/postgresql"), "{stderr}");
        assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    }
}

#[tokio::test]
async fn old_audit_records_are_pruned() {
    let daemon = Daemon::start_with(crate::support::Backend::Sqlite, |c| {
        c.audit_retention_days = 1;
    })
    .await;
    let mut client = daemon.client();
    client.save_type(JobType::Ssh, None).await.unwrap();
    // A record from two days ago, written directly; the next reaper pass (every second here)
    // removes it and keeps today's.
    let me = broker::identity::Caller {
        user: "old".into(),
        uid: None,
        via: "unix",
    };
    daemon
        .broker
        .store()
        .audit(&broker::store::AuditRecord {
            caller: &me,
            action: "load",
            job_id: None,
            result: "ok",
            detail: None,
        })
        .await
        .unwrap();
    let rows = daemon.broker.store().audit_rows(10).await.unwrap();
    assert_eq!(rows.len(), 2);
    daemon
        .broker
        .store()
        .backdate_audit_for_tests("old", 2 * 86_400_000)
        .await
        .unwrap();
    let mut pruned = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rows = daemon.broker.store().audit_rows(10).await.unwrap();
        if rows.len() == 1 {
            assert_eq!(rows[0].action, "save");
            pruned = true;
            break;
        }
    }
    assert!(pruned, "the two-day-old record is pruned");
    daemon.stop().await;
}
