//! Test kit (unit tests only): an in-memory EC2 that honours ClientTokens
//! (moto ignores them) and can lose an answer after acting, the way a
//! timeout or a dropped connection does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

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
/// steps in memory.
pub struct FakeAgent {
    pub commands: Arc<Mutex<Vec<String>>>,
    pub role: Arc<Mutex<String>>,
}

/// What the fake agent answers to an action: a JSON report, or an error.
pub type FakeAnswer = Result<serde_json::Value, (dr_proto::pb::ErrorKind, String)>;

/// A step the fake agent ran and that failed (`ErrorKind::Failed`).
pub fn fake_failure(message: &str) -> FakeAnswer {
    Err((dr_proto::pb::ErrorKind::Failed, message.to_owned()))
}

impl FakeAgent {
    /// Attaches an agent for `site`/`instance` with `role`; `answer` maps an
    /// action name (`app_stop`, `app_status`, `health_check`, ...) to its
    /// answer. `app_status` answers started unless `answer` says otherwise.
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
                        let action = fake_action_name(c.kind.as_ref());
                        log.lock().expect("lock").push(format!("{}:{action}", c.id));
                        let mut r = pb::CommandResult { id: c.id.clone(), ..Default::default() };
                        match answer(action) {
                            Ok(_) if action == "app_status" => {
                                r.ok = true;
                                r.detail = Some(pb::command_result::Detail::AppStatus(pb::AppStatusResult {
                                    state: "started".into(),
                                    ..Default::default()
                                }));
                            }
                            Ok(report) => {
                                r.ok = true;
                                r.report_json = report.to_string();
                            }
                            Err((kind, error)) => {
                                r.error_kind = kind as i32;
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

fn fake_action_name(kind: Option<&dr_proto::pb::command::Kind>) -> &'static str {
    use dr_proto::pb::command::Kind;
    match kind {
        Some(Kind::AppStatus(_)) => "app_status",
        Some(Kind::AppStop(_)) => "app_stop",
        Some(Kind::AppStart(_)) => "app_start",
        Some(Kind::Freeze(_)) => "freeze",
        Some(Kind::Thaw(_)) => "thaw",
        Some(Kind::Drain(_)) => "drain",
        Some(Kind::Undrain(_)) => "undrain",
        Some(Kind::SetHostname(_)) => "set_hostname",
        Some(Kind::RewriteAddresses(_)) => "rewrite_addresses",
        Some(Kind::WipeNomad(_)) => "wipe_nomad",
        Some(Kind::CleanupBuilds(_)) => "cleanup_builds",
        Some(Kind::HealthCheck(_)) => "health_check",
        _ => "other",
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
