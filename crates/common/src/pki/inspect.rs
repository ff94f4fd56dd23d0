//! Reading certificates and CRLs back into plain, serialisable summaries.
//!
//! This is for humans (`certgen inspect`), logs and tests; it does not verify signatures
//! or chains, and it decides nothing about trust.

use std::net::IpAddr;

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

use super::pem::{pem_decode, serial_to_hex};
use super::{PkiError, Result};

/// A summary of one certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// Subject, RFC 4514 style (`O=testkit, CN=alice`).
    pub subject: String,
    /// Issuer, same format.
    pub issuer: String,
    /// First subject `CN`.
    pub common_name: Option<String>,
    /// First subject `O`.
    pub organization: Option<String>,
    /// First subject `OU`.
    pub organizational_unit: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Serial number, lowercase hex without separators or sign padding.
    pub serial_hex: String,
    /// Start of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub not_after: OffsetDateTime,
    /// keyUsage bits by their RFC 5280 names (`digitalSignature`, `keyCertSign`, ...).
    pub key_usage: Vec<String>,
    /// Extended key usages (`serverAuth`, `clientAuth`, or dotted OIDs).
    pub extended_key_usage: Vec<String>,
    /// basicConstraints CA flag.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u32>,
    /// Subject equals issuer.
    pub self_signed: bool,
    /// `ed25519`, `p256`, `p384`, `rsa2048`, `rsa3072`, ... or the algorithm OID.
    pub key_type: String,
    /// Signature algorithm name (`ecdsa-with-SHA256`, ...) or dotted OID.
    pub signature_algorithm: String,
    /// Subject key identifier, lowercase hex.
    pub subject_key_id: Option<String>,
    /// Authority key identifier, lowercase hex.
    pub authority_key_id: Option<String>,
    /// SHA-256 over the DER, lowercase hex (as `sha256sum` of the DER file prints).
    pub sha256_fingerprint: String,
    /// SHA-1 over the DER, lowercase hex; for matching legacy tools only.
    pub sha1_fingerprint: String,
}

impl CertInfo {
    /// Whether `now` lies inside the validity period.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// A summary of one CRL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CrlInfo {
    /// Issuer name.
    pub issuer: String,
    /// thisUpdate.
    #[serde(serialize_with = "rfc3339")]
    pub this_update: OffsetDateTime,
    /// nextUpdate, if present.
    #[serde(serialize_with = "rfc3339_opt")]
    pub next_update: Option<OffsetDateTime>,
    /// CRL number, lowercase hex.
    pub crl_number: Option<String>,
    /// Authority key identifier, lowercase hex.
    pub authority_key_id: Option<String>,
    /// Revoked serial numbers, lowercase hex, in CRL order.
    pub revoked_serials: Vec<String>,
}

impl CrlInfo {
    /// Whether `serial_hex` (any form [`super::serial_from_hex`] accepts) is listed.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        super::serial_from_hex(serial_hex)
            .map(hex::encode)
            .is_ok_and(|wanted| self.revoked_serials.contains(&wanted))
    }
}

/// Summarises every `CERTIFICATE` block in `text`, in order.
pub fn inspect_pem(text: &str) -> Result<Vec<CertInfo>> {
    let infos = pem_decode(text)?
        .into_iter()
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| inspect_der(&block.der))
        .collect::<Result<Vec<_>>>()?;
    if infos.is_empty() {
        Err(PkiError::NoCertificate)
    } else {
        Ok(infos)
    }
}

/// Summarises one DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertInfo> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::ParseCert(e.to_string()))?;
    let parse_err = |e: x509_parser::error::X509Error| PkiError::ParseCert(e.to_string());

    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    if let Some(san) = x509.subject_alternative_name().map_err(parse_err)? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        ip_addresses.push(ip);
                    }
                }
                _ => {}
            }
        }
    }

    let key_usage = match x509.key_usage().map_err(parse_err)? {
        Some(ku) => {
            let ku = ku.value;
            [
                (ku.digital_signature(), "digitalSignature"),
                (ku.non_repudiation(), "nonRepudiation"),
                (ku.key_encipherment(), "keyEncipherment"),
                (ku.data_encipherment(), "dataEncipherment"),
                (ku.key_agreement(), "keyAgreement"),
                (ku.key_cert_sign(), "keyCertSign"),
                (ku.crl_sign(), "cRLSign"),
                (ku.encipher_only(), "encipherOnly"),
                (ku.decipher_only(), "decipherOnly"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_owned())
            .collect()
        }
        None => Vec::new(),
    };

    let extended_key_usage = match x509.extended_key_usage().map_err(parse_err)? {
        Some(eku) => {
            let eku = eku.value;
            let mut names: Vec<String> = [
                (eku.any, "anyExtendedKeyUsage"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_owned())
            .collect();
            names.extend(eku.other.iter().map(|oid| oid.to_id_string()));
            names
        }
        None => Vec::new(),
    };

    let (is_ca, path_len) = match x509.basic_constraints().map_err(parse_err)? {
        Some(bc) => (bc.value.ca, bc.value.path_len_constraint),
        None => (false, None),
    };

    let mut subject_key_id = None;
    let mut authority_key_id = None;
    for ext in x509.iter_extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => subject_key_id = Some(hex::encode(id.0)),
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|id| hex::encode(id.0));
            }
            _ => {}
        }
    }

    let signature_oid = &x509.signature_algorithm.algorithm;
    let signature_algorithm =
        x509_parser::objects::oid2sn(signature_oid, x509_parser::objects::oid_registry())
            .map_or_else(|_| signature_oid.to_id_string(), str::to_owned);

    Ok(CertInfo {
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        common_name: first_attr(x509.subject(), Attr::Cn),
        organization: first_attr(x509.subject(), Attr::O),
        organizational_unit: first_attr(x509.subject(), Attr::Ou),
        dns_names,
        ip_addresses,
        serial_hex: serial_to_hex(x509.raw_serial()),
        not_before: x509.validity().not_before.to_datetime(),
        not_after: x509.validity().not_after.to_datetime(),
        key_usage,
        extended_key_usage,
        is_ca,
        path_len,
        self_signed: x509.subject().as_raw() == x509.issuer().as_raw(),
        key_type: key_type_name(&x509),
        signature_algorithm,
        subject_key_id,
        authority_key_id,
        sha256_fingerprint: hex::encode(Sha256::digest(der)),
        sha1_fingerprint: hex::encode(sha1::Sha1::digest(der)),
    })
}

/// Summarises the first `X509 CRL` block in `text`.
pub fn inspect_crl_pem(text: &str) -> Result<CrlInfo> {
    let block = pem_decode(text)?
        .into_iter()
        .find(|block| block.label == "X509 CRL")
        .ok_or_else(|| PkiError::ParseCrl("no X509 CRL pem block".to_owned()))?;
    inspect_crl_der(&block.der)
}

/// Summarises one DER CRL.
pub fn inspect_crl_der(der: &[u8]) -> Result<CrlInfo> {
    let (_, crl) =
        x509_parser::parse_x509_crl(der).map_err(|e| PkiError::ParseCrl(e.to_string()))?;
    let authority_key_id = crl
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| hex::encode(id.0))
            }
            _ => None,
        });
    Ok(CrlInfo {
        issuer: crl.issuer().to_string(),
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        crl_number: crl.crl_number().map(|n| hex::encode(n.to_bytes_be())),
        authority_key_id,
        revoked_serials: crl
            .iter_revoked_certificates()
            .map(|revoked| serial_to_hex(revoked.raw_serial()))
            .collect(),
    })
}

enum Attr {
    Cn,
    O,
    Ou,
}

fn first_attr(name: &X509Name<'_>, attr: Attr) -> Option<String> {
    let mut values = match attr {
        Attr::Cn => name.iter_common_name().collect::<Vec<_>>(),
        Attr::O => name.iter_organization().collect(),
        Attr::Ou => name.iter_organizational_unit().collect(),
    }
    .into_iter();
    values
        .next()
        .and_then(|value| value.as_str().ok().map(str::to_owned))
}

fn key_type_name(x509: &X509Certificate<'_>) -> String {
    let spki = x509.public_key();
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_SIG_ED25519 {
        return "ed25519".to_owned();
    }
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => format!("p{}", point.key_size()),
        Ok(PublicKey::RSA(rsa)) if *oid == OID_PKCS1_RSAENCRYPTION => {
            format!("rsa{}", rsa.key_size())
        }
        _ => oid.to_id_string(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn rfc3339<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = t
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}
