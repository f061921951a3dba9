//! Hand-run reads that are not steps of the controller's: the app status
//! and this instance's facts (what a Hello carries). Rendering is in
//! [`crate::cli::render`].

use std::path::Path;

use crate::config::Config;
use crate::steps::{Action, Executor, Report, StepError};
use crate::sys::facts::{self, FactsError, InstanceFacts};
use crate::sys::imds::{ImdsClient, ImdsError};
use crate::sys::replicated::{AppStatus, ReplicatedError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error(transparent)]
    Facts(#[from] FactsError),
}

/// Runs the app-status step.
pub(crate) async fn app_status(config: &Config) -> Result<AppStatus, CommandError> {
    let executor = Executor::hand_run(std::sync::Arc::new(config.clone()));
    match executor.run(&Action::AppStatus, None).await? {
        Report::AppStatus(s) => Ok(s),
        other => unreachable!("app status answers with an AppStatus, not {other:?}"),
    }
}

/// Gathers the facts a Hello would carry.
pub(crate) async fn gather_facts(config: &Config) -> Result<InstanceFacts, CommandError> {
    let imds = ImdsClient::new(&config.imds.endpoint, config.imds.timeout)?;
    let app_state = match app_status(config).await {
        Ok(s) => s.state,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the app state");
            "unknown".to_owned()
        }
    };
    Ok(facts::gather(&imds, &config.root, Path::new(facts::BOOT_ID_PATH), app_state).await?)
}
