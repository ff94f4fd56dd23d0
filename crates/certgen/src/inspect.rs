//! `certgen inspect`: certificates, chains and CRLs, PEM or DER, as text or JSON.

use std::path::Path;

use anyhow::Context as _;
use common::pki::{CertInfo, CrlInfo, inspect_crl_der, inspect_der, pem_decode};
use serde::Serialize;
use time::OffsetDateTime;

use crate::cli::InspectArgs;
use crate::{files, report};

/// One thing found in the file.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Item {
    Cert(Box<CertInfo>),
    Crl(CrlInfo),
}

pub(crate) fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let items = read_items(&args.file)?;
    if args.json {
        let json = match items.as_slice() {
            [one] => serde_json::to_string_pretty(one),
            many => serde_json::to_string_pretty(many),
        }
        .context("serialise json")?;
        println!("{json}");
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    let total = items.len();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            println!();
        }
        match item {
            Item::Cert(info) => {
                println!("certificate {} of {total}", i + 1);
                report::certificate(info, now);
            }
            Item::Crl(info) => {
                println!("certificate revocation list");
                report::crl(info);
            }
        }
    }
    Ok(())
}

fn read_items(path: &Path) -> anyhow::Result<Vec<Item>> {
    let bytes = files::read_input(path)?;
    let context = || format!("inspect {}", path.display());
    let items = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN ") => pem_decode(text)
            .with_context(context)?
            .into_iter()
            .filter_map(|block| match block.label.as_str() {
                "CERTIFICATE" => Some(inspect_der(&block.der).map(|i| Item::Cert(Box::new(i)))),
                "X509 CRL" => Some(inspect_crl_der(&block.der).map(Item::Crl)),
                _ => None,
            })
            .collect::<Result<Vec<_>, _>>()
            .with_context(context)?,
        _ => match inspect_der(&bytes) {
            Ok(info) => vec![Item::Cert(Box::new(info))],
            Err(cert_err) => match inspect_crl_der(&bytes) {
                Ok(info) => vec![Item::Crl(info)],
                Err(_) => return Err(cert_err).with_context(context),
            },
        },
    };
    if items.is_empty() {
        anyhow::bail!("{} holds no certificate or crl", path.display());
    }
    Ok(items)
}
