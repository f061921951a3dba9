//! The restore steps: what replaces a site's services machine by one
//! launched from a backup (or takes a hot spare, or restarts the primary),
//! shared by the workflows that run on [`State`]: [`super::failover`]
//! (failover, restore, failback), [`super::drill`], [`super::spare`] and
//! [`super::repair`]. Each workflow is its list of these steps plus its own
//! few.
//!
//! The steps, each safe to run again after a crash anywhere inside it:
//! - [`launch::preflight`]: the backup's AMI is still available where it is
//!   launched (an automatic failover in `approve` mode waits here, before
//!   anything changes).
//! - [`fence::fence`]: the old primary is recorded fenced (its agent gets no
//!   work from now on), then stopped (forced after `failover.fence_timeout`)
//!   or, with `fence = "terminate"`, its volumes kept and tagged and it is
//!   terminated. Never its volumes deleted. [`fence::stop_and_wait`] is the
//!   stop (also a host restart's).
//! - [`launch::launch`]: RunInstances with a ClientToken of the operation,
//!   tagged `dr:operation`; the tag is looked up first (a crash between the
//!   call and its record must not launch a second instance). The instance is
//!   recorded as this operation's candidate before its agent can dial in.
//!   With a planned hot spare, the spare is claimed instead (one store
//!   transaction) and started if stopped.
//! - [`launch::wait_running`], [`launch::wait_agent`]: the candidate's agent
//!   (same site certificate, new instance id) connected and confirmed by EC2;
//!   a refused certificate of the restored agent ends the wait at once.
//! - [`runbook`]: the runbook on the candidate, as typed agent steps with
//!   the operation's command ids (a repeat after a restart is answered from
//!   the agent's journal; an answered error bumps the id's generation so the
//!   next try really runs again): app stop, rewrite addresses (old from the
//!   backup's launch facts, new from EC2), hostname (when configured), wipe
//!   Nomad, app start (then the frontend's health check), and
//!   `cleanup_builds`: builds that were running at the backup's point in
//!   time (a failure is reported for a human, not fatal).
//! - [`network::move_eip`], [`network::update_dns`]: the site's Elastic IP
//!   (same region) and Route 53 record onto the new instance (both
//!   idempotent: an address already there is left).
//! - [`finish::verify`]: the candidate is running, holds the Elastic IP and
//!   its app is started.
//! - [`finish::release`] (always): an operation that ends without promotion
//!   (abort) terminates what it launched, found by its `dr:operation` tag
//!   too ([`finish::launched_by_operation`]); the old instance stays fenced.
//!
//! [`finish::phase_durations`] measures the phases for the workflows'
//! reports.

pub mod fence;
pub mod finish;
pub mod launch;
pub mod network;
pub mod runbook;

use std::time::Duration;

pub use super::failover::State;
use super::{CallFailure, Deps, agent_call, report as report_of};
use crate::agents::{Addressee, AgentAction, AgentOutcome};
use crate::cloud::ec2::Ec2;
pub(in crate::workflows) use crate::engine::wait::secs;
use crate::engine::wait::{Progress, Waited};
use crate::engine::{Ctx, ErrorKind, Retry, StepDef, StepError};
pub(in crate::workflows) use fence::{fence, stop_and_wait};
pub(in crate::workflows) use finish::{launched_by_operation, phase_durations, release, terminate_as_passive, verify};
pub(in crate::workflows) use launch::{launch, preflight, wait_agent, wait_running};
pub(in crate::workflows) use network::{move_eip, update_dns};
pub(in crate::workflows) use runbook::{app_start, app_stop, cleanup_builds, hostname, rewrite_addresses, wipe_nomad};

/// Agent steps that meet a reconnecting agent are retried a few times
/// before the operation waits for a human.
pub(in crate::workflows) const AGENT_RETRY: Retry = Retry {
    on: &[ErrorKind::Unavailable, ErrorKind::Interrupted, ErrorKind::Transient, ErrorKind::Throttled],
    attempts: 5,
    backoff: dr_proto::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(10)),
};

/// The restore steps of a machine that production does not rely on (a
/// drill copy, a spare), up to its verification: launch, the runbook with
/// its own addresses, the health check. A failure ends the operation (no
/// pause for a human); the workflow's own steps follow.
pub(in crate::workflows) fn isolated_restore_steps() -> Vec<StepDef<Deps, State>> {
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

pub(in crate::workflows) fn candidate(ctx: &Ctx<Deps>, st: &State) -> Result<Addressee, StepError> {
    if st.candidate.is_empty() {
        return Err(StepError::new(ErrorKind::Invalid, "no candidate instance was recorded by launch"));
    }
    Ok(Addressee { site_id: ctx.site.id.clone(), instance_id: st.candidate.clone(), role: st.launched_role(&ctx.op_id) })
}

/// EC2 in the region the candidate is launched in.
pub(in crate::workflows) async fn ec2_launch(ctx: &Ctx<Deps>, st: &State) -> Result<std::sync::Arc<dyn Ec2>, StepError> {
    Ok(ctx.deps().ec2_in(&ctx.site, &st.plan.launch.region).await?)
}

/// Sends one runbook step to the candidate (see [`State::generations`]).
pub(in crate::workflows) async fn on_candidate(
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

/// Progress of a long wait that is not a [`Ctx::poll_until`] (a drill's
/// `keep`): throttled as [`Progress`] says.
pub(in crate::workflows) struct Waiting(Progress);

impl Waiting {
    pub(in crate::workflows) fn new() -> Self {
        Waiting(Progress::new())
    }
    pub(in crate::workflows) fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
    pub(in crate::workflows) async fn say(&mut self, ctx: &Ctx<Deps>, what: String) {
        if let Some(line) = self.0.due(what) {
            ctx.progress(line).await;
        }
    }
}

/// A [`Ctx::poll_until`] that ended without what it waited for, as the
/// step's error: a failed look's own, `timed_out` (given the last look's
/// state) for the timeout; a cancellation (only cancellable waits see one)
/// is an abort.
pub(in crate::workflows) fn waited<W>(w: Waited<W, StepError>, timed_out: impl FnOnce(W) -> StepError) -> StepError {
    match w {
        Waited::Failed(e) => e,
        Waited::TimedOut { last, .. } => timed_out(last),
        Waited::Cancelled { .. } => StepError::new(ErrorKind::Failed, "aborted while waiting"),
    }
}
