//! The CircleCI frontend's own health check, asked from the machine itself
//! (`circleci.health_url`, default `http://127.0.0.1/health-check`): what
//! "the app is up" means beyond Replicated's `started`. One GET; the caller
//! (the controller's failover) polls.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::config::Config;
use crate::steps::ErrorKind;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthReport {
    pub url: String,
    pub status: u16,
    pub elapsed_ms: u64,
}

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

/// One GET of the health URL: a 2xx is healthy.
pub async fn check(config: &Config) -> Result<HealthReport, HealthError> {
    let url = config.circleci.health_url.clone();
    let timeout = config.circleci.request_timeout;
    let uri: hyper::Uri = url.parse().map_err(|e| HealthError::BadUrl { url: url.clone(), why: format!("{e}") })?;
    if uri.scheme_str() != Some("http") {
        return Err(HealthError::BadUrl { url, why: "must be an http:// URL on this machine".into() });
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let started = Instant::now();
    let fut = async {
        let resp = client.get(uri).await.map_err(|e| HealthError::Unreachable { url: url.clone(), why: e.to_string() })?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 4096).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok::<_, HealthError>((status, body))
    };
    let (status, body) =
        tokio::time::timeout(timeout, fut).await.map_err(|_| HealthError::Timeout { url: url.clone(), timeout })??;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(HealthError::Unhealthy { url, status: status.as_u16(), excerpt: text.trim().chars().take(200).collect() });
    }
    Ok(HealthReport { url, status: status.as_u16(), elapsed_ms: started.elapsed().as_millis() as u64 })
}
