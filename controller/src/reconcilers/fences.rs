//! The fence keeper: an old primary that a failover recorded `fenced` must
//! stay stopped. Every `[health] fence_interval` it looks every fenced
//! instance of every site up, in EC2 (one DescribeInstances per account
//! and region for up to 1,000 instances, through the budgeted clients) and
//! in the live agent sessions. One seen running again (EC2 says `pending`
//! or `running`, or its agent is connected while EC2 does not say it is
//! stopped) is a *breach*:
//!
//! - the store is read again first: only an instance still recorded
//!   `fenced`, and never the site's primary (between a failover's fence and
//!   its promotion the old primary is both), is stopped;
//! - StopInstances, forced once the instance has not stopped within
//!   `failover.fence_timeout` (as the failover's fence does); a failed or
//!   ineffective stop is tried again with backoff ([`FOLLOW_UP`] doubling,
//!   at most [`RETRY_MAX`]);
//! - the event `fence.breached` names the instance, the site, how it was
//!   seen and what was done; `fence.restored` follows once EC2 says it is
//!   stopped (or terminated, or gone); status shows the breach as a
//!   problem of its site in between ([`Fences::problems`]).
//!
//! While a breach is open the keeper looks every [`FOLLOW_UP`] instead of
//! every `fence_interval`, so the restoration is seen within seconds.
//! Its agent, told it is fenced, keeps the app stopped on the machine by
//! itself (see the agent's `fence` module): the fence holds even when this
//! StopInstances is denied. An instance whose region is not recorded is
//! looked for in the site's region and in its home region.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::domain::events::EventKind;
use crate::domain::model::{Event, InstanceRecord, Millis, Site, now_ms};
use crate::store::StoreError;
use crate::workflows::{Deps, Engine, retry_ec2};

use super::notify::{Notifier, event};
use crate::cloud::ec2::InstanceState;

/// How often the keeper looks while a breach is open.
pub const FOLLOW_UP: Duration = Duration::from_secs(5);
/// The longest wait between two stops of a breached instance.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Budget of one call (throttling): short, the next pass asks again.
const EC2_BUDGET: Duration = Duration::from_secs(20);
/// Instances per DescribeInstances.
const BATCH: usize = 1000;

/// What `fence.breached` / `fence.restored` evidence holds, read back typed
/// at start (the fields this keeper wrote; absent ones empty).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct BreachEvidence {
    instance_id: String,
    region: String,
    seen: String,
    ec2_state: String,
    stops: u32,
    stop_error: String,
}

impl BreachEvidence {
    fn of(evidence: &serde_json::Value) -> BreachEvidence {
        serde_json::from_value(evidence.clone()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a fence event's evidence does not read as written; taken as empty");
            BreachEvidence::default()
        })
    }
}

/// An open breach: a fenced instance seen running, not stopped again yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breach {
    pub site_id: String,
    pub instance_id: String,
    /// Where EC2 has it ("" when only its agent was seen).
    pub region: String,
    pub since_ms: Millis,
    /// How it was seen first (`EC2 says running`, `its agent connected`).
    pub seen: String,
    /// EC2's last word on it (`unknown` when EC2 could not be asked).
    pub ec2_state: String,
    pub agent_connected: bool,
    /// The app state its agent last reported ("" when not connected).
    pub app_state: String,
    /// StopInstances sent (or tried) so far, and when the first was.
    pub stops: u32,
    pub first_stop_ms: Millis,
    pub forced: bool,
    /// The last stop's failure ("" when it was accepted).
    pub last_error: String,
    /// No stop before this (backoff after a stop that failed or did not take).
    pub next_stop_ms: Millis,
}

impl Breach {
    /// The line status shows for it.
    pub fn problem(&self, now: Millis) -> String {
        let ago = |t: Millis| humantime::format_duration(Duration::from_secs(now.saturating_sub(t) / 1000)).to_string();
        let mut line = format!(
            "fenced instance {} is running again (seen: {}) for {}; EC2 says {}",
            self.instance_id,
            self.seen,
            ago(self.since_ms),
            self.ec2_state
        );
        if self.agent_connected {
            line.push_str(&format!(
                ", its agent is connected (app {})",
                if self.app_state.is_empty() { "state unknown" } else { &self.app_state }
            ));
        }
        match (self.stops, self.last_error.as_str()) {
            (0, _) => line.push_str("; not stopped yet"),
            (n, "") => line.push_str(&format!(
                "; {n} StopInstances sent{}, the first {} ago",
                if self.forced { " (forced)" } else { "" },
                ago(self.first_stop_ms)
            )),
            (n, e) => line.push_str(&format!("; StopInstances failed ({n} tries): {e}; stop it by hand")),
        }
        line
    }
}

/// The open breaches, shared with the admin API (status problems).
#[derive(Clone, Debug, Default)]
pub struct Fences {
    open: Arc<Mutex<BTreeMap<(String, String), Breach>>>,
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Breach>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every open breach.
    pub fn open(&self) -> Vec<Breach> {
        self.lock().values().cloned().collect()
    }

    /// Whether this instance's fence is breached now.
    pub fn is_open(&self, site: &str, instance: &str) -> bool {
        self.lock().contains_key(&(site.to_owned(), instance.to_owned()))
    }

    /// The problem lines of a site's open breaches.
    pub fn problems(&self, site: &str, now: Millis) -> Vec<String> {
        self.lock().values().filter(|b| b.site_id == site).map(|b| b.problem(now)).collect()
    }
}

/// EC2's view of one fenced instance this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ec2View {
    /// Found, in this state and region.
    State { state: InstanceState, region: String },
    /// Not found in any region asked.
    Absent,
    /// A region could not be asked.
    Unknown(String),
}

/// The keeper (see the module docs).
pub struct Keeper {
    engine: Engine,
    notifier: Notifier,
    fences: Fences,
    every: Duration,
    /// Fenced instances EC2 said are terminated: never asked again.
    terminated: HashSet<(String, String)>,
}

impl Keeper {
    /// A keeper whose open breaches are those the event log leaves open
    /// (a `fence.breached` with no `fence.restored` of its instance after
    /// it), so that a controller restart neither repeats nor forgets one.
    pub async fn new(engine: Engine, notifier: Notifier, fences: Fences, every: Duration) -> Result<Keeper, StoreError> {
        let store = engine.store();
        for site in store.sites().await? {
            let Some(b) = store.last_event(site.id.clone(), EventKind::FenceBreached.into()).await? else { continue };
            let breached = BreachEvidence::of(&b.evidence);
            let restored = store.last_event(site.id.clone(), EventKind::FenceRestored.into()).await?;
            if breached.instance_id.is_empty()
                || restored.is_some_and(|r| r.seq > b.seq && BreachEvidence::of(&r.evidence).instance_id == breached.instance_id)
            {
                continue;
            }
            fences.lock().insert(
                (site.id.clone(), breached.instance_id.clone()),
                Breach {
                    site_id: site.id.clone(),
                    instance_id: breached.instance_id,
                    region: breached.region,
                    since_ms: b.at_ms,
                    seen: breached.seen,
                    ec2_state: breached.ec2_state,
                    agent_connected: false,
                    app_state: String::new(),
                    stops: breached.stops,
                    first_stop_ms: b.at_ms,
                    forced: false,
                    last_error: breached.stop_error,
                    next_stop_ms: 0,
                },
            );
        }
        Ok(Keeper { engine, notifier, fences, every, terminated: HashSet::new() })
    }

    /// Forever: a pass at once, then every `fence_interval`, or every
    /// [`FOLLOW_UP`] while a breach is open.
    pub async fn run(mut self) {
        loop {
            match self.pass(now_ms()).await {
                Ok(events) if !events.is_empty() => tracing::debug!(events = events.len(), "fence keeper pass recorded events"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "fence keeper pass failed"),
            }
            let wait = if self.fences.lock().is_empty() { self.every } else { self.every.min(FOLLOW_UP) };
            tokio::time::sleep(wait).await;
        }
    }

    /// One pass at `now`: the events it recorded.
    pub async fn pass(&mut self, now: Millis) -> Result<Vec<Event>, StoreError> {
        let deps = self.engine.deps();
        let store = self.engine.store();
        let sites: HashMap<String, Site> = store.sites().await?.into_iter().map(|s| (s.id.clone(), s)).collect();
        let fenced: Vec<InstanceRecord> = store
            .fenced_instances()
            .await?
            .into_iter()
            .filter(|r| sites.get(&r.site_id).is_some_and(|s| s.primary_instance_id != r.instance_id))
            .filter(|r| !self.terminated.contains(&(r.site_id.clone(), r.instance_id.clone())))
            .collect();
        // Breaches of instances no longer fenced (or now the primary) end
        // without an event: nothing of ours holds them any more.
        {
            let keep: HashSet<(String, String)> = fenced.iter().map(|r| (r.site_id.clone(), r.instance_id.clone())).collect();
            self.fences.lock().retain(|k, b| {
                let kept = keep.contains(k);
                if !kept {
                    tracing::info!(site = %b.site_id, instance = %b.instance_id, "the instance is no longer fenced: its breach is closed");
                }
                kept
            });
        }
        if fenced.is_empty() {
            return Ok(vec![]);
        }
        let views = self.look_up(deps, &sites, &fenced).await?;
        let live = deps.registry.live_by_site();
        let mut events = vec![];
        for rec in &fenced {
            let site = &sites[&rec.site_id];
            let key = (rec.site_id.clone(), rec.instance_id.clone());
            let view = views.get(&key).cloned().unwrap_or(Ec2View::Absent);
            let agent = live.get(&rec.site_id).and_then(|l| l.iter().find(|a| a.record.instance_id == rec.instance_id));
            if let Some(e) = self.keep(deps, site, rec, &view, agent.map(|a| a.record.facts.app_state.clone()), now).await? {
                events.push(e);
            }
            if matches!(&view, Ec2View::State { state: InstanceState::Terminated, .. }) {
                self.terminated.insert(key);
            }
        }
        if events.is_empty() {
            return Ok(events);
        }
        self.notifier.record(vec![], events).await
    }

    /// EC2's view of every fenced instance: one DescribeInstances per
    /// account and region (≤ [`BATCH`] ids); an instance whose region is not
    /// recorded is asked for in the site's region and its home region.
    async fn look_up(
        &self,
        deps: &Deps,
        sites: &HashMap<String, Site>,
        fenced: &[InstanceRecord],
    ) -> Result<HashMap<(String, String), Ec2View>, StoreError> {
        let recorded = self.engine.store().instance_regions().await?;
        // (account, region) -> (a site of that account, instances asked there).
        type Groups = BTreeMap<(Option<String>, String), (String, Vec<(String, String)>)>;
        let mut groups: Groups = BTreeMap::new();
        for r in fenced {
            let site = &sites[&r.site_id];
            let key = (r.site_id.clone(), r.instance_id.clone());
            let regions: Vec<String> = match recorded.get(&key) {
                Some(region) => vec![region.clone()],
                None => {
                    let home = deps.recovery(&site.id).home_region;
                    let mut v = vec![site.region.clone()];
                    if !home.is_empty() && home != site.region {
                        v.push(home);
                    }
                    v
                }
            };
            for region in regions {
                groups.entry((site.role_arn.clone(), region)).or_insert_with(|| (site.id.clone(), vec![])).1.push(key.clone());
            }
        }
        let mut views: HashMap<(String, String), Ec2View> = HashMap::new();
        for ((_, region), (site_id, keys)) in groups {
            let site = &sites[&site_id];
            for chunk in keys.chunks(BATCH) {
                let ids: Vec<String> = chunk.iter().map(|k| k.1.clone()).collect();
                let found = match deps.ec2_in(site, &region).await {
                    Ok(ec2) => retry_ec2("DescribeInstances", EC2_BUDGET, || ec2.describe_instances(&ids)).await,
                    Err(e) => Err(e),
                };
                match found {
                    Ok(found) => {
                        for k in chunk {
                            match found.iter().find(|i| i.id == k.1) {
                                Some(i) => {
                                    if !recorded.contains_key(k) && region != sites[&k.0].region {
                                        // Remembered: later passes ask only there.
                                        self.engine.store().put_instance_region(k.0.clone(), k.1.clone(), region.clone()).await?;
                                    }
                                    views.insert(k.clone(), Ec2View::State { state: i.state.clone(), region: region.clone() });
                                }
                                None => {
                                    views.entry(k.clone()).or_insert(Ec2View::Absent);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%region, instances = ids.len(), error = %e, "fence keeper: DescribeInstances failed; EC2's view of these fenced instances is unknown this pass");
                        for k in chunk {
                            if !matches!(views.get(k), Some(Ec2View::State { .. })) {
                                views.insert(k.clone(), Ec2View::Unknown(e.to_string()));
                            }
                        }
                    }
                }
            }
        }
        Ok(views)
    }

    /// What one fenced instance needs this pass; the event it raises.
    async fn keep(
        &self,
        deps: &Deps,
        site: &Site,
        rec: &InstanceRecord,
        view: &Ec2View,
        app_state: Option<String>,
        now: Millis,
    ) -> Result<Option<Event>, StoreError> {
        let key = (site.id.clone(), rec.instance_id.clone());
        let open = self.fences.lock().get(&key).cloned();
        let agent_connected = app_state.is_some();
        // `None`: EC2 could not be asked this pass.
        let (state, region) = match view {
            Ec2View::State { state, region } => (Some(state.clone()), region.clone()),
            Ec2View::Absent => (Some(InstanceState::Gone), String::new()),
            Ec2View::Unknown(why) => {
                tracing::debug!(site = %site.id, instance = %rec.instance_id, error = %why, "EC2's view of a fenced instance is unknown this pass");
                (None, String::new())
            }
        };
        let ec2_state = state.as_ref().map_or_else(|| "unknown".to_owned(), InstanceState::to_string);
        let stopped = state.as_ref().is_some_and(InstanceState::is_down);
        if stopped {
            let Some(b) = open else { return Ok(None) };
            self.fences.lock().remove(&key);
            let took = humantime::format_duration(Duration::from_secs(now.saturating_sub(b.since_ms) / 1000));
            let how = if b.stops > 0 && b.last_error.is_empty() {
                format!("after {} StopInstances{}", b.stops, if b.forced { " (the last forced)" } else { "" })
            } else {
                "not by this controller".to_owned()
            };
            tracing::info!(site = %site.id, instance = %rec.instance_id, ec2_state = %ec2_state, stops = b.stops, "fenced instance stopped again");
            return Ok(Some(event(
                &site.id,
                EventKind::FenceRestored,
                "info",
                format!("fenced instance {} is {ec2_state} again, {took} after it was seen running ({how})", rec.instance_id),
                json!({"instance_id": rec.instance_id, "region": b.region, "ec2_state": ec2_state, "stops": b.stops, "forced": b.forced}),
                "",
            )));
        }
        let ec2_running = state.as_ref().is_some_and(InstanceState::is_up);
        // `stopping` is a stop under way: a breach only if one is open.
        if !ec2_running && !agent_connected && open.is_none() {
            return Ok(None);
        }
        if state == Some(InstanceState::Stopping) && open.is_none() {
            return Ok(None);
        }
        // Acting on it: the store must still say fenced and not primary.
        let still_fenced = deps.store.instance(site.id.clone(), rec.instance_id.clone()).await?.is_some_and(|r| r.role == "fenced");
        let primary = deps.store.site(site.id.clone()).await?.map(|s| s.primary_instance_id).unwrap_or_default();
        if !still_fenced || primary == rec.instance_id {
            tracing::info!(site = %site.id, instance = %rec.instance_id, still_fenced, "not stopped: the store no longer records it fenced, or it is the site's primary");
            self.fences.lock().remove(&key);
            return Ok(None);
        }
        let seen = [(ec2_running, format!("EC2 says {ec2_state}")), (agent_connected, "its agent connected".to_owned())]
            .into_iter()
            .filter_map(|(on, what)| on.then_some(what))
            .collect::<Vec<_>>()
            .join(", ");
        let mut b = open.clone().unwrap_or_else(|| Breach {
            site_id: site.id.clone(),
            instance_id: rec.instance_id.clone(),
            region: region.clone(),
            since_ms: now,
            seen: seen.clone(),
            ec2_state: ec2_state.clone(),
            agent_connected,
            app_state: String::new(),
            stops: 0,
            first_stop_ms: 0,
            forced: false,
            last_error: String::new(),
            next_stop_ms: 0,
        });
        b.ec2_state.clone_from(&ec2_state);
        b.agent_connected = agent_connected;
        b.app_state = app_state.unwrap_or_default();
        if !region.is_empty() {
            b.region.clone_from(&region);
        }
        if now >= b.next_stop_ms {
            self.stop(deps, site, &mut b, now).await;
        }
        self.fences.lock().insert(key, b.clone());
        if open.is_some() {
            return Ok(None);
        }
        let done = if b.last_error.is_empty() {
            "StopInstances sent".to_owned()
        } else {
            format!("StopInstances failed: {}; its agent, if it runs, keeps the app stopped", b.last_error)
        };
        Ok(Some(event(
            &site.id,
            EventKind::FenceBreached,
            "critical",
            format!("fenced instance {} is running again (seen: {seen}); {done}", rec.instance_id),
            json!({
                "instance_id": rec.instance_id, "region": b.region, "seen": seen, "ec2_state": ec2_state,
                "agent_connected": agent_connected, "app_state": b.app_state, "action": done,
                "stops": b.stops, "stop_error": b.last_error, "reason": rec.reason,
            }),
            "",
        )))
    }

    /// StopInstances, forced once `failover.fence_timeout` has passed since
    /// the first; the next try after backoff.
    async fn stop(&self, deps: &Deps, site: &Site, b: &mut Breach, now: Millis) {
        let timeout = deps.failover.fence_timeout.as_millis() as u64;
        let force = b.stops > 0 && now.saturating_sub(b.first_stop_ms) >= timeout;
        let region = if b.region.is_empty() { site.region.clone() } else { b.region.clone() };
        let result = match deps.ec2_in(site, &region).await {
            Ok(ec2) => retry_ec2("StopInstances", EC2_BUDGET, || ec2.stop_instance(&b.instance_id, force)).await,
            Err(e) => Err(e),
        };
        if b.stops == 0 {
            b.first_stop_ms = now;
        }
        b.stops += 1;
        b.forced |= force;
        let backoff = FOLLOW_UP.saturating_mul(1 << b.stops.saturating_sub(1).min(10)).min(RETRY_MAX);
        b.next_stop_ms = now + backoff.as_millis() as u64;
        match result {
            Ok(()) => {
                tracing::warn!(site = %site.id, instance = %b.instance_id, %region, force, stops = b.stops, "fenced instance running again: StopInstances sent");
                b.last_error.clear();
            }
            Err(e) => {
                tracing::error!(site = %site.id, instance = %b.instance_id, %region, force, stops = b.stops, error = %e,
                    retry_in_ms = backoff.as_millis() as u64, "fenced instance running again: StopInstances failed");
                b.last_error = e.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::cloud::ec2::{CopyImage, CreateImage, Ec2, Ec2Error, Image, Instance};
    use crate::domain::model::Role;
    use crate::testkit::{FakeAgent, FakeEc2};

    /// FakeEc2 with a batched DescribeInstances (counted per call) and a
    /// StopInstances that can be denied, as IAM would.
    struct Gate {
        ec2: FakeEc2,
        describes: AtomicUsize,
        deny_stop: AtomicBool,
        fail_describe: AtomicBool,
    }

    #[async_trait]
    impl Ec2 for Gate {
        async fn find_images_by_tag(&self, k: &str, v: &str) -> Result<Vec<Image>, Ec2Error> {
            self.ec2.find_images_by_tag(k, v).await
        }
        async fn create_image(&self, req: &CreateImage) -> Result<String, Ec2Error> {
            self.ec2.create_image(req).await
        }
        async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error> {
            self.ec2.describe_images(ids).await
        }
        async fn create_tags(&self, r: &[String], t: &[(String, String)]) -> Result<(), Ec2Error> {
            self.ec2.create_tags(r, t).await
        }
        async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error> {
            self.ec2.describe_instance(id).await
        }
        async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Instance>, Ec2Error> {
            self.describes.fetch_add(1, Ordering::SeqCst);
            if self.fail_describe.load(Ordering::SeqCst) {
                return Err(Ec2Error::Api { op: "DescribeInstances", code: "InternalError".into(), message: "EC2 is down (test)".into() });
            }
            Ok(self.ec2.lock().instances.iter().filter(|i| ids.contains(&i.instance.id)).map(|i| i.instance.clone()).collect())
        }
        async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
            self.ec2.describe_snapshots(ids).await
        }
        async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
            self.ec2.deregister_image(id).await
        }
        async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
            self.ec2.delete_snapshot(id).await
        }
        async fn copy_image(&self, req: &CopyImage) -> Result<String, Ec2Error> {
            self.ec2.copy_image(req).await
        }
        async fn stop_instance(&self, id: &str, force: bool) -> Result<(), Ec2Error> {
            if self.deny_stop.load(Ordering::SeqCst) {
                self.ec2.lock().calls.push("StopInstances(denied)");
                return Err(Ec2Error::PermissionDenied {
                    op: "StopInstances",
                    action: "ec2:StopInstances".into(),
                    resource: id.into(),
                    message: "UnauthorizedOperation".into(),
                });
            }
            if force {
                self.ec2.lock().calls.push("StopInstances(force)");
            }
            self.ec2.stop_instance(id, force).await
        }
    }

    struct World {
        gate: Arc<Gate>,
        engine: Engine,
        keeper: Keeper,
        fences: Fences,
        _dir: tempfile::TempDir,
    }

    /// Site `s1` (primary i-new) with the old primary i-old recorded fenced
    /// and running again, and two other sites' fenced instances stopped.
    async fn world() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let gate = Arc::new(Gate {
            ec2: FakeEc2::default(),
            describes: AtomicUsize::new(0),
            deny_stop: AtomicBool::new(false),
            fail_describe: AtomicBool::new(false),
        });
        for (id, ip) in [("i-new", "10.0.0.2"), ("i-old", "10.0.0.1"), ("i-old2", "10.0.1.1"), ("i-old3", "10.0.2.1")] {
            gate.ec2.add_instance(id, ip);
        }
        for id in ["i-old2", "i-old3"] {
            gate.ec2.lock().instances.iter_mut().filter(|i| i.instance.id == id).for_each(|i| i.instance.state = "stopped".into());
        }
        let store = crate::store::Store::open(&dir.path().join("s.db")).await.expect("store");
        for (site, primary, old) in [("s1", "i-new", "i-old"), ("s2", "i-p2", "i-old2"), ("s3", "i-p3", "i-old3")] {
            store
                .upsert_site(Site { id: site.into(), region: "us-east-1".into(), primary_instance_id: primary.into(), role_arn: None })
                .await
                .expect("site");
            store
                .set_instance_role(site.into(), old.into(), "fenced".into(), String::new(), "fenced by failover f-1".into())
                .await
                .expect("fence");
        }
        let failover = crate::domain::recovery::FailoverConfig { fence_timeout: Duration::from_secs(60), ..Default::default() };
        let engine = crate::workflows::engine(crate::workflows::Deps {
            store: store.clone(),
            registry: crate::agents::Registry::default(),
            ec2: Arc::new(crate::cloud::Ec2Clients::fixed(crate::config::AwsConfig::default(), gate.clone())),
            backup: Default::default(),
            policies: Default::default(),
            recovery: Default::default(),
            failover,
            drill: Default::default(),
            aws: Default::default(),
            dns: tokio::sync::OnceCell::new(),
            gate: Default::default(),
        });
        let fences = Fences::default();
        let notifier = Notifier { store: store.clone(), sinks: Arc::new(vec![]) };
        let keeper = Keeper::new(engine.clone(), notifier, fences.clone(), Duration::from_secs(20)).await.expect("keeper");
        World { gate, engine, keeper, fences, _dir: dir }
    }

    fn state(w: &World, id: &str) -> String {
        w.gate.ec2.instance(id).map(|i| i.instance.state.to_string()).unwrap_or_default()
    }

    async fn kinds(w: &World) -> Vec<String> {
        w.engine.store().events(String::new(), 0, 100, false).await.expect("events").into_iter().map(|e| e.kind).collect()
    }

    #[tokio::test]
    async fn a_fenced_instance_running_again_is_stopped_once_and_restored_with_events() {
        let mut w = world().await;
        let t0 = 1_000_000;
        let events = w.keeper.pass(t0).await.expect("pass");
        assert_eq!(w.gate.describes.load(Ordering::SeqCst), 1, "one DescribeInstances for three sites of one account and region");
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!((e.kind.as_str(), e.site_id.as_str(), e.severity.as_str()), ("fence.breached", "s1", "critical"));
        assert!(
            e.summary.contains("i-old") && e.summary.contains("EC2 says running") && e.summary.contains("StopInstances sent"),
            "{}",
            e.summary
        );
        assert_eq!(e.evidence["instance_id"], "i-old");
        assert_eq!(w.gate.ec2.calls_of("StopInstances"), 1, "only the breached instance is stopped");
        assert_eq!(state(&w, "i-old"), "stopped");
        assert_eq!(state(&w, "i-new"), "running", "the primary is never stopped");
        let problems = w.fences.problems("s1", t0 + 2000);
        assert!(problems.len() == 1 && problems[0].contains("fenced instance i-old is running again"), "{problems:?}");
        assert!(w.fences.problems("s2", t0).is_empty());

        // The next pass sees it stopped: restored, the problem gone.
        let events = w.keeper.pass(t0 + 5_000).await.expect("pass");
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["fence.restored"]);
        assert!(
            events[0].summary.contains("i-old is stopped again") && events[0].summary.contains("after 1 StopInstances"),
            "{}",
            events[0].summary
        );
        assert!(w.fences.problems("s1", t0 + 5_000).is_empty());
        assert_eq!(kinds(&w).await, ["fence.breached", "fence.restored"], "recorded in the event log");
        // A quiet fleet: nothing more.
        assert!(w.keeper.pass(t0 + 25_000).await.expect("pass").is_empty());
        assert_eq!(w.gate.ec2.calls_of("StopInstances"), 1);
    }

    #[tokio::test]
    async fn a_denied_stop_keeps_the_problem_retries_with_backoff_and_forces_after_the_fence_timeout() {
        let mut w = world().await;
        w.gate.deny_stop.store(true, Ordering::SeqCst);
        let t0 = 1_000_000;
        let events = w.keeper.pass(t0).await.expect("pass");
        assert!(events[0].summary.contains("StopInstances failed: permission denied: ec2:StopInstances on i-old"), "{}", events[0].summary);
        // Follow-up passes within the backoff do not call again.
        for dt in [1_000, 3_000] {
            assert!(w.keeper.pass(t0 + dt).await.expect("pass").is_empty(), "one breached event per breach");
        }
        let denied = || w.gate.ec2.calls_of("StopInstances(denied)");
        assert_eq!(denied(), 1, "no tight loop");
        w.keeper.pass(t0 + 5_000).await.expect("pass");
        assert_eq!(denied(), 2, "tried again after 5 s");
        w.keeper.pass(t0 + 9_000).await.expect("pass");
        assert_eq!(denied(), 2, "then after 10 s");
        w.keeper.pass(t0 + 15_000).await.expect("pass");
        assert_eq!(denied(), 3);
        let p = w.fences.problems("s1", t0 + 15_000);
        assert!(p.len() == 1 && p[0].contains("StopInstances failed (3 tries)") && p[0].contains("stop it by hand"), "{p:?}");
        assert_eq!(state(&w, "i-old"), "running");
        // Allowed again, past the fence timeout: forced.
        w.gate.deny_stop.store(false, Ordering::SeqCst);
        w.keeper.pass(t0 + 61_000).await.expect("pass");
        assert_eq!(w.gate.ec2.calls_of("StopInstances(force)"), 1, "forced after failover.fence_timeout");
        let events = w.keeper.pass(t0 + 66_000).await.expect("pass");
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["fence.restored"]);
    }

    #[tokio::test]
    async fn an_agent_connecting_is_a_breach_even_when_ec2_cannot_say() {
        let mut w = world().await;
        w.gate.ec2.lock().instances.retain(|i| i.instance.id != "i-old");
        let _agent =
            FakeAgent::attach(&w.engine.deps().registry, "s1", "i-old", Role::Fenced { reason: "fenced".into() }, crate::testkit::fake_ok);
        let events = w.keeper.pass(1_000_000).await.expect("pass");
        // EC2 no longer knows it (gone): its session is a leftover, not a breach.
        assert!(events.is_empty(), "{events:?}");
        // EC2 cannot be asked; its agent talks: it runs.
        w.gate.ec2.add_instance("i-old", "10.0.0.1");
        w.gate.fail_describe.store(true, Ordering::SeqCst);
        let events = w.keeper.pass(1_001_000).await.expect("pass");
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            events[0].summary.contains("seen: its agent connected") && events[0].summary.contains("StopInstances sent"),
            "{}",
            events[0].summary
        );
        assert_eq!(
            (events[0].evidence["agent_connected"].clone(), events[0].evidence["ec2_state"].clone()),
            (json!(true), json!("unknown"))
        );
        assert_eq!(state(&w, "i-old"), "stopped");
        // Unknown again: the breach stays open (no restoration on no evidence).
        assert!(w.keeper.pass(1_006_000).await.expect("pass").is_empty());
        assert!(w.fences.is_open("s1", "i-old"));
        w.gate.fail_describe.store(false, Ordering::SeqCst);
        let events = w.keeper.pass(1_011_000).await.expect("pass");
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["fence.restored"]);
    }

    #[tokio::test]
    async fn never_the_primary_nor_an_instance_no_longer_fenced() {
        let mut w = world().await;
        let store = w.engine.store();
        // Between a failover's fence and its promotion the old primary is
        // both fenced and the site's primary.
        store.set_primary("s1".into(), "i-old".into()).await.expect("primary");
        assert!(w.keeper.pass(1_000_000).await.expect("pass").is_empty());
        store.set_primary("s1".into(), "i-new".into()).await.expect("primary");
        store.set_instance_role("s1".into(), "i-old".into(), "passive".into(), String::new(), "unfenced".into()).await.expect("role");
        assert!(w.keeper.pass(1_001_000).await.expect("pass").is_empty());
        assert_eq!(w.gate.ec2.calls_of("StopInstances"), 0);
        assert_eq!(state(&w, "i-old"), "running");
    }

    #[tokio::test]
    async fn a_restart_neither_repeats_nor_forgets_an_open_breach() {
        let mut w = world().await;
        w.gate.deny_stop.store(true, Ordering::SeqCst);
        w.keeper.pass(1_000_000).await.expect("pass");
        // A new controller process: the breach is open from the event log.
        let fences = Fences::default();
        let notifier = Notifier { store: w.engine.store().clone(), sinks: Arc::new(vec![]) };
        let mut again = Keeper::new(w.engine.clone(), notifier, fences.clone(), Duration::from_secs(20)).await.expect("keeper");
        assert!(fences.is_open("s1", "i-old"), "{:?}", fences.open());
        w.gate.deny_stop.store(false, Ordering::SeqCst);
        let events = again.pass(1_100_000).await.expect("pass");
        assert!(events.is_empty(), "no second fence.breached: {events:?}");
        let events = again.pass(1_105_000).await.expect("pass");
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["fence.restored"]);
        assert_eq!(kinds(&w).await, ["fence.breached", "fence.restored"]);
    }
}
