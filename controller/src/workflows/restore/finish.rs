//! The end of a restore: the candidate verified, or (without promotion)
//! what the operation launched released; and the phases measured.

use std::collections::BTreeMap;

use super::{candidate, ec2_launch};
use crate::agents::{AgentAction, AgentDetail};
use crate::cloud::ec2::{Ec2, InstanceState};
use crate::domain::model::Role;
use crate::domain::tags::TAG_OPERATION;
use crate::engine::{Ctx, Outcome, StepError};
use crate::workflows::failover::State;
use crate::workflows::{CallFailure, Deps, EC2_RETRY_BUDGET, agent_call, retry_ec2};

pub(in crate::workflows) async fn verify(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let ec2 = ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    let inst = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?;
    if inst.as_ref().is_none_or(|i| i.state != InstanceState::Running) {
        return Err(StepError::failed(format!("{id} is {} in EC2", InstanceState::of(inst.as_ref()))));
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

/// Always runs. After an operation that ended without promotion: terminate
/// the candidate it launched. The old instance stays fenced.
pub(in crate::workflows) async fn release(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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
pub(in crate::workflows) async fn launched_by_operation(ctx: &Ctx<Deps>, st: &State, ec2: &dyn Ec2) -> Result<Vec<String>, StepError> {
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
pub(in crate::workflows) async fn terminate_as_passive(ctx: &Ctx<Deps>, ec2: &dyn Ec2, id: &str, reason: String) -> Result<(), StepError> {
    retry_ec2("TerminateInstances", EC2_RETRY_BUDGET, || ec2.terminate_instance(id)).await?;
    ctx.store().set_instance_role(ctx.site.id.clone(), id.to_owned(), "passive".into(), String::new(), reason.clone()).await?;
    ctx.deps().registry.set_role(&ctx.site.id, id, Role::Passive { reason });
    Ok(())
}

/// The time spent in each phase (a named group of steps), from the
/// operation's step records.
pub(in crate::workflows) fn phase_durations(
    op: Option<&crate::domain::model::Operation>,
    phases: &[(&str, &[&str])],
) -> BTreeMap<String, u64> {
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
