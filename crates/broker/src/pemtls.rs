//! rustls configurations built from PEM text held in memory: the material a job's `load`
//! returns, used by the gate (server side) and by `broker-cli connect` (client side).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors from building a configuration out of PEM.
#[derive(Debug, thiserror::Error)]
pub enum PemTlsError {
    /// Text that holds no usable certificate, key or CRL.
    #[error("invalid {what}: {detail}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("tls configuration: {0}")]
    Config(String),
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, PemTlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemTlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemTlsError::Pem {
            what,
            detail: "no certificate".into(),
        });
    }
    Ok(certs)
}

fn key(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, PemTlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PemTlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PemTlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs("CA certificate", ca_pem)? {
        store
            .add(cert)
            .map_err(|e| PemTlsError::Config(e.to_string()))?;
    }
    Ok(Arc::new(store))
}

/// A server configuration presenting `cert_pem`/`key_pem` that requires a client certificate
/// chaining to `ca_pem` and not revoked by any CRL in `crl_pem` (may be empty).
///
/// # Errors
/// [`PemTlsError`].
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    crl_pem: &str,
) -> Result<ServerConfig, PemTlsError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(crl_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemTlsError::Pem {
            what: "CRL",
            detail: e.to_string(),
        })?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, common::tls::provider())
            .with_crls(crls)
            .build()
            .map_err(|e| PemTlsError::Config(e.to_string()))?;
    ServerConfig::builder_with_provider(common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PemTlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs("certificate", cert_pem)?,
            key("private key", key_pem)?,
        )
        .map_err(|e| PemTlsError::Config(e.to_string()))
}

/// A client configuration trusting only `ca_pem` and presenting `cert_pem`/`key_pem`.
///
/// # Errors
/// [`PemTlsError`].
pub fn client_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<ClientConfig, PemTlsError> {
    ClientConfig::builder_with_provider(common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PemTlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            certs("client certificate", cert_pem)?,
            key("client key", key_pem)?,
        )
        .map_err(|e| PemTlsError::Config(e.to_string()))
}

/// Like [`client_config`], but accepts only the server certificate `server_pem` (the job's
/// own, from `load`), and only when it also chains to `ca_pem` and carries the server name
/// as the default verifier checks. Every job's certificate chains to the same CA and names
/// the same hosts, so the chain alone would let another job's server stand in for this one.
///
/// # Errors
/// [`PemTlsError`].
pub fn pinned_client_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    server_pem: &str,
) -> Result<ClientConfig, PemTlsError> {
    let pinned = certs("server certificate", server_pem)?
        .into_iter()
        .next()
        .ok_or_else(|| PemTlsError::Pem {
            what: "server certificate",
            detail: "no certificate".into(),
        })?;
    let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(ca_pem)?,
        common::tls::provider(),
    )
    .build()
    .map_err(|e| PemTlsError::Config(e.to_string()))?;
    ClientConfig::builder_with_provider(common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PemTlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pinned, chain }))
        .with_client_auth_cert(
            certs("client certificate", cert_pem)?,
            key("client key", key_pem)?,
        )
        .map_err(|e| PemTlsError::Config(e.to_string()))
}

/// The default verifier (chain, validity, name, signatures) plus one rule: the end-entity
/// certificate is exactly the pinned one.
#[derive(Debug)]
struct Pinned {
    pinned: CertificateDer<'static>,
    chain: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if end_entity.as_ref() != self.pinned.as_ref() {
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
