//! The step error leaf: what a step's failure is ([`StepError`]) and the
//! kind every step error maps into ([`ErrorKind`], the contract's). Step
//! modules import this, never the executor beside it: no import cycle.

use std::time::Duration;

pub(crate) use dr_proto::contract::{ErrorKind, Report};

use crate::sys::replicated::ReplicatedError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error("the step did not finish within its deadline of {0:?}")]
    DeadlineExceeded(Duration),
    #[error("{message}")]
    Step { kind: ErrorKind, message: String },
    /// The step ran and has a report saying what failed (a recover stopped
    /// at a step, deletions that failed or were refused).
    #[error("{message}")]
    Reported { kind: ErrorKind, message: String, report: Box<Report> },
}

impl StepError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StepError::Replicated(_) => ErrorKind::Failed,
            StepError::DeadlineExceeded(_) => ErrorKind::TimedOut,
            StepError::Step { kind, .. } | StepError::Reported { kind, .. } => *kind,
        }
    }

    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StepError::Step { kind, message: message.into() }
    }

    /// The report of a step that failed after it ran, if it has one.
    pub fn report(&self) -> Option<&Report> {
        match self {
            StepError::Reported { report, .. } => Some(report),
            _ => None,
        }
    }
}

/// A step module's error: what kind of failure it is.
pub(crate) trait Kinded: std::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

/// A step module's error as a [`StepError`].
pub(crate) fn fail<E: Kinded>(e: E) -> StepError {
    StepError::Step { kind: e.kind(), message: e.to_string() }
}
