//! Opening client-named paths beneath a set of roots, once, and writing files beneath them.
//!
//! A path a client sends is never resolved and then reopened: that left a window in which a
//! directory could be swapped for a symlink (a file outside the roots signed, served or
//! overwritten) or a file for a FIFO (a thread blocked for ever). Instead the path is matched
//! lexically to one of the roots, the root is opened as a directory, and the rest is opened
//! relative to it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, `O_NONBLOCK` and
//! `O_NOCTTY`: the kernel refuses any resolution that leaves the root (`..`, an absolute
//! symlink, a symlink pointing out), whatever changes meanwhile. The caller then `fstat`s the
//! descriptor and works from it; nothing is opened by that name again.
//!
//! Symlinks that stay beneath the root (relative targets) are followed by the kernel. When
//! the kernel refuses a resolution (an absolute symlink, a `..` or a symlink into another of
//! the roots), the path is opened as an `O_PATH` descriptor, the descriptor's real location is
//! read from `/proc/self/fd` and must lie in one of the roots (canonical), and only then is
//! that same descriptor reopened through its `/proc` entry: the check is made on what is
//! held, not on a name that could change. A path that is not lexically under a root is
//! refused, even when a symlink would lead from it into one. The roots themselves are the
//! operator's and may be symlinks.
//!
//! [`TempFile`] writes a file under a temporary name in a directory held open and moves it
//! to its own name with `renameat`, relative to descriptors; it removes the temporary file
//! whenever it is dropped before that.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Why a path could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path is not under any root, or resolving it would leave its root.
    #[error("outside the served directories")]
    Outside,
    /// Nothing by that name.
    #[error("no such file or directory")]
    NotFound,
    /// Any other failure (permission, I/O).
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<Errno> for OpenError {
    fn from(errno: Errno) -> Self {
        match errno {
            // EXDEV: the resolution left the root; ELOOP: too many links, or a magic link.
            Errno::XDEV | Errno::LOOP => Self::Outside,
            Errno::NOENT | Errno::NOTDIR => Self::NotFound,
            other => Self::Io(other.into()),
        }
    }
}

/// How every client-named file is opened for reading: never blocking on a FIFO, never
/// becoming the controlling terminal.
const READ: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// How a client-named directory is opened (to create files in it or list it).
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// A root opened as a directory, with the relative path of what was asked for inside it.
#[derive(Debug)]
pub struct Located {
    root: File,
    root_path: PathBuf,
    relative: PathBuf,
    /// Every root, resolved (for the fallback check).
    canonical_roots: Vec<PathBuf>,
}

/// Finds the root `path` lies under (lexically: by its configured name, or by its canonical
/// name) and opens that root.
///
/// # Errors
/// [`OpenError::Outside`] when `path` is relative or no root contains it; an unopenable root.
pub fn locate(path: &Path, roots: &[PathBuf]) -> Result<Located, OpenError> {
    if !path.is_absolute() {
        return Err(OpenError::Outside);
    }
    for root in roots {
        let canonical = root.canonicalize().ok();
        for name in std::iter::once(root.as_path()).chain(canonical.as_deref()) {
            if let Ok(rest) = path.strip_prefix(name) {
                let dir = rustix::io::retry_on_intr(|| rustix::fs::open(root, DIR, Mode::empty()))?;
                return Ok(Located {
                    root: dir.into(),
                    root_path: root.clone(),
                    relative: clean(rest),
                    canonical_roots: roots.iter().filter_map(|r| r.canonicalize().ok()).collect(),
                });
            }
        }
    }
    Err(OpenError::Outside)
}

/// `rest` without `.` components; `..` stays for the kernel to refuse if it leaves the root.
fn clean(rest: &Path) -> PathBuf {
    rest.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

impl Located {
    /// The path relative to the root (empty for the root itself).
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// Opens the located path itself for reading.
    ///
    /// # Errors
    /// As [`Located::open`].
    pub fn open_target(&self) -> Result<File, OpenError> {
        self.open(&self.relative)
    }

    /// Opens the located path as a directory (to create files in it with `*at` calls).
    ///
    /// # Errors
    /// As [`Located::open`]; `ENOTDIR` is [`OpenError::NotFound`].
    pub fn open_target_dir(&self) -> Result<OwnedFd, OpenError> {
        Ok(self.open_with(&self.relative, DIR)?.into())
    }

    /// Opens `relative` (to the root) for reading, never leaving the root and never
    /// blocking on a FIFO or acquiring a terminal. The caller `fstat`s what it got.
    ///
    /// # Errors
    /// [`OpenError::Outside`] when the resolution would leave the root,
    /// [`OpenError::NotFound`], or another error.
    pub fn open(&self, relative: &Path) -> Result<File, OpenError> {
        self.open_with(relative, READ)
    }

    fn open_with(&self, relative: &Path, flags: OFlags) -> Result<File, OpenError> {
        let relative: &Path = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        let opened = rustix::io::retry_on_intr(|| {
            rustix::fs::openat2(
                &self.root,
                relative,
                flags,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            )
        });
        match opened {
            Ok(fd) => Ok(fd.into()),
            Err(Errno::XDEV) => self.open_held(&self.root_path.join(relative), flags),
            Err(errno) => Err(errno.into()),
        }
    }

    /// The fallback for a resolution the kernel would not keep beneath the root: open the
    /// path as `O_PATH` (no access, never blocks), check where that descriptor really is,
    /// and reopen the same descriptor with `flags`.
    fn open_held(&self, path: &Path, flags: OFlags) -> Result<File, OpenError> {
        let held = rustix::io::retry_on_intr(|| {
            rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        })?;
        let proc = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&held)
        ));
        let real = std::fs::read_link(&proc).map_err(OpenError::Io)?;
        if !self
            .canonical_roots
            .iter()
            .any(|root| real.starts_with(root))
        {
            return Err(OpenError::Outside);
        }
        let fd = rustix::io::retry_on_intr(|| rustix::fs::open(&proc, flags, Mode::empty()))?;
        Ok(fd.into())
    }
}

/// A file being written under a temporary name (`PREFIX<random>SUFFIX`) in a directory held
/// open. [`TempFile::persist`] moves it to its name with `renameat`; until then, dropping it
/// (or a failed move) removes it, relative to the same directory descriptor.
#[derive(Debug)]
pub struct TempFile {
    dir: OwnedFd,
    file: File,
    /// The temporary name, until the file is moved to its own (then nothing to remove).
    name: Option<String>,
}

impl TempFile {
    /// Creates a new file (`O_EXCL`, never through a symlink) in `dir` with `mode` (less the
    /// umask).
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create_in(dir: OwnedFd, prefix: &str, suffix: &str, mode: u32) -> std::io::Result<Self> {
        let mut tries = 0;
        loop {
            let name = format!("{prefix}{:016x}{suffix}", rand::random::<u64>());
            let created = rustix::io::retry_on_intr(|| {
                rustix::fs::openat(
                    &dir,
                    name.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::NOCTTY
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode),
                )
            });
            match created {
                Ok(fd) => {
                    return Ok(Self {
                        dir,
                        file: fd.into(),
                        name: Some(name),
                    });
                }
                Err(Errno::EXIST) if tries < 8 => tries += 1,
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file being written.
    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// The directory the file was created in.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Moves the file to `name` in its own directory, replacing what is there (a symlink is
    /// replaced, never followed).
    ///
    /// # Errors
    /// The move failed; the temporary file is removed.
    pub fn persist(&mut self, name: &OsStr) -> std::io::Result<()> {
        let tmp = self.take_name()?;
        Self::rename(&self.dir, tmp, self.dir.as_fd(), name)
    }

    /// Moves the file to `name` in `to` (a directory on the same file system).
    ///
    /// # Errors
    /// The move failed, or the file was already moved; the temporary file is removed.
    pub fn persist_into(&mut self, to: &impl AsFd, name: &OsStr) -> std::io::Result<()> {
        let tmp = self.take_name()?;
        Self::rename(&self.dir, tmp, to.as_fd(), name)
    }

    fn take_name(&mut self) -> std::io::Result<String> {
        self.name
            .take()
            .ok_or_else(|| std::io::Error::other("the temporary file was already moved"))
    }

    fn rename(dir: &OwnedFd, tmp: String, to: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
        if let Err(errno) = rustix::fs::renameat(dir, tmp.as_str(), to, name) {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
            return Err(errno.into());
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.name.take() {
            let _ = rustix::fs::unlinkat(&self.dir, tmp.as_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_beneath_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("sub/a"), b"a").unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../outside/secret", root.join("leak")).unwrap();
        std::os::unix::fs::symlink("sub/a", root.join("inside")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/a"), root.join("absolute")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dirlink")).unwrap();
        let roots = vec![root.clone()];

        let open = |p: &Path| locate(p, &roots).and_then(|l| l.open_target());
        assert!(open(&root.join("sub/a")).is_ok());
        assert!(open(&root.join("./sub/./a")).is_ok());
        assert!(open(&root.join("sub/../sub/a")).is_ok());
        assert!(open(&root.join("inside")).is_ok());
        assert!(matches!(open(&root.join("leak")), Err(OpenError::Outside)));
        // An absolute symlink whose target is in the root: checked on the held descriptor.
        assert!(open(&root.join("absolute")).is_ok());
        assert!(matches!(
            open(&root.join("dirlink/secret")),
            Err(OpenError::Outside)
        ));
        assert!(matches!(
            open(&root.join("../outside/secret")),
            Err(OpenError::Outside)
        ));
        assert!(matches!(
            open(&outside.join("secret")),
            Err(OpenError::Outside)
        ));
        assert!(matches!(open(&root.join("nope")), Err(OpenError::NotFound)));
        assert!(matches!(
            open(Path::new("relative")),
            Err(OpenError::Outside)
        ));
        // The root itself opens as a directory.
        let located = locate(&root, &roots).unwrap();
        assert!(located.relative().as_os_str().is_empty());
        assert!(located.open_target().unwrap().metadata().unwrap().is_dir());

        let open_dir = |p: &Path| locate(p, &roots).and_then(|l| l.open_target_dir());
        assert!(open_dir(&root.join("sub")).is_ok());
        assert!(open_dir(&root).is_ok());
        assert!(matches!(
            open_dir(&root.join("dirlink")),
            Err(OpenError::Outside)
        ));
        assert!(matches!(
            open_dir(&root.join("sub/a")),
            Err(OpenError::NotFound)
        ));
    }

    #[test]
    fn another_root_is_reached_through_dotdot_and_checked_on_the_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        std::fs::create_dir(&one).unwrap();
        std::fs::create_dir(&two).unwrap();
        std::fs::write(two.join("f"), b"f").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        let roots = vec![one.clone(), two.clone()];
        let open = |p: &Path| locate(p, &roots).and_then(|l| l.open_target());
        assert!(open(&one.join("../two/f")).is_ok());
        assert!(matches!(
            open(&one.join("../secret")),
            Err(OpenError::Outside)
        ));
        let parent = locate(&one.join("../two"), &roots).unwrap();
        assert!(parent.open_target_dir().is_ok());
    }

    #[test]
    fn a_fifo_opens_without_blocking_and_is_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let roots = vec![dir.path().to_owned()];
        let file = locate(&fifo, &roots).unwrap().open_target().unwrap();
        assert!(!file.metadata().unwrap().is_file());
    }

    #[test]
    fn a_root_reached_by_its_canonical_name() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("f"), b"f").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let roots = vec![link.clone()];
        assert!(
            locate(&real.join("f"), &roots)
                .unwrap()
                .open_target()
                .is_ok()
        );
        assert!(
            locate(&link.join("f"), &roots)
                .unwrap()
                .open_target()
                .is_ok()
        );
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn open_dir(path: &Path) -> OwnedFd {
        rustix::fs::open(path, DIR, Mode::empty()).unwrap()
    }

    #[test]
    fn a_temp_file_is_moved_by_descriptor_or_removed() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();

        let mut temp = TempFile::create_in(open_dir(dir.path()), ".t-", ".part", 0o600).unwrap();
        temp.file_mut().write_all(b"one").unwrap();
        assert_eq!(names(dir.path()).len(), 2);
        drop(temp);
        assert_eq!(names(dir.path()), ["sub"]);

        let mut temp = TempFile::create_in(open_dir(dir.path()), ".t-", ".part", 0o600).unwrap();
        temp.file_mut().write_all(b"two").unwrap();
        temp.persist(OsStr::new("two")).unwrap();
        drop(temp);
        assert_eq!(std::fs::read(dir.path().join("two")).unwrap(), b"two");

        let mut temp = TempFile::create_in(open_dir(dir.path()), ".t-", "", 0o600).unwrap();
        temp.persist_into(&open_dir(&dir.path().join("sub")), OsStr::new("three"))
            .unwrap();
        assert!(dir.path().join("sub/three").exists());
        assert!(temp.persist(OsStr::new("again")).is_err());

        // A failed move removes the temporary file (a directory cannot be replaced by a file).
        std::fs::create_dir(dir.path().join("full")).unwrap();
        std::fs::write(dir.path().join("full/x"), b"").unwrap();
        let mut temp = TempFile::create_in(open_dir(dir.path()), ".t-", ".part", 0o600).unwrap();
        assert!(temp.persist(OsStr::new("full")).is_err());
        assert_eq!(names(dir.path()), ["full", "sub", "two"]);
    }
}
