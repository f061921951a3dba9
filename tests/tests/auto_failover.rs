//! Automatic recovery end to end: the health monitor against moto behind
//! the simulated data plane, with the fault-injecting proxy in front of
//! EC2, the CircleCI API simulator as the app probe's target and a webhook
//! receiver on loopback. Windows are shortened (`repair_after` 1 s,
//! `confirm_for` 3 s, a pass every 500 ms); the logic is the default one.

use std::time::Duration;

use dr_tests::recovery_world::{RecoverySpec, RecoveryWorld, tail};
use dr_tests::*;
use serde_json::Value;

const HEALTH: &str = "[health]\ninterval = \"500ms\"\n";

fn policy(mode: &str) -> String {
    format!("auto_failover = \"{mode}\"\nrepair_after = \"1s\"\nconfirm_for = \"3s\"\nhealth_timeout = \"2s\"\n")
}

fn events(w: &RecoveryWorld) -> Vec<Value> {
    let v = drctl_json(&w.pki, &w.controller.url, &["events", &w.site, "--limit", "1000"]);
    v["events"].as_array().cloned().unwrap_or_default()
}

/// Waits for the first event of `kind` after `after` events (by seq).
fn wait_event(w: &RecoveryWorld, kind: &str, after: u64, within: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        if let Some(e) = events(w).into_iter().find(|e| e["kind"] == kind && e["seq"].as_u64().unwrap_or(0) > after) {
            return e;
        }
        assert!(
            start.elapsed() < within,
            "an event {kind} within {within:?}; events:\n{}\ncontroller:\n{}",
            events(w).iter().map(|e| format!("{} {} {}", e["seq"], e["kind"], e["summary"])).collect::<Vec<_>>().join("\n"),
            tail(&w.controller.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An operation's JSON, whatever drctl's exit code (8: it waits).
fn op_json(w: &RecoveryWorld, op: &str) -> Value {
    last_json(&w.drctl(&["-o", "json", "operation", op]).stdout)
}

fn last_seq(w: &RecoveryWorld) -> u64 {
    events(w).last().and_then(|e| e["seq"].as_u64()).unwrap_or(0)
}

fn health(w: &RecoveryWorld) -> Value {
    site_status(&w.pki, &w.controller.url, &w.site)["health"].clone()
}

fn wait_healthy(w: &RecoveryWorld) {
    assert_eventually!(Duration::from_secs(60), health(w)["state"] == "healthy", "the site healthy: {}\n{}", health(w), tail(&w.controller.log()));
}

/// EC2 calls that change something, as the fault proxy counted them.
fn mutating(w: &RecoveryWorld) -> u64 {
    let f = w.faults.as_ref().expect("fault proxy");
    ["RunInstances", "StopInstances", "StartInstances", "TerminateInstances", "CreateImage", "AssociateAddress", "CreateTags"]
        .iter()
        .map(|a| f.stats.calls_of(a))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_down_is_restarted_and_an_impaired_host_is_stopped_and_started_in_place() {
    let spec = RecoverySpec { fault_proxy: true, health_policy: Some(policy("auto")), controller_toml: HEALTH.into(), ..Default::default() };
    let w = RecoveryWorld::start("site-a", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    wait_healthy(&w);

    // Rung 1: the frontend answers 503, the agent and EC2 are fine. First
    // while an operator has paused automatic recovery (maintenance).
    let before = mutating(&w);
    let seq = last_seq(&w);
    let out = w.drctl(&["pause", &w.site, "--for", "1h", "--reason", "replicated upgrade"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    wait_event(&w, "site.paused", seq, Duration::from_secs(10));
    std::fs::write(&w.unhealthy, "").expect("unhealthy");
    assert_eventually!(Duration::from_secs(30), health(&w)["state"] == "suspect", "suspect while paused: {}", health(&w));
    std::thread::sleep(Duration::from_secs(3));
    let h = health(&w);
    assert!(h["decision"].as_str().unwrap_or_default().contains("paused by operator/"), "{h}");
    assert_eq!(h["paused_by"].as_str().map(|b| b.starts_with("operator/")), Some(true), "{h}");
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert!(s["problems"].to_string().contains("replicated upgrade"), "the pause is shown: {}", s["problems"]);
    assert!(!events(&w).iter().any(|e| e["kind"] == "repair.started"), "nothing starts while paused");
    let out = w.drctl(&["unpause", &w.site]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let started = wait_event(&w, "repair.started", seq, Duration::from_secs(30));
    let op = started["operation_id"].as_str().expect("operation").to_owned();
    assert!(op.starts_with("app_restart"), "rung 1 is an app restart: {started}");
    assert!(started["summary"].as_str().unwrap_or_default().contains("app probe fails"), "{started}");
    std::fs::remove_file(&w.unhealthy).expect("healthy again");
    wait_event(&w, "repair.succeeded", seq, Duration::from_secs(60));
    wait_event(&w, "site.recovered", seq, Duration::from_secs(30));
    assert_eq!(mutating(&w), before, "an app restart changes nothing in EC2");
    let done = op_json(&w, &op);
    let steps: Vec<&str> = done["steps"].as_array().expect("steps").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(steps, ["app_stop", "app_start"], "{done}");

    // Rung 2: EC2 reports the system status check failed.
    let seq = last_seq(&w);
    let faults = w.faults.as_ref().expect("fault proxy");
    faults.faults.impair_system(&primary);
    let impaired = wait_event(&w, "site.suspect", seq, Duration::from_secs(30));
    assert!(impaired["summary"].as_str().unwrap_or_default().contains("system status check failed"), "the evidence names the check: {impaired}");
    let started = wait_event(&w, "repair.started", seq, Duration::from_secs(30));
    let op = started["operation_id"].as_str().expect("operation").to_owned();
    assert!(op.starts_with("host_restart"), "rung 2 is a stop and start: {started}");
    // The new hardware is healthy: EC2 stops reporting the impairment once
    // the instance was stopped.
    assert_eventually!(Duration::from_secs(30), faults.faults.stop_calls().contains(&primary), "StopInstances of {primary}");
    faults.faults.clear(&primary);
    wait_event(&w, "repair.succeeded", seq, Duration::from_secs(90));
    wait_healthy(&w);
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!(s["primary_instance_id"], primary.as_str(), "the same instance id");
    assert_eq!(w.instance_state(&primary).await, "running");
    assert_eq!(faults.stats.calls_of("RunInstances"), 0, "no AMI restore");
    assert_eq!(faults.stats.calls_of("StartInstances"), 1, "started once");
    assert_eq!(w.eip_holder().await, primary, "the Elastic IP stayed on it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_instance_fails_over_once_after_approval_and_every_event_reaches_a_webhook_that_was_down() {
    let hook = webhook::start("s3cret").await;
    hook.set_down(true);
    let toml = format!("{HEALTH}[[notify]]\nurl = \"{}/dr\"\nsecret = \"s3cret\"\n", hook.url);
    let spec = RecoverySpec { fault_proxy: true, health_policy: Some(policy("approve")), controller_toml: toml, ..Default::default() };
    let mut w = RecoveryWorld::start("site-b", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    w.backup();
    wait_healthy(&w);

    let seq = last_seq(&w);
    w.ec2.terminate_instances().instance_ids(&primary).send().await.expect("TerminateInstances");
    let waiting = wait_event(&w, "failover.awaiting_approval", seq, Duration::from_secs(60));
    let op = waiting["operation_id"].as_str().expect("operation").to_owned();
    let evidence = waiting["evidence"]["lines"].to_string();
    assert!(evidence.contains("agent: silent") && evidence.contains("ec2: terminated"), "two signals agree: {evidence}");
    assert_eventually!(
        Duration::from_secs(30),
        op_json(&w, &op)["waiting_for"].as_str().unwrap_or_default().starts_with("approval"),
        "{op} waits for an approval"
    );
    assert!(w.launched_by(&op).await.is_empty(), "nothing launched before the approval");

    // A controller restart while it waits starts no second failover.
    w.controller.kill();
    w.controller.restart(&[]);
    std::thread::sleep(Duration::from_secs(5));
    let out = w.drctl(&["-o", "json", "approve", &op, "--wait"]);
    let done = last_json(&out.stdout);
    assert_eq!(done["state"], "succeeded", "{}\n{}\n{}", text(&out.stdout), text(&out.stderr), tail(&w.controller.log()));
    let launched = w.launched_by(&op).await;
    assert_eq!(launched.len(), 1, "one instance launched");
    let new = launched[0].instance_id().expect("id").to_owned();
    wait_healthy(&w);
    std::thread::sleep(Duration::from_secs(4));
    let all = events(&w);
    let failovers: Vec<&Value> = all.iter().filter(|e| e["kind"] == "failover.awaiting_approval" || e["kind"] == "failover.started").collect();
    assert_eq!(failovers.len(), 1, "exactly one automatic failover: {failovers:?}");
    assert!(all.iter().any(|e| e["kind"] == "failover.succeeded" && e["operation_id"] == op.as_str()));
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!(s["primary_instance_id"], new.as_str());
    assert_eq!(w.eip_holder().await, new, "the Elastic IP moved");

    // The webhook was down the whole time: it now gets every event, once.
    hook.set_down(false);
    let ids: Vec<String> = all.iter().filter_map(|e| e["id"].as_str().map(str::to_owned)).collect();
    assert_eventually!(
        Duration::from_secs(60),
        ids.iter().all(|id| hook.event_ids().contains(id)),
        "every event delivered: {} of {}",
        hook.event_ids().len(),
        ids.len()
    );
    assert!(hook.refused() > 0, "deliveries were tried while it was down");
    let got = hook.event_ids();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "each id once: {got:?}");
    assert!(hook.deliveries().iter().all(|d| d.signature_valid), "every delivery signed");
    let approval = hook.deliveries().into_iter().find(|d| d.body["kind"] == "failover.awaiting_approval").expect("the approval request was notified");
    assert_eq!(approval.body["operation_id"], op.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_alone_is_a_partition_and_a_denied_failover_ends_with_nothing_changed() {
    let spec = RecoverySpec { fault_proxy: true, health_policy: Some(policy("approve")), controller_toml: HEALTH.into(), ..Default::default() };
    let w = RecoveryWorld::start("site-c", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    w.backup();
    wait_healthy(&w);

    // The machine's agent dies; EC2 and the app probe say it works.
    let seq = last_seq(&w);
    let instances = w.all_instances().await;
    w.dataplane.lose(&primary).await;
    let alert = wait_event(&w, "site.partitioned", seq, Duration::from_secs(30));
    assert!(alert["summary"].as_str().unwrap_or_default().contains("partition"), "{alert}");
    // Well past confirm_for: no failover, nothing launched or stopped.
    std::thread::sleep(Duration::from_secs(6));
    let after: Vec<Value> = events(&w).into_iter().filter(|e| e["seq"].as_u64().unwrap_or(0) > seq).collect();
    assert!(!after.iter().any(|e| e["kind"].as_str().unwrap_or_default().starts_with("failover.")), "no failover: {after:?}");
    assert_eq!(
        after.iter().filter(|e| e["kind"] == "site.partitioned").count(),
        1,
        "alerted once: {}",
        after.iter().map(|e| format!("{} {} {}", e["seq"], e["kind"], e["summary"])).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(w.all_instances().await, instances);
    assert_eq!(w.faults.as_ref().expect("proxy").stats.calls_of("StopInstances"), 0);
    let h = health(&w);
    assert_eq!(h["state"], "suspect", "{h}");
    assert_eq!(h["condition"], "partitioned", "{h}");

    // Now EC2 says it is gone too: a failover is asked for; deny ends it.
    let seq = last_seq(&w);
    w.ec2.terminate_instances().instance_ids(&primary).send().await.expect("TerminateInstances");
    let waiting = wait_event(&w, "failover.awaiting_approval", seq, Duration::from_secs(60));
    let op = waiting["operation_id"].as_str().expect("operation").to_owned();
    assert_eventually!(
        Duration::from_secs(30),
        op_json(&w, &op)["waiting_for"].as_str().unwrap_or_default().starts_with("approval"),
        "{op} waits for an approval"
    );
    let out = w.drctl(&["deny", &op]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eventually!(
        Duration::from_secs(30),
        op_json(&w, &op)["state"] == "cancelled",
        "{op} ends after the deny: {}",
        op_json(&w, &op)
    );
    wait_event(&w, "failover.failed", seq, Duration::from_secs(30));
    assert!(w.launched_by(&op).await.is_empty(), "nothing launched");
    std::thread::sleep(Duration::from_secs(3));
    let again = events(&w).into_iter().filter(|e| e["kind"] == "failover.awaiting_approval").count();
    assert_eq!(again, 1, "a denied failover is not asked again in the same episode");
    let h = health(&w);
    assert_eq!(h["state"], "down", "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_region_is_no_evidence_and_an_instance_that_will_not_stop_needs_a_human() {
    let policy = format!("{}host_restart_deadline = \"10s\"\n", policy("auto"));
    let spec = RecoverySpec { fault_proxy: true, health_policy: Some(policy), controller_toml: HEALTH.into(), ..Default::default() };
    let w = RecoveryWorld::start("site-d", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    wait_healthy(&w);
    let faults = w.faults.as_ref().expect("fault proxy");

    // EC2's API fails in the site's region: its view is unknown, not "down".
    let seq = last_seq(&w);
    faults.faults.fail_region("us-east-1");
    assert_eventually!(
        Duration::from_secs(30),
        health(&w)["evidence"].to_string().contains("ec2: unknown"),
        "EC2's view is unknown: {}",
        health(&w)
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(health(&w)["state"], "healthy", "an API outage is no evidence against the site: {}", health(&w));
    assert!(events(&w).iter().all(|e| e["seq"].as_u64().unwrap_or(0) <= seq), "no event: {:?}", events(&w));
    faults.faults.heal_region("us-east-1");

    // Impaired, and StopInstances does not stop it: the host restart runs
    // out of host_restart_deadline; the agent still talks, so no failover.
    let seq = last_seq(&w);
    faults.faults.impair_system(&primary);
    faults.faults.wont_stop(&primary);
    let started = wait_event(&w, "repair.started", seq, Duration::from_secs(30));
    assert!(started["operation_id"].as_str().unwrap_or_default().starts_with("host_restart"), "{started}");
    let failed = wait_event(&w, "repair.failed", seq, Duration::from_secs(60));
    assert!(failed["summary"].as_str().unwrap_or_default().contains("host_restart"), "{failed}");
    let human = wait_event(&w, "site.needs_human", seq, Duration::from_secs(30));
    assert!(human["summary"].as_str().unwrap_or_default().contains("agent still talks"), "{human}");
    assert!(!faults.faults.stop_calls().is_empty(), "the stop was tried");
    assert_eq!(w.instance_state(&primary).await, "running", "it would not stop");
    assert_eq!(faults.stats.calls_of("RunInstances"), 0, "no failover");
    assert!(!events(&w).iter().any(|e| e["kind"].as_str().unwrap_or_default().starts_with("failover.")), "no failover event");
    assert_eq!(health(&w)["state"], "down", "{}", health(&w));
}

/// The controller's own network fails: no agent of any site is heard and no
/// app probe is answered, while EC2 (moto) still says every instance runs.
/// Every site looks dead by two signals, so only the fleet guard stands
/// between this and ten failovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cut_off_from_every_site_fails_over_nothing_and_alerts_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let extra = format!(
        "[health]\ninterval = \"300ms\"\n[policy]\nauto_failover = \"auto\"\nhealth_url = \"http://{closed}/health-check\"\n\
         health_timeout = \"500ms\"\nconfirm_for = \"1s\"\nrepair_after = \"1s\"\n"
    );
    let fleet = Fleet::start(10, 0.0, &extra).await;
    let all = |fleet: &Fleet| drctl_json(&fleet.pki, &fleet.controller.url, &["events", "--limit", "1000"])["events"].as_array().cloned().unwrap_or_default();
    // Agents get the heartbeat window (10 s × 4 here) to connect after a
    // start before a silent one counts.
    assert_eventually!(
        Duration::from_secs(90),
        all(&fleet).iter().any(|e| e["kind"] == "fleet.guard"),
        "the fleet guard trips\n{}",
        tail(&fleet.controller.log())
    );
    // Well past confirm_for, over many passes.
    std::thread::sleep(Duration::from_secs(4));
    let events = all(&fleet);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "fleet.guard").count(), 1, "one alert: {kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("failover.") || k.starts_with("repair.")), "nothing started or held per site: {kinds:?}");
    let guard = events.iter().find(|e| e["kind"] == "fleet.guard").expect("guard");
    assert_eq!(guard["site_id"], "", "a fleet event");
    assert!(guard["summary"].as_str().unwrap_or_default().contains("10 of 10 sites"), "{guard}");
    for action in ["RunInstances", "StopInstances", "StartInstances", "TerminateInstances"] {
        assert_eq!(fleet.proxy.stats.calls_of(action), 0, "no {action}");
    }
    let status = drctl_json(&fleet.pki, &fleet.controller.url, &["status", "--all"]);
    let sites = status["sites"].as_array().cloned().unwrap_or_default();
    assert_eq!(sites.len(), 10);
    for s in &sites {
        assert_eq!(s["health"]["condition"], "machine_dead", "{}", s["health"]);
        assert!(s["health"]["decision"].as_str().unwrap_or_default().contains("fleet guard"), "{}", s["health"]);
    }
}
