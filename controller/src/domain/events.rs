//! The kinds of event the controller emits ([`super::model::Event::kind`]).
//! Their text ([`EventKind::as_str`]) is what webhooks, stored events,
//! `[[notify]] events` filters and tests see: it never changes.

use std::fmt;

/// Every event kind the controller emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    SiteSuspect,
    SiteDown,
    SiteRecovered,
    SitePartitioned,
    SiteUnreachable,
    SiteNeedsHuman,
    SitePaused,
    SiteUnpaused,
    FleetGuard,
    FleetGuardCleared,
    RepairStarted,
    RepairSucceeded,
    RepairFailed,
    RepairNotStarted,
    FailoverAwaitingApproval,
    FailoverApprovalOverdue,
    FailoverApproved,
    FailoverWithdrawn,
    FailoverNotStarted,
    FailoverStarted,
    FailoverSucceeded,
    FailoverFailed,
    BackupFailed,
    BackupLate,
    DrillFailed,
    AgentCertExpiring,
    AgentRefused,
    FenceBreached,
    FenceRestored,
    ControllerTaskRestarted,
    AgentEnrolled,
    AgentRenewalFailed,
    AgentRevoked,
    AgentIdentityConflict,
    PkiIntermediateExpiring,
    ControllerCertRenewed,
    CaRotationPhase,
}

impl EventKind {
    /// Every kind, in the order above.
    pub const ALL: [EventKind; 37] = [
        EventKind::SiteSuspect,
        EventKind::SiteDown,
        EventKind::SiteRecovered,
        EventKind::SitePartitioned,
        EventKind::SiteUnreachable,
        EventKind::SiteNeedsHuman,
        EventKind::SitePaused,
        EventKind::SiteUnpaused,
        EventKind::FleetGuard,
        EventKind::FleetGuardCleared,
        EventKind::RepairStarted,
        EventKind::RepairSucceeded,
        EventKind::RepairFailed,
        EventKind::RepairNotStarted,
        EventKind::FailoverAwaitingApproval,
        EventKind::FailoverApprovalOverdue,
        EventKind::FailoverApproved,
        EventKind::FailoverWithdrawn,
        EventKind::FailoverNotStarted,
        EventKind::FailoverStarted,
        EventKind::FailoverSucceeded,
        EventKind::FailoverFailed,
        EventKind::BackupFailed,
        EventKind::BackupLate,
        EventKind::DrillFailed,
        EventKind::AgentCertExpiring,
        EventKind::AgentRefused,
        EventKind::FenceBreached,
        EventKind::FenceRestored,
        EventKind::ControllerTaskRestarted,
        EventKind::AgentEnrolled,
        EventKind::AgentRenewalFailed,
        EventKind::AgentRevoked,
        EventKind::AgentIdentityConflict,
        EventKind::PkiIntermediateExpiring,
        EventKind::ControllerCertRenewed,
        EventKind::CaRotationPhase,
    ];

    /// The kind as events carry it (`site.down`, `failover.started`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::SiteSuspect => "site.suspect",
            EventKind::SiteDown => "site.down",
            EventKind::SiteRecovered => "site.recovered",
            EventKind::SitePartitioned => "site.partitioned",
            EventKind::SiteUnreachable => "site.unreachable",
            EventKind::SiteNeedsHuman => "site.needs_human",
            EventKind::SitePaused => "site.paused",
            EventKind::SiteUnpaused => "site.unpaused",
            EventKind::FleetGuard => "fleet.guard",
            EventKind::FleetGuardCleared => "fleet.guard_cleared",
            EventKind::RepairStarted => "repair.started",
            EventKind::RepairSucceeded => "repair.succeeded",
            EventKind::RepairFailed => "repair.failed",
            EventKind::RepairNotStarted => "repair.not_started",
            EventKind::FailoverAwaitingApproval => "failover.awaiting_approval",
            EventKind::FailoverApprovalOverdue => "failover.approval_overdue",
            EventKind::FailoverApproved => "failover.approved",
            EventKind::FailoverWithdrawn => "failover.withdrawn",
            EventKind::FailoverNotStarted => "failover.not_started",
            EventKind::FailoverStarted => "failover.started",
            EventKind::FailoverSucceeded => "failover.succeeded",
            EventKind::FailoverFailed => "failover.failed",
            EventKind::BackupFailed => "backup.failed",
            EventKind::BackupLate => "backup.late",
            EventKind::DrillFailed => "drill.failed",
            EventKind::AgentCertExpiring => "agent.cert_expiring",
            EventKind::AgentRefused => "agent.refused",
            EventKind::FenceBreached => "fence.breached",
            EventKind::FenceRestored => "fence.restored",
            EventKind::ControllerTaskRestarted => "controller.task_restarted",
            EventKind::AgentEnrolled => "agent.enrolled",
            EventKind::AgentRenewalFailed => "agent.renewal_failed",
            EventKind::AgentRevoked => "agent.revoked",
            EventKind::AgentIdentityConflict => "agent.identity_conflict",
            EventKind::PkiIntermediateExpiring => "pki.intermediate_expiring",
            EventKind::ControllerCertRenewed => "controller.cert_renewed",
            EventKind::CaRotationPhase => "pki.rotation",
        }
    }

    /// The kind an event's text names, if any.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<EventKind> for String {
    fn from(k: EventKind) -> String {
        k.as_str().to_owned()
    }
}

impl PartialEq<EventKind> for String {
    fn eq(&self, other: &EventKind) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<EventKind> for &str {
    fn eq(&self, other: &EventKind) -> bool {
        *self == other.as_str()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_kind_has_its_own_text_and_round_trips() {
        let texts: BTreeSet<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(texts.len(), EventKind::ALL.len(), "two kinds share a text");
        // ALL lists every variant, in declaration order.
        assert_eq!(EventKind::ALL.len(), EventKind::CaRotationPhase as usize + 1);
        assert!(EventKind::ALL.iter().enumerate().all(|(i, k)| *k as usize == i));
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k), "{k:?}");
            assert_eq!(k.to_string(), k.as_str());
        }
        assert_eq!(EventKind::parse("site.gone"), None);
        assert_eq!(EventKind::FailoverStarted.to_string(), "failover.started");
        assert_eq!(EventKind::FleetGuard.to_string(), "fleet.guard");
        assert_eq!(EventKind::FenceBreached.to_string(), "fence.breached");
        assert_eq!(EventKind::SitePartitioned.to_string(), "site.partitioned");
    }
}
