//! The admin API (`AdminService`) that drctl talks to. Only operator
//! certificates of our trust domain may call it. Protobuf types end here:
//! everything behind this module works on [`crate::domain::model`] types.

use std::pin::Pin;
use std::time::Duration;

use dr_proto::identity::peer_identity;
use dr_proto::pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agents::{LiveAgent, Registry};
use crate::domain::model::*;
use crate::domain::refusal::AgentRefusal;
use crate::engine::{EngineError, Workflow};
use crate::store::{FleetView, Store, StoreError};
use crate::workflows::Engine;

#[derive(Clone)]
pub struct AdminServer {
    pub trust_domain: String,
    pub store: Store,
    pub registry: Registry,
    pub engine: Engine,
    /// Records operator events (pauses) with their webhook deliveries.
    pub notifier: crate::reconcilers::notify::Notifier,
    /// Open fence breaches (fenced instances running again), shown as
    /// problems of their site.
    pub fences: crate::reconcilers::fences::Fences,
    /// `[health] interval`: evidence older than three passes is stale.
    pub health_interval: Duration,
    /// Enrolment tokens; whether site-wide certificates still hold sessions.
    pub authority: std::sync::Arc<crate::agents::enrol::Authority>,
    /// CA rotation.
    pub rotator: crate::reconcilers::rotation::Rotator,
    /// Which replica this is (shown by `drctl status`).
    pub leadership: crate::store::lease::Leadership,
}

fn rotation_to_pb(v: crate::reconcilers::rotation::RotationView) -> pb::CaRotation {
    pb::CaRotation { phase: v.phase, since_ms: v.since_ms, not_acknowledged: v.not_acknowledged, on_old_root: v.on_old_root, next: v.next }
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "admin API: store error");
    Status::internal(e.to_string())
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::UnknownSite(s) => Status::not_found(format!("unknown site `{s}`")),
        EngineError::UnknownOperation(s) => Status::not_found(format!("unknown operation `{s}`")),
        EngineError::BadSignal { .. } => Status::failed_precondition(e.to_string()),
        EngineError::Store(StoreError::Busy { site, operation }) => {
            Status::failed_precondition(format!("site `{site}` already has a running operation {operation}"))
        }
        EngineError::Store(e) => internal(e),
    }
}

impl AdminServer {
    /// The caller's operator name, or PermissionDenied.
    fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let identity = peer_identity(request).map_err(|e| {
            tracing::warn!(%peer, error = %e, "admin call refused");
            Status::unauthenticated(e.to_string())
        })?;
        identity.require_operator(&self.trust_domain).map(str::to_owned).map_err(|e| {
            tracing::warn!(%peer, %identity, error = %e, "admin call refused");
            Status::permission_denied(e.to_string())
        })
    }

    async fn known_site(&self, site_id: &str) -> Result<Site, Status> {
        self.store.site(site_id.to_owned()).await.map_err(internal)?.ok_or_else(|| Status::not_found(format!("unknown site `{site_id}`")))
    }

    async fn operation(&self, id: &str) -> Result<Operation, Status> {
        self.store.operation(id.to_owned()).await.map_err(internal)?.ok_or_else(|| Status::not_found(format!("unknown operation `{id}`")))
    }

    /// One site's status from the fleet view and the live sessions.
    fn site_status(&self, site: &Site, view: &FleetView, live: &[LiveAgent], now: Millis) -> pb::SiteStatus {
        let deps = self.engine.deps();
        let mut instances: Vec<InstanceRecord> = view.instances.get(&site.id).cloned().unwrap_or_default();
        for l in live {
            match instances.iter_mut().find(|i| i.instance_id == l.record.instance_id) {
                Some(i) => {
                    // The stored public address is the newer one: each Hello
                    // writes both, a failover's Elastic IP move the store's.
                    let public_ip = std::mem::take(&mut i.facts.public_ip);
                    *i = l.record.clone();
                    if !public_ip.is_empty() {
                        i.facts.public_ip = public_ip;
                    }
                }
                None => instances.push(l.record.clone()),
            }
        }
        // Primary first, then the most recently seen.
        instances.sort_by_key(|i| (i.instance_id != site.primary_instance_id, std::cmp::Reverse(i.last_seen_ms)));
        let role_now = |i: &InstanceRecord| {
            live.iter()
                .find(|l| l.record.instance_id == i.instance_id)
                .map(|l| l.role.clone())
                .unwrap_or_else(|| crate::agents::role_of(site, &i.instance_id, Some(i)))
        };
        let primary = instances.iter().find(|i| i.instance_id == site.primary_instance_id);
        let primary_live = live.iter().find(|l| l.record.instance_id == site.primary_instance_id);
        let last_backup = view.newest_backup.get(&site.id);
        let policy = deps.policy(&site.id);
        let rpo_target = policy.schedule.as_ref().and_then(|s| s.nominal_interval(now));
        // Late: the newest good backup is older than the target plus the
        // jitter window plus the time a backup may take.
        let late = rpo_target.is_some_and(|t| {
            let allowed = t.saturating_add(policy.jitter).saturating_add(deps.backup.timeout).as_millis() as u64;
            last_backup.is_none_or(|b| now.saturating_sub(b.completed_at_ms) > allowed)
        });
        let active = view.active.get(&site.id).cloned().unwrap_or_default();
        let last_failover = view.last_failover.get(&site.id);
        let mut problems = Vec::new();
        let last_drill = view.last_drill.get(&site.id);
        if let Some(d) = last_drill.filter(|d| !d.ok) {
            problems.push(format!("the last drill {} failed: {}", d.operation_id, d.error));
        }
        let drill_slot =
            view.slots.get(&(site.id.clone(), <crate::workflows::drill::Drill as crate::engine::Workflow>::KIND.to_owned())).copied();
        let drill_overdue = policy.drill_overdue(deps.drill.lease, last_drill.map(|d| d.started_at_ms), drill_slot, now);
        if drill_overdue {
            problems.push(match last_drill {
                Some(d) => format!(
                    "drills are overdue: the last one started {} ago",
                    humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(d.started_at_ms) / 1000))
                ),
                None => "drills are overdue: none was recorded since the drill schedule began".to_owned(),
            });
        }
        if let Some((id, state, _)) = last_failover.filter(|f| f.1 == OperationState::Failed) {
            problems.push(format!("the last failover {id} {}", state.as_str()));
        }
        if late {
            problems.push("the newest good backup is older than the schedule allows".to_owned());
        }
        match primary_live {
            None => problems.push(format!("the agent of primary {} is not connected", site.primary_instance_id)),
            Some(l) if l.role == Role::Pending => {
                problems.push(format!("the agent of primary {} is not confirmed by EC2 yet", site.primary_instance_id))
            }
            Some(l) if l.role != Role::Primary => {
                problems.push(format!("the agent of primary {} is {}: {}", site.primary_instance_id, l.role.name(), l.role.reason()))
            }
            Some(_) => {}
        }
        // Agents of the site refused (expired certificate, ...): current
        // ones are problems, and a silent primary reads as refused.
        let refusals: Vec<(AgentRefusal, bool)> =
            view.refusals.get(&site.id).into_iter().flatten().map(|r| (r.clone(), refusal_is_current(r, primary_live, now))).collect();
        for (r, _) in refusals.iter().filter(|(_, current)| *current) {
            problems.push(format!("{}; {}", r.line(now), r.remedy()));
        }
        // The health line names the most telling one: a certificate of ours
        // (expired, ...) before one that only claims the site.
        let current_refusal =
            refusals.iter().filter(|(_, current)| *current).max_by_key(|(r, _)| (r.ca_verified, r.last_ms)).map(|(r, _)| r);
        for l in live {
            if let Role::Fenced { reason } = &l.role
                && !self.fences.is_open(&site.id, &l.record.instance_id)
            {
                problems.push(format!("fenced instance {} is running its agent ({reason})", l.record.instance_id));
            }
        }
        // A fenced instance running again, until it is stopped again.
        problems.extend(self.fences.problems(&site.id, now));
        for a in &active {
            if a.state == OperationState::Waiting {
                problems.push(format!("operation {} waits for a human", a.id));
            }
        }
        let spare = (policy.spare != crate::domain::policy::SpareMode::Off).then(|| {
            let installed = view.spares.get(&site.id);
            let region = crate::workflows::failover::plan::spare_region(&policy, &deps.recovery(&site.id), site);
            if installed.is_none() {
                problems.push("the policy keeps a hot spare but none is installed yet".to_owned());
            }
            pb::SpareStatus {
                mode: policy.spare.as_str().to_owned(),
                region,
                failover_prefers: policy.failover_prefers.as_str().to_owned(),
                max_lag_ms: policy.spare_max_lag.as_millis() as u64,
                instance_id: installed.map(|s| s.instance_id.clone()).unwrap_or_default(),
                backup_image_id: installed.map(|s| s.backup_image_id.clone()).unwrap_or_default(),
                backup_started_at_ms: installed.map(|s| s.backup_started_at_ms).unwrap_or(0),
                lag_ms: installed.map_or(0, |s| s.lag_behind(last_backup)),
                preparing_operation_id: active.iter().find(|a| a.kind == "spare").map(|a| a.id.clone()).unwrap_or_default(),
                operation_id: installed.map(|s| s.operation_id.clone()).unwrap_or_default(),
            }
        });
        if let Some(reason) = view.revocations.get(&(site.id.clone(), String::new())) {
            problems.push(format!("the site's certificates are revoked ({reason}): its agents cannot connect or enrol"));
        }
        for l in live.iter().filter(|l| l.attestation == crate::agents::enrol::BY_SITE_CERTIFICATE) {
            problems.push(format!(
                "instance {} still connects with the site-wide certificate: upgrade its agent so that it enrols",
                l.record.instance_id
            ));
        }
        for i in &instances {
            if let Some(c) = view.certs.get(&(site.id.clone(), i.instance_id.clone())).filter(|c| !c.renewal_error.is_empty()) {
                problems.push(format!("the renewal of instance {}'s certificate failed: {}", i.instance_id, c.renewal_error));
            }
        }
        let pause = view.pauses.get(&site.id);
        if let Some(p) = pause {
            problems.push(format!("automatic recovery is paused by {} ({})", p.by, p.reason));
        }
        let health = view.health.get(&site.id).map(|h| {
            if matches!(h.state, crate::domain::health::HealthState::Down | crate::domain::health::HealthState::Suspect) {
                problems.push(format!("health: {} ({}): {}", h.state.as_str(), h.condition.as_str(), h.decision));
            }
            pb::SiteHealth {
                state: h.state.as_str().to_owned(),
                condition: h.condition.as_str().to_owned(),
                since_ms: h.since_ms,
                condition_since_ms: h.condition_since_ms,
                evidence: h.evidence.as_ref().map(|e| refused_evidence(e.lines(now), current_refusal, now)).unwrap_or_default(),
                decision: h.decision.clone(),
                mode: policy.health.mode.as_str().to_owned(),
                checked_at_ms: h.checked_at_ms,
                paused_until_ms: pause.map_or(0, |p| p.until_ms),
                paused_by: pause.map(|p| p.by.clone()).unwrap_or_default(),
                pause_reason: pause.map(|p| p.reason.clone()).unwrap_or_default(),
            }
        });
        pb::SiteStatus {
            health,
            spare,
            site_id: site.id.clone(),
            region: site.region.clone(),
            primary_instance_id: site.primary_instance_id.clone(),
            agent_connected: primary_live.is_some(),
            facts: primary.map(|a| facts_to_pb(&a.facts)),
            role: primary_live.map(|l| l.role.name().to_owned()).unwrap_or_default(),
            last_heartbeat_ms: primary.map(|a| a.last_seen_ms).unwrap_or(0),
            last_backup: last_backup.map(backup_to_pb),
            running_operation_id: active.first().map(|a| a.id.clone()).unwrap_or_default(),
            schedule: policy.schedule.as_ref().map(|s| s.describe()).unwrap_or_default(),
            rpo_target_ms: rpo_target.map(|t| t.as_millis() as u64).unwrap_or(0),
            late,
            quiesce: policy.quiesce.as_str().to_owned(),
            instances: instances
                .iter()
                .map(|i| {
                    let role = role_now(i);
                    let cert = view.certs.get(&(site.id.clone(), i.instance_id.clone()));
                    let live_agent = live.iter().find(|l| l.record.instance_id == i.instance_id);
                    pb::InstanceStatus {
                        attestation: live_agent
                            .map(|l| l.attestation.clone())
                            .filter(|a| !a.is_empty())
                            .or_else(|| cert.map(|c| c.attestation.clone()))
                            .unwrap_or_default(),
                        cert_serial: live_agent
                            .map(|l| l.cert_serial.clone())
                            .filter(|s| !s.is_empty())
                            .or_else(|| cert.map(|c| c.current_serial.clone()))
                            .unwrap_or_default(),
                        cert_not_after_ms: cert.map(|c| c.current_not_after_ms).unwrap_or(i.cert_not_after_ms),
                        renewed_at_ms: cert.map(|c| c.renewed_at_ms).unwrap_or(0),
                        renewal_error: cert.map(|c| c.renewal_error.clone()).unwrap_or_default(),
                        instance_id: i.instance_id.clone(),
                        role: role.name().to_owned(),
                        reason: role.reason().to_owned(),
                        operation_id: role.operation_id().to_owned(),
                        connected: live.iter().any(|l| l.record.instance_id == i.instance_id),
                        last_seen_ms: i.last_seen_ms,
                        facts: Some(facts_to_pb(&i.facts)),
                    }
                })
                .collect(),
            problems,
            last_failover_id: last_failover.map(|f| f.0.clone()).unwrap_or_default(),
            last_failover_state: last_failover.map(|f| f.1.as_str().to_owned()).unwrap_or_default(),
            last_failover_at_ms: last_failover.map(|f| f.2).unwrap_or(0),
            last_drill: last_drill.map(drill_to_pb),
            drill_schedule: policy.drill_schedule.as_ref().map(|s| s.describe()).unwrap_or_default(),
            drill_backup: policy.drill_schedule.as_ref().map(|_| policy.drill_backup.describe()).unwrap_or_default(),
            drill_overdue,
            refusals: refusals.iter().map(|(r, current)| refusal_to_pb(r, *current, now)).collect(),
        }
    }
}

/// How long a refusal stays a problem without a new attempt.
const REFUSAL_CURRENT_MS: Millis = 3600 * 1000;

/// A refusal still going on: seen within the last hour, and the site's
/// primary has not connected since (a primary that connected after it was
/// probably the refused agent, given a new certificate).
fn refusal_is_current(r: &AgentRefusal, primary_live: Option<&LiveAgent>, now: Millis) -> bool {
    now.saturating_sub(r.last_ms) <= REFUSAL_CURRENT_MS && primary_live.is_none_or(|l| l.record.connected_at_ms <= r.last_ms)
}

/// The health evidence with the agent line saying why the agent is silent
/// when it was refused: `agent: refused (certificate expired 3 days ago)`.
fn refused_evidence(mut lines: Vec<String>, refusal: Option<&AgentRefusal>, now: Millis) -> Vec<String> {
    if let Some(r) = refusal
        && let Some(agent) = lines.iter_mut().find(|l| l.starts_with("agent: silent"))
    {
        *agent = r.agent_line(now);
    }
    lines
}

fn refusal_to_pb(r: &AgentRefusal, current: bool, now: Millis) -> pb::AgentRefusal {
    pb::AgentRefusal {
        reason: r.reason.as_str().to_owned(),
        description: r.describe(now),
        remedy: r.remedy(),
        serial: r.serial.clone(),
        not_before_ms: r.not_before_ms,
        not_after_ms: r.not_after_ms,
        identity: r.identity.clone(),
        fingerprint: r.fingerprint.clone(),
        ca_verified: r.ca_verified,
        detail: r.detail.clone(),
        peer: r.peer.clone(),
        first_ms: r.first_ms,
        last_ms: r.last_ms,
        count: r.count,
        current,
    }
}

fn facts_to_pb(f: &InstanceFacts) -> pb::InstanceFacts {
    pb::InstanceFacts {
        instance_id: f.instance_id.clone(),
        private_ip: f.private_ip.clone(),
        public_ip: f.public_ip.clone(),
        boot_id: f.boot_id.clone(),
        os_family: f.os_family.clone(),
        app_state: f.app_state.clone(),
    }
}

fn backup_to_pb(b: &Backup) -> pb::Backup {
    pb::Backup {
        site_id: b.site_id.clone(),
        operation_id: b.operation_id.clone(),
        image_id: b.image_id.clone(),
        region: b.region.clone(),
        snapshot_ids: b.snapshot_ids.clone(),
        started_at_ms: b.started_at_ms,
        completed_at_ms: b.completed_at_ms,
        consistency: b.consistency.as_str().to_owned(),
        instance_id: b.instance_id.clone(),
        app_state: b.app_state.clone(),
        state: b.state.as_str().to_owned(),
        fate: b.fate.clone(),
        quiesce: b.quiesce.clone(),
        frozen_ms: b.frozen_ms,
        quiesce_note: b.quiesce_note.clone(),
        copies: b
            .copies
            .iter()
            .map(|c| pb::BackupCopy {
                region: c.region.clone(),
                image_id: c.image_id.clone(),
                state: c.state.as_str().to_owned(),
                attempts: c.attempts,
                error: c.error.clone(),
            })
            .collect(),
    }
}

/// A top-level field of a failover's typed state, as JSON ("" otherwise).
fn wf_field(op: &Operation, name: &str) -> String {
    if op.kind != crate::workflows::failover::Failover::KIND && op.kind != crate::workflows::drill::Drill::KIND {
        return String::new();
    }
    match op.wf_state.as_ref().and_then(|s| s.get(name)) {
        Some(v) if !v.is_null() => v.to_string(),
        _ => String::new(),
    }
}

fn operation_to_pb(op: &Operation) -> pb::Operation {
    pb::Operation {
        id: op.id.clone(),
        kind: op.kind.clone(),
        site_id: op.site_id.clone(),
        state: op.state.as_str().to_owned(),
        error: op.error.clone(),
        created_at_ms: op.created_at_ms,
        updated_at_ms: op.updated_at_ms,
        requested_by: op.requested_by.clone(),
        waiting_for: op.waiting_for.clone(),
        plan_json: wf_field(op, "plan"),
        report_json: wf_field(op, "report"),
        protects: op
            .protects
            .iter()
            .map(|p| match p {
                Protected::Image(i) => format!("image {i}"),
                Protected::Instance(i) => format!("instance {i}"),
            })
            .collect(),
        steps: op
            .steps
            .iter()
            .map(|s| pb::Step {
                name: s.name.clone(),
                state: s.state.as_str().to_owned(),
                started_at_ms: s.started_at_ms,
                finished_at_ms: s.finished_at_ms,
                detail: s.detail.clone(),
                error: s.error.clone(),
                attempts: s.attempts,
                result_json: s.result.as_ref().map(|r| r.to_string()).unwrap_or_default(),
            })
            .collect(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Operation, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminServer {
    /// A page of sites and the fleet's summary, from a fixed number of store
    /// queries whatever the fleet's size.
    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        self.operator(&request)?;
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 100,
            n => n.min(1000),
        } as usize;
        let view = self.store.fleet_view().await.map_err(internal)?;
        let now = now_ms();
        let mut summary = pb::FleetSummary { sites: view.sites.len() as u32, ..Default::default() };
        let live = self.registry.live_by_site();
        summary.agents_connected = live.values().map(Vec::len).sum::<usize>() as u32;
        let mut page = Vec::new();
        let mut next_page_token = String::new();
        for site in &view.sites {
            let status = self.site_status(site, &view, live.get(&site.id).map_or(&[][..], Vec::as_slice), now);
            summary.primary_connected += u32::from(status.role == "primary");
            summary.late += u32::from(status.late);
            summary.operations_active += view.active.get(&site.id).map_or(0, |a| a.len() as u32);
            summary.with_problems += u32::from(!status.problems.is_empty());
            let wanted = (req.site_ids.is_empty() || req.site_ids.contains(&site.id))
                && (!req.problems_only || !status.problems.is_empty())
                && site.id.as_str() > req.page_token.as_str();
            if !wanted {
                continue;
            }
            if page.len() == page_size {
                if next_page_token.is_empty() {
                    next_page_token = page.last().map(|s: &pb::SiteStatus| s.site_id.clone()).unwrap_or_default();
                }
                continue;
            }
            page.push(status);
        }
        for id in &req.site_ids {
            if !view.sites.iter().any(|s| &s.id == id) {
                return Err(Status::not_found(format!("unknown site `{id}`")));
            }
        }
        let rotation = self.rotator.view().await.map_err(Status::internal)?;
        let ca_rotation = (!rotation.phase.is_empty()).then(|| rotation_to_pb(rotation));
        let l = &self.leadership;
        let controller = Some(pb::ControllerReplica {
            replica_id: l.id().to_owned(),
            address: l.address().to_owned(),
            epoch: l.epoch().unwrap_or_default(),
            store: if l.is_replica() { "postgresql" } else { "sqlite" }.into(),
        });
        Ok(Response::new(pb::StatusReply { sites: page, now_ms: now, summary: Some(summary), next_page_token, ca_rotation, controller }))
    }

    async fn start_backup(&self, request: Request<pb::StartBackupRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let operator = self.operator(&request)?;
        let site_id = request.into_inner().site_id;
        let op =
            crate::workflows::backup::start(&self.engine, &site_id, &format!("operator/{operator}"), None).await.map_err(engine_status)?;
        crate::engine::faults::crash_point("api.start_backup.before_reply");
        Ok(Response::new(pb::OperationRef { operation_id: op.id }))
    }

    async fn start_failover(&self, request: Request<pb::StartFailoverRequest>) -> Result<Response<pb::StartFailoverReply>, Status> {
        use crate::workflows::failover;
        let operator = self.operator(&request)?;
        let r = request.into_inner();
        let site = self
            .store
            .site(r.site_id.clone())
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("unknown site `{}`", r.site_id)))?;
        if !r.region.is_empty() && !crate::domain::recovery::is_region(&r.region) {
            return Err(Status::invalid_argument(format!("`{}` is not a region name", r.region)));
        }
        if r.failback && r.restore {
            return Err(Status::invalid_argument("a failback is not a restore: give one of them"));
        }
        let req = failover::Request {
            backup_image_id: r.backup_image_id,
            region: r.region,
            restore: r.restore,
            failback: r.failback,
            fresh: r.fresh,
            use_spare: r.use_spare,
            ..Default::default()
        };
        let plan = failover::plan::make(self.engine.deps(), &site, &req).await.map_err(plan_status)?;
        let plan_json = serde_json::to_string(&plan).expect("plans serialize");
        if r.plan_only {
            return Ok(Response::new(pb::StartFailoverReply { operation_id: String::new(), plan_json }));
        }
        let op = failover::start(&self.engine, plan, &format!("operator/{operator}")).await.map_err(engine_status)?;
        crate::engine::faults::crash_point("api.start_failover.before_reply");
        Ok(Response::new(pb::StartFailoverReply { operation_id: op.id, plan_json }))
    }

    async fn start_drill(&self, request: Request<pb::StartDrillRequest>) -> Result<Response<pb::StartFailoverReply>, Status> {
        use crate::workflows::{drill, failover};
        let operator = self.operator(&request)?;
        let r = request.into_inner();
        let site = self.known_site(&r.site_id).await?;
        if !r.region.is_empty() && !crate::domain::recovery::is_region(&r.region) {
            return Err(Status::invalid_argument(format!("`{}` is not a region name", r.region)));
        }
        let max_keep = self.engine.deps().drill.max_keep;
        let keep = std::time::Duration::from_millis(r.keep_ms);
        if keep > max_keep {
            return Err(Status::invalid_argument(format!(
                "--keep {} is longer than [drill] max_keep ({})",
                humantime::format_duration(keep),
                humantime::format_duration(max_keep)
            )));
        }
        if !r.backup_image_id.is_empty() && r.random_within_ms > 0 {
            return Err(Status::invalid_argument("--backup and --random-within exclude each other"));
        }
        let req = failover::Request {
            backup_image_id: r.backup_image_id,
            region: r.region,
            drill: true,
            random_within_ms: r.random_within_ms,
            ..Default::default()
        };
        let plan = failover::plan::make(self.engine.deps(), &site, &req).await.map_err(plan_status)?;
        let plan_json = serde_json::to_string(&plan).expect("plans serialize");
        if r.plan_only {
            return Ok(Response::new(pb::StartFailoverReply { operation_id: String::new(), plan_json }));
        }
        let op = drill::start(&self.engine, plan, keep, &format!("operator/{operator}"), None).await.map_err(engine_status)?;
        crate::engine::faults::crash_point("api.start_drill.before_reply");
        Ok(Response::new(pb::StartFailoverReply { operation_id: op.id, plan_json }))
    }

    async fn list_drills(&self, request: Request<pb::ListDrillsRequest>) -> Result<Response<pb::ListDrillsReply>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let site = self.known_site(&r.site_id).await?;
        let limit = if r.limit == 0 { 20 } else { r.limit.min(1000) };
        let drills = self.store.drills(site.id.clone(), limit).await.map_err(internal)?;
        Ok(Response::new(pb::ListDrillsReply { drills: drills.iter().map(drill_to_pb).collect() }))
    }

    async fn list_events(&self, request: Request<pb::ListEventsRequest>) -> Result<Response<pb::ListEventsReply>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        if !r.site_id.is_empty() {
            self.known_site(&r.site_id).await?;
        }
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let events = self.store.events(r.site_id, r.after_seq, limit, r.newest).await.map_err(internal)?;
        Ok(Response::new(pb::ListEventsReply {
            events: events
                .into_iter()
                .map(|e| pb::Event {
                    seq: e.seq,
                    id: e.id,
                    at_ms: e.at_ms,
                    site_id: e.site_id,
                    kind: e.kind,
                    severity: e.severity,
                    summary: e.summary,
                    evidence_json: serde_json::to_string(&e.evidence).unwrap_or_default(),
                    operation_id: e.operation_id,
                })
                .collect(),
        }))
    }

    async fn pause_recovery(&self, request: Request<pb::PauseRecoveryRequest>) -> Result<Response<pb::PauseRecoveryReply>, Status> {
        let operator = self.operator(&request)?;
        let r = request.into_inner();
        let site = self.known_site(&r.site_id).await?;
        let max = crate::domain::health::MAX_PAUSE.as_millis() as u64;
        if r.for_ms > max {
            return Err(Status::invalid_argument(format!(
                "a pause is at most {} (asked: {})",
                humantime::format_duration(crate::domain::health::MAX_PAUSE),
                humantime::format_duration(std::time::Duration::from_millis(r.for_ms))
            )));
        }
        if r.reason.len() > 500 || r.reason.chars().any(char::is_control) {
            return Err(Status::invalid_argument("the reason must be one line of at most 500 bytes"));
        }
        let now = now_ms();
        let until_ms = if r.for_ms == 0 { 0 } else { now + r.for_ms };
        let pause = crate::domain::health::Pause {
            site_id: site.id.clone(),
            by: format!("operator/{operator}"),
            reason: r.reason,
            at_ms: now,
            until_ms,
        };
        self.notifier.set_pause(pause).await.map_err(internal)?;
        tracing::warn!(site = %site.id, %operator, until_ms, "automatic recovery {}", if until_ms == 0 { "resumed" } else { "paused" });
        Ok(Response::new(pb::PauseRecoveryReply { paused_until_ms: until_ms }))
    }

    async fn revoke(&self, request: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeReply>, Status> {
        let operator = self.operator(&request)?;
        let r = request.into_inner();
        let site = self.known_site(&r.site_id).await?;
        if r.reason.len() > 500 || r.reason.chars().any(char::is_control) {
            return Err(Status::invalid_argument("the reason must be one line of at most 500 bytes"));
        }
        if r.undo {
            if !r.serial.is_empty() {
                return Err(Status::invalid_argument("undo lifts a revocation of the whole site: give no serial"));
            }
            let had = self.store.unrevoke_site(site.id.clone()).await.map_err(internal)?;
            tracing::warn!(site = %site.id, %operator, had, "site revocation lifted");
            return Ok(Response::new(pb::RevokeReply { closed: 0 }));
        }
        let serial = if r.serial.is_empty() {
            String::new()
        } else {
            crate::agents::enrol::normalize_serial(&r.serial).map_err(Status::invalid_argument)?
        };
        let reason =
            if r.reason.is_empty() { format!("revoked by operator/{operator}") } else { format!("{} (operator/{operator})", r.reason) };
        // Recorded first: a stream that reconnects between the two is refused.
        self.store
            .revoke(site.id.clone(), serial.clone(), reason.clone(), format!("operator/{operator}"), now_ms())
            .await
            .map_err(internal)?;
        let closed = self.registry.close_revoked(&site.id, (!serial.is_empty()).then_some(serial.as_str()));
        let what = if serial.is_empty() { "every certificate of the site".to_owned() } else { format!("certificate {serial}") };
        tracing::warn!(site = %site.id, %operator, %what, closed, "revoked");
        let e = crate::reconcilers::notify::event(
            &site.id,
            crate::domain::events::EventKind::AgentRevoked,
            "warning",
            format!("{what} revoked by operator/{operator}: {reason}; {closed} live stream(s) closed"),
            serde_json::json!({"serial": serial, "closed": closed, "reason": reason}),
            "",
        );
        self.notifier.record(vec![], vec![e]).await.map_err(internal)?;
        Ok(Response::new(pb::RevokeReply { closed: closed as u32 }))
    }

    async fn allow_enrolment(&self, request: Request<pb::AllowEnrolmentRequest>) -> Result<Response<pb::AllowEnrolmentReply>, Status> {
        let operator = self.operator(&request)?;
        let r = request.into_inner();
        let site = self.known_site(&r.site_id).await?;
        dr_proto::identity::validate_instance_id(&r.instance_id)
            .map_err(|m| Status::invalid_argument(format!("instance id `{}`: {m}", r.instance_id)))?;
        if r.token {
            let max = 7 * 24 * 3600 * 1000;
            let ttl = match r.ttl_ms {
                0 => 3600 * 1000,
                t if t > max => return Err(Status::invalid_argument("a token lives at most 7 days")),
                t => t,
            };
            let expires = now_ms() + ttl;
            let token = self
                .authority
                .make_token(&self.store, &site.id, &r.instance_id, &format!("operator/{operator}"), expires)
                .await
                .map_err(Status::from)?;
            tracing::warn!(site = %site.id, instance = %r.instance_id, %operator, expires_at_ms = expires, "enrolment token made");
            return Ok(Response::new(pb::AllowEnrolmentReply { token, expires_at_ms: expires }));
        }
        if !self.store.allow_reenrol(site.id.clone(), r.instance_id.clone()).await.map_err(internal)? {
            return Err(Status::not_found(format!(
                "instance {} of site `{}` never enrolled: it needs no permission (or use a token)",
                r.instance_id, site.id
            )));
        }
        tracing::warn!(site = %site.id, instance = %r.instance_id, %operator, "instance may enrol once more");
        Ok(Response::new(pb::AllowEnrolmentReply { token: String::new(), expires_at_ms: 0 }))
    }

    async fn rotate_ca(&self, request: Request<pb::RotateCaRequest>) -> Result<Response<pb::CaRotation>, Status> {
        let operator = self.operator(&request)?;
        let r = request.into_inner();
        let result = match r.action.as_str() {
            "status" => self.rotator.view().await,
            "start" => self.rotator.start(&r.new_root_pem, &r.new_intermediate_cert_pem, &r.new_intermediate_key_pem).await,
            "advance" => self.rotator.advance(r.force).await,
            "rollback" => self.rotator.rollback().await,
            other => {
                return Err(Status::invalid_argument(format!("unknown rotation action `{other}`: status, start, advance or rollback")));
            }
        };
        let view = result.map_err(Status::failed_precondition)?;
        if r.action != "status" {
            tracing::warn!(%operator, action = %r.action, phase = %view.phase, "CA rotation");
            let e = crate::reconcilers::notify::event(
                "",
                crate::domain::events::EventKind::CaRotationPhase,
                "warning",
                format!(
                    "CA rotation: {} by operator/{operator}; phase {}",
                    r.action,
                    if view.phase.is_empty() { "none" } else { &view.phase }
                ),
                serde_json::json!({"action": r.action, "phase": view.phase, "forced": r.force}),
                "",
            );
            self.notifier.record(vec![], vec![e]).await.map_err(internal)?;
        }
        Ok(Response::new(rotation_to_pb(view)))
    }

    async fn get_operation(&self, request: Request<pb::OperationRef>) -> Result<Response<pb::Operation>, Status> {
        self.operator(&request)?;
        Ok(Response::new(operation_to_pb(&self.operation(&request.into_inner().operation_id).await?)))
    }

    type WatchOperationStream = WatchStream;

    async fn watch_operation(&self, request: Request<pb::OperationRef>) -> Result<Response<Self::WatchOperationStream>, Status> {
        self.operator(&request)?;
        let id = request.into_inner().operation_id;
        // Subscribe before the first read so that no change is missed.
        let mut changes = self.engine.subscribe();
        let first = self.operation(&id).await?;
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut current = first;
            loop {
                if tx.send(Ok(operation_to_pb(&current))).await.is_err() || current.state.is_finished() {
                    return;
                }
                // Wait for a change of this operation (or a lag, after which
                // re-reading is the safe answer).
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
                current = match store.operation(id.clone()).await {
                    Ok(Some(op)) => op,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
            }
        });
        let stream: WatchStream = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }

    async fn prune(&self, request: Request<pb::PruneRequest>) -> Result<Response<pb::PruneReply>, Status> {
        let operator = self.operator(&request)?;
        let req = request.into_inner();
        let site = self.known_site(&req.site_id).await?;
        if !req.dry_run {
            if let Some(op) = self.store.active_operations_of(site.id.clone()).await.map_err(internal)?.first() {
                return Err(Status::failed_precondition(format!(
                    "site `{}` has a running operation {}; prune after it ends",
                    site.id, op.id
                )));
            }
            tracing::info!(site = %site.id, %operator, "prune requested");
        }
        let decisions = crate::workflows::retention::apply(self.engine.deps(), &site, req.dry_run)
            .await
            .map_err(|e| Status::internal(format!("retention failed: {e}")))?;
        Ok(Response::new(pb::PruneReply {
            dry_run: req.dry_run,
            decisions: decisions
                .into_iter()
                .map(|d| pb::RetentionDecision { image_id: d.image_id, completed_at_ms: d.completed_at_ms, keep: d.keep, reason: d.reason })
                .collect(),
        }))
    }

    async fn list_backups(&self, request: Request<pb::ListBackupsRequest>) -> Result<Response<pb::ListBackupsReply>, Status> {
        self.operator(&request)?;
        let site = self.known_site(&request.into_inner().site_id).await?;
        let backups = self.store.backups(site.id.clone()).await.map_err(internal)?;
        Ok(Response::new(pb::ListBackupsReply { backups: backups.iter().map(backup_to_pb).collect() }))
    }

    async fn signal_operation(&self, request: Request<pb::SignalRequest>) -> Result<Response<pb::Operation>, Status> {
        let operator = self.operator(&request)?;
        let req = request.into_inner();
        let signal = Signal::parse(&req.signal)
            .ok_or_else(|| Status::invalid_argument(format!("unknown signal `{}`: approve, deny, resume or abort", req.signal)))?;
        let approved_on = if signal == Signal::Approve { self.check_approval(&req.operation_id).await? } else { None };
        let op = self.engine.signal(&req.operation_id, signal, &format!("operator/{operator}")).await.map_err(engine_status)?;
        if let Some(evidence) = approved_on {
            let e = crate::reconcilers::notify::event(
                &op.site_id,
                crate::domain::events::EventKind::FailoverApproved,
                "critical",
                format!("operator/{operator} approved the automatic failover {} on this evidence: {evidence}", op.id),
                serde_json::json!({"by": format!("operator/{operator}"), "evidence": evidence}),
                &op.id,
            );
            self.notifier.record(vec![], vec![e]).await.map_err(internal)?;
        }
        crate::engine::faults::crash_point("api.signal_operation.before_reply");
        Ok(Response::new(operation_to_pb(&op)))
    }
}

impl AdminServer {
    /// An approval is for the evidence it was asked with: an automatic
    /// failover is approved only while the site's current health, checked
    /// recently, still calls for it. Returns the evidence approved (one
    /// line), `None` for an operation the health monitor did not start.
    async fn check_approval(&self, id: &str) -> Result<Option<String>, Status> {
        use crate::reconcilers::health::REQUESTED_BY;
        let Some(op) = self.store.operation(id.to_owned()).await.map_err(internal)? else { return Ok(None) };
        if op.kind != "failover" || op.requested_by != REQUESTED_BY {
            return Ok(None);
        }
        let now = now_ms();
        let health = self.store.health_all().await.map_err(internal)?.remove(&op.site_id);
        let (condition, lines, age) = match &health {
            Some(h) => (
                h.condition,
                h.evidence.as_ref().map(|e| e.lines(now).join("; ")).unwrap_or_default(),
                Duration::from_secs(now.saturating_sub(h.checked_at_ms) / 1000),
            ),
            None => (crate::domain::health::Condition::Healthy, "never checked".into(), Duration::ZERO),
        };
        let current = format!("the site is {} now (checked {} ago: {lines})", condition.as_str(), humantime::format_duration(age));
        if op.state.is_finished() {
            let how = if op.error.contains("denied") { "was withdrawn or denied" } else { "has ended" };
            return Err(Status::failed_precondition(format!(
                "the automatic failover {id} {how} ({}); {current}. Nothing was started. If the site needs a failover now, plan one: `drctl failover {} --plan`",
                op.error, op.site_id
            )));
        }
        if !condition.may_need_failover() {
            return Err(Status::failed_precondition(format!(
                "the automatic failover {id} was asked on evidence that no longer holds: {current}. Refused; the health monitor withdraws it"
            )));
        }
        let stale = self.health_interval.saturating_mul(3).max(Duration::from_secs(30));
        if age > stale {
            return Err(Status::failed_precondition(format!(
                "the evidence for {id} is {} old, older than three health passes: the health monitor has not checked the site since. Refused; look at `drctl site {}`",
                humantime::format_duration(age),
                op.site_id
            )));
        }
        Ok(Some(format!("{} (checked {} ago): {lines}", condition.as_str(), humantime::format_duration(age))))
    }
}

fn plan_status(e: crate::workflows::failover::PlanError) -> Status {
    use crate::workflows::failover::PlanError;
    match e {
        PlanError::Store(e) => internal(e),
        e @ (PlanError::UnknownSite(_)
        | PlanError::NoBackup(_)
        | PlanError::NoBackupWithin { .. }
        | PlanError::NotABackup { .. }
        | PlanError::NoCopy { .. }
        | PlanError::NoBackupOfPrimary { .. }
        | PlanError::NoBackupIn { .. }
        | PlanError::NoSpare { .. }) => Status::not_found(e.to_string()),
        e @ (PlanError::RestoreNeedsBackup
        | PlanError::Spec(_)
        | PlanError::FailbackRegion { .. }
        | PlanError::AtHome { .. }
        | PlanError::Conflict(_)) => Status::invalid_argument(e.to_string()),
    }
}

fn drill_to_pb(d: &crate::domain::model::DrillRecord) -> pb::Drill {
    pb::Drill {
        operation_id: d.operation_id.clone(),
        site_id: d.site_id.clone(),
        started_at_ms: d.started_at_ms,
        finished_at_ms: d.finished_at_ms,
        ok: d.ok,
        error: d.error.clone(),
        backup_image_id: d.backup_image_id.clone(),
        region: d.region.clone(),
        instance_id: d.instance_id.clone(),
        hostname: d.hostname.clone(),
        rto_ms: d.rto_ms,
        rpo_ms: d.rpo_ms,
        worst_rpo_ms: d.worst_rpo_ms,
        worst_rpo_window_ms: d.worst_rpo_window_ms,
        newest_build_at_ms: d.newest_build_at_ms,
        data_age_ms: d.data_age_ms,
        teardown: d.teardown.clone(),
        leaked: d.leaked.clone(),
        phases: d.phases.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        requested_by: d.requested_by.clone(),
        backup_started_at_ms: d.backup_started_at_ms,
    }
}
