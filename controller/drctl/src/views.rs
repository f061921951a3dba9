//! Answers of the admin API turned into views: what `--output json` prints
//! and what the text printers read. Times are RFC 3339, ages in seconds.

use std::time::Duration;

use dr_proto::pb;
use serde::Serialize;

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn rfc3339(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
}

/// "3m 12s" style, to the second.
pub fn human_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    pub connected: bool,
    pub role: String,
    pub instance_id: String,
    pub private_ip: String,
    pub public_ip: String,
    pub os_family: String,
    pub app_state: String,
    pub last_heartbeat_at: Option<String>,
    pub last_heartbeat_age_s: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CopyView {
    pub region: String,
    pub image_id: String,
    pub state: String,
    pub attempts: u32,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct BackupView {
    pub image_id: String,
    pub state: String,
    pub fate: String,
    pub quiesce: String,
    pub frozen_ms: u64,
    pub quiesce_note: String,
    pub copies: Vec<CopyView>,
    pub site_id: String,
    pub operation_id: String,
    pub region: String,
    pub instance_id: String,
    pub snapshot_ids: Vec<String>,
    pub consistency: String,
    pub app_state: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub age_s: u64,
}

#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub instance_id: String,
    /// `primary`, `candidate`, `drill`, `spare`, `pending`, `passive` or `fenced`.
    pub role: String,
    pub reason: String,
    pub operation_id: String,
    pub connected: bool,
    pub private_ip: String,
    pub last_seen_at: Option<String>,
    /// How its agent's certificate was obtained: `instance-identity`,
    /// `token`, or `site-certificate` (a site-wide one, still allowed).
    pub attestation: String,
    pub cert_serial: String,
    pub cert_not_after: Option<String>,
    pub renewed_at: Option<String>,
    /// Why the last renewal failed ("" when it worked).
    pub renewal_error: String,
}

/// The whole fleet, whatever page or filter was asked for.
#[derive(Debug, Default, Serialize)]
pub struct SummaryView {
    pub sites: u32,
    pub primary_connected: u32,
    pub agents_connected: u32,
    pub late: u32,
    pub operations_active: u32,
    pub with_problems: u32,
}

pub fn summary_view(s: Option<pb::FleetSummary>) -> SummaryView {
    let s = s.unwrap_or_default();
    SummaryView {
        sites: s.sites,
        primary_connected: s.primary_connected,
        agents_connected: s.agents_connected,
        late: s.late,
        operations_active: s.operations_active,
        with_problems: s.with_problems,
    }
}

#[derive(Debug, Serialize)]
pub struct SiteView {
    pub site_id: String,
    /// The most recent failover or restore: id, state, when it last changed.
    pub last_failover: Option<LastFailoverView>,
    /// The most recent recorded drill.
    pub last_drill: Option<DrillView>,
    pub region: String,
    pub primary_instance_id: String,
    /// Every known instance of the site, primary first.
    pub instances: Vec<InstanceView>,
    /// What needs a human's attention.
    pub problems: Vec<String>,
    pub agent: Option<AgentView>,
    pub last_backup: Option<BackupView>,
    pub running_operation_id: Option<String>,
    pub schedule: Option<String>,
    pub quiesce: String,
    /// The RPO the schedule promises.
    pub rpo_target_s: Option<u64>,
    /// The current RPO: age of the newest good backup.
    pub rpo_s: Option<u64>,
    pub late: bool,
    /// The drill schedule and which backup it drills (absent: not scheduled).
    pub drill_schedule: Option<String>,
    pub drill_backup: Option<String>,
    /// Scheduled drills are overdue.
    pub drill_overdue: bool,
    /// The hot spare (absent: the policy keeps none).
    pub spare: Option<SpareView>,
    /// The health monitor's view (absent: not checked yet).
    pub health: Option<HealthView>,
    /// Agents of the site refused within the last day (expired certificate,
    /// another CA, a Hello naming another site...), the most recent first.
    pub refusals: Vec<RefusalView>,
}

/// Agents refused with one certificate for one reason, over their retries.
#[derive(Debug, Serialize)]
pub struct RefusalView {
    /// `expired`, `not_yet_valid`, `unknown_ca`, `invalid_certificate`,
    /// `wrong_site`, `unknown_site`, `wrong_trust_domain`, `not_a_site`.
    pub reason: String,
    /// "certificate expired 3 days ago".
    pub description: String,
    pub remedy: String,
    pub serial: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub identity: String,
    pub fingerprint: String,
    /// The chain is this deployment's CA's (apart from the time).
    pub ca_verified: bool,
    pub detail: String,
    /// Where the last attempt came from.
    pub peer: String,
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    pub count: u64,
    /// Still going on (also in `problems`).
    pub current: bool,
}

pub fn refusal_view(r: pb::AgentRefusal) -> RefusalView {
    RefusalView {
        not_before: rfc3339(r.not_before_ms),
        not_after: rfc3339(r.not_after_ms),
        first_at: rfc3339(r.first_ms),
        last_at: rfc3339(r.last_ms),
        reason: r.reason,
        description: r.description,
        remedy: r.remedy,
        serial: r.serial,
        identity: r.identity,
        fingerprint: r.fingerprint,
        ca_verified: r.ca_verified,
        detail: r.detail,
        peer: r.peer,
        count: r.count,
        current: r.current,
    }
}

#[derive(Debug, Serialize)]
pub struct HealthView {
    /// `healthy`, `suspect`, `down` or `recovering`.
    pub state: String,
    pub condition: String,
    pub since: Option<String>,
    /// How long the current condition has lasted.
    pub condition_for_s: u64,
    /// One line per signal: agent, ec2, probe.
    pub evidence: Vec<String>,
    pub decision: String,
    /// `auto_failover`: off, approve or auto.
    pub mode: String,
    pub checked_at: Option<String>,
    /// Automatic recovery paused until then (absent: not paused), by whom, why.
    pub paused_until: Option<String>,
    pub paused_by: Option<String>,
    pub pause_reason: Option<String>,
}

/// One event of the log (`drctl events`).
#[derive(Debug, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub id: String,
    pub at: Option<String>,
    pub site_id: String,
    pub kind: String,
    pub severity: String,
    pub summary: String,
    pub operation_id: String,
    pub evidence: serde_json::Value,
}

pub fn event_view(e: pb::Event) -> EventView {
    EventView {
        at: rfc3339(e.at_ms),
        evidence: serde_json::from_str(&e.evidence_json).unwrap_or(serde_json::Value::Null),
        seq: e.seq,
        id: e.id,
        site_id: e.site_id,
        kind: e.kind,
        severity: e.severity,
        summary: e.summary,
        operation_id: e.operation_id,
    }
}

#[derive(Debug, Serialize)]
pub struct SpareView {
    pub mode: String,
    pub region: String,
    pub failover_prefers: String,
    pub max_lag_s: u64,
    /// Absent: none installed yet.
    pub instance_id: Option<String>,
    pub backup_image_id: Option<String>,
    pub backup_started_at: Option<String>,
    /// How much older its backup is than the newest good backup.
    pub lag_s: u64,
    pub preparing_operation_id: Option<String>,
    /// The operation that prepared the installed spare.
    pub operation_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LastFailoverView {
    pub operation_id: String,
    pub state: String,
    pub at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StepView {
    pub name: String,
    pub state: String,
    pub attempts: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_s: Option<f64>,
    pub detail: String,
    pub error: String,
    /// The step's machine-readable result.
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct OperationView {
    pub id: String,
    pub kind: String,
    pub site_id: String,
    pub state: String,
    pub error: String,
    pub requested_by: String,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// While the state is `waiting`: what for, and what a human can do.
    pub waiting_for: String,
    /// Images and instances it keeps from retention and reconcilers.
    pub protects: Vec<String>,
    pub steps: Vec<StepView>,
    /// A failover's plan and report (RTO by phase, what a human must do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

pub fn backup_view(b: pb::Backup, now: u64) -> BackupView {
    BackupView {
        age_s: now.saturating_sub(b.completed_at_ms) / 1000,
        started_at: rfc3339(b.started_at_ms),
        completed_at: rfc3339(b.completed_at_ms),
        image_id: b.image_id,
        state: b.state,
        fate: b.fate,
        quiesce: b.quiesce,
        frozen_ms: b.frozen_ms,
        quiesce_note: b.quiesce_note,
        copies: b
            .copies
            .into_iter()
            .map(|c| CopyView { region: c.region, image_id: c.image_id, state: c.state, attempts: c.attempts, error: c.error })
            .collect(),
        site_id: b.site_id,
        operation_id: b.operation_id,
        region: b.region,
        instance_id: b.instance_id,
        snapshot_ids: b.snapshot_ids,
        consistency: b.consistency,
        app_state: b.app_state,
    }
}

pub fn site_view(s: pb::SiteStatus, now: u64) -> SiteView {
    let agent = s.facts.map(|f| AgentView {
        connected: s.agent_connected,
        role: s.role.clone(),
        instance_id: f.instance_id,
        private_ip: f.private_ip,
        public_ip: f.public_ip,
        os_family: f.os_family,
        app_state: f.app_state,
        last_heartbeat_at: rfc3339(s.last_heartbeat_ms),
        last_heartbeat_age_s: (s.last_heartbeat_ms > 0).then(|| now.saturating_sub(s.last_heartbeat_ms) / 1000),
    });
    let last_backup = s.last_backup.map(|b| backup_view(b, now));
    let instances = s
        .instances
        .into_iter()
        .map(|i| InstanceView {
            private_ip: i.facts.map(|f| f.private_ip).unwrap_or_default(),
            last_seen_at: rfc3339(i.last_seen_ms),
            instance_id: i.instance_id,
            role: i.role,
            reason: i.reason,
            operation_id: i.operation_id,
            connected: i.connected,
            attestation: i.attestation,
            cert_serial: i.cert_serial,
            cert_not_after: rfc3339(i.cert_not_after_ms),
            renewed_at: rfc3339(i.renewed_at_ms),
            renewal_error: i.renewal_error,
        })
        .collect();
    SiteView {
        last_failover: (!s.last_failover_id.is_empty()).then(|| LastFailoverView {
            operation_id: s.last_failover_id.clone(),
            state: s.last_failover_state.clone(),
            at: rfc3339(s.last_failover_at_ms),
        }),
        last_drill: s.last_drill.map(drill_view),
        refusals: s.refusals.into_iter().map(refusal_view).collect(),
        instances,
        problems: s.problems,
        rpo_s: last_backup.as_ref().map(|b| b.age_s),
        site_id: s.site_id,
        region: s.region,
        primary_instance_id: s.primary_instance_id,
        agent,
        last_backup,
        running_operation_id: Some(s.running_operation_id).filter(|id| !id.is_empty()),
        schedule: Some(s.schedule).filter(|x| !x.is_empty()),
        quiesce: s.quiesce,
        rpo_target_s: (s.rpo_target_ms > 0).then_some(s.rpo_target_ms / 1000),
        late: s.late,
        drill_schedule: Some(s.drill_schedule).filter(|x| !x.is_empty()),
        drill_backup: Some(s.drill_backup).filter(|x| !x.is_empty()),
        drill_overdue: s.drill_overdue,
        health: s.health.map(|h| HealthView {
            since: (h.since_ms > 0).then(|| rfc3339(h.since_ms)).flatten(),
            condition_for_s: now.saturating_sub(h.condition_since_ms) / 1000,
            checked_at: (h.checked_at_ms > 0).then(|| rfc3339(h.checked_at_ms)).flatten(),
            paused_until: (h.paused_until_ms > 0).then(|| rfc3339(h.paused_until_ms)).flatten(),
            paused_by: Some(h.paused_by).filter(|x| !x.is_empty()),
            pause_reason: Some(h.pause_reason).filter(|x| !x.is_empty()),
            state: h.state,
            condition: h.condition,
            evidence: h.evidence,
            decision: h.decision,
            mode: h.mode,
        }),
        spare: s.spare.map(|p| SpareView {
            instance_id: Some(p.instance_id).filter(|x| !x.is_empty()),
            backup_image_id: Some(p.backup_image_id).filter(|x| !x.is_empty()),
            backup_started_at: (p.backup_started_at_ms > 0).then(|| rfc3339(p.backup_started_at_ms)).flatten(),
            lag_s: p.lag_ms / 1000,
            preparing_operation_id: Some(p.preparing_operation_id).filter(|x| !x.is_empty()),
            operation_id: Some(p.operation_id).filter(|x| !x.is_empty()),
            mode: p.mode,
            region: p.region,
            failover_prefers: p.failover_prefers,
            max_lag_s: p.max_lag_ms / 1000,
        }),
    }
}

pub fn operation_view(op: pb::Operation) -> OperationView {
    OperationView {
        waiting_for: op.waiting_for.clone(),
        protects: op.protects.clone(),
        plan: serde_json::from_str(&op.plan_json).ok(),
        report: serde_json::from_str(&op.report_json).ok(),
        created_at: rfc3339(op.created_at_ms),
        updated_at: rfc3339(op.updated_at_ms),
        steps: op
            .steps
            .into_iter()
            .map(|s| StepView {
                duration_s: (s.started_at_ms > 0 && s.finished_at_ms >= s.started_at_ms)
                    .then(|| (s.finished_at_ms - s.started_at_ms) as f64 / 1000.0),
                started_at: rfc3339(s.started_at_ms),
                finished_at: rfc3339(s.finished_at_ms),
                result: serde_json::from_str(&s.result_json).ok(),
                name: s.name,
                state: s.state,
                attempts: s.attempts,
                detail: s.detail,
                error: s.error,
            })
            .collect(),
        id: op.id,
        kind: op.kind,
        site_id: op.site_id,
        state: op.state,
        error: op.error,
        requested_by: op.requested_by,
    }
}

#[derive(Debug, Serialize)]
pub struct DecisionView {
    pub image_id: String,
    pub completed_at: Option<String>,
    pub action: &'static str,
    pub reason: String,
}

pub fn decision_views(reply: pb::PruneReply) -> Vec<DecisionView> {
    reply
        .decisions
        .into_iter()
        .map(|d| DecisionView {
            completed_at: rfc3339(d.completed_at_ms),
            action: if d.keep { "keep" } else { "delete" },
            image_id: d.image_id,
            reason: d.reason,
        })
        .collect()
}

/// One drill's measured result (`drctl drills`, status, `drill --wait`).
#[derive(Debug, Serialize)]
pub struct DrillView {
    pub operation_id: String,
    pub ok: bool,
    pub error: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub backup_image_id: String,
    pub backup_started_at: Option<String>,
    pub region: String,
    pub instance_id: String,
    pub hostname: String,
    /// Drill start to app healthy on the copy.
    pub rto_s: f64,
    /// The backup's age at the drill's start.
    pub rpo_s: f64,
    /// The worst RPO over the window before the drill.
    pub worst_rpo_s: f64,
    pub worst_rpo_window_s: f64,
    /// The newest build the copy holds, and the drill start minus it.
    pub newest_build_at: Option<String>,
    pub data_age_s: Option<f64>,
    pub phases_s: std::collections::BTreeMap<String, f64>,
    pub teardown: String,
    pub leaked: Vec<String>,
    pub requested_by: String,
}

pub fn drill_view(d: pb::Drill) -> DrillView {
    let s = |ms: u64| ms as f64 / 1000.0;
    DrillView {
        ok: d.ok,
        error: d.error,
        started_at: rfc3339(d.started_at_ms),
        finished_at: rfc3339(d.finished_at_ms),
        backup_image_id: d.backup_image_id,
        backup_started_at: rfc3339(d.backup_started_at_ms),
        region: d.region,
        instance_id: d.instance_id,
        hostname: d.hostname,
        rto_s: s(d.rto_ms),
        rpo_s: s(d.rpo_ms),
        worst_rpo_s: s(d.worst_rpo_ms),
        worst_rpo_window_s: s(d.worst_rpo_window_ms),
        newest_build_at: rfc3339(d.newest_build_at_ms),
        data_age_s: (d.newest_build_at_ms > 0).then(|| s(d.data_age_ms)),
        phases_s: d.phases.into_iter().map(|(k, v)| (k, s(v))).collect(),
        teardown: d.teardown,
        leaked: d.leaked,
        requested_by: d.requested_by,
        operation_id: d.operation_id,
    }
}

/// A CA rotation (`drctl rotate-ca`, `drctl status`).
#[derive(Debug, Default, Serialize)]
pub struct RotationView {
    /// `init`, `update_clients`, `update_servers`, `complete`, `rollback`; "" none.
    pub phase: String,
    pub since: Option<String>,
    /// `site/instance` of enrolled instances that have not stored the current roots.
    pub not_acknowledged: Vec<String>,
    /// `site/instance` of live sessions on the root being dropped.
    pub on_old_root: Vec<String>,
    pub next: String,
}

pub fn rotation_view(r: pb::CaRotation) -> RotationView {
    RotationView {
        phase: r.phase,
        since: rfc3339(r.since_ms),
        not_acknowledged: r.not_acknowledged,
        on_old_root: r.on_old_root,
        next: r.next,
    }
}

/// The controller replica that answered (`drctl status`).
#[derive(Serialize)]
pub struct ReplicaView {
    pub replica_id: String,
    pub address: String,
    pub epoch: i64,
    /// `sqlite` (one controller) or `postgresql` (replicas, one leads).
    pub store: String,
}

pub fn replica_view(r: pb::ControllerReplica) -> ReplicaView {
    ReplicaView { replica_id: r.replica_id, address: r.address, epoch: r.epoch, store: r.store }
}
