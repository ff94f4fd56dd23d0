//! rustls configurations for the daemons and their clients.
//!
//! - [`ServerTls`] builds a server configuration from PEM files (certificate chain and key, CA
//!   bundle, CRLs, client-certificate policy) and rebuilds it on demand: [`ServerTls::reload`]
//!   swaps in the new material only when every file parses and the key matches the certificate,
//!   so a bad file on SIGHUP keeps the old configuration. Live connections keep the
//!   configuration they were accepted with.
//! - [`client_config`] builds a client configuration (CA bundle, optional client certificate,
//!   optionally one pinned server certificate).
//! - Both also take the PEM text itself ([`ServerTlsPem::config`], [`ClientTlsPem::config`]):
//!   the file API reads its files into a [`Pem`] each and calls the bytes API, so there is one
//!   construction path for material on disk and material held in memory (a broker job's).
//! - [`accept`] and [`connect`] run a handshake under a deadline and return the verified
//!   [`PeerIdentity`].
//! - Client certificates must chain to the CA bundle, must not be revoked by a CRL, and must
//!   have an unambiguous subject (at most one CN, O and OU). CRLs are used only when a CA of
//!   the bundle signed them. [`ServerTls::live_peer`] re-checks a live connection's peer
//!   against the CRLs loaded now, before each privileged action.
//!
//! Protocol versions are TLS 1.2 and 1.3 only, with forward-secret (ECDHE) suites only. The
//! crypto provider is ring; the reasons are in docs/ARCHITECTURE.md. This module knows nothing
//! about what the daemons do with the identity.

use std::fmt;
use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

mod trust;

pub use trust::PeerCert;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Default deadline for a TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default maximum age of a connection (`max_connection_age_secs`): one day, long enough
/// that a websocket reconnects about once a day, short enough that nothing lives for long on
/// trust that has since been withdrawn.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(86_400);

/// Errors from loading TLS material or running a handshake.
///
/// Each message already names its cause, so no variant reports a `source()`: `{err:#}` and
/// anyhow chains print the cause once.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: io::Error,
    },
    /// A PEM file (or PEM text held in memory, by its [`Pem`] name) held no usable item of
    /// the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file, or the name of the text.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// rustls refused the material (key does not match, unsupported key type, ...).
    #[error("tls configuration: {0}")]
    Rustls(rustls::Error),
    /// The client verifier could not be built (empty CA bundle, bad CRL, ...).
    #[error("client certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// The configuration is contradictory.
    #[error("{0}")]
    Invalid(String),
    /// A CRL is unusable: it does not parse, names no CA of the bundle, or is not signed by
    /// that CA.
    #[error("{path}: {what}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A live peer's certificate is no longer acceptable (revoked since the handshake, or an
    /// ambiguous subject).
    #[error("peer certificate refused: {0}")]
    PeerRefused(String),
    /// The handshake did not finish before the deadline.
    #[error("tls handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The handshake failed.
    #[error("tls handshake: {0}")]
    Handshake(io::Error),
    /// The peer closed the connection before the handshake finished, without a TLS alert and
    /// within [`PROBE_WINDOW`] of its start: a port probe (a health check, `nc -z`, a scanner),
    /// not a failed handshake.
    #[error("closed probe: the peer closed the connection before the tls handshake finished")]
    Closed,
    /// The stranger pool was full and this connection, still in its handshake, was the
    /// oldest one of the busiest source address (or, between equals, of at least
    /// `common::admission::EVICT_MIN_AGE`): closed for a newcomer.
    #[error("tls handshake: evicted from the full stranger pool (max_handshakes)")]
    Evicted,
}

impl From<rustls::Error> for TlsError {
    fn from(err: rustls::Error) -> Self {
        Self::Rustls(err)
    }
}

impl From<rustls::server::VerifierBuilderError> for TlsError {
    fn from(err: rustls::server::VerifierBuilderError) -> Self {
        Self::Verifier(err)
    }
}

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A certificate chaining to the CA bundle is mandatory.
    #[default]
    Required,
    /// A certificate is requested; if one is sent it must verify.
    Optional,
    /// No certificate is requested.
    Off,
}

/// Where a server finds its TLS material; every path is re-read on [`ServerTls::reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first. May also hold the key (the Micronets `pkeycert`).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1). `None`: the key is in `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// PEM CRL files; a revoked client certificate is refused.
    pub crls: Vec<PathBuf>,
    /// Client-certificate policy.
    pub client_auth: ClientAuth,
    /// ALPN protocols offered, most preferred first; empty means no ALPN.
    pub alpn: Vec<Vec<u8>>,
}

/// The `[tls]` section every daemon's TOML file shares (deploy/config/README.md).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first (may hold the key too).
    pub cert: PathBuf,
    /// PEM private key; absent when `cert` holds it.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// PEM bundle of trusted client CAs.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// PEM CRL files.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// `required`, `optional` or `off`; the daemon supplies the default.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Seconds a handshake may take: the whole time from TCP accept to an authenticated
    /// connection (see [`crate::admission`]).
    #[serde(default = "default_handshake_secs")]
    pub handshake_timeout_secs: u64,
    /// Seconds after which a connection is closed gracefully, so that no connection lives
    /// for ever on the trust it was accepted with; 0 is refused.
    #[serde(
        default = "default_max_connection_age_secs",
        deserialize_with = "nonzero_secs"
    )]
    pub max_connection_age_secs: u64,
    /// Most connections still in the handshake (not yet authenticated) at once; they do not
    /// count against the daemon's `max_connections`. Zero is refused when parsing.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: NonZeroUsize,
    /// Most of those from one source address (an IPv4 address or an IPv6 /64).
    #[serde(default = "default_max_handshakes_per_address")]
    pub max_handshakes_per_address: NonZeroUsize,
}

fn default_handshake_secs() -> u64 {
    DEFAULT_HANDSHAKE_TIMEOUT.as_secs()
}

fn default_max_connection_age_secs() -> u64 {
    DEFAULT_MAX_CONNECTION_AGE.as_secs()
}

fn nonzero_secs<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let secs = <u64 as serde::Deserialize>::deserialize(deserializer)?;
    if secs == 0 {
        return Err(serde::de::Error::custom(
            "must be at least 1 (seconds); 0 would close every connection at once",
        ));
    }
    Ok(secs)
}

fn default_max_handshakes() -> NonZeroUsize {
    NonZeroUsize::new(crate::limits::DEFAULT_MAX_HANDSHAKES).unwrap_or(NonZeroUsize::MIN)
}

fn default_max_handshakes_per_address() -> NonZeroUsize {
    NonZeroUsize::new(crate::limits::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS)
        .unwrap_or(NonZeroUsize::MIN)
}

impl TlsSection {
    /// A section serving `cert` (which then holds the key too), every other key at its
    /// default.
    pub fn new(cert: PathBuf) -> Self {
        Self {
            cert,
            key: None,
            client_ca: None,
            crls: Vec::new(),
            client_auth: None,
            handshake_timeout_secs: default_handshake_secs(),
            max_connection_age_secs: default_max_connection_age_secs(),
            max_handshakes: default_max_handshakes(),
            max_handshakes_per_address: default_max_handshakes_per_address(),
        }
    }

    /// The files to load, with `default_auth` where the section sets no policy.
    pub fn files(&self, default_auth: ClientAuth, alpn: Vec<Vec<u8>>) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
            crls: self.crls.clone(),
            client_auth: self.client_auth.unwrap_or(default_auth),
            alpn,
        }
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// How long a connection may live (at least one second).
    pub fn max_connection_age(&self) -> Duration {
        Duration::from_secs(self.max_connection_age_secs.max(1))
    }

    /// The front-door limits of a listener with this section and `max_connections` slots for
    /// authenticated connections; the handshake timeout is the stranger deadline.
    pub fn admission(&self, max_connections: usize) -> crate::limits::Limits {
        crate::limits::Limits {
            max_connections,
            max_handshakes: self.max_handshakes.get(),
            max_handshakes_per_address: self.max_handshakes_per_address.get(),
            deadline: self.handshake_timeout(),
        }
    }
}

/// The crypto provider every configuration here uses, restricted to forward-secret suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // rustls implements only ECDHE suites; filtering keeps this true if that ever changes.
    provider.cipher_suites.retain(|suite| match suite {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(s) => {
            matches!(s.kx, rustls::crypto::KeyExchangeAlgorithm::ECDHE)
        }
    });
    Arc::new(provider)
}

/// Installs the ring provider as the process default; idempotent. Called once from `main`.
pub fn install_default_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A server configuration that can be rebuilt from its files while the daemon runs.
pub struct ServerTls {
    files: ServerTlsFiles,
    current: RwLock<Current>,
}

/// What one (re)load built: swapped as a whole.
#[derive(Clone)]
struct Current {
    config: Arc<ServerConfig>,
    revoked: Arc<trust::Revoked>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads every file and builds the first configuration.
    ///
    /// # Errors
    /// Any unreadable or invalid file, a key that does not match the certificate, or
    /// `client_auth` other than `off` without a CA bundle.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let current = build_server_config(&files.read()?)?;
        Ok(Self {
            files,
            current: RwLock::new(current),
        })
    }

    /// Rebuilds the configuration from disk; on error the previous one stays in use. A
    /// success is logged at info with the files it read, so every daemon says the same about
    /// what a reload reloaded.
    ///
    /// # Errors
    /// As [`ServerTls::load`]; the running configuration is untouched.
    pub fn reload(&self) -> Result<(), TlsError> {
        let built = build_server_config(&self.files.read()?)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = built;
        drop(current);
        tracing::info!(
            cert = ?self.files.cert,
            key = ?self.files.key,
            client_ca = ?self.files.client_ca,
            crls = self.files.crls.len(),
            "reloaded certificates: the server certificate and key, the client CA bundle and the CRLs"
        );
        Ok(())
    }

    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The configuration new connections are accepted with.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current().config
    }

    /// Checks a peer's certificate chain against the rules and CRLs loaded now.
    ///
    /// # Errors
    /// [`TlsError::PeerRefused`] when a certificate of the chain is revoked by a current CRL.
    pub fn check(&self, peer: &PeerCert) -> Result<(), TlsError> {
        check_revoked(peer, &self.current().revoked)
    }

    /// Checks a peer's leaf certificate (subject rule and current CRLs).
    ///
    /// # Errors
    /// [`TlsError::PeerRefused`].
    pub fn check_peer(&self, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
        self.check(&PeerCert::new(std::slice::from_ref(leaf))?)
    }

    /// The handle a connection keeps to re-check its peer before each privileged action.
    pub fn live_peer(self: &Arc<Self>, conn: &rustls::CommonState) -> LivePeer {
        let cert = conn
            .peer_certificates()
            .filter(|chain| !chain.is_empty())
            .map(|chain| {
                PeerCert::new(chain)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            });
        LivePeer {
            source: Source::Server(self.clone()),
            cert,
        }
    }

    /// An acceptor for the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// The files this configuration is built from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Identity of the server's own leaf certificate, for the start-up log line.
    ///
    /// # Errors
    /// The certificate file cannot be read or parsed.
    pub fn server_identity(&self) -> Result<PeerIdentity, TlsError> {
        let chain = load_certs(&self.files.cert)?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_error(&self.files.cert, "no certificate"))?;
        PeerIdentity::from_der(leaf.as_ref())
            .ok_or_else(|| pem_error(&self.files.cert, "certificate does not parse"))
    }
}

impl ServerTlsFiles {
    /// Reads every file this configuration names (the client CA bundle and CRLs only when
    /// client certificates are asked for).
    ///
    /// # Errors
    /// [`TlsError::Read`] for an unreadable file.
    pub fn read(&self) -> Result<ServerTlsPem, TlsError> {
        let cert = Pem::read(&self.cert)?;
        let key = self.key.as_deref().map(Pem::read).transpose()?;
        let (client_ca, crls) = if self.client_auth == ClientAuth::Off {
            (None, Vec::new())
        } else {
            let ca = self.client_ca.as_deref().map(Pem::read).transpose()?;
            let crls = self
                .crls
                .iter()
                .map(|path| Pem::read(path))
                .collect::<Result<_, _>>()?;
            (ca, crls)
        };
        Ok(ServerTlsPem {
            cert,
            key,
            client_ca,
            crls,
            client_auth: self.client_auth,
            alpn: self.alpn.clone(),
        })
    }
}

/// PEM text and the name its errors go by: the file it was read from, or what it is when it
/// is held in memory. Its `Debug` shows the name and the length, never the text (it may be a
/// private key).
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    origin: PathBuf,
    bytes: Vec<u8>,
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("origin", &self.origin)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl Pem {
    /// PEM text held in memory, called `origin` in errors (e.g. "job certificate").
    pub fn new(origin: impl Into<PathBuf>, text: impl AsRef<[u8]>) -> Self {
        Self {
            origin: origin.into(),
            bytes: text.as_ref().to_vec(),
        }
    }

    /// The contents of a PEM file, called by its path in errors.
    ///
    /// # Errors
    /// [`TlsError::Read`].
    pub fn read(path: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            origin: path.to_owned(),
            bytes: read(path)?,
        })
    }

    /// The file this came from, or its name.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Every certificate in the text.
    ///
    /// # Errors
    /// Bad PEM, or no certificate at all.
    pub fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&self.origin, &format!("bad certificate PEM: {e}")))?;
        if certs.is_empty() {
            return Err(pem_error(&self.origin, "no certificate found"));
        }
        Ok(certs)
    }

    /// The first private key in the text (PKCS#8, SEC1 or PKCS#1).
    ///
    /// # Errors
    /// No key.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.bytes)
            .map_err(|e| pem_error(&self.origin, &format!("no usable private key: {e}")))
    }

    /// The certificates of a CA bundle as a root store.
    ///
    /// # Errors
    /// No certificate, or a certificate that is not a usable trust anchor.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        roots_from(&self.origin, self.certs()?)
    }

    /// Every CRL in the text.
    ///
    /// # Errors
    /// Bad PEM, or no CRL.
    pub fn crls(&self) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
        let crls = CertificateRevocationListDer::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&self.origin, &format!("bad CRL PEM: {e}")))?;
        if crls.is_empty() {
            return Err(pem_error(&self.origin, "no CRL found"));
        }
        Ok(crls)
    }
}

/// A server's TLS material as PEM text ([`ServerTlsFiles::read`], or held in memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsPem {
    /// Certificate chain, leaf first (may hold the key too).
    pub cert: Pem,
    /// Private key; `None` means it is in `cert`.
    pub key: Option<Pem>,
    /// Trusted client CAs (needed unless `client_auth` is `off`).
    pub client_ca: Option<Pem>,
    /// CRLs, each signed by a CA of `client_ca`.
    pub crls: Vec<Pem>,
    /// Whether client certificates are required, optional or not asked for.
    pub client_auth: ClientAuth,
    /// ALPN protocols, in preference order.
    pub alpn: Vec<Vec<u8>>,
}

impl ServerTlsPem {
    /// Serving `cert` with `key`, requiring a client certificate that chains to `client_ca`
    /// and is not revoked by `crls`; no ALPN.
    pub fn mutual(cert: Pem, key: Pem, client_ca: Pem, crls: Vec<Pem>) -> Self {
        Self {
            cert,
            key: Some(key),
            client_ca: Some(client_ca),
            crls,
            client_auth: ClientAuth::Required,
            alpn: Vec::new(),
        }
    }

    /// Builds the server configuration (the same one [`ServerTls::load`] builds from files).
    ///
    /// # Errors
    /// Invalid PEM, a key that does not match the certificate, an unusable CRL, or
    /// `client_auth` other than `off` without a CA bundle.
    pub fn config(&self) -> Result<ServerConfig, TlsError> {
        build_server_config(self).map(|current| Arc::unwrap_or_clone(current.config))
    }
}

fn build_server_config(files: &ServerTlsPem) -> Result<Current, TlsError> {
    let chain = files.cert.certs()?;
    let key_file = files.key.as_ref().unwrap_or(&files.cert);
    let key = key_file.key()?;
    // Only a file that does hold the key is checked (a certificate file without one is not).
    warn_if_key_shared(key_file.origin());
    let provider = provider();
    let mut revoked = trust::Revoked::default();
    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
        match (files.client_auth, &files.client_ca) {
            (ClientAuth::Off, _) => WebPkiClientVerifier::no_client_auth(),
            (_, None) => {
                return Err(TlsError::Invalid(
                    "client certificates are enabled but no client CA bundle is configured".into(),
                ));
            }
            (auth, Some(ca)) => {
                let cas = ca.certs()?;
                let roots = Arc::new(roots_from(&ca.origin, cas.iter().cloned())?);
                let (crls, found) = verified_crls(&cas, &files.crls)?;
                revoked = found;
                // CRLs we hold are enforced; an issuer without a CRL is not an error, so an
                // intermediate CA without a published CRL does not lock its clients out.
                let mut builder =
                    WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                        .with_crls(crls.into_iter().map(|(_, crl)| crl))
                        .allow_unknown_revocation_status();
                if auth == ClientAuth::Optional {
                    builder = builder.allow_unauthenticated();
                }
                Arc::new(trust::SubjectChecked(builder.build()?))
            }
        };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = files.alpn.clone();
    Ok(Current {
        config: Arc::new(config),
        revoked: Arc::new(revoked),
    })
}

/// Every CRL of `crls`, each verified against the CA bundle `cas` (a CRL that no CA of the
/// bundle signed is refused: rustls would either ignore it, revocation silently off, or fail
/// every handshake), and what they revoke.
fn verified_crls(
    cas: &[CertificateDer<'static>],
    crls: &[Pem],
) -> Result<
    (
        Vec<(PathBuf, CertificateRevocationListDer<'static>)>,
        trust::Revoked,
    ),
    TlsError,
> {
    let mut all = Vec::new();
    for pem in crls {
        all.extend(pem.crls()?.into_iter().map(|crl| (pem.origin.clone(), crl)));
    }
    let revoked = trust::check_crls(cas, &all, x509_parser::time::ASN1Time::now())?;
    Ok((all, revoked))
}

/// Whether `peer`'s chain is clear of `revoked`.
fn check_revoked(peer: &PeerCert, revoked: &trust::Revoked) -> Result<(), TlsError> {
    match peer.revoked_in(revoked) {
        None => Ok(()),
        Some(0) => Err(TlsError::PeerRefused("revoked by a current CRL".into())),
        Some(_) => Err(TlsError::PeerRefused(
            "its issuing CA is revoked by a current CRL".into(),
        )),
    }
}

/// Revocation without a TLS server: a CA bundle and CRLs, each CRL verified against the
/// bundle as [`ServerTls`] does, reloaded on demand ([`Crls::reload`]: a bad file keeps the
/// loaded set). For certificates whose handshake someone else ran (a front such as HAProxy
/// forwards them): [`Crls::live_peer`] gives the same [`LivePeer`] a TLS connection has.
pub struct Crls {
    client_ca: PathBuf,
    crls: Vec<PathBuf>,
    revoked: RwLock<Arc<trust::Revoked>>,
}

impl fmt::Debug for Crls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crls")
            .field("client_ca", &self.client_ca)
            .field("crls", &self.crls)
            .finish_non_exhaustive()
    }
}

impl Crls {
    /// Loads the CA bundle and the CRLs, verifying each CRL against the bundle.
    ///
    /// # Errors
    /// An unreadable file, a bundle without certificates, a CRL that does not parse or that
    /// no CA of the bundle signed.
    pub fn load(client_ca: PathBuf, crls: Vec<PathBuf>) -> Result<Self, TlsError> {
        let revoked = Self::read(&client_ca, &crls)?;
        Ok(Self {
            client_ca,
            crls,
            revoked: RwLock::new(Arc::new(revoked)),
        })
    }

    fn read(client_ca: &Path, crls: &[PathBuf]) -> Result<trust::Revoked, TlsError> {
        let cas = Pem::read(client_ca)?.certs()?;
        let crls = crls
            .iter()
            .map(|path| Pem::read(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(verified_crls(&cas, &crls)?.1)
    }

    /// Reads the files again; on error the loaded set stays in use. A success is logged.
    ///
    /// # Errors
    /// As [`Crls::load`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let revoked = Arc::new(Self::read(&self.client_ca, &self.crls)?);
        *self
            .revoked
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = revoked;
        tracing::info!(
            client_ca = ?self.client_ca,
            crls = self.crls.len(),
            "reloaded the CRLs (and the CA bundle they are verified against)"
        );
        Ok(())
    }

    fn revoked(&self) -> Arc<trust::Revoked> {
        self.revoked
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Checks a certificate chain (leaf first) against the CRLs loaded now.
    ///
    /// # Errors
    /// [`TlsError::PeerRefused`] when a certificate of the chain is revoked.
    pub fn check(&self, peer: &PeerCert) -> Result<(), TlsError> {
        check_revoked(peer, &self.revoked())
    }

    /// The handle a connection keeps to re-check its peer's certificate `leaf` (forwarded,
    /// its chain verified by the front) before each privileged action.
    pub fn live_peer(self: &Arc<Self>, leaf: &CertificateDer<'_>) -> LivePeer {
        let cert = PeerCert::new(std::slice::from_ref(leaf))
            .map(Arc::new)
            .map_err(|e| e.to_string());
        LivePeer {
            source: Source::Crls(self.clone()),
            cert: Some(cert),
        }
    }
}

/// Where a [`LivePeer`] finds the CRLs loaded now.
#[derive(Clone)]
enum Source {
    Server(Arc<ServerTls>),
    Crls(Arc<Crls>),
}

/// A connection's handle on its peer, to re-check it against the CRLs loaded now before each
/// privileged action (see [`ServerTls::live_peer`], [`Crls::live_peer`]). Cheap to clone.
#[derive(Clone)]
pub struct LivePeer {
    source: Source,
    /// `None`: no client certificate; `Some(Err)`: a certificate that does not pass.
    cert: Option<Result<Arc<PeerCert>, String>>,
}

impl fmt::Debug for LivePeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LivePeer")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl LivePeer {
    /// Whether the peer may still act: its certificate (if it sent one) is not revoked by
    /// the CRLs loaded now. A peer without a certificate passes; what it may do is the
    /// daemon's rule.
    ///
    /// # Errors
    /// [`TlsError::PeerRefused`] with the reason.
    pub fn check(&self) -> Result<(), TlsError> {
        match &self.cert {
            None => Ok(()),
            Some(Ok(cert)) => match &self.source {
                Source::Server(tls) => tls.check(cert),
                Source::Crls(crls) => crls.check(cert),
            },
            Some(Err(why)) => Err(TlsError::PeerRefused(why.clone())),
        }
    }
}

/// What a client presents and trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM CA bundle the server must chain to.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain (may hold the key too, as a `pkeycert`).
    pub cert: Option<PathBuf>,
    /// PEM client key; `None` with `cert` set means the key is in `cert`.
    pub key: Option<PathBuf>,
    /// ALPN protocols to offer.
    pub alpn: Vec<Vec<u8>>,
    /// Verify the chain but not the name in the server certificate. Only for servers whose
    /// certificates carry no usable name, like those the Micronets scripts make (no SAN).
    pub skip_hostname_check: bool,
}

/// Builds a client configuration.
///
/// # Errors
/// Unreadable or invalid files, or no CA bundle.
pub fn client_config(files: &ClientTlsFiles) -> Result<ClientConfig, TlsError> {
    if files.ca.is_none() {
        return Err(no_ca());
    }
    files.read()?.config()
}

fn no_ca() -> TlsError {
    TlsError::Invalid("a CA bundle is required to verify the server".into())
}

impl ClientTlsFiles {
    /// Reads every file this configuration names.
    ///
    /// # Errors
    /// [`TlsError::Read`] for an unreadable file.
    pub fn read(&self) -> Result<ClientTlsPem, TlsError> {
        let read = |path: &Option<PathBuf>| path.as_deref().map(Pem::read).transpose();
        Ok(ClientTlsPem {
            ca: read(&self.ca)?,
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            alpn: self.alpn.clone(),
            skip_hostname_check: self.skip_hostname_check,
            pinned: None,
        })
    }
}

/// What a client presents and trusts, as PEM text ([`ClientTlsFiles::read`], or held in
/// memory).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientTlsPem {
    /// CA bundle the server must chain to (required).
    pub ca: Option<Pem>,
    /// Client certificate chain (may hold the key too).
    pub cert: Option<Pem>,
    /// Client key; `None` with `cert` set means the key is in `cert`.
    pub key: Option<Pem>,
    /// ALPN protocols to offer.
    pub alpn: Vec<Vec<u8>>,
    /// Verify the chain but not the name in the server certificate.
    pub skip_hostname_check: bool,
    /// Accept only this server certificate (its first one), and only when it also passes
    /// every other check. For a server whose CA issues the same names to others (a broker
    /// job's), where the chain alone would let another server stand in for this one.
    pub pinned: Option<Pem>,
}

impl ClientTlsPem {
    /// Trusting `ca` and presenting `cert` with `key`.
    pub fn mutual(ca: Pem, cert: Pem, key: Pem) -> Self {
        Self {
            ca: Some(ca),
            cert: Some(cert),
            key: Some(key),
            ..Self::default()
        }
    }

    /// Builds the client configuration.
    ///
    /// # Errors
    /// Invalid PEM, a key that does not match, or no CA bundle.
    pub fn config(&self) -> Result<ClientConfig, TlsError> {
        let ca = self.ca.as_ref().ok_or_else(no_ca)?;
        let roots = Arc::new(ca.roots()?);
        let builder =
            ClientConfig::builder_with_provider(provider()).with_protocol_versions(VERSIONS)?;
        let pinned = match &self.pinned {
            Some(pem) => Some(
                pem.certs()?
                    .into_iter()
                    .next()
                    .ok_or_else(|| pem_error(&pem.origin, "no certificate found"))?,
            ),
            None => None,
        };
        let builder = if self.skip_hostname_check || pinned.is_some() {
            let chain =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Invalid(format!("server certificate verifier: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ServerCheck {
                    chain,
                    any_name: self.skip_hostname_check,
                    pinned,
                }))
        } else {
            builder.with_root_certificates(roots)
        };
        let mut config = match &self.cert {
            Some(cert) => {
                let chain = cert.certs()?;
                let key = self.key.as_ref().unwrap_or(cert).key()?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }
}

/// Verifies the server's chain, validity and signatures like the default verifier; with
/// `any_name` it accepts any name in the certificate, with `pinned` only that end-entity
/// certificate.
#[derive(Debug)]
struct ServerCheck {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    any_name: bool,
    pinned: Option<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let verified = match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) if self.any_name => rustls::client::danger::ServerCertVerified::assertion(),
            other => other?,
        };
        if self
            .pinned
            .as_ref()
            .is_some_and(|pinned| end_entity.as_ref() != pinned.as_ref())
        {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A peer that closes before the handshake finished within this time of its start, without an
/// alert, is a port probe ([`TlsError::Closed`]); one that closes later has held a handshake
/// slot and is a failed handshake.
pub const PROBE_WINDOW: Duration = Duration::from_secs(1);

/// Runs a server handshake under `deadline` and returns the stream and the verified peer.
///
/// # Errors
/// [`TlsError::HandshakeTimeout`], [`TlsError::Closed`] (the peer closed before the handshake
/// finished, within [`PROBE_WINDOW`]: a port probe) or [`TlsError::Handshake`].
pub async fn accept<IO>(
    acceptor: &TlsAcceptor,
    io: IO,
    deadline: Duration,
) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<PeerIdentity>), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let started = tokio::time::Instant::now();
    let stream = tokio::time::timeout(deadline, acceptor.accept(io))
        .await
        .map_err(|_| TlsError::HandshakeTimeout(deadline))?
        .map_err(|err| {
            // tokio-rustls's end of input before the handshake finished; a peer that gave up
            // with an alert, or sent garbage, is a rustls error (InvalidData) instead. Only a
            // quick close is a probe: a peer that held its handshake slot for longer and then
            // closed is a failed handshake (`io`), which alerts count.
            if err.kind() == io::ErrorKind::UnexpectedEof && started.elapsed() < PROBE_WINDOW {
                TlsError::Closed
            } else {
                TlsError::Handshake(err)
            }
        })?;
    let peer = peer_identity(stream.get_ref().1);
    Ok((stream, peer))
}

/// The identity of the peer's verified leaf certificate, on either side of a connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<PeerIdentity> {
    let leaf = conn.peer_certificates()?.first()?;
    PeerIdentity::from_der(leaf.as_ref())
}

/// Runs a client handshake under `deadline`.
///
/// # Errors
/// An invalid server name, [`TlsError::HandshakeTimeout`] or [`TlsError::Handshake`].
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    server_name: &str,
    io: IO,
    deadline: Duration,
) -> Result<tokio_rustls::client::TlsStream<IO>, TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::Invalid(format!("invalid server name {server_name:?}")))?;
    tokio::time::timeout(deadline, TlsConnector::from(config).connect(name, io))
        .await
        .map_err(|_| TlsError::HandshakeTimeout(deadline))?
        .map_err(TlsError::Handshake)
}

/// The identity in a verified certificate, for authorization and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerIdentity {
    /// Subject common name.
    pub cn: Option<String>,
    /// Subject organisation.
    pub o: Option<String>,
    /// Subject organisational unit.
    pub ou: Option<String>,
    /// DNS names, IP addresses, e-mail addresses and URIs from subjectAltName.
    pub sans: Vec<String>,
    /// Lower-case hex SHA-256 of the DER certificate.
    pub sha256: String,
}

impl PeerIdentity {
    /// Extracts the identity from a DER certificate; `None` when it does not parse.
    /// A subject with more than one CN, O or OU is ambiguous and gives `None` too.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        trust::check_subject(&cert).ok()?;
        let subject = cert.subject();
        fn first<'a>(
            mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
        ) -> Option<String> {
            it.next()
                .and_then(|attr| attr.as_str().ok())
                .map(str::to_owned)
        }
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                        sans.push((*s).to_owned());
                    }
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            sans.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(Self {
            cn: first(subject.iter_common_name()),
            o: first(subject.iter_organization()),
            ou: first(subject.iter_organizational_unit()),
            sans,
            sha256: hex::encode(Sha256::digest(der)),
        })
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cn {
            Some(cn) => write!(f, "CN={cn}")?,
            None => f.write_str("CN=-")?,
        }
        if let Some(o) = &self.o {
            write!(f, ",O={o}")?;
        }
        write!(
            f,
            " sha256={}",
            self.sha256.get(..16).unwrap_or(&self.sha256)
        )
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Logs a warning when the file holding the server's private key can be read by its group or
/// by others. Not refused: a deployment may share a key with certificate tooling through a
/// group on purpose; but the supported layout is owner-only (docs: the key belongs to the
/// service's user, mode 0600), and a group that grants anything else (a status socket, say)
/// would grant the key too.
fn warn_if_key_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode();
    if let Some(warning) = key_mode_warning(path, mode, std::env::var_os("CREDENTIALS_DIRECTORY")) {
        tracing::warn!(path = %path.display(), mode = %format!("{:04o}", mode & 0o7777), "{warning}");
    }
}

/// The warning for a private key file with permission bits `mode`, if it deserves one.
fn key_mode_warning(
    path: &Path,
    mode: u32,
    credentials: Option<std::ffi::OsString>,
) -> Option<&'static str> {
    let credentials = credentials.map(std::path::PathBuf::from);
    (!crate::secret::secret_mode_ok(path, mode, credentials.as_deref())).then_some(
        "the TLS private key can be read by its group or by others: make it 0600, owned by the service's user",
    )
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })
}

fn pem_error(path: &Path, what: &str) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

/// Reads every certificate in a PEM file.
///
/// # Errors
/// Unreadable file, bad PEM, or no certificate at all.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    Pem::read(path)?.certs()
}

/// Reads the first private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
///
/// # Errors
/// Unreadable file or no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    Pem::read(path)?.key()
}

/// Reads a CA bundle into a root store.
///
/// # Errors
/// Unreadable file, no certificate, or a certificate that is not a usable trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    Pem::read(path)?.roots()
}

fn roots_from(
    path: &Path,
    certs: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| pem_error(path, &format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Reads every CRL in a PEM file.
///
/// # Errors
/// Unreadable file, bad PEM, or no CRL.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    Pem::read(path)?.crls()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_readable_beyond_its_owner_is_warned_about_except_systemds_credential_acl() {
        let key = Path::new("/etc/ws-proxy/tls.key");
        assert!(key_mode_warning(key, 0o100_600, None).is_none());
        assert!(key_mode_warning(key, 0o100_400, None).is_none());
        assert!(key_mode_warning(key, 0o100_640, None).is_some());
        assert!(key_mode_warning(key, 0o100_604, None).is_some());
        assert!(key_mode_warning(key, 0o100_644, None).is_some());
        // systemd shows its ACL mask as group read inside $CREDENTIALS_DIRECTORY.
        let dir = std::ffi::OsString::from("/run/credentials/ws-proxy.service");
        let credential = Path::new("/run/credentials/ws-proxy.service/tls.key");
        assert!(key_mode_warning(credential, 0o100_440, Some(dir.clone())).is_none());
        assert!(key_mode_warning(credential, 0o100_444, Some(dir)).is_some());
    }
}
