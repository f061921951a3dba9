//! The new machine: the AMI checked, the instance launched (or the hot
//! spare taken), then waited for until it runs and its agent is connected
//! in the role this operation gave it.

use std::time::Duration;

use super::{candidate, ec2_launch, secs, waited};
use crate::agents::Addressee;
use crate::cloud::ec2::{InstanceState, RunInstance};
use crate::domain::model::now_ms;
use crate::domain::tags::{CREATED_BY, TAG_CREATED_BY, TAG_KEEP_UNTIL, TAG_OPERATION, TAG_ROLE, TAG_SITE};
use crate::engine::wait::{Poll, PollOpts};
use crate::engine::{Ctx, ErrorKind, Outcome, StepError};
use crate::workflows::failover::{State, plan};
use crate::workflows::{Deps, EC2_RETRY_BUDGET, retry_ec2};

pub(in crate::workflows) async fn preflight(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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

pub(in crate::workflows) async fn launch(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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
    let limit = ctx.deps().failover.fence_timeout;
    let state = ctx
        .poll_until(PollOpts::every(Duration::from_millis(500), limit), false, || async {
            let state = InstanceState::of(retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?.as_ref());
            Ok::<_, StepError>(if state != InstanceState::Stopping {
                Poll::Ready(state)
            } else {
                Poll::Waiting { progress: format!("waiting for the spare {id} to finish stopping"), state: () }
            })
        })
        .await
        .map_err(|w| waited(w, |()| StepError::new(ErrorKind::TimedOut, format!("the spare {id} is still stopping after {limit:?}"))))?;
    let started = match state {
        InstanceState::Stopped => {
            retry_ec2("StartInstances", EC2_RETRY_BUDGET, || ec2.start_instance(&id)).await?;
            true
        }
        InstanceState::Running | InstanceState::Pending => false,
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

pub(in crate::workflows) async fn wait_running(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let ec2 = ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    let limit = ctx.deps().failover.launch_timeout;
    let opts = PollOpts::every(Duration::from_millis(200), limit).backoff(Duration::from_secs(5));
    let i = ctx
        .poll_until(opts, false, || async {
            let inst = retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instance(&id)).await?;
            let state = InstanceState::of(inst.as_ref());
            if let Some(i) = inst.filter(|i| i.state == InstanceState::Running) {
                return Ok(Poll::Ready(i));
            }
            if matches!(state, InstanceState::Terminated | InstanceState::ShuttingDown | InstanceState::Stopped | InstanceState::Stopping) {
                return Err(StepError::failed(format!("{id} is {state}: it will not come up (look at its console output in EC2)")));
            }
            // Not found yet: RunInstances is eventually consistent.
            let state = if state == InstanceState::Gone { "unknown to EC2 yet".to_owned() } else { state.to_string() };
            Ok::<_, StepError>(Poll::Waiting { progress: format!("waiting for {id} to run ({state})"), state })
        })
        .await
        .map_err(|w| {
            waited(w, |state| {
                StepError::new(ErrorKind::TimedOut, format!("{id} is still {state} after {limit:?} (failover.launch_timeout)"))
            })
        })?;
    st.candidate_private_ip = i.private_ip;
    st.candidate_public_ip = i.public_ip;
    st.running_at_ms = now_ms();
    Ok(Outcome::Done(format!(
        "{id} running after {} (private {}, public {})",
        secs(st.running_at_ms.saturating_sub(st.launched_at_ms)),
        st.candidate_private_ip,
        if st.candidate_public_ip.is_empty() { "none" } else { &st.candidate_public_ip }
    )))
}

pub(in crate::workflows) async fn wait_agent(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let to = candidate(ctx, st)?;
    let limit = ctx.deps().failover.agent_timeout;
    let st_now: &State = st;
    let l = ctx
        .poll_until(PollOpts::every(Duration::from_millis(200), limit), false, || async {
            let live = ctx.deps().registry.live(&to.site_id, &to.instance_id);
            match live {
                Some(l) if l.role == to.role => return Ok(Poll::Ready(l)),
                _ => {}
            }
            // An agent refused since the launch (its certificate expired, ...)
            // will not come up by waiting: say why and stop now.
            if live.is_none()
                && let Some(r) = refused_restored_agent(ctx, st_now, &to)
            {
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
            let (seen, what) = match live {
                Some(l) => (
                    format!("connected as {} ({})", l.role.name(), l.role.reason()),
                    format!("connected as {}, waiting for EC2 to confirm it", l.role.name()),
                ),
                None => ("never connected".to_owned(), "waiting for its agent to connect".to_owned()),
            };
            Ok::<_, StepError>(Poll::Waiting { progress: format!("{}: {what}", to.instance_id), state: seen })
        })
        .await
        .map_err(|w| {
            waited(w, |seen| {
                StepError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the agent of {} did not come up as {} within {limit:?} (failover.agent_timeout): {seen}",
                        to.instance_id,
                        to.role.name()
                    ),
                )
            })
        })?;
    st.agent_up_at_ms = now_ms();
    // The agent's own view of its addresses wins over EC2's only when EC2
    // gave none.
    if st.candidate_private_ip.is_empty() {
        st.candidate_private_ip = l.record.facts.private_ip.clone();
    }
    Ok(Outcome::Done(format!(
        "the agent of {} is connected as {} ({} after running; app {})",
        to.instance_id,
        to.role.name(),
        secs(st.agent_up_at_ms.saturating_sub(st.running_at_ms)),
        if l.record.facts.app_state.is_empty() { "unknown" } else { &l.record.facts.app_state }
    )))
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
