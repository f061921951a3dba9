//! The health monitor at fleet scale, with the default windows: how long
//! from a simulated failure to the decision, per rung, and how many EC2
//! describe calls health checking costs.
//!
//!   DR_MOTO_SERVER=$(bash tests/ensure-moto.sh) AWS_EC2_METADATA_DISABLED=true \
//!   AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
//!   target/debug/dr-bench-health                  # 1,000 sites
//!   DR_BENCH_SITES=200 target/debug/dr-bench-health
//!
//! The controller's own monitor (`reconcilers::health::Monitor`) runs its
//! passes against moto through the fault-injecting proxy (EC2's view,
//! counted per call) and a loopback HTTP server (the app probes, one per
//! site). Its clock is the pass's `now`: the passes run back to back and
//! each is given the time it would run at with `[health] interval` = 30 s,
//! so minutes of default windows take seconds; each pass's real cost is
//! measured too. Agents are registry sessions (no process); an agent that
//! dies is modelled as its session dropping out at the heartbeat window
//! (6 s × 3 = 18 s, measured in issue 7) after the failure.
//!
//! Failures, in two rounds: site 0's app answers 503 (rung 1), site 1's
//! system status check fails (rung 2), site 2's instance is terminated and
//! its agent falls silent (rung 3), at the moment of a pass (the best case);
//! sites 3 to 5 the same 1 s after a pass (the worst case: the next pass
//! sees it almost an interval later).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dr_controller::agents::Registry;
use dr_controller::cloud::Ec2Clients;
use dr_controller::config::{AwsConfig, BackupConfig, HealthConfig};
use dr_controller::domain::health::{AutoMode, HealthPolicy, Rung};
use dr_controller::domain::model::{InstanceRecord, Role, Site, now_ms};
use dr_controller::domain::policy::Policy;
use dr_controller::reconcilers::health::Monitor;
use dr_controller::reconcilers::notify::Notifier;
use dr_controller::store::Store;
use dr_controller::workflows::{self, Deps};
use dr_tests::{Moto, REGION, ec2_client};

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("DR_BENCH_SITES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    assert!(n >= 6, "at least 6 sites");
    dr_proto::tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let proxy = dr_tests::faults::start(&moto.url).await;
    let ec2 = ec2_client(&moto.url, REGION);

    // The fleet's primaries: one RunInstances per 500.
    let images = ec2.describe_images().owners("amazon").send().await.expect("moto lists its stock AMIs");
    let ami = images.images().first().and_then(|i| i.image_id()).expect("a stock AMI").to_owned();
    let mut ids = vec![];
    while ids.len() < n {
        let count = (n - ids.len()).min(500) as i32;
        let out = ec2
            .run_instances()
            .image_id(&ami)
            .min_count(count)
            .max_count(count)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .send()
            .await
            .expect("RunInstances");
        ids.extend(out.instances().iter().filter_map(|i| i.instance_id().map(str::to_owned)));
    }

    // The app probes: `/health-check/<site>` answers 503 for the sites in `down`.
    let down: Arc<Mutex<HashSet<String>>> = Arc::default();
    let d = down.clone();
    let app = axum::Router::new().route(
        "/health-check/{site}",
        axum::routing::get(move |axum::extract::Path(site): axum::extract::Path<String>| {
            let d = d.clone();
            async move {
                if d.lock().expect("lock").contains(&site) {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let probe_at = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("probe server") });

    let store = Store::open(&dir.path().join("store.db")).await.expect("store");
    let registry = Registry::default();
    let mut policies = std::collections::HashMap::new();
    let mut sessions = vec![];
    let sites: Vec<Site> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Site { id: format!("site-{i:04}"), region: REGION.into(), primary_instance_id: id.clone(), role_arn: None })
        .collect();
    store.upsert_sites(sites.clone()).await.expect("sites");
    for s in &sites {
        let health =
            HealthPolicy { mode: AutoMode::Auto, url: format!("http://{probe_at}/health-check/{}", s.id), ..HealthPolicy::default() };
        policies.insert(s.id.clone(), Policy { health, ..Policy::default() });
        let record = InstanceRecord {
            site_id: s.id.clone(),
            instance_id: s.primary_instance_id.clone(),
            last_seen_ms: now_ms(),
            ..Default::default()
        };
        sessions.push(registry.attach(record, Role::Primary));
    }
    let aws =
        AwsConfig { region: Some(REGION.into()), endpoint_url: Some(proxy.url.clone()), max_attempts: Some(1), ..AwsConfig::default() };
    let deps = Deps {
        store: store.clone(),
        registry: registry.clone(),
        ec2: Arc::new(Ec2Clients::new(aws.clone())),
        backup: BackupConfig::default(),
        policies,
        recovery: Default::default(),
        failover: Default::default(),
        drill: Default::default(),
        aws,
        dns: tokio::sync::OnceCell::new(),
        gate: Default::default(),
    };
    let engine = workflows::engine(deps);
    let config = HealthConfig::default();
    let interval = config.interval.as_millis() as u64;
    let notifier = Notifier { store: store.clone(), sinks: Arc::new(vec![]) };
    let mut monitor =
        Monitor::new(engine, config, notifier, dr_controller::cloud::http::HttpClients::default(), Duration::ZERO).await.expect("monitor");

    // Two rounds of the three failures: at a pass (the best case) and just
    // after one (the worst: the next pass sees it `interval` later).
    let t0 = now_ms();
    let heartbeat_window = 18_000;
    let rounds = [(0usize, 2 * interval), (3usize, 2 * interval + 1_000)];
    let mut decided: Vec<(usize, Rung, u64)> = vec![];
    let mut pass_ms = vec![];
    let mut status_calls = vec![];
    let mut injected = [false; 2];
    let mut silenced = [false; 2];
    let wanted = |round: usize| {
        let base = rounds[round].0;
        [
            (sites[base].id.clone(), Rung::AppRestart),
            (sites[base + 1].id.clone(), Rung::HostRestart),
            (sites[base + 2].id.clone(), Rung::Failover),
        ]
    };
    for k in 0..40u64 {
        let at = t0 + k * interval;
        for (round, (base, offset)) in rounds.iter().enumerate() {
            let fail_at = t0 + offset;
            // A failure between two passes is in the world by the next one.
            if !injected[round] && at >= fail_at {
                down.lock().expect("lock").insert(sites[*base].id.clone());
                proxy.faults.impair_system(&sites[base + 1].primary_instance_id);
                ec2.terminate_instances().instance_ids(&sites[base + 2].primary_instance_id).send().await.expect("TerminateInstances");
                injected[round] = true;
            }
            if !silenced[round] && at >= fail_at + heartbeat_window {
                let gone = &sites[base + 2];
                registry.set_role(&gone.id, &gone.primary_instance_id, Role::Passive { reason: "bench: the agent's stream ended".into() });
                silenced[round] = true;
            }
        }
        let before = proxy.stats.calls_of("DescribeInstanceStatus");
        let start = Instant::now();
        let pass = monitor.pass(at).await.expect("pass");
        pass_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        status_calls.push(proxy.stats.calls_of("DescribeInstanceStatus") - before);
        for (site, rung) in pass.decided {
            let round = (0..2).find(|r| wanted(*r).iter().any(|(s, w)| *s == site && *w == rung));
            let Some(round) = round else { panic!("a decision nobody asked for: {site} {rung:?}") };
            if !decided.iter().any(|(r, w, _)| *r == round && *w == rung) {
                decided.push((round, rung, at - (t0 + rounds[round].1)));
            }
        }
        if decided.len() == 6 {
            break;
        }
    }
    drop(sessions);
    let per_pass = status_calls.iter().copied().max().unwrap_or(0);
    let mean_pass = pass_ms.iter().sum::<f64>() / pass_ms.len() as f64;
    let worst_pass = pass_ms.iter().copied().fold(0.0, f64::max);
    println!("health monitor: {n} sites in {REGION}, default windows (interval 30s, repair_after 1m, confirm_for 2m, heartbeat 6s x 3)");
    for rung in [Rung::AppRestart, Rung::HostRestart, Rung::Failover] {
        let at = |round: usize| {
            decided
                .iter()
                .find(|(r, w, _)| *r == round && *w == rung)
                .map(|(_, _, ms)| format!("{:.1} s", *ms as f64 / 1000.0))
                .unwrap_or_else(|| "never".into())
        };
        println!("  failure to decision, {:<13} {:>8} (failure at a pass)  {:>8} (1 s after a pass)", rung.as_str(), at(0), at(1));
    }
    println!(
        "  DescribeInstanceStatus per pass: {per_pass} ({:.0} per minute at one pass every 30 s)",
        per_pass as f64 * 60_000.0 / interval as f64
    );
    println!("  one pass (signals, decisions, store): mean {mean_pass:.0} ms, worst {worst_pass:.0} ms");
    assert_eq!(decided.len(), 6, "every rung was decided in both rounds");
}
