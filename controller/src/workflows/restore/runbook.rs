//! The runbook on the candidate, one typed agent step each (see
//! [`super::on_candidate`] for the command ids): app stop, addresses,
//! hostname, Nomad wipe, app start with the health check, build cleanup.

use std::time::Duration;

use super::{AGENT_RETRY, Waiting, candidate, on_candidate, secs};
use crate::agents::{AgentAction, AgentDetail};
use crate::domain::model::now_ms;
use crate::engine::{Ctx, ErrorKind, Outcome, StepError};
use crate::workflows::failover::{State, plan};
use crate::workflows::{CallFailure, Deps, agent_call, report as report_of};

pub(in crate::workflows) async fn app_stop(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    ctx.progress(format!("stopping the app on {} (a restored machine may have started it with its old addresses)", st.candidate)).await;
    let t = ctx.deps().failover.app_timeout;
    let o = on_candidate(ctx, st, "app-stop", &AgentAction::AppStop, t).await?;
    Ok(Outcome::Done(if o.report::<dr_proto::contract::AppReport>()?.already {
        "the app was already stopped".into()
    } else {
        "app stopped".into()
    }))
}

pub(in crate::workflows) async fn rewrite_addresses(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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

pub(in crate::workflows) async fn hostname(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let hostname = st.plan.hostname.clone();
    if hostname.is_empty() {
        return Ok(Outcome::Done("no hostname configured for the site: the backup's is kept".into()));
    }
    let t = ctx.deps().failover.app_timeout;
    let o = on_candidate(ctx, st, "set-hostname", &AgentAction::SetHostname { hostname: hostname.clone() }, t).await?;
    let r = o.report::<dr_proto::contract::HostnameReport>()?;
    Ok(Outcome::Done(if !r.changed { format!("hostname already {hostname}") } else { format!("hostname set to {hostname}") }))
}

pub(in crate::workflows) async fn wipe_nomad(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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

pub(in crate::workflows) async fn app_start(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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

pub(in crate::workflows) async fn cleanup_builds(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
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
