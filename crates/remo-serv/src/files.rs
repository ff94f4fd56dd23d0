//! `/get` and `/put` on the server's file system, inside the configured roots.
//!
//! Names are relative to the working directory (or absolute) and must lie, as written, under
//! one of the roots; they are opened once, beneath a directory descriptor of that root
//! ([`common::beneath`]: `openat2` with `RESOLVE_BENEATH`, `O_NONBLOCK`, `O_NOCTTY`), so a
//! directory swapped for a symlink meanwhile never leads outside. A `/get` serves regular files
//! only, decided by `fstat` on the descriptor it reads (a FIFO is refused, never waited on). An
//! upload goes to a temporary file created in the target's directory, held open by descriptor,
//! and is renamed into place relative to it (`renameat`) only when the whole body verified: a
//! failed upload never touches an existing file, and its temporary file is removed on every
//! failure and when the upload is dropped. Every call here blocks: callers run it on the
//! blocking pool.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use common::beneath::{self, OpenError, TempFile};

/// Prefix and suffix of the temporary file of an upload.
const TEMP_PREFIX: &str = ".remo-put-";
const TEMP_SUFFIX: &str = ".part";

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
    /// A directory, a FIFO, a device or a socket, or an empty name (400).
    #[error("{0:?} is not a regular file")]
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

    fn open(name: &str, err: OpenError) -> Self {
        match err {
            OpenError::Outside => Self::OutsideRoots(name.to_owned()),
            OpenError::NotFound => Self::NotFound(name.to_owned()),
            OpenError::Io(source) => Self::io(name, source),
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

/// Where files may be read and written (cheap to clone, to take to a blocking thread).
#[derive(Debug, Clone)]
pub struct Roots {
    workdir: Arc<Path>,
    roots: Arc<[PathBuf]>,
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
        Ok(Self {
            workdir: workdir.into(),
            roots: roots.into(),
        })
    }

    /// The working directory (canonical).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Opens `name` for reading (blocking, never on a FIFO); returns the file and its size.
    ///
    /// # Errors
    /// [`FileError`]; [`FileError::NotAFile`] for anything but a regular file.
    pub fn open_for_get(&self, name: &str) -> Result<(File, u64), FileError> {
        if name.is_empty() {
            return Err(FileError::NotAFile(name.to_owned()));
        }
        let file = beneath::locate(&self.workdir.join(name), &self.roots)
            .and_then(|located| located.open_target())
            .map_err(|e| FileError::open(name, e))?;
        let meta = file.metadata().map_err(|e| FileError::io(name, e))?;
        if !meta.is_file() {
            return Err(FileError::NotAFile(name.to_owned()));
        }
        Ok((file, meta.len()))
    }

    /// Starts an upload to `name` (blocking): a temporary file in the target's directory,
    /// opened beneath its root.
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
            .ok_or_else(|| FileError::NotAFile(name.to_owned()))?;
        let dir = beneath::locate(parent, &self.roots)
            .and_then(|located| located.open_target_dir())
            .map_err(|e| FileError::open(name, e))?;
        // Keep the permission bits of a file being replaced; new files get 0644 (the temporary
        // file's mode is set explicitly, so the umask does not apply).
        let mode = match rustix::fs::statat(
            &dir,
            file_name.as_os_str(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
                rustix::fs::FileType::Directory => {
                    return Err(FileError::NotAFile(name.to_owned()));
                }
                rustix::fs::FileType::RegularFile => replaced_mode(stat.st_mode, stat.st_uid),
                _ => 0o644,
            },
            Err(_) => 0o644,
        };
        let temp = TempFile::create_in(dir, TEMP_PREFIX, TEMP_SUFFIX, 0o600)
            .map_err(|e| FileError::io(name, e))?;
        Ok(Upload {
            name: name.to_owned(),
            file_name,
            temp,
            mode,
            fsync,
            written: 0,
        })
    }
}

/// The mode an upload gives the file it replaces, whose mode and owner were `mode` and `uid`:
/// its permission bits only, never set-uid, set-gid or sticky (the new file belongs to the
/// daemon's uid, so a planted 6777 would run as the daemon); and when another uid owned it
/// (someone else planted it in a shared directory), without group and other write either.
fn replaced_mode(mode: u32, uid: u32) -> u32 {
    let mode = mode & 0o777;
    if uid == rustix::process::geteuid().as_raw() {
        mode
    } else {
        mode & !0o022
    }
}

/// An upload in progress; dropping it without [`Upload::commit`] removes the temporary file.
#[derive(Debug)]
pub struct Upload {
    name: String,
    /// The target's name in the directory the temporary file is in.
    file_name: OsString,
    temp: TempFile,
    mode: u32,
    fsync: bool,
    written: u64,
}

impl Upload {
    /// Appends a piece (blocking).
    ///
    /// # Errors
    /// [`FileError`] (disk full, ...).
    pub fn write(&mut self, piece: &[u8]) -> Result<(), FileError> {
        self.temp
            .file_mut()
            .write_all(piece)
            .map_err(|e| FileError::io(&self.name, e))?;
        self.written += piece.len() as u64;
        Ok(())
    }

    /// Flushes (and, when configured, syncs) the data and renames it over the target, in the
    /// directory held open (blocking).
    ///
    /// # Errors
    /// [`FileError`]; the temporary file is removed and the target untouched.
    pub fn commit(mut self) -> Result<u64, FileError> {
        use std::os::unix::fs::PermissionsExt as _;
        let name = &self.name;
        let file = self.temp.file();
        file.set_permissions(std::fs::Permissions::from_mode(self.mode))
            .map_err(|e| FileError::io(name, e))?;
        if self.fsync {
            file.sync_all().map_err(|e| FileError::io(name, e))?;
        }
        self.temp
            .persist(&self.file_name)
            .map_err(|e| FileError::io(name, e))?;
        if self.fsync {
            rustix::fs::fsync(self.temp.dir()).map_err(|e| FileError::io(name, e.into()))?;
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
