//! The one crash-safe file write of the agent, for its own records
//! (journal, identity, drain, freeze and fence records) and for the
//! Replicated files the rewrite replaces: a temporary file in the same
//! directory, created new (never through a symlink), written, given its
//! owner and mode, fsynced, renamed over the target, then the directory
//! fsynced. A crash leaves the old file or the new one, never a torn one;
//! a failed write removes its temporary file. (The rewrite adds its dated
//! backups and directory lock on top: `steps::rewrite::atomic`.)

use std::fs::{OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}: {source}", path.display())]
pub(crate) struct AtomicError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> AtomicError + 'a {
    move |source| AtomicError { what, path: p.to_owned(), source }
}

/// How the new file is made.
#[derive(Clone, Debug)]
pub(crate) struct Spec<'a> {
    /// Its mode (set explicitly: not subject to the umask).
    pub mode: u32,
    /// Its owner (uid, gid); None: the writer's.
    pub owner: Option<(u32, u32)>,
    /// The temporary file's path (beside the target); None: a unique
    /// `.<name>.<pid>-<n>.tmp`.
    pub temp: Option<&'a Path>,
}

/// The directory of `path` (`.` for a bare name).
pub(crate) fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `bytes` to a new temporary file beside `path` as `spec` says,
/// fsynced; returns its path. The caller renames or links it (and removes
/// it on failure).
pub(crate) fn write_temp(path: &Path, bytes: &[u8], spec: &Spec<'_>) -> Result<PathBuf, AtomicError> {
    let tmp = match spec.temp {
        Some(t) => t.to_owned(),
        None => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            parent(path).join(format!(".{name}.{}-{n}.tmp", std::process::id()))
        }
    };
    let made = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err("create", &tmp))?;
        f.write_all(bytes).map_err(err("write", &tmp))?;
        // Owner first: chown may clear set-id bits, chmod then sets them.
        if let Some((uid, gid)) = spec.owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(err("chown", &tmp))?;
        }
        f.set_permissions(Permissions::from_mode(spec.mode)).map_err(err("chmod", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))
    })();
    if let Err(e) = made {
        // Not one we created (it existed): leave it.
        if e.what != "create" {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(e);
    }
    Ok(tmp)
}

/// Fsyncs a directory (a rename or link in it is then durable).
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), AtomicError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync", dir))
}

/// Replaces `path` with `bytes` as `spec` says, crash-safely (see the
/// module docs). The directory is created if missing.
pub(crate) fn write_with(path: &Path, bytes: &[u8], spec: &Spec<'_>) -> Result<(), AtomicError> {
    let dir = parent(path);
    std::fs::create_dir_all(dir).map_err(err("create", dir))?;
    let tmp = write_temp(path, bytes, spec)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err("rename into", path)(e));
    }
    fsync_dir(dir)
}

/// Replaces `path` with `bytes` (mode `mode`, the writer's owner).
pub(crate) fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicError> {
    write_with(path, bytes, &Spec { mode, owner: None, temp: None })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_with_its_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/rec.json");
        write(&p, b"one", 0o600).expect("first");
        write(&p, b"two", 0o600).expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(p.parent().expect("dir")).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rec.json")], "no temporary file left");
    }

    #[test]
    fn a_failed_write_names_the_path_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rec.json");
        write(&p, b"old", 0o600).expect("first");
        // A directory where the file should be: the rename fails.
        let target = dir.path().join("adir");
        std::fs::create_dir_all(target.join("x")).expect("mkdir");
        let e = write(&target, b"new", 0o600).expect_err("cannot replace a non-empty directory");
        assert!(e.to_string().contains("adir"), "{e}");
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        let left = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter(|e| e.as_ref().expect("e").file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(left, 0, "the temporary file is removed");
    }
}
