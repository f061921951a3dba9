//! Restore and failover: replace a site's services machine by a new
//! instance launched from a backup. One workflow for both (`restore` is a
//! failover to an older point in time, asked for by AMI; a failback is a
//! failover home).
//!
//! Its steps are the shared restore steps of [`super::restore`] (where each
//! one's crash-safety is described) in this order: `preflight`, `fence`,
//! `launch`, `wait_running`, `wait_agent`, the runbook (`app_stop`,
//! `rewrite_addresses`, `hostname`, `wipe_nomad`, `app_start`), `move_eip`,
//! `update_dns`, `cleanup_builds`, `verify`; then its own:
//! - `promote`: one store transaction makes the candidate the primary and
//!   the old instance fenced (a taken spare is retagged after it);
//! - `release` (always, shared): an operation that ends without promotion
//!   (abort) terminates what it launched; the old instance stays fenced;
//! - `report` (always): the measured RTO by phase and what a human must
//!   still do.
//!
//! A step after the fence that fails waits for a human (`Pause`): `drctl
//! operation resume ID` retries it, `abort` ends the operation (release
//! runs).

pub mod plan;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::restore::{
    AGENT_RETRY, app_start, app_stop, cleanup_builds, ec2_launch, fence, hostname, launch, move_eip, phase_durations, preflight, release,
    rewrite_addresses, secs, update_dns, verify, wait_agent, wait_running, wipe_nomad,
};
use super::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use crate::domain::model::{Millis, Protected, Role, now_ms};
use crate::domain::tags::{TAG_OPERATION, TAG_ROLE};
use crate::engine::{Ctx, OnFailure, Outcome, Retry, StepDef, StepError, Workflow};
pub use plan::{HumanAction, Plan, PlanError, Request};

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
