//! Crash-safe replacement of a file: a dated backup beside it, then a
//! temporary file in the same directory (fsync, owner, mode), renamed over
//! the original, then the directory fsynced. A crash at any point leaves the
//! file wholly old or wholly new; temporary files left by a killed run are
//! removed by the next one (it holds the directory lock, so no other run
//! can own them).

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::RewriteError;

/// Marker in the names of temporary files.
pub const TMP_MARK: &str = ".dr-tmp-";
/// Marker in the names of backups.
pub const BACKUP_MARK: &str = ".dr-backup-";

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RewriteError + 'a {
    move |source| RewriteError::Io { op, path: path.to_path_buf(), source }
}

/// An exclusive `flock` on a directory, held while files in it are
/// rewritten: two rewrites never interleave. Released when dropped or when
/// the process dies.
pub struct DirLock {
    _dir: File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, RewriteError> {
        let f = File::open(dir).map_err(io("open directory", dir))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(RewriteError::Busy { dir: dir.to_path_buf() });
            }
            return Err(io("lock directory", dir)(e));
        }
        Ok(DirLock { _dir: f })
    }
}

/// Stray temporary files of `file` (left by a killed run).
pub fn stray_temps(file: &Path) -> Result<Vec<PathBuf>, RewriteError> {
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

fn parent(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn name(file: &Path) -> String {
    file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn fsync_dir(dir: &Path) -> Result<(), RewriteError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))
}

/// Writes `bytes` to a fresh temporary file beside `file` with the given
/// owner and mode, fsynced. The caller renames or links it.
fn write_temp(file: &Path, bytes: &[u8], uid: u32, gid: u32, mode: u32) -> Result<PathBuf, RewriteError> {
    let tmp = parent(file).join(format!("{}{TMP_MARK}{}", name(file), std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove stale temporary file", &tmp)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("create temporary file", &tmp))?;
    f.write_all(bytes).map_err(io("write temporary file", &tmp))?;
    // Owner first: chown may clear set-id bits, chmod then sets them.
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io("chown temporary file", &tmp))?;
    f.set_permissions(Permissions::from_mode(mode)).map_err(io("chmod temporary file", &tmp))?;
    f.sync_all().map_err(io("fsync temporary file", &tmp))?;
    Ok(tmp)
}

/// Keeps `old` as `<file>.dr-backup-<stamp>` (same owner and mode), never
/// overwriting an existing backup: one with the same name and the same
/// content is reused, otherwise `.1`, `.2`... are tried. The backup appears
/// complete or not at all (written to a temporary file, then linked).
pub fn backup(file: &Path, old: &[u8], meta: &std::fs::Metadata, now: SystemTime) -> Result<PathBuf, RewriteError> {
    let stamp = utc_stamp(now);
    let base = format!("{}{BACKUP_MARK}{stamp}", name(file));
    let mode = meta.mode() & 0o7777;
    let tmp = write_temp(file, old, meta.uid(), meta.gid(), mode)?;
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

/// Replaces `file` by `new` (same owner and mode as `meta`), crash-safely.
pub fn replace(file: &Path, new: &[u8], meta: &std::fs::Metadata) -> Result<(), RewriteError> {
    let tmp = write_temp(file, new, meta.uid(), meta.gid(), meta.mode() & 0o7777)?;
    if let Err(e) = std::fs::rename(&tmp, file) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("rename temporary file over", file)(e));
    }
    fsync_dir(parent(file))
}

pub use crate::clock::utc_stamp;

#[cfg(test)]
mod tests {
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
