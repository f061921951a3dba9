//! The durable step engine. It knows no workflow: a workflow declares its
//! steps as data ([`StepDef`]: name, action, what happens on failure, retry
//! policy, deadline) and its typed, versioned state ([`Workflow::State`]);
//! the engine runs them, persisting each step's record together with the
//! state in one transaction before the next step starts.
//!
//! Invariants:
//! - a step starts only after the previous step's result and the state it
//!   left are committed; a crash anywhere re-runs at most the step that was
//!   running (steps are written to be safe to run again);
//! - the first failure is stored with the operation: after a restart only
//!   the steps that always run (compensations) run, and a failed step is
//!   never silently re-run into success (only a human `resume` retries it);
//! - every write is conditional on the operation's epoch: a controller that
//!   lost its claim ([`StoreError::Fenced`]) stops driving at once;
//! - signals (approve, deny, resume, abort) are stored first and acted on
//!   by the driving task, also after a restart;
//! - admission per site is one transaction: a higher-priority workflow
//!   preempts a preemptible lower one (abort signal: its compensations run
//!   first), an equal or lower one is refused.

pub mod faults;
mod intents;
#[cfg(test)]
mod tests;
pub mod wait;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dr_proto::backoff::Backoff;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, broadcast};

use crate::domain::model::*;
use crate::store::{ActiveOp, Admission, Store, StoreError};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a step (or a call inside it) did not succeed. Retry policies key on
/// the kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input or configuration: retrying cannot help.
    Invalid,
    /// A safety rule refused it (on the agent or here).
    Refused,
    /// It ran and failed.
    Failed,
    /// The agent restarted while it ran.
    Interrupted,
    /// A deadline passed.
    TimedOut,
    /// The agent does not know the request.
    NotSupported,
    /// EC2 throttled us.
    Throttled,
    /// A network or service hiccup.
    Transient,
    /// The agent (or another party) could not be reached.
    Unavailable,
    /// AWS denied the call.
    PermissionDenied,
    /// The store failed or another controller took the operation over.
    Store,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StepError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StepError { kind, message: message.into() }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::new(ErrorKind::Store, e.to_string())
    }
}

/// What a step's action returns when it did not fail.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done; one line for humans.
    Done(String),
    /// Wait for an `approve` (or `deny`) signal before the step counts as
    /// done; `reason` is shown to humans.
    AwaitApproval(String),
}

impl From<String> for Outcome {
    fn from(s: String) -> Self {
        Outcome::Done(s)
    }
}

/// What happens when a step fails (after its retries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// The operation fails; the steps marked `always` still run.
    Stop,
    /// As `Stop`, and the named step runs too (even if not `always`).
    Compensate(&'static str),
    /// The operation waits for a human: `resume` retries the step,
    /// `abort` runs the compensations and cancels it.
    Pause,
}

/// Which failures a step retries by itself, how often and how fast.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub on: &'static [ErrorKind],
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    pub backoff: Backoff,
}

impl Retry {
    pub const NONE: Retry = Retry { on: &[], attempts: 1, backoff: Backoff::new(Duration::ZERO, Duration::ZERO) };
    /// Throttling, network hiccups and unreachable agents, a few times.
    pub const TRANSIENT: Retry = Retry {
        on: &[ErrorKind::Throttled, ErrorKind::Transient, ErrorKind::Unavailable, ErrorKind::Interrupted],
        attempts: 3,
        backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(10)),
    };
}

/// How long a step may take.
pub enum Deadline<D> {
    None,
    /// Counted from the operation's creation (restarts do not extend it).
    FromStart(fn(&D) -> Duration),
    /// For each attempt.
    PerAttempt(fn(&D) -> Duration),
}

pub type StepFn<D, S> = for<'a> fn(&'a Ctx<D>, &'a mut S) -> BoxFuture<'a, Result<Outcome, StepError>>;

/// One step of a workflow, declared as data.
pub struct StepDef<D, S> {
    pub name: &'static str,
    pub run: StepFn<D, S>,
    pub on_failure: OnFailure,
    /// Runs also after a failure or an abort (a compensation, e.g. lifting
    /// a quiesce).
    pub always: bool,
    pub retry: Retry,
    pub deadline: Deadline<D>,
}

impl<D, S> StepDef<D, S> {
    /// A step that stops the operation on failure, without retries or deadline.
    pub fn new(name: &'static str, run: StepFn<D, S>) -> Self {
        StepDef { name, run, on_failure: OnFailure::Stop, always: false, retry: Retry::NONE, deadline: Deadline::None }
    }
    pub fn always(mut self) -> Self {
        self.always = true;
        self
    }
    pub fn on_failure(mut self, f: OnFailure) -> Self {
        self.on_failure = f;
        self
    }
    pub fn retry(mut self, r: Retry) -> Self {
        self.retry = r;
        self
    }
    pub fn deadline(mut self, d: Deadline<D>) -> Self {
        self.deadline = d;
        self
    }
}

/// A workflow: its steps, its typed state, its place among the others.
pub trait Workflow: Send + Sync + 'static {
    type Deps: Send + Sync + 'static;
    type State: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static;
    /// Stored as the operation's kind.
    const KIND: &'static str;
    /// Version of `State`'s stored form; an operation stored with another
    /// version is not resumed by this controller.
    const VERSION: u32;
    /// Per site: a workflow preempts running ones of lower priority that are
    /// preemptible, and is refused beside one of equal or higher priority.
    const PRIORITY: u8;
    const PREEMPTIBLE: bool;
    /// Touches nothing production relies on (a drill into its own subnet):
    /// runs beside the site's other operations, never beside another of
    /// its own kind. A failover neither waits for it nor preempts it.
    const ISOLATED: bool = false;
    fn steps() -> Vec<StepDef<Self::Deps, Self::State>>;
    /// The images and instances the operation relies on, given its state.
    fn protects(state: &Self::State) -> Vec<Protected>;
}

/// Everything a step action gets to work with.
pub struct Ctx<D> {
    engine: Engine<D>,
    pub op_id: String,
    pub site: Site,
    pub created_at_ms: Millis,
    pub requested_by: String,
    epoch: i64,
    step: Mutex<StepRecord>,
    live: Arc<Live>,
}

impl<D: Send + Sync + 'static> Ctx<D> {
    pub fn deps(&self) -> &D {
        &self.engine.inner.deps
    }
    pub fn store(&self) -> &Store {
        &self.engine.inner.store
    }
    pub fn step_name(&self) -> String {
        self.step.lock().unwrap_or_else(|p| p.into_inner()).name.clone()
    }
    /// The attempt of the running step (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.step.lock().unwrap_or_else(|p| p.into_inner()).attempts
    }
    /// Updates the running step's detail line (what `drctl --wait` shows
    /// during a long wait). Best effort: a failed write is only logged.
    pub async fn progress(&self, detail: impl Into<String>) {
        let rec = {
            let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
            step.detail = detail.into();
            step.clone()
        };
        match self.store().put_step(self.op_id.clone(), self.epoch, rec, None).await {
            Ok(()) => self.engine.notify(&self.op_id),
            Err(e) => tracing::warn!(operation = %self.op_id, error = %e, "cannot record progress"),
        }
    }
    /// Sets the running step's machine-readable result (stored with the
    /// step when it ends; `drctl operation -o json` shows it).
    pub fn set_result(&self, value: serde_json::Value) {
        self.step.lock().unwrap_or_else(|p| p.into_inner()).result = Some(value);
    }
    /// True once an abort (or preemption) was asked for: long waits check
    /// it and return early.
    pub fn abort_requested(&self) -> bool {
        self.live.abort.load(Ordering::Acquire)
    }
    /// Time left until a deadline counted from the operation's start.
    pub fn left_of(&self, budget: Duration) -> Duration {
        budget.saturating_sub(Duration::from_millis(now_ms().saturating_sub(self.created_at_ms)))
    }
    /// Hook for fault-injection tests (see [`faults`]).
    pub fn crash_point(&self, point: &str) {
        faults::crash_point(point);
    }
    pub(crate) fn epoch(&self) -> i64 {
        self.epoch
    }
}

/// Per running operation: how to wake its task and whether to abort.
#[derive(Default)]
struct Live {
    notify: Notify,
    abort: AtomicBool,
}

/// Drives one kind of workflow (type-erased so the engine can hold many).
trait Driver<D>: Send + Sync {
    fn drive(&self, engine: Engine<D>, id: String, epoch: i64) -> BoxFuture<'static, ()>;
    fn priority(&self) -> Rank;
}

struct Typed<W>(std::marker::PhantomData<W>);

impl<W: Workflow> Driver<W::Deps> for Typed<W> {
    fn drive(&self, engine: Engine<W::Deps>, id: String, epoch: i64) -> BoxFuture<'static, ()> {
        Box::pin(async move { engine.run::<W>(id, epoch).await })
    }
    fn priority(&self) -> Rank {
        Rank { priority: W::PRIORITY, preemptible: W::PREEMPTIBLE, isolated: W::ISOLATED }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown site `{0}`")]
    UnknownSite(String),
    #[error("unknown operation `{0}`")]
    UnknownOperation(String),
    #[error("operation {id} is {state}: {why}")]
    BadSignal { id: String, state: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Inner<D> {
    store: Store,
    deps: D,
    /// This process's identity as an operation owner.
    owner: String,
    drivers: Mutex<HashMap<&'static str, Arc<dyn Driver<D>>>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    changes: broadcast::Sender<String>,
}

/// Runs operations; cheap to clone.
pub struct Engine<D> {
    inner: Arc<Inner<D>>,
}

impl<D> Clone for Engine<D> {
    fn clone(&self) -> Self {
        Engine { inner: self.inner.clone() }
    }
}

/// A new operation to start.
pub struct Start<'a, S> {
    pub site_id: &'a str,
    pub requested_by: &'a str,
    pub state: S,
    /// The scheduler's slot, recorded in the same transaction.
    pub slot: Option<Millis>,
}

impl<D: Send + Sync + 'static> Engine<D> {
    pub fn new(store: Store, deps: D) -> Self {
        let (changes, _) = broadcast::channel(1024);
        let owner = format!("controller-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Engine { inner: Arc::new(Inner { store, deps, owner, drivers: Mutex::default(), live: Mutex::default(), changes }) }
    }

    /// Makes a workflow known (before [`Engine::resume_all`]).
    pub fn register<W: Workflow<Deps = D>>(&self) {
        self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).insert(W::KIND, Arc::new(Typed::<W>(Default::default())));
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn deps(&self) -> &D {
        &self.inner.deps
    }
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Ids of operations that changed, as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.inner.changes.subscribe()
    }

    fn notify(&self, id: &str) {
        let _ = self.inner.changes.send(id.to_owned());
    }

    fn driver(&self, kind: &str) -> Option<Arc<dyn Driver<D>>> {
        self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).get(kind).cloned()
    }

    fn live(&self, id: &str) -> Arc<Live> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_owned()).or_default().clone()
    }

    /// Creates an operation of workflow `W` and starts it. Refused with
    /// [`StoreError::Busy`] beside an operation it may not preempt.
    pub async fn start<W: Workflow<Deps = D>>(&self, start: Start<'_, W::State>) -> Result<Operation, EngineError> {
        let site_id = start.site_id.to_owned();
        self.inner.store.site(site_id.clone()).await?.ok_or_else(|| EngineError::UnknownSite(site_id.clone()))?;
        let now = now_ms();
        let steps = W::steps()
            .iter()
            .enumerate()
            .map(|(i, d)| StepRecord {
                seq: i as u32,
                name: d.name.to_owned(),
                state: StepState::Pending,
                attempts: 0,
                started_at_ms: 0,
                finished_at_ms: 0,
                detail: String::new(),
                error: String::new(),
                result: None,
            })
            .collect();
        let op = Operation {
            id: new_operation_id(W::KIND),
            kind: W::KIND.to_owned(),
            site_id: site_id.clone(),
            state: OperationState::Running,
            error: String::new(),
            requested_by: start.requested_by.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            steps,
            waiting_for: String::new(),
            failure: String::new(),
            owner: self.inner.owner.clone(),
            epoch: 1,
            state_version: W::VERSION,
            wf_state: Some(serde_json::to_value(&start.state).expect("workflow states serialize")),
            protects: W::protects(&start.state),
        };
        let priorities = self.ranks();
        let rank = Rank { priority: W::PRIORITY, preemptible: W::PREEMPTIBLE, isolated: W::ISOLATED };
        let admit = move |active: &[ActiveOp]| admission(W::KIND, rank, &priorities, active);
        let preempted = self.inner.store.create_operation(op.clone(), start.slot, admit).await?;
        for id in &preempted {
            tracing::warn!(operation = %id, by = %op.id, "operation preempted: its compensations run, then it is cancelled");
            let live = self.live(id);
            live.abort.store(true, Ordering::Release);
            live.notify.notify_one();
        }
        tracing::info!(operation = %op.id, kind = W::KIND, site = %site_id, requested_by = start.requested_by, "operation started");
        self.spawn(op.id.clone(), op.kind.clone(), 1);
        self.notify(&op.id);
        Ok(op)
    }

    /// Takes over and resumes every operation that has not ended.
    pub async fn resume_all(&self) -> Result<usize, EngineError> {
        let ids = self.inner.store.active_operations().await?;
        for id in &ids {
            let Some(op) = self.inner.store.operation(id.clone()).await? else { continue };
            let epoch = self.inner.store.claim(id.clone(), self.inner.owner.clone()).await?;
            tracing::info!(operation = %id, kind = %op.kind, state = op.state.as_str(), epoch, "resuming operation after a restart");
            self.spawn(id.clone(), op.kind, epoch);
        }
        Ok(ids.len())
    }

    fn spawn(&self, id: String, kind: String, epoch: i64) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.driver(&kind) {
                Some(d) => d.drive(me.clone(), id.clone(), epoch).await,
                None => {
                    tracing::error!(operation = %id, kind, "no workflow of this kind is known to this controller");
                    let _ = me
                        .inner
                        .store
                        .set_operation_state(
                            id.clone(),
                            epoch,
                            OperationState::Failed,
                            String::new(),
                            format!("unknown workflow `{kind}`"),
                            format!("this controller does not know workflow `{kind}`"),
                        )
                        .await;
                    me.notify(&id);
                }
            }
            me.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }

    /// Stores a signal and wakes the operation's task.
    pub async fn signal(&self, id: &str, signal: Signal, by: &str) -> Result<Operation, EngineError> {
        let op = self.inner.store.operation(id.to_owned()).await?.ok_or_else(|| EngineError::UnknownOperation(id.into()))?;
        let bad = |why: &str| EngineError::BadSignal { id: id.into(), state: op.state.as_str().into(), why: why.into() };
        let waiting_approval = op.state == OperationState::Waiting && op.waiting_for.starts_with("approval");
        match signal {
            _ if op.state.is_finished() => return Err(bad("it has ended")),
            Signal::Approve | Signal::Deny if !waiting_approval => return Err(bad("it is not waiting for an approval")),
            Signal::Resume if op.state != OperationState::Waiting || waiting_approval => {
                return Err(bad("only an operation waiting for a human after a failed step can be resumed"));
            }
            Signal::Abort if op.state == OperationState::Cancelling => return Err(bad("it is being cancelled already")),
            _ => {}
        }
        self.inner.store.add_signal(id.to_owned(), signal, by.to_owned()).await?;
        tracing::info!(operation = id, signal = signal.as_str(), by, "signal stored");
        let live = self.live(id);
        if signal == Signal::Abort {
            live.abort.store(true, Ordering::Release);
        }
        live.notify.notify_one();
        Ok(self.inner.store.operation(id.to_owned()).await?.unwrap_or(op))
    }

    /// Waits for the next signal of an operation (stored, so one sent while
    /// the controller was down counts too), consuming it.
    async fn next_signal(&self, id: &str, live: &Live, until: Option<Millis>) -> Result<Option<Signal>, StoreError> {
        loop {
            let notified = live.notify.notified();
            if let Some((sid, s)) = self.inner.store.pending_signals(id.to_owned()).await?.into_iter().next() {
                self.inner.store.consume_signal(sid).await?;
                return Ok(Some(s));
            }
            match until {
                Some(t) => {
                    let left = Duration::from_millis(t.saturating_sub(now_ms()));
                    if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                        return Ok(None);
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Consumes a pending abort, if any (checked between steps).
    async fn take_abort(&self, id: &str) -> Result<Option<String>, StoreError> {
        for (sid, s) in self.inner.store.pending_signals(id.to_owned()).await? {
            if s == Signal::Abort {
                self.inner.store.consume_signal(sid).await?;
                return Ok(Some("aborted".into()));
            }
        }
        Ok(None)
    }

    async fn run<W: Workflow<Deps = D>>(&self, id: String, epoch: i64) {
        match self.drive::<W>(&id, epoch).await {
            Ok(()) => {}
            Err(StoreError::Fenced { .. }) => {
                tracing::warn!(operation = %id, epoch, "another controller took this operation over; this one stops driving it")
            }
            // The store itself failed: leave the operation active so that a
            // restart resumes it, and say so loudly.
            Err(e) => tracing::error!(operation = %id, error = %e, "operation stopped: the store failed; it resumes at the next start"),
        }
    }

    async fn drive<W: Workflow<Deps = D>>(&self, id: &str, epoch: i64) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let Some(mut op) = store.operation(id.to_owned()).await? else {
            tracing::error!(operation = id, "operation vanished from the store");
            return Ok(());
        };
        let finish = |state: OperationState, failure: String, error: String| {
            let (id, store) = (id.to_owned(), store.clone());
            async move { store.set_operation_state(id, epoch, state, String::new(), failure, error).await }
        };
        let Some(site) = store.site(op.site_id.clone()).await? else {
            finish(OperationState::Failed, "site gone".into(), "the site is no longer configured".into()).await?;
            self.notify(id);
            return Ok(());
        };
        let mut state: W::State = match (&op.wf_state, op.state_version) {
            (Some(v), version) if version == W::VERSION => match serde_json::from_value(v.clone()) {
                Ok(s) => s,
                Err(e) => {
                    let msg = format!("its stored state cannot be read ({e}); start a new operation");
                    finish(OperationState::Failed, msg.clone(), msg).await?;
                    self.notify(id);
                    return Ok(());
                }
            },
            (_, version) => {
                let msg = format!(
                    "it was started by a controller with state version {version}; this one knows version {} of `{}`: it is not resumed (start a new operation)",
                    W::VERSION,
                    W::KIND
                );
                finish(OperationState::Failed, msg.clone(), msg).await?;
                self.notify(id);
                return Ok(());
            }
        };
        let defs = W::steps();
        let live = self.live(id);
        let mut failure = op.failure.clone();
        let mut cancelling = op.state == OperationState::Cancelling;
        // Compensations named by failed steps.
        let mut compensate: Vec<&'static str> = defs
            .iter()
            .zip(&op.steps)
            .filter(|(_, r)| r.state == StepState::Failed)
            .filter_map(|(d, _)| match d.on_failure {
                OnFailure::Compensate(c) => Some(c),
                _ => None,
            })
            .collect();

        // Preemption: wait until the operations this one preempted ended.
        self.wait_for_preempted(&op, epoch, W::ISOLATED).await?;

        for (i, def) in defs.iter().enumerate() {
            let Some(rec) = op.steps.get(i).cloned() else { break };
            if rec.state == StepState::Done {
                continue;
            }
            // An abort between steps (a failed step left for a human takes
            // its abort in `pause`).
            if failure.is_empty()
                && !cancelling
                && rec.state != StepState::Failed
                && let Some(why) = self.take_abort(id).await?
            {
                cancelling = true;
                failure = format!("{why} before step {}", def.name);
                store
                    .set_operation_state(id.into(), epoch, OperationState::Cancelling, String::new(), failure.clone(), String::new())
                    .await?;
                self.notify(id);
            }
            let ending = !failure.is_empty() || cancelling;
            if ending && (rec.state == StepState::Failed || !(def.always || compensate.contains(&def.name))) {
                continue;
            }
            let mut rec = rec;
            // A step that failed and was left for a human is retried only
            // after `resume` (handled in `attempts` below).
            let result = self.attempts::<W>(&mut op, &site, def, &mut rec, &mut state, epoch, &live, ending).await?;
            match result {
                StepEnd::Done => {}
                StepEnd::Failed(message) => {
                    // A step that ended because an abort (or preemption) was
                    // asked for: the operation is cancelled, not failed.
                    if !cancelling && live.abort.load(Ordering::Acquire) && self.take_abort(id).await?.is_some() {
                        cancelling = true;
                        if failure.is_empty() {
                            failure = format!("aborted during step {}", def.name);
                        }
                    }
                    if failure.is_empty() {
                        failure = format!("step {} failed: {message}", def.name);
                    }
                    if let OnFailure::Compensate(c) = def.on_failure {
                        compensate.push(c);
                    }
                    let state_now = if cancelling { OperationState::Cancelling } else { OperationState::Running };
                    store.set_operation_state(id.into(), epoch, state_now, String::new(), failure.clone(), String::new()).await?;
                }
                StepEnd::Aborted(why) => {
                    cancelling = true;
                    if failure.is_empty() {
                        failure = why;
                    }
                    store
                        .set_operation_state(id.into(), epoch, OperationState::Cancelling, String::new(), failure.clone(), String::new())
                        .await?;
                }
            }
            op.steps[i] = rec;
            self.notify(id);
        }
        let (end, error) = if cancelling {
            (OperationState::Cancelled, failure.clone())
        } else if !failure.is_empty() {
            (OperationState::Failed, failure.clone())
        } else {
            (OperationState::Succeeded, String::new())
        };
        finish(end, failure, error.clone()).await?;
        match end {
            OperationState::Succeeded => tracing::info!(operation = id, site = %site.id, kind = W::KIND, "operation succeeded"),
            _ => tracing::error!(operation = id, site = %site.id, kind = W::KIND, state = end.as_str(), error = %error, "operation ended"),
        }
        self.notify(id);
        Ok(())
    }

    /// Every registered workflow's rank, by kind.
    fn ranks(&self) -> HashMap<&'static str, Rank> {
        self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, d)| (*k, d.priority())).collect()
    }

    /// Before its first step, an operation waits for the site's operations
    /// it conflicts with (those it preempted) to end. Isolated workflows
    /// conflict only with their own kind, and nothing waits for them.
    async fn wait_for_preempted(&self, op: &Operation, epoch: i64, isolated: bool) -> Result<(), StoreError> {
        let ranks = self.ranks();
        let conflicts = |a: &ActiveOp| {
            if isolated { a.kind == op.kind } else { !ranks.get(a.kind.as_str()).is_some_and(|r| r.isolated) }
        };
        let mut announced = false;
        loop {
            let others: Vec<ActiveOp> = self
                .inner
                .store
                .active_operations_of(op.site_id.clone())
                .await?
                .into_iter()
                .filter(|a| a.id != op.id && conflicts(a))
                .collect();
            if others.is_empty() {
                if announced {
                    self.inner
                        .store
                        .set_operation_state(op.id.clone(), epoch, op.state, String::new(), op.failure.clone(), String::new())
                        .await?;
                }
                return Ok(());
            }
            if !announced {
                let names: Vec<&str> = others.iter().map(|a| a.id.as_str()).collect();
                let why = format!("{} to end (preempted: its compensations run first)", names.join(", "));
                tracing::info!(operation = %op.id, waiting_for = %why, "waiting before the first step");
                self.inner.store.set_operation_state(op.id.clone(), epoch, op.state, why, op.failure.clone(), String::new()).await?;
                self.notify(&op.id);
                announced = true;
            }
            let mut changes = self.subscribe();
            let _ = tokio::time::timeout(Duration::from_millis(500), changes.recv()).await;
        }
    }

    /// Runs one step with its retries, deadline, approval wait and pause.
    #[allow(clippy::too_many_arguments)]
    async fn attempts<W: Workflow<Deps = D>>(
        &self,
        op: &mut Operation,
        site: &Site,
        def: &StepDef<D, W::State>,
        rec: &mut StepRecord,
        state: &mut W::State,
        epoch: i64,
        live: &Arc<Live>,
        ending: bool,
    ) -> Result<StepEnd, StoreError> {
        let store = &self.inner.store;
        let id = op.id.clone();
        // Resumed while waiting for a human after this step failed.
        if op.state == OperationState::Waiting
            && rec.state == StepState::Failed
            && !ending
            && let Some(end) = self.pause(op, def, rec, epoch, live).await?
        {
            return Ok(end);
        }
        let mut tries_here = 0u32;
        loop {
            rec.state = StepState::Running;
            rec.attempts += 1;
            tries_here += 1;
            rec.error.clear();
            if rec.started_at_ms == 0 {
                rec.started_at_ms = now_ms();
            }
            store.put_step(id.clone(), epoch, rec.clone(), None).await?;
            self.notify(&id);
            tracing::info!(operation = %id, site = %site.id, step = def.name, attempt = rec.attempts, "step started");
            faults::crash_point(&format!("step.{}.before", def.name));
            faults::delay_point(&format!("step.{}.before", def.name)).await;
            if let Some(message) = faults::fail_point(def.name) {
                rec.state = StepState::Failed;
                rec.error = message.clone();
                rec.finished_at_ms = now_ms();
                store.put_step(id.clone(), epoch, rec.clone(), None).await?;
                return Ok(StepEnd::Failed(message));
            }
            let ctx = Ctx {
                engine: self.clone(),
                op_id: id.clone(),
                site: site.clone(),
                created_at_ms: op.created_at_ms,
                requested_by: op.requested_by.clone(),
                epoch,
                step: Mutex::new(rec.clone()),
                live: live.clone(),
            };
            let work = (def.run)(&ctx, state);
            let outcome = match &def.deadline {
                Deadline::None => work.await,
                Deadline::PerAttempt(f) => {
                    let d = f(&self.inner.deps);
                    tokio::time::timeout(d, work).await.unwrap_or_else(|_| {
                        Err(StepError::new(ErrorKind::TimedOut, format!("did not finish within {}", humantime::format_duration(d))))
                    })
                }
                Deadline::FromStart(f) => {
                    let budget = f(&self.inner.deps);
                    let left = ctx.left_of(budget);
                    tokio::time::timeout(left, work).await.unwrap_or_else(|_| {
                        Err(StepError::new(
                            ErrorKind::TimedOut,
                            format!("the operation's deadline of {} passed", humantime::format_duration(budget)),
                        ))
                    })
                }
            };
            // The step acted but its result is not stored yet: the worst
            // moment for a crash.
            faults::crash_point(&format!("step.{}.after", def.name));
            {
                let step = ctx.step.lock().unwrap_or_else(|p| p.into_inner());
                rec.detail = step.detail.clone();
                if step.result.is_some() {
                    rec.result = step.result.clone();
                }
            }
            let snapshot = || Some((W::VERSION, serde_json::to_value(&*state).expect("workflow states serialize"), W::protects(state)));
            match outcome {
                Ok(Outcome::Done(detail)) => {
                    rec.state = StepState::Done;
                    rec.detail = detail;
                    rec.finished_at_ms = now_ms();
                    store.put_step(id.clone(), epoch, rec.clone(), snapshot()).await?;
                    tracing::info!(operation = %id, site = %site.id, step = def.name, detail = %rec.detail, "step done");
                    return Ok(StepEnd::Done);
                }
                Ok(Outcome::AwaitApproval(reason)) => {
                    rec.detail = reason.clone();
                    store.put_step(id.clone(), epoch, rec.clone(), snapshot()).await?;
                    let waiting = format!("approval: {reason} (`drctl approve {id}` or `drctl deny {id}`)");
                    store
                        .set_operation_state(id.clone(), epoch, OperationState::Waiting, waiting, op.failure.clone(), String::new())
                        .await?;
                    self.notify(&id);
                    loop {
                        match self.next_signal(&id, live, None).await? {
                            Some(Signal::Approve) => {
                                rec.state = StepState::Done;
                                rec.detail = format!("{reason}: approved");
                                rec.finished_at_ms = now_ms();
                                store.put_step(id.clone(), epoch, rec.clone(), snapshot()).await?;
                                store
                                    .set_operation_state(
                                        id.clone(),
                                        epoch,
                                        OperationState::Running,
                                        String::new(),
                                        String::new(),
                                        String::new(),
                                    )
                                    .await?;
                                return Ok(StepEnd::Done);
                            }
                            Some(Signal::Deny | Signal::Abort) => {
                                rec.state = StepState::Failed;
                                rec.error = "denied".into();
                                rec.finished_at_ms = now_ms();
                                store.put_step(id.clone(), epoch, rec.clone(), snapshot()).await?;
                                return Ok(StepEnd::Aborted(format!("denied at step {}", def.name)));
                            }
                            Some(Signal::Resume) | None => continue,
                        }
                    }
                }
                Err(e) => {
                    let retry = def.retry.on.contains(&e.kind) && tries_here < def.retry.attempts && !live.abort.load(Ordering::Acquire);
                    rec.error = e.message.clone();
                    if retry {
                        let wait = def.retry.backoff.delay(tries_here - 1);
                        tracing::warn!(operation = %id, step = def.name, error = %e, kind = ?e.kind, retry_in = ?wait, "step failed; retrying");
                        rec.detail = format!(
                            "attempt {} failed ({}); retrying in {}",
                            rec.attempts,
                            e.message,
                            humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
                        );
                        store.put_step(id.clone(), epoch, rec.clone(), snapshot()).await?;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    rec.state = StepState::Failed;
                    rec.finished_at_ms = now_ms();
                    store.put_step(id.clone(), epoch, rec.clone(), snapshot()).await?;
                    self.notify(&id);
                    tracing::error!(operation = %id, site = %site.id, step = def.name, error = %e, kind = ?e.kind, "step failed");
                    if def.on_failure == OnFailure::Pause && !ending {
                        op.state = OperationState::Waiting;
                        match self.pause(op, def, rec, epoch, live).await? {
                            Some(end) => return Ok(end),
                            None => {
                                tries_here = 0;
                                continue;
                            }
                        }
                    }
                    return Ok(StepEnd::Failed(e.message));
                }
            }
        }
    }

    /// A failed step waits for a human. `None`: resume (retry the step).
    async fn pause(
        &self,
        op: &mut Operation,
        def: &StepDef<D, impl Sized>,
        rec: &mut StepRecord,
        epoch: i64,
        live: &Live,
    ) -> Result<Option<StepEnd>, StoreError> {
        let id = op.id.clone();
        let waiting = format!(
            "a human: step {} failed: {} (`drctl operation resume {id}` retries it, `drctl operation abort {id}` cancels)",
            def.name, rec.error
        );
        self.inner
            .store
            .set_operation_state(id.clone(), epoch, OperationState::Waiting, waiting.clone(), String::new(), String::new())
            .await?;
        self.notify(&id);
        tracing::warn!(operation = %id, step = def.name, "operation waits for a human");
        loop {
            match self.next_signal(&id, live, None).await? {
                Some(Signal::Resume) => {
                    tracing::info!(operation = %id, step = def.name, "resumed by a human: retrying the step");
                    self.inner
                        .store
                        .set_operation_state(id.clone(), epoch, OperationState::Running, String::new(), String::new(), String::new())
                        .await?;
                    op.state = OperationState::Running;
                    return Ok(None);
                }
                Some(Signal::Abort) => {
                    op.state = OperationState::Cancelling;
                    return Ok(Some(StepEnd::Aborted(format!("aborted after step {} failed: {}", def.name, rec.error))));
                }
                Some(_) | None => continue,
            }
        }
    }
}

enum StepEnd {
    Done,
    Failed(String),
    Aborted(String),
}

/// Where a workflow stands among the others at admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub priority: u8,
    pub preemptible: bool,
    pub isolated: bool,
}

/// Per-site admission: `new` preempts active operations of lower priority
/// that are preemptible and is refused beside any other. An isolated
/// workflow (or an isolated active one) is refused only beside one of the
/// same kind.
pub fn admission(kind: &str, new: Rank, ranks: &HashMap<&'static str, Rank>, active: &[ActiveOp]) -> Admission {
    let mut preempt = Vec::new();
    for a in active {
        let r = ranks.get(a.kind.as_str()).copied().unwrap_or(Rank { priority: u8::MAX, preemptible: false, isolated: false });
        if new.isolated || r.isolated {
            if a.kind == kind {
                return Admission::Refuse(a.id.clone());
            }
            continue;
        }
        if r.priority < new.priority && r.preemptible {
            if a.state != OperationState::Cancelling {
                preempt.push(a.id.clone());
            }
        } else {
            return Admission::Refuse(a.id.clone());
        }
    }
    if preempt.is_empty() { Admission::Admit } else { Admission::Preempt(preempt) }
}
