//! The shipped IAM policies evaluated with their conditions
//! (`tests/iam/evaluator`: @cloud-copilot/iam-simulate, installed by
//! `tests/run.sh` with `npm ci`). moto enforces IAM at action level only
//! (`iam.rs`); here every AWS call a controller makes is recorded
//! (`dr_tests::iam_record`) with the resource's tags and the request's
//! tags, and evaluated under `deploy/iam-controller-policy.json`.
//! `tests/run.sh` does the same over every end-to-end test's calls.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use dr_tests::recovery_world::{RecoverySpec, RecoveryWorld, tail};
use dr_tests::*;

fn evaluator() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("iam/evaluator");
    assert!(
        dir.join("node_modules/@cloud-copilot/iam-simulate").exists(),
        "the IAM evaluator is not installed: run `npm ci` in {} (tests/run.sh does)",
        dir.display()
    );
    dir
}

fn node(args: &[&str]) -> Output {
    Command::new("node").current_dir(evaluator()).args(args).output().expect("run node (node 20 is needed for the IAM evaluator)")
}

fn events(w: &RecoveryWorld) -> Vec<serde_json::Value> {
    let v = drctl_json(&w.pki, &w.controller.url, &["events", &w.site, "--limit", "1000"]);
    v["events"].as_array().cloned().unwrap_or_default()
}

#[test]
fn the_evaluator_follows_aws_documented_conditions_and_denies_what_the_policy_must_deny() {
    let out = node(&["selftest.mjs"]);
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "selftest failed:\n{report}");
    for must in [
        "ok   shipped: DeregisterImage of an AMI we did not tag is DENIED",
        "ok   shipped: ec2:StartInstances of an instance that is not one of our sites' (no dr:site) is DENIED",
        "ok   shipped: ec2:StopInstances of an instance that is not one of our sites' (no dr:site) is DENIED",
        "ok   shipped: ec2:TerminateInstances of an instance that is not one of our sites' (no dr:site) is DENIED",
        "ok   shipped: ec2:ModifyInstanceAttribute of an instance that is not one of our sites' (no dr:site) is DENIED",
        "ok   shipped: ec2:StartInstances of a site's adopted primary (dr:site): allowed",
    ] {
        assert!(report.contains(must), "`{must}` in:\n{report}");
    }

    // The evaluation itself fails on a denied call and says why.
    let dir = tempfile::tempdir().expect("tempdir");
    let denied = serde_json::json!({
        "service": "ec2", "action": "ec2:StopInstances", "region": REGION, "account": "123456789012",
        "access_key": "testing", "role": null, "dry_run": false, "status": 200,
        "requests": [{"action": "ec2:StopInstances", "resource": "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0",
                      "resource_tags": {"Name": "not-ours"}, "request_tags": {}, "context": {}}]
    });
    std::fs::write(dir.path().join("1.jsonl"), format!("{denied}\n")).expect("write");
    let out = node(&["evaluate.mjs", dir.path().to_str().expect("path"), "../../../deploy", "--partial"]);
    let report = text(&out.stdout);
    assert!(!out.status.success(), "a denied call fails the evaluation:\n{report}");
    assert!(
        report.contains("DENIED ec2:StopInstances on arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0")
            && report.contains("aws:ResourceTag/dr:site"),
        "the denial names the call and the condition: {report}"
    );
    // And without --partial, recordings that miss the workflows' calls fail.
    let out = node(&["evaluate.mjs", dir.path().to_str().expect("path"), "../../../deploy"]);
    assert!(!out.status.success() && text(&out.stdout).contains("NOT COVERED ec2:CreateImage"), "{}", text(&out.stdout));
}

/// Finding 5 of issue 20: rung 2 stops the primary and starts it again; the
/// shipped policy allows StartInstances of an original primary only once
/// the controller has adopted it (tagged `dr:site`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restart_of_the_original_primary_is_allowed_by_the_shipped_policy() {
    let record_dir = tempfile::tempdir().expect("tempdir");
    let records = record_dir.path().to_owned();
    let policy = "auto_failover = \"auto\"\nrepair_after = \"1s\"\nconfirm_for = \"3s\"\nhealth_timeout = \"2s\"\n";
    let spec = RecoverySpec {
        fault_proxy: true,
        health_policy: Some(policy.into()),
        controller_toml: "[health]\ninterval = \"500ms\"\n".into(),
        // This controller's calls, and no other test's.
        record_into: Some(records.clone()),
        ..Default::default()
    };
    let w = RecoveryWorld::start("site-iam", spec).await;
    let primary = w.instance.id.clone();
    w.wait_primary(&primary);

    // Adoption: the controller tags the primary it confirmed.
    let site_tag = || async {
        let out =
            w.ec2.describe_tags().filters(aws_sdk_ec2::types::Filter::builder().name("resource-id").values(&primary).build()).send().await;
        out.expect("DescribeTags").tags().iter().find(|t| t.key() == Some("dr:site")).and_then(|t| t.value()).map(str::to_owned)
    };
    let start = std::time::Instant::now();
    while site_tag().await.as_deref() != Some("site-iam") {
        assert!(start.elapsed() < Duration::from_secs(30), "the primary tagged dr:site=site-iam\n{}", tail(&w.controller.log()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Rung 2: EC2 reports the system status check failed.
    let faults = w.faults.as_ref().expect("fault proxy");
    faults.faults.impair_system(&primary);
    assert_eventually!(Duration::from_secs(60), faults.faults.stop_calls().contains(&primary), "StopInstances of {primary}");
    faults.faults.clear(&primary);
    assert_eventually!(
        Duration::from_secs(120),
        events(&w).iter().any(|e| e["kind"] == "repair.succeeded"),
        "the host restart succeeds\n{}",
        tail(&w.controller.log())
    );
    assert_eq!(faults.stats.calls_of("StartInstances"), 1, "started once");

    // Every call the controller made, evaluated with the policy's conditions.
    let out = node(&["evaluate.mjs", records.to_str().expect("path"), "../../../deploy", "--partial"]);
    let report = text(&out.stdout);
    println!("{report}");
    assert!(out.status.success(), "a call the shipped policy denies:\n{report}");
    let recorded: Vec<serde_json::Value> = std::fs::read_dir(&records)
        .expect("records")
        .flat_map(|f| std::fs::read_to_string(f.expect("entry").path()).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let start_of_primary = recorded.iter().flat_map(|r| r["requests"].as_array().cloned().unwrap_or_default()).find(|r| {
        r["action"] == "ec2:StartInstances" && r["resource"].as_str().is_some_and(|a| a.ends_with(&format!("instance/{primary}")))
    });
    let start_of_primary = start_of_primary.unwrap_or_else(|| panic!("StartInstances of {primary} recorded:\n{report}"));
    assert_eq!(start_of_primary["resource_tags"]["dr:site"], "site-iam", "started while tagged: {start_of_primary}");
}
