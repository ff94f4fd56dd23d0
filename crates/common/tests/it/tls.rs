//! Mutual TLS over real sockets: who is accepted, who is refused, and reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::tls::{self, ClientAuth, ClientTlsFiles, PeerIdentity, ServerTls, ServerTlsFiles};
use testkit::{Attr, Leaf, Spawned, test_pki};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(5);

fn server_files(cert: &Path, key: &Path, auth: ClientAuth, crl: bool) -> ServerTlsFiles {
    let pki = test_pki();
    ServerTlsFiles {
        cert: cert.to_owned(),
        key: Some(key.to_owned()),
        client_ca: Some(pki.ca_path.clone()),
        crls: if crl {
            vec![pki.crl_path.clone()]
        } else {
            Vec::new()
        },
        client_auth: auth,
        alpn: Vec::new(),
    }
}

/// An echo server: each connection answers every line with `CN-of-client: line`.
async fn spawn_echo(server: Arc<ServerTls>) -> Spawned {
    testkit::init_tracing();
    tls::install_default_provider();
    testkit::spawn_tcp(move |listener, shutdown| async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = shutdown.triggered() => return Ok(()),
            };
            let acceptor = server.acceptor();
            let server = server.clone();
            let stop = shutdown.clone();
            shutdown.spawn(async move {
                let Ok((stream, peer)) = tls::accept(&acceptor, stream, DEADLINE).await else {
                    return;
                };
                let who = peer
                    .and_then(|p| p.cn)
                    .unwrap_or_else(|| "anonymous".into());
                // Every line is a privileged action: the peer is checked against the CRLs
                // loaded now.
                let live = server.live_peer(stream.get_ref().1);
                let (read, mut write) = tokio::io::split(stream);
                let mut lines = BufReader::new(read).lines();
                loop {
                    let line = tokio::select! {
                        line = lines.next_line() => line,
                        () = stop.triggered() => return,
                    };
                    let Ok(Some(line)) = line else { return };
                    if let Err(err) = live.check() {
                        let _ = write
                            .write_all(format!("refused: {err}\n").as_bytes())
                            .await;
                        return;
                    }
                    if write
                        .write_all(format!("{who}: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    })
    .await
}

struct Client {
    lines: tokio::io::Lines<
        BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
    >,
    write: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
    server: PeerIdentity,
}

impl Client {
    async fn echo(&mut self, text: &str) -> std::io::Result<Option<String>> {
        self.write.write_all(format!("{text}\n").as_bytes()).await?;
        tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .map_err(std::io::Error::other)?
    }
}

async fn connect(addr: std::net::SocketAddr, leaf: Option<&Leaf>) -> anyhow::Result<Client> {
    let files = ClientTlsFiles {
        ca: Some(test_pki().ca_path.clone()),
        cert: leaf.map(|l| l.cert_path.clone()),
        key: leaf.map(|l| l.key_path.clone()),
        alpn: Vec::new(),
        skip_hostname_check: false,
    };
    let config = Arc::new(tls::client_config(&files)?);
    let tcp = TcpStream::connect(addr).await?;
    let stream = tls::connect(config, "localhost", tcp, DEADLINE).await?;
    let server = tls::peer_identity(stream.get_ref().1).expect("server identity");
    let (read, write) = tokio::io::split(stream);
    Ok(Client {
        lines: BufReader::new(read).lines(),
        write,
        server,
    })
}

/// With TLS 1.3 a refused client certificate shows up on the first read, not in the handshake.
async fn refused(addr: std::net::SocketAddr, leaf: Option<&Leaf>) -> bool {
    match connect(addr, leaf).await {
        Err(_) => true,
        Ok(mut client) => !matches!(client.echo("hi").await, Ok(Some(_))),
    }
}

async fn standard_server(auth: ClientAuth) -> Spawned {
    let pki = test_pki();
    let files = server_files(&pki.server.cert_path, &pki.server.key_path, auth, true);
    spawn_echo(Arc::new(ServerTls::load(files).unwrap())).await
}

#[tokio::test]
async fn good_client_certificate_is_accepted_with_its_identity() {
    let pki = test_pki();
    let server = standard_server(ClientAuth::Required).await;
    let mut alice = connect(server.addr, Some(&pki.alice)).await.unwrap();
    assert_eq!(
        alice.echo("hello").await.unwrap().as_deref(),
        Some("alice: hello")
    );
    assert_eq!(alice.server.cn.as_deref(), Some("server"));
    assert!(alice.server.sans.iter().any(|s| s == "127.0.0.1"));
    // A client issued by the intermediate, sending its chain.
    let mut carol = connect(server.addr, Some(&pki.chained_client))
        .await
        .unwrap();
    assert_eq!(carol.echo("x").await.unwrap().as_deref(), Some("carol: x"));
    server.stop(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn bad_client_certificates_are_refused() {
    let pki = test_pki();
    let server = standard_server(ClientAuth::Required).await;
    assert!(refused(server.addr, None).await, "no certificate");
    assert!(
        refused(server.addr, Some(&pki.mallory)).await,
        "untrusted CA"
    );
    assert!(refused(server.addr, Some(&pki.expired)).await, "expired");
    assert!(
        refused(server.addr, Some(&pki.revoked)).await,
        "revoked by CRL"
    );
    assert!(
        !refused(server.addr, Some(&pki.bob)).await,
        "bob still works"
    );
    server.stop(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn optional_client_auth_allows_anonymous_but_still_verifies() {
    let pki = test_pki();
    let server = standard_server(ClientAuth::Optional).await;
    let mut anon = connect(server.addr, None).await.unwrap();
    assert_eq!(
        anon.echo("a").await.unwrap().as_deref(),
        Some("anonymous: a")
    );
    assert!(refused(server.addr, Some(&pki.mallory)).await);
    server.stop(DEADLINE).await.unwrap();
}

#[test]
fn client_auth_without_ca_bundle_is_a_configuration_error() {
    let pki = test_pki();
    let mut files = server_files(
        &pki.server.cert_path,
        &pki.server.key_path,
        ClientAuth::Required,
        false,
    );
    files.client_ca = None;
    let err = ServerTls::load(files).unwrap_err().to_string();
    assert!(err.contains("no client CA bundle"), "{err}");
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[tokio::test]
async fn reload_swaps_certificate_keeps_live_connections_and_survives_bad_files() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let cert: PathBuf = dir.path().join("tls.cert.pem");
    let key: PathBuf = dir.path().join("tls.key.pem");
    copy(&pki.server.cert_path, &cert);
    copy(&pki.server.key_path, &key);
    let tls_server =
        Arc::new(ServerTls::load(server_files(&cert, &key, ClientAuth::Required, true)).unwrap());
    let server = spawn_echo(tls_server.clone()).await;

    let mut live = connect(server.addr, Some(&pki.alice)).await.unwrap();
    assert_eq!(live.server.cn.as_deref(), Some("server"));

    copy(&pki.server2.cert_path, &cert);
    copy(&pki.server2.key_path, &key);
    tls_server.reload().unwrap();
    let fresh = connect(server.addr, Some(&pki.alice)).await.unwrap();
    assert_eq!(fresh.server.cn.as_deref(), Some("server2"));
    assert_eq!(
        live.echo("still here").await.unwrap().as_deref(),
        Some("alice: still here")
    );

    // A broken certificate, then a key that does not match: both keep server2.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(tls_server.reload().is_err());
    copy(&pki.server2.cert_path, &cert);
    copy(&pki.alice.key_path, &key);
    assert!(tls_server.reload().is_err());
    let after = connect(server.addr, Some(&pki.alice)).await.unwrap();
    assert_eq!(after.server.cn.as_deref(), Some("server2"));
    assert_eq!(
        live.echo("and now").await.unwrap().as_deref(),
        Some("alice: and now")
    );
    server.stop(DEADLINE).await.unwrap();
}

/// The test PKI's server, asking for client certificates, and a listener for raw peers.
async fn handshake_listener() -> (
    tokio_rustls::TlsAcceptor,
    tokio::net::TcpListener,
    std::net::SocketAddr,
) {
    tls::install_default_provider();
    let pki = test_pki();
    let files = server_files(
        &pki.server.cert_path,
        &pki.server.key_path,
        ClientAuth::Required,
        false,
    );
    let acceptor = ServerTls::load(files).unwrap().acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (acceptor, listener, addr)
}

#[tokio::test]
async fn silent_client_hits_the_handshake_deadline() {
    let (acceptor, listener, addr) = handshake_listener().await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let started = std::time::Instant::now();
    let err = tls::accept(&acceptor, stream, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, tls::TlsError::HandshakeTimeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A peer that closes before the handshake finished is a probe (`TlsError::Closed`), whether it
/// sent nothing or half a ClientHello; bytes that are not TLS are a failed handshake.
#[tokio::test]
async fn a_peer_that_closes_early_is_a_closed_probe_and_garbage_is_a_failed_handshake() {
    let (acceptor, listener, addr) = handshake_listener().await;
    for (sent, closed) in [
        (&b""[..], true),
        (&[0x16, 3, 1, 0, 200, 1][..], true),
        (&b"GET / HTTP/1.1\r\n\r\n"[..], false),
    ] {
        let mut peer = TcpStream::connect(addr).await.unwrap();
        peer.write_all(sent).await.unwrap();
        peer.shutdown().await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let err = tls::accept(&acceptor, stream, DEADLINE).await.unwrap_err();
        assert_eq!(
            matches!(err, tls::TlsError::Closed),
            closed,
            "{sent:?}: {err:?}"
        );
    }
}

/// A stranger that holds its handshake slot and closes later is not a probe (attack finding
/// F4 of issue 19: such peers hid from the handshake-failure alert, which leaves probes out).
#[tokio::test]
async fn a_peer_that_holds_its_handshake_and_then_closes_is_a_failed_handshake() {
    let (acceptor, listener, addr) = handshake_listener().await;
    let peer = tokio::spawn(async move {
        let mut peer = TcpStream::connect(addr).await.unwrap();
        peer.write_all(&[0x16, 3, 1, 0, 200, 1]).await.unwrap();
        tokio::time::sleep(tls::PROBE_WINDOW + Duration::from_millis(300)).await;
        peer.shutdown().await.unwrap();
    });
    let (stream, _) = listener.accept().await.unwrap();
    let err = tls::accept(&acceptor, stream, DEADLINE).await.unwrap_err();
    peer.await.unwrap();
    assert!(matches!(err, tls::TlsError::Handshake(_)), "{err:?}");
    assert_eq!(
        common::metrics::TlsFailure::of(&err),
        common::metrics::TlsFailure::io
    );
}

#[test]
fn pkeycert_file_holds_both_certificate_and_key() {
    let pki = test_pki();
    let files = ServerTlsFiles {
        cert: pki.server.pkeycert_path.clone(),
        key: None,
        client_ca: None,
        crls: Vec::new(),
        client_auth: ClientAuth::Off,
        alpn: Vec::new(),
    };
    let server = ServerTls::load(files).unwrap();
    assert_eq!(
        server.server_identity().unwrap().cn.as_deref(),
        Some("server")
    );
}

#[test]
fn identity_extraction_of_the_test_certificates() {
    let pki = test_pki();
    let der = common::pki::pem_decode(&pki.alice.cert_pem).unwrap();
    let id = PeerIdentity::from_der(&der[0].der).unwrap();
    assert_eq!(id.cn.as_deref(), Some("alice"));
    assert_eq!(id.o.as_deref(), Some("testkit"));
    assert_eq!(id.sha256.len(), 64);
    assert!(PeerIdentity::from_der(b"not a certificate").is_none());
}

#[tokio::test]
async fn skip_hostname_check_still_verifies_the_chain() {
    let spawned = standard_server(ClientAuth::Off).await;
    let pki = test_pki();
    let dial = |ca: &Path, skip: bool| {
        let files = ClientTlsFiles {
            ca: Some(ca.to_owned()),
            skip_hostname_check: skip,
            ..ClientTlsFiles::default()
        };
        let addr = spawned.addr;
        async move {
            let config = Arc::new(tls::client_config(&files)?);
            let tcp = TcpStream::connect(addr).await?;
            tls::connect(config, "not-the-server.example", tcp, DEADLINE).await?;
            anyhow::Ok(())
        }
    };
    // The name is wrong: refused normally, accepted when names are not checked.
    assert!(dial(&pki.ca_path, false).await.is_err());
    dial(&pki.ca_path, true).await.unwrap();
    // An untrusted chain is refused either way.
    assert!(dial(&pki.untrusted_ca_path, true).await.is_err());
    spawned.stop(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn ambiguous_subjects_are_refused_in_the_handshake_and_by_from_der() {
    use Attr::{Cn, O, Ou};
    let pki = test_pki();
    let server = standard_server(ClientAuth::Required).await;
    type Subject<'a> = &'a [&'a [(Attr, &'a str)]];
    let cases: [(&str, Subject<'_>); 4] = [
        ("two-cn", &[&[(Cn, "alice")], &[(Cn, "mallory")]]),
        (
            "multi-valued-rdn",
            &[&[(Cn, "alice"), (Cn, "mallory")], &[(O, "testkit")]],
        ),
        (
            "two-o",
            &[&[(Cn, "alice")], &[(O, "testkit")], &[(O, "other")]],
        ),
        (
            "two-ou",
            &[&[(Cn, "alice")], &[(Ou, "a"), (O, "testkit")], &[(Ou, "b")]],
        ),
    ];
    for (stem, rdns) in cases {
        let leaf = pki.client_with_subject(stem, rdns);
        assert!(
            refused(server.addr, Some(&leaf)).await,
            "{stem} was accepted"
        );
        let der = common::pki::pem_decode(&leaf.cert_pem).unwrap();
        assert_eq!(PeerIdentity::from_der(&der[0].der), None, "{stem}");
        let tls = ServerTls::load(server_files(
            &pki.server.cert_path,
            &pki.server.key_path,
            ClientAuth::Required,
            true,
        ))
        .unwrap();
        let err = tls.check_peer(&der[0].der.clone().into()).unwrap_err();
        assert!(err.to_string().contains("attributes"), "{stem}: {err}");
    }
    // The same construction with one of each is an ordinary client.
    let plain =
        pki.client_with_subject("plain", &[&[(Cn, "plain")], &[(O, "testkit"), (Ou, "ops")]]);
    let mut client = connect(server.addr, Some(&plain)).await.unwrap();
    assert_eq!(
        client.echo("hi").await.unwrap().as_deref(),
        Some("plain: hi")
    );
    server.stop(DEADLINE).await.unwrap();
}

/// Collects what is logged while `f` runs.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let value = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
    (value, text)
}

/// Server files using a CRL file of our own, holding `crl_pem`.
fn files_with_crl(dir: &Path, crl_pem: &str) -> ServerTlsFiles {
    let pki = test_pki();
    let crl = dir.join("crl.pem");
    std::fs::write(&crl, crl_pem).unwrap();
    ServerTlsFiles {
        crls: vec![crl],
        ..server_files(
            &pki.server.cert_path,
            &pki.server.key_path,
            ClientAuth::Required,
            false,
        )
    }
}

#[tokio::test]
async fn a_forged_crl_is_refused_at_load_and_on_reload_keeps_the_old_configuration() {
    use common::pki::{Ca, CaParams, CrlParams, Name};
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let files = files_with_crl(dir.path(), &pki.crl_pem);
    let tls_server = Arc::new(ServerTls::load(files.clone()).unwrap());
    let server = spawn_echo(tls_server.clone()).await;
    let mut live = connect(server.addr, Some(&pki.alice)).await.unwrap();
    assert_eq!(live.echo("a").await.unwrap().as_deref(), Some("alice: a"));

    // Same issuer name as our root, another key: before the fix rustls took it, and then
    // every handshake failed with BadSignature.
    let forger = Ca::new_root(&CaParams::new(
        Name::new("testkit root ca").with_organization(testkit::pki::TEST_ORG),
    ))
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let forged = forger
        .issue_crl(&CrlParams::new(now, time::Duration::days(1)).revoke(&pki.bob.serial_hex))
        .unwrap();
    std::fs::write(&files.crls[0], &forged.pem).unwrap();
    let err = tls_server.reload().unwrap_err().to_string();
    assert!(err.contains("signature does not verify"), "{err}");
    let err = ServerTls::load(files.clone()).unwrap_err().to_string();
    assert!(err.contains("signature does not verify"), "{err}");
    // The old configuration serves: new handshakes and the live connection work.
    let mut fresh = connect(server.addr, Some(&pki.bob)).await.unwrap();
    assert_eq!(fresh.echo("b").await.unwrap().as_deref(), Some("bob: b"));
    assert_eq!(live.echo("c").await.unwrap().as_deref(), Some("alice: c"));
    assert!(refused(server.addr, Some(&pki.revoked)).await);

    // A CRL of a CA the bundle does not hold used to be ignored without a word.
    let other = Ca::new_root(&CaParams::new(Name::new("some other ca"))).unwrap();
    let unrelated = other
        .issue_crl(&CrlParams::new(now, time::Duration::days(1)))
        .unwrap();
    std::fs::write(&files.crls[0], &unrelated.pem).unwrap();
    let err = ServerTls::load(files.clone()).unwrap_err().to_string();
    assert!(
        err.contains("matches no CA in the client CA bundle"),
        "{err}"
    );
    assert!(tls_server.reload().is_err());
    server.stop(DEADLINE).await.unwrap();
}

#[test]
fn an_expired_crl_is_used_with_a_warning() {
    use common::pki::CrlParams;
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let long_ago = time::OffsetDateTime::now_utc() - time::Duration::days(40);
    let expired = pki
        .ca
        .issue_crl(
            &CrlParams::new(long_ago, time::Duration::days(30)).revoke(&pki.alice.serial_hex),
        )
        .unwrap();
    let files = files_with_crl(dir.path(), &expired.pem);
    let (loaded, logs) = logged(|| ServerTls::load(files));
    let tls = loaded.unwrap();
    assert!(logs.contains("past its nextUpdate"), "{logs}");
    assert!(logs.contains("crl.pem"), "{logs}");
    // Still used: alice is revoked.
    let der = common::pki::pem_decode(&pki.alice.cert_pem).unwrap();
    assert!(tls.check_peer(&der[0].der.clone().into()).is_err());
}

#[tokio::test]
async fn a_certificate_revoked_after_the_handshake_is_refused_on_its_live_connection() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let files = files_with_crl(dir.path(), &pki.crl_pem);
    let tls_server = Arc::new(ServerTls::load(files.clone()).unwrap());
    let server = spawn_echo(tls_server.clone()).await;
    let mut alice = connect(server.addr, Some(&pki.alice)).await.unwrap();
    let mut bob = connect(server.addr, Some(&pki.bob)).await.unwrap();
    assert_eq!(alice.echo("1").await.unwrap().as_deref(), Some("alice: 1"));

    std::fs::write(&files.crls[0], pki.crl_revoking(&[&pki.alice.serial_hex])).unwrap();
    tls_server.reload().unwrap();
    let answer = alice.echo("2").await.unwrap().unwrap_or_default();
    assert!(
        answer.starts_with("refused: peer certificate refused: revoked"),
        "{answer}"
    );
    assert_eq!(bob.echo("3").await.unwrap().as_deref(), Some("bob: 3"));
    assert!(refused(server.addr, Some(&pki.alice)).await);
    // The old revocation is gone with the old CRL.
    let mut was_revoked = connect(server.addr, Some(&pki.revoked)).await.unwrap();
    assert_eq!(
        was_revoked.echo("4").await.unwrap().as_deref(),
        Some("revoked: 4")
    );
    server.stop(DEADLINE).await.unwrap();
}

#[test]
fn max_connection_age_has_a_default_and_zero_is_refused() {
    let base = "cert = \"c\"\n";
    let section: tls::TlsSection = toml::from_str(base).unwrap();
    assert_eq!(
        section.max_connection_age(),
        tls::DEFAULT_MAX_CONNECTION_AGE
    );
    let section: tls::TlsSection =
        toml::from_str(&format!("{base}max_connection_age_secs = 60\n")).unwrap();
    assert_eq!(section.max_connection_age(), Duration::from_secs(60));
    let err = toml::from_str::<tls::TlsSection>(&format!("{base}max_connection_age_secs = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 1"), "{err}");
}

/// A server built from PEM text in memory that greets each client by CN, and closes.
async fn spawn_pem_greeter(config: rustls::ServerConfig) -> Spawned {
    testkit::init_tracing();
    tls::install_default_provider();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    testkit::spawn_tcp(move |listener, shutdown| async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = shutdown.triggered() => return Ok(()),
            };
            let acceptor = acceptor.clone();
            shutdown.spawn(async move {
                if let Ok((mut stream, peer)) = tls::accept(&acceptor, stream, DEADLINE).await {
                    let who = peer.and_then(|p| p.cn).unwrap_or_default();
                    let _ = stream.write_all(format!("{who}\n").as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    })
    .await
}

/// The greeting a client gets, or the error that kept it from one.
async fn greeting(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tls::connect(Arc::new(config), "localhost", tcp, DEADLINE).await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    anyhow::ensure!(!line.is_empty(), "closed without a greeting");
    Ok(line.trim_end().to_owned())
}

#[tokio::test]
async fn pem_text_in_memory_builds_the_same_checks_and_a_pinned_client_accepts_only_its_server() {
    use tls::{ClientTlsPem, Pem, ServerTlsPem};
    let pki = test_pki();
    let server = |leaf: &Leaf| {
        ServerTlsPem::mutual(
            Pem::new("server certificate", &leaf.cert_pem),
            Pem::new("server key", &leaf.key_pem),
            Pem::new("client CA", &pki.ca_pem),
            vec![Pem::new("CRL", &pki.crl_pem)],
        )
        .config()
        .unwrap()
    };
    let client = |leaf: &Leaf, pinned: Option<&Leaf>| ClientTlsPem {
        pinned: pinned.map(|p| Pem::new("pinned server certificate", &p.cert_pem)),
        ..ClientTlsPem::mutual(
            Pem::new("CA", &pki.ca_pem),
            Pem::new("client certificate", &leaf.cert_pem),
            Pem::new("client key", &leaf.key_pem),
        )
    };
    let one = spawn_pem_greeter(server(&pki.server)).await;
    let two = spawn_pem_greeter(server(&pki.server2)).await;

    // Client certificates chain to the CA and pass the CRL; a revoked one does not.
    let alice = client(&pki.alice, None).config().unwrap();
    assert_eq!(greeting(one.addr, alice.clone()).await.unwrap(), "alice");
    assert_eq!(greeting(two.addr, alice).await.unwrap(), "alice");
    let revoked = client(&pki.revoked, None).config().unwrap();
    assert!(greeting(one.addr, revoked).await.is_err());

    // Pinned to the first server: the second, from the same CA and for the same name, is
    // refused.
    let pinned = client(&pki.alice, Some(&pki.server)).config().unwrap();
    assert_eq!(greeting(one.addr, pinned.clone()).await.unwrap(), "alice");
    assert!(greeting(two.addr, pinned).await.is_err());

    // Errors name the text by what it is.
    let bad = Pem::new("job key", "not pem")
        .key()
        .unwrap_err()
        .to_string();
    assert!(bad.starts_with("job key: no usable private key"), "{bad}");
    let no_crl = ServerTlsPem::mutual(
        Pem::new("server certificate", &pki.server.cert_pem),
        Pem::new("server key", &pki.server.key_pem),
        Pem::new("client CA", &pki.ca_pem),
        vec![Pem::new("job CRL", "")],
    )
    .config()
    .unwrap_err()
    .to_string();
    assert_eq!(no_crl, "job CRL: no CRL found");
    // Material that does not belong together is refused when built.
    let mismatched = ServerTlsPem::mutual(
        Pem::new("server certificate", &pki.server.cert_pem),
        Pem::new("server key", &pki.alice.key_pem),
        Pem::new("client CA", &pki.ca_pem),
        Vec::new(),
    )
    .config();
    assert!(mismatched.is_err());
    // The key never shows in `Debug`.
    assert!(!format!("{:?}", Pem::new("k", &pki.alice.key_pem)).contains("PRIVATE"));

    one.stop(DEADLINE).await.unwrap();
    two.stop(DEADLINE).await.unwrap();
}
