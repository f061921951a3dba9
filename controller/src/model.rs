//! Domain types of the controller. The store persists them, the engine
//! drives them, the admin API converts them to protobuf at its edge.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = u64;

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// Whether a connected agent may be given work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRole {
    Primary,
    /// Not the site's current primary (or not confirmed by EC2): no work.
    Passive { reason: String },
}

impl AgentRole {
    pub fn name(&self) -> &'static str {
        match self {
            AgentRole::Primary => "primary",
            AgentRole::Passive { .. } => "passive",
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            AgentRole::Primary => "",
            AgentRole::Passive { reason } => reason,
        }
    }
}

/// The last known state of a site's agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub site_id: String,
    pub facts: InstanceFacts,
    pub role: String,
    pub role_reason: String,
    pub connected: bool,
    pub connected_at_ms: Millis,
    pub last_heartbeat_ms: Millis,
    pub peer: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    Backup,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Backup => "backup",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "backup" => Some(OperationKind::Backup),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(OperationState::Running),
            "succeeded" => Some(OperationState::Succeeded),
            "failed" => Some(OperationState::Failed),
            _ => None,
        }
    }
    pub fn is_finished(self) -> bool {
        self != OperationState::Running
    }
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
    pub kind: OperationKind,
    pub site_id: String,
    pub state: OperationState,
    pub error: String,
    pub requested_by: String,
    pub created_at_ms: Millis,
    pub updated_at_ms: Millis,
    pub steps: Vec<StepRecord>,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
