//! A world for restore and failover tests: moto behind the simulated data
//! plane ([`crate::dataplane`]), one site whose services machine is a
//! simulated host with a real agent, an Elastic IP, a Route 53 zone, the
//! CircleCI API and dev-console simulators for build cleanup, and a
//! controller whose EC2 and Route 53 endpoint is the data plane.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::*;

pub const HOST: &str = "ci.example.com";
const TOKEN: &str = "admin-token-0123";

pub fn route53_at(url: &str) -> aws_sdk_route53::Client {
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "static");
    let config = aws_sdk_route53::config::Builder::new()
        .behavior_version(aws_sdk_route53::config::BehaviorVersion::latest())
        .region(aws_sdk_route53::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(url)
        .retry_config(aws_sdk_route53::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_route53::Client::from_conf(config)
}

/// A build as API v1.1 lists it (shallow), running since `start`.
pub fn running_build(num: u64, start_ms: u64) -> Value {
    let start = time::OffsetDateTime::from_unix_timestamp_nanos(start_ms as i128 * 1_000_000)
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    json!({
        "build_url": format!("https://{HOST}/gh/my-org/my-project/{num}"),
        "build_num": num, "username": "my-org", "reponame": "my-project", "vcs_type": "github",
        "branch": "main", "committer_name": "A. Dev", "lifecycle": "running", "status": "running",
        "outcome": null, "queued_at": start, "start_time": start, "stop_time": null,
    })
}

pub struct RecoveryWorld {
    pub dir: tempfile::TempDir,
    pub moto: Moto,
    pub pki: Pki,
    pub dataplane: DataPlane,
    pub ec2: aws_sdk_ec2::Client,
    pub route53: aws_sdk_route53::Client,
    pub instance: Instance,
    pub allocation_id: String,
    pub eip: String,
    pub zone_id: String,
    pub controller: Controller,
    pub site: String,
    /// The primary's disk (the adopted machine runs from it in place).
    pub disk: PathBuf,
    pub builds_file: PathBuf,
    /// One line per deleted build URL, one per console session.
    pub deletions: PathBuf,
    pub sessions: PathBuf,
    /// While this file exists the frontend's health check answers 503.
    pub unhealthy: PathBuf,
    /// The fault proxy, with `RecoverySpec::fault_proxy`.
    pub faults: Option<crate::faults::FaultProxy>,
    _api: Proc,
}

/// Options of a [`RecoveryWorld`].
#[derive(Clone, Default)]
pub struct RecoverySpec {
    /// TOML lines for the `[[site]]` table (e.g. `fence = "terminate"`).
    pub site_toml: String,
    /// Controller TOML before the sites (e.g. `[failover]`).
    pub controller_toml: String,
    pub boot_delay: Duration,
    /// `failover.app_timeout` (default 30s).
    pub app_timeout: Option<&'static str>,
    /// Put a fault-injecting proxy ([`crate::faults`]) between the
    /// controller and the data plane.
    pub fault_proxy: bool,
    /// `[site.policy]` lines for health checking; the app probe's
    /// `health_url` is set to the CircleCI API simulator's health check.
    pub health_policy: Option<String>,
    /// Record the controller's AWS calls into this directory
    /// ([`ControllerSpec::record_into`]).
    pub record_into: Option<PathBuf>,
}

impl RecoveryWorld {
    pub async fn start(site: &str, spec: RecoverySpec) -> RecoveryWorld {
        let dir = tempfile::tempdir().expect("tempdir");
        let moto = Moto::start(dir.path());
        let dataplane = DataPlane::start(&dir.path().join("dataplane"), &moto.url, spec.boot_delay);
        let ec2 = ec2_client(&dataplane.url, REGION);
        let route53 = route53_at(&dataplane.url);
        let mut instance = launch_instance(&ec2).await;
        let alloc = ec2.allocate_address().domain(aws_sdk_ec2::types::DomainType::Vpc).send().await.expect("AllocateAddress");
        let allocation_id = alloc.allocation_id().expect("allocation id").to_owned();
        let eip = alloc.public_ip().expect("public ip").to_owned();
        ec2.associate_address().allocation_id(&allocation_id).instance_id(&instance.id).send().await.expect("AssociateAddress");
        // The machine's files carry the address it is reached at: its EIP.
        instance.public_ip = eip.clone();
        let zone = route53
            .create_hosted_zone()
            .name("example.com")
            .caller_reference(format!("dr-test-{}", std::process::id()))
            .send()
            .await
            .expect("CreateHostedZone");
        let zone_id = zone.hosted_zone().map(|z| z.id().trim_start_matches("/hostedzone/").to_owned()).expect("zone id");
        let pki = Pki::new(dir.path());

        // The CircleCI API (shared by every machine: builds live in its file)
        // and the dev-console simulator the agents' cleanup drives.
        let builds_file = dir.path().join("builds.json");
        std::fs::write(&builds_file, "[]").expect("builds");
        let (api, api_url) = spawn_listening(
            "dr-sim-circleci-api",
            &[
                "--listen",
                "127.0.0.1:0",
                "--token",
                TOKEN,
                "--builds",
                &builds_file.display().to_string(),
                "--unhealthy-file",
                &dir.path().join("unhealthy").display().to_string(),
            ],
        );
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
        let deletions = dir.path().join("deletions");
        let sessions = dir.path().join("sessions");
        let q = |s: &str| serde_json::to_string(s).expect("string");
        let console = [
            bin("dr-sim-dev-console").display().to_string(),
            "--deletions".into(),
            deletions.display().to_string(),
            "--sessions".into(),
            sessions.display().to_string(),
        ]
        .iter()
        .map(|a| q(a))
        .collect::<Vec<_>>()
        .join(", ");
        let agent_extra = format!(
            "[circleci]\napi_url = {}\napi_token_file = {}\nhostname = {}\ndev_console = [{console}]\n\
             console_load_timeout = \"20s\"\nconsole_command_timeout = \"10s\"\nrequest_timeout = \"10s\"\nhealth_url = {}\n",
            q(&api_url),
            q(&dir.path().join("token").display().to_string()),
            q(HOST),
            q(&format!("{api_url}/health-check")),
        );

        let probe = format!("health_url = {}\n", q(&format!("{api_url}/health-check")));
        let faults = if spec.fault_proxy { Some(crate::faults::start(&dataplane.url).await) } else { None };
        let cspec = ControllerSpec {
            port: 0,
            heartbeat: "1s",
            poll_initial: "100ms",
            sites: vec![(site.to_owned(), instance.id.clone())],
            extra: format!(
                "[failover]\nfence_timeout = \"20s\"\nagent_timeout = \"60s\"\napp_timeout = \"{}\"\n{}",
                spec.app_timeout.unwrap_or("30s"),
                // The app probe is always on loopback: the site's hostname is
                // a public name that nothing here may resolve.
                match spec.controller_toml.contains("[policy]\n") {
                    true => spec.controller_toml.replacen("[policy]\n", &format!("[policy]\n{probe}"), 1),
                    false => format!("[policy]\n{probe}{}", spec.controller_toml),
                }
            ),
            endpoint: Some(faults.as_ref().map(|f| f.url.clone()).unwrap_or_else(|| dataplane.url.clone())),
            record_into: spec.record_into.clone(),
        };
        let config = Controller::write_config(dir.path(), &pki, &moto, &cspec);
        let mut text = std::fs::read_to_string(&config).expect("config");
        // The site's own keys first, then its sub-tables.
        text.push_str(&format!("{}\n", spec.site_toml));
        if let Some(h) = &spec.health_policy {
            text.push_str(&format!("[site.policy]\nhealth_url = {}\n{h}\n", q(&format!("{api_url}/health-check"))));
        }
        text.push_str(&format!("[site.dns]\nzone_id = \"{zone_id}\"\nname = \"{HOST}\"\nttl = 60\n"));
        std::fs::write(&config, text).expect("config");
        let controller = Controller::start_with_config(dir.path(), config, 0);

        let disk_dir = dir.path().join("disk-primary");
        std::fs::create_dir_all(&disk_dir).expect("mkdir");
        let disk = site_disk(&disk_dir, &pki, site, &controller.url, &instance, &agent_extra);
        dataplane.adopt(&instance.id, &disk).await.expect("adopt the primary");
        let unhealthy = dir.path().join("unhealthy");
        RecoveryWorld {
            dir,
            moto,
            pki,
            dataplane,
            ec2,
            route53,
            instance,
            allocation_id,
            eip,
            zone_id,
            controller,
            site: site.to_owned(),
            disk,
            builds_file,
            deletions,
            sessions,
            unhealthy,
            faults,
            _api: api,
        }
    }

    pub fn drctl(&self, args: &[&str]) -> std::process::Output {
        drctl(&self.pki, &self.controller.url, args)
    }

    pub fn wait_primary(&self, instance: &str) {
        assert_eventually!(
            Duration::from_secs(60),
            {
                let s = site_status(&self.pki, &self.controller.url, &self.site);
                s["primary_instance_id"] == instance && s["agent"]["connected"] == true && s["agent"]["role"] == "primary"
            },
            "{instance} connected as the primary of {}\ncontroller log:\n{}\nmachine log:\n{}",
            self.site,
            tail(&self.controller.log()),
            tail(&self.dataplane.machine_log(instance))
        );
    }

    /// A backup through drctl, waited for; its finished operation.
    pub fn backup(&self) -> Value {
        let out = self.drctl(&["-o", "json", "backup", &self.site, "--wait"]);
        assert!(out.status.success(), "backup: {}{}\n{}", text(&out.stdout), text(&out.stderr), tail(&self.controller.log()));
        last_json(&out.stdout)
    }

    /// The instances carrying `dr:operation=op` (in the site's region).
    pub async fn launched_by(&self, op: &str) -> Vec<aws_sdk_ec2::types::Instance> {
        launched_by(&self.ec2, op).await
    }

    pub async fn instance_state(&self, id: &str) -> String {
        instance_state_in(&self.ec2, id).await
    }

    /// Instances tagged `dr:role=<role>` that are not terminated.
    pub async fn alive_with_role(&self, role: &str) -> Vec<String> {
        self.ec2
            .describe_instances()
            .filters(aws_sdk_ec2::types::Filter::builder().name("tag:dr:role").values(role).build())
            .send()
            .await
            .expect("DescribeInstances")
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()).is_none_or(|n| n.as_str() != "terminated"))
            .map(|i| i.instance_id().unwrap_or_default().to_owned())
            .collect()
    }

    /// `drctl -o json <args>` of an operation with `--wait` that must
    /// succeed; its final JSON.
    pub fn run_ok(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.drctl(&all);
        let op = crate::last_json(&out.stdout);
        assert!(
            out.status.success() && op["state"] == "succeeded",
            "{}: {}\n{}\ncontroller:\n{}",
            args.join(" "),
            crate::text(&out.stdout),
            crate::text(&out.stderr),
            tail(&self.controller.log())
        );
        op
    }

    pub async fn all_instances(&self) -> usize {
        let out = self.ec2.describe_instances().send().await.expect("DescribeInstances");
        out.reservations().iter().map(|r| r.instances().len()).sum()
    }

    pub async fn eip_holder(&self) -> String {
        let out = self.ec2.describe_addresses().allocation_ids(&self.allocation_id).send().await.expect("DescribeAddresses");
        out.addresses().first().and_then(|a| a.instance_id()).unwrap_or_default().to_owned()
    }

    pub async fn dns_a(&self) -> Vec<String> {
        let out = self.route53.list_resource_record_sets().hosted_zone_id(&self.zone_id).send().await.expect("ListResourceRecordSets");
        out.resource_record_sets()
            .iter()
            .filter(|r| r.name().trim_end_matches('.') == HOST && r.r#type().as_str() == "A")
            .flat_map(|r| r.resource_records().iter().map(|v| v.value().to_owned()))
            .collect()
    }

    pub fn deleted_builds(&self) -> Vec<String> {
        std::fs::read_to_string(&self.deletions).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

/// The instances carrying `dr:operation=op`, as `ec2` (a region) sees them.
/// An instance's EC2 state through `ec2` (any region); "" if unknown.
pub async fn instance_state_in(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = ec2.describe_instances().instance_ids(id).send().await.expect("DescribeInstances");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find_map(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str().to_owned()))
        .unwrap_or_default()
}

pub async fn launched_by(ec2: &aws_sdk_ec2::Client, op: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    ec2.describe_instances()
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:dr:operation").values(op).build())
        .send()
        .await
        .expect("DescribeInstances")
        .reservations()
        .iter()
        .flat_map(|r| r.instances().to_vec())
        .collect()
}

/// The last 60 lines of a log.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The disk a machine of the data plane runs from.
pub async fn disk_of(dp: &DataPlane, instance: &str) -> PathBuf {
    dp.machine(instance).await.unwrap_or_else(|| panic!("the data plane knows no machine {instance}")).disk
}

/// `drctl` with stdin closed (no terminal).
pub fn drctl_no_tty(world: &RecoveryWorld, args: &[&str]) -> std::process::Output {
    let (cert, key) = world.pki.operator();
    let mut cmd: Command = drctl_command(&world.controller.url, &world.pki.ca(), &cert, &key, args);
    cmd.stdin(std::process::Stdio::null()).output().expect("run drctl")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

impl RecoveryWorld {
    /// Makes `region` a place the site can fail over to: `[site.launch.<region>]`
    /// with moto's first subnet and security group there (restarts the
    /// controller). Returns that region's EC2 client and the subnet.
    pub async fn dr_region(&mut self, region: &str) -> (aws_sdk_ec2::Client, String) {
        let ec2 = crate::ec2_client(&self.dataplane.url, region);
        let subnets = ec2.describe_subnets().send().await.expect("DescribeSubnets");
        let subnet = subnets.subnets()[0].subnet_id().expect("subnet").to_owned();
        let groups = ec2.describe_security_groups().send().await.expect("DescribeSecurityGroups");
        let sg = groups.security_groups()[0].group_id().expect("sg").to_owned();
        self.add_site_toml(&format!("[site.launch.{region}]\nsubnet_id = \"{subnet}\"\nsecurity_group_ids = [\"{sg}\"]\n"));
        (ec2, subnet)
    }

    /// Waits for the newest backup's copy in `region` to be available and
    /// returns its AMI; `of` (if given) must be the backup's instance.
    pub async fn newest_copy_in(&self, region: &str, of: Option<&str>) -> String {
        for _ in 0..150 {
            let b = crate::drctl_json(&self.pki, &self.controller.url, &["backups", &self.site]);
            let newest = &b["backups"][0];
            if let Some(of) = of {
                assert_eq!(newest["instance_id"], of, "the newest backup is {of}'s: {newest}");
            }
            let copies = newest["copies"].as_array().cloned().unwrap_or_default();
            assert!(copies.iter().all(|c| c["region"] == region), "copied to {region} only: {copies:?}");
            if let Some(c) = copies.iter().find(|c| c["state"] == "available") {
                return c["image_id"].as_str().expect("copy id").to_owned();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no available copy in {region} of the newest backup\n{}", tail(&self.controller.log()));
    }

    /// Appends TOML to the site's table (after `[site.dns]`: sub-tables
    /// such as `[site.launch.us-west-2]`) and restarts the controller.
    pub fn add_site_toml(&mut self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.controller.config).expect("config");
        text.push_str(toml);
        std::fs::write(&self.controller.config, text).expect("config");
        self.controller.kill();
        self.controller.restart(&[]);
    }
}

impl RecoveryWorld {
    /// A crash test's round: restarts the controller armed to SIGKILL
    /// itself at `point` (`step.<name>.after`), waits for `primary` to be
    /// connected, starts an operation with `drctl args` (its JSON names
    /// `operation_id`), waits for the crash, restarts the controller unarmed
    /// and waits for the operation to end. Returns its id and final JSON.
    pub fn crash_during(&mut self, primary: &str, point: &str, args: &[&str]) -> (String, Value) {
        self.controller.kill();
        self.controller.restart(&[("DR_CONTROLLER_CRASH_AT", point)]);
        self.wait_primary(primary);
        let started = drctl_json(&self.pki, &self.controller.url, args);
        let op = started["operation_id"].as_str().unwrap_or_else(|| panic!("an operation id: {started}")).to_owned();
        let status = self.controller.proc.as_mut().expect("running").wait_exit(Duration::from_secs(60));
        assert!(status.is_some(), "the controller reached {point}\n{}", tail(&self.controller.log()));
        self.controller.restart(&[]);
        assert_eventually!(
            Duration::from_secs(90),
            !matches!(drctl_json(&self.pki, &self.controller.url, &["operation", &op])["state"].as_str(), Some("running" | "cancelling")),
            "{op} finishes after a crash at {point}\n{}",
            tail(&self.controller.log())
        );
        let done = drctl_json(&self.pki, &self.controller.url, &["operation", &op]);
        (op, done)
    }
}
