//! Drills: the restore workflow into an isolated place, measured, then torn
//! down. Proves on a schedule, without touching production, that a site can
//! be restored, and how fast.
//!
//! The steps are the failover's (same state, same step functions, same
//! command ids on the copy) minus everything that touches production: no
//! fence, no Elastic IP, no DNS, no promotion. The copy is launched into
//! `[site.drill]`'s subnet and security groups, tagged `dr:role=drill` and
//! `dr:keep-until`, and its agent (same certificate, new instance id) is
//! the drill's: it gets this drill's commands only.
//!
//! - 1 to 4: `preflight`, `launch`, `wait_running`, `wait_agent`;
//! - 5 to 9: the runbook on the copy (app stop, addresses, the drill
//!   hostname, Nomad wipe, app start and health check);
//! - 10: `cleanup_builds` (on the copy's own data); 11: `verify`;
//! - 12: `measure` (the data the copy holds: the newest build it knows);
//! - 13: `keep` (`--keep`);
//! - 14: `teardown` (always: terminate what this drill launched, delete its
//!   left volumes);
//! - 15: `record` (always: the result in the store, whatever happened).
//!
//! A failed step ends the drill (no pause for a human): teardown and record
//! still run. A controller killed anywhere resumes the drill at its next
//! start; a drill whose teardown could not finish leaves its copy to the
//! drill reaper (`reconcilers::drills`), which terminates every
//! `dr:role=drill` instance whose `dr:keep-until` has passed.

use std::time::Duration;

use super::failover::{self, State};
use super::restore::{self, Waiting, secs};
use super::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use crate::cloud::ec2::InstanceState;
use crate::domain::model::{BackupState, DrillRecord, Millis, Protected, now_ms, worst_rpo};
use crate::domain::tags::TAG_OPERATION;
use crate::engine::wait::{Poll, PollOpts, Waited};
use crate::engine::{Ctx, Outcome, Retry, StepDef, StepError, Workflow};

/// The drill workflow.
pub struct Drill;

/// How far back the worst RPO is looked for when the site had no drill
/// before, and at most.
const RPO_WINDOW_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
const RPO_WINDOW_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

impl Workflow for Drill {
    type Deps = Deps;
    type State = State;
    const KIND: &'static str = "drill";
    const VERSION: u32 = 1;
    const PRIORITY: u8 = 5;
    const PREEMPTIBLE: bool = true;
    const ISOLATED: bool = true;

    fn steps() -> Vec<StepDef<Deps, State>> {
        let mut steps = restore::isolated_restore_steps();
        steps.extend([
            StepDef::new("measure", step!(measure)),
            StepDef::new("keep", step!(keep)),
            StepDef::new("teardown", step!(teardown)).retry(Retry::TRANSIENT).always(),
            StepDef::new("record", step!(record)).always(),
        ]);
        steps
    }

    fn protects(state: &State) -> Vec<Protected> {
        <failover::Failover as Workflow>::protects(state)
    }
}

/// Starts a drill with a plan made by `failover::plan::make` (`drill`
/// set). The copy is kept `keep` after its verification; its
/// `dr:keep-until` allows `[drill] lease` beyond that before the reaper
/// may terminate it. `slot`: the scheduler's drill slot, recorded with the
/// drill in one transaction.
pub async fn start(
    engine: &super::Engine,
    plan: failover::Plan,
    keep: Duration,
    requested_by: &str,
    slot: Option<Millis>,
) -> Result<crate::domain::model::Operation, crate::engine::EngineError> {
    let lease = engine.deps().drill.lease;
    let state =
        State { plan, keep_ms: keep.as_millis() as u64, keep_until_ms: now_ms() + (lease + keep).as_millis() as u64, ..State::default() };
    failover::start_state::<Drill>(engine, state, requested_by, slot).await
}

/// What the copy holds: the newest build its CircleCI API lists (reported
/// by the agent's build cleanup on the copy), so the drill states the real
/// age of the restored data, not only the backup's.
async fn measure(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let newest = newest_build_ms(st);
    Ok(Outcome::Done(match newest {
        Some(t) => format!(
            "the copy's newest build started {} before the drill; the backup is {} old",
            secs(ctx.created_at_ms.saturating_sub(t)),
            secs(ctx.created_at_ms.saturating_sub(st.plan.backup.started_at_ms))
        ),
        None => "the copy's agent reported no build start time (no builds, or an older agent): the data age is the backup's".into(),
    }))
}

fn newest_build_ms(st: &State) -> Option<Millis> {
    let r = super::recorded_report::<dr_proto::contract::CleanupReport>(st.reports.get("cleanup-builds"))?;
    let v = r.newest_build_started_at.as_deref()?;
    let t = humantime::parse_rfc3339_weak(v).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// `--keep`: the copy stays up this long after its verification, for a
/// human to look at it (`drctl operation abort ID` ends the wait).
async fn keep(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    if st.keep_ms == 0 {
        return Ok(Outcome::Done("not kept (no --keep)".into()));
    }
    let verified = ctx
        .store()
        .operation(ctx.op_id.clone())
        .await?
        .and_then(|o| o.steps.iter().find(|s| s.name == "verify").map(|s| s.finished_at_ms))
        .filter(|t| *t > 0)
        .unwrap_or_else(now_ms);
    let until = verified + st.keep_ms;
    let mut progress = Waiting::new();
    while now_ms() < until {
        if ctx.abort_requested() {
            return Ok(Outcome::Done(format!(
                "kept {} of {} (ended by abort)",
                secs(progress.elapsed().as_millis() as u64),
                secs(st.keep_ms)
            )));
        }
        let left = until - now_ms();
        progress.say(ctx, format!("keeping the copy {} for inspection: {} left", st.candidate, secs(left))).await;
        tokio::time::sleep(Duration::from_millis(left.min(1000))).await;
    }
    Ok(Outcome::Done(format!("kept {} after verification", secs(st.keep_ms))))
}

/// Always runs: terminates every instance this drill launched (by its
/// `dr:operation` tag, so also one whose launch answer was lost), waits for
/// them to end, then deletes the volumes carrying the tag that EC2 left.
/// What it cannot end is listed in `leaked` (and `record` fails the drill);
/// the reaper finishes it after `dr:keep-until`.
async fn teardown(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let ec2 = restore::ec2_launch(ctx, st).await?;
    let op_id = ctx.op_id.clone();
    let mut ids = restore::launched_by_operation(ctx, st, ec2.as_ref()).await?;
    // Never the primary, whatever carried the tag.
    ids.retain(|id| *id != ctx.site.primary_instance_id);
    for id in &ids {
        restore::terminate_as_passive(ctx, ec2.as_ref(), id, format!("terminated: drill {op_id} torn down")).await?;
    }
    let limit = ctx.deps().failover.fence_timeout;
    // One deadline for them all.
    let started = tokio::time::Instant::now();
    let mut leaked = vec![];
    for id in &ids {
        let left = limit.saturating_sub(started.elapsed());
        let ended = ctx
            .poll_until(PollOpts::every(Duration::from_millis(500), left), false, || async {
                let state = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(id)).await?.map(|i| i.state);
                Ok::<_, StepError>(match state {
                    None | Some(InstanceState::Terminated) => Poll::Ready(()),
                    Some(s) => Poll::Waiting { progress: format!("waiting for the copy {id} to terminate ({s})"), state: () },
                })
            })
            .await;
        match ended {
            Ok(()) => {}
            Err(Waited::Failed(e)) => return Err(e),
            Err(Waited::TimedOut { .. } | Waited::Cancelled { .. }) => leaked.push(id.clone()),
        }
    }
    let volumes = retry_ec2("DescribeVolumes", EC2_RETRY_BUDGET, || ec2.find_volumes_by_tag(TAG_OPERATION, &op_id)).await?;
    let mut deleted = vec![];
    for v in volumes.iter().filter(|v| v.state == "available") {
        retry_ec2("DeleteVolume", EC2_RETRY_BUDGET, || ec2.delete_volume(&v.id)).await?;
        deleted.push(v.id.clone());
    }
    let left: Vec<String> =
        volumes.iter().filter(|v| v.state != "available" && v.state != "deleting" && v.state != "deleted").map(|v| v.id.clone()).collect();
    let ended: Vec<&String> = ids.iter().filter(|i| !leaked.contains(i)).collect();
    // EC2 says they are gone: no longer listed under the site.
    for id in &ended {
        ctx.store().forget_terminated(ctx.site.id.clone(), (*id).clone()).await?;
    }
    let detail = if ids.is_empty() {
        "nothing was launched".to_owned()
    } else {
        format!(
            "terminated {}{}{}",
            ended.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if deleted.is_empty() { String::new() } else { format!("; deleted volumes {}", deleted.join(", ")) },
            if leaked.is_empty() && left.is_empty() {
                String::new()
            } else {
                format!(
                    "; NOT ended within {}: {} (the drill reaper terminates them after their dr:keep-until)",
                    secs(limit.as_millis() as u64),
                    leaked.iter().chain(left.iter()).cloned().collect::<Vec<_>>().join(", ")
                )
            }
        )
    };
    st.leaked = leaked.into_iter().chain(left).collect();
    st.torn_down = Some(detail.clone());
    Ok(Outcome::Done(detail))
}

/// Always runs: stores the drill's result (also when it failed) and fails
/// the drill when teardown left something behind.
async fn record(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let store = ctx.store();
    let op = store.operation(ctx.op_id.clone()).await?;
    let phases = restore::phase_durations(
        op.as_ref(),
        &[
            ("launch_to_running", &["launch", "wait_running"]),
            ("agent_up", &["wait_agent"]),
            ("app_stop", &["app_stop"]),
            ("file_steps", &["rewrite_addresses", "hostname", "wipe_nomad"]),
            ("app_start", &["app_start"]),
            ("cleanup", &["cleanup_builds"]),
        ],
    );
    let failure = op.as_ref().map(|o| o.failure.clone()).unwrap_or_default();
    let verified =
        op.as_ref().is_some_and(|o| o.steps.iter().any(|s| s.name == "verify" && s.state == crate::domain::model::StepState::Done));
    let started = ctx.created_at_ms;
    // The worst RPO over the window since the previous drill.
    let previous = store.drills(ctx.site.id.clone(), 2).await?.into_iter().find(|d| d.operation_id != ctx.op_id);
    let from = previous
        .map(|d| d.started_at_ms)
        .unwrap_or_else(|| started.saturating_sub(RPO_WINDOW_DEFAULT.as_millis() as u64))
        .max(started.saturating_sub(RPO_WINDOW_MAX.as_millis() as u64));
    let starts: Vec<Millis> = store
        .backups(ctx.site.id.clone())
        .await?
        .into_iter()
        .filter(|b| matches!(b.state, BackupState::Available | BackupState::Deleting | BackupState::Deleted) && b.completed_at_ms > 0)
        .map(|b| b.started_at_ms)
        .collect();
    let newest = newest_build_ms(st).unwrap_or(0);
    let error = if !failure.is_empty() {
        failure
    } else if !st.leaked.is_empty() {
        format!("teardown left {} running", st.leaked.join(", "))
    } else if !verified {
        "the drill ended before its copy was verified".into()
    } else {
        String::new()
    };
    let rec = DrillRecord {
        operation_id: ctx.op_id.clone(),
        site_id: ctx.site.id.clone(),
        requested_by: ctx.requested_by.clone(),
        started_at_ms: started,
        finished_at_ms: now_ms(),
        ok: error.is_empty(),
        error: error.clone(),
        backup_image_id: st.plan.backup.image_id.clone(),
        launch_image_id: st.plan.backup.launch_image_id.clone(),
        region: st.plan.launch.region.clone(),
        backup_started_at_ms: st.plan.backup.started_at_ms,
        instance_id: st.candidate.clone(),
        hostname: st.plan.hostname.clone(),
        rto_ms: if st.healthy_at_ms > 0 { st.healthy_at_ms.saturating_sub(started) } else { 0 },
        phases,
        rpo_ms: started.saturating_sub(st.plan.backup.started_at_ms),
        worst_rpo_ms: worst_rpo(&starts, from, started),
        worst_rpo_window_ms: started - from,
        newest_build_at_ms: newest,
        data_age_ms: if newest > 0 { started.saturating_sub(newest) } else { 0 },
        teardown: st.torn_down.clone().unwrap_or_default(),
        leaked: st.leaked.clone(),
    };
    store.put_drill(rec.clone()).await?;
    if !st.leaked.is_empty() {
        return Err(StepError::failed(format!(
            "recorded, but teardown left {}: the drill reaper terminates them after {}",
            st.leaked.join(", "),
            crate::domain::tags::keep_until_value(st.keep_until_ms)
        )));
    }
    Ok(Outcome::Done(if rec.ok {
        format!(
            "RTO {}, RPO {} (worst {} over {}); torn down",
            secs(rec.rto_ms),
            secs(rec.rpo_ms),
            secs(rec.worst_rpo_ms),
            secs(rec.worst_rpo_window_ms)
        )
    } else {
        format!("drill failed: {error}; torn down")
    }))
}
