//! What both protocols share: the signers, identity rules, signing a path or a spooled
//! upload, and recording what was signed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::ser::SerializeMap as _;
use serde::{Serialize, Serializer};
use tokio::sync::{Mutex, Semaphore};

use crate::audit::{Audit, Record, write_signatures_file};
use crate::config::{ClientRule, Config, within_roots};
use crate::fields::{Fields, Names};
use crate::signer::{SignError, Signed, Signer};

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
    sign_slots: Semaphore,
    signatures_lock: Mutex<()>,
    /// Where uploads are spooled.
    pub spool: PathBuf,
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
                    &spool,
                    config.credentials_dir.as_deref(),
                )
                .with_context(|| format!("key {:?}", spec.name()))?,
            );
        }
        let audit = Audit::open(&config.database)
            .await
            .with_context(|| format!("audit database {}", config.database.display()))?;
        Ok(Arc::new(Self {
            sign_slots: Semaphore::new(config.limits.max_concurrent_signatures),
            config,
            signers,
            audit,
            signatures_lock: Mutex::new(()),
            spool,
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

    /// Signs one file under the signing-concurrency limit.
    ///
    /// # Errors
    /// As the signer.
    pub async fn sign_one(
        &self,
        signer: &Signer,
        path: &Path,
        label: &str,
        names: &Names,
    ) -> Result<Signed, SignError> {
        let _slot = self.sign_slots.acquire().await;
        signer.sign_file(path, label, names).await
    }

    /// Signs content held in memory under the signing-concurrency limit.
    ///
    /// # Errors
    /// As the signer.
    pub async fn sign_bytes(
        &self,
        signer: &Signer,
        content: bytes::Bytes,
        label: &str,
        names: &Names,
    ) -> Result<Signed, SignError> {
        let _slot = self.sign_slots.acquire().await;
        signer.sign_bytes(content, label, names, &self.spool).await
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
        let path = Path::new(requested);
        let outside = || {
            Refusal::new(
                403,
                format!("{requested} is outside the directories this certificate may sign"),
            )
        };
        let resolved = within_roots(path, &rule.roots).ok_or_else(|| {
            if path.exists() || path.is_symlink() {
                outside()
            } else if rule.roots.iter().any(|r| path.starts_with(r)) {
                Refusal::new(404, format!("{requested}: no such file or directory"))
            } else {
                outside()
            }
        })?;
        let meta = std::fs::metadata(&resolved)
            .map_err(|e| Refusal::new(404, format!("{requested}: {e}")))?;
        let mut files = Vec::new();
        let mut listing = Vec::new();
        let mut not_signed = Vec::new();
        let max = self.config.limits.max_files_per_request;
        let directory = meta.is_dir();
        if directory {
            let mut entries: Vec<_> = std::fs::read_dir(&resolved)
                .map_err(|e| Refusal::new(403, format!("{requested}: {e}")))?
                .filter_map(Result::ok)
                .collect();
            entries.sort_by_key(std::fs::DirEntry::file_name);
            for entry in entries {
                let name = entry.file_name().to_string_lossy().into_owned();
                listing.push(name.clone());
                let entry_path = entry.path();
                let is_file = std::fs::metadata(&entry_path).is_ok_and(|m| m.is_file());
                if !is_file {
                    continue;
                }
                match within_roots(&entry_path, &rule.roots) {
                    None => files.push((
                        name,
                        Err("outside the directories this certificate may sign".to_owned()),
                    )),
                    Some(_) if files.len() >= max => not_signed.push(name),
                    Some(real) => files.push((name, Ok(real))),
                }
            }
        } else if meta.is_file() {
            let name = resolved
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            listing.push(name.clone());
            files.push((name, Ok(resolved.clone())));
        } else {
            return Err(Refusal::new(
                400,
                format!("{requested} is neither a file nor a directory"),
            ));
        }

        let names = Names::default();
        let mut outcomes = Vec::with_capacity(files.len());
        let mut records = Vec::new();
        // Files are signed concurrently, bounded by the signing slots.
        let signing = files.into_iter().map(|(name, target)| async {
            let outcome = match target {
                Err(why) => FileOutcome::Failed(why),
                Ok(real) => match self.sign_one(signer, &real, &name, &names).await {
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
        self.audit.record(records).await.map_err(|e| {
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
            tracing::info!(
                identity = r.identity,
                source = r.source,
                name = r.name,
                keyid = r.fields.keyid,
                sha256 = r.sha256,
                size = r.size,
                "signed"
            );
        }
        Ok(())
    }
}
