//! Per-user isolation, the broker's core promise: another user can neither load, verify,
//! delete nor list a job, over the socket (two real uids: this process and a throwaway uid
//! running curl) or over HTTPS (two client certificates).

use broker::api::JobType;
use broker::client::{Client, Endpoint};

use crate::support::{Backend, Daemon, curl_as, curl_many_as, https_on_loopback};

/// A uid with no passwd entry: a real, distinct identity the kernel reports.
const THROWAWAY_UID: u32 = 4_242_421;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn two_uids(daemon: Daemon) {
    if !is_root() {
        // CI runs as root; a developer's unprivileged run cannot switch uids.
        eprintln!("skipped: needs root to act as a second uid");
        return;
    }
    let mut mine = daemon.client();
    let me = mine.whoami().await.unwrap();
    assert_eq!(me.user, "root");
    let job = mine.save_type(JobType::Ssh, None).await.unwrap();
    let secret = job.secret.clone().unwrap();
    let id = &job.summary.id;

    let other = THROWAWAY_UID;
    let (status, body) = curl_as(other, &daemon.socket, "GET", "/v1/whoami", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("\"user\":\"uid:{other}\"")),
        "{body}"
    );
    let (status, body) = curl_as(
        other,
        &daemon.socket,
        "GET",
        &format!("/v1/jobs/{id}"),
        None,
    );
    assert_eq!(status, 404, "load of another's job: {body}");
    assert!(!body.contains(&secret[..32]));
    let verify = format!("{{\"secret\":\"{secret}\"}}");
    let (status, body) = curl_as(
        other,
        &daemon.socket,
        "POST",
        &format!("/v1/jobs/{id}/verify"),
        Some(&verify),
    );
    assert_eq!(
        status, 404,
        "verify of another's job, even with the right secret: {body}"
    );
    let (status, _) = curl_as(
        other,
        &daemon.socket,
        "POST",
        &format!("/v1/jobs/{id}/heartbeat"),
        Some(""),
    );
    assert_eq!(status, 404);
    let (status, _) = curl_as(
        other,
        &daemon.socket,
        "DELETE",
        &format!("/v1/jobs/{id}"),
        None,
    );
    assert_eq!(status, 404, "delete of another's job");
    let (status, body) = curl_as(other, &daemon.socket, "GET", "/v1/jobs", None);
    assert_eq!(
        (status, body.as_str()),
        (200, "{\"jobs\":[]}"),
        "list shows nothing of another's"
    );

    // The other uid's own job is as invisible to us.
    let (status, body) = curl_as(
        other,
        &daemon.socket,
        "POST",
        "/v1/jobs",
        Some(r#"{"type":"ssh"}"#),
    );
    assert_eq!(status, 201, "{body}");
    let theirs: broker::api::Job = serde_json::from_str(&body).unwrap();
    assert_eq!(theirs.summary.owner, format!("uid:{other}"));
    assert!(
        mine.load(&theirs.summary.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        mine.delete(&theirs.summary.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(mine.query().await.unwrap().len(), 1);
    // `nobody`, a uid with a passwd entry, is known by name.
    let (_, body) = curl_as(65534, &daemon.socket, "GET", "/v1/whoami", None);
    assert!(body.contains("\"user\":\"nobody\""), "{body}");

    // Ours is untouched and the refusals are audited: the first of each action at once,
    // all four counted once the interval is written out.
    assert!(mine.verify(id, &secret).await.unwrap());
    let refused = |audit: &[broker::store::AuditRow]| {
        let mut refused: Vec<(String, i64)> = audit
            .iter()
            .filter(|r| r.result == "refused_not_owner" && r.uid == Some(i64::from(other)))
            .map(|r| (r.action.clone(), r.count))
            .collect();
        refused.sort();
        refused
    };
    let audit = daemon.broker.store().audit_rows(200).await.unwrap();
    let expected: Vec<(String, i64)> = ["delete", "heartbeat", "load", "verify"]
        .iter()
        .map(|a| ((*a).to_owned(), 1))
        .collect();
    assert_eq!(refused(&audit), expected, "{audit:?}");
    daemon.broker.flush_audit(true).await.unwrap();
    let audit = daemon.broker.store().audit_rows(200).await.unwrap();
    assert_eq!(refused(&audit), expected, "one each: nothing more to count");
    daemon.stop().await;
}

/// Attack on fb69011 (F2): another local user wrote one audit row per refused request
/// (`refused_not_owner` on a victim's job, `not_found` on random ids: ~7,000 rows/s, 29 MB
/// for 265,724 rows). Now every refusal a caller can repeat is counted per caller (and
/// job, when the id names one) per interval: thousands of requests make a bounded number of
/// rows whose counts add up, and random ids hold no key each.
async fn refusals_make_few_rows(daemon: Daemon) {
    if !is_root() {
        eprintln!("skipped: needs root to act as a second uid");
        return;
    }
    let mut mine = daemon.client();
    let job = mine.save_type(JobType::Ssh, None).await.unwrap();
    let secret = job.secret.clone().unwrap();
    let id = &job.summary.id;
    let other = THROWAWAY_UID;
    let n = 500;
    let random = format!("/v1/jobs/job_{}[000-{:03}]", "0".repeat(29), n - 1);
    let verify = format!("{{\"secret\":\"{secret}\"}}");
    let floods: [(&str, String, Option<&str>, &str, &str); 6] = [
        (
            "GET",
            format!("/v1/jobs/{id}?n=[1-{n}]"),
            None,
            "load",
            "refused_not_owner",
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/verify?n=[1-{n}]"),
            Some(verify.as_str()),
            "verify",
            "refused_not_owner",
        ),
        ("GET", random.clone(), None, "load", "not_found"),
        ("DELETE", random.clone(), None, "delete", "not_found"),
        (
            "POST",
            format!("{random}/heartbeat"),
            Some(""),
            "heartbeat",
            "not_found",
        ),
        (
            "POST",
            format!("{random}/verify"),
            Some(verify.as_str()),
            "verify",
            "not_found",
        ),
    ];
    let started = std::time::Instant::now();
    for (method, path, body, _, _) in &floods {
        let statuses = curl_many_as(other, &daemon.socket, method, path, *body);
        assert_eq!(statuses.len(), n, "{method} {path}");
        assert!(
            statuses.iter().all(|s| *s == 404),
            "{method} {path}: {statuses:?}"
        );
    }
    eprintln!("{} refused requests in {:?}", 6 * n, started.elapsed());
    let theirs = |audit: &[broker::store::AuditRow]| {
        audit
            .iter()
            .filter(|r| r.uid == Some(i64::from(other)))
            .cloned()
            .collect::<Vec<_>>()
    };
    let audit = theirs(&daemon.broker.store().audit_rows(100_000).await.unwrap());
    assert_eq!(audit.len(), floods.len(), "the first of each at once");
    daemon.broker.flush_audit(true).await.unwrap();
    let audit = theirs(&daemon.broker.store().audit_rows(100_000).await.unwrap());
    assert!(audit.len() <= 2 * floods.len(), "{} rows", audit.len());
    for (_, _, _, action, result) in floods {
        let count: i64 = audit
            .iter()
            .filter(|r| r.action == action && r.result == result)
            .map(|r| r.count)
            .sum();
        assert_eq!(
            count,
            i64::try_from(n).unwrap(),
            "{action} {result}: {audit:?}"
        );
    }
    // The victim's job is named in its rows; random ids only in the first row of each.
    assert!(
        audit
            .iter()
            .filter(|r| r.result == "refused_not_owner")
            .all(|r| r.job_id.as_deref() == Some(id.as_str()))
    );
    assert!(
        mine.verify(id, &secret).await.unwrap(),
        "the owner is untouched"
    );
    daemon.stop().await;
}

crate::both_stores!(refusals_are_counted_not_rowed, refusals_make_few_rows);

/// Attack pass 2 (MEDIUM): a user's loads and valid verifications of their own job wrote a
/// row each, 8,000 to 9,600 rows a second from one local user. They change nothing and can
/// be repeated at will, so they are counted like refusals: one row at once per caller, job
/// and action, the rest as one counted row when the interval ends.
async fn own_reads_make_few_rows(daemon: Daemon) {
    let me = nix::unistd::geteuid().as_raw();
    let job = daemon.client().save_type(JobType::Ssh, None).await.unwrap();
    let secret = job.secret.clone().unwrap();
    let id = &job.summary.id;
    let n = 500;
    let verify = format!("{{\"secret\":\"{secret}\"}}");
    let load = format!("/v1/jobs/{id}?n=[1-{n}]");
    let statuses = curl_many_as(me, &daemon.socket, "GET", &load, None);
    assert_eq!(statuses, vec![200; n], "{load}");
    let valid = format!("/v1/jobs/{id}/verify?n=[1-{n}]");
    let statuses = curl_many_as(me, &daemon.socket, "POST", &valid, Some(&verify));
    assert_eq!(statuses, vec![200; n], "{valid}");
    let reads = |audit: Vec<broker::store::AuditRow>| {
        audit
            .into_iter()
            .filter(|r| r.action == "load" || r.action == "verify")
            .collect::<Vec<_>>()
    };
    let audit = reads(daemon.broker.store().audit_rows(100_000).await.unwrap());
    assert_eq!(
        audit.len(),
        2,
        "the first of each at once: {} rows",
        audit.len()
    );
    daemon.broker.flush_audit(true).await.unwrap();
    let audit = reads(daemon.broker.store().audit_rows(100_000).await.unwrap());
    assert!(audit.len() <= 4, "{} rows", audit.len());
    for (action, result) in [("load", "ok"), ("verify", "valid")] {
        let count: i64 = audit
            .iter()
            .filter(|r| r.action == action && r.result == result)
            .map(|r| r.count)
            .sum();
        assert_eq!(count, i64::try_from(n).unwrap(), "{action} {result}");
    }
    daemon.stop().await;
}

crate::both_stores!(
    own_loads_and_verifies_are_counted_not_rowed,
    own_reads_make_few_rows
);

crate::both_stores!(another_uid_cannot_touch_a_job, two_uids);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_certificate_cannot_touch_a_job_over_https() {
    let pki = testkit::pki::test_pki();
    let tls = pki.server_tls_section();
    let bob = format!(
        "sha256:{}",
        common::pki::inspect_pem(&pki.bob.cert_pem).unwrap()[0]
            .sha256_fingerprint
            .replace(':', "")
            .to_lowercase()
    );
    let daemon = Daemon::start_with(Backend::Sqlite, |config| {
        config.https = Some(https_on_loopback(
            tls,
            &[("CN=alice", "alice"), (bob.as_str(), "bob")],
        ));
    })
    .await;
    let url = format!("https://localhost:{}", daemon.https.unwrap().port());
    let as_leaf = |leaf: &testkit::pki::Leaf| {
        Client::new(Endpoint::https(&url, &pki.ca_path, &leaf.cert_path, &leaf.key_path).unwrap())
    };
    let mut alice = as_leaf(&pki.alice);
    let mut bob = as_leaf(&pki.bob);
    let me = alice.whoami().await.unwrap();
    assert_eq!((me.user.as_str(), me.via.as_str()), ("alice", "https"));
    assert_eq!(bob.whoami().await.unwrap().user, "bob", "sha256 mapping");

    let job = alice.save_type(JobType::Ssl, None).await.unwrap();
    let id = &job.summary.id;
    assert_eq!(job.summary.owner, "alice");
    assert!(bob.load(id).await.unwrap_err().is_not_found());
    assert!(bob.delete(id).await.unwrap_err().is_not_found());
    assert!(bob.heartbeat(id).await.unwrap_err().is_not_found());
    assert!(bob.query().await.unwrap().is_empty());
    let bobs = bob.save_type(JobType::Ssh, None).await.unwrap();
    assert!(
        bob.verify(&bobs.summary.id, bobs.secret.as_deref().unwrap())
            .await
            .unwrap()
    );
    assert!(
        alice
            .verify(&bobs.summary.id, bobs.secret.as_deref().unwrap())
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(alice.load(id).await.unwrap().summary.id, *id);

    // A trusted certificate without a mapping is refused with 403; untrusted, expired and
    // revoked ones do not get past the handshake.
    let carol = pki.chained_client.clone();
    let err = as_leaf(&carol).whoami().await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    for leaf in [&pki.mallory, &pki.expired, &pki.revoked] {
        let err = as_leaf(leaf).whoami().await.unwrap_err();
        assert_eq!(err.status(), None, "refused in the handshake: {err}");
    }
    // The same job is alice's on the socket only if the socket user were alice: root is not.
    assert!(daemon.client().load(id).await.unwrap_err().is_not_found());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reloads_its_https_certificate_on_sighup() {
    // The real binary with an HTTPS API; its certificate file is replaced and SIGHUP sent.
    let pki = testkit::pki::test_pki();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("https.crt");
    let key = dir.path().join("https.key");
    std::fs::copy(&pki.server.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server.key_path, &key).unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {:?}\nstate_dir = {:?}\nhost = \"localhost\"\nport_range = [22000, 22999]\n\
             [https]\nlisten = \"127.0.0.1:0\"\n[https.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {:?}\n\
             [https.users]\n\"CN=alice\" = \"alice\"\n",
            dir.path().join("b.sock"),
            dir.path().join("state"),
            pki.ca_path,
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(crate::support::bin("broker"))
        .args([
            "-c",
            config.to_str().unwrap(),
            "--print-address",
            "--log",
            "warn",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let mut url = None;
    while let Ok(Some(line)) =
        tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
    {
        if let Some(address) = line.strip_prefix("listening on https://") {
            url = Some(format!(
                "https://localhost:{}",
                address.rsplit(':').next().unwrap()
            ));
            break;
        }
    }
    let url = url.expect("https address printed");
    let server_cn = |url: String| async move {
        // The CN of the certificate the server presents now, seen by a fresh connection.
        let endpoint = Endpoint::https(
            &url,
            &pki.ca_path,
            &pki.alice.cert_path,
            &pki.alice.key_path,
        )
        .unwrap();
        let Endpoint::Https { address, tls, .. } = endpoint else {
            unreachable!()
        };
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let stream = common::tls::connect(tls, "localhost", tcp, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        common::tls::peer_identity(stream.get_ref().1).and_then(|id| id.cn)
    };
    assert_eq!(server_cn(url.clone()).await.as_deref(), Some("server"));
    assert_eq!(
        Client::new(
            Endpoint::https(
                &url,
                &pki.ca_path,
                &pki.alice.cert_path,
                &pki.alice.key_path
            )
            .unwrap()
        )
        .whoami()
        .await
        .unwrap()
        .user,
        "alice"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    // A broken file first: the reload fails and the old certificate stays in use.
    std::fs::write(&cert, "not a certificate").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(server_cn(url.clone()).await.as_deref(), Some("server"));
    // Then the new pair.
    std::fs::copy(&pki.server2.cert_path, &cert).unwrap();
    std::fs::copy(&pki.server2.key_path, &key).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    testkit::eventually(
        "SIGHUP to reload the HTTPS certificate",
        std::time::Duration::from_secs(5),
        || async { (server_cn(url.clone()).await.as_deref() == Some("server2")).then_some(()) },
    )
    .await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Issue 14: idle sockets that never start the handshake held the API's connection slots
/// (and, the accept loop waiting for a slot, stopped it accepting at all), locking out every
/// HTTPS client. Now they wait in the stranger pool (a few per address), a client with a
/// certificate from another address and local users are served, and the idle ones are closed
/// at the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_do_not_lock_out_https_clients() {
    use testkit::front::{closed_within, idle_crowd, tls_from_other_loopback};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = testkit::pki::test_pki();
    // The test [tls] section: 2 s handshake timeout, the default stranger budget.
    let tls = pki.server_tls_section();
    let deadline = tls.handshake_timeout();
    let daemon = Daemon::start_with(Backend::Sqlite, |config| {
        config.max_connections = 4;
        config.https = Some(https_on_loopback(tls, &[("CN=alice", "alice")]));
    })
    .await;
    let https = daemon.https.unwrap();
    let crowd = idle_crowd(https, 40).await;

    let mut alice = tls_from_other_loopback(https, &pki.alice, &[]).await;
    alice
        .write_all(b"GET /v1/whoami HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        alice.read_to_end(&mut answer),
    )
    .await
    .expect("alice is answered")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"alice\""), "{answer}");
    // Local users have a pool of their own.
    daemon
        .client()
        .whoami()
        .await
        .expect("the unix socket serves");

    let (closed, last) = closed_within(crowd, deadline * 3).await;
    assert_eq!(closed, 40);
    assert!(last >= deadline / 2 && last < deadline * 2, "{last:?}");
}
