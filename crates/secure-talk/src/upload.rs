//! Writing `model` uploads: streamed to a temporary file, then moved to their name beneath the
//! upload directory without following a symlink anywhere.
//!
//! An upload is one websocket message of up to `max_upload_bytes`; [`Spool`] takes its payload
//! piece by piece as it arrives (a [`SPOOL_BUFFER`] at a time, written on the blocking pool),
//! so a connection holds at most that much of it in memory. The temporary file is
//! `.upload-<random>` in the upload directory itself (clients cannot name a hidden file), a
//! [`common::beneath::TempFile`]: it is removed when the upload fails or the connection ends
//! first.
//!
//! Only a complete, verified upload creates directories. Each directory of the name is opened
//! from its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY` (and `openat2`'s
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), created with `mkdirat` only when it does not
//! exist, and the file is moved in with `renameat` relative to the last one. A symlink planted
//! inside the upload directory therefore refuses the upload before anything is created
//! through it. The upload directory itself is the operator's and may be a symlink.

use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use common::beneath::TempFile;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Payload bytes gathered before one write to the temporary file.
pub const SPOOL_BUFFER: usize = 256 * 1024;

/// Prefix of temporary upload files (a hidden name no client may use).
const TMP_PREFIX: &str = ".upload-";

/// How a directory of an upload name is opened: never through a symlink, never outside.
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn refused(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("the path leaves the upload directory ({what})"),
    )
}

/// Opens the directory `name` (one component) in `parent` without following a symlink; `None`
/// when it does not exist.
fn open_dir(parent: BorrowedFd<'_>, name: &str) -> std::io::Result<Option<OwnedFd>> {
    let opened = rustix::io::retry_on_intr(|| {
        rustix::fs::openat2(
            parent,
            name,
            DIR,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    });
    match opened {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        // ELOOP: a symlink; ENOTDIR: a file (or a symlink, with O_DIRECTORY); EXDEV: outside.
        Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV) => Err(refused(name)),
        Err(errno) => Err(errno.into()),
    }
}

/// Opens (creating what is missing) each directory of `dirs` beneath `root`, one component
/// at a time, never through a symlink. Nothing is created under a component that fails.
///
/// # Errors
/// A component is a symlink or not a directory, or the file system refuses.
pub fn open_dirs_beneath(root: impl AsFd, dirs: &Path) -> std::io::Result<OwnedFd> {
    let mut current = rustix::io::fcntl_dupfd_cloexec(root, 0)?;
    for component in dirs.components() {
        let Component::Normal(name) = component else {
            return Err(refused("not a plain name"));
        };
        let name = name.to_str().ok_or_else(|| refused("not UTF-8"))?;
        let next = match open_dir(current.as_fd(), name)? {
            Some(fd) => fd,
            None => {
                match rustix::fs::mkdirat(&current, name, Mode::from_raw_mode(0o755)) {
                    // Created meanwhile by another writer: open whatever is there, checked.
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(errno) => return Err(errno.into()),
                }
                open_dir(current.as_fd(), name)?.ok_or_else(|| refused(name))?
            }
        };
        current = next;
    }
    Ok(current)
}

/// Opens the upload directory (creating it, as the operator configured it).
fn open_root(dir: &Path) -> std::io::Result<OwnedFd> {
    std::fs::create_dir_all(dir)?;
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// An upload being written: the temporary file and what has not been written to it yet.
#[derive(Debug)]
pub struct Spool {
    /// The temporary file in the upload directory (on the blocking pool while it is written).
    open: Option<TempFile>,
    buf: Vec<u8>,
    written: u64,
}

impl Spool {
    /// Creates the temporary file in `dir` (blocking).
    ///
    /// # Errors
    /// The directory or the file cannot be created.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let root = open_root(dir)?;
        Ok(Self {
            open: Some(TempFile::create_in(root, TMP_PREFIX, "", 0o644)?),
            buf: Vec::new(),
            written: 0,
        })
    }

    /// Bytes taken so far.
    pub fn len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Whether nothing was taken yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `data`; writes to the file (on the blocking pool) once [`SPOOL_BUFFER`] is full.
    ///
    /// # Errors
    /// A write failed.
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SPOOL_BUFFER {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut open = self.open.take().ok_or_else(gone)?;
        let buf = std::mem::take(&mut self.buf);
        let (open, buf, result) = tokio::task::spawn_blocking(move || {
            let result = open.file_mut().write_all(&buf);
            (open, buf, result)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.open = Some(open);
        result?;
        self.written += buf.len() as u64;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    /// Writes the rest, syncs, and moves the file to `relative` beneath the upload directory,
    /// creating its directories without following symlinks.
    ///
    /// # Errors
    /// A write failed, or the name leads through a symlink or a non-directory.
    pub async fn finish(mut self, relative: PathBuf) -> std::io::Result<()> {
        self.flush().await?;
        let mut open = self.open.take().ok_or_else(gone)?;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            open.file().sync_all()?;
            let name = relative
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| refused("no file name"))?;
            let parent = relative.parent().unwrap_or(Path::new(""));
            let dir = open_dirs_beneath(open.dir(), parent)?;
            open.persist_into(&dir, std::ffi::OsStr::new(name))?;
            rustix::fs::fsync(&dir)?;
            Ok(())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("an earlier write failed")
}

/// Removes temporary upload files left by a crash (blocking; at start-up).
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(TMP_PREFIX))
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn streams_then_moves_into_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        let chunk = vec![7u8; 100_000];
        for _ in 0..5 {
            spool.write(&chunk).await.unwrap();
        }
        assert_eq!(spool.len(), 500_000);
        spool.finish(PathBuf::from("a/b/c.bin")).await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("a/b/c.bin")).unwrap().len(),
            500_000
        );
        assert_eq!(files(dir.path()), ["a"]);
    }

    #[tokio::test]
    async fn a_symlink_inside_refuses_without_creating_anything_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        for name in ["link/new/x", "link/x", "file/x"] {
            let mut spool = Spool::create(dir.path()).unwrap();
            spool.write(b"1").await.unwrap();
            let err = spool.finish(PathBuf::from(name)).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{name}");
        }
        assert!(files(outside.path()).is_empty());
        // The temporary files are gone with the refused uploads.
        assert_eq!(files(dir.path()), ["file", "link"]);
    }

    #[tokio::test]
    async fn a_dropped_spool_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        spool.write(&vec![1; SPOOL_BUFFER + 1]).await.unwrap();
        drop(spool);
        assert!(files(dir.path()).is_empty());
        std::fs::write(dir.path().join(".upload-0000000000000001"), b"crash").unwrap();
        remove_leftovers(dir.path());
        assert!(files(dir.path()).is_empty());
    }
}
