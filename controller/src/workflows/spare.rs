//! Hot spares: one machine per site (policy `spare = stopped | running`)
//! launched from the newest good backup launchable in the spare's region,
//! taken through the failover's runbook with its own addresses, checked
//! healthy, then parked: the app stopped, and with `stopped` the instance
//! too. A failover then takes it (`restore::launch`, with the spare) instead of
//! launching: no RunInstances, no disk hydration.
//!
//! The steps are the failover's on the launched machine (same state, same
//! step functions; its agent is the spare's, same certificate, new
//! instance id):
//! - 1 to 4: `preflight`, `launch` (tagged `dr:role=spare`, no private IP
//!   of the primary's), `wait_running`, `wait_agent`;
//! - 5 to 9: the runbook (app stop, its own addresses, the site's hostname,
//!   Nomad wipe, app start and health check);
//! - 10 to 12: `cleanup_builds`, `verify`, `park`;
//! - 13: `install`: the store's spare of the site, in one transaction;
//! - 14: `retire`: the spares it replaced (every other instance the store
//!   still records as the site's spare) are terminated only now, so once a
//!   site had a spare it never has none while a newer one is prepared;
//! - 15: `release` (always): a spare that was not installed is terminated.
//!
//! The spare keeper (`reconcilers::spares`) starts this workflow when a
//! site has no spare, or a newer good backup exists and the spare's data
//! is older than `spare_max_lag`.

use std::time::Duration;

use super::failover::{self, State};
use super::restore::{self, AGENT_RETRY};
use super::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use crate::agents::AgentAction;
use crate::cloud::ec2::InstanceState;
use crate::domain::model::{Protected, Role, SpareRecord, now_ms};
use crate::engine::wait::{Poll, PollOpts};
use crate::engine::{Ctx, ErrorKind, Outcome, Retry, StepDef, StepError, Workflow};

/// The spare workflow.
pub struct Spare;

impl Workflow for Spare {
    type Deps = Deps;
    type State = State;
    const KIND: &'static str = "spare";
    const VERSION: u32 = 1;
    const PRIORITY: u8 = 3;
    const PREEMPTIBLE: bool = true;
    /// Touches nothing production relies on (its own instance and
    /// addresses): runs beside backups and failovers.
    const ISOLATED: bool = true;

    fn steps() -> Vec<StepDef<Deps, State>> {
        let mut steps = restore::isolated_restore_steps();
        steps.extend([
            StepDef::new("park", step!(park)).retry(AGENT_RETRY),
            StepDef::new("install", step!(install)).retry(Retry::TRANSIENT),
            StepDef::new("retire", step!(retire)).retry(Retry::TRANSIENT),
            StepDef::new("release", step!(release)).always(),
        ]);
        steps
    }

    fn protects(state: &State) -> Vec<Protected> {
        <failover::Failover as Workflow>::protects(state)
    }
}

/// Starts preparing a spare with a plan made by `failover::plan::make`
/// (`spare` set).
pub async fn start(
    engine: &super::Engine,
    plan: failover::Plan,
    requested_by: &str,
) -> Result<crate::domain::model::Operation, crate::engine::EngineError> {
    failover::start_state::<Spare>(engine, State { plan, ..State::default() }, requested_by, None).await
}

/// The mode the site's policy asks for (`stopped` unless `running`).
fn mode(ctx: &Ctx<Deps>) -> crate::domain::policy::SpareMode {
    match ctx.deps().policy(&ctx.site.id).spare {
        crate::domain::policy::SpareMode::Running => crate::domain::policy::SpareMode::Running,
        _ => crate::domain::policy::SpareMode::Stopped,
    }
}

/// The app stopped (it must not run beside the primary), and with
/// `spare = "stopped"` the instance stopped too.
async fn park(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let ec2 = restore::ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    // The instance is stopped only after its app: a stop already asked (a
    // restart after it) needs no app stop, and its agent is gone.
    let now = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?.map(|i| i.state);
    if !matches!(now, Some(InstanceState::Stopping | InstanceState::Stopped)) {
        let t = ctx.deps().failover.app_timeout;
        restore::on_candidate(ctx, st, "park-app-stop", &AgentAction::AppStop, t).await?;
    }
    if mode(ctx) == crate::domain::policy::SpareMode::Running {
        return Ok(Outcome::Done(format!("the app on {id} is stopped; the instance is kept running")));
    }
    let limit = ctx.deps().failover.fence_timeout;
    let asked = std::sync::atomic::AtomicBool::new(false);
    ctx.poll_until(PollOpts::every(Duration::from_millis(500), limit), false, || async {
        let state = InstanceState::of(retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?.as_ref());
        match state {
            InstanceState::Stopped => return Ok(Poll::Ready(())),
            InstanceState::Running | InstanceState::Pending if !asked.load(std::sync::atomic::Ordering::Relaxed) => {
                retry_ec2("StopInstances", EC2_RETRY_BUDGET, || ec2.stop_instance(&id, false)).await?;
                asked.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            InstanceState::Gone | InstanceState::Terminated | InstanceState::ShuttingDown => {
                return Err(StepError::failed(format!("the spare {id} is {state} in EC2")));
            }
            _ => {}
        }
        Ok::<_, StepError>(Poll::Waiting { progress: format!("stopping the spare {id} ({state})"), state: () })
    })
    .await
    .map_err(|w| {
        restore::waited(w, |()| {
            StepError::new(ErrorKind::TimedOut, format!("the spare {id} did not stop within {limit:?} (failover.fence_timeout)"))
        })
    })?;
    Ok(Outcome::Done(format!("the app on {id} is stopped, and the instance is stopped")))
}

/// The site's spare becomes this one (one transaction); the one it
/// replaces is named in its detail (`retire` terminates it).
async fn install(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    // What the files hold now: the address each kind was rewritten to, else
    // what the backup had.
    let held = |kind: &str| -> String {
        st.addresses
            .iter()
            .find(|a| a.kind == kind)
            .map(|a| a.new.clone())
            .or_else(|| st.plan.addresses.iter().find(|a| a.kind == kind).map(|a| a.old.clone()))
            .unwrap_or_default()
    };
    let rec = SpareRecord {
        site_id: ctx.site.id.clone(),
        instance_id: st.candidate.clone(),
        region: st.plan.launch.region.clone(),
        mode: mode(ctx).as_str().to_owned(),
        operation_id: ctx.op_id.clone(),
        backup_image_id: st.plan.backup.image_id.clone(),
        launch_image_id: st.plan.backup.launch_image_id.clone(),
        backup_started_at_ms: st.plan.backup.started_at_ms,
        installed_at_ms: now_ms(),
        files_private_ip: if st.candidate_private_ip.is_empty() { held("private") } else { st.candidate_private_ip.clone() },
        files_public_ip: held("public"),
        hostname: st.plan.hostname.clone(),
    };
    let previous = ctx.store().install_spare(rec).await?;
    ctx.crash_point("spare.after_install");
    ctx.deps().registry.set_role(&ctx.site.id, &st.candidate, Role::Spare);
    st.installed = true;
    Ok(Outcome::Done(match previous {
        Some(p) => format!(
            "{} is the site's spare (from backup {}); it replaces {} (from {})",
            st.candidate, st.plan.backup.image_id, p.instance_id, p.backup_image_id
        ),
        None => format!("{} is the site's spare (from backup {})", st.candidate, st.plan.backup.image_id),
    }))
}

/// Terminates the spares this one replaced, now that this one is
/// installed: every instance of the site the store still records as a
/// spare, but this one (also one whose replacement was installed just
/// before a crash). Never the site's primary, nor an instance some
/// operation took since (its role is no longer `spare`).
async fn retire(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let store = ctx.store();
    let primary = store.site(ctx.site.id.clone()).await?.map(|s| s.primary_instance_id).unwrap_or_default();
    let old: Vec<String> = store
        .instances_of(ctx.site.id.clone())
        .await?
        .into_iter()
        .filter(|r| r.role == "spare" && r.instance_id != st.candidate && r.instance_id != primary)
        .map(|r| r.instance_id)
        .collect();
    if old.is_empty() {
        return Ok(Outcome::Done("no earlier spare to retire".into()));
    }
    let regions = store.instance_regions().await?;
    for id in &old {
        // An earlier spare may live in another region (the policy moved it).
        let region = regions.get(&(ctx.site.id.clone(), id.clone())).cloned().unwrap_or_else(|| ctx.site.region.clone());
        let ec2 = ctx.deps().ec2_in(&ctx.site, &region).await?;
        restore::terminate_as_passive(
            ctx,
            ec2.as_ref(),
            id,
            format!("terminated: replaced as the site's spare by {} ({})", st.candidate, ctx.op_id),
        )
        .await?;
        // TerminateInstances answered: EC2 ends it (a termination is final),
        // so it is no longer listed under the site.
        store.forget_terminated(ctx.site.id.clone(), id.clone()).await?;
    }
    Ok(Outcome::Done(format!("terminated the earlier spare {}", old.join(", "))))
}

/// Always runs: a spare that was not installed is terminated.
async fn release(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    if st.installed {
        return Ok(Outcome::Done("nothing to release: the spare was installed".into()));
    }
    restore::release(ctx, st).await
}
