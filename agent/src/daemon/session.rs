//! The long-lived gRPC session with the controller. This is the only module
//! that knows the generated protobuf types: it converts them to and from the
//! domain types of [`crate::steps`], [`crate::sys::facts`] and [`crate::daemon::journal`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dr_proto::pb;
use dr_proto::pb::agent_message::Msg as AgentMsg;
use dr_proto::pb::controller_message::Msg as ControllerMsg;
use dr_proto::tls::TlsFiles;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{Config, ControllerTarget, RunSettings};
use crate::daemon::credentials::{self, Held};
use crate::daemon::fence::{self, FenceRecord};
use crate::daemon::journal::{self, CommandAnswer, Journal, JournalError};
use crate::steps::{Action, ErrorKind, Executor, Outcome};
use crate::sys::facts::{self, FactsError, InstanceFacts};
use crate::sys::imds::{ImdsClient, ImdsError};
use dr_proto::backoff::Backoff;
use dr_proto::contract::Request;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats (or kernel keep-alive probes) unacknowledged by the
/// controller's kernel this long end the connection (`TCP_USER_TIMEOUT`):
/// a controller gone without a reset is noticed within it.
pub(crate) const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the stream to open and for the Welcome.
pub(crate) const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
pub(crate) const MAX_HEARTBEAT: Duration = Duration::from_secs(300);
/// Used when a Welcome leaves the interval unset (0).
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
const OUTGOING_CAPACITY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("gathering instance facts: {0}")]
    Facts(#[from] FactsError),
    #[error("TLS material: {0}")]
    Tls(#[from] dr_proto::tls::TlsError),
    #[error("controller endpoint: {0}")]
    Endpoint(String),
    #[error("connecting to the controller: {0}")]
    Connect(String),
    #[error("controller answered {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(tonic::Status),
    #[error("no {0} within {WELCOME_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the controller ended the stream")]
    Ended,
    #[error("credentials: {0}")]
    Credentials(#[from] crate::daemon::credentials::CredentialsError),
    #[error("enrolment refused by the controller: {0}")]
    Enrol(String),
    #[error("switching to the renewed certificate")]
    Renewed,
}

impl SessionError {
    /// The leader's address and when its lease ends, when a standby answered.
    fn leader(&self) -> Option<(String, Duration)> {
        match self {
            SessionError::Status(s) if s.code() == tonic::Code::Unavailable => {
                let m = s.metadata();
                let leader = m.get(dr_proto::LEADER_METADATA).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty())?;
                let retry_ms =
                    m.get(dr_proto::RETRY_AFTER_METADATA).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
                Some((leader.to_owned(), Duration::from_millis(retry_ms)))
            }
            _ => None,
        }
    }

    /// No controller to talk to at this address (down, or a standby).
    fn is_unreachable(&self) -> bool {
        match self {
            SessionError::Connect(_) | SessionError::Timeout(_) => true,
            SessionError::Status(s) => s.code() == tonic::Code::Unavailable,
            _ => false,
        }
    }

    /// The controller refused the certificate itself (this serial revoked,
    /// superseded, never issued by it): holding on to it cannot work. A
    /// whole site revoked is not about the certificate: it is kept.
    pub fn certificate_unusable(&self) -> bool {
        matches!(self, SessionError::Status(s) if s.code() == tonic::Code::PermissionDenied
            && ((s.message().starts_with("certificate ") && s.message().contains(" is revoked"))
                || ["was superseded", "never enrolled"].iter().any(|m| s.message().contains(m))))
    }

    /// The controller refused this agent's identity or site.
    pub fn is_permission(&self) -> bool {
        matches!(self, SessionError::Status(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What the controller says this instance is. Several instances of one
/// site are normal (every AMI carries the site's certificate); the
/// controller decides each one's role and may change it while connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The site's services machine.
    Primary,
    /// Launched by restore/failover operation `.0`; only its commands.
    Candidate(String),
    /// A drill copy of drill operation `.0`; only its commands.
    Drill(String),
    /// A hot spare.
    Spare,
    /// Not verified yet: no work until a role follows.
    Pending,
    /// A stray copy or unverifiable: no work; the reason says why.
    Passive(String),
    /// An old primary that must never act again: no work.
    Fenced(String),
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Candidate(_) => "candidate",
            Role::Drill(_) => "drill",
            Role::Spare => "spare",
            Role::Pending => "pending",
            Role::Passive(_) => "passive",
            Role::Fenced(_) => "fenced",
        }
    }

    /// The operation a candidate or drill copy belongs to.
    pub fn operation_id(&self) -> &str {
        match self {
            Role::Candidate(op) | Role::Drill(op) => op,
            _ => "",
        }
    }

    /// Whether this role may be given work at all.
    pub fn takes_work(&self) -> bool {
        matches!(self, Role::Primary | Role::Candidate(_) | Role::Drill(_) | Role::Spare)
    }

    fn from_wire(role: &str, reason: &str, operation_id: &str) -> Role {
        match role {
            "primary" => Role::Primary,
            "candidate" if !operation_id.is_empty() => Role::Candidate(operation_id.to_owned()),
            "drill" if !operation_id.is_empty() => Role::Drill(operation_id.to_owned()),
            "spare" => Role::Spare,
            "pending" => Role::Pending,
            "passive" => Role::Passive(reason.to_owned()),
            "fenced" => Role::Fenced(reason.to_owned()),
            other => Role::Passive(format!("unknown role `{other}` (treated as passive): {reason}")),
        }
    }
}

/// A Welcome, in domain terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub heartbeat_interval: Duration,
    pub role: Role,
    pub reason: String,
}

/// Whom a command is for (domain side of `pb::Target`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub instance_id: String,
    pub role: String,
    pub operation_id: String,
}

/// A Command, in domain terms.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CommandRequest {
    pub id: String,
    pub action: Action,
    pub deadline: Option<Duration>,
    /// None only from controllers that predate roles.
    pub target: Option<Target>,
}

/// Why this instance must not run a command, or None when it may.
pub(crate) fn refusal(role: &Role, own_instance: &str, target: Option<&Target>) -> Option<String> {
    if !role.takes_work() {
        return Some(format!("this instance is {}: it gets no work", role.as_str()));
    }
    let Some(t) = target else {
        return (*role != Role::Primary)
            .then(|| format!("a command without a target is only for the primary; this instance is {}", role.as_str()));
    };
    if t.instance_id != own_instance {
        return Some(format!("the command is for instance {}, this is {own_instance}", t.instance_id));
    }
    if t.role != role.as_str() || t.operation_id != role.operation_id() {
        return Some(format!(
            "the command is for role {}{}, this instance is {}{}",
            t.role,
            if t.operation_id.is_empty() { String::new() } else { format!(" of {}", t.operation_id) },
            role.as_str(),
            if role.operation_id().is_empty() { String::new() } else { format!(" of {}", role.operation_id()) },
        ));
    }
    None
}

// ------------------------------------------------------------ conversions

pub(crate) fn welcome_from_pb(w: &pb::Welcome) -> Welcome {
    let heartbeat_interval = match w.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT),
    };
    Welcome { heartbeat_interval, role: Role::from_wire(&w.role, &w.reason, &w.operation_id), reason: w.reason.clone() }
}

pub(crate) fn role_change_from_pb(r: &pb::RoleChange) -> Role {
    Role::from_wire(&r.role, &r.reason, &r.operation_id)
}

/// A wire command, or the error answer to send for it.
#[allow(clippy::result_large_err)] // built once per command; boxing buys nothing
pub(crate) fn command_from_pb(c: pb::Command) -> Result<CommandRequest, CommandAnswer> {
    let deadline = (c.deadline_ms > 0).then(|| Duration::from_millis(u64::from(c.deadline_ms)));
    let action = match c.kind {
        Some(kind) => action_from_pb(kind)
            .map_err(|why| CommandAnswer::rejected(&c.id, ErrorKind::Invalid, format!("invalid command: {why}; not run")))?,
        None => {
            return Err(CommandAnswer::rejected(
                &c.id,
                ErrorKind::NotSupported,
                format!("unknown or empty command kind: agent {} does not know it; not run", env!("CARGO_PKG_VERSION")),
            ));
        }
    };
    let target = c.target.map(|t| Target { instance_id: t.instance_id, role: t.role, operation_id: t.operation_id });
    Ok(CommandRequest { id: c.id, action, deadline, target })
}

/// Converts and validates a wire request into a typed action (the
/// contract's [`Request::from_pb`], then the agent's own checks). Anything
/// malformed is refused before any step runs.
fn action_from_pb(kind: pb::command::Kind) -> Result<Action, String> {
    let request = Request::from_pb(kind).map_err(|e| e.to_string())?;
    if let Request::SetHostname { params, .. } = &request {
        crate::steps::app::validate_hostname(&params.hostname).map_err(|e| e.to_string())?;
    }
    Ok(Action::from(request))
}

pub(crate) fn answer_to_pb(a: CommandAnswer) -> pb::CommandResult {
    pb::CommandResult {
        id: a.id,
        ok: a.ok,
        error: a.error,
        error_kind: ErrorKind::to_wire(a.kind),
        replayed: a.replayed,
        started_at_ms: a.started_at_ms,
        finished_at_ms: a.finished_at_ms,
        report_json: match &a.outcome {
            Some(Outcome::Report { report }) => report.to_string(),
            _ => String::new(),
        },
        detail: a.outcome.and_then(|o| match o {
            Outcome::AppStatus(s) => Some(pb::command_result::Detail::AppStatus(pb::AppStatusResult {
                state: s.state,
                is_transitioning: s.is_transitioning,
                desired_state: s.desired_state,
            })),
            Outcome::Report { .. } => None,
        }),
    }
}

pub(crate) fn facts_to_pb(f: InstanceFacts) -> pb::InstanceFacts {
    pb::InstanceFacts {
        instance_id: f.instance_id,
        private_ip: f.private_ip,
        public_ip: f.public_ip,
        boot_id: f.boot_id,
        os_family: f.os_family.as_str().to_owned(),
        app_state: f.app_state,
    }
}

// ------------------------------------------------------------ the agent

/// Everything the daemon needs, built once.
#[derive(Debug)]
pub(crate) struct Agent {
    settings: RunSettings,
    tls: TlsFiles,
    root: PathBuf,
    imds: ImdsClient,
    executor: Executor,
    journal: Journal,
    reconnect: (Duration, Duration),
    app_state: Mutex<String>,
    refreshing: AtomicBool,
    state_dir: PathBuf,
    /// The fence in force on this machine (see [`crate::daemon::fence`]); the
    /// keeper task watches it.
    fence: tokio::sync::watch::Sender<Option<FenceRecord>>,
    /// Poked when a heartbeat's app state shows a fenced app not stopped.
    fence_poke: tokio::sync::Notify,
    /// The last Welcome's heartbeat interval (ms): how often the keeper
    /// looks by itself.
    heartbeat_ms: AtomicU64,
    /// The instance's own certificate (`state_dir/credentials`).
    creds: credentials::Store,
    token_file: Option<PathBuf>,
    /// Commands running: a switch to a renewed certificate waits for none.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// This agent's place in the renewal window, in [-0.1, 0.1].
    jitter: f64,
    /// Why the last renewal failed ("" when it worked), sent with heartbeats.
    renewal_error: Mutex<String>,
    /// The controller replica the next connection goes to: where a standby
    /// said the leader is, else the next of `settings.controllers`.
    target: Mutex<ControllerTarget>,
}

/// A renewal in progress in one session.
#[derive(Default)]
struct Renewal {
    /// The key of the CSR sent, until its answer.
    pending_key: Option<String>,
    failures: u32,
    not_before: Option<tokio::time::Instant>,
    /// The renewed pair is installed: reconnect with it once idle.
    switch: bool,
    /// A CA rotation asked for a renewal now, whatever the certificate's age.
    now: bool,
}

const RENEW_RETRY: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(1800));

impl Agent {
    /// Builds the agent: IMDS client, journal (opened and pruned).
    pub fn new(config: &Config, settings: RunSettings) -> Result<Agent, AgentError> {
        let imds = ImdsClient::new(&config.imds.endpoint, config.imds.timeout)?;
        let journal = Journal::open(config.state_dir.join("journal"))?;
        let pruned = journal.prune(journal::RETENTION, std::time::SystemTime::now())?;
        tracing::info!(dir = %journal.dir().display(), pruned, "journal opened");
        let fence = load_fence(&config.state_dir);
        let first = settings.controllers[0].clone();
        Ok(Agent {
            settings,
            tls: TlsFiles { ca: config.tls.ca.clone(), cert: config.tls.cert.clone(), key: config.tls.key.clone() },
            creds: credentials::Store::new(&config.state_dir),
            token_file: config.tls.enrol_token_file.clone(),
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            jitter: rand::random_range(-0.1..=0.1),
            target: Mutex::new(first),
            renewal_error: Mutex::new(String::new()),
            root: config.root.clone(),
            imds,
            executor: Executor::new(std::sync::Arc::new(config.clone())),
            journal,
            reconnect: (config.reconnect.initial, config.reconnect.max),
            app_state: Mutex::new("unknown".to_owned()),
            refreshing: AtomicBool::new(false),
            state_dir: config.state_dir.clone(),
            fence: tokio::sync::watch::Sender::new(fence),
            fence_poke: tokio::sync::Notify::new(),
            heartbeat_ms: AtomicU64::new(DEFAULT_HEARTBEAT.as_millis() as u64),
        })
    }

    fn cached_app_state(&self) -> String {
        self.app_state.lock().expect("app state lock poisoned").clone()
    }

    async fn read_app_state(&self) -> String {
        let (state, transitioning) = match self.executor.replicatedctl().app_status().await {
            Ok(s) => (s.state, s.is_transitioning),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the app state");
                ("unknown".to_owned(), false)
            }
        };
        *self.app_state.lock().expect("app state lock poisoned") = state.clone();
        if self.fence.borrow().is_some() && fence::needs_stop(&state, transitioning) {
            tracing::warn!(app_state = %state, transitioning, "fenced, and the app is not stopped: the fence keeper stops it");
            self.fence_poke.notify_one();
        }
        state
    }

    /// Starts a background app-state refresh unless one is running.
    fn refresh_app_state(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            agent.read_app_state().await;
            agent.refreshing.store(false, Ordering::Release);
        });
    }

    async fn gather_facts(&self) -> Result<InstanceFacts, FactsError> {
        let (imds, app_state) = tokio::join!(facts::imds_facts(&self.imds), self.read_app_state());
        let imds = imds?;
        Ok(InstanceFacts {
            instance_id: imds.instance_id,
            private_ip: imds.private_ip.to_string(),
            public_ip: imds.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            boot_id: facts::read_boot_id(std::path::Path::new(facts::BOOT_ID_PATH))?,
            os_family: facts::detect_os_family(&self.root),
            app_state,
        })
    }

    async fn connect(&self, ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<tonic::transport::Channel, SessionError> {
        let target = self.target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let tls = dr_proto::tls::client_config_pem(ca_pem, identity, &target.name);
        let endpoint = tonic::transport::Endpoint::from_shared(target.url.clone())
            .map_err(|e| SessionError::Endpoint(error_chain(&e)))?
            .tls_config(tls)
            .map_err(|e| SessionError::Endpoint(error_chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT);
        let connector = dr_proto::transport::Connector { user_timeout: USER_TIMEOUT };
        match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect_with_connector(connector)).await {
            Err(_) => Err(SessionError::Connect(format!("no connection within {CONNECT_TIMEOUT:?}"))),
            Ok(Err(e)) => Err(SessionError::Connect(error_chain(&e))),
            Ok(Ok(channel)) => Ok(channel),
        }
    }

    /// The instance id and the signed identity document IMDS has (None
    /// when it has none, or cannot be read: logged).
    async fn instance_proof(&self) -> Result<(String, Option<(String, String)>), SessionError> {
        let facts = facts::imds_facts(&self.imds).await?;
        let document = match self.imds.token().await {
            Ok(token) => match self.imds.identity_document(&token).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the instance identity document");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the instance identity document");
                None
            }
        };
        Ok((facts.instance_id, document))
    }

    /// The certificate to open the session with: the instance's own when
    /// it is for this instance and valid, else a new one by enrolment.
    async fn credentials(&self) -> Result<(Held, Option<(String, String)>), SessionError> {
        let (instance, document) = self.instance_proof().await?;
        let now = std::time::SystemTime::now();
        if let Some(held) = self.creds.current()? {
            if held.instance() == Some(instance.as_str()) && held.site() == Some(self.settings.site_id.as_str()) && held.valid_at(now) {
                return Ok((held, document));
            }
            tracing::warn!(held = %held.identity, serial = %held.serial, %instance, valid = held.valid_at(now),
                "the certificate held is not for this instance or no longer valid (a restored copy, or a machine off for long): enrolling");
        }
        let held = self.enrol(&instance, document.as_ref()).await?;
        Ok((held, document))
    }

    /// Enrols this instance: a new key here, the proof of instance, and
    /// the best certificate still valid (the site's, or an older one of
    /// this site) or none.
    async fn enrol(&self, instance: &str, document: Option<&(String, String)>) -> Result<Held, SessionError> {
        let now = std::time::SystemTime::now();
        let ca = self.creds.trust_bundle(&self.tls.ca)?;
        let site_cert = match (std::fs::read(&self.tls.cert), std::fs::read(&self.tls.key)) {
            (Ok(c), Ok(k)) => Held::parse(c, k),
            _ => None,
        };
        let site = self.settings.site_id.as_str();
        let caller = site_cert
            .filter(|h| h.valid_at(now) && h.site() == Some(site))
            .or_else(|| self.creds.current().ok().flatten().filter(|h| h.valid_at(now) && h.site() == Some(site)));
        let proof = match document {
            Some((d, sig)) => pb::InstanceProof { document: d.clone().into_bytes(), signature: sig.clone(), token: String::new() },
            None => match &self.token_file {
                Some(path) => {
                    let token = std::fs::read_to_string(path).map_err(|e| {
                        SessionError::Enrol(format!("no instance identity document, and cannot read {}: {e}", path.display()))
                    })?;
                    pb::InstanceProof { token: token.trim().to_owned(), ..Default::default() }
                }
                None => {
                    return Err(SessionError::Enrol(
                        "no instance identity document from IMDS and no tls.enrol_token_file: nothing to prove this instance with".into(),
                    ));
                }
            },
        };
        let (key_pem, csr_der) = credentials::new_key_and_csr()?;
        let channel = self.connect(&ca, caller.as_ref().map(|h| (h.chain_pem.as_slice(), h.key_pem.as_slice()))).await?;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let request = pb::EnrollRequest { site_id: site.to_owned(), instance_id: instance.to_owned(), csr_der, proof: Some(proof) };
        let reply = tokio::time::timeout(WELCOME_TIMEOUT, client.enroll(request))
            .await
            .map_err(|_| SessionError::Timeout("enrolment answer"))?
            .map_err(|s| SessionError::Enrol(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        let trust = if reply.trust_bundle_pem.trim().is_empty() { ca.clone() } else { reply.trust_bundle_pem.clone().into_bytes() };
        let held = credentials::accept(&reply.cert_chain_pem, key_pem, &trust, site, instance)?;
        self.creds.install(&held, &reply.trust_bundle_pem)?;
        tracing::info!(identity = %held.identity, serial = %held.serial, until = %humantime::format_rfc3339_seconds(held.not_after),
            by = if document.is_some() { "instance identity document" } else { "enrolment token" }, "enrolled");
        Ok(held)
    }

    /// Asks for a renewal when due; `renewal` tracks it across the session.
    fn maybe_renew(&self, held: &Held, renewal: &mut Renewal, tx: &mpsc::Sender<pb::AgentMessage>) {
        let now = std::time::SystemTime::now();
        if renewal.switch || renewal.pending_key.is_some() || (now < held.renew_at(self.jitter) && !renewal.now) {
            return;
        }
        if renewal.not_before.is_some_and(|t| tokio::time::Instant::now() < t) {
            return;
        }
        match credentials::new_key_and_csr() {
            Ok((key, csr_der)) => {
                tracing::info!(serial = %held.serial, ends = %humantime::format_rfc3339_seconds(held.not_after), "renewing the certificate");
                if tx.try_send(pb::AgentMessage { msg: Some(AgentMsg::Renew(pb::RenewRequest { csr_der })) }).is_ok() {
                    renewal.pending_key = Some(key);
                    renewal.now = false;
                }
            }
            Err(e) => self.renewal_failed(renewal, &e.to_string()),
        }
    }

    fn renewal_failed(&self, renewal: &mut Renewal, why: &str) {
        *self.renewal_error.lock().expect("renewal error lock") = why.to_owned();
        renewal.pending_key = None;
        renewal.failures += 1;
        let wait = RENEW_RETRY.delay(renewal.failures);
        renewal.not_before = Some(tokio::time::Instant::now() + wait);
        tracing::warn!(error = %why, attempt = renewal.failures, retry_in_ms = wait.as_millis() as u64, "certificate renewal failed");
    }

    /// The controller's answer to a renewal: checked, installed, and the
    /// session is switched over once no command runs.
    fn renewed(&self, held: &Held, reply: pb::RenewReply, renewal: &mut Renewal) {
        let Some(key) = renewal.pending_key.take() else {
            tracing::warn!("a renewal answer without a renewal asked; ignored");
            return;
        };
        if !reply.error.is_empty() {
            return self.renewal_failed(renewal, &format!("the controller: {}", reply.error));
        }
        let trust = if reply.trust_bundle_pem.trim().is_empty() {
            match self.creds.trust_bundle(&self.tls.ca) {
                Ok(t) => t,
                Err(e) => return self.renewal_failed(renewal, &e.to_string()),
            }
        } else {
            reply.trust_bundle_pem.clone().into_bytes()
        };
        let (site, instance) = (held.site().unwrap_or_default(), held.instance().unwrap_or_default());
        let result = credentials::accept(&reply.cert_chain_pem, key, &trust, site, instance)
            .and_then(|new| self.creds.install(&new, &reply.trust_bundle_pem).map(|()| new));
        match result {
            Ok(new) => {
                renewal.failures = 0;
                renewal.switch = true;
                self.renewal_error.lock().expect("renewal error lock").clear();
                tracing::info!(serial = %new.serial, until = %humantime::format_rfc3339_seconds(new.not_after), "certificate renewed; switching to it once no command runs");
            }
            Err(e) => self.renewal_failed(renewal, &e.to_string()),
        }
    }

    /// One session: connect, Hello, Welcome, then heartbeats and commands
    /// until the stream ends. `on_welcome` is called once the session is up.
    async fn session(self: &Arc<Self>, on_welcome: &mut dyn FnMut()) -> Result<(), SessionError> {
        let (held, document) = self.credentials().await?;
        let ca = self.creds.trust_bundle(&self.tls.ca)?;
        let channel = self.connect(&ca, Some((&held.chain_pem, &held.key_pem))).await?;
        let facts = self.gather_facts().await?;
        let own_instance = facts.instance_id.clone();
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(OUTGOING_CAPACITY);
        let hello = pb::Hello {
            site_id: self.settings.site_id.clone(),
            facts: Some(facts_to_pb(facts)),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            proof: document.map(|(d, signature)| pb::InstanceProof { document: d.into_bytes(), signature, token: String::new() }),
        };
        tx.send(pb::AgentMessage { msg: Some(AgentMsg::Hello(hello)) })
            .await
            .map_err(|_| SessionError::Protocol("outgoing stream closed before Hello".to_owned()))?;
        let response = tokio::time::timeout(WELCOME_TIMEOUT, client.session(ReceiverStream::new(rx)))
            .await
            .map_err(|_| SessionError::Timeout("stream"))?
            .map_err(SessionError::Status)?;
        let mut inbound = response.into_inner();
        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
            .await
            .map_err(|_| SessionError::Timeout("Welcome"))?
            .map_err(SessionError::Status)?
            .ok_or(SessionError::Ended)?;
        let Some(ControllerMsg::Welcome(w)) = first.msg else {
            return Err(SessionError::Protocol("the controller's first message is not a Welcome".to_owned()));
        };
        let mut welcome = welcome_from_pb(&w);
        // The pair this session opened with works: an older one goes.
        self.creds.confirm();
        on_welcome();
        log_welcome(&welcome);
        self.heartbeat_ms.store(welcome.heartbeat_interval.as_millis() as u64, Ordering::Relaxed);
        self.apply_role(&welcome.role, &own_instance);

        // The Hello just carried fresh facts: the first heartbeat is due one
        // interval from now, not at once.
        let mut ticker = heartbeat_ticker(welcome.heartbeat_interval);
        let mut seq: u64 = 0;
        // Renewal: looked at every 1/20 of the lifetime (1 s to 5 min), and
        // at once (a certificate past its half is renewed at start).
        let life = held.not_after.duration_since(held.not_before).unwrap_or_default();
        let mut renew_check = tokio::time::interval((life / 20).clamp(Duration::from_secs(1), Duration::from_secs(300)));
        renew_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewal = Renewal::default();
        loop {
            tokio::select! {
                _ = renew_check.tick() => {
                    if renewal.switch && self.in_flight.load(Ordering::Acquire) == 0 {
                        return Err(SessionError::Renewed);
                    }
                    self.maybe_renew(&held, &mut renewal, &tx);
                }
                message = inbound.message() => match message.map_err(SessionError::Status)? {
                    None => return Err(SessionError::Ended),
                    Some(pb::ControllerMessage { msg: Some(ControllerMsg::Command(c)) }) => {
                        self.handle_command(c, &welcome.role, &own_instance, &tx);
                    }
                    Some(pb::ControllerMessage { msg: Some(ControllerMsg::Welcome(w)) }) => {
                        welcome = welcome_from_pb(&w);
                        log_welcome(&welcome);
                        ticker = heartbeat_ticker(welcome.heartbeat_interval);
                        self.heartbeat_ms.store(welcome.heartbeat_interval.as_millis() as u64, Ordering::Relaxed);
                        self.apply_role(&welcome.role, &own_instance);
                    }
                    Some(pb::ControllerMessage { msg: Some(ControllerMsg::RoleChange(r)) }) => {
                        let role = role_change_from_pb(&r);
                        tracing::info!(from = welcome.role.as_str(), to = role.as_str(), operation = role.operation_id(), reason = %r.reason, "the controller changed this instance's role");
                        self.apply_role(&role, &own_instance);
                        welcome.role = role;
                        welcome.reason = r.reason;
                    }
                    Some(pb::ControllerMessage { msg: Some(ControllerMsg::TrustBundle(bundle)) }) => {
                        match self.creds.set_trust(&bundle.roots_pem) {
                            Ok(n) => {
                                tracing::warn!(roots = n, bundle = %bundle.id, renew_now = bundle.renew_now, "the controller sent new roots to trust (a CA rotation); stored");
                                let _ = tx.try_send(pb::AgentMessage { msg: Some(AgentMsg::TrustAck(pb::TrustAck { id: bundle.id })) });
                                if bundle.renew_now {
                                    renewal.now = true;
                                    self.maybe_renew(&held, &mut renewal, &tx);
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "cannot store the trust bundle the controller sent; not acknowledged"),
                        }
                    }
                    Some(pb::ControllerMessage { msg: Some(ControllerMsg::Renewed(reply)) }) => {
                        self.renewed(&held, reply, &mut renewal);
                        if renewal.switch && self.in_flight.load(Ordering::Acquire) == 0 {
                            return Err(SessionError::Renewed);
                        }
                    }
                    Some(pb::ControllerMessage { msg: None }) => {
                        tracing::warn!("ignoring an empty or unknown controller message");
                    }
                },
                _ = ticker.tick() => {
                    seq += 1;
                    let renewal_error = self.renewal_error.lock().expect("renewal error lock").clone();
                    let heartbeat = pb::Heartbeat { seq, app_state: self.cached_app_state(), renewal_error };
                    match tx.try_send(pb::AgentMessage { msg: Some(AgentMsg::Heartbeat(heartbeat)) }) {
                        Ok(()) => tracing::debug!(seq, "heartbeat sent"),
                        Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!(seq, "outgoing stream is full: heartbeat skipped"),
                        Err(mpsc::error::TrySendError::Closed(_)) => return Err(SessionError::Ended),
                    }
                    // Read the state for the next heartbeat without delaying this one.
                    self.refresh_app_state();
                }
            }
        }
    }

    fn handle_command(self: &Arc<Self>, c: pb::Command, role: &Role, own_instance: &str, tx: &mpsc::Sender<pb::AgentMessage>) {
        let request = match command_from_pb(c) {
            Ok(r) => r,
            Err(answer) => {
                tracing::warn!(id = %answer.id, error = %answer.error, "command rejected");
                send_answer(tx.clone(), answer);
                return;
            }
        };
        if let Some(why) = refusal(role, own_instance, request.target.as_ref()) {
            tracing::warn!(id = %request.id, action = request.action.name(), role = role.as_str(), reason = %why, "command refused: not for this instance");
            send_answer(tx.clone(), CommandAnswer::rejected(&request.id, ErrorKind::Refused, format!("not run: {why}")));
            return;
        }
        let mut request = request;
        // The controller's word that this machine is a restore candidate is
        // the evidence `recover` needs (beside a changed instance id).
        if let (Action::Recover { params, .. }, Role::Candidate(_)) = (&mut request.action, role) {
            params.candidate = true;
        }
        tracing::info!(id = %request.id, action = request.action.name(), deadline = ?request.deadline, "command received");
        let agent = Arc::clone(self);
        let tx = tx.clone();
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let CommandRequest { id, action, deadline, .. } = request;
            let answer = agent.journal.run(&id, &action, || agent.executor.execute(&action, deadline)).await;
            tracing::info!(id = %answer.id, ok = answer.ok, replayed = answer.replayed, error = %answer.error, "command answered");
            let _ = tx.send(pb::AgentMessage { msg: Some(AgentMsg::Result(answer_to_pb(answer))) }).await;
            agent.in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Runs sessions until `shutdown` resolves, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        // The fence holds with or without a controller: its keeper runs
        // beside the sessions for the daemon's life.
        let keeper = tokio::spawn(Arc::clone(&self).keep_fence());
        let _keeper = AbortOnDrop(keeper);
        let mut backoff = Backoff::new(self.reconnect.0, self.reconnect.1);
        // The replica found down on the last attempt (a standby naming it
        // as the leader is waiting for its lease to end).
        let mut unreachable: Option<String> = None;
        // Replicas found down in a row since the last full round.
        let mut rotated = 0;
        tokio::pin!(shutdown);
        loop {
            let result = {
                let mut reset = || backoff.reset();
                tokio::select! {
                    r = self.session(&mut reset) => r,
                    _ = &mut shutdown => return,
                }
            };
            let attempt = backoff.attempt() + 1;
            let error = match result {
                Ok(()) => SessionError::Ended,
                Err(e) => e,
            };
            if matches!(error, SessionError::Renewed) {
                tracing::info!("reconnecting with the renewed certificate");
                continue;
            }
            if let Some((leader, retry_after)) = error.leader() {
                match ControllerTarget::from_url(&format!("https://{leader}")) {
                    // The leader it names is the one just found down: it
                    // died and the standby takes over when its lease ends.
                    // Ask this standby again then (spread out: a whole
                    // fleet waits for the same moment).
                    Ok(t) if unreachable.as_ref() == Some(&t.url) => {
                        let delay = retry_after.clamp(Duration::from_millis(500), Duration::from_secs(120))
                            + Duration::from_millis(rand::random_range(0..=2000));
                        tracing::info!(leader = %t.url, delay_ms = delay.as_millis() as u64,
                            "the leader a standby names is down; asking the standby again when its lease ends");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = &mut shutdown => return,
                        }
                        unreachable = None;
                        continue;
                    }
                    // A standby named the leader: go there after a short,
                    // spread-out pause (a whole fleet is redirected at once).
                    Ok(t) => {
                        tracing::info!(leader = %t.url, "that controller is a standby; going to the leader");
                        let t = self.settings.controllers.iter().find(|c| c.url == t.url).cloned().unwrap_or(t);
                        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = t;
                        let delay = Duration::from_millis(rand::random_range(50..=1000));
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = &mut shutdown => return,
                        }
                        continue;
                    }
                    Err(e) => tracing::warn!(leader = %leader, error = %e, "a standby named a leader address that is not usable"),
                }
            } else if error.is_unreachable() && self.settings.controllers.len() > 1 {
                // This replica is down or a standby that knows no leader:
                // the next one in the list, at once; once every replica
                // failed in a row, the backoff below applies.
                let next = {
                    let mut t = self.target.lock().unwrap_or_else(|p| p.into_inner());
                    unreachable = Some(t.url.clone());
                    let at = self.settings.controllers.iter().position(|c| *c == *t).map_or(0, |i| i + 1);
                    *t = self.settings.controllers[at % self.settings.controllers.len()].clone();
                    t.url.clone()
                };
                rotated += 1;
                if rotated < self.settings.controllers.len() {
                    tracing::info!(next = %next, "trying the next controller replica");
                    let delay = Duration::from_millis(rand::random_range(50..=1000));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = &mut shutdown => return,
                    }
                    continue;
                }
                rotated = 0;
            } else {
                unreachable = None;
                rotated = 0;
            }
            if error.is_permission() {
                tracing::error!(error = %error, attempt, "the controller refused this agent");
                // A renewed pair the controller refuses: back to the one
                // that worked (kept until the new one had worked).
                match self.creds.roll_back() {
                    Ok(true) => tracing::warn!("went back to the previous certificate"),
                    Ok(false) if error.certificate_unusable() => {
                        // Revoked, or not (or no longer) this instance's
                        // current one: enrol again at the next attempt
                        // (which the controller allows only when an
                        // operator did, or every certificate expired).
                        match self.creds.discard() {
                            Ok(()) => tracing::warn!("the controller no longer accepts this certificate: set aside; enrolling again"),
                            Err(e) => tracing::error!(error = %e, "cannot set the refused certificate aside"),
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot go back to the previous certificate"),
                }
            } else {
                tracing::warn!(error = %error, attempt, "session ended");
            }
            let delay = backoff.next_delay();
            tracing::info!(delay_ms = delay.as_millis() as u64, attempt, "reconnecting after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => return,
            }
        }
    }
}

/// Ends a task when dropped (the fence keeper ends with the daemon's loop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The fence recorded in `state_dir`, if it applies on this instance (as
/// `identity.json` names it). Unreadable: logged, none.
fn load_fence(state_dir: &std::path::Path) -> Option<FenceRecord> {
    let record = match fence::load(state_dir) {
        Ok(r) => r?,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the fence record: no fence in force until the controller says so");
            return None;
        }
    };
    let current = crate::sys::identity::load(state_dir).ok().flatten().and_then(|f| f.current.instance_id);
    if !record.applies_to(current.as_deref()) {
        tracing::warn!(fenced = %record.instance_id, instance = current.as_deref().unwrap_or(""),
            "a fence record of another instance (a copied disk) does not apply here; removed");
        if let Err(e) = fence::remove(state_dir) {
            tracing::warn!(error = %e, "cannot remove the stale fence record");
        }
        return None;
    }
    tracing::warn!(instance = %record.instance_id, reason = %record.reason, since = %record.since,
        "this instance is fenced (recorded): its app is kept stopped until the controller says otherwise");
    Some(record)
}

impl Agent {
    /// Follows the role the controller gives this instance: `fenced` puts
    /// the fence in force (recorded, then the keeper stops the app); any
    /// settled role other than `fenced` lifts it; `pending` changes nothing.
    fn apply_role(&self, role: &Role, own_instance: &str) {
        match role {
            Role::Fenced(reason) => {
                let started = self.fence.send_if_modified(|f| match f {
                    Some(r) if r.instance_id == own_instance => {
                        r.reason.clone_from(reason);
                        false
                    }
                    _ => {
                        let stops = f.as_ref().map_or(0, |r| r.stops);
                        *f = Some(FenceRecord {
                            instance_id: own_instance.to_owned(),
                            reason: reason.clone(),
                            since: crate::sys::clock::utc_stamp(std::time::SystemTime::now()),
                            stops,
                        });
                        true
                    }
                });
                if started {
                    tracing::warn!(instance = own_instance, reason = %reason, "the controller fenced this instance: stopping the app and keeping it stopped");
                } else {
                    // Told again (a reconnect): look once more now.
                    self.fence_poke.notify_one();
                }
                let current = self.fence.borrow().clone();
                if let Some(r) = current
                    && let Err(e) = fence::save(&self.state_dir, &r)
                {
                    tracing::error!(error = %e, "cannot record the fence: it holds until this agent restarts");
                }
            }
            Role::Pending => {}
            other => {
                if self.fence.send_replace(None).is_some() {
                    tracing::warn!(instance = own_instance, role = other.as_str(), "the controller lifted this instance's fence");
                    if let Err(e) = fence::remove(&self.state_dir) {
                        tracing::error!(error = %e, "cannot remove the fence record: it would come back at the next start");
                    }
                }
            }
        }
    }

    /// Holds the fence while one is in force: looks at once, then every
    /// heartbeat interval and whenever a heartbeat saw the app not
    /// stopped; after a failed stop, waits with backoff (pokes ignored).
    async fn keep_fence(self: Arc<Self>) {
        let mut rx = self.fence.subscribe();
        let mut backoff = Backoff::new(fence::RETRY_INITIAL, fence::RETRY_MAX);
        loop {
            let in_force = rx.borrow_and_update().clone();
            let Some(record) = in_force else {
                backoff.reset();
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if self.hold_fence(&record).await {
                backoff.reset();
                let every = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed)).max(MIN_HEARTBEAT);
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = self.fence_poke.notified() => {}
                    r = rx.changed() => if r.is_err() { return },
                }
            } else {
                let delay = backoff.next_delay();
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    attempt = backoff.attempt(),
                    "fence: the app could not be stopped; retrying after backoff"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        }
    }

    /// One look: the app stopped and settled is left alone; anything else
    /// is stopped through the journal (the controller's `app_stop` step).
    /// False when the stop failed.
    async fn hold_fence(&self, record: &FenceRecord) -> bool {
        let state = match self.executor.replicatedctl().app_status().await {
            Ok(s) => {
                *self.app_state.lock().expect("app state lock poisoned") = s.state.clone();
                if !fence::needs_stop(&s.state, s.is_transitioning) {
                    return true;
                }
                s.state
            }
            // Stop anyway: the step issues the stop and waits for it.
            Err(e) => {
                tracing::warn!(error = %e, "fence: cannot read the app state; stopping it anyway");
                "unknown".to_owned()
            }
        };
        let mut n = 0;
        self.fence.send_if_modified(|f| {
            if let Some(r) = f {
                r.stops += 1;
                n = r.stops;
            }
            false
        });
        if n == 0 {
            return true; // lifted meanwhile
        }
        let current = self.fence.borrow().clone();
        if let Some(r) = current
            && let Err(e) = fence::save(&self.state_dir, &r)
        {
            tracing::warn!(error = %e, "cannot record the fence's stop count");
        }
        let id = fence::journal_id(&record.instance_id, n);
        let action = Action::AppStop { force: false, dry_run: false };
        tracing::warn!(id = %id, instance = %record.instance_id, app_state = %state, reason = %record.reason, "fenced: stopping the app");
        let answer = self.journal.run(&id, &action, || self.executor.execute(&action, None)).await;
        // The next heartbeat reports what is there now.
        let now = self.read_app_state().await;
        if answer.ok {
            tracing::warn!(id = %id, instance = %record.instance_id, app_state = %now, replayed = answer.replayed, "fenced: app stopped");
            true
        } else {
            tracing::error!(id = %id, instance = %record.instance_id, app_state = %now, error = %answer.error, "fenced: the app stop failed");
            false
        }
    }
}

fn heartbeat_ticker(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

fn log_welcome(w: &Welcome) {
    let heartbeat_ms = w.heartbeat_interval.as_millis() as u64;
    tracing::info!(role = w.role.as_str(), operation = w.role.operation_id(), heartbeat_ms, reason = %w.reason, "connected");
    if !w.role.takes_work() {
        tracing::warn!(role = w.role.as_str(), reason = %w.reason, "this instance gets no work: it refuses commands until its role changes");
    }
}

fn send_answer(tx: mpsc::Sender<pb::AgentMessage>, answer: CommandAnswer) {
    tokio::spawn(async move {
        let _ = tx.send(pb::AgentMessage { msg: Some(AgentMsg::Result(answer_to_pb(answer))) }).await;
    });
}

/// An error and its sources, joined with ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welcome_clamps_and_roles() {
        let welcome = |ms: u32, role: &str, reason: &str, op: &str| {
            welcome_from_pb(&pb::Welcome { heartbeat_interval_ms: ms, role: role.into(), reason: reason.into(), operation_id: op.into() })
        };
        let w = welcome(10, "primary", "", "");
        assert_eq!(w.heartbeat_interval, MIN_HEARTBEAT);
        assert_eq!(w.role, Role::Primary);
        let w = welcome(3_600_000, "passive", "old", "");
        assert_eq!(w.heartbeat_interval, MAX_HEARTBEAT);
        assert_eq!(w.role, Role::Passive("old".into()));
        let w = welcome(0, "boss", "", "");
        assert_eq!(w.heartbeat_interval, DEFAULT_HEARTBEAT);
        assert!(matches!(w.role, Role::Passive(r) if r.contains("boss")));
        assert_eq!(welcome(0, "candidate", "", "failover-1").role, Role::Candidate("failover-1".into()));
        // A candidate without its operation cannot be addressed: passive.
        assert!(matches!(welcome(0, "candidate", "", "").role, Role::Passive(_)));
    }

    #[test]
    fn commands_reach_only_the_instance_and_role_they_name() {
        let t = |i: &str, r: &str, o: &str| Target { instance_id: i.into(), role: r.into(), operation_id: o.into() };
        assert_eq!(refusal(&Role::Primary, "i-1", Some(&t("i-1", "primary", ""))), None);
        assert_eq!(refusal(&Role::Primary, "i-1", None), None, "old controllers address only primaries");
        let why = refusal(&Role::Primary, "i-2", Some(&t("i-1", "primary", ""))).expect("other instance");
        assert!(why.contains("for instance i-1"), "{why}");
        let cand = Role::Candidate("op-7".into());
        assert_eq!(refusal(&cand, "i-9", Some(&t("i-9", "candidate", "op-7"))), None);
        assert!(refusal(&cand, "i-9", Some(&t("i-9", "candidate", "op-8"))).is_some(), "another operation's candidate");
        assert!(refusal(&cand, "i-9", Some(&t("i-9", "primary", ""))).is_some(), "primary work on a candidate");
        assert!(refusal(&cand, "i-9", None).is_some());
        for r in [Role::Passive("x".into()), Role::Fenced("old".into()), Role::Pending] {
            assert!(refusal(&r, "i-1", Some(&t("i-1", r.as_str(), ""))).is_some(), "{r:?} gets no work");
        }
    }

    #[test]
    fn commands_convert() {
        let ok = command_from_pb(pb::Command {
            id: "op-1:s1".into(),
            deadline_ms: 5000,
            target: None,
            kind: Some(pb::command::Kind::AppStatus(pb::AppStatusRequest {})),
        })
        .expect("known kind");
        assert_eq!(ok.action, Action::AppStatus);
        assert_eq!(ok.deadline, Some(Duration::from_secs(5)));
        let empty = command_from_pb(pb::Command { id: "x".into(), deadline_ms: 0, target: None, kind: None }).expect_err("empty kind");
        assert!(!empty.ok && empty.id == "x" && empty.error.contains("unknown or empty"));
    }

    #[test]
    fn answers_convert() {
        let mut a = CommandAnswer::rejected("x", ErrorKind::Failed, "boom");
        a.outcome = Some(Outcome::AppStatus(crate::sys::replicated::AppStatus {
            state: "started".into(),
            is_transitioning: false,
            desired_state: "started".into(),
        }));
        let pb = answer_to_pb(a);
        assert_eq!(pb.error, "boom");
        assert!(matches!(pb.detail, Some(pb::command_result::Detail::AppStatus(ref s)) if s.state == "started"));
    }

    #[test]
    fn permission_errors_are_recognised() {
        assert!(SessionError::Status(tonic::Status::permission_denied("site mismatch")).is_permission());
        assert!(SessionError::Status(tonic::Status::unauthenticated("no cert")).is_permission());
        assert!(!SessionError::Status(tonic::Status::unavailable("down")).is_permission());
        assert!(!SessionError::Ended.is_permission());
    }
}
