//! The admin API (`AdminService`) that drctl talks to. Only operator
//! certificates of our trust domain may call it. Protobuf types end here:
//! everything behind this module works on [`crate::model`] types.

use std::pin::Pin;

use dr_proto::identity::peer_identity;
use dr_proto::pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agents::Registry;
use crate::model::*;
use crate::ops::{Engine, EngineError};
use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct AdminServer {
    pub trust_domain: String,
    pub store: Store,
    pub registry: Registry,
    pub engine: Engine,
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "admin API: store error");
    Status::internal(e.to_string())
}

impl AdminServer {
    /// The caller's operator name, or PermissionDenied.
    fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let identity = peer_identity(request).map_err(|e| {
            tracing::warn!(%peer, error = %e, "admin call refused");
            Status::unauthenticated(e.to_string())
        })?;
        identity.require_operator(&self.trust_domain).map(str::to_owned).map_err(|e| {
            tracing::warn!(%peer, %identity, error = %e, "admin call refused");
            Status::permission_denied(e.to_string())
        })
    }

    fn known_site(&self, site_id: &str) -> Result<Site, Status> {
        self.store.site(site_id).map_err(internal)?.ok_or_else(|| Status::not_found(format!("unknown site `{site_id}`")))
    }

    fn operation(&self, id: &str) -> Result<Operation, Status> {
        self.store.operation(id).map_err(internal)?.ok_or_else(|| Status::not_found(format!("unknown operation `{id}`")))
    }
}

fn facts_to_pb(f: &InstanceFacts) -> pb::InstanceFacts {
    pb::InstanceFacts {
        instance_id: f.instance_id.clone(),
        private_ip: f.private_ip.clone(),
        public_ip: f.public_ip.clone(),
        boot_id: f.boot_id.clone(),
        os_family: f.os_family.clone(),
        app_state: f.app_state.clone(),
    }
}

fn backup_to_pb(b: &Backup) -> pb::Backup {
    pb::Backup {
        site_id: b.site_id.clone(),
        operation_id: b.operation_id.clone(),
        image_id: b.image_id.clone(),
        region: b.region.clone(),
        snapshot_ids: b.snapshot_ids.clone(),
        started_at_ms: b.started_at_ms,
        completed_at_ms: b.completed_at_ms,
        consistency: b.consistency.as_str().to_owned(),
        instance_id: b.instance_id.clone(),
        app_state: b.app_state.clone(),
        state: b.state.as_str().to_owned(),
        fate: b.fate.clone(),
        quiesce: b.quiesce.clone(),
        frozen_ms: b.frozen_ms,
        quiesce_note: b.quiesce_note.clone(),
        copies: b
            .copies
            .iter()
            .map(|c| pb::BackupCopy {
                region: c.region.clone(),
                image_id: c.image_id.clone(),
                state: c.state.as_str().to_owned(),
                attempts: c.attempts,
                error: c.error.clone(),
            })
            .collect(),
    }
}

fn operation_to_pb(op: &Operation) -> pb::Operation {
    pb::Operation {
        id: op.id.clone(),
        kind: op.kind.as_str().to_owned(),
        site_id: op.site_id.clone(),
        state: op.state.as_str().to_owned(),
        error: op.error.clone(),
        created_at_ms: op.created_at_ms,
        updated_at_ms: op.updated_at_ms,
        requested_by: op.requested_by.clone(),
        steps: op
            .steps
            .iter()
            .map(|s| pb::Step {
                name: s.name.clone(),
                state: s.state.as_str().to_owned(),
                started_at_ms: s.started_at_ms,
                finished_at_ms: s.finished_at_ms,
                detail: s.detail.clone(),
                error: s.error.clone(),
                attempts: s.attempts,
                result_json: s.result.as_ref().map(|r| r.to_string()).unwrap_or_default(),
            })
            .collect(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Operation, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminServer {
    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        self.operator(&request)?;
        let mut sites = Vec::new();
        for site in self.store.sites().map_err(internal)? {
            let live = self.registry.live(&site.id).map(|l| l.record);
            let agent = match live {
                Some(a) => Some(a),
                None => self.store.agent(&site.id).map_err(internal)?,
            };
            let last_backup = self
                .store
                .backups(&site.id)
                .map_err(internal)?
                .into_iter()
                .find(|b| b.state == BackupState::Available);
            let policy = self.engine.policy(&site.id);
            let now = now_ms();
            let rpo_target = policy.schedule.as_ref().and_then(|s| s.nominal_interval(now));
            // Late: the newest good backup is older than the target plus the
            // jitter window plus the time a backup may take.
            let late = rpo_target.is_some_and(|t| {
                let allowed = (t + policy.jitter + self.engine.backup.timeout).as_millis() as u64;
                last_backup.as_ref().map_or(true, |b| now.saturating_sub(b.completed_at_ms) > allowed)
            });
            sites.push(pb::SiteStatus {
                site_id: site.id.clone(),
                region: site.region.clone(),
                primary_instance_id: site.primary_instance_id.clone(),
                agent_connected: agent.as_ref().is_some_and(|a| a.connected),
                facts: agent.as_ref().map(|a| facts_to_pb(&a.facts)),
                role: agent.as_ref().map(|a| a.role.clone()).unwrap_or_default(),
                last_heartbeat_ms: agent.as_ref().map(|a| a.last_heartbeat_ms).unwrap_or(0),
                last_backup: last_backup.as_ref().map(backup_to_pb),
                running_operation_id: self.store.running_operation_of(&site.id).map_err(internal)?.unwrap_or_default(),
                schedule: policy.schedule.as_ref().map(|s| s.describe()).unwrap_or_default(),
                rpo_target_ms: rpo_target.map(|t| t.as_millis() as u64).unwrap_or(0),
                late,
                quiesce: policy.quiesce.as_str().to_owned(),
            });
        }
        Ok(Response::new(pb::StatusReply { sites, now_ms: now_ms() }))
    }

    async fn start_backup(
        &self,
        request: Request<pb::StartBackupRequest>,
    ) -> Result<Response<pb::OperationRef>, Status> {
        let operator = self.operator(&request)?;
        let site_id = request.into_inner().site_id;
        match self.engine.start_backup(&site_id, &format!("operator/{operator}")) {
            Ok(op) => Ok(Response::new(pb::OperationRef { operation_id: op.id })),
            Err(EngineError::UnknownSite(s)) => Err(Status::not_found(format!("unknown site `{s}`"))),
            Err(EngineError::Store(StoreError::Busy { site, operation })) => Err(Status::failed_precondition(
                format!("site `{site}` already has a running operation {operation}"),
            )),
            Err(EngineError::Store(e)) => Err(internal(e)),
        }
    }

    async fn get_operation(&self, request: Request<pb::OperationRef>) -> Result<Response<pb::Operation>, Status> {
        self.operator(&request)?;
        Ok(Response::new(operation_to_pb(&self.operation(&request.into_inner().operation_id)?)))
    }

    type WatchOperationStream = WatchStream;

    async fn watch_operation(
        &self,
        request: Request<pb::OperationRef>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        self.operator(&request)?;
        let id = request.into_inner().operation_id;
        // Subscribe before the first read so that no change is missed.
        let mut changes = self.engine.subscribe();
        let first = self.operation(&id)?;
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut current = first;
            loop {
                if tx.send(Ok(operation_to_pb(&current))).await.is_err() || current.state.is_finished() {
                    return;
                }
                // Wait for a change of this operation (or a lag, after which
                // re-reading is the safe answer).
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
                current = match store.operation(&id) {
                    Ok(Some(op)) => op,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
            }
        });
        let stream: WatchStream = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }

    async fn prune(&self, request: Request<pb::PruneRequest>) -> Result<Response<pb::PruneReply>, Status> {
        let operator = self.operator(&request)?;
        let req = request.into_inner();
        let site = self.known_site(&req.site_id)?;
        if !req.dry_run {
            if let Some(op) = self.store.running_operation_of(&site.id).map_err(internal)? {
                return Err(Status::failed_precondition(format!(
                    "site `{}` has a running operation {op}; prune after it ends",
                    site.id
                )));
            }
            tracing::info!(site = %site.id, %operator, "prune requested");
        }
        let decisions = crate::copies::apply_retention(&self.engine, &site, req.dry_run)
            .await
            .map_err(|e| Status::internal(format!("retention failed: {e}")))?;
        Ok(Response::new(pb::PruneReply {
            dry_run: req.dry_run,
            decisions: decisions
                .into_iter()
                .map(|d| pb::RetentionDecision {
                    image_id: d.image_id,
                    completed_at_ms: d.completed_at_ms,
                    keep: d.keep,
                    reason: d.reason,
                })
                .collect(),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsReply>, Status> {
        self.operator(&request)?;
        let site = self.known_site(&request.into_inner().site_id)?;
        let backups = self.store.backups(&site.id).map_err(internal)?;
        Ok(Response::new(pb::ListBackupsReply { backups: backups.iter().map(backup_to_pb).collect() }))
    }
}
