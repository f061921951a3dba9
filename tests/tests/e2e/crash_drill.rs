//! The controller SIGKILLed after each step of a drill has acted but
//! before its result is stored, then restarted: every drill ends torn down
//! (nothing it launched is left running, counted in moto by tag), its
//! result is recorded once, and production is untouched.

use dr_controller::engine::Workflow;
use dr_controller::workflows::drill::Drill;
use dr_tests::drctl_json;
use dr_tests::recovery_world::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_after_any_drill_step_leaks_nothing() {
    let mut w = RecoveryWorld::start("crash-drill", RecoverySpec::default()).await;
    w.wait_primary(&w.instance.id);
    assert_eq!(w.backup()["state"], "succeeded");
    let vpc = w.ec2.describe_vpcs().send().await.expect("DescribeVpcs").vpcs()[0].vpc_id().expect("vpc").to_owned();
    let subnet = w.ec2.create_subnet().vpc_id(&vpc).cidr_block("172.31.201.0/24").send().await.expect("CreateSubnet");
    let subnet = subnet.subnet().and_then(|s| s.subnet_id()).expect("subnet").to_owned();
    let sg = w.ec2.create_security_group().group_name("drill").description("drill").vpc_id(&vpc).send().await.expect("SG");
    let sg = sg.group_id().expect("sg").to_owned();
    w.add_site_toml(&format!(
        "\n[site.drill]\nhostname = \"drill.example.com\"\nsubnet_id = \"{subnet}\"\nsecurity_group_ids = [\"{sg}\"]\n"
    ));
    let steps: Vec<&str> = Drill::steps().iter().map(|d| d.name).collect();
    assert_eq!(steps.len(), 15);
    for step in &steps {
        w.wait_primary(&w.instance.id);
        let point = format!("step.{step}.after");
        let (site, primary) = (w.site.clone(), w.instance.id.clone());
        let (op, done) = w.crash_during(&primary, &point, &["drill", &site]);
        assert_eq!(done["state"], "succeeded", "crash at {point}: {done:#}");
        let launched = w.launched_by(&op).await;
        assert_eq!(launched.len(), 1, "one copy after a crash at {point}");
        assert_eq!(w.alive_with_role("drill").await, Vec::<String>::new(), "nothing left running after a crash at {point}");
        let drills = drctl_json(&w.pki, &w.controller.url, &["drills", &w.site]);
        let recorded: Vec<_> = drills["drills"].as_array().expect("drills").iter().filter(|d| d["operation_id"] == op.as_str()).collect();
        assert_eq!(recorded.len(), 1, "recorded once after a crash at {point}: {drills}");
        assert_eq!(recorded[0]["ok"], true, "crash at {point}: {drills}");
        assert_eq!(w.instance_state(&w.instance.id).await, "running", "production untouched after a crash at {point}");
        assert_eq!(w.eip_holder().await, w.instance.id);
    }
}
