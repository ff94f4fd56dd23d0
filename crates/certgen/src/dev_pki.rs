//! `certgen dev-pki`: a complete development PKI in one directory, in one command.
//!
//! A root CA `ca`, a server certificate per daemon, client certificates for the demo users,
//! a second CA nothing trusts with a client signed by it, and an empty CRL. It knows the
//! daemon and user names; it does not know where any daemon reads its files from.

use std::path::PathBuf;

use anyhow::Context as _;
use common::pki::{
    Ca, CaParams, CertInfo, CrlParams, KeyType, LeafParams, Name, San, Usage, Validity, inspect_der,
};
use time::{Duration, OffsetDateTime};

use crate::cli::DevPkiArgs;
use crate::files::{self, Output};
use crate::issue::{ca_paths, leaf_outputs, leaf_paths, write_ca};
use crate::report;

/// The daemons that get a server certificate.
pub(crate) const DAEMONS: [&str; 5] = [
    "broker",
    "signing-server",
    "ws-proxy",
    "remo-serv",
    "secure-talk",
];
/// Demo users that get a client certificate from the trusted CA.
pub(crate) const USERS: [&str; 2] = ["alice", "bob"];
/// Organisation of every dev certificate.
const ORG: &str = "Micronets dev";
/// Lifetime of the two CAs.
const CA_LIFETIME: Duration = Duration::days(3650);

/// One row of the printed table.
struct Row {
    file: String,
    role: &'static str,
    issuer: &'static str,
    info: Option<CertInfo>,
}

pub(crate) fn run(args: &DevPkiArgs) -> anyhow::Result<()> {
    let dir = &args.out;
    let key_type: KeyType = args.key_type.into();
    let base = |name: &str| dir.join(name);

    let mut planned: Vec<PathBuf> = ca_paths(&base("ca"));
    planned.extend(ca_paths(&base("untrusted-ca")));
    for name in DAEMONS.iter().chain(&USERS).chain(&["mallory"]) {
        planned.extend(leaf_paths(&base(name), false));
    }
    let crl_path = dir.join("ca.crl.pem");
    planned.push(crl_path.clone());
    files::ensure_free(planned.iter().map(PathBuf::as_path), args.force_overwrite)?;

    let now = OffsetDateTime::now_utc();
    let ca_params = |cn: &str| CaParams {
        key_type,
        validity: Validity::starting(now, CA_LIFETIME),
        ..CaParams::new(Name::new(cn).with_organization(ORG))
    };
    let leaf_validity = Validity::starting(now, args.not_after.0);
    let mut rows = Vec::new();

    let ca = Ca::new_root(&ca_params("Micronets dev root CA")).context("make root ca")?;
    write_ca(&ca, &base("ca"))?;
    rows.push(Row {
        file: "ca".into(),
        role: "root CA",
        issuer: "self",
        info: Some(ca.info()?),
    });

    for daemon in DAEMONS {
        let sans = ["localhost", daemon, "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.parse::<San>())
            .collect::<Result<Vec<_>, _>>()?;
        let params = LeafParams {
            key_type,
            validity: leaf_validity,
            ..LeafParams::new(
                Name::new(daemon).with_organization(ORG),
                Usage::ServerAndClient,
            )
            .with_sans(sans)
        };
        let issued = ca
            .issue_leaf(&params)
            .with_context(|| format!("issue {daemon}"))?;
        files::write_all(&leaf_outputs(&issued, &base(daemon), false))?;
        let info = Some(inspect_der(&issued.cert_der)?);
        rows.push(Row {
            file: daemon.into(),
            role: "server+client",
            issuer: "ca",
            info,
        });
    }

    let client = |cn: &str| LeafParams {
        key_type,
        validity: leaf_validity,
        ..LeafParams::new(Name::new(cn).with_organization(ORG), Usage::Client)
    };
    for user in USERS {
        let issued = ca
            .issue_leaf(&client(user))
            .with_context(|| format!("issue {user}"))?;
        files::write_all(&leaf_outputs(&issued, &base(user), false))?;
        let info = Some(inspect_der(&issued.cert_der)?);
        rows.push(Row {
            file: user.into(),
            role: "client",
            issuer: "ca",
            info,
        });
    }

    let untrusted =
        Ca::new_root(&ca_params("Micronets dev untrusted CA")).context("make untrusted ca")?;
    write_ca(&untrusted, &base("untrusted-ca"))?;
    let info = Some(untrusted.info()?);
    rows.push(Row {
        file: "untrusted-ca".into(),
        role: "root CA",
        issuer: "self",
        info,
    });
    let mallory = untrusted
        .issue_leaf(&client("mallory"))
        .context("issue mallory")?;
    files::write_all(&leaf_outputs(&mallory, &base("mallory"), false))?;
    let info = Some(inspect_der(&mallory.cert_der)?);
    rows.push(Row {
        file: "mallory".into(),
        role: "client",
        issuer: "untrusted-ca",
        info,
    });

    let crl = ca
        .issue_crl(&CrlParams::new(now, args.not_after.0))
        .context("sign crl")?;
    files::write_all(&[Output::public(crl_path, crl.pem.as_str())])?;
    rows.push(Row {
        file: "ca.crl.pem".into(),
        role: "empty CRL",
        issuer: "ca",
        info: None,
    });

    print_table(dir, planned.len(), &rows);
    Ok(())
}

fn print_table(dir: &std::path::Path, files: usize, rows: &[Row]) {
    println!(
        "wrote a development PKI ({files} files) to {}",
        dir.display()
    );
    println!();
    println!(
        "{:<15} {:<14} {:<13} {:<27} EXPIRES",
        "NAME", "ROLE", "ISSUER", "CN"
    );
    for row in rows {
        let cn = row
            .info
            .as_ref()
            .and_then(|i| i.common_name.clone())
            .unwrap_or_default();
        let expires = row
            .info
            .as_ref()
            .map(|i| report::date(i.not_after))
            .unwrap_or_default();
        println!(
            "{:<15} {:<14} {:<13} {:<27} {expires}",
            row.file, row.role, row.issuer, cn
        );
    }
    println!();
    println!("each NAME has NAME.cert.pem, NAME.cert.der and NAME.key.pem (mode 0600); leaves");
    println!("also have NAME.pkeycert.pem. Trust ca.cert.pem; nothing trusts untrusted-ca.");
}
