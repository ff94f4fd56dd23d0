//! `remo-admin`: key pairs and the user database, interchangeable with the original
//! `build_key_pair` and `add_user` tools.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use common::cli::Failure;
use common::daemon::exit;

use crate::keys::{PrivateKey, PublicKey};
use crate::users::{UserError, Users, admin_db_path};

/// Key pairs and users for remo-serv.
///
/// Files are those of the original tools: `keygen` writes PREFIX_key.pem (PKCS#8 PEM Ed448
/// private key, PBES2-encrypted when a passphrase is given) and PREFIX.pem (the public key);
/// `useradd` stores a public key PEM in the SQLite user database.
///
/// Exit codes: 0 done, 64 bad flags, 65 bad key file, 66 missing input, 73 output exists,
/// 69 database unavailable, 1 the user exists or does not.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Set-up:\n  remo-admin keygen remo_serv            # server: remo_serv_key.pem + remo_serv.pem\n  remo-admin keygen alice                # user: alice_key.pem + alice.pem\n  remo-admin useradd alice alice.pem     # into users_db.sqlite\n  remo-admin users --json"
)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Make an Ed448 key pair: [DIR/]PREFIX_key.pem (private) and [DIR/]PREFIX.pem (public).
    ///
    /// The passphrase is asked on the terminal (empty: the key is not encrypted), or read
    /// from --passphrase-file or REMO_PASSPHRASE. A server key must not be encrypted.
    Keygen {
        /// File name prefix: `remo_serv` for the server, the user name for a user.
        prefix: String,
        /// Directory to write into.
        dir: Option<PathBuf>,
        /// Read the passphrase from this file (first line).
        #[arg(long, value_name = "FILE", conflicts_with = "no_passphrase")]
        passphrase_file: Option<PathBuf>,
        /// Do not encrypt the private key and do not ask.
        #[arg(long)]
        no_passphrase: bool,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Register USER with the public key in PEM (default USER.pem).
    Useradd {
        /// Database base name; `.sqlite` is appended unless present (the original's rule).
        #[arg(long, short = 'b', default_value = "users_db")]
        base: String,
        /// Login name.
        user: String,
        /// Public key PEM file.
        pem: Option<PathBuf>,
    },
    /// Remove USER.
    Userdel {
        /// Database base name; `.sqlite` is appended unless present.
        #[arg(long, short = 'b', default_value = "users_db")]
        base: String,
        /// Login name.
        user: String,
    },
    /// List users.
    Users {
        /// Database base name; `.sqlite` is appended unless present.
        #[arg(long, short = 'b', default_value = "users_db")]
        base: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `err` as a failure that exits with `code`.
fn fail(code: u8, err: impl std::fmt::Display) -> anyhow::Error {
    Failure::new(code, anyhow::Error::msg(err.to_string())).into()
}

/// Runs the command `args` names.
///
/// # Errors
/// The failure, carrying its exit status (`common::cli::Failure`) where it is not 1.
#[allow(clippy::print_stdout)] // `users` lists on stdout
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Keygen {
            prefix,
            dir,
            passphrase_file,
            no_passphrase,
            force,
        } => keygen(
            &prefix,
            dir.as_deref(),
            passphrase_file.as_deref(),
            no_passphrase,
            force,
        ),
        Command::Useradd { base, user, pem } => {
            let pem_path = pem.unwrap_or_else(|| PathBuf::from(format!("{user}.pem")));
            let pem = std::fs::read(&pem_path)
                .map_err(|e| fail(exit::NOINPUT, format!("{}: {e}", pem_path.display())))?;
            // The original stored anything; we refuse what the server could never use.
            PublicKey::from_pem(&pem).map_err(|e| {
                fail(
                    exit::DATAERR,
                    format!(
                        "{}: {e} (expected an Ed448 or RSA public key PEM)",
                        pem_path.display()
                    ),
                )
            })?;
            let users = open(&base).await?;
            match users.add(&user, &pem).await {
                Ok(()) => {
                    eprintln!("added {user} to {}", admin_db_path(&base).display());
                    Ok(())
                }
                Err(err @ UserError::Exists(_)) => Err(fail(1, err)),
                Err(err) => Err(fail(exit::UNAVAILABLE, err)),
            }
        }
        Command::Userdel { base, user } => {
            let users = open(&base).await?;
            match users.remove(&user).await {
                Ok(()) => Ok(()),
                Err(err @ UserError::Missing(_)) => Err(fail(1, err)),
                Err(err) => Err(fail(exit::UNAVAILABLE, err)),
            }
        }
        Command::Users { base, json } => {
            let users = open(&base).await?;
            let list = users.list().await.map_err(|e| fail(exit::UNAVAILABLE, e))?;
            let mut stdout = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut stdout, &list)?;
                writeln!(stdout)?;
            } else {
                for entry in list {
                    writeln!(stdout, "{}\t{}", entry.user, entry.key_type)?;
                }
            }
            Ok(())
        }
    }
}

async fn open(base: &str) -> anyhow::Result<Users> {
    Users::open(&admin_db_path(base))
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, e))
}

fn keygen(
    prefix: &str,
    dir: Option<&Path>,
    passphrase_file: Option<&Path>,
    no_passphrase: bool,
    force: bool,
) -> anyhow::Result<()> {
    let dir = dir.unwrap_or(Path::new(""));
    let private_path = dir.join(format!("{prefix}_key.pem"));
    let public_path = dir.join(format!("{prefix}.pem"));
    for path in [&private_path, &public_path] {
        if path.exists() && !force {
            return Err(fail(
                exit::CANTCREAT,
                format!("{} exists (use --force to replace it)", path.display()),
            ));
        }
    }
    let passphrase = if no_passphrase {
        String::new()
    } else if let Some(file) = passphrase_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| fail(exit::NOINPUT, format!("{}: {e}", file.display())))?;
        text.lines().next().unwrap_or("").trim().to_owned()
    } else if let Ok(from_env) = std::env::var("REMO_PASSPHRASE") {
        from_env.trim().to_owned()
    } else {
        rpassword::prompt_password(
            "Password for the private key (if empty, key will not be encrypted): ",
        )
        .context("reading the passphrase")?
        .trim()
        .to_owned()
    };
    let key = PrivateKey::generate();
    let pem = key
        .to_pem((!passphrase.is_empty()).then_some(passphrase.as_bytes()))
        .map_err(|e| fail(exit::SOFTWARE, e))?;
    write_private(&private_path, pem.as_bytes(), force)?;
    std::fs::write(&public_path, PublicKey::ed448_pem(&key.verifying_key()))
        .map_err(|e| fail(exit::CANTCREAT, format!("{}: {e}", public_path.display())))?;
    eprintln!(
        "wrote {} ({}) and {}",
        private_path.display(),
        if passphrase.is_empty() {
            "not encrypted"
        } else {
            "encrypted"
        },
        public_path.display()
    );
    Ok(())
}

/// Writes a private key 0600 from the start (never briefly world-readable).
fn write_private(path: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options
        .open(path)
        .map_err(|e| fail(exit::CANTCREAT, format!("{}: {e}", path.display())))?;
    file.write_all(bytes)
        .map_err(|e| fail(exit::IOERR, format!("{}: {e}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn keygen_writes_a_private_key_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        keygen("alice", Some(dir.path()), None, true, false).unwrap();
        let private = dir.path().join("alice_key.pem");
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = PrivateKey::from_pem(&std::fs::read_to_string(&private).unwrap(), None).unwrap();
        let public = std::fs::read_to_string(dir.path().join("alice.pem")).unwrap();
        assert_eq!(public, PublicKey::ed448_pem(&key.verifying_key()));

        let again = keygen("alice", Some(dir.path()), None, true, false).unwrap_err();
        assert_eq!(common::cli::Report::exit_code(&again), exit::CANTCREAT);
        assert!(again.to_string().contains("exists (use --force"), "{again}");
        keygen("alice", Some(dir.path()), None, true, true).unwrap();
    }
}
