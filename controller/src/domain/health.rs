//! Site health and the recovery ladder, as pure functions: what the three
//! independent signals (agent heartbeats, EC2's view, the app probe) say
//! about a site ([`Evidence`] → [`Condition`]), and which recovery a
//! condition calls for once it has lasted long enough ([`decide`]). The
//! health monitor (`reconcilers::health`) gathers the signals, applies the
//! fleet-wide guards and acts; nothing here does I/O.
//!
//! The ladder, least destructive first (each rung only when the one before
//! cannot apply or has failed):
//! 1. app down, agent and instance fine → restart the app through the agent;
//! 2. instance impaired (status checks, scheduled retirement) or stopped
//!    behind our back → stop and start the same instance (RPO zero);
//! 3. instance gone/terminated, or the machine dead (agent silent and app
//!    down), or rung 2 failed → failover from the newest good backup.
//!
//! Invariant: rung 3 needs two independent signals agreeing for
//! `confirm_for`: the agent silent AND (EC2 says stopped/terminated/
//! impaired OR the probe fails). The agent silent alone is a partition:
//! reported, never acted on.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::model::Millis;

/// What a site looks like, as `drctl status` and the metrics show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Every signal agrees the site works (or no signal says otherwise).
    #[default]
    Healthy,
    /// A signal says something is wrong; not confirmed (or a partition).
    Suspect,
    /// Confirmed down: two signals agree, or a repair failed.
    Down,
    /// A repair or failover of the site is running.
    Recovering,
}

impl HealthState {
    pub const ALL: [HealthState; 4] = [HealthState::Healthy, HealthState::Suspect, HealthState::Down, HealthState::Recovering];
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Suspect => "suspect",
            HealthState::Down => "down",
            HealthState::Recovering => "recovering",
        }
    }
}

/// Policy `auto_failover`: what the controller may do on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoMode {
    /// Detect and notify only (the default): no automatic repair or failover.
    #[default]
    Off,
    /// Repairs (rungs 1 and 2) run on their own; a failover waits for
    /// `drctl approve OP`.
    Approve,
    /// Everything runs on its own, within the guards.
    Auto,
}

impl AutoMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AutoMode::Off => "off",
            AutoMode::Approve => "approve",
            AutoMode::Auto => "auto",
        }
    }
}

/// The agent's heartbeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "agent", rename_all = "snake_case")]
pub enum AgentSignal {
    /// Connected and heard from within the heartbeat window.
    Live,
    /// Not connected (missed beyond the window); last heard this long ago
    /// (`None`: never since the controller started and never recorded).
    Silent { last_seen_ms: Option<Millis> },
}

/// EC2's view of the primary instance (DescribeInstanceStatus).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ec2", rename_all = "snake_case")]
pub enum Ec2Signal {
    /// Running, both status checks ok (or still initializing), no event.
    Ok,
    /// Running, but a status check failed (`system`, `instance`, `ebs`).
    Impaired { detail: String },
    /// Running, with a scheduled event that takes the host away.
    Retiring { event: String, not_before: String },
    /// Stopped or stopping, and not by us.
    Stopped { state: String },
    /// Terminated, shutting down, or unknown to EC2.
    Gone { state: String },
    /// EC2 could not be asked (the region's API fails, throttling).
    Unknown { error: String },
}

/// The controller's own probe of the app (`health_url`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "probe", rename_all = "snake_case")]
pub enum ProbeSignal {
    Ok { status: u16 },
    Failed { detail: String },
    /// No URL to probe (the site has no hostname and no `health_url`).
    NotConfigured,
}

/// The three signals of one pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub agent: AgentSignal,
    pub ec2: Ec2Signal,
    pub probe: ProbeSignal,
}

impl Evidence {
    /// One line per signal, for humans.
    pub fn lines(&self, now: Millis) -> Vec<String> {
        let agent = match &self.agent {
            AgentSignal::Live => "agent: connected".to_owned(),
            AgentSignal::Silent { last_seen_ms: Some(t) } => format!("agent: silent, last heard {} ago", ago(now, *t)),
            AgentSignal::Silent { last_seen_ms: None } => "agent: silent, never heard".to_owned(),
        };
        let ec2 = match &self.ec2 {
            Ec2Signal::Ok => "ec2: running, status checks ok".to_owned(),
            Ec2Signal::Impaired { detail } => format!("ec2: running, impaired ({detail})"),
            Ec2Signal::Retiring { event, not_before } => format!("ec2: running, scheduled {event} from {not_before}"),
            Ec2Signal::Stopped { state } | Ec2Signal::Gone { state } => format!("ec2: {state}"),
            Ec2Signal::Unknown { error } => format!("ec2: unknown ({error})"),
        };
        let probe = match &self.probe {
            ProbeSignal::Ok { status } => format!("probe: HTTP {status}"),
            ProbeSignal::Failed { detail } => format!("probe: failed ({detail})"),
            ProbeSignal::NotConfigured => "probe: not configured".to_owned(),
        };
        vec![agent, ec2, probe]
    }
}

fn ago(now: Millis, then: Millis) -> String {
    humantime::format_duration(Duration::from_secs(now.saturating_sub(then) / 1000)).to_string()
}

/// What the signals together say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Healthy,
    /// Agent live, instance fine, the probe fails: rung 1.
    AppDown,
    /// EC2 says the instance is impaired or retiring: rung 2.
    HostImpaired,
    /// EC2 says the instance is stopped (not by us): rung 2 (start it).
    HostStopped,
    /// Agent silent and EC2 says the instance is gone: rung 3.
    InstanceGone,
    /// Agent silent and the probe fails while EC2 says running: rung 3.
    MachineDead,
    /// Agent silent, nothing else agrees: a partition; never acted on.
    Partitioned,
    /// Signals that contradict each other (EC2 says gone, the agent talks).
    Contradictory,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Healthy => "healthy",
            Condition::AppDown => "app_down",
            Condition::HostImpaired => "host_impaired",
            Condition::HostStopped => "host_stopped",
            Condition::InstanceGone => "instance_gone",
            Condition::MachineDead => "machine_dead",
            Condition::Partitioned => "partitioned",
            Condition::Contradictory => "contradictory",
        }
    }

    /// The agent is silent (what the fleet guard counts).
    pub fn agent_silent(e: &Evidence) -> bool {
        matches!(e.agent, AgentSignal::Silent { .. })
    }

    /// The rung-3 conditions: two independent signals agree.
    pub fn confirmed_down(self) -> bool {
        matches!(self, Condition::InstanceGone | Condition::MachineDead)
    }

    pub fn of(e: &Evidence) -> Condition {
        let silent = Condition::agent_silent(e);
        let probe_failed = matches!(e.probe, ProbeSignal::Failed { .. });
        match (&e.ec2, silent) {
            (Ec2Signal::Gone { .. }, true) => Condition::InstanceGone,
            (Ec2Signal::Gone { .. }, false) => Condition::Contradictory,
            (Ec2Signal::Stopped { .. }, _) => Condition::HostStopped,
            (Ec2Signal::Impaired { .. } | Ec2Signal::Retiring { .. }, _) => Condition::HostImpaired,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, true) if probe_failed => Condition::MachineDead,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, true) => Condition::Partitioned,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, false) if probe_failed => Condition::AppDown,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, false) => Condition::Healthy,
        }
    }
}

/// A rung of the ladder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rung {
    AppRestart,
    HostRestart,
    Failover,
}

impl Rung {
    pub fn as_str(self) -> &'static str {
        match self {
            Rung::AppRestart => "app_restart",
            Rung::HostRestart => "host_restart",
            Rung::Failover => "failover",
        }
    }
}

/// The health policy keys of a site (`[policy]` / `[site.policy]`).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthPolicy {
    pub mode: AutoMode,
    /// `{hostname}` is replaced by the site's hostname; "" = no probe.
    pub url: String,
    pub expect_status: u16,
    pub timeout: Duration,
    /// PEM file of the CA the probe trusts (default: the system's roots).
    pub ca: Option<std::path::PathBuf>,
    /// How long rung-3 evidence must hold before a failover.
    pub confirm_for: Duration,
    /// How long rung-1/2 evidence must hold before a repair.
    pub repair_after: Duration,
    /// At most one automatic failover of the site per this long.
    pub cooldown: Duration,
    /// An approval not given within this long is reported (once).
    pub approval_timeout: Duration,
    /// A host restart (rung 2) not done within this long counts as failed.
    pub host_restart_deadline: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        HealthPolicy {
            mode: AutoMode::Off,
            url: "https://{hostname}/health-check".into(),
            expect_status: 200,
            timeout: Duration::from_secs(5),
            ca: None,
            confirm_for: m(2),
            repair_after: m(1),
            cooldown: m(60),
            approval_timeout: m(30),
            host_restart_deadline: m(15),
        }
    }
}

/// Automatic recovery of a site paused by an operator (maintenance):
/// signals are still gathered and shown, nothing is started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub site_id: String,
    /// `operator/<name>`.
    pub by: String,
    pub reason: String,
    pub at_ms: Millis,
    /// It lifts by itself then.
    pub until_ms: Millis,
}

/// The longest pause an operator may ask for.
pub const MAX_PAUSE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What was tried in the current episode (since the site was last healthy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub rung: Option<Rung>,
    pub operation_id: String,
    pub at_ms: Millis,
    /// The operation ended without bringing the site back.
    pub failed: bool,
}

/// The stored health of a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteHealth {
    pub site_id: String,
    pub state: HealthState,
    pub since_ms: Millis,
    pub condition: Condition,
    pub condition_since_ms: Millis,
    pub evidence: Option<Evidence>,
    /// The last decision, in one sentence (taken or not).
    pub decision: String,
    /// Tries of this episode (cleared when healthy again).
    pub attempts: Vec<Attempt>,
    /// The last automatic failover's start (cooldown).
    pub last_auto_failover_ms: Millis,
    /// Alerts already raised in this episode (so each is raised once).
    pub alerted: Vec<String>,
    pub checked_at_ms: Millis,
}

impl SiteHealth {
    pub fn new(site_id: &str, now: Millis) -> SiteHealth {
        SiteHealth {
            site_id: site_id.to_owned(),
            state: HealthState::Healthy,
            since_ms: now,
            condition: Condition::Healthy,
            condition_since_ms: now,
            evidence: None,
            decision: String::new(),
            attempts: vec![],
            last_auto_failover_ms: 0,
            alerted: vec![],
            checked_at_ms: 0,
        }
    }

    pub fn tried(&self, rung: Rung) -> Option<&Attempt> {
        self.attempts.iter().rev().find(|a| a.rung == Some(rung))
    }
}

/// What the monitor should do for a site now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing (healthy, or waiting for the window to pass).
    Wait(String),
    /// Start this rung.
    Start(Rung, String),
    /// Nothing automatic can help: a human is needed (alert once).
    Human(String),
    /// A partition (or contradictory signals): alert once, act never.
    Alert(String),
}

/// The rung a condition calls for once its window has passed, given what
/// was tried in this episode; the reason in words.
pub fn decide(h: &SiteHealth, policy: &HealthPolicy, now: Millis) -> Decision {
    let lasted = Duration::from_millis(now.saturating_sub(h.condition_since_ms));
    let failed = |r: Rung| h.tried(r).is_some_and(|a| a.failed);
    let tried = |r: Rung| h.tried(r).is_some();
    let wait = |window: Duration, what: &str| {
        Decision::Wait(format!(
            "{what} once this has lasted {} ({} so far)",
            humantime::format_duration(window),
            humantime::format_duration(Duration::from_secs(lasted.as_secs()))
        ))
    };
    let failover = |why: &str| {
        if tried(Rung::Failover) {
            return Decision::Human(format!("{why}, and the automatic failover did not bring the site back"));
        }
        if lasted < policy.confirm_for {
            return wait(policy.confirm_for, &format!("{why}: failover"));
        }
        Decision::Start(Rung::Failover, format!("{why}, confirmed for {}", humantime::format_duration(policy.confirm_for)))
    };
    match h.condition {
        Condition::Healthy => Decision::Wait("healthy".into()),
        Condition::Partitioned => Decision::Alert(
            "the agent is silent but EC2 and the app probe say the site works: a partition between the site and the controller; nothing destructive is done".into(),
        ),
        // EC2 sees a termination before the agent's heartbeats are missed:
        // give the agent the confirmation window to fall silent.
        Condition::Contradictory if lasted < policy.confirm_for => wait(policy.confirm_for, "EC2 says the instance is gone while its agent still talks: waiting for the agent to fall silent; alert"),
        Condition::Contradictory => {
            Decision::Alert("EC2 says the instance is gone but its agent still talks: the signals contradict each other; nothing is done".into())
        }
        Condition::AppDown if !tried(Rung::AppRestart) => {
            if lasted < policy.repair_after {
                return wait(policy.repair_after, "the app probe fails: app restart");
            }
            Decision::Start(Rung::AppRestart, "the app probe fails while the agent and the instance are fine".into())
        }
        Condition::AppDown if failed(Rung::AppRestart) => {
            Decision::Human("the app restart did not bring the app back, and the agent and the instance are fine (no failover: it would not help)".into())
        }
        Condition::AppDown => Decision::Wait("the app restart is being checked".into()),
        Condition::HostImpaired | Condition::HostStopped if !tried(Rung::HostRestart) => {
            if lasted < policy.repair_after {
                return wait(policy.repair_after, "EC2 reports the instance unwell: stop and start");
            }
            Decision::Start(Rung::HostRestart, format!("EC2 reports the instance {}", if h.condition == Condition::HostStopped { "stopped" } else { "impaired" }))
        }
        Condition::HostImpaired | Condition::HostStopped if failed(Rung::HostRestart) => {
            match &h.evidence {
                // Rung 3 still needs the agent silent (two signals).
                Some(e) if Condition::agent_silent(e) => failover("the host restart failed, the agent is silent and EC2 reports the instance unwell"),
                _ => Decision::Human("the host restart failed, but the agent still talks: no failover".into()),
            }
        }
        Condition::HostImpaired | Condition::HostStopped => Decision::Wait("the host restart is being checked".into()),
        Condition::InstanceGone => failover("the agent is silent and EC2 says the instance is gone"),
        Condition::MachineDead => failover("the agent is silent and the app probe fails"),
    }
}

/// The fleet guard: more than `max_down_fraction` of the sites with a
/// silent agent at once (and at least two) points at the controller's own
/// side; no failover starts anywhere while it holds.
pub fn fleet_guard_trips(silent: usize, sites: usize, max_down_fraction: f64) -> bool {
    silent >= 2 && (silent as f64) > max_down_fraction * sites as f64
}

/// The state a site shows, given its condition and whether one of its
/// repairs or failovers is running.
pub fn state_of(condition: Condition, recovering: bool, decision: &Decision) -> HealthState {
    if recovering {
        return HealthState::Recovering;
    }
    match (condition, decision) {
        (Condition::Healthy, _) => HealthState::Healthy,
        (_, Decision::Human(_)) => HealthState::Down,
        (c, _) if c.confirmed_down() => HealthState::Down,
        _ => HealthState::Suspect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(agent: AgentSignal, ec2: Ec2Signal, probe: ProbeSignal) -> Evidence {
        Evidence { agent, ec2, probe }
    }
    const SILENT: AgentSignal = AgentSignal::Silent { last_seen_ms: Some(0) };
    fn failed() -> ProbeSignal {
        ProbeSignal::Failed { detail: "HTTP 503".into() }
    }

    #[test]
    fn signals_make_conditions_and_one_signal_alone_never_confirms_a_failure() {
        let ok = ProbeSignal::Ok { status: 200 };
        let gone = Ec2Signal::Gone { state: "terminated".into() };
        let cases = [
            (ev(AgentSignal::Live, Ec2Signal::Ok, ok.clone()), Condition::Healthy),
            (ev(AgentSignal::Live, Ec2Signal::Ok, failed()), Condition::AppDown),
            (ev(AgentSignal::Live, Ec2Signal::Unknown { error: "x".into() }, failed()), Condition::AppDown),
            (ev(AgentSignal::Live, Ec2Signal::Impaired { detail: "system".into() }, ok.clone()), Condition::HostImpaired),
            (ev(SILENT, Ec2Signal::Stopped { state: "stopped".into() }, failed()), Condition::HostStopped),
            (ev(SILENT, gone.clone(), ok.clone()), Condition::InstanceGone),
            (ev(AgentSignal::Live, gone, ok.clone()), Condition::Contradictory),
            (ev(SILENT, Ec2Signal::Ok, failed()), Condition::MachineDead),
            (ev(SILENT, Ec2Signal::Ok, ok.clone()), Condition::Partitioned),
            (ev(SILENT, Ec2Signal::Ok, ProbeSignal::NotConfigured), Condition::Partitioned),
            (ev(SILENT, Ec2Signal::Unknown { error: "x".into() }, ok), Condition::Partitioned),
        ];
        for (e, want) in cases {
            assert_eq!(Condition::of(&e), want, "{e:?}");
        }
    }

    fn health(condition: Condition, since: Millis, evidence: Evidence) -> SiteHealth {
        SiteHealth { condition, condition_since_ms: since, evidence: Some(evidence), ..SiteHealth::new("s", 0) }
    }

    #[test]
    fn the_ladder_waits_for_its_windows_and_climbs_only_after_a_failure() {
        let p = HealthPolicy::default();
        let min = 60_000;
        let app = health(Condition::AppDown, 0, ev(AgentSignal::Live, Ec2Signal::Ok, failed()));
        assert!(matches!(decide(&app, &p, 30_000), Decision::Wait(_)), "within repair_after");
        assert!(matches!(decide(&app, &p, min), Decision::Start(Rung::AppRestart, _)));
        let mut tried = app.clone();
        tried.attempts.push(Attempt { rung: Some(Rung::AppRestart), operation_id: "op".into(), at_ms: min, failed: false });
        assert!(matches!(decide(&tried, &p, 2 * min), Decision::Wait(_)), "being checked");
        tried.attempts[0].failed = true;
        assert!(matches!(decide(&tried, &p, 2 * min), Decision::Human(_)), "never a failover for a live agent");

        let gone = health(Condition::InstanceGone, 0, ev(SILENT, Ec2Signal::Gone { state: "terminated".into() }, ProbeSignal::NotConfigured));
        assert!(matches!(decide(&gone, &p, 2 * min - 1), Decision::Wait(_)), "confirm_for");
        assert!(matches!(decide(&gone, &p, 2 * min), Decision::Start(Rung::Failover, _)));

        let imp = health(Condition::HostImpaired, 0, ev(SILENT, Ec2Signal::Impaired { detail: "system".into() }, failed()));
        assert!(matches!(decide(&imp, &p, min), Decision::Start(Rung::HostRestart, _)));
        let mut imp_failed = imp.clone();
        imp_failed.attempts.push(Attempt { rung: Some(Rung::HostRestart), operation_id: "op".into(), at_ms: min, failed: true });
        assert!(matches!(decide(&imp_failed, &p, 2 * min), Decision::Start(Rung::Failover, _)), "rung 2 failed: rung 3");
        imp_failed.evidence = Some(ev(AgentSignal::Live, Ec2Signal::Impaired { detail: "system".into() }, failed()));
        assert!(matches!(decide(&imp_failed, &p, 2 * min), Decision::Human(_)), "a live agent: no failover");

        let odd = health(Condition::Contradictory, 0, ev(AgentSignal::Live, Ec2Signal::Gone { state: "terminated".into() }, ProbeSignal::NotConfigured));
        assert!(matches!(decide(&odd, &p, min), Decision::Wait(_)), "the agent gets confirm_for to fall silent");
        assert!(matches!(decide(&odd, &p, 3 * min), Decision::Alert(_)));
        let part = health(Condition::Partitioned, 0, ev(SILENT, Ec2Signal::Ok, ProbeSignal::Ok { status: 200 }));
        assert!(matches!(decide(&part, &p, 60 * min), Decision::Alert(_)), "a partition never fails over");
    }

    #[test]
    fn the_fleet_guard_trips_above_the_fraction_and_never_for_one_site() {
        assert!(!fleet_guard_trips(1, 1, 0.2), "a one-site fleet can fail over");
        assert!(!fleet_guard_trips(2, 10, 0.2));
        assert!(fleet_guard_trips(3, 10, 0.2));
        assert!(fleet_guard_trips(10, 10, 0.2));
        assert!(!fleet_guard_trips(200, 1000, 0.2));
        assert!(fleet_guard_trips(201, 1000, 0.2));
    }
}
