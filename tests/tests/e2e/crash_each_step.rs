//! The controller SIGKILLed after each step of a backup has acted but before
//! its result is stored, then restarted: every backup completes once, the
//! file system is thawed, the builders are undrained, and there is no
//! duplicate AMI or copy. The heaviest policy is used: drain + freeze, with
//! a copy to a DR region.

use std::time::Duration;

use dr_tests::*;

use dr_controller::engine::Workflow;
use dr_controller::workflows::backup::Backup;

fn west(moto: &Moto) -> aws_sdk_ec2::Client {
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "static");
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-west-2"))
            .credentials_provider(creds)
            .endpoint_url(&moto.url)
            .build(),
    )
}

fn nodes_undrained(nomad_url: &str) -> bool {
    use std::io::{Read, Write};
    let addr = nomad_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect nomad sim");
    write!(s, "GET /v1/nodes HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    let nodes: serde_json::Value = serde_json::from_str(body).expect("nodes json");
    nodes.as_array().expect("nodes").iter().all(|n| n["Drain"] == false && n["SchedulingEligibility"] == "eligible")
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_after_any_step_duplicates_nothing_and_leaves_nothing_quiesced() {
    let fs = LoopFs::new(64);
    let (_nomad, nomad_url) = spawn_listening("dr-sim-nomad", &["--nodes", "2", "--allocs-per-node", "1", "--alloc-secs", "0.2"]);
    let agent_toml = format!(
        "[freeze]\nmounts = [\"{}\"]\ndeadline = \"90s\"\n\n[nomad]\napi_url = \"{nomad_url}\"\ndrain_deadline = \"20s\"\n",
        fs.mount.display()
    );
    let policy = "[policy]\nquiesce = \"drain\"\nkeep_last = 50\ncopy_regions = [\"us-west-2\"]\n";
    let mut w = World::start_custom("prod-1", "100ms", &[], policy, &agent_toml).await;
    let (east, west) = (w.moto.client().await, west(&w.moto));
    let steps: Vec<&str> = Backup::steps().iter().map(|d| d.name).collect();
    assert_eq!(steps.len(), 10);
    for step in &steps {
        w.controller.kill();
        let point = format!("step.{step}.after");
        w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", point.as_str())]);
        w.wait_agent();
        let op = drctl_json(&w.pki, &w.controller.url, &["backup", "prod-1"])["operation_id"].as_str().expect("operation id").to_owned();
        let status = w.controller.proc.as_mut().expect("running").wait_exit(Duration::from_secs(60));
        assert!(status.is_some(), "the controller reached {point}\n{}", w.controller.log());

        w.controller.restart(&[]);
        assert_eventually!(
            Duration::from_secs(60),
            drctl_json(&w.pki, &w.controller.url, &["operation", &op])["state"] != "running",
            "{op} finishes after a crash at {point}\n{}",
            w.controller.log()
        );
        let done = drctl_json(&w.pki, &w.controller.url, &["operation", &op]);
        assert_eq!(done["state"], "succeeded", "crash at {point}: {done:#}");
        assert_eq!(images_tagged(&east, "dr:operation", &op).await.len(), 1, "one AMI after a crash at {point}");
        assert_eventually!(
            Duration::from_secs(20),
            {
                let b = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"]);
                b["backups"]
                    .as_array()
                    .expect("list")
                    .iter()
                    .any(|x| x["operation_id"] == op.as_str() && x["copies"][0]["state"] == "available")
            },
            "the copy of {op} becomes available"
        );
        assert!(images_tagged(&west, "dr:operation", &op).await.len() <= 1, "no duplicate copy after a crash at {point}");
        assert!(
            fs.writable_within(Duration::from_secs(5)),
            "thawed after a crash at {point}: {:#}\nagent log:\n{}",
            done["steps"],
            w.agent.log().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        assert!(nodes_undrained(&nomad_url), "builders undrained after a crash at {point}");
    }
    let backups = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"]);
    let list = backups["backups"].as_array().expect("list");
    assert_eq!(list.len(), steps.len(), "one backup per round");
    assert!(list.iter().all(|b| b["consistency"] == "filesystem"), "{backups:#}");
}
