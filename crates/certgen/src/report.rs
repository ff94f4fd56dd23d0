//! What certgen prints on stdout: short summaries for people, JSON for scripts.

use std::path::PathBuf;

use common::pki::{CertInfo, CrlInfo};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 3339, or the debug form if formatting fails (it cannot for UTC dates in range).
pub(crate) fn date(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| format!("{t}"))
}

/// The summary printed after `root`, `intermediate` and `leaf`.
pub(crate) fn issued(what: &str, info: &CertInfo, paths: &[PathBuf]) {
    println!("made {what} {}", info.subject);
    println!("  issuer     {}", info.issuer);
    println!("  serial     {}", info.serial_hex);
    println!("  key        {}", info.key_type);
    if !info.dns_names.is_empty() || !info.ip_addresses.is_empty() {
        let ips = info.ip_addresses.iter().map(ToString::to_string);
        let sans: Vec<String> = info.dns_names.iter().cloned().chain(ips).collect();
        println!("  names      {}", sans.join(", "));
    }
    if !info.extended_key_usage.is_empty() {
        println!("  usage      {}", info.extended_key_usage.join(", "));
    }
    println!("  not after  {}", date(info.not_after));
    for path in paths {
        println!("  wrote      {}", path.display());
    }
}

/// The human form of `certgen inspect` for one certificate.
pub(crate) fn certificate(info: &CertInfo, now: OffsetDateTime) {
    let row = |label: &str, value: &str| println!("  {label:<17} {value}");
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    row("subject", &info.subject);
    row("issuer", &info.issuer);
    row("serial", &info.serial_hex);
    row("not before", &date(info.not_before));
    let state = if now > info.not_after {
        " (expired)"
    } else if now < info.not_before {
        " (not yet valid)"
    } else {
        ""
    };
    row("not after", &format!("{}{state}", date(info.not_after)));
    row("key", &info.key_type);
    row("signature", &info.signature_algorithm);
    let ca = match (info.is_ca, info.path_len) {
        (true, Some(n)) => format!("yes, pathlen {n}"),
        (true, None) => "yes".to_owned(),
        (false, _) => "no".to_owned(),
    };
    row(
        "ca",
        &format!(
            "{ca}{}",
            if info.self_signed {
                ", self-signed"
            } else {
                ""
            }
        ),
    );
    row("key usage", &list(&info.key_usage));
    row("ext key usage", &list(&info.extended_key_usage));
    row("dns names", &list(&info.dns_names));
    let ips: Vec<String> = info.ip_addresses.iter().map(ToString::to_string).collect();
    row("ip addresses", &list(&ips));
    row(
        "subject key id",
        info.subject_key_id.as_deref().unwrap_or("-"),
    );
    row(
        "authority key id",
        info.authority_key_id.as_deref().unwrap_or("-"),
    );
    row("sha256", &info.sha256_fingerprint);
    row("sha1", &info.sha1_fingerprint);
}

/// The human form of `certgen inspect` for a CRL.
pub(crate) fn crl(info: &CrlInfo) {
    let row = |label: &str, value: &str| println!("  {label:<17} {value}");
    row("issuer", &info.issuer);
    row("this update", &date(info.this_update));
    row(
        "next update",
        &info.next_update.map_or_else(|| "-".to_owned(), date),
    );
    row("crl number", info.crl_number.as_deref().unwrap_or("-"));
    row(
        "authority key id",
        info.authority_key_id.as_deref().unwrap_or("-"),
    );
    row("revoked", &info.revoked_serials.len().to_string());
    for serial in &info.revoked_serials {
        row("", serial);
    }
}
