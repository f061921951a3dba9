//! The health monitor: every `[health] interval` it gathers each site's
//! three signals, classifies them (`domain::health`), stores the site's
//! health with its evidence, and climbs the recovery ladder within the
//! guards. Every decision, taken or not, is an event (`drctl events`).
//!
//! Per pass:
//! - agents: the registry (in memory);
//! - EC2: one DescribeInstanceStatus per 100 primaries of an account and
//!   region (1,000 sites in one region: 10 calls), through the describe
//!   budget; a failing region makes its sites' EC2 signal `unknown`;
//! - the app probe: one GET per site, `probe_concurrency` at a time.
//!
//! Only for the sites that look unwell, the paths outside the controller's
//! network: the site's Route 53 health check (GetHealthCheckStatus) when
//! the agent is silent or the probe fails while EC2 says running, and the
//! agent's own check of the app on its machine when the probe (or Route 53)
//! fails while the agent talks.
//!
//! Guards, in this order, before any rung starts (app restart, host
//! restart or failover alike):
//! - the site's mode (`auto_failover`);
//! - the fleet guard (`[health] max_down_fraction`): too many silent agents
//!   or failing probes at once means the controller is cut off or its probe
//!   is broken; a region whose EC2 API failed two passes in a row holds its
//!   sites; nothing starts there, one `fleet.guard` event;
//! - EC2's view of the site unknown this pass;
//! - the rung's `cooldown` per site;
//! - `[health] max_concurrent_failovers` / `max_concurrent_repairs`;
//! - a running drill or spare preparation of the site is aborted first; a
//!   running backup is preempted by the engine (its quiesce lifted first);
//!   another failover or repair of the site means it is recovering already.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use super::notify::{Notifier, event};
use crate::agents::{Addressee, AgentAction, AgentErrorKind};
use crate::cloud::ec2::{InstanceState, InstanceStatus, STATUS_IDS_PER_CALL};
use crate::cloud::http::HttpClients;
use crate::config::HealthConfig;
use crate::domain::events::EventKind;
use crate::domain::health::*;
use crate::domain::model::{Event, Millis, OperationState, Role, Signal, Site, now_ms};
use crate::store::{ActiveDetail, StoreError};
use crate::workflows::failover::{self, plan};
use crate::workflows::{Engine, repair, retry_ec2};

/// Who the monitor's operations are requested by.
pub const REQUESTED_BY: &str = "auto/health";
/// Events are kept this long (longer while a webhook still waits for one).
const EVENT_RETENTION_MS: Millis = 90 * 24 * 3600 * 1000;
const PRUNE_EVERY_MS: Millis = 3600 * 1000;
/// How far back operation ends are turned into events (each once).
const ENDED_LOOKBACK_MS: Millis = 10 * 60 * 1000;
/// Budget of one DescribeInstanceStatus (throttling): short, the next pass
/// asks again.
const EC2_BUDGET: Duration = Duration::from_secs(10);
/// Route 53's API allows 5 requests a second per account.
const ROUTE53_CONCURRENCY: usize = 4;
/// The agent's check gets the probe's timeout and this for the round trip.
const LOCAL_CHECK_SLACK: Duration = Duration::from_secs(5);

/// Automatic operations running now, fleet-wide (concurrency limits).
struct Running {
    failovers: usize,
    repairs: usize,
}

pub struct Monitor {
    pub engine: Engine,
    pub config: HealthConfig,
    pub notifier: Notifier,
    pub http: HttpClients,
    /// The fleet guard's reasons now (from the event log at start).
    guard: BTreeSet<String>,
    /// Regions whose EC2 view was unknown, and for how many passes in a row.
    unknown_passes: HashMap<String, u32>,
    /// No pass decides anything until this (the monitor's start plus the
    /// agents' heartbeat window): after a controller start every agent is
    /// silent until it has reconnected.
    quiet_until_ms: Millis,
    pruned_at_ms: Millis,
}

/// What one pass saw and did (tests and the benchmark read it).
#[derive(Clone, Debug, Default)]
pub struct Pass {
    pub health: HashMap<String, SiteHealth>,
    pub started: Vec<(String, Rung, String)>,
    /// Every rung the ladder called for this pass (started or held).
    pub decided: Vec<(String, Rung)>,
    pub events: Vec<Event>,
    pub guard: bool,
    pub ec2_calls: usize,
}

impl Monitor {
    /// `agent_grace`: how long after the start agents get to reconnect
    /// before a silent one counts (the heartbeat window).
    pub async fn new(
        engine: Engine,
        config: HealthConfig,
        notifier: Notifier,
        http: HttpClients,
        agent_grace: Duration,
    ) -> Result<Monitor, StoreError> {
        let store = engine.store();
        let on = store.last_event(String::new(), EventKind::FleetGuard.into()).await?;
        let off = store.last_event(String::new(), EventKind::FleetGuardCleared.into()).await?.map(|e| e.seq);
        let guard = match on {
            Some(on) if off.is_none_or(|off| off < on.seq) => {
                /// What a `fleet.guard` event's evidence says (typed, as written).
                #[derive(serde::Deserialize, Default)]
                #[serde(default)]
                struct GuardEvidence {
                    keys: BTreeSet<String>,
                }
                let keys = serde_json::from_value::<GuardEvidence>(on.evidence.clone()).unwrap_or_default().keys;
                // An older controller's event names no keys: the silent agents.
                if keys.is_empty() { ["agents_silent".to_owned()].into() } else { keys }
            }
            _ => BTreeSet::new(),
        };
        let quiet_until_ms = now_ms() + agent_grace.as_millis() as u64;
        Ok(Monitor { engine, config, notifier, http, guard, unknown_passes: HashMap::new(), quiet_until_ms, pruned_at_ms: 0 })
    }

    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.pass(now_ms()).await {
                tracing::error!(error = %e, "health pass failed");
            }
            tokio::time::sleep(self.config.interval).await;
        }
    }

    /// One pass at `now`.
    pub async fn pass(&mut self, now: Millis) -> Result<Pass, StoreError> {
        if now < self.quiet_until_ms {
            return Ok(Pass::default());
        }
        let engine = self.engine.clone();
        let store = engine.store();
        let deps = engine.deps();
        let sites = store.sites().await?;
        let mut stored = store.health_all().await?;
        let active = store.active_detail().await?;
        let mut by_site: HashMap<&str, Vec<&ActiveDetail>> = HashMap::new();
        for a in &active {
            by_site.entry(a.site_id.as_str()).or_default().push(a);
        }
        let live = deps.registry.live_by_site();
        let pauses = store.pauses(now_ms().max(now)).await?;
        let (ec2, ec2_calls) = self.ec2_signals(&sites).await;
        let probes = self.probes(&sites).await;
        let mut events: Vec<Event> = vec![];
        let mut records: HashMap<String, SiteHealth> = HashMap::new();

        // The signals every pass gathers.
        let mut evidence: HashMap<String, Evidence> = HashMap::new();
        for site in &sites {
            let agent = match live.get(&site.id).and_then(|l| l.iter().find(|l| l.record.instance_id == site.primary_instance_id)) {
                Some(l) if matches!(l.role, Role::Primary | Role::Pending) => AgentSignal::Live,
                Some(l) => AgentSignal::Silent { last_seen_ms: Some(l.record.last_seen_ms) },
                None => AgentSignal::Silent {
                    last_seen_ms: store
                        .instance(site.id.clone(), site.primary_instance_id.clone())
                        .await?
                        .map(|r| r.last_seen_ms)
                        .filter(|t| *t > 0),
                },
            };
            let policy = deps.policy(&site.id).health;
            let e = Evidence {
                agent,
                ec2: ec2.get(&site.id).cloned().unwrap_or(Ec2Signal::Unknown { error: "not asked".into() }),
                probe: probes.get(&site.id).cloned().unwrap_or(ProbeSignal::NotConfigured),
                vantage: if policy.route53_health_check.is_empty() { VantageSignal::NotConfigured } else { VantageSignal::NotAsked },
                local: LocalSignal::NotAsked,
            };
            evidence.insert(site.id.clone(), e);
        }
        // The paths that do not cross the controller's network, asked only
        // for the sites that look unwell.
        self.vantage_signals(&sites, &mut evidence).await;
        self.local_checks(&sites, &mut evidence).await;

        // Conditions.
        for site in &sites {
            let mut h = stored.remove(&site.id).unwrap_or_else(|| SiteHealth::new(&site.id, now));
            let e = evidence.remove(&site.id).expect("every site has evidence");
            let condition = Condition::of(&e);
            if !same_episode_class(h.condition, condition) {
                h.condition_since_ms = now;
            }
            if condition != Condition::Healthy && h.episode_since_ms == 0 {
                h.episode_since_ms = now;
            }
            h.condition = condition;
            h.evidence = Some(e);
            h.checked_at_ms = now;
            records.insert(site.id.clone(), h);
        }

        // Attempts: which ended, and how.
        for site in &sites {
            let h = records.get_mut(&site.id).expect("every site has a record");
            for a in h.attempts.iter_mut().filter(|a| !a.failed && !a.operation_id.is_empty()) {
                if by_site.get(site.id.as_str()).is_some_and(|ops| ops.iter().any(|o| o.id == a.operation_id)) {
                    continue;
                }
                let op = store.operation(a.operation_id.clone()).await?;
                let ok = op.as_ref().is_some_and(|o| o.state == OperationState::Succeeded);
                let since_end = op.as_ref().map(|o| now.saturating_sub(o.updated_at_ms)).unwrap_or(u64::MAX);
                let policy = deps.policy(&site.id).health;
                // Done but the site still not healthy a repair window later:
                // it did not help.
                if !ok || (h.condition != Condition::Healthy && since_end >= policy.repair_after.as_millis() as u64) {
                    a.failed = true;
                }
            }
        }

        // The fleet guard: whatever many sites show at once is taken to be
        // the controller's own fault, for every rung.
        let guard = self.guard(&sites, &records);
        let keys: BTreeSet<String> = guard.iter().map(GuardReason::key).collect();
        let describe = |g: &[GuardReason]| g.iter().map(|r| r.describe(self.config.max_down_fraction)).collect::<Vec<_>>().join("; ");
        if !keys.is_subset(&self.guard) || (keys.is_empty() && !self.guard.is_empty()) {
            let (kind, severity, summary) = if keys.is_empty() {
                (EventKind::FleetGuardCleared, "info", "every signal looks like the sites' own again: the fleet guard is lifted".to_owned())
            } else {
                (
                    EventKind::FleetGuard,
                    "critical",
                    format!(
                        "{}: the fault is taken to be on the controller's side (its network, its probe, its view of EC2); no app restart, stop or failover starts where this holds",
                        describe(&guard)
                    ),
                )
            };
            events.push(event("", kind, severity, summary, json!({"reasons": guard, "keys": keys}), ""));
        }
        self.guard = keys;

        // Decisions.
        let count = |kinds: &[&str]| active.iter().filter(|a| kinds.contains(&a.kind.as_str()) && a.requested_by == REQUESTED_BY).count();
        let mut running = Running { failovers: count(&["failover"]), repairs: count(&["app_restart", "host_restart"]) };
        let mut started = vec![];
        let mut decided = vec![];
        for site in &sites {
            let policy = deps.policy(&site.id).health;
            let h = records.get_mut(&site.id).expect("every site has a record");
            let ops: Vec<&ActiveDetail> = by_site.get(site.id.as_str()).cloned().unwrap_or_default();
            let before = h.state;
            let evidence = h
                .evidence
                .clone()
                .map(|e| json!({"lines": e.lines(now), "signals": e, "condition": h.condition.as_str()}))
                .unwrap_or(json!({}));

            // Approvals expire with their evidence: a failover waiting for
            // one is withdrawn once the site no longer looks like it needs it.
            let mut withdrawn = vec![];
            for o in ops.iter().filter(|o| o.kind == "failover" && o.requested_by == REQUESTED_BY && o.waiting_for.starts_with("approval"))
            {
                if h.condition.may_need_failover() {
                    continue;
                }
                let lines = h.evidence.as_ref().map(|e| e.lines(now).join("; ")).unwrap_or_default();
                match engine.signal(&o.id, Signal::Deny, &format!("{REQUESTED_BY} (withdrawn)")).await {
                    Ok(_) => {
                        let mut e = event(
                            &site.id,
                            EventKind::FailoverWithdrawn,
                            "warning",
                            format!(
                                "the automatic failover {} is withdrawn: the site is {} now ({lines}); nothing was changed",
                                o.id,
                                h.condition.as_str()
                            ),
                            evidence.clone(),
                            &o.id,
                        );
                        // Same id as its end event (a denied operation ends
                        // cancelled): the end is this event.
                        e.id = format!("{}-cancelled", o.id);
                        events.push(e);
                        withdrawn.push(o.id.clone());
                    }
                    Err(e) => tracing::warn!(site = %site.id, operation = %o.id, error = %e, "could not withdraw the automatic failover"),
                }
            }
            if !withdrawn.is_empty() {
                // A withdrawn request is no try: the next loss may ask again,
                // and its cooldown does not count.
                h.attempts.retain(|a| !withdrawn.contains(&a.operation_id));
                let last = h.attempts.iter().filter(|a| a.rung == Some(Rung::Failover)).map(|a| a.at_ms).max().unwrap_or(0);
                h.last_auto_failover_ms = last;
                h.last_auto_ms.insert(Rung::Failover.as_str().into(), last);
            }
            let ops: Vec<&ActiveDetail> = ops.into_iter().filter(|o| !withdrawn.contains(&o.id)).collect();
            // Waiting for an approval is not recovering: the site shows its
            // real health meanwhile.
            let recovering = ops
                .iter()
                .any(|o| matches!(o.kind.as_str(), "failover" | "app_restart" | "host_restart") && !o.waiting_for.starts_with("approval"));
            let awaiting = ops.iter().any(|o| o.kind == "failover" && o.waiting_for.starts_with("approval"));
            let mut decision = if recovering {
                Decision::Wait("a recovery of the site is running".into())
            } else if awaiting {
                Decision::Wait("an automatic failover waits for an approval (`drctl approve`), on this evidence".into())
            } else {
                decide(h, &policy, now)
            };
            if let (Some(p), Decision::Start(rung, why)) = (pauses.get(&site.id), &decision) {
                decision = Decision::Wait(format!(
                    "{why}: {} is not started, automatic recovery is paused by {} ({})",
                    rung.as_str(),
                    p.by,
                    p.reason
                ));
            }
            // A backup may stop or freeze the app on purpose (quiesce): the
            // app probe failing then is no reason to restart it.
            if matches!(decision, Decision::Start(Rung::AppRestart, _)) && ops.iter().any(|o| o.kind == "backup") {
                decision = Decision::Wait(
                    "the app probe fails while a backup runs (its quiesce may stop or freeze the app): waiting for it to end".into(),
                );
            }

            // Deadlines and approvals of what runs.
            for o in ops.iter().filter(|o| o.requested_by == REQUESTED_BY) {
                let age = Duration::from_millis(now.saturating_sub(o.created_at_ms));
                if o.kind == "host_restart" && age > policy.host_restart_deadline && o.state != OperationState::Cancelling {
                    let _ = engine.signal(&o.id, Signal::Abort, REQUESTED_BY).await;
                    events.push(event(
                        &site.id,
                        EventKind::RepairFailed,
                        "critical",
                        format!(
                            "the host restart {} did not finish within host_restart_deadline {}: aborted",
                            o.id,
                            humantime::format_duration(policy.host_restart_deadline)
                        ),
                        evidence.clone(),
                        &o.id,
                    ));
                }
                if o.kind == "failover"
                    && o.waiting_for.starts_with("approval")
                    && age > policy.approval_timeout
                    && once(h, &format!("approval-overdue-{}", o.id))
                {
                    events.push(event(
                        &site.id,
                        EventKind::FailoverApprovalOverdue,
                        "critical",
                        format!(
                            "the automatic failover {} has waited for an approval for more than {}: `drctl approve {}` or `drctl deny {}`",
                            o.id,
                            humantime::format_duration(policy.approval_timeout),
                            o.id,
                            o.id
                        ),
                        evidence.clone(),
                        &o.id,
                    ));
                }
            }

            if let Decision::Start(rung, why) = decision.clone() {
                decided.push((site.id.clone(), rung));
                let held_by_guard = guard.iter().find(|g| g.holds(&site.region)).map(|g| g.describe(self.config.max_down_fraction));
                match self.start(site, h, rung, &why, &policy, &ops, held_by_guard, &running, now).await {
                    Ok(Some(op)) => {
                        match rung {
                            Rung::Failover => {
                                running.failovers += 1;
                                h.last_auto_failover_ms = now;
                            }
                            Rung::AppRestart | Rung::HostRestart => running.repairs += 1,
                        }
                        h.last_auto_ms.insert(rung.as_str().into(), now);
                        h.attempts.push(Attempt { rung: Some(rung), operation_id: op.clone(), at_ms: now, failed: false });
                        let (kind, summary) = match rung {
                            Rung::Failover if policy.mode == AutoMode::Approve => (
                                EventKind::FailoverAwaitingApproval,
                                format!(
                                    "{why}: an automatic failover waits for an approval: `drctl approve {op}` or `drctl deny {op}`; it is withdrawn if the site recovers first"
                                ),
                            ),
                            Rung::Failover => (EventKind::FailoverStarted, format!("{why}: automatic failover {op} started")),
                            Rung::AppRestart => (EventKind::RepairStarted, format!("{why}: restarting the app through the agent ({op})")),
                            Rung::HostRestart => (
                                EventKind::RepairStarted,
                                format!("{why}: stopping and starting the instance {} ({op})", site.primary_instance_id),
                            ),
                        };
                        events.push(event(&site.id, kind, "critical", summary, evidence.clone(), &op));
                        started.push((site.id.clone(), rung, op));
                        decision = Decision::Wait(format!("{} started", rung.as_str()));
                    }
                    Ok(None) => {}
                    Err(held) => {
                        // The fleet guard is one fleet-wide alert, not one per site.
                        if held.key != "guard" && once(h, &format!("held-{}-{}", rung.as_str(), held.key)) {
                            events.push(event(&site.id, held.kind, "warning", format!("{why}, but {}", held.why), evidence.clone(), ""));
                        }
                        decision = Decision::Wait(held.why);
                    }
                }
            }
            // While the fleet guard holds for the site, what it shows is
            // taken to be the controller's fault: the fleet alert is the one
            // alert, none per site.
            let fleet_held = guard.iter().any(|g| g.holds(&site.region));
            match &decision {
                Decision::Alert(_) if fleet_held => {}
                Decision::Human(why) if once(h, &format!("human-{}", h.condition.as_str())) => {
                    events.push(event(&site.id, EventKind::SiteNeedsHuman, "critical", why.clone(), evidence.clone(), ""));
                }
                Decision::Alert(why) if once(h, &format!("alert-{}", h.condition.as_str())) => {
                    let kind = match h.condition {
                        Condition::Partitioned => EventKind::SitePartitioned,
                        Condition::AppUnreachable => EventKind::SiteUnreachable,
                        _ => EventKind::SiteNeedsHuman,
                    };
                    events.push(event(&site.id, kind, "warning", why.clone(), evidence.clone(), ""));
                }
                _ => {}
            }
            h.decision = match &decision {
                Decision::Wait(s) | Decision::Start(_, s) | Decision::Human(s) | Decision::Alert(s) => s.clone(),
            };
            let recovering_now =
                recovering || started.iter().any(|(s, r, _)| s == &site.id && !(*r == Rung::Failover && policy.mode == AutoMode::Approve));
            h.state = state_of(h.condition, recovering_now, &decision);
            if h.state != before {
                h.since_ms = now;
                let lines = h.evidence.as_ref().map(|e| e.lines(now).join("; ")).unwrap_or_default();
                match h.state {
                    HealthState::Suspect if fleet_held => {}
                    HealthState::Suspect => events.push(event(
                        &site.id,
                        EventKind::SiteSuspect,
                        "warning",
                        format!("{}: {lines}", h.condition.as_str()),
                        evidence.clone(),
                        "",
                    )),
                    HealthState::Down => events.push(event(
                        &site.id,
                        EventKind::SiteDown,
                        "critical",
                        format!("{}: {lines}", h.condition.as_str()),
                        evidence.clone(),
                        "",
                    )),
                    HealthState::Healthy => {
                        events.push(event(
                            &site.id,
                            EventKind::SiteRecovered,
                            "info",
                            format!("healthy again after {} ({lines})", before.as_str()),
                            evidence.clone(),
                            "",
                        ));
                    }
                    HealthState::Recovering => {}
                }
            }
            if h.state == HealthState::Healthy {
                h.attempts.clear();
                h.alerted.clear();
                h.episode_since_ms = 0;
            }
        }

        events.extend(self.ended_events().await?);
        events.extend(self.late_backups(&sites, now).await?);
        events.extend(self.expiring_certificates(&live, now));
        if now.saturating_sub(self.pruned_at_ms) >= PRUNE_EVERY_MS {
            self.pruned_at_ms = now;
            let n = store.prune_events(now.saturating_sub(EVENT_RETENTION_MS)).await?;
            if n > 0 {
                tracing::info!(events = n, "events older than 90 days forgotten (every webhook had them)");
            }
        }
        let recorded = self.notifier.record(records.values().cloned().collect(), events).await?;
        Ok(Pass { health: records, started, decided, events: recorded, guard: !self.guard.is_empty(), ec2_calls })
    }

    /// The guard's reasons this pass. A region whose EC2 view is unknown
    /// counts from its second pass in a row (one throttled call is no
    /// outage); its sites are held from the first by [`Self::start`].
    fn guard(&mut self, sites: &[Site], records: &HashMap<String, SiteHealth>) -> Vec<GuardReason> {
        let mut c = FleetCounts { sites: sites.len(), ..Default::default() };
        let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
        for site in sites {
            let Some(e) = records.get(&site.id).and_then(|h| h.evidence.as_ref()) else { continue };
            if Condition::agent_silent(e) {
                c.silent += 1;
            }
            if !matches!(e.probe, ProbeSignal::NotConfigured) {
                c.probed += 1;
            }
            if matches!(e.probe, ProbeSignal::Failed { .. }) {
                c.probe_failed += 1;
            }
            if matches!(e.ec2, Ec2Signal::Unknown { .. }) {
                *unknown.entry(site.region.clone()).or_default() += 1;
            }
        }
        self.unknown_passes.retain(|r, _| unknown.contains_key(r));
        for (region, n) in unknown {
            let passes = self.unknown_passes.entry(region.clone()).or_default();
            *passes += 1;
            if *passes >= 2 {
                c.unknown_regions.insert(region, n);
            }
        }
        fleet_guard(&c, self.config.max_down_fraction)
    }

    /// Starts `rung` for a site, or says why it is held. `Ok(None)`: not now
    /// (waiting for an aborted drill to end), nothing to report. Every rung
    /// passes the same guards: the mode, the fleet guard, EC2's view, the
    /// rung's cooldown and the fleet-wide concurrency.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        site: &Site,
        h: &SiteHealth,
        rung: Rung,
        why: &str,
        policy: &HealthPolicy,
        ops: &[&ActiveDetail],
        guard: Option<String>,
        running: &Running,
        now: Millis,
    ) -> Result<Option<String>, Held> {
        let engine = &self.engine;
        let not_started = if rung == Rung::Failover { EventKind::FailoverNotStarted } else { EventKind::RepairNotStarted };
        if policy.mode == AutoMode::Off {
            return Err(Held::new(
                not_started,
                "mode",
                "auto_failover = \"off\" for this site: nothing automatic is done (set it to \"approve\" or \"auto\")",
            ));
        }
        if let Some(g) = guard {
            return Err(Held::new(not_started, "guard", format!("the fleet guard holds ({g}): nothing is started")));
        }
        if let Some(Ec2Signal::Unknown { error }) = h.evidence.as_ref().map(|e| &e.ec2) {
            return Err(Held::new(
                not_started,
                "ec2_unknown",
                format!("EC2's view of the instance is unknown this pass ({error}): nothing is started until EC2 answers"),
            ));
        }
        let last = h.last_auto(rung);
        let since = now.saturating_sub(last);
        if last > 0 && since < policy.cooldown.as_millis() as u64 {
            return Err(Held::new(
                not_started,
                "cooldown",
                format!(
                    "the site's last automatic {} started {} ago (cooldown {})",
                    rung.as_str(),
                    humantime::format_duration(Duration::from_secs(since / 1000)),
                    humantime::format_duration(policy.cooldown)
                ),
            ));
        }
        match rung {
            Rung::Failover if running.failovers >= self.config.max_concurrent_failovers as usize => {
                return Err(Held::new(
                    not_started,
                    "concurrency",
                    format!(
                        "{} automatic failovers run already (max_concurrent_failovers {})",
                        running.failovers, self.config.max_concurrent_failovers
                    ),
                ));
            }
            Rung::AppRestart | Rung::HostRestart if running.repairs >= self.config.max_concurrent_repairs as usize => {
                return Err(Held::new(
                    not_started,
                    "concurrency",
                    format!(
                        "{} automatic repairs run already (max_concurrent_repairs {})",
                        running.repairs, self.config.max_concurrent_repairs
                    ),
                ));
            }
            _ => {}
        }
        // Isolated work of the site (drills, spare preparation) is aborted
        // first; the next pass starts the rung once it has ended.
        let isolated: Vec<&&ActiveDetail> = ops.iter().filter(|o| matches!(o.kind.as_str(), "drill" | "spare")).collect();
        if !isolated.is_empty() {
            for o in &isolated {
                if o.state != OperationState::Cancelling {
                    tracing::warn!(site = %site.id, operation = %o.id, rung = rung.as_str(), "aborting the site's {} before its recovery", o.kind);
                    let _ = engine.signal(&o.id, Signal::Abort, REQUESTED_BY).await;
                }
            }
            return Ok(None);
        }
        let requested_by = REQUESTED_BY;
        let region = site.region.clone();
        let started = match rung {
            Rung::AppRestart => {
                failover::start_state::<repair::AppRestart>(
                    engine,
                    repair::state(&site.id, &site.primary_instance_id, &region, why),
                    requested_by,
                    None,
                )
                .await
            }
            Rung::HostRestart => {
                failover::start_state::<repair::HostRestart>(
                    engine,
                    repair::state(&site.id, &site.primary_instance_id, &region, why),
                    requested_by,
                    None,
                )
                .await
            }
            Rung::Failover => {
                let req = plan::Request::default();
                let mut plan = plan::make(engine.deps(), site, &req)
                    .await
                    .map_err(|e| Held::new(not_started, "plan", format!("no failover can be planned: {e}")))?;
                let lines = h.evidence.as_ref().map(|e| e.lines(now)).unwrap_or_default();
                if policy.mode == AutoMode::Approve {
                    plan.approval = format!("automatic failover of `{}`: {why}", site.id);
                }
                plan.trigger = Some(plan::Trigger {
                    first_evidence_ms: if h.episode_since_ms > 0 { h.episode_since_ms } else { h.condition_since_ms },
                    decided_ms: now,
                    condition: h.condition.as_str().into(),
                    evidence: lines,
                });
                failover::start(engine, plan, requested_by).await
            }
        };
        match started {
            Ok(op) => {
                tracing::warn!(site = %site.id, operation = %op.id, rung = rung.as_str(), why, "automatic recovery started");
                Ok(Some(op.id))
            }
            Err(e) => Err(Held::new(not_started, "start", format!("it could not start: {e}"))),
        }
    }

    /// The Route 53 health check of each site that has one and looks
    /// unwell on the controller's side (agent silent or probe failing)
    /// while EC2 says running: the vantage outside our network.
    async fn vantage_signals(&self, sites: &[Site], evidence: &mut HashMap<String, Evidence>) {
        let deps = self.engine.deps();
        let jobs: Vec<(String, String)> = sites
            .iter()
            .filter_map(|s| {
                let e = evidence.get(&s.id)?;
                let id = deps.policy(&s.id).health.route53_health_check;
                let unwell = Condition::agent_silent(e) || matches!(e.probe, ProbeSignal::Failed { .. });
                (!id.is_empty() && unwell && matches!(e.ec2, Ec2Signal::Ok)).then(|| (s.id.clone(), id))
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let dns = deps.dns().await;
        let answers: Vec<(String, VantageSignal)> = futures::stream::iter(jobs)
            .map(|(site, id)| {
                let dns = dns.clone();
                async move {
                    let sig = match retry_ec2("GetHealthCheckStatus", EC2_BUDGET, || dns.health_check_status(&id)).await {
                        Ok(obs) => match crate::cloud::dns::unhealthy_by_checkers(&obs) {
                            Ok(detail) => VantageSignal::Unhealthy { detail: format!("health check {id}: {detail}") },
                            Err(detail) => VantageSignal::Healthy { detail: format!("health check {id}: {detail}") },
                        },
                        Err(e) => VantageSignal::Unknown { error: format!("health check {id}: {e}") },
                    };
                    (site, sig)
                }
            })
            .buffer_unordered(ROUTE53_CONCURRENCY)
            .collect()
            .await;
        for (site, sig) in answers {
            if let Some(e) = evidence.get_mut(&site) {
                e.vantage = sig;
            }
        }
    }

    /// The agent's own check of the app on its machine, for each site whose
    /// app looks unreachable while its agent talks and EC2 has no complaint:
    /// tells a broken path (the controller's network, DNS, a proxy) from a
    /// broken app before anything is restarted.
    async fn local_checks(&self, sites: &[Site], evidence: &mut HashMap<String, Evidence>) {
        let deps = self.engine.deps();
        let jobs: Vec<(Site, Duration)> = sites
            .iter()
            .filter(|s| {
                evidence.get(&s.id).is_some_and(|e| {
                    matches!(e.agent, AgentSignal::Live)
                        && e.app_unreachable()
                        && matches!(e.ec2, Ec2Signal::Ok | Ec2Signal::Unknown { .. })
                })
            })
            .map(|s| (s.clone(), deps.policy(&s.id).health.timeout))
            .collect();
        let registry = deps.registry.clone();
        let answers: Vec<(String, LocalSignal)> = futures::stream::iter(jobs)
            .map(|(site, timeout)| {
                let registry = registry.clone();
                async move {
                    let to = Addressee::primary(&site);
                    // A new id each time: the agent journals answers by id.
                    let id = format!("health-{}", crate::domain::model::new_operation_id("check"));
                    let sig = match registry.call(&to, &id, &AgentAction::HealthCheck, timeout + LOCAL_CHECK_SLACK).await {
                        Ok(o) if o.ok => match o.report::<dr_proto::contract::HealthReport>() {
                            Ok(r) => LocalSignal::Ok { detail: format!("{} answered {}", r.url, r.status) },
                            // Not evidence about the app: an agent of another contract.
                            Err(e) => LocalSignal::Unknown { error: e.to_string() },
                        },
                        Ok(o) if o.kind == Some(AgentErrorKind::NotSupported) => {
                            LocalSignal::Unknown { error: "the agent has no health check (an older agent)".into() }
                        }
                        Ok(o) => LocalSignal::Failed { detail: o.error },
                        Err(e) => LocalSignal::Unknown { error: e.to_string() },
                    };
                    (site.id, sig)
                }
            })
            .buffer_unordered(self.config.probe_concurrency as usize)
            .collect()
            .await;
        for (site, sig) in answers {
            if let Some(e) = evidence.get_mut(&site) {
                e.local = sig;
            }
        }
    }

    /// EC2's view of every site's primary, batched per account and region.
    async fn ec2_signals(&self, sites: &[Site]) -> (HashMap<String, Ec2Signal>, usize) {
        let deps = self.engine.deps();
        let mut groups: std::collections::BTreeMap<(Option<String>, String), Vec<&Site>> = Default::default();
        for s in sites.iter().filter(|s| !s.primary_instance_id.is_empty()) {
            groups.entry((s.role_arn.clone(), s.region.clone())).or_default().push(s);
        }
        let mut out = HashMap::new();
        let mut calls = 0;
        for ((_, region), group) in groups {
            // A region whose API fails is asked once per pass, not once per
            // chunk: the rest of its sites are unknown too.
            let mut failed: Option<String> = None;
            for chunk in group.chunks(STATUS_IDS_PER_CALL) {
                if let Some(error) = &failed {
                    for s in chunk {
                        out.insert(s.id.clone(), Ec2Signal::Unknown { error: error.clone() });
                    }
                    continue;
                }
                let ids: Vec<String> = chunk.iter().map(|s| s.primary_instance_id.clone()).collect();
                calls += 1;
                let answer = match deps.ec2_in(chunk[0], &region).await {
                    Ok(ec2) => retry_ec2("DescribeInstanceStatus", EC2_BUDGET, || ec2.describe_instance_status(&ids)).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(found) => {
                        for s in chunk {
                            let sig = found
                                .iter()
                                .find(|f| f.id == s.primary_instance_id)
                                .map(ec2_signal)
                                .unwrap_or(Ec2Signal::Gone { state: "unknown to EC2".into() });
                            out.insert(s.id.clone(), sig);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(region = %region, sites = chunk.len(), error = %e, "DescribeInstanceStatus failed: EC2's view of these sites is unknown this pass");
                        for s in chunk {
                            out.insert(s.id.clone(), Ec2Signal::Unknown { error: e.to_string() });
                        }
                        failed = Some(e.to_string());
                    }
                }
            }
        }
        (out, calls)
    }

    /// Every site's app probe, `probe_concurrency` at a time.
    async fn probes(&self, sites: &[Site]) -> HashMap<String, ProbeSignal> {
        let deps = self.engine.deps();
        let jobs: Vec<(String, Option<(String, HealthPolicy)>)> = sites
            .iter()
            .map(|s| {
                let policy = deps.policy(&s.id).health;
                (s.id.clone(), probe_url(&policy.url, &deps.recovery(&s.id)).map(|u| (u, policy)))
            })
            .collect();
        let http = self.http.clone();
        futures::stream::iter(jobs)
            .map(|(site, job)| {
                let http = http.clone();
                async move {
                    let Some((url, policy)) = job else { return (site, ProbeSignal::NotConfigured) };
                    let sig = match http.get(&url, policy.ca.as_deref(), policy.timeout).await {
                        Ok(a) if a.status == policy.expect_status => ProbeSignal::Ok { status: a.status },
                        Ok(a) => {
                            ProbeSignal::Failed { detail: format!("{url} answered HTTP {} (expected {})", a.status, policy.expect_status) }
                        }
                        Err(e) => ProbeSignal::Failed { detail: format!("{url}: {e}") },
                    };
                    (site, sig)
                }
            })
            .buffer_unordered(self.config.probe_concurrency as usize)
            .collect()
            .await
    }

    /// `backup.late` for each site whose newest good backup is older than
    /// its schedule allows (the interval, the jitter window and the time a
    /// backup may take: what `drctl status` calls late); once per backup.
    async fn late_backups(&self, sites: &[Site], now: Millis) -> Result<Vec<Event>, StoreError> {
        let deps = self.engine.deps();
        let newest = self.engine.store().newest_backups().await?;
        let mut out = vec![];
        for site in sites {
            let policy = deps.policy(&site.id);
            let Some(target) = policy.schedule.as_ref().and_then(|s| s.nominal_interval(now)) else { continue };
            let Some(b) = newest.get(&site.id) else { continue };
            let allowed = target.saturating_add(policy.jitter).saturating_add(deps.backup.timeout);
            let age = now.saturating_sub(b.completed_at_ms);
            if age <= allowed.as_millis() as u64 {
                continue;
            }
            let summary = format!(
                "the newest good backup {} is {} old; the schedule allows {}",
                b.image_id,
                humantime::format_duration(Duration::from_secs(age / 1000)),
                humantime::format_duration(Duration::from_secs(allowed.as_secs()))
            );
            let mut e =
                event(&site.id, EventKind::BackupLate, "warning", summary, json!({"image_id": b.image_id, "age_s": age / 1000}), "");
            e.id = format!("backup-late-{}-{}", site.id, b.image_id);
            out.push(e);
        }
        Ok(out)
    }

    /// `agent.cert_expiring` for each live agent whose certificate ends
    /// within `[health] cert_warning`; once per certificate.
    fn expiring_certificates(&self, live: &HashMap<String, Vec<crate::agents::LiveAgent>>, now: Millis) -> Vec<Event> {
        let warn = self.config.cert_warning.as_millis() as u64;
        let mut out = vec![];
        for l in live.values().flatten() {
            let end = l.record.cert_not_after_ms;
            if end == 0 || end.saturating_sub(now) > warn {
                continue;
            }
            let left = humantime::format_duration(Duration::from_secs(end.saturating_sub(now) / 1000));
            let summary = format!(
                "the agent certificate of {} ends in {left}: issue a new one (`drctl pki issue site {}`) and restart its agent",
                l.record.instance_id, l.record.site_id
            );
            let mut e = event(
                &l.record.site_id,
                EventKind::AgentCertExpiring,
                "warning",
                summary,
                json!({"instance_id": l.record.instance_id, "not_after_ms": end}),
                "",
            );
            e.id = format!("cert-{}-{}-{end}", l.record.site_id, l.record.instance_id);
            out.push(e);
        }
        out
    }

    /// Events for operations that ended (each once, by operation id).
    /// Operation times are the store's (wall clock), whatever a pass's
    /// `now` is.
    async fn ended_events(&self) -> Result<Vec<Event>, StoreError> {
        let mut out = vec![];
        for o in self.engine.store().ended_since(now_ms().saturating_sub(ENDED_LOOKBACK_MS)).await? {
            let ok = o.state == OperationState::Succeeded;
            let kind = match (o.kind.as_str(), ok) {
                ("backup", false) => EventKind::BackupFailed,
                ("drill", false) => EventKind::DrillFailed,
                ("failover", true) => EventKind::FailoverSucceeded,
                ("failover", false) => EventKind::FailoverFailed,
                ("app_restart" | "host_restart", true) => EventKind::RepairSucceeded,
                ("app_restart" | "host_restart", false) => EventKind::RepairFailed,
                _ => continue,
            };
            let summary = match ok {
                true => format!("{} {} succeeded (requested by {})", o.kind, o.id, o.requested_by),
                false => format!("{} {} {}: {} (requested by {})", o.kind, o.id, o.state.as_str(), o.error, o.requested_by),
            };
            let mut e = event(
                &o.site_id,
                kind,
                if ok { "info" } else { "critical" },
                summary,
                json!({"state": o.state.as_str(), "error": o.error}),
                &o.id,
            );
            e.id = format!("{}-{}", o.id, o.state.as_str());
            e.at_ms = o.updated_at_ms;
            out.push(e);
        }
        Ok(out)
    }
}

/// Why a rung is not started now; `key` makes its event once per episode.
struct Held {
    kind: EventKind,
    key: &'static str,
    why: String,
}

impl Held {
    fn new(kind: EventKind, key: &'static str, why: impl Into<String>) -> Held {
        Held { kind, key, why: why.into() }
    }
}

/// Records `key` as raised in this episode; true the first time.
fn once(h: &mut SiteHealth, key: &str) -> bool {
    if h.alerted.iter().any(|k| k == key) {
        return false;
    }
    h.alerted.push(key.to_owned());
    true
}

/// Conditions that continue one another keep their clock (a terminated
/// instance seen first as "dead" does not restart `confirm_for`).
fn same_episode_class(a: Condition, b: Condition) -> bool {
    let gone = |c: Condition| matches!(c, Condition::InstanceGone | Condition::Contradictory);
    a == b
        || (a.confirmed_down() && b.confirmed_down())
        || (gone(a) && gone(b))
        || matches!((a, b), (Condition::HostImpaired | Condition::HostStopped, Condition::HostImpaired | Condition::HostStopped))
}

/// The probe URL of a site: `{hostname}` is its hostname (the configured
/// one, else its DNS record's name); `None` when there is none.
pub fn probe_url(template: &str, rec: &crate::domain::recovery::SiteRecovery) -> Option<String> {
    if template.is_empty() {
        return None;
    }
    if !template.contains("{hostname}") {
        return Some(template.to_owned());
    }
    let host = if rec.hostname.is_empty() { rec.dns.as_ref().map(|d| d.name.clone()).unwrap_or_default() } else { rec.hostname.clone() };
    (!host.is_empty()).then(|| template.replace("{hostname}", &host))
}

/// EC2's status of a primary as a signal.
pub fn ec2_signal(s: &InstanceStatus) -> Ec2Signal {
    match s.state {
        InstanceState::Stopping | InstanceState::Stopped => return Ec2Signal::Stopped { state: s.state.to_string() },
        InstanceState::ShuttingDown | InstanceState::Terminated => return Ec2Signal::Gone { state: s.state.to_string() },
        _ => {}
    }
    let mut failed = vec![];
    for (name, v) in [("system", &s.system), ("instance", &s.instance), ("attached EBS", &s.ebs)] {
        if v == "impaired" {
            failed.push(format!("{name} status check failed"));
        }
    }
    if !failed.is_empty() {
        return Ec2Signal::Impaired { detail: failed.join(", ") };
    }
    // Events that take the host away; scheduled reboots EC2 does itself.
    if let Some((code, nb)) =
        s.events.iter().find(|(c, _)| matches!(c.as_str(), "instance-retirement" | "instance-stop" | "system-maintenance"))
    {
        return Ec2Signal::Retiring { event: code.clone(), not_before: nb.clone() };
    }
    Ec2Signal::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_statuses_become_signals() {
        let st = |state: &str, system: &str, events: Vec<(&str, &str)>| InstanceStatus {
            id: "i-1".into(),
            state: state.into(),
            system: system.into(),
            instance: "ok".into(),
            ebs: String::new(),
            events: events.into_iter().map(|(a, b)| (a.into(), b.into())).collect(),
        };
        assert_eq!(ec2_signal(&st("running", "ok", vec![])), Ec2Signal::Ok);
        assert_eq!(ec2_signal(&st("pending", "initializing", vec![])), Ec2Signal::Ok);
        assert!(matches!(ec2_signal(&st("running", "impaired", vec![])), Ec2Signal::Impaired { .. }));
        assert!(matches!(
            ec2_signal(&st("running", "ok", vec![("instance-retirement", "2026-12-03T00:00:00Z")])),
            Ec2Signal::Retiring { .. }
        ));
        assert_eq!(ec2_signal(&st("running", "ok", vec![("system-reboot", "x")])), Ec2Signal::Ok, "EC2 reboots it itself");
        assert!(matches!(ec2_signal(&st("stopped", "not-applicable", vec![])), Ec2Signal::Stopped { .. }));
        assert!(matches!(ec2_signal(&st("terminated", "not-applicable", vec![])), Ec2Signal::Gone { .. }));
    }

    #[test]
    fn the_probe_url_takes_the_sites_hostname() {
        let mut rec = crate::domain::recovery::SiteRecovery::default();
        assert_eq!(probe_url("https://{hostname}/health-check", &rec), None, "no hostname: no probe");
        rec.dns = Some(crate::domain::recovery::DnsRecord { zone_id: "Z".into(), name: "ci.example.com".into(), ttl: 60 });
        assert_eq!(probe_url("https://{hostname}/health-check", &rec).as_deref(), Some("https://ci.example.com/health-check"));
        rec.hostname = "circleci.internal".into();
        assert_eq!(probe_url("https://{hostname}/x", &rec).as_deref(), Some("https://circleci.internal/x"));
        assert_eq!(probe_url("http://10.0.0.1/health-check", &rec).as_deref(), Some("http://10.0.0.1/health-check"));
        assert_eq!(probe_url("", &rec), None);
    }

    /// A fleet of `n` sites on one fake EC2 (primaries `i-0000000N`, each
    /// with one available backup), no agent connected, the app probe
    /// pointing at a closed port; and its monitor.
    async fn fleet(
        n: usize,
        config: HealthConfig,
        health: HealthPolicy,
    ) -> (tempfile::TempDir, std::sync::Arc<crate::testkit::FakeEc2>, Monitor) {
        use crate::domain::model::LaunchFacts;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(&dir.path().join("s.db")).await.expect("store");
        let fake = std::sync::Arc::new(crate::testkit::FakeEc2::default());
        // A port nothing listens on (bound, then closed at once).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let mut policies = HashMap::new();
        let now = now_ms();
        for i in 0..n {
            let (site, inst, image) = (format!("s{i}"), format!("i-{i:08x}"), format!("ami-{i:08x}"));
            store
                .upsert_site(Site { id: site.clone(), region: "us-east-1".into(), primary_instance_id: inst.clone(), role_arn: None })
                .await
                .expect("site");
            fake.add_instance(&inst, "10.0.0.5");
            fake.add_image(&image);
            let b = crate::testkit::available_backup(&site, &inst, &image, now - 60_000, now - 30_000);
            store.insert_rebuilt_backup(b).await.expect("backup");
            let facts = LaunchFacts {
                instance_id: inst,
                instance_type: "m5.xlarge".into(),
                subnet_id: "subnet-1".into(),
                private_ip: "10.0.0.5".into(),
                ..LaunchFacts::default()
            };
            store.put_launch_facts(image, site.clone(), facts).await.expect("facts");
            // "closed": a probe that always fails; else the policy's URL
            // (the default needs a hostname these sites lack: no probe).
            let url = if health.url == "closed" { format!("http://{closed}/health-check") } else { health.url.clone() };
            policies.insert(site, crate::domain::policy::Policy { health: HealthPolicy { url, ..health.clone() }, ..Default::default() });
        }
        let deps = crate::workflows::Deps {
            store: store.clone(),
            registry: crate::agents::Registry::default(),
            ec2: std::sync::Arc::new(crate::cloud::Ec2Clients::fixed(crate::config::AwsConfig::default(), fake.clone())),
            backup: crate::config::BackupConfig::default(),
            policies,
            recovery: HashMap::new(),
            failover: crate::domain::recovery::FailoverConfig { agent_timeout: Duration::from_secs(600), ..Default::default() },
            drill: Default::default(),
            aws: crate::config::AwsConfig::default(),
            dns: tokio::sync::OnceCell::new(),
            gate: Default::default(),
        };
        let engine = crate::workflows::engine(deps);
        let notifier = Notifier { store: store.clone(), sinks: std::sync::Arc::new(vec![]) };
        let monitor = Monitor::new(engine, config, notifier, HttpClients::default(), Duration::ZERO).await.expect("monitor");
        (dir, fake, monitor)
    }

    fn auto(confirm_for: Duration) -> HealthPolicy {
        HealthPolicy {
            mode: AutoMode::Auto,
            confirm_for,
            timeout: Duration::from_millis(500),
            url: "closed".into(),
            ..HealthPolicy::default()
        }
    }

    fn kinds(p: &Pass, kind: &str) -> usize {
        p.events.iter().filter(|e| e.kind == kind).count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_agent_silent_and_every_probe_failing_fails_over_nothing_and_alerts_once() {
        crate::reconcilers::tests_support::install_crypto();
        let (_dir, fake, mut m) = fleet(10, HealthConfig::default(), auto(Duration::ZERO)).await;
        let mut guards = 0;
        for pass in 0..3 {
            let p = m.pass(now_ms() + pass * 1000).await.expect("pass");
            assert!(p.guard, "the guard holds with 10 of 10 sites silent");
            assert!(p.started.is_empty(), "nothing started: {:?}", p.started);
            // Agent silent and probe failing cross one path: a partition.
            assert!(
                p.health.values().all(|h| h.condition == Condition::Partitioned),
                "{:?}",
                p.health.values().map(|h| h.condition).collect::<Vec<_>>()
            );
            guards += kinds(&p, "fleet.guard");
            assert_eq!(p.ec2_calls, 1, "10 sites of one region: one DescribeInstanceStatus");
        }
        assert_eq!(guards, 1, "one fleet alert, not one per pass or per site");
        assert_eq!(fake.calls_of("RunInstances") + fake.calls_of("StopInstances"), 0, "nothing changed in EC2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn confirmation_concurrency_and_cooldown_limit_automatic_failovers() {
        crate::reconcilers::tests_support::install_crypto();
        let config = HealthConfig { max_down_fraction: 1.0, max_concurrent_failovers: 1, ..HealthConfig::default() };
        let (_dir, fake, mut m) = fleet(3, config, auto(Duration::from_secs(120))).await;
        for i in 0..3 {
            fake.lock().instances[i].instance.state = "terminated".into();
        }
        let t0 = now_ms();
        let p = m.pass(t0).await.expect("pass");
        assert!(p.started.is_empty(), "within confirm_for nothing starts");
        assert!(p.health.values().all(|h| h.state == HealthState::Down && h.condition == Condition::InstanceGone));
        let p = m.pass(t0 + 119_000).await.expect("pass");
        assert!(p.started.is_empty(), "still within confirm_for");
        let p = m.pass(t0 + 121_000).await.expect("pass");
        assert_eq!(p.started.len(), 1, "max_concurrent_failovers = 1: {:?}", p.started);
        assert_eq!(kinds(&p, "failover.not_started"), 2, "the two held are told: {:?}", p.events);
        let p = m.pass(t0 + 122_000).await.expect("pass");
        assert!(p.started.is_empty(), "the first still runs: no second one");
        assert_eq!(kinds(&p, "failover.not_started"), 0, "each hold is reported once");
        // The running failover ends (aborted): the site keeps its cooldown.
        let (site, _, op) = m
            .engine
            .store()
            .active_detail()
            .await
            .expect("active")
            .into_iter()
            .map(|a| (a.site_id, a.kind, a.id))
            .find(|a| a.1 == "failover")
            .expect("one failover");
        m.engine.signal(&op, Signal::Abort, "test").await.expect("abort");
        for _ in 0..200 {
            if m.engine.store().active_detail().await.expect("active").iter().all(|a| a.id != op) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = m.pass(t0 + 123_000).await.expect("pass");
        assert_eq!(p.started.len(), 1, "a slot is free: the next site fails over");
        assert_ne!(p.started[0].0, site, "not the site that just failed over (one failover per episode)");
        let h = &p.health[&site];
        assert!(h.tried(Rung::Failover).is_some_and(|a| a.failed), "the aborted failover counts as failed: {h:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unanswered_approval_is_reported_once_and_a_second_failure_within_the_cooldown_is_held() {
        crate::reconcilers::tests_support::install_crypto();
        let min = 60_000;
        let policy = HealthPolicy {
            mode: AutoMode::Approve,
            url: String::new(),
            approval_timeout: Duration::from_secs(600),
            ..auto(Duration::ZERO)
        };
        let (_dir, fake, mut m) = fleet(1, HealthConfig::default(), policy).await;
        let (site, inst) = ("s0".to_owned(), "i-00000000".to_owned());
        fake.lock().instances[0].instance.state = "terminated".into();
        let t0 = now_ms();
        let p = m.pass(t0).await.expect("pass");
        assert_eq!(p.started.len(), 1, "{:?}", p.events);
        assert_eq!(kinds(&p, "failover.awaiting_approval"), 1);
        let op = p.started[0].2.clone();
        let store = m.engine.store().clone();
        for _ in 0..200 {
            if store.operation(op.clone()).await.expect("op").is_some_and(|o| o.waiting_for.starts_with("approval")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = m.pass(t0 + 11 * min).await.expect("pass");
        assert_eq!(kinds(&p, "failover.approval_overdue"), 1, "reported after approval_timeout: {:?}", p.events);
        let p = m.pass(t0 + 12 * min).await.expect("pass");
        assert_eq!(kinds(&p, "failover.approval_overdue"), 0, "once");
        assert!(p.started.is_empty(), "still one failover");
        assert_eq!(fake.calls_of("RunInstances"), 0, "nothing launched without the approval");

        // Denied: the site needs a human; then it comes back by itself.
        m.engine.signal(&op, Signal::Deny, "test").await.expect("deny");
        for _ in 0..200 {
            if store.active_detail().await.expect("active").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = m.pass(t0 + 13 * min).await.expect("pass");
        assert_eq!(kinds(&p, "failover.failed"), 1, "the denied failover ended: {:?}", p.events);
        assert_eq!(kinds(&p, "site.needs_human"), 1, "{:?}", p.events);
        fake.lock().instances[0].instance.state = "running".into();
        let record = crate::domain::model::InstanceRecord { site_id: site.clone(), instance_id: inst.clone(), ..Default::default() };
        let _session = m.engine.deps().registry.attach(record, Role::Primary);
        let p = m.pass(t0 + 14 * min).await.expect("pass");
        assert_eq!(p.health[&site].state, HealthState::Healthy, "{:?}", p.health[&site]);
        assert_eq!(kinds(&p, "site.recovered"), 1);

        // A second failure within the hour: held by the cooldown, once.
        fake.lock().instances[0].instance.state = "terminated".into();
        m.engine.deps().registry.set_role(&site, &inst, Role::Passive { reason: "test: gone".into() });
        let p = m.pass(t0 + 20 * min).await.expect("pass");
        assert!(p.started.is_empty(), "cooldown: {:?}", p.started);
        let held: Vec<&Event> = p.events.iter().filter(|e| e.kind == "failover.not_started").collect();
        assert!(held.len() == 1 && held[0].summary.contains("cooldown"), "{held:?}");
        let p = m.pass(t0 + 30 * min).await.expect("pass");
        assert_eq!(kinds(&p, "failover.not_started"), 0, "reported once");
        let p = m.pass(t0 + 61 * min).await.expect("pass");
        assert_eq!(p.started.len(), 1, "after the cooldown it fails over: {:?}", p.events);
    }

    /// Agents of every site attached, answering `health_check` with `local`.
    fn attach_agents(m: &Monitor, n: usize, local: fn() -> crate::testkit::FakeAnswer) -> Vec<crate::testkit::FakeAgent> {
        (0..n)
            .map(|i| {
                crate::testkit::FakeAgent::attach(
                    &m.engine.deps().registry,
                    &format!("s{i}"),
                    &format!("i-{i:08x}"),
                    Role::Primary,
                    move |a| if a == "health_check" { local() } else { crate::testkit::fake_ok(a) },
                )
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_outage_of_the_controller_restarts_no_app_anywhere() {
        crate::reconcilers::tests_support::install_crypto();
        let policy = HealthPolicy { repair_after: Duration::ZERO, ..auto(Duration::ZERO) };
        let (_dir, fake, mut m) = fleet(5, HealthConfig::default(), policy).await;
        // Every agent talks; the app answers on every machine.
        let agents = attach_agents(&m, 5, || crate::testkit::fake_ok("health_check"));
        let t0 = now_ms();
        let mut guards = 0;
        for pass in 0..3 {
            let p = m.pass(t0 + pass * 1000).await.expect("pass");
            assert!(p.started.is_empty(), "nothing restarted: {:?}", p.started);
            assert!(
                p.health.values().all(|h| h.condition == Condition::AppUnreachable),
                "{:?}",
                p.health.values().map(|h| h.condition).collect::<Vec<_>>()
            );
            assert!(p.guard, "5 of 5 probes failing: the controller's probe is at fault");
            assert!(
                !p.events.iter().any(|e| e.kind.starts_with("site.") || e.kind.starts_with("repair.")),
                "one fleet alert, none per site: {:?}",
                p.events
            );
            guards += kinds(&p, "fleet.guard");
        }
        assert_eq!(guards, 1);
        for a in &agents {
            let cmds = a.commands.lock().expect("lock").clone();
            assert!(cmds.iter().all(|c| c.ends_with(":health_check")), "only health checks: {cmds:?}");
        }
        assert_eq!(fake.calls_of("StopInstances"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_app_failing_on_its_machine_too_rung_1_runs_within_its_cooldown_and_concurrency() {
        crate::reconcilers::tests_support::install_crypto();
        let config = HealthConfig { max_down_fraction: 1.0, max_concurrent_repairs: 1, ..HealthConfig::default() };
        let policy = HealthPolicy { repair_after: Duration::ZERO, ..auto(Duration::ZERO) };
        let (_dir, _fake, mut m) = fleet(2, config, policy).await;
        let _agents = attach_agents(&m, 2, || crate::testkit::fake_failure("HTTP 503 from http://127.0.0.1/health-check"));
        let t0 = now_ms();
        let p = m.pass(t0).await.expect("pass");
        assert!(p.health.values().all(|h| h.condition == Condition::AppDown), "{:?}", p.health);
        assert_eq!(p.started.len(), 1, "max_concurrent_repairs = 1: {:?}", p.started);
        assert_eq!(p.started[0].1, Rung::AppRestart);
        assert_eq!(kinds(&p, "repair.not_started"), 1, "the other is told why: {:?}", p.events);
        assert!(p.events.iter().any(|e| e.kind == "repair.not_started" && e.summary.contains("max_concurrent_repairs")), "{:?}", p.events);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_approval_asked_on_evidence_that_heals_is_withdrawn_and_not_counted() {
        crate::reconcilers::tests_support::install_crypto();
        let policy = HealthPolicy { mode: AutoMode::Approve, url: String::new(), ..auto(Duration::ZERO) };
        let (_dir, fake, mut m) = fleet(1, HealthConfig::default(), policy).await;
        fake.lock().instances[0].instance.state = "terminated".into();
        let t0 = now_ms();
        let p = m.pass(t0).await.expect("pass");
        let op = p.started.first().map(|s| s.2.clone()).expect("a failover asks for an approval");
        let store = m.engine.store().clone();
        for _ in 0..200 {
            if store.operation(op.clone()).await.expect("op").is_some_and(|o| o.waiting_for.starts_with("approval")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = m.pass(t0 + 1000).await.expect("pass");
        assert_eq!(p.health["s0"].state, HealthState::Down, "awaiting an approval is not recovering: {:?}", p.health["s0"]);
        // EC2 and the agent are back.
        fake.lock().instances[0].instance.state = "running".into();
        let _agent = attach_agents(&m, 1, || crate::testkit::fake_ok("health_check"));
        let p = m.pass(t0 + 2000).await.expect("pass");
        assert_eq!(kinds(&p, "failover.withdrawn"), 1, "{:?}", p.events);
        assert_eq!(p.health["s0"].state, HealthState::Healthy);
        for _ in 0..200 {
            if store.operation(op.clone()).await.expect("op").is_some_and(|o| o.state.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = m.pass(t0 + 3000).await.expect("pass");
        assert_eq!(kinds(&p, "failover.failed"), 0, "its end is the withdrawal: {:?}", p.events);
        // Lost again a minute later: asked again, no cooldown from the
        // withdrawn request.
        fake.lock().instances[0].instance.state = "terminated".into();
        m.engine.deps().registry.set_role("s0", "i-00000000", Role::Passive { reason: "test: gone".into() });
        let p = m.pass(t0 + 60_000).await.expect("pass");
        assert_eq!(kinds(&p, "failover.awaiting_approval"), 1, "{:?}", p.events);
        assert_eq!(fake.calls_of("RunInstances") + fake.calls_of("StopInstances"), 0, "nothing without an approval");
    }
}
