//! The test PKI: one root CA, an intermediate, an untrusted CA and a cast of leaves.
//!
//! Everything is ECDSA P-256, generated once per test process by [`test_pki`] and written
//! into a temporary directory that stays for the whole process, so tests can hand file
//! paths to daemons as well as PEM strings to in-process configs. It knows nothing about
//! any daemon; tests that need more certificates issue them from [`TestPki::ca`].

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::pki::{Ca, CaParams, CrlParams, Issued, LeafParams, Name, San, Usage, Validity};
use time::{Duration, OffsetDateTime};

/// Organisation written into every test certificate.
pub const TEST_ORG: &str = "testkit";

/// A leaf certificate with its key, in memory and on disk.
#[derive(Clone)]
pub struct Leaf {
    /// Certificate PEM; for [`TestPki::chained_client`] the leaf followed by the intermediate.
    pub cert_pem: String,
    /// PKCS#8 private key PEM.
    pub key_pem: String,
    /// File holding `cert_pem`.
    pub cert_path: PathBuf,
    /// File holding `key_pem` (mode 0600 on Unix).
    pub key_path: PathBuf,
    /// File holding `cert_pem` followed by `key_pem`.
    pub pkeycert_path: PathBuf,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_path", &self.cert_path)
            .field("serial_hex", &self.serial_hex)
            .field("key_pem", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// Every fixture of the test PKI; see the field docs for who issued what.
#[derive(Debug)]
pub struct TestPki {
    /// Directory holding every file below; kept for the lifetime of the process.
    pub dir: PathBuf,
    /// Trusted root CA certificate PEM.
    pub ca_pem: String,
    /// File holding `ca_pem`.
    pub ca_path: PathBuf,
    /// Intermediate CA certificate PEM, issued by the root.
    pub intermediate_pem: String,
    /// File holding `intermediate_pem`.
    pub intermediate_path: PathBuf,
    /// A second, unrelated root CA that nothing trusts.
    pub untrusted_ca_pem: String,
    /// File holding `untrusted_ca_pem`.
    pub untrusted_ca_path: PathBuf,
    /// Server by the root: CN "server", SANs localhost, 127.0.0.1, ::1, server+client EKU.
    pub server: Leaf,
    /// Another server certificate (CN "server2", same SANs), for reload tests.
    pub server2: Leaf,
    /// Client by the root, CN "alice", O "testkit".
    pub alice: Leaf,
    /// Client by the root, CN "bob", O "testkit".
    pub bob: Leaf,
    /// Client CN "carol" by the intermediate; `cert_pem` holds leaf + intermediate.
    pub chained_client: Leaf,
    /// Client CN "mallory" by the untrusted CA.
    pub mallory: Leaf,
    /// Client CN "expired" by the root, expired yesterday.
    pub expired: Leaf,
    /// Client CN "revoked" by the root, listed in `crl_pem`.
    pub revoked: Leaf,
    /// CRL by the root revoking `revoked`.
    pub crl_pem: String,
    /// File holding `crl_pem`.
    pub crl_path: PathBuf,
    /// The root CA, to issue more certificates in a test.
    pub ca: Ca,
}

impl TestPki {
    /// A daemon's `[tls]` section serving the test server certificate and checking client
    /// certificates against the root CA and its CRL (the daemon picks the client-auth
    /// policy); handshakes time out after 2 s.
    pub fn server_tls_section(&self) -> common::tls::TlsSection {
        common::tls::TlsSection {
            key: Some(self.server.key_path.clone()),
            client_ca: Some(self.ca_path.clone()),
            crls: vec![self.crl_path.clone()],
            client_auth: None,
            handshake_timeout_secs: 2,
            ..common::tls::TlsSection::new(self.server.cert_path.clone())
        }
    }
}

/// A subject attribute type for [`TestPki::client_with_subject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    /// commonName, 2.5.4.3.
    Cn,
    /// organizationName, 2.5.4.10.
    O,
    /// organizationalUnitName, 2.5.4.11.
    Ou,
}

impl TestPki {
    /// A current CRL by the root CA revoking `serials` (hex, as in [`Leaf::serial_hex`]),
    /// as PEM.
    ///
    /// # Panics
    /// When signing fails.
    pub fn crl_revoking(&self, serials: &[&str]) -> String {
        let params = serials.iter().fold(
            CrlParams::new(
                OffsetDateTime::now_utc() - Duration::minutes(5),
                Duration::days(30),
            ),
            |params, serial| params.revoke(*serial),
        );
        self.ca
            .issue_crl(&params)
            .unwrap_or_else(|e| panic!("cannot issue a crl: {e}"))
            .pem
    }

    /// A client certificate by the root CA whose subject is exactly `rdns`: each inner slice
    /// is one RDN, so `&[&[(Cn, "alice"), (Cn, "mallory")]]` is one multi-valued RDN and
    /// `&[&[(Cn, "alice")], &[(Cn, "mallory")]]` two RDNs. rcgen cannot write either (its
    /// names hold one value per type), so the subject is spliced into an rcgen certificate,
    /// which is then signed again with the CA key. Files go into [`TestPki::dir`] as
    /// `<file_stem>.*`.
    ///
    /// # Panics
    /// On any failure to issue, sign or write; a test can do nothing else.
    pub fn client_with_subject(&self, file_stem: &str, rdns: &[&[(Attr, &str)]]) -> Leaf {
        self.try_client_with_subject(file_stem, rdns)
            .unwrap_or_else(|e| panic!("cannot issue {file_stem}: {e:#}"))
    }

    fn try_client_with_subject(
        &self,
        file_stem: &str,
        rdns: &[&[(Attr, &str)]],
    ) -> anyhow::Result<Leaf> {
        use anyhow::Context as _;
        use rcgen::SigningKey as _;
        use x509_parser::prelude::{FromDer as _, X509Certificate};

        let issued = self.ca.issue_leaf(&LeafParams::new(
            Name::new(file_stem).with_organization(TEST_ORG),
            Usage::Client,
        ))?;
        let leaf_pem = common::pki::pem_decode(&issued.chain_pem)?;
        let der = &leaf_pem.first().context("no certificate")?.der;
        let (_, cert) = X509Certificate::from_der(der).context("parse the rcgen certificate")?;
        let tbs = cert.tbs_certificate.as_ref();
        let old_subject = cert.subject().as_raw();
        let at = tbs
            .windows(old_subject.len())
            .rposition(|w| w == old_subject)
            .context("subject not found in the TBS")?;
        let subject = der_tlv(
            0x30,
            &rdns
                .iter()
                .map(|rdn| {
                    der_tlv(
                        0x31,
                        &rdn.iter()
                            .map(|(attr, value)| {
                                let oid: &[u8] = match attr {
                                    Attr::Cn => &[0x55, 0x04, 0x03],
                                    Attr::O => &[0x55, 0x04, 0x0a],
                                    Attr::Ou => &[0x55, 0x04, 0x0b],
                                };
                                der_tlv(
                                    0x30,
                                    &[der_tlv(0x06, oid), der_tlv(0x0c, value.as_bytes())].concat(),
                                )
                            })
                            .collect::<Vec<_>>()
                            .concat(),
                    )
                })
                .collect::<Vec<_>>()
                .concat(),
        );
        let header = if tbs.get(1).is_some_and(|b| *b < 0x80) {
            2
        } else {
            2 + usize::from(tbs.get(1).copied().unwrap_or(0) & 0x7f)
        };
        let body = [
            &tbs[header..at],
            &subject[..],
            &tbs[at + old_subject.len()..],
        ]
        .concat();
        let tbs = der_tlv(0x30, &body);
        let ca_key = rcgen::KeyPair::from_pem(self.ca.key_pem())?;
        let signature = ca_key.sign(&tbs)?;
        // ecdsa-with-SHA256: every test CA key is P-256.
        let algorithm = [
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
        ];
        let cert = der_tlv(
            0x30,
            &[
                tbs,
                algorithm.to_vec(),
                der_tlv(0x03, &[&[0u8][..], &signature].concat()),
            ]
            .concat(),
        );
        let cert_pem = common::pki::pem_encode("CERTIFICATE", &cert);
        let write = |suffix: &str, contents: &str| -> anyhow::Result<PathBuf> {
            let path = self.dir.join(format!("{file_stem}.{suffix}"));
            fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
            restrict(&path)?;
            Ok(path)
        };
        Ok(Leaf {
            cert_path: write("cert.pem", &cert_pem)?,
            key_path: write("key.pem", &issued.key_pem)?,
            pkeycert_path: write("pkeycert.pem", &(cert_pem.clone() + &issued.key_pem))?,
            cert_pem,
            key_pem: issued.key_pem,
            serial_hex: issued.serial_hex,
        })
    }
}

/// One DER tag-length-value.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// The process-wide test PKI, generated on first use.
///
/// # Panics
/// If generation or writing the files fails; there is nothing a test could do instead.
pub fn test_pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| generate().unwrap_or_else(|e| panic!("cannot build the test pki: {e:#}")))
}

/// The SANs every test server certificate carries.
pub fn localhost_sans() -> Vec<San> {
    vec![
        San::Dns("localhost".to_owned()),
        San::Ip([127, 0, 0, 1].into()),
        San::Ip(std::net::Ipv6Addr::LOCALHOST.into()),
    ]
}

/// Removes the directories of test processes that ended more than an hour ago: the static
/// PKI is never dropped, so its directory outlives its process.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for entry in entries.flatten() {
        let stale = entry
            .file_name()
            .to_string_lossy()
            .starts_with("testkit-pki-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > hour);
        if stale {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn generate() -> anyhow::Result<TestPki> {
    use anyhow::Context as _;

    remove_stale_dirs();
    let dir = tempfile::Builder::new()
        .prefix("testkit-pki-")
        .tempdir()
        .context("create temp dir")?
        .keep();
    let now = OffsetDateTime::now_utc();
    let ten_years = Validity::starting(now, Duration::days(3650));
    let one_year = Validity::starting(now, Duration::days(365));

    let ca_params = |cn: &str| CaParams {
        validity: ten_years,
        ..CaParams::new(Name::new(cn).with_organization(TEST_ORG))
    };
    let ca = Ca::new_root(&ca_params("testkit root ca"))?;
    let intermediate = ca.issue_intermediate(&CaParams {
        path_len: Some(0),
        ..ca_params("testkit intermediate ca")
    })?;
    let untrusted = Ca::new_root(&ca_params("testkit untrusted ca"))?;

    let server_params = |cn: &str| LeafParams {
        validity: one_year,
        ..LeafParams::new(
            Name::new(cn).with_organization(TEST_ORG),
            Usage::ServerAndClient,
        )
        .with_sans(localhost_sans())
    };
    let client_params = |cn: &str| LeafParams {
        validity: one_year,
        ..LeafParams::new(Name::new(cn).with_organization(TEST_ORG), Usage::Client)
    };

    let write = |name: &str, contents: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    let leaf = |name: &str, issued: Issued| -> anyhow::Result<Leaf> {
        let cert_pem = issued.chain_pem;
        let cert_path = write(&format!("{name}.cert.pem"), &cert_pem)?;
        let key_path = write(&format!("{name}.key.pem"), &issued.key_pem)?;
        restrict(&key_path)?;
        let pkeycert_path = write(
            &format!("{name}.pkeycert.pem"),
            &(cert_pem.clone() + &issued.key_pem),
        )?;
        restrict(&pkeycert_path)?;
        Ok(Leaf {
            cert_pem,
            key_pem: issued.key_pem,
            cert_path,
            key_path,
            pkeycert_path,
            serial_hex: issued.serial_hex,
        })
    };

    let server = leaf("server", ca.issue_leaf(&server_params("server"))?)?;
    let server2 = leaf("server2", ca.issue_leaf(&server_params("server2"))?)?;
    let alice = leaf("alice", ca.issue_leaf(&client_params("alice"))?)?;
    let bob = leaf("bob", ca.issue_leaf(&client_params("bob"))?)?;
    let chained_client = leaf("carol", intermediate.issue_leaf(&client_params("carol"))?)?;
    let mallory = leaf("mallory", untrusted.issue_leaf(&client_params("mallory"))?)?;
    let expired = leaf(
        "expired",
        ca.issue_leaf(&LeafParams {
            validity: Validity::new(now - Duration::days(30), now - Duration::days(1)),
            ..client_params("expired")
        })?,
    )?;
    let revoked = leaf("revoked", ca.issue_leaf(&client_params("revoked"))?)?;

    let crl = ca.issue_crl(
        &CrlParams::new(now - Duration::minutes(5), Duration::days(30)).revoke(&revoked.serial_hex),
    )?;

    Ok(TestPki {
        ca_path: write("ca.cert.pem", ca.cert_pem())?,
        ca_pem: ca.cert_pem().to_owned(),
        intermediate_path: write("intermediate.cert.pem", intermediate.cert_pem())?,
        intermediate_pem: intermediate.cert_pem().to_owned(),
        untrusted_ca_path: write("untrusted-ca.cert.pem", untrusted.cert_pem())?,
        untrusted_ca_pem: untrusted.cert_pem().to_owned(),
        server,
        server2,
        alice,
        bob,
        chained_client,
        mallory,
        expired,
        revoked,
        crl_path: write("ca.crl.pem", &crl.pem)?,
        crl_pem: crl.pem,
        ca,
        dir,
    })
}

#[cfg(unix)]
fn restrict(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

#[cfg(not(unix))]
fn restrict(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::pki::{inspect_crl_pem, inspect_pem};

    #[test]
    fn fixtures_are_what_they_claim() {
        let pki = test_pki();
        let info = |pem: &str| inspect_pem(pem).expect("inspect").remove(0);

        let server = info(&pki.server.cert_pem);
        assert_eq!(server.common_name.as_deref(), Some("server"));
        assert_eq!(server.dns_names, ["localhost"]);
        assert_eq!(server.ip_addresses.len(), 2);
        assert_eq!(server.extended_key_usage, ["serverAuth", "clientAuth"]);

        let alice = info(&pki.alice.cert_pem);
        assert_eq!(alice.common_name.as_deref(), Some("alice"));
        assert_eq!(alice.organization.as_deref(), Some(TEST_ORG));
        assert_eq!(alice.extended_key_usage, ["clientAuth"]);

        assert_eq!(
            inspect_pem(&pki.chained_client.cert_pem)
                .expect("chain")
                .len(),
            2
        );
        assert!(!info(&pki.expired.cert_pem).is_valid_at(OffsetDateTime::now_utc()));
        assert!(
            inspect_crl_pem(&pki.crl_pem)
                .expect("crl")
                .is_revoked(&pki.revoked.serial_hex)
        );
        assert_eq!(
            fs::read_to_string(&pki.server.cert_path).expect("read"),
            pki.server.cert_pem
        );
        assert!(pki.ca_path.starts_with(&pki.dir));
        assert!(std::ptr::eq(pki, test_pki()));
    }
}
