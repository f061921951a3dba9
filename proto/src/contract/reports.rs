//! Every step's report: what it did (or, in a dry run, would do) and what a
//! human must still act on. The agent fills them; the controller reads them
//! ([`super::parse_report`]); the hand-run CLI renders them.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::params::AddressChange;

// ------------------------------------------------------------ app status

/// The app's state as `replicatedctl app status` reports it (step
/// `app_status`; on the wire the `AppStatusResult` message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    /// `started`, `starting`, `stopped`, `stopping`, ...: an open set, kept as given.
    pub state: String,
    pub is_transitioning: bool,
    pub desired_state: String,
}

impl AppStatus {
    /// The app is up when State is `started` and it is not transitioning.
    pub fn is_up(&self) -> bool {
        self.state == "started" && !self.is_transitioning
    }
}

// ------------------------------------------------------------ app stop/start, hostname

/// The state an app step drives the app to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Stopped,
    Started,
}

impl Target {
    /// The `State` value replicatedctl prints once there.
    pub fn state(self) -> &'static str {
        match self {
            Target::Stopped => "stopped",
            Target::Started => "started",
        }
    }

    /// `stop` or `start`.
    pub fn verb(self) -> &'static str {
        match self {
            Target::Stopped => "stop",
            Target::Started => "start",
        }
    }

    /// True when the status says the app is there (and not moving).
    pub fn reached(self, s: &AppStatus) -> bool {
        s.state == self.state() && !s.is_transitioning
    }
}

/// What a stop or start did (steps `app_stop`, `app_start`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    pub target: Target,
    /// State before the step (`unknown` when the first status call failed).
    pub previous_state: String,
    pub previous_transitioning: bool,
    /// State at the end (the target, unless dry-run).
    pub final_state: String,
    /// The app was already at the target: nothing was asked of replicatedctl.
    /// (The controller's backup reads it: an app already stopped before the
    /// backup is not started by its unquiesce.)
    pub already: bool,
    /// `app stop` / `app start` was issued.
    pub issued: bool,
    pub dry_run: bool,
    /// Time from the first status call to the target being reached.
    pub elapsed_ms: u64,
    /// Status polls after the stop/start was issued.
    pub polls: u32,
    /// States seen outside the known set (tolerated).
    pub unknown_states: Vec<String>,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

/// What set-hostname did (or would do) (step `set_hostname`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostnameReport {
    /// The app-config item (`replicated.hostname_item`).
    pub item: String,
    /// Its value before (None: the item carries no value).
    pub old: Option<String>,
    pub new: String,
    /// The value differed (and, unless dry-run, was set and applied).
    pub changed: bool,
    /// `app-config set` + `app apply-config` were run.
    pub applied: bool,
    pub dry_run: bool,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------ rewrite

/// Which distribution's paths hold the Replicated files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Debian,
    Rhel,
}

impl Layout {
    /// The directory of the files, relative to the root.
    pub fn dir(self) -> &'static str {
        match self {
            Layout::Debian => "etc/default",
            Layout::Rhel => "etc/sysconfig",
        }
    }
}

/// What happened (or would happen) to one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    pub path: PathBuf,
    pub changed_lines: usize,
    pub replacements: usize,
    /// The backup of the old content (real runs that changed the file).
    pub backup: Option<PathBuf>,
    pub written: bool,
}

/// What the address rewrite did (step `rewrite_addresses`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteReport {
    pub root: PathBuf,
    pub layout: Layout,
    pub dry_run: bool,
    pub private: Vec<AddressChange>,
    pub public: Vec<AddressChange>,
    pub files: Vec<FileReport>,
    /// Nothing needed changing.
    pub up_to_date: bool,
    /// Temporary files of an interrupted earlier run that were removed (or,
    /// in a dry run, would be).
    pub removed_temp_files: Vec<PathBuf>,
    /// The change as a unified diff (paths relative to the root: `patch -p1`).
    pub diff: String,
    pub warnings: Vec<String>,
    pub actions: Vec<String>,
}

// ------------------------------------------------------------ wipe

/// Counts of a tree (not following symlinks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeCount {
    /// Regular files, symlinks and other non-directories.
    pub files: u64,
    /// Directories below the top one.
    pub dirs: u64,
    /// Sum of the sizes of the non-directories (symlinks count their own size).
    pub bytes: u64,
}

impl TreeCount {
    pub fn add(&mut self, o: TreeCount) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.bytes += o.bytes;
    }
}

/// What the Nomad wipe did (step `wipe_nomad`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WipeReport {
    /// The data dir (root joined with nomad.data_dir).
    pub path: PathBuf,
    /// `wiped`, `already done` or `would wipe`.
    pub state: String,
    pub dry_run: bool,
    /// The data dir is itself a mount point: emptied in place instead of
    /// moved aside.
    #[serde(default)]
    pub in_place: bool,
    /// What was (or would be) removed, leftovers of an interrupted run included.
    pub removed: TreeCount,
    /// Where the tree was moved before deletion.
    pub moved_to: Option<PathBuf>,
    /// The visible part: rename aside + recreate the empty dir.
    pub rename_ms: f64,
    /// Deleting the moved-aside tree (and counting it).
    pub delete_ms: f64,
    /// Owner and mode of the recreated dir (`uid:gid`, octal).
    pub owner: Option<String>,
    pub mode: Option<String>,
    /// Top-level entries (and leftovers) that are (or would be) removed, at most 50.
    pub entries: Vec<String>,
    /// Mount points found below the data dir (or a leftover tree): never
    /// deleted through; refused unless `nomad.unmount_below`.
    #[serde(default)]
    pub mounts_below: Vec<PathBuf>,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
    /// Dry run only: why the real run would refuse right now (app running,
    /// Nomad running, replicatedctl failing). Empty: it would proceed.
    pub blocked_by: Vec<String>,
}

// ------------------------------------------------------------ cleanup builds

/// What happened (or would happen) to one running build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildOutcome {
    Deleted,
    Failed,
    /// The URL failed validation: nothing was sent for it.
    Refused,
    /// Not a candidate (started after the cutoff, or no start time).
    Kept,
    /// Dry run: would be deleted.
    WouldDelete,
}

impl BuildOutcome {
    pub fn label(self) -> &'static str {
        match self {
            BuildOutcome::Deleted => "deleted",
            BuildOutcome::Failed => "FAILED",
            BuildOutcome::Refused => "REFUSED",
            BuildOutcome::Kept => "kept",
            BuildOutcome::WouldDelete => "would delete",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    /// The URL as the API gave it (may be hostile: never evaluated).
    pub url: Option<String>,
    pub build_num: Option<u64>,
    /// `<username>/<reponame>` as the API gave them.
    pub project: String,
    pub started_at: Option<String>,
    pub outcome: BuildOutcome,
    /// Why (kept, refused, failed), or the REPL's answer (deleted).
    pub detail: String,
}

/// What the build clean-up did (step `cleanup_builds`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    pub before: String,
    pub hostname: String,
    pub dry_run: bool,
    /// Builds listed through the API.
    pub listed: usize,
    /// The newest start time among the listed builds (any lifecycle), RFC
    /// 3339: what the data on this machine reaches up to. A drill reports
    /// it as the restored data's real age.
    pub newest_build_started_at: Option<String>,
    /// Builds not in lifecycle `running` (never touched, not itemized).
    pub not_running: usize,
    /// Every running build, with its outcome.
    pub builds: Vec<BuildResult>,
    pub deleted: usize,
    pub failed: usize,
    pub refused: usize,
    pub kept: usize,
    /// Dev-console sessions opened (0 or 1).
    pub console_sessions: usize,
    /// Nothing left to delete.
    pub already_done: bool,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------ freeze, thaw

/// What a freeze did (or, in a dry run, would do) (step `freeze`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FreezeReport {
    /// `frozen`, `already frozen` (by a dr-agent watchdog) or `would freeze`.
    pub state: String,
    /// Canonical mount points.
    pub mounts: Vec<PathBuf>,
    pub deadline_ms: u64,
    /// Unix milliseconds by which the watchdog thaws.
    pub thaw_by_unix_ms: u64,
    pub watchdog_pid: Option<u32>,
    /// How long FIFREEZE took (it flushes dirty data first).
    pub freeze_took_ms: u64,
    /// The record of this freeze (state_dir/freeze/<id>.json).
    pub record: Option<PathBuf>,
    pub dry_run: bool,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountThaw {
    pub path: PathBuf,
    /// `thawed`, `already thawed`, `would thaw`, or `FAILED: ...`.
    pub outcome: String,
}

/// What a thaw did (step `thaw`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThawReport {
    pub mounts: Vec<MountThaw>,
    /// How long the file systems were frozen (the longest, when several
    /// freezes were lifted); 0 when unknown or nothing was frozen.
    pub frozen_for_ms: u64,
    /// Who or what lifted the freeze: `asked by the agent`, `the deadline
    /// passed`, `the agent went away (its pipe closed)`, ...
    pub reason: String,
    /// Nothing was frozen any more.
    pub already_done: bool,
    pub dry_run: bool,
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------ drain, undrain

/// A Nomad client node as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    pub id: String,
    pub name: String,
    pub node_class: String,
    pub status: String,
    pub eligibility: String,
}

/// An allocation that had not ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRef {
    pub node_id: String,
    pub id: String,
    pub name: String,
    pub job_id: String,
    pub client_status: String,
}

/// What a drain did (or would do) (step `drain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Ready nodes this run asked Nomad to drain.
    pub drained: Vec<NodeRef>,
    /// Ready nodes this agent had drained already (recorded): nothing asked.
    pub already_drained: Vec<NodeRef>,
    /// Ready nodes drained by someone else before: waited for, left alone.
    pub drained_by_others: Vec<NodeRef>,
    /// Nodes that are not ready (down, initializing...): not touched.
    pub skipped: Vec<NodeRef>,
    pub deadline_ms: u64,
    pub waited_ms: u64,
    /// No allocation runs or is pending on the ready nodes any more.
    pub idle: bool,
    /// Allocations still running or pending at the deadline.
    pub still_running: Vec<AllocRef>,
    /// Where the drained nodes are recorded for undrain.
    pub record: PathBuf,
    pub dry_run: bool,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

/// What an undrain did (or would do) (step `undrain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndrainReport {
    /// Node ids whose drain was ended.
    pub undrained: Vec<String>,
    /// Recorded nodes that were no longer drained: nothing asked.
    pub already: Vec<String>,
    /// Recorded nodes Nomad no longer knows.
    pub not_found: Vec<String>,
    /// A drain record was found in `state_dir/drain.json` (without one,
    /// nothing is touched).
    pub from_record: bool,
    /// Nothing was (or would be) asked of Nomad.
    #[serde(default)]
    pub already_done: bool,
    pub dry_run: bool,
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------ recover

/// One runbook step's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunbookStep {
    pub name: String,
    /// `done`, `already done`, `would do`, `skipped` or `failed`.
    pub outcome: String,
    pub summary: String,
    /// The step's own report.
    pub report: serde_json::Value,
}

/// What the whole runbook did (step `recover`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoverReport {
    pub dry_run: bool,
    pub offline: bool,
    pub private_ip: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
    /// Why recover went on here (restored from instance X, the
    /// controller's word, --force); empty offline.
    #[serde(default)]
    pub evidence: String,
    pub steps: Vec<RunbookStep>,
    /// The first failure, if any: later steps did not run.
    pub failed: Option<String>,
    /// What a human must still do.
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------ health check

/// A health check that answered 2xx (step `health_check`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthReport {
    pub url: String,
    pub status: u16,
    pub elapsed_ms: u64,
}
