//! The spool: private files in `state_dir/spool` (0700) for uploads being signed and for the
//! copies a signing command reads, under a total quota and a free-space reserve.
//!
//! The audit database lives on the same file system. A spool that filled the disk would
//! stop the audit, and with it every signature; so the spool refuses to grow past
//! `max_spool_bytes` in all, or when the file system would keep less than
//! `spool_reserve_bytes` free. A refused upload gets 507 and leaves no file behind.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes written between two checks of the file system's free space.
const FREE_CHECK_EVERY: u64 = 4 << 20;

/// Why the spool refused to grow.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool's quota or the disk's reserve would be exceeded.
    #[error("{0}")]
    Full(String),
    /// Creating or writing the file failed.
    #[error("the spool: {0}")]
    Io(#[from] std::io::Error),
}

/// The spool directory and what its files hold right now.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    quota: u64,
    reserve: u64,
    used: AtomicU64,
}

impl Spool {
    /// A spool in `dir` (which must exist, 0700) with a total `quota` and a free-space
    /// `reserve`.
    pub fn new(dir: PathBuf, quota: u64, reserve: u64) -> Arc<Self> {
        Arc::new(Self {
            dir,
            quota,
            reserve,
            used: AtomicU64::new(0),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the spool's live files hold.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// A new empty private file (0600, removed when dropped), named `name` inside a fresh
    /// 0700 directory of its own (a signing command sees the file's real name).
    ///
    /// # Errors
    /// It cannot be created.
    pub fn create(self: &Arc<Self>, prefix: &str, name: &str) -> Result<SpoolFile, SpoolError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.dir)?;
        let name = if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            "content"
        } else {
            name
        };
        let path = dir.path().join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(SpoolFile {
            file,
            path,
            _dir: dir,
            spool: Arc::clone(self),
            held: 0,
            checked: 0,
        })
    }

    fn reserve_bytes(&self, n: u64) -> Result<(), SpoolError> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(n);
            if next > self.quota {
                return Err(SpoolError::Full(format!(
                    "the spool is full (max_spool_bytes = {})",
                    self.quota
                )));
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    fn check_free(&self, more: u64) -> Result<(), SpoolError> {
        let stat = rustix::fs::statvfs(&self.dir).map_err(std::io::Error::from)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < self.reserve.saturating_add(more) {
            return Err(SpoolError::Full(format!(
                "the disk holding the spool is short of space (spool_reserve_bytes = {} must stay free)",
                self.reserve
            )));
        }
        Ok(())
    }
}

/// A file in the spool; its bytes count against the quota until it is dropped.
#[derive(Debug)]
pub struct SpoolFile {
    file: std::fs::File,
    path: PathBuf,
    _dir: tempfile::TempDir,
    spool: Arc<Spool>,
    held: u64,
    checked: u64,
}

impl SpoolFile {
    /// Appends `data`, within the quota and the free-space reserve.
    ///
    /// # Errors
    /// [`SpoolError::Full`], or a write error.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let n = data.len() as u64;
        self.spool.reserve_bytes(n)?;
        self.held += n;
        if self.held - self.checked >= FREE_CHECK_EVERY || self.checked == 0 {
            self.spool.check_free(FREE_CHECK_EVERY)?;
            self.checked = self.held;
        }
        self.file.write_all(data)?;
        Ok(())
    }

    /// Bytes written.
    pub fn len(&self) -> u64 {
        self.held
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Its path (for a signing command).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        self.spool.release(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_is_total_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().to_owned(), 100, 0);
        let mut a = spool.create(".t-", "f").unwrap();
        a.write(&[0; 60]).unwrap();
        let mut b = spool.create(".t-", "f").unwrap();
        assert!(matches!(b.write(&[0; 50]), Err(SpoolError::Full(_))));
        b.write(&[0; 40]).unwrap();
        assert_eq!(spool.used(), 100);
        drop(a);
        assert_eq!(spool.used(), 40);
        let path = b.path().to_owned();
        assert!(path.ends_with("f"));
        drop(b);
        assert_eq!(spool.used(), 0);
        assert!(!path.exists());
        assert!(!path.parent().unwrap().exists());
    }

    #[test]
    fn the_free_space_reserve_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().to_owned(), u64::MAX, u64::MAX / 2);
        let mut a = spool.create(".t-", "f").unwrap();
        assert!(matches!(a.write(b"x"), Err(SpoolError::Full(_))));
    }
}
