//! drctl's client side: connecting to the admin API, turning answers into
//! views, printing them for humans (default) or as JSON (`--output json`).
//! The command-line grammar lives in `src/bin/drctl.rs`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use dr_proto::pb;
use dr_proto::pb::admin_service_client::AdminServiceClient;
use dr_proto::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the controller at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the controller refused this client: {0}")]
    Rejected(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Tls(#[from] dr_proto::tls::TlsError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

impl CliError {
    /// Exit status: 1 operation failed, 2 usage or local files, 3 controller
    /// unreachable, 4 certificate refused, 5 unknown site/operation, 6 busy.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Usage(_) | CliError::Tls(_) | CliError::Pki(_) => 2,
            CliError::Unreachable { .. } => 3,
            CliError::Rejected(_) => 4,
            CliError::NotFound(_) => 5,
            CliError::Busy(_) => 6,
        }
    }
}

/// drctl's optional config file (`--config`, `DRCTL_CONFIG`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub controller: Option<String>,
    pub server_name: Option<String>,
    pub tls: Option<TlsFiles>,
}

/// Where and how to reach the controller.
#[derive(Clone, Debug)]
pub struct Connection {
    pub url: String,
    pub server_name: String,
    pub tls: TlsFiles,
}

impl Connection {
    /// Flags win over the file; the TLS name defaults to the URL's host.
    pub fn resolve(
        file: Option<PathBuf>,
        url: Option<String>,
        server_name: Option<String>,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, CliError> {
        let from_file = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
                toml::from_str::<ClientFile>(&text).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?
            }
            None => ClientFile::default(),
        };
        let url = url.or(from_file.controller).ok_or_else(|| {
            CliError::Usage("no controller address: give --controller URL (or DRCTL_CONTROLLER, or --config)".into())
        })?;
        let ftls = from_file.tls;
        let pick = |flag: Option<PathBuf>, f: Option<PathBuf>, name: &str| {
            flag.or(f).ok_or_else(|| CliError::Usage(format!("no --{name} given (flag, DRCTL_{}, or --config)", name.to_uppercase())))
        };
        let tls = TlsFiles {
            ca: pick(ca, ftls.as_ref().map(|t| t.ca.clone()), "ca")?,
            cert: pick(cert, ftls.as_ref().map(|t| t.cert.clone()), "cert")?,
            key: pick(key, ftls.as_ref().map(|t| t.key.clone()), "key")?,
        };
        let host = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ':']).next())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| CliError::Usage(format!("`{url}` is not a URL like https://host:port")))?
            .to_owned();
        Ok(Connection { server_name: server_name.or(from_file.server_name).unwrap_or(host), url, tls })
    }

    pub async fn connect(&self) -> Result<AdminServiceClient<Channel>, CliError> {
        dr_proto::tls::install_crypto_provider();
        let tls = dr_proto::tls::client_config(&self.tls, &self.server_name)?;
        let endpoint = Channel::from_shared(self.url.clone())
            .map_err(|e| CliError::Usage(format!("`{}` is not a valid controller URL: {e}", self.url)))?
            .tls_config(tls)
            .map_err(|e| CliError::Usage(format!("TLS configuration: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        let channel = endpoint.connect().await.map_err(|e| self.transport_error(&e))?;
        Ok(AdminServiceClient::new(channel))
    }

    /// After a transport failure: was it the controller refusing our
    /// certificate? TLS 1.3 delivers that verdict as an alert after the
    /// client's side of the handshake, which gRPC reports as a broken pipe,
    /// so a direct handshake is made to read the alert. Returns the reason
    /// when the controller refused us; `None` when the handshake is fine or
    /// the controller cannot be reached at all.
    pub async fn diagnose_tls(&self) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let authority = self.url.split("://").nth(1)?.split('/').next()?.to_owned();
        let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&authority))
            .await
            .ok()?
            .ok()?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in dr_proto::tls::load_certs(&self.tls.ca).ok()? {
            roots.add(ca).ok()?;
        }
        let certs = dr_proto::tls::load_certs(&self.tls.cert).ok()?;
        let key = dr_proto::tls::load_key(&self.tls.key).ok()?;
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .ok()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .ok()?;
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone()).ok()?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let mut tls = match connector.connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return Some(e.to_string()),
        };
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
            Ok(Err(e)) => Some(e.to_string()),
            _ => None,
        }
    }

    /// Refines an "unreachable" error into "refused" when a direct TLS
    /// handshake shows the controller rejecting our certificate.
    pub async fn explain(&self, e: CliError) -> CliError {
        match e {
            CliError::Unreachable { .. } => match self.diagnose_tls().await {
                Some(reason) => CliError::Rejected(format!(
                    "TLS handshake with {} refused: {reason} (is the certificate from this deployment's CA, unexpired, and of the right kind?)",
                    self.url
                )),
                None => e,
            },
            other => other,
        }
    }

    fn transport_error(&self, e: &(dyn std::error::Error + 'static)) -> CliError {
        let cause = error_chain(e);
        if looks_like_tls_refusal(&cause) {
            CliError::Rejected(format!("TLS handshake with {} failed: {cause}", self.url))
        } else {
            CliError::Unreachable { url: self.url.clone(), cause }
        }
    }

    /// Turns a gRPC status into what the operator should read.
    pub fn status_error(&self, s: tonic::Status) -> CliError {
        use tonic::Code;
        match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => CliError::Rejected(s.message().to_owned()),
            Code::NotFound => CliError::NotFound(s.message().to_owned()),
            Code::FailedPrecondition | Code::AlreadyExists => CliError::Busy(s.message().to_owned()),
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                let cause = match std::error::Error::source(&s) {
                    Some(src) => format!("{}: {}", s.message(), error_chain(src)),
                    None => s.message().to_owned(),
                };
                if looks_like_tls_refusal(&cause) {
                    CliError::Rejected(format!("TLS handshake with {} failed: {cause}", self.url))
                } else {
                    CliError::Unreachable { url: self.url.clone(), cause }
                }
            }
            _ => CliError::Failed(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn looks_like_tls_refusal(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    ["certificate", "alert", "handshake", "unknownca", "unknown issuer", "expired"].iter().any(|k| c.contains(k))
}

// ------------------------------------------------------------------ views

fn rfc3339(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
}

/// "3m 12s" style, to the second.
pub fn human_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    pub connected: bool,
    pub role: String,
    pub instance_id: String,
    pub private_ip: String,
    pub public_ip: String,
    pub os_family: String,
    pub app_state: String,
    pub last_heartbeat_at: Option<String>,
    pub last_heartbeat_age_s: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CopyView {
    pub region: String,
    pub image_id: String,
    pub state: String,
    pub attempts: u32,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct BackupView {
    pub image_id: String,
    pub state: String,
    pub fate: String,
    pub quiesce: String,
    pub frozen_ms: u64,
    pub quiesce_note: String,
    pub copies: Vec<CopyView>,
    pub site_id: String,
    pub operation_id: String,
    pub region: String,
    pub instance_id: String,
    pub snapshot_ids: Vec<String>,
    pub consistency: String,
    pub app_state: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub age_s: u64,
}

#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub instance_id: String,
    pub role: String,
    pub reason: String,
    pub operation_id: String,
    pub connected: bool,
    pub private_ip: String,
    pub last_seen_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SiteView {
    pub site_id: String,
    pub region: String,
    pub primary_instance_id: String,
    /// Every known instance of the site, primary first.
    pub instances: Vec<InstanceView>,
    /// What needs a human's attention.
    pub problems: Vec<String>,
    pub agent: Option<AgentView>,
    pub last_backup: Option<BackupView>,
    pub running_operation_id: Option<String>,
    pub schedule: Option<String>,
    pub quiesce: String,
    /// The RPO the schedule promises.
    pub rpo_target_s: Option<u64>,
    /// The current RPO: age of the newest good backup.
    pub rpo_s: Option<u64>,
    pub late: bool,
}

#[derive(Debug, Serialize)]
pub struct StepView {
    pub name: String,
    pub state: String,
    pub attempts: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_s: Option<f64>,
    pub detail: String,
    pub error: String,
    /// The step's machine-readable result.
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct OperationView {
    pub id: String,
    pub kind: String,
    pub site_id: String,
    pub state: String,
    pub error: String,
    pub requested_by: String,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub steps: Vec<StepView>,
}

pub fn backup_view(b: pb::Backup, now: u64) -> BackupView {
    BackupView {
        age_s: now.saturating_sub(b.completed_at_ms) / 1000,
        started_at: rfc3339(b.started_at_ms),
        completed_at: rfc3339(b.completed_at_ms),
        image_id: b.image_id,
        state: b.state,
        fate: b.fate,
        quiesce: b.quiesce,
        frozen_ms: b.frozen_ms,
        quiesce_note: b.quiesce_note,
        copies: b
            .copies
            .into_iter()
            .map(|c| CopyView { region: c.region, image_id: c.image_id, state: c.state, attempts: c.attempts, error: c.error })
            .collect(),
        site_id: b.site_id,
        operation_id: b.operation_id,
        region: b.region,
        instance_id: b.instance_id,
        snapshot_ids: b.snapshot_ids,
        consistency: b.consistency,
        app_state: b.app_state,
    }
}

pub fn site_view(s: pb::SiteStatus, now: u64) -> SiteView {
    let agent = s.facts.map(|f| AgentView {
        connected: s.agent_connected,
        role: s.role.clone(),
        instance_id: f.instance_id,
        private_ip: f.private_ip,
        public_ip: f.public_ip,
        os_family: f.os_family,
        app_state: f.app_state,
        last_heartbeat_at: rfc3339(s.last_heartbeat_ms),
        last_heartbeat_age_s: (s.last_heartbeat_ms > 0).then(|| now.saturating_sub(s.last_heartbeat_ms) / 1000),
    });
    let last_backup = s.last_backup.map(|b| backup_view(b, now));
    let instances = s
        .instances
        .into_iter()
        .map(|i| InstanceView {
            private_ip: i.facts.map(|f| f.private_ip).unwrap_or_default(),
            last_seen_at: rfc3339(i.last_seen_ms),
            instance_id: i.instance_id,
            role: i.role,
            reason: i.reason,
            operation_id: i.operation_id,
            connected: i.connected,
        })
        .collect();
    SiteView {
        instances,
        problems: s.problems,
        rpo_s: last_backup.as_ref().map(|b| b.age_s),
        site_id: s.site_id,
        region: s.region,
        primary_instance_id: s.primary_instance_id,
        agent,
        last_backup,
        running_operation_id: Some(s.running_operation_id).filter(|id| !id.is_empty()),
        schedule: Some(s.schedule).filter(|x| !x.is_empty()),
        quiesce: s.quiesce,
        rpo_target_s: (s.rpo_target_ms > 0).then_some(s.rpo_target_ms / 1000),
        late: s.late,
    }
}

pub fn operation_view(op: pb::Operation) -> OperationView {
    OperationView {
        created_at: rfc3339(op.created_at_ms),
        updated_at: rfc3339(op.updated_at_ms),
        steps: op
            .steps
            .into_iter()
            .map(|s| StepView {
                duration_s: (s.started_at_ms > 0 && s.finished_at_ms >= s.started_at_ms)
                    .then(|| (s.finished_at_ms - s.started_at_ms) as f64 / 1000.0),
                started_at: rfc3339(s.started_at_ms),
                finished_at: rfc3339(s.finished_at_ms),
                result: serde_json::from_str(&s.result_json).ok(),
                name: s.name,
                state: s.state,
                attempts: s.attempts,
                detail: s.detail,
                error: s.error,
            })
            .collect(),
        id: op.id,
        kind: op.kind,
        site_id: op.site_id,
        state: op.state,
        error: op.error,
        requested_by: op.requested_by,
    }
}

// ------------------------------------------------------------------ printing

pub fn print_json<T: Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

pub fn print_status(sites: &[SiteView]) {
    if sites.is_empty() {
        println!("No sites are configured.");
        return;
    }
    println!(
        "{:<20} {:<10} {:<21} {:<16} {:<16} {:<10} {:<12} {}",
        "SITE", "AGENT", "INSTANCE", "PRIVATE IP", "PUBLIC IP", "APP", "HEARTBEAT", "LAST BACKUP"
    );
    for s in sites {
        let (agent, instance, private, public, app, hb) = match &s.agent {
            Some(a) => (
                if a.connected { a.role.clone() } else { "offline".into() },
                a.instance_id.clone(),
                a.private_ip.clone(),
                if a.public_ip.is_empty() { "-".into() } else { a.public_ip.clone() },
                a.app_state.clone(),
                a.last_heartbeat_age_s.map(|s| format!("{} ago", human_duration(s * 1000))).unwrap_or("-".into()),
            ),
            None => ("never".into(), s.primary_instance_id.clone(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let backup = match &s.last_backup {
            Some(b) => format!("{} ({} ago, {})", b.image_id, human_duration(b.age_s * 1000), b.consistency),
            None => "none".into(),
        };
        println!("{:<20} {agent:<10} {instance:<21} {private:<16} {public:<16} {app:<10} {hb:<12} {backup}", s.site_id);
        if let Some(schedule) = &s.schedule {
            let target = s.rpo_target_s.map(|t| human_duration(t * 1000)).unwrap_or_default();
            let now = s.rpo_s.map(|t| human_duration(t * 1000)).unwrap_or_else(|| "no backup yet".into());
            let flag = if s.late { "  LATE" } else { "" };
            println!("{:<20} schedule: {schedule}, quiesce {}; RPO {now} (target {target}){flag}", "", s.quiesce);
        }
        if let Some(op) = &s.running_operation_id {
            println!("{:<20} running: {op}", "");
        }
        for i in s.instances.iter().filter(|i| i.instance_id != s.primary_instance_id) {
            let state = if i.connected { "connected" } else { "offline" };
            let of = if i.operation_id.is_empty() { String::new() } else { format!(" of {}", i.operation_id) };
            println!("{:<20} also: {} {}{of} ({state}){}", "", i.instance_id, i.role, if i.reason.is_empty() { String::new() } else { format!(": {}", i.reason) });
        }
        for p in &s.problems {
            println!("{:<20} ! {p}", "");
        }
    }
}

pub fn print_backups(site: &str, backups: &[BackupView]) {
    if backups.is_empty() {
        println!("Site {site} has no backups yet.");
        return;
    }
    println!(
        "{:<22} {:<25} {:<12} {:<11} {:<8} {:<10} {:<9} {}",
        "AMI", "COMPLETED", "AGE", "CONSISTENCY", "FROZEN", "APP", "STATE", "SNAPSHOTS"
    );
    for b in backups {
        let frozen = if b.frozen_ms > 0 { format!("{:.2}s", b.frozen_ms as f64 / 1000.0) } else { "-".into() };
        println!(
            "{:<22} {:<25} {:<12} {:<11} {:<8} {:<10} {:<9} {}",
            b.image_id,
            b.completed_at.clone().unwrap_or_default(),
            human_duration(b.age_s * 1000),
            b.consistency,
            frozen,
            b.app_state,
            b.state,
            b.snapshot_ids.join(",")
        );
        for c in &b.copies {
            let err = if c.error.is_empty() { String::new() } else { format!(" ({}, attempt {})", c.error, c.attempts) };
            println!("{:<22} copy in {}: {} {}{err}", "", c.region, if c.image_id.is_empty() { "-" } else { &c.image_id }, c.state);
        }
        if !b.quiesce_note.is_empty() {
            println!("{:<22} quiesce {}: {}", "", b.quiesce, b.quiesce_note);
        }
        if !b.fate.is_empty() {
            println!("{:<22} retention: {}", "", b.fate);
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DecisionView {
    pub image_id: String,
    pub completed_at: Option<String>,
    pub action: &'static str,
    pub reason: String,
}

pub fn decision_views(reply: pb::PruneReply) -> Vec<DecisionView> {
    reply
        .decisions
        .into_iter()
        .map(|d| DecisionView {
            completed_at: rfc3339(d.completed_at_ms),
            action: if d.keep { "keep" } else { "delete" },
            image_id: d.image_id,
            reason: d.reason,
        })
        .collect()
}

pub fn print_prune(site: &str, dry_run: bool, decisions: &[DecisionView]) {
    let verb = if dry_run { "would" } else { "did" };
    println!("Retention of {site} ({}):", if dry_run { "dry run, nothing changed" } else { "applied" });
    for d in decisions {
        let action = if d.action == "keep" { "keep".to_owned() } else { format!("{verb} delete") };
        println!("  {:<22} {:<13} {}", d.image_id, action, d.reason);
    }
}

pub fn print_operation(op: &OperationView) {
    println!("Operation {} ({} of site {})", op.id, op.kind, op.site_id);
    println!("  state:        {}", op.state);
    if !op.error.is_empty() {
        println!("  error:        {}", op.error);
    }
    println!("  requested by: {}", op.requested_by);
    println!("  created:      {}", op.created_at.clone().unwrap_or_default());
    println!("  steps:");
    for s in &op.steps {
        let took = s.duration_s.map(|d| format!("{d:.1}s")).unwrap_or_default();
        let text = if s.error.is_empty() { s.detail.clone() } else { s.error.clone() };
        println!("    {:<16} {:<8} {:>7}  {}", s.name, s.state, took, text);
    }
}

/// Follows an operation until it finishes, printing each step as it starts,
/// progresses and ends, with the time elapsed since the watch began, plus a
/// "still waiting" line when nothing happened for a while. Returns the final
/// state.
pub async fn watch(
    conn: &Connection,
    client: &mut AdminServiceClient<Channel>,
    id: &str,
    output: Output,
) -> Result<pb::Operation, CliError> {
    let mut stream = client
        .watch_operation(pb::OperationRef { operation_id: id.to_owned() })
        .await
        .map_err(|s| conn.status_error(s))?
        .into_inner();
    let start = tokio::time::Instant::now();
    let mut seen: std::collections::HashMap<String, (String, String)> = Default::default();
    let mut last: Option<pb::Operation> = None;
    let mut last_print = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.tick().await;
    let eprint = |line: String| {
        if output == Output::Text {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    loop {
        tokio::select! {
            next = stream.next() => {
                let op = match next {
                    Some(Ok(op)) => op,
                    Some(Err(s)) => return Err(conn.status_error(s)),
                    None => break,
                };
                let t = start.elapsed().as_secs_f64();
                for s in &op.steps {
                    let key = (s.state.clone(), s.detail.clone());
                    if s.state != "pending" && seen.get(&s.name) != Some(&key) {
                        let text = if s.error.is_empty() { &s.detail } else { &s.error };
                        eprint(format!("[{t:>6.1}s] {:<16} {:<8} {}", s.name, s.state, text));
                        seen.insert(s.name.clone(), key);
                        last_print = tokio::time::Instant::now();
                    }
                }
                let finished = op.state != "running";
                last = Some(op);
                if finished {
                    break;
                }
            }
            _ = ticker.tick() => {
                if last_print.elapsed() >= Duration::from_secs(10) {
                    let step = last.as_ref().and_then(|op| op.steps.iter().find(|s| s.state == "running")).map(|s| s.name.clone()).unwrap_or_else(|| "starting".into());
                    eprint(format!("[{:>6.1}s] {step:<16} still running ({} so far)", start.elapsed().as_secs_f64(), human_duration(start.elapsed().as_millis() as u64)));
                    last_print = tokio::time::Instant::now();
                }
            }
        }
    }
    last.ok_or_else(|| CliError::Failed(format!("the controller ended the watch of {id} without an answer")))
}
