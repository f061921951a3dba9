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
    assert_eventually!(
        Duration::from_secs(60),
        health(w)["state"] == "healthy",
        "the site healthy: {}\n{}",
        health(w),
        tail(&w.controller.log())
    );
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
    let spec =
        RecoverySpec { fault_proxy: true, health_policy: Some(policy("auto")), controller_toml: HEALTH.into(), ..Default::default() };
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
    assert_eventually!(
        Duration::from_secs(10),
        health(&w)["decision"].as_str().unwrap_or_default().ends_with(" is paused by operator/tester (replicated upgrade)"),
        "the decision names the pause: {}",
        health(&w)
    );
    // Past repair_after (1 s) and confirm_for (3 s), several passes.
    assert_quiet_for!(
        Duration::from_secs(4),
        events(&w).iter().any(|e| e["kind"] == "repair.started"),
        "nothing starts while paused: {}",
        health(&w)
    );
    let h = health(&w);
    // The whole clause (" is paused", not "unpaused"), at the end of the decision.
    assert!(h["decision"].as_str().unwrap_or_default().ends_with(" is paused by operator/tester (replicated upgrade)"), "{h}");
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
    assert!(
        impaired["summary"].as_str().unwrap_or_default().contains("system status check failed"),
        "the evidence names the check: {impaired}"
    );
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
async fn a_copy_of_the_primarys_disk_posing_as_it_does_not_keep_a_terminated_primary_alive() {
    let spec =
        RecoverySpec { fault_proxy: true, health_policy: Some(policy("auto")), controller_toml: HEALTH.into(), ..Default::default() };
    let w = RecoveryWorld::start("site-i", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    w.backup();
    wait_healthy(&w);
    // An attacker's machine with a copy of the primary's disk (its key and
    // certificate included) and a fake IMDS that claims the primary's
    // instance id but cannot sign as AWS.
    let evil = w.dir.path().join("impostor");
    std::fs::create_dir_all(evil.join("keys")).expect("mkdir");
    write_iid_signer(&evil.join("keys/forged.pem"), &evil.join("keys/forged.key"));
    let creds = w.disk.join("var/lib/dr-agent/credentials");
    let copy = evil.join(format!("agent-{}/credentials", w.site));
    std::fs::create_dir_all(&copy).expect("mkdir");
    for f in ["instance.pem", "instance.key", "trust.pem"] {
        std::fs::copy(creds.join(f), copy.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    let imds = Imds::start_signed(&w.instance, None, Some(&evil.join("keys/forged.key")), ACCOUNT);
    let root = services_machine_root(&evil, &w.instance.private_ip, "54.9.9.9");
    let impostor = Agent::start(&evil, &w.pki, &w.site, &w.controller.url, &imds, &root);
    assert_eventually!(Duration::from_secs(30), impostor.log().contains("the controller refused this agent"), "{}", impostor.log());
    // The real primary is lost: the site fails over though the impostor
    // keeps knocking with the primary's certificate.
    let seq = last_seq(&w);
    w.ec2.terminate_instances().instance_ids(&primary).send().await.expect("TerminateInstances");
    let started = wait_event(&w, "failover.started", seq, Duration::from_secs(60));
    let op = started["operation_id"].as_str().expect("operation").to_owned();
    wait_event(&w, "failover.succeeded", seq, Duration::from_secs(180));
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_ne!(s["primary_instance_id"], primary.as_str(), "a new primary: {s}");
    assert_eq!(w.launched_by(&op).await.len(), 1);
    assert!(!impostor.log().contains("command received"), "the impostor got a command:\n{}", impostor.log());
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
    let failovers = |w: &RecoveryWorld| {
        events(w).iter().filter(|e| e["kind"] == "failover.awaiting_approval" || e["kind"] == "failover.started").count()
    };
    // The restarted controller is up again and still waits; for well past
    // confirm_for (3 s) no second failover is raised.
    assert_eventually!(
        Duration::from_secs(30),
        op_json(&w, &op)["waiting_for"].as_str().unwrap_or_default().starts_with("approval"),
        "{op} waits for an approval again: {}",
        op_json(&w, &op)
    );
    assert_quiet_for!(Duration::from_secs(5), failovers(&w) > 1, "a second failover after the restart: {:?}", events(&w));
    let out = w.drctl(&["-o", "json", "approve", &op, "--wait"]);
    let done = last_json(&out.stdout);
    assert_eq!(done["state"], "succeeded", "{}\n{}\n{}", text(&out.stdout), text(&out.stderr), tail(&w.controller.log()));
    // The RTO an operator recognises: from the first evidence of the loss
    // until the site is reachable again (Elastic IP and DNS moved), with
    // the approval's wait in it.
    let report = &done["report"];
    assert_eq!(report["rto_from"], "first_evidence", "{report}");
    let at = |k: &str| report[k].as_u64().unwrap_or(0);
    let (detected, decided, restored, reachable) = (at("detected_at_ms"), at("decided_at_ms"), at("restored_at_ms"), at("reachable_at_ms"));
    assert!(detected > 0 && detected <= decided && decided <= restored && restored <= reachable, "milestones in order: {report}");
    assert_eq!(at("rto_ms"), reachable - detected, "{report}");
    assert!(report["phases"]["detection"].is_u64() && report["phases"]["decision_to_start"].is_u64(), "{report}");
    let approved = events(&w).into_iter().find(|e| e["kind"] == "failover.approved").expect("the approval is an event");
    assert!(
        approved["summary"].as_str().unwrap_or_default().split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "instance_gone"),
        "it names the evidence approved: {approved}"
    );
    let launched = w.launched_by(&op).await;
    assert_eq!(launched.len(), 1, "one instance launched");
    let new = launched[0].instance_id().expect("id").to_owned();
    wait_healthy(&w);
    assert_quiet_for!(Duration::from_secs(4), failovers(&w) > 1, "a second failover once healthy: {:?}", events(&w));
    let all = events(&w);
    let failovers: Vec<&Value> =
        all.iter().filter(|e| e["kind"] == "failover.awaiting_approval" || e["kind"] == "failover.started").collect();
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
    for d in hook.deliveries() {
        assert!(d.signature_valid, "every delivery signed: {d:?}");
        assert_eq!(d.signature, webhook::python_signature("s3cret", &d.timestamp, &d.raw), "Python's hmac agrees: {d:?}");
    }
    let approval =
        hook.deliveries().into_iter().find(|d| d.body["kind"] == "failover.awaiting_approval").expect("the approval request was notified");
    assert_eq!(approval.body["operation_id"], op.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_alone_is_a_partition_and_a_denied_failover_ends_with_nothing_changed() {
    let spec =
        RecoverySpec { fault_proxy: true, health_policy: Some(policy("approve")), controller_toml: HEALTH.into(), ..Default::default() };
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
    assert_quiet_for!(
        Duration::from_secs(6),
        events(&w).iter().any(|e| e["seq"].as_u64().unwrap_or(0) > seq && e["kind"].as_str().unwrap_or_default().starts_with("failover."))
            || w.all_instances().await != instances,
        "a failover or an instance change while partitioned: {:?}",
        events(&w)
    );
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
    assert_eventually!(Duration::from_secs(30), op_json(&w, &op)["state"] == "cancelled", "{op} ends after the deny: {}", op_json(&w, &op));
    wait_event(&w, "failover.failed", seq, Duration::from_secs(30));
    assert!(w.launched_by(&op).await.is_empty(), "nothing launched");
    assert_quiet_for!(
        Duration::from_secs(4),
        events(&w).iter().filter(|e| e["kind"] == "failover.awaiting_approval").count() > 1,
        "a denied failover is asked again: {:?}",
        events(&w)
    );
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
    // It is the controller's problem: one fleet alert naming the region
    // (from its second pass in a row; each pass waits out its retries),
    // nothing about the site.
    // Fleet events have no site: read the whole log.
    let all = |w: &RecoveryWorld| {
        drctl_json(&w.pki, &w.controller.url, &["events", "--limit", "1000"])["events"].as_array().cloned().unwrap_or_default()
    };
    assert_eventually!(
        Duration::from_secs(90),
        all(&w).iter().any(|e| e["kind"] == "fleet.guard" && e["seq"].as_u64().unwrap_or(0) > seq),
        "a fleet.guard naming the region\n{}",
        tail(&w.controller.log())
    );
    assert_eq!(health(&w)["state"], "healthy", "an API outage is no evidence against the site: {}", health(&w));
    let raised: Vec<Value> = all(&w).into_iter().filter(|e| e["seq"].as_u64().unwrap_or(0) > seq).collect();
    let kinds: Vec<&str> = raised.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["fleet.guard"], "{raised:?}");
    assert!(raised[0]["summary"].as_str().unwrap_or_default().contains("EC2's API fails in us-east-1"), "{raised:?}");
    faults.faults.heal_region("us-east-1");
    assert_eventually!(
        Duration::from_secs(60),
        all(&w).iter().any(|e| e["kind"] == "fleet.guard_cleared" && e["seq"].as_u64().unwrap_or(0) > seq),
        "the guard lifts"
    );

    // Impaired, and StopInstances does not stop it: the host restart runs
    // out of host_restart_deadline; the agent still talks, so no failover.
    let seq = last_seq(&w);
    faults.faults.impair_system(&primary);
    faults.faults.wont_stop(&primary);
    let started = wait_event(&w, "repair.started", seq, Duration::from_secs(30));
    assert!(started["operation_id"].as_str().unwrap_or_default().starts_with("host_restart"), "{started}");
    let failed = wait_event(&w, "repair.failed", seq, Duration::from_secs(60));
    assert!(
        failed["summary"].as_str().unwrap_or_default().split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "host_restart"),
        "{failed}"
    );
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
    let all = |fleet: &Fleet| {
        drctl_json(&fleet.pki, &fleet.controller.url, &["events", "--limit", "1000"])["events"].as_array().cloned().unwrap_or_default()
    };
    // Agents get the heartbeat window (10 s × 4 here) to connect after a
    // start before a silent one counts.
    assert_eventually!(
        Duration::from_secs(90),
        all(&fleet).iter().any(|e| e["kind"] == "fleet.guard"),
        "the fleet guard trips\n{}",
        tail(&fleet.controller.log())
    );
    // Well past confirm_for, over many passes.
    assert_quiet_for!(
        Duration::from_secs(4),
        all(&fleet).iter().filter_map(|e| e["kind"].as_str()).any(|k| k.starts_with("failover.") || k.starts_with("repair."))
            || all(&fleet).iter().filter(|e| e["kind"] == "fleet.guard").count() > 1,
        "a failover, a repair or a second alert under the fleet guard: {:?}",
        all(&fleet)
    );
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
        // Agent silent and probe failing, EC2 fine: one path, a partition.
        assert_eq!(s["health"]["condition"], "partitioned", "{}", s["health"]);
        assert!(s["health"]["decision"].as_str().unwrap_or_default().contains("partition"), "{}", s["health"]);
    }
}

/// The pid of the `dr-agent run` of the machine whose disk is `disk`.
fn agent_pid(disk: &std::path::Path) -> u32 {
    let want = disk.display().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("dr-agent"))
            && args.iter().any(|a| a == "run")
            && args.iter().any(|a| a.starts_with(&want))
        {
            return pid;
        }
    }
    panic!("no dr-agent running from {want}");
}

/// Finding 2: the agent's stream and the controller's probe both cross the
/// controller's own network; with EC2 saying running and healthy, the two
/// failing together are a partition: an alert, never a stop or a failover.
/// Only an outside vantage (the site's Route 53 health check, its checkers
/// simulated by the fault proxy) makes it a dead machine, and then the
/// least destructive rung first: a stop and start of the same instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_site_partition_with_ec2_healthy_fails_over_nothing_until_route_53_agrees() {
    let check = "7a1c5e2d-0000-4000-8000-00000000ab01";
    let policy = format!("{}route53_health_check = \"{check}\"\n", policy("auto"));
    let spec = RecoverySpec { fault_proxy: true, health_policy: Some(policy), controller_toml: HEALTH.into(), ..Default::default() };
    let w = RecoveryWorld::start("site-p", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    w.backup();
    wait_healthy(&w);
    let faults = w.faults.as_ref().expect("fault proxy");
    faults.faults.health_check(check, true);

    // The site is cut off from the controller: no heartbeat reaches it and
    // its probe fails; EC2 says running with its checks ok, and AWS's
    // checkers still reach the endpoint.
    let seq = last_seq(&w);
    let agent = agent_pid(&w.disk);
    signal(agent, "STOP");
    std::fs::write(&w.unhealthy, "").expect("probe fails");
    let alert = wait_event(&w, "site.partitioned", seq, Duration::from_secs(30));
    assert!(alert["summary"].as_str().unwrap_or_default().contains("partition"), "{alert}");
    // Well past confirm_for (3 s) and repair_after (1 s), many passes.
    let quiet_from = last_seq(&w);
    assert_quiet_for!(
        Duration::from_secs(8),
        events(&w).iter().any(|e| e["seq"].as_u64().unwrap_or(0) > quiet_from),
        "an event after the partition alert: {:?}",
        events(&w)
    );
    let after: Vec<Value> = events(&w).into_iter().filter(|e| e["seq"].as_u64().unwrap_or(0) > seq).collect();
    let kinds: Vec<&str> = after.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(!kinds.iter().any(|k| k.starts_with("failover.") || k.starts_with("repair.")), "nothing started: {kinds:?}");
    assert!(events(&w).iter().all(|e| e["seq"].as_u64().unwrap_or(0) <= quiet_from), "nothing more was raised: {kinds:?}");
    let h = health(&w);
    assert_eq!((h["state"].as_str(), h["condition"].as_str()), (Some("suspect"), Some("partitioned")), "{h}");
    assert!(h["evidence"].to_string().contains("route 53: healthy"), "the vantage was asked: {h}");
    for action in ["StopInstances", "RunInstances", "StartInstances"] {
        assert_eq!(faults.stats.calls_of(action), 0, "no {action}");
    }

    // Now Route 53's checkers fail from every region too: the machine is
    // dead by evidence from outside our path. Rung 2, not a failover.
    let seq = last_seq(&w);
    faults.faults.health_check(check, false);
    let down = wait_event(&w, "site.down", seq, Duration::from_secs(30));
    assert!(
        down["summary"].as_str().unwrap_or_default().split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "machine_dead"),
        "{down}"
    );
    let started = wait_event(&w, "repair.started", seq, Duration::from_secs(30));
    assert!(started["operation_id"].as_str().unwrap_or_default().starts_with("host_restart"), "a stop and start first: {started}");
    assert_eventually!(Duration::from_secs(30), faults.faults.stop_calls().contains(&primary), "StopInstances of {primary}");
    // The new host is fine: AWS reaches it, the app answers.
    faults.faults.health_check(check, true);
    std::fs::remove_file(&w.unhealthy).expect("probe passes");
    wait_event(&w, "repair.succeeded", seq, Duration::from_secs(90));
    wait_healthy(&w);
    assert_eq!(faults.stats.calls_of("RunInstances"), 0, "no failover");
    assert_eq!(site_status(&w.pki, &w.controller.url, &w.site)["primary_instance_id"], primary.as_str(), "the same instance");
}

/// Finding 3: an approval is for the evidence it was asked with. EC2
/// briefly reports the primary shutting down while its agent is cut off:
/// a failover is asked for; then both are back: the request is withdrawn,
/// and an approval given afterwards is refused, showing today's evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_sites_pending_approval_is_withdrawn_and_a_late_approve_is_refused() {
    let spec =
        RecoverySpec { fault_proxy: true, health_policy: Some(policy("approve")), controller_toml: HEALTH.into(), ..Default::default() };
    let w = RecoveryWorld::start("site-w", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);
    w.backup();
    wait_healthy(&w);
    let faults = w.faults.as_ref().expect("fault proxy");

    let seq = last_seq(&w);
    let agent = agent_pid(&w.disk);
    signal(agent, "STOP");
    faults.faults.report_state(&primary, "shutting-down");
    let waiting = wait_event(&w, "failover.awaiting_approval", seq, Duration::from_secs(60));
    let op = waiting["operation_id"].as_str().expect("operation").to_owned();
    assert_eventually!(
        Duration::from_secs(30),
        op_json(&w, &op)["waiting_for"].as_str().unwrap_or_default().starts_with("approval"),
        "{op} waits for an approval"
    );
    // Waiting for a human is not recovering: the site shows what it is.
    assert_eventually!(Duration::from_secs(10), health(&w)["state"] == "down", "down while the approval waits: {}", health(&w));

    // The site heals before anyone answers.
    signal(agent, "CONT");
    faults.faults.clear(&primary);
    let withdrawn = wait_event(&w, "failover.withdrawn", seq, Duration::from_secs(30));
    assert_eq!(withdrawn["operation_id"], op.as_str(), "{withdrawn}");
    wait_healthy(&w);
    assert_eventually!(Duration::from_secs(30), op_json(&w, &op)["state"] == "cancelled", "{op} ends: {}", op_json(&w, &op));
    assert!(
        !events(&w).iter().any(|e| e["kind"] == "failover.failed" && e["operation_id"] == op.as_str()),
        "a withdrawal is not a failure"
    );

    // A late approval is refused, with the evidence as it is now.
    let out = w.drctl(&["approve", &op]);
    assert!(!out.status.success(), "a withdrawn failover cannot be approved: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("withdrawn") && err.contains("healthy now (checked") && err.contains("agent: connected"), "{err}");
    assert_quiet_for!(
        Duration::from_secs(2),
        ["StopInstances", "RunInstances", "TerminateInstances"].iter().any(|a| faults.stats.calls_of(a) > 0),
        "an EC2 change after the withdrawal"
    );
    for action in ["StopInstances", "RunInstances", "TerminateInstances"] {
        assert_eq!(faults.stats.calls_of(action), 0, "nothing changed in EC2: {action}");
    }
    assert!(w.launched_by(&op).await.is_empty());
    assert_eq!(site_status(&w.pki, &w.controller.url, &w.site)["primary_instance_id"], primary.as_str());
}

/// Finding 1: the controller's own probe breaks (its proxy, DNS or CA
/// bundle) and every site's probe fails at once, while agents and apps are
/// fine. Nothing is restarted; one fleet alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_failing_for_every_site_at_once_restart_nothing_and_raise_one_alert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let ec2 = moto.client().await;
    let pki = Pki::new(dir.path());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    // The apps' own health check, as each agent asks it on its machine.
    let builds = dir.path().join("builds.json");
    std::fs::write(&builds, "[]").expect("builds");
    let (_api, api_url) = spawn_listening(
        "dr-sim-circleci-api",
        &[
            "--listen",
            "127.0.0.1:0",
            "--token",
            "t0k3n",
            "--builds",
            &builds.display().to_string(),
            "--unhealthy-file",
            &dir.path().join("unhealthy").display().to_string(),
        ],
    );
    let n = 5;
    let mut instances = vec![];
    for _ in 0..n {
        instances.push(launch_instance(&ec2).await);
    }
    let sites: Vec<(String, String)> = instances.iter().enumerate().map(|(i, inst)| (format!("site-{i}"), inst.id.clone())).collect();
    let extra = format!(
        "[health]\ninterval = \"300ms\"\n[policy]\nauto_failover = \"auto\"\nhealth_url = \"http://{closed}/health-check\"\n\
         health_timeout = \"500ms\"\nconfirm_for = \"1s\"\nrepair_after = \"1s\"\n"
    );
    let spec =
        ControllerSpec { port: 0, heartbeat: "1s", poll_initial: "100ms", sites: sites.clone(), extra, endpoint: None, record_into: None };
    let controller = Controller::start(dir.path(), &pki, &moto, &spec);
    let mut machines = vec![];
    for (i, inst) in instances.iter().enumerate() {
        let d = dir.path().join(format!("machine-{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        let public = Some(inst.public_ip.as_str()).filter(|p| !p.is_empty());
        let imds = Imds::start(&d, inst, public);
        let root = services_machine_root(&d, &inst.private_ip, public.unwrap_or("54.10.20.30"));
        let agent = Agent::start_with(
            &d,
            &pki,
            &sites[i].0,
            &controller.url,
            &imds,
            &root,
            &format!("[circleci]\nhealth_url = \"{api_url}/health-check\"\n"),
        );
        machines.push((imds, agent, root));
    }
    for (site, _) in &sites {
        assert_eventually!(
            Duration::from_secs(60),
            agent_connected(&pki, &controller.url, site),
            "{site} connected\n{}",
            tail(&controller.log())
        );
    }
    let all = || drctl_json(&pki, &controller.url, &["events", "--limit", "1000"])["events"].as_array().cloned().unwrap_or_default();
    assert_eventually!(
        Duration::from_secs(60),
        all().iter().any(|e| e["kind"] == "fleet.guard"),
        "the fleet guard trips\n{}",
        tail(&controller.log())
    );
    // Well past repair_after, over many passes.
    assert_quiet_for!(
        Duration::from_secs(5),
        all()
            .iter()
            .filter_map(|e| e["kind"].as_str())
            .any(|k| k.starts_with("repair.") || k.starts_with("failover.") || k.starts_with("site."))
            || all().iter().filter(|e| e["kind"] == "fleet.guard").count() > 1,
        "an action or a per-site alert under the fleet guard: {:?}",
        all()
    );
    let events = all();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "fleet.guard").count(), 1, "one alert: {kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("repair.") || k.starts_with("failover.")), "nothing started: {kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("site.")), "no alert per site while the fleet alert holds: {kinds:?}");
    let guard = events.iter().find(|e| e["kind"] == "fleet.guard").expect("guard");
    assert!(guard["summary"].as_str().unwrap_or_default().contains("probe fails for 5 of 5"), "{guard}");
    for (_, _, root) in &machines {
        assert_eq!(replicatedctl_calls(root, "app stop"), 0, "no app was stopped");
    }
    let status = drctl_json(&pki, &controller.url, &["status", "--all"]);
    for s in status["sites"].as_array().cloned().unwrap_or_default() {
        // The agent checked the app on its machine: the path is broken.
        assert_eq!(s["health"]["condition"], "app_unreachable", "{}", s["health"]);
        assert!(s["health"]["evidence"].to_string().contains("on the machine: app healthy"), "{}", s["health"]);
    }
    let _ = &controller;
}
