//! Prometheus metrics (text exposition format) on `[metrics] listen`,
//! computed from the store and the live sessions at each scrape.
//!
//! - `dr_agent_connected{site}` 1/0 (the site's primary has a live session)
//! - `dr_agents{role}`: live agent sessions by role
//! - `dr_backup_newest_age_seconds{site}`: the current RPO (absent: no backup)
//! - `dr_backup_rpo_target_seconds{site}`: what the schedule promises
//! - `dr_backup_late{site}` 1 when the newest good backup is overdue
//! - `dr_backups{site,state}`: backups by retention state
//! - `dr_copies{site,region,state}`: copies in DR regions by state
//! - `dr_operations_running`
//! - `dr_ec2_retries_total{reason}`: EC2 calls retried (throttled, transient)
//! - `dr_task_up{task}` 1/0 and `dr_task_restarts_total{task}`: the
//!   controller's supervised background tasks (`reconcilers::supervisor`)
//! - `dr_agent_cert_not_after_timestamp_seconds{site,instance}`: when each
//!   enrolled instance's current certificate ends
//! - `dr_cert_enrolments_total{result}`, `dr_cert_renewals_total{result}`
//!   (`ok`, `refused`/`failed`) since start
//! - `dr_pki_intermediate_not_after_timestamp_seconds`: when the
//!   controller's intermediate CA ends
//! - `dr_pki_rotation_phase{phase}` 1 while a CA rotation is in that phase
//! - `dr_controller_is_leader` 1 on the replica that leads (a lone SQLite
//!   controller always), 0 on a standby; `dr_controller_lease_epoch`: the
//!   epoch of the lease this replica holds, or of the current holder's
//!
//! On a standby only the last two are served (it drives nothing). `GET
//! /leader` answers 200 on the leader and 503 on a standby (naming the
//! leader): a load balancer's health check that sends traffic to the
//! leader only.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agents;
use crate::domain::model::{BackupState, CopyState, now_ms};
use crate::reconcilers::supervisor::Supervisor;
use crate::workflows::Engine;

use crate::cloud::{EC2_THROTTLED, EC2_TRANSIENT};

type Labels = Vec<(String, String)>;

fn label(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Renders every metric now, from one fleet view of the store (a fixed
/// number of queries however many sites) and the live sessions.
pub async fn render(
    engine: &Engine,
    registry: &agents::Registry,
    tasks: &Supervisor,
    authority: &agents::enrol::Authority,
) -> Result<String, crate::store::StoreError> {
    let mut reg = Registry::default();
    let connected = Family::<Labels, Gauge>::default();
    let agents_by_role = Family::<Labels, Gauge>::default();
    let age = Family::<Labels, Gauge>::default();
    let target = Family::<Labels, Gauge>::default();
    let late = Family::<Labels, Gauge>::default();
    let backups = Family::<Labels, Gauge>::default();
    let copies = Family::<Labels, Gauge>::default();
    let running = Gauge::<i64>::default();
    let retries = Family::<Labels, Gauge>::default();
    let drill_ok = Family::<Labels, Gauge>::default();
    let drill_at = Family::<Labels, Gauge>::default();
    let drill_rto = Family::<Labels, Gauge>::default();
    let drill_rpo = Family::<Labels, Gauge>::default();
    let drill_worst_rpo = Family::<Labels, Gauge>::default();
    let drill_overdue = Family::<Labels, Gauge>::default();
    let spare_present = Family::<Labels, Gauge>::default();
    let spare_lag = Family::<Labels, Gauge>::default();
    let spare_age = Family::<Labels, Gauge>::default();
    let health = Family::<Labels, Gauge>::default();
    let health_since = Family::<Labels, Gauge>::default();
    let outbox = Family::<Labels, Gauge>::default();
    let view = engine.store().fleet_view().await?;
    let deps = engine.deps();
    let now = now_ms();
    for site in &view.sites {
        let l = label(&[("site", &site.id)]);
        connected.get_or_create(&l).set(i64::from(registry.live(&site.id, &site.primary_instance_id).is_some()));
        let newest = view.newest_backup.get(&site.id);
        if let Some(b) = newest {
            age.get_or_create(&l).set((now.saturating_sub(b.completed_at_ms) / 1000) as i64);
        }
        let policy = deps.policy(&site.id);
        if let Some(t) = policy.schedule.as_ref().and_then(|s| s.nominal_interval(now)) {
            target.get_or_create(&l).set(t.as_secs() as i64);
            let allowed = t.saturating_add(policy.jitter).saturating_add(deps.backup.timeout).as_millis() as u64;
            let is_late = newest.is_none_or(|b| now.saturating_sub(b.completed_at_ms) > allowed);
            late.get_or_create(&l).set(i64::from(is_late));
        }
        for state in [BackupState::Available, BackupState::Deleting, BackupState::Deleted] {
            let n = view.backup_counts.get(&(site.id.clone(), state)).copied().unwrap_or(0);
            backups.get_or_create(&label(&[("site", &site.id), ("state", state.as_str())])).set(n as i64);
        }
        running.inc_by(view.active.get(&site.id).map_or(0, |a| a.len()) as i64);
        if let Some(d) = view.last_drill.get(&site.id) {
            drill_ok.get_or_create(&l).set(i64::from(d.ok));
            drill_at.get_or_create(&l).set((d.started_at_ms / 1000) as i64);
            drill_rto.get_or_create(&l).set((d.rto_ms / 1000) as i64);
            drill_rpo.get_or_create(&l).set((d.rpo_ms / 1000) as i64);
            drill_worst_rpo.get_or_create(&l).set((d.worst_rpo_ms / 1000) as i64);
        }
        if policy.drill_schedule.is_some() {
            let slot =
                view.slots.get(&(site.id.clone(), <crate::workflows::drill::Drill as crate::engine::Workflow>::KIND.to_owned())).copied();
            let overdue = policy.drill_overdue(deps.drill.lease, view.last_drill.get(&site.id).map(|d| d.started_at_ms), slot, now);
            drill_overdue.get_or_create(&l).set(i64::from(overdue));
        }
        if policy.spare != crate::domain::policy::SpareMode::Off {
            let installed = view.spares.get(&site.id);
            spare_present.get_or_create(&l).set(i64::from(installed.is_some()));
            if let Some(s) = installed {
                spare_lag.get_or_create(&l).set((s.lag_behind(newest) / 1000) as i64);
                spare_age.get_or_create(&l).set((now.saturating_sub(s.backup_started_at_ms) / 1000) as i64);
            }
        }
    }
    for site in &view.sites {
        let h = view.health.get(&site.id);
        for state in crate::domain::health::HealthState::ALL {
            let on = h.is_some_and(|h| h.state == state);
            health.get_or_create(&label(&[("site", &site.id), ("state", state.as_str())])).set(i64::from(on));
        }
        if let Some(h) = h {
            health_since.get_or_create(&label(&[("site", &site.id)])).set((h.since_ms / 1000) as i64);
        }
    }
    for (sink, n, _) in engine.store().outbox_backlog().await? {
        outbox.get_or_create(&label(&[("webhook", &crate::cloud::http::redacted(&sink))])).inc_by(n as i64);
    }
    for ((site, region, state), n) in &view.copy_counts {
        let state: &CopyState = state;
        copies.get_or_create(&label(&[("site", site), ("region", region), ("state", state.as_str())])).set(*n as i64);
    }
    for (role, n) in registry.counts() {
        agents_by_role.get_or_create(&label(&[("role", role)])).set(n as i64);
    }
    let task_up = Family::<Labels, Gauge>::default();
    let task_restarts = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
    for (name, t) in tasks.stats() {
        task_up.get_or_create(&label(&[("task", name)])).set(i64::from(t.up));
        task_restarts.get_or_create(&label(&[("task", name)])).inc_by(t.restarts);
    }
    let cert_end = Family::<Labels, Gauge>::default();
    for ((site, instance), c) in engine.store().agent_certs().await? {
        cert_end.get_or_create(&label(&[("site", &site), ("instance", &instance)])).set((c.current_not_after_ms / 1000) as i64);
    }
    reg.register("dr_agent_cert_not_after_timestamp_seconds", "When the instance's current agent certificate ends (Unix time)", cert_end);
    let (enrolments, renewals) = (
        Family::<Labels, prometheus_client::metrics::counter::Counter>::default(),
        Family::<Labels, prometheus_client::metrics::counter::Counter>::default(),
    );
    let c = &authority.counters;
    enrolments.get_or_create(&label(&[("result", "ok")])).inc_by(c.enrolled.load(Ordering::Relaxed));
    enrolments.get_or_create(&label(&[("result", "refused")])).inc_by(c.enrol_refused.load(Ordering::Relaxed));
    renewals.get_or_create(&label(&[("result", "ok")])).inc_by(c.renewed.load(Ordering::Relaxed));
    renewals.get_or_create(&label(&[("result", "failed")])).inc_by(c.renew_failed.load(Ordering::Relaxed));
    reg.register("dr_cert_enrolments", "Instance enrolments since start, by result", enrolments);
    reg.register("dr_cert_renewals", "Agent certificate renewals since start, by result", renewals);
    if let Some(signer) = authority.signer() {
        let end = Gauge::<i64>::default();
        end.set((signer.validity_ms().1 / 1000) as i64);
        reg.register("dr_pki_intermediate_not_after_timestamp_seconds", "When the controller's intermediate CA ends (Unix time)", end);
    }
    if let Some(r) = engine.store().rotation().await? {
        let phase = Family::<Labels, Gauge>::default();
        phase.get_or_create(&label(&[("phase", &r.phase)])).set(1);
        reg.register("dr_pki_rotation_phase", "1 while a CA rotation is in this phase", phase);
    }
    reg.register("dr_task_up", "1 while the supervised background task runs", task_up);
    reg.register("dr_task_restarts", "Times the background task ended or panicked and was started again", task_restarts);
    retries.get_or_create(&label(&[("reason", "throttled")])).set(EC2_THROTTLED.load(Ordering::Relaxed) as i64);
    retries.get_or_create(&label(&[("reason", "transient")])).set(EC2_TRANSIENT.load(Ordering::Relaxed) as i64);
    reg.register("dr_agent_connected", "1 when the site's primary has a live agent session", connected);
    reg.register("dr_agents", "Live agent sessions by role", agents_by_role);
    reg.register("dr_backup_newest_age_seconds", "Age of the newest good backup (the current RPO)", age);
    reg.register("dr_backup_rpo_target_seconds", "The RPO the site's schedule promises", target);
    reg.register("dr_backup_late", "1 when the newest good backup is overdue", late);
    reg.register("dr_backups", "Backups by retention state", backups);
    reg.register("dr_copies", "Copies in DR regions by state", copies);
    reg.register("dr_operations_running", "Operations that have not ended", running);
    reg.register("dr_drill_last_ok", "1 when the site's last drill succeeded and was torn down", drill_ok);
    reg.register("dr_drill_last_started_timestamp_seconds", "When the site's last drill started (Unix time)", drill_at);
    reg.register("dr_drill_last_rto_seconds", "The last drill's RTO: start to app healthy on the copy", drill_rto);
    reg.register("dr_drill_last_rpo_seconds", "The last drill's RPO: its backup's age at the drill's start", drill_rpo);
    reg.register("dr_drill_last_worst_rpo_seconds", "The worst RPO over the window before the last drill", drill_worst_rpo);
    reg.register("dr_drill_overdue", "1 when the site's scheduled drills are overdue (sites with a drill_schedule)", drill_overdue);
    reg.register("dr_spare_present", "1 when the site's hot spare is installed (sites whose policy keeps one)", spare_present);
    reg.register("dr_spare_lag_seconds", "How much older the spare's backup is than the newest good backup", spare_lag);
    reg.register("dr_spare_data_age_seconds", "Age of the spare's data (its backup's start): the RPO a failover onto it takes", spare_age);
    reg.register("dr_site_health", "1 for the site's current health state (healthy, suspect, down, recovering)", health);
    reg.register("dr_site_health_since_timestamp_seconds", "When the site entered its current health state (Unix time)", health_since);
    reg.register("dr_webhook_backlog", "Events not yet delivered, by webhook (scheme, host and port of its URL)", outbox);
    reg.register("dr_ec2_retries", "EC2 calls retried since start, by reason", retries);
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    Ok(out)
}

/// What the leader's metrics are computed from (set once it leads).
#[derive(Clone)]
pub struct Leading {
    pub engine: Engine,
    pub registry: agents::Registry,
    pub tasks: Supervisor,
    pub authority: std::sync::Arc<agents::enrol::Authority>,
}

/// This replica's place among the controllers sharing its store.
#[derive(Clone)]
pub struct Replica {
    pub leadership: crate::store::lease::Leadership,
    /// The current leader as a standby last read the lease.
    pub leader: std::sync::Arc<std::sync::Mutex<crate::store::lease::LeaderSeen>>,
    /// Set when this replica starts leading.
    pub leading: std::sync::Arc<tokio::sync::OnceCell<Leading>>,
}

fn render_lease(replica: &Replica) -> String {
    let mut reg = Registry::default();
    let leader = Gauge::<i64>::default();
    let epoch = Gauge::<i64>::default();
    let mine = replica.leadership.epoch();
    leader.set(i64::from(mine.is_some()));
    epoch.set(mine.unwrap_or_else(|| replica.leader.lock().unwrap_or_else(|p| p.into_inner()).epoch));
    reg.register("dr_controller_is_leader", "1 on the controller replica that leads, 0 on a standby", leader);
    reg.register("dr_controller_lease_epoch", "The leader lease's epoch (this replica's, or the current holder's)", epoch);
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

async fn respond(replica: &Replica, path: &str) -> (u16, String) {
    match path {
        "/leader" => match replica.leadership.epoch() {
            Some(epoch) => (200, format!("leader (epoch {epoch})\n")),
            None => {
                let seen = replica.leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let (at, epoch) = (seen.address, seen.epoch);
                let at = if at.is_empty() { "unknown".to_owned() } else { at };
                (503, format!("standby; the leader is at {at} (epoch {epoch})\n"))
            }
        },
        "/metrics" => {
            let lease = render_lease(replica);
            match replica.leading.get() {
                None => (200, lease),
                Some(l) => match render(&l.engine, &l.registry, &l.tasks, &l.authority).await {
                    // Both end with `# EOF`: one exposition, one `# EOF`.
                    Ok(text) => (200, text.trim_end().trim_end_matches("# EOF").to_owned() + &lease),
                    Err(e) => (500, e.to_string()),
                },
            }
        }
        _ => (404, "not found\n".into()),
    }
}

/// Serves `GET /metrics` and `GET /leader` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, replica: Replica) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for metrics: {e}")))?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "metrics listening");
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let replica = replica.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let replica = replica.clone();
                async move {
                    let (status, body) = respond(&replica, req.uri().path()).await;
                    let response = hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(body)));
                    Ok::<_, std::convert::Infallible>(response.expect("static response parts are valid"))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}
