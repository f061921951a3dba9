//! The contract between dr-agent and dr-controller: every step's
//! parameters ([`params`]), its report ([`reports`]) and its error (one
//! [`ErrorKind`] and a message). Both programs use these types; neither
//! has a copy of its own, so a change to a step's report is one change,
//! seen by the compiler on both sides.
//!
//! # On the wire
//!
//! What the wire did before this module existed is kept, deliberately:
//!
//! - A command's parameters are the protobuf request messages of
//!   `Command.kind`. [`Request`] is their typed form; [`Request::from_pb`]
//!   and [`Request::to_pb`] are the one conversion, used by the agent and
//!   the controller alike.
//! - A report travels as JSON in `CommandResult.report_json`: the serde
//!   form of the structs here, plus the [`Envelope`] fields
//!   ([`Report::to_json`], the one serializer). JSON rather than new
//!   protobuf messages because the field is already on the wire (agents
//!   and controllers of either version keep talking), because the agent's
//!   journal stores answers as JSON and replays them after an upgrade,
//!   because reports nest and evolve (`recover` carries its steps' own
//!   reports) and because the hand-run CLI's `--output json` and the
//!   controller's step results are that same JSON. A second definition of
//!   every report in `dr.proto` would be the duplicate this module removes.
//! - The error kind is the protobuf enum `ErrorKind`; [`ErrorKind::to_wire`]
//!   and [`ErrorKind::from_wire`] are the one mapping.
//!
//! # Compatibility rules
//!
//! - A field added to a report gets `#[serde(default)]`: an older agent's
//!   report still parses.
//! - Unknown fields are ignored: an older controller reads a newer agent.
//! - Renaming or removing a field breaks the contract: the reader's
//!   [`parse_report`] fails with a [`ContractError`] naming the step and the
//!   field, and the controller fails the step with it (never a silent
//!   null).

pub mod params;
pub mod reports;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use params::*;
pub use reports::*;

use crate::pb;

/// Why a step did not succeed. The controller keys its retries on it; the
/// hand-run CLI maps it to its exit code. The wire's `ErrorKind` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed request or configuration.
    Invalid,
    /// A safety rule or precondition refused the step; nothing changed.
    Refused,
    /// The step ran and failed.
    Failed,
    /// The agent restarted while the step ran; it is not re-run.
    Interrupted,
    /// The step did not finish within its deadline.
    TimedOut,
    /// This agent does not know the request.
    NotSupported,
}

impl ErrorKind {
    /// The protobuf enum value (`None`: unspecified, for a success).
    pub fn to_wire(kind: Option<ErrorKind>) -> i32 {
        let k = match kind {
            None => pb::ErrorKind::Unspecified,
            Some(ErrorKind::Invalid) => pb::ErrorKind::Invalid,
            Some(ErrorKind::Refused) => pb::ErrorKind::Refused,
            Some(ErrorKind::Failed) => pb::ErrorKind::Failed,
            Some(ErrorKind::Interrupted) => pb::ErrorKind::Interrupted,
            Some(ErrorKind::TimedOut) => pb::ErrorKind::TimedOut,
            Some(ErrorKind::NotSupported) => pb::ErrorKind::NotSupported,
        };
        k as i32
    }

    /// The kind a protobuf enum value names; `None` for unspecified or a
    /// value this version does not know (a failure is then `Failed`).
    pub fn from_wire(value: i32) -> Option<ErrorKind> {
        match pb::ErrorKind::try_from(value).ok()? {
            pb::ErrorKind::Unspecified => None,
            pb::ErrorKind::Invalid => Some(ErrorKind::Invalid),
            pb::ErrorKind::Refused => Some(ErrorKind::Refused),
            pb::ErrorKind::Failed => Some(ErrorKind::Failed),
            pb::ErrorKind::Interrupted => Some(ErrorKind::Interrupted),
            pb::ErrorKind::TimedOut => Some(ErrorKind::TimedOut),
            pb::ErrorKind::NotSupported => Some(ErrorKind::NotSupported),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Refused => "refused",
            ErrorKind::Failed => "failed",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::TimedOut => "timed_out",
            ErrorKind::NotSupported => "not_supported",
        }
    }
}

/// A step's failure as it crosses the wire: its kind and its message
/// (the agent's own error types stay on the agent).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepFailure {
    pub kind: ErrorKind,
    pub message: String,
}

/// An answer that does not follow the contract: the report of `step` is
/// missing, is not JSON, or lacks (or mistypes) a field of `report`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the agent's answer to `{step}` does not follow the contract ({report}): {detail}")]
pub struct ContractError {
    /// The step (action name: `app_stop`, `thaw`, ...).
    pub step: String,
    /// The report type expected (`AppReport`, ...).
    pub report: &'static str,
    /// What is wrong, naming the field (`already: missing field`, ...).
    pub detail: String,
}

/// A report of the contract, readable from the wire with [`parse_report`].
pub trait TypedReport: Serialize + DeserializeOwned {
    /// The type's name, for errors.
    const NAME: &'static str;
}

/// Reads the report of `step` from its JSON text. Every failure names the
/// step and, when serde can, the field (`already: missing field ...`,
/// `status: invalid type ...`).
pub fn parse_report<R: TypedReport>(step: &str, json: &str) -> Result<R, ContractError> {
    let err = |detail: String| ContractError { step: step.to_owned(), report: R::NAME, detail };
    if json.trim().is_empty() {
        return Err(err("the answer carries no report".into()));
    }
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize::<_, R>(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at its parent: name it in front.
        let field = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()).map(str::to_owned);
        err(match (path.as_str(), field) {
            (".", Some(f)) => format!("{f}: {inner}"),
            (p, Some(f)) => format!("{p}.{f}: {inner}"),
            (".", None) => inner,
            (p, None) => format!("{p}: {inner}"),
        })
    })
}

/// The part every report has, whatever the step: the one shape the CLI
/// renders and the controller may read (`dry_run`, `already_done`,
/// `actions` for a human or, in a dry run, the plan; `warnings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub dry_run: bool,
    /// Nothing needed doing (or, in a dry run, would be done).
    pub already_done: bool,
    pub actions: &'a [String],
    pub warnings: &'a [String],
}

impl Envelope<'_> {
    /// The envelope of a report that has nothing of it (read-only steps).
    pub const EMPTY: Envelope<'static> = Envelope { dry_run: false, already_done: false, actions: &[], warnings: &[] };
}

/// A step report that has an [`Envelope`].
pub trait Enveloped: Serialize {
    fn envelope(&self) -> Envelope<'_>;
}

macro_rules! enveloped {
    ($($t:ty => |$r:ident| $already:expr, $actions:expr, $warnings:expr;)*) => {$(
        impl Enveloped for $t {
            fn envelope(&self) -> Envelope<'_> {
                let $r = self;
                Envelope { dry_run: $r.dry_run, already_done: $already, actions: $actions, warnings: $warnings }
            }
        }
    )*};
}

enveloped! {
    AppReport => |r| r.already, &r.actions, &r.warnings;
    HostnameReport => |r| !r.changed, &r.actions, &r.warnings;
    RewriteReport => |r| r.up_to_date, &r.actions, &r.warnings;
    WipeReport => |r| r.state == "already done", &r.actions, &r.warnings;
    CleanupReport => |r| r.already_done, &r.actions, &r.warnings;
    FreezeReport => |r| r.state == "already frozen", &r.actions, &r.warnings;
    ThawReport => |r| r.already_done, &[], &r.warnings;
    DrainReport => |r| r.drained.is_empty(), &r.actions, &r.warnings;
    UndrainReport => |r| r.already_done, &r.actions, &r.warnings;
    RecoverReport => |r| r.steps.iter().all(|s| s.outcome == "already done" || s.outcome == "skipped"), &r.actions, &r.warnings;
}

impl Enveloped for HealthReport {
    fn envelope(&self) -> Envelope<'_> {
        Envelope::EMPTY
    }
}

macro_rules! typed_reports {
    ($($t:ident),* $(,)?) => {$(
        impl TypedReport for $t {
            const NAME: &'static str = stringify!($t);
        }
    )*};
}

typed_reports!(
    AppStatus,
    AppReport,
    HostnameReport,
    RewriteReport,
    WipeReport,
    CleanupReport,
    FreezeReport,
    ThawReport,
    DrainReport,
    UndrainReport,
    RecoverReport,
    HealthReport
);

/// A step's typed report: what the agent's executor returns, and (as
/// JSON, [`Report::to_json`]) what the controller reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    AppStatus(AppStatus),
    App(AppReport),
    Hostname(HostnameReport),
    Rewrite(RewriteReport),
    Wipe(WipeReport),
    Cleanup(CleanupReport),
    Freeze(FreezeReport),
    Thaw(ThawReport),
    Drain(DrainReport),
    Undrain(UndrainReport),
    Recover(RecoverReport),
    Health(HealthReport),
}

/// Object-safe view of [`Enveloped`] (serialization without generics).
trait EnvelopedDyn {
    fn envelope_dyn(&self) -> Envelope<'_>;
    fn to_json_dyn(&self) -> serde_json::Value;
}

impl<T: Enveloped> EnvelopedDyn for T {
    fn envelope_dyn(&self) -> Envelope<'_> {
        self.envelope()
    }
    fn to_json_dyn(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("reports serialize")
    }
}

impl Report {
    fn enveloped(&self) -> Option<&dyn EnvelopedDyn> {
        Some(match self {
            Report::AppStatus(_) => return None,
            Report::App(r) => r,
            Report::Hostname(r) => r,
            Report::Rewrite(r) => r,
            Report::Wipe(r) => r,
            Report::Cleanup(r) => r,
            Report::Freeze(r) => r,
            Report::Thaw(r) => r,
            Report::Drain(r) => r,
            Report::Undrain(r) => r,
            Report::Recover(r) => r,
            Report::Health(r) => r,
        })
    }

    /// The envelope (an app status has none: it is read-only, never a dry
    /// run, nothing for a human).
    pub fn envelope(&self) -> Envelope<'_> {
        match self.enveloped() {
            Some(r) => r.envelope_dyn(),
            None => Envelope::EMPTY,
        }
    }

    /// The report as JSON, the wire's form: the step's own fields, plus
    /// every [`Envelope`] field (a report lacking one gets it).
    pub fn to_json(&self) -> serde_json::Value {
        let (mut v, env) = match (self, self.enveloped()) {
            (Report::AppStatus(s), _) => return serde_json::to_value(s).expect("an app status serializes"),
            (_, Some(r)) => (r.to_json_dyn(), r.envelope_dyn()),
            (_, None) => unreachable!("every report but the app status has an envelope"),
        };
        if let Some(m) = v.as_object_mut() {
            m.entry("dry_run").or_insert(env.dry_run.into());
            m.entry("already_done").or_insert(env.already_done.into());
            m.entry("actions").or_insert_with(|| serde_json::json!(env.actions));
            m.entry("warnings").or_insert_with(|| serde_json::json!(env.warnings));
        }
        v
    }
}

#[cfg(test)]
mod tests;
