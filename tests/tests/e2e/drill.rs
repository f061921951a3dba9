//! Drills end to end: moto behind the simulated data plane, a real agent on
//! the primary and on the drill copy launched from its backup. A drill
//! proves the restore into its own subnet under its own hostname, measures
//! it, tears everything down, and leaves production as it was.

use std::time::Duration;

use dr_tests::recovery_world::*;
use dr_tests::{assert_eventually, drctl_json, last_json, replicatedctl_calls, site_status, text};
use serde_json::Value;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

const DRILL_HOST: &str = "drill.circleci.example.com";

/// A subnet and a security group of their own for drill copies (in moto's
/// default VPC), as `[site.drill]` TOML.
pub async fn drill_network(w: &RecoveryWorld) -> (String, String) {
    let vpc = w.ec2.describe_vpcs().send().await.expect("DescribeVpcs").vpcs()[0].vpc_id().expect("vpc").to_owned();
    let subnet = w
        .ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("172.31.200.0/24")
        .send()
        .await
        .expect("CreateSubnet")
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("subnet id")
        .to_owned();
    let sg = w
        .ec2
        .create_security_group()
        .group_name("dr-drill")
        .description("drill copies")
        .vpc_id(&vpc)
        .send()
        .await
        .expect("CreateSecurityGroup")
        .group_id()
        .expect("group id")
        .to_owned();
    (subnet, sg)
}

pub fn drill_toml(subnet: &str, sg: &str) -> String {
    format!("\n[site.drill]\nhostname = \"{DRILL_HOST}\"\nsubnet_id = \"{subnet}\"\nsecurity_group_ids = [\"{sg}\"]\n")
}

/// Volumes still carrying `dr:operation=op` and not deleted.
async fn volumes_of(w: &RecoveryWorld, op: &str) -> Vec<String> {
    w.ec2
        .describe_volumes()
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:dr:operation").values(op).build())
        .send()
        .await
        .expect("DescribeVolumes")
        .volumes()
        .iter()
        .filter(|v| v.state().is_none_or(|s| s.as_str() != "deleted"))
        .map(|v| v.volume_id().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_a_healthy_copy_measures_it_and_leaves_production_untouched() {
    let mut w = RecoveryWorld::start("drill-site", RecoverySpec { boot_delay: Duration::from_millis(500), ..Default::default() }).await;
    w.wait_primary(&w.instance.id);
    // The newest build the data holds started 10 minutes before the backup.
    let newest_build = now_ms() - 10 * 60 * 1000;
    std::fs::write(&w.builds_file, serde_json::to_vec(&[running_build(21, newest_build)]).expect("json")).expect("builds");
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");

    // Without [site.drill] a drill is refused: it would land in production's network.
    let refused = w.drctl(&["drill", &w.site, "--plan"]);
    assert_eq!(refused.status.code(), Some(2), "{}{}", text(&refused.stdout), text(&refused.stderr));
    assert!(text(&refused.stderr).contains("[site.drill]"), "names the missing table: {}", text(&refused.stderr));

    let (subnet, sg) = drill_network(&w).await;
    w.add_site_toml(&drill_toml(&subnet, &sg));
    w.wait_primary(&w.instance.id);

    // The plan: the drill's network and hostname, nothing of production.
    let out = w.drctl(&["-o", "json", "drill", &w.site, "--plan"]);
    assert!(out.status.success(), "plan: {}{}", text(&out.stdout), text(&out.stderr));
    let plan = last_json(&out.stdout)["plan"].clone();
    assert_eq!(plan["kind"], "drill", "{plan}");
    assert_eq!(plan["launch"]["subnet_id"], subnet.as_str(), "{plan}");
    assert_eq!(plan["launch"]["security_group_ids"][0], sg.as_str(), "{plan}");
    assert_eq!(plan["launch"]["instance_type"], "m5.xlarge", "the recorded type: {plan}");
    assert_eq!(plan["hostname"], DRILL_HOST);
    assert_eq!(plan["fence"]["instance_id"], "", "no fence: {plan}");
    assert!(plan["eip"].is_null() && plan["dns"].is_null(), "no Elastic IP, no DNS: {plan}");
    let shown = text(&w.drctl(&["drill", &w.site, "--plan"]).stdout);
    assert!(shown.contains("Drill plan") && shown.contains("production: untouched"), "{shown}");

    let primary_disk = w.disk.clone();
    let primary_stops = replicatedctl_calls(&primary_disk, "app stop");
    let dns_before = w.dns_a().await;

    let out = w.drctl(&["-o", "json", "drill", &w.site, "--wait"]);
    let lines: Vec<Value> = text(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let op = lines.iter().rev().find(|l| l["steps"].is_array()).cloned().unwrap_or_default();
    assert!(
        out.status.success() && op["state"] == "succeeded",
        "drill: {}\n{}\ncontroller:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        tail(&w.controller.log())
    );
    let drill = last_json(&out.stdout)["drill"].clone();
    let op_id = op["id"].as_str().expect("id").to_owned();
    assert_eq!(drill["operation_id"], op_id.as_str(), "{drill}");
    assert_eq!(drill["ok"], true, "{drill}");
    assert!(drill["rto_s"].as_f64().expect("rto") > 0.0, "RTO measured: {drill}");
    assert!(drill["phases_s"]["app_start"].as_f64().expect("phase") > 0.0, "RTO by phase: {drill}");
    assert!(drill["rpo_s"].as_f64().expect("rpo") > 0.0, "RPO measured: {drill}");
    assert!(drill["worst_rpo_s"].as_f64().expect("worst") >= drill["rpo_s"].as_f64().expect("rpo"), "{drill}");
    assert_eq!(drill["hostname"], DRILL_HOST);
    let data_age = drill["data_age_s"].as_f64().expect("the copy reported its newest build");
    assert!((600.0..700.0).contains(&data_age), "the data age is the newest build's on the copy: {drill}");

    // The copy: launched once in the drill subnet from the backup, taken
    // through the runbook with its own address and the drill hostname, then
    // terminated with its volumes.
    let launched = w.launched_by(&op_id).await;
    assert_eq!(launched.len(), 1, "one copy launched");
    let copy = launched[0].instance_id().expect("id").to_owned();
    assert_eq!(drill["instance_id"], copy.as_str());
    assert_eq!(launched[0].subnet_id(), Some(subnet.as_str()), "in the drill subnet");
    let tags: Vec<(String, String)> =
        launched[0].tags().iter().map(|t| (t.key().unwrap_or_default().to_owned(), t.value().unwrap_or_default().to_owned())).collect();
    assert!(tags.contains(&("dr:role".into(), "drill".into())), "{tags:?}");
    assert!(tags.iter().any(|(k, _)| k == "dr:keep-until"), "{tags:?}");
    assert_eq!(w.instance_state(&copy).await, "terminated", "the copy is torn down");
    assert!(volumes_of(&w, &op_id).await.is_empty(), "its volumes are deleted");
    let copy_ip = launched[0].private_ip_address().unwrap_or_default().to_owned();
    let disk = disk_of(&w.dataplane, &copy).await;
    let replicated = read(&disk.join("etc/default/replicated"));
    assert!(replicated.contains(&format!("PRIVATE_ADDRESS={copy_ip}")), "the copy's own address: {replicated}");
    let calls = std::fs::read_to_string(disk.join("var/lib/dr-sim/calls.log")).unwrap_or_default();
    assert!(calls.contains(DRILL_HOST), "the drill hostname was set on the copy: {calls}");

    // Production: the same primary, running, with its Elastic IP and DNS;
    // nothing fenced, its app never stopped.
    assert_eq!(w.instance_state(&w.instance.id).await, "running");
    assert_eq!(w.eip_holder().await, w.instance.id, "the Elastic IP stayed");
    assert_eq!(w.dns_a().await, dns_before, "the DNS record is as it was");
    assert_eq!(replicatedctl_calls(&primary_disk, "app stop"), primary_stops, "the primary's app was never stopped");
    w.wait_primary(&w.instance.id);
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert!(!s["instances"].as_array().expect("instances").iter().any(|i| i["role"] == "fenced"), "nothing fenced: {s}");
    assert_eq!(s["last_drill"]["operation_id"], op_id.as_str(), "status shows the last drill: {s}");
    // The terminated copy does not stay listed under the site.
    assert_eventually!(
        Duration::from_secs(30),
        !site_status(&w.pki, &w.controller.url, &w.site)["instances"].to_string().contains(&copy),
        "the torn-down copy {copy} is no longer listed: {}",
        site_status(&w.pki, &w.controller.url, &w.site)["instances"]
    );
    assert_eq!(s["last_drill"]["ok"], true);

    // Listed, with the measurements.
    let listed = drctl_json(&w.pki, &w.controller.url, &["drills", &w.site]);
    assert_eq!(listed["drills"][0]["operation_id"], op_id.as_str(), "{listed}");
    let shown = text(&w.drctl(&["drills", &w.site]).stdout);
    assert!(shown.contains(&op_id) && shown.contains("RTO") && shown.contains("ok"), "{shown}");

    // Two drills of one site never run at once; a backup runs beside one.
    let first = drctl_json(&w.pki, &w.controller.url, &["drill", &w.site, "--keep", "5m"]);
    let kept = first["operation_id"].as_str().expect("id").to_owned();
    let second = w.drctl(&["drill", &w.site]);
    assert_eq!(second.status.code(), Some(6), "busy: {}{}", text(&second.stdout), text(&second.stderr));
    assert_eventually!(
        Duration::from_secs(60),
        drctl_json(&w.pki, &w.controller.url, &["operation", &kept])["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "keep" && s["state"] == "running")),
        "the drill {kept} reaches its keep: {:#}\n{}",
        drctl_json(&w.pki, &w.controller.url, &["operation", &kept]),
        tail(&w.controller.log())
    );
    let t = std::time::Instant::now();
    let beside = w.backup();
    assert_eq!(beside["state"], "succeeded", "a backup runs beside a drill: {beside}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the backup beside the drill took {:?}: {beside:#}\n{}",
        t.elapsed(),
        tail(&w.controller.log())
    );
    // Abort ends the keep; teardown still runs.
    let aborted = w.drctl(&["-o", "json", "operation", "abort", &kept, "--wait"]);
    let end = last_json(&aborted.stdout);
    assert!(matches!(end["state"].as_str(), Some("cancelled" | "succeeded")), "{end}");
    for i in w.launched_by(&kept).await {
        assert_eq!(w.instance_state(i.instance_id().expect("id")).await, "terminated", "an aborted drill is torn down too");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_whose_teardown_failed_is_finished_by_the_reaper() {
    let mut w = RecoveryWorld::start(
        "reap-site",
        RecoverySpec { controller_toml: "[drill]\nlease = \"20s\"\nreap_every = \"1s\"\n".into(), ..Default::default() },
    )
    .await;
    w.wait_primary(&w.instance.id);
    assert_eq!(w.backup()["state"], "succeeded");
    let (subnet, sg) = drill_network(&w).await;
    let mut text_cfg = std::fs::read_to_string(&w.controller.config).expect("config");
    text_cfg.push_str(&drill_toml(&subnet, &sg));
    std::fs::write(&w.controller.config, text_cfg).expect("config");
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_FAIL_AT", "teardown")]);
    w.wait_primary(&w.instance.id);

    let out = w.drctl(&["-o", "json", "drill", &w.site, "--wait"]);
    assert_eq!(out.status.code(), Some(1), "the drill fails: {}{}", text(&out.stdout), text(&out.stderr));
    let drill = last_json(&out.stdout)["drill"].clone();
    assert_eq!(drill["ok"], false, "{drill}");
    let op_id = drill["operation_id"].as_str().expect("id").to_owned();
    let copy = w.launched_by(&op_id).await[0].instance_id().expect("id").to_owned();
    assert_eq!(w.instance_state(&copy).await, "running", "teardown did not run: the copy is left");
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert!(
        s["problems"].as_array().expect("problems").iter().any(|p| p.as_str().is_some_and(|p| p.contains("last drill"))),
        "a failed drill is a problem: {s}"
    );
    // After its dr:keep-until the reaper terminates it; production untouched.
    assert_eventually!(
        Duration::from_secs(60),
        w.instance_state(&copy).await == "terminated",
        "the reaper terminates {copy}\n{}",
        tail(&w.controller.log())
    );
    // Its log line follows the TerminateInstances answer.
    assert_eventually!(
        Duration::from_secs(10),
        w.controller.log().contains("drill copy past its dr:keep-until terminated"),
        "the reaper says so\n{}",
        tail(&w.controller.log())
    );
    assert_eq!(w.instance_state(&w.instance.id).await, "running", "the primary is never reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_drill_runs_once_per_slot_and_survives_a_restart() {
    let mut w = RecoveryWorld::start("sched-drill-site", RecoverySpec::default()).await;
    w.wait_primary(&w.instance.id);
    assert_eq!(w.backup()["state"], "succeeded");
    let (subnet, sg) = drill_network(&w).await;
    // A drill every 30 s (cron with seconds), of a random backup of the last day.
    w.add_site_toml(&format!(
        "{}\n[site.policy]\ndrill_schedule = \"cron:0/30 * * * * *\"\ndrill_backup = \"random-within:1d\"\n",
        drill_toml(&subnet, &sg)
    ));
    w.wait_primary(&w.instance.id);
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!(s["drill_schedule"], "cron `0/30 * * * * *` (UTC)", "{s}");
    assert_eq!(s["drill_backup"], "random-within:1day");
    assert_eq!(s["drill_overdue"], false);

    let drills =
        |w: &RecoveryWorld| drctl_json(&w.pki, &w.controller.url, &["drills", &w.site])["drills"].as_array().cloned().unwrap_or_default();
    assert_eventually!(Duration::from_secs(90), !drills(&w).is_empty(), "a scheduled drill is recorded\n{}", tail(&w.controller.log()));
    let first = drills(&w)[0].clone();
    assert_eq!((first["requested_by"].as_str(), first["ok"].as_bool()), (Some("schedule"), Some(true)), "{first}");

    // A SIGKILL and a restart neither repeat a slot nor stop the schedule.
    w.controller.kill();
    w.controller.restart(&[]);
    assert_eventually!(
        Duration::from_secs(90),
        drills(&w).len() >= 2,
        "the schedule goes on after a restart\n{}",
        tail(&w.controller.log())
    );
    let all = drills(&w);
    let started: Vec<u64> = all
        .iter()
        .map(|d| {
            let t = humantime::parse_rfc3339(d["started_at"].as_str().expect("started_at")).expect("rfc3339");
            t.duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
        })
        .collect();
    for pair in started.windows(2) {
        // Listed newest first; one drill per 30 s slot at most.
        assert!(pair[0] >= pair[1] + 25_000, "two drills for one slot: {all:#?}");
    }
    assert!(all.iter().all(|d| d["requested_by"] == "schedule" && d["ok"] == true), "{all:#?}");
    // Everything each drill launched is gone.
    for d in &all {
        for i in w.launched_by(d["operation_id"].as_str().expect("id")).await {
            assert_eq!(w.instance_state(i.instance_id().expect("id")).await, "terminated");
        }
    }
    assert_eq!(w.instance_state(&w.instance.id).await, "running", "production untouched");
}
