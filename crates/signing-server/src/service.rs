//! What both protocols share: the signers, identity rules, signing a path or a spooled
//! upload, and recording what was signed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::ser::SerializeMap as _;
use serde::{Serialize, Serializer};
use tokio::sync::{Mutex, Semaphore};

use common::beneath::{self, OpenError};

use crate::audit::{Audit, Record, write_signatures_file};
use crate::config::{ClientRule, Config};
use crate::fields::{Fields, Names};
use crate::signer::{Content, INLINE_SIGN, Job, PassHook, SignError, Signed, Signer};
use crate::spool::Spool;

/// A refusal, with the HTTP status the API answers it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// What to tell the client.
    pub message: String,
}

impl Refusal {
    /// A refusal with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// One file's outcome.
#[derive(Debug, Clone)]
pub enum FileOutcome {
    /// Signed.
    Signed(Box<Signed>),
    /// Not signed, and why.
    Failed(String),
}

impl Serialize for FileOutcome {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Signed(signed) => signed.fields.serialize(serializer),
            Self::Failed(error) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("error", error)?;
                map.end()
            }
        }
    }
}

/// Name → outcome in listing order (serialised as a JSON object).
#[derive(Debug, Clone, Default)]
pub struct Outcomes(pub Vec<(String, FileOutcome)>);

impl Serialize for Outcomes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// The answer to a path request.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// The path as requested.
    pub path: String,
    /// Whether it named a directory.
    pub directory: bool,
    /// Every entry of the directory (or the one file), sorted by name.
    pub listing: Vec<String>,
    /// Outcome per file considered for signing.
    pub files: Outcomes,
    /// Regular files left unsigned because of `max_files_per_request`.
    pub not_signed: Vec<String>,
    /// Entries left out of `listing` (and not considered) because of `max_listing_entries`.
    pub not_listed: u64,
    /// Where the signature lines were written.
    pub signatures_file: String,
}

/// The service behind both protocols.
#[derive(Debug)]
pub struct Service {
    /// Configuration.
    pub config: Config,
    signers: Vec<Signer>,
    /// Audit database.
    pub audit: Audit,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    sign_slots: Arc<Semaphore>,
    shares: Shares,
    signatures_lock: Mutex<()>,
    /// Where uploads and copies for signing commands are spooled.
    pub spool: Arc<Spool>,
    pass_hook: HookCell,
}

/// The test hook, behind a lock (see [`Service::set_pass_hook`]).
#[derive(Default)]
struct HookCell(std::sync::RwLock<Option<PassHook>>);

impl std::fmt::Debug for HookCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookCell(..)")
    }
}

impl Service {
    /// Loads every key and opens the audit database.
    ///
    /// # Errors
    /// A key or the database cannot be loaded.
    pub async fn open(config: Config) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let spool = config.state_dir.join("spool");
        std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut signers = Vec::new();
        for spec in &config.keys {
            signers.push(
                Signer::load(
                    spec,
                    config.limits.command_timeout(),
                    config.credentials_dir.as_deref(),
                )
                .with_context(|| format!("key {:?}", spec.name()))?,
            );
        }
        let options = crate::audit::OpenOptions {
            timeout: config.limits.audit_timeout(),
            allow_privileged_role: config.allow_privileged_role,
        };
        let audit = Audit::open(&config.database, &config.instance, options)
            .await
            .with_context(|| format!("audit database {}", config.database))?;
        let spool = Spool::new(
            spool,
            config.limits.max_spool_bytes,
            config.limits.spool_reserve_bytes,
        );
        Ok(Arc::new(Self {
            sign_slots: Arc::new(Semaphore::new(config.limits.max_concurrent_signatures)),
            shares: Shares::new(config.limits.max_concurrent_signatures),
            config,
            signers,
            audit,
            signatures_lock: Mutex::new(()),
            spool,
            pass_hook: HookCell::default(),
            metrics: crate::metrics::Metrics::default(),
        }))
    }

    /// Every key.
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    /// The rule and signer for a client.
    ///
    /// # Errors
    /// 403 when no rule matches the identity.
    pub fn authorize(&self, cn: Option<&str>) -> Result<(&ClientRule, &Signer), Refusal> {
        let rule = self.config.rule_for(cn).ok_or_else(|| {
            Refusal::new(
                403,
                format!(
                    "certificate CN={} may not sign: no [[clients]] rule names it",
                    cn.unwrap_or("-")
                ),
            )
        })?;
        let signer = self
            .signers
            .iter()
            .find(|s| s.name() == rule.key)
            .ok_or_else(|| Refusal::new(500, "the configured key is missing"))?;
        Ok((rule, signer))
    }

    /// Sets a hook every signing pass calls before each read (for tests, which use it to
    /// change a file while it is being signed); `None` removes it.
    pub fn set_pass_hook(&self, hook: Option<PassHook>) {
        *self
            .pass_hook
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
    }

    /// Signs `content` under the signing-concurrency limit and the `sign_timeout_secs`
    /// deadline. At the deadline the request gets an error and the work is told to stop; the
    /// slot stays taken until the work has really ended (a read stuck in the kernel keeps
    /// it), so stuck work never piles up beyond `max_concurrent_signatures`.
    ///
    /// # Errors
    /// As the signer, or the deadline.
    pub async fn sign(
        &self,
        identity: Option<&str>,
        signer: &Signer,
        content: Content,
        label: &str,
        names: &Names,
    ) -> Result<Signed, SignError> {
        // Small content in memory is a fraction of a millisecond of CPU, signed on the
        // request's task without a slot: a client holding every slot with huge files cannot
        // hold up small uploads.
        // (A signing command is a process: it always takes a slot.)
        let inline = matches!(signer, Signer::Ed448 { .. })
            && matches!(&content, Content::Memory(bytes) if bytes.len() <= INLINE_SIGN);
        let (share, slot) = if inline {
            (None, None)
        } else {
            let stopping = || SignError::Io(std::io::Error::other("the server is stopping"));
            let share = self
                .shares
                .take(identity.unwrap_or("-"))
                .await
                .ok_or_else(stopping)?;
            let slot = Arc::clone(&self.sign_slots)
                .acquire_owned()
                .await
                .map_err(|_| stopping())?;
            (Some(share), Some(Arc::new(slot)))
        };
        let job = Job {
            cancel: Arc::new(AtomicBool::new(false)),
            hook: self
                .pass_hook
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            slot,
            share: share.map(Arc::new),
        };
        let deadline = self.config.limits.sign_timeout();
        match tokio::time::timeout(
            deadline,
            signer.sign(content, label, names, &self.spool, &job),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                job.cancel.store(true, Ordering::Relaxed);
                tracing::warn!(
                    name = ?label,
                    secs = deadline.as_secs(),
                    "signing did not finish within sign_timeout_secs; stopped"
                );
                Err(SignError::Timeout(deadline.as_secs()))
            }
        }
    }

    /// Signs the file or the files of the directory `requested` names, inside the client's
    /// roots, records them and rewrites the signatures file.
    ///
    /// # Errors
    /// A path that is not absolute, outside the roots, missing or neither file nor
    /// directory; an audit failure.
    pub async fn sign_path(
        &self,
        cn: Option<&str>,
        requested: &str,
    ) -> Result<PathReport, Refusal> {
        let (rule, signer) = self.authorize(cn)?;
        if requested.contains('\0') || !requested.starts_with('/') {
            return Err(Refusal::new(
                400,
                format!("{requested:?} is not an absolute path"),
            ));
        }
        if requested.chars().any(char::is_control) {
            return Err(Refusal::new(
                400,
                format!("{requested:?} holds a control character"),
            ));
        }
        // Opening and listing are blocking system calls: a blocking thread does them.
        let limits = ScanLimits {
            max_files: self.config.limits.max_files_per_request,
            max_listing: self.config.limits.max_listing_entries,
            max_size: self.config.limits.max_upload_bytes,
        };
        let roots = rule.roots.clone();
        let owned = requested.to_owned();
        let Scan {
            directory,
            listing,
            not_listed,
            files,
            not_signed,
        } = tokio::task::spawn_blocking(move || scan(&owned, &roots, &limits))
            .await
            .map_err(|e| Refusal::new(500, e.to_string()))??;

        let names = Names::default();
        let mut outcomes = Vec::with_capacity(files.len());
        let mut records = Vec::new();
        // Files are signed concurrently, bounded by the signing slots.
        let signing = files.into_iter().map(|(name, target)| async {
            let outcome = match target {
                Err(why) => FileOutcome::Failed(why),
                Ok(file) => match self
                    .sign(cn, signer, Content::Shared(file), &name, &names)
                    .await
                {
                    Ok(signed) => FileOutcome::Signed(Box::new(signed)),
                    Err(err) => FileOutcome::Failed(err.to_string()),
                },
            };
            (name, outcome)
        });
        for (name, outcome) in futures_util::future::join_all(signing).await {
            if let FileOutcome::Signed(signed) = &outcome {
                let full = if directory {
                    Path::new(requested).join(&name)
                } else {
                    PathBuf::from(requested)
                };
                records.push(Record {
                    identity: cn.unwrap_or("-").to_owned(),
                    source: "path",
                    name: full.to_string_lossy().into_owned(),
                    sha256: signed.sha256.clone(),
                    size: signed.size,
                    key_name: signer.name().to_owned(),
                    fields: signed.fields.clone(),
                });
            }
            outcomes.push((name, outcome));
        }
        self.record(&records).await?;
        Ok(PathReport {
            path: requested.to_owned(),
            directory,
            listing,
            not_listed,
            files: Outcomes(outcomes),
            not_signed,
            signatures_file: self.config.signatures_file.to_string_lossy().into_owned(),
        })
    }

    /// Records signatures in the audit table, then, for path requests, the signatures file
    /// (the original wrote it for every path it was asked to sign; uploads are answered and
    /// audited only).
    ///
    /// # Errors
    /// 500 when the audit database refuses them (the signatures are not handed out).
    pub async fn record(&self, records: &[Record]) -> Result<(), Refusal> {
        if records.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let committed = self.audit.record(records).await;
        self.metrics.audit_committed(started.elapsed());
        committed.map_err(|e| {
            tracing::error!(err = %e, "audit write failed");
            Refusal::new(
                500,
                "the audit record could not be written; nothing was signed",
            )
        })?;
        if records.iter().any(|r| r.source == "path") {
            let _guard = self.signatures_lock.lock().await;
            let fields: Vec<&Fields> = records.iter().map(|r| &r.fields).collect();
            if let Err(err) = write_signatures_file(&self.config.signatures_file, &fields) {
                tracing::error!(%err, path = %self.config.signatures_file.display(), "writing the signatures file failed");
            }
        }
        for r in records {
            self.metrics.signed(&r.key_name, 1);
            tracing::info!(
                identity = ?r.identity,
                source = r.source,
                name = ?r.name,
                keyid = ?r.fields.keyid,
                sha256 = r.sha256,
                size = r.size,
                "signed"
            );
        }
        Ok(())
    }
}

/// Each identity's share of the signing slots: with two slots or more, one identity holds
/// at most all but one, so another always gets a slot however many huge files the first
/// has queued.
#[derive(Debug)]
struct Shares {
    per_identity: usize,
    held: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

impl Shares {
    fn new(slots: usize) -> Self {
        Self {
            per_identity: slots.saturating_sub(1).max(1),
            held: std::sync::Mutex::default(),
        }
    }

    async fn take(&self, identity: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Forget identities with nothing in flight, so the map stays small.
            held.retain(|_, s| {
                Arc::strong_count(s) > 1 || s.available_permits() < self.per_identity
            });
            Arc::clone(
                held.entry(identity.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_identity))),
            )
        };
        semaphore.acquire_owned().await.ok()
    }
}

/// Bounds of one path request's scan.
#[derive(Debug, Clone, Copy)]
struct ScanLimits {
    max_files: usize,
    max_listing: usize,
    max_size: u64,
}

/// What a path request found: the listing and the files to sign, each opened once.
#[derive(Debug)]
struct Scan {
    directory: bool,
    listing: Vec<String>,
    not_listed: u64,
    files: Vec<(String, Result<std::fs::File, String>)>,
    not_signed: Vec<String>,
}

/// Opens `requested` beneath its root and, for a directory, its first `max_listing`
/// entries by name; decides on the descriptors which files are signed.
fn scan(requested: &str, roots: &[PathBuf], limits: &ScanLimits) -> Result<Scan, Refusal> {
    let path = Path::new(requested);
    let refuse = |err: OpenError| match err {
        OpenError::Outside => Refusal::new(
            403,
            format!("{requested} is outside the directories this certificate may sign"),
        ),
        OpenError::NotFound => Refusal::new(404, format!("{requested}: no such file or directory")),
        OpenError::Io(err) => Refusal::new(403, format!("{requested}: {err}")),
    };
    let too_large = || {
        format!(
            "larger than max_upload_bytes ({} bytes), the most this server signs",
            limits.max_size
        )
    };
    // Opened once, beneath the root; everything below is decided on this descriptor.
    let located = beneath::locate(path, roots).map_err(refuse)?;
    let target = located.open_target().map_err(refuse)?;
    let meta = target
        .metadata()
        .map_err(|e| Refusal::new(403, format!("{requested}: {e}")))?;
    let mut scan = Scan {
        directory: meta.is_dir(),
        listing: Vec::new(),
        not_listed: 0,
        files: Vec::new(),
        not_signed: Vec::new(),
    };
    if scan.directory {
        let (entries, not_listed) = crate::listing::entries(&target, limits.max_listing)
            .map_err(|e| Refusal::new(403, format!("{requested}: {e}")))?;
        scan.not_listed = not_listed;
        for (raw, candidate) in entries {
            let (name, clean) = entry_name(&raw);
            scan.listing.push(name.clone());
            if !candidate {
                continue;
            }
            if !clean {
                scan.files.push((name, Err(UNSAFE_NAME.to_owned())));
                continue;
            }
            match located.open(&located.relative().join(&raw)) {
                Err(OpenError::Outside) => scan.files.push((
                    name,
                    Err("outside the directories this certificate may sign".to_owned()),
                )),
                // A dangling symlink, or an entry removed since the listing.
                Err(OpenError::NotFound) => {}
                Err(OpenError::Io(err)) => {
                    scan.files.push((name, Err(format!("reading: {err}"))));
                }
                Ok(file) => {
                    let Ok(meta) = file.metadata() else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    if scan.files.len() >= limits.max_files {
                        scan.not_signed.push(name);
                    } else if meta.len() > limits.max_size {
                        scan.files.push((name, Err(too_large())));
                    } else {
                        scan.files.push((name, Ok(file)));
                    }
                }
            }
        }
    } else if meta.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        scan.listing.push(name.clone());
        if meta.len() > limits.max_size {
            scan.files.push((name, Err(too_large())));
        } else {
            scan.files.push((name, Ok(target)));
        }
    } else {
        return Err(Refusal::new(
            400,
            format!("{requested} is neither a file nor a directory"),
        ));
    }
    Ok(scan)
}

/// Why a file with an unsafe name is not signed.
const UNSAFE_NAME: &str = "the name is not UTF-8, or holds a control character or a backslash: rename the file to sign it";

/// A directory entry's name as every output shows it (listing, JSON, audit,
/// `signatures.txt`), and whether the file may be signed. A UTF-8 name without control
/// characters or backslashes is shown as it is. Any other is shown escaped (`\n`, `\u{1b}`,
/// `\xff` for a byte that is not UTF-8, `\\` for a backslash) and is never signed: no name
/// can forge a line of the original protocol's output, and no two files share a name.
pub fn entry_name(name: &OsStr) -> (String, bool) {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt as _;
    let mut shown = String::with_capacity(name.len());
    let mut clean = true;
    for chunk in name.as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' || c.is_control() {
                clean = false;
                shown.extend(c.escape_default());
            } else {
                shown.push(c);
            }
        }
        for byte in chunk.invalid() {
            clean = false;
            let _ = write!(shown, "\\x{byte:02x}");
        }
    }
    (shown, clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt as _;

    #[test]
    fn entry_names_are_escaped_injectively() {
        for (raw, shown, clean) in [
            (&b"bos.rte.7.3.0.0.bff"[..], "bos.rte.7.3.0.0.bff", true),
            (b"caf\xc3\xa9", "caf\u{e9}", true),
            (b"dup\xff", "dup\\xff", false),
            (b"dup\xfe", "dup\\xfe", false),
            (b"a\nb", "a\\nb", false),
            (b"a\\nb", "a\\\\nb", false),
            (b"\x1b[2J", "\\u{1b}[2J", false),
        ] {
            assert_eq!(
                entry_name(OsStr::from_bytes(raw)),
                (shown.to_owned(), clean)
            );
        }
    }
}
