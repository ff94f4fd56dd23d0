//! Round trips through issue → inspect, chains, CRLs and rustls verification.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier as _;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use time::{Duration, OffsetDateTime};

use super::*;

fn root(key_type: KeyType) -> Ca {
    Ca::new_root(&CaParams {
        key_type,
        ..CaParams::new(Name::new("test root").with_organization("acme"))
    })
    .expect("root")
}

fn server_leaf(ca: &Ca, key_type: KeyType) -> Issued {
    let params = LeafParams {
        key_type,
        ..LeafParams::new(
            Name::new("server")
                .with_organization("acme")
                .with_organizational_unit("ops"),
            Usage::ServerAndClient,
        )
        .with_sans(["localhost", "127.0.0.1", "::1"].map(|s| s.parse().expect("san")))
    };
    ca.issue_leaf(&params).expect("leaf")
}

fn der_of(pem: &str) -> Vec<CertificateDer<'static>> {
    pem_decode(pem)
        .expect("pem")
        .into_iter()
        .map(|block| CertificateDer::from(block.der))
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .expect("add root");
    Arc::new(roots)
}

/// Verifies `chain_pem` as a server certificate for `localhost` with rustls.
fn rustls_verify_server(ca: &Ca, chain_pem: &str) -> Result<(), rustls::Error> {
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .expect("verifier");
    let chain = der_of(chain_pem);
    let name = ServerName::try_from("localhost").expect("name");
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

/// Verifies `chain_pem` as a client certificate with rustls, optionally checking a CRL.
fn rustls_verify_client(ca: &Ca, chain_pem: &str, crl: Option<&Crl>) -> Result<(), rustls::Error> {
    let mut builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider());
    if let Some(crl) = crl {
        builder = builder.with_crls([CertificateRevocationListDer::from(crl.der.clone())]);
    }
    let verifier = builder.build().expect("verifier");
    let chain = der_of(chain_pem);
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
}

fn rustls_load_key(key_pem: &str) {
    let block = pem_decode(key_pem).expect("key pem").remove(0);
    assert_eq!(block.label, "PRIVATE KEY");
    let key = PrivateKeyDer::try_from(block.der).expect("pkcs8");
    rustls::crypto::ring::sign::any_supported_type(&key).expect("rustls accepts the key");
}

#[test]
fn issue_then_inspect_round_trip() {
    let ca = root(KeyType::P256);
    let leaf = server_leaf(&ca, KeyType::P256);
    let ca_info = ca.info().expect("ca info");
    let info = inspect_der(&leaf.cert_der).expect("inspect");

    assert_eq!(info.common_name.as_deref(), Some("server"));
    assert_eq!(info.organization.as_deref(), Some("acme"));
    assert_eq!(info.organizational_unit.as_deref(), Some("ops"));
    assert_eq!(info.dns_names, ["localhost"]);
    assert_eq!(
        info.ip_addresses,
        [
            "127.0.0.1".parse::<std::net::IpAddr>().expect("ip"),
            "::1".parse().expect("ip")
        ]
    );
    assert_eq!(info.serial_hex, leaf.serial_hex);
    assert_eq!(info.serial_hex.len(), 32);
    assert_eq!(info.key_usage, ["digitalSignature"]);
    assert_eq!(info.extended_key_usage, ["serverAuth", "clientAuth"]);
    assert!(!info.is_ca);
    assert!(!info.self_signed);
    assert_eq!(info.key_type, "p256");
    assert_eq!(info.signature_algorithm, "ecdsa-with-SHA256");
    assert_eq!(info.issuer, ca_info.subject);
    assert_eq!(info.authority_key_id, ca_info.subject_key_id);
    assert!(info.subject_key_id.is_some());
    assert_eq!(info.sha256_fingerprint.len(), 64);
    assert_eq!(info.sha1_fingerprint.len(), 40);
    assert!(info.is_valid_at(OffsetDateTime::now_utc()));
    assert_eq!(leaf.chain_pem, leaf.cert_pem);
    assert_eq!(inspect_pem(&leaf.cert_pem).expect("pem")[0], info);

    assert!(ca_info.is_ca);
    assert!(ca_info.self_signed);
    assert_eq!(ca_info.path_len, None);
    assert_eq!(ca_info.key_usage, ["keyCertSign", "cRLSign"]);
    assert_eq!(ca_info.authority_key_id, ca_info.subject_key_id);
    assert_ne!(ca_info.serial_hex, info.serial_hex);

    let json = serde_json::to_value(&info).expect("json");
    assert_eq!(json["common_name"], "server");
    assert!(json["not_after"].as_str().is_some_and(|t| t.ends_with('Z')));

    rustls_verify_server(&ca, &leaf.chain_pem).expect("rustls accepts the server cert");
    rustls_verify_client(&ca, &leaf.chain_pem, None).expect("rustls accepts it as a client");
    rustls_load_key(&leaf.key_pem);
}

#[test]
fn every_key_type_issues_and_verifies() {
    for key_type in KeyType::ALL {
        let ca = root(key_type);
        let leaf = server_leaf(&ca, key_type);
        let info = inspect_der(&leaf.cert_der).expect("inspect");
        assert_eq!(info.key_type, key_type.as_str(), "{key_type}");
        assert_eq!(ca.info().expect("ca").key_type, key_type.as_str());
        let expected_ku: &[&str] = if key_type.is_rsa() {
            &["digitalSignature", "keyEncipherment"]
        } else {
            &["digitalSignature"]
        };
        assert_eq!(info.key_usage, expected_ku, "{key_type}");
        rustls_verify_server(&ca, &leaf.chain_pem).unwrap_or_else(|e| panic!("{key_type}: {e}"));
        rustls_load_key(&leaf.key_pem);
        // Loading the CA back from PEM works for every key type.
        let loaded = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let again = server_leaf(&loaded, KeyType::P256);
        rustls_verify_server(&ca, &again.chain_pem).unwrap_or_else(|e| panic!("{key_type}: {e}"));
    }
}

#[test]
fn key_type_names() {
    for key_type in KeyType::ALL {
        assert_eq!(
            key_type.as_str().parse::<KeyType>().expect("parse"),
            key_type
        );
    }
    assert!(matches!(
        "dsa".parse::<KeyType>(),
        Err(PkiError::UnknownKeyType(_))
    ));
}

#[test]
fn intermediate_chain() {
    let ca = root(KeyType::P256);
    let intermediate = ca
        .issue_intermediate(&CaParams {
            path_len: Some(0),
            ..CaParams::new(Name::new("test intermediate"))
        })
        .expect("intermediate");
    assert!(!intermediate.is_root());
    let inter_info = intermediate.info().expect("info");
    assert!(inter_info.is_ca);
    assert_eq!(inter_info.path_len, Some(0));
    assert_eq!(
        inter_info.authority_key_id,
        ca.info().expect("ca").subject_key_id
    );

    let leaf = server_leaf(&intermediate, KeyType::P256);
    let chain = inspect_pem(&leaf.chain_pem).expect("chain");
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0].issuer, inter_info.subject);
    assert_eq!(chain[0].authority_key_id, inter_info.subject_key_id);
    assert_eq!(chain[1], inter_info);
    rustls_verify_server(&ca, &leaf.chain_pem).expect("chain verifies");
    rustls_verify_server(&ca, &leaf.cert_pem).expect_err("leaf alone has no path to the root");

    // Reloaded from "intermediate cert + its chain" it still emits full chains.
    let reloaded = Ca::from_pem(intermediate.chain_pem(), intermediate.key_pem()).expect("reload");
    let leaf2 = server_leaf(&reloaded, KeyType::P256);
    assert_eq!(inspect_pem(&leaf2.chain_pem).expect("chain").len(), 2);
    rustls_verify_server(&ca, &leaf2.chain_pem).expect("reloaded chain verifies");
}

#[test]
fn loaded_ca_issues_identical_issuer_names() {
    let ca = root(KeyType::P256);
    let loaded = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("load");
    assert!(loaded.is_root());
    let leaf = server_leaf(&loaded, KeyType::Ed25519);
    let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("ca");
    let (_, leaf_x509) = x509_parser::parse_x509_certificate(&leaf.cert_der).expect("leaf");
    assert_eq!(leaf_x509.issuer().as_raw(), ca_x509.subject().as_raw());
    leaf_x509
        .verify_signature(Some(ca_x509.public_key()))
        .expect("signature");
}

#[test]
fn load_rejects_mismatched_key_and_non_ca() {
    let ca = root(KeyType::P256);
    let other = root(KeyType::P256);
    assert!(matches!(
        Ca::from_pem(ca.cert_pem(), other.key_pem()),
        Err(PkiError::KeyMismatch)
    ));
    let leaf = server_leaf(&ca, KeyType::P256);
    assert!(matches!(
        Ca::from_pem(&leaf.cert_pem, &leaf.key_pem),
        Err(PkiError::NotCa(_))
    ));
    assert!(matches!(
        Ca::from_pem("", ca.key_pem()),
        Err(PkiError::NoCertificate)
    ));
    assert!(matches!(
        Ca::from_pem(ca.cert_pem(), ca.cert_pem()),
        Err(PkiError::NoPrivateKey)
    ));
    let missing = Ca::load(
        "/nonexistent/ca.pem".as_ref(),
        "/nonexistent/key.pem".as_ref(),
    );
    assert!(matches!(missing, Err(PkiError::Read { .. })));
}

#[test]
fn crl_lists_revoked_serials() {
    let ca = root(KeyType::P256);
    let good = server_leaf(&ca, KeyType::P256);
    let bad = server_leaf(&ca, KeyType::P256);
    let now = OffsetDateTime::now_utc();
    let crl = ca
        .issue_crl(
            &CrlParams::new(now - Duration::minutes(1), Duration::days(7)).revoke(&bad.serial_hex),
        )
        .expect("crl");
    let info = inspect_crl_pem(&crl.pem).expect("inspect crl");
    assert_eq!(info.revoked_serials.len(), 1);
    assert_eq!(info.revoked_serials[0], bad.serial_hex);
    assert!(info.is_revoked(&bad.serial_hex));
    assert!(!info.is_revoked(&good.serial_hex));
    assert_eq!(info.issuer, ca.info().expect("ca").subject);
    assert_eq!(info.authority_key_id, ca.info().expect("ca").subject_key_id);
    assert!(info.next_update.is_some_and(|t| t > now));
    assert!(info.crl_number.is_some());

    rustls_verify_client(&ca, &good.chain_pem, Some(&crl)).expect("good client passes the crl");
    let err = rustls_verify_client(&ca, &bad.chain_pem, Some(&crl)).expect_err("revoked");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );

    let empty = ca
        .issue_crl(&CrlParams::new(now, Duration::days(1)))
        .expect("empty crl");
    assert!(
        inspect_crl_der(&empty.der)
            .expect("inspect")
            .revoked_serials
            .is_empty()
    );
    assert!(matches!(
        ca.issue_crl(&CrlParams::new(now, Duration::days(1)).revoke("zz")),
        Err(PkiError::InvalidSerial(_))
    ));
    assert!(matches!(
        ca.issue_crl(&CrlParams::new(now, Duration::ZERO)),
        Err(PkiError::InvalidValidity)
    ));
}

#[test]
fn validity_is_set_exactly() {
    let ca = root(KeyType::P256);
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
    let expired = ca
        .issue_leaf(&LeafParams {
            validity: Validity::new(now - Duration::days(10), now - Duration::days(1)),
            ..LeafParams::new(Name::new("expired"), Usage::Client)
        })
        .expect("expired leaf");
    let info = inspect_der(&expired.cert_der).expect("inspect");
    assert_eq!(info.not_before, now - Duration::days(10));
    assert_eq!(info.not_after, now - Duration::days(1));
    assert!(!info.is_valid_at(now));
    assert_eq!(info.extended_key_usage, ["clientAuth"]);
    assert!(rustls_verify_client(&ca, &expired.chain_pem, None).is_err());

    let backwards = LeafParams {
        validity: Validity::new(now, now - Duration::seconds(1)),
        ..LeafParams::new(Name::new("x"), Usage::Server)
    };
    assert!(matches!(
        ca.issue_leaf(&backwards),
        Err(PkiError::InvalidValidity)
    ));
}

#[test]
fn san_parsing() {
    let check = |text: &str, expected: San| assert_eq!(text.parse::<San>().expect(text), expected);
    check("localhost", San::Dns("localhost".into()));
    check("*.example.org", San::Dns("*.example.org".into()));
    check("10.0.0.1", San::Ip([10, 0, 0, 1].into()));
    check("[::1]", San::Ip(std::net::Ipv6Addr::LOCALHOST.into()));
    for bad in ["", "a b", "exa..mple", "http://x"] {
        assert!(bad.parse::<San>().is_err(), "{bad:?}");
    }
}
