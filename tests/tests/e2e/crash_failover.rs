//! The controller SIGKILLed after each step of a failover (and of a
//! failback) has acted but before its result is stored, then restarted:
//! every failover completes once, with one new instance, each agent step run once on it (its
//! journal answers the repeat), the old instance fenced and the Elastic IP
//! on the new one.

use dr_controller::engine::Workflow;
use dr_controller::workflows::failover::Failover;
use dr_tests::recovery_world::*;
use dr_tests::{drctl_json, last_json, replicatedctl_calls, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_after_any_failover_step_duplicates_nothing() {
    let mut w = RecoveryWorld::start("crash-fo", RecoverySpec::default()).await;
    let steps: Vec<&str> = Failover::steps().iter().map(|d| d.name).collect();
    assert_eq!(steps.len(), 17);
    let mut primary = w.instance.id.clone();
    for step in &steps {
        w.wait_primary(&primary);
        let backup = w.backup();
        assert_eq!(backup["state"], "succeeded", "{backup}");
        let point = format!("step.{step}.after");
        let site = w.site.clone();
        let (op, done) = w.crash_during(&primary.clone(), &point, &["failover", &site, "--yes"]);
        assert_eq!(done["state"], "succeeded", "crash at {point}: {done:#}");
        let launched = w.launched_by(&op).await;
        assert_eq!(launched.len(), 1, "one instance after a crash at {point}");
        let new = launched[0].instance_id().expect("id").to_owned();
        assert_eq!(w.instance_state(&primary).await, "stopped", "the old primary is fenced after a crash at {point}");
        assert_eq!(w.eip_holder().await, new, "the Elastic IP is on the new instance after a crash at {point}");
        let disk = disk_of(&w.dataplane, &new).await;
        // The restored disk carries the calls logged before its backup.
        let ami = launched[0].image_id().expect("ami").to_owned();
        let image_disk = w.dataplane.images().await.remove(&ami).expect("the image's disk");
        for call in ["app start", "app stop"] {
            let ran = replicatedctl_calls(&disk, call) - replicatedctl_calls(&image_disk, call);
            assert_eq!(ran, 1, "`{call}` ran once on {new} (crash at {point})");
        }
        let s = drctl_json(&w.pki, &w.controller.url, &["status", "--site", &w.site]);
        assert_eq!(s["sites"][0]["primary_instance_id"], new.as_str(), "promoted after a crash at {point}");
        primary = new;
    }
}

/// A failback is the failover workflow planned for home. The controller
/// SIGKILLed after any of its steps (among them the fence of the DR
/// instance, the launch at home, the agent verified in another region than
/// the site's, the home Elastic IP, DNS, the promotion that moves the
/// site's region back) still brings the site home once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_during_a_failback_duplicates_nothing() {
    let spec = RecoverySpec { controller_toml: "[policy]\ncopy_regions = [\"us-west-2\"]\n".into(), ..Default::default() };
    let mut w = RecoveryWorld::start("crash-fb", spec).await;
    let (west, _) = w.dr_region("us-west-2").await;
    let mut primary = w.instance.id.clone();
    for step in Failover::steps().iter().map(|d| d.name) {
        // Away: a failover into us-west-2 from the home backup's copy.
        w.wait_primary(&primary);
        assert_eq!(w.backup()["state"], "succeeded");
        w.newest_copy_in("us-west-2", Some(&primary)).await;
        let out = w.drctl(&["-o", "json", "failover", &w.site, "--region", "us-west-2", "--yes", "--wait"]);
        let away = last_json(&out.stdout);
        assert_eq!(away["state"], "succeeded", "{}{}", text(&out.stdout), text(&out.stderr));
        let dr = launched_by(&west, away["id"].as_str().expect("id")).await[0].instance_id().expect("id").to_owned();

        // Home, with a crash after `step`.
        w.wait_primary(&dr);
        assert_eq!(w.backup()["state"], "succeeded");
        w.newest_copy_in("us-east-1", Some(&dr)).await;
        let point = format!("step.{step}.after");
        let site = w.site.clone();
        let (op, done) = w.crash_during(&dr, &point, &["failback", &site, "--yes"]);
        assert_eq!(done["state"], "succeeded", "crash at {point}: {done:#}");
        let home = w.launched_by(&op).await;
        assert_eq!(home.len(), 1, "one instance at home after a crash at {point}");
        let back = home[0].instance_id().expect("id").to_owned();
        assert_eq!(w.eip_holder().await, back, "the home Elastic IP is on it after a crash at {point}");
        assert_eq!(w.dns_a().await, vec![w.eip.clone()], "DNS names it after a crash at {point}");
        assert_eq!(instance_state_in(&west, &dr).await, "stopped", "the DR instance is fenced after a crash at {point}");
        let s = drctl_json(&w.pki, &w.controller.url, &["status", "--site", &w.site]);
        assert_eq!(s["sites"][0]["primary_instance_id"], back.as_str(), "promoted after a crash at {point}");
        assert_eq!(s["sites"][0]["region"], "us-east-1", "home after a crash at {point}");
        primary = back;
    }
}
