//! Wiping the Nomad server's data dir after a restore.
//!
//! Safety: refused unless the app is stopped (replicatedctl: State
//! `stopped`, not transitioning) and no Nomad process runs; refused for `/`,
//! for a path outside `root`, for a data dir that is a symlink, and when a
//! symlink anywhere in the path leads elsewhere. The directory is renamed
//! aside in the same parent (`.<name>-wipe-<UTC stamp>`: one rename, whatever
//! the number of files), an empty one with the same owner and mode takes its
//! place, then the renamed tree is deleted without following symlinks
//! (`std::fs::remove_dir_all` uses openat/unlinkat with O_NOFOLLOW). A tree
//! left aside by an interrupted run is deleted by the next run.

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

pub use dr_proto::contract::{TreeCount, WipeParams, WipeReport};

use crate::config::Config;
use crate::steps::error::ErrorKind;
use crate::sys::replicated::{ReplicatedError, Replicatedctl};

/// At most this many entries are listed in a report.
const MAX_LISTED: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error(
        "refusing to wipe {path}: the app is not stopped (State `{state}`, IsTransitioning {transitioning}); run `dr-agent app-stop` first"
    )]
    AppRunning { path: PathBuf, state: String, transitioning: bool },
    #[error("refusing to wipe {path}: Nomad is running ({processes})")]
    NomadRunning { path: PathBuf, processes: String },
    #[error("refusing to wipe {path}: {why}")]
    UnsafePath { path: PathBuf, why: String },
    #[error("refusing to wipe {path}: mount points below it ({}) belong to other file systems; unmount them first, or set `[nomad] unmount_below = true` to let the wipe unmount them", list_paths(.mounts))]
    MountsBelow { path: PathBuf, mounts: Vec<PathBuf> },
    #[error("nomad.data_dir `{0}`: must be an absolute path without `..`")]
    BadDataDir(PathBuf),
    #[error("cannot check the app state before wiping: {0}")]
    Replicated(#[from] ReplicatedError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

fn list_paths(p: &[PathBuf]) -> String {
    p.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl WipeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            WipeError::AppRunning { .. }
            | WipeError::NomadRunning { .. }
            | WipeError::UnsafePath { .. }
            | WipeError::MountsBelow { .. } => ErrorKind::Refused,
            WipeError::BadDataDir(_) => ErrorKind::Invalid,
            WipeError::Replicated(_) | WipeError::Io { .. } => ErrorKind::Failed,
        }
    }
}

/// Timings and counts of the move-aside-then-delete mechanics.
#[derive(Clone, Debug, PartialEq)]
pub struct WipeOutcome {
    pub moved_to: PathBuf,
    pub removed: TreeCount,
    pub rename: Duration,
    pub delete: Duration,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WipeError + 'a {
    move |source| WipeError::Io { what, path: path.to_owned(), source }
}

pub(crate) use crate::sys::clock::utc_stamp;

/// The data dir on this machine: `root` joined with `data_dir`, refusing
/// `..` and the root itself.
pub fn data_dir_path(root: &Path, data_dir: &Path) -> Result<PathBuf, WipeError> {
    if !data_dir.is_absolute() || data_dir.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(WipeError::BadDataDir(data_dir.to_owned()));
    }
    let rel: PathBuf = data_dir.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    if rel.as_os_str().is_empty() {
        return Err(WipeError::UnsafePath { path: data_dir.to_owned(), why: "it is `/`".to_owned() });
    }
    Ok(root.join(rel))
}

/// Checks the path: not a symlink itself, no symlink above it leading
/// elsewhere, under the canonical root, not `/`. Returns the metadata of
/// the dir, or None when it is absent.
fn check_path(root: &Path, path: &Path) -> Result<Option<std::fs::Metadata>, WipeError> {
    let unsafe_path = |why: String| WipeError::UnsafePath { path: path.to_owned(), why };
    let canonical_root = std::fs::canonicalize(root).map_err(io("cannot resolve root", root))?;
    let rel = path.strip_prefix(root).map_err(|_| unsafe_path(format!("it is not under root {}", root.display())))?;
    let expected = canonical_root.join(rel);
    if expected == Path::new("/") || expected == canonical_root {
        return Err(unsafe_path("it is the root itself".to_owned()));
    }
    let parent = path.parent().ok_or_else(|| unsafe_path("it has no parent".to_owned()))?;
    match std::fs::canonicalize(parent) {
        Ok(p) if Some(p.as_path()) == expected.parent() => {}
        Ok(p) => {
            return Err(unsafe_path(format!(
                "a symlink in its path leads elsewhere: {} resolves to {}, not {}",
                parent.display(),
                p.display(),
                expected.parent().map(|e| e.display().to_string()).unwrap_or_default()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("cannot resolve", parent)(e)),
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            Err(unsafe_path(format!("it is a symlink (to {target}); not following it")))
        }
        Ok(m) if !m.is_dir() => Err(unsafe_path("it is not a directory".to_owned())),
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot stat", path)(e)),
    }
}

/// What a walk found: counts, and the mount points it met and left alone.
#[derive(Clone, Debug, Default)]
struct Walk {
    count: TreeCount,
    /// Directories on another file system (device id differs) or listed as
    /// mount points: never entered, never deleted.
    crossings: Vec<PathBuf>,
}

fn nix_io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::errno::Errno) -> WipeError + 'a {
    move |e| WipeError::Io { what, path: path.to_owned(), source: std::io::Error::from_raw_os_error(e as i32) }
}

/// Opens a directory without following a symlink at its last component.
fn open_dir_at<Fd: std::os::fd::AsFd>(at: Fd, name: &std::ffi::CStr, path: &Path) -> Result<nix::dir::Dir, WipeError> {
    use nix::fcntl::OFlag;
    nix::dir::Dir::openat(
        at,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(nix_io("cannot open", path))
}

fn open_dir(path: &Path) -> Result<nix::dir::Dir, WipeError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| WipeError::UnsafePath { path: path.to_owned(), why: "it contains a NUL byte".to_owned() })?;
    open_dir_at(nix::fcntl::AT_FDCWD, &c, path)
}

/// Walks (and with `delete`, empties) the directory open as `dir` at
/// `path`, never following a symlink and never entering a directory whose
/// device id differs from `dev` or that `mounts` lists: those are recorded
/// in `out.crossings` and left in place (with their parents). Entries of the
/// top level named in `keep` are left alone.
fn walk(
    dir: &mut nix::dir::Dir,
    path: &Path,
    dev: u64,
    mounts: &HashSet<PathBuf>,
    delete: bool,
    keep: &[&str],
    out: &mut Walk,
) -> Result<(), WipeError> {
    use nix::sys::stat::{FileStat, SFlag, fstat, fstatat};
    use nix::unistd::{UnlinkatFlags, unlinkat};
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    for e in dir.iter() {
        let e = e.map_err(nix_io("cannot list", path))?;
        let name = e.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        if keep.iter().any(|k| k.as_bytes() == name.to_bytes()) {
            continue;
        }
        names.push(name.to_owned());
    }
    let is_dir = |st: &FileStat| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
    for name in names {
        let child = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let st = match fstatat(&*dir, name.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(nix_io("cannot stat", &child)(e)),
        };
        if is_dir(&st) {
            if st.st_dev != dev || mounts.contains(&child) {
                out.crossings.push(child);
                continue;
            }
            let mut sub = match open_dir_at(&*dir, name.as_c_str(), &child) {
                Ok(d) => d,
                Err(WipeError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Between the stat and the open a mount could appear: check the open dir.
            if fstat(&sub).map_err(nix_io("cannot stat", &child))?.st_dev != dev {
                out.crossings.push(child);
                continue;
            }
            out.count.dirs += 1;
            let before = out.crossings.len();
            walk(&mut sub, &child, dev, mounts, delete, &[], out)?;
            drop(sub);
            if delete && out.crossings.len() == before {
                match unlinkat(&*dir, name.as_c_str(), UnlinkatFlags::RemoveDir) {
                    Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                    Err(e) => return Err(nix_io("cannot delete", &child)(e)),
                }
            }
        } else {
            out.count.files += 1;
            out.count.bytes += st.st_size.max(0) as u64;
            if delete {
                match unlinkat(&*dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                    Err(e) => return Err(nix_io("cannot delete", &child)(e)),
                }
            }
        }
    }
    Ok(())
}

/// Walks the tree at `top` (not following symlinks, not crossing into
/// another file system); with `delete` it empties it.
fn walk_tree(top: &Path, mounts: &HashSet<PathBuf>, delete: bool, keep: &[&str]) -> Result<Walk, WipeError> {
    let mut dir = open_dir(top)?;
    let dev = nix::sys::stat::fstat(&dir).map_err(nix_io("cannot stat", top))?.st_dev;
    let mut out = Walk::default();
    walk(&mut dir, top, dev, mounts, delete, keep, &mut out)?;
    Ok(out)
}

/// Counts a tree without following symlinks and without crossing into
/// another file system (the top dir itself not counted).
pub fn count_tree(dir: &Path) -> Result<TreeCount, WipeError> {
    Ok(walk_tree(dir, &mount_points().unwrap_or_default(), false, &[])?.count)
}

/// Leftovers of an interrupted wipe: `.<name>-wipe-*` directories (not
/// symlinks) beside the data dir.
fn leftovers(path: &Path) -> Result<Vec<PathBuf>, WipeError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return Ok(Vec::new()) };
    let prefix = format!(".{}-wipe-", name.to_string_lossy());
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("cannot list", parent)(e)),
    };
    for e in entries {
        let e = e.map_err(io("cannot list", parent))?;
        if e.file_name().to_string_lossy().starts_with(&prefix) && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Every mount point of this mount namespace (/proc/self/mountinfo).
fn mount_points() -> Result<HashSet<PathBuf>, WipeError> {
    let table = crate::sys::mounts::mount_table().map_err(io("cannot read", Path::new(crate::sys::mounts::MOUNTINFO)))?;
    Ok(table.into_iter().map(|m| m.mount_point).collect())
}

/// The mount points strictly below `dir`, deepest first.
fn mounts_below(mounts: &HashSet<PathBuf>, dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mounts.iter().filter(|m| m.starts_with(dir) && m.as_path() != dir).cloned().collect();
    out.sort_by(|a, b| b.components().count().cmp(&a.components().count()).then(a.cmp(b)));
    out
}

/// Whether `dir` is a mount point: listed in mountinfo, or on another
/// device than its parent.
fn is_mount_point(mounts: &HashSet<PathBuf>, dir: &Path) -> Result<bool, WipeError> {
    if mounts.contains(dir) {
        return Ok(true);
    }
    let Some(parent) = dir.parent() else { return Ok(true) };
    let d = std::fs::symlink_metadata(dir).map_err(io("cannot stat", dir))?;
    let p = std::fs::symlink_metadata(parent).map_err(io("cannot stat", parent))?;
    Ok(d.dev() != p.dev())
}

/// Unmounts `mounts` (deepest first; no lazy unmount: a busy mount fails).
fn unmount(mounts: &[PathBuf]) -> Result<(), WipeError> {
    for m in mounts {
        nix::mount::umount2(m.as_path(), nix::mount::MntFlags::UMOUNT_NOFOLLOW).map_err(nix_io("cannot unmount", m))?;
        tracing::info!(mount = %m.display(), "unmounted a mount below the Nomad data dir");
    }
    Ok(())
}

/// Deletes a tree without following symlinks or crossing mounts, counting
/// what it removes. Refuses (leaving them) if it meets mount points.
fn delete_tree(dir: &Path, mounts: &HashSet<PathBuf>) -> Result<TreeCount, WipeError> {
    let w = walk_tree(dir, mounts, true, &[])?;
    if !w.crossings.is_empty() {
        return Err(WipeError::MountsBelow { path: dir.to_owned(), mounts: w.crossings });
    }
    std::fs::remove_dir(dir).map_err(io("cannot delete", dir))?;
    Ok(w.count)
}

/// `dir/<prefix><UTC stamp>`, with `-1`, `-2`... added until nothing has that name.
fn unused_stamped(dir: &Path, prefix: &str) -> PathBuf {
    let stamp = utc_stamp(SystemTime::now());
    let mut p = dir.join(format!("{prefix}{stamp}"));
    let mut n = 1;
    while std::fs::symlink_metadata(&p).is_ok() {
        p = dir.join(format!("{prefix}{stamp}-{n}"));
        n += 1;
    }
    p
}

/// The mechanics: renames `path` to `.<name>-wipe-<stamp>` in the same
/// parent, recreates `path` empty with the owner and mode of `meta`, then
/// deletes the renamed tree (never crossing into a mount). No safety
/// checks: callers check first.
pub fn move_aside_and_delete(path: &Path, meta: &std::fs::Metadata) -> Result<WipeOutcome, WipeError> {
    let parent = path.parent().ok_or_else(|| WipeError::UnsafePath { path: path.to_owned(), why: "no parent".to_owned() })?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = unused_stamped(parent, &format!(".{name}-wipe-"));
    let t0 = Instant::now();
    std::fs::rename(path, &aside).map_err(io("cannot move aside", path))?;
    recreate(path, meta.uid(), meta.gid(), meta.mode())?;
    let rename = t0.elapsed();
    let t1 = Instant::now();
    let removed = delete_tree(&aside, &mount_points()?)?;
    Ok(WipeOutcome { moved_to: aside, removed, rename, delete: t1.elapsed() })
}

/// Prefix of the trash directory an in-place wipe creates inside the data dir.
const IN_PLACE_TRASH: &str = ".dr-agent-wipe-";
/// Kept at the top of a data dir that is a file system's root (e2fsck's).
const KEEP_AT_MOUNT_ROOT: &[&str] = &["lost+found"];

/// The data dir is itself a mount point: it cannot be renamed. Its entries
/// (but `lost+found`) are renamed into `<path>/.dr-agent-wipe-<stamp>` (same
/// file system: one rename per top-level entry), then that trash dir is
/// deleted without leaving the file system. An interrupted run leaves the
/// trash dir, which the next run deletes like any other entry.
pub fn empty_in_place(path: &Path) -> Result<WipeOutcome, WipeError> {
    let trash = unused_stamped(path, IN_PLACE_TRASH);
    let t0 = Instant::now();
    let dev = std::fs::symlink_metadata(path).map_err(io("cannot stat", path))?.dev();
    std::fs::DirBuilder::new().mode(0o700).create(&trash).map_err(io("cannot create", &trash))?;
    let mounts = mount_points()?;
    let mut crossings = Vec::new();
    for e in std::fs::read_dir(path).map_err(io("cannot list", path))? {
        let e = e.map_err(io("cannot list", path))?;
        let p = e.path();
        let name = e.file_name();
        if p == trash || KEEP_AT_MOUNT_ROOT.iter().any(|k| name == *k) {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).map_err(io("cannot stat", &p))?;
        if m.is_dir() && (m.dev() != dev || mounts.contains(&p)) {
            crossings.push(p);
            continue;
        }
        std::fs::rename(&p, trash.join(&name)).map_err(io("cannot move into the trash dir", &p))?;
    }
    let rename = t0.elapsed();
    if !crossings.is_empty() {
        return Err(WipeError::MountsBelow { path: path.to_owned(), mounts: crossings });
    }
    let t1 = Instant::now();
    let removed = delete_tree(&trash, &mounts)?;
    Ok(WipeOutcome { moved_to: trash, removed, rename, delete: t1.elapsed() })
}

fn recreate(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), WipeError> {
    std::fs::DirBuilder::new().mode(0o700).create(path).map_err(io("cannot recreate", path))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("cannot set the owner of", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io("cannot set the mode of", path))
}

/// The processes whose executable name is `nomad` (comm or argv[0]), but not us.
pub fn nomad_processes() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        let exe_name = Path::new(argv0.as_ref()).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if comm.trim() == "nomad" || exe_name == "nomad" {
            let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            out.push(format!("pid {pid}: {}", args.trim()));
        }
    }
    out
}

fn list_entries(path: &Path, out: &mut Vec<String>) {
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut names: Vec<String> = entries.flatten().map(|e| e.path().display().to_string()).collect();
        names.sort();
        let total = names.len();
        for n in names.into_iter().take(MAX_LISTED.saturating_sub(out.len())) {
            out.push(n);
        }
        if out.len() >= MAX_LISTED && total > 0 {
            out.push(format!("... ({total} entries in {})", path.display()));
        }
    }
}

/// The data dir with its parent resolved (check_path made sure no symlink
/// leads elsewhere), as /proc/self/mountinfo names it.
fn canonical(path: &Path) -> PathBuf {
    match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(parent)), Some(name)) => parent.join(name),
        _ => path.to_owned(),
    }
}

/// Whether the data dir holds nothing to wipe (`lost+found` of a file
/// system's root does not count).
fn is_empty(path: &Path, in_place: bool) -> Result<bool, WipeError> {
    for e in std::fs::read_dir(path).map_err(io("cannot list", path))? {
        let e = e.map_err(io("cannot list", path))?;
        if !(in_place && KEEP_AT_MOUNT_ROOT.iter().any(|k| e.file_name() == *k)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Wipes the Nomad data dir (see the module docs for the rules).
pub async fn run(config: &Config, params: &WipeParams, dry_run: bool) -> Result<WipeReport, WipeError> {
    let given = data_dir_path(&config.root, &config.nomad.data_dir)?;
    // Path rules first: they need nothing running.
    let meta = check_path(&config.root, &given)?;
    let path = canonical(&given);
    let mut mounts = mount_points()?;
    let in_place = meta.is_some() && is_mount_point(&mounts, &path)?;
    let found_leftovers = leftovers(&path)?;
    let mut below = mounts_below(&mounts, &path);
    for l in &found_leftovers {
        below.extend(mounts_below(&mounts, l));
    }
    let mut report = WipeReport {
        path: given.clone(),
        state: String::new(),
        dry_run,
        in_place,
        removed: TreeCount::default(),
        moved_to: None,
        rename_ms: 0.0,
        delete_ms: 0.0,
        owner: meta.as_ref().map(|m| format!("{}:{}", m.uid(), m.gid())),
        mode: meta.as_ref().map(|m| format!("{:04o}", m.mode() & 0o7777)),
        entries: Vec::new(),
        mounts_below: below.clone(),
        actions: Vec::new(),
        warnings: Vec::new(),
        blocked_by: Vec::new(),
    };
    let empty = match &meta {
        None => true,
        Some(_) => is_empty(&path, in_place)?,
    };
    if empty && found_leftovers.is_empty() {
        report.state = "already done".to_owned();
        if meta.is_none() {
            report.warnings.push(format!("{} does not exist", path.display()));
        }
        return Ok(report);
    }
    let unmount_below = config.nomad.unmount_below;
    if !below.is_empty() {
        if unmount_below {
            report.actions.extend(below.iter().map(|m| format!("unmount {} (nomad.unmount_below = true)", m.display())));
        } else {
            let e = WipeError::MountsBelow { path: path.clone(), mounts: below.clone() };
            if !dry_run {
                return Err(e);
            }
            report.blocked_by.push(e.to_string());
        }
    }
    if in_place {
        report
            .warnings
            .push(format!("{} is a mount point: emptying it in place (keeping lost+found), staying on its file system", path.display()));
    }
    // Then the app and Nomad must be stopped. A dry run reports what would
    // refuse now (so that a plan can show the wipe after an app stop).
    let ctl = Replicatedctl::new(config.replicated.replicatedctl.clone(), config.replicated.command_timeout);
    let offline = params.offline;
    if offline {
        report.warnings.push("offline (a mounted disk): the app and Nomad process checks were skipped".into());
    }
    let preconditions = async {
        if offline {
            return Ok(());
        }
        let status = ctl.app_status().await?;
        if status.state != "stopped" || status.is_transitioning {
            return Err(WipeError::AppRunning { path: given.clone(), state: status.state, transitioning: status.is_transitioning });
        }
        let running = nomad_processes();
        if !running.is_empty() {
            return Err(WipeError::NomadRunning { path: given.clone(), processes: running.join("; ") });
        }
        Ok(())
    };
    match (preconditions.await, dry_run) {
        (Ok(()), _) => {}
        (Err(e), false) => return Err(e),
        (Err(e), true) => report.blocked_by.push(e.to_string()),
    }
    if dry_run {
        report.state = "would wipe".to_owned();
        let p = path.clone();
        let lo = found_leftovers.clone();
        let m = mounts.clone();
        let (count, entries) = tokio::task::spawn_blocking(move || -> Result<_, WipeError> {
            let keep: &[&str] = if in_place { KEEP_AT_MOUNT_ROOT } else { &[] };
            // What lies below a mount point is not ours: not counted.
            let mut count = if empty { TreeCount::default() } else { walk_tree(&p, &m, false, keep)?.count };
            let mut entries = Vec::new();
            list_entries(&p, &mut entries);
            for l in &lo {
                count.add(walk_tree(l, &m, false, &[])?.count);
                count.dirs += 1;
                entries.push(format!("{} (left by an interrupted wipe)", l.display()));
            }
            Ok((count, entries))
        })
        .await
        .expect("the counting task does not panic")?;
        report.removed = count;
        report.entries = entries;
        if !empty && in_place {
            report.actions.push(format!(
                "move the entries of {} (but lost+found) into {}/{IN_PLACE_TRASH}<UTC time> and delete that, staying on its file system",
                path.display(),
                path.display()
            ));
        } else if !empty {
            report.actions.push(format!(
                "move {} aside to {}/.{}-wipe-<UTC time>, recreate it empty (owner {}, mode {}), delete the moved tree",
                path.display(),
                path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                report.owner.clone().unwrap_or_default(),
                report.mode.clone().unwrap_or_default()
            ));
        }
        for l in &found_leftovers {
            report.actions.push(format!("delete {} left by an interrupted wipe", l.display()));
        }
        return Ok(report);
    }
    if !below.is_empty() {
        // unmount_below is set (else refused above). Stacked mounts need
        // more than one pass; a mount that comes back is refused.
        for _ in 0..8 {
            let now = mounts_below(&mounts, &path)
                .into_iter()
                .chain(found_leftovers.iter().flat_map(|l| mounts_below(&mounts, l)))
                .collect::<Vec<_>>();
            if now.is_empty() {
                break;
            }
            unmount(&now)?;
            mounts = mount_points()?;
        }
        let left: Vec<PathBuf> =
            mounts_below(&mounts, &path).into_iter().chain(found_leftovers.iter().flat_map(|l| mounts_below(&mounts, l))).collect();
        if !left.is_empty() {
            return Err(WipeError::MountsBelow { path: path.clone(), mounts: left });
        }
    }
    let p = path.clone();
    let lo = found_leftovers.clone();
    let (outcome, leftover_count, entries, recreated) = tokio::task::spawn_blocking(move || -> Result<_, WipeError> {
        let mut entries = Vec::new();
        list_entries(&p, &mut entries);
        let outcome = match &meta {
            Some(_) if !empty && in_place => Some(empty_in_place(&p)?),
            Some(m) if !empty => Some(move_aside_and_delete(&p, m)?),
            _ => None,
        };
        let mut recreated = false;
        let mut count = TreeCount::default();
        for l in &lo {
            entries.push(format!("{} (left by an interrupted wipe)", l.display()));
            // Interrupted between the rename and the mkdir: put the empty dir back.
            if meta.is_none() && !recreated {
                let m = std::fs::symlink_metadata(l).map_err(io("cannot stat", l))?;
                recreate(&p, m.uid(), m.gid(), m.mode())?;
                recreated = true;
            }
            count.add(delete_tree(l, &mounts)?);
            count.dirs += 1;
        }
        Ok((outcome, count, entries, recreated))
    })
    .await
    .expect("the wipe task does not panic")?;
    if !below.is_empty() {
        report.warnings.push(format!("unmounted {} mount(s) below the data dir (nomad.unmount_below = true)", below.len()));
    }
    report.state = "wiped".to_owned();
    report.entries = entries;
    report.removed = leftover_count;
    if let Some(o) = outcome {
        report.removed.add(o.removed);
        report.rename_ms = o.rename.as_secs_f64() * 1000.0;
        report.delete_ms = o.delete.as_secs_f64() * 1000.0;
        report.moved_to = Some(o.moved_to);
    }
    if recreated {
        report.warnings.push(format!("{} was missing after an interrupted wipe: recreated it empty", path.display()));
    }
    if !found_leftovers.is_empty() {
        report.warnings.push(format!("deleted {} tree(s) left by an interrupted wipe", found_leftovers.len()));
    }
    tracing::info!(path = %path.display(), files = report.removed.files, bytes = report.removed.bytes, in_place,
        rename_ms = report.rename_ms, delete_ms = report.delete_ms, "nomad state wiped");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_rules() {
        let root = Path::new("/mnt/r");
        assert_eq!(data_dir_path(root, Path::new("/opt/nomad")).expect("ok"), PathBuf::from("/mnt/r/opt/nomad"));
        assert!(matches!(data_dir_path(root, Path::new("/")), Err(WipeError::UnsafePath { .. })));
        assert!(matches!(data_dir_path(root, Path::new("/opt/../etc")), Err(WipeError::BadDataDir(_))));
        assert!(matches!(data_dir_path(root, Path::new("opt/nomad")), Err(WipeError::BadDataDir(_))));
    }

    #[test]
    fn move_aside_keeps_mode_and_does_not_follow_symlinks() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"keep").expect("write");
        let dir = tmp.path().join("nomad");
        std::fs::create_dir_all(dir.join("a/b")).expect("mkdir");
        std::fs::write(dir.join("a/b/f"), b"12345").expect("write");
        std::os::unix::fs::symlink(&outside, dir.join("link")).expect("symlink");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let meta = std::fs::symlink_metadata(&dir).expect("stat");
        let o = move_aside_and_delete(&dir, &meta).expect("wipe");
        assert_eq!(o.removed.files, 2, "{o:?}");
        assert_eq!(o.removed.dirs, 2, "{o:?}");
        assert!(!o.moved_to.exists());
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
        assert_eq!(std::fs::metadata(&dir).expect("stat").mode() & 0o7777, 0o750);
        assert_eq!(std::fs::read(outside.join("keep")).expect("kept"), b"keep");
    }

    #[test]
    fn symlinks_in_the_path_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("root");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("nomad")).expect("mkdir");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, root.join("opt")).expect("symlink");
        let path = data_dir_path(&root, Path::new("/opt/nomad")).expect("path");
        let err = check_path(&root, &path).expect_err("parent symlink");
        assert!(err.to_string().contains("leads elsewhere"), "{err}");
        std::fs::remove_file(root.join("opt")).expect("rm");
        std::fs::create_dir(root.join("opt")).expect("mkdir");
        std::os::unix::fs::symlink(elsewhere.join("nomad"), root.join("opt/nomad")).expect("symlink");
        let err = check_path(&root, &path).expect_err("symlink");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert_eq!(err.kind(), ErrorKind::Refused);
    }
}
