//! Hot spares end to end: moto behind the simulated data plane, a real
//! agent on the primary and on each spare launched from its backup. The
//! keeper prepares a spare (the runbook with its own addresses, healthy,
//! then stopped), replaces it after a newer backup without a moment with
//! none, and a failover takes it: no launch, the site on the spare.

use std::time::Duration;

use dr_tests::recovery_world::*;
use dr_tests::{assert_eventually, last_json, replicatedctl_calls, site_status, text};
use serde_json::Value;

/// The installed spare's instance id, as `drctl status` shows it.
fn spare_of(s: &Value) -> Option<String> {
    s["spare"]["instance_id"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_spare_is_kept_refreshed_without_a_gap_and_taken_by_a_failover() {
    let spec = RecoverySpec {
        boot_delay: Duration::from_millis(500),
        site_toml: "[site.policy]\nspare = \"stopped\"\nspare_max_lag = \"1s\"\n".into(),
        ..Default::default()
    };
    let w = RecoveryWorld::start("spare-site", spec).await;
    w.wait_primary(&w.instance.id);
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_eq!(s["spare"]["mode"], "stopped", "{s}");
    assert!(spare_of(&s).is_none(), "no backup yet, no spare: {s}");
    assert!(s["problems"].as_array().is_some_and(|p| p.iter().any(|x| x.as_str().unwrap_or("").contains("hot spare"))), "{s}");

    // The first backup: the keeper prepares a spare from it.
    let b1 = w.backup();
    assert_eq!(b1["state"], "succeeded", "{b1}");
    assert_eventually!(
        Duration::from_secs(180),
        spare_of(&site_status(&w.pki, &w.controller.url, &w.site)).is_some(),
        "a spare is installed: {}\ncontroller:\n{}",
        site_status(&w.pki, &w.controller.url, &w.site),
        tail(&w.controller.log())
    );
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    let first = spare_of(&s).expect("spare");
    let b1_image = s["spare"]["backup_image_id"].as_str().expect("its backup").to_owned();
    assert_eq!(w.instance_state(&first).await, "stopped", "parked stopped");
    let first_desc = w.ec2.describe_instances().instance_ids(&first).send().await.expect("DescribeInstances");
    let first_inst = first_desc.reservations()[0].instances()[0].clone();
    let tags: Vec<(String, String)> =
        first_inst.tags().iter().map(|t| (t.key().unwrap_or_default().to_owned(), t.value().unwrap_or_default().to_owned())).collect();
    assert!(tags.contains(&("dr:role".into(), "spare".into())), "{tags:?}");
    let spare_ip = first_inst.private_ip_address().expect("ip").to_owned();
    assert_ne!(spare_ip, w.instance.private_ip, "an address of its own");
    // Taken through the runbook with its own address, started, then stopped.
    let disk = disk_of(&w.dataplane, &first).await;
    let replicated = read(&disk.join("etc/default/replicated"));
    assert!(replicated.contains(&format!("PRIVATE_ADDRESS={spare_ip}")), "{replicated}");
    assert!(!disk.join("opt/nomad/server/raft/raft.db").exists(), "the restored Nomad state is wiped");
    let image_disk = w.dataplane.images().await.remove(&b1_image).expect("the backup's disk");
    assert_eq!(replicatedctl_calls(&disk, "app start") - replicatedctl_calls(&image_disk, "app start"), 1, "started once, to check it");
    // Production untouched.
    assert_eq!(w.instance_state(&w.instance.id).await, "running");
    assert_eq!(w.eip_holder().await, w.instance.id, "the Elastic IP stays on the primary");
    assert_eq!(site_status(&w.pki, &w.controller.url, &w.site)["primary_instance_id"], w.instance.id.as_str());

    // A newer backup, and the spare's data is older than spare_max_lag: a
    // new spare is prepared; the old one goes only after, so status shows
    // a spare at every moment.
    let b2 = w.backup();
    assert_eq!(b2["state"], "succeeded", "{b2}");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let second = loop {
        let s = site_status(&w.pki, &w.controller.url, &w.site);
        let now = spare_of(&s).unwrap_or_else(|| panic!("a moment without a spare during the refresh: {s}"));
        if now != first {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "the spare was not refreshed: {s}\n{}", tail(&w.controller.log()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eventually!(Duration::from_secs(30), w.instance_state(&first).await == "terminated", "the old spare is retired");
    assert_eventually!(
        Duration::from_secs(30),
        !site_status(&w.pki, &w.controller.url, &w.site)["instances"].to_string().contains(&first),
        "the retired spare {first} is no longer listed: {}",
        site_status(&w.pki, &w.controller.url, &w.site)["instances"]
    );
    assert_eq!(w.instance_state(&second).await, "stopped");
    let s = site_status(&w.pki, &w.controller.url, &w.site);
    assert_ne!(s["spare"]["backup_image_id"].as_str(), Some(b1_image.as_str()), "from the newer backup: {s}");
    let shown = text(&w.drctl(&["status", "--site", &w.site]).stdout);
    assert!(shown.contains("spare (stopped in us-east-1, failover prefers spare") && shown.contains(&second), "{shown}");

    // The failover takes the spare: the plan says so and what data it
    // trades; no instance is launched; the site runs on the spare.
    let out = w.drctl(&["-o", "json", "failover", &w.site, "--plan"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let plan = last_json(&out.stdout)["plan"].clone();
    assert_eq!(plan["spare"]["instance_id"], second.as_str(), "{plan}");
    let shown = text(&w.drctl(&["failover", &w.site, "--plan"]).stdout);
    assert!(shown.contains("hot spare:") && shown.contains("no disk hydration"), "{shown}");
    let fresh = w.drctl(&["-o", "json", "failover", &w.site, "--plan", "--fresh"]);
    assert!(last_json(&fresh.stdout)["plan"]["spare"].is_null(), "--fresh does not take it: {}", text(&fresh.stdout));

    let op = w.run_ok(&["failover", &w.site, "--yes", "--wait"]);
    let op_id = op["id"].as_str().expect("id").to_owned();
    let taken: Vec<String> = w.launched_by(&op_id).await.iter().map(|i| i.instance_id().unwrap_or_default().to_owned()).collect();
    assert_eq!(
        taken,
        std::slice::from_ref(&second),
        "no instance launched: the spare, retagged as the failover's: {}",
        op["plan"]["warnings"]
    );
    assert_eq!(w.instance_state(&w.instance.id).await, "stopped", "the old primary is fenced");
    assert_eq!(w.eip_holder().await, second, "the Elastic IP is on the spare");
    assert_eq!(w.dns_a().await, vec![w.eip.clone()]);
    let disk = disk_of(&w.dataplane, &second).await;
    let operator = read(&disk.join("etc/default/replicated-operator"));
    assert!(operator.contains(&format!("PUBLIC_ADDRESS={}", w.eip)), "the public address is the Elastic IP again: {operator}");
    w.wait_primary(&second);
    let launch = op["steps"].as_array().expect("steps").iter().find(|s| s["name"] == "launch").cloned().expect("launch");
    assert!(launch["detail"].as_str().unwrap_or("").contains("took the hot spare"), "{launch}");
}
