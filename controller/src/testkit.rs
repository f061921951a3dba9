//! Test kit (unit tests only): an in-memory EC2 that honours ClientTokens
//! (moto ignores them) and can lose an answer after acting, the way a
//! timeout or a dropped connection does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use dr_proto::contract::{
    AppReport, AppStatus, CleanupReport, DrainReport, ErrorKind, FileReport, FreezeReport, HealthReport, HostnameReport, Layout, MountThaw,
    Report, Request, RewriteReport, Target, ThawReport, TreeCount, UndrainReport, WipeReport,
};

use crate::cloud::ec2::{Address, CopyImage, CreateImage, Ec2, Ec2Error, Image, Instance, RunInstance};
use crate::domain::model::{BlockDevice, LaunchFacts};

#[derive(Clone, Debug, Default)]
pub struct FakeInstance {
    pub instance: Instance,
    pub tags: Vec<(String, String)>,
    pub client_token: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub keep_volumes: bool,
    /// DescribeInstanceStatus: the system status check fails.
    pub impaired: bool,
    /// DescribeInstanceStatus: scheduled events (code, not-before).
    pub events: Vec<(String, String)>,
}

#[derive(Default)]
pub struct Inner {
    pub images: Vec<Image>,
    pub instances: Vec<FakeInstance>,
    pub addresses: Vec<Address>,
    /// Calls by EC2 action, in order.
    pub calls: Vec<&'static str>,
    /// Per action: how many of the next calls act but answer a transport
    /// error (the answer is lost).
    pub lose: HashMap<&'static str, u32>,
    /// DescribeInstanceStatus fails with this message (a region's API down).
    pub fail_status: Option<String>,
    next: u32,
}

/// An in-memory EC2 of one region.
#[derive(Default)]
pub struct FakeEc2 {
    pub inner: Mutex<Inner>,
}

impl FakeEc2 {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake EC2 lock")
    }

    /// An instance that exists before the test (the site's primary).
    pub fn add_instance(&self, id: &str, private_ip: &str) {
        let mut i = self.lock();
        i.instances.push(FakeInstance {
            instance: Instance {
                id: id.into(),
                state: "running".into(),
                private_ip: private_ip.into(),
                public_ip: String::new(),
                image_id: "ami-stock".into(),
                tags: vec![],
            },
            instance_type: "m5.xlarge".into(),
            ..FakeInstance::default()
        });
    }

    pub fn add_image(&self, id: &str) {
        self.lock().images.push(Image {
            id: id.into(),
            state: "available".into(),
            state_reason: String::new(),
            snapshot_ids: vec![format!("snap-of-{id}")],
            tags: vec![],
        });
    }

    pub fn calls_of(&self, action: &str) -> usize {
        self.lock().calls.iter().filter(|c| **c == action).count()
    }

    pub fn instance(&self, id: &str) -> Option<FakeInstance> {
        self.lock().instances.iter().find(|i| i.instance.id == id).cloned()
    }

    /// Records the call; `Err` when its answer is to be lost (after acting).
    fn called(&self, action: &'static str) -> bool {
        let mut i = self.lock();
        i.calls.push(action);
        match i.lose.get_mut(action) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

fn lost(op: &'static str) -> Ec2Error {
    Ec2Error::Transport { op, message: "the answer was lost (fake EC2)".into() }
}

fn set_state(i: &mut Inner, id: &str, state: &str) -> Result<(), Ec2Error> {
    match i.instances.iter_mut().find(|x| x.instance.id == id) {
        Some(x) => {
            x.instance.state = state.into();
            Ok(())
        }
        None => Err(Ec2Error::Api { op: "StopInstances", code: "InvalidInstanceID.NotFound".into(), message: id.into() }),
    }
}

#[async_trait]
impl Ec2 for FakeEc2 {
    async fn find_images_by_tag(&self, key: &str, value: &str) -> Result<Vec<Image>, Ec2Error> {
        self.called("DescribeImages");
        Ok(self.lock().images.iter().filter(|i| i.tags.iter().any(|(k, v)| k == key && v == value)).cloned().collect())
    }
    async fn create_image(&self, req: &CreateImage) -> Result<String, Ec2Error> {
        let lose = self.called("CreateImage");
        let mut i = self.lock();
        i.next += 1;
        let id = format!("ami-fake{}", i.next);
        i.images.push(Image {
            id: id.clone(),
            state: "available".into(),
            state_reason: String::new(),
            snapshot_ids: vec![],
            tags: req.tags.clone(),
        });
        if lose { Err(lost("CreateImage")) } else { Ok(id) }
    }
    async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error> {
        self.called("DescribeImages");
        Ok(self.lock().images.iter().filter(|i| ids.contains(&i.id)).cloned().collect())
    }
    async fn create_tags(&self, resources: &[String], tags: &[(String, String)]) -> Result<(), Ec2Error> {
        self.called("CreateTags");
        let mut i = self.lock();
        for x in i.instances.iter_mut().filter(|x| resources.contains(&x.instance.id)) {
            x.tags.extend(tags.iter().cloned());
        }
        Ok(())
    }
    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error> {
        self.called("DescribeInstances");
        Ok(self.lock().instances.iter().find(|i| i.instance.id == id).map(|i| i.instance.clone()))
    }
    async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
        self.called("DescribeSnapshots");
        Ok(ids.iter().map(|s| (s.clone(), "completed".to_owned())).collect())
    }
    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        self.called("DeregisterImage");
        self.lock().images.retain(|i| i.id != id);
        Ok(())
    }
    async fn delete_snapshot(&self, _id: &str) -> Result<(), Ec2Error> {
        self.called("DeleteSnapshot");
        Ok(())
    }
    async fn copy_image(&self, req: &CopyImage) -> Result<String, Ec2Error> {
        self.called("CopyImage");
        Ok(format!("ami-copy-of-{}", req.source_image_id))
    }
    async fn launch_facts(&self, instance_id: &str) -> Result<Option<LaunchFacts>, Ec2Error> {
        self.called("DescribeInstances");
        Ok(self.lock().instances.iter().find(|i| i.instance.id == instance_id).map(|i| LaunchFacts {
            instance_id: i.instance.id.clone(),
            instance_type: i.instance_type.clone(),
            private_ip: i.instance.private_ip.clone(),
            block_devices: vec![BlockDevice {
                device_name: "/dev/xvda".into(),
                volume_id: format!("vol-of-{}", i.instance.id),
                delete_on_termination: !i.keep_volumes,
            }],
            ..LaunchFacts::default()
        }))
    }
    async fn find_instances_by_tag(&self, key: &str, value: &str) -> Result<Vec<Instance>, Ec2Error> {
        self.called("DescribeInstances");
        Ok(self
            .lock()
            .instances
            .iter()
            .filter(|i| i.instance.state != "terminated" && i.tags.iter().any(|(k, v)| k == key && v == value))
            .map(|i| i.instance.clone())
            .collect())
    }
    /// Honours the ClientToken: a repeat answers the first call's instance.
    async fn run_instance(&self, req: &RunInstance) -> Result<Instance, Ec2Error> {
        let lose = self.called("RunInstances");
        let mut i = self.lock();
        if let Some(existing) = i.instances.iter().find(|x| !req.client_token.is_empty() && x.client_token == req.client_token) {
            return Ok(existing.instance.clone());
        }
        i.next += 1;
        let n = i.next;
        let instance = Instance {
            id: format!("i-fake{n:013}"),
            state: "running".into(),
            private_ip: format!("10.0.9.{n}"),
            public_ip: String::new(),
            image_id: req.image_id.clone(),
            tags: req.tags.clone(),
        };
        i.instances.push(FakeInstance {
            instance: instance.clone(),
            tags: req.tags.clone(),
            client_token: req.client_token.clone(),
            instance_type: req.instance_type.clone(),
            subnet_id: req.subnet_id.clone(),
            ..FakeInstance::default()
        });
        if lose { Err(lost("RunInstances")) } else { Ok(instance) }
    }
    async fn describe_instance_status(&self, ids: &[String]) -> Result<Vec<crate::cloud::ec2::InstanceStatus>, Ec2Error> {
        if self.called("DescribeInstanceStatus") {
            return Err(lost("DescribeInstanceStatus"));
        }
        let i = self.lock();
        if let Some(e) = &i.fail_status {
            return Err(Ec2Error::Api { op: "DescribeInstanceStatus", code: "Unavailable".into(), message: e.clone() });
        }
        Ok(i.instances
            .iter()
            .filter(|x| ids.contains(&x.instance.id))
            .map(|x| {
                let running = x.instance.state == "running";
                let check = |impaired: bool| {
                    if !running {
                        "not-applicable"
                    } else if impaired {
                        "impaired"
                    } else {
                        "ok"
                    }
                    .to_owned()
                };
                crate::cloud::ec2::InstanceStatus {
                    id: x.instance.id.clone(),
                    state: x.instance.state.clone(),
                    system: check(x.impaired),
                    instance: check(false),
                    ebs: String::new(),
                    events: x.events.clone(),
                }
            })
            .collect())
    }
    async fn stop_instance(&self, id: &str, _force: bool) -> Result<(), Ec2Error> {
        self.called("StopInstances");
        set_state(&mut self.lock(), id, "stopped")
    }
    async fn start_instance(&self, id: &str) -> Result<(), Ec2Error> {
        self.called("StartInstances");
        set_state(&mut self.lock(), id, "running")
    }
    async fn terminate_instance(&self, id: &str) -> Result<(), Ec2Error> {
        self.called("TerminateInstances");
        let _ = set_state(&mut self.lock(), id, "terminated");
        Ok(())
    }
    async fn keep_volumes(&self, id: &str, _devices: &[String]) -> Result<(), Ec2Error> {
        self.called("ModifyInstanceAttribute");
        if let Some(x) = self.lock().instances.iter_mut().find(|x| x.instance.id == id) {
            x.keep_volumes = true;
        }
        Ok(())
    }
    /// Volumes are not modelled: EC2 deleted them with their instances.
    async fn find_volumes_by_tag(&self, _key: &str, _value: &str) -> Result<Vec<crate::cloud::ec2::Volume>, Ec2Error> {
        self.called("DescribeVolumes");
        Ok(vec![])
    }
    async fn describe_address(&self, allocation_id: &str) -> Result<Option<Address>, Ec2Error> {
        self.called("DescribeAddresses");
        Ok(self.lock().addresses.iter().find(|a| a.allocation_id == allocation_id).cloned())
    }
    async fn associate_address(&self, allocation_id: &str, instance_id: &str) -> Result<(), Ec2Error> {
        self.called("AssociateAddress");
        if let Some(a) = self.lock().addresses.iter_mut().find(|a| a.allocation_id == allocation_id) {
            a.instance_id = instance_id.into();
        }
        Ok(())
    }
}

/// An agent without a process or a network: registered in a [`Registry`]
/// as one instance with a role, it answers each command with what
/// `answer` says (by the command's action name), records every command it
/// got, and follows `RoleChange`s. Lets a workflow's unit test run its agent
/// steps in memory. Its reports are the contract's structs, serialized as
/// the agent serializes them ([`Report::to_json`]), so a test fails when
/// one side of the contract changes alone.
///
/// [`Registry`]: crate::agents::Registry
pub struct FakeAgent {
    pub commands: Arc<Mutex<Vec<String>>>,
    pub role: Arc<Mutex<String>>,
}

/// What the fake agent answers to an action: a report, or an error.
pub type FakeAnswer = Result<FakeReply, (ErrorKind, String)>;

/// A successful answer of the fake agent.
#[derive(Clone, Debug)]
pub enum FakeReply {
    /// The action's report as [`fake_report`] makes it (`app_status`:
    /// started and settled).
    Default,
    /// This report.
    Report(Box<Report>),
    /// This text as the report, as is: an agent that does not follow the
    /// contract (another version).
    Raw(String),
}

/// The default answer: the action's real report.
pub fn fake_ok(_action: &str) -> FakeAnswer {
    Ok(FakeReply::Default)
}

/// A step the fake agent ran and that failed (`ErrorKind::Failed`).
pub fn fake_failure(message: &str) -> FakeAnswer {
    Err((ErrorKind::Failed, message.to_owned()))
}

/// The report a real agent sends for `action` when all went well and
/// nothing was already done (the contract's structs, every field named).
pub fn fake_report(action: &str) -> Report {
    let app = |target: Target| AppReport {
        target,
        previous_state: if target == Target::Stopped { "started" } else { "stopped" }.into(),
        previous_transitioning: false,
        final_state: target.state().into(),
        already: false,
        issued: true,
        dry_run: false,
        elapsed_ms: 10,
        polls: 1,
        unknown_states: vec![],
        actions: vec![],
        warnings: vec![],
    };
    match action {
        "app_status" => Report::AppStatus(AppStatus { state: "started".into(), is_transitioning: false, desired_state: "started".into() }),
        "app_stop" => Report::App(app(Target::Stopped)),
        "app_start" => Report::App(app(Target::Started)),
        "set_hostname" => Report::Hostname(HostnameReport {
            item: "hostname".into(),
            old: Some("old.example.com".into()),
            new: "new.example.com".into(),
            changed: true,
            applied: true,
            dry_run: false,
            actions: vec![],
            warnings: vec![],
        }),
        "rewrite_addresses" => Report::Rewrite(RewriteReport {
            root: "/".into(),
            layout: Layout::Debian,
            dry_run: false,
            private: vec![],
            public: vec![],
            files: vec![FileReport {
                path: "/etc/default/replicated".into(),
                changed_lines: 1,
                replacements: 1,
                backup: None,
                written: true,
            }],
            up_to_date: false,
            removed_temp_files: vec![],
            diff: String::new(),
            warnings: vec![],
            actions: vec![],
        }),
        "wipe_nomad" => Report::Wipe(WipeReport {
            path: "/opt/nomad".into(),
            state: "wiped".into(),
            dry_run: false,
            in_place: false,
            removed: TreeCount::default(),
            moved_to: None,
            rename_ms: 1.0,
            delete_ms: 1.0,
            owner: None,
            mode: None,
            entries: vec![],
            mounts_below: vec![],
            actions: vec![],
            warnings: vec![],
            blocked_by: vec![],
        }),
        "cleanup_builds" => Report::Cleanup(cleanup_report()),
        "freeze" => Report::Freeze(FreezeReport {
            state: "frozen".into(),
            mounts: vec!["/data".into()],
            deadline_ms: 60_000,
            thaw_by_unix_ms: 0,
            watchdog_pid: Some(4242),
            freeze_took_ms: 5,
            record: None,
            dry_run: false,
            actions: vec![],
            warnings: vec![],
        }),
        "thaw" => Report::Thaw(ThawReport {
            mounts: vec![MountThaw { path: "/data".into(), outcome: "thawed".into() }],
            frozen_for_ms: 0,
            reason: "asked by the agent".into(),
            already_done: false,
            dry_run: false,
            warnings: vec![],
        }),
        "drain" => Report::Drain(DrainReport {
            drained: vec![],
            already_drained: vec![],
            drained_by_others: vec![],
            skipped: vec![],
            deadline_ms: 60_000,
            waited_ms: 0,
            idle: true,
            still_running: vec![],
            record: "/var/lib/dr-agent/drain.json".into(),
            dry_run: false,
            actions: vec![],
            warnings: vec![],
        }),
        "undrain" => Report::Undrain(UndrainReport {
            undrained: vec!["node-1".into()],
            already: vec![],
            not_found: vec![],
            from_record: true,
            already_done: false,
            dry_run: false,
            actions: vec![],
            warnings: vec![],
        }),
        "health_check" => Report::Health(HealthReport { url: "http://127.0.0.1/health-check".into(), status: 200, elapsed_ms: 3 }),
        other => panic!("the fake agent has no report for `{other}`"),
    }
}

/// A clean-up that deleted nothing.
pub fn cleanup_report() -> CleanupReport {
    CleanupReport {
        before: "2026-01-01T00:00:00.000Z".into(),
        hostname: "ci.example.com".into(),
        dry_run: false,
        listed: 0,
        newest_build_started_at: None,
        not_running: 0,
        builds: vec![],
        deleted: 0,
        failed: 0,
        refused: 0,
        kept: 0,
        console_sessions: 0,
        already_done: true,
        actions: vec![],
        warnings: vec![],
    }
}

impl FakeAgent {
    /// Attaches an agent for `site`/`instance` with `role`; `answer` maps an
    /// action name (`app_stop`, `app_status`, `health_check`, ...) to its
    /// answer ([`fake_ok`]: every action's real report).
    pub fn attach(
        registry: &crate::agents::Registry,
        site: &str,
        instance: &str,
        role: crate::domain::model::Role,
        answer: impl Fn(&str) -> FakeAnswer + Send + 'static,
    ) -> FakeAgent {
        use dr_proto::pb;
        let record = crate::domain::model::InstanceRecord {
            site_id: site.to_owned(),
            instance_id: instance.to_owned(),
            last_seen_ms: crate::domain::model::now_ms(),
            ..Default::default()
        };
        let (serial, mut rx) = registry.attach(record, role.clone());
        let commands = Arc::new(Mutex::new(Vec::new()));
        let role_name = Arc::new(Mutex::new(role.name().to_owned()));
        let (reg, site, instance) = (registry.clone(), site.to_owned(), instance.to_owned());
        let (log, current) = (commands.clone(), role_name.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.recv().await {
                match msg.msg {
                    Some(pb::controller_message::Msg::Command(c)) => {
                        // The agent's own conversion: what it could not type, it refuses.
                        let request = c.kind.map(Request::from_pb);
                        let action = request.as_ref().and_then(|r| r.as_ref().ok()).map_or("other", Request::name);
                        log.lock().expect("lock").push(format!("{}:{action}", c.id));
                        let mut r = pb::CommandResult { id: c.id.clone(), ..Default::default() };
                        let reply = match request {
                            Some(Err(e)) => Err((ErrorKind::Invalid, format!("invalid command: {e}; not run"))),
                            _ => answer(action),
                        };
                        match reply {
                            Ok(reply) => {
                                r.ok = true;
                                let report = match reply {
                                    FakeReply::Default => Ok(fake_report(action)),
                                    FakeReply::Report(report) => Ok(*report),
                                    FakeReply::Raw(text) => Err(text),
                                };
                                match report {
                                    Ok(Report::AppStatus(s)) => {
                                        r.detail = Some(pb::command_result::Detail::AppStatus(pb::AppStatusResult {
                                            state: s.state,
                                            is_transitioning: s.is_transitioning,
                                            desired_state: s.desired_state,
                                        }));
                                    }
                                    Ok(report) => r.report_json = report.to_json().to_string(),
                                    Err(text) => r.report_json = text,
                                }
                            }
                            Err((kind, error)) => {
                                r.error_kind = ErrorKind::to_wire(Some(kind));
                                r.error = error;
                            }
                        }
                        reg.deliver(&site, &instance, serial, r);
                    }
                    Some(pb::controller_message::Msg::RoleChange(rc)) => *current.lock().expect("lock") = rc.role,
                    _ => {}
                }
            }
        });
        FakeAgent { commands, role: role_name }
    }

    /// The action names of the commands it got, in order.
    pub fn actions(&self) -> Vec<String> {
        self.commands.lock().expect("lock").iter().map(|c| c.rsplit(':').next().unwrap_or_default().to_owned()).collect()
    }
}

/// An available, crash-consistent backup `image` of `instance` in `site`
/// (us-east-1), as a test puts it in the store.
pub fn available_backup(site: &str, instance: &str, image: &str, started_at_ms: u64, completed_at_ms: u64) -> crate::domain::model::Backup {
    crate::domain::model::Backup {
        image_id: image.into(),
        site_id: site.into(),
        operation_id: format!("backup-{image}"),
        region: "us-east-1".into(),
        instance_id: instance.into(),
        snapshot_ids: vec![],
        started_at_ms,
        completed_at_ms,
        consistency: crate::domain::model::Consistency::Crash,
        app_state: "started".into(),
        state: crate::domain::model::BackupState::Available,
        fate: String::new(),
        deleted_at_ms: 0,
        quiesce: "none".into(),
        frozen_ms: 0,
        quiesce_note: String::new(),
        copies: vec![],
    }
}
