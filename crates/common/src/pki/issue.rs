//! Certificate authorities and what they issue: intermediates, leaves and CRLs.
//!
//! A [`Ca`] is a CA certificate plus its private key. It is either made here
//! ([`Ca::new_root`], [`Ca::issue_intermediate`]) or loaded from PEM ([`Ca::from_pem`],
//! [`Ca::load`]); either way issuing goes through the same path, which re-reads the issuer
//! name and key identifier from the CA certificate itself so that issuer names and authority
//! key identifiers always match byte for byte.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use super::inspect::{CertInfo, inspect_der};
use super::keys::KeyType;
use super::pem::{pem_decode, pem_encode, serial_from_hex, serial_to_hex};
use super::{PkiError, Result};

/// How far `not_before` is set in the past by [`Validity::starting`], to absorb clock skew.
pub const BACKDATE: Duration = Duration::minutes(5);

/// The subject of a certificate: common name plus optional organisation and unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Name {
    /// `CN`; left out of the subject when empty.
    pub common_name: String,
    /// `O`.
    pub organization: Option<String>,
    /// `OU`.
    pub organizational_unit: Option<String>,
}

impl Name {
    /// A subject with only a common name.
    pub fn new(common_name: impl Into<String>) -> Self {
        Self {
            common_name: common_name.into(),
            ..Self::default()
        }
    }

    /// Sets `O`.
    pub fn with_organization(mut self, organization: impl Into<String>) -> Self {
        self.organization = Some(organization.into());
        self
    }

    /// Sets `OU`.
    pub fn with_organizational_unit(mut self, unit: impl Into<String>) -> Self {
        self.organizational_unit = Some(unit.into());
        self
    }

    fn to_distinguished_name(&self) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        if let Some(o) = &self.organization {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        if let Some(ou) = &self.organizational_unit {
            dn.push(DnType::OrganizationalUnitName, ou.as_str());
        }
        if !self.common_name.is_empty() {
            dn.push(DnType::CommonName, self.common_name.as_str());
        }
        dn
    }
}

/// A subject alternative name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum San {
    /// A DNS name (`localhost`, `*.example.org`).
    Dns(String),
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
}

impl FromStr for San {
    type Err = PkiError;

    /// IP addresses (IPv6 optionally in brackets) become [`San::Ip`], anything else that
    /// looks like a host name becomes [`San::Dns`].
    fn from_str(s: &str) -> Result<Self> {
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.*_".contains(&b))
            && !s.starts_with('.')
            && !s.contains("..");
        if valid {
            Ok(Self::Dns(s.to_owned()))
        } else {
            Err(PkiError::InvalidSan(s.to_owned()))
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => write!(f, "DNS:{name}"),
            Self::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// Which extended key usages a leaf certificate carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Usage {
    /// `serverAuth` only.
    Server,
    /// `clientAuth` only.
    Client,
    /// Both `serverAuth` and `clientAuth`, as a daemon that also dials peers needs.
    #[default]
    ServerAndClient,
}

impl Usage {
    fn purposes(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Self::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Self::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Self::ServerAndClient => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
        }
    }
}

/// The period a certificate is valid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First instant of validity.
    pub not_before: OffsetDateTime,
    /// Last instant of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Exactly the given bounds (a `not_after` in the past makes an expired certificate).
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        Self {
            not_before,
            not_after,
        }
    }

    /// Valid from [`BACKDATE`] before `now` until `now + lifetime`.
    pub fn starting(now: OffsetDateTime, lifetime: Duration) -> Self {
        Self {
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        }
    }

    /// Valid from a few minutes ago for `days` days, using the system clock.
    pub fn days(days: i64) -> Self {
        Self::starting(OffsetDateTime::now_utc(), Duration::days(days))
    }

    fn check(&self) -> Result<()> {
        if self.not_after <= self.not_before {
            Err(PkiError::InvalidValidity)
        } else {
            Ok(())
        }
    }
}

/// What to put in a new CA certificate.
#[derive(Clone, Debug)]
pub struct CaParams {
    /// Subject.
    pub name: Name,
    /// Key algorithm of the CA's own key.
    pub key_type: KeyType,
    /// Validity period.
    pub validity: Validity,
    /// basicConstraints pathLenConstraint; `None` means unlimited.
    pub path_len: Option<u8>,
}

impl CaParams {
    /// A P-256 CA valid for ten years with no path length limit.
    pub fn new(name: Name) -> Self {
        Self {
            name,
            key_type: KeyType::default(),
            validity: Validity::days(3650),
            path_len: None,
        }
    }
}

/// What to put in a new leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafParams {
    /// Subject.
    pub name: Name,
    /// Subject alternative names; servers need at least one for hostname checks.
    pub sans: Vec<San>,
    /// Extended key usages.
    pub usage: Usage,
    /// Key algorithm of the leaf key.
    pub key_type: KeyType,
    /// Validity period.
    pub validity: Validity,
}

impl LeafParams {
    /// A P-256 leaf valid for a year with the given subject and usage and no SANs.
    pub fn new(name: Name, usage: Usage) -> Self {
        Self {
            name,
            sans: Vec::new(),
            usage,
            key_type: KeyType::default(),
            validity: Validity::days(365),
        }
    }

    /// Adds subject alternative names.
    pub fn with_sans(mut self, sans: impl IntoIterator<Item = San>) -> Self {
        self.sans.extend(sans);
        self
    }
}

/// What to put in a CRL.
#[derive(Clone, Debug)]
pub struct CrlParams {
    /// Serial numbers to revoke, as hex (see [`super::serial_from_hex`]).
    pub revoked_serials: Vec<String>,
    /// Issue time; also used as the revocation time of every entry.
    pub this_update: OffsetDateTime,
    /// When the next CRL is due; verifiers may reject the CRL after this.
    pub next_update: OffsetDateTime,
    /// The CRL number; `None` uses `this_update` in Unix seconds, which only grows.
    pub crl_number: Option<u64>,
}

impl CrlParams {
    /// An empty CRL issued at `now` and due again after `lifetime`.
    pub fn new(now: OffsetDateTime, lifetime: Duration) -> Self {
        Self {
            revoked_serials: Vec::new(),
            this_update: now,
            next_update: now + lifetime,
            crl_number: None,
        }
    }

    /// Adds a serial number (hex) to revoke.
    pub fn revoke(mut self, serial_hex: impl Into<String>) -> Self {
        self.revoked_serials.push(serial_hex.into());
        self
    }
}

/// A signed CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crl {
    /// PEM (`X509 CRL`).
    pub pem: String,
    /// DER.
    pub der: Vec<u8>,
}

/// A freshly issued certificate and its private key.
#[derive(Clone)]
pub struct Issued {
    /// The certificate alone, PEM.
    pub cert_pem: String,
    /// The certificate alone, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 PEM (`PRIVATE KEY`), unencrypted.
    pub key_pem: String,
    /// The certificate followed by every intermediate up to (not including) the root.
    pub chain_pem: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Key algorithm.
    pub key_type: KeyType,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial_hex", &self.serial_hex)
            .field("key_type", &self.key_type)
            .field("key_pem", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// A CA certificate with its private key, able to issue certificates and CRLs.
pub struct Ca {
    key: KeyPair,
    key_pem: String,
    cert_der: Vec<u8>,
    cert_pem: String,
    /// This certificate and the intermediates above it, excluding a self-signed root.
    chain_pem: String,
    self_signed: bool,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("self_signed", &self.self_signed)
            .field("cert_pem", &self.cert_pem)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a self-signed root CA with a new key.
    pub fn new_root(params: &CaParams) -> Result<Self> {
        params.validity.check()?;
        let key = params.key_type.generate()?;
        let cert = ca_params(params).self_signed(&key)?;
        Ok(Self::assemble(
            key,
            cert.der().to_vec(),
            String::new(),
            true,
        ))
    }

    /// Makes an intermediate CA with a new key, signed by this CA.
    pub fn issue_intermediate(&self, params: &CaParams) -> Result<Ca> {
        params.validity.check()?;
        let key = params.key_type.generate()?;
        let cert = ca_params(params).signed_by(&key, &self.issuer()?)?;
        let parents = if self.self_signed {
            String::new()
        } else {
            self.chain_pem.clone()
        };
        Ok(Self::assemble(key, cert.der().to_vec(), parents, false))
    }

    /// Issues a leaf certificate with a new key.
    pub fn issue_leaf(&self, params: &LeafParams) -> Result<Issued> {
        params.validity.check()?;
        let key = params.key_type.generate()?;
        let mut cert_params = base_params(&params.name, params.validity);
        cert_params.is_ca = IsCa::ExplicitNoCa;
        cert_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if params.key_type.is_rsa() {
            cert_params
                .key_usages
                .push(KeyUsagePurpose::KeyEncipherment);
        }
        cert_params.extended_key_usages = params.usage.purposes();
        cert_params.subject_alt_names = params
            .sans
            .iter()
            .map(|san| match san {
                San::Dns(name) => name
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| PkiError::InvalidSan(name.clone())),
                San::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect::<Result<_>>()?;
        let serial_hex = serial_of(&cert_params);
        let cert = cert_params.signed_by(&key, &self.issuer()?)?;
        let cert_pem = pem_encode("CERTIFICATE", cert.der());
        let mut chain_pem = cert_pem.clone();
        if !self.self_signed {
            chain_pem.push_str(&self.chain_pem);
        }
        Ok(Issued {
            cert_der: cert.der().to_vec(),
            cert_pem,
            key_pem: key.serialize_pem(),
            chain_pem,
            serial_hex,
            key_type: params.key_type,
        })
    }

    /// Signs a CRL listing the given serial numbers.
    pub fn issue_crl(&self, params: &CrlParams) -> Result<Crl> {
        if params.next_update <= params.this_update {
            return Err(PkiError::InvalidValidity);
        }
        let revoked_certs = params
            .revoked_serials
            .iter()
            .map(|serial| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial_from_hex(serial)?),
                    revocation_time: params.this_update,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<_>>()?;
        let crl_number = params
            .crl_number
            .unwrap_or_else(|| u64::try_from(params.this_update.unix_timestamp()).unwrap_or(1));
        let crl_params = CertificateRevocationListParams {
            this_update: params.this_update,
            next_update: params.next_update,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id_method()?,
        };
        let crl = crl_params.signed_by(&self.issuer()?)?;
        let der = crl.der().to_vec();
        Ok(Crl {
            pem: pem_encode("X509 CRL", &der),
            der,
        })
    }

    /// Loads a CA from its certificate PEM (optionally followed by its parents) and its key
    /// PEM (PKCS#8, or the SEC1 P-256 `EC PRIVATE KEY` and PKCS#1 `RSA PRIVATE KEY` that
    /// `openssl` and the original Micronets scripts write), checking that the certificate is a CA and the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let certs: Vec<Vec<u8>> = pem_decode(cert_pem)?
            .into_iter()
            .filter(|block| block.label == "CERTIFICATE")
            .map(|block| block.der)
            .collect();
        let Some((ca_der, parents)) = certs.split_first() else {
            return Err(PkiError::NoCertificate);
        };
        let pkcs8 = key_as_pkcs8(key_pem)?;
        let key = KeyPair::try_from(pkcs8.as_slice()).map_err(PkiError::BadKey)?;

        let (_, x509) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| PkiError::ParseCert(e.to_string()))?;
        if !x509.is_ca() {
            return Err(PkiError::NotCa(x509.subject().to_string()));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(PkiError::KeyMismatch);
        }
        let self_signed = x509.subject().as_raw() == x509.issuer().as_raw();
        let mut parents_pem = String::new();
        if !self_signed {
            for der in parents {
                let (_, parent) = x509_parser::parse_x509_certificate(der)
                    .map_err(|e| PkiError::ParseCert(e.to_string()))?;
                if parent.subject().as_raw() != parent.issuer().as_raw() {
                    parents_pem.push_str(&pem_encode("CERTIFICATE", der));
                }
            }
        }
        Ok(Self::assemble(
            key,
            ca_der.clone(),
            parents_pem,
            self_signed,
        ))
    }

    /// Reads `cert_path` and `key_path` and calls [`Ca::from_pem`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(&read(cert_path)?, &read(key_path)?)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM, unencrypted.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// This certificate and the intermediates above it (empty for a self-signed root).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Whether this CA is a self-signed root.
    pub fn is_root(&self) -> bool {
        self.self_signed
    }

    /// Inspects the CA certificate.
    pub fn info(&self) -> Result<CertInfo> {
        inspect_der(&self.cert_der)
    }

    fn assemble(key: KeyPair, cert_der: Vec<u8>, parents_pem: String, self_signed: bool) -> Self {
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        let chain_pem = if self_signed {
            String::new()
        } else {
            format!("{cert_pem}{parents_pem}")
        };
        Self {
            key_pem: key.serialize_pem(),
            key,
            cert_der,
            cert_pem,
            chain_pem,
            self_signed,
        }
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>> {
        let der = CertificateDer::from(self.cert_der.as_slice());
        Ok(Issuer::from_ca_cert_der(&der, &self.key)?)
    }

    /// The CA's own subject key identifier, so CRLs name it exactly as certificates do.
    fn key_id_method(&self) -> Result<KeyIdMethod> {
        let (_, x509) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|e| PkiError::ParseCert(e.to_string()))?;
        let ski = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        Ok(ski.map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified))
    }
}

fn base_params(name: &Name, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name.to_distinguished_name();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn ca_params(params: &CaParams) -> CertificateParams {
    let mut cert_params = base_params(&params.name, params.validity);
    cert_params.is_ca = IsCa::Ca(match params.path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    cert_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    cert_params
}

/// 128 random bits, positive, with a fixed length so the hex form is always 32 digits.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn serial_of(params: &CertificateParams) -> String {
    params
        .serial_number
        .as_ref()
        .map(|s| serial_to_hex(&s.to_bytes()))
        .unwrap_or_default()
}

/// The first private key in `key_pem` as PKCS#8 DER, converting SEC1 P-256 and PKCS#1 RSA keys.
fn key_as_pkcs8(key_pem: &str) -> Result<Vec<u8>> {
    use p256::pkcs8::EncodePrivateKey as _;
    use rsa::pkcs1::DecodeRsaPrivateKey as _;
    for block in pem_decode(key_pem)? {
        match block.label.as_str() {
            "PRIVATE KEY" => return Ok(block.der),
            "EC PRIVATE KEY" => {
                let key = p256::SecretKey::from_sec1_der(&block.der).map_err(|_| {
                    PkiError::UnsupportedKey("EC PRIVATE KEY that is not on P-256".into())
                })?;
                let der = key
                    .to_pkcs8_der()
                    .map_err(|e| PkiError::UnsupportedKey(e.to_string()))?;
                return Ok(der.as_bytes().to_vec());
            }
            "RSA PRIVATE KEY" => {
                let key = rsa::RsaPrivateKey::from_pkcs1_der(&block.der)
                    .map_err(|e| PkiError::UnsupportedKey(format!("RSA PRIVATE KEY: {e}")))?;
                let der = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
                    .map_err(|e| PkiError::UnsupportedKey(e.to_string()))?;
                return Ok(der.as_bytes().to_vec());
            }
            _ => {}
        }
    }
    Err(PkiError::NoPrivateKey)
}
