//! The command line of `signing-client`: every flag, subcommand and help text.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

const AFTER_HELP: &str = "\
Credentials: an administrator issues each client a certificate and key signed by the CA the
server trusts, plus that CA's certificate; put them in ~/.ssh/ as signing-client.crt,
signing-client.key and signing-ca.crt (key mode 0600), or point --cert, --key and --ca (or
SIGNING_CERT, SIGNING_KEY, SIGNING_CA) elsewhere. The server's certificate must chain to --ca
and carry --server-name (default: --host). The server decides what your certificate may sign.

PATH names a file or directory ON THE SERVER, not a local one: a relative PATH is joined to
the current directory (the original client's \"default: the current directory\"), so run it
from the same path the server sees (an NFS mount, say). To sign local files, use --upload.
Subcommands come first: `signing-client keys --host h`, not `signing-client --host h keys`.

Examples:
  signing-client /export/nim/installp/ppc
  signing-client --host signer.example.com bos.rte.7.3.0.0.bff
  signing-client --upload build/mytool.1.0.0.0.bff --ftype I
  signing-client verify mytool.1.0.0.0.bff --signature BASE64 --keyid 0123456789abcdef
  signing-client verify mytool.1.0.0.0.bff --signature BASE64 --public-key release.pub
  signing-client keys

Exit codes:
  0   done (verify: the signature is good)
  1   the signature is bad, or the server refused a file or the request
  64  bad usage
  65  bad input: a local file is missing, bad base64, a bad key or credential file
  69  cannot connect, TLS failure (certificate not trusted either way), timeout
  74  a local file cannot be read
  76  the server's answer is not what the protocol says
  77  refused by the server: the certificate may not sign, or not there";

/// Client for signing-server: have files signed with the organisation's package key.
///
/// Without a subcommand, sends PATH (a directory or a file on the server; default: the
/// current directory) over the original protocol and prints the listing, one
/// `NAME: {fields}` line per signed file, and where the server wrote the signatures. With
/// --upload, sends the content of local files instead (streamed, over HTTPS).
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true, after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(flatten)]
    pub(crate) sign: Sign,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// Where the server is and who we are.
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Connection")]
pub(crate) struct Conn {
    /// Server host name or address.
    #[arg(long, env = "SIGNING_HOST", default_value = "localhost", global = true)]
    pub(crate) host: String,
    /// Server port.
    #[arg(long, env = "SIGNING_PORT", default_value_t = 6000, global = true)]
    pub(crate) port: u16,
    /// Client certificate (PEM) [default: ~/.ssh/signing-client.crt].
    #[arg(long, env = "SIGNING_CERT", value_name = "PEM", global = true)]
    pub(crate) cert: Option<PathBuf>,
    /// Client key (PEM) [default: ~/.ssh/signing-client.key; with --cert, in that file].
    #[arg(long, env = "SIGNING_KEY", value_name = "PEM", global = true)]
    pub(crate) key: Option<PathBuf>,
    /// CA certificate the server's certificate must chain to [default: ~/.ssh/signing-ca.crt].
    #[arg(long, env = "SIGNING_CA", value_name = "PEM", global = true)]
    pub(crate) ca: Option<PathBuf>,
    /// Name the server certificate must carry [default: --host].
    #[arg(long, env = "SIGNING_SERVER_NAME", value_name = "NAME", global = true)]
    pub(crate) server_name: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Seconds for connecting, the TLS handshake and each wait for the server (it signs a
    /// whole directory before it answers: raise this for big files).
    #[arg(
        long,
        env = "SIGNING_TIMEOUT",
        default_value_t = 30,
        value_name = "SECS",
        global = true
    )]
    pub(crate) timeout: u64,
}

/// The default command.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct Sign {
    /// Server-side file or directory to sign [default: the current directory].
    #[arg(value_name = "PATH", conflicts_with = "upload")]
    pub(crate) path: Option<PathBuf>,
    /// Sign these local files by sending their content (one connection for all).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub(crate) upload: Vec<PathBuf>,
    /// Package name for uploads [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    pub(crate) package: Option<String>,
    /// Fileset for uploads [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    pub(crate) fileset: Option<String>,
    /// Version.Release.Modification.Fix for uploads [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    pub(crate) vrmf: Option<String>,
    /// Image type for uploads (I, S, SR, ML) [default: from an AIX file name].
    #[arg(long, requires = "upload")]
    pub(crate) ftype: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Check an Ed448 signature of a local file, here (the file is not sent anywhere).
    ///
    /// The public key comes from --public-key, or from the server by key id (--keyid).
    /// Prints `Signature OK` (exit 0) or `Signature BAD` (exit 1).
    Verify(Verify),
    /// List the server's keys; `*` marks the one your certificate signs with.
    Keys,
}

#[derive(Debug, ClapArgs)]
#[command(group(clap::ArgGroup::new("sig").required(true).args(["signature", "signature_arg"])))]
#[command(group(clap::ArgGroup::new("pub").required(true).args(["public_key", "keyid"])))]
pub(crate) struct Verify {
    /// The signed file.
    pub(crate) file: PathBuf,
    /// The signature (base64), instead of --signature.
    #[arg(value_name = "SIGNATURE")]
    pub(crate) signature_arg: Option<String>,
    /// The signature (base64), as printed by signing.
    #[arg(long, short = 's', value_name = "B64")]
    pub(crate) signature: Option<String>,
    /// Public key (PEM, as `GET /v1/keys/KEYID` or `signing-server keygen` writes it).
    #[arg(long, value_name = "PEM")]
    pub(crate) public_key: Option<PathBuf>,
    /// Fetch the public key with this id from the server (its id is checked).
    #[arg(long, value_name = "ID")]
    pub(crate) keyid: Option<String>,
}
