//! Signers: the built-in Ed448 one and an external `create_pkgsign`-compatible command.
//!
//! Both sign a file on disk (a served file, or an upload spooled to disk) and return the
//! seven fields plus the content's SHA-256 and size for the audit. The Ed448 signer reads the
//! file twice (pure Ed448 hashes the message twice) and hashes SHA-256 on a second thread
//! beside the second pass, so the audit costs no wall time. The command signer runs the
//! program without a shell under a timeout and parses its `create_pkgsign` line.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::Duration;

use base64::Engine as _;
use sha2::Digest as _;
use time::OffsetDateTime;

use crate::config::KeySpec;
use crate::ed448::{Ed448Key, KeyError};
use crate::fields::{Fields, Names, parse_line};

/// Content up to this size is signed on the calling task (see [`Signer::sign_bytes`]).
const INLINE_SIGN: usize = 16 << 10;

/// Most output read from a signing command, per stream.
const MAX_COMMAND_OUTPUT: u64 = 1 << 20;

/// A signature and what the audit records about the content.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The per-file answer.
    pub fields: Fields,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Content length.
    pub size: u64,
}

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Reading the content failed.
    #[error("reading {0}")]
    Io(#[from] std::io::Error),
    /// The external command failed, timed out or printed no signature line.
    #[error("{0}")]
    Command(String),
    /// A field value cannot be carried.
    #[error(
        "{0} holds a character the signature line cannot carry (':' or a line break) or is too long"
    )]
    BadField(&'static str),
}

/// One configured key.
#[derive(Debug)]
pub enum Signer {
    /// Built-in Ed448.
    Ed448 {
        /// Configured name.
        name: String,
        /// The key.
        key: Arc<Ed448Key>,
    },
    /// External program.
    Command {
        /// Configured name.
        name: String,
        /// Program.
        program: PathBuf,
        /// Argument template.
        args: Vec<String>,
        /// Key id.
        keyid: String,
        /// PEM public key, if configured.
        public_pem: Option<String>,
        /// Deadline.
        timeout: Duration,
        /// Where output files are made.
        spool: PathBuf,
    },
}

impl Signer {
    /// Loads a configured key.
    ///
    /// # Errors
    /// An Ed448 key file that is unreadable, too open or not Ed448; an unreadable public key.
    pub fn load(
        spec: &KeySpec,
        timeout: Duration,
        spool: &Path,
        credentials: Option<&Path>,
    ) -> Result<Self, KeyError> {
        Ok(match spec {
            KeySpec::Ed448 { name, file } => Self::Ed448 {
                name: name.clone(),
                key: Arc::new(Ed448Key::read_from(file, credentials).map_err(|e| match e {
                    KeyError::Io(err) => KeyError::Format(format!("{}: {err}", file.display())),
                    other => other,
                })?),
            },
            KeySpec::Command {
                name,
                program,
                args,
                keyid,
                public_key,
            } => Self::Command {
                name: name.clone(),
                program: program.clone(),
                args: args.clone(),
                keyid: keyid.clone(),
                public_pem: match public_key {
                    Some(path) => Some(std::fs::read_to_string(path)?),
                    None => None,
                },
                timeout,
                spool: spool.to_owned(),
            },
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        match self {
            Self::Ed448 { name, .. } | Self::Command { name, .. } => name,
        }
    }

    /// The key id.
    pub fn keyid(&self) -> &str {
        match self {
            Self::Ed448 { key, .. } => key.keyid(),
            Self::Command { keyid, .. } => keyid,
        }
    }

    /// `ed448` or `command`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Ed448 { .. } => "ed448",
            Self::Command { .. } => "command",
        }
    }

    /// The public key PEM, when known.
    pub fn public_pem(&self) -> Option<String> {
        match self {
            Self::Ed448 { key, .. } => Some(crate::ed448::public_pem(&key.verifying_key())),
            Self::Command { public_pem, .. } => public_pem.clone(),
        }
    }

    /// Signs the file at `path`; `label` is the file name used for name parsing.
    ///
    /// # Errors
    /// Reading, the command, or a field that cannot be carried.
    pub async fn sign_file(
        &self,
        path: &Path,
        label: &str,
        names: &Names,
    ) -> Result<Signed, SignError> {
        if let Some(field) = names.invalid() {
            return Err(SignError::BadField(field));
        }
        let (package, fileset, vrmf, ftype) = names.complete(label);
        let timestamp = now_rfc3339();
        match self {
            Self::Ed448 { key, .. } => {
                let key = key.clone();
                let path = path.to_owned();
                let (signature, sha256, size) =
                    tokio::task::spawn_blocking(move || sign_with_digest(&key, &path))
                        .await
                        .map_err(|e| SignError::Io(std::io::Error::other(e)))??;
                Ok(Signed {
                    fields: Fields {
                        package,
                        fileset,
                        vrmf,
                        ftype,
                        keyid: key_id(self),
                        timestamp,
                        signature: base64::engine::general_purpose::STANDARD.encode(signature),
                    },
                    sha256,
                    size,
                })
            }
            Self::Command {
                program,
                args,
                keyid,
                timeout,
                spool,
                ..
            } => {
                let digest_path = path.to_owned();
                let digest = tokio::task::spawn_blocking(move || sha256_file(&digest_path));
                let mut fields = run_command(program, args, path, spool, *timeout).await?;
                if fields.keyid != *keyid {
                    return Err(SignError::Command(format!(
                        "the signing command used key {:?}, not the configured {keyid:?}",
                        fields.keyid
                    )));
                }
                // What the client gave wins over what the program guessed.
                for (given, slot) in [
                    (&names.package, &mut fields.package),
                    (&names.fileset, &mut fields.fileset),
                    (&names.vrmf, &mut fields.vrmf),
                    (&names.ftype, &mut fields.ftype),
                ] {
                    if let Some(value) = given.as_ref().filter(|v| !v.is_empty()) {
                        slot.clone_from(value);
                    }
                }
                let (sha256, size) = digest
                    .await
                    .map_err(|e| SignError::Io(std::io::Error::other(e)))??;
                Ok(Signed {
                    fields,
                    sha256,
                    size,
                })
            }
        }
    }
}

impl Signer {
    /// Signs content held in memory (small uploads); the command signer gets it in a spool
    /// file.
    ///
    /// # Errors
    /// As [`Signer::sign_file`].
    pub async fn sign_bytes(
        &self,
        content: bytes::Bytes,
        label: &str,
        names: &Names,
        spool: &Path,
    ) -> Result<Signed, SignError> {
        let Self::Ed448 { key, .. } = self else {
            let mut temp = tempfile::Builder::new()
                .prefix(".upload-")
                .tempfile_in(spool)?;
            std::io::Write::write_all(&mut temp, &content)?;
            return self.sign_file(temp.path(), label, names).await;
        };
        if let Some(field) = names.invalid() {
            return Err(SignError::BadField(field));
        }
        let (package, fileset, vrmf, ftype) = names.complete(label);
        let key = key.clone();
        let size_hint = content.len();
        let sign = move || {
            let mut sha = sha2::Sha256::new();
            let (signature, size) =
                key.sign_stream(|| Ok(&content[..]), |piece| sha.update(piece))?;
            Ok::<_, std::io::Error>((signature, hex::encode(sha.finalize()), size))
        };
        // A signature over a few KiB is about 0.3 ms of CPU: cheaper done here than handed
        // to a blocking thread and back. Larger content goes to a blocking thread.
        let (signature, sha256, size) = if size_hint <= INLINE_SIGN {
            sign()?
        } else {
            tokio::task::spawn_blocking(sign)
                .await
                .map_err(|e| SignError::Io(std::io::Error::other(e)))??
        };
        Ok(Signed {
            fields: Fields {
                package,
                fileset,
                vrmf,
                ftype,
                keyid: self.keyid().to_owned(),
                timestamp: now_rfc3339(),
                signature: base64::engine::general_purpose::STANDARD.encode(signature),
            },
            sha256,
            size,
        })
    }
}

/// Now, RFC 3339 UTC to the second.
fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn key_id(signer: &Signer) -> String {
    signer.keyid().to_owned()
}

/// Files below this are hashed for the audit on the signing thread; larger ones on a second
/// thread beside the second pass, which then costs no wall time.
const INLINE_DIGEST: u64 = 4 << 20;

/// Signs a file with Ed448 and computes its SHA-256.
fn sign_with_digest(
    key: &Ed448Key,
    path: &Path,
) -> std::io::Result<([u8; crate::ed448::SIGNATURE_LEN], String, u64)> {
    if std::fs::metadata(path)?.len() < INLINE_DIGEST {
        let mut sha = sha2::Sha256::new();
        let (signature, size) =
            key.sign_stream(|| std::fs::File::open(path), |piece| sha.update(piece))?;
        return Ok((signature, hex::encode(sha.finalize()), size));
    }
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let hasher = scope.spawn(move || {
            let mut sha = sha2::Sha256::new();
            for piece in rx {
                sha.update(&piece);
            }
            hex::encode(sha.finalize())
        });
        let result = key.sign_stream(
            || std::fs::File::open(path),
            |piece| {
                let _ = tx.send(piece.to_vec());
            },
        );
        drop(tx);
        let sha256 = hasher
            .join()
            .map_err(|_| std::io::Error::other("the digest thread failed"))?;
        let (signature, size) = result?;
        Ok((signature, sha256, size))
    })
}

/// SHA-256 and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; crate::ed448::CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(sha.finalize()), size));
        }
        sha.update(&buf[..n]);
        size += n as u64;
    }
}

/// Runs the external signer: no shell, its own process group, killed at the deadline.
async fn run_command(
    program: &Path,
    template: &[String],
    file: &Path,
    spool: &Path,
    timeout: Duration,
) -> Result<Fields, SignError> {
    let output_file = tempfile::Builder::new()
        .prefix(".pkgsign-")
        .tempfile_in(spool)
        .map_err(SignError::Io)?;
    let file_text = file.to_string_lossy();
    let output_text = output_file.path().to_string_lossy();
    let uses_output = template.iter().any(|a| a.contains("{output}"));
    let args: Vec<String> = template
        .iter()
        .map(|a| {
            a.replace("{file}", &file_text)
                .replace("{output}", &output_text)
        })
        .collect();
    let mut command = tokio::process::Command::new(program);
    command
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| SignError::Command(format!("cannot start {}: {e}", program.display())))?;
    let pid = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let collect = |pipe: Option<tokio::process::ChildStdout>| async move {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            use tokio::io::AsyncReadExt as _;
            let _ = (&mut pipe)
                .take(MAX_COMMAND_OUTPUT)
                .read_to_end(&mut out)
                .await;
        }
        out
    };
    let collect_err = |pipe: Option<tokio::process::ChildStderr>| async move {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            use tokio::io::AsyncReadExt as _;
            let _ = (&mut pipe)
                .take(MAX_COMMAND_OUTPUT)
                .read_to_end(&mut out)
                .await;
        }
        out
    };
    let run = async {
        let (status, stdout, stderr) =
            tokio::join!(child.wait(), collect(stdout), collect_err(stderr));
        status.map(|status| std::process::Output {
            status,
            stdout,
            stderr,
        })
    };
    let output = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => return Err(SignError::Command(format!("waiting for the signer: {err}"))),
        Err(_) => {
            // The program and whatever it started: it leads its own process group.
            if let Some(pid) = pid
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            return Err(SignError::Command(format!(
                "the signing command did not finish within {} s",
                timeout.as_secs()
            )));
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(SignError::Command(format!(
            "the signing command failed ({}): {}",
            output.status,
            stderr.trim().chars().take(300).collect::<String>()
        )));
    }
    let text = if uses_output {
        std::fs::read_to_string(output_file.path()).map_err(SignError::Io)?
    } else {
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mut lines = text.lines().filter_map(parse_line);
    let fields = lines.next().ok_or_else(|| {
        SignError::Command("the signing command printed no signature line".into())
    })?;
    if lines.next().is_some() {
        return Err(SignError::Command(
            "the signing command printed more than one signature line".into(),
        ));
    }
    Ok(fields)
}
