//! Site health and the recovery ladder, as pure functions: what the
//! signals (agent heartbeats, EC2's view, the controller's app probe, an
//! outside vantage point, the agent's own check of the app) say about a site
//! ([`Evidence`] → [`Condition`]), which recovery a condition calls for once
//! it has lasted long enough ([`decide`]), and when the fault is more likely
//! the controller's own ([`fleet_guard`]). The health monitor
//! (`reconcilers::health`) gathers the signals, applies the guards and acts;
//! nothing here does I/O.
//!
//! The ladder, least destructive first (each rung only when the one before
//! cannot apply or has failed):
//! 1. app down, agent and instance fine, and the agent's own check of the
//!    app on its machine fails too → restart the app through the agent;
//! 2. instance impaired (status checks, scheduled retirement) or stopped
//!    behind our back, or the machine dead by an outside vantage point →
//!    stop and start the same instance (RPO zero);
//! 3. instance gone/terminated, or rung 2 failed → failover from the newest
//!    good backup.
//!
//! Invariant: signals are independent only if they travel different paths.
//! The agent's stream and the controller's probe both cross the controller's
//! own network, so together they are one signal. Anything destructive needs
//! evidence from outside that path: EC2's word (stopped, terminated,
//! unknown id, impaired, scheduled retirement) or the outside vantage point
//! (a Route 53 health check). The agent silent with the probe failing while
//! EC2 says running and healthy is a partition: an alert, never an action.

use std::collections::BTreeMap;
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
    Ok {
        status: u16,
    },
    Failed {
        detail: String,
    },
    /// No URL to probe (the site has no hostname and no `health_url`).
    NotConfigured,
}

/// A vantage point outside the controller's network: a Route 53 health
/// check of the site's public endpoint, run by AWS from several regions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "vantage", rename_all = "snake_case")]
pub enum VantageSignal {
    /// The site has no `route53_health_check`.
    #[default]
    NotConfigured,
    /// Configured, but not needed this pass (every other signal is fine).
    NotAsked,
    /// More than 18 % of the checkers reach the endpoint (Route 53's own
    /// rule for "healthy").
    Healthy { detail: String },
    /// At most 18 % of the checkers reach it.
    Unhealthy { detail: String },
    /// Route 53 could not be asked; never evidence of anything.
    Unknown { error: String },
}

/// The agent's own check of the app, on its machine (the frontend's health
/// check from 127.0.0.1): a path that does not cross the controller's
/// network. Asked only when the controller's probe or the vantage fails.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "local", rename_all = "snake_case")]
pub enum LocalSignal {
    #[default]
    NotAsked,
    Ok {
        detail: String,
    },
    Failed {
        detail: String,
    },
    /// The agent could not say (an older agent, a timeout).
    Unknown {
        error: String,
    },
}

/// The signals of one pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub agent: AgentSignal,
    pub ec2: Ec2Signal,
    pub probe: ProbeSignal,
    #[serde(default)]
    pub vantage: VantageSignal,
    #[serde(default)]
    pub local: LocalSignal,
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
        let mut out = vec![agent, ec2, probe];
        match &self.vantage {
            VantageSignal::NotConfigured | VantageSignal::NotAsked => {}
            VantageSignal::Healthy { detail } => out.push(format!("route 53: healthy ({detail})")),
            VantageSignal::Unhealthy { detail } => out.push(format!("route 53: unhealthy ({detail})")),
            VantageSignal::Unknown { error } => out.push(format!("route 53: unknown ({error})")),
        }
        match &self.local {
            LocalSignal::NotAsked => {}
            LocalSignal::Ok { detail } => out.push(format!("on the machine: app healthy ({detail})")),
            LocalSignal::Failed { detail } => out.push(format!("on the machine: app failing ({detail})")),
            LocalSignal::Unknown { error } => out.push(format!("on the machine: unknown ({error})")),
        }
        out
    }

    /// The controller's probe or the outside vantage says the app is not
    /// reachable.
    pub fn app_unreachable(&self) -> bool {
        matches!(self.probe, ProbeSignal::Failed { .. }) || matches!(self.vantage, VantageSignal::Unhealthy { .. })
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
    /// Agent live, instance fine, the probe (or the vantage) fails and the
    /// agent's own check of the app fails too (or cannot say): rung 1.
    AppDown,
    /// Agent live, instance fine, the probe (or the vantage) fails, but the
    /// app answers on its machine: the path to it is broken (the
    /// controller's network, DNS, a load balancer). An alert; a restart
    /// would not help.
    AppUnreachable,
    /// EC2 says the instance is impaired or retiring: rung 2.
    HostImpaired,
    /// EC2 says the instance is stopped (not by us): rung 2 (start it).
    HostStopped,
    /// Agent silent and EC2 says the instance is gone: rung 3.
    InstanceGone,
    /// Agent silent and the outside vantage says the endpoint is down while
    /// EC2 says running: rung 2 (then 3).
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
            Condition::AppUnreachable => "app_unreachable",
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

    /// Down by evidence from outside the controller's path and the agent
    /// silent.
    pub fn confirmed_down(self) -> bool {
        matches!(self, Condition::InstanceGone | Condition::MachineDead)
    }

    /// Conditions for which an automatic failover may be (or stay) asked:
    /// an approval of a failover asked on other evidence is withdrawn.
    pub fn may_need_failover(self) -> bool {
        matches!(self, Condition::InstanceGone | Condition::MachineDead | Condition::HostImpaired | Condition::HostStopped)
    }

    pub fn of(e: &Evidence) -> Condition {
        let silent = Condition::agent_silent(e);
        let vantage_down = matches!(e.vantage, VantageSignal::Unhealthy { .. });
        let answers_locally = matches!(e.local, LocalSignal::Ok { .. });
        match (&e.ec2, silent) {
            (Ec2Signal::Gone { .. }, true) => Condition::InstanceGone,
            (Ec2Signal::Gone { .. }, false) => Condition::Contradictory,
            (Ec2Signal::Stopped { .. }, _) => Condition::HostStopped,
            (Ec2Signal::Impaired { .. } | Ec2Signal::Retiring { .. }, _) => Condition::HostImpaired,
            // EC2 says running and healthy: only the outside vantage can
            // tell a dead machine from a partition of the controller.
            (Ec2Signal::Ok, true) if vantage_down => Condition::MachineDead,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, true) => Condition::Partitioned,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, false) if e.app_unreachable() && answers_locally => Condition::AppUnreachable,
            (Ec2Signal::Ok | Ec2Signal::Unknown { .. }, false) if e.app_unreachable() => Condition::AppDown,
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
    /// How long evidence of a dead machine or a gone instance must hold
    /// before a failover (or, for a dead machine, a stop and start).
    pub confirm_for: Duration,
    /// How long rung-1/2 evidence must hold before a repair.
    pub repair_after: Duration,
    /// At most one automatic recovery of each rung per site per this long.
    pub cooldown: Duration,
    /// An approval not given within this long is reported (once).
    pub approval_timeout: Duration,
    /// A host restart (rung 2) not done within this long counts as failed.
    pub host_restart_deadline: Duration,
    /// A Route 53 health check of the site's public endpoint ("" = none).
    pub route53_health_check: String,
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
            // EC2's word and Route 53's checkers are evidence from outside
            // our path: half a minute on top of the heartbeat window (18 s)
            // and a pass (15 s) decides a termination within a minute.
            confirm_for: Duration::from_secs(30),
            repair_after: m(1),
            cooldown: m(60),
            approval_timeout: m(30),
            host_restart_deadline: m(15),
            route53_health_check: String::new(),
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
    /// The last automatic start of each rung (cooldown), by rung name.
    #[serde(default)]
    pub last_auto_ms: BTreeMap<String, Millis>,
    /// When this episode's first evidence was seen (0: healthy); an
    /// automatic failover's RTO runs from here.
    #[serde(default)]
    pub episode_since_ms: Millis,
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
            last_auto_ms: BTreeMap::new(),
            episode_since_ms: 0,
            alerted: vec![],
            checked_at_ms: 0,
        }
    }

    pub fn tried(&self, rung: Rung) -> Option<&Attempt> {
        self.attempts.iter().rev().find(|a| a.rung == Some(rung))
    }

    /// When this rung last started automatically (0: never).
    pub fn last_auto(&self, rung: Rung) -> Millis {
        let t = self.last_auto_ms.get(rung.as_str()).copied().unwrap_or(0);
        if rung == Rung::Failover { t.max(self.last_auto_failover_ms) } else { t }
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
        Condition::AppUnreachable => Decision::Alert(
            "the app answers its health check on its machine, but the controller's probe (or the outside vantage) cannot reach it: the path to the site is broken (the controller's network, DNS, a proxy, a load balancer); nothing is restarted".into(),
        ),
        Condition::AppDown if !tried(Rung::AppRestart) => {
            if lasted < policy.repair_after {
                return wait(policy.repair_after, "the app probe fails: app restart");
            }
            let local = match h.evidence.as_ref().map(|e| &e.local) {
                Some(LocalSignal::Failed { .. }) => "and the agent's own check on the machine fails too",
                _ => "and the agent could not check it on the machine",
            };
            Decision::Start(Rung::AppRestart, format!("the app probe fails while the agent and the instance are fine, {local}"))
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
        // EC2 says running: the same instance stopped and started first
        // (RPO zero), a failover only if that does not bring it back.
        Condition::MachineDead if !tried(Rung::HostRestart) => {
            if lasted < policy.confirm_for {
                return wait(policy.confirm_for, "the agent is silent and the Route 53 health check fails: stop and start");
            }
            Decision::Start(Rung::HostRestart, "the agent is silent and the Route 53 health check fails while EC2 says running".into())
        }
        Condition::MachineDead if failed(Rung::HostRestart) => failover("the host restart failed, the agent is silent and the Route 53 health check fails"),
        Condition::MachineDead => Decision::Wait("the host restart is being checked".into()),
    }
}

/// Why the guard holds: a pattern that points at the controller's own side
/// (its network, its probe, its view of EC2) rather than at the sites.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum GuardReason {
    /// Too many agents silent at once.
    AgentsSilent { silent: usize, sites: usize },
    /// The controller's probe fails for too many sites at once.
    ProbesFailing { failing: usize, probed: usize },
    /// EC2's API fails in a region (for two passes in a row): its sites
    /// cannot be judged.
    Ec2Unknown { region: String, sites: usize },
}

impl GuardReason {
    /// Stable identity of the reason (counts left out), for "once" alerts.
    pub fn key(&self) -> String {
        match self {
            GuardReason::AgentsSilent { .. } => "agents_silent".into(),
            GuardReason::ProbesFailing { .. } => "probes_failing".into(),
            GuardReason::Ec2Unknown { region, .. } => format!("ec2_unknown:{region}"),
        }
    }

    /// Whether it holds the recovery of a site in `region`.
    pub fn holds(&self, region: &str) -> bool {
        match self {
            GuardReason::Ec2Unknown { region: r, .. } => r == region,
            _ => true,
        }
    }

    pub fn describe(&self, max_down_fraction: f64) -> String {
        let pct = max_down_fraction * 100.0;
        match self {
            GuardReason::AgentsSilent { silent, sites } => {
                format!("{silent} of {sites} sites have a silent agent at once (more than {pct:.0} %)")
            }
            GuardReason::ProbesFailing { failing, probed } => {
                format!("the controller's app probe fails for {failing} of {probed} probed sites at once (more than {pct:.0} %)")
            }
            GuardReason::Ec2Unknown { region, sites } => format!("EC2's API fails in {region} ({sites} sites cannot be judged)"),
        }
    }
}

/// One pass's counts, for [`fleet_guard`].
#[derive(Clone, Debug, Default)]
pub struct FleetCounts {
    pub sites: usize,
    pub silent: usize,
    /// Sites with a configured probe, and those whose probe failed.
    pub probed: usize,
    pub probe_failed: usize,
    /// Regions whose EC2 view has been unknown for two passes in a row,
    /// with how many sites they hold.
    pub unknown_regions: BTreeMap<String, usize>,
}

/// The fleet guard: what many sites show at once is taken to be the
/// controller's own fault. More than `max_down_fraction` of the sites (and
/// at least two) with a silent agent, or with a failing probe, holds every
/// rung everywhere; a region whose EC2 view is unknown holds that region.
pub fn fleet_guard(c: &FleetCounts, max_down_fraction: f64) -> Vec<GuardReason> {
    let mut out = vec![];
    if share_trips(c.silent, c.sites, max_down_fraction) {
        out.push(GuardReason::AgentsSilent { silent: c.silent, sites: c.sites });
    }
    if share_trips(c.probe_failed, c.probed, max_down_fraction) {
        out.push(GuardReason::ProbesFailing { failing: c.probe_failed, probed: c.probed });
    }
    for (region, sites) in &c.unknown_regions {
        out.push(GuardReason::Ec2Unknown { region: region.clone(), sites: *sites });
    }
    out
}

/// More than `fraction` of `of`, and at least two: a one-site fleet can
/// still be recovered.
pub fn share_trips(n: usize, of: usize, fraction: f64) -> bool {
    n >= 2 && (n as f64) > fraction * of as f64
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
        Evidence { agent, ec2, probe, vantage: VantageSignal::NotConfigured, local: LocalSignal::NotAsked }
    }
    fn with(mut e: Evidence, vantage: VantageSignal, local: LocalSignal) -> Evidence {
        e.vantage = vantage;
        e.local = local;
        e
    }
    fn down() -> VantageSignal {
        VantageSignal::Unhealthy { detail: "0 of 8 checkers reach it".into() }
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
            // Agent silent and probe failing travel one path: a partition.
            (ev(SILENT, Ec2Signal::Ok, failed()), Condition::Partitioned),
            (ev(SILENT, Ec2Signal::Unknown { error: "x".into() }, failed()), Condition::Partitioned),
            // The outside vantage agrees: the machine is dead.
            (with(ev(SILENT, Ec2Signal::Ok, failed()), down(), LocalSignal::NotAsked), Condition::MachineDead),
            (with(ev(SILENT, Ec2Signal::Ok, ProbeSignal::NotConfigured), down(), LocalSignal::NotAsked), Condition::MachineDead),
            (with(ev(SILENT, Ec2Signal::Unknown { error: "x".into() }, failed()), down(), LocalSignal::NotAsked), Condition::Partitioned),
            // The app answers on its machine: the path is broken, not the app.
            (
                with(
                    ev(AgentSignal::Live, Ec2Signal::Ok, failed()),
                    VantageSignal::NotConfigured,
                    LocalSignal::Ok { detail: "HTTP 200".into() },
                ),
                Condition::AppUnreachable,
            ),
            (
                with(
                    ev(AgentSignal::Live, Ec2Signal::Ok, ProbeSignal::Ok { status: 200 }),
                    down(),
                    LocalSignal::Ok { detail: "HTTP 200".into() },
                ),
                Condition::AppUnreachable,
            ),
            (
                with(
                    ev(AgentSignal::Live, Ec2Signal::Ok, failed()),
                    VantageSignal::NotConfigured,
                    LocalSignal::Failed { detail: "HTTP 503".into() },
                ),
                Condition::AppDown,
            ),
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

        let gone =
            health(Condition::InstanceGone, 0, ev(SILENT, Ec2Signal::Gone { state: "terminated".into() }, ProbeSignal::NotConfigured));
        assert!(matches!(decide(&gone, &p, 29_999), Decision::Wait(_)), "confirm_for");
        assert!(
            matches!(decide(&gone, &p, 30_000), Decision::Start(Rung::Failover, _)),
            "a termination decided within a minute by default"
        );

        let imp = health(Condition::HostImpaired, 0, ev(SILENT, Ec2Signal::Impaired { detail: "system".into() }, failed()));
        assert!(matches!(decide(&imp, &p, min), Decision::Start(Rung::HostRestart, _)));
        let mut imp_failed = imp.clone();
        imp_failed.attempts.push(Attempt { rung: Some(Rung::HostRestart), operation_id: "op".into(), at_ms: min, failed: true });
        assert!(matches!(decide(&imp_failed, &p, 2 * min), Decision::Start(Rung::Failover, _)), "rung 2 failed: rung 3");
        imp_failed.evidence = Some(ev(AgentSignal::Live, Ec2Signal::Impaired { detail: "system".into() }, failed()));
        assert!(matches!(decide(&imp_failed, &p, 2 * min), Decision::Human(_)), "a live agent: no failover");

        // A dead machine by the outside vantage: stop and start first.
        let dead = health(Condition::MachineDead, 0, with(ev(SILENT, Ec2Signal::Ok, failed()), down(), LocalSignal::NotAsked));
        assert!(matches!(decide(&dead, &p, p.confirm_for.as_millis() as u64 - 1), Decision::Wait(_)), "confirm_for");
        assert!(matches!(decide(&dead, &p, p.confirm_for.as_millis() as u64), Decision::Start(Rung::HostRestart, _)));
        let mut dead_failed = dead.clone();
        dead_failed.attempts.push(Attempt { rung: Some(Rung::HostRestart), operation_id: "op".into(), at_ms: min, failed: true });
        assert!(matches!(decide(&dead_failed, &p, 2 * min), Decision::Start(Rung::Failover, _)), "rung 2 failed: rung 3");
        let path = health(Condition::AppUnreachable, 0, ev(AgentSignal::Live, Ec2Signal::Ok, failed()));
        assert!(matches!(decide(&path, &p, 60 * min), Decision::Alert(_)), "a broken path restarts nothing");

        let odd = health(
            Condition::Contradictory,
            0,
            ev(AgentSignal::Live, Ec2Signal::Gone { state: "terminated".into() }, ProbeSignal::NotConfigured),
        );
        assert!(matches!(decide(&odd, &p, 20_000), Decision::Wait(_)), "the agent gets confirm_for to fall silent");
        assert!(matches!(decide(&odd, &p, 3 * min), Decision::Alert(_)));
        let part = health(Condition::Partitioned, 0, ev(SILENT, Ec2Signal::Ok, ProbeSignal::Ok { status: 200 }));
        assert!(matches!(decide(&part, &p, 60 * min), Decision::Alert(_)), "a partition never fails over");
    }

    #[test]
    fn the_fleet_guard_trips_above_the_fraction_and_never_for_one_site() {
        assert!(!share_trips(1, 1, 0.2), "a one-site fleet can fail over");
        assert!(!share_trips(2, 10, 0.2));
        assert!(share_trips(3, 10, 0.2));
        assert!(share_trips(10, 10, 0.2));
        assert!(!share_trips(200, 1000, 0.2));
        assert!(share_trips(201, 1000, 0.2));
        // Every controller-side signal counts, not only silent agents.
        let probes = FleetCounts { sites: 5, probed: 5, probe_failed: 5, ..Default::default() };
        assert_eq!(fleet_guard(&probes, 0.2), vec![GuardReason::ProbesFailing { failing: 5, probed: 5 }]);
        let region = FleetCounts { sites: 5, unknown_regions: [("eu-west-1".to_owned(), 2)].into(), ..Default::default() };
        let r = fleet_guard(&region, 0.2);
        assert!(r.len() == 1 && r[0].holds("eu-west-1") && !r[0].holds("us-east-1"), "{r:?}");
        assert!(fleet_guard(&FleetCounts { sites: 10, silent: 1, probed: 10, probe_failed: 2, ..Default::default() }, 0.2).is_empty());
    }
}
