//! The controller's store: an online backup that holds the catalog, a
//! refusal to start on a store that lost it, and a rebuild from EC2's tags.

use std::process::Command;
use std::time::Duration;

use dr_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_store_is_refused_and_rebuilt_from_ec2_tags() {
    let mut w = World::start("prod-1", "100ms").await;
    w.wait_agent();
    let out = last_json(&drctl(&w.pki, &w.controller.url, &["--output", "json", "backup", "prod-1", "--wait"]).stdout);
    assert_eq!(out["state"], "succeeded", "{out:#}");
    let ami = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"])["backups"][0]["image_id"].as_str().expect("ami").to_owned();

    // An online backup while the controller runs holds the backup.
    let copy = w.dir.path().join("copy.db");
    let config = w.controller.config.clone();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(bin("dr-controller"));
        aws_env(&mut cmd).arg("--config").arg(&config).args(args);
        cmd.output().expect("dr-controller runs")
    };
    let out = run(&["store", "backup", "--to", copy.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("1 backup(s)"), "{}", text(&out.stdout));
    assert!(!run(&["store", "backup", "--to", copy.to_str().expect("utf-8")]).status.success(), "never overwrites");

    // The disk is lost: a controller on an empty store refuses to start.
    w.controller.kill();
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(w.controller.dir.join(f));
    }
    let mut child = Command::new(bin("dr-controller"));
    aws_env(&mut child).arg("--config").arg(&config);
    let started = std::time::Instant::now();
    let out = child.output().expect("runs");
    assert!(!out.status.success() && started.elapsed() < Duration::from_secs(60));
    let err = text(&out.stderr);
    assert!(err.contains("holds no backup") && err.contains(&ami) && err.contains("store rebuild"), "{err}");

    // Rebuilt from the tags, the controller starts and knows the backup.
    let out = run(&["store", "rebuild"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("backup {ami} recovered")), "{}", text(&out.stdout));
    w.controller.restart(&[]);
    let backups = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"]);
    assert_eq!(backups["backups"][0]["image_id"], ami.as_str(), "{backups:#}");
    assert!(backups["backups"][0]["quiesce_note"].as_str().expect("note").contains("rebuilt"), "{backups:#}");
    // A second rebuild adds nothing.
    let out = run(&["store", "rebuild"]);
    assert!(text(&out.stdout).contains("0 backup(s) and 0 copy(ies) added, 1 already known"), "{}", text(&out.stdout));
}
