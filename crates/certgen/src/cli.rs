//! The command line: every subcommand, flag and help text, and nothing else.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use common::pki::KeyType;

use crate::lifetime::Lifetime;

const AFTER_HELP: &str = "\
Examples:
  # A development PKI for every daemon, the demo users and an untrusted CA:
  certgen dev-pki --out certs/dev

  # A root CA, then a server certificate for two names and an address:
  certgen root --cert-basename pki/root_ca --subject-org-name Example --not-after 10y
  certgen leaf --cert-basename pki/broker --ca-certfile pki/root_ca.cert.pem \\
      --ca-keyfile pki/root_ca.key.pem --server --san broker.example.org --san 10.0.0.5

  # A client certificate (CN = user name) valid for 90 days:
  certgen leaf --cert-basename pki/alice --cn alice --client --not-after 90d \\
      --ca-certfile pki/root_ca.cert.pem --ca-keyfile pki/root_ca.key.pem

  # Revoke it, then look at the CRL:
  certgen crl --ca-certfile pki/root_ca.cert.pem --ca-keyfile pki/root_ca.key.pem \\
      --revoke-cert pki/alice.cert.pem --out pki/root_ca.crl.pem
  certgen inspect pki/root_ca.crl.pem

Files written for --cert-basename B: B.cert.pem, B.cert.der, B.key.pem (mode 0600), and for
leaves B.pkeycert.pem (certificate chain then key, mode 0600) and, when the issuer is an
intermediate, B.chain.pem (leaf then intermediates). Keys are unencrypted PKCS#8.

Exit status: 0 success, 64 usage error, 66 an input file is missing or unreadable,
73 an output file exists and --force-overwrite was not given, 141 stdout was closed early
(`certgen inspect ... | head -1`), 1 anything else.";

/// Make and inspect the X.509 certificates, keys and CRLs the daemons use.
///
/// A drop-in for the Micronets gen-root-cert, gen-intermediate-cert and gen-leaf-cert
/// scripts (same options, same file names), plus subject alternative names, key types,
/// client/server key usages, CRLs, inspection and a one-shot development PKI.
#[derive(Debug, Parser)]
#[command(name = "certgen", version, after_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a self-signed root CA.
    Root(RootArgs),
    /// Make an intermediate CA signed by another CA.
    Intermediate(IntermediateArgs),
    /// Make a leaf certificate for a server, a client or both.
    Leaf(LeafArgs),
    /// Sign a certificate revocation list.
    Crl(CrlArgs),
    /// Show what is in a certificate, chain or CRL file (PEM or DER).
    Inspect(InspectArgs),
    /// Make a complete development PKI in one directory.
    #[command(name = "dev-pki")]
    DevPki(DevPkiArgs),
}

/// Flags shared by every command that writes a certificate.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// Output path prefix B: writes B.cert.pem, B.cert.der, B.key.pem, ...
    #[arg(long, value_name = "B")]
    pub cert_basename: Option<PathBuf>,
    /// Subject organisation (O) [default: <basename>-RootCA, -IntermediateCA or -Leaf].
    #[arg(long, value_name = "O")]
    pub subject_org_name: Option<String>,
    /// Subject organisational unit (OU).
    #[arg(long, value_name = "OU")]
    pub ou: Option<String>,
    /// Subject common name (CN) [default: for leaves the first DNS --san; otherwise, and
    /// for CAs, the file name of --cert-basename].
    #[arg(long, value_name = "NAME")]
    pub cn: Option<String>,
    /// Validity in days from now [default: 500, as in the original scripts].
    #[arg(long, value_name = "N", conflicts_with = "not_after")]
    pub expiration_in_days: Option<u32>,
    /// Validity from now as a number with unit h, d or y (e.g. 12h, 90d, 10y).
    #[arg(long, value_name = "LIFETIME")]
    pub not_after: Option<Lifetime>,
    /// Key algorithm for the new key.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::P256)]
    pub key_type: KeyTypeArg,
    /// Replace existing output files instead of refusing (exit 73).
    #[arg(long)]
    pub force_overwrite: bool,
}

/// The issuing CA's files.
#[derive(Debug, Args)]
pub struct IssuerArgs {
    /// The issuing CA certificate (PEM; may be followed by its own chain).
    #[arg(long, value_name = "FILE")]
    pub ca_certfile: PathBuf,
    /// The issuing CA private key: PKCS#8 PEM, or the SEC1 `EC PRIVATE KEY` (P-256) and PKCS#1
    /// `RSA PRIVATE KEY` that openssl and the original Micronets scripts write.
    #[arg(long, value_name = "FILE")]
    pub ca_keyfile: PathBuf,
}

#[derive(Debug, Args)]
pub struct RootArgs {
    #[command(flatten)]
    pub cert: CertArgs,
    /// Limit how many intermediates may follow (basicConstraints pathlen) [default: none].
    #[arg(long, value_name = "N")]
    pub path_len: Option<u8>,
}

#[derive(Debug, Args)]
pub struct IntermediateArgs {
    #[command(flatten)]
    pub cert: CertArgs,
    #[command(flatten)]
    pub issuer: IssuerArgs,
    /// basicConstraints pathlen: 0 means it may only sign leaves.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub path_len: u8,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Without --server or --client the certificate gets both extended key \
usages (serverAuth and clientAuth), like a daemon that also dials its peers."
)]
pub struct LeafArgs {
    #[command(flatten)]
    pub cert: CertArgs,
    #[command(flatten)]
    pub issuer: IssuerArgs,
    /// Subject alternative name, repeatable or comma separated; IP addresses are detected.
    #[arg(long, value_name = "NAME|IP", value_delimiter = ',')]
    pub san: Vec<String>,
    /// Server certificate (extended key usage serverAuth).
    #[arg(long)]
    pub server: bool,
    /// Client certificate (extended key usage clientAuth).
    #[arg(long)]
    pub client: bool,
}

#[derive(Debug, Args)]
pub struct CrlArgs {
    #[command(flatten)]
    pub issuer: IssuerArgs,
    /// Serial number to revoke, in hex (as `certgen inspect` prints it); repeatable.
    #[arg(long, value_name = "SERIAL")]
    pub revoke: Vec<String>,
    /// Certificate file whose serial number to revoke; repeatable.
    #[arg(long, value_name = "FILE")]
    pub revoke_cert: Vec<PathBuf>,
    /// Keep every entry of an earlier CRL (usually the file being replaced).
    #[arg(long, value_name = "FILE")]
    pub merge: Option<PathBuf>,
    /// How long until the next CRL is due (nextUpdate).
    #[arg(long, value_name = "LIFETIME", default_value = "30d")]
    pub next_update: Lifetime,
    /// Where to write the CRL (PEM).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an existing output file instead of refusing (exit 73).
    #[arg(long)]
    pub force_overwrite: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Certificate, chain or CRL, PEM or DER.
    pub file: PathBuf,
    /// Print JSON: one object for a single certificate or CRL, an array for a chain.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DevPkiArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR", default_value = "certs/dev")]
    pub out: PathBuf,
    /// Key algorithm for every key.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::P256)]
    pub key_type: KeyTypeArg,
    /// Lifetime of the leaf certificates (the CAs get ten years).
    #[arg(long, value_name = "LIFETIME", default_value = "825d")]
    pub not_after: Lifetime,
    /// Replace existing files (regenerates everything) instead of refusing (exit 73).
    #[arg(long)]
    pub force_overwrite: bool,
}

/// Key algorithms as spelled on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KeyTypeArg {
    /// Ed25519.
    Ed25519,
    /// ECDSA P-256 with SHA-256.
    P256,
    /// RSA 2048-bit.
    Rsa2048,
    /// RSA 3072-bit.
    Rsa3072,
}

impl From<KeyTypeArg> for KeyType {
    fn from(arg: KeyTypeArg) -> Self {
        match arg {
            KeyTypeArg::Ed25519 => Self::Ed25519,
            KeyTypeArg::P256 => Self::P256,
            KeyTypeArg::Rsa2048 => Self::Rsa2048,
            KeyTypeArg::Rsa3072 => Self::Rsa3072,
        }
    }
}
