//! The controller SIGKILLed after each step of a spare's preparation has
//! acted but before its result is stored, then restarted: every spare
//! operation ends installed, one instance launched per operation, and the
//! site keeps exactly one live spare (the one installed), the one it
//! replaced terminated; production is untouched.

use std::time::Duration;

use dr_controller::engine::Workflow;
use dr_controller::workflows::spare::Spare;
use dr_tests::recovery_world::*;
use dr_tests::{assert_eventually, drctl_json, site_status};

fn spare_op(w: &RecoveryWorld) -> Option<String> {
    site_status(&w.pki, &w.controller.url, &w.site)["spare"]["operation_id"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_after_any_spare_step_leaves_one_spare() {
    let spec = RecoverySpec { site_toml: "[site.policy]\nspare = \"stopped\"\nspare_max_lag = \"1s\"\n".into(), ..Default::default() };
    let mut w = RecoveryWorld::start("crash-spare", spec).await;
    let steps: Vec<&str> = Spare::steps().iter().map(|d| d.name).collect();
    assert_eq!(steps.len(), 15);
    let mut previous: Option<String> = None;
    for step in &steps {
        // Armed before the backup that makes the keeper prepare a new spare.
        let point = format!("step.{step}.after");
        w.controller.kill();
        w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", &point)]);
        w.wait_primary(&w.instance.id);
        assert_eq!(w.backup()["state"], "succeeded", "backup before a crash at {point}");
        let status = w.controller.proc.as_mut().expect("running").wait_exit(Duration::from_secs(90));
        assert!(status.is_some(), "the controller reached {point}\n{}", tail(&w.controller.log()));
        w.controller.restart(&[]);
        assert_eventually!(
            Duration::from_secs(120),
            spare_op(&w).is_some_and(|op| Some(&op) != previous.as_ref()),
            "a new spare is installed after a crash at {point}: {}\n{}",
            site_status(&w.pki, &w.controller.url, &w.site),
            tail(&w.controller.log())
        );
        let op = spare_op(&w).expect("op");
        // Installed is not ended: `retire` and `release` still run after
        // `install` commits the spare.
        let mut done = drctl_json(&w.pki, &w.controller.url, &["operation", &op]);
        assert_eventually!(
            Duration::from_secs(60),
            {
                let ended = !matches!(done["state"].as_str(), Some("running" | "cancelling"));
                if !ended {
                    done = drctl_json(&w.pki, &w.controller.url, &["operation", &op]);
                }
                ended
            },
            "the spare operation {op} ends after a crash at {point}: {done:#}"
        );
        assert_eq!(done["state"], "succeeded", "crash at {point}: {done:#}");
        assert_eq!(w.launched_by(&op).await.len(), 1, "one instance for the operation after a crash at {point}");
        let installed = site_status(&w.pki, &w.controller.url, &w.site)["spare"]["instance_id"].as_str().expect("spare").to_owned();
        assert_eventually!(
            Duration::from_secs(30),
            w.alive_with_role("spare").await == vec![installed.clone()],
            "one live spare, the installed one, after a crash at {point}: {:?}",
            w.alive_with_role("spare").await
        );
        assert_eq!(w.instance_state(&w.instance.id).await, "running", "production untouched after a crash at {point}");
        assert_eq!(w.eip_holder().await, w.instance.id);
        previous = Some(op);
    }
}
