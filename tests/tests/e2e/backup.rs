//! A backup through controller and agent, against moto on loopback.

use dr_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_produces_exactly_one_tagged_ami_visible_in_drctl() {
    let w = World::start("prod-1", "200ms").await;
    w.wait_agent();

    // status shows the agent's instance and addresses.
    let site = site_status(&w.pki, &w.controller.url, "prod-1");
    assert_eq!(site["agent"]["instance_id"], w.instance.id.as_str());
    assert_eq!(site["agent"]["private_ip"], w.instance.private_ip.as_str());
    assert_eq!(site["agent"]["os_family"], "debian");
    assert!(site["last_backup"].is_null(), "no backup yet: {site}");

    let out = drctl(&w.pki, &w.controller.url, &["backup", "prod-1", "--wait"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "backup failed: {stdout}{}\n{}", text(&out.stderr), w.controller.log());
    // `drctl operation` output: `  state:        <state>`, then after
    // `  steps:` one line per step: `    <name> <state> <took>  <detail>`.
    let field = |label: &str| stdout.lines().find_map(|l| l.strip_prefix(label)).map(str::trim);
    let shown_steps: Vec<(String, String)> = stdout
        .lines()
        .skip_while(|l| *l != "  steps:")
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect();
    for step in [
        "check_agent",
        "quiesce",
        "create_image",
        "wait_snapshots",
        "unquiesce",
        "wait_available",
        "tag_snapshots",
        "record",
        "copy",
        "retention",
    ] {
        // Whole names: the first field of a line of the step table
        // (`quiesce` must not be satisfied by `unquiesce`).
        assert!(shown_steps.iter().any(|(name, _)| name == step), "the operation shows step {step}: {stdout}");
    }
    assert_eq!(field("  state:"), Some("succeeded"), "{stdout}");

    // Exactly one AMI carries the site's tag, and it is the one recorded.
    let ec2 = w.moto.client().await;
    let images = images_tagged(&ec2, "dr:site", "prod-1").await;
    assert_eq!(images.len(), 1, "one AMI for one backup");
    let image = &images[0];
    let tag = |k: &str| image.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(str::to_owned);
    assert_eq!(tag("dr:created-by").as_deref(), Some("dr-controller"));
    let op_id = tag("dr:operation").expect("operation tag");

    let backups = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"]);
    let list = backups["backups"].as_array().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["image_id"], image.image_id().expect("id"));
    assert_eq!(list[0]["operation_id"], op_id.as_str());
    assert_eq!(list[0]["consistency"], "crash");
    assert_eq!(list[0]["app_state"], "started", "the agent's app status is recorded");
    let snaps = list[0]["snapshot_ids"].as_array().expect("snapshots");
    assert!(!snaps.is_empty());

    // The snapshots got the operation's tags through CreateTags.
    let snap_out = ec2.describe_snapshots().snapshot_ids(snaps[0].as_str().expect("id")).send().await.expect("DescribeSnapshots");
    let snap_tags = snap_out.snapshots()[0].tags();
    assert!(snap_tags.iter().any(|t| t.key() == Some("dr:operation") && t.value() == Some(op_id.as_str())));

    // The operation can be inspected afterwards, step by step.
    let op = drctl_json(&w.pki, &w.controller.url, &["operation", &op_id]);
    assert_eq!(op["state"], "succeeded");
    assert_eq!(op["requested_by"], "operator/tester");
    assert!(op["steps"].as_array().expect("steps").iter().all(|s| s["state"] == "done"));

    // status now shows the last backup, and human output is readable.
    let site = site_status(&w.pki, &w.controller.url, "prod-1");
    assert_eq!(site["last_backup"]["image_id"], image.image_id().expect("id"));
    let human = text(&drctl(&w.pki, &w.controller.url, &["status"]).stdout);
    assert!(human.contains("prod-1") && human.contains(image.image_id().expect("id")), "{human}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drctl_errors_are_clear() {
    let w = World::start("prod-1", "200ms").await;
    let out = drctl(&w.pki, &w.controller.url, &["backup", "no-such-site"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown site `no-such-site`"), "{}", text(&out.stderr));

    let out = drctl(&w.pki, &w.controller.url, &["operation", "backup-nope"]);
    assert_eq!(out.status.code(), Some(5));

    // Refused for as long as `_reserved` lives (bound, not listening).
    let (_reserved, port) = closed_port();
    let closed = format!("https://127.0.0.1:{port}");
    let out = drctl(&w.pki, &closed, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot reach the controller"), "{}", text(&out.stderr));
}
