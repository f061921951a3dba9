//! Repairs of a site's own primary, the first two rungs of the health
//! ladder (`domain::health`), started by the health monitor. No data is
//! lost by either: the instance, its volumes, private IP and Elastic IP
//! stay what they are.
//!
//! - [`AppRestart`] (rung 1): the app is down but the agent and the
//!   instance are fine. Steps: `app_stop`, `app_start` (Replicated says
//!   started and the agent's health check passes within
//!   `failover.app_timeout`).
//! - [`HostRestart`] (rung 2): EC2 reports the instance impaired, retiring
//!   or stopped. Steps: `stop` (forced after `failover.fence_timeout`),
//!   `start`, `wait_running`, `wait_agent` (the same instance's agent back
//!   as the primary), `app_start`. A stop and start moves the instance to
//!   other hardware.
//!
//! Both run on the failover state (`failover::State`, plan kind `repair`,
//! the primary as its "candidate"), start through `failover::start_state`
//! and reuse the restore steps (`restore`). A failed
//! step ends the operation (no pause): the monitor climbs the ladder.

use super::failover::State;
use super::restore;
use super::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use crate::cloud::ec2::InstanceState;
use crate::domain::model::Protected;
use crate::engine::{Ctx, Outcome, Retry, StepDef, StepError, Workflow};

/// Rung 1: restart the app through the agent.
pub struct AppRestart;
/// Rung 2: stop and start the same instance.
pub struct HostRestart;

impl Workflow for AppRestart {
    type Deps = Deps;
    type State = State;
    const KIND: &'static str = "app_restart";
    const VERSION: u32 = 1;
    /// Above backups (preempted, their quiesce lifted first), below a
    /// failover (which preempts a repair).
    const PRIORITY: u8 = 50;
    const PREEMPTIBLE: bool = true;

    fn steps() -> Vec<StepDef<Deps, State>> {
        vec![
            StepDef::new("app_stop", step!(restore::app_stop)).retry(restore::AGENT_RETRY),
            StepDef::new("app_start", step!(restore::app_start)).retry(restore::AGENT_RETRY),
        ]
    }

    fn protects(_: &State) -> Vec<Protected> {
        vec![]
    }
}

impl Workflow for HostRestart {
    type Deps = Deps;
    type State = State;
    const KIND: &'static str = "host_restart";
    const VERSION: u32 = 1;
    const PRIORITY: u8 = 50;
    const PREEMPTIBLE: bool = true;

    fn steps() -> Vec<StepDef<Deps, State>> {
        vec![
            StepDef::new("stop", step!(stop_host)).retry(Retry::TRANSIENT),
            StepDef::new("start", step!(start_host)).retry(Retry::TRANSIENT),
            StepDef::new("wait_running", step!(restore::wait_running)).retry(Retry::TRANSIENT),
            StepDef::new("wait_agent", step!(restore::wait_agent)),
            StepDef::new("app_start", step!(restore::app_start)).retry(restore::AGENT_RETRY),
        ]
    }

    fn protects(_: &State) -> Vec<Protected> {
        vec![]
    }
}

/// The state of a repair of `site`'s primary `instance_id` in `region`.
pub fn state(site_id: &str, instance_id: &str, region: &str, why: &str) -> State {
    let mut st = State::default();
    st.plan.site_id = site_id.to_owned();
    st.plan.kind = "repair".into();
    st.plan.launch.region = region.to_owned();
    st.plan.fence.instance_id = instance_id.to_owned();
    st.plan.warnings = vec![why.to_owned()];
    st.candidate = instance_id.to_owned();
    st
}

async fn stop_host(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let id = st.candidate.clone();
    let ec2 = restore::ec2_launch(ctx, st).await?;
    let inst = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?;
    let state = InstanceState::of(inst.as_ref());
    match state {
        InstanceState::Stopped => return Ok(Outcome::Done(format!("{id} is stopped already"))),
        InstanceState::Terminated | InstanceState::ShuttingDown | InstanceState::Gone => {
            return Err(StepError::failed(format!("{id} is {state}: a stop and start cannot bring it back")));
        }
        _ => {}
    }
    ctx.progress(format!("stopping {id} so that EC2 starts it on healthy hardware")).await;
    let forced = restore::stop_and_wait(ctx, &ec2, &id, &state).await?;
    Ok(Outcome::Done(format!("{id} stopped{}", if forced { " (forced)" } else { "" })))
}

async fn start_host(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let id = st.candidate.clone();
    let ec2 = restore::ec2_launch(ctx, st).await?;
    let inst = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?;
    let state = InstanceState::of(inst.as_ref());
    if state.is_up() {
        st.launched_at_ms = crate::domain::model::now_ms();
        return Ok(Outcome::Done(format!("{id} is {state} already")));
    }
    retry_ec2("StartInstances", EC2_RETRY_BUDGET, || ec2.start_instance(&id)).await?;
    st.launched_at_ms = crate::domain::model::now_ms();
    Ok(Outcome::Done(format!("StartInstances {id} (same instance, volumes and addresses)")))
}
