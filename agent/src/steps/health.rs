//! The CircleCI frontend's own health check, asked from the machine itself
//! (`circleci.health_url`, default `http://127.0.0.1/health-check`): what
//! "the app is up" means beyond Replicated's `started`. [`check`] is one
//! GET (the controller's failover polls it); [`start_healthy`] is the whole
//! app start a restore requires (start, then the health check until 2xx),
//! which `dr-agent recover` runs.

use std::time::{Duration, Instant};

use serde::Serialize;

pub(crate) use dr_proto::contract::HealthReport;

use crate::config::Config;
use crate::steps::app::{self, AppError, AppParams, AppReport, Target};
use crate::steps::error::ErrorKind;
use crate::sys::http::HttpError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    #[error("circleci.health_url `{url}` is not usable: {why}")]
    BadUrl { url: String, why: String },
    #[error("GET {url} failed: {why}")]
    Unreachable { url: String, why: String },
    #[error("GET {url} answered {status}: {excerpt}")]
    Unhealthy { url: String, status: u16, excerpt: String },
    #[error("GET {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

impl HealthError {
    /// Exit code (hand-run) and error kind (controller): bad configuration
    /// is input; everything else a failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HealthError::BadUrl { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Failed,
        }
    }
}

/// Largest health-check body read (it is only quoted on failure).
const MAX_BODY: usize = 1024 * 1024;

/// One GET of the health URL: a 2xx is healthy.
pub(crate) async fn check(config: &Config) -> Result<HealthReport, HealthError> {
    let url = config.circleci.health_url.clone();
    let timeout = config.circleci.request_timeout;
    let client = crate::sys::http::HttpClient::new(&url, timeout, MAX_BODY).map_err(|e| match e {
        HttpError::NotHttp => HealthError::BadUrl { url: url.clone(), why: "must be an http:// URL on this machine".into() },
        e => HealthError::BadUrl { url: url.clone(), why: e.to_string() },
    })?;
    let started = Instant::now();
    let resp = client.get("", &[]).await.map_err(|e| match e {
        HttpError::Timeout(timeout) => HealthError::Timeout { url: url.clone(), timeout },
        e => HealthError::Unreachable { url: url.clone(), why: e.to_string() },
    })?;
    let status = resp.status;
    resp.success().map_err(|e| match e {
        HttpError::Status { status, excerpt } => {
            HealthError::Unhealthy { url: url.clone(), status: status.as_u16(), excerpt: excerpt.chars().take(200).collect() }
        }
        e => HealthError::Unreachable { url: url.clone(), why: e.to_string() },
    })?;
    Ok(HealthReport { url, status: status.as_u16(), elapsed_ms: started.elapsed().as_millis() as u64 })
}

/// What [`start_healthy`] did: the app start's report, and the health
/// check that passed (None in a dry run). Serialized as the app report
/// plus `health`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct StartedHealthy {
    #[serde(flatten)]
    pub app: AppReport,
    pub health: Option<HealthReport>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error("the app is started but its health check did not pass within {within:?} (replicated.app_timeout): {last}")]
    Unhealthy { within: Duration, last: HealthError },
    #[error(transparent)]
    Health(HealthError),
}

/// How often the health check is asked while the app comes up.
const HEALTH_POLL: Duration = Duration::from_secs(1);

/// The app start a restore requires, as one step: Replicated `started` and
/// settled ([`app::run`]), then the frontend's health check ([`check`])
/// until it answers 2xx, within `replicated.app_timeout`. `dr-agent
/// recover` runs this; the controller's failover runs the same two steps
/// as two commands (`app_start`, then `health_check` polled within
/// `failover.app_timeout`) to show its progress. A dry run checks nothing.
pub(crate) async fn start_healthy(config: &Config, dry_run: bool) -> Result<StartedHealthy, StartError> {
    let app = app::run(config, &AppParams { target: Target::Started, force: false }, dry_run).await?;
    if dry_run {
        return Ok(StartedHealthy { app, health: None });
    }
    let within = config.replicated.app_timeout;
    let started = Instant::now();
    loop {
        match check(config).await {
            Ok(h) => return Ok(StartedHealthy { app, health: Some(h) }),
            Err(e @ HealthError::BadUrl { .. }) => return Err(StartError::Health(e)),
            Err(last) if started.elapsed() >= within => return Err(StartError::Unhealthy { within, last }),
            Err(e) => tracing::info!(error = %e, "app started; waiting for its health check"),
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}
