//! `--out-dir`: a job's secret or certificates written into a private directory of the user's.

use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use common::daemon::exit;

use super::failure::PROTOCOL;
use crate::api::{Job, JobType};
use crate::cli::failure::Failure;

/// The files `--out-dir` writes for a job: name and content.
fn material_files(job: &Job) -> Result<Vec<(String, String)>, Failure> {
    // The id becomes a file name: never one that leaves the directory.
    job.check_answer(None)
        .map_err(|e| Failure::new(PROTOCOL, format!("unexpected answer from the broker: {e}")))?;
    let id = &job.summary.id;
    let missing = || {
        Failure::new(
            PROTOCOL,
            format!("the broker sent job {id} without its material"),
        )
    };
    Ok(match job.summary.job_type {
        JobType::Ssh => {
            let secret = job.secret.as_ref().ok_or_else(missing)?;
            vec![(format!("{id}.secret"), format!("{secret}\n"))]
        }
        JobType::Ssl => {
            let tls = job.tls.as_ref().ok_or_else(missing)?;
            vec![
                (format!("{id}.crt"), tls.cert.clone()),
                (format!("{id}.key"), tls.key.clone()),
                (format!("{id}.client.crt"), tls.client_cert.clone()),
                (format!("{id}.client.key"), tls.client_key.clone()),
                (format!("{id}.ca.crt"), tls.ca.clone()),
            ]
        }
    })
}

/// Writes the job's material into `dir` (created 0700), each file 0600, atomically. An
/// existing `dir` must be a directory of ours that group and others cannot enter or list:
/// the files are private, and so are their names and the moments they change. `dir` itself
/// must not be a symbolic link (exit 74): it is opened once with `O_NOFOLLOW`, that
/// descriptor is checked, and every file is created and renamed relative to it, so what is
/// checked is where the files land, whatever happens to the path meanwhile; a temporary file
/// is removed on any failure.
pub(crate) fn write_material(dir: &Path, job: &Job) -> Result<Vec<PathBuf>, Failure> {
    let files = material_files(job)?;
    let io = |what: &Path, e: std::io::Error| {
        Failure::new(exit::IOERR, format!("{}: {e}", what.display()))
    };
    let held = open_out_dir(dir)?;
    let mut written = Vec::with_capacity(files.len());
    for (name, content) in files {
        let path = dir.join(&name);
        let held = held.try_clone().map_err(|e| io(dir, e))?;
        let mut temp =
            common::beneath::TempFile::create_in(held, &format!(".{name}."), ".tmp", 0o600)
                .map_err(|e| io(&path, e))?;
        // The umask can only have removed bits from 0600; make it exactly 0600.
        temp.file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .and_then(|()| temp.file_mut().write_all(content.as_bytes()))
            .and_then(|()| temp.file().sync_all())
            .and_then(|()| temp.persist(std::ffi::OsStr::new(&name)))
            .map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Opens `--out-dir` once, never through a symlink as its last component, creating it (0700)
/// when missing, and checks the descriptor: a directory of ours, closed to others.
fn open_out_dir(dir: &Path) -> Result<std::os::fd::OwnedFd, Failure> {
    use rustix::fs::{Mode, OFlags};
    let fail = |message: String| Failure::new(exit::IOERR, message);
    let io = |e: std::io::Error| fail(format!("{}: {e}", dir.display()));
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let open = || rustix::io::retry_on_intr(|| rustix::fs::open(dir, flags, Mode::empty()));
    let opened = match open() {
        Err(rustix::io::Errno::NOENT) => {
            // mkdir never follows a symlink in the last component; the open below checks
            // whatever is there now.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            open()
        }
        other => other,
    };
    let held = opened.map_err(|errno| {
        let symlink = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        if symlink {
            fail(format!(
                "--out-dir {} is a symbolic link; give the directory itself",
                dir.display()
            ))
        } else if errno == rustix::io::Errno::NOTDIR {
            fail(format!("{} is not a directory", dir.display()))
        } else {
            io(errno.into())
        }
    })?;
    let stat = rustix::fs::fstat(&held).map_err(|e| io(e.into()))?;
    if stat.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(fail(format!(
            "--out-dir {} belongs to uid {}, not to you; choose a directory of your own",
            dir.display(),
            stat.st_uid
        )));
    }
    if stat.st_mode & 0o077 != 0 {
        return Err(fail(format!(
            "--out-dir {} is open to others (mode {:04o}); run `chmod 700 {}` or choose another directory",
            dir.display(),
            stat.st_mode & 0o7777,
            dir.display()
        )));
    }
    Ok(held)
}
