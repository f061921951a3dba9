//! `AgentService.Session`: one long-lived stream per agent.

use std::pin::Pin;
use std::time::Duration;

use dr_proto::identity::{Role as IdentityRole, peer_identity};
use dr_proto::pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::enrol::{Authority, BY_DOCUMENT, Proof};
use super::verify::Verifier;
use super::{Pending, Registry, Session, needs_verification, recently_verified, role_of, role_to_pb};
use crate::domain::events::EventKind;
use crate::domain::model::{Event, InstanceFacts, InstanceRecord, Role, now_ms};
use crate::domain::refusal::RefusalReason;
use crate::store::{SerialState, Store};

/// Serves `AgentService`.
#[derive(Clone)]
pub struct AgentServer {
    pub trust_domain: String,
    pub heartbeat_interval: Duration,
    pub missed_heartbeats: u32,
    pub registry: Registry,
    pub store: Store,
    pub verifier: Verifier,
    pub authority: std::sync::Arc<Authority>,
    /// Events to record (the crate root forwards them to the notifier).
    pub events: mpsc::UnboundedSender<Event>,
}

impl AgentServer {
    fn emit(&self, site: &str, kind: EventKind, severity: &str, summary: String, evidence: serde_json::Value) {
        let _ = self.events.send(Event::new(site, kind, severity, summary, evidence, ""));
    }
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

fn internal(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "agent stream: store error");
    Status::internal(e.to_string())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentServer {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let chain = request.peer_certs();
        let leaf = chain.as_ref().and_then(|c| c.first().map(|d| d.as_ref().to_vec()));
        // Every refusal of the stream is recorded for the site the
        // certificate names (`agents::refusals`), besides the log line.
        let refused = |site: &str, reason: RefusalReason, identity: &str, detail: &str| {
            self.registry.refusals().record_stream(site, reason, leaf.as_deref(), &peer, identity, detail);
        };
        let identity = peer_identity(&request).map_err(|e| {
            tracing::warn!(%peer, error = %e, "agent stream refused");
            refused("", RefusalReason::NotASite, "", &e.to_string());
            Status::unauthenticated(e.to_string())
        })?;
        let cert_site = identity
            .require_site(&self.trust_domain)
            .map_err(|e| {
                tracing::warn!(%peer, %identity, error = %e, "agent stream refused");
                match &identity.role {
                    IdentityRole::Site(site) | IdentityRole::Instance { site, .. } => {
                        refused(site, RefusalReason::WrongTrustDomain, &identity.to_string(), &e.to_string())
                    }
                    IdentityRole::Operator(_) => refused("", RefusalReason::NotASite, &identity.to_string(), &e.to_string()),
                }
                Status::permission_denied(e.to_string())
            })?
            .to_owned();
        let Some(site) = self.store.site(cert_site.clone()).await.map_err(internal)? else {
            tracing::warn!(%peer, site = %cert_site, "agent stream refused: site not configured");
            let why = format!("site `{cert_site}` is not configured on this controller");
            refused(&cert_site, RefusalReason::UnknownSite, &identity.to_string(), &why);
            return Err(Status::permission_denied(why));
        };
        let cert_not_after_ms = dr_proto::identity::peer_not_after_ms(&request).unwrap_or(0);
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
            let why = format!("Hello names site `{}` but the certificate is for site `{cert_site}`", hello.site_id);
            refused(&cert_site, RefusalReason::WrongSite, &identity.to_string(), &why);
            return Err(Status::permission_denied(why));
        }
        let facts = facts_from_pb(hello.facts);
        if !crate::config::is_instance_id(&facts.instance_id) {
            tracing::warn!(%peer, site = %cert_site, instance = %facts.instance_id, "agent stream refused: not an instance id");
            return Err(Status::invalid_argument(format!("`{}` is not an EC2 instance id", facts.instance_id)));
        }
        let cert_serial = leaf.as_deref().and_then(crate::pki::ca::serial_of).unwrap_or_default();
        // Who may hold this instance's session: the identity rules of
        // `agents::enrol`. Each refusal is recorded like a TLS refusal.
        let refuse = |reason: RefusalReason, why: String, status: fn(String) -> Status| {
            tracing::warn!(%peer, site = %cert_site, instance = %facts.instance_id, reason = reason.as_str(), %why, "agent stream refused");
            refused(&cert_site, reason, &identity.to_string(), &why);
            status(why)
        };
        let attestation = match &identity.role {
            IdentityRole::Instance { instance, .. } => {
                if *instance != facts.instance_id {
                    let why = format!("the Hello names instance {} but the certificate is for instance {instance}", facts.instance_id);
                    return Err(refuse(RefusalReason::NoProof, why, Status::permission_denied));
                }
                let revocations = self.store.revocations().await.map_err(internal)?;
                for key in [String::new(), cert_serial.clone()] {
                    if let Some(reason) = revocations.get(&(cert_site.clone(), key.clone())) {
                        let what =
                            if key.is_empty() { format!("site `{cert_site}` is revoked") } else { format!("certificate {key} is revoked") };
                        return Err(refuse(RefusalReason::Revoked, format!("{what}: {reason}"), Status::permission_denied));
                    }
                }
                match self.store.present_serial(cert_site.clone(), instance.clone(), cert_serial.clone()).await.map_err(internal)? {
                    SerialState::Current => {}
                    SerialState::Promoted => {
                        tracing::info!(site = %cert_site, %instance, serial = %cert_serial, "agent connected with its renewed certificate")
                    }
                    SerialState::Superseded { current } => {
                        let why = format!("certificate {cert_serial} was superseded by {current} (an older copy of this instance's key)");
                        return Err(refuse(RefusalReason::Superseded, why, Status::permission_denied));
                    }
                    SerialState::Unknown => {
                        let why = format!("instance {instance} never enrolled with this controller (certificate {cert_serial})");
                        return Err(refuse(RefusalReason::Superseded, why, Status::permission_denied));
                    }
                }
                let record = self.store.agent_cert(cert_site.clone(), instance.clone()).await.map_err(internal)?;
                let attestation = record.map(|r| r.attestation).unwrap_or_default();
                let proof = Proof::from_pb(hello.proof);
                if attestation == BY_DOCUMENT {
                    if let Err(why) = self.authority.check_session_proof(&self.store, &site, instance, &proof).await {
                        self.emit(
                            &cert_site,
                            EventKind::AgentIdentityConflict,
                            "critical",
                            format!("an agent with instance {instance}'s certificate could not prove it runs there: {why}"),
                            serde_json::json!({"instance": instance, "peer": peer, "serial": cert_serial, "why": why}),
                        );
                        return Err(refuse(RefusalReason::NoProof, why, Status::permission_denied));
                    }
                } else if self.registry.live(&cert_site, instance).is_some() {
                    // A token-enrolled instance has no proof to show: a live
                    // session is never displaced; the agent retries once the
                    // old one has timed out.
                    let why = format!("instance {instance} has a live session and this connection carries no proof to take it over");
                    self.emit(
                        &cert_site,
                        EventKind::AgentIdentityConflict,
                        "warning",
                        why.clone(),
                        serde_json::json!({"instance": instance, "peer": peer, "serial": cert_serial}),
                    );
                    return Err(refuse(RefusalReason::Conflict, why, Status::unavailable));
                }
                attestation
            }
            _ if self.authority.allows_site_certificates() => super::enrol::BY_SITE_CERTIFICATE.to_owned(),
            _ => {
                let why = format!(
                    "{identity} is a site-wide certificate: it only lets an agent enrol (pki.allow_site_certificates is off);                      this agent must enrol its instance first"
                );
                return Err(refuse(RefusalReason::EnrolOnly, why, Status::permission_denied));
            }
        };
        let instance = facts.instance_id.clone();
        let known = self.store.instance(cert_site.clone(), instance.clone()).await.map_err(internal)?;
        let now = now_ms();
        // The role comes from the store; EC2 is asked in batches afterwards,
        // never before the Welcome.
        let wanted = role_of(&site, &instance, known.as_ref());
        let role = if needs_verification(&wanted) && !recently_verified(known.as_ref(), &facts.private_ip, now) {
            Role::Pending
        } else {
            wanted.clone()
        };
        let record = InstanceRecord {
            site_id: cert_site.clone(),
            instance_id: instance.clone(),
            role: known.as_ref().map(|k| k.role.clone()).unwrap_or_else(|| "passive".into()),
            operation_id: known.as_ref().map(|k| k.operation_id.clone()).unwrap_or_default(),
            reason: known.as_ref().map(|k| k.reason.clone()).unwrap_or_default(),
            facts: facts.clone(),
            verified_private_ip: known.as_ref().map(|k| k.verified_private_ip.clone()).unwrap_or_default(),
            verified_at_ms: known.as_ref().map(|k| k.verified_at_ms).unwrap_or(0),
            connected: true,
            connected_at_ms: now,
            last_seen_ms: now,
            peer: peer.clone(),
            cert_not_after_ms,
        };
        self.store.put_instance(record.clone()).await.map_err(internal)?;
        match &role {
            Role::Primary => {
                tracing::info!(site = %cert_site, %instance, %peer, version = %hello.agent_version, "agent connected as primary")
            }
            Role::Pending => {
                tracing::info!(site = %cert_site, %instance, %peer, wanted = wanted.name(), "agent connected; its instance is verified with EC2 before it gets work")
            }
            other if other.takes_work() => {
                tracing::info!(site = %cert_site, %instance, %peer, role = other.name(), operation = other.operation_id(), "agent connected")
            }
            other => {
                tracing::warn!(site = %cert_site, %instance, %peer, role = other.name(), reason = other.reason(), "agent connected; it gets no work")
            }
        }

        let (tx, rx) = mpsc::channel(64);
        let (name, reason, operation_id) = role_to_pb(&role);
        let welcome = pb::Welcome { heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32, role: name, reason, operation_id };
        tx.send(Ok(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Welcome(welcome)) }))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))?;
        let pending: Pending = Default::default();
        let serial = self.registry.next_serial();
        // The loop below answers renewals through a weak sender: the
        // registry holds the only strong one, so closing the session (a
        // revocation, a newer session) ends the stream.
        let weak_tx = tx.downgrade();
        self.registry.register(Session {
            serial,
            tx,
            pending,
            role: role.clone(),
            record,
            cert_serial: cert_serial.clone(),
            attestation: attestation.clone(),
            chain: chain.clone(),
        });
        // A CA rotation: an agent that has not stored the current roots
        // gets them now.
        let trust = self.authority.trust_state();
        if trust.rotating
            && self.store.trust_ack(cert_site.clone(), instance.clone()).await.ok().flatten().as_deref() != Some(trust.id.as_str())
        {
            let bundle = pb::TrustBundle { id: trust.id.clone(), roots_pem: trust.roots_pem.clone(), renew_now: trust.renew_now };
            if let Some(tx) = weak_tx.upgrade() {
                let _ = tx.send(Ok(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::TrustBundle(bundle)) })).await;
            }
        }
        if role == Role::Pending {
            self.verifier.enqueue(cert_site.clone(), instance.clone(), facts.private_ip.clone());
        }

        let me = self.clone();
        let silence = self.heartbeat_interval * self.missed_heartbeats;
        // The agent's first heartbeat comes one interval after it received
        // the Welcome, which may take a while in a reconnect storm: the first
        // wait gets one more interval, so a fresh stream is not closed for a
        // delay of our own.
        let first_wait = silence + self.heartbeat_interval;
        tokio::spawn(async move {
            // One timer per stream, re-armed only when it fires (once per
            // silence window), not at every message: at 10,000 agents that
            // is 2,000 timer insertions a second less.
            let mut last = tokio::time::Instant::now();
            let mut allowed = first_wait;
            let mut agent_renewal_error = String::new();
            let deadline = tokio::time::sleep(first_wait);
            tokio::pin!(deadline);
            let reason = loop {
                tokio::select! {
                    m = inbound.next() => match m {
                        None => break "the agent closed the stream".to_owned(),
                        Some(Err(status)) => break format!("stream error: {}", status.message()),
                        Some(Ok(msg)) => {
                            (last, allowed) = (tokio::time::Instant::now(), silence);
                            match msg.msg {
                                Some(pb::agent_message::Msg::Heartbeat(hb)) => {
                                    me.registry.touch(&cert_site, &instance, serial, Some(hb.app_state));
                                    // The agent's side of a failing renewal,
                                    // recorded once per new reason.
                                    if hb.renewal_error != agent_renewal_error {
                                        agent_renewal_error = hb.renewal_error.clone();
                                        let why = if hb.renewal_error.is_empty() { String::new() } else { format!("on the agent: {}", hb.renewal_error) };
                                        if let Err(e) = me.store.set_renewal_error(cert_site.clone(), instance.clone(), why).await {
                                            tracing::error!(site = %cert_site, %instance, error = %e, "cannot record the agent's renewal error");
                                        }
                                    }
                                }
                                Some(pb::agent_message::Msg::Result(result)) => {
                                    me.registry.touch(&cert_site, &instance, serial, None);
                                    me.registry.answer(&cert_site, &instance, serial, result);
                                }
                                Some(pb::agent_message::Msg::Renew(r)) => {
                                    me.registry.touch(&cert_site, &instance, serial, None);
                                    // A new attempt: its outcome on the agent
                                    // comes with the next heartbeats.
                                    agent_renewal_error.clear();
                                    let (me, identity, weak_tx) = (me.clone(), identity.clone(), weak_tx.clone());
                                    tokio::spawn(async move { me.renew(identity, r.csr_der, weak_tx).await });
                                }
                                Some(pb::agent_message::Msg::TrustAck(ack)) => {
                                    tracing::info!(site = %cert_site, %instance, bundle = %ack.id, "the agent stored the trust bundle");
                                    if let Err(e) = me.store.put_trust_ack(cert_site.clone(), instance.clone(), ack.id, now_ms()).await {
                                        tracing::error!(site = %cert_site, %instance, error = %e, "cannot record the trust bundle's acknowledgement");
                                    }
                                }
                                Some(pb::agent_message::Msg::Hello(_)) | None => {
                                    tracing::warn!(site = %cert_site, %instance, "unexpected message on an established stream; ignored");
                                }
                            }
                        }
                    },
                    () = &mut deadline => {
                        let (now, due) = (tokio::time::Instant::now(), last + allowed);
                        if now >= due {
                            break format!("no message for {:?}", now - last);
                        }
                        deadline.as_mut().reset(due);
                    }
                }
            };
            if let Some(record) = me.registry.unregister(&cert_site, &instance, serial)
                && let Err(e) = me.store.set_disconnected(cert_site.clone(), instance.clone(), record.last_seen_ms).await
            {
                tracing::error!(site = %cert_site, %instance, error = %e, "cannot record the agent's disconnection");
            }
            tracing::info!(site = %cert_site, %instance, %reason, "agent disconnected");
        });
        let stream: SessionStream = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }

    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        // No certificate is allowed here only: an agent whose certificates
        // all expired enrols with its proof alone.
        let caller = match peer_identity(&request) {
            Ok(id) => Some(id),
            Err(dr_proto::identity::IdentityError::NoCertificate) => None,
            Err(e) => return Err(Status::unauthenticated(e.to_string())),
        };
        let req = request.into_inner();
        let proof = Proof::from_pb(req.proof);
        let by = match &proof {
            Proof::Document { .. } => "instance identity document",
            Proof::Token(_) => "one-time token",
            Proof::None => "no proof",
        };
        use std::sync::atomic::Ordering::Relaxed;
        match self.authority.enrol(&self.store, caller.as_ref(), &req.site_id, &req.instance_id, &req.csr_der, proof).await {
            Ok(enrolled) => {
                self.authority.counters.enrolled.fetch_add(1, Relaxed);
                tracing::info!(site = %req.site_id, instance = %req.instance_id, %peer, serial = %enrolled.issued.serial, by, "instance enrolled");
                self.emit(
                    &req.site_id,
                    EventKind::AgentEnrolled,
                    "info",
                    format!("instance {} enrolled ({by}); certificate {} until {}", req.instance_id, enrolled.issued.serial, crate::pki::ca::stamp(enrolled.issued.not_after_ms)),
                    serde_json::json!({"instance": req.instance_id, "serial": enrolled.issued.serial, "attestation": enrolled.attestation, "peer": peer}),
                );
                Ok(Response::new(pb::EnrollReply {
                    cert_chain_pem: enrolled.issued.chain_pem,
                    trust_bundle_pem: enrolled.trust_bundle_pem,
                }))
            }
            Err(e) => {
                self.authority.counters.enrol_refused.fetch_add(1, Relaxed);
                tracing::warn!(site = %req.site_id, instance = %req.instance_id, %peer, by, error = %e, "enrolment refused");
                if !req.site_id.is_empty() {
                    let detail = format!("enrolment of instance {} refused: {e}", req.instance_id);
                    self.registry.refusals().record_stream(&req.site_id, RefusalReason::NoProof, None, &peer, "", &detail);
                }
                Err(e.into())
            }
        }
    }
}

impl AgentServer {
    /// Signs a renewal for the stream's identity, records it, answers.
    async fn renew(
        &self,
        identity: dr_proto::identity::Identity,
        csr_der: Vec<u8>,
        tx: mpsc::WeakSender<Result<pb::ControllerMessage, Status>>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let (site, instance) = match &identity.role {
            IdentityRole::Instance { site, instance } => (site.clone(), instance.clone()),
            IdentityRole::Site(site) => (site.clone(), String::new()),
            IdentityRole::Operator(_) => return,
        };
        let reply = match self.authority.renew(&self.store, &identity, &csr_der).await {
            Ok(issued) => {
                self.authority.counters.renewed.fetch_add(1, Relaxed);
                tracing::info!(%site, %instance, serial = %issued.serial, until = %crate::pki::ca::stamp(issued.not_after_ms), "certificate renewed");
                // Test fault point: killed between signing (recorded as the
                // instance's next certificate) and answering.
                crate::engine::faults::crash_point("renew.after_sign");
                pb::RenewReply { cert_chain_pem: issued.chain_pem, error: String::new(), trust_bundle_pem: self.authority.trust_bundle() }
            }
            Err(why) => {
                self.authority.counters.renew_failed.fetch_add(1, Relaxed);
                tracing::warn!(%site, %instance, error = %why, "certificate renewal failed");
                if !instance.is_empty() {
                    let _ = self.store.set_renewal_error(site.clone(), instance.clone(), why.clone()).await;
                }
                self.emit(
                    &site,
                    EventKind::AgentRenewalFailed,
                    "warning",
                    format!("renewal of instance {instance}'s certificate failed: {why}"),
                    serde_json::json!({"instance": instance, "why": why}),
                );
                pb::RenewReply { cert_chain_pem: String::new(), error: why, trust_bundle_pem: String::new() }
            }
        };
        if let Some(tx) = tx.upgrade() {
            let _ = tx.send(Ok(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Renewed(reply)) })).await;
        }
    }
}
