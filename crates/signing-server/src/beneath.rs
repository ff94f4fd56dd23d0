//! Opening client-named paths beneath a rule's roots, once.
//!
//! A path a client sends is never resolved and then reopened: that left a window in which a
//! directory could be swapped for a symlink (signing a file outside the roots) or a file for
//! a FIFO (blocking a signing thread forever). Instead the path is matched lexically to one
//! of the rule's roots, the root is opened as a directory, and the rest is opened relative to
//! it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, `O_NONBLOCK` and `O_NOCTTY`:
//! the kernel refuses any resolution that leaves the root (`..`, an absolute symlink, a
//! symlink pointing out), whatever changes meanwhile. The caller then `fstat`s the
//! descriptor and signs from it; nothing is opened by that name again.
//!
//! Symlinks that stay beneath the root (relative targets) are followed by the kernel. When
//! the kernel refuses a resolution (an absolute symlink, or one into another of the rule's
//! roots), the path is opened as an `O_PATH` descriptor, the descriptor's real location is
//! read from `/proc/self/fd` and must lie in one of the rule's roots (canonical), and only
//! then is that same descriptor reopened for reading through its `/proc` entry: the check
//! is made on what is held, not on a name that could change. The roots themselves are the
//! operator's and may be symlinks.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Why a path could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path is not under any root, or resolving it would leave its root.
    #[error("outside the directories this certificate may sign")]
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

/// A root opened as a directory, with the relative path of what was asked for inside it.
#[derive(Debug)]
pub struct Located {
    root: File,
    root_path: PathBuf,
    relative: PathBuf,
    /// Every root of the rule, resolved (for the fallback check).
    canonical_roots: Vec<PathBuf>,
}

/// Finds the root `path` lies under (lexically: by its configured name, or by its canonical
/// name) and opens that root.
///
/// # Errors
/// [`OpenError::Outside`] when no root contains `path`; an unopenable root.
pub fn locate(path: &Path, roots: &[PathBuf]) -> Result<Located, OpenError> {
    if !path.is_absolute() {
        return Err(OpenError::Outside);
    }
    for root in roots {
        let canonical = root.canonicalize().ok();
        for name in std::iter::once(root.as_path()).chain(canonical.as_deref()) {
            if let Ok(rest) = path.strip_prefix(name) {
                let dir = rustix::fs::open(
                    root,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
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

    /// Opens the located path itself.
    ///
    /// # Errors
    /// As [`Located::open`].
    pub fn open_target(&self) -> Result<File, OpenError> {
        self.open(&self.relative)
    }

    /// Opens `relative` (to the root) for reading, never leaving the root and never
    /// blocking on a FIFO or acquiring a terminal.
    ///
    /// # Errors
    /// [`OpenError::Outside`] when the resolution would leave the root,
    /// [`OpenError::NotFound`], or another error.
    pub fn open(&self, relative: &Path) -> Result<File, OpenError> {
        let relative: &Path = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        let opened = rustix::io::retry_on_intr(|| {
            rustix::fs::openat2(
                &self.root,
                relative,
                READ,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            )
        });
        match opened {
            Ok(fd) => Ok(fd.into()),
            Err(Errno::XDEV) => self.open_held(&self.root_path.join(relative)),
            Err(errno) => Err(errno.into()),
        }
    }

    /// The fallback for a resolution the kernel would not keep beneath the root: open the
    /// path as `O_PATH` (no read access, never blocks), check where that descriptor really
    /// is, and reopen the same descriptor for reading.
    fn open_held(&self, path: &Path) -> Result<File, OpenError> {
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
        let fd = rustix::io::retry_on_intr(|| rustix::fs::open(&proc, READ, Mode::empty()))?;
        Ok(fd.into())
    }
}

/// How every client-named file is opened: read-only, never blocking on a FIFO, never
/// becoming the controlling terminal.
const READ: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// The first `max` entries of an open directory by name bytes, each with whether it might
/// be a regular file (a regular file, a symlink, or a type the file system does not
/// report), and how many more there were. `.` and `..` are left out. Memory stays bounded
/// by `max` however large the directory: the smallest names are kept in a heap as the
/// directory is read.
///
/// # Errors
/// The directory cannot be read.
pub fn entries(dir: &File, max: usize) -> std::io::Result<(Vec<(std::ffi::OsString, bool)>, u64)> {
    use rustix::fs::FileType;
    let fd = rustix::io::dup(dir)?;
    let mut reader = rustix::fs::Dir::new(fd)?;
    // The duplicate shares the descriptor's position: start from the beginning.
    reader.rewind();
    let mut kept = std::collections::BinaryHeap::with_capacity(max.min(4096) + 1);
    let mut dropped = 0u64;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        if kept.len() >= max {
            dropped += 1;
            if kept
                .peek()
                .is_some_and(|(largest, _): &(std::ffi::OsString, bool)| {
                    name >= largest.as_os_str()
                })
            {
                continue;
            }
        }
        let candidate = matches!(
            entry.file_type(),
            FileType::RegularFile | FileType::Symlink | FileType::Unknown
        );
        kept.push((name.to_owned(), candidate));
        if kept.len() > max {
            kept.pop();
        }
    }
    Ok((kept.into_sorted_vec(), dropped))
}

/// The state of a file that says whether it changed: device, inode, size, modification and
/// change times. The change time cannot be set by users, so a write in place shows there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// Reads the stamp of an open file.
    ///
    /// # Errors
    /// `fstat` failed.
    pub fn of(file: &File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = file.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// The size.
    pub fn size(&self) -> u64 {
        self.size
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

    #[test]
    fn entries_are_sorted_and_typed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), b"").unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        std::fs::create_dir(dir.path().join("c")).unwrap();
        let file = File::open(dir.path()).unwrap();
        let names = entries(&file, 10).unwrap();
        assert_eq!(
            names,
            (
                vec![("a".into(), true), ("b".into(), true), ("c".into(), false)],
                0
            )
        );
        // Only the smallest names are kept, whatever order the directory has.
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("z{:02}", 49 - i)), b"").unwrap();
        }
        let (names, more) = entries(&file, 5).unwrap();
        let names: Vec<_> = names.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b", "c", "z00", "z01"]);
        assert_eq!(more, 48);
    }
}
