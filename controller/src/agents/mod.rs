//! Agents: the `AgentService.Session` stream ([`service`]), the registry of
//! live sessions the workflows send commands through, and the batched EC2
//! verification of the instances agents claim to run on ([`verify`]).
//!
//! Invariants:
//! - a stream is accepted only from a certificate with a site identity of
//!   our trust domain, for a configured site, whose Hello names that site;
//! - sessions are keyed by (site, instance id): every AMI carries the site's
//!   certificate, so a restored copy, a drill or a spare connects beside the
//!   primary without evicting it; a newer session of the same instance
//!   replaces the older one (a reconnect);
//! - the store decides each instance's role ([`role_of`]); the Welcome
//!   never waits on EC2: an instance not verified recently is welcomed as
//!   `pending` and gets its role by a `RoleChange` once a batched
//!   DescribeInstances confirmed it. A failing or throttled EC2 never
//!   demotes anyone: the check is retried;
//! - a command is addressed to (site, instance, role); the registry refuses
//!   to send it to another role, and the agent refuses it too.
//!
//! Generated protobuf types are converted here and in [`service`] only.

pub mod enrol;
pub mod refusals;
pub mod service;
pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dr_proto::contract::{
    AddressChange, CleanupParams, ContractError, FreezeParams, HostnameParams, Request, RewriteParams, TypedReport, parse_report,
};
use dr_proto::pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::domain::model::{InstanceRecord, Millis, Role, Site, now_ms};
use crate::engine::{ErrorKind, StepError};

/// How long an EC2 confirmation of an instance (its id and private IP)
/// stays good: a reconnect within it gets its role at once.
pub const VERIFIED_FOR: Duration = Duration::from_secs(24 * 3600);

/// A step the controller may ask an agent to perform (domain side of
/// `pb::Command`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAction {
    /// Read the Replicated app's state. No precondition; changes nothing.
    AppStatus,
    /// Stop the app and wait until it is stopped (quiesce `stop`).
    AppStop,
    /// Start the app and wait until it is started (undo of `AppStop`).
    AppStart,
    /// Freeze the agent's configured data file systems; a watchdog on the
    /// machine thaws them after `deadline` whatever happens.
    Freeze { deadline: Duration },
    /// Thaw what `Freeze` froze; "already thawed" is success.
    Thaw,
    /// Drain Nomad builders, waiting at most `deadline` for running work.
    Drain { deadline: Duration },
    /// End the drain the agent made; idempotent.
    Undrain,
    /// Restore runbook: replace addresses (old, new) in the Replicated
    /// files (values only, token-exact). Precondition on the agent: the files
    /// parse; nothing is written otherwise.
    RewriteAddresses { private: Vec<(String, String)>, public: Vec<(String, String)> },
    /// Restore runbook: set the app's hostname setting (only if it differs).
    SetHostname { hostname: String },
    /// Restore runbook: empty the Nomad data dir. Refused by the agent unless
    /// the app is stopped and no Nomad process runs.
    WipeNomad,
    /// Restore runbook: delete the builds that were running before
    /// `before_ms` (the backup's point in time), in one console session.
    CleanupBuilds { before_ms: u64 },
    /// GET the frontend's health check from the machine. Read-only.
    HealthCheck,
}

/// Why an agent did not succeed: the contract's one error kind (the
/// agent's, the wire's `pb::ErrorKind` through its one mapping).
pub use dr_proto::contract::ErrorKind as AgentErrorKind;

/// What an agent answered (domain side of `pb::CommandResult`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentOutcome {
    /// The step asked (`app_stop`, ...: the contract's [`Request::name`]).
    pub step: &'static str,
    pub ok: bool,
    pub error: String,
    pub kind: Option<AgentErrorKind>,
    /// The answer came from the agent's journal: the command had already run.
    pub replayed: bool,
    pub detail: AgentDetail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentDetail {
    None,
    AppStatus {
        state: String,
        is_transitioning: bool,
        desired_state: String,
    },
    /// A step's report, as the agent wrote it (JSON text): read it with
    /// [`AgentOutcome::report`], typed by the contract.
    Report(String),
}

impl AgentOutcome {
    /// The step's report, typed by the contract. An answer without it, or
    /// one that does not parse (a field renamed or removed on one side),
    /// is an error naming the step and the field: never a silent null.
    pub fn report<R: TypedReport>(&self) -> Result<R, ContractError> {
        match &self.detail {
            AgentDetail::Report(json) => parse_report(self.step, json),
            _ => parse_report(self.step, ""),
        }
    }

    /// The report as the agent sent it, as a JSON value, to be recorded
    /// whole (a step's result, a failover's reports): `{}` when it sent
    /// none, a JSON string when it is not JSON. Read fields with
    /// [`AgentOutcome::report`], never by key from this.
    pub fn report_json(&self) -> serde_json::Value {
        match &self.detail {
            AgentDetail::Report(json) => serde_json::from_str(json).unwrap_or_else(|_| serde_json::Value::String(json.clone())),
            _ => serde_json::json!({}),
        }
    }
}

impl From<ContractError> for StepError {
    /// An agent's answer the controller cannot read fails the step with
    /// the contract error's message (shown by `drctl operation`).
    fn from(e: ContractError) -> Self {
        StepError::new(ErrorKind::Failed, e.to_string())
    }
}

impl From<AgentErrorKind> for ErrorKind {
    /// The engine's view of an agent's error kind, for retry policies.
    fn from(k: AgentErrorKind) -> ErrorKind {
        match k {
            AgentErrorKind::Invalid => ErrorKind::Invalid,
            AgentErrorKind::Refused => ErrorKind::Refused,
            AgentErrorKind::Failed => ErrorKind::Failed,
            AgentErrorKind::Interrupted => ErrorKind::Interrupted,
            AgentErrorKind::TimedOut => ErrorKind::TimedOut,
            AgentErrorKind::NotSupported => ErrorKind::NotSupported,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("the agent of {0} is not connected")]
    NotConnected(String),
    #[error("the agent of {who} is {role}, not {wanted}: {reason}")]
    WrongRole { who: String, role: String, wanted: String, reason: String },
    #[error("the agent of {0} disconnected before answering")]
    Disconnected(String),
    #[error("the agent of {who} did not answer within {after:?}")]
    Timeout { who: String, after: Duration },
    /// This controller no longer leads: nothing is sent.
    #[error("not sent to the agent of {who}: {why}")]
    NotLeader { who: String, why: String },
}

impl From<AgentCallError> for StepError {
    fn from(e: AgentCallError) -> Self {
        let kind = match e {
            AgentCallError::WrongRole { .. } => ErrorKind::Refused,
            AgentCallError::Timeout { .. } => ErrorKind::TimedOut,
            AgentCallError::NotLeader { .. } => ErrorKind::Store,
            _ => ErrorKind::Unavailable,
        };
        StepError::new(kind, e.to_string())
    }
}

/// Whom a command is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressee {
    pub site_id: String,
    pub instance_id: String,
    pub role: Role,
}

impl Addressee {
    /// The site's primary, as the store names it.
    pub fn primary(site: &Site) -> Addressee {
        Addressee { site_id: site.id.clone(), instance_id: site.primary_instance_id.clone(), role: Role::Primary }
    }
    fn who(&self) -> String {
        format!("site `{}` instance {}", self.site_id, self.instance_id)
    }
}

/// The role the store gives an instance of `site`: the primary is whatever
/// the site names; other instances carry their recorded role.
pub fn role_of(site: &Site, instance_id: &str, rec: Option<&InstanceRecord>) -> Role {
    let recorded = rec.and_then(|r| Role::from_parts(&r.role, &r.operation_id, &r.reason));
    // A failover fences the old primary before it names the new one: from
    // then on it gets no work even while the site still names it.
    if let Some(fenced @ Role::Fenced { .. }) = recorded {
        return fenced;
    }
    if instance_id == site.primary_instance_id {
        return Role::Primary;
    }
    match recorded {
        Some(r @ (Role::Candidate { .. } | Role::Drill { .. } | Role::Spare | Role::Fenced { .. })) => r,
        _ => Role::Passive { reason: format!("instance {instance_id} is not the site's primary {}", site.primary_instance_id) },
    }
}

/// Whether a role needs an EC2 confirmation before the agent gets work.
pub fn needs_verification(role: &Role) -> bool {
    role.takes_work()
}

/// Whether the record says EC2 confirmed this instance with this private IP
/// recently enough.
pub fn recently_verified(rec: Option<&InstanceRecord>, private_ip: &str, now: Millis) -> bool {
    rec.is_some_and(|r| {
        r.verified_at_ms > 0
            && r.verified_private_ip == private_ip
            && now.saturating_sub(r.verified_at_ms) < VERIFIED_FOR.as_millis() as u64
    })
}

pub(crate) fn role_to_pb(role: &Role) -> (String, String, String) {
    (role.name().to_owned(), role.reason().to_owned(), role.operation_id().to_owned())
}

impl AgentAction {
    /// The contract's typed request. Addresses that are not IP pairs of
    /// one family cannot be typed: the agent would refuse them, so the
    /// command is answered `invalid` here without being sent.
    pub fn request(&self) -> Result<Request, String> {
        Ok(match self {
            AgentAction::AppStatus => Request::AppStatus,
            AgentAction::AppStop => Request::AppStop { force: false },
            AgentAction::AppStart => Request::AppStart,
            AgentAction::Freeze { deadline } => Request::Freeze(FreezeParams { mounts: vec![], deadline: *deadline }),
            AgentAction::Thaw => Request::Thaw,
            AgentAction::Drain { deadline } => Request::Drain { deadline: *deadline },
            AgentAction::Undrain => Request::Undrain,
            AgentAction::RewriteAddresses { private, public } => {
                let pairs = |v: &[(String, String)], flag: &str| -> Result<Vec<AddressChange>, String> {
                    v.iter().map(|(o, n)| AddressChange::parse(flag, &format!("{o}={n}")).map_err(|e| e.to_string())).collect()
                };
                Request::RewriteAddresses {
                    params: RewriteParams { private: pairs(private, "private")?, public: pairs(public, "public")? },
                    dry_run: false,
                }
            }
            AgentAction::SetHostname { hostname } => {
                Request::SetHostname { params: HostnameParams { hostname: hostname.clone() }, dry_run: false }
            }
            AgentAction::WipeNomad => Request::WipeNomad { dry_run: false },
            AgentAction::HealthCheck => Request::HealthCheck,
            AgentAction::CleanupBuilds { before_ms } => Request::CleanupBuilds {
                params: CleanupParams {
                    before: humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(*before_ms)).to_string(),
                },
                dry_run: false,
            },
        })
    }

    /// The step's name in the contract (`app_stop`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            AgentAction::AppStatus => "app_status",
            AgentAction::AppStop => "app_stop",
            AgentAction::AppStart => "app_start",
            AgentAction::Freeze { .. } => "freeze",
            AgentAction::Thaw => "thaw",
            AgentAction::Drain { .. } => "drain",
            AgentAction::Undrain => "undrain",
            AgentAction::RewriteAddresses { .. } => "rewrite_addresses",
            AgentAction::SetHostname { .. } => "set_hostname",
            AgentAction::WipeNomad => "wipe_nomad",
            AgentAction::CleanupBuilds { .. } => "cleanup_builds",
            AgentAction::HealthCheck => "health_check",
        }
    }
}

fn command_to_pb(id: &str, to: &Addressee, request: &Request, deadline: Duration) -> pb::Command {
    let ms = |d: &Duration| d.as_millis().min(u32::MAX as u128) as u32;
    let (role, _, operation_id) = role_to_pb(&to.role);
    pb::Command {
        id: id.to_owned(),
        deadline_ms: ms(&deadline),
        target: Some(pb::Target { instance_id: to.instance_id.clone(), role, operation_id }),
        kind: Some(request.to_pb()),
    }
}

fn outcome_from_pb(r: pb::CommandResult) -> AgentOutcome {
    let kind = if r.ok { None } else { Some(AgentErrorKind::from_wire(r.error_kind).unwrap_or(AgentErrorKind::Failed)) };
    let detail = match r.detail {
        Some(pb::command_result::Detail::AppStatus(s)) => {
            AgentDetail::AppStatus { state: s.state, is_transitioning: s.is_transitioning, desired_state: s.desired_state }
        }
        None if !r.report_json.is_empty() => AgentDetail::Report(r.report_json),
        None => AgentDetail::None,
    };
    // The step is named by the caller, which knows what it asked.
    AgentOutcome { step: "", ok: r.ok, error: r.error, kind, replayed: r.replayed, detail }
}

pub(crate) type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;
type Pending = Arc<Mutex<HashMap<String, Vec<oneshot::Sender<AgentOutcome>>>>>;

struct Session {
    serial: u64,
    tx: Outbound,
    pending: Pending,
    role: Role,
    record: InstanceRecord,
    /// The serial of the certificate the stream was opened with.
    cert_serial: String,
    /// How its instance proved itself (`enrol::BY_DOCUMENT`, ...).
    attestation: String,
    /// The certificate chain the stream was opened with (which CA it
    /// chains to, in a rotation).
    chain: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
}

type Key = (String, String);

/// The live sessions, by (site, instance id).
#[derive(Clone, Default)]
pub struct Registry {
    sessions: Arc<Mutex<HashMap<Key, Session>>>,
    serial: Arc<AtomicU64>,
    refusals: refusals::Refusals,
    /// Commands are sent only while this replica leads (set at start).
    leadership: Arc<std::sync::OnceLock<crate::store::lease::Leadership>>,
}

/// A live view of one agent.
#[derive(Clone, Debug)]
pub struct LiveAgent {
    pub record: InstanceRecord,
    pub role: Role,
    pub cert_serial: String,
    pub attestation: String,
}

impl Registry {
    /// From now on a command is sent only while `leadership` says this
    /// replica leads (a deposed leader that wakes up sends nothing).
    pub fn send_only_while(&self, leadership: crate::store::lease::Leadership) {
        let _ = self.leadership.set(leadership);
    }

    /// The agents refused (TLS handshake or stream), in this process.
    pub fn refusals(&self) -> &refusals::Refusals {
        &self.refusals
    }

    /// The site's most recent refusal in this process: an agent of the site
    /// tried and was refused (its certificate expired, ...). For the health
    /// evidence: `refusal.agent_line(now)` says `agent: refused
    /// (certificate expired 3 days ago)`.
    pub fn refusal(&self, site: &str) -> Option<crate::domain::refusal::AgentRefusal> {
        self.refusals.latest(site)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn live(&self, site: &str, instance: &str) -> Option<LiveAgent> {
        self.lock().get(&(site.to_owned(), instance.to_owned())).map(|s| LiveAgent {
            record: s.record.clone(),
            role: s.role.clone(),
            cert_serial: s.cert_serial.clone(),
            attestation: s.attestation.clone(),
        })
    }

    /// Every live session, by site: one pass under the lock (status of a
    /// whole fleet reads it once, not once per site).
    pub fn live_by_site(&self) -> HashMap<String, Vec<LiveAgent>> {
        let mut out: HashMap<String, Vec<LiveAgent>> = HashMap::new();
        for ((site, _), s) in self.lock().iter() {
            out.entry(site.clone()).or_default().push(LiveAgent {
                record: s.record.clone(),
                role: s.role.clone(),
                cert_serial: s.cert_serial.clone(),
                attestation: s.attestation.clone(),
            });
        }
        out
    }

    /// Live sessions and their last message, for the liveness flush.
    pub fn seen(&self) -> Vec<(String, String, Millis)> {
        self.lock().iter().map(|((site, inst), s)| (site.clone(), inst.clone(), s.record.last_seen_ms)).collect()
    }

    /// Live sessions by role name (metrics, benchmarks).
    pub fn counts(&self) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        for s in self.lock().values() {
            *out.entry(s.role.name()).or_default() += 1;
        }
        out
    }

    /// Changes a connected instance's role and tells its agent. Returns
    /// false when it is not connected (it gets the role at its next Hello).
    pub fn set_role(&self, site: &str, instance: &str, role: Role) -> bool {
        let mut sessions = self.lock();
        let Some(s) = sessions.get_mut(&(site.to_owned(), instance.to_owned())) else { return false };
        if s.role == role {
            return true;
        }
        tracing::info!(site, instance, from = s.role.name(), to = role.name(), reason = role.reason(), "role changed");
        let (name, reason, operation_id) = role_to_pb(&role);
        s.role = role;
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::RoleChange(pb::RoleChange { role: name, reason, operation_id })),
        };
        if s.tx.try_send(Ok(msg)).is_err() {
            tracing::warn!(site, instance, "cannot send the role change now (stream full or closed); the agent gets it at its next Hello");
        }
        true
    }

    /// Sends a command and waits for its result. Calling again with the same
    /// id (after a disconnect or a controller restart) is safe: the agent
    /// answers from its journal without running the step again.
    pub async fn call(&self, to: &Addressee, id: &str, action: &AgentAction, timeout: Duration) -> Result<AgentOutcome, AgentCallError> {
        if let Some(Err(e)) = self.leadership.get().map(|l| l.check()) {
            return Err(AgentCallError::NotLeader { who: to.who(), why: e.to_string() });
        }
        let (tx, pending, rx, request) = {
            let sessions = self.lock();
            let s = sessions.get(&(to.site_id.clone(), to.instance_id.clone())).ok_or_else(|| AgentCallError::NotConnected(to.who()))?;
            if s.role != to.role {
                return Err(AgentCallError::WrongRole {
                    who: to.who(),
                    role: s.role.name().into(),
                    wanted: to.role.name().into(),
                    reason: match &s.role {
                        Role::Pending => "not confirmed by EC2 yet".into(),
                        other => other.reason().to_owned(),
                    },
                });
            }
            // What the agent would refuse untyped is answered here, unsent.
            let request = match action.request() {
                Ok(r) => r,
                Err(why) => {
                    return Ok(AgentOutcome {
                        step: action.name(),
                        ok: false,
                        error: format!("invalid command: {why}; not run"),
                        kind: Some(AgentErrorKind::Invalid),
                        replayed: false,
                        detail: AgentDetail::None,
                    });
                }
            };
            let (otx, orx) = oneshot::channel();
            s.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_owned()).or_default().push(otx);
            (s.tx.clone(), s.pending.clone(), orx, request)
        };
        let msg = pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Command(command_to_pb(id, to, &request, timeout))) };
        let forget = || {
            pending.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        };
        if tx.send(Ok(msg)).await.is_err() {
            forget();
            return Err(AgentCallError::Disconnected(to.who()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => Ok(AgentOutcome { step: action.name(), ..outcome }),
            Ok(Err(_)) => Err(AgentCallError::Disconnected(to.who())),
            Err(_) => {
                forget();
                Err(AgentCallError::Timeout { who: to.who(), after: timeout })
            }
        }
    }

    /// Ends every stream (controller shutdown).
    pub fn close_all(&self) {
        self.lock().clear();
    }

    /// Sends `bundle` to every live session (a CA rotation's new phase).
    /// Returns how many were sent it.
    pub fn push_trust(&self, trust: &enrol::TrustState) -> usize {
        let sessions = self.lock();
        let bundle = pb::TrustBundle { id: trust.id.clone(), roots_pem: trust.roots_pem.clone(), renew_now: trust.renew_now };
        let msg = pb::ControllerMessage { msg: Some(pb::controller_message::Msg::TrustBundle(bundle)) };
        sessions.values().filter(|s| s.chain.is_some() && s.tx.try_send(Ok(msg.clone())).is_ok()).count()
    }

    /// (site, instance, chain) of every live session opened with a certificate.
    pub fn chains(&self) -> Vec<(String, String, Arc<Vec<rustls::pki_types::CertificateDer<'static>>>)> {
        self.lock().iter().filter_map(|((site, inst), s)| s.chain.clone().map(|c| (site.clone(), inst.clone(), c))).collect()
    }

    /// Ends the streams of `site` opened with certificate `serial` (every
    /// stream of the site when None): a revocation. Returns how many.
    pub fn close_revoked(&self, site: &str, serial: Option<&str>) -> usize {
        let mut sessions = self.lock();
        let before = sessions.len();
        sessions.retain(|(s, _), session| !(s == site && serial.is_none_or(|x| session.cert_serial == x)));
        before - sessions.len()
    }

    fn register(&self, session: Session) -> u64 {
        let key = (session.record.site_id.clone(), session.record.instance_id.clone());
        let serial = session.serial;
        if let Some(old) = self.lock().insert(key.clone(), session) {
            tracing::info!(site = %key.0, instance = %key.1, old_session = old.serial, "a newer session of this instance replaces the old one");
        }
        serial
    }

    fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes the session if it is still the registered one.
    fn unregister(&self, site: &str, instance: &str, serial: u64) -> Option<InstanceRecord> {
        let mut sessions = self.lock();
        let key = (site.to_owned(), instance.to_owned());
        if sessions.get(&key).is_some_and(|s| s.serial == serial) {
            return sessions.remove(&key).map(|s| s.record);
        }
        None
    }

    fn touch(&self, site: &str, instance: &str, serial: u64, app_state: Option<String>) {
        if let Some(s) = self.lock().get_mut(&(site.to_owned(), instance.to_owned())).filter(|s| s.serial == serial) {
            s.record.last_seen_ms = now_ms();
            if let Some(state) = app_state {
                s.record.facts.app_state = state;
            }
        }
    }

    fn answer(&self, site: &str, instance: &str, serial: u64, result: pb::CommandResult) {
        let pending = match self.lock().get(&(site.to_owned(), instance.to_owned())).filter(|s| s.serial == serial) {
            Some(s) => s.pending.clone(),
            None => return,
        };
        let waiters = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&result.id);
        let outcome = outcome_from_pb(result);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(outcome.clone());
        }
    }
}

/// Writes every live session's last-seen time to the store, every `every`,
/// so that after a controller restart "recently seen" means seen.
pub async fn flush_liveness(store: crate::store::Store, registry: Registry, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let seen = registry.seen();
        if seen.is_empty() {
            continue;
        }
        if let Err(e) = store.touch_seen(seen).await {
            tracing::warn!(error = %e, "cannot persist agent liveness");
        }
    }
}

/// Sessions without a network stream: the test kit's fake agent, and the
/// health benchmark's fleet of agents.
impl Registry {
    /// Registers a session for `record` with `role`; what the controller
    /// sends to it arrives on the returned receiver.
    pub fn attach(&self, record: InstanceRecord, role: Role) -> (u64, mpsc::Receiver<Result<pb::ControllerMessage, Status>>) {
        let (tx, rx) = mpsc::channel(64);
        let serial = self.next_serial();
        self.register(Session {
            serial,
            tx,
            pending: Pending::default(),
            role,
            record,
            cert_serial: String::new(),
            attestation: String::new(),
            chain: None,
        });
        (serial, rx)
    }
}

#[cfg(test)]
impl Registry {
    /// Delivers a command's result from an attached session.
    pub fn deliver(&self, site: &str, instance: &str, serial: u64, result: pb::CommandResult) {
        self.answer(site, instance, serial, result);
    }
}
