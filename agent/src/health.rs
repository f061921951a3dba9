//! The CircleCI frontend's own health check, asked from the machine itself
//! (`circleci.health_url`, default `http://127.0.0.1/health-check`): what
//! "the app is up" means beyond Replicated's `started`. One GET; the caller
//! (the controller's failover) polls.

use std::time::{Duration, Instant};

pub use dr_proto::contract::HealthReport;

use crate::config::Config;
use crate::http::HttpError;
use crate::steps::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
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
pub async fn check(config: &Config) -> Result<HealthReport, HealthError> {
    let url = config.circleci.health_url.clone();
    let timeout = config.circleci.request_timeout;
    let client = crate::http::HttpClient::new(&url, timeout, MAX_BODY).map_err(|e| match e {
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
