//! What a chain-verified client certificate must also satisfy here, and the CRLs we trust.
//!
//! - The subject is unambiguous: at most one CN, one O and one OU, counting every attribute
//!   of every RDN (a multi-valued RDN included). [`SubjectChecked`] wraps rustls' verifier so
//!   every daemon refuses such a certificate in the handshake; [`super::PeerIdentity::from_der`]
//!   refuses it too.
//! - A CRL is used only when its issuer is a CA of the client CA bundle (by name) whose key
//!   verifies the CRL's signature ([`check_crls`]); its revoked (issuer, serial) pairs are kept
//!   so live connections can be checked against the current set ([`PeerCert`]).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::time::ASN1Time;

use super::TlsError;

/// Refuses a subject with more than one CN, O or OU.
///
/// # Errors
/// What is ambiguous, e.g. "the subject has 2 CN attributes".
pub(super) fn check_subject(cert: &X509Certificate<'_>) -> Result<(), String> {
    let subject = cert.subject();
    for (name, count) in [
        ("CN", subject.iter_common_name().count()),
        ("O", subject.iter_organization().count()),
        ("OU", subject.iter_organizational_unit().count()),
    ] {
        if count > 1 {
            return Err(format!(
                "the subject has {count} {name} attributes; one is allowed"
            ));
        }
    }
    Ok(())
}

/// A certificate refused by a rule of ours after rustls accepted its chain.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(what: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Refused(what)),
    )))
}

/// rustls' client-certificate verifier, then the subject rule ([`check_subject`]).
#[derive(Debug)]
pub(super) struct SubjectChecked(pub(super) Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for SubjectChecked {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        let (_, cert) = X509Certificate::from_der(end_entity.as_ref())
            .map_err(|e| refused(format!("client certificate does not parse: {e}")))?;
        check_subject(&cert).map_err(|what| refused(format!("client certificate: {what}")))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// (issuer name DER, serial number bytes) of a certificate.
type IssuerSerial = (Vec<u8>, Vec<u8>);

/// The certificates the loaded CRLs revoke, by issuer name and serial.
#[derive(Debug, Default)]
pub(super) struct Revoked(HashSet<IssuerSerial>);

impl Revoked {
    fn contains(&self, key: &IssuerSerial) -> bool {
        self.0.contains(key)
    }
}

/// Serial number bytes without the sign-padding zero, so DER and sloppy encodings agree.
fn serial_key(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

fn crl_error(path: &Path, what: String) -> TlsError {
    TlsError::Crl {
        path: path.to_owned(),
        what,
    }
}

/// Checks every CRL against the CA bundle and collects what they revoke.
///
/// A CRL is accepted when a CA of `cas` has the CRL's issuer as subject and its key verifies
/// the CRL's signature. One past its nextUpdate (at `now`) is used, with a warning.
///
/// # Errors
/// [`TlsError::Crl`] for a CRL that does not parse, names no CA of the bundle, or whose
/// signature no such CA verifies.
pub(super) fn check_crls(
    cas: &[CertificateDer<'_>],
    crls: &[(PathBuf, CertificateRevocationListDer<'static>)],
    now: ASN1Time,
) -> Result<Revoked, TlsError> {
    let cas = cas
        .iter()
        .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok().map(|(_, c)| c))
        .collect::<Vec<_>>();
    let mut revoked = HashSet::new();
    for (path, der) in crls {
        let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
            .map_err(|e| crl_error(path, format!("CRL does not parse: {e}")))?;
        let issuer = crl.issuer();
        let named = cas
            .iter()
            .filter(|ca| ca.subject().as_raw() == issuer.as_raw())
            .collect::<Vec<_>>();
        if named.is_empty() {
            return Err(crl_error(
                path,
                format!("CRL issuer {issuer} matches no CA in the client CA bundle"),
            ));
        }
        if !named
            .iter()
            .any(|ca| crl.verify_signature(ca.public_key()).is_ok())
        {
            return Err(crl_error(
                path,
                format!("CRL signature does not verify with the key of CA {issuer}"),
            ));
        }
        if let Some(next) = crl.next_update().filter(|next| *next < now) {
            tracing::warn!(
                file = ?path,
                next_update = %next,
                issuer = %issuer,
                "the CRL is past its nextUpdate; still using it"
            );
        }
        for entry in crl.iter_revoked_certificates() {
            revoked.insert((issuer.as_raw().to_vec(), serial_key(entry.raw_serial())));
        }
    }
    Ok(Revoked(revoked))
}

/// A verified peer's certificate chain, reduced to what later checks need: the (issuer,
/// serial) of every certificate it presented. Made once per connection, so a check before each
/// privileged action is a few hash lookups.
#[derive(Debug, Clone)]
pub struct PeerCert {
    chain: Vec<IssuerSerial>,
}

impl PeerCert {
    /// The peer's chain, leaf first; the leaf's subject must be unambiguous.
    ///
    /// # Errors
    /// [`TlsError::PeerRefused`] when a certificate does not parse or the leaf's subject has
    /// more than one CN, O or OU.
    pub fn new(chain: &[CertificateDer<'_>]) -> Result<Self, TlsError> {
        let mut pairs = Vec::with_capacity(chain.len());
        for (i, der) in chain.iter().enumerate() {
            let (_, cert) = X509Certificate::from_der(der.as_ref())
                .map_err(|e| TlsError::PeerRefused(format!("certificate does not parse: {e}")))?;
            if i == 0 {
                check_subject(&cert).map_err(TlsError::PeerRefused)?;
            }
            pairs.push((
                cert.issuer().as_raw().to_vec(),
                serial_key(cert.raw_serial()),
            ));
        }
        if pairs.is_empty() {
            return Err(TlsError::PeerRefused("no certificate".into()));
        }
        Ok(Self { chain: pairs })
    }

    /// The first revoked certificate of the chain, by its position (0 is the leaf).
    pub(super) fn revoked_in(&self, revoked: &Revoked) -> Option<usize> {
        self.chain.iter().position(|key| revoked.contains(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_keys_ignore_sign_padding() {
        assert_eq!(serial_key(&[0, 0x80, 1]), vec![0x80, 1]);
        assert_eq!(serial_key(&[0x7f]), vec![0x7f]);
        assert_eq!(serial_key(&[0]), Vec::<u8>::new());
    }
}
