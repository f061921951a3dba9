//! The local side of a fence: an old primary that the controller recorded
//! `fenced` (a failover replaced it) must never serve again. Its agent,
//! once told so (Welcome or RoleChange), keeps the Replicated app stopped
//! on this machine by itself, whatever happens to the controller's own
//! StopInstances (denied, throttled, the controller cut off).
//!
//! The fence is remembered in `state_dir/fence.json` with the instance it
//! was recorded on, so that it holds across a reboot or an agent restart
//! before any controller answers; a record written on another instance (a
//! disk copied into an image) does not apply. Only the controller lifts it,
//! by giving the instance another settled role (not `pending`).
//!
//! The session ([`crate::daemon::session`]) runs the keeper: at once when the fence
//! starts, whenever a heartbeat's app state shows the app not stopped, and
//! every heartbeat interval while no controller is connected, it reads the
//! app state and, unless it is `stopped` and not transitioning, runs the
//! same `app_stop` step the controller uses, through the journal, with the
//! id [`journal_id`] (numbered by [`FenceRecord::stops`]). A failed stop is
//! retried with backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file in state_dir.
pub(crate) const FENCE_FILE: &str = "fence.json";

/// First wait after a failed local stop; doubling up to [`RETRY_MAX`].
pub(crate) const RETRY_INITIAL: Duration = Duration::from_secs(5);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub(crate) enum FenceError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid fence record: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] crate::sys::atomic::AtomicError),
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
}

/// `state_dir/fence.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FenceRecord {
    /// The instance the controller fenced (this machine, when recorded).
    pub instance_id: String,
    /// The controller's reason (e.g. `fenced by failover failover-...`).
    pub reason: String,
    /// When this agent was first told (UTC stamp).
    pub since: String,
    /// Local app stops issued so far: the next one is `stops + 1`.
    #[serde(default)]
    pub stops: u64,
}

impl FenceRecord {
    /// Whether the record applies on `instance_id` (None: IMDS did not say;
    /// the record is then kept in force: a fence errs on the side of stopping).
    pub fn applies_to(&self, instance_id: Option<&str>) -> bool {
        instance_id.is_none_or(|i| i == self.instance_id)
    }
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FENCE_FILE)
}

/// Reads the record; None if there is none.
pub(crate) fn load(state_dir: &Path) -> Result<Option<FenceRecord>, FenceError> {
    let p = path(state_dir);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| FenceError::Corrupt { path: p, message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FenceError::Read { path: p, source }),
    }
}

/// Writes the record crash-safely.
pub(crate) fn save(state_dir: &Path, record: &FenceRecord) -> Result<(), FenceError> {
    let bytes = serde_json::to_vec_pretty(record).expect("a fence record serializes");
    crate::sys::atomic::write(&path(state_dir), &bytes, 0o644)?;
    Ok(())
}

/// Removes the record; whether there was one.
pub(crate) fn remove(state_dir: &Path) -> Result<bool, FenceError> {
    let p = path(state_dir);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FenceError::Remove { path: p, source }),
    }
}

/// Whether an app in this state must be stopped (again) on a fenced
/// machine: anything but `stopped` and settled, an unreadable state included.
pub(crate) fn needs_stop(state: &str, is_transitioning: bool) -> bool {
    state != "stopped" || is_transitioning
}

/// The journal id of the `n`th local stop on the fenced `instance_id`.
pub(crate) fn journal_id(instance_id: &str, n: u64) -> String {
    format!("fence.{instance_id}.app-stop-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("load"), None);
        let r = FenceRecord {
            instance_id: "i-0abc".into(),
            reason: "fenced by failover f-1".into(),
            since: "20261207T150000Z".into(),
            stops: 2,
        };
        save(dir.path(), &r).expect("save");
        assert_eq!(load(dir.path()).expect("load"), Some(r));
        assert!(remove(dir.path()).expect("remove"));
        assert!(!remove(dir.path()).expect("remove again"));
        assert_eq!(load(dir.path()).expect("load"), None);
    }

    #[test]
    fn a_garbled_record_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(path(dir.path()), "{not json").expect("write");
        let e = load(dir.path()).expect_err("corrupt");
        assert!(e.to_string().contains("fence.json") && e.to_string().contains("not a valid fence record"), "{e}");
    }

    #[test]
    fn a_record_applies_only_on_its_instance() {
        let r = FenceRecord { instance_id: "i-0abc".into(), reason: String::new(), since: String::new(), stops: 0 };
        assert!(r.applies_to(Some("i-0abc")));
        assert!(!r.applies_to(Some("i-0def")), "a disk copied to another instance is not fenced");
        assert!(r.applies_to(None), "unknown instance: kept in force");
    }

    #[test]
    fn only_a_settled_stopped_app_is_left_alone() {
        assert!(!needs_stop("stopped", false));
        for (s, t) in [("stopped", true), ("started", false), ("starting", true), ("stopping", true), ("unknown", false)] {
            assert!(needs_stop(s, t), "{s} {t}");
        }
    }

    #[test]
    fn journal_ids_are_valid_and_distinct() {
        let a = journal_id("i-0123456789abcdef0", 1);
        let b = journal_id("i-0123456789abcdef0", 2);
        assert_ne!(a, b);
        crate::daemon::journal::validate_id(&a).expect("a valid journal id");
    }
}
