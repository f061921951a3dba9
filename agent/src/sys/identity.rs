//! Which machine and which boot the agent runs on, remembered in
//! `state_dir/identity.json`.
//!
//! The daemon records the instance id (IMDS) and the boot id at start. When
//! they change, the previous identity is kept, so that on a machine
//! restored from an image (whose state_dir was captured with the image) the
//! agent can tell "I was restored from instance X" (the instance id
//! differs), and after a reboot "new boot, same instance". `recover` uses
//! [`restore_evidence`] to refuse on a machine that was not restored, and
//! [`mark_recovered`] so that a machine recovered once (now the primary) is
//! not recovered again by mistake. The freeze and drain records carry the
//! [`Identity`] they were written under, so that stale ones (from another
//! boot or instance) are recognised.
//!
//! The file is written atomically: temp file, fsync, rename, fsync of the dir.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::facts;

/// The file in state_dir.
pub(crate) const IDENTITY_FILE: &str = "identity.json";

#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid identity record: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Facts(#[from] facts::FactsError),
}

/// An instance id (None: IMDS did not answer) and a boot id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub boot_id: String,
}

impl Identity {
    /// Whether a record written under `self` was written on `other`'s
    /// instance (unknown instance ids do not differ).
    pub fn same_instance(&self, other: &Identity) -> bool {
        match (&self.instance_id, &other.instance_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instance {} boot {}", self.instance_id.as_deref().unwrap_or("(unknown)"), self.boot_id)
    }
}

/// state_dir/identity.json.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdentityFile {
    /// What the agent runs on (last recorded).
    pub current: Identity,
    /// What it ran on before the last change (instance or boot).
    #[serde(default)]
    pub previous: Option<Identity>,
    /// Set when the instance id changed: the identity the state_dir was
    /// captured on (this machine was restored from its image). Kept across
    /// reboots; replaced by the next change of instance.
    #[serde(default)]
    pub restored_from: Option<Identity>,
    /// When `recover` started the app on this instance (UTC stamp): a
    /// machine recovered once is the primary now.
    #[serde(default)]
    pub recovered_at: Option<String>,
}

/// How the live identity compares with the recorded one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Change {
    /// No record yet: first run of the agent in this state_dir.
    First,
    Same,
    NewBoot,
    /// Another instance (restored from an image of `from`).
    NewInstance {
        from: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io { what, path: path.to_owned(), source }
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_FILE)
}

/// Reads the record; None if there is none.
pub(crate) fn load(state_dir: &Path) -> Result<Option<IdentityFile>, IdentityError> {
    let p = path(state_dir);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| IdentityError::Corrupt { path: p, message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read", &p)(e)),
    }
}

/// Writes `bytes` to `path` atomically ([`crate::sys::atomic::write`]).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    crate::sys::atomic::write(path, bytes, 0o644).map_err(|e| IdentityError::Io { what: e.what, path: e.path, source: e.source })
}

fn store(state_dir: &Path, file: &IdentityFile) -> Result<(), IdentityError> {
    write_atomic(&path(state_dir), serde_json::to_string_pretty(file).expect("records serialize").as_bytes())
}

/// Compares `live` with the record and records it, keeping the previous
/// identity when it changed. A live identity without an instance id (IMDS
/// down) keeps the recorded instance id: only a known, different id counts
/// as another instance.
pub(crate) fn observe(state_dir: &Path, live: &Identity) -> Result<(Change, IdentityFile), IdentityError> {
    let Some(mut file) = load(state_dir)? else {
        let file = IdentityFile { current: live.clone(), ..IdentityFile::default() };
        store(state_dir, &file)?;
        return Ok((Change::First, file));
    };
    let mut live = live.clone();
    if live.instance_id.is_none() {
        live.instance_id = file.current.instance_id.clone();
    }
    let change = match (&file.current.instance_id, &live.instance_id) {
        (Some(old), Some(new)) if old != new => Change::NewInstance { from: old.clone() },
        _ if file.current.boot_id != live.boot_id => Change::NewBoot,
        _ => Change::Same,
    };
    match &change {
        Change::Same | Change::First => {
            if file.current != live {
                file.current = live;
                store(state_dir, &file)?;
            }
        }
        Change::NewBoot => {
            file.previous = Some(std::mem::replace(&mut file.current, live));
            store(state_dir, &file)?;
        }
        Change::NewInstance { .. } => {
            let old = std::mem::replace(&mut file.current, live);
            file.restored_from = Some(old.clone());
            file.previous = Some(old);
            file.recovered_at = None;
            store(state_dir, &file)?;
        }
    }
    Ok((change, file))
}

/// The live identity: the boot id (always) and the instance id from IMDS
/// (None, with the reason, when IMDS does not answer).
pub(crate) async fn live(imds: &crate::sys::imds::ImdsClient, boot_id_path: &Path) -> Result<(Identity, Option<String>), IdentityError> {
    let boot_id = facts::read_boot_id(boot_id_path)?;
    match facts::imds_facts(imds).await {
        Ok(f) => Ok((Identity { instance_id: Some(f.instance_id), boot_id }, None)),
        Err(e) => Ok((Identity { instance_id: None, boot_id }, Some(e.to_string()))),
    }
}

/// The identity records written now should carry: the recorded current
/// one if it is of this boot, else the boot id alone.
pub(crate) fn for_records(state_dir: &Path, boot_id_path: &Path) -> Identity {
    let boot_id = facts::read_boot_id(boot_id_path).unwrap_or_default();
    match load(state_dir) {
        Ok(Some(f)) if f.current.boot_id == boot_id => f.current,
        _ => Identity { instance_id: None, boot_id },
    }
}

/// The identity a record without one (written by an older agent) is taken
/// to have been written under: the one recorded before the current, if
/// any (the state from before the image or the reboot), else the current.
/// None without an identity record: nothing to compare with.
pub(crate) fn assumed_for_old_records(file: Option<&IdentityFile>) -> Option<Identity> {
    file.map(|f| f.previous.clone().unwrap_or_else(|| f.current.clone()))
}

/// Why recover may (or may not) go on here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Evidence {
    /// Go on.
    pub restored: bool,
    /// The reason, for the report or the refusal.
    pub reason: String,
}

/// Whether this machine was restored (from its own records, then the
/// controller's word), recording `live` on the way. `candidate`: the
/// controller says this instance is a restore candidate.
pub(crate) fn restore_evidence(state_dir: &Path, live: &Identity, candidate: bool) -> Result<Evidence, IdentityError> {
    let (change, file) = observe(state_dir, live)?;
    let here = live.instance_id.as_deref().unwrap_or("(unknown: IMDS did not answer)");
    if let Some(from) = &file.restored_from
        && !from.same_instance(&file.current)
    {
        if let Some(at) = &file.recovered_at {
            if candidate {
                return Ok(Evidence {
                    restored: true,
                    reason: format!("the controller says instance {here} is a restore candidate (already recovered at {at})"),
                });
            }
            return Ok(Evidence {
                restored: false,
                reason: format!(
                    "this instance ({here}) was restored from {} and already recovered at {at}: it is the primary now (steps left over, such as the build clean-up, can be run one by one: `dr-agent cleanup-builds`)",
                    from.instance_id.as_deref().unwrap_or("(unknown)")
                ),
            });
        }
        return Ok(Evidence {
            restored: true,
            reason: format!("restored from instance {} (this is {here})", from.instance_id.as_deref().unwrap_or("(unknown)")),
        });
    }
    if candidate {
        return Ok(Evidence { restored: true, reason: format!("the controller says instance {here} is a restore candidate") });
    }
    let why = match change {
        Change::First => format!("the agent has no earlier identity record in {} (first run here)", state_dir.display()),
        Change::NewBoot => format!("only the boot changed (instance {here}): a reboot, not a restore"),
        _ if live.instance_id.is_none() => "IMDS did not answer, so the instance id cannot be compared".to_owned(),
        _ => format!("its state was recorded on this same instance ({here}) and boot"),
    };
    Ok(Evidence { restored: false, reason: format!("no evidence this machine was restored: {why}") })
}

/// Records that recover completed on the current instance.
pub(crate) fn mark_recovered(state_dir: &Path, at: String) -> Result<(), IdentityError> {
    if let Some(mut f) = load(state_dir)? {
        f.recovered_at = Some(at);
        store(state_dir, &f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: &str, b: &str) -> Identity {
        Identity { instance_id: Some(i.to_owned()), boot_id: b.to_owned() }
    }

    #[test]
    fn first_same_reboot_restore_and_recovered() {
        let dir = tempfile::tempdir().expect("tmp");
        let sd = dir.path();
        let (c, _) = observe(sd, &id("i-a", "b1")).expect("observe");
        assert_eq!(c, Change::First);
        assert!(!restore_evidence(sd, &id("i-a", "b1"), false).expect("e").restored, "healthy primary");
        let e = restore_evidence(sd, &id("i-a", "b2"), false).expect("e");
        assert!(!e.restored && e.reason.contains("reboot"), "{e:?}");
        // The image carried state_dir; the machine boots as i-b.
        let e = restore_evidence(sd, &id("i-b", "b3"), false).expect("e");
        assert!(e.restored && e.reason.contains("restored from instance i-a"), "{e:?}");
        // Still so after a reboot of i-b, until recovered.
        assert!(restore_evidence(sd, &id("i-b", "b4"), false).expect("e").restored);
        mark_recovered(sd, "2026-01-01T00:00:00Z".into()).expect("mark");
        let e = restore_evidence(sd, &id("i-b", "b4"), false).expect("e");
        assert!(!e.restored && e.reason.contains("already recovered"), "{e:?}");
        assert!(restore_evidence(sd, &id("i-b", "b4"), true).expect("e").restored, "the controller's word");
        let f = load(sd).expect("load").expect("some");
        assert_eq!(f.previous, Some(id("i-b", "b3")));
        assert_eq!(f.restored_from, Some(id("i-a", "b2")));
    }

    #[test]
    fn imds_down_keeps_the_instance_and_the_file_is_atomic() {
        let dir = tempfile::tempdir().expect("tmp");
        let sd = dir.path();
        observe(sd, &id("i-a", "b1")).expect("observe");
        let (c, f) = observe(sd, &Identity { instance_id: None, boot_id: "b2".into() }).expect("observe");
        assert_eq!(c, Change::NewBoot);
        assert_eq!(f.current, id("i-a", "b2"));
        let names: Vec<_> = std::fs::read_dir(sd).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(IDENTITY_FILE)], "no temp file left");
    }
}
