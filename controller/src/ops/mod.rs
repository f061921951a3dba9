//! The operation engine: durable, resumable workflows.
//!
//! An operation is a fixed list of named steps (see [`OperationKind`]). The
//! engine runs them in order; before a step starts its state becomes
//! `running` in the store, and its result is committed before the next step
//! starts. After a restart, [`Engine::resume_all`] picks every running
//! operation up at its first unfinished step. Each step is therefore written
//! to be safe to run again after a crash at any point inside it (for
//! example: look for the operation's tagged AMI before creating one).

pub mod backup;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::agents::Registry;
use crate::config::BackupConfig;
use crate::ec2::{Ec2, Ec2Clients, Ec2Error};
use crate::faults;
use crate::model::*;
use crate::policy::Policy;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown site `{0}`")]
    UnknownSite(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a step failed. The message is what the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Failed(String),
}

/// What a finished step leaves behind.
pub struct StepOutput {
    /// One line for humans.
    pub detail: String,
    /// What later steps (and a resumed run) read back.
    pub result: Value,
}

/// Runs operations; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) store: Store,
    pub(crate) registry: Registry,
    pub(crate) ec2: Arc<Ec2Clients>,
    pub(crate) backup: BackupConfig,
    pub(crate) policies: Arc<HashMap<String, Policy>>,
    changes: broadcast::Sender<String>,
}

impl Engine {
    pub fn new(
        store: Store,
        registry: Registry,
        ec2: Arc<Ec2Clients>,
        backup: BackupConfig,
        policies: HashMap<String, Policy>,
    ) -> Self {
        let (changes, _) = broadcast::channel(1024);
        Engine { store, registry, ec2, backup, policies: Arc::new(policies), changes }
    }

    /// A site's effective policy (the default one for a site the config no
    /// longer names).
    pub fn policy(&self, site_id: &str) -> Policy {
        self.policies.get(site_id).cloned().unwrap_or_default()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// EC2 for a site, in another region than its own (copies).
    pub async fn ec2_in(&self, site: &Site, region: &str) -> Result<Arc<dyn Ec2>, Ec2Error> {
        let mut elsewhere = site.clone();
        elsewhere.region = region.to_owned();
        self.ec2.for_site(&elsewhere).await
    }

    /// Ids of operations that changed, as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn notify(&self, id: &str) {
        let _ = self.changes.send(id.to_owned());
    }

    /// Creates a backup operation for a site and starts it.
    /// `requested_by` is `operator/<name>` or `schedule`.
    pub fn start_backup(&self, site_id: &str, requested_by: &str) -> Result<Operation, EngineError> {
        self.store.site(site_id)?.ok_or_else(|| EngineError::UnknownSite(site_id.to_owned()))?;
        let now = now_ms();
        let op = Operation {
            id: new_operation_id(OperationKind::Backup),
            kind: OperationKind::Backup,
            site_id: site_id.to_owned(),
            state: OperationState::Running,
            error: String::new(),
            requested_by: requested_by.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            steps: steps_of(OperationKind::Backup),
        };
        self.store.create_operation(&op)?;
        tracing::info!(operation = %op.id, site = site_id, requested_by, "backup started");
        self.spawn(op.id.clone());
        Ok(op)
    }

    /// Resumes every operation left running by a previous process.
    pub fn resume_all(&self) -> Result<usize, EngineError> {
        let ids = self.store.running_operations()?;
        for id in &ids {
            tracing::info!(operation = %id, "resuming operation after a restart");
            self.spawn(id.clone());
        }
        Ok(ids.len())
    }

    fn spawn(&self, id: String) {
        let me = self.clone();
        tokio::spawn(async move { me.run(&id).await });
    }

    async fn run(&self, id: &str) {
        if let Err(e) = self.run_steps(id).await {
            // The store itself failed: leave the operation running so that
            // a restart resumes it, and say so loudly.
            tracing::error!(operation = id, error = %e, "operation stopped: the store failed; it resumes at the next start");
        }
    }

    async fn run_steps(&self, id: &str) -> Result<(), StoreError> {
        let Some(mut op) = self.store.operation(id)? else {
            tracing::error!(operation = id, "operation vanished from the store");
            return Ok(());
        };
        let Some(site) = self.store.site(&op.site_id)? else {
            self.store.finish_operation(id, OperationState::Failed, "the site is no longer configured")?;
            self.notify(id);
            return Ok(());
        };
        let always: &[&str] = match op.kind {
            OperationKind::Backup => backup::ALWAYS,
        };
        let mut failure: Option<String> = None;
        for i in 0..op.steps.len() {
            if op.steps[i].state == StepState::Done {
                continue;
            }
            // After a failure only the clean-up steps run (e.g. thaw,
            // undrain, start the app again), so nothing stays quiesced.
            if failure.is_some() && !always.contains(&op.steps[i].name.as_str()) {
                continue;
            }
            let mut step = op.steps[i].clone();
            step.state = StepState::Running;
            step.attempts += 1;
            step.error.clear();
            if step.started_at_ms == 0 {
                step.started_at_ms = now_ms();
            }
            self.store.put_step(id, &step)?;
            self.notify(id);
            tracing::info!(operation = id, site = %site.id, step = %step.name, attempt = step.attempts, "step started");

            faults::crash_point(&format!("step.{}.before", step.name));
            let ctx = StepCtx { engine: self, op: &op, site: &site, seq: step.seq };
            let outcome = match op.kind {
                OperationKind::Backup => backup::run_step(&ctx, &step.name).await,
            };
            // The step acted but its result is not stored yet: the worst
            // moment for a crash.
            faults::crash_point(&format!("step.{}.after", step.name));
            step.finished_at_ms = now_ms();
            match outcome {
                Ok(out) => {
                    step.state = StepState::Done;
                    step.detail = out.detail;
                    step.result = Some(out.result);
                    self.store.put_step(id, &step)?;
                    tracing::info!(operation = id, site = %site.id, step = %step.name, detail = %step.detail, "step done");
                    op.steps[i] = step;
                    self.notify(id);
                }
                Err(e) => {
                    step.state = StepState::Failed;
                    step.error = e.to_string();
                    self.store.put_step(id, &step)?;
                    tracing::error!(operation = id, site = %site.id, step = %step.name, error = %e, "step failed");
                    op.steps[i] = step.clone();
                    self.notify(id);
                    if failure.is_none() {
                        failure = Some(format!("step {} failed: {e}", step.name));
                    }
                }
            }
        }
        if let Some(message) = failure {
            self.store.finish_operation(id, OperationState::Failed, &message)?;
            tracing::error!(operation = id, site = %site.id, error = %message, "operation failed");
            self.notify(id);
            return Ok(());
        }
        self.store.finish_operation(id, OperationState::Succeeded, "")?;
        tracing::info!(operation = id, site = %site.id, kind = op.kind.as_str(), "operation succeeded");
        self.notify(id);
        Ok(())
    }
}

/// What a step gets to work with.
pub struct StepCtx<'a> {
    pub engine: &'a Engine,
    pub op: &'a Operation,
    pub site: &'a Site,
    seq: u32,
}

impl StepCtx<'_> {
    /// The stored result of an earlier step of this operation.
    pub fn result_of(&self, step: &str) -> Option<&Value> {
        self.op.steps.iter().find(|s| s.name == step && s.state == StepState::Done).and_then(|s| s.result.as_ref())
    }

    /// Updates the running step's detail line (what `drctl` shows during a
    /// long wait).
    pub fn progress(&self, detail: String) {
        let Ok(Some(op)) = self.engine.store.operation(&self.op.id) else { return };
        if let Some(mut step) = op.steps.into_iter().find(|s| s.seq == self.seq) {
            step.detail = detail;
            if self.engine.store.put_step(&self.op.id, &step).is_ok() {
                self.engine.notify(&self.op.id);
            }
        }
    }

    pub async fn ec2(&self) -> Result<Arc<dyn Ec2>, StepError> {
        Ok(self.engine.ec2.for_site(self.site).await?)
    }

    /// Hook for fault-injection tests (see [`faults`]).
    pub fn crash_point(&self, point: &str) {
        faults::crash_point(point);
    }
}

/// The steps of each kind of operation, in order.
pub fn steps_of(kind: OperationKind) -> Vec<StepRecord> {
    let names: &[&str] = match kind {
        OperationKind::Backup => backup::STEPS,
    };
    names
        .iter()
        .enumerate()
        .map(|(i, name)| StepRecord {
            seq: i as u32,
            name: (*name).to_owned(),
            state: StepState::Pending,
            attempts: 0,
            started_at_ms: 0,
            finished_at_ms: 0,
            detail: String::new(),
            error: String::new(),
            result: None,
        })
        .collect()
}

/// `<kind>-<utc timestamp>-<random>`: sortable, unique, safe in EC2 tags, AMI
/// names and agent command ids.
pub fn new_operation_id(kind: OperationKind) -> String {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}t{:02}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{stamp}-{}", kind.as_str(), &random[..8])
}

/// Retries an EC2 call while it fails in a retryable way (throttling,
/// network), with capped exponential backoff and full jitter, for at most
/// `budget`. Throttling never surfaces as a failure while time is left.
pub async fn retry_ec2<T, F, Fut>(what: &str, budget: Duration, mut call: F) -> Result<T, Ec2Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Ec2Error>>,
{
    let start = tokio::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && start.elapsed() < budget => {
                let counter = match e {
                    Ec2Error::Throttled { .. } => &crate::metrics::EC2_THROTTLED,
                    _ => &crate::metrics::EC2_TRANSIENT,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let cap = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(8))).min(Duration::from_secs(20));
                let sleep = cap.mul_f64(rand::random::<f64>());
                tracing::warn!(call = what, error = %e, attempt, retry_in = ?sleep, "EC2 call will be retried");
                tokio::time::sleep(sleep).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
