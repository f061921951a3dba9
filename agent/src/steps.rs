//! Typed local steps. Nothing here knows about gRPC: the session converts
//! wire messages into [`Action`]s and [`Outcome`]s back into wire messages.
//! The same step functions serve the hand-run subcommands (`dr-agent
//! <step>`), so a controller command and a human run the same code.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::replicated::{AppStatus, ReplicatedError, Replicatedctl};
use crate::{app, builds, drain, freeze, health, nomad_state, recover, rewrite};

/// A step the agent can perform. The set is closed: there is no "run this
/// command" action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Read the Replicated app's status. No precondition; read-only.
    AppStatus,
    /// Stop the app and wait until State is `stopped` and not transitioning
    /// (deadline `replicated.app_timeout`). Already stopped: nothing is done.
    AppStop { force: bool },
    /// Start the app and wait until it is `started` and not transitioning.
    AppStart,
    /// Set the hostname app-config item and apply it, only when it differs.
    SetHostname { params: app::HostnameParams, dry_run: bool },
    /// Replace old IPs in the Replicated files (crash-safe, token-exact).
    RewriteAddresses { params: rewrite::RewriteParams, dry_run: bool },
    /// Remove the Nomad server's data dir. Precondition: the app is stopped
    /// and no Nomad process runs (else refused).
    WipeNomad { dry_run: bool },
    /// Delete running builds that started before the cutoff, in one
    /// dev-console session.
    CleanupBuilds { params: builds::CleanupParams, dry_run: bool },
    /// Freeze data file systems under a watchdog that thaws at the deadline,
    /// or at once if this agent dies. Precondition: nothing frozen by this
    /// agent already (then the existing freeze is reported).
    Freeze { params: freeze::FreezeParams },
    /// Thaw what `Freeze` froze (or whatever the freeze records name).
    Thaw,
    /// Drain Nomad builder nodes and wait for their work (or the deadline).
    Drain { params: drain::DrainParams },
    /// End the drains this agent made (recorded in `state_dir/drain.json`);
    /// with no record, nothing is touched.
    Undrain,
    /// The whole restore runbook, in order.
    Recover { params: recover::RecoverParams, dry_run: bool },
    /// GET the frontend's health check from this machine. Read-only.
    HealthCheck,
}

impl Action {
    /// Short name for logs and journals.
    pub fn name(&self) -> &'static str {
        match self {
            Action::AppStatus => "app_status",
            Action::AppStop { .. } => "app_stop",
            Action::AppStart => "app_start",
            Action::SetHostname { .. } => "set_hostname",
            Action::RewriteAddresses { .. } => "rewrite_addresses",
            Action::WipeNomad { .. } => "wipe_nomad",
            Action::CleanupBuilds { .. } => "cleanup_builds",
            Action::Freeze { .. } => "freeze",
            Action::Thaw => "thaw",
            Action::Drain { .. } => "drain",
            Action::Undrain => "undrain",
            Action::Recover { .. } => "recover",
            Action::HealthCheck => "health_check",
        }
    }
}

/// What a successful step returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    AppStatus(AppStatus),
    /// Every other step: its report (what it did, what a human must do).
    Report { report: serde_json::Value },
}

/// Why a step did not succeed. The controller keys its retries on it; the
/// hand-run CLI maps it to its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed request or configuration (exit 2).
    Invalid,
    /// A safety rule or precondition refused the step; nothing changed (exit 3).
    Refused,
    /// The step ran and failed (exit 1).
    Failed,
    /// The agent restarted while the step ran; it is not re-run (exit 1).
    Interrupted,
    /// The step did not finish within its deadline (exit 1).
    TimedOut,
    /// This agent does not know the request (exit 2).
    NotSupported,
}

impl ErrorKind {
    /// The hand-run CLI's exit status for this kind.
    pub fn exit_code(self) -> u8 {
        use crate::commands::{EXIT_FAILED, EXIT_INPUT, EXIT_REFUSED};
        match self {
            ErrorKind::Invalid | ErrorKind::NotSupported => EXIT_INPUT,
            ErrorKind::Refused => EXIT_REFUSED,
            ErrorKind::Failed | ErrorKind::Interrupted | ErrorKind::TimedOut => EXIT_FAILED,
        }
    }

    /// The kind a step module's exit code stands for.
    pub fn from_exit_code(code: u8) -> Self {
        use crate::commands::{EXIT_INPUT, EXIT_REFUSED};
        match code {
            EXIT_INPUT => ErrorKind::Invalid,
            EXIT_REFUSED => ErrorKind::Refused,
            _ => ErrorKind::Failed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error("the step did not finish within its deadline of {0:?}")]
    DeadlineExceeded(Duration),
    #[error("{message}")]
    Step { kind: ErrorKind, message: String },
}

impl StepError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StepError::Replicated(_) => ErrorKind::Failed,
            StepError::DeadlineExceeded(_) => ErrorKind::TimedOut,
            StepError::Step { kind, .. } => *kind,
        }
    }

    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StepError::Step { kind, message: message.into() }
    }
}

fn report<T: Serialize>(r: T) -> Outcome {
    Outcome::Report { report: serde_json::to_value(r).expect("reports serialize") }
}

/// A step module's error, with the kind its exit code stands for.
pub trait Coded: std::fmt::Display {
    fn code(&self) -> u8;
}

macro_rules! coded {
    ($($t:ty),* $(,)?) => {$(
        impl Coded for $t {
            fn code(&self) -> u8 {
                self.exit_code()
            }
        }
    )*};
}
coded!(health::HealthError, app::AppError, builds::CleanupError, drain::DrainError, nomad_state::WipeError, recover::RecoverError, freeze::FreezeError, rewrite::RewriteError);

fn fail<E: Coded>(e: E) -> StepError {
    StepError::Step { kind: ErrorKind::from_exit_code(e.code()), message: e.to_string() }
}

/// Runs [`Action`]s on this machine.
///
/// Invariant: at most one freeze is held; its handle lives here so that the
/// watchdog's pipe closes (and the watchdog thaws) if the agent dies.
pub struct Executor {
    config: Arc<Config>,
    replicatedctl: Replicatedctl,
    /// The freeze this agent holds (its watchdog's pipe): dropping it thaws.
    frozen: tokio::sync::Mutex<Option<freeze::FreezeHandle>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").field("replicatedctl", &self.replicatedctl).finish_non_exhaustive()
    }
}

impl Executor {
    pub fn new(config: Arc<Config>) -> Self {
        let replicatedctl = Replicatedctl::new(config.replicated.replicatedctl.clone(), config.replicated.command_timeout);
        Executor { config, replicatedctl, frozen: tokio::sync::Mutex::new(None) }
    }

    pub fn replicatedctl(&self) -> &Replicatedctl {
        &self.replicatedctl
    }

    /// Runs one action, bounded by `deadline` when one is given.
    pub async fn execute(&self, action: &Action, deadline: Option<Duration>) -> Result<Outcome, StepError> {
        let c = self.config.as_ref();
        let work = async {
            Ok(match action {
                Action::AppStatus => Outcome::AppStatus(self.replicatedctl.app_status().await?),
                Action::AppStop { force } => report(
                    app::run(c, &app::AppParams { target: app::Target::Stopped, force: *force }, false).await.map_err(fail)?,
                ),
                Action::AppStart => report(
                    app::run(c, &app::AppParams { target: app::Target::Started, force: false }, false).await.map_err(fail)?,
                ),
                Action::SetHostname { params, dry_run } => report(app::set_hostname(c, params, *dry_run).await.map_err(fail)?),
                Action::RewriteAddresses { params, dry_run } => report(rewrite::run(c, params, *dry_run).await.map_err(fail)?),
                Action::WipeNomad { dry_run } => {
                    report(nomad_state::run(c, &nomad_state::WipeParams::default(), *dry_run).await.map_err(fail)?)
                }
                Action::CleanupBuilds { params, dry_run } => report(builds::run(c, params, *dry_run).await.map_err(fail)?),
                Action::Freeze { params } => {
                    let mut held = self.frozen.lock().await;
                    if let Some(h) = held.as_ref() {
                        return Err(StepError::new(
                            ErrorKind::Refused,
                            format!("already frozen by this agent (watchdog pid {:?}); thaw first", h.watchdog_pid()),
                        ));
                    }
                    let handle = freeze::freeze(c, params).await.map_err(fail)?;
                    let r = report(handle.report().clone());
                    *held = Some(handle);
                    r
                }
                Action::Thaw => {
                    let held = self.frozen.lock().await.take();
                    match held {
                        Some(handle) => report(freeze::thaw(handle).await.map_err(fail)?),
                        // Nothing held by this process (e.g. it restarted): thaw
                        // whatever the freeze records name; "already" is fine.
                        None => report(
                            freeze::run_thaw(c, &freeze::ThawParams { mounts: Vec::new() }, false).await.map_err(fail)?,
                        ),
                    }
                }
                Action::Drain { params } => report(drain::drain(c, params, false).await.map_err(fail)?),
                // From the controller, only drains this agent recorded are
                // ended: without a record (it never drained), nodes an
                // operator drained are left alone.
                Action::Undrain if !c.state_dir.join("drain.json").exists() => report(serde_json::json!({
                    "undrained": [],
                    "already_done": true,
                    "note": "this agent has not drained any node"
                })),
                Action::Undrain => report(drain::undrain(c, false).await.map_err(fail)?),
                Action::Recover { params, dry_run } => {
                    let r = recover::run(c, params, *dry_run).await.map_err(fail)?;
                    if let Some(f) = &r.failed {
                        return Err(StepError::new(ErrorKind::Failed, format!("recover stopped: {f}")));
                    }
                    report(r)
                }
                Action::HealthCheck => report(health::check(c).await.map_err(fail)?),
            })
        };
        match deadline {
            Some(d) => tokio::time::timeout(d, work).await.map_err(|_| StepError::DeadlineExceeded(d))?,
            None => work.await,
        }
    }
}
