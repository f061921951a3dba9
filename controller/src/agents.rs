//! Agent sessions: the `AgentService.Session` stream and the registry of
//! connected agents the engine sends commands through.
//!
//! Invariants:
//! - a stream is accepted only from a certificate with a site identity of
//!   our trust domain, for a configured site, whose Hello names that same
//!   site; anything else ends with PermissionDenied and a warning in the log;
//! - an agent gets work only when it is the site's current primary
//!   (instance id as stored, confirmed by EC2); otherwise it is passive;
//! - at most one session per site is registered: a newer one replaces (and
//!   closes) an older one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dr_proto::identity::peer_identity;
use dr_proto::pb;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ec2::Ec2Clients;
use crate::model::{AgentRecord, AgentRole, InstanceFacts, now_ms};
use crate::store::Store;

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
}

/// What an agent answered (domain side of `pb::CommandResult`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentOutcome {
    pub ok: bool,
    pub error: String,
    /// The answer came from the agent's journal: the command had already run.
    pub replayed: bool,
    pub detail: AgentDetail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentDetail {
    None,
    AppStatus { state: String, is_transitioning: bool, desired_state: String },
    /// A step's report, as the agent wrote it.
    Report(serde_json::Value),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("the agent of site `{0}` is not connected")]
    NotConnected(String),
    #[error("the agent of site `{site}` is passive: {reason}")]
    Passive { site: String, reason: String },
    #[error("the agent of site `{0}` disconnected before answering")]
    Disconnected(String),
    #[error("the agent of site `{site}` did not answer within {after:?}")]
    Timeout { site: String, after: Duration },
}

fn command_to_pb(id: &str, action: &AgentAction, deadline: Duration) -> pb::Command {
    let ms = |d: &Duration| d.as_millis().min(u32::MAX as u128) as u32;
    let kind = match action {
        AgentAction::AppStatus => pb::command::Kind::AppStatus(pb::AppStatusRequest {}),
        AgentAction::AppStop => pb::command::Kind::AppStop(pb::AppStopRequest { force: false }),
        AgentAction::AppStart => pb::command::Kind::AppStart(pb::AppStartRequest {}),
        AgentAction::Freeze { deadline } => {
            pb::command::Kind::Freeze(pb::FreezeRequest { mounts: vec![], deadline_ms: ms(deadline) })
        }
        AgentAction::Thaw => pb::command::Kind::Thaw(pb::ThawRequest {}),
        AgentAction::Drain { deadline } => pb::command::Kind::Drain(pb::DrainRequest { deadline_ms: ms(deadline) }),
        AgentAction::Undrain => pb::command::Kind::Undrain(pb::UndrainRequest {}),
    };
    pb::Command { id: id.to_owned(), deadline_ms: deadline.as_millis().min(u32::MAX as u128) as u32, kind: Some(kind) }
}

fn outcome_from_pb(r: pb::CommandResult) -> AgentOutcome {
    let detail = match r.detail {
        Some(pb::command_result::Detail::AppStatus(s)) => AgentDetail::AppStatus {
            state: s.state,
            is_transitioning: s.is_transitioning,
            desired_state: s.desired_state,
        },
        None if !r.report_json.is_empty() => match serde_json::from_str(&r.report_json) {
            Ok(v) => AgentDetail::Report(v),
            Err(_) => AgentDetail::Report(serde_json::Value::String(r.report_json.clone())),
        },
        None => AgentDetail::None,
    };
    AgentOutcome { ok: r.ok, error: r.error, replayed: r.replayed, detail }
}

fn facts_from_pb(f: Option<pb::InstanceFacts>) -> InstanceFacts {
    let f = f.unwrap_or_default();
    InstanceFacts {
        instance_id: f.instance_id,
        private_ip: f.private_ip,
        public_ip: f.public_ip,
        boot_id: f.boot_id,
        os_family: f.os_family,
        app_state: f.app_state,
    }
}

type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;
type Pending = Arc<Mutex<HashMap<String, Vec<oneshot::Sender<AgentOutcome>>>>>;

struct Session {
    serial: u64,
    tx: Outbound,
    pending: Pending,
    role: AgentRole,
    record: AgentRecord,
}

/// The connected agents, by site.
#[derive(Clone, Default)]
pub struct Registry {
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    serial: Arc<AtomicU64>,
}

/// A live view of one agent for `drctl status`.
#[derive(Clone, Debug)]
pub struct LiveAgent {
    pub record: AgentRecord,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn live(&self, site: &str) -> Option<LiveAgent> {
        self.lock().get(site).map(|s| LiveAgent { record: s.record.clone() })
    }

    /// Sends a command and waits for its result. Calling again with the same
    /// id (after a disconnect or a controller restart) is safe: the agent
    /// answers from its journal without running the step again.
    pub async fn call(
        &self,
        site: &str,
        id: &str,
        action: &AgentAction,
        timeout: Duration,
    ) -> Result<AgentOutcome, AgentCallError> {
        let (tx, pending, rx) = {
            let sessions = self.lock();
            let s = sessions.get(site).ok_or_else(|| AgentCallError::NotConnected(site.to_owned()))?;
            if let AgentRole::Passive { reason } = &s.role {
                return Err(AgentCallError::Passive { site: site.to_owned(), reason: reason.clone() });
            }
            let (otx, orx) = oneshot::channel();
            s.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_owned()).or_default().push(otx);
            (s.tx.clone(), s.pending.clone(), orx)
        };
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Command(command_to_pb(id, action, timeout))),
        };
        let forget = || {
            pending.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        };
        if tx.send(Ok(msg)).await.is_err() {
            forget();
            return Err(AgentCallError::Disconnected(site.to_owned()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(AgentCallError::Disconnected(site.to_owned())),
            Err(_) => {
                forget();
                Err(AgentCallError::Timeout { site: site.to_owned(), after: timeout })
            }
        }
    }

    /// Ends every stream (controller shutdown).
    pub fn close_all(&self) {
        self.lock().clear();
    }

    fn register(&self, site: &str, session: Session) {
        if let Some(old) = self.lock().insert(site.to_owned(), session) {
            tracing::info!(site, old_session = old.serial, "a newer session replaces the old one");
        }
    }

    /// Removes the session if it is still the registered one.
    fn unregister(&self, site: &str, serial: u64) -> Option<AgentRecord> {
        let mut sessions = self.lock();
        if sessions.get(site).is_some_and(|s| s.serial == serial) {
            return sessions.remove(site).map(|s| s.record);
        }
        None
    }

    fn touch(&self, site: &str, serial: u64, app_state: Option<String>) {
        if let Some(s) = self.lock().get_mut(site).filter(|s| s.serial == serial) {
            s.record.last_heartbeat_ms = now_ms();
            if let Some(state) = app_state {
                s.record.facts.app_state = state;
            }
        }
    }
}

/// Serves `AgentService`.
#[derive(Clone)]
pub struct AgentServer {
    pub trust_domain: String,
    pub heartbeat_interval: Duration,
    pub missed_heartbeats: u32,
    pub registry: Registry,
    pub store: Store,
    pub ec2: Arc<Ec2Clients>,
}

impl AgentServer {
    /// Decides whether the instance an agent reports may act as the site's
    /// primary.
    async fn role_for(&self, site_id: &str, facts: &InstanceFacts) -> AgentRole {
        let passive = |reason: String| AgentRole::Passive { reason };
        let site = match self.store.site(site_id) {
            Ok(Some(site)) => site,
            Ok(None) => return passive("the site is not in the controller's store".into()),
            Err(e) => return passive(format!("the store cannot be read: {e}")),
        };
        if facts.instance_id != site.primary_instance_id {
            return passive(format!(
                "instance {} is not the site's primary {}",
                facts.instance_id, site.primary_instance_id
            ));
        }
        let client = match self.ec2.for_site(&site).await {
            Ok(c) => c,
            Err(e) => return passive(format!("cannot check the instance with EC2: {e}")),
        };
        match tokio::time::timeout(Duration::from_secs(15), client.describe_instance(&facts.instance_id)).await {
            Ok(Ok(Some(i))) if i.private_ip == facts.private_ip => AgentRole::Primary,
            Ok(Ok(Some(i))) => passive(format!(
                "EC2 says instance {} has private IP {}, the agent reports {}",
                i.id, i.private_ip, facts.private_ip
            )),
            Ok(Ok(None)) => passive(format!("EC2 does not know instance {}", facts.instance_id)),
            Ok(Err(e)) => passive(format!("cannot check the instance with EC2: {e}")),
            Err(_) => passive("EC2 did not answer DescribeInstances within 15s".into()),
        }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentServer {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let identity = peer_identity(&request).map_err(|e| {
            tracing::warn!(%peer, error = %e, "agent stream refused");
            Status::unauthenticated(e.to_string())
        })?;
        let cert_site = identity
            .require_site(&self.trust_domain)
            .map_err(|e| {
                tracing::warn!(%peer, %identity, error = %e, "agent stream refused");
                Status::permission_denied(e.to_string())
            })?
            .to_owned();
        if self.store.site(&cert_site).map_err(|e| Status::internal(e.to_string()))?.is_none() {
            tracing::warn!(%peer, site = %cert_site, "agent stream refused: site not configured");
            return Err(Status::permission_denied(format!("site `{cert_site}` is not configured on this controller")));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 30s"))?
            .ok_or_else(|| Status::invalid_argument("the stream ended before a Hello"))??;
        let Some(pb::agent_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be a Hello"));
        };
        if hello.site_id != cert_site {
            tracing::warn!(%peer, cert_site, hello_site = hello.site_id, "agent stream refused: Hello names another site than its certificate");
            return Err(Status::permission_denied(format!(
                "Hello names site `{}` but the certificate is for site `{cert_site}`",
                hello.site_id
            )));
        }
        let facts = facts_from_pb(hello.facts);
        let role = self.role_for(&cert_site, &facts).await;
        let now = now_ms();
        let record = AgentRecord {
            site_id: cert_site.clone(),
            facts: facts.clone(),
            role: role.name().to_owned(),
            role_reason: role.reason().to_owned(),
            connected: true,
            connected_at_ms: now,
            last_heartbeat_ms: now,
            peer: peer.clone(),
        };
        self.store.put_agent(&record).map_err(|e| Status::internal(e.to_string()))?;
        match &role {
            AgentRole::Primary => tracing::info!(site = %cert_site, instance = %facts.instance_id, %peer, version = %hello.agent_version, "agent connected"),
            AgentRole::Passive { reason } => tracing::warn!(site = %cert_site, instance = %facts.instance_id, %peer, %reason, "agent connected as passive: it gets no work"),
        }

        let (tx, rx) = mpsc::channel(64);
        let welcome = pb::Welcome {
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
            role: role.name().to_owned(),
            reason: role.reason().to_owned(),
        };
        tx.send(Ok(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Welcome(welcome)) }))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))?;
        let serial = self.registry.serial.fetch_add(1, Ordering::Relaxed);
        let pending: Pending = Arc::default();
        self.registry.register(&cert_site, Session { serial, tx, pending: pending.clone(), role, record });

        let me = self.clone();
        let silence = self.heartbeat_interval * self.missed_heartbeats;
        tokio::spawn(async move {
            let reason = loop {
                match tokio::time::timeout(silence, inbound.next()).await {
                    Err(_) => break format!("no message for {silence:?}"),
                    Ok(None) => break "the agent closed the stream".to_owned(),
                    Ok(Some(Err(status))) => break format!("stream error: {}", status.message()),
                    Ok(Some(Ok(msg))) => match msg.msg {
                        Some(pb::agent_message::Msg::Heartbeat(hb)) => {
                            me.registry.touch(&cert_site, serial, Some(hb.app_state));
                        }
                        Some(pb::agent_message::Msg::Result(result)) => {
                            me.registry.touch(&cert_site, serial, None);
                            let waiters = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&result.id);
                            let outcome = outcome_from_pb(result);
                            for w in waiters.into_iter().flatten() {
                                let _ = w.send(outcome.clone());
                            }
                        }
                        Some(pb::agent_message::Msg::Hello(_)) | None => {
                            tracing::warn!(site = %cert_site, "unexpected message on an established stream; ignored");
                        }
                    },
                }
            };
            if let Some(mut record) = me.registry.unregister(&cert_site, serial) {
                record.connected = false;
                if let Err(e) = me.store.put_agent(&record) {
                    tracing::error!(site = %cert_site, error = %e, "cannot record the agent's disconnection");
                }
            }
            tracing::info!(site = %cert_site, %reason, "agent disconnected");
        });
        let stream: SessionStream = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }
}
