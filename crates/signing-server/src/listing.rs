//! What is decided on a descriptor opened beneath a root ([`common::beneath`]): the entries
//! of a directory (bounded however large it is), and a file's [`Stamp`], which says whether
//! it changed while it was signed.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt as _;

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
