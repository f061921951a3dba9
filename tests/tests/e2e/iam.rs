//! The shipped IAM documents are sufficient, and a missing permission is a
//! clear, final error. moto's server enforces IAM here: `tests/iam/setup.py`
//! creates a user holding `deploy/iam-controller-policy.json`, the site role
//! (`iam-site-role-trust.json` + `iam-site-role-policy.json`), then switches
//! enforcement on. The controller runs with that user's access key, one
//! site in its own account and one through the role.
//!
//! What moto proves and what it does not (moto 5.2.5, read in its
//! `moto/iam/access_control.py`): it checks every Action, and for
//! sts:AssumeRole the role ARN and the trust policy's principal. It
//! evaluates EC2 actions against the resource `*` only, so setup.py widens
//! the EC2 statements' Resource to `*`; and it evaluates no Condition key
//! but `sts:ExternalId` (a condition it cannot evaluate passes). The
//! resource scoping and the tag conditions (`ec2:ResourceTag/...`,
//! `aws:RequestTag/...`, `ec2:CreateAction`) are therefore documented, not
//! proven, here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dr_tests::*;

/// The IAM world setup.py made.
struct IamWorld {
    dir: tempfile::TempDir,
    url: String,
    _moto: Proc,
    pki: Pki,
    facts: serde_json::Value,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The moto venv's python (it has boto3).
fn python() -> PathBuf {
    let server = std::env::var("DR_MOTO_SERVER").map(PathBuf::from).unwrap_or_else(|_| repo().join(".venv/bin/moto_server"));
    server.with_file_name("python")
}

/// moto, the IAM users and role, `instances` services machines; the
/// controller's policy without the actions in `drop`.
fn iam_world(instances: usize, drop: &[&str]) -> IamWorld {
    let dir = tempfile::tempdir().expect("tempdir");
    // moto's server, through tests/iam/moto_server.py (see there why).
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/iam/moto_server.py"));
    let (moto, url) = Moto::spawn(cmd, &dir.path().join("moto.log"));
    let pki = Pki::new(dir.path());
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/iam/setup.py"))
        .args(["--endpoint", &url, "--deploy"])
        .arg(repo().join("deploy"))
        .args(["--instances", &instances.to_string()]);
    for d in drop {
        cmd.args(["--drop", d]);
    }
    let out = cmd.output().expect("run tests/iam/setup.py");
    assert!(out.status.success(), "setup.py failed: {}{}", text(&out.stdout), text(&out.stderr));
    let facts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("setup.py prints JSON");
    IamWorld { dir, url, _moto: moto, pki, facts }
}

impl IamWorld {
    fn instance(&self, i: usize) -> String {
        self.facts["instances"][i].as_str().expect("instance id").to_owned()
    }

    fn role(&self) -> String {
        self.facts["role_arn"].as_str().expect("role").to_owned()
    }

    /// A controller config: `sites` are (id, instance, role_arn).
    /// The controller listens on a port it binds itself ([`Self::start_controller`]).
    fn config(&self, extra: &str, sites: &[(&str, String, Option<String>)]) -> PathBuf {
        let port = 0;
        // No `max_attempts`: the SDK's default of one attempt is in force.
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nheartbeat_interval = \"1s\"\nshutdown_grace = \"3s\"\n\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
             [store]\npath = \"{}\"\n\n[aws]\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\n\n\
             [backup]\npoll_initial = \"100ms\"\npoll_max = \"1s\"\ntimeout = \"5m\"\nagent_call_timeout = \"5s\"\n\
             copy_poll = \"500ms\"\nscheduler_tick = \"500ms\"\n\n{extra}\n",
            self.pki.ca().display(),
            self.pki.dir.join("controller.pem").display(),
            self.pki.dir.join("controller.key").display(),
            self.dir.path().join("state.db").display(),
            self.url,
        );
        text.push_str(&self.pki.controller_toml(""));
        let path = self.dir.path().join("controller.toml");
        for (id, instance, role) in sites {
            text.push_str(&format!("\n[[site]]\nid = \"{id}\"\ninstance_id = \"{instance}\"\n"));
            if let Some(role) = role {
                text.push_str(&format!("role_arn = \"{role}\"\n"));
            }
        }
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// `dr-controller ARGS` with the restricted user's credentials (and no
    /// session token: moto would take the key for a role session's).
    fn as_controller<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let user = &self.facts["controller"];
        aws_env(cmd)
            .env("AWS_ACCESS_KEY_ID", user["key"].as_str().expect("key"))
            .env("AWS_SECRET_ACCESS_KEY", user["secret"].as_str().expect("secret"))
            .env_remove("AWS_SESSION_TOKEN")
    }

    /// The controller and the port it bound (and logged).
    fn start_controller(&self, config: &Path) -> (Proc, u16) {
        let mut cmd = Command::new(bin("dr-controller"));
        self.as_controller(&mut cmd).arg("--config").arg(config).env("RUST_LOG", "info,aws=warn,h2=warn,hyper=warn");
        let log = self.dir.path().join("controller.log");
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut proc = Proc::spawn("dr-controller", &mut cmd, &log);
        let port = logged_port(&mut proc, &log, from, "dr-controller listening", "addr=127.0.0.1:", Duration::from_secs(30));
        wait_for_port(port, Duration::from_secs(30));
        (proc, port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    fn preflight(&self, config: &Path, site: Option<&str>) -> (bool, String) {
        let mut cmd = Command::new(bin("dr-controller"));
        self.as_controller(&mut cmd).arg("preflight").arg("--config").arg(config);
        if let Some(s) = site {
            cmd.args(["--site", s]);
        }
        let out = cmd.output().expect("run dr-controller preflight");
        (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }

    /// EC2 as the all-powerful test user, in `region`.
    async fn admin(&self, region: &str) -> aws_sdk_ec2::Client {
        let a = &self.facts["admin"];
        let creds = aws_credential_types::Credentials::new(
            a["key"].as_str().expect("key"),
            a["secret"].as_str().expect("secret"),
            None,
            None,
            "static",
        );
        let config = aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(region.to_owned()))
            .credentials_provider(creds)
            .endpoint_url(&self.url)
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }
}

fn backup(w: &IamWorld, url: &str, site: &str) -> (bool, serde_json::Value) {
    let out = drctl(&w.pki, url, &["backup", site, "--wait", "--output", "json"]);
    // JSON lines: the operation id first, the finished operation last.
    (out.status.success(), last_json(&out.stdout))
}

fn backups(w: &IamWorld, url: &str, site: &str) -> Vec<serde_json::Value> {
    drctl_json(&w.pki, url, &["backups", site])["backups"].as_array().expect("list").clone()
}

fn wait_copies_available(w: &IamWorld, url: &str, site: &str) {
    assert_eventually!(
        Duration::from_secs(60),
        backups(w, url, site)
            .iter()
            .filter(|b| b["state"] == "available")
            .all(|b| b["copies"].as_array().is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["state"] == "available"))),
        "every copy of {site} becomes available: {:#?}\n{}",
        backups(w, url, site),
        w.log()
    );
}

async fn image_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> bool {
    ec2.describe_images().image_ids(id).send().await.is_ok_and(|o| !o.images().is_empty())
}

async fn snapshot_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> bool {
    ec2.describe_snapshots().snapshot_ids(id).send().await.is_ok_and(|o| !o.snapshots().is_empty())
}

const POLICY: &str = "[policy]\nquiesce = \"none\"\nkeep_last = 1\ncopy_regions = [\"us-west-2\"]\ncopy_keep_last = 1\n";

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_policy_runs_backups_retention_and_copies_without_a_denial() {
    let w = iam_world(2, &[]);
    let sites = [("own", w.instance(0), None), ("cross", w.instance(1), Some(w.role()))];
    let config = w.config(POLICY, &sites);

    // Preflight first, as the README says. The services machines carry no
    // `dr:site` tag yet (no agent has connected: the controller adds it
    // when it adopts a site's primary): preflight names it and its fix.
    let (ok, report) = w.preflight(&config, None);
    println!("preflight before the primaries are tagged:\n{report}");
    assert!(!ok, "an untagged primary fails preflight:\n{report}");
    let untagged: Vec<&str> = report.lines().filter(|l| l.contains("DENIED")).collect();
    assert_eq!(untagged.len(), 2, "one line per site, nothing else denied:\n{report}");
    for (site, instance, _) in &sites {
        assert!(
            untagged.iter().any(|l| l.starts_with(site)
                && l.contains("tag dr:site")
                && l.contains(&format!("aws ec2 create-tags --resources {instance} --tags Key=dr:site,Value={site}"))),
            "{site}'s line names the tag and the command that adds it:\n{report}"
        );
    }
    // Tagged as the adoption (or that command) tags them: everything allowed.
    let admin = w.admin(REGION).await;
    for (site, instance, _) in &sites {
        admin
            .create_tags()
            .resources(instance)
            .tags(aws_sdk_ec2::types::Tag::builder().key("dr:site").value(*site).build())
            .send()
            .await
            .expect("tag the primary");
    }
    let (ok, report) = w.preflight(&config, None);
    println!("preflight with the shipped policy:\n{report}");
    assert!(ok, "preflight denies something the shipped policy grants:\n{report}");
    assert!(report.contains("cross") && report.contains("sts:AssumeRole"), "{report}");
    assert!(!report.contains("DENIED"), "{report}");

    let (_controller, port) = w.start_controller(&config);
    let url = format!("https://127.0.0.1:{port}");
    for (site, _, _) in &sites {
        // Two backups with keep_last = 1: the second one's retention
        // deregisters the first AMI and deletes its snapshots; both copy.
        let (ok, first) = backup(&w, &url, site);
        assert!(ok, "first backup of {site} failed: {first:#}\n{}", w.log());
        wait_copies_available(&w, &url, site);
        let (ok, second) = backup(&w, &url, site);
        assert!(ok, "second backup of {site} failed: {second:#}\n{}", w.log());
        wait_copies_available(&w, &url, site);
        // A prune now also deletes the first copy (copy_keep_last = 1).
        let out = drctl(&w.pki, &url, &["prune", site]);
        assert!(out.status.success(), "prune {site}: {}{}\n{}", text(&out.stdout), text(&out.stderr), w.log());

        let list = backups(&w, &url, site);
        assert_eq!(list.len(), 2, "{list:#?}");
        let (kept, gone) = (&list[0], &list[1]);
        assert_eq!(gone["state"], "deleted", "{list:#?}");
        let east = w.admin(REGION).await;
        let west = w.admin("us-west-2").await;
        assert!(!image_exists(&east, gone["image_id"].as_str().expect("id")).await, "deregistered");
        for snap in gone["snapshot_ids"].as_array().expect("snapshots") {
            assert!(!snapshot_exists(&east, snap.as_str().expect("id")).await, "snapshot {snap} deleted");
        }
        assert!(image_exists(&east, kept["image_id"].as_str().expect("id")).await);
        let old_copy = gone["copies"][0].clone();
        assert_eq!(old_copy["state"], "deleted", "the old copy is pruned: {old_copy:#}");
        assert!(!image_exists(&west, old_copy["image_id"].as_str().expect("id")).await, "old copy deregistered");
        let new_copy = kept["copies"][0]["image_id"].as_str().expect("copy id").to_owned();
        assert!(image_exists(&west, &new_copy).await, "the newest copy stays");
        // The copy carries its tags (CopyImage's own TagSpecifications, or
        // the reconciler's re-tagging where EC2 drops them).
        let tagged = images_tagged(&west, "dr:site", site).await;
        assert!(tagged.iter().any(|i| i.image_id() == Some(new_copy.as_str())), "copy tagged dr:site={site}");
    }
    // After the backups, preflight acts on the newest one's AMI and
    // snapshot, and (for a failover) on the site's Elastic IP: nothing is
    // left unchecked but the Elastic IP the cross-account site has none of.
    let east = w.admin(REGION).await;
    let alloc = east.allocate_address().domain(aws_sdk_ec2::types::DomainType::Vpc).send().await.expect("AllocateAddress");
    let alloc = alloc.allocation_id().expect("allocation").to_owned();
    east.associate_address().allocation_id(&alloc).instance_id(w.instance(0)).send().await.expect("AssociateAddress");
    let (ok, report) = w.preflight(&config, None);
    println!("preflight after the backups:\n{report}");
    assert!(ok && report.contains(", 0 denied, 1 not checked"), "{report}");
    assert!(report.lines().any(|l| l.starts_with("own") && l.contains("ec2:AssociateAddress") && l.contains("allowed")), "{report}");
    for line in report.lines().filter(|l| l.contains("not checked (")) {
        assert!(line.starts_with("cross") && line.contains("has no Elastic IP to move"), "only the EIP-less site is unchecked: {line}");
    }
    for action in ["ec2:RunInstances", "ec2:StopInstances", "ec2:TerminateInstances", "ec2:DescribeAddresses"] {
        assert!(
            report.lines().filter(|l| l.contains(action) && l.contains("allowed")).count() == 2,
            "{action} allowed for both sites: {report}"
        );
    }
    let log = w.log();
    for word in ["permission denied", "AccessDenied", "UnauthorizedOperation"] {
        assert!(!log.contains(word), "`{word}` in the controller's log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_action_fails_its_step_with_a_clear_final_error() {
    let w = iam_world(1, &["ec2:DeregisterImage"]);
    let sites = [("own", w.instance(0), None)];
    let config = w.config(POLICY, &sites);

    let (ok, report) = w.preflight(&config, None);
    println!("preflight without ec2:DeregisterImage:\n{report}");
    assert!(!ok, "preflight exits non-zero when a permission is missing:\n{report}");
    // The untagged primary is named too (its agent never connected here).
    assert_eq!(report.lines().filter(|l| l.contains("DENIED") && l.contains("tag dr:site")).count(), 1, "{report}");
    let denied: Vec<&str> = report.lines().filter(|l| l.contains("DENIED") && !l.contains("tag dr:site")).collect();
    assert_eq!(denied.len(), 2, "DeregisterImage in the site's region and in the DR region:\n{report}");
    assert!(denied.iter().all(|l| l.contains("ec2:DeregisterImage")), "{report}");
    assert!(denied.iter().any(|l| l.contains(REGION)) && denied.iter().any(|l| l.contains("us-west-2")), "{report}");
    for action in ["ec2:CreateImage", "ec2:CopyImage", "ec2:DeleteSnapshot", "ec2:DescribeInstances", "ec2:DescribeInstanceStatus"] {
        assert!(report.lines().any(|l| l.contains(action) && l.contains("allowed")), "{action} allowed:\n{report}");
    }
    assert!(report.contains("preflight: ") && report.contains(" 3 denied"), "the two DeregisterImage and the tag: {report}");

    let (_controller, port) = w.start_controller(&config);
    let url = format!("https://127.0.0.1:{port}");
    let (ok, first) = backup(&w, &url, "own");
    assert!(ok, "the first backup deletes nothing and succeeds: {first:#}\n{}", w.log());
    let first_image = backups(&w, &url, "own")[0]["image_id"].as_str().expect("id").to_owned();
    let (ok, second) = backup(&w, &url, "own");
    assert!(!ok, "retention cannot deregister: the backup fails: {second:#}");
    let op = second["id"].as_str().expect("id").to_owned();

    // The step names the action and the resource, and was tried once.
    let out = drctl(&w.pki, &url, &["--output", "json", "operation", &op]);
    assert_eq!(out.status.code(), Some(1), "drctl operation of a failed operation exits 1");
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let step = view["steps"].as_array().expect("steps").iter().find(|s| s["name"] == "retention").cloned().expect("step");
    let expected = format!("permission denied: ec2:DeregisterImage on {first_image} (");
    assert_eq!(step["state"], "failed", "{view:#}");
    assert!(step["error"].as_str().expect("error").starts_with(&expected), "{step:#}");
    assert_eq!(step["attempts"], 1, "{step:#}");
    let human = text(&drctl(&w.pki, &url, &["operation", &op]).stdout);
    assert!(human.contains(&expected), "drctl operation shows it: {human}");
    // Not retried as if it were transient.
    let log = w.log();
    assert!(!log.lines().any(|l| l.contains("will be retried") && l.contains("DeregisterImage")), "a denial is never retried:\n{log}");
    // Nothing was lost: the AMI that could not be deleted is still there
    // and marked as being deleted, to be finished once the policy is fixed.
    assert!(image_exists(&w.admin(REGION).await, &first_image).await);
    let list = backups(&w, &url, "own");
    assert_eq!(list[1]["state"], "deleting", "{list:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_role_is_named_by_preflight_and_by_the_backup() {
    // The controller may not assume the site role at all.
    let w = iam_world(1, &["sts:AssumeRole"]);
    let sites = [("cross", w.instance(0), Some(w.role()))];
    let config = w.config("[policy]\nquiesce = \"none\"\n", &sites);
    let (ok, report) = w.preflight(&config, Some("cross"));
    println!("preflight without sts:AssumeRole:\n{report}");
    assert!(!ok, "{report}");
    let line = report.lines().find(|l| l.contains("sts:AssumeRole")).unwrap_or_else(|| panic!("{report}"));
    assert!(line.contains("DENIED") && line.contains(&w.role()), "{line}");
    assert!(line.ends_with("is not authorized to perform: sts:AssumeRole)"), "STS's message, not the error chain: {line}");

    let (_controller, port) = w.start_controller(&config);
    let url = format!("https://127.0.0.1:{port}");
    let (ok, op) = backup(&w, &url, "cross");
    assert!(!ok, "{op:#}");
    let failed = op["steps"].as_array().expect("steps").iter().find(|s| s["state"] == "failed").cloned().expect("failed step");
    let expected = format!("permission denied: sts:AssumeRole on {} (", w.role());
    assert!(failed["error"].as_str().expect("error").starts_with(&expected), "{failed:#}");
    let (ok, _) = w.preflight(&config, Some("nowhere"));
    assert!(!ok, "an unknown site is refused");
}
