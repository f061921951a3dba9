//! A simulated data plane for moto: moto makes EC2 instances but runs
//! nothing on them. This HTTP proxy in front of moto sees every EC2
//! query-API call and moto's answer, and plays the machines:
//!
//! - `CreateImage` of a known machine copies its disk (`cp -a`, before the
//!   request reaches moto: the point in time of the snapshot) to
//!   `<dir>/images/<ami-id>`; `CopyImage` shares the source's disk;
//!   `DeregisterImage` forgets it.
//! - `RunInstances` of an image with a disk copies that disk to
//!   `<dir>/machines/<instance-id>/disk` and boots it after the boot delay:
//!   a `dr-sim-imds` with the instance id and IPs moto reports, and a real
//!   `dr-agent` configured from the disk's `etc/dr-agent/agent.toml.in`.
//! - `StartInstances` boots known machines again, `StopInstances` and
//!   `TerminateInstances` stop them (SIGTERM, SIGKILL after 3 s). Disks stay.
//! - `AssociateAddress` / `DisassociateAddress`: running machines of that
//!   region whose IPs in moto changed get their IMDS restarted on the same
//!   port with the new ones.
//!
//! Each event is acted on only when moto answered 200. A control API under
//! `/dataplane/` adopts a machine the test launched itself, lists machines
//! and images, and kills a machine without telling EC2 (a host failure).
//! Everything else is forwarded to moto unchanged.
//!
//! Children get `PR_SET_PDEATHSIG` ([`crate::die_with_test`]), which follows
//! the thread that forked them: run the server on a current-thread runtime
//! (as `dr-sim-dataplane` does) so every fork happens on the main thread.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::throttle::{Upstream, serve};

/// How long a stopped agent gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// The agent config template inside a disk, and the config written from it.
pub const AGENT_TEMPLATE: &str = "etc/dr-agent/agent.toml.in";
pub const AGENT_CONFIG: &str = "etc/dr-agent/agent.toml";
/// Region assumed when a request carries no SigV4 credential scope.
const DEFAULT_REGION: &str = "us-east-1";

/// What the data plane runs and where it keeps disks.
#[derive(Clone, Debug)]
pub struct Options {
    /// moto's `http://host:port`.
    pub moto_url: String,
    /// Work dir: `images/`, `machines/`.
    pub dir: PathBuf,
    /// Wait between RunInstances/StartInstances and the machine's boot.
    pub boot_delay: Duration,
    /// `DR_SIM_STOP_SECS` / `DR_SIM_START_SECS` of the replicatedctl simulator.
    pub app_secs: f64,
    pub agent_bin: PathBuf,
    pub imds_bin: PathBuf,
    /// The key machines' identity documents are signed with.
    pub iid_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("the data plane serves loopback only; --listen {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("invalid moto URL `{url}`: {source}")]
    MotoUrl { url: String, source: hyper::http::uri::InvalidUri },
    #[error("the {what} binary {path} does not exist")]
    MissingBinary { what: &'static str, path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

/// Why a control request or a boot failed. `status` is the HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("invalid instance id `{0}` (expected i- followed by 8 to 17 hex digits)")]
    BadInstanceId(String),
    #[error("disk `{0}` must be an absolute path")]
    DiskNotAbsolute(PathBuf),
    #[error("disk {0} does not exist or is not a directory")]
    NoDisk(PathBuf),
    #[error("disk {disk} has no {AGENT_TEMPLATE} (the agent config template with @ROOT@ and @IMDS@)")]
    NoTemplate { disk: PathBuf },
    #[error("instance {instance_id} is already a machine of the data plane")]
    AlreadyKnown { instance_id: String },
    #[error("instance {instance_id} is not known to EC2 (moto) in region {region}")]
    UnknownInstance { instance_id: String, region: String },
    #[error("instance {0} is not a machine of the data plane")]
    UnknownMachine(String),
    #[error("DescribeInstances {instance_id}: {message}")]
    Ec2 { instance_id: String, message: String },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cp -a {from} {to} failed: {detail}")]
    Copy { from: PathBuf, to: PathBuf, detail: String },
    #[error("dr-sim-imds for {instance_id}: {detail}")]
    Imds { instance_id: String, detail: String },
    #[error("the boot of {0} was overtaken by a stop or another boot")]
    Superseded(String),
}

impl MachineError {
    fn status(&self) -> u16 {
        match self {
            MachineError::BadBody(_)
            | MachineError::BadInstanceId(_)
            | MachineError::DiskNotAbsolute(_)
            | MachineError::NoDisk(_)
            | MachineError::NoTemplate { .. } => 400,
            MachineError::UnknownInstance { .. } | MachineError::UnknownMachine(_) => 404,
            MachineError::AlreadyKnown { .. } | MachineError::Superseded(_) => 409,
            _ => 500,
        }
    }
}

/// One machine as `GET /dataplane/machines` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineView {
    pub instance_id: String,
    pub region: String,
    /// The AMI it was launched from; `None` for an adopted machine.
    pub image_id: Option<String>,
    pub disk: PathBuf,
    /// booting, running, stopping, stopped, lost, exited, failed, terminated
    pub state: String,
    /// Whether its agent process is alive.
    pub running: bool,
    /// How many times it booted.
    pub boots: u32,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub imds_url: Option<String>,
    /// Process ids of its dr-agent and dr-sim-imds while they run.
    pub agent_pid: Option<u32>,
    pub imds_pid: Option<u32>,
    /// Why its last boot failed, or how its agent ended by itself.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Booting,
    Running,
    Stopping,
    Stopped,
    Lost,
    Exited,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Lost => "lost",
            Phase::Exited => "exited",
            Phase::Failed => "failed",
        }
    }
}

/// What the supervisor of a running machine is told.
#[derive(Clone, Debug)]
enum Halt {
    /// StopInstances / TerminateInstances: SIGTERM, SIGKILL after the grace.
    Stop,
    /// A host failure or the data plane's own shutdown: SIGKILL.
    Kill,
    /// EC2 moved an address (AssociateAddress / DisassociateAddress): the
    /// IMDS restarts on its port with these IPs; the agent runs on.
    Readdress { private_ip: String, public_ip: Option<String> },
}

struct Machine {
    region: String,
    image_id: Option<String>,
    disk: PathBuf,
    phase: Phase,
    terminated: bool,
    boots: u32,
    private_ip: Option<String>,
    public_ip: Option<String>,
    imds_url: Option<String>,
    pids: Option<(u32, u32)>,
    error: Option<String>,
    /// Bumped by every boot, stop or loss: a boot goes on only while it
    /// still holds the current epoch.
    epoch: u64,
    /// Set while processes run.
    halt: Option<mpsc::UnboundedSender<Halt>>,
    /// The task owning the processes of the last boot.
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

impl Machine {
    fn new(region: &str, image_id: Option<String>, disk: PathBuf) -> Machine {
        Machine {
            region: region.to_owned(),
            image_id,
            disk,
            phase: Phase::Stopped,
            terminated: false,
            boots: 0,
            private_ip: None,
            public_ip: None,
            imds_url: None,
            pids: None,
            error: None,
            epoch: 0,
            halt: None,
            supervisor: None,
        }
    }

    fn view(&self, instance_id: &str) -> MachineView {
        let state = if self.terminated && !matches!(self.phase, Phase::Stopping) { "terminated" } else { self.phase.name() };
        MachineView {
            instance_id: instance_id.to_owned(),
            region: self.region.clone(),
            image_id: self.image_id.clone(),
            disk: self.disk.clone(),
            state: state.to_owned(),
            running: matches!(self.phase, Phase::Running | Phase::Stopping),
            boots: self.boots,
            private_ip: self.private_ip.clone(),
            public_ip: self.public_ip.clone(),
            imds_url: self.imds_url.clone(),
            agent_pid: self.pids.map(|p| p.0),
            imds_pid: self.pids.map(|p| p.1),
            error: self.error.clone(),
        }
    }
}

struct State {
    opts: Options,
    upstream: Upstream,
    machines: Mutex<BTreeMap<String, Machine>>,
    images: Mutex<BTreeMap<String, PathBuf>>,
    ec2: Mutex<HashMap<String, aws_sdk_ec2::Client>>,
    seq: AtomicU64,
}

/// A running data plane.
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Server {
    /// Binds `listen` (loopback only) and serves in the background.
    pub async fn start(listen: SocketAddr, opts: Options) -> Result<Server, DataPlaneError> {
        if !listen.ip().is_loopback() {
            return Err(DataPlaneError::NotLoopback(listen));
        }
        for (what, path) in [("dr-agent", &opts.agent_bin), ("dr-sim-imds", &opts.imds_bin)] {
            if !path.is_file() {
                return Err(DataPlaneError::MissingBinary { what, path: path.clone() });
            }
        }
        let mut opts = opts;
        for sub in ["images", "machines"] {
            let path = opts.dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| DataPlaneError::Io { action: "create", path, source })?;
        }
        // Disk paths end up in agent configs: absolute.
        opts.dir =
            std::fs::canonicalize(&opts.dir).map_err(|source| DataPlaneError::Io { action: "resolve", path: opts.dir.clone(), source })?;
        let upstream = Upstream::new(&opts.moto_url).map_err(|source| DataPlaneError::MotoUrl { url: opts.moto_url.clone(), source })?;
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| DataPlaneError::Listen { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| DataPlaneError::Listen { addr: listen, source })?;
        let state = Arc::new(State {
            opts,
            upstream,
            machines: Mutex::new(BTreeMap::new()),
            images: Mutex::new(BTreeMap::new()),
            ec2: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
        });
        let handler_state = state.clone();
        serve(listener, move |req: hyper::Request<hyper::body::Incoming>| handle(handler_state.clone(), req));
        tracing::info!(%addr, moto = %state.opts.moto_url, dir = %state.opts.dir.display(), "data plane serving");
        Ok(Server { addr, state })
    }

    /// Kills every machine's processes (SIGKILL) and waits for them.
    pub async fn shutdown(&self) {
        let supervisors: Vec<_> = {
            let mut machines = self.state.machines.lock().expect("machines lock");
            machines
                .values_mut()
                .filter_map(|m| {
                    m.epoch += 1;
                    if let Some(halt) = m.halt.take() {
                        let _ = halt.send(Halt::Kill);
                    }
                    m.supervisor.take()
                })
                .collect()
        };
        for s in supervisors {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
        tracing::info!("data plane stopped every machine");
    }
}

type Answer = hyper::Response<Full<Bytes>>;

async fn handle(state: Arc<State>, req: hyper::Request<hyper::body::Incoming>) -> Result<Answer, hyper_util::client::legacy::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if parts.uri.path().starts_with("/dataplane/") {
        return Ok(control(&state, &parts.method, parts.uri.path(), &body).await);
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let action = param(&params, "Action").unwrap_or_default().to_owned();
    let region = signing_region(&parts.headers);
    let snapshot = if action == "CreateImage" { snapshot_disk(&state, &params).await } else { None };
    let answer = state.upstream.forward(parts, body).await;
    let ok = matches!(&answer, Ok(a) if a.status() == hyper::StatusCode::OK);
    let xml = match &answer {
        Ok(a) if ok => std::str::from_utf8(a.body().clone().collect().await.map(|b| b.to_bytes()).unwrap_or_default().as_ref())
            .map(str::to_owned)
            .unwrap_or_default(),
        _ => String::new(),
    };
    if let Some(pending) = snapshot {
        finish_snapshot(&state, &params, pending, ok.then_some(xml.as_str())).await;
    } else if ok {
        on_success(&state, &action, &params, &region, &xml).await;
    }
    answer
}

/// The value of a query parameter.
fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The members of an EC2 query list (`InstanceId.1`, `InstanceId.2`, ...).
fn param_list(params: &[(String, String)], key: &str) -> Vec<String> {
    let mut items: Vec<(u32, String)> = params
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix(key)?.strip_prefix('.')?.parse().ok()?;
            Some((n, v.clone()))
        })
        .collect();
    items.sort();
    items.into_iter().map(|(_, v)| v).collect()
}

/// The region of a SigV4 request (`Credential=AKID/date/REGION/ec2/aws4_request`).
fn signing_region(headers: &hyper::HeaderMap) -> String {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| {
            let scope = auth.split("Credential=").nth(1)?.split([',', ' ']).next()?;
            let region = scope.split('/').nth(2)?;
            valid_region(region).then(|| region.to_owned())
        })
        .unwrap_or_else(|| DEFAULT_REGION.to_owned())
}

fn valid_region(r: &str) -> bool {
    !r.is_empty() && r.len() <= 32 && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `prefix-` followed by 8 to 17 lowercase hex digits (instance and image
/// ids end up in file names).
fn valid_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|h| h.strip_prefix('-'))
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

// ---------------------------------------------------------------- moto's XML

/// Direct child elements of `node` with this local name.
fn children<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    node.children().filter(move |n| n.is_element() && n.tag_name().name() == name)
}

fn child_text(node: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    children(node, name).next().and_then(|n| n.text()).map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

/// `<imageId>` of a CreateImage / CopyImage answer.
fn answer_image_id(xml: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("moto's answer is not XML: {e}"))?;
    let id = child_text(doc.root_element(), "imageId").ok_or("moto's answer has no imageId")?;
    if valid_id(&id, "ami") { Ok(id) } else { Err(format!("moto's answer has an invalid imageId `{id}`")) }
}

/// The instance ids of a RunInstances answer (`instancesSet/item/instanceId`).
fn answer_instance_ids(xml: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("moto's answer is not XML: {e}"))?;
    let mut ids = Vec::new();
    for set in children(doc.root_element(), "instancesSet") {
        for item in children(set, "item") {
            let id = child_text(item, "instanceId").ok_or("an instancesSet item has no instanceId")?;
            if !valid_id(&id, "i") {
                return Err(format!("moto's answer has an invalid instanceId `{id}`"));
            }
            ids.push(id);
        }
    }
    Ok(ids)
}

// ---------------------------------------------------------------- EC2 events

/// CreateImage of a known machine: its disk copied now, before moto takes
/// the image. Returns the pending copy.
async fn snapshot_disk(state: &State, params: &[(String, String)]) -> Option<PathBuf> {
    let instance_id = param(params, "InstanceId")?;
    let disk = state.machines.lock().expect("machines lock").get(instance_id).map(|m| m.disk.clone())?;
    let n = state.seq.fetch_add(1, Ordering::Relaxed);
    let pending = state.opts.dir.join("images").join(format!(".pending-{n}"));
    match copy_dir(&disk, &pending).await {
        Ok(()) => Some(pending),
        Err(e) => {
            tracing::error!(instance_id, error = %e, "CreateImage: cannot snapshot the machine's disk; the image will have none");
            None
        }
    }
}

async fn finish_snapshot(state: &State, params: &[(String, String)], pending: PathBuf, answer: Option<&str>) {
    let instance_id = param(params, "InstanceId").unwrap_or_default();
    let image_id = match answer.map(answer_image_id) {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            tracing::error!(instance_id, error = %e, "CreateImage: cannot read the image id; snapshot dropped");
            remove_dir(&pending).await;
            return;
        }
        None => {
            tracing::info!(instance_id, "CreateImage failed in EC2; snapshot dropped");
            remove_dir(&pending).await;
            return;
        }
    };
    let target = state.opts.dir.join("images").join(&image_id);
    if let Err(source) = tokio::fs::rename(&pending, &target).await {
        tracing::error!(image_id, error = %source, path = %target.display(), "CreateImage: cannot keep the snapshot");
        remove_dir(&pending).await;
        return;
    }
    tracing::info!(instance_id, image_id, disk = %target.display(), "image disk kept");
    state.images.lock().expect("images lock").insert(image_id, target);
}

async fn on_success(state: &Arc<State>, action: &str, params: &[(String, String)], region: &str, xml: &str) {
    match action {
        "CopyImage" => {
            let Some(source) = param(params, "SourceImageId") else { return };
            let Some(disk) = state.images.lock().expect("images lock").get(source).cloned() else { return };
            match answer_image_id(xml) {
                Ok(id) => {
                    tracing::info!(source, image_id = id, disk = %disk.display(), "copied image shares the disk");
                    state.images.lock().expect("images lock").insert(id, disk);
                }
                Err(e) => tracing::error!(source, error = %e, "CopyImage: cannot read the new image id"),
            }
        }
        "DeregisterImage" => {
            let Some(image_id) = param(params, "ImageId") else { return };
            let orphan = {
                let mut images = state.images.lock().expect("images lock");
                images.remove(image_id).filter(|disk| !images.values().any(|d| d == disk))
            };
            if let Some(disk) = orphan {
                tracing::info!(image_id, disk = %disk.display(), "image deregistered; disk deleted");
                remove_dir(&disk).await;
            }
        }
        "RunInstances" => {
            let Some(image_id) = param(params, "ImageId") else { return };
            let Some(image_disk) = state.images.lock().expect("images lock").get(image_id).cloned() else {
                tracing::info!(image_id, "RunInstances of an image without a disk: nothing boots");
                return;
            };
            let ids = match answer_instance_ids(xml) {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::error!(image_id, error = %e, "RunInstances: cannot read the instances");
                    return;
                }
            };
            for id in ids {
                launch(state, &id, image_id, &image_disk, region).await;
            }
        }
        "StartInstances" => {
            for id in param_list(params, "InstanceId") {
                if let Some(epoch) = begin_boot(state, &id) {
                    spawn_boot(state.clone(), id, epoch, state.opts.boot_delay);
                }
            }
        }
        "AssociateAddress" | "DisassociateAddress" => readdress(state, region).await,
        "StopInstances" | "TerminateInstances" => {
            let terminate = action == "TerminateInstances";
            for id in param_list(params, "InstanceId") {
                halt(state, &id, Halt::Stop, terminate);
            }
        }
        _ => {}
    }
}

/// An address moved in `region`: every running machine there whose IPs in
/// moto changed gets its IMDS restarted with them.
async fn readdress(state: &State, region: &str) {
    let running: Vec<(String, Option<String>, Option<String>)> = {
        let machines = state.machines.lock().expect("machines lock");
        machines
            .iter()
            .filter(|(_, m)| m.region == region && m.halt.is_some())
            .map(|(id, m)| (id.clone(), m.private_ip.clone(), m.public_ip.clone()))
            .collect()
    };
    for (id, private, public) in running {
        match describe(state, &id, region).await {
            Ok((private_ip, public_ip)) if (Some(&private_ip), public_ip.as_ref()) != (private.as_ref(), public.as_ref()) => {
                let machines = state.machines.lock().expect("machines lock");
                if let Some(tx) = machines.get(&id).and_then(|m| m.halt.as_ref()) {
                    let _ = tx.send(Halt::Readdress { private_ip, public_ip });
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(instance_id = id, error = %e, "cannot re-read the addresses"),
        }
    }
}

/// RunInstances: the image's disk copied (now, so a later DeregisterImage
/// cannot take it away) and booted after the delay.
async fn launch(state: &Arc<State>, id: &str, image_id: &str, image_disk: &Path, region: &str) {
    if state.machines.lock().expect("machines lock").contains_key(id) {
        return; // a retried RunInstances (same ClientToken) answers the same instances
    }
    let home = state.opts.dir.join("machines").join(id);
    let disk = home.join("disk");
    let mut machine = Machine::new(region, Some(image_id.to_owned()), disk.clone());
    let copied = match tokio::fs::create_dir_all(&home).await {
        Ok(()) => copy_dir(image_disk, &disk).await,
        Err(source) => Err(MachineError::Io { action: "create", path: home, source }),
    };
    if let Err(e) = copied {
        tracing::error!(instance_id = id, image_id, error = %e, "RunInstances: cannot copy the image's disk");
        machine.phase = Phase::Failed;
        machine.error = Some(e.to_string());
        state.machines.lock().expect("machines lock").insert(id.to_owned(), machine);
        return;
    }
    tracing::info!(instance_id = id, image_id, disk = %disk.display(), "machine launched from an image disk");
    state.machines.lock().expect("machines lock").insert(id.to_owned(), machine);
    if let Some(epoch) = begin_boot(state, id) {
        spawn_boot(state.clone(), id.to_owned(), epoch, state.opts.boot_delay);
    }
}

/// Marks a known, not running machine as booting; returns the boot's epoch.
fn begin_boot(state: &State, id: &str) -> Option<u64> {
    let mut machines = state.machines.lock().expect("machines lock");
    let m = machines.get_mut(id)?;
    if m.terminated || matches!(m.phase, Phase::Booting | Phase::Running) {
        return None;
    }
    m.epoch += 1;
    m.phase = Phase::Booting;
    m.error = None;
    Some(m.epoch)
}

fn spawn_boot(state: Arc<State>, id: String, epoch: u64, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        match boot(&state, &id, epoch).await {
            Ok(()) => {}
            Err(e @ MachineError::Superseded(_)) => tracing::info!(instance_id = id, reason = %e, "boot called off"),
            Err(e) => tracing::error!(instance_id = id, error = %e, "boot failed"),
        }
    });
}

/// Stops (or kills) a machine's processes in the background; returns
/// whether the machine is known.
fn halt(state: &State, id: &str, how: Halt, terminate: bool) -> bool {
    let mut machines = state.machines.lock().expect("machines lock");
    let Some(m) = machines.get_mut(id) else { return false };
    m.epoch += 1;
    m.terminated |= terminate;
    let lost = matches!(how, Halt::Kill);
    match m.halt.take() {
        Some(tx) => {
            let _ = tx.send(how);
            m.phase = if lost { Phase::Lost } else { Phase::Stopping };
            tracing::info!(instance_id = id, lost, "stopping the machine");
        }
        None => {
            m.phase = if lost { Phase::Lost } else { Phase::Stopped };
        }
    }
    true
}

// ---------------------------------------------------------------- boot

fn still_current(state: &State, id: &str, epoch: u64) -> Result<(), MachineError> {
    let machines = state.machines.lock().expect("machines lock");
    match machines.get(id) {
        Some(m) if m.epoch == epoch => Ok(()),
        _ => Err(MachineError::Superseded(id.to_owned())),
    }
}

/// Boots a machine now: IPs from moto, a dr-sim-imds, the agent config
/// from the disk's template, a dr-agent.
async fn boot(state: &Arc<State>, id: &str, epoch: u64) -> Result<(), MachineError> {
    let result = boot_inner(state, id, epoch).await;
    if let Err(e) = &result {
        let mut machines = state.machines.lock().expect("machines lock");
        if let Some(m) = machines.get_mut(id).filter(|m| m.epoch == epoch) {
            m.phase = Phase::Failed;
            m.error = Some(e.to_string());
        }
    }
    result
}

async fn boot_inner(state: &Arc<State>, id: &str, epoch: u64) -> Result<(), MachineError> {
    // The processes of an earlier boot end first (a stop in progress).
    let previous = {
        let mut machines = state.machines.lock().expect("machines lock");
        let m = machines.get_mut(id).filter(|m| m.epoch == epoch).ok_or_else(|| MachineError::Superseded(id.to_owned()))?;
        m.supervisor.take()
    };
    if let Some(previous) = previous {
        let _ = tokio::time::timeout(STOP_GRACE + Duration::from_secs(2), previous).await;
    }
    let (region, disk) = {
        let machines = state.machines.lock().expect("machines lock");
        let m = machines.get(id).ok_or_else(|| MachineError::Superseded(id.to_owned()))?;
        (m.region.clone(), m.disk.clone())
    };
    let (private_ip, public_ip) = describe(state, id, &region).await?;
    still_current(state, id, epoch)?;
    let template = disk.join(AGENT_TEMPLATE);
    let template_text =
        tokio::fs::read_to_string(&template).await.map_err(|source| MachineError::Io { action: "read", path: template.clone(), source })?;
    let log = open_log(state, id)?;
    let boot_no = state.machines.lock().expect("machines lock").get(id).map(|m| m.boots + 1).unwrap_or(1);
    {
        use std::io::Write;
        let mut header = &log;
        let _ = writeln!(header, "=== dr-sim-dataplane: boot {boot_no} of {id} ({private_ip}), disk {}", disk.display());
    }
    let (imds, imds_url) = spawn_imds(state, id, "127.0.0.1:0", &private_ip, public_ip.as_deref(), &region).await?;

    let config = disk.join(AGENT_CONFIG);
    let text = template_text.replace("@ROOT@", &disk.to_string_lossy()).replace("@IMDS@", &imds_url);
    tokio::fs::write(&config, text).await.map_err(|source| MachineError::Io { action: "write", path: config.clone(), source })?;

    let mut agent_cmd = std::process::Command::new(&state.opts.agent_bin);
    crate::aws_env(&mut agent_cmd)
        .args(["run", "--config"])
        .arg(&config)
        .env("DR_SIM_STATE_DIR", disk.join("var/lib/dr-sim"))
        .env("DR_SIM_STOP_SECS", state.opts.app_secs.to_string())
        .env("DR_SIM_START_SECS", state.opts.app_secs.to_string())
        .env("RUST_LOG", "info");
    crate::die_with_test(&mut agent_cmd).stdin(std::process::Stdio::null()).stdout(open_log(state, id)?).stderr(log);
    still_current(state, id, epoch)?;
    let agent = tokio::process::Command::from(agent_cmd).kill_on_drop(true).spawn().map_err(|source| MachineError::Io {
        action: "start",
        path: state.opts.agent_bin.clone(),
        source,
    })?;

    let (tx, rx) = mpsc::unbounded_channel();
    let mut machines = state.machines.lock().expect("machines lock");
    let m = machines.get_mut(id).filter(|m| m.epoch == epoch).ok_or_else(|| MachineError::Superseded(id.to_owned()))?;
    m.boots += 1;
    m.phase = Phase::Running;
    m.private_ip = Some(private_ip.clone());
    m.public_ip = public_ip.clone();
    m.imds_url = Some(imds_url.clone());
    m.pids = agent.id().zip(imds.id());
    m.halt = Some(tx);
    let boot = Boot { id: id.to_owned(), boot_no: m.boots, imds_url: imds_url.clone() };
    m.supervisor = Some(tokio::spawn(supervise(state.clone(), boot, agent, imds, rx)));
    tracing::info!(instance_id = id, boot = m.boots, private_ip, public_ip, imds_url, disk = %disk.display(), "machine booted");
    Ok(())
}

/// The machine's log (agent and IMDS output), opened for appending.
fn open_log(state: &State, id: &str) -> Result<std::fs::File, MachineError> {
    let path = state.opts.dir.join("machines").join(format!("{id}.log"));
    std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|source| MachineError::Io { action: "open", path, source })
}

/// Starts a dr-sim-imds for the instance on `listen`; returns it with its URL.
async fn spawn_imds(
    state: &State,
    id: &str,
    listen: &str,
    private_ip: &str,
    public_ip: Option<&str>,
    region: &str,
) -> Result<(tokio::process::Child, String), MachineError> {
    let mut cmd = std::process::Command::new(&state.opts.imds_bin);
    cmd.args(["--listen", listen, "--instance-id", id, "--private-ip", private_ip, "--region", region]);
    if let Some(key) = state.opts.iid_key.as_ref().filter(|k| k.exists()) {
        cmd.arg("--iid-key").arg(key);
    }
    if let Some(ip) = public_ip {
        cmd.args(["--public-ip", ip]);
    }
    crate::die_with_test(&mut cmd).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(open_log(state, id)?);
    let mut imds = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| MachineError::Imds { instance_id: id.to_owned(), detail: format!("cannot start: {e}") })?;
    let url = read_listening(&mut imds).await.map_err(|detail| MachineError::Imds { instance_id: id.to_owned(), detail })?;
    Ok((imds, url))
}

/// Reads `listening on <addr>` from a simulator's stdout.
async fn read_listening(child: &mut tokio::process::Child) -> Result<String, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(out);
    match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("cannot read its address: {e}")),
        Err(_) => return Err("printed no address within 10s".into()),
    }
    let addr = line.trim().strip_prefix("listening on ").ok_or_else(|| format!("printed {line:?}, not its address"))?;
    Ok(format!("http://{addr}"))
}

/// One boot of a machine, as its supervisor knows it.
struct Boot {
    id: String,
    boot_no: u32,
    imds_url: String,
}

/// Owns a boot's processes until the agent ends or a halt comes.
async fn supervise(
    state: Arc<State>,
    boot: Boot,
    mut agent: tokio::process::Child,
    mut imds: tokio::process::Child,
    mut halt: mpsc::UnboundedReceiver<Halt>,
) {
    let Boot { id, boot_no, imds_url } = boot;
    let (phase, error) = loop {
        let order = tokio::select! {
            status = agent.wait() => {
                let how = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                tracing::warn!(instance_id = id, status = how, "the machine's agent ended by itself");
                break (Phase::Exited, Some(format!("dr-agent ended by itself: {how}")));
            }
            order = halt.recv() => order,
        };
        match order {
            Some(Halt::Readdress { private_ip, public_ip }) => {
                let _ = imds.kill().await;
                let listen = imds_url.trim_start_matches("http://");
                let region = state.machines.lock().expect("machines lock").get(&id).map(|m| m.region.clone()).unwrap_or_default();
                match spawn_imds(&state, &id, listen, &private_ip, public_ip.as_deref(), &region).await {
                    Ok((new, _)) => {
                        tracing::info!(instance_id = id, private_ip, public_ip, "IMDS restarted with the new addresses");
                        let mut machines = state.machines.lock().expect("machines lock");
                        if let Some(m) = machines.get_mut(&id).filter(|m| m.boots == boot_no) {
                            m.private_ip = Some(private_ip);
                            m.public_ip = public_ip;
                            m.pids = m.pids.zip(new.id()).map(|((agent, _), imds)| (agent, imds));
                        }
                        imds = new;
                    }
                    Err(e) => {
                        tracing::error!(instance_id = id, error = %e, "cannot restart the IMDS; the machine has none now");
                        if let Some(m) = state.machines.lock().expect("machines lock").get_mut(&id) {
                            m.error = Some(e.to_string());
                        }
                    }
                }
            }
            Some(Halt::Stop) => {
                if let Some(pid) = agent.id() {
                    // SAFETY: kill(2) on our own child's pid, which is not
                    // reaped yet (we still hold it).
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                if tokio::time::timeout(STOP_GRACE, agent.wait()).await.is_err() {
                    tracing::warn!(instance_id = id, "the agent ignored SIGTERM for {STOP_GRACE:?}; SIGKILL");
                    let _ = agent.kill().await;
                }
                break (Phase::Stopped, None);
            }
            Some(Halt::Kill) | None => {
                let _ = agent.kill().await;
                break (Phase::Lost, None);
            }
        }
    };
    let _ = imds.kill().await;
    let mut machines = state.machines.lock().expect("machines lock");
    if let Some(m) = machines.get_mut(&id).filter(|m| m.boots == boot_no) {
        m.halt = None;
        m.pids = None;
        // A boot requested meanwhile keeps its own phase.
        if matches!(m.phase, Phase::Running | Phase::Stopping) {
            m.phase = phase;
            m.error = error;
        }
        tracing::info!(instance_id = id, state = m.phase.name(), "machine processes ended");
    }
}

/// The private and public IP moto reports for the instance.
async fn describe(state: &State, id: &str, region: &str) -> Result<(String, Option<String>), MachineError> {
    let client = moto_client(state, region);
    let out = client.describe_instances().instance_ids(id).send().await;
    let unknown = || MachineError::UnknownInstance { instance_id: id.to_owned(), region: region.to_owned() };
    let out = match out {
        Ok(out) => out,
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidInstanceID")) => return Err(unknown()),
        Err(e) => {
            let message = e.message().map(str::to_owned).unwrap_or_else(|| format!("{e:?}"));
            return Err(MachineError::Ec2 { instance_id: id.to_owned(), message });
        }
    };
    let instance = out.reservations().iter().flat_map(|r| r.instances()).find(|i| i.instance_id() == Some(id)).ok_or_else(unknown)?;
    let private = instance
        .private_ip_address()
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| MachineError::Ec2 { instance_id: id.to_owned(), message: "the instance has no private IP".into() })?;
    let public = instance.public_ip_address().filter(|ip| !ip.is_empty()).map(str::to_owned);
    Ok((private.to_owned(), public))
}

fn moto_client(state: &State, region: &str) -> aws_sdk_ec2::Client {
    let mut clients = state.ec2.lock().expect("ec2 lock");
    clients.entry(region.to_owned()).or_insert_with(|| crate::ec2_client(&state.opts.moto_url, region)).clone()
}

async fn copy_dir(from: &Path, to: &Path) -> Result<(), MachineError> {
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| MachineError::Io { action: "run cp -a for", path: from.to_owned(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MachineError::Copy { from: from.to_owned(), to: to.to_owned(), detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
    }
}

async fn remove_dir(path: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(path).await {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a disk copy");
    }
}

// ---------------------------------------------------------------- control API

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdoptRequest {
    instance_id: String,
    disk: PathBuf,
    #[serde(default)]
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoseRequest {
    instance_id: String,
}

fn json_answer(status: u16, value: &serde_json::Value) -> Answer {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("a JSON response")
}

fn error_answer(e: &MachineError) -> Answer {
    json_answer(e.status(), &serde_json::json!({ "error": e.to_string() }))
}

async fn control(state: &Arc<State>, method: &hyper::Method, path: &str, body: &[u8]) -> Answer {
    let result = match (method.as_str(), path) {
        ("POST", "/dataplane/adopt") => adopt(state, body).await,
        ("POST", "/dataplane/lose") => lose(state, body).await,
        ("GET", "/dataplane/machines") => {
            let machines = state.machines.lock().expect("machines lock");
            let views: Vec<MachineView> = machines.iter().map(|(id, m)| m.view(id)).collect();
            Ok(serde_json::to_value(views).expect("views serialize"))
        }
        ("GET", "/dataplane/images") => {
            let images = state.images.lock().expect("images lock");
            Ok(serde_json::to_value(&*images).expect("images serialize"))
        }
        _ => {
            return json_answer(404, &serde_json::json!({ "error": format!("no data plane endpoint {method} {path}") }));
        }
    };
    match result {
        Ok(v) => json_answer(200, &v),
        Err(e) => {
            tracing::warn!(path, error = %e, "control request refused");
            error_answer(&e)
        }
    }
}

fn machine_view(state: &State, id: &str) -> Result<serde_json::Value, MachineError> {
    let machines = state.machines.lock().expect("machines lock");
    let m = machines.get(id).ok_or_else(|| MachineError::UnknownMachine(id.to_owned()))?;
    Ok(serde_json::to_value(m.view(id)).expect("view serializes"))
}

/// `POST /dataplane/adopt`: a machine the test launched becomes known, with
/// its disk used in place, and boots now.
async fn adopt(state: &Arc<State>, body: &[u8]) -> Result<serde_json::Value, MachineError> {
    let req: AdoptRequest = serde_json::from_slice(body).map_err(|e| MachineError::BadBody(e.to_string()))?;
    if !valid_id(&req.instance_id, "i") {
        return Err(MachineError::BadInstanceId(req.instance_id));
    }
    let region = req.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
    if !valid_region(&region) {
        return Err(MachineError::BadBody(format!("invalid region `{region}`")));
    }
    if !req.disk.is_absolute() {
        return Err(MachineError::DiskNotAbsolute(req.disk));
    }
    if !req.disk.is_dir() {
        return Err(MachineError::NoDisk(req.disk));
    }
    if !req.disk.join(AGENT_TEMPLATE).is_file() {
        return Err(MachineError::NoTemplate { disk: req.disk });
    }
    // Known to EC2 before it is known here.
    describe(state, &req.instance_id, &region).await?;
    {
        let mut machines = state.machines.lock().expect("machines lock");
        if machines.contains_key(&req.instance_id) {
            return Err(MachineError::AlreadyKnown { instance_id: req.instance_id });
        }
        machines.insert(req.instance_id.clone(), Machine::new(&region, None, req.disk.clone()));
    }
    tracing::info!(instance_id = req.instance_id, disk = %req.disk.display(), "machine adopted");
    let epoch = begin_boot(state, &req.instance_id).ok_or_else(|| MachineError::Superseded(req.instance_id.clone()))?;
    boot(state, &req.instance_id, epoch).await?;
    machine_view(state, &req.instance_id)
}

/// `POST /dataplane/lose`: the host dies; EC2 is not told.
async fn lose(state: &Arc<State>, body: &[u8]) -> Result<serde_json::Value, MachineError> {
    let req: LoseRequest = serde_json::from_slice(body).map_err(|e| MachineError::BadBody(e.to_string()))?;
    if !halt(state, &req.instance_id, Halt::Kill, false) {
        return Err(MachineError::UnknownMachine(req.instance_id));
    }
    let supervisor = state.machines.lock().expect("machines lock").get_mut(&req.instance_id).and_then(|m| m.supervisor.take());
    if let Some(s) = supervisor {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    tracing::warn!(instance_id = req.instance_id, "machine lost (host failure; EC2 not told)");
    machine_view(state, &req.instance_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_instances_answer_names_each_instance_not_nested_items() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><reservationId>r-1</reservationId>
<instancesSet><item><instanceId>i-0123456789abcdef0</instanceId><blockDeviceMapping><item><instanceId>i-99999999</instanceId></item></blockDeviceMapping></item>
<item><instanceId>i-0123456789abcdef1</instanceId></item></instancesSet></RunInstancesResponse>"#;
        assert_eq!(answer_instance_ids(xml).expect("parse"), vec!["i-0123456789abcdef0".to_owned(), "i-0123456789abcdef1".to_owned()]);
        assert!(
            answer_instance_ids(
                "<RunInstancesResponse><instancesSet><item><instanceId>../x</instanceId></item></instancesSet></RunInstancesResponse>"
            )
            .is_err()
        );
        assert!(answer_instance_ids("not xml").is_err());
    }

    #[test]
    fn image_id_is_read_from_the_answer_and_validated() {
        let xml = r#"<CreateImageResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><requestId>x</requestId><imageId>ami-1a2b3c4d</imageId></CreateImageResponse>"#;
        assert_eq!(answer_image_id(xml).expect("id"), "ami-1a2b3c4d");
        assert!(answer_image_id("<CreateImageResponse><imageId>ami-../../etc</imageId></CreateImageResponse>").is_err());
        assert!(answer_image_id("<CreateImageResponse/>").is_err());
    }

    #[test]
    fn query_lists_are_read_in_index_order() {
        let params: Vec<(String, String)> =
            form_urlencoded::parse(b"Action=StopInstances&InstanceId.2=i-b&InstanceId.10=i-c&InstanceId.1=i-a&InstanceIdX=no")
                .into_owned()
                .collect();
        assert_eq!(param(&params, "Action"), Some("StopInstances"));
        assert_eq!(param_list(&params, "InstanceId"), vec!["i-a", "i-b", "i-c"]);
    }

    #[test]
    fn signing_region_comes_from_the_credential_scope() {
        let mut h = hyper::HeaderMap::new();
        assert_eq!(signing_region(&h), "us-east-1");
        h.insert(
            hyper::header::AUTHORIZATION,
            "AWS4-HMAC-SHA256 Credential=testing/20261201/eu-west-1/ec2/aws4_request, SignedHeaders=host, Signature=ab"
                .parse()
                .expect("header"),
        );
        assert_eq!(signing_region(&h), "eu-west-1");
    }
}
