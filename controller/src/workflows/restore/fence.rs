//! The fence of the old primary, and the stop of an instance with its wait
//! (also a host restart's).

use super::{secs, waited};
use crate::cloud::ec2::{Ec2, InstanceState};
use crate::domain::model::Role;
use crate::domain::recovery::Fence;
use crate::domain::tags::{TAG_FENCED_FROM, TAG_SITE};
use crate::engine::wait::{Poll, PollOpts, Waited};
use crate::engine::{Ctx, ErrorKind, Outcome, StepError};
use crate::workflows::failover::State;
use crate::workflows::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use std::time::Duration;

pub(in crate::workflows) async fn fence(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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
            if matches!(inst.state, InstanceState::Stopped | InstanceState::Terminated) {
                format!("{old} is already {}; recorded fenced", inst.state)
            } else {
                let forced = stop_and_wait(ctx, &ec2, &old, &inst.state).await?;
                format!("{old} stopped{}; recorded fenced", if forced { " (forced)" } else { "" })
            }
        }
        Fence::Terminate => {
            if inst.state != InstanceState::Terminated {
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
            ctx.poll_until(PollOpts::every(Duration::from_millis(500), cfg.fence_timeout), false, || async {
                let state = retry_ec2("DescribeInstances", budget, || ec2.describe_instance(&old)).await?.map(|i| i.state);
                Ok::<_, StepError>(match state {
                    None | Some(InstanceState::Terminated) => Poll::Ready(()),
                    Some(s) => Poll::Waiting { progress: format!("waiting for {old} to terminate ({s})"), state: () },
                })
            })
            .await
            .map_err(|w| {
                waited(w, |()| StepError::new(ErrorKind::TimedOut, format!("{old} is not terminated after {:?}", cfg.fence_timeout)))
            })?;
            format!("{old} terminated, its volumes kept and tagged ({})", st.plan.fence.keeps_volumes.join(", "))
        }
    };
    st.fenced = Some(old);
    Ok(Outcome::Done(detail))
}

/// StopInstances (unless `state` says it is stopping already), then waits
/// until it is stopped; forced after `failover.fence_timeout`, given as long
/// again. Whether the stop had to be forced.
pub(in crate::workflows) async fn stop_and_wait(
    ctx: &Ctx<Deps>,
    ec2: &std::sync::Arc<dyn Ec2>,
    id: &str,
    state: &InstanceState,
) -> Result<bool, StepError> {
    let budget = EC2_RETRY_BUDGET;
    let timeout = ctx.deps().failover.fence_timeout;
    if *state != InstanceState::Stopping {
        retry_ec2("StopInstances", budget, || ec2.stop_instance(id, false)).await?;
    }
    let look = || async {
        let state = InstanceState::of(retry_ec2("DescribeInstances", budget, || ec2.describe_instance(id)).await?.as_ref());
        Ok::<_, StepError>(if matches!(state, InstanceState::Stopped | InstanceState::Terminated | InstanceState::Gone) {
            Poll::Ready(())
        } else {
            Poll::Waiting { progress: format!("waiting for {id} to stop ({state})"), state }
        })
    };
    let opts = PollOpts::every(Duration::from_millis(500), timeout);
    let aborted = |state: InstanceState| StepError::new(ErrorKind::Failed, format!("aborted while waiting for {id} to stop ({state})"));
    match ctx.poll_until(opts, true, &look).await {
        Ok(()) => return Ok(false),
        Err(Waited::Failed(e)) => return Err(e),
        Err(Waited::Cancelled { last, .. }) => return Err(aborted(last)),
        Err(Waited::TimedOut { .. }) => {}
    }
    ctx.progress(format!("{id} did not stop within {timeout:?}: forcing the stop")).await;
    retry_ec2("StopInstances", budget, || ec2.stop_instance(id, true)).await?;
    // Given as long again.
    match ctx.poll_until(opts, true, &look).await {
        Ok(()) => Ok(true),
        Err(Waited::Failed(e)) => Err(e),
        Err(Waited::Cancelled { last, .. }) => Err(aborted(last)),
        Err(Waited::TimedOut { last, waited }) => Err(StepError::new(
            ErrorKind::TimedOut,
            format!(
                "{id} is still {last} {} after a forced stop: stop it by hand, then resume",
                secs((timeout + waited).as_millis() as u64)
            ),
        )),
    }
}
