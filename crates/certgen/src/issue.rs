//! `certgen root`, `intermediate` and `leaf`: the Micronets script replacements.
//!
//! Options and file names follow the original scripts; the certificate contents follow
//! [`common::pki`]. Every output path is checked before any key is generated, so a refusal
//! to overwrite costs nothing and changes nothing.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use common::pki::{Ca, CaParams, Issued, LeafParams, Name, San, Usage, Validity};
use time::{Duration, OffsetDateTime};

use crate::cli::{CertArgs, IntermediateArgs, IssuerArgs, LeafArgs, RootArgs};
use crate::files::{self, Output, with_suffix};
use crate::report;

/// Validity when neither `--expiration-in-days` nor `--not-after` is given (as the scripts).
const DEFAULT_DAYS: i64 = 500;

pub(crate) fn root(args: &RootArgs) -> anyhow::Result<()> {
    let base = basename(&args.cert, "root_ca");
    let outputs = ca_paths(&base);
    files::ensure_free(
        outputs.iter().map(PathBuf::as_path),
        args.cert.force_overwrite,
    )?;
    let params = CaParams {
        name: subject(&args.cert, &base, "RootCA", None),
        key_type: args.cert.key_type.into(),
        validity: validity(&args.cert),
        path_len: args.path_len,
    };
    let ca = Ca::new_root(&params).context("make root ca")?;
    write_ca(&ca, &base)?;
    report::issued("root CA", &ca.info()?, &outputs);
    Ok(())
}

pub(crate) fn intermediate(args: &IntermediateArgs) -> anyhow::Result<()> {
    let base = basename(&args.cert, "intermediate_ca");
    let outputs = ca_paths(&base);
    files::ensure_free(
        outputs.iter().map(PathBuf::as_path),
        args.cert.force_overwrite,
    )?;
    let issuer = load_issuer(&args.issuer)?;
    let params = CaParams {
        name: subject(&args.cert, &base, "IntermediateCA", None),
        key_type: args.cert.key_type.into(),
        validity: validity(&args.cert),
        path_len: Some(args.path_len),
    };
    let ca = issuer
        .issue_intermediate(&params)
        .context("make intermediate ca")?;
    write_ca(&ca, &base)?;
    report::issued("intermediate CA", &ca.info()?, &outputs);
    Ok(())
}

pub(crate) fn leaf(args: &LeafArgs) -> anyhow::Result<()> {
    let base = basename(&args.cert, "leaf_cert");
    let sans = args
        .san
        .iter()
        .map(|s| s.parse::<San>())
        .collect::<Result<Vec<_>, _>>()
        .context("bad --san")?;
    // Load the CA before planning outputs: only intermediates produce B.chain.pem.
    let issuer = load_issuer(&args.issuer)?;
    let paths = leaf_paths(&base, !issuer.is_root());
    files::ensure_free(
        paths.iter().map(PathBuf::as_path),
        args.cert.force_overwrite,
    )?;

    let usage = match (args.server, args.client) {
        (true, false) => Usage::Server,
        (false, true) => Usage::Client,
        _ => Usage::ServerAndClient,
    };
    let first_dns = sans.iter().find_map(|san| match san {
        San::Dns(name) => Some(name.clone()),
        San::Ip(_) => None,
    });
    let params = LeafParams {
        name: subject(&args.cert, &base, "Leaf", first_dns),
        sans,
        usage,
        key_type: args.cert.key_type.into(),
        validity: validity(&args.cert),
    };
    let issued = issuer
        .issue_leaf(&params)
        .context("issue leaf certificate")?;
    files::write_all(&leaf_outputs(&issued, &base, !issuer.is_root()))?;
    let info = common::pki::inspect_der(&issued.cert_der)?;
    report::issued("leaf certificate", &info, &paths);
    Ok(())
}

/// Loads the issuing CA named by `--ca-certfile` and `--ca-keyfile`.
pub(crate) fn load_issuer(args: &IssuerArgs) -> anyhow::Result<Ca> {
    let read = |path: &Path| -> anyhow::Result<String> {
        let bytes = files::read_input(path)?;
        String::from_utf8(bytes).with_context(|| format!("{} is not PEM text", path.display()))
    };
    let cert = read(&args.ca_certfile)?;
    let key = read(&args.ca_keyfile)?;
    Ca::from_pem(&cert, &key).with_context(|| {
        format!(
            "load ca from {} and {}",
            args.ca_certfile.display(),
            args.ca_keyfile.display()
        )
    })
}

fn basename(args: &CertArgs, default: &str) -> PathBuf {
    args.cert_basename
        .clone()
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The subject: `--cn` (else `fallback_cn`, else the basename's file name), `--ou`, and
/// `--subject-org-name` (else `<basename>-<role>`, as the scripts derived it).
fn subject(args: &CertArgs, base: &Path, role: &str, fallback_cn: Option<String>) -> Name {
    let stem = base
        .file_name()
        .map_or_else(|| "cert".into(), |s| s.to_string_lossy().into_owned());
    let cn = args
        .cn
        .clone()
        .or(fallback_cn)
        .unwrap_or_else(|| stem.clone());
    let org = args
        .subject_org_name
        .clone()
        .unwrap_or_else(|| format!("{stem}-{role}"));
    let mut name = Name::new(cn).with_organization(org);
    if let Some(ou) = &args.ou {
        name = name.with_organizational_unit(ou.clone());
    }
    name
}

fn validity(args: &CertArgs) -> Validity {
    let lifetime = match (args.not_after, args.expiration_in_days) {
        (Some(lifetime), _) => lifetime.0,
        (None, Some(days)) => Duration::days(i64::from(days)),
        (None, None) => Duration::days(DEFAULT_DAYS),
    };
    Validity::starting(OffsetDateTime::now_utc(), lifetime)
}

/// The files a CA writes: certificate PEM and DER, key.
pub(crate) fn ca_paths(base: &Path) -> Vec<PathBuf> {
    [".cert.pem", ".cert.der", ".key.pem"]
        .iter()
        .map(|s| with_suffix(base, s))
        .collect()
}

/// Writes a CA's files, see [`ca_paths`].
pub(crate) fn write_ca(ca: &Ca, base: &Path) -> anyhow::Result<()> {
    files::write_all(&[
        Output::public(with_suffix(base, ".cert.pem"), ca.cert_pem()),
        Output::public(with_suffix(base, ".cert.der"), ca.cert_der()),
        Output::secret(with_suffix(base, ".key.pem"), ca.key_pem()),
    ])
}

/// The files [`leaf_outputs`] writes.
pub(crate) fn leaf_paths(base: &Path, with_chain: bool) -> Vec<PathBuf> {
    leaf_suffixes(with_chain)
        .iter()
        .map(|s| with_suffix(base, s))
        .collect()
}

fn leaf_suffixes(with_chain: bool) -> &'static [&'static str] {
    if with_chain {
        &[
            ".cert.pem",
            ".cert.der",
            ".key.pem",
            ".pkeycert.pem",
            ".chain.pem",
        ]
    } else {
        &[".cert.pem", ".cert.der", ".key.pem", ".pkeycert.pem"]
    }
}

/// The files of one leaf: certificate (PEM, DER), key, certificate chain then key and,
/// when issued by an intermediate, the chain alone.
pub(crate) fn leaf_outputs(issued: &Issued, base: &Path, with_chain: bool) -> Vec<Output> {
    let mut outputs = vec![
        Output::public(with_suffix(base, ".cert.pem"), issued.cert_pem.as_str()),
        Output::public(with_suffix(base, ".cert.der"), issued.cert_der.as_slice()),
        Output::secret(with_suffix(base, ".key.pem"), issued.key_pem.as_str()),
        Output::secret(
            with_suffix(base, ".pkeycert.pem"),
            format!("{}{}", issued.chain_pem, issued.key_pem),
        ),
    ];
    if with_chain {
        outputs.push(Output::public(
            with_suffix(base, ".chain.pem"),
            issued.chain_pem.as_str(),
        ));
    }
    outputs
}
