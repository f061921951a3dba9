//! Typed local steps. Nothing here knows about gRPC: the session converts
//! wire messages into [`Action`]s and [`Outcome`]s back into wire messages.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::replicated::{AppStatus, ReplicatedError, Replicatedctl};

/// A step the agent can perform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Read the Replicated app's status (`replicatedctl app status`).
    ///
    /// Preconditions: none; read-only, safe in any state of the app and
    /// safe to repeat. Needs `replicatedctl` to be installed and the
    /// Replicated daemon to answer.
    AppStatus,
}

impl Action {
    /// Short name for logs and journals.
    pub fn name(&self) -> &'static str {
        match self {
            Action::AppStatus => "app_status",
        }
    }
}

/// What a successful step returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    AppStatus(AppStatus),
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error("the step did not finish within its deadline of {0:?}")]
    DeadlineExceeded(Duration),
}

/// Runs [`Action`]s on this machine.
#[derive(Clone, Debug)]
pub struct Executor {
    replicatedctl: Replicatedctl,
}

impl Executor {
    pub fn new(replicatedctl: Replicatedctl) -> Self {
        Executor { replicatedctl }
    }

    pub fn replicatedctl(&self) -> &Replicatedctl {
        &self.replicatedctl
    }

    /// Runs one action, bounded by `deadline` when one is given.
    pub async fn execute(&self, action: &Action, deadline: Option<Duration>) -> Result<Outcome, StepError> {
        let work = async {
            match action {
                Action::AppStatus => Ok(Outcome::AppStatus(self.replicatedctl.app_status().await?)),
            }
        };
        match deadline {
            Some(d) => tokio::time::timeout(d, work).await.map_err(|_| StepError::DeadlineExceeded(d))?,
            None => work.await,
        }
    }
}
