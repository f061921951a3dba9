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
//! Guards, in this order, before a failover starts:
//! - the fleet guard (`[health] max_down_fraction`): too many silent agents
//!   at once means the controller is cut off; nothing fails over, one
//!   `fleet.guard` event;
//! - the site's mode (`auto_failover`), its `cooldown`;
//! - `[health] max_concurrent_failovers` automatic failovers at once;
//! - a running drill or spare preparation of the site is aborted first; a
//!   running backup is preempted by the engine (its quiesce lifted first);
//!   another failover or repair of the site means it is recovering already.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use super::notify::{Notifier, event};
use crate::cloud::ec2::{InstanceStatus, STATUS_IDS_PER_CALL};
use crate::cloud::http::HttpClients;
use crate::config::HealthConfig;
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

pub struct Monitor {
    pub engine: Engine,
    pub config: HealthConfig,
    pub notifier: Notifier,
    pub http: HttpClients,
    /// Whether the fleet guard holds (from the event log at start).
    guard: bool,
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
    pub async fn new(engine: Engine, config: HealthConfig, notifier: Notifier, http: HttpClients, agent_grace: Duration) -> Result<Monitor, StoreError> {
        let store = engine.store();
        let on = store.last_event(String::new(), "fleet.guard".into()).await?.map(|e| e.seq);
        let off = store.last_event(String::new(), "fleet.guard_cleared".into()).await?.map(|e| e.seq);
        let guard = on.is_some_and(|on| off.is_none_or(|off| off < on));
        let quiet_until_ms = now_ms() + agent_grace.as_millis() as u64;
        Ok(Monitor { engine, config, notifier, http, guard, quiet_until_ms, pruned_at_ms: 0 })
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

        // Signals and conditions.
        for site in &sites {
            let mut h = stored.remove(&site.id).unwrap_or_else(|| SiteHealth::new(&site.id, now));
            let agent = match live.get(&site.id).and_then(|l| l.iter().find(|l| l.record.instance_id == site.primary_instance_id)) {
                Some(l) if matches!(l.role, Role::Primary | Role::Pending) => AgentSignal::Live,
                Some(l) => AgentSignal::Silent { last_seen_ms: Some(l.record.last_seen_ms) },
                None => AgentSignal::Silent {
                    last_seen_ms: store.instance(site.id.clone(), site.primary_instance_id.clone()).await?.map(|r| r.last_seen_ms).filter(|t| *t > 0),
                },
            };
            let e = Evidence {
                agent,
                ec2: ec2.get(&site.id).cloned().unwrap_or(Ec2Signal::Unknown { error: "not asked".into() }),
                probe: probes.get(&site.id).cloned().unwrap_or(ProbeSignal::NotConfigured),
            };
            let condition = Condition::of(&e);
            if !same_episode_class(h.condition, condition) {
                h.condition_since_ms = now;
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

        // The fleet guard.
        let silent = records.values().filter(|h| h.evidence.as_ref().is_some_and(Condition::agent_silent)).count();
        let guard = fleet_guard_trips(silent, sites.len(), self.config.max_down_fraction);
        if guard != self.guard {
            let kind = if guard { "fleet.guard" } else { "fleet.guard_cleared" };
            let summary = if guard {
                format!(
                    "{silent} of {} sites have a silent agent at once (more than {:.0} %): the fault is taken to be on the controller's side; no site is failed over while this holds",
                    sites.len(),
                    self.config.max_down_fraction * 100.0
                )
            } else {
                format!("{silent} of {} sites have a silent agent: the fleet guard is lifted", sites.len())
            };
            events.push(event("", kind, if guard { "critical" } else { "info" }, summary, json!({"silent": silent, "sites": sites.len()}), ""));
            self.guard = guard;
        }

        // Decisions.
        let mut auto_failovers = active.iter().filter(|a| a.kind == "failover" && a.requested_by == REQUESTED_BY).count();
        let mut started = vec![];
        let mut decided = vec![];
        for site in &sites {
            let policy = deps.policy(&site.id).health;
            let h = records.get_mut(&site.id).expect("every site has a record");
            let ops: Vec<&ActiveDetail> = by_site.get(site.id.as_str()).cloned().unwrap_or_default();
            let recovering = ops.iter().any(|o| matches!(o.kind.as_str(), "failover" | "app_restart" | "host_restart"));
            let before = h.state;
            let evidence = h.evidence.clone().map(|e| json!({"lines": e.lines(now), "signals": e, "condition": h.condition.as_str()})).unwrap_or(json!({}));
            let mut decision = if recovering { Decision::Wait("a recovery of the site is running".into()) } else { decide(h, &policy, now) };
            if let (Some(p), Decision::Start(rung, why)) = (pauses.get(&site.id), &decision) {
                decision = Decision::Wait(format!("{why}: {} is not started, automatic recovery is paused by {} ({})", rung.as_str(), p.by, p.reason));
            }
            // A backup may stop or freeze the app on purpose (quiesce): the
            // app probe failing then is no reason to restart it.
            if matches!(decision, Decision::Start(Rung::AppRestart, _)) && ops.iter().any(|o| o.kind == "backup") {
                decision = Decision::Wait("the app probe fails while a backup runs (its quiesce may stop or freeze the app): waiting for it to end".into());
            }

            // Deadlines and approvals of what runs.
            for o in ops.iter().filter(|o| o.requested_by == REQUESTED_BY) {
                let age = Duration::from_millis(now.saturating_sub(o.created_at_ms));
                if o.kind == "host_restart" && age > policy.host_restart_deadline && o.state != OperationState::Cancelling {
                    let _ = engine.signal(&o.id, Signal::Abort, REQUESTED_BY).await;
                    events.push(event(&site.id, "repair.failed", "critical", format!("the host restart {} did not finish within host_restart_deadline {}: aborted", o.id, humantime::format_duration(policy.host_restart_deadline)), evidence.clone(), &o.id));
                }
                if o.kind == "failover" && o.waiting_for.starts_with("approval") && age > policy.approval_timeout && once(h, &format!("approval-overdue-{}", o.id)) {
                    events.push(event(&site.id, "failover.approval_overdue", "critical", format!("the automatic failover {} has waited for an approval for more than {}: `drctl approve {}` or `drctl deny {}`", o.id, humantime::format_duration(policy.approval_timeout), o.id, o.id), evidence.clone(), &o.id));
                }
            }

            if let Decision::Start(rung, why) = decision.clone() {
                decided.push((site.id.clone(), rung));
                match self.start(site, h, rung, &why, &policy, &ops, guard, auto_failovers, now).await {
                    Ok(Some(op)) => {
                        if rung == Rung::Failover {
                            auto_failovers += 1;
                            h.last_auto_failover_ms = now;
                        }
                        h.attempts.push(Attempt { rung: Some(rung), operation_id: op.clone(), at_ms: now, failed: false });
                        let (kind, summary) = match rung {
                            Rung::Failover if policy.mode == AutoMode::Approve => ("failover.awaiting_approval", format!("{why}: an automatic failover waits for an approval: `drctl approve {op}` or `drctl deny {op}`")),
                            Rung::Failover => ("failover.started", format!("{why}: automatic failover {op} started")),
                            Rung::AppRestart => ("repair.started", format!("{why}: restarting the app through the agent ({op})")),
                            Rung::HostRestart => ("repair.started", format!("{why}: stopping and starting the instance {} ({op})", site.primary_instance_id)),
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
            match &decision {
                Decision::Human(why) if once(h, &format!("human-{}", h.condition.as_str())) => {
                    events.push(event(&site.id, "site.needs_human", "critical", why.clone(), evidence.clone(), ""));
                }
                Decision::Alert(why) if once(h, &format!("alert-{}", h.condition.as_str())) => {
                    let kind = if h.condition == Condition::Partitioned { "site.partitioned" } else { "site.needs_human" };
                    events.push(event(&site.id, kind, "warning", why.clone(), evidence.clone(), ""));
                }
                _ => {}
            }
            h.decision = match &decision {
                Decision::Wait(s) | Decision::Start(_, s) | Decision::Human(s) | Decision::Alert(s) => s.clone(),
            };
            let recovering_now = recovering || started.iter().any(|(s, _, _)| s == &site.id);
            h.state = state_of(h.condition, recovering_now, &decision);
            if h.state != before {
                h.since_ms = now;
                let lines = h.evidence.as_ref().map(|e| e.lines(now).join("; ")).unwrap_or_default();
                match h.state {
                    HealthState::Suspect => events.push(event(&site.id, "site.suspect", "warning", format!("{}: {lines}", h.condition.as_str()), evidence.clone(), "")),
                    HealthState::Down => events.push(event(&site.id, "site.down", "critical", format!("{}: {lines}", h.condition.as_str()), evidence.clone(), "")),
                    HealthState::Healthy => {
                        events.push(event(&site.id, "site.recovered", "info", format!("healthy again after {} ({lines})", before.as_str()), evidence.clone(), ""));
                    }
                    HealthState::Recovering => {}
                }
            }
            if h.state == HealthState::Healthy {
                h.attempts.clear();
                h.alerted.clear();
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
        Ok(Pass { health: records, started, decided, events: recorded, guard, ec2_calls })
    }

    /// Starts `rung` for a site, or says why it is held. `Ok(None)`: not now
    /// (waiting for an aborted drill to end), nothing to report.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        site: &Site,
        h: &SiteHealth,
        rung: Rung,
        why: &str,
        policy: &HealthPolicy,
        ops: &[&ActiveDetail],
        guard: bool,
        auto_failovers: usize,
        now: Millis,
    ) -> Result<Option<String>, Held> {
        let engine = &self.engine;
        if policy.mode == AutoMode::Off {
            return Err(Held::new("failover.not_started", "mode", "auto_failover = \"off\" for this site: nothing automatic is done (set it to \"approve\" or \"auto\")"));
        }
        if rung == Rung::Failover {
            if guard {
                return Err(Held::new("failover.not_started", "guard", "the fleet guard holds (too many sites look down at once): no failover"));
            }
            let since = now.saturating_sub(h.last_auto_failover_ms);
            if h.last_auto_failover_ms > 0 && since < policy.cooldown.as_millis() as u64 {
                return Err(Held::new(
                    "failover.not_started",
                    "cooldown",
                    format!("the site's last automatic failover started {} ago (cooldown {})", humantime::format_duration(Duration::from_secs(since / 1000)), humantime::format_duration(policy.cooldown)),
                ));
            }
            if auto_failovers >= self.config.max_concurrent_failovers as usize {
                return Err(Held::new("failover.not_started", "concurrency", format!("{auto_failovers} automatic failovers run already (max_concurrent_failovers {})", self.config.max_concurrent_failovers)));
            }
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
            Rung::AppRestart => failover::start_state::<repair::AppRestart>(engine, repair::state(&site.id, &site.primary_instance_id, &region, why), requested_by, None).await,
            Rung::HostRestart => failover::start_state::<repair::HostRestart>(engine, repair::state(&site.id, &site.primary_instance_id, &region, why), requested_by, None).await,
            Rung::Failover => {
                // Same region when EC2 answers there; else the first DR
                // region the site can launch in.
                let home_down = matches!(h.evidence.as_ref().map(|e| &e.ec2), Some(Ec2Signal::Unknown { .. }));
                let dr = engine.deps().recovery(&site.id).launch.regions.keys().find(|r| **r != site.region).cloned();
                let req = plan::Request { region: if home_down { dr.unwrap_or_default() } else { String::new() }, ..Default::default() };
                let mut plan = plan::make(engine.deps(), site, &req)
                    .await
                    .map_err(|e| Held::new("failover.not_started", "plan", format!("no failover can be planned: {e}")))?;
                if policy.mode == AutoMode::Approve {
                    plan.approval = format!("automatic failover of `{}`: {why}", site.id);
                }
                failover::start(engine, plan, requested_by).await
            }
        };
        match started {
            Ok(op) => {
                tracing::warn!(site = %site.id, operation = %op.id, rung = rung.as_str(), why, "automatic recovery started");
                Ok(Some(op.id))
            }
            Err(e) => Err(Held::new(if rung == Rung::Failover { "failover.not_started" } else { "repair.failed" }, "start", format!("it could not start: {e}"))),
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
                            let sig = found.iter().find(|f| f.id == s.primary_instance_id).map(ec2_signal).unwrap_or(Ec2Signal::Gone { state: "unknown to EC2".into() });
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
                        Ok(a) => ProbeSignal::Failed { detail: format!("{url} answered HTTP {} (expected {})", a.status, policy.expect_status) },
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
            let mut e = event(&site.id, "backup.late", "warning", summary, json!({"image_id": b.image_id, "age_s": age / 1000}), "");
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
            let mut e = event(&l.record.site_id, "agent.cert_expiring", "warning", summary, json!({"instance_id": l.record.instance_id, "not_after_ms": end}), "");
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
                ("backup", false) => "backup.failed",
                ("drill", false) => "drill.failed",
                ("failover", true) => "failover.succeeded",
                ("failover", false) => "failover.failed",
                ("app_restart" | "host_restart", true) => "repair.succeeded",
                ("app_restart" | "host_restart", false) => "repair.failed",
                _ => continue,
            };
            let summary = match ok {
                true => format!("{} {} succeeded (requested by {})", o.kind, o.id, o.requested_by),
                false => format!("{} {} {}: {} (requested by {})", o.kind, o.id, o.state.as_str(), o.error, o.requested_by),
            };
            let mut e = event(&o.site_id, kind, if ok { "info" } else { "critical" }, summary, json!({"state": o.state.as_str(), "error": o.error}), &o.id);
            e.id = format!("{}-{}", o.id, o.state.as_str());
            e.at_ms = o.updated_at_ms;
            out.push(e);
        }
        Ok(out)
    }
}

/// Why a rung is not started now; `key` makes its event once per episode.
struct Held {
    kind: &'static str,
    key: &'static str,
    why: String,
}

impl Held {
    fn new(kind: &'static str, key: &'static str, why: impl Into<String>) -> Held {
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
    a == b || (a.confirmed_down() && b.confirmed_down()) || matches!((a, b), (Condition::HostImpaired | Condition::HostStopped, Condition::HostImpaired | Condition::HostStopped))
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
    match s.state.as_str() {
        "stopping" | "stopped" => return Ec2Signal::Stopped { state: s.state.clone() },
        "shutting-down" | "terminated" => return Ec2Signal::Gone { state: s.state.clone() },
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
    if let Some((code, nb)) = s.events.iter().find(|(c, _)| matches!(c.as_str(), "instance-retirement" | "instance-stop" | "system-maintenance")) {
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
        assert!(matches!(ec2_signal(&st("running", "ok", vec![("instance-retirement", "2026-12-03T00:00:00Z")])), Ec2Signal::Retiring { .. }));
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
    async fn fleet(n: usize, config: HealthConfig, health: HealthPolicy) -> (tempfile::TempDir, std::sync::Arc<crate::testkit::FakeEc2>, Monitor) {
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
            store.upsert_site(Site { id: site.clone(), region: "us-east-1".into(), primary_instance_id: inst.clone(), role_arn: None }).await.expect("site");
            fake.add_instance(&inst, "10.0.0.5");
            fake.add_image(&image);
            let b = crate::testkit::available_backup(&site, &inst, &image, now - 60_000, now - 30_000);
            store.insert_rebuilt_backup(b).await.expect("backup");
            let facts = LaunchFacts { instance_id: inst, instance_type: "m5.xlarge".into(), subnet_id: "subnet-1".into(), private_ip: "10.0.0.5".into(), ..LaunchFacts::default() };
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
        };
        let engine = crate::workflows::engine(deps);
        let notifier = Notifier { store: store.clone(), sinks: std::sync::Arc::new(vec![]) };
        let monitor = Monitor::new(engine, config, notifier, HttpClients::default(), Duration::ZERO).await.expect("monitor");
        (dir, fake, monitor)
    }

    fn auto(confirm_for: Duration) -> HealthPolicy {
        HealthPolicy { mode: AutoMode::Auto, confirm_for, timeout: Duration::from_millis(500), url: "closed".into(), ..HealthPolicy::default() }
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
            assert!(p.health.values().all(|h| h.condition == Condition::MachineDead), "{:?}", p.health.values().map(|h| h.condition).collect::<Vec<_>>());
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
        let (site, _, op) = m.engine.store().active_detail().await.expect("active").into_iter().map(|a| (a.site_id, a.kind, a.id)).find(|a| a.1 == "failover").expect("one failover");
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
        let policy = HealthPolicy { mode: AutoMode::Approve, url: String::new(), approval_timeout: Duration::from_secs(600), ..auto(Duration::ZERO) };
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
}

