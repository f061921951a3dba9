//! The backup workflow.
//!
//! Steps, each safe to run again after a crash anywhere inside it:
//! 1. `check_agent`: ask the site's agent for the app state (recorded with
//!    the backup). A missing or passive agent does not stop a crash-
//!    consistent backup; it is recorded.
//! 2. `quiesce`: per the site's policy, nothing (`none`), freeze the data
//!    file systems (`freeze`), drain Nomad builders then freeze (`drain`), or
//!    stop the app (`stop`). A failure falls back to crash-consistent or
//!    skips the backup, per `on_quiesce_failure`; the result says which.
//! 3. `create_image`: CreateImage (NoReboot) tagged `dr:operation=<id>`.
//!    CreateImage has no ClientToken, so the step first looks for an AMI
//!    with that tag: a restart after the call but before its result was
//!    stored finds it instead of creating a second one.
//! 4. `wait_snapshots`: poll until every snapshot of the AMI exists and is
//!    `pending` (or further): from then on the image no longer depends on
//!    the live disks.
//! 5. `unquiesce` (runs even when an earlier step failed): thaw, undrain,
//!    start the app — whatever `quiesce` did, in reverse.
//! 6. `wait_available`: poll with doubling waits (`backup.poll_initial` up
//!    to `backup.poll_max`) until the AMI is `available`; `failed` or the
//!    deadline (`backup.timeout` from the operation's creation, so restarts
//!    do not extend it) fails the backup.
//! 7. `tag_snapshots`: tag the AMI's snapshots (a separate CreateTags: EC2
//!    emulators reject snapshot TagSpecifications on CreateImage).
//! 8. `record`: the backup enters the store and `drctl backups`, with the
//!    consistency achieved and how long file systems were frozen.
//! 9. `copy`, 10. `retention`: DR-region copies and retention (see
//!    [`crate::copies`]).

use std::time::Duration;

use serde_json::json;

use super::{StepCtx, StepError, StepOutput, retry_ec2};
use crate::agents::{AgentAction, AgentDetail};
use crate::policy::{OnQuiesceFailure, Quiesce};
use crate::ec2::{CreateImage, Ec2, Image};
use crate::model::{Backup, Consistency, now_ms};

pub const STEPS: &[&str] = &[
    "check_agent",
    "quiesce",
    "create_image",
    "wait_snapshots",
    "unquiesce",
    "wait_available",
    "tag_snapshots",
    "record",
    "copy",
    "retention",
];

/// Steps that run even after an earlier step failed.
pub const ALWAYS: &[&str] = &["unquiesce"];

/// Tag keys written on every AMI and snapshot the controller creates.
pub const TAG_SITE: &str = "dr:site";
pub const TAG_OPERATION: &str = "dr:operation";
pub const TAG_CREATED_BY: &str = "dr:created-by";
pub const CREATED_BY: &str = "dr-controller";

/// Budget for absorbing throttling and network errors on one EC2 call.
const RETRY_BUDGET: Duration = Duration::from_secs(300);

pub async fn run_step(ctx: &StepCtx<'_>, name: &str) -> Result<StepOutput, StepError> {
    if let Some(message) = crate::faults::fail_point(name) {
        return Err(StepError::Failed(message));
    }
    match name {
        "check_agent" => check_agent(ctx).await,
        "quiesce" => quiesce(ctx).await,
        "create_image" => create_image(ctx).await,
        "wait_snapshots" => wait_snapshots(ctx).await,
        "unquiesce" => unquiesce(ctx).await,
        "wait_available" => wait_step(ctx).await,
        "tag_snapshots" => tag_snapshots(ctx).await,
        "record" => record(ctx).await,
        "copy" => copy(ctx).await,
        "retention" => {
            let decisions = crate::copies::apply_retention(ctx.engine, ctx.site, false).await?;
            let deleted: Vec<&str> = decisions.iter().filter(|d| !d.keep).map(|d| d.image_id.as_str()).collect();
            Ok(StepOutput {
                detail: if deleted.is_empty() {
                    format!("kept all {} backup(s)", decisions.len())
                } else {
                    format!("deleted {} (AMIs and snapshots); kept {}", deleted.join(", "), decisions.len() - deleted.len())
                },
                result: json!({"deleted": deleted, "decisions": decisions}),
            })
        }
        other => Err(StepError::Failed(format!("unknown backup step `{other}`"))),
    }
}

fn tags(ctx: &StepCtx<'_>) -> Vec<(String, String)> {
    vec![
        (TAG_SITE.into(), ctx.site.id.clone()),
        (TAG_OPERATION.into(), ctx.op.id.clone()),
        (TAG_CREATED_BY.into(), CREATED_BY.into()),
    ]
}

fn field<'a>(ctx: &'a StepCtx<'_>, step: &str, key: &str) -> Result<&'a serde_json::Value, StepError> {
    ctx.result_of(step)
        .and_then(|v| v.get(key))
        .ok_or_else(|| StepError::Failed(format!("the result of step {step} lacks `{key}`")))
}

async fn check_agent(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    agent_ready(ctx).await;
    let command_id = format!("{}.app-status", ctx.op.id);
    let timeout = ctx.engine.backup.agent_call_timeout;
    match ctx.engine.registry.call(&ctx.site.id, &command_id, &AgentAction::AppStatus, timeout).await {
        Ok(outcome) if outcome.ok => {
            let (state, transitioning) = match outcome.detail {
                AgentDetail::AppStatus { state, is_transitioning, .. } => (state, is_transitioning),
                AgentDetail::None | AgentDetail::Report(_) => ("unknown".to_owned(), false),
            };
            Ok(StepOutput {
                detail: format!(
                    "agent answered: app {state}{}{}",
                    if transitioning { " (transitioning)" } else { "" },
                    if outcome.replayed { " (from its journal)" } else { "" }
                ),
                result: json!({"agent": "connected", "app_state": state, "replayed": outcome.replayed}),
            })
        }
        Ok(outcome) => Ok(StepOutput {
            detail: format!("agent could not read the app state: {}; the backup goes on crash-consistent", outcome.error),
            result: json!({"agent": "error", "app_state": "unknown", "error": outcome.error}),
        }),
        Err(e) => Ok(StepOutput {
            detail: format!("{e}; the backup goes on crash-consistent"),
            result: json!({"agent": "unavailable", "app_state": "unknown", "error": e.to_string()}),
        }),
    }
}

/// After a controller restart the site's agent needs a moment to reconnect:
/// when it was alive recently, wait for it (up to
/// `backup.agent_reconnect_grace`) instead of concluding it is gone.
async fn agent_ready(ctx: &StepCtx<'_>) {
    let registry = &ctx.engine.registry;
    if registry.live(&ctx.site.id).is_some() {
        return;
    }
    let recent = ctx
        .engine
        .store
        .agent(&ctx.site.id)
        .ok()
        .flatten()
        .is_some_and(|a| now_ms().saturating_sub(a.last_heartbeat_ms) < 300_000);
    if !recent {
        return;
    }
    ctx.progress("waiting for the site's agent to reconnect".into());
    let deadline = tokio::time::Instant::now() + ctx.engine.backup.agent_reconnect_grace;
    while registry.live(&ctx.site.id).is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the agent for one quiesce action; the command id names the
/// operation and the action so a repeat after a restart is answered from the
/// agent's journal.
async fn agent_step(ctx: &StepCtx<'_>, name: &str, action: AgentAction, timeout: Duration) -> Result<serde_json::Value, String> {
    agent_call(ctx, name, &action, timeout).await.map_err(|e| match e {
        CallFailure::Answered(m) | CallFailure::Unreachable(m) => m,
    })
}

/// Why an agent step did not succeed.
enum CallFailure {
    /// The agent ran it (or refused it) and answered with this error.
    Answered(String),
    /// No answer: not connected, disconnected, timed out.
    Unreachable(String),
}

/// Sends `<operation>.<name>` to the site's agent (after giving a recently
/// seen agent time to reconnect) and returns its report.
async fn agent_call(
    ctx: &StepCtx<'_>,
    name: &str,
    action: &AgentAction,
    timeout: Duration,
) -> Result<serde_json::Value, CallFailure> {
    agent_ready(ctx).await;
    let id = format!("{}.{name}", ctx.op.id);
    match ctx.engine.registry.call(&ctx.site.id, &id, action, timeout).await {
        Ok(o) if o.ok => Ok(match o.detail {
            AgentDetail::Report(v) => v,
            _ => json!({}),
        }),
        Ok(o) => Err(CallFailure::Answered(o.error)),
        Err(e) => Err(CallFailure::Unreachable(e.to_string())),
    }
}

async fn quiesce(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    let policy = ctx.engine.policy(&ctx.site.id);
    let cfg = &ctx.engine.backup;
    let level = policy.quiesce;
    let mut done: Vec<&str> = Vec::new();
    let plan: Vec<(&str, AgentAction, Duration)> = match level {
        Quiesce::None => vec![],
        Quiesce::Freeze => vec![("freeze", AgentAction::Freeze { deadline: cfg.freeze_deadline }, cfg.agent_call_timeout)],
        Quiesce::Drain => vec![
            ("drain", AgentAction::Drain { deadline: cfg.drain_deadline }, cfg.drain_deadline + cfg.agent_call_timeout),
            ("freeze", AgentAction::Freeze { deadline: cfg.freeze_deadline }, cfg.agent_call_timeout),
        ],
        Quiesce::Stop => vec![("app-stop", AgentAction::AppStop, cfg.agent_call_timeout.max(Duration::from_secs(900)))],
    };
    let mut failed: Option<String> = None;
    let mut app_was_stopped = false;
    for (name, action, timeout) in plan {
        ctx.progress(format!("{name} on the agent"));
        match agent_step(ctx, name, action, timeout).await {
            Ok(report) => {
                if name == "app-stop" {
                    app_was_stopped = report["already"] == true;
                }
                done.push(name)
            }
            Err(e) => {
                failed = Some(format!("{name}: {e}"));
                break;
            }
        }
    }
    let frozen_at_ms = if done.contains(&"freeze") { now_ms() } else { 0 };
    let (skip, detail) = match (&failed, policy.on_quiesce_failure) {
        (None, _) if done.is_empty() => (false, "none: crash-consistent image".to_owned()),
        (None, _) => (false, format!("{}: done ({})", level.as_str(), done.join(", "))),
        (Some(e), OnQuiesceFailure::Crash) => {
            (false, format!("{} failed ({e}); falling back to a crash-consistent image", level.as_str()))
        }
        (Some(e), OnQuiesceFailure::Skip) => (true, format!("{} failed ({e}); the policy skips this backup", level.as_str())),
    };
    Ok(StepOutput {
        detail,
        result: json!({
            "level": level.as_str(),
            "done": done,
            "failed": failed,
            "skip": skip,
            "frozen_at_ms": frozen_at_ms,
            "app_was_stopped": app_was_stopped,
        }),
    })
}

/// Undoes what `quiesce` did, in reverse; retries while the agent is
/// unreachable, for `backup.unquiesce_patience`.
async fn unquiesce(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    // Without a stored quiesce result (it failed, or the controller died
    // inside it), undo what the policy's level may have done.
    let policy_level = json!({"level": ctx.engine.policy(&ctx.site.id).quiesce.as_str(), "done": []});
    let q = ctx.result_of("quiesce").unwrap_or(&policy_level);
    let done: Vec<String> = serde_json::from_value(q["done"].clone()).unwrap_or_default();
    // Thaw and undrain are idempotent, so they are sent for the level asked
    // for even if `quiesce` does not record them as done: a crash after the
    // agent froze but before the result was stored must not leave anything
    // quiesced. The app is started only if quiesce really stopped it.
    let level = q["level"].as_str().unwrap_or("none");
    let mut todo: Vec<String> = match level {
        "freeze" => vec!["freeze".into()],
        "drain" => vec!["drain".into(), "freeze".into()],
        _ => vec![],
    };
    if done.iter().any(|d| d == "app-stop") && q["app_was_stopped"] != true {
        todo.push("app-stop".into());
    }
    let cfg = &ctx.engine.backup;
    let mut undone: Vec<&str> = Vec::new();
    let mut frozen_ms: u64 = 0;
    for name in todo.iter().rev() {
        let (undo, action, timeout) = match name.as_str() {
            "freeze" => ("thaw", AgentAction::Thaw, cfg.agent_call_timeout),
            "drain" => ("undrain", AgentAction::Undrain, cfg.agent_call_timeout),
            "app-stop" => ("app-start", AgentAction::AppStart, cfg.agent_call_timeout.max(Duration::from_secs(900))),
            _ => continue,
        };
        // Undoing something quiesce did not record as done is a precaution:
        // one try, and a failure (e.g. nothing to thaw) is only noted.
        let recorded = done.iter().any(|d| d == name);
        let report = if recorded {
            undo_until_done(ctx, undo, &action, timeout).await?
        } else {
            match agent_call(ctx, undo, &action, timeout).await {
                Ok(r) if r["already_done"] != true && r["undrained"].as_array().is_none_or(|a| !a.is_empty()) => r,
                Ok(_) => continue,
                Err(CallFailure::Answered(e) | CallFailure::Unreachable(e)) => {
                    tracing::info!(operation = %ctx.op.id, step = undo, error = %e, "precautionary undo had nothing to do");
                    continue;
                }
            }
        };
        if undo == "thaw" {
            frozen_ms = report.get("frozen_for_ms").and_then(|v| v.as_u64()).unwrap_or(frozen_ms);
        }
        undone.push(undo);
    }
    // The freeze window beyond the EC2 calls it has to cover.
    let overhead_ms = (frozen_ms > 0).then(|| {
        let call = ctx.result_of("create_image").and_then(|r| r["call_ms"].as_u64()).unwrap_or(0);
        let wait = ctx.result_of("wait_snapshots").and_then(|r| r["wait_ms"].as_u64()).unwrap_or(0);
        frozen_ms.saturating_sub(call + wait)
    });
    Ok(StepOutput {
        detail: if undone.is_empty() {
            "nothing to undo".into()
        } else if frozen_ms > 0 {
            format!("{} (file systems frozen {frozen_ms} ms)", undone.join(", "))
        } else {
            undone.join(", ")
        },
        result: json!({"undone": undone, "frozen_ms": frozen_ms, "freeze_overhead_ms": overhead_ms}),
    })
}

/// Undoes a recorded quiesce action, retrying while the agent cannot do it,
/// for `backup.unquiesce_patience`. A call lost in transit is repeated with
/// the same command id (the agent answers from its journal if it ran);
/// after the agent itself reported a failure, a new id (`<undo>-1`, ...)
/// makes it really try again.
async fn undo_until_done(
    ctx: &StepCtx<'_>,
    undo: &str,
    action: &AgentAction,
    timeout: Duration,
) -> Result<serde_json::Value, StepError> {
    let patience = ctx.engine.backup.unquiesce_patience;
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(200);
    let mut attempt = 0u32;
    loop {
        let name = if attempt == 0 { undo.to_owned() } else { format!("{undo}-{attempt}") };
        let e = match agent_call(ctx, &name, action, timeout).await {
            Ok(report) => return Ok(report),
            Err(CallFailure::Answered(e)) => {
                attempt += 1;
                e
            }
            Err(CallFailure::Unreachable(e)) => e,
        };
        if start.elapsed() >= patience {
            return Err(StepError::Failed(format!(
                "{undo} failed: {e} (a frozen file system is thawed by the agent's watchdog at its deadline; a stopped app needs `dr-agent app-start` on the machine)"
            )));
        }
        ctx.progress(format!("{undo} not done yet ({e}); retrying"));
        tracing::warn!(operation = %ctx.op.id, site = %ctx.site.id, step = undo, error = %e, "cannot lift the quiesce yet; retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// Waits until every snapshot of the new AMI exists and is pending (or
/// done): the moment a quiesce may be lifted.
async fn wait_snapshots(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    let image_id = field(ctx, "create_image", "image_id")?.as_str().unwrap_or_default().to_owned();
    let ec2 = ctx.ec2().await?;
    let start = tokio::time::Instant::now();
    let ids = [image_id.clone()];
    let mut wait = Duration::from_millis(50);
    loop {
        let images = retry_ec2("DescribeImages", RETRY_BUDGET, || ec2.describe_images(&ids)).await?;
        if let Some(image) = images.into_iter().find(|i| i.id == image_id) {
            if image.state == "failed" {
                return Err(StepError::Failed(format!("{image_id} failed: {}", image.state_reason)));
            }
            if !image.snapshot_ids.is_empty() {
                let states = retry_ec2("DescribeSnapshots", RETRY_BUDGET, || ec2.describe_snapshots(&image.snapshot_ids)).await?;
                let ready = image.snapshot_ids.iter().all(|s| {
                    states.iter().any(|(id, st)| id == s && matches!(st.as_str(), "pending" | "completed"))
                });
                if ready {
                    let wait_ms = start.elapsed().as_millis() as u64;
                    return Ok(StepOutput {
                        detail: format!("{} snapshot(s) pending after {wait_ms} ms", image.snapshot_ids.len()),
                        result: json!({"snapshot_ids": image.snapshot_ids, "wait_ms": wait_ms}),
                    });
                }
            }
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(StepError::Failed(format!("the snapshots of {image_id} did not start within 10 minutes")));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

async fn create_image(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    if let Some(q) = ctx.result_of("quiesce").filter(|q| q["skip"] == true) {
        return Err(StepError::Failed(format!(
            "backup skipped: quiesce {} failed ({})",
            q["level"].as_str().unwrap_or("?"),
            q["failed"].as_str().unwrap_or("?")
        )));
    }
    let ec2 = ctx.ec2().await?;
    let existing = retry_ec2("DescribeImages", RETRY_BUDGET, || ec2.find_images_by_tag(TAG_OPERATION, &ctx.op.id)).await?;
    let usable: Vec<&Image> = existing.iter().filter(|i| i.state != "failed" && i.state != "deregistered").collect();
    if let Some(image) = usable.first() {
        if usable.len() > 1 {
            tracing::error!(operation = %ctx.op.id, images = ?usable.iter().map(|i| &i.id).collect::<Vec<_>>(), "more than one AMI carries this operation's tag; using the first");
        }
        return Ok(StepOutput {
            detail: format!("{} already exists for this operation (created before a restart); not creating another", image.id),
            result: json!({"image_id": image.id, "instance_id": ctx.site.primary_instance_id, "reused": true}),
        });
    }
    if let Some(failed) = existing.first() {
        return Err(StepError::Failed(format!(
            "AMI {} of this operation is {}: {}; start a new backup",
            failed.id, failed.state, failed.state_reason
        )));
    }
    let stamp = ctx.op.id.clone();
    let req = CreateImage {
        instance_id: ctx.site.primary_instance_id.clone(),
        name: format!("dr-{}-{stamp}", ctx.site.id),
        description: format!("dr-controller backup of site {} (operation {})", ctx.site.id, ctx.op.id),
        tags: tags(ctx),
    };
    let started = tokio::time::Instant::now();
    let image_id = retry_ec2("CreateImage", RETRY_BUDGET, || ec2.create_image(&req)).await?;
    let call_ms = started.elapsed().as_millis() as u64;
    ctx.crash_point("backup.after_create_image");
    Ok(StepOutput {
        detail: format!("CreateImage (no reboot) of {} gave {image_id} in {call_ms} ms", req.instance_id),
        result: json!({"image_id": image_id, "instance_id": req.instance_id, "reused": false, "call_ms": call_ms}),
    })
}

async fn wait_step(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    let image_id = field(ctx, "create_image", "image_id")?.as_str().unwrap_or_default().to_owned();
    let ec2 = ctx.ec2().await?;
    let cfg = &ctx.engine.backup;
    let elapsed = Duration::from_millis(now_ms().saturating_sub(ctx.op.created_at_ms));
    let left = cfg.timeout.saturating_sub(elapsed);
    let image = wait_available(ec2.as_ref(), &image_id, cfg.poll_initial, cfg.poll_max, left, |d| ctx.progress(d)).await?;
    Ok(StepOutput {
        detail: format!("{image_id} is available with {} snapshot(s)", image.snapshot_ids.len()),
        result: json!({"snapshot_ids": image.snapshot_ids}),
    })
}

/// Polls until `image_id` is available: the first check after `first`
/// (a fresh AMI is never available at once), then waits doubling up to
/// `max`; gives up after `budget`. Reports each wait through `progress`.
pub async fn wait_available(
    ec2: &dyn Ec2,
    image_id: &str,
    first: Duration,
    max: Duration,
    budget: Duration,
    progress: impl Fn(String),
) -> Result<Image, StepError> {
    let start = tokio::time::Instant::now();
    let mut wait = first;
    let mut state = String::from("not checked yet");
    let ids = [image_id.to_owned()];
    loop {
        let elapsed = start.elapsed();
        let sleep = wait.min(budget.saturating_sub(elapsed));
        progress(format!(
            "{image_id} is {state}; waited {} so far, next check in {}",
            humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
            humantime::format_duration(Duration::from_secs(sleep.as_secs().max(1)))
        ));
        tokio::time::sleep(sleep).await;
        wait = (wait * 2).min(max);

        let images = retry_ec2("DescribeImages", RETRY_BUDGET, || ec2.describe_images(&ids)).await?;
        let image = images.into_iter().find(|i| i.id == image_id);
        state = image.as_ref().map(|i| i.state.clone()).unwrap_or_else(|| "missing".into());
        match (state.as_str(), image) {
            ("available", Some(image)) => return Ok(image),
            ("failed" | "deregistered" | "invalid" | "error", image) => {
                let reason = image.map(|i| i.state_reason).unwrap_or_default();
                return Err(StepError::Failed(format!("{image_id} became {state}: {reason}")));
            }
            _ => {}
        }
        if start.elapsed() >= budget {
            return Err(StepError::Failed(format!(
                "{image_id} is still {state} after {}; giving up (backup.timeout)",
                humantime::format_duration(Duration::from_secs(start.elapsed().as_secs()))
            )));
        }
    }
}

async fn tag_snapshots(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    let snapshots: Vec<String> = serde_json::from_value(field(ctx, "wait_available", "snapshot_ids")?.clone())
        .map_err(|e| StepError::Failed(format!("stored snapshot ids are unreadable: {e}")))?;
    if snapshots.is_empty() {
        return Ok(StepOutput { detail: "the AMI has no EBS snapshots to tag".into(), result: json!({}) });
    }
    let ec2 = ctx.ec2().await?;
    let tags = tags(ctx);
    retry_ec2("CreateTags", RETRY_BUDGET, || ec2.create_tags(&snapshots, &tags)).await?;
    Ok(StepOutput { detail: format!("tagged {}", snapshots.join(", ")), result: json!({"tagged": snapshots}) })
}

/// Starts a copy of the new AMI in every DR region of the site's policy.
/// A copy that fails to start is recorded as failed: the reconciler retries
/// it; the backup itself does not fail for it.
async fn copy(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    let image_id = field(ctx, "create_image", "image_id")?.as_str().unwrap_or_default().to_owned();
    let regions = ctx.engine.policy(&ctx.site.id).copy_regions;
    if regions.is_empty() {
        return Ok(StepOutput { detail: "no DR region configured".into(), result: json!({"copies": []}) });
    }
    let mut lines = Vec::new();
    for region in &regions {
        let copy = crate::copies::start_copy(ctx.engine, ctx.site, &image_id, &ctx.op.id, region).await?;
        lines.push(match copy.state {
            crate::model::CopyState::Failed => format!("{region}: failed to start ({}), will retry", copy.error),
            _ => format!("{region}: {} {}", copy.image_id, copy.state.as_str()),
        });
    }
    Ok(StepOutput { detail: lines.join("; "), result: json!({"copies": lines, "source_image_id": image_id}) })
}

async fn record(ctx: &StepCtx<'_>) -> Result<StepOutput, StepError> {
    let image_id = field(ctx, "create_image", "image_id")?.as_str().unwrap_or_default().to_owned();
    let instance_id = field(ctx, "create_image", "instance_id")?.as_str().unwrap_or_default().to_owned();
    let snapshot_ids: Vec<String> =
        serde_json::from_value(field(ctx, "wait_available", "snapshot_ids")?.clone()).unwrap_or_default();
    let app_state =
        ctx.result_of("check_agent").and_then(|v| v.get("app_state")).and_then(|v| v.as_str()).unwrap_or("unknown");
    let q = ctx.result_of("quiesce").cloned().unwrap_or(json!({}));
    let done: Vec<String> = serde_json::from_value(q["done"].clone()).unwrap_or_default();
    let consistency = if done.iter().any(|d| d == "app-stop") {
        Consistency::Application
    } else if done.iter().any(|d| d == "freeze") {
        Consistency::Filesystem
    } else {
        Consistency::Crash
    };
    let frozen_ms = ctx.result_of("unquiesce").and_then(|r| r["frozen_ms"].as_u64()).unwrap_or(0);
    let quiesce_note = match q["failed"].as_str() {
        Some(f) => format!("{} failed ({f}); crash-consistent instead", q["level"].as_str().unwrap_or("?")),
        None => String::new(),
    };
    let backup = Backup {
        image_id: image_id.clone(),
        site_id: ctx.site.id.clone(),
        operation_id: ctx.op.id.clone(),
        region: ctx.site.region.clone(),
        instance_id,
        snapshot_ids,
        started_at_ms: ctx.op.created_at_ms,
        completed_at_ms: now_ms(),
        consistency,
        app_state: app_state.to_owned(),
        state: crate::model::BackupState::Available,
        fate: String::new(),
        deleted_at_ms: 0,
        quiesce: q["level"].as_str().unwrap_or("none").to_owned(),
        frozen_ms,
        quiesce_note,
        copies: Vec::new(),
    };
    ctx.engine.store.record_backup(&backup)?;
    Ok(StepOutput {
        detail: format!("backup {image_id} recorded ({}-consistent)", consistency.as_str()),
        result: json!({"image_id": image_id, "consistency": consistency.as_str()}),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::ec2::{Ec2Error, Instance};

    /// An EC2 whose image goes through scripted states, one per describe.
    struct Scripted {
        states: Mutex<Vec<&'static str>>,
        describes: Mutex<u32>,
    }

    #[async_trait]
    impl Ec2 for Scripted {
        async fn find_images_by_tag(&self, _: &str, _: &str) -> Result<Vec<Image>, Ec2Error> {
            Ok(vec![])
        }
        async fn create_image(&self, _: &CreateImage) -> Result<String, Ec2Error> {
            Ok("ami-1".into())
        }
        async fn describe_images(&self, _: &[String]) -> Result<Vec<Image>, Ec2Error> {
            *self.describes.lock().expect("lock") += 1;
            let mut states = self.states.lock().expect("lock");
            let state = if states.len() > 1 { states.remove(0) } else { states[0] };
            if state == "throttle" {
                return Err(Ec2Error::Throttled { op: "DescribeImages", message: "slow down".into() });
            }
            Ok(vec![Image {
                id: "ami-1".into(),
                state: state.into(),
                state_reason: "boom".into(),
                snapshot_ids: vec!["snap-1".into()],
                tags: vec![],
            }])
        }
        async fn create_tags(&self, _: &[String], _: &[(String, String)]) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn describe_instance(&self, _: &str) -> Result<Option<Instance>, Ec2Error> {
            Ok(None)
        }
        async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
            Ok(ids.iter().map(|i| (i.clone(), "pending".to_owned())).collect())
        }
        async fn deregister_image(&self, _: &str) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn delete_snapshot(&self, _: &str) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn copy_image(&self, _: &crate::ec2::CopyImage) -> Result<String, Ec2Error> {
            Ok("ami-copy".into())
        }
    }

    fn scripted(states: &[&'static str]) -> Scripted {
        Scripted { states: Mutex::new(states.to_vec()), describes: Mutex::new(0) }
    }

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn waits_through_pending_and_absorbs_throttling() {
        let ec2 = scripted(&["pending", "throttle", "pending", "available"]);
        let seen = Mutex::new(Vec::new());
        let image = wait_available(&ec2, "ami-1", 5 * S, 60 * S, 3600 * S, |d| seen.lock().expect("lock").push(d))
            .await
            .expect("becomes available");
        assert_eq!(image.snapshot_ids, vec!["snap-1".to_string()]);
        assert_eq!(*ec2.describes.lock().expect("lock"), 4);
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 3, "one progress line per wait: {seen:?}");
        assert!(seen[0].contains("ami-1 is not checked yet"), "{}", seen[0]);
        assert!(seen[1].contains("ami-1 is pending; waited 5s so far, next check in 10s"), "{}", seen[1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_image_fails_with_its_reason() {
        let ec2 = scripted(&["pending", "failed"]);
        let err = wait_available(&ec2, "ami-1", S, S, 3600 * S, |_| {}).await.expect_err("fails");
        assert!(err.to_string().contains("became failed: boom"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_with_doubling_waits() {
        let ec2 = scripted(&["pending"]);
        let start = tokio::time::Instant::now();
        let err = wait_available(&ec2, "ami-1", 5 * S, 40 * S, 100 * S, |_| {}).await.expect_err("times out");
        assert!(err.to_string().contains("still pending"), "{err}");
        assert_eq!(start.elapsed(), 100 * S);
        // Checks at 5, 15, 35, 75 and (the budget's end) 100 s.
        assert_eq!(*ec2.describes.lock().expect("lock"), 5);
    }
}
