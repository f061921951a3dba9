//! Fleet backups against moto: retention by count and age with no orphaned
//! snapshot, `drctl prune --dry-run` matching the real run, copies to a DR
//! region, metrics.

use std::time::Duration;

use dr_tests::*;

fn backup_wait(w: &World) -> String {
    let out = drctl(&w.pki, &w.controller.url, &["backup", &w.site, "--wait", "--output", "json"]);
    assert!(out.status.success(), "backup failed: {}{}\n{}", text(&out.stdout), text(&out.stderr), w.controller.log());
    let op = last_json(&out.stdout);
    op["id"].as_str().expect("id").to_owned()
}

fn backups(w: &World) -> Vec<serde_json::Value> {
    drctl_json(&w.pki, &w.controller.url, &["backups", &w.site])["backups"].as_array().expect("list").clone()
}

async fn image_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> bool {
    match ec2.describe_images().image_ids(id).send().await {
        Ok(out) => out.images().iter().any(|i| i.state().map(|s| s.as_str()) == Some("available")),
        Err(_) => false,
    }
}

async fn snapshot_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> bool {
    ec2.describe_snapshots().snapshot_ids(id).send().await.is_ok_and(|o| !o.snapshots().is_empty())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_right_set_and_prune_dry_run_matches_the_real_run() {
    let mut w = World::start_full("prod-1", "100ms", &[], "[policy]\nkeep_last = 3\n").await;
    w.wait_agent();
    let ec2 = w.moto.client().await;
    for _ in 0..4 {
        backup_wait(&w);
    }
    // keep_last = 3: the oldest of four went, AMI and snapshots.
    let list = backups(&w);
    assert_eq!(list.len(), 4);
    let states: Vec<&str> = list.iter().map(|b| b["state"].as_str().expect("state")).collect();
    assert_eq!(states, vec!["available", "available", "available", "deleted"], "newest first: {list:#?}");
    let gone = &list[3];
    assert!(gone["fate"].as_str().expect("fate").contains("beyond the newest 3"), "{gone}");
    assert!(!image_exists(&ec2, gone["image_id"].as_str().expect("id")).await, "deregistered");
    for snap in gone["snapshot_ids"].as_array().expect("snaps") {
        assert!(!snapshot_exists(&ec2, snap.as_str().expect("id")).await, "no orphaned snapshot {snap}");
    }
    for kept in &list[..3] {
        assert!(image_exists(&ec2, kept["image_id"].as_str().expect("id")).await);
    }

    // Tighten the policy: keep_last = 1. The dry run says what would go...
    w.controller.kill();
    let config = std::fs::read_to_string(&w.controller.config).expect("config");
    std::fs::write(&w.controller.config, config.replace("keep_last = 3", "keep_last = 1")).expect("write");
    w.controller.restart(&[]);
    let dry = drctl_json(&w.pki, &w.controller.url, &["prune", "prod-1", "--dry-run"]);
    let would: Vec<String> = dry["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter(|d| d["action"] == "delete")
        .map(|d| d["image_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(would.len(), 2, "{dry:#}");
    assert_eq!(backups(&w).iter().filter(|b| b["state"] == "available").count(), 3, "the dry run changed nothing");
    // ...and the real run deletes exactly that.
    let real = drctl_json(&w.pki, &w.controller.url, &["prune", "prod-1"]);
    let did: Vec<String> = real["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter(|d| d["action"] == "delete")
        .map(|d| d["image_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(did, would);
    let after = backups(&w);
    let available: Vec<&serde_json::Value> = after.iter().filter(|b| b["state"] == "available").collect();
    assert_eq!(available.len(), 1);
    assert_eq!(available[0]["image_id"], list[0]["image_id"], "the newest is the one kept");
    for id in &did {
        assert!(!image_exists(&ec2, id).await);
    }
    let human = text(&drctl(&w.pki, &w.controller.url, &["prune", "prod-1", "--dry-run"]).stdout);
    assert!(human.contains("newest completed backup (always kept)"), "{human}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_are_copied_to_the_dr_region_and_reported() {
    // The metrics listener binds port 0 and logs the port it got.
    let extra = "[policy]\ncopy_regions = [\"us-west-2\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let mut w = World::start_full("prod-1", "100ms", &[], extra).await;
    w.wait_agent();
    let op = backup_wait(&w);
    let mut copy;
    assert_eventually!(
        Duration::from_secs(30),
        {
            copy = backups(&w)[0]["copies"][0].clone();
            copy["state"] == "available"
        },
        "the copy becomes available: {copy}\n{}",
        w.controller.log()
    );
    assert_eq!(copy["region"], "us-west-2");
    // The copy exists in us-west-2, tagged with its source.
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "static");
    let west = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-west-2"))
            .credentials_provider(creds)
            .endpoint_url(&w.moto.url)
            .build(),
    );
    let copies = images_tagged(&west, "dr:operation", &op).await;
    assert_eq!(copies.len(), 1, "exactly one copy for one backup");
    assert_eq!(copies[0].image_id(), copy["image_id"].as_str());

    let human = text(&drctl(&w.pki, &w.controller.url, &["backups", "prod-1"]).stdout);
    assert!(human.contains("copy in us-west-2"), "{human}");

    // Metrics show the copy and the site's RPO.
    let body = http_get(w.controller.metrics_port(), "/metrics");
    assert!(body.contains("dr_copies{site=\"prod-1\",region=\"us-west-2\",state=\"available\"} 1"), "{body}");
    assert!(body.contains("dr_agent_connected{site=\"prod-1\"} 1"), "{body}");
    assert!(body.contains("dr_backup_newest_age_seconds{site=\"prod-1\"}"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_task_that_panics_is_restarted_counted_and_reported() {
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let mut w = World::start_full("prod-1", "100ms", &[], extra).await;
    w.wait_agent();
    // The health monitor panics once at the start of its first run
    // (test-only fault point).
    w.controller.restart(&[("DR_CONTROLLER_PANIC_IN", "health")]);
    w.wait_agent();
    let restarted = "dr_task_restarts_total{task=\"health\"} 1\n";
    let port = w.controller.metrics_port();
    let mut body = http_get(port, "/metrics");
    assert_eventually!(
        Duration::from_secs(30),
        {
            let done = body.contains(restarted) && body.contains("dr_task_up{task=\"health\"} 1\n");
            if !done {
                body = http_get(port, "/metrics");
            }
            done
        },
        "the health monitor is restarted and /metrics says so:\n{body}\n{}",
        w.controller.log()
    );
    // The other tasks never stopped.
    for task in ["scheduler", "copies", "drills", "spares", "fences", "refusals", "liveness"] {
        assert!(body.contains(&format!("dr_task_restarts_total{{task=\"{task}\"}} 0\n")), "{task}: {body}");
        assert!(body.contains(&format!("dr_task_up{{task=\"{task}\"}} 1\n")), "{task}: {body}");
    }
    // No webhook configured: no delivery task to supervise.
    assert!(!body.contains("task=\"notify\""), "{body}");
    // One fleet-wide, critical event names the task and the panic.
    let events = drctl_json(&w.pki, &w.controller.url, &["events", "--limit", "1000"])["events"].as_array().cloned().unwrap_or_default();
    let restarts: Vec<_> = events.iter().filter(|e| e["kind"] == "controller.task_restarted").collect();
    assert_eq!(restarts.len(), 1, "{events:?}");
    assert_eq!(restarts[0]["severity"], "critical");
    assert_eq!(restarts[0]["evidence"]["task"], "health");
    assert_eq!(restarts[0]["evidence"]["reason"], "it panicked: injected panic (DR_CONTROLLER_PANIC_IN=health)");
}
