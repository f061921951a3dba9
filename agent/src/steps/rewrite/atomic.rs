//! The Replicated files' side of a crash-safe replacement: a dated backup
//! beside the file, the directory lock, and the temporary files a killed
//! run left. The write itself is the agent's one crash-safe write
//! ([`crate::sys::atomic`]): temporary file (owner, mode), fsync, rename,
//! directory fsync. A crash at any point leaves the file wholly old or
//! wholly new; temporary files left by a killed run are removed by the next
//! one (it holds the directory lock, so no other run can own them).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use super::RewriteError;
use crate::sys::atomic::{self, AtomicError, Spec, parent};
pub(crate) use crate::sys::clock::utc_stamp;

/// Marker in the names of temporary files.
pub(crate) const TMP_MARK: &str = ".dr-tmp-";
/// Marker in the names of backups.
pub(crate) const BACKUP_MARK: &str = ".dr-backup-";

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RewriteError + 'a {
    move |source| RewriteError::Io { op, path: path.to_path_buf(), source }
}

fn from_atomic(e: AtomicError) -> RewriteError {
    RewriteError::Io { op: e.what, path: e.path, source: e.source }
}

/// An exclusive `flock` on a directory, held while files in it are
/// rewritten: two rewrites never interleave. Released when dropped or when
/// the process dies.
pub(crate) struct DirLock {
    _dir: Flock<File>,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, RewriteError> {
        let f = File::open(dir).map_err(io("open directory", dir))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(DirLock { _dir: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(RewriteError::Busy { dir: dir.to_path_buf() }),
            Err((_, e)) => Err(io("lock directory", dir)(std::io::Error::from(e))),
        }
    }
}

/// Stray temporary files of `file` (left by a killed run).
pub(crate) fn stray_temps(file: &Path) -> Result<Vec<PathBuf>, RewriteError> {
    let dir = parent(file);
    let prefix = format!("{}{TMP_MARK}", name(file));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("list directory", dir))? {
        let entry = entry.map_err(io("list directory", dir))?;
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn name(file: &Path) -> String {
    file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), RewriteError> {
    atomic::fsync_dir(dir).map_err(from_atomic)
}

/// The temporary file of `file` for this process (found by
/// [`stray_temps`] if a run is killed), with the owner and mode of `meta`.
fn spec<'a>(meta: &std::fs::Metadata, tmp: &'a Path) -> Spec<'a> {
    Spec { mode: meta.mode() & 0o7777, owner: Some((meta.uid(), meta.gid())), temp: Some(tmp) }
}

fn temp_of(file: &Path) -> Result<PathBuf, RewriteError> {
    let tmp = parent(file).join(format!("{}{TMP_MARK}{}", name(file), std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => Ok(tmp),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(tmp),
        Err(e) => Err(io("remove stale temporary file", &tmp)(e)),
    }
}

/// Keeps `old` as `<file>.dr-backup-<stamp>` (same owner and mode), never
/// overwriting an existing backup: one with the same name and the same
/// content is reused, otherwise `.1`, `.2`... are tried. The backup appears
/// complete or not at all (written to a temporary file, then linked).
pub(crate) fn backup(file: &Path, old: &[u8], meta: &std::fs::Metadata, now: SystemTime) -> Result<PathBuf, RewriteError> {
    let stamp = utc_stamp(now);
    let base = format!("{}{BACKUP_MARK}{stamp}", name(file));
    let tmp = temp_of(file)?;
    let tmp = atomic::write_temp(file, old, &spec(meta, &tmp)).map_err(from_atomic)?;
    let mut result = None;
    for n in 0..1000 {
        let candidate = parent(file).join(if n == 0 { base.clone() } else { format!("{base}.{n}") });
        match std::fs::hard_link(&tmp, &candidate) {
            Ok(()) => {
                result = Some(candidate);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::read(&candidate).is_ok_and(|b| b == old) {
                    result = Some(candidate);
                    break;
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io("create backup", &candidate)(e));
            }
        }
    }
    std::fs::remove_file(&tmp).map_err(io("remove temporary file", &tmp))?;
    let path = result.ok_or_else(|| RewriteError::Io {
        op: "create backup",
        path: parent(file).join(&base),
        source: std::io::Error::other("1000 backups with this timestamp already exist"),
    })?;
    fsync_dir(parent(file))?;
    Ok(path)
}

/// Replaces `file` by `new` (same owner and mode as `meta`), crash-safely:
/// the agent's one write ([`atomic::write_with`]).
pub(crate) fn replace(file: &Path, new: &[u8], meta: &std::fs::Metadata) -> Result<(), RewriteError> {
    let tmp = temp_of(file)?;
    atomic::write_with(file, new, &spec(meta, &tmp)).map_err(from_atomic)
}

#[cfg(test)]
mod tests {
    use std::fs::Permissions;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn replace_keeps_mode_and_backup_is_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("replicated");
        std::fs::write(&f, b"A=1\n").expect("write");
        std::fs::set_permissions(&f, Permissions::from_mode(0o640)).expect("chmod");
        let meta = std::fs::metadata(&f).expect("meta");
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let b1 = backup(&f, b"A=1\n", &meta, now).expect("backup");
        assert_eq!(b1, dir.path().join("replicated.dr-backup-20231114T221320Z"));
        assert_eq!(std::fs::metadata(&b1).expect("meta").mode() & 0o7777, 0o640);
        // Same second, same content: reused. Different content: a new name.
        assert_eq!(backup(&f, b"A=1\n", &meta, now).expect("backup"), b1);
        let b2 = backup(&f, b"A=2\n", &meta, now).expect("backup");
        assert_eq!(b2, dir.path().join("replicated.dr-backup-20231114T221320Z.1"));
        assert_eq!(std::fs::read(&b1).expect("read"), b"A=1\n");
        replace(&f, b"A=3\n", &meta).expect("replace");
        assert_eq!(std::fs::read(&f).expect("read"), b"A=3\n");
        assert_eq!(std::fs::metadata(&f).expect("meta").mode() & 0o7777, 0o640);
        assert!(stray_temps(&f).expect("list").is_empty());
    }

    #[test]
    fn the_lock_is_exclusive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = DirLock::acquire(dir.path()).expect("lock");
        assert!(matches!(DirLock::acquire(dir.path()), Err(RewriteError::Busy { .. })));
        drop(held);
        DirLock::acquire(dir.path()).expect("lock again");
    }
}
