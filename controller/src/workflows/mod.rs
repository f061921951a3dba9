//! The controller's workflows, on the generic [`crate::engine`]:
//! [`backup`] (with [`retention`]). What they share is here: their
//! dependencies ([`Deps`]), EC2 calls with the one retry policy, and agent
//! calls addressed by (site, instance, role).

/// A step function of this module's workflows (`async fn(&Ctx<Deps>, &mut
/// State) -> Result<Outcome, StepError>`, `State` being the workflow's) as
/// the engine's `StepFn`.
macro_rules! step {
    ($f:path) => {
        |c: &crate::engine::Ctx<crate::workflows::Deps>,
         s: &mut State|
         -> crate::engine::BoxFuture<'_, Result<crate::engine::Outcome, crate::engine::StepError>> { Box::pin($f(c, s)) }
    };
}

pub mod backup;
pub mod copies;
pub mod drill;
pub mod failover;
pub mod repair;
pub mod restore;
pub mod retention;
pub mod spare;
#[cfg(test)]
pub(crate) mod test_world;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::backoff::Backoff;

use crate::agents::{Addressee, AgentAction, AgentOutcome, Registry};
use crate::cloud::Ec2Clients;
use crate::cloud::dns::Dns;
use crate::cloud::ec2::{Ec2, Ec2Error};
use crate::config::BackupConfig;
use crate::domain::model::{Site, now_ms};
use crate::domain::policy::Policy;
use crate::domain::recovery::{FailoverConfig, SiteRecovery};
use crate::engine::{self, Ctx, ErrorKind, StepError};
use crate::store::Store;

/// What the workflows need, given to the engine once.
pub struct Deps {
    pub store: Store,
    pub registry: Registry,
    pub ec2: Arc<Ec2Clients>,
    pub backup: BackupConfig,
    pub policies: HashMap<String, Policy>,
    /// Each site's recovery settings (fence, launch overrides, DNS).
    pub recovery: HashMap<String, SiteRecovery>,
    pub failover: FailoverConfig,
    pub drill: crate::domain::recovery::DrillConfig,
    /// Route 53, built on first use (`[aws]` endpoint and attempts).
    pub aws: crate::config::AwsConfig,
    pub dns: tokio::sync::OnceCell<Arc<dyn Dns>>,
    /// Asked before every Route 53 request (see [`crate::cloud::CallGate`]).
    pub gate: crate::cloud::CallGate,
}

pub type Engine = engine::Engine<Deps>;

/// The engine with every workflow registered.
pub fn engine(deps: Deps) -> Engine {
    let engine = Engine::new(deps.store.clone(), deps);
    engine.register::<backup::Backup>();
    engine.register::<failover::Failover>();
    engine.register::<drill::Drill>();
    engine.register::<spare::Spare>();
    engine.register::<repair::AppRestart>();
    engine.register::<repair::HostRestart>();
    engine
}

impl Deps {
    /// A site's effective policy (the default one for a site the config no
    /// longer names).
    pub fn policy(&self, site_id: &str) -> Policy {
        self.policies.get(site_id).cloned().unwrap_or_default()
    }

    /// Where a new backup of `site` is copied: the policy's `copy_regions`,
    /// or home first while the primary is away from its home region.
    pub fn copy_regions(&self, site: &Site) -> Vec<String> {
        self.policy(&site.id).copy_regions_from(&site.region, &self.recovery(&site.id).home_region)
    }

    /// A site's recovery settings (defaults for a site the config no
    /// longer names).
    pub fn recovery(&self, site_id: &str) -> SiteRecovery {
        self.recovery.get(site_id).cloned().unwrap_or_default()
    }

    /// Route 53.
    pub async fn dns(&self) -> Arc<dyn Dns> {
        self.dns
            .get_or_init(|| async { Arc::new(crate::cloud::dns::Route53::new(&self.aws, self.gate.clone()).await) as Arc<dyn Dns> })
            .await
            .clone()
    }

    /// EC2 for a site, in its own region.
    pub async fn ec2(&self, site: &Site) -> Result<Arc<dyn Ec2>, Ec2Error> {
        self.ec2.for_site(site).await
    }

    /// EC2 for a site, in another region than its own (copies).
    pub async fn ec2_in(&self, site: &Site, region: &str) -> Result<Arc<dyn Ec2>, Ec2Error> {
        let mut elsewhere = site.clone();
        elsewhere.region = region.to_owned();
        self.ec2.for_site(&elsewhere).await
    }
}

impl From<Ec2Error> for StepError {
    fn from(e: Ec2Error) -> Self {
        let kind = match &e {
            Ec2Error::Throttled { .. } => ErrorKind::Throttled,
            Ec2Error::Transport { .. } => ErrorKind::Transient,
            _ if e.is_retryable() => ErrorKind::Transient,
            Ec2Error::Setup { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Failed,
        };
        StepError::new(kind, e.to_string())
    }
}

/// Budget for absorbing throttling and network errors on one EC2 call.
pub const EC2_RETRY_BUDGET: Duration = Duration::from_secs(300);
const EC2_BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(20));

/// Retries an EC2 call while it fails in a retryable way (throttling,
/// network), with the project's backoff, for at most `budget`. Throttling
/// never surfaces as a failure while time is left; a permission error or
/// any other answer is returned at once.
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
                    Ec2Error::Throttled { .. } => &crate::cloud::EC2_THROTTLED,
                    _ => &crate::cloud::EC2_TRANSIENT,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let sleep = EC2_BACKOFF.delay(attempt).min(budget.saturating_sub(start.elapsed()));
                tracing::warn!(call = what, error = %e, attempt, retry_in = ?sleep, "EC2 call will be retried");
                tokio::time::sleep(sleep).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why an agent call did not succeed.
#[derive(Debug)]
pub enum CallFailure {
    /// The agent ran it (or refused it) and answered with this error.
    Answered(StepError),
    /// No answer: not connected, wrong role, disconnected, timed out.
    Unreachable(StepError),
}

impl CallFailure {
    pub fn error(self) -> StepError {
        match self {
            CallFailure::Answered(e) | CallFailure::Unreachable(e) => e,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            CallFailure::Answered(e) | CallFailure::Unreachable(e) => &e.message,
        }
    }
}

/// After a controller restart an agent needs a moment to reconnect: when
/// its instance was seen recently (persisted liveness, not only "was
/// connected"), wait for it, up to `backup.agent_reconnect_grace`, instead
/// of concluding it is gone.
pub async fn agent_ready(ctx: &Ctx<Deps>, to: &Addressee) {
    let deps = ctx.deps();
    let ready = || deps.registry.live(&to.site_id, &to.instance_id).is_some_and(|l| l.role == to.role);
    if ready() {
        return;
    }
    let seen = deps.store.instance(to.site_id.clone(), to.instance_id.clone()).await.ok().flatten().map(|r| r.last_seen_ms);
    let recent = seen.is_some_and(|t| now_ms().saturating_sub(t) < deps.backup.agent_seen_within.as_millis() as u64);
    if !recent {
        return;
    }
    ctx.progress(format!("waiting for the agent of {} to reconnect", to.instance_id)).await;
    let deadline = tokio::time::Instant::now() + deps.backup.agent_reconnect_grace;
    while !ready() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `<operation>.<name>` to an agent (after giving a recently seen
/// agent time to reconnect) and returns its report. The command id names
/// the operation and the action, so a repeat after a restart is answered
/// from the agent's journal.
pub async fn agent_call(
    ctx: &Ctx<Deps>,
    to: &Addressee,
    name: &str,
    action: &AgentAction,
    timeout: Duration,
) -> Result<AgentOutcome, CallFailure> {
    agent_ready(ctx, to).await;
    let id = format!("{}.{name}", ctx.op_id);
    match ctx.deps().registry.call(to, &id, action, timeout).await {
        Ok(o) if o.ok => Ok(o),
        Ok(o) => {
            let kind = o.kind.map(ErrorKind::from).unwrap_or(ErrorKind::Failed);
            Err(CallFailure::Answered(StepError::new(kind, o.error)))
        }
        Err(e) => Err(CallFailure::Unreachable(e.into())),
    }
}

/// An agent's step report as it sent it, to be recorded whole (a step's
/// result, a failover's `reports`): `{}` when it sent none. Read its fields
/// typed, with [`AgentOutcome::report`] (or [`recorded_report`] for a
/// recorded one), never by key from this value.
pub fn report(o: &AgentOutcome) -> serde_json::Value {
    o.report_json()
}

/// A recorded agent report (see [`report`]) read back typed; None when it
/// was not recorded or does not parse.
pub fn recorded_report<R: dr_proto::contract::TypedReport>(recorded: Option<&serde_json::Value>) -> Option<R> {
    serde_json::from_value(recorded?.clone()).ok()
}
