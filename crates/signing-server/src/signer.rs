//! Signers: the built-in Ed448 one and an external `create_pkgsign`-compatible command.
//!
//! Both sign [`Content`]: bytes in memory (small uploads), a file the server opened beneath a
//! root (which others may be writing while it is read), or a private spool file. They return
//! the seven fields plus the SHA-256 and size of exactly the bytes signed, for the audit.
//!
//! The Ed448 signer reads the content twice (pure Ed448 hashes the message twice) from one
//! descriptor, digests both passes and refuses unless they read the same bytes (see
//! [`Ed448Key::sign_stream`]); the file's `fstat` stamp must not change either. Large files
//! are digested on a second thread beside each pass. The command signer never gives the
//! program a shared file: it signs a private copy in the spool, digested while it is made.
//! The program runs without a shell under a timeout and its `create_pkgsign` line is parsed.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Duration;

use base64::Engine as _;
use sha2::Digest as _;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::config::KeySpec;
use crate::ed448::{Ed448Key, KeyError, StreamSignature};
use crate::fields::{Fields, Names, parse_line};
use crate::listing::Stamp;
use crate::spool::{Spool, SpoolError, SpoolFile};

/// Content in memory up to this size is signed on the calling task.
pub(crate) const INLINE_SIGN: usize = 16 << 10;

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
    /// Reading the content failed, or it changed while it was read.
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    /// The spool is full or failed.
    #[error("{0}")]
    Spool(#[from] SpoolError),
    /// The signature took longer than `sign_timeout_secs`.
    #[error("signing did not finish within {0} s (sign_timeout_secs)")]
    Timeout(u64),
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

    /// Signs `content`; `label` is the file name used for name parsing. Command signers
    /// get private copies made in `spool`. `job` can stop the work (its deadline passed)
    /// and lets tests watch the passes.
    ///
    /// # Errors
    /// Reading, a content that changed while it was read, the spool, the command, or a
    /// field that cannot be carried.
    pub async fn sign(
        &self,
        content: Content,
        label: &str,
        names: &Names,
        spool: &Arc<Spool>,
        job: &Job,
    ) -> Result<Signed, SignError> {
        if let Some(field) = names.invalid() {
            return Err(SignError::BadField(field));
        }
        match self {
            Self::Ed448 { key, .. } => {
                let (package, fileset, vrmf, ftype) = names.complete(label);
                let signed = sign_ed448(key, content, job).await?;
                Ok(Signed {
                    fields: Fields {
                        package,
                        fileset,
                        vrmf,
                        ftype,
                        keyid: key.keyid().to_owned(),
                        timestamp: now_rfc3339(),
                        signature: base64::engine::general_purpose::STANDARD
                            .encode(signed.signature),
                    },
                    sha256: hex::encode(signed.sha256),
                    size: signed.len,
                })
            }
            Self::Command {
                program,
                args,
                keyid,
                timeout,
                ..
            } => {
                let (copy, sha256, size) = private_copy(content, label, spool, job).await?;
                let mut fields = run_command(program, args, copy.path(), spool, *timeout).await?;
                drop(copy);
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
                Ok(Signed {
                    fields,
                    sha256,
                    size,
                })
            }
        }
    }
}

/// What is signed.
#[derive(Debug)]
pub enum Content {
    /// Bytes held in memory (a small upload).
    Memory(bytes::Bytes),
    /// A file opened beneath a root: others may write it while it is read.
    Shared(File),
    /// A spool file only this server writes (a large upload).
    Private(SpoolFile),
}

/// Sees each read of a signing pass: `(pass, offset)`, pass 1 or 2. For tests, which use it
/// to change a file between two reads.
pub type PassHook = Arc<dyn Fn(u8, u64) + Send + Sync>;

/// The controls of one signing: a flag that stops it at its deadline, and a test hook.
#[derive(Clone, Default)]
pub struct Job {
    /// Set when the deadline passed: the next read fails and the work ends.
    pub cancel: Arc<AtomicBool>,
    /// Called before each read of a pass.
    pub hook: Option<PassHook>,
    /// The signing slot: every clone holds it, so work still running (even stuck in a
    /// read after its deadline) keeps its slot until it really ends.
    pub slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
    /// The place in the identity's share of the slots, held the same way.
    pub share: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("cancel", &self.cancel)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Job {
    fn check(&self) -> std::io::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "signing was stopped at its deadline",
            ));
        }
        Ok(())
    }
}

/// Reads a file from offset 0 with `pread`, so every pass reads the one descriptor from
/// its start whatever else uses it.
struct PassReader<'a> {
    file: &'a File,
    pos: u64,
    pass: u8,
    job: &'a Job,
}

impl std::io::Read for PassReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.job.check()?;
        if let Some(hook) = &self.job.hook {
            hook(self.pass, self.pos);
        }
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

async fn sign_ed448(
    key: &Arc<Ed448Key>,
    content: Content,
    job: &Job,
) -> Result<StreamSignature, SignError> {
    let key = Arc::clone(key);
    let job = job.clone();
    let blocking = match content {
        Content::Memory(bytes) => {
            let inline = bytes.len() <= INLINE_SIGN;
            let sign = move || key.sign_stream(|| Ok(&bytes[..]), sha2::Sha256::new);
            // A signature over a few KiB is about 0.3 ms of CPU: cheaper done here than
            // handed to a blocking thread and back.
            if inline {
                return Ok(sign()?);
            }
            tokio::task::spawn_blocking(sign)
        }
        Content::Shared(file) => tokio::task::spawn_blocking(move || sign_file(&key, &file, &job)),
        Content::Private(spooled) => {
            tokio::task::spawn_blocking(move || sign_file(&key, spooled.file(), &job))
        }
    };
    Ok(blocking
        .await
        .map_err(|e| SignError::Io(std::io::Error::other(e)))??)
}
/// Now, RFC 3339 UTC to the second.
fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Files below this are digested on the signing thread; larger ones on a second thread
/// beside each pass, which then costs no wall time.
const INLINE_DIGEST: u64 = 4 << 20;

/// Signs an open file with Ed448: both passes from its start through the one descriptor,
/// and its `fstat` stamp unchanged before, between and after them (the digests of the two
/// passes are compared by the signer itself).
fn sign_file(key: &Ed448Key, file: &File, job: &Job) -> std::io::Result<StreamSignature> {
    let before = Stamp::of(file)?;
    let threaded = before.size() >= INLINE_DIGEST;
    let mut pass = 0u8;
    let signed = key.sign_stream(
        || {
            pass += 1;
            if pass > 1 && Stamp::of(file)? != before {
                return Err(crate::ed448::changed());
            }
            Ok(PassReader {
                file,
                pos: 0,
                pass,
                job,
            })
        },
        || {
            if threaded {
                Digester::Thread(ThreadDigest::spawn())
            } else {
                Digester::Inline(Box::default())
            }
        },
    )?;
    if Stamp::of(file)? != before || signed.len != before.size() {
        return Err(crate::ed448::changed());
    }
    Ok(signed)
}

/// SHA-256 of a pass, on this thread or on a second one.
enum Digester {
    Inline(Box<sha2::Sha256>),
    Thread(ThreadDigest),
}

impl crate::ed448::PassDigest for Digester {
    fn update(&mut self, piece: &[u8]) {
        match self {
            Self::Inline(sha) => sha2::Digest::update(sha.as_mut(), piece),
            Self::Thread(thread) => thread.update(piece),
        }
    }

    fn finish(self) -> std::io::Result<[u8; 32]> {
        match self {
            Self::Inline(sha) => Ok(sha.finalize().into()),
            Self::Thread(thread) => thread.finish(),
        }
    }
}

/// SHA-256 on a thread of its own, fed through a short queue.
struct ThreadDigest {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: std::thread::JoinHandle<[u8; 32]>,
}

impl ThreadDigest {
    fn spawn() -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let thread = std::thread::spawn(move || {
            let mut sha = sha2::Sha256::new();
            for piece in rx {
                sha.update(&piece);
            }
            sha.finalize().into()
        });
        Self {
            tx: Some(tx),
            thread,
        }
    }

    fn update(&mut self, piece: &[u8]) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(piece.to_vec());
        }
    }

    fn finish(mut self) -> std::io::Result<[u8; 32]> {
        drop(self.tx.take());
        self.thread
            .join()
            .map_err(|_| std::io::Error::other("the digest thread failed"))
    }
}

/// A private copy of `content` in the spool for a signing command, with the SHA-256 and
/// size of the bytes in it (digested while they are copied, so the audit names exactly the
/// bytes the command reads). A spooled upload is already private and is digested as is.
async fn private_copy(
    content: Content,
    label: &str,
    spool: &Arc<Spool>,
    job: &Job,
) -> Result<(SpoolFile, String, u64), SignError> {
    let spool = Arc::clone(spool);
    let job = job.clone();
    let label = label.to_owned();
    tokio::task::spawn_blocking(move || -> Result<_, SignError> {
        let mut sha = sha2::Sha256::new();
        match content {
            Content::Memory(bytes) => {
                let mut copy = spool.create(".pkgsign-in-", &label)?;
                copy.write(&bytes)?;
                sha.update(&bytes);
                Ok((copy, hex::encode(sha.finalize()), bytes.len() as u64))
            }
            Content::Shared(file) => {
                let mut copy = spool.create(".pkgsign-in-", &label)?;
                let mut buf = Zeroizing::new(vec![0u8; crate::ed448::CHUNK]);
                let mut reader = PassReader {
                    file: &file,
                    pos: 0,
                    pass: 1,
                    job: &job,
                };
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    sha.update(&buf[..n]);
                    copy.write(&buf[..n])?;
                }
                let size = copy.len();
                Ok((copy, hex::encode(sha.finalize()), size))
            }
            Content::Private(spooled) => {
                let mut buf = Zeroizing::new(vec![0u8; crate::ed448::CHUNK]);
                let mut reader = PassReader {
                    file: spooled.file(),
                    pos: 0,
                    pass: 1,
                    job: &job,
                };
                let mut size = 0u64;
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    sha.update(&buf[..n]);
                    size += n as u64;
                }
                Ok((spooled, hex::encode(sha.finalize()), size))
            }
        }
    })
    .await
    .map_err(|e| SignError::Io(std::io::Error::other(e)))?
}

/// One pass over an argument template: `{file}` and `{output}` are replaced where they
/// stand in the template, never inside what was substituted (a file named `x{output}` stays
/// as it is).
pub fn substitute(template: &str, file: &str, output: &str) -> String {
    let mut out = String::with_capacity(template.len() + file.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{file}") {
            out.push_str(file);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{output}") {
            out.push_str(output);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Up to [`MAX_COMMAND_OUTPUT`] bytes of a child's output pipe (nothing without one).
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.take(MAX_COMMAND_OUTPUT).read_to_end(&mut out).await;
    }
    out
}

/// Runs the external signer: no shell, its own process group, killed at the deadline.
async fn run_command(
    program: &Path,
    template: &[String],
    file: &Path,
    spool: &Arc<Spool>,
    timeout: Duration,
) -> Result<Fields, SignError> {
    let output_file = spool.create(".pkgsign-out-", "signature")?;
    let file_text = file.to_string_lossy();
    let output_text = output_file.path().to_string_lossy();
    let uses_output = template.iter().any(|a| a.contains("{output}"));
    let args: Vec<String> = template
        .iter()
        .map(|a| substitute(a, &file_text, &output_text))
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
    let run = async {
        let (status, stdout, stderr) =
            tokio::join!(child.wait(), read_capped(stdout), read_capped(stderr));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_substituted_in_one_pass() {
        assert_eq!(
            substitute("infile={file}", "/p/x{output}.txt", "/s/out"),
            "infile=/p/x{output}.txt"
        );
        assert_eq!(substitute("{output}", "/f", "/o{file}"), "/o{file}");
        assert_eq!(substitute("{file}:{output}:{x}{", "F", "O"), "F:O:{x}{");
        assert_eq!(substitute("plain", "F", "O"), "plain");
    }
}
