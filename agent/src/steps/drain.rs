//! Draining Nomad builder nodes through Nomad's HTTP API, and undraining.
//!
//! Safety rule: nodes are never left drained after the step that needed the
//! drain, also when that step fails. [`with_drain`] drains, runs the step and
//! undrains on every path. The nodes a drain touches are written to
//! `state_dir/drain.json` *before* the first drain request, so `undrain` (by
//! hand, or by the agent after a crash) knows what to undo. Only nodes this
//! agent drained are undrained; a node an operator drained before is left as
//! it was.
//!
//! Cancellation: if the future running [`with_drain`] is dropped, the undrain
//! does not run; the record stays and `dr-agent undrain` (or [`undrain`] at
//! start-up when [`recorded_nodes`] is not empty) completes it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

pub use dr_proto::contract::{AllocRef, DrainParams, DrainReport, NodeRef, UndrainReport};

use crate::config::Config;
use crate::steps::error::ErrorKind;
use crate::sys::http::{EXCERPT, HttpClient, HttpError, excerpt};

/// Largest answer accepted from Nomad (allocation lists can be large).
const MAX_BODY: usize = 32 * 1024 * 1024;
/// How often allocations are polled while waiting.
const POLL: Duration = Duration::from_secs(1);
/// Progress is logged at least this often while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// File (under `state_dir`) recording the nodes this agent drained.
pub const RECORD_FILE: &str = "drain.json";

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("config key `nomad.api_url`: `{url}`: {why}")]
    Url { url: String, why: String },
    #[error("drain deadline must be greater than zero")]
    ZeroDeadline,
    #[error("Nomad {method} {url}: no answer within {timeout:?}")]
    Timeout { method: &'static str, url: String, timeout: Duration },
    #[error("Nomad {method} {url}: {error}")]
    Http { method: &'static str, url: String, error: String },
    #[error("Nomad {method} {url}: HTTP {status}: {body}")]
    Status { method: &'static str, url: String, status: u16, body: String },
    #[error("Nomad {url}: unexpected JSON: {why}: {excerpt}")]
    Json { url: String, why: String, excerpt: String },
    #[error("node id `{id}` from {origin} is not [A-Za-z0-9-]{{1,64}}; refusing to use it in a URL")]
    NodeId { id: String, origin: String },
    #[error("drain record {path}: {why}")]
    Record { path: PathBuf, why: String },
    #[error(
        "{} allocation(s) still running or pending after the drain deadline of {deadline:?}: {}",
        allocs.len(),
        allocs.iter().map(|a| format!("{} ({}) on node {}", a.id, a.name, a.node_id)).collect::<Vec<_>>().join(", ")
    )]
    StillRunning { deadline: Duration, allocs: Vec<AllocRef> },
    #[error("draining failed after asking Nomad to drain {} node(s); they are recorded in {}: run `dr-agent undrain`: {source}", drained.len(), record.display())]
    Partial { drained: Vec<String>, record: PathBuf, source: Box<DrainError> },
    #[error("the drain of {} node(s) could not be ended ({}); {} is kept: run `dr-agent undrain` again", failed.len(), failed.join("; "), record.display())]
    UndrainIncomplete { failed: Vec<String>, record: PathBuf },
}

impl DrainError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DrainError::Url { .. } | DrainError::ZeroDeadline => ErrorKind::Invalid,
            _ => ErrorKind::Failed,
        }
    }
}

/// Nomad's node stub (`GET /v1/nodes`); unknown fields ignored.
#[derive(Clone, Debug, Deserialize)]
struct RawNode {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "NodeClass", default)]
    node_class: Option<String>,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Drain", default)]
    drain: bool,
    #[serde(rename = "SchedulingEligibility", default)]
    eligibility: String,
}

impl RawNode {
    fn to_ref(&self) -> NodeRef {
        NodeRef {
            id: self.id.clone(),
            name: self.name.clone(),
            node_class: self.node_class.clone().unwrap_or_default(),
            status: self.status.clone(),
            eligibility: self.eligibility.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawAlloc {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "JobID", default)]
    job_id: String,
    #[serde(rename = "ClientStatus", default)]
    client_status: String,
}

/// Checks a node id before it goes into a URL path.
pub fn validate_node_id(id: &str, origin: &str) -> Result<(), DrainError> {
    if !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(())
    } else {
        Err(DrainError::NodeId { id: id.to_owned(), origin: origin.to_owned() })
    }
}

/// A small client for the parts of Nomad's HTTP API a drain needs.
#[derive(Clone, Debug)]
pub struct NomadClient {
    http: HttpClient,
}

impl NomadClient {
    /// `api_url` is `http://host:port` (no path).
    pub fn new(api_url: &str, timeout: Duration) -> Result<Self, DrainError> {
        let bad = |why: String| DrainError::Url { url: api_url.to_owned(), why };
        let http = HttpClient::new(api_url.trim_end_matches('/'), timeout, MAX_BODY).map_err(|e| match e {
            HttpError::NotHttp => bad("only http:// is supported (Nomad's API on the services machine)".to_owned()),
            e => bad(e.to_string()),
        })?;
        let uri = http.base_uri();
        if !(uri.path().is_empty() || uri.path() == "/") || uri.query().is_some() {
            return Err(bad("must not carry a path or query".to_owned()));
        }
        Ok(NomadClient { http })
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<(StatusCode, String), DrainError> {
        let m: &'static str = if method == Method::POST { "POST" } else { "GET" };
        let mut headers = vec![("Accept", "application/json")];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let r = self.http.send(method, path, &headers, body.map(String::into_bytes)).await.map_err(|e| match e {
            HttpError::Timeout(timeout) => DrainError::Timeout { method: m, url: self.http.url(path), timeout },
            e => DrainError::Http { method: m, url: self.http.url(path), error: e.to_string() },
        })?;
        Ok((r.status, r.text().into_owned()))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, path: &str, body: &str) -> Result<T, DrainError> {
        serde_json::from_str(body).map_err(|e| DrainError::Json {
            url: self.http.url(path),
            why: e.to_string(),
            excerpt: excerpt(body, EXCERPT),
        })
    }

    fn status_err(&self, method: &'static str, path: &str, status: StatusCode, body: &str) -> DrainError {
        DrainError::Status { method, url: self.http.url(path), status: status.as_u16(), body: excerpt(body, EXCERPT) }
    }

    async fn nodes(&self) -> Result<Vec<RawNode>, DrainError> {
        let path = "/v1/nodes";
        match self.call(Method::GET, path, None).await? {
            (StatusCode::OK, body) => self.json(path, &body),
            (status, body) => Err(self.status_err("GET", path, status, &body)),
        }
    }

    /// Allocations of a node; `None` when Nomad no longer knows the node.
    async fn allocations(&self, id: &str) -> Result<Option<Vec<RawAlloc>>, DrainError> {
        validate_node_id(id, "the node list")?;
        let path = format!("/v1/node/{id}/allocations");
        match self.call(Method::GET, &path, None).await? {
            (StatusCode::OK, body) => self.json(&path, &body).map(Some),
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (status, body) => Err(self.status_err("GET", &path, status, &body)),
        }
    }

    /// Starts (`Some(deadline)`) or ends (`None`) the drain of a node.
    /// `Ok(false)` when Nomad does not know the node.
    async fn set_drain(&self, id: &str, deadline: Option<Duration>, mark_eligible: bool) -> Result<bool, DrainError> {
        validate_node_id(id, "the node list")?;
        let path = format!("/v1/node/{id}/drain");
        let spec =
            deadline.map(|d| serde_json::json!({ "Deadline": i64::try_from(d.as_nanos()).unwrap_or(i64::MAX), "IgnoreSystemJobs": false }));
        let body = serde_json::json!({ "NodeID": id, "DrainSpec": spec, "MarkEligible": mark_eligible }).to_string();
        match self.call(Method::POST, &path, Some(body)).await? {
            (status, _) if status.is_success() => Ok(true),
            (StatusCode::NOT_FOUND, _) => Ok(false),
            (status, body) => Err(self.status_err("POST", &path, status, &body)),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One node this agent drained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RecordedNode {
    id: String,
    #[serde(default)]
    name: String,
    /// Its SchedulingEligibility was not `ineligible` before the drain.
    was_eligible: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    nodes: Vec<RecordedNode>,
    /// The instance and boot the record was written under (records of
    /// older agents have none: taken as the identity recorded before).
    #[serde(default)]
    identity: Option<crate::sys::identity::Identity>,
}

/// The identity records are written under now.
fn here(config: &Config) -> crate::sys::identity::Identity {
    crate::sys::identity::for_records(&config.state_dir, Path::new(crate::sys::facts::BOOT_ID_PATH))
}

/// The record, unless it was written on another instance (a state_dir
/// restored with an image): then its nodes belong to the machine the image
/// was taken of. It is reported, moved aside (unless `dry_run`) and
/// replaced by an empty record: this instance neither undrains nor touches
/// those nodes, and does not fall back to ending every drain.
fn load_current_record(config: &Config, dry_run: bool, warnings: &mut Vec<String>) -> Result<Option<Record>, DrainError> {
    let path = record_path(config);
    let Some(record) = load_record(&path)? else { return Ok(None) };
    if record.nodes.is_empty() {
        return Ok(Some(record));
    }
    let recorded = crate::sys::identity::load(&config.state_dir).ok().flatten();
    let Some(written) = record.identity.clone().or_else(|| crate::sys::identity::assumed_for_old_records(recorded.as_ref())) else {
        return Ok(Some(record));
    };
    let now = here(config);
    if written.same_instance(&now) {
        return Ok(Some(record));
    }
    let aside = config.state_dir.join(format!("{RECORD_FILE}.stale-{}", crate::sys::clock::utc_stamp(std::time::SystemTime::now())));
    let ids: Vec<&str> = record.nodes.iter().map(|n| n.id.as_str()).collect();
    warnings.push(format!(
        "stale drain record {} written on {written}, not on this instance ({}): its node(s) {} are not touched; {} {}",
        path.display(),
        now.instance_id.as_deref().unwrap_or("(unknown)"),
        ids.join(", "),
        if dry_run { "would move it aside to" } else { "moved it aside to" },
        aside.display()
    ));
    tracing::warn!(record = %path.display(), written = %written, "stale drain record from another instance");
    let empty = Record { nodes: Vec::new(), identity: Some(now) };
    if !dry_run {
        std::fs::rename(&path, &aside)
            .map_err(|e| DrainError::Record { path: path.clone(), why: format!("cannot move the stale record aside: {e}") })?;
        save_record(&path, &empty)?;
    }
    Ok(Some(empty))
}

fn record_path(config: &Config) -> PathBuf {
    config.state_dir.join(RECORD_FILE)
}

fn load_record(path: &Path) -> Result<Option<Record>, DrainError> {
    let rec_err = |why: String| DrainError::Record { path: path.to_owned(), why };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(rec_err(e.to_string())),
    };
    let record: Record = serde_json::from_str(&text).map_err(|e| rec_err(format!("not a drain record: {e}")))?;
    for n in &record.nodes {
        validate_node_id(&n.id, &path.display().to_string())?;
    }
    Ok(Some(record))
}

/// Writes the record atomically ([`crate::sys::atomic::write`]).
fn save_record(path: &Path, record: &Record) -> Result<(), DrainError> {
    let bytes = serde_json::to_vec_pretty(record).expect("a record serializes");
    crate::sys::atomic::write(path, &bytes, 0o600).map_err(|e| DrainError::Record { path: path.to_owned(), why: e.to_string() })
}

/// Node ids recorded as drained by this agent and not undrained yet (a
/// non-empty answer at start-up means an undrain is owed).
pub fn recorded_nodes(config: &Config) -> Result<Vec<String>, DrainError> {
    let mut warnings = Vec::new();
    let record = load_current_record(config, true, &mut warnings)?;
    Ok(record.map(|r| r.nodes.into_iter().map(|n| n.id).collect()).unwrap_or_default())
}

/// Drains every ready Nomad client node and waits until none of them has a
/// running or pending allocation, or the deadline passes (then the report
/// lists what still runs; an error only with `require_idle`).
pub async fn drain(config: &Config, params: &DrainParams, dry_run: bool) -> Result<DrainReport, DrainError> {
    if params.deadline.is_zero() {
        return Err(DrainError::ZeroDeadline);
    }
    let client = NomadClient::new(&config.nomad.api_url, config.nomad.request_timeout)?;
    let path = record_path(config);
    let mut stale_warnings = Vec::new();
    let existing = load_current_record(config, dry_run, &mut stale_warnings)?;
    let had_record = existing.is_some();
    let mut record = existing.unwrap_or_default();
    let nodes = client.nodes().await?;
    let mut report = DrainReport {
        drained: Vec::new(),
        already_drained: Vec::new(),
        drained_by_others: Vec::new(),
        skipped: Vec::new(),
        deadline_ms: ms(params.deadline),
        waited_ms: 0,
        idle: false,
        still_running: Vec::new(),
        record: path.clone(),
        dry_run,
        actions: Vec::new(),
        warnings: stale_warnings,
    };
    let mut to_drain = Vec::new();
    for node in &nodes {
        validate_node_id(&node.id, &client.http.url("/v1/nodes"))?;
        if node.status != "ready" {
            report.skipped.push(node.to_ref());
            continue;
        }
        let ours = record.nodes.iter().any(|r| r.id == node.id);
        if ours && (node.drain || node.eligibility == "ineligible") {
            report.already_drained.push(node.to_ref());
        } else if !ours && node.drain {
            report.drained_by_others.push(node.to_ref());
        } else {
            to_drain.push(node);
        }
    }
    let ready: Vec<String> = nodes.iter().filter(|n| n.status == "ready").map(|n| n.id.clone()).collect();
    if !report.skipped.is_empty() {
        report.warnings.push(format!(
            "not drained (not ready): {}",
            report.skipped.iter().map(|n| format!("{} ({}, {})", n.name, n.id, n.status)).collect::<Vec<_>>().join(", ")
        ));
    }
    if !report.drained_by_others.is_empty() {
        report.warnings.push(format!(
            "already draining before this drain (left as is, not undrained by dr-agent): {}",
            report.drained_by_others.iter().map(|n| format!("{} ({})", n.name, n.id)).collect::<Vec<_>>().join(", ")
        ));
    }
    if dry_run {
        report.drained = to_drain.iter().map(|n| n.to_ref()).collect();
        for n in &to_drain {
            report.actions.push(format!("would drain node {} ({}) with a deadline of {:?}", n.name, n.id, params.deadline));
        }
        if to_drain.is_empty() {
            report.actions.push("no node to drain".to_owned());
        }
        return Ok(report);
    }
    // Record first: whatever happens next, undrain knows these nodes.
    let mut changed = !had_record;
    for n in &to_drain {
        if !record.nodes.iter().any(|r| r.id == n.id) {
            record.nodes.push(RecordedNode { id: n.id.clone(), name: n.name.clone(), was_eligible: n.eligibility != "ineligible" });
            changed = true;
        }
    }
    if changed {
        record.identity = Some(here(config));
        save_record(&path, &record)?;
    }
    let mut asked = Vec::new();
    for n in &to_drain {
        tracing::info!(step = "drain", node = %n.id, name = %n.name, "draining node");
        match client.set_drain(&n.id, Some(params.deadline), false).await {
            Ok(true) => {
                asked.push(n.id.clone());
                report.drained.push(n.to_ref());
            }
            Ok(false) => report.warnings.push(format!("node {} ({}) vanished before it could be drained", n.name, n.id)),
            Err(e) => {
                return Err(DrainError::Partial { drained: asked, record: path.clone(), source: Box::new(e) });
            }
        }
    }
    wait_idle(&client, &ready, params, &mut report).await?;
    if !report.idle && params.require_idle {
        return Err(DrainError::StillRunning { deadline: params.deadline, allocs: report.still_running.clone() });
    }
    Ok(report)
}

/// Polls the allocations of `nodes` until none runs or is pending, or the
/// deadline passes. Failing polls are retried until the deadline.
async fn wait_idle(client: &NomadClient, nodes: &[String], params: &DrainParams, report: &mut DrainReport) -> Result<(), DrainError> {
    let began = Instant::now();
    let deadline = began + params.deadline;
    let mut last_log = began;
    let mut gone: Vec<String> = Vec::new();
    loop {
        let mut busy = Vec::new();
        let mut error = None;
        let live: Vec<&String> = nodes.iter().filter(|id| !gone.contains(id)).collect();
        for id in live {
            match client.allocations(id).await {
                Ok(Some(allocs)) => {
                    busy.extend(allocs.into_iter().filter(|a| a.client_status == "running" || a.client_status == "pending").map(|a| {
                        AllocRef { node_id: id.clone(), id: a.id, name: a.name, job_id: a.job_id, client_status: a.client_status }
                    }))
                }
                Ok(None) => {
                    report.warnings.push(format!("node {id} vanished while draining"));
                    gone.push(id.clone());
                }
                Err(e) => error = Some(e),
            }
        }
        let elapsed = began.elapsed();
        if let Some(e) = &error {
            tracing::warn!(step = "drain", error = %e, elapsed_ms = ms(elapsed), "cannot read allocations; retrying");
        } else if busy.is_empty() {
            report.idle = true;
            report.waited_ms = ms(elapsed);
            tracing::info!(step = "drain", elapsed_ms = report.waited_ms, "no allocation runs on the drained nodes");
            return Ok(());
        }
        if Instant::now() >= deadline {
            report.waited_ms = ms(elapsed);
            report.still_running = busy;
            if let Some(e) = error {
                report.warnings.push(format!("the last allocation poll failed: {e}"));
            }
            report.warnings.push(format!(
                "{} allocation(s) still running or pending at the deadline of {:?}; Nomad stops them (drain deadline)",
                report.still_running.len(),
                params.deadline
            ));
            tracing::warn!(step = "drain", running = report.still_running.len(), "drain deadline passed");
            return Ok(());
        }
        if last_log.elapsed() >= PROGRESS_EVERY || elapsed < POLL {
            tracing::info!(step = "drain", running = busy.len(), elapsed_ms = ms(elapsed), "waiting for allocations to end");
            last_log = Instant::now();
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Ends the drain of the nodes this agent recorded, then empties the record
/// (kept as `{"nodes":[]}` so a repeated undrain changes nothing).
/// Idempotent. Without a record (this agent never drained), nothing is
/// touched and Nomad is not asked: nodes an operator drained stay drained,
/// whether the controller or a human asks.
pub async fn undrain(config: &Config, dry_run: bool) -> Result<UndrainReport, DrainError> {
    // A bad `nomad.api_url` is named even when there is nothing to undrain.
    let client = NomadClient::new(&config.nomad.api_url, config.nomad.request_timeout)?;
    let path = record_path(config);
    let mut stale_warnings = Vec::new();
    let record = load_current_record(config, dry_run, &mut stale_warnings)?;
    let mut report = UndrainReport {
        undrained: Vec::new(),
        already: Vec::new(),
        not_found: Vec::new(),
        from_record: record.is_some(),
        already_done: false,
        dry_run,
        actions: Vec::new(),
        warnings: stale_warnings,
    };
    let Some(record) = record else {
        tracing::info!(step = "undrain", record = %path.display(), "no drain record: this agent has not drained any node");
        report.already_done = true;
        report.warnings.push(format!(
            "no drain record in {}: this agent has not drained any node, so none is touched (end an operator's drain with `nomad node drain -disable`)",
            path.display()
        ));
        return Ok(report);
    };
    let nodes = match client.nodes().await {
        Ok(n) => Some(n),
        // With a record, a failing list must not keep nodes drained: end them blindly.
        Err(e) => {
            tracing::warn!(step = "undrain", error = %e, "cannot list nodes; ending the recorded drains anyway");
            report.warnings.push(format!("could not list nodes ({e}); ended every recorded drain"));
            None
        }
    };
    // (id, name, MarkEligible)
    let mut plan: Vec<(String, String, bool)> = Vec::new();
    for r in &record.nodes {
        match nodes.as_ref().map(|ns| ns.iter().find(|n| n.id == r.id)) {
            Some(None) => report.not_found.push(r.id.clone()),
            Some(Some(n)) if !n.drain && (n.eligibility == "ineligible") != r.was_eligible => report.already.push(r.id.clone()),
            _ => plan.push((r.id.clone(), r.name.clone(), r.was_eligible)),
        }
    }
    report.already_done = plan.is_empty();
    if dry_run {
        for (id, name, eligible) in &plan {
            report.actions.push(format!(
                "would end the drain of node {name} ({id}){}",
                if *eligible { " and mark it eligible" } else { " (it was ineligible before: left ineligible)" }
            ));
            report.undrained.push(id.clone());
        }
        return Ok(report);
    }
    let mut failed = Vec::new();
    for (id, name, eligible) in &plan {
        tracing::info!(step = "undrain", node = %id, name = %name, mark_eligible = eligible, "ending the drain");
        match client.set_drain(id, None, *eligible).await {
            Ok(true) => report.undrained.push(id.clone()),
            Ok(false) => report.not_found.push(id.clone()),
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    if !failed.is_empty() {
        return Err(DrainError::UndrainIncomplete { failed, record: path });
    }
    if !report.not_found.is_empty() {
        report.warnings.push(format!("Nomad no longer knows node(s) {}", report.not_found.join(", ")));
    }
    // An empty record, not none: a later undrain must not fall back to
    // ending drains an operator made.
    save_record(&path, &Record { nodes: Vec::new(), identity: Some(here(config)) })?;
    Ok(report)
}

/// The result of a step run under a drain.
#[derive(Clone, Debug, PartialEq)]
pub struct Drained<T> {
    pub value: T,
    pub drain: DrainReport,
    pub undrain: UndrainReport,
}

/// How [`with_drain`] failed. In every variant the undrain was attempted.
pub enum WithDrainError<T, E> {
    /// The drain failed; the step did not run.
    Drain { error: DrainError, undrain: Result<UndrainReport, DrainError> },
    /// The step failed.
    Step { error: E, drain: DrainReport, undrain: Result<UndrainReport, DrainError> },
    /// The step succeeded (its value is here) but the undrain failed.
    Undrain { value: T, drain: DrainReport, error: DrainError },
}

impl<T, E> WithDrainError<T, E> {
    /// The undrain's own failure, if it failed.
    pub fn undrain_error(&self) -> Option<&DrainError> {
        match self {
            WithDrainError::Drain { undrain, .. } | WithDrainError::Step { undrain, .. } => undrain.as_ref().err(),
            WithDrainError::Undrain { error, .. } => Some(error),
        }
    }
}

impl<T, E: fmt::Display> fmt::Display for WithDrainError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let undrained = |u: &Result<UndrainReport, DrainError>| match u {
            Ok(r) => format!("nodes undrained ({})", r.undrained.len()),
            Err(e) => format!("undrain FAILED too: {e}"),
        };
        match self {
            WithDrainError::Drain { error, undrain } => write!(f, "drain failed: {error}; {}", undrained(undrain)),
            WithDrainError::Step { error, undrain, .. } => {
                write!(f, "the step under drain failed: {error}; {}", undrained(undrain))
            }
            WithDrainError::Undrain { error, .. } => write!(f, "the step succeeded but the undrain failed: {error}"),
        }
    }
}

impl<T, E: fmt::Display> fmt::Debug for WithDrainError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WithDrainError({self})")
    }
}

impl<T, E: fmt::Display> std::error::Error for WithDrainError<T, E> {}

/// Drains, runs `step`, and undrains on every path: the step's success, its
/// failure, and a failed (possibly partial) drain. A drain that ends at its
/// deadline with allocations still running is not a failure unless
/// `params.require_idle`.
pub async fn with_drain<F, Fut, T, E>(config: &Config, params: &DrainParams, step: F) -> Result<Drained<T>, WithDrainError<T, E>>
where
    F: FnOnce(DrainReport) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let drain_report = match drain(config, params, false).await {
        Ok(r) => r,
        Err(error) => {
            let undrain = undrain(config, false).await;
            return Err(WithDrainError::Drain { error, undrain });
        }
    };
    let result = step(drain_report.clone()).await;
    let undone = undrain(config, false).await;
    match (result, undone) {
        (Ok(value), Ok(u)) => Ok(Drained { value, drain: drain_report, undrain: u }),
        (Ok(value), Err(error)) => Err(WithDrainError::Undrain { value, drain: drain_report, error }),
        (Err(error), undrain) => Err(WithDrainError::Step { error, drain: drain_report, undrain }),
    }
}

#[cfg(test)]
mod tests {
    //! Library-level tests against a small in-process Nomad (hyper server).
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper::Request;
    use hyper::body::Bytes;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Fake {
        /// id -> (drain, eligible)
        nodes: BTreeMap<String, (bool, bool)>,
        /// POSTs that enable a drain on these ids fail with 500.
        fail_drain: Vec<String>,
        calls: Vec<String>,
    }

    async fn serve(fake: Arc<Mutex<Fake>>) -> String {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let fake = fake.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let fake = fake.clone();
                        async move {
                            let method = req.method().clone();
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.expect("body").to_bytes();
                            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            let mut f = fake.lock().expect("lock");
                            f.calls.push(format!("{method} {path} {body}"));
                            let (status, out) = handle(&mut f, &method, &path, &body);
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder().status(status).body(Full::new(Bytes::from(out))).expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn handle(f: &mut Fake, method: &Method, path: &str, body: &serde_json::Value) -> (u16, String) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["v1", "nodes"]) => {
                let list: Vec<_> = f
                    .nodes
                    .iter()
                    .map(|(id, (drain, eligible))| {
                        serde_json::json!({"ID": id, "Name": format!("n-{id}"), "Status": "ready", "Drain": drain,
                            "SchedulingEligibility": if *eligible { "eligible" } else { "ineligible" }})
                    })
                    .collect();
                (200, serde_json::Value::Array(list).to_string())
            }
            ("GET", ["v1", "node", _, "allocations"]) => (200, "[]".to_owned()),
            ("POST", ["v1", "node", id, "drain"]) => {
                let enable = !body["DrainSpec"].is_null();
                if enable && f.fail_drain.iter().any(|x| x == id) {
                    return (500, "injected".to_owned());
                }
                let Some(node) = f.nodes.get_mut(*id) else { return (404, "node not found".to_owned()) };
                if enable {
                    *node = (true, false);
                } else {
                    *node = (false, body["MarkEligible"].as_bool().unwrap_or(false) || node.1);
                }
                (200, "{}".to_owned())
            }
            _ => (404, "no route".to_owned()),
        }
    }

    fn config(url: &str, state: &Path) -> Config {
        let mut c = Config::default();
        c.nomad.api_url = url.to_owned();
        c.nomad.request_timeout = Duration::from_secs(5);
        c.state_dir = state.to_owned();
        c
    }

    fn fake(ids: &[&str]) -> Arc<Mutex<Fake>> {
        let mut f = Fake::default();
        for id in ids {
            f.nodes.insert((*id).to_owned(), (false, true));
        }
        Arc::new(Mutex::new(f))
    }

    fn all_undrained(f: &Arc<Mutex<Fake>>) -> bool {
        f.lock().expect("lock").nodes.values().all(|(d, e)| !*d && *e)
    }

    const P: DrainParams = DrainParams { deadline: Duration::from_secs(5), require_idle: false };

    /// A state_dir restored with an image: the identity record says this
    /// machine is i-0bbb (restored from i-0aaa), and drain.json was written
    /// on i-0aaa (with an identity, or by an older agent without one).
    fn restored_state(state: &Path, with_identity: bool) {
        let live_boot = crate::sys::facts::read_boot_id(Path::new(crate::sys::facts::BOOT_ID_PATH)).expect("boot id");
        let old = serde_json::json!({"instance_id": "i-0aaa", "boot_id": "old-boot"});
        std::fs::write(
            state.join(crate::sys::identity::IDENTITY_FILE),
            serde_json::json!({"current": {"instance_id": "i-0bbb", "boot_id": live_boot}, "previous": old, "restored_from": old})
                .to_string(),
        )
        .expect("identity");
        let mut rec = serde_json::json!({"nodes": [{"id": "aaaa-1", "name": "n-aaaa-1", "was_eligible": true}]});
        if with_identity {
            rec["identity"] = old;
        }
        std::fs::write(state.join(RECORD_FILE), rec.to_string()).expect("record");
    }

    #[tokio::test]
    async fn a_drain_record_of_another_instance_is_moved_aside_and_its_nodes_left_alone() {
        for with_identity in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let f = fake(&["aaaa-1", "bbbb-2"]);
            // On the old machine's Nomad the node is drained (as the image saw it).
            f.lock().expect("lock").nodes.insert("aaaa-1".to_owned(), (true, false));
            let c = config(&serve(f.clone()).await, dir.path());
            restored_state(dir.path(), with_identity);
            assert!(recorded_nodes(&c).expect("record").is_empty(), "no undrain owed at start-up");
            let dry = undrain(&c, true).await.expect("dry undrain");
            assert!(dry.undrained.is_empty() && dry.warnings.iter().any(|w| w.contains("stale drain record")), "{dry:?}");
            assert!(dir.path().join(RECORD_FILE).exists(), "the dry run moves nothing");
            let r = undrain(&c, false).await.expect("undrain");
            assert!(r.undrained.is_empty(), "{r:?}");
            assert!(r.warnings.iter().any(|w| w.contains("stale drain record") && w.contains("aaaa-1") && w.contains("i-0aaa")), "{r:?}");
            let calls = f.lock().expect("lock").calls.clone();
            assert!(!calls.iter().any(|c| c.starts_with("POST")), "no node touched: {calls:?}");
            assert_eq!(f.lock().expect("lock").nodes["aaaa-1"], (true, false));
            let aside: Vec<_> = std::fs::read_dir(dir.path())
                .expect("ls")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("drain.json.stale-"))
                .collect();
            assert_eq!(aside.len(), 1, "moved aside");
            // A second undrain: nothing stale left, still nothing touched.
            let again = undrain(&c, false).await.expect("undrain");
            assert!(again.undrained.is_empty() && again.warnings.is_empty(), "{again:?}");
        }
    }

    #[tokio::test]
    async fn with_drain_undrains_when_the_step_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fake(&["aaaa-1", "bbbb-2"]);
        let c = config(&serve(f.clone()).await, dir.path());
        let seen = Arc::new(Mutex::new(false));
        let seen2 = seen.clone();
        let f2 = f.clone();
        let res: Result<Drained<()>, WithDrainError<(), String>> = with_drain(&c, &P, |report| async move {
            // While the step runs, both nodes are drained and recorded.
            assert_eq!(report.drained.len(), 2);
            assert!(f2.lock().expect("lock").nodes.values().all(|(d, _)| *d));
            *seen2.lock().expect("lock") = true;
            Err("CreateImage failed".to_owned())
        })
        .await;
        assert!(*seen.lock().expect("lock"), "the step ran");
        let err = res.expect_err("the step failed");
        assert!(
            matches!(&err, WithDrainError::Step { error, undrain: Ok(u), .. } if error == "CreateImage failed" && u.undrained.len() == 2),
            "{err}"
        );
        assert!(all_undrained(&f), "nodes must be undrained after a failing step");
        assert!(recorded_nodes(&c).expect("record").is_empty(), "record emptied");
    }

    #[tokio::test]
    async fn with_drain_undrains_a_partial_drain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fake(&["aaaa-1", "bbbb-2"]);
        f.lock().expect("lock").fail_drain.push("bbbb-2".to_owned());
        let c = config(&serve(f.clone()).await, dir.path());
        let res: Result<Drained<()>, WithDrainError<(), String>> =
            with_drain(&c, &P, |_| async { panic!("the step must not run after a failed drain") }).await;
        let err = res.expect_err("drain failed");
        assert!(matches!(&err, WithDrainError::Drain { undrain: Ok(_), .. }), "{err}");
        assert!(err.to_string().contains("HTTP 500"), "{err}");
        assert!(all_undrained(&f), "the node drained before the failure is undrained");
        let calls = f.lock().expect("lock").calls.clone();
        assert!(calls.iter().any(|c| c.starts_with("POST /v1/node/aaaa-1/drain") && c.contains("\"DrainSpec\":null")), "{calls:?}");
    }

    #[tokio::test]
    async fn with_drain_success_and_operator_drains_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fake(&["aaaa-1", "cccc-3"]);
        // An operator drained cccc-3 before: it must stay drained.
        f.lock().expect("lock").nodes.insert("cccc-3".to_owned(), (true, false));
        let c = config(&serve(f.clone()).await, dir.path());
        let res: Result<Drained<u32>, WithDrainError<u32, String>> = with_drain(&c, &P, |_| async { Ok(7) }).await;
        let done = res.expect("ok");
        assert_eq!(done.value, 7);
        assert_eq!(done.drain.drained.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["aaaa-1"]);
        assert_eq!(done.drain.drained_by_others.len(), 1);
        assert_eq!(done.undrain.undrained, ["aaaa-1"]);
        let nodes = f.lock().expect("lock").nodes.clone();
        assert_eq!(nodes["aaaa-1"], (false, true));
        assert_eq!(nodes["cccc-3"], (true, false));
        assert!(recorded_nodes(&c).expect("record").is_empty());
        // Idempotent: a second undrain changes nothing, cccc-3 stays drained.
        let again = undrain(&c, false).await.expect("undrain again");
        assert!(again.undrained.is_empty() && again.from_record, "{again:?}");
        assert_eq!(f.lock().expect("lock").nodes["cccc-3"], (true, false));
    }

    /// Issue 7 §4: without a drain record (this agent never drained), an
    /// undrain, hand-run or from the controller, leaves an operator's
    /// drained and ineligible nodes alone and asks Nomad nothing.
    #[tokio::test]
    async fn undrain_without_a_record_touches_no_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fake(&["aaaa-1", "bbbb-2", "cccc-3"]);
        {
            let mut g = f.lock().expect("lock");
            g.nodes.insert("aaaa-1".to_owned(), (true, false)); // drained by an operator
            g.nodes.insert("bbbb-2".to_owned(), (false, false)); // marked ineligible by an operator
        }
        let c = config(&serve(f.clone()).await, dir.path());
        let before = f.lock().expect("lock").nodes.clone();
        for dry_run in [true, false] {
            let r = undrain(&c, dry_run).await.expect("undrain");
            assert!(r.undrained.is_empty() && r.actions.is_empty(), "{r:?}");
            assert!(!r.from_record && r.already_done, "{r:?}");
            assert!(r.warnings.iter().any(|w| w.contains("no drain record") && w.contains("none is touched")), "{r:?}");
        }
        assert_eq!(f.lock().expect("lock").nodes, before, "every node as the operator left it");
        assert!(f.lock().expect("lock").calls.is_empty(), "Nomad not asked: {:?}", f.lock().expect("lock").calls);
        assert!(!dir.path().join(RECORD_FILE).exists(), "no record invented");
    }

    #[tokio::test]
    async fn bad_inputs() {
        let dir = tempfile::tempdir().expect("tempdir");
        for url in ["https://127.0.0.1:4646", "http://127.0.0.1:4646/v1", "nomad"] {
            let c = config(url, dir.path());
            let err = drain(&c, &P, false).await.expect_err(url);
            assert_eq!(err.kind(), ErrorKind::Invalid, "{url}: {err}");
            assert!(err.to_string().contains("nomad.api_url"), "{err}");
        }
        assert!(validate_node_id("../../v1/jobs", "x").is_err());
        assert!(validate_node_id("5e6a7f3c-0000-4000-8000-123456789abc", "x").is_ok());
        // A node id that could escape the path is refused before anything is drained.
        let f = fake(&["aaaa-1", "x/../../evil"]);
        let c = config(&serve(f.clone()).await, dir.path());
        let err = drain(&c, &P, false).await.expect_err("bad id");
        assert!(matches!(err, DrainError::NodeId { .. }), "{err}");
        assert!(f.lock().expect("lock").calls.iter().all(|c| !c.starts_with("POST")));
    }
}
