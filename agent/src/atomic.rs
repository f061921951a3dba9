//! The one crash-safe write of the agent's own records (journal, identity,
//! drain and freeze records): a temporary file in the same directory (a
//! unique `.<name>.<pid>-<n>.tmp`, created new with `mode`), written and
//! fsynced, renamed over the target, then the directory fsynced. A crash
//! leaves the old file or the new one, never a torn one; a failed write
//! removes its temporary file. The Replicated files have their own writer
//! (`rewrite::atomic`): it also keeps their owner, mode and a dated backup.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}: {source}", path.display())]
pub struct AtomicError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Replaces `path` with `bytes`, crash-safely (see the module docs).
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicError> {
    fn err<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> AtomicError + 'a {
        move |source| AtomicError { what, path: p.to_owned(), source }
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err("create", dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err("create", &tmp))?;
        f.write_all(bytes).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err("rename into", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync", dir))
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
