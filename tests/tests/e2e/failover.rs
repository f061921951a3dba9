//! Restore and failover end to end: moto behind the simulated data plane,
//! a real agent on the primary and on the machine restored from its
//! backup, the controller driving the whole runbook.

use std::time::Duration;

use dr_tests::recovery_world::*;
use dr_tests::{assert_eventually, last_json, replicatedctl_calls, site_status, text};
use serde_json::Value;

fn steps(op: &Value) -> Vec<(String, String, String)> {
    op["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_owned(),
                s["state"].as_str().unwrap_or("").to_owned(),
                format!("{}{}", s["detail"].as_str().unwrap_or(""), s["error"].as_str().unwrap_or("")),
            )
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_is_replaced_from_its_backup() {
    let w = RecoveryWorld::start("fo-site", RecoverySpec { boot_delay: Duration::from_millis(500), ..Default::default() }).await;
    w.wait_primary(&w.instance.id);
    let backup_started = now_ms();
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    let image = dr_tests::images_tagged(&w.ec2, "dr:operation", backup["id"].as_str().expect("id")).await;
    let ami = image[0].image_id().expect("ami").to_owned();
    // After the backup: a file written on the primary is not in the backup,
    // and a build that starts now is not the restore's to delete.
    std::fs::write(w.disk.join("var/lib/after-backup"), "newer than the backup").expect("write");
    let before = backup_started - 10 * 60 * 1000;
    std::fs::write(&w.builds_file, serde_json::to_vec(&[running_build(11, before), running_build(12, now_ms() + 5_000)]).expect("json"))
        .expect("builds");

    // The primary's host dies; EC2 still says running.
    w.dataplane.lose(&w.instance.id).await;

    // --plan changes nothing, and says what the run will do.
    let instances_before = w.all_instances().await;
    let out = w.drctl(&["-o", "json", "failover", &w.site, "--plan"]);
    assert!(out.status.success(), "plan: {}{}", text(&out.stdout), text(&out.stderr));
    let plan = last_json(&out.stdout)["plan"].clone();
    assert_eq!(plan["backup"]["image_id"], ami.as_str(), "{plan}");
    assert_eq!(plan["fence"]["instance_id"], w.instance.id.as_str());
    assert_eq!(plan["fence"]["mode"], "stop");
    assert_eq!(plan["launch"]["instance_type"], "m5.xlarge", "the recorded type: {plan}");
    assert_eq!(plan["launch"]["sources"]["instance_type"], "backup");
    assert_eq!(plan["eip"]["public_ip"], w.eip.as_str());
    assert_eq!(plan["eip"]["movable"], true);
    assert_eq!(plan["dns"]["name"], HOST);
    let private =
        plan["addresses"].as_array().expect("addresses").iter().find(|a| a["kind"] == "private").cloned().expect("private change");
    assert_eq!(private["old"], w.instance.private_ip.as_str());
    assert!(plan["human_actions"].as_array().expect("actions").iter().any(|h| h["kind"] == "nomad_builders"), "{plan}");
    let text_plan = w.drctl(&["failover", &w.site, "--plan"]);
    let shown = text(&text_plan.stdout);
    assert!(shown.contains("Nothing was changed") && shown.contains(&ami) && shown.contains(&w.instance.private_ip), "{shown}");
    assert_eq!(w.all_instances().await, instances_before, "--plan launched nothing");
    assert_eq!(w.instance_state(&w.instance.id).await, "running", "--plan fenced nothing");
    assert!(site_status(&w.pki, &w.controller.url, &w.site)["running_operation_id"].is_null(), "--plan started no operation");
    // A backup that is not the site's, or a region without its copy: named.
    let bogus = w.drctl(&["failover", &w.site, "--backup", "ami-0123456789abcdef0", "--plan"]);
    assert_eq!(bogus.status.code(), Some(5), "{}", text(&bogus.stderr));
    assert!(text(&bogus.stderr).contains("ami-0123456789abcdef0 is not an available backup"), "{}", text(&bogus.stderr));
    let no_copy = w.drctl(&["failover", &w.site, "--region", "eu-west-1", "--plan"]);
    assert_eq!(no_copy.status.code(), Some(5), "{}", text(&no_copy.stderr));
    assert!(text(&no_copy.stderr).contains("no available copy in eu-west-1"), "{}", text(&no_copy.stderr));
    // Without a terminal and without --yes: refused, nothing started.
    let refused = drctl_no_tty(&w, &["failover", &w.site]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("--yes"), "{}", text(&refused.stderr));

    // The failover.
    let op = w.run_ok(&["failover", &w.site, "--yes", "--wait"]);
    let op_id = op["id"].as_str().expect("id").to_owned();
    let launched = w.launched_by(&op_id).await;
    assert_eq!(launched.len(), 1, "exactly one instance launched");
    let new = launched[0].instance_id().expect("id").to_owned();
    assert_eq!(launched[0].image_id(), Some(ami.as_str()), "launched from the backup");
    assert_eq!(launched[0].instance_type().map(|t| t.as_str()), Some("m5.xlarge"));
    let new_ip = launched[0].private_ip_address().expect("ip").to_owned();
    assert_ne!(new_ip, w.instance.private_ip);
    assert_eq!(w.instance_state(&w.instance.id).await, "stopped", "the old primary is fenced by a stop");
    assert_eq!(w.eip_holder().await, new, "the Elastic IP is on the new instance");
    assert_eq!(w.dns_a().await, vec![w.eip.clone()], "the DNS record names the site's address");

    // The restored machine: new addresses, NODENAME untouched, Nomad wiped,
    // app started, point in time of the backup.
    let disk = disk_of(&w.dataplane, &new).await;
    let replicated = read(&disk.join("etc/default/replicated"));
    assert!(replicated.contains(&format!("PRIVATE_ADDRESS={new_ip}")), "{replicated}");
    assert!(
        replicated.contains(&format!("NODENAME=ip-{}", w.instance.private_ip.replace('.', "-"))),
        "NODENAME is never rewritten: {replicated}"
    );
    let operator = read(&disk.join("etc/default/replicated-operator"));
    assert!(operator.contains(&format!("DAEMON_ENDPOINT={new_ip}:9879")), "{operator}");
    assert!(operator.contains(&format!("PUBLIC_ADDRESS={}", w.eip)), "the public address is the EIP, unchanged: {operator}");
    assert!(!disk.join("opt/nomad/server/raft/raft.db").exists(), "the restored Nomad state is wiped");
    assert!(disk.join("opt/nomad").is_dir());
    assert!(!disk.join("var/lib/after-backup").exists(), "the restored disk is the backup's point in time");
    let image_disk = w.dataplane.images().await.remove(&ami).expect("the backup's disk");
    assert_eq!(
        replicatedctl_calls(&disk, "app start") - replicatedctl_calls(&image_disk, "app start"),
        1,
        "the app was started once on the restored machine"
    );
    // Builds: the one running at the backup deleted (one session), the later one not.
    let deleted = w.deleted_builds();
    assert!(deleted.iter().any(|d| d.ends_with("/11")), "build 11 deleted: {deleted:?}");
    assert!(!deleted.iter().any(|d| d.ends_with("/12")), "build 12 is newer than the backup: {deleted:?}");

    // The candidate is the primary now; the old instance is fenced.
    w.wait_primary(&new);
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    let launch_ip = launched[0].public_ip_address().unwrap_or_default().to_owned();
    assert_eq!(s["agent"]["public_ip"], w.eip.as_str(), "status shows the Elastic IP, not the launch address {launch_ip}: {s}");
    let shown = text(&w.drctl(&["status", "--site", &w.site]).stdout);
    assert!(shown.contains(&w.eip), "{shown}");
    assert_eq!(s["last_failover"]["operation_id"], op_id.as_str(), "status shows the last failover: {s}");
    assert_eq!(s["last_failover"]["state"], "succeeded");
    let old = s["instances"].as_array().expect("instances").iter().find(|i| i["instance_id"] == w.instance.id.as_str()).cloned();
    assert_eq!(old.as_ref().map(|o| o["role"].clone()), Some(Value::from("fenced")), "{s}");

    // The report: RTO by phase and what a human must do.
    let report = &op["report"];
    assert!(report["rto_ms"].as_u64().unwrap_or(0) > 0, "{report}");
    for phase in ["fence", "launch_to_running", "agent_up", "app_stop", "file_steps", "app_start", "address_moves", "cleanup"] {
        assert!(report["phases"][phase].is_u64(), "phase {phase}: {report}");
    }
    let builders =
        report["human_actions"].as_array().expect("actions").iter().find(|h| h["kind"] == "nomad_builders").cloned().expect("builders");
    let m = builders["message"].as_str().unwrap_or("");
    assert!(m.contains(&w.instance.private_ip) && m.contains(&new_ip), "old and new address: {m}");
    let names: Vec<String> = steps(&op).into_iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        [
            "preflight",
            "fence",
            "launch",
            "wait_running",
            "wait_agent",
            "app_stop",
            "rewrite_addresses",
            "hostname",
            "wipe_nomad",
            "app_start",
            "move_eip",
            "update_dns",
            "cleanup_builds",
            "verify",
            "promote",
            "release",
            "report"
        ]
    );
    let rewrite = op["steps"].as_array().expect("steps").iter().find(|s| s["name"] == "rewrite_addresses").cloned().expect("rewrite step");
    assert!(rewrite["result"].is_object(), "the agent's report is stored with its step: {rewrite}");
    let app_start = steps(&op).into_iter().find(|s| s.0 == "app_start").expect("app_start");
    assert!(app_start.2.contains("/health-check answered 200"), "the frontend's health check was asked: {app_start:?}");
    let shown = text(&w.drctl(&["operation", &op_id]).stdout);
    assert!(shown.contains("RTO:") && shown.contains("launch_to_running") && shown.contains("nomad_builders"), "{shown}");

    // The old primary comes back: its agent is fenced, gets no work, and
    // status flags it.
    w.ec2.start_instances().instance_ids(&w.instance.id).send().await.expect("StartInstances");
    assert_eventually!(
        Duration::from_secs(60),
        {
            let s = site_status(&w.pki, &w.controller.url, &w.site);
            s["problems"].as_array().is_some_and(|p| p.iter().any(|x| x.as_str().unwrap_or("").contains("fenced instance")))
        },
        "status flags the fenced instance running its agent: {}",
        site_status(&w.pki, &w.controller.url, &w.site)
    );
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!(s["primary_instance_id"], new.as_str(), "the new instance stays primary");
    // A backup now goes to the new primary, never to the fenced one.
    let b2 = w.backup();
    assert_eq!(b2["state"], "succeeded", "{b2}");
    let b2_id = b2["id"].as_str().expect("id");
    let journal: Vec<String> = std::fs::read_dir(w.disk.join("var/lib/dr-agent/journal"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!journal.iter().any(|f| f.starts_with(b2_id)), "the fenced machine got no command of {b2_id}: {journal:?}");
    let new_journal: Vec<String> = std::fs::read_dir(disk.join("var/lib/dr-agent/journal"))
        .expect("the new primary's journal")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(new_journal.iter().any(|f| f.starts_with(b2_id)), "the new primary ran {b2_id}: {new_journal:?}");
    let images2 = dr_tests::images_tagged(&w.ec2, "dr:operation", b2["id"].as_str().expect("id")).await;
    assert_eq!(images2.len(), 1);
    let img_of = w.dataplane.images().await;
    assert!(img_of.contains_key(images2[0].image_id().expect("id")), "the second backup images the new primary's disk");

    // A second failover while one... (none runs now): a restore needs --backup.
    let out = w.drctl(&["restore", &w.site, "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_starts_waits_for_a_human_then_resume_or_abort() {
    let w = RecoveryWorld::start("fo-fail", RecoverySpec::default()).await;
    w.wait_primary(&w.instance.id);
    // A fault that travels with the disk: `app start` fails on every
    // machine restored from this backup.
    std::fs::write(w.disk.join("var/lib/dr-sim/faults"), "DR_SIM_FAIL=app start\n").expect("faults");
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    std::fs::remove_file(w.disk.join("var/lib/dr-sim/faults")).expect("rm");

    // The plan of a failover of this healthy, connected primary warns.
    let plan = last_json(&w.drctl(&["-o", "json", "failover", &w.site, "--plan"]).stdout)["plan"].clone();
    let warnings = plan["warnings"].to_string();
    assert!(
        warnings.contains(&format!("the primary {} looks healthy", w.instance.id)) && warnings.contains("connected as primary"),
        "{plan}"
    );
    let shown = text(&w.drctl(&["failover", &w.site, "--plan"]).stdout);
    assert!(shown.contains("warning: the primary") && shown.contains("looks healthy"), "{shown}");

    // `-o json` is a format, not a confirmation: without --yes it refuses
    // with a JSON error naming --yes, and nothing changes.
    let instances = w.all_instances().await;
    let refused = w.drctl(&["-o", "json", "failover", &w.site]);
    assert_eq!(refused.status.code(), Some(2), "{}{}", text(&refused.stdout), text(&refused.stderr));
    let error = last_json(&refused.stdout);
    assert_eq!(error["error"]["kind"], "usage", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--yes") && message.contains("Nothing was sent"), "{message}");
    assert!(text(&refused.stderr).contains("--yes"), "{}", text(&refused.stderr));
    dr_tests::assert_quiet_for!(
        Duration::from_secs(1),
        w.all_instances().await != instances,
        "something launched after a refused failover: {:?}",
        w.all_instances().await
    );
    assert_eq!(w.instance_state(&w.instance.id).await, "running", "nothing fenced");
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert!(s["running_operation_id"].is_null() && s["last_failover"].is_null(), "no operation: {s}");
    // Restore and failback too.
    let refused = w.drctl(&["-o", "json", "restore", &w.site, "--backup", "ami-0123456789abcdef0"]);
    assert_eq!(refused.status.code(), Some(2), "{}{}", text(&refused.stdout), text(&refused.stderr));
    assert!(last_json(&refused.stdout)["error"]["message"].as_str().unwrap_or_default().contains("--yes"), "{}", text(&refused.stdout));

    let out = w.drctl(&["-o", "json", "failover", &w.site, "--yes", "--wait"]);
    assert_eq!(out.status.code(), Some(8), "waits for a human: {}{}", text(&out.stdout), text(&out.stderr));
    let op = last_json(&out.stdout);
    let op_id = op["id"].as_str().expect("id").to_owned();
    assert_eq!(op["state"], "waiting");
    assert!(op["waiting_for"].as_str().unwrap_or("").split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "app_start"), "{op}");
    // A second failover of the site is refused while this one waits.
    let second = w.drctl(&["-o", "json", "failover", &w.site, "--yes"]);
    assert_eq!(second.status.code(), Some(6), "busy: {}{}", text(&second.stdout), text(&second.stderr));

    // The fault is cleared on the candidate; resume finishes the failover.
    let cand = w.launched_by(&op_id).await[0].instance_id().expect("id").to_owned();
    let disk = disk_of(&w.dataplane, &cand).await;
    std::fs::remove_file(disk.join("var/lib/dr-sim/faults")).expect("clear the fault");
    let out = w.drctl(&["-o", "json", "operation", "resume", &op_id, "--wait"]);
    let done = last_json(&out.stdout);
    assert_eq!(done["state"], "succeeded", "{}{}\n{}", text(&out.stdout), text(&out.stderr), tail(&w.controller.log()));
    w.wait_primary(&cand);

    // Again from the new primary's backup, now aborted while waiting.
    std::fs::write(disk.join("var/lib/dr-sim/faults"), "DR_SIM_FAIL=app start\n").expect("faults");
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    std::fs::remove_file(disk.join("var/lib/dr-sim/faults")).expect("rm");
    let out = w.drctl(&["-o", "json", "failover", &w.site, "--yes", "--wait"]);
    assert_eq!(out.status.code(), Some(8), "{}{}", text(&out.stdout), text(&out.stderr));
    let op2 = last_json(&out.stdout)["id"].as_str().expect("id").to_owned();
    let cand2 = w.launched_by(&op2).await[0].instance_id().expect("id").to_owned();
    let out = w.drctl(&["-o", "json", "operation", "abort", &op2, "--wait"]);
    let ended = last_json(&out.stdout);
    assert_eq!(ended["state"], "cancelled", "{ended}");
    assert_eq!(w.instance_state(&cand2).await, "terminated", "abort terminates what the failover launched");
    assert_eq!(w.instance_state(&cand).await, "stopped", "the fenced primary stays fenced (stopped)");
    let state = ended["report"]["site_state"].as_str().unwrap_or("").to_owned();
    assert!(state.contains("no primary is running") && state.contains(&cand) && state.contains(&cand2), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_into_the_dr_region_launches_the_copy_and_moves_dns_then_failback_returns_it_home() {
    let spec = RecoverySpec { controller_toml: "[policy]\ncopy_regions = [\"us-west-2\"]\n".into(), ..Default::default() };
    let mut w = RecoveryWorld::start("fo-dr", spec).await;
    let (west, subnet) = w.dr_region("us-west-2").await;
    w.wait_primary(&w.instance.id);
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    let copy = w.newest_copy_in("us-west-2", None).await;
    w.dataplane.lose(&w.instance.id).await;

    let out = w.drctl(&["-o", "json", "failover", &w.site, "--region", "us-west-2", "--plan"]);
    let plan = last_json(&out.stdout)["plan"].clone();
    assert_eq!(plan["backup"]["launch_image_id"], copy.as_str(), "{plan}");
    assert_eq!(plan["launch"]["subnet_id"], subnet.as_str());
    assert_eq!(plan["launch"]["sources"]["subnet_id"], "config");
    assert_eq!(plan["eip"]["movable"], false);
    assert!(plan["human_actions"].as_array().expect("actions").iter().any(|h| h["kind"] == "elastic_ip"), "{plan}");

    let out = w.drctl(&["-o", "json", "failover", &w.site, "--region", "us-west-2", "--yes", "--wait"]);
    let op = last_json(&out.stdout);
    assert_eq!(op["state"], "succeeded", "{}{}\n{}", text(&out.stdout), text(&out.stderr), tail(&w.controller.log()));
    let op_id = op["id"].as_str().expect("id");
    let launched = launched_by(&west, op_id).await;
    assert_eq!(launched.len(), 1, "one instance in us-west-2");
    assert_eq!(launched[0].image_id(), Some(copy.as_str()), "launched from the DR copy");
    assert_eq!(launched[0].subnet_id(), Some(subnet.as_str()), "with the region's launch spec");
    let public = launched[0].public_ip_address().expect("public ip").to_owned();
    assert_eq!(w.dns_a().await, vec![public.clone()], "DNS names the new instance");
    assert_eq!(w.eip_holder().await, w.instance.id, "the Elastic IP stays in its region");
    assert_eq!(w.instance_state(&w.instance.id).await, "stopped");
    let new = launched[0].instance_id().expect("id").to_owned();
    let disk = disk_of(&w.dataplane, &new).await;
    let operator = read(&disk.join("etc/default/replicated-operator"));
    assert!(operator.contains(&format!("PUBLIC_ADDRESS={public}")), "the public address follows the new instance: {operator}");
    let eip_step = steps(&op).into_iter().find(|s| s.0 == "move_eip").expect("move_eip");
    assert!(eip_step.2.contains("not moved"), "{eip_step:?}");
    w.wait_primary(&new);

    // Failback. Not before a backup of the DR primary exists at home.
    let early = w.drctl(&["failback", &w.site, "--plan"]);
    assert_eq!(early.status.code(), Some(5), "not found: {}{}", text(&early.stdout), text(&early.stderr));
    assert!(text(&early.stderr).contains(&format!("no available backup of its primary {new}")), "{}", text(&early.stderr));
    // While the primary is away, its backups are copied home.
    let dr_backup = w.backup();
    assert_eq!(dr_backup["state"], "succeeded", "{dr_backup}");
    // Copied home only (not to the region it is taken in).
    let home_copy = w.newest_copy_in("us-east-1", Some(&new)).await;
    let out = w.drctl(&["-o", "json", "failback", &w.site, "--plan"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let plan = last_json(&out.stdout)["plan"].clone();
    assert_eq!(plan["kind"], "failback", "{plan}");
    let shown = text(&w.drctl(&["failback", &w.site, "--plan"]).stdout);
    assert!(shown.starts_with(&format!("Failback plan for site {}", w.site)), "{shown}");
    assert_eq!(plan["launch"]["region"], "us-east-1");
    assert_eq!(plan["backup"]["launch_image_id"], home_copy.as_str());
    assert_eq!(plan["fence"]["instance_id"], new.as_str(), "the DR instance is fenced");
    assert_eq!(plan["eip"]["movable"], true, "the home Elastic IP comes back: {plan}");
    let out = w.drctl(&["-o", "json", "failback", &w.site, "--yes", "--wait"]);
    let op = last_json(&out.stdout);
    assert_eq!(op["state"], "succeeded", "{}{}\n{}", text(&out.stdout), text(&out.stderr), tail(&w.controller.log()));
    let home = w.launched_by(op["id"].as_str().expect("id")).await;
    assert_eq!(home.len(), 1, "one instance at home");
    assert_eq!(home[0].image_id(), Some(home_copy.as_str()), "from the home copy of the DR backup");
    let back = home[0].instance_id().expect("id").to_owned();
    assert_eq!(w.eip_holder().await, back, "the home Elastic IP moved back");
    assert_eq!(w.dns_a().await, vec![w.eip.clone()], "DNS names the Elastic IP again");
    assert_eq!(instance_state_in(&west, &new).await, "stopped", "the DR instance is fenced");
    w.wait_primary(&back);
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!((s["region"].as_str(), s["primary_instance_id"].as_str()), (Some("us-east-1"), Some(back.as_str())), "{s}");
    let again = w.drctl(&["failback", &w.site, "--plan"]);
    assert_eq!(again.status.code(), Some(2), "home: nothing to fail back");
    assert!(text(&again.stderr).contains("home region us-east-1"), "{}", text(&again.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_fence_keeps_and_tags_the_old_volumes() {
    let spec = RecoverySpec { site_toml: "fence = \"terminate\"\n".into(), ..Default::default() };
    let w = RecoveryWorld::start("fo-term", spec).await;
    w.wait_primary(&w.instance.id);
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    let volumes: Vec<String> = w
        .ec2
        .describe_volumes()
        .filters(aws_sdk_ec2::types::Filter::builder().name("attachment.instance-id").values(&w.instance.id).build())
        .send()
        .await
        .expect("DescribeVolumes")
        .volumes()
        .iter()
        .filter_map(|v| v.volume_id().map(str::to_owned))
        .collect();
    assert!(!volumes.is_empty(), "moto gives the instance a root volume");
    let out = w.drctl(&["-o", "json", "failover", &w.site, "--yes", "--wait"]);
    let op = last_json(&out.stdout);
    assert_eq!(op["state"], "succeeded", "{}{}\n{}", text(&out.stdout), text(&out.stderr), tail(&w.controller.log()));
    assert_eq!(w.instance_state(&w.instance.id).await, "terminated");
    let kept = w.ec2.describe_volumes().volume_ids(volumes[0].clone()).send().await.expect("the old volume still exists");
    let v = &kept.volumes()[0];
    assert!(
        v.tags().iter().any(|t| t.key() == Some("dr:fenced-from") && t.value() == Some(w.instance.id.as_str())),
        "tagged with the fenced instance: {v:?}"
    );
    let report = &op["report"];
    assert!(
        report["human_actions"].as_array().expect("actions").iter().any(|h| h["kind"] == "fenced_volumes"),
        "the report lists the kept volumes: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_app_whose_health_check_fails_waits_then_resumes() {
    let spec = RecoverySpec { app_timeout: Some("4s"), ..Default::default() };
    let w = RecoveryWorld::start("fo-health", spec).await;
    w.wait_primary(&w.instance.id);
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    std::fs::write(&w.unhealthy, "").expect("unhealthy");
    let out = w.drctl(&["-o", "json", "failover", &w.site, "--yes", "--wait"]);
    assert_eq!(out.status.code(), Some(8), "{}{}", text(&out.stdout), text(&out.stderr));
    let op = last_json(&out.stdout);
    let waiting = op["waiting_for"].as_str().unwrap_or("");
    assert!(waiting.contains("app_start") && waiting.contains("health check") && waiting.contains("503"), "{waiting}");
    std::fs::remove_file(&w.unhealthy).expect("healthy again");
    let id = op["id"].as_str().expect("id");
    let out = w.drctl(&["-o", "json", "operation", "resume", id, "--wait"]);
    assert_eq!(last_json(&out.stdout)["state"], "succeeded", "{}{}", text(&out.stdout), text(&out.stderr));
}

/// The simulated app's state on a machine's disk (`stopped`, `started`, ...).
fn app_state_on(disk: &std::path::Path) -> String {
    let text = std::fs::read_to_string(disk.join("var/lib/dr-sim/replicated.json")).unwrap_or_default();
    serde_json::from_str::<Value>(&text).ok().and_then(|v| v["state"].as_str().map(str::to_owned)).unwrap_or_default()
}

/// When the machine's replicatedctl got `args` after `since` (Unix ms).
fn replicatedctl_calls_since(disk: &std::path::Path, args: &str, since: u64) -> Vec<u64> {
    let log = std::fs::read_to_string(disk.join("var/lib/dr-sim/calls.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["args"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")).as_deref() == Some(args)
        })
        .filter_map(|v| v["at_ms"].as_u64())
        .filter(|t| *t >= since)
        .collect()
}

fn site_events(w: &RecoveryWorld) -> Vec<Value> {
    dr_tests::drctl_json(&w.pki, &w.controller.url, &["events", &w.site, "--limit", "1000"])["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The first event of `kind` after seq `after`, waited for `within`.
fn wait_site_event(w: &RecoveryWorld, kind: &str, after: u64, within: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        if let Some(e) = site_events(w).into_iter().find(|e| e["kind"] == kind && e["seq"].as_u64().unwrap_or(0) > after) {
            return e;
        }
        assert!(
            start.elapsed() < within,
            "an event {kind} within {within:?}; events:\n{}\ncontroller:\n{}",
            site_events(w).iter().map(|e| format!("{} {} {}", e["seq"], e["kind"], e["summary"])).collect::<Vec<_>>().join("\n"),
            tail(&w.controller.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fence_problems(w: &RecoveryWorld, instance: &str) -> Vec<String> {
    site_status(&w.pki, &w.controller.url, &w.site)["problems"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|x| x.as_str())
                .filter(|x| x.contains(&format!("fenced instance {instance} is running again")))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The fence holds: the old primary, started again by hand after a
/// failover, has its app stopped by its own agent (told it is fenced)
/// before the controller's StopInstances arrives; the controller stops the
/// instance again within a minute, with `fence.breached` then
/// `fence.restored`, and status shows the breach in between. Started again
/// while StopInstances is denied: the agent keeps the app stopped (also
/// when someone starts it again), and the problem stays shown until the
/// stop is allowed and done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_primary_started_again_is_stopped_by_its_agent_then_by_the_controller() {
    let w = RecoveryWorld::start(
        "fence-site",
        RecoverySpec {
            boot_delay: Duration::from_millis(500),
            fault_proxy: true,
            // The keeper's passes are the only DescribeInstances once the
            // failover is over (the drill reaper's are pushed away).
            controller_toml: "[health]\nfence_interval = \"30s\"\n[drill]\nreap_every = \"1h\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    let faults = w.faults.as_ref().expect("fault proxy");
    let old = w.instance.id.clone();
    w.wait_primary(&old);
    let backup = w.backup();
    assert_eq!(backup["state"], "succeeded", "{backup}");
    w.dataplane.lose(&old).await;
    let op = w.run_ok(&["failover", &w.site, "--yes", "--wait"]);
    let launched = w.launched_by(op["id"].as_str().expect("id")).await;
    let new = launched[0].instance_id().expect("id").to_owned();
    w.wait_primary(&new);
    assert_eq!(w.instance_state(&old).await, "stopped", "fenced by a stop");
    assert_eq!(app_state_on(&w.disk), "started", "the old disk still says started: the host was lost, not stopped");
    let seq0 = site_events(&w).last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);

    // Start the old primary just after a keeper pass: the next pass is 30 s
    // away, the agent has that long to act on its own.
    let describes = faults.stats.calls_of("DescribeInstances");
    assert_eventually!(Duration::from_secs(45), faults.stats.calls_of("DescribeInstances") > describes, "a fence keeper pass");
    let started_at = now_ms();
    w.ec2.start_instances().instance_ids(&old).send().await.expect("StartInstances");
    assert_eventually!(
        Duration::from_secs(20),
        app_state_on(&w.disk) == "stopped",
        "the fenced machine's agent stops its app: {}\n{:?}",
        app_state_on(&w.disk),
        replicatedctl_calls_since(&w.disk, "app stop", started_at)
    );
    let agent_stop = replicatedctl_calls_since(&w.disk, "app stop", started_at);
    assert_eq!(agent_stop.len(), 1, "one local stop: {agent_stop:?}");
    let stops_of_old =
        |since: u64| faults.faults.stop_times().into_iter().filter(|(id, t)| *id == old && *t >= since).map(|(_, t)| t).collect::<Vec<_>>();
    assert!(stops_of_old(started_at).is_empty(), "the agent acted before any StopInstances from the controller");
    let journal: Vec<String> = std::fs::read_dir(w.disk.join("var/lib/dr-agent/journal"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(journal.iter().any(|f| f.starts_with(&format!("fence.{old}.app-stop-"))), "the local stop is journaled: {journal:?}");
    assert!(w.disk.join("var/lib/dr-agent/fence.json").exists(), "the fence is recorded on the machine");

    // The controller: breached (status shows it), then stopped again.
    let breached = wait_site_event(&w, "fence.breached", seq0, Duration::from_secs(45));
    let problems = fence_problems(&w, &old);
    let summary = breached["summary"].as_str().unwrap_or_default().to_owned();
    assert!(summary.contains(&old) && summary.contains("StopInstances sent"), "{breached}");
    assert!(summary.contains("EC2 says running") || summary.contains("its agent connected"), "{breached}");
    assert_eq!(breached["severity"], "critical");
    let restored = wait_site_event(&w, "fence.restored", breached["seq"].as_u64().unwrap_or(0), Duration::from_secs(30));
    assert!(restored["summary"].as_str().unwrap_or_default().contains(&old), "{restored}");
    assert_eq!(w.instance_state(&old).await, "stopped");
    assert!(now_ms() - started_at < 60_000, "stopped again within a minute of its start ({} ms)", now_ms() - started_at);
    assert!(stops_of_old(started_at).iter().all(|t| *t > agent_stop[0]), "the agent's stop came first");
    assert!(problems.len() == 1 && problems[0].contains("StopInstances sent"), "status showed the breach until the stop: {problems:?}");
    assert_eventually!(
        Duration::from_secs(10),
        fence_problems(&w, &old).is_empty(),
        "the problem is gone once stopped: {:?}",
        fence_problems(&w, &old)
    );
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!(s["primary_instance_id"], new.as_str(), "the new primary is untouched: {s}");
    assert_eq!(w.instance_state(&new).await, "running");

    // Again, with StopInstances denied to the controller: the agent alone
    // holds the fence, and the problem stays shown.
    faults.faults.deny_stop(&old);
    let seq1 = site_events(&w).last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
    let restarted_at = now_ms();
    // The disk says started again (as after someone started the app).
    let sim = |args: &[&str]| {
        let out = std::process::Command::new(dr_tests::bin("dr-sim-replicatedctl"))
            .args(args)
            .env("DR_SIM_STATE_DIR", w.disk.join("var/lib/dr-sim"))
            .output()
            .expect("run the replicatedctl simulator");
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    sim(&["app", "start"]);
    // The simulator moves its state on when asked.
    assert_eventually!(
        Duration::from_secs(20),
        {
            sim(&["app", "status"]);
            app_state_on(&w.disk) == "started"
        },
        "started by hand: {}",
        app_state_on(&w.disk)
    );
    w.ec2.start_instances().instance_ids(&old).send().await.expect("StartInstances");
    let breached = wait_site_event(&w, "fence.breached", seq1, Duration::from_secs(45));
    let summary = breached["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("StopInstances failed") && summary.contains("permission denied"), "{breached}");
    assert_eventually!(Duration::from_secs(20), app_state_on(&w.disk) == "stopped", "the agent stops the app: {}", app_state_on(&w.disk));
    assert!(!replicatedctl_calls_since(&w.disk, "app stop", restarted_at).is_empty());
    // Someone starts the app on the fenced machine: its agent stops it again.
    let before = replicatedctl_calls_since(&w.disk, "app stop", restarted_at).len();
    sim(&["app", "start"]);
    assert_eventually!(
        Duration::from_secs(20),
        app_state_on(&w.disk) == "stopped" && replicatedctl_calls_since(&w.disk, "app stop", restarted_at).len() > before,
        "stopped again by the agent: {}",
        app_state_on(&w.disk)
    );
    // The stop is tried again (with backoff), and fails again: the
    // observable end of the wait, the old instance still running meanwhile.
    assert_eventually!(
        Duration::from_secs(30),
        stops_of_old(restarted_at).len() >= 2,
        "the stop is tried again: {:?}",
        stops_of_old(restarted_at)
    );
    assert_eventually!(Duration::from_secs(10), fence_problems(&w, &old).len() == 1, "{:?}", fence_problems(&w, &old));
    let problems = fence_problems(&w, &old);
    assert!(problems.len() == 1 && problems[0].contains("StopInstances failed") && problems[0].contains("app stopped"), "{problems:?}");
    assert_eq!(w.instance_state(&old).await, "running", "the controller could not stop it");
    assert!(site_events(&w).iter().all(|e| e["kind"] != "fence.restored" || e["seq"].as_u64().unwrap_or(0) <= seq1), "not restored");
    assert!(stops_of_old(restarted_at).len() >= 2, "the stop is tried again (with backoff): {:?}", stops_of_old(restarted_at));

    // Allowed again: stopped, restored, the problem gone.
    faults.faults.clear(&old);
    wait_site_event(&w, "fence.restored", breached["seq"].as_u64().unwrap_or(0), Duration::from_secs(60));
    assert_eq!(w.instance_state(&old).await, "stopped");
    assert_eventually!(Duration::from_secs(10), fence_problems(&w, &old).is_empty(), "{:?}", fence_problems(&w, &old));
}
