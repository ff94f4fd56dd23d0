//! `/get` and `/put` on the server's file system, inside the configured roots.
//!
//! Names are resolved against the working directory; the resolved file (for `/get`, after
//! following symlinks) or its parent directory (for `/put`) must lie inside one of the roots.
//! Uploads go to a temporary file in the target directory, renamed into place only when the
//! whole body verified: a failed upload never touches an existing file.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};

/// Why a file request was refused; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The name resolves outside every configured root (403).
    #[error("{0:?} is outside the served directories")]
    OutsideRoots(String),
    /// No such file or directory (404).
    #[error("{0:?} does not exist")]
    NotFound(String),
    /// The OS refused access (403).
    #[error("{0:?}: permission denied")]
    Denied(String),
    /// A directory, or an empty name (400).
    #[error("{0:?} is not a regular file name")]
    NotAFile(String),
    /// Any other I/O error (500).
    #[error("{name:?}: {source}")]
    Io {
        /// The name as given.
        name: String,
        /// The cause.
        source: io::Error,
    },
}

impl FileError {
    fn io(name: &str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => Self::NotFound(name.to_owned()),
            io::ErrorKind::PermissionDenied => Self::Denied(name.to_owned()),
            io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory => {
                Self::NotAFile(name.to_owned())
            }
            _ => Self::Io {
                name: name.to_owned(),
                source,
            },
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::OutsideRoots(_) | Self::Denied(_) => 403,
            Self::NotFound(_) => 404,
            Self::NotAFile(_) => 400,
            Self::Io { .. } => 500,
        }
    }
}

/// Where files may be read and written.
#[derive(Debug, Clone)]
pub struct Roots {
    workdir: PathBuf,
    roots: Vec<PathBuf>,
}

impl Roots {
    /// Canonicalises the working directory and the roots (relative roots are relative to the
    /// working directory).
    ///
    /// # Errors
    /// A directory that does not exist.
    pub fn new(workdir: &Path, roots: &[PathBuf]) -> io::Result<Self> {
        let workdir = workdir.canonicalize()?;
        let roots = roots
            .iter()
            .map(|root| workdir.join(root).canonicalize())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { workdir, roots })
    }

    /// The working directory (canonical).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    fn inside(&self, path: &Path) -> bool {
        self.roots.iter().any(|root| path.starts_with(root))
    }

    /// Opens `name` for reading; returns the file and its size.
    ///
    /// # Errors
    /// [`FileError`].
    pub fn open_for_get(&self, name: &str) -> Result<(File, u64), FileError> {
        if name.is_empty() {
            return Err(FileError::NotAFile(name.to_owned()));
        }
        let path = self
            .workdir
            .join(name)
            .canonicalize()
            .map_err(|e| FileError::io(name, e))?;
        if !self.inside(&path) {
            return Err(FileError::OutsideRoots(name.to_owned()));
        }
        let file = File::open(&path).map_err(|e| FileError::io(name, e))?;
        let meta = file.metadata().map_err(|e| FileError::io(name, e))?;
        if !meta.is_file() {
            return Err(FileError::NotAFile(name.to_owned()));
        }
        Ok((file, meta.len()))
    }

    /// Starts an upload to `name`: a temporary file next to the target.
    ///
    /// # Errors
    /// [`FileError`].
    pub fn begin_put(&self, name: &str, fsync: bool) -> Result<Upload, FileError> {
        let joined = self.workdir.join(name);
        let file_name = match joined.components().next_back() {
            Some(Component::Normal(file_name)) => file_name.to_owned(),
            _ => return Err(FileError::NotAFile(name.to_owned())),
        };
        let parent = joined
            .parent()
            .ok_or_else(|| FileError::NotAFile(name.to_owned()))?
            .canonicalize()
            .map_err(|e| FileError::io(name, e))?;
        if !self.inside(&parent) {
            return Err(FileError::OutsideRoots(name.to_owned()));
        }
        let target = parent.join(&file_name);
        // Keep the mode of a file being replaced; new files get 0644 (less the umask of the
        // rename's directory is not applied to an existing inode, so set it explicitly).
        let mode = match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => return Err(FileError::NotAFile(name.to_owned())),
            Ok(meta) if meta.is_file() => {
                use std::os::unix::fs::PermissionsExt as _;
                meta.permissions().mode() & 0o7777
            }
            _ => 0o644,
        };
        let temp = tempfile::Builder::new()
            .prefix(".remo-put-")
            .suffix(".part")
            .tempfile_in(&parent)
            .map_err(|e| FileError::io(name, e))?;
        Ok(Upload {
            name: name.to_owned(),
            target,
            parent,
            temp,
            mode,
            fsync,
            written: 0,
        })
    }
}

/// An upload in progress; dropping it without [`Upload::commit`] removes the temporary file.
#[derive(Debug)]
pub struct Upload {
    name: String,
    target: PathBuf,
    parent: PathBuf,
    temp: tempfile::NamedTempFile,
    mode: u32,
    fsync: bool,
    written: u64,
}

impl Upload {
    /// Appends a piece.
    ///
    /// # Errors
    /// [`FileError`] (disk full, ...).
    pub fn write(&mut self, piece: &[u8]) -> Result<(), FileError> {
        self.temp
            .as_file_mut()
            .write_all(piece)
            .map_err(|e| FileError::io(&self.name, e))?;
        self.written += piece.len() as u64;
        Ok(())
    }

    /// Flushes (and, when configured, syncs) the data and renames it over the target.
    ///
    /// # Errors
    /// [`FileError`]; the temporary file is removed and the target untouched.
    pub fn commit(self) -> Result<u64, FileError> {
        use std::os::unix::fs::PermissionsExt as _;
        let name = self.name;
        let file = self.temp.as_file();
        file.set_permissions(std::fs::Permissions::from_mode(self.mode))
            .map_err(|e| FileError::io(&name, e))?;
        if self.fsync {
            file.sync_all().map_err(|e| FileError::io(&name, e))?;
        }
        self.temp
            .persist(&self.target)
            .map_err(|e| FileError::io(&name, e.error))?;
        if self.fsync {
            File::open(&self.parent)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| FileError::io(&name, e))?;
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_confine_get_and_put() {
        let base = tempfile::tempdir().unwrap();
        let served = base.path().join("served");
        std::fs::create_dir_all(served.join("sub")).unwrap();
        std::fs::write(base.path().join("secret"), b"x").unwrap();
        std::fs::write(served.join("sub/a.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink(base.path().join("secret"), served.join("escape")).unwrap();
        let roots = Roots::new(&served, &[PathBuf::from(".")]).unwrap();

        let (_, size) = roots.open_for_get("sub/a.txt").unwrap();
        assert_eq!(size, 5);
        let status = |r: Result<(File, u64), FileError>| r.unwrap_err().status();
        assert_eq!(status(roots.open_for_get("../secret")), 403);
        assert_eq!(status(roots.open_for_get("escape")), 403);
        assert_eq!(status(roots.open_for_get("/etc/hostname")), 403);
        assert_eq!(status(roots.open_for_get("missing")), 404);
        assert_eq!(status(roots.open_for_get("sub")), 400);
        assert_eq!(status(roots.open_for_get("")), 400);

        assert_eq!(roots.begin_put("../x", false).unwrap_err().status(), 403);
        assert_eq!(roots.begin_put("sub/..", false).unwrap_err().status(), 400);
        assert_eq!(roots.begin_put("/tmp/x", false).unwrap_err().status(), 403);
        assert_eq!(roots.begin_put("nodir/x", false).unwrap_err().status(), 404);
        assert_eq!(roots.begin_put("sub", false).unwrap_err().status(), 400);
        assert_eq!(roots.begin_put("sub/", false).unwrap_err().status(), 400);
    }

    #[test]
    fn failed_upload_keeps_the_old_file_and_commit_replaces_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        std::fs::write(&target, b"old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        let roots = Roots::new(dir.path(), &[PathBuf::from(".")]).unwrap();

        let mut upload = roots.begin_put("f", true).unwrap();
        upload.write(b"new data").unwrap();
        drop(upload);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );

        let mut upload = roots.begin_put("f", true).unwrap();
        upload.write(b"new ").unwrap();
        upload.write(b"data").unwrap();
        assert_eq!(upload.commit().unwrap(), 8);
        assert_eq!(std::fs::read(&target).unwrap(), b"new data");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);

        let upload = roots.begin_put("fresh", false).unwrap();
        upload.commit().unwrap();
        let mode = std::fs::metadata(dir.path().join("fresh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
