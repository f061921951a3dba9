//! The kernel side of a freeze: FIFREEZE / FITHAW on a mount point, the
//! mount table, and the checks that decide which mounts may be frozen.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::FreezeError;

// linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int)
nix::ioctl_readwrite!(ioctl_fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(ioctl_fithaw, b'X', 120, libc::c_int);

/// Opens a mount point's directory read-only (opening writes nothing).
pub fn open_mount(path: &Path) -> Result<File, FreezeError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| FreezeError::Io { what: format!("cannot open mount point {}", path.display()), source })
}

/// What FIFREEZE said.
#[derive(Debug, PartialEq, Eq)]
pub enum FreezeOutcome {
    Frozen,
    /// EBUSY: the file system is already frozen (by us or by someone else).
    AlreadyFrozen,
}

/// What FITHAW said.
#[derive(Debug, PartialEq, Eq)]
pub enum ThawOutcome {
    Thawed,
    /// EINVAL: the file system was not frozen.
    NotFrozen,
}

pub fn fifreeze(file: &File, path: &Path) -> Result<FreezeOutcome, FreezeError> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE takes an int argument it does not use; `file` is an
    // open directory fd we own, `arg` lives across the call.
    match unsafe { ioctl_fifreeze(file.as_raw_fd(), &mut arg) } {
        Ok(_) => Ok(FreezeOutcome::Frozen),
        Err(nix::errno::Errno::EBUSY) => Ok(FreezeOutcome::AlreadyFrozen),
        Err(e) => Err(FreezeError::Io {
            what: format!("FIFREEZE on {} failed", path.display()),
            source: std::io::Error::from_raw_os_error(e as i32),
        }),
    }
}

pub fn fithaw(file: &File, path: &Path) -> Result<ThawOutcome, FreezeError> {
    let mut arg: libc::c_int = 0;
    // SAFETY: as in `fifreeze`.
    match unsafe { ioctl_fithaw(file.as_raw_fd(), &mut arg) } {
        Ok(_) => Ok(ThawOutcome::Thawed),
        Err(nix::errno::Errno::EINVAL) => Ok(ThawOutcome::NotFrozen),
        Err(e) => Err(FreezeError::Io {
            what: format!("FITHAW on {} failed", path.display()),
            source: std::io::Error::from_raw_os_error(e as i32),
        }),
    }
}

/// Thaws a path directly (no watchdog): opens it and calls FITHAW.
pub fn thaw_path(path: &Path) -> Result<ThawOutcome, FreezeError> {
    let file = open_mount(path)?;
    fithaw(&file, path)
}

/// One line of /proc/self/mountinfo (the fields we use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo text. Mount points are unescaped (`\040`...).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mount_point = fields.get(4)?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fields.get(sep + 1).map(|s| (*s).to_owned()).unwrap_or_default(),
                source: fields.get(sep + 2).map(|s| unescape(s)).unwrap_or_default(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mount_table() -> Result<Vec<MountEntry>, FreezeError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| FreezeError::Io { what: "cannot read /proc/self/mountinfo".to_owned(), source })?;
    Ok(parse_mountinfo(&text))
}

/// A mount that passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedMount {
    /// Canonical path of the mount point.
    pub path: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub dev: u64,
}

/// What the checks need to know about the machine.
pub struct Policy<'a> {
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
pub fn check_mounts(requested: &[PathBuf], policy: &Policy<'_>) -> Result<(Vec<CheckedMount>, Vec<String>), FreezeError> {
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

    const SAMPLE: &str = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
        40 27 7:0 / /mnt/data\\040disk rw,relatime shared:1 - ext4 /dev/loop0 rw\n\
        41 27 0:30 / /proc rw - proc proc rw\n";

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].mount_point, PathBuf::from("/mnt/data disk"));
        assert_eq!(t[1].fs_type, "ext4");
        assert_eq!(t[1].source, "/dev/loop0");
        assert_eq!(t[0].mount_point, PathBuf::from("/"));
    }

    #[test]
    fn refuses_root_empty_relative_and_non_mount_points() {
        let table = mount_table().expect("mountinfo");
        let state = tempfile::tempdir().expect("tmp");
        let policy = Policy { allow_root: false, allow_journal_fs: true, state_dir: state.path(), table: &table };
        let err = check_mounts(&[PathBuf::from("/")], &policy).expect_err("root refused");
        assert!(matches!(err, FreezeError::RootRefused { .. }), "{err}");
        assert_eq!(err.kind(), crate::steps::ErrorKind::Refused);
        let err = check_mounts(&[], &policy).expect_err("nothing to freeze");
        assert_eq!(err.kind(), crate::steps::ErrorKind::Invalid);
        let err = check_mounts(&[PathBuf::from("relative")], &policy).expect_err("relative");
        assert_eq!(err.kind(), crate::steps::ErrorKind::Invalid);
        // /proc is a mount point but shares no device with / ; a plain
        // directory of the root fs is refused as root (same device) first.
        let err = check_mounts(&[state.path().to_path_buf()], &policy).expect_err("plain dir");
        assert_eq!(err.kind(), crate::steps::ErrorKind::Refused, "{err}");
        let policy = Policy { allow_root: true, allow_journal_fs: true, state_dir: state.path(), table: &table };
        let err = check_mounts(&[state.path().to_path_buf()], &policy).expect_err("plain dir");
        assert!(matches!(err, FreezeError::NotAMountPoint { .. }), "{err}");
    }
}
