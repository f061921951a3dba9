//! Restore and failover: replace a site's services machine by a new
//! instance launched from a backup. One workflow for both (`restore` is a
//! failover to an older point in time, asked for by AMI).
//!
//! Steps, each safe to run again after a crash anywhere inside it:
//! 1. `preflight`: the backup's AMI is still available where it is launched.
//! 2. `fence`: the old primary is recorded fenced (its agent gets no work
//!    from now on), then stopped (forced after `failover.fence_timeout`) or,
//!    with `fence = "terminate"`, its volumes kept and tagged and it is
//!    terminated. Never its volumes deleted.
//! 3. `launch`: RunInstances with a ClientToken of the operation, tagged
//!    `dr:operation`; the tag is looked up first (a crash between the call
//!    and its record must not launch a second instance). The instance is
//!    recorded as this operation's candidate before its agent can dial in.
//! 4. `wait_running`, 5. `wait_agent`: the candidate's agent (same site
//!    certificate, new instance id) connected and confirmed by EC2.
//! 6. to 10. the runbook on the candidate, as typed agent steps with the
//!    operation's command ids: app stop, rewrite addresses (old from the
//!    backup's launch facts, new from EC2), hostname (when configured), wipe
//!    Nomad, app start (then the frontend's health check).
//! 11. `move_eip`, 12. `update_dns`: the site's Elastic IP (same region) and
//!     Route 53 record onto the new instance.
//! 13. `cleanup_builds`: builds that were running at the backup's point in
//!     time (a failure is reported for a human, not fatal).
//! 14. `verify`, 15. `promote`: one store transaction makes the candidate
//!     the primary and the old instance fenced.
//! 16. `release` (always): an operation that ends without promotion (abort)
//!     terminates what it launched; the old instance stays fenced.
//! 17. `report` (always): the measured RTO by phase and what a human must
//!     still do.
//!
//! A step after the fence that fails waits for a human (`Pause`): `drctl
//! operation resume ID` retries it, `abort` ends the operation (release
//! runs).

pub mod plan;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CallFailure, Deps, EC2_RETRY_BUDGET, agent_call, report as report_of, retry_ec2};
use crate::agents::{Addressee, AgentAction, AgentDetail, AgentOutcome};
use crate::cloud::ec2::{Ec2, RunInstance};
use crate::domain::model::{Millis, Protected, Role, now_ms};
use crate::domain::recovery::Fence;
use crate::domain::tags::{CREATED_BY, TAG_CREATED_BY, TAG_OPERATION, TAG_SITE};
use crate::engine::{Ctx, ErrorKind, OnFailure, Outcome, Retry, StepDef, StepError, Workflow};
pub use plan::{HumanAction, Plan, PlanError, Request};

use crate::domain::tags::{TAG_FENCED_FROM, TAG_KEEP_UNTIL, TAG_ROLE};

/// The failover workflow.
pub struct Failover;

/// The typed state of a failover, stored with each step (version 1). A
/// drill (`super::drill`) runs on the same state and step functions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub plan: Plan,
    /// The old primary was fenced (stopped or terminated) or was gone.
    pub fenced: Option<String>,
    pub candidate: String,
    pub candidate_private_ip: String,
    pub candidate_public_ip: String,
    pub launched_at_ms: Millis,
    pub running_at_ms: Millis,
    pub agent_up_at_ms: Millis,
    pub healthy_at_ms: Millis,
    /// The Elastic IP and the DNS record point at the new machine.
    #[serde(default)]
    pub reachable_at_ms: Millis,
    /// The address changes actually applied.
    pub addresses: Vec<plan::AddressChange>,
    pub eip_moved: bool,
    pub dns_value: String,
    pub cleanup_failed: Option<String>,
    pub promoted: bool,
    pub promoted_at_ms: Millis,
    /// What `release` did after an abort.
    pub released: Option<String>,
    /// Agent step reports, by step.
    pub reports: BTreeMap<String, serde_json::Value>,
    /// Per agent step: how many times the agent answered with an error (the
    /// next try uses a new command id so it really runs again; a lost answer
    /// is asked again with the same id and replayed from the journal).
    pub generations: BTreeMap<String, u32>,
    pub report: Option<Report>,
    /// Drills: the copy is kept until then (also its `dr:keep-until` tag).
    pub keep_until_ms: Millis,
    /// Drills: how long to keep the copy after it is verified.
    pub keep_ms: u64,
    /// Drills: what teardown terminated, and what it could not.
    pub torn_down: Option<String>,
    pub leaked: Vec<String>,
    /// Spares: installed as the site's spare.
    pub installed: bool,
}

impl State {
    /// The role the launched instance has: a drill's copy or a candidate.
    pub fn launched_role(&self, op_id: &str) -> Role {
        if self.plan.kind == "drill" {
            Role::Drill { operation_id: op_id.to_owned() }
        } else if self.plan.kind == "spare" {
            Role::Spare
        } else if self.plan.kind == "repair" {
            // A repair works on the site's own primary.
            Role::Primary
        } else {
            Role::Candidate { operation_id: op_id.to_owned() }
        }
    }
}

/// The operation's outcome for a human (also `--output json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The outage as an operator counts it: from `rto_from` until the site
    /// is reachable again (app healthy, Elastic IP and DNS moved); 0 if
    /// never.
    pub rto_ms: u64,
    /// `first_evidence` (an automatic failover: the health monitor's first
    /// sight of the loss) or `request` (a failover asked by a human).
    #[serde(default)]
    pub rto_from: String,
    /// Milestones (ms since the epoch, 0 = not reached): the first evidence
    /// of the loss (automatic only), the decision (or the request), the app
    /// healthy on the new machine, the site reachable.
    #[serde(default)]
    pub detected_at_ms: Millis,
    #[serde(default)]
    pub decided_at_ms: Millis,
    #[serde(default)]
    pub restored_at_ms: Millis,
    #[serde(default)]
    pub reachable_at_ms: Millis,
    /// By phase: fence, launch_to_running, agent_up, app_stop, file_steps,
    /// app_start, address_moves, cleanup.
    pub phases: BTreeMap<String, u64>,
    /// The data's age when the operation started (the RPO taken).
    pub rpo_ms: u64,
    pub new_primary: String,
    pub old_primary: String,
    /// Where the site stands, in one sentence.
    pub site_state: String,
    pub human_actions: Vec<HumanAction>,
}

/// Agent steps that meet a reconnecting agent are retried a few times
/// before the operation waits for a human.
pub(super) const AGENT_RETRY: Retry = Retry {
    on: &[ErrorKind::Unavailable, ErrorKind::Interrupted, ErrorKind::Transient, ErrorKind::Throttled],
    attempts: 5,
    backoff: dr_proto::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(10)),
};

/// The restore steps of a machine that production does not rely on (a
/// drill copy, a spare), up to its verification: launch, the runbook with
/// its own addresses, the health check. A failure ends the operation (no
/// pause for a human); the workflow's own steps follow.
pub(super) fn isolated_restore_steps() -> Vec<StepDef<Deps, State>> {
    vec![
        StepDef::new("preflight", step!(preflight)).retry(Retry::TRANSIENT),
        StepDef::new("launch", step!(launch)).retry(Retry::TRANSIENT),
        StepDef::new("wait_running", step!(wait_running)).retry(Retry::TRANSIENT),
        StepDef::new("wait_agent", step!(wait_agent)),
        StepDef::new("app_stop", step!(app_stop)).retry(AGENT_RETRY),
        StepDef::new("rewrite_addresses", step!(rewrite_addresses)).retry(AGENT_RETRY),
        StepDef::new("hostname", step!(hostname)).retry(AGENT_RETRY),
        StepDef::new("wipe_nomad", step!(wipe_nomad)).retry(AGENT_RETRY),
        StepDef::new("app_start", step!(app_start)).retry(AGENT_RETRY),
        StepDef::new("cleanup_builds", step!(cleanup_builds)).retry(AGENT_RETRY),
        StepDef::new("verify", step!(verify)).retry(AGENT_RETRY),
    ]
}

impl Workflow for Failover {
    type Deps = Deps;
    type State = State;
    const KIND: &'static str = "failover";
    const VERSION: u32 = 1;
    const PRIORITY: u8 = 100;
    const PREEMPTIBLE: bool = false;

    fn steps() -> Vec<StepDef<Deps, State>> {
        let pause = OnFailure::Pause;
        vec![
            StepDef::new("preflight", step!(preflight)).retry(Retry::TRANSIENT),
            StepDef::new("fence", step!(fence)).retry(Retry::TRANSIENT).on_failure(pause),
            StepDef::new("launch", step!(launch)).retry(Retry::TRANSIENT).on_failure(pause),
            StepDef::new("wait_running", step!(wait_running)).retry(Retry::TRANSIENT).on_failure(pause),
            StepDef::new("wait_agent", step!(wait_agent)).on_failure(pause),
            StepDef::new("app_stop", step!(app_stop)).retry(AGENT_RETRY).on_failure(pause),
            StepDef::new("rewrite_addresses", step!(rewrite_addresses)).retry(AGENT_RETRY).on_failure(pause),
            StepDef::new("hostname", step!(hostname)).retry(AGENT_RETRY).on_failure(pause),
            StepDef::new("wipe_nomad", step!(wipe_nomad)).retry(AGENT_RETRY).on_failure(pause),
            StepDef::new("app_start", step!(app_start)).retry(AGENT_RETRY).on_failure(pause),
            StepDef::new("move_eip", step!(move_eip)).retry(Retry::TRANSIENT).on_failure(pause),
            StepDef::new("update_dns", step!(update_dns)).retry(Retry::TRANSIENT).on_failure(pause),
            StepDef::new("cleanup_builds", step!(cleanup_builds)).retry(AGENT_RETRY),
            StepDef::new("verify", step!(verify)).retry(AGENT_RETRY).on_failure(pause),
            StepDef::new("promote", step!(promote)).retry(Retry::TRANSIENT).on_failure(pause),
            StepDef::new("release", step!(release)).always(),
            StepDef::new("report", step!(report)).always(),
        ]
    }

    fn protects(state: &State) -> Vec<Protected> {
        let mut p = vec![];
        for id in [&state.plan.backup.image_id, &state.plan.backup.launch_image_id] {
            if !id.is_empty() && !p.contains(&Protected::Image(id.clone())) {
                p.push(Protected::Image(id.clone()));
            }
        }
        if !state.candidate.is_empty() {
            p.push(Protected::Instance(state.candidate.clone()));
        }
        p
    }
}

/// Starts a failover (or restore) of a site with a plan made by
/// [`plan::make`] (`requested_by`: `operator/<name>`).
pub async fn start(
    engine: &super::Engine,
    plan: Plan,
    requested_by: &str,
) -> Result<crate::domain::model::Operation, crate::engine::EngineError> {
    start_state::<Failover>(engine, State { plan, ..State::default() }, requested_by, None).await
}

/// Starts workflow `W` (a failover, drill, spare or repair: they share
/// [`State`]) for the site its plan names.
pub async fn start_state<W: Workflow<Deps = Deps, State = State>>(
    engine: &super::Engine,
    state: State,
    requested_by: &str,
    slot: Option<Millis>,
) -> Result<crate::domain::model::Operation, crate::engine::EngineError> {
    let site_id = state.plan.site_id.clone();
    engine.start::<W>(crate::engine::Start { site_id: &site_id, requested_by, state, slot }).await
}

fn candidate(ctx: &Ctx<Deps>, st: &State) -> Result<Addressee, StepError> {
    if st.candidate.is_empty() {
        return Err(StepError::new(ErrorKind::Invalid, "no candidate instance was recorded by launch"));
    }
    Ok(Addressee { site_id: ctx.site.id.clone(), instance_id: st.candidate.clone(), role: st.launched_role(&ctx.op_id) })
}

/// EC2 in the region the candidate is launched in.
pub(super) async fn ec2_launch(ctx: &Ctx<Deps>, st: &State) -> Result<std::sync::Arc<dyn Ec2>, StepError> {
    Ok(ctx.deps().ec2_in(&ctx.site, &st.plan.launch.region).await?)
}

/// Sends one runbook step to the candidate (see [`State::generations`]).
pub(super) async fn on_candidate(
    ctx: &Ctx<Deps>,
    st: &mut State,
    name: &str,
    action: &AgentAction,
    timeout: Duration,
) -> Result<AgentOutcome, StepError> {
    let to = candidate(ctx, st)?;
    let generation = st.generations.get(name).copied().unwrap_or(0);
    let id_name = if generation == 0 { name.to_owned() } else { format!("{name}-{generation}") };
    match agent_call(ctx, &to, &id_name, action, timeout).await {
        Ok(o) => {
            let r = report_of(&o);
            ctx.set_result(r.clone());
            st.reports.insert(name.to_owned(), r);
            Ok(o)
        }
        Err(CallFailure::Answered(e)) => {
            *st.generations.entry(name.to_owned()).or_default() += 1;
            Err(StepError::new(e.kind, format!("the candidate's agent answered: {}", e.message)))
        }
        Err(CallFailure::Unreachable(e)) => Err(e),
    }
}

/// Progress of a long wait: written when what is waited for changes, and
/// otherwise every few seconds (not at every poll: `drctl --wait` prints
/// each change).
pub(super) struct Waiting {
    started: tokio::time::Instant,
    last: String,
    at: Option<tokio::time::Instant>,
}

impl Waiting {
    pub(super) fn new() -> Self {
        Waiting { started: tokio::time::Instant::now(), last: String::new(), at: None }
    }
    pub(super) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
    pub(super) async fn say(&mut self, ctx: &Ctx<Deps>, what: String) {
        let due = self.at.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if what != self.last || due {
            ctx.progress(format!("{what} ({} so far)", secs(self.started.elapsed().as_millis() as u64))).await;
            self.last = what;
            self.at = Some(tokio::time::Instant::now());
        }
    }
}

pub(super) fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

pub(super) async fn preflight(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let image = st.plan.backup.launch_image_id.clone();
    if image.is_empty() {
        return Err(StepError::new(ErrorKind::Invalid, "the plan names no AMI to launch"));
    }
    let ec2 = ec2_launch(ctx, st).await?;
    let ids = [image.clone()];
    let found = retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || ec2.describe_images(&ids)).await?;
    match found.iter().find(|i| i.id == image) {
        Some(i) if i.state == "available" => {
            let detail = format!(
                "{image} is available in {}; backup age {} (the data loss taken)",
                st.plan.launch.region,
                humantime::format_duration(Duration::from_secs(st.plan.backup.age_ms / 1000))
            );
            // An automatic failover of a site in `approve` mode waits here,
            // before anything changes (the engine records the approval).
            if !st.plan.approval.is_empty() && st.plan.kind == "failover" {
                return Ok(Outcome::AwaitApproval(format!("{}; {detail}", st.plan.approval)));
            }
            Ok(Outcome::Done(detail))
        }
        Some(i) => Err(StepError::new(ErrorKind::Refused, format!("{image} is {} in {}, not available", i.state, st.plan.launch.region))),
        None => Err(StepError::new(ErrorKind::Refused, format!("{image} does not exist in {}", st.plan.launch.region))),
    }
}

async fn fence(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let old = st.plan.fence.instance_id.clone();
    if old.is_empty() {
        st.fenced = Some(String::new());
        return Ok(Outcome::Done("the site names no primary: nothing to fence".into()));
    }
    let deps = ctx.deps();
    let reason = format!("fenced by {} {}", st.plan.kind, ctx.op_id);
    // First in the store: from now on its agent is told to stay passive
    // and gets no work, whatever EC2 does.
    deps.store.set_instance_role(ctx.site.id.clone(), old.clone(), "fenced".into(), String::new(), reason.clone()).await?;
    deps.registry.set_role(&ctx.site.id, &old, Role::Fenced { reason: reason.clone() });
    let rec = deps.recovery(&ctx.site.id);
    let ec2 = deps.ec2(&ctx.site).await?;
    let budget = EC2_RETRY_BUDGET;
    let Some(inst) = retry_ec2("DescribeInstances", budget, || ec2.describe_instance(&old)).await? else {
        st.fenced = Some(old.clone());
        return Ok(Outcome::Done(format!("{old} is gone from EC2: recorded fenced")));
    };
    let cfg = &deps.failover;
    let detail = match rec.fence {
        Fence::Stop => {
            if matches!(inst.state.as_str(), "stopped" | "terminated") {
                format!("{old} is already {}; recorded fenced", inst.state)
            } else {
                let forced = stop_and_wait(ctx, &ec2, &old, &inst.state).await?;
                format!("{old} stopped{}; recorded fenced", if forced { " (forced)" } else { "" })
            }
        }
        Fence::Terminate => {
            if inst.state != "terminated" {
                let facts = retry_ec2("DescribeInstances", budget, || ec2.launch_facts(&old)).await?.unwrap_or_default();
                let devices: Vec<String> = facts.block_devices.iter().map(|b| b.device_name.clone()).collect();
                let volumes: Vec<String> = facts.block_devices.iter().map(|b| b.volume_id.clone()).filter(|v| !v.is_empty()).collect();
                retry_ec2("ModifyInstanceAttribute", budget, || ec2.keep_volumes(&old, &devices)).await?;
                if !volumes.is_empty() {
                    let tags = vec![(TAG_FENCED_FROM.to_owned(), old.clone()), (TAG_SITE.to_owned(), ctx.site.id.clone())];
                    retry_ec2("CreateTags", budget, || ec2.create_tags(&volumes, &tags)).await?;
                }
                st.plan.fence.keeps_volumes = volumes;
                retry_ec2("TerminateInstances", budget, || ec2.terminate_instance(&old)).await?;
            }
            let mut wait = Waiting::new();
            loop {
                let state = retry_ec2("DescribeInstances", budget, || ec2.describe_instance(&old)).await?.map(|i| i.state);
                if state.as_deref().is_none_or(|s| s == "terminated") {
                    break;
                }
                if wait.elapsed() >= cfg.fence_timeout {
                    return Err(StepError::new(ErrorKind::TimedOut, format!("{old} is not terminated after {:?}", cfg.fence_timeout)));
                }
                wait.say(ctx, format!("waiting for {old} to terminate ({})", state.unwrap_or_default())).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            format!("{old} terminated, its volumes kept and tagged ({})", st.plan.fence.keeps_volumes.join(", "))
        }
    };
    st.fenced = Some(old);
    Ok(Outcome::Done(detail))
}

/// StopInstances (unless `state` says it is stopping already), then waits
/// until it is stopped; forced after `failover.fence_timeout`, given as long
/// again. Whether the stop had to be forced.
pub(super) async fn stop_and_wait(ctx: &Ctx<Deps>, ec2: &std::sync::Arc<dyn Ec2>, id: &str, state: &str) -> Result<bool, StepError> {
    let budget = EC2_RETRY_BUDGET;
    let timeout = ctx.deps().failover.fence_timeout;
    if state != "stopping" {
        retry_ec2("StopInstances", budget, || ec2.stop_instance(id, false)).await?;
    }
    let mut wait = Waiting::new();
    let mut forced = false;
    loop {
        let now = retry_ec2("DescribeInstances", budget, || ec2.describe_instance(id)).await?;
        let state = now.map(|i| i.state).unwrap_or_else(|| "terminated".into());
        if matches!(state.as_str(), "stopped" | "terminated") {
            return Ok(forced);
        }
        if ctx.abort_requested() {
            return Err(StepError::new(ErrorKind::Failed, format!("aborted while waiting for {id} to stop ({state})")));
        }
        let waited = wait.elapsed();
        if !forced && waited >= timeout {
            ctx.progress(format!("{id} did not stop within {timeout:?}: forcing the stop")).await;
            retry_ec2("StopInstances", budget, || ec2.stop_instance(id, true)).await?;
            forced = true;
        } else if forced && waited >= timeout * 2 {
            return Err(StepError::new(
                ErrorKind::TimedOut,
                format!("{id} is still {state} {} after a forced stop: stop it by hand, then resume", secs(waited.as_millis() as u64)),
            ));
        }
        wait.say(ctx, format!("waiting for {id} to stop ({state})")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(super) async fn launch(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    if let Some(spare) = st.plan.spare.clone() {
        return take_spare(ctx, st, spare).await;
    }
    let ec2 = ec2_launch(ctx, st).await?;
    let op_id = ctx.op_id.clone();
    let spec = st.plan.launch.clone();
    let token = ctx.token("launch").await?;
    let tags = vec![
        (TAG_SITE.to_owned(), ctx.site.id.clone()),
        (TAG_OPERATION.to_owned(), op_id.clone()),
        (TAG_ROLE.to_owned(), st.launched_role(&op_id).name().to_owned()),
        (TAG_CREATED_BY.to_owned(), CREATED_BY.to_owned()),
        (
            "Name".to_owned(),
            format!(
                "{} services ({} {op_id})",
                ctx.site.id,
                match st.plan.kind.as_str() {
                    "drill" => "drill",
                    "spare" => "spare",
                    _ => "restored by",
                }
            ),
        ),
    ];
    let mut tags = tags;
    if st.keep_until_ms > 0 {
        tags.push((TAG_KEEP_UNTIL.to_owned(), crate::domain::tags::keep_until_value(st.keep_until_ms)));
    }
    let req = RunInstance {
        image_id: spec.image_id.clone(),
        instance_type: spec.instance_type.clone(),
        subnet_id: spec.subnet_id.clone(),
        private_ip: spec.private_ip.clone(),
        security_group_ids: spec.security_group_ids.clone(),
        availability_zone: spec.availability_zone.clone(),
        iam_instance_profile: spec.iam_instance_profile.clone(),
        key_name: spec.key_name.clone(),
        client_token: token,
        tags,
    };
    let (id, reused) = ctx
        .find_or_create(
            "launch_lookup",
            || async {
                let found = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.find_instances_by_tag(TAG_OPERATION, &op_id)).await?;
                if found.len() > 1 {
                    tracing::error!(operation = %op_id, instances = ?found.iter().map(|i| &i.id).collect::<Vec<_>>(), "more than one instance carries this operation's tag; using the first");
                }
                Ok(found.first().map(|i| i.id.clone()))
            },
            || async {
                let i = retry_ec2("RunInstances", EC2_RETRY_BUDGET, || ec2.run_instance(&req)).await?;
                Ok(i.id)
            },
        )
        .await?;
    ctx.crash_point("failover.after_launch");
    // Recorded before its agent can dial in: it is this operation's candidate
    // (and, in another region, verified there).
    if spec.region != ctx.site.region {
        ctx.store().put_instance_region(ctx.site.id.clone(), id.clone(), spec.region.clone()).await?;
    }
    let role = st.launched_role(&ctx.op_id);
    ctx.store().set_instance_role(ctx.site.id.clone(), id.clone(), role.name().into(), ctx.op_id.clone(), String::new()).await?;
    ctx.deps().registry.set_role(&ctx.site.id, &id, role);
    st.candidate = id.clone();
    st.launched_at_ms = now_ms();
    Ok(Outcome::Done(if reused {
        format!("{id} was already launched by this operation (before a restart); not launching another")
    } else {
        format!(
            "RunInstances {} from {} in {} ({}{})",
            spec.instance_type,
            spec.image_id,
            spec.region,
            if spec.subnet_id.is_empty() { "default subnet".to_owned() } else { spec.subnet_id.clone() },
            if spec.private_ip.is_empty() { String::new() } else { format!(", private IP {}", spec.private_ip) }
        )
    }))
}

/// `launch` with a hot spare: the spare becomes this operation's candidate
/// (store and live session, in one transaction with the spare's removal)
/// and is started if it was stopped. No RunInstances, no disk hydration.
/// Its `dr:role=spare` tag stays until `promote` (the IAM policy allows
/// StartInstances on spares only; the retag is off the RTO's path).
async fn take_spare(ctx: &Ctx<Deps>, st: &mut State, spare: plan::PlannedSpare) -> Result<Outcome, StepError> {
    let ec2 = ec2_launch(ctx, st).await?;
    let id = spare.instance_id.clone();
    let op_id = ctx.op_id.clone();
    let store = ctx.store();
    if !store.claim_spare(ctx.site.id.clone(), id.clone(), op_id.clone()).await? {
        // Claimed by this operation before a restart, or replaced since the plan.
        let rec = store.instance(ctx.site.id.clone(), id.clone()).await?;
        if !rec.is_some_and(|r| r.role == "candidate" && r.operation_id == op_id) {
            return Err(StepError::new(
                ErrorKind::Refused,
                format!(
                    "{id} is no longer the site's hot spare (replaced or retired since the plan): abort, then start the failover again"
                ),
            ));
        }
    }
    ctx.crash_point("failover.after_take_spare");
    let role = st.launched_role(&op_id);
    ctx.deps().registry.set_role(&ctx.site.id, &id, role);
    st.candidate = id.clone();
    let mut progress = Waiting::new();
    let state = loop {
        let state = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id))
            .await?
            .map(|i| i.state)
            .unwrap_or_else(|| "gone".into());
        if state != "stopping" {
            break state;
        }
        if progress.elapsed() >= ctx.deps().failover.fence_timeout {
            return Err(StepError::new(
                ErrorKind::TimedOut,
                format!("the spare {id} is still stopping after {:?}", ctx.deps().failover.fence_timeout),
            ));
        }
        progress.say(ctx, format!("waiting for the spare {id} to finish stopping")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let started = match state.as_str() {
        "stopped" => {
            retry_ec2("StartInstances", EC2_RETRY_BUDGET, || ec2.start_instance(&id)).await?;
            true
        }
        "running" | "pending" => false,
        other => {
            return Err(StepError::failed(format!(
                "the spare {id} is {other}: it cannot be used; abort and start the failover again with --fresh"
            )));
        }
    };
    st.launched_at_ms = now_ms();
    Ok(Outcome::Done(format!(
        "took the hot spare {id} ({}, from backup {}, {} older than the newest): no launch, no disk hydration",
        if started { "stopped: started it" } else { "running" },
        spare.backup_image_id,
        secs(spare.lag_ms)
    )))
}

pub(super) async fn wait_running(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let ec2 = ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    let limit = ctx.deps().failover.launch_timeout;
    let mut progress = Waiting::new();
    let mut wait = Duration::from_millis(200);
    loop {
        let inst = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?;
        let state = inst.as_ref().map(|i| i.state.clone()).unwrap_or_else(|| "unknown to EC2 yet".into());
        if let Some(i) = inst.filter(|i| i.state == "running") {
            st.candidate_private_ip = i.private_ip;
            st.candidate_public_ip = i.public_ip;
            st.running_at_ms = now_ms();
            return Ok(Outcome::Done(format!(
                "{id} running after {} (private {}, public {})",
                secs(st.running_at_ms.saturating_sub(st.launched_at_ms)),
                st.candidate_private_ip,
                if st.candidate_public_ip.is_empty() { "none" } else { &st.candidate_public_ip }
            )));
        }
        if matches!(state.as_str(), "terminated" | "shutting-down" | "stopped" | "stopping") {
            return Err(StepError::failed(format!("{id} is {state}: it will not come up (look at its console output in EC2)")));
        }
        if progress.elapsed() >= limit {
            return Err(StepError::new(ErrorKind::TimedOut, format!("{id} is still {state} after {limit:?} (failover.launch_timeout)")));
        }
        progress.say(ctx, format!("waiting for {id} to run ({state})")).await;
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

pub(super) async fn wait_agent(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let to = candidate(ctx, st)?;
    let limit = ctx.deps().failover.agent_timeout;
    let mut progress = Waiting::new();
    loop {
        let live = ctx.deps().registry.live(&to.site_id, &to.instance_id);
        match &live {
            Some(l) if l.role == to.role => {
                st.agent_up_at_ms = now_ms();
                // The agent's own view of its addresses wins over EC2's only
                // when EC2 gave none.
                if st.candidate_private_ip.is_empty() {
                    st.candidate_private_ip = l.record.facts.private_ip.clone();
                }
                return Ok(Outcome::Done(format!(
                    "the agent of {} is connected as {} ({} after running; app {})",
                    to.instance_id,
                    to.role.name(),
                    secs(st.agent_up_at_ms.saturating_sub(st.running_at_ms)),
                    if l.record.facts.app_state.is_empty() { "unknown" } else { &l.record.facts.app_state }
                )));
            }
            _ => {}
        }
        // An agent refused since the launch (its certificate expired, ...)
        // will not come up by waiting: say why and stop now.
        if live.is_none() {
            if let Some(r) = refused_restored_agent(ctx, st, &to) {
                let now = now_ms();
                return Err(StepError::new(
                    ErrorKind::Refused,
                    format!(
                        "the restored agent's certificate was refused: {} (not after {}, serial {}, from {}, {} time(s)); {}",
                        r.describe(now),
                        crate::domain::refusal::rfc3339(r.not_after_ms),
                        r.serial,
                        if r.peer.is_empty() { "?" } else { &r.peer },
                        r.count,
                        r.remedy()
                    ),
                ));
            }
        }
        if progress.elapsed() >= limit {
            let seen = match live {
                Some(l) => format!("connected as {} ({})", l.role.name(), l.role.reason()),
                None => "never connected".into(),
            };
            return Err(StepError::new(
                ErrorKind::TimedOut,
                format!(
                    "the agent of {} did not come up as {} within {limit:?} (failover.agent_timeout): {seen}",
                    to.instance_id,
                    to.role.name()
                ),
            ));
        }
        let what = match live {
            Some(l) => format!("connected as {}, waiting for EC2 to confirm it", l.role.name()),
            None => "waiting for its agent to connect".to_owned(),
        };
        progress.say(ctx, format!("{}: {what}", to.instance_id)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A refusal of the site's agents since the instance was launched (or
/// started) that is the restored agent's: its certificate ends when the one
/// recorded with the backup does; when the backup recorded none (older
/// backups, repairs), one whose chain is this deployment's CA's (a stray
/// certificate from elsewhere does not end the wait).
fn refused_restored_agent(ctx: &Ctx<Deps>, st: &State, to: &Addressee) -> Option<crate::domain::refusal::AgentRefusal> {
    let since = [st.launched_at_ms, st.running_at_ms].into_iter().filter(|t| *t > 0).min().unwrap_or(ctx.created_at_ms);
    let recorded = st.plan.backup.agent_cert_not_after_ms / 1000;
    ctx.deps()
        .registry
        .refusals()
        .since(&to.site_id, since)
        .into_iter()
        .find(|r| if recorded > 0 { r.not_after_ms / 1000 == recorded } else { r.ca_verified })
}

pub(super) async fn app_stop(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    ctx.progress(format!("stopping the app on {} (a restored machine may have started it with its old addresses)", st.candidate)).await;
    let t = ctx.deps().failover.app_timeout;
    let o = on_candidate(ctx, st, "app-stop", &AgentAction::AppStop, t).await?;
    Ok(Outcome::Done(if o.report::<dr_proto::contract::AppReport>()?.already {
        "the app was already stopped".into()
    } else {
        "app stopped".into()
    }))
}

pub(super) async fn rewrite_addresses(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let eip_public = st.plan.eip.as_ref().filter(|e| e.movable).map(|e| e.public_ip.clone());
    let mut private = vec![];
    let mut public = vec![];
    let mut applied = vec![];
    for a in &st.plan.addresses {
        let new = match a.kind.as_str() {
            "private" => st.candidate_private_ip.clone(),
            _ => eip_public.clone().unwrap_or_else(|| st.candidate_public_ip.clone()),
        };
        if new.is_empty() || new == a.old {
            continue;
        }
        applied.push(plan::AddressChange { kind: a.kind.clone(), old: a.old.clone(), new: new.clone() });
        match a.kind.as_str() {
            "private" => private.push((a.old.clone(), new)),
            _ => public.push((a.old.clone(), new)),
        }
    }
    if applied.is_empty() {
        st.addresses = applied;
        return Ok(Outcome::Done("no address changes: the Replicated files are left as they are".into()));
    }
    let t = ctx.deps().backup.agent_call_timeout;
    let o = on_candidate(ctx, st, "rewrite-addresses", &AgentAction::RewriteAddresses { private, public }, t).await?;
    let files = o.report::<dr_proto::contract::RewriteReport>()?.files.len();
    let summary: Vec<String> = applied.iter().map(|a| format!("{} {} → {}", a.kind, a.old, a.new)).collect();
    st.addresses = applied;
    Ok(Outcome::Done(format!("{} ({files} file(s) reported)", summary.join(", "))))
}

pub(super) async fn hostname(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let hostname = st.plan.hostname.clone();
    if hostname.is_empty() {
        return Ok(Outcome::Done("no hostname configured for the site: the backup's is kept".into()));
    }
    let t = ctx.deps().failover.app_timeout;
    let o = on_candidate(ctx, st, "set-hostname", &AgentAction::SetHostname { hostname: hostname.clone() }, t).await?;
    let r = o.report::<dr_proto::contract::HostnameReport>()?;
    Ok(Outcome::Done(if !r.changed { format!("hostname already {hostname}") } else { format!("hostname set to {hostname}") }))
}

pub(super) async fn wipe_nomad(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let t = ctx.deps().failover.app_timeout;
    on_candidate(ctx, st, "wipe-nomad", &AgentAction::WipeNomad, t).await?;
    Ok(Outcome::Done("the restored Nomad state (/opt/nomad) is wiped".into()))
}

/// What an operator does after fixing what failed a runbook step. Only a
/// failover (restore, failback) waits for a human and can be resumed; a
/// drill, a spare or a repair ends at its failure.
fn after_fix(st: &State, op_id: &str) -> String {
    match st.plan.kind.as_str() {
        "drill" => format!(
            "the drill ends here (it cannot be resumed) and its copy is torn down: fix it, then start a new drill (`drctl drill {}`)",
            st.plan.site_id
        ),
        "spare" | "repair" => format!("the {} operation ends here (it cannot be resumed)", st.plan.kind),
        _ => format!("fix it, then `drctl operation resume {op_id}`"),
    }
}

pub(super) async fn app_start(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let t = ctx.deps().failover.app_timeout;
    ctx.progress(format!("starting the app on {} and waiting until it is started", st.candidate)).await;
    on_candidate(ctx, st, "app-start", &AgentAction::AppStart, t).await?;
    let to = candidate(ctx, st)?;
    let generation = st.generations.get("app-start").copied().unwrap_or(0);
    let o = agent_call(
        ctx,
        &to,
        &format!("app-status-{generation}-{}", ctx.attempt()),
        &AgentAction::AppStatus,
        ctx.deps().backup.agent_call_timeout,
    )
    .await
    .map_err(CallFailure::error)?;
    match o.detail {
        AgentDetail::AppStatus { state, is_transitioning, .. } if state == "started" && !is_transitioning => {}
        AgentDetail::AppStatus { state, is_transitioning, .. } => {
            return Err(StepError::failed(format!(
                "the app is {state}{} after its start: look at Replicated on {} (replicatedctl app status); {}",
                if is_transitioning { " (transitioning)" } else { "" },
                st.candidate,
                after_fix(st, &ctx.op_id)
            )));
        }
        _ => return Err(StepError::failed("the agent did not report the app state")),
    }
    // Replicated says started; the frontend must answer its health check
    // too (asked by the agent, on the machine), within `failover.app_timeout`.
    let mut progress = Waiting::new();
    let mut i = 0u32;
    let health = loop {
        let id = format!("health-check-{generation}-{}-{i}", ctx.attempt());
        i += 1;
        match agent_call(ctx, &to, &id, &AgentAction::HealthCheck, ctx.deps().backup.agent_call_timeout).await {
            Ok(o) => break Some((o.report::<dr_proto::contract::HealthReport>()?, report_of(&o))),
            // An agent that predates the health check: Replicated's word only.
            Err(CallFailure::Answered(e)) if e.kind == ErrorKind::NotSupported => break None,
            Err(e) if progress.elapsed() >= t => {
                return Err(StepError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the app is started but its health check did not pass within {t:?} (failover.app_timeout): {}; {}",
                        e.message(),
                        after_fix(st, &ctx.op_id)
                    ),
                ));
            }
            Err(e) => progress.say(ctx, format!("app started; waiting for its health check ({})", e.message())).await,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    st.healthy_at_ms = now_ms();
    let checked = match &health {
        Some((h, _)) => format!("; {} answered {}", h.url, h.status),
        None => "; the agent has no health check (older agent): Replicated's state only".to_owned(),
    };
    if let Some((_, h)) = health {
        st.reports.insert("health-check".into(), h);
    }
    Ok(Outcome::Done(format!(
        "app started and healthy ({} after the operation began){checked}",
        secs(st.healthy_at_ms.saturating_sub(ctx.created_at_ms))
    )))
}

async fn move_eip(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let Some(eip) = st.plan.eip.clone() else {
        return Ok(Outcome::Done("the backup's instance had no Elastic IP".into()));
    };
    if !eip.movable {
        return Ok(Outcome::Done(format!("not moved: {}", eip.note)));
    }
    let ec2 = ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    let now = retry_ec2("DescribeAddresses", EC2_RETRY_BUDGET, || ec2.describe_address(&eip.allocation_id)).await?;
    let Some(addr) = now else {
        return Err(StepError::failed(format!("Elastic IP {} ({}) no longer exists", eip.public_ip, eip.allocation_id)));
    };
    if addr.instance_id != id {
        retry_ec2("AssociateAddress", EC2_RETRY_BUDGET, || ec2.associate_address(&eip.allocation_id, &id)).await?;
    }
    st.eip_moved = true;
    // Status shows the address the site is reached at, not the launch one
    // the new instance's agent reported when it connected.
    ctx.store().set_public_ip(ctx.site.id.clone(), id.clone(), eip.public_ip.clone()).await?;
    Ok(Outcome::Done(format!(
        "Elastic IP {} moved to {id}{}",
        eip.public_ip,
        if addr.instance_id.is_empty() { String::new() } else { format!(" (from {})", addr.instance_id) }
    )))
}

async fn update_dns(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let Some(dns) = st.plan.dns.clone() else {
        // Reachable once its addresses moved (the Elastic IP, if any).
        st.reachable_at_ms = now_ms();
        return Ok(Outcome::Done("no [site.dns] record configured".into()));
    };
    let value = match st.plan.eip.as_ref().filter(|e| e.movable) {
        Some(e) => e.public_ip.clone(),
        None if !st.candidate_public_ip.is_empty() => st.candidate_public_ip.clone(),
        None => st.candidate_private_ip.clone(),
    };
    let r53 = ctx.deps().dns().await;
    let change = retry_ec2("ChangeResourceRecordSets", EC2_RETRY_BUDGET, || r53.upsert_a(&dns.zone_id, &dns.name, &value, dns.ttl)).await?;
    let limit = ctx.deps().failover.dns_timeout;
    let mut progress = Waiting::new();
    loop {
        let status = retry_ec2("GetChange", EC2_RETRY_BUDGET, || r53.change_status(&change)).await?;
        if status == "INSYNC" {
            break;
        }
        if progress.elapsed() >= limit {
            return Err(StepError::new(ErrorKind::TimedOut, format!("Route 53 change {change} is still {status} after {limit:?}")));
        }
        progress.say(ctx, format!("waiting for Route 53 change {change} ({status})")).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    st.dns_value = value.clone();
    st.reachable_at_ms = now_ms();
    Ok(Outcome::Done(format!("{} A {value} (ttl {}) in sync", dns.name, dns.ttl)))
}

pub(super) async fn cleanup_builds(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let before = st.plan.cleanup_builds_before_ms;
    let t = ctx.deps().failover.cleanup_timeout;
    match on_candidate(ctx, st, "cleanup-builds", &AgentAction::CleanupBuilds { before_ms: before }, t).await {
        Ok(o) => {
            let deleted = o.report::<dr_proto::contract::CleanupReport>()?.deleted;
            Ok(Outcome::Done(format!("{deleted} build(s) that were running at the backup's point in time deleted")))
        }
        // Retried while the agent reconnects; on the last attempt noted.
        Err(e)
            if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Interrupted | ErrorKind::Transient)
                && ctx.attempt() < AGENT_RETRY.attempts =>
        {
            Err(e)
        }
        // Not fatal: the site works; stale builds show as running forever.
        Err(e) => {
            st.cleanup_failed = Some(e.message.clone());
            Ok(Outcome::Done(format!("build cleanup failed ({}); reported for a human", e.message)))
        }
    }
}

pub(super) async fn verify(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let ec2 = ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    let inst = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?;
    if inst.as_ref().is_none_or(|i| i.state != "running") {
        return Err(StepError::failed(format!("{id} is {} in EC2", inst.map(|i| i.state).unwrap_or_else(|| "gone".into()))));
    }
    let mut checks = vec![format!("{id} running")];
    if st.eip_moved
        && let Some(eip) = st.plan.eip.clone()
    {
        let a = retry_ec2("DescribeAddresses", EC2_RETRY_BUDGET, || ec2.describe_address(&eip.allocation_id)).await?;
        if a.as_ref().is_none_or(|a| a.instance_id != id) {
            return Err(StepError::failed(format!(
                "Elastic IP {} is on {} instead of {id}",
                eip.public_ip,
                a.map(|a| a.instance_id).filter(|i| !i.is_empty()).unwrap_or_else(|| "nothing".into())
            )));
        }
        checks.push(format!("{} on it", eip.public_ip));
    }
    let to = candidate(ctx, st)?;
    let o =
        agent_call(ctx, &to, &format!("verify-status-{}", ctx.attempt()), &AgentAction::AppStatus, ctx.deps().backup.agent_call_timeout)
            .await
            .map_err(CallFailure::error)?;
    match o.detail {
        AgentDetail::AppStatus { state, .. } if state == "started" => checks.push("app started".into()),
        AgentDetail::AppStatus { state, .. } => {
            return Err(StepError::failed(format!("the app on {id} is {state}, not started")));
        }
        _ => return Err(StepError::failed("the agent did not report the app state")),
    }
    Ok(Outcome::Done(checks.join(", ")))
}

async fn promote(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let deps = ctx.deps();
    let old = st.plan.fence.instance_id.clone();
    let reason = format!("replaced by {} in {} {}", st.candidate, st.plan.kind, ctx.op_id);
    deps.store.promote(ctx.site.id.clone(), st.candidate.clone(), old.clone(), reason.clone(), st.plan.launch.region.clone()).await?;
    ctx.crash_point("failover.after_promote");
    deps.registry.set_role(&ctx.site.id, &st.candidate, Role::Primary);
    if !old.is_empty() {
        deps.registry.set_role(&ctx.site.id, &old, Role::Fenced { reason });
    }
    st.promoted = true;
    st.promoted_at_ms = now_ms();
    // A spare taken: no longer tagged as one (retried on the next attempt;
    // the store already says what it is).
    if st.plan.spare.is_some() {
        let ec2 = ec2_launch(ctx, st).await?;
        let tags = vec![(TAG_ROLE.to_owned(), "candidate".to_owned()), (TAG_OPERATION.to_owned(), ctx.op_id.clone())];
        retry_ec2("CreateTags", EC2_RETRY_BUDGET, || ec2.create_tags(std::slice::from_ref(&st.candidate), &tags)).await?;
    }
    Ok(Outcome::Done(format!(
        "{} is the primary of site {}{}; backups follow it on the site's schedule",
        st.candidate,
        ctx.site.id,
        if old.is_empty() { String::new() } else { format!(" ({old} fenced)") }
    )))
}

/// Always runs. After an operation that ended without promotion: terminate
/// the candidate it launched. The old instance stays fenced.
pub(super) async fn release(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    if st.promoted {
        return Ok(Outcome::Done("nothing to release: the candidate was promoted".into()));
    }
    let ec2 = ec2_launch(ctx, st).await?;
    let ids = launched_by_operation(ctx, st, ec2.as_ref()).await?;
    if ids.is_empty() {
        st.released = Some(String::new());
        return Ok(Outcome::Done("nothing was launched".into()));
    }
    for id in &ids {
        terminate_as_passive(ctx, ec2.as_ref(), id, format!("terminated: {} {} ended without promoting it", st.plan.kind, ctx.op_id))
            .await?;
    }
    st.released = Some(ids.join(", "));
    Ok(Outcome::Done(format!("terminated {} (launched by this operation)", ids.join(", "))))
}

/// Every instance this operation launched: those carrying its
/// `dr:operation` tag (a crash between RunInstances and its record leaves
/// only the tag) and the one recorded in its state.
pub(super) async fn launched_by_operation(ctx: &Ctx<Deps>, st: &State, ec2: &dyn Ec2) -> Result<Vec<String>, StepError> {
    let op_id = ctx.op_id.clone();
    let mut ids: Vec<String> = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.find_instances_by_tag(TAG_OPERATION, &op_id))
        .await?
        .into_iter()
        .map(|i| i.id)
        .collect();
    if !st.candidate.is_empty() && !ids.contains(&st.candidate) {
        ids.push(st.candidate.clone());
    }
    Ok(ids)
}

/// TerminateInstances of one launched instance, recorded passive (store and
/// live session) with `reason`.
pub(super) async fn terminate_as_passive(ctx: &Ctx<Deps>, ec2: &dyn Ec2, id: &str, reason: String) -> Result<(), StepError> {
    retry_ec2("TerminateInstances", EC2_RETRY_BUDGET, || ec2.terminate_instance(id)).await?;
    ctx.store().set_instance_role(ctx.site.id.clone(), id.to_owned(), "passive".into(), String::new(), reason.clone()).await?;
    ctx.deps().registry.set_role(&ctx.site.id, id, Role::Passive { reason });
    Ok(())
}

/// The time spent in each phase (a named group of steps), from the
/// operation's step records.
pub(super) fn phase_durations(op: Option<&crate::domain::model::Operation>, phases: &[(&str, &[&str])]) -> BTreeMap<String, u64> {
    let dur = |names: &[&str]| -> u64 {
        op.map(|o| {
            o.steps
                .iter()
                .filter(|s| names.contains(&s.name.as_str()) && s.finished_at_ms >= s.started_at_ms && s.started_at_ms > 0)
                .map(|s| s.finished_at_ms - s.started_at_ms)
                .sum()
        })
        .unwrap_or(0)
    };
    phases.iter().map(|(phase, steps)| ((*phase).to_owned(), dur(steps))).collect()
}

async fn report(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let op = ctx.store().operation(ctx.op_id.clone()).await?;
    let phases = phase_durations(
        op.as_ref(),
        &[
            ("fence", &["fence"]),
            ("launch_to_running", &["launch", "wait_running"]),
            ("agent_up", &["wait_agent"]),
            ("app_stop", &["app_stop"]),
            ("file_steps", &["rewrite_addresses", "hostname", "wipe_nomad"]),
            ("app_start", &["app_start"]),
            ("address_moves", &["move_eip", "update_dns"]),
            ("cleanup", &["cleanup_builds"]),
        ],
    );
    let mut human = st.plan.human_actions.clone();
    // Now that the new addresses are known, say them.
    for h in human.iter_mut().filter(|h| h.kind == "nomad_builders") {
        if let Some(a) = st.addresses.iter().find(|a| a.kind == "private") {
            h.message = format!(
                "Nomad builders point at the services machine's old private IP {}: point them at {} and restart their nomad client",
                a.old, a.new
            );
        }
    }
    if !st.promoted {
        human.retain(|h| h.kind == "fenced_volumes");
    }
    if let Some(e) = &st.cleanup_failed {
        human.push(HumanAction {
            kind: "build_cleanup".into(),
            message: format!("build cleanup failed ({e}): run `dr-agent cleanup-builds --before <backup time>` on the new machine"),
        });
    }
    let old = st.plan.fence.instance_id.clone();
    let site_state = if st.promoted {
        format!("{} is the site's primary, launched from {}; {old} is fenced", st.candidate, st.plan.backup.launch_image_id)
    } else if st.fenced.is_some() {
        format!(
            "no primary is running: {old} is fenced ({}){}; start a new failover or bring {old} back by hand",
            st.plan.fence.mode,
            match &st.released {
                Some(r) if !r.is_empty() => format!(", and {r} (launched by this operation) is terminated"),
                _ => String::new(),
            }
        )
    } else {
        format!("nothing changed: {old} is still the primary")
    };
    let mut phases = phases;
    let (rto_from, detected_at_ms, decided_at_ms) = match &st.plan.trigger {
        Some(t) => ("first_evidence", t.first_evidence_ms, t.decided_ms),
        None => ("request", 0, ctx.created_at_ms),
    };
    if detected_at_ms > 0 {
        phases.insert("detection".into(), decided_at_ms.saturating_sub(detected_at_ms));
        // Decided → this operation began (an approval waits here too).
        phases.insert("decision_to_start".into(), ctx.created_at_ms.saturating_sub(decided_at_ms));
    }
    let reachable_at_ms = if st.reachable_at_ms > 0 { st.reachable_at_ms } else { st.healthy_at_ms };
    let from = if detected_at_ms > 0 { detected_at_ms } else { ctx.created_at_ms };
    let rto_ms = if reachable_at_ms > 0 && st.promoted { reachable_at_ms.saturating_sub(from) } else { 0 };
    let r = Report {
        rto_ms,
        rto_from: rto_from.into(),
        detected_at_ms,
        decided_at_ms,
        restored_at_ms: st.healthy_at_ms,
        reachable_at_ms: if st.promoted { reachable_at_ms } else { 0 },
        phases,
        rpo_ms: ctx.created_at_ms.saturating_sub(st.plan.backup.started_at_ms),
        new_primary: if st.promoted { st.candidate.clone() } else { String::new() },
        old_primary: old,
        site_state: site_state.clone(),
        human_actions: human,
    };
    let detail = if st.promoted {
        format!(
            "RTO {} from the {} until reachable (data loss {}); {} action(s) for a human",
            secs(r.rto_ms),
            if r.rto_from == "first_evidence" { "first evidence of the loss" } else { "request" },
            secs(r.rpo_ms),
            r.human_actions.len()
        )
    } else {
        site_state
    };
    st.report = Some(r);
    Ok(Outcome::Done(detail))
}
