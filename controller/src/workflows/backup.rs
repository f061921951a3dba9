//! The backup workflow.
//!
//! Steps, each safe to run again after a crash anywhere inside it:
//! 1. `check_agent`: ask the primary's agent for the app state (recorded
//!    with the backup). A missing or passive agent does not stop a crash-
//!    consistent backup; it is recorded.
//! 2. `quiesce`: per the site's policy, nothing (`none`), freeze the data
//!    file systems (`freeze`), drain Nomad builders then freeze (`drain`), or
//!    stop the app (`stop`). A failure falls back to crash-consistent or
//!    skips the backup, per `on_quiesce_failure`. Compensated by `unquiesce`.
//! 3. `create_image`: CreateImage (NoReboot) tagged `dr:operation=<id>`.
//!    CreateImage has no ClientToken: the engine's `find_or_create` looks
//!    for the operation's tagged AMI first.
//! 4. `wait_snapshots`: poll until every snapshot of the AMI exists and is
//!    `pending` (or further): from then on the image no longer depends on
//!    the live disks.
//! 5. `unquiesce` (always runs, also after a failure or an abort): thaw,
//!    undrain, start the app — whatever `quiesce` did, in reverse. A freeze
//!    the agent reports as already lifted (its deadline passed, the agent
//!    restarted) did not cover the snapshots: the backup is then recorded
//!    crash-consistent, with the reason.
//! 6. `wait_available`: poll with doubling waits until the AMI is
//!    `available`; deadline `backup.timeout` from the operation's start.
//! 7. `tag_snapshots`: tag the AMI's snapshots (a separate CreateTags: EC2
//!    emulators reject snapshot TagSpecifications on CreateImage).
//! 8. `record`: the backup enters the store and `drctl backups`.
//! 9. `copy`, 10. `retention`: DR-region copies and retention.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CallFailure, Deps, EC2_RETRY_BUDGET, agent_call, retry_ec2};
use crate::agents::{Addressee, AgentAction, AgentDetail};
use crate::cloud::ec2::{CreateImage, Ec2, Image};
use crate::domain::model::{Backup as BackupRecord, BackupState, Consistency, Protected, now_ms};
use crate::domain::policy::{OnQuiesceFailure, Quiesce};
use crate::engine::{Ctx, Deadline, ErrorKind, OnFailure, Outcome, Retry, StepDef, StepError, Workflow};

use crate::domain::tags::{CREATED_BY, TAG_CREATED_BY, TAG_OPERATION, TAG_SITE};

/// The backup workflow.
pub struct Backup;

/// What `check_agent` learned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentCheck {
    /// `connected`, `error` or `unavailable`.
    pub agent: String,
    pub app_state: String,
    pub error: Option<String>,
}

/// What `quiesce` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quiesced {
    pub level: Quiesce,
    /// Agent actions done, in order (`drain`, `freeze`, `app-stop`).
    pub done: Vec<String>,
    pub failed: Option<String>,
    /// The policy skips the backup after a failed quiesce.
    pub skip: bool,
    /// When the file systems were frozen (controller clock), 0 if not.
    pub frozen_at_ms: u64,
    /// The app was already stopped before (so unquiesce leaves it so).
    pub app_was_stopped: bool,
}

/// What `unquiesce` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Unquiesced {
    pub undone: Vec<String>,
    pub frozen_ms: u64,
    pub freeze_overhead_ms: Option<u64>,
    /// The freeze was lifted before the thaw (deadline, agent restart): it
    /// did not cover the snapshots; why.
    pub thawed_early: Option<String>,
}

/// The typed state of a backup, stored with each step (version 1).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub agent: Option<AgentCheck>,
    pub quiesce: Option<Quiesced>,
    pub image_id: Option<String>,
    /// The instance imaged (the site's primary at create time).
    pub instance_id: String,
    pub create_call_ms: u64,
    pub snapshot_ids: Vec<String>,
    pub snapshots_wait_ms: u64,
    /// When every snapshot was pending (controller clock): what a freeze had
    /// to last until.
    #[serde(default)]
    pub snapshots_pending_at_ms: u64,
    pub unquiesce: Option<Unquiesced>,
    pub consistency: Option<Consistency>,
    pub copies: Vec<String>,
    pub deleted: Vec<String>,
    /// The source instance's launch facts (what a restore needs), read in
    /// `check_agent`, before any quiesce; recorded with the backup.
    #[serde(default)]
    pub launch: Option<crate::domain::model::LaunchFacts>,
    #[serde(default)]
    pub launch_error: Option<String>,
    /// When the certificate the primary's agent presented ends (0: no
    /// agent connected): the one a restore of this backup will present.
    #[serde(default)]
    pub agent_cert_not_after_ms: u64,
}

impl State {
    fn image(&self) -> Result<&str, StepError> {
        self.image_id.as_deref().ok_or_else(|| StepError::new(ErrorKind::Invalid, "no AMI was recorded by create_image"))
    }
}

impl Workflow for Backup {
    type Deps = Deps;
    type State = State;
    const KIND: &'static str = "backup";
    const VERSION: u32 = 1;
    const PRIORITY: u8 = 10;
    const PREEMPTIBLE: bool = true;

    fn steps() -> Vec<StepDef<Deps, State>> {
        vec![
            StepDef::new("check_agent", step!(check_agent)),
            StepDef::new("quiesce", step!(quiesce)).on_failure(OnFailure::Compensate("unquiesce")),
            StepDef::new("create_image", step!(create_image)),
            StepDef::new("wait_snapshots", step!(wait_snapshots)).retry(Retry::TRANSIENT),
            StepDef::new("unquiesce", step!(unquiesce)).always(),
            StepDef::new("wait_available", step!(wait_available_step)).deadline(Deadline::FromStart(|d: &Deps| d.backup.timeout)),
            StepDef::new("tag_snapshots", step!(tag_snapshots)).retry(Retry::TRANSIENT),
            StepDef::new("record", step!(record)),
            StepDef::new("copy", step!(copy)),
            StepDef::new("retention", step!(retention)).retry(Retry::TRANSIENT),
        ]
    }

    fn protects(state: &State) -> Vec<Protected> {
        state.image_id.iter().map(|i| Protected::Image(i.clone())).collect()
    }
}

/// Starts a backup of a site (`requested_by`: `operator/<name>` or
/// `schedule`; `slot`: the scheduler's slot, recorded with it).
pub async fn start(
    engine: &super::Engine,
    site_id: &str,
    requested_by: &str,
    slot: Option<crate::domain::model::Millis>,
) -> Result<crate::domain::model::Operation, crate::engine::EngineError> {
    engine.start::<Backup>(crate::engine::Start { site_id, requested_by, state: State::default(), slot }).await
}

fn primary(ctx: &Ctx<Deps>) -> Addressee {
    Addressee::primary(&ctx.site)
}

async fn check_agent(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let timeout = ctx.deps().backup.agent_call_timeout;
    let (check, detail) = match agent_call(ctx, &primary(ctx), "app-status", &AgentAction::AppStatus, timeout).await {
        Ok(outcome) => {
            let (state, transitioning) = match outcome.detail {
                AgentDetail::AppStatus { state, is_transitioning, .. } => (state, is_transitioning),
                AgentDetail::None | AgentDetail::Report(_) => ("unknown".to_owned(), false),
            };
            let detail = format!(
                "agent answered: app {state}{}{}",
                if transitioning { " (transitioning)" } else { "" },
                if outcome.replayed { " (from its journal)" } else { "" }
            );
            (AgentCheck { agent: "connected".into(), app_state: state, error: None }, detail)
        }
        Err(CallFailure::Answered(e)) => (
            AgentCheck { agent: "error".into(), app_state: "unknown".into(), error: Some(e.message.clone()) },
            format!("agent could not read the app state: {}; the backup goes on crash-consistent", e.message),
        ),
        Err(CallFailure::Unreachable(e)) => (
            AgentCheck { agent: "unavailable".into(), app_state: "unknown".into(), error: Some(e.message.clone()) },
            format!("{}; the backup goes on crash-consistent", e.message),
        ),
    };
    st.agent = Some(check);
    // The image carries the agent's certificate: a restore presents it.
    st.agent_cert_not_after_ms =
        ctx.deps().registry.live(&ctx.site.id, &ctx.site.primary_instance_id).map_or(0, |l| l.record.cert_not_after_ms);
    // What a restore will need if this instance is lost (read now, before
    // any quiesce, so the freeze window does not pay for it).
    let facts = match ctx.deps().ec2(&ctx.site).await {
        Ok(ec2) => {
            let id = ctx.site.primary_instance_id.clone();
            retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.launch_facts(&id)).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let detail = match facts {
        Ok(Some(f)) => {
            st.launch = Some(f);
            detail
        }
        Ok(None) => {
            st.launch_error = Some("EC2 does not know the instance".into());
            format!("{detail}; launch facts not read: EC2 does not know {}", ctx.site.primary_instance_id)
        }
        Err(e) => {
            st.launch_error = Some(e.clone());
            format!("{detail}; launch facts not read ({e})")
        }
    };
    Ok(Outcome::Done(detail))
}

async fn quiesce(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let policy = ctx.deps().policy(&ctx.site.id);
    let cfg = &ctx.deps().backup;
    let level = policy.quiesce;
    let long = cfg.agent_call_timeout.max(Duration::from_secs(900));
    let plan: Vec<(&str, AgentAction, Duration)> = match level {
        Quiesce::None => vec![],
        Quiesce::Freeze => vec![("freeze", AgentAction::Freeze { deadline: cfg.freeze_deadline }, cfg.agent_call_timeout)],
        Quiesce::Drain => vec![
            ("drain", AgentAction::Drain { deadline: cfg.drain_deadline }, cfg.drain_deadline + cfg.agent_call_timeout),
            ("freeze", AgentAction::Freeze { deadline: cfg.freeze_deadline }, cfg.agent_call_timeout),
        ],
        Quiesce::Stop => vec![("app-stop", AgentAction::AppStop, long)],
    };
    let mut q = Quiesced { level, ..Quiesced::default() };
    for (name, action, timeout) in plan {
        ctx.progress(format!("{name} on the agent")).await;
        match agent_call(ctx, &primary(ctx), name, &action, timeout).await {
            Ok(outcome) => {
                if name == "app-stop" {
                    match outcome.report::<dr_proto::contract::AppReport>() {
                        Ok(r) => q.app_was_stopped = r.already,
                        // The agent stopped the app but its report is unreadable:
                        // the step fails with the contract error; unquiesce starts
                        // the app again unless it was seen stopped before.
                        Err(e) => {
                            q.app_was_stopped = st.agent.as_ref().is_some_and(|a| a.app_state == "stopped");
                            q.done.push(name.to_owned());
                            st.quiesce = Some(q);
                            return Err(e.into());
                        }
                    }
                }
                if name == "freeze" {
                    q.frozen_at_ms = now_ms();
                }
                q.done.push(name.to_owned());
            }
            Err(e) => {
                q.failed = Some(format!("{name}: {}", e.message()));
                break;
            }
        }
    }
    let detail = match (&q.failed, policy.on_quiesce_failure) {
        (None, _) if q.done.is_empty() => "none: crash-consistent image".to_owned(),
        (None, _) => format!("{}: done ({})", level.as_str(), q.done.join(", ")),
        (Some(e), OnQuiesceFailure::Crash) => {
            format!("{} failed ({e}); falling back to a crash-consistent image", level.as_str())
        }
        (Some(e), OnQuiesceFailure::Skip) => {
            q.skip = true;
            format!("{} failed ({e}); the policy skips this backup", level.as_str())
        }
    };
    st.quiesce = Some(q);
    Ok(Outcome::Done(detail))
}

async fn create_image(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    if let Some(q) = st.quiesce.as_ref().filter(|q| q.skip) {
        return Err(StepError::new(
            ErrorKind::Refused,
            format!("backup skipped: quiesce {} failed ({})", q.level.as_str(), q.failed.as_deref().unwrap_or("?")),
        ));
    }
    let ec2 = ctx.deps().ec2(&ctx.site).await?;
    let op_id = ctx.op_id.clone();
    let failed_existing: std::sync::Mutex<Option<Image>> = std::sync::Mutex::new(None);
    let req = CreateImage {
        instance_id: ctx.site.primary_instance_id.clone(),
        name: format!("dr-{}-{}", ctx.site.id, ctx.op_id),
        description: format!("dr-controller backup of site {} (operation {})", ctx.site.id, ctx.op_id),
        tags: tags(ctx),
    };
    let mut call_ms = 0u64;
    let (image_id, reused) = ctx
        .find_or_create(
            "create_image",
            || async {
                let existing = retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || ec2.find_images_by_tag(TAG_OPERATION, &op_id)).await?;
                let usable: Vec<&Image> = existing.iter().filter(|i| i.state != "failed" && i.state != "deregistered").collect();
                if usable.len() > 1 {
                    tracing::error!(operation = %op_id, images = ?usable.iter().map(|i| &i.id).collect::<Vec<_>>(), "more than one AMI carries this operation's tag; using the first");
                }
                if usable.is_empty() {
                    *failed_existing.lock().unwrap_or_else(|p| p.into_inner()) = existing.first().cloned();
                }
                Ok(usable.first().map(|i| i.id.clone()))
            },
            || async {
                let failed = failed_existing.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(failed) = failed {
                    return Err(StepError::failed(format!(
                        "AMI {} of this operation is {}: {}; start a new backup",
                        failed.id, failed.state, failed.state_reason
                    )));
                }
                let started = tokio::time::Instant::now();
                let id = retry_ec2("CreateImage", EC2_RETRY_BUDGET, || ec2.create_image(&req)).await?;
                call_ms = started.elapsed().as_millis() as u64;
                Ok(id)
            },
        )
        .await?;
    ctx.crash_point("backup.after_create_image");
    st.image_id = Some(image_id.clone());
    st.instance_id = req.instance_id.clone();
    st.create_call_ms = call_ms;
    Ok(Outcome::Done(if reused {
        format!("{image_id} already exists for this operation (created before a restart); not creating another")
    } else {
        format!("CreateImage (no reboot) of {} gave {image_id} in {call_ms} ms", req.instance_id)
    }))
}

fn tags(ctx: &Ctx<Deps>) -> Vec<(String, String)> {
    vec![(TAG_SITE.into(), ctx.site.id.clone()), (TAG_OPERATION.into(), ctx.op_id.clone()), (TAG_CREATED_BY.into(), CREATED_BY.into())]
}

/// Waits until every snapshot of the new AMI exists and is pending (or
/// done): the moment a quiesce may be lifted.
async fn wait_snapshots(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let image_id = st.image()?.to_owned();
    let ec2 = ctx.deps().ec2(&ctx.site).await?;
    let start = tokio::time::Instant::now();
    let ids = [image_id.clone()];
    let mut wait = Duration::from_millis(50);
    loop {
        let images = retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || ec2.describe_images(&ids)).await?;
        if let Some(image) = images.into_iter().find(|i| i.id == image_id) {
            if image.state == "failed" {
                return Err(StepError::failed(format!("{image_id} failed: {}", image.state_reason)));
            }
            if !image.snapshot_ids.is_empty() {
                let states = retry_ec2("DescribeSnapshots", EC2_RETRY_BUDGET, || ec2.describe_snapshots(&image.snapshot_ids)).await?;
                let ready = image
                    .snapshot_ids
                    .iter()
                    .all(|s| states.iter().any(|(id, st)| id == s && matches!(st.as_str(), "pending" | "completed")));
                if ready {
                    let wait_ms = start.elapsed().as_millis() as u64;
                    st.snapshot_ids = image.snapshot_ids.clone();
                    st.snapshots_wait_ms = wait_ms;
                    st.snapshots_pending_at_ms = now_ms();
                    return Ok(Outcome::Done(format!("{} snapshot(s) pending after {wait_ms} ms", image.snapshot_ids.len())));
                }
            }
        }
        if start.elapsed() > Duration::from_secs(600) || ctx.abort_requested() {
            return Err(StepError::new(ErrorKind::TimedOut, format!("the snapshots of {image_id} did not start within 10 minutes")));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Undoes what `quiesce` did, in reverse; retries while the agent is
/// unreachable, for `backup.unquiesce_patience`.
async fn unquiesce(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    // Without a stored quiesce (it failed, or the controller died inside
    // it), undo what the policy's level may have done.
    let q = st.quiesce.clone().unwrap_or(Quiesced { level: ctx.deps().policy(&ctx.site.id).quiesce, ..Quiesced::default() });
    // Thaw and undrain are idempotent, so they are sent for the level asked
    // for even if `quiesce` does not record them as done: a crash after the
    // agent froze but before the result was stored must not leave anything
    // quiesced. The app is started only if quiesce really stopped it.
    let mut todo: Vec<&str> = match q.level {
        Quiesce::Freeze => vec!["freeze"],
        Quiesce::Drain => vec!["drain", "freeze"],
        _ => vec![],
    };
    if q.done.iter().any(|d| d == "app-stop") && !q.app_was_stopped {
        todo.push("app-stop");
    }
    let cfg = &ctx.deps().backup;
    let mut u = Unquiesced::default();
    // Agent answers that do not follow the contract: every undo is still
    // tried, then the step fails with them.
    let mut unreadable: Vec<String> = Vec::new();
    for name in todo.iter().rev() {
        let (undo, action, timeout) = match *name {
            "freeze" => ("thaw", AgentAction::Thaw, cfg.agent_call_timeout),
            "drain" => ("undrain", AgentAction::Undrain, cfg.agent_call_timeout),
            _ => ("app-start", AgentAction::AppStart, cfg.agent_call_timeout.max(Duration::from_secs(900))),
        };
        // Undoing something quiesce did not record as done is a precaution:
        // one try, and a failure (e.g. nothing to thaw) is only noted.
        let recorded = q.done.iter().any(|d| d == name);
        let r = if recorded {
            undo_until_done(ctx, undo, &action, timeout).await?
        } else {
            match agent_call(ctx, &primary(ctx), undo, &action, timeout).await {
                Ok(o) => {
                    let nothing_to_undo = match undo {
                        "thaw" => o.report::<dr_proto::contract::ThawReport>().map(|r| r.already_done),
                        "undrain" => o.report::<dr_proto::contract::UndrainReport>().map(|r| r.already_done || r.undrained.is_empty()),
                        _ => o.report::<dr_proto::contract::AppReport>().map(|r| r.already),
                    };
                    match nothing_to_undo {
                        Ok(true) => continue,
                        Ok(false) => {}
                        // Done, by the agent's word; what it reported is unreadable.
                        Err(e) => unreadable.push(e.to_string()),
                    }
                    o
                }
                Err(e) => {
                    tracing::info!(operation = %ctx.op_id, step = undo, error = %e.message(), "precautionary undo had nothing to do");
                    continue;
                }
            }
        };
        if undo == "thaw" {
            let r = match r.report::<dr_proto::contract::ThawReport>() {
                Ok(r) => r,
                Err(e) => {
                    // Thawed, by the agent's word; whether the freeze covered
                    // the snapshots is unknown.
                    unreadable.push(e.to_string());
                    u.thawed_early = Some("the thaw's report is unreadable: the freeze's coverage is unknown".into());
                    u.undone.push(undo.to_owned());
                    continue;
                }
            };
            u.frozen_ms = r.frozen_for_ms;
            // Did the freeze last until the snapshots were pending? Lifted
            // before our thaw (its deadline, the agent's restart), or shorter
            // than the time it had to cover: it did not.
            let needed = st.snapshots_pending_at_ms.saturating_sub(q.frozen_at_ms);
            let short = q.frozen_at_ms > 0 && st.snapshots_pending_at_ms > 0 && u.frozen_ms > 0 && u.frozen_ms + 100 < needed;
            if recorded && (r.already_done || short) {
                let why = Some(r.reason.as_str()).filter(|s| !s.is_empty()).unwrap_or("the freeze was lifted before the thaw");
                u.thawed_early = Some(format!(
                    "file systems were thawed before the thaw was asked ({why}; frozen {} ms, the snapshots needed {needed} ms)",
                    u.frozen_ms
                ));
            }
        }
        u.undone.push(undo.to_owned());
    }
    // The freeze window beyond the EC2 calls it has to cover.
    u.freeze_overhead_ms = (u.frozen_ms > 0).then(|| u.frozen_ms.saturating_sub(st.create_call_ms + st.snapshots_wait_ms));
    let detail = if u.undone.is_empty() {
        "nothing to undo".into()
    } else if let Some(early) = &u.thawed_early {
        format!("{}; {early}: the backup is crash-consistent", u.undone.join(", "))
    } else if u.frozen_ms > 0 {
        format!("{} (file systems frozen {} ms)", u.undone.join(", "), u.frozen_ms)
    } else {
        u.undone.join(", ")
    };
    st.unquiesce = Some(u);
    if !unreadable.is_empty() {
        return Err(StepError::failed(format!("{detail}; {}", unreadable.join("; "))));
    }
    Ok(Outcome::Done(detail))
}

/// Undoes a recorded quiesce action, retrying while the agent cannot do it,
/// for `backup.unquiesce_patience`. A call lost in transit is repeated with
/// the same command id (the agent answers from its journal if it ran);
/// after the agent itself reported a failure, a new id (`<undo>-1`, ...)
/// makes it really try again.
async fn undo_until_done(
    ctx: &Ctx<Deps>,
    undo: &str,
    action: &AgentAction,
    timeout: Duration,
) -> Result<crate::agents::AgentOutcome, StepError> {
    let patience = ctx.deps().backup.unquiesce_patience;
    let start = tokio::time::Instant::now();
    let backoff = dr_proto::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut answered = 0u32;
    let mut tries = 0u32;
    loop {
        let name = if answered == 0 { undo.to_owned() } else { format!("{undo}-{answered}") };
        let e = match agent_call(ctx, &primary(ctx), &name, action, timeout).await {
            Ok(o) => return Ok(o),
            Err(CallFailure::Answered(e)) => {
                answered += 1;
                e
            }
            Err(CallFailure::Unreachable(e)) => e,
        };
        if start.elapsed() >= patience {
            return Err(StepError::new(
                e.kind,
                format!(
                    "{undo} failed: {} (a frozen file system is thawed by the agent's watchdog at its deadline; a stopped app needs `dr-agent app-start` on the machine)",
                    e.message
                ),
            ));
        }
        ctx.progress(format!("{undo} not done yet ({}); retrying", e.message)).await;
        tracing::warn!(operation = %ctx.op_id, site = %ctx.site.id, step = undo, error = %e, "cannot lift the quiesce yet; retrying");
        tokio::time::sleep(backoff.ceiling(tries)).await;
        tries += 1;
    }
}

async fn wait_available_step(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let image_id = st.image()?.to_owned();
    let ec2 = ctx.deps().ec2(&ctx.site).await?;
    let cfg = &ctx.deps().backup;
    let left = ctx.left_of(cfg.timeout);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let wait = wait_available(ec2.as_ref(), &image_id, cfg.poll_initial, cfg.poll_max, left, move |d| {
        let _ = tx.send(d);
    });
    tokio::pin!(wait);
    let image = loop {
        tokio::select! {
            r = &mut wait => break r?,
            Some(line) = rx.recv() => ctx.progress(line).await,
        }
    };
    st.snapshot_ids = image.snapshot_ids.clone();
    Ok(Outcome::Done(format!("{image_id} is available with {} snapshot(s)", image.snapshot_ids.len())))
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

        let images = retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || ec2.describe_images(&ids)).await?;
        let image = images.into_iter().find(|i| i.id == image_id);
        state = image.as_ref().map(|i| i.state.clone()).unwrap_or_else(|| "missing".into());
        match (state.as_str(), image) {
            ("available", Some(image)) => return Ok(image),
            ("failed" | "deregistered" | "invalid" | "error", image) => {
                let reason = image.map(|i| i.state_reason).unwrap_or_default();
                return Err(StepError::failed(format!("{image_id} became {state}: {reason}")));
            }
            _ => {}
        }
        if start.elapsed() >= budget {
            return Err(StepError::new(
                ErrorKind::TimedOut,
                format!(
                    "{image_id} is still {state} after {}; giving up (backup.timeout)",
                    humantime::format_duration(Duration::from_secs(start.elapsed().as_secs()))
                ),
            ));
        }
    }
}

async fn tag_snapshots(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    if st.snapshot_ids.is_empty() {
        return Ok(Outcome::Done("the AMI has no EBS snapshots to tag".into()));
    }
    let ec2 = ctx.deps().ec2(&ctx.site).await?;
    let tags = tags(ctx);
    let snapshots = st.snapshot_ids.clone();
    retry_ec2("CreateTags", EC2_RETRY_BUDGET, || ec2.create_tags(&snapshots, &tags)).await?;
    Ok(Outcome::Done(format!("tagged {}", snapshots.join(", "))))
}

async fn record(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let image_id = st.image()?.to_owned();
    let q = st.quiesce.clone().unwrap_or_default();
    let u = st.unquiesce.clone().unwrap_or_default();
    let mut consistency = if q.done.iter().any(|d| d == "app-stop") {
        Consistency::Application
    } else if q.done.iter().any(|d| d == "freeze") {
        Consistency::Filesystem
    } else {
        Consistency::Crash
    };
    let mut notes = Vec::new();
    if let Some(f) = &q.failed {
        notes.push(format!("{} failed ({f}); crash-consistent instead", q.level.as_str()));
    }
    if consistency == Consistency::Filesystem
        && let Some(early) = &u.thawed_early
    {
        consistency = Consistency::Crash;
        notes.push(format!("{early}; crash-consistent instead"));
    }
    let backup = BackupRecord {
        image_id: image_id.clone(),
        site_id: ctx.site.id.clone(),
        operation_id: ctx.op_id.clone(),
        region: ctx.site.region.clone(),
        instance_id: st.instance_id.clone(),
        snapshot_ids: st.snapshot_ids.clone(),
        started_at_ms: ctx.created_at_ms,
        completed_at_ms: now_ms(),
        consistency,
        app_state: st.agent.as_ref().map(|a| a.app_state.clone()).unwrap_or_else(|| "unknown".into()),
        state: BackupState::Available,
        fate: String::new(),
        deleted_at_ms: 0,
        quiesce: q.level.as_str().to_owned(),
        frozen_ms: u.frozen_ms,
        quiesce_note: notes.join("; "),
        copies: Vec::new(),
    };
    ctx.store().record_backup(backup).await?;
    if let Some(facts) = st.launch.clone() {
        ctx.store().put_launch_facts(image_id.clone(), ctx.site.id.clone(), facts).await?;
    }
    if st.agent_cert_not_after_ms > 0 {
        ctx.store().set_backup_agent_cert(image_id.clone(), st.agent_cert_not_after_ms).await?;
    }
    st.consistency = Some(consistency);
    Ok(Outcome::Done(format!("backup {image_id} recorded ({}-consistent)", consistency.as_str())))
}

/// Starts a copy of the new AMI in every DR region of the site's policy
/// (home instead of the region it now runs in, after a failover into a DR
/// region: `Deps::copy_regions`). A copy that fails to start is recorded
/// as failed: the reconciler retries it; the backup itself does not fail
/// for it.
async fn copy(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let image_id = st.image()?.to_owned();
    let regions = ctx.deps().copy_regions(&ctx.site);
    if regions.is_empty() {
        return Ok(Outcome::Done("no DR region configured".into()));
    }
    let mut lines = Vec::new();
    for region in &regions {
        let copy = super::copies::start_copy(ctx.deps(), &ctx.site, &image_id, &ctx.op_id, region).await?;
        lines.push(match copy.state {
            crate::domain::model::CopyState::Failed => format!("{region}: failed to start ({}), will retry", copy.error),
            _ => format!("{region}: {} {}", copy.image_id, copy.state.as_str()),
        });
    }
    st.copies = lines.clone();
    Ok(Outcome::Done(lines.join("; ")))
}

async fn retention(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let decisions = super::retention::apply(ctx.deps(), &ctx.site, false).await?;
    let deleted: Vec<String> = decisions.iter().filter(|d| !d.keep).map(|d| d.image_id.clone()).collect();
    let detail = if deleted.is_empty() {
        format!("kept all {} backup(s)", decisions.len())
    } else {
        format!("deleted {} (AMIs and snapshots); kept {}", deleted.join(", "), decisions.len() - deleted.len())
    };
    st.deleted = deleted;
    Ok(Outcome::Done(detail))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::cloud::ec2::{Ec2Error, Instance};

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
        async fn copy_image(&self, _: &crate::cloud::ec2::CopyImage) -> Result<String, Ec2Error> {
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
        assert_eq!(err.kind, ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), 100 * S);
        // Checks at 5, 15, 35, 75 and (the budget's end) 100 s.
        assert_eq!(*ec2.describes.lock().expect("lock"), 5);
    }

    /// The agent's report of `app_stop` decides whether unquiesce starts
    /// the app. An agent whose report renamed `already` (another version of
    /// the contract) fails the quiesce step with the step and the field
    /// named, instead of reading a silent null; the app the agent stopped
    /// is started again (it was seen started before the backup).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_app_stop_report_with_a_renamed_field_fails_quiesce_naming_the_field() {
        use std::collections::HashMap;
        use std::sync::Arc;

        use crate::domain::model::{OperationState, Role, Site};
        use crate::domain::policy::Policy;
        use crate::testkit::{FakeAgent, FakeEc2, FakeReply, fake_ok, fake_report};

        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(&dir.path().join("s.db")).await.expect("store");
        let site = Site { id: "s1".into(), region: "us-east-1".into(), primary_instance_id: "i-1".into(), role_arn: None };
        store.upsert_site(site).await.expect("site");
        let fake = Arc::new(FakeEc2::default());
        fake.add_instance("i-1", "10.0.0.5");
        let policy = Policy { quiesce: Quiesce::Stop, ..Policy::default() };
        let deps = Deps {
            store: store.clone(),
            registry: crate::agents::Registry::default(),
            ec2: Arc::new(crate::cloud::Ec2Clients::fixed(crate::config::AwsConfig::default(), fake.clone())),
            backup: crate::config::BackupConfig::default(),
            policies: HashMap::from([("s1".to_owned(), policy)]),
            recovery: HashMap::new(),
            failover: Default::default(),
            drill: Default::default(),
            aws: crate::config::AwsConfig::default(),
            dns: tokio::sync::OnceCell::new(),
            gate: Default::default(),
        };
        let engine = super::super::engine(deps);
        let agent = FakeAgent::attach(&engine.deps().registry, "s1", "i-1", Role::Primary, |action| match action {
            "app_stop" => {
                let mut json = fake_report("app_stop").to_json();
                let m = json.as_object_mut().expect("a report is an object");
                let already = m.remove("already").expect("the contract's field");
                m.insert("was_already".into(), already);
                Ok(FakeReply::Raw(json.to_string()))
            }
            other => fake_ok(other),
        });
        let op = start(&engine, "s1", "operator/t", None).await.expect("start");
        let mut ended = None;
        for _ in 0..300 {
            let o = store.operation(op.id.clone()).await.expect("read").expect("operation");
            if o.state == OperationState::Failed {
                ended = Some(o);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ended = ended.expect("the backup fails");
        let quiesce = ended.steps.iter().find(|s| s.name == "quiesce").expect("the quiesce step");
        assert_eq!(quiesce.state, crate::domain::model::StepState::Failed, "{quiesce:?}");
        assert!(
            quiesce.error.contains("app_stop") && quiesce.error.contains("`already`"),
            "names the step and the field: {}",
            quiesce.error
        );
        assert!(ended.error.contains("`already`"), "the operation says why: {}", ended.error);
        assert_eq!(agent.actions(), ["app_status", "app_stop", "app_start"], "the app stopped by the agent is started again");
        assert_eq!(fake.calls_of("CreateImage"), 0, "no image of an unreadable quiesce");
    }
}
