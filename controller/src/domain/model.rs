//! Domain types of the controller. The store persists them, the engine
//! drives them, the admin API converts them to protobuf at its edge.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = u64;

pub fn now_ms() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub id: String,
    pub region: String,
    /// The instance that is the site's services machine now.
    pub primary_instance_id: String,
    pub role_arn: Option<String>,
}

/// What an agent says about the machine it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFacts {
    pub instance_id: String,
    pub private_ip: String,
    pub public_ip: String,
    pub boot_id: String,
    pub os_family: String,
    pub app_state: String,
}

/// What an instance of a site is. Every AMI carries the site's agent and
/// certificate, so several agents of one site are normal; the store decides
/// each one's role (an instance is primary when it is the site's
/// `primary_instance_id`, otherwise its recorded role, otherwise passive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// The site's services machine: gets backup work.
    Primary,
    /// Launched by restore/failover operation `operation_id`; only its
    /// commands until it is promoted.
    Candidate { operation_id: String },
    /// A drill copy of drill `operation_id`; only its commands.
    Drill { operation_id: String },
    /// A hot spare.
    Spare,
    /// Connected, not verified against EC2 yet: no work until it is.
    Pending,
    /// A stray copy, or unverifiable: no work.
    Passive { reason: String },
    /// An old primary that must never act again: no work; flagged.
    Fenced { reason: String },
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Candidate { .. } => "candidate",
            Role::Drill { .. } => "drill",
            Role::Spare => "spare",
            Role::Pending => "pending",
            Role::Passive { .. } => "passive",
            Role::Fenced { .. } => "fenced",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Role::Passive { reason } | Role::Fenced { reason } => reason,
            _ => "",
        }
    }

    pub fn operation_id(&self) -> &str {
        match self {
            Role::Candidate { operation_id } | Role::Drill { operation_id } => operation_id,
            _ => "",
        }
    }

    /// Whether an agent in this role may be sent commands at all.
    pub fn takes_work(&self) -> bool {
        matches!(self, Role::Primary | Role::Candidate { .. } | Role::Drill { .. } | Role::Spare)
    }

    /// A role recorded in the store (`name`, `operation_id`, `reason`).
    pub fn from_parts(name: &str, operation_id: &str, reason: &str) -> Option<Role> {
        Some(match name {
            "primary" => Role::Primary,
            "candidate" => Role::Candidate { operation_id: operation_id.to_owned() },
            "drill" => Role::Drill { operation_id: operation_id.to_owned() },
            "spare" => Role::Spare,
            "pending" => Role::Pending,
            "passive" => Role::Passive { reason: reason.to_owned() },
            "fenced" => Role::Fenced { reason: reason.to_owned() },
            _ => return None,
        })
    }
}

/// One instance of a site as the store knows it: its agent's last report,
/// its recorded role, and when EC2 last confirmed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub site_id: String,
    pub instance_id: String,
    /// The recorded role of a non-primary instance (`candidate`, `drill`,
    /// `spare`, `fenced`), or `passive`. The primary is whatever the site's
    /// `primary_instance_id` names (see [`Role`]).
    pub role: String,
    pub operation_id: String,
    pub reason: String,
    pub facts: InstanceFacts,
    /// The private IP EC2 reported when the instance was last verified, and
    /// when (0: never).
    pub verified_private_ip: String,
    pub verified_at_ms: Millis,
    pub connected: bool,
    pub connected_at_ms: Millis,
    /// Last message from its agent, persisted coarsely (every
    /// `server.liveness_flush`), so that "recently seen" survives a restart.
    pub last_seen_ms: Millis,
    pub peer: String,
    /// When the certificate of its agent's live session ends (0: unknown;
    /// in memory only, not stored).
    #[serde(default)]
    pub cert_not_after_ms: Millis,
}

/// `<kind>-<utc timestamp>-<random>`: sortable, unique, safe in EC2 tags, AMI
/// names and agent command ids.
pub fn new_operation_id(kind: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let stamp =
        format!("{:04}{:02}{:02}t{:02}{:02}{:02}", now.year(), u8::from(now.month()), now.day(), now.hour(), now.minute(), now.second());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{kind}-{stamp}-{}", &random[..8])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    /// Waiting for a human (resume/abort), an approval, or a time; see
    /// `Operation::waiting_for`.
    Waiting,
    /// Aborted (or preempted): its compensations are running.
    Cancelling,
    Cancelled,
    Succeeded,
    Failed,
}

impl OperationState {
    /// The states of an operation that has not ended.
    pub const ACTIVE: [OperationState; 3] = [OperationState::Running, OperationState::Waiting, OperationState::Cancelling];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Waiting => "waiting",
            OperationState::Cancelling => "cancelling",
            OperationState::Cancelled => "cancelled",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => OperationState::Running,
            "waiting" => OperationState::Waiting,
            "cancelling" => OperationState::Cancelling,
            "cancelled" => OperationState::Cancelled,
            "succeeded" => OperationState::Succeeded,
            "failed" => OperationState::Failed,
            _ => return None,
        })
    }
    /// Ended for good: nothing changes it any more.
    pub fn is_finished(self) -> bool {
        matches!(self, OperationState::Cancelled | OperationState::Succeeded | OperationState::Failed)
    }
}

/// What a human (or the controller itself) may ask of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Let an operation waiting for approval go on.
    Approve,
    /// End an operation waiting for approval (its compensations run).
    Deny,
    /// Retry the failed step of an operation waiting for a human.
    Resume,
    /// Stop: compensations run, then the operation is cancelled.
    Abort,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Approve => "approve",
            Signal::Deny => "deny",
            Signal::Resume => "resume",
            Signal::Abort => "abort",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "approve" => Signal::Approve,
            "deny" => Signal::Deny,
            "resume" => Signal::Resume,
            "abort" => Signal::Abort,
            _ => return None,
        })
    }
}

/// A resource an active operation relies on: retention and reconcilers
/// leave it alone until the operation ends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Protected {
    Image(String),
    Instance(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(StepState::Pending),
            "running" => Some(StepState::Running),
            "done" => Some(StepState::Done),
            "failed" => Some(StepState::Failed),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub seq: u32,
    pub name: String,
    pub state: StepState,
    pub attempts: u32,
    pub started_at_ms: Millis,
    pub finished_at_ms: Millis,
    /// Human-readable summary of the result, or of the current wait.
    pub detail: String,
    pub error: String,
    /// Machine-readable result the following steps build on.
    pub result: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    /// The workflow (`backup`, ...).
    pub kind: String,
    pub site_id: String,
    pub state: OperationState,
    pub error: String,
    pub requested_by: String,
    pub created_at_ms: Millis,
    pub updated_at_ms: Millis,
    pub steps: Vec<StepRecord>,
    /// While `Waiting`: what for, and what a human can do.
    pub waiting_for: String,
    /// The first failure, kept across restarts: after it only the steps
    /// that always run (compensations) run.
    pub failure: String,
    /// The controller process driving it and the number of its claim: every
    /// write is conditional on the epoch, so two controllers never both
    /// drive one operation.
    pub owner: String,
    pub epoch: i64,
    /// The workflow's typed state (JSON) and its version.
    pub state_version: u32,
    pub wf_state: Option<serde_json::Value>,
    pub protects: Vec<Protected>,
}

/// How consistent a backup's file systems are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// As after a power loss: a no-reboot image of running disks.
    Crash,
    /// File systems frozen while the snapshots were taken.
    Filesystem,
    /// The app was stopped.
    Application,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Filesystem => "filesystem",
            Consistency::Application => "application",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crash" => Some(Consistency::Crash),
            "filesystem" => Some(Consistency::Filesystem),
            "application" => Some(Consistency::Application),
            _ => None,
        }
    }
}

/// Where a backup is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupState {
    Available,
    /// Retention decided to delete it; deregistration or snapshot deletion
    /// is under way (resumed if interrupted).
    Deleting,
    Deleted,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Available => "available",
            BackupState::Deleting => "deleting",
            BackupState::Deleted => "deleted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "available" => Some(BackupState::Available),
            "deleting" => Some(BackupState::Deleting),
            "deleted" => Some(BackupState::Deleted),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    Pending,
    Available,
    /// Failed; retried by the reconciler.
    Failed,
    Deleted,
}

impl CopyState {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::Pending => "pending",
            CopyState::Available => "available",
            CopyState::Failed => "failed",
            CopyState::Deleted => "deleted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(CopyState::Pending),
            "available" => Some(CopyState::Available),
            "failed" => Some(CopyState::Failed),
            "deleted" => Some(CopyState::Deleted),
            _ => None,
        }
    }
}

/// A backup's AMI copied to another (DR) region.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Copy {
    pub source_image_id: String,
    pub region: String,
    /// Empty until CopyImage answered.
    pub image_id: String,
    pub state: CopyState,
    pub attempts: u32,
    pub error: String,
    pub requested_at_ms: Millis,
    pub completed_at_ms: Millis,
    pub deleted_at_ms: Millis,
}

/// A completed backup: an available AMI of a site's services machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backup {
    pub image_id: String,
    pub site_id: String,
    pub operation_id: String,
    pub region: String,
    pub instance_id: String,
    pub snapshot_ids: Vec<String>,
    pub started_at_ms: Millis,
    pub completed_at_ms: Millis,
    pub consistency: Consistency,
    pub app_state: String,
    pub state: BackupState,
    /// What retention decided, and why.
    pub fate: String,
    pub deleted_at_ms: Millis,
    /// The quiesce level asked for ("none", "freeze", "drain", "stop").
    pub quiesce: String,
    /// How long file systems were frozen (freeze/drain), in ms.
    pub frozen_ms: Millis,
    /// What happened while quiescing (fallbacks, failures).
    pub quiesce_note: String,
    /// Copies in other regions (filled by the store when listing).
    pub copies: Vec<Copy>,
}

/// What a restore needs to launch a replacement of a site's services
/// machine, read from EC2 when the backup was taken (the old instance, its
/// AZ or its whole region may be gone when it is needed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchFacts {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub security_group_ids: Vec<String>,
    /// ARN of the IAM instance profile ("" if none).
    pub iam_instance_profile: String,
    pub key_name: String,
    pub private_ip: String,
    pub public_ip: String,
    /// The Elastic IP associated with the instance ("" if none).
    pub eip_allocation_id: String,
    pub eip_public_ip: String,
    pub root_device_name: String,
    pub block_devices: Vec<BlockDevice>,
    /// When EC2 was asked (controller clock).
    pub read_at_ms: Millis,
}

/// One EBS volume attached to an instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub device_name: String,
    pub volume_id: String,
    pub delete_on_termination: bool,
}

/// A site's hot spare, as installed by the `spare` operation that prepared
/// it (one per site; `drctl status`, metrics, the failover plan).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpareRecord {
    pub site_id: String,
    pub instance_id: String,
    pub region: String,
    /// `stopped` or `running` (the app stopped either way).
    pub mode: String,
    /// The operation that prepared it.
    pub operation_id: String,
    /// The backup it was launched from (its id in the region it was taken
    /// in) and the AMI launched (a copy in another region).
    pub backup_image_id: String,
    pub launch_image_id: String,
    /// The backup's point in time: the spare's data age.
    pub backup_started_at_ms: Millis,
    pub installed_at_ms: Millis,
    /// What its Replicated files hold now (after the runbook rewrote them
    /// to the spare's own addresses): a failover rewrites from these.
    pub files_private_ip: String,
    pub files_public_ip: String,
    /// Its hostname after the runbook ("" = the backup's).
    pub hostname: String,
}

impl SpareRecord {
    /// How much older its backup is than `newest` (the site's newest good
    /// backup): the data a failover onto it gives up.
    pub fn lag_behind(&self, newest: Option<&Backup>) -> u64 {
        newest.map_or(0, |b| b.started_at_ms.saturating_sub(self.backup_started_at_ms))
    }
}

/// The measured result of one drill (`drctl drills SITE`, status, metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DrillRecord {
    pub operation_id: String,
    pub site_id: String,
    pub requested_by: String,
    pub started_at_ms: Millis,
    pub finished_at_ms: Millis,
    /// The copy came up healthy and was verified.
    pub ok: bool,
    /// Why not, when not.
    pub error: String,
    pub backup_image_id: String,
    pub launch_image_id: String,
    pub region: String,
    /// The backup's point in time.
    pub backup_started_at_ms: Millis,
    /// The drill copy, and the hostname it used.
    pub instance_id: String,
    pub hostname: String,
    /// Drill start → app healthy on the copy (0 if never).
    pub rto_ms: u64,
    /// By phase (launch_to_running, agent_up, app_stop, file_steps,
    /// app_start, cleanup).
    pub phases: std::collections::BTreeMap<String, u64>,
    /// The backup's age when the drill started.
    pub rpo_ms: u64,
    /// The worst RPO the site had over the window before the drill (since
    /// the previous drill, at most 30 days), from the backup history.
    pub worst_rpo_ms: u64,
    pub worst_rpo_window_ms: u64,
    /// What the copy itself holds: the newest build's start time read from
    /// the CircleCI API on the copy (0 = not known), and the drill start
    /// minus it: the real data age.
    pub newest_build_at_ms: Millis,
    pub data_age_ms: u64,
    /// What teardown did; instances it could not terminate (left to the
    /// drill reaper, by their `dr:keep-until` tag).
    pub teardown: String,
    pub leaked: Vec<String>,
}

/// The worst recovery point a site had over `[from, to]`: the longest time
/// at any moment in the window since the start of the newest backup taken
/// before that moment. `starts` are the start times of the site's good
/// backups (any order). With no backup before `from`, the window's start
/// counts as the last one (the site was not protected before it, which the
/// caller states separately).
pub fn worst_rpo(starts: &[Millis], from: Millis, to: Millis) -> u64 {
    let mut points: Vec<Millis> = starts.iter().copied().filter(|s| *s <= to).collect();
    points.sort_unstable();
    let before = points.iter().copied().filter(|s| *s <= from).max().unwrap_or(from);
    let mut last = before;
    let mut worst = 0;
    for s in points.into_iter().filter(|s| *s > from) {
        worst = worst.max(s - last);
        last = s;
    }
    worst.max(to - last)
}

#[cfg(test)]
mod tests {
    use super::worst_rpo;

    #[test]
    fn worst_rpo_is_the_longest_gap_in_the_window_including_its_ends() {
        // Backups at 0, 10, 40, 45; window [5, 60].
        assert_eq!(worst_rpo(&[40, 0, 45, 10], 5, 60), 30, "10 -> 40 is the worst gap");
        // The open end counts: nothing since 45 until 100.
        assert_eq!(worst_rpo(&[0, 10, 40, 45], 5, 100), 55);
        // The backup before the window counts from its own start.
        assert_eq!(worst_rpo(&[0], 50, 60), 60);
        // No backup at all: the whole window.
        assert_eq!(worst_rpo(&[], 50, 60), 10);
        // Backups after the window end are not counted.
        assert_eq!(worst_rpo(&[0, 70], 10, 60), 60);
    }
}

/// One entry of the event log: a health decision (taken or not), an
/// operation's end, an alert. What `drctl events` shows and webhooks carry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log (assigned by the store; 0 before).
    pub seq: u64,
    /// Unique and stable: webhook receivers deduplicate on it.
    pub id: String,
    pub at_ms: Millis,
    /// "" for fleet-wide events.
    pub site_id: String,
    /// `site.down`, `failover.started`, ... (`domain::events::EventKind`).
    pub kind: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    pub summary: String,
    /// The signals and numbers behind it.
    pub evidence: serde_json::Value,
    pub operation_id: String,
}

impl Event {
    /// A new event with a fresh UUID, stamped now.
    pub fn new(
        site: &str,
        kind: super::events::EventKind,
        severity: &str,
        summary: impl Into<String>,
        evidence: serde_json::Value,
        operation_id: &str,
    ) -> Event {
        Event {
            seq: 0,
            id: uuid::Uuid::new_v4().to_string(),
            at_ms: now_ms(),
            site_id: site.to_owned(),
            kind: kind.as_str().to_owned(),
            severity: severity.to_owned(),
            summary: summary.into(),
            evidence,
            operation_id: operation_id.to_owned(),
        }
    }
}
