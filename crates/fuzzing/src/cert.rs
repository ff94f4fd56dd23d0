//! Certificate identity extraction: `common::tls::PeerIdentity` (what authorization and logs
//! use), `common::tls::PeerCert` (the live revocation check) and `common::pki::inspect_der`.

use common::pki::inspect_der;
use common::tls::{PeerCert, PeerIdentity};
use rustls_pki_types::CertificateDer;

/// A peer's DER certificate through the three readers, which must agree.
pub fn cert_identity(data: &[u8]) {
    let identity = PeerIdentity::from_der(data);
    let chain = [CertificateDer::from(data)];
    // Both refuse what does not parse and an ambiguous subject, and nothing else.
    assert_eq!(identity.is_some(), PeerCert::new(&chain).is_ok());
    let info = inspect_der(data);
    if let Some(identity) = &identity {
        let _ = identity.to_string();
        if let Ok(info) = &info {
            assert_eq!(identity.cn, info.common_name);
            assert_eq!(identity.o, info.organization);
            assert_eq!(identity.ou, info.organizational_unit);
            assert_eq!(identity.sha256, info.sha256_fingerprint);
        }
    }
}
