//! `certgen crl`: sign a CRL from serial numbers, certificate files and an earlier CRL.

use std::path::Path;

use anyhow::Context as _;
use common::pki::{CrlParams, inspect_crl_der, inspect_der, pem_decode, serial_from_hex};
use time::OffsetDateTime;

use crate::cli::CrlArgs;
use crate::files::{self, Output};
use crate::issue::load_issuer;
use crate::report;

pub(crate) fn run(args: &CrlArgs) -> anyhow::Result<()> {
    files::ensure_free([args.out.as_path()], args.force_overwrite)?;
    let ca = load_issuer(&args.issuer)?;
    let ca_info = ca.info()?;

    let mut serials = Vec::new();
    for serial in &args.revoke {
        serials.push(hex::encode(serial_from_hex(serial)?));
    }
    for path in &args.revoke_cert {
        let info = first_der(path, "CERTIFICATE")
            .and_then(|der| Ok(inspect_der(&der)?))
            .with_context(|| format!("read certificate {}", path.display()))?;
        if info.issuer != ca_info.subject {
            anyhow::bail!(
                "{} was issued by {:?}, not by this ca ({:?})",
                path.display(),
                info.issuer,
                ca_info.subject
            );
        }
        serials.push(info.serial_hex);
    }
    if let Some(path) = &args.merge {
        let info = first_der(path, "X509 CRL")
            .and_then(|der| Ok(inspect_crl_der(&der)?))
            .with_context(|| format!("read crl {}", path.display()))?;
        serials.extend(info.revoked_serials);
    }
    let mut seen = std::collections::HashSet::new();
    serials.retain(|s| seen.insert(s.clone()));

    let now = OffsetDateTime::now_utc();
    let params = CrlParams {
        revoked_serials: serials,
        ..CrlParams::new(now, args.next_update.0)
    };
    let crl = ca.issue_crl(&params).context("sign crl")?;
    files::write_all(&[Output::public(args.out.clone(), crl.pem.as_str())])?;

    let info = inspect_crl_der(&crl.der)?;
    println!("signed crl for {}", info.issuer);
    println!("  revoked      {}", info.revoked_serials.len());
    for serial in &info.revoked_serials {
        println!("               {serial}");
    }
    println!(
        "  next update  {}",
        info.next_update
            .map_or_else(|| "-".to_owned(), report::date)
    );
    println!("  wrote        {}", args.out.display());
    Ok(())
}

/// The first PEM block labelled `label` in the file, or the whole file if it is DER.
fn first_der(path: &Path, label: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = files::read_input(path)?;
    match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN ") => pem_decode(text)?
            .into_iter()
            .find(|block| block.label == label)
            .map(|block| block.der)
            .with_context(|| format!("no {label} block")),
        _ => Ok(bytes),
    }
}
