//! Typed local steps. Nothing here knows about gRPC or the command line:
//! the session converts wire messages into [`Action`]s and [`Outcome`]s
//! back into wire messages; the CLI (`crate::cli`) converts flags into
//! [`Action`]s and renders [`Report`]s. Both run them through an
//! [`Executor`], so a controller command and a human follow the same rules.
//!
//! One module per step; each is a library (typed parameters in, the
//! contract's report or a thiserror error with an [`ErrorKind`] out) that
//! imports only [`error`] (the leaf every step's error maps into), its
//! sibling steps (`recover` composes them) and the layers below
//! ([`crate::sys`], [`crate::config`]); never this module's [`Executor`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use dr_proto::contract::{Envelope, Report, Request};

use crate::config::Config;
use crate::sys::replicated::{AppStatus, Replicatedctl};
pub(crate) mod app;
pub mod builds;
pub mod drain;
pub(crate) mod error;
pub(crate) mod freeze;
pub(crate) mod health;
pub mod nomad_state;
pub(crate) mod recover;
pub mod rewrite;

pub(crate) use error::{ErrorKind, StepError};
use error::{Kinded, fail};

fn is_false(b: &bool) -> bool {
    !*b
}

/// A step the agent can perform. The set is closed: there is no "run this
/// command" action. Fields added for the hand-run CLI (`dry_run`, ...) are
/// left out of the serialized form at their defaults, so journal records
/// written before they existed still compare equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Action {
    /// Read the Replicated app's status. No precondition; read-only.
    AppStatus,
    /// Stop the app and wait until State is `stopped` and not transitioning
    /// (deadline `replicated.app_timeout`). Already stopped: nothing is done.
    AppStop {
        force: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
    /// Start the app and wait until it is `started` and not transitioning.
    AppStart {
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
    /// Set the hostname app-config item and apply it, only when it differs.
    SetHostname { params: app::HostnameParams, dry_run: bool },
    /// Replace old IPs in the Replicated files (crash-safe, token-exact).
    RewriteAddresses { params: rewrite::RewriteParams, dry_run: bool },
    /// Remove the Nomad server's data dir. Precondition: the app is stopped
    /// and no Nomad process runs (else refused); `offline` (a mounted disk)
    /// skips those checks of this host.
    WipeNomad {
        dry_run: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        offline: bool,
    },
    /// Delete running builds that started before the cutoff, in one
    /// dev-console session.
    CleanupBuilds { params: builds::CleanupParams, dry_run: bool },
    /// Freeze data file systems under a watchdog that thaws at the deadline,
    /// or at once if the executor's process dies ([`Executor::new`]); a
    /// hand-run executor leaves a detached watchdog ([`Executor::hand_run`]).
    Freeze {
        params: freeze::FreezeParams,
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
    /// Thaw what `Freeze` froze (or whatever the freeze records name; with
    /// mounts, those).
    Thaw {
        #[serde(default, skip_serializing_if = "freeze::ThawParams::is_default")]
        params: freeze::ThawParams,
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
    /// Drain Nomad builder nodes and wait for their work (or the deadline).
    Drain {
        params: drain::DrainParams,
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
    /// End the drains this agent made (recorded in `state_dir/drain.json`);
    /// with no record, nothing is touched.
    Undrain {
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
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
            Action::AppStart { .. } => "app_start",
            Action::SetHostname { .. } => "set_hostname",
            Action::RewriteAddresses { .. } => "rewrite_addresses",
            Action::WipeNomad { .. } => "wipe_nomad",
            Action::CleanupBuilds { .. } => "cleanup_builds",
            Action::Freeze { .. } => "freeze",
            Action::Thaw { .. } => "thaw",
            Action::Drain { .. } => "drain",
            Action::Undrain { .. } => "undrain",
            Action::Recover { .. } => "recover",
            Action::HealthCheck => "health_check",
        }
    }
}

impl From<Request> for Action {
    /// A controller's command: the hand-run fields at their defaults.
    fn from(r: Request) -> Action {
        match r {
            Request::AppStatus => Action::AppStatus,
            Request::AppStop { force } => Action::AppStop { force, dry_run: false },
            Request::AppStart => Action::AppStart { dry_run: false },
            Request::SetHostname { params, dry_run } => Action::SetHostname { params, dry_run },
            Request::RewriteAddresses { params, dry_run } => Action::RewriteAddresses { params, dry_run },
            Request::WipeNomad { dry_run } => Action::WipeNomad { dry_run, offline: false },
            Request::CleanupBuilds { params, dry_run } => Action::CleanupBuilds { params, dry_run },
            Request::Freeze(params) => Action::Freeze { params, dry_run: false },
            Request::Thaw => Action::Thaw { params: Default::default(), dry_run: false },
            Request::Drain { deadline } => Action::Drain { params: drain::DrainParams { deadline, require_idle: false }, dry_run: false },
            Request::Undrain => Action::Undrain { dry_run: false },
            Request::Recover { params, dry_run } => Action::Recover { params, dry_run },
            Request::HealthCheck => Action::HealthCheck,
        }
    }
}

/// What a successful step returns (the wire's form: a report as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Outcome {
    AppStatus(AppStatus),
    /// Every other step: its report (what it did, what a human must do),
    /// with the [`Envelope`] fields always present.
    Report {
        report: serde_json::Value,
    },
}

impl From<Report> for Outcome {
    /// The wire's form ([`Report::to_json`], the contract's serializer).
    fn from(r: Report) -> Outcome {
        match r {
            Report::AppStatus(s) => Outcome::AppStatus(s),
            other => Outcome::Report { report: other.to_json() },
        }
    }
}

macro_rules! kinded {
    ($($t:ty),* $(,)?) => {$(
        impl Kinded for $t {
            fn kind(&self) -> ErrorKind {
                <$t>::kind(self)
            }
        }
    )*};
}
kinded!(
    health::HealthError,
    app::AppError,
    builds::CleanupError,
    drain::DrainError,
    nomad_state::WipeError,
    recover::RecoverError,
    freeze::FreezeError,
    rewrite::RewriteError
);

/// Runs [`Action`]s on this machine: the daemon's executor and the
/// hand-run CLI's are the same code, so a step follows the same rules
/// whoever asks.
///
/// Invariant: at most one freeze is held; its handle lives here so that the
/// watchdog's pipe closes (and the watchdog thaws) if the agent dies.
pub(crate) struct Executor {
    config: Arc<Config>,
    replicatedctl: Replicatedctl,
    /// The freeze this agent holds (its watchdog's pipe): dropping it thaws.
    frozen: tokio::sync::Mutex<Option<freeze::FreezeHandle>>,
    /// A hand-run process ends after one step: its freezes are held by a
    /// detached watchdog until `thaw` or the deadline.
    detached_freezes: bool,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("replicatedctl", &self.replicatedctl)
            .field("detached_freezes", &self.detached_freezes)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// The daemon's executor: a freeze is held by this process (its
    /// watchdog thaws if the process dies).
    pub fn new(config: Arc<Config>) -> Self {
        let replicatedctl = Replicatedctl::new(config.replicated.replicatedctl.clone(), config.replicated.command_timeout);
        Executor { config, replicatedctl, frozen: tokio::sync::Mutex::new(None), detached_freezes: false }
    }

    /// The executor of one hand-run step (`dr-agent <step>`): the same
    /// steps and rules, but a freeze outlives the process (a detached
    /// watchdog holds it until `dr-agent thaw` or its deadline, and a
    /// second freeze of the same mounts is reported as already frozen).
    pub fn hand_run(config: Arc<Config>) -> Self {
        Executor { detached_freezes: true, ..Executor::new(config) }
    }

    pub fn replicatedctl(&self) -> &Replicatedctl {
        &self.replicatedctl
    }

    /// Runs one action, bounded by `deadline` when one is given, and
    /// answers in the wire's form.
    pub async fn execute(&self, action: &Action, deadline: Option<Duration>) -> Result<Outcome, StepError> {
        self.run(action, deadline).await.map(Outcome::from)
    }

    /// Waits until the watchdog of the freeze this executor holds has
    /// thawed by itself (deadline, error); at once when none is held.
    pub async fn freeze_lifted(&self) {
        let mut held = self.frozen.lock().await;
        if let Some(h) = held.as_mut() {
            h.lifted().await;
        }
    }

    /// Runs one action, bounded by `deadline` when one is given.
    pub async fn run(&self, action: &Action, deadline: Option<Duration>) -> Result<Report, StepError> {
        let c = self.config.as_ref();
        let work = async {
            Ok(match action {
                Action::AppStatus => Report::AppStatus(self.replicatedctl.app_status().await?),
                Action::AppStop { force, dry_run } => {
                    Report::App(app::run(c, &app::AppParams { target: app::Target::Stopped, force: *force }, *dry_run).await.map_err(fail)?)
                }
                Action::AppStart { dry_run } => {
                    Report::App(app::run(c, &app::AppParams { target: app::Target::Started, force: false }, *dry_run).await.map_err(fail)?)
                }
                Action::SetHostname { params, dry_run } => Report::Hostname(app::set_hostname(c, params, *dry_run).await.map_err(fail)?),
                Action::RewriteAddresses { params, dry_run } => Report::Rewrite(rewrite::run(c, params, *dry_run).await.map_err(fail)?),
                Action::WipeNomad { dry_run, offline } => {
                    Report::Wipe(nomad_state::run(c, &nomad_state::WipeParams { offline: *offline }, *dry_run).await.map_err(fail)?)
                }
                Action::CleanupBuilds { params, dry_run } => {
                    let r = builds::run(c, params, *dry_run).await.map_err(fail)?;
                    if r.failed > 0 || r.refused > 0 {
                        let kind = if r.failed > 0 { ErrorKind::Failed } else { ErrorKind::Refused };
                        let message = format!("{} build(s) failed, {} refused", r.failed, r.refused);
                        return Err(StepError::Reported { kind, message, report: Box::new(Report::Cleanup(r)) });
                    }
                    Report::Cleanup(r)
                }
                Action::Freeze { params, dry_run } if *dry_run || self.detached_freezes => {
                    if self.frozen.lock().await.is_some() {
                        return Err(StepError::new(ErrorKind::Refused, "already frozen by this agent; thaw first"));
                    }
                    Report::Freeze(freeze::run(c, params, *dry_run).await.map_err(fail)?)
                }
                Action::Freeze { params, .. } => {
                    let mut held = self.frozen.lock().await;
                    if let Some(h) = held.as_ref() {
                        return Err(StepError::new(
                            ErrorKind::Refused,
                            format!("already frozen by this agent (watchdog pid {:?}); thaw first", h.watchdog_pid()),
                        ));
                    }
                    let handle = freeze::freeze(c, params).await.map_err(fail)?;
                    let r = Report::Freeze(handle.report().clone());
                    *held = Some(handle);
                    r
                }
                Action::Thaw { params, dry_run } => {
                    let held = if *dry_run || !params.mounts.is_empty() { None } else { self.frozen.lock().await.take() };
                    match held {
                        Some(handle) => Report::Thaw(freeze::thaw(handle).await.map_err(fail)?),
                        // Nothing held by this process (hand-run, or it
                        // restarted): thaw whatever the freeze records name;
                        // "already" is fine.
                        None => Report::Thaw(freeze::run_thaw(c, params, *dry_run).await.map_err(fail)?),
                    }
                }
                Action::Drain { params, dry_run } => Report::Drain(drain::drain(c, params, *dry_run).await.map_err(fail)?),
                // Only drains this agent recorded are ended (drain::undrain).
                Action::Undrain { dry_run } => Report::Undrain(drain::undrain(c, *dry_run).await.map_err(fail)?),
                Action::Recover { params, dry_run } => {
                    let r = recover::run(c, params, *dry_run).await.map_err(fail)?;
                    if let Some(f) = &r.failed {
                        let message = format!("recover stopped: {f}");
                        return Err(StepError::Reported { kind: ErrorKind::Failed, message, report: Box::new(Report::Recover(r)) });
                    }
                    Report::Recover(r)
                }
                Action::HealthCheck => Report::Health(health::check(c).await.map_err(fail)?),
            })
        };
        match deadline {
            Some(d) => tokio::time::timeout(d, work).await.map_err(|_| StepError::DeadlineExceeded(d))?,
            None => work.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A clean-up that refused a build's URL is not answered "ok" to the
    /// controller (the hand-run CLI already exited 3): the executor says
    /// `refused`, and its report, kept in the error, names the build.
    #[tokio::test]
    async fn a_cleanup_that_refused_a_build_is_not_ok() {
        let page = serde_json::json!([{
            "build_url": "https://evil.example.com/gh/org/repo/7",
            "build_num": 7, "username": "org", "reponame": "repo",
            "lifecycle": "running", "status": "running", "start_time": "2024-05-01T11:00:00Z"
        }])
        .to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
            page.len()
        );
        let (url, seen) = crate::sys::http::tests::listener(answer.into_bytes(), Duration::ZERO).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "t0k3n\n").expect("token");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut config = Config::default();
        config.circleci.api_url = url;
        config.circleci.api_token_file = token;
        config.circleci.hostname = Some("ci.example.com".into());
        // No console may open: nothing valid to delete.
        config.circleci.dev_console = vec!["/nonexistent/dev-console".into()];
        let executor = Executor::new(Arc::new(config));
        let action = Action::CleanupBuilds { params: builds::CleanupParams { before: "2024-05-01T12:00:00Z".into() }, dry_run: false };
        let err = executor.execute(&action, None).await.expect_err("a refused build is not ok");
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert_eq!(err.to_string(), "0 build(s) failed, 1 refused");
        let Some(Report::Cleanup(r)) = err.report() else { panic!("the report is kept: {err:?}") };
        assert_eq!((r.refused, r.deleted, r.console_sessions), (1, 0, 0), "{r:?}");
        assert!(!r.already_done, "a refused build is not done: {r:?}");
        assert!(r.builds[0].detail.contains("URL refused"), "{r:?}");
        assert!(r.actions.iter().any(|a| a.contains("check them by hand")), "{r:?}");
        assert_eq!(seen.lock().expect("lock").len(), 1, "one page listed");
    }

    /// Fields added for the hand-run CLI do not change how the daemon's
    /// actions are journaled (an older agent's record still matches).
    #[test]
    fn default_cli_fields_are_not_serialized() {
        for (a, json) in [
            (Action::AppStart { dry_run: false }, r#"{"kind":"app_start"}"#),
            (Action::Undrain { dry_run: false }, r#"{"kind":"undrain"}"#),
            (Action::Thaw { params: freeze::ThawParams::default(), dry_run: false }, r#"{"kind":"thaw"}"#),
            (Action::AppStop { force: true, dry_run: false }, r#"{"kind":"app_stop","force":true}"#),
            (Action::WipeNomad { dry_run: false, offline: false }, r#"{"kind":"wipe_nomad","dry_run":false}"#),
        ] {
            assert_eq!(serde_json::to_string(&a).expect("serializes"), json);
            assert_eq!(serde_json::from_str::<Action>(json).expect("parses"), a);
        }
    }
}
