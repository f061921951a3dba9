//! The kernel side of a freeze: FIFREEZE / FITHAW on a mount point, the
//! mount table, and the checks that decide which mounts may be frozen.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::FreezeError;
pub(crate) use crate::sys::mounts::MountEntry;
use crate::sys::{fsfreeze, mounts};

/// Opens a mount point's directory read-only (opening writes nothing).
pub(crate) fn open_mount(path: &Path) -> Result<File, FreezeError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| FreezeError::Io { what: format!("cannot open mount point {}", path.display()), source })
}

/// What FIFREEZE said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FreezeOutcome {
    Frozen,
    /// EBUSY: the file system is already frozen (by us or by someone else).
    AlreadyFrozen,
}

/// What FITHAW said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ThawOutcome {
    Thawed,
    /// EINVAL: the file system was not frozen.
    NotFrozen,
}

pub(crate) fn fifreeze(file: &File, path: &Path) -> Result<FreezeOutcome, FreezeError> {
    match fsfreeze::freeze(file) {
        Ok(_) => Ok(FreezeOutcome::Frozen),
        Err(nix::errno::Errno::EBUSY) => Ok(FreezeOutcome::AlreadyFrozen),
        Err(e) => Err(FreezeError::Io {
            what: format!("FIFREEZE on {} failed", path.display()),
            source: std::io::Error::from_raw_os_error(e as i32),
        }),
    }
}

pub(crate) fn fithaw(file: &File, path: &Path) -> Result<ThawOutcome, FreezeError> {
    match fsfreeze::thaw(file) {
        Ok(_) => Ok(ThawOutcome::Thawed),
        Err(nix::errno::Errno::EINVAL) => Ok(ThawOutcome::NotFrozen),
        Err(e) => Err(FreezeError::Io {
            what: format!("FITHAW on {} failed", path.display()),
            source: std::io::Error::from_raw_os_error(e as i32),
        }),
    }
}

/// Thaws a path directly (no watchdog): opens it and calls FITHAW.
pub(crate) fn thaw_path(path: &Path) -> Result<ThawOutcome, FreezeError> {
    let file = open_mount(path)?;
    fithaw(&file, path)
}

pub(crate) fn mount_table() -> Result<Vec<MountEntry>, FreezeError> {
    mounts::mount_table().map_err(|source| FreezeError::Io { what: format!("cannot read {}", mounts::MOUNTINFO), source })
}

/// A mount that passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckedMount {
    /// Canonical path of the mount point.
    pub path: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub dev: u64,
}

/// What the checks need to know about the machine.
pub(crate) struct Policy<'a> {
    pub allow_root: bool,
    pub allow_journal_fs: bool,
    pub state_dir: &'a Path,
    pub table: &'a [MountEntry],
}

/// The device of `path`, or of its nearest existing ancestor.
fn dev_of_nearest(path: &Path) -> Result<(PathBuf, u64), FreezeError> {
    let mut p = path.to_path_buf();
    loop {
        match std::fs::metadata(&p) {
            Ok(m) => return Ok((p, m.dev())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                Some(parent) => p = parent.to_path_buf(),
                None => return Err(FreezeError::Io { what: format!("cannot stat {}", path.display()), source: e }),
            },
            Err(source) => return Err(FreezeError::Io { what: format!("cannot stat {}", p.display()), source }),
        }
    }
}

/// Checks the requested mounts: each must be an absolute path that is a
/// mount point; `/` (or a mount of the root file system) only with
/// `allow_root`; the file system holding `state_dir` only with
/// `allow_journal_fs`. Two paths on one file system are frozen once.
/// Returns the mounts to freeze and warnings.
pub(crate) fn check_mounts(requested: &[PathBuf], policy: &Policy<'_>) -> Result<(Vec<CheckedMount>, Vec<String>), FreezeError> {
    if requested.is_empty() {
        return Err(FreezeError::Input("no mount to freeze: give --mount PATH or set freeze.mounts".to_owned()));
    }
    let root_dev = std::fs::metadata("/").map_err(|source| FreezeError::Io { what: "cannot stat /".to_owned(), source })?.dev();
    let (journal_at, journal_dev) = dev_of_nearest(policy.state_dir)?;
    let mut out: Vec<CheckedMount> = Vec::new();
    let mut warnings = Vec::new();
    for path in requested {
        if !path.is_absolute() {
            return Err(FreezeError::Input(format!("mount `{}` is not an absolute path", path.display())));
        }
        let canonical = std::fs::canonicalize(path)
            .map_err(|source| FreezeError::Io { what: format!("cannot resolve mount {}", path.display()), source })?;
        if &canonical != path {
            warnings.push(format!("{} resolves to {}", path.display(), canonical.display()));
        }
        let meta = std::fs::metadata(&canonical)
            .map_err(|source| FreezeError::Io { what: format!("cannot stat {}", canonical.display()), source })?;
        if canonical == Path::new("/") || meta.dev() == root_dev {
            if !policy.allow_root {
                return Err(FreezeError::RootRefused { path: path.clone() });
            }
            warnings.push(format!("{} is the root file system (freeze.allow_root is set)", path.display()));
        }
        if meta.dev() == journal_dev {
            if !policy.allow_journal_fs {
                return Err(FreezeError::JournalFsRefused {
                    path: path.clone(),
                    state_dir: policy.state_dir.to_owned(),
                    at: journal_at.clone(),
                });
            }
            warnings.push(format!(
                "{} holds the agent's journal ({}) (freeze.allow_journal_fs is set)",
                path.display(),
                policy.state_dir.display()
            ));
        }
        // The last entry for a mount point is the one on top.
        let entry = policy.table.iter().rev().find(|e| e.mount_point == canonical);
        let Some(entry) = entry else {
            return Err(FreezeError::NotAMountPoint { path: path.clone() });
        };
        if let Some(prev) = out.iter().find(|m| m.dev == meta.dev()) {
            warnings.push(format!("{} is the same file system as {}: frozen once", path.display(), prev.path.display()));
            continue;
        }
        out.push(CheckedMount { path: canonical, fs_type: entry.fs_type.clone(), source: entry.source.clone(), dev: meta.dev() });
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_root_empty_relative_and_non_mount_points() {
        let table = mount_table().expect("mountinfo");
        let state = tempfile::tempdir().expect("tmp");
        let policy = Policy { allow_root: false, allow_journal_fs: true, state_dir: state.path(), table: &table };
        let err = check_mounts(&[PathBuf::from("/")], &policy).expect_err("root refused");
        assert!(matches!(err, FreezeError::RootRefused { .. }), "{err}");
        assert_eq!(err.kind(), crate::steps::error::ErrorKind::Refused);
        let err = check_mounts(&[], &policy).expect_err("nothing to freeze");
        assert_eq!(err.kind(), crate::steps::error::ErrorKind::Invalid);
        let err = check_mounts(&[PathBuf::from("relative")], &policy).expect_err("relative");
        assert_eq!(err.kind(), crate::steps::error::ErrorKind::Invalid);
        // /proc is a mount point but shares no device with / ; a plain
        // directory of the root fs is refused as root (same device) first.
        let err = check_mounts(&[state.path().to_path_buf()], &policy).expect_err("plain dir");
        assert_eq!(err.kind(), crate::steps::error::ErrorKind::Refused, "{err}");
        let policy = Policy { allow_root: true, allow_journal_fs: true, state_dir: state.path(), table: &table };
        let err = check_mounts(&[state.path().to_path_buf()], &policy).expect_err("plain dir");
        assert!(matches!(err, FreezeError::NotAMountPoint { .. }), "{err}");
    }
}
