//! Reading inputs and writing outputs: the refusal to overwrite, atomic writes, key modes.
//!
//! Every output is written to a temporary file in the target directory and renamed into
//! place, so a crash never leaves half a key behind; files holding private keys are created
//! with mode 0600 from the start. Nothing here knows what the bytes mean.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Output files already exist and `--force-overwrite` was not given (exit 73).
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) existing: Vec<PathBuf>,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Name a few; dev-pki can collide on dozens of files.
        const SHOWN: usize = 3;
        let mut list: Vec<String> = self
            .existing
            .iter()
            .take(SHOWN)
            .map(|p| p.display().to_string())
            .collect();
        if self.existing.len() > SHOWN {
            list.push(format!("and {} more", self.existing.len() - SHOWN));
        }
        write!(
            f,
            "refusing to overwrite existing {} {}; pass --force-overwrite to replace",
            if self.existing.len() == 1 {
                "file"
            } else {
                "files"
            },
            list.join(", ")
        )
    }
}

impl std::error::Error for Refused {}

/// An input file could not be read (exit 66).
#[derive(Debug)]
pub(crate) struct InputError {
    pub(crate) path: PathBuf,
    pub(crate) source: std::io::Error,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot read {}", self.path.display())
    }
}

impl std::error::Error for InputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Reads an input file.
pub(crate) fn read_input(path: &Path) -> Result<Vec<u8>, InputError> {
    fs::read(path).map_err(|source| InputError {
        path: path.to_owned(),
        source,
    })
}

/// Whether a file holds secret material and so gets mode 0600.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Public,
    Secret,
}

/// One file to write.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) path: PathBuf,
    pub(crate) contents: Vec<u8>,
    pub(crate) mode: Mode,
}

impl Output {
    pub(crate) fn public(path: PathBuf, contents: impl Into<Vec<u8>>) -> Self {
        Self {
            path,
            contents: contents.into(),
            mode: Mode::Public,
        }
    }

    pub(crate) fn secret(path: PathBuf, contents: impl Into<Vec<u8>>) -> Self {
        Self {
            path,
            contents: contents.into(),
            mode: Mode::Secret,
        }
    }
}

/// `base` with `suffix` appended to its file name (`pki/ca` + `.cert.pem`).
pub(crate) fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Fails with [`Refused`] if any of `paths` exists, unless `force`.
pub(crate) fn ensure_free<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    force: bool,
) -> Result<(), Refused> {
    if force {
        return Ok(());
    }
    let existing: Vec<PathBuf> = paths
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .map(Path::to_owned)
        .collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(Refused { existing })
    }
}

/// Writes every output atomically, creating parent directories as needed.
pub(crate) fn write_all(outputs: &[Output]) -> anyhow::Result<()> {
    for output in outputs {
        write_atomic(&output.path, &output.contents, output.mode)?;
    }
    Ok(())
}

fn write_atomic(path: &Path, contents: &[u8], mode: Mode) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("create directory {}", dir.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        // A stale temporary file from a crashed run would make create_new fail.
        let _ = fs::remove_file(&tmp);
        let mut file = open_new(&tmp, mode)
            .with_context(|| format!("create temporary file {}", tmp.display()))?;
        file.write_all(contents)
            .with_context(|| format!("write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("sync {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(unix)]
fn open_new(path: &Path, mode: Mode) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let bits = match mode {
        Mode::Public => 0o644,
        Mode::Secret => 0o600,
    };
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(bits)
        .open(path)
}

#[cfg(not(unix))]
fn open_new(path: &Path, _mode: Mode) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}
