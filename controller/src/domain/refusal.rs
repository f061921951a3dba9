//! Agents the controller refused: why, with which certificate, how often.
//!
//! An agent whose certificate is expired (or not yet valid, from another
//! CA, for another site...) is refused during the TLS handshake or at its
//! Hello. It keeps retrying with backoff, so a refusal is kept as one
//! record per (site, reason, certificate) with a count and the first and
//! last time, never one record per try.
//!
//! Trust: the certificate is read as presented, before anyone proved they
//! hold its key. A refusal whose chain the controller's own verifier
//! accepts apart from its time (`ca_verified`) was issued by this
//! deployment's CA; any other (`unknown_ca`, `invalid_certificate`) names a
//! site only because its certificate says so.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::model::Millis;

/// Why an agent was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The certificate's not-after has passed.
    Expired,
    /// The certificate's not-before is still to come (a clock, or a
    /// certificate issued for later).
    NotYetValid,
    /// The certificate does not chain to this deployment's CA.
    UnknownCa,
    /// Any other certificate problem (bad signature, wrong key usage...).
    InvalidCertificate,
    /// The Hello names another site than the certificate.
    WrongSite,
    /// The certificate's site is not configured on this controller.
    UnknownSite,
    /// The certificate's identity belongs to another trust domain.
    WrongTrustDomain,
    /// The certificate is not a site (agent) certificate.
    NotASite,
    /// The certificate (or its whole site) was revoked by an operator.
    Revoked,
    /// An older certificate of the instance than the one it renewed to
    /// (a copy of an old disk), or one this controller never issued.
    Superseded,
    /// The instance's identity document was missing, forged, or for
    /// another instance (a copy of its disk elsewhere).
    NoProof,
    /// A site-wide certificate, which only lets an agent enrol.
    EnrolOnly,
    /// A second connection for an instance with a live session, without
    /// the proof that would let it take the session over.
    Conflict,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Expired => "expired",
            RefusalReason::NotYetValid => "not_yet_valid",
            RefusalReason::UnknownCa => "unknown_ca",
            RefusalReason::InvalidCertificate => "invalid_certificate",
            RefusalReason::WrongSite => "wrong_site",
            RefusalReason::UnknownSite => "unknown_site",
            RefusalReason::WrongTrustDomain => "wrong_trust_domain",
            RefusalReason::NotASite => "not_a_site",
            RefusalReason::Revoked => "revoked",
            RefusalReason::Superseded => "superseded",
            RefusalReason::NoProof => "no_proof",
            RefusalReason::EnrolOnly => "enrol_only",
            RefusalReason::Conflict => "conflict",
        }
    }

    pub fn parse(s: &str) -> Option<RefusalReason> {
        [
            RefusalReason::Expired,
            RefusalReason::NotYetValid,
            RefusalReason::UnknownCa,
            RefusalReason::InvalidCertificate,
            RefusalReason::WrongSite,
            RefusalReason::UnknownSite,
            RefusalReason::WrongTrustDomain,
            RefusalReason::NotASite,
            RefusalReason::Revoked,
            RefusalReason::Superseded,
            RefusalReason::NoProof,
            RefusalReason::EnrolOnly,
            RefusalReason::Conflict,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// One refused certificate of a site, aggregated over its retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRefusal {
    /// The site the certificate names ("" when it names none).
    pub site_id: String,
    pub reason: RefusalReason,
    /// SHA-256 of the certificate (hex): which certificate, exactly.
    pub fingerprint: String,
    /// The certificate's serial number (hex, `:`-separated).
    pub serial: String,
    pub not_before_ms: Millis,
    pub not_after_ms: Millis,
    /// The identity the certificate carries (its spiffe:// URI), or why none.
    pub identity: String,
    /// The controller's CA verified its chain apart from the time: the
    /// certificate is this deployment's.
    pub ca_verified: bool,
    /// The refusal as the controller told the agent (the TLS or gRPC error).
    pub detail: String,
    /// The address the last attempt came from.
    pub peer: String,
    pub first_ms: Millis,
    pub last_ms: Millis,
    pub count: u64,
}

/// How far apart two times are, for humans, in one unit: "3 days",
/// "5 hours", "12 minutes", "40 seconds".
fn span(a: Millis, b: Millis) -> String {
    let secs = a.abs_diff(b) / 1000;
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "day"),
        s if s >= 2 * 3_600 => (s / 3_600, "hour"),
        s if s >= 2 * 60 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// A time as RFC 3339 (UTC, seconds).
pub fn rfc3339(ms: Millis) -> String {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

impl AgentRefusal {
    /// What was wrong, in a few words: "certificate expired 3 days ago".
    pub fn describe(&self, now: Millis) -> String {
        match self.reason {
            RefusalReason::Expired => format!("certificate expired {} ago", span(now, self.not_after_ms)),
            RefusalReason::NotYetValid if self.not_before_ms > now => {
                format!("certificate not valid for another {} (from {})", span(self.not_before_ms, now), rfc3339(self.not_before_ms))
            }
            RefusalReason::NotYetValid => format!("certificate was not yet valid (valid from {})", rfc3339(self.not_before_ms)),
            RefusalReason::UnknownCa => "certificate not signed by this deployment's CA".to_owned(),
            RefusalReason::InvalidCertificate => format!("certificate invalid ({})", self.detail),
            RefusalReason::WrongSite => format!("its Hello named another site than its certificate ({})", self.detail),
            RefusalReason::UnknownSite => format!("certificate for site `{}`, which is not configured here", self.site_id),
            RefusalReason::WrongTrustDomain => format!("certificate of another trust domain ({})", self.identity),
            RefusalReason::NotASite => format!("not a site certificate ({})", self.identity),
            RefusalReason::Revoked => format!("certificate revoked ({})", self.detail),
            RefusalReason::Superseded => format!("an older certificate of the instance ({})", self.detail),
            RefusalReason::NoProof => format!("no valid proof of its instance ({})", self.detail),
            RefusalReason::EnrolOnly => "a site-wide certificate, which only enrols".to_owned(),
            RefusalReason::Conflict => format!("its instance already has a live session ({})", self.detail),
        }
    }

    /// The health evidence's agent line: `agent: refused (certificate
    /// expired 3 days ago)`.
    pub fn agent_line(&self, now: Millis) -> String {
        format!("agent: refused ({})", self.describe(now))
    }

    /// What a human does about it.
    pub fn remedy(&self) -> String {
        let site = if self.site_id.is_empty() { "SITE" } else { &self.site_id };
        match self.reason {
            RefusalReason::Expired | RefusalReason::NotYetValid | RefusalReason::UnknownCa | RefusalReason::InvalidCertificate => format!(
                "issue a new one with `drctl pki issue site {site}`, install it as the agent's [tls] cert and key, and restart dr-agent"
            ),
            RefusalReason::WrongSite => "make the agent's site_id match its certificate (or give it its own site's certificate)".to_owned(),
            RefusalReason::UnknownSite => format!("configure site `{site}` ([[site]]) or give the agent its own site's certificate"),
            RefusalReason::WrongTrustDomain | RefusalReason::NotASite => {
                format!("give the agent a site certificate of this deployment (`drctl pki issue site {site}`)")
            }
            RefusalReason::Revoked => format!("if the revocation was a mistake, `drctl site revoke {site} --undo` (whole site)"),
            RefusalReason::Superseded | RefusalReason::NoProof | RefusalReason::Conflict => {
                "find the machine at the peer address: a copy of an instance's disk is trying to pose as it".to_owned()
            }
            RefusalReason::EnrolOnly => {
                "upgrade the agent so that it enrols its instance, or set pki.allow_site_certificates while the fleet moves over".to_owned()
            }
        }
    }

    /// One line for status: what, which certificate, from where, how often.
    pub fn line(&self, now: Millis) -> String {
        let forged = if self.ca_verified || matches!(self.reason, RefusalReason::UnknownCa) { "" } else { ", chain not verified" };
        format!(
            "agent refused: {} (serial {}{forged}, from {}), {} time(s) since {}, last {} ago",
            self.describe(now),
            self.serial,
            if self.peer.is_empty() { "?" } else { &self.peer },
            self.count,
            rfc3339(self.first_ms),
            span(now, self.last_ms)
        )
    }

    /// The event's id: one `agent.refused` per site, reason and certificate.
    pub fn event_id(&self) -> String {
        let fp: String = self.fingerprint.chars().take(32).collect();
        format!("agent-refused-{}-{}-{fp}", self.site_id, self.reason.as_str())
    }
}

/// What a backup's agent certificate will be when it is restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertOutlook {
    /// The backup recorded no certificate (taken before this was recorded,
    /// or without a connected agent).
    Unknown,
    Expired {
        not_after_ms: Millis,
    },
    /// Valid now, but not by the time the restored agent is due.
    ExpiresBeforeLaunch {
        not_after_ms: Millis,
    },
    /// Valid then, ending within `soon` after.
    ExpiresSoon {
        not_after_ms: Millis,
    },
    Valid {
        not_after_ms: Millis,
    },
}

impl CertOutlook {
    /// `launch_by`: the latest the restored agent is expected to connect;
    /// `soon`: how close after that an ending is worth a warning.
    pub fn of(not_after_ms: Millis, now: Millis, launch_by: Millis, soon: Duration) -> CertOutlook {
        match not_after_ms {
            0 => CertOutlook::Unknown,
            t if t <= now => CertOutlook::Expired { not_after_ms },
            t if t <= launch_by => CertOutlook::ExpiresBeforeLaunch { not_after_ms },
            t if t <= launch_by.saturating_add(soon.as_millis() as u64) => CertOutlook::ExpiresSoon { not_after_ms },
            _ => CertOutlook::Valid { not_after_ms },
        }
    }

    /// One line for the plan ("valid until ...", "EXPIRED at ...",
    /// "unknown ...").
    pub fn describe(&self, now: Millis) -> String {
        match self {
            CertOutlook::Unknown => "unknown (the backup recorded no agent certificate)".to_owned(),
            CertOutlook::Expired { not_after_ms } => format!("EXPIRED at {} ({} ago)", rfc3339(*not_after_ms), span(now, *not_after_ms)),
            CertOutlook::ExpiresBeforeLaunch { not_after_ms } => {
                format!("expires at {} (in {}), before the restored agent is due", rfc3339(*not_after_ms), span(*not_after_ms, now))
            }
            CertOutlook::ExpiresSoon { not_after_ms } | CertOutlook::Valid { not_after_ms } => {
                format!("valid until {} (in {})", rfc3339(*not_after_ms), span(*not_after_ms, now))
            }
        }
    }

    /// The plan's warning, if any.
    pub fn warning(&self, site: &str, image: &str, now: Millis) -> Option<String> {
        let fix = format!(
            "issue a new one (`drctl pki issue site {site}`) and install it on the restored machine (the agent's [tls] cert and key), or the failover waits for a human at wait_agent"
        );
        match self {
            CertOutlook::Unknown | CertOutlook::Valid { .. } => None,
            CertOutlook::Expired { .. } => Some(format!(
                "the agent certificate in backup {image} {}: the restored agent will be refused by the controller; {fix}",
                self.describe(now)
            )),
            CertOutlook::ExpiresBeforeLaunch { .. } => Some(format!(
                "the agent certificate in backup {image} {}: the restored agent will be refused by the controller; {fix}",
                self.describe(now)
            )),
            CertOutlook::ExpiresSoon { not_after_ms } => Some(format!(
                "the agent certificate in backup {image} expires at {} (in {}): renew it on the restored machine soon after (`drctl pki issue site {site}`)",
                rfc3339(*not_after_ms),
                span(*not_after_ms, now)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Millis = 86_400_000;

    fn refusal(reason: RefusalReason, not_after_ms: Millis) -> AgentRefusal {
        AgentRefusal {
            site_id: "prod-1".into(),
            reason,
            fingerprint: "ab".repeat(32),
            serial: "01:02".into(),
            not_before_ms: 0,
            not_after_ms,
            identity: "spiffe://dr.test/site/prod-1".into(),
            ca_verified: true,
            detail: String::new(),
            peer: "10.0.0.5:41000".into(),
            first_ms: 0,
            last_ms: 0,
            count: 1,
        }
    }

    #[test]
    fn an_expired_certificate_reads_as_such() {
        let now = 100 * DAY;
        let r = refusal(RefusalReason::Expired, now - 3 * DAY - 5_000);
        assert_eq!(r.agent_line(now), "agent: refused (certificate expired 3 days ago)");
        assert!(r.remedy().contains("drctl pki issue site prod-1"), "{}", r.remedy());
        assert_eq!(r.event_id(), format!("agent-refused-prod-1-expired-{}", "ab".repeat(16)));
        assert_eq!(RefusalReason::parse("not_yet_valid"), Some(RefusalReason::NotYetValid));
        assert_eq!(RefusalReason::parse("nonsense"), None);
    }

    #[test]
    fn the_outlook_of_a_backups_certificate() {
        let now = 100 * DAY;
        let soon = Duration::from_secs(7 * 86_400);
        assert_eq!(CertOutlook::of(0, now, now + 1000, soon), CertOutlook::Unknown);
        assert!(matches!(CertOutlook::of(now - DAY, now, now + 1000, soon), CertOutlook::Expired { .. }));
        assert!(matches!(CertOutlook::of(now + 500, now, now + 1000, soon), CertOutlook::ExpiresBeforeLaunch { .. }));
        assert!(matches!(CertOutlook::of(now + 2 * DAY, now, now + 1000, soon), CertOutlook::ExpiresSoon { .. }));
        assert!(matches!(CertOutlook::of(now + 30 * DAY, now, now + 1000, soon), CertOutlook::Valid { .. }));
        assert!(CertOutlook::Unknown.warning("s", "ami-1", now).is_none());
        assert!(CertOutlook::Unknown.describe(now).starts_with("unknown"));
    }
}
