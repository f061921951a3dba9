//! dr-controller: schedules, EC2 calls and the state of every operation;
//! directs the agents over mutual-TLS gRPC. See ARCHITECTURE.md for the map.

#![forbid(unsafe_code)]

pub mod agents;
pub mod api;
pub mod cloud;
pub mod config;
pub mod domain;
pub mod engine;
#[cfg(test)]
mod layering;
pub mod logging;
pub mod pki;
pub mod reconcilers;
pub mod store;
#[cfg(test)]
pub mod testkit;
pub mod workflows;

use std::future::Future;
use std::sync::Arc;

use dr_proto::pb::admin_service_server::AdminServiceServer;
use dr_proto::pb::agent_service_server::AgentServiceServer;

use crate::api::{admin, metrics, server};
use crate::config::Config;
use crate::domain::model::Site;
use crate::reconcilers::catalog;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error("TLS: {0}")]
    Tls(#[from] dr_proto::tls::TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("[pki]: {0}")]
    Pki(String),
    #[error("stepped down: {0}")]
    LostLease(String),
}

/// The task serving a standby's answers (`api::server::serve_standby`).
type StandbyServer = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Stops a standby's server: its connections carry nothing that needs
/// finishing, so those still open after a moment are cut.
async fn stop_standby(stop_tx: tokio::sync::oneshot::Sender<()>, mut standby: StandbyServer) {
    let _ = stop_tx.send(());
    if tokio::time::timeout(std::time::Duration::from_millis(200), &mut standby).await.is_err() {
        tracing::debug!("closing the standby's connections");
        standby.abort();
        let _ = standby.await;
    }
}

/// A replica's name in the lease when `[store] replica_id` is not set.
fn default_replica_id() -> String {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "controller".into());
    format!("{host}-{}", std::process::id())
}

/// The controller's certificate authority from `[pki]`: the intermediate
/// (required unless site-wide certificates may still hold sessions), the
/// AWS certificates of instance identity documents, the roots agents trust.
fn authority(config: &Config) -> Result<agents::enrol::Authority, ControllerError> {
    let p = &config.pki;
    let signer = match (&p.intermediate_cert, &p.intermediate_key) {
        (Some(cert), Some(key)) => {
            Some(pki::Signer::load(cert, key, &config.tls.trust_domain).map_err(|e| ControllerError::Pki(e.to_string()))?)
        }
        _ if p.allow_site_certificates => {
            tracing::warn!(
                "no [pki] intermediate_cert: agents cannot enrol; site-wide certificates hold their sessions (pki.allow_site_certificates)"
            );
            None
        }
        _ => {
            return Err(ControllerError::Pki(
                "intermediate_cert and intermediate_key are required (make them with `drctl pki intermediate`), \
                 or set allow_site_certificates = true while the fleet moves over"
                    .into(),
            ));
        }
    };
    let iid = match &p.instance_identity_certificates {
        Some(path) => Some(pki::IidVerifier::load(path).map_err(|e| ControllerError::Pki(e.to_string()))?),
        None => {
            tracing::warn!(
                "no pki.instance_identity_certificates: instances can enrol only with one-time tokens (`drctl allow-enrol SITE INSTANCE --token`)"
            );
            None
        }
    };
    let bundle = std::fs::read_to_string(&config.tls.ca)
        .map_err(|e| ControllerError::Pki(format!("cannot read {}: {e}", config.tls.ca.display())))?;
    Ok(agents::enrol::Authority::new(config.tls.trust_domain.clone(), signer, iid, config.pki.clone(), bundle))
}

/// The store `[store]` names: an SQLite file or a PostgreSQL database
/// (its password and TLS roots read now).
pub fn store_location(c: &config::StoreConfig) -> Result<store::Location, config::ConfigError> {
    let invalid = |key: String, message: String| config::ConfigError::Invalid { path: "config".into(), key, message };
    match c.target().map_err(|(k, m)| invalid(k, m))? {
        config::StoreTarget::Sqlite(path) => Ok(store::Location::Sqlite(path)),
        config::StoreTarget::Postgres { url, password, ca_pem } => store::PgTarget::new(&url, password, ca_pem.as_deref())
            .map(|t| store::Location::Postgres(Box::new(t)))
            .map_err(|m| invalid("store.url".into(), m)),
    }
}

/// Runs the controller until `shutdown` resolves: opens the store, adds the
/// configured sites, resumes unfinished operations, serves both services on
/// one TLS listener, and on shutdown ends every agent stream and waits at
/// most `server.shutdown_grace` for the rest.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
    dr_proto::tls::install_crypto_provider();
    let registry = agents::Registry::default();
    // Refused agent certificates are recorded per site (after the refusal).
    let observer: Arc<dyn dr_proto::tls::RefusalObserver> = Arc::new(registry.refusals().clone());
    let authority = Arc::new(authority(&config)?);
    let (own_chain, own_key) = reconcilers::certs::load_own_certificate(&config.tls.cert, &config.tls.key)?;
    // A client may come without a certificate: an agent whose certificates
    // all expired enrols with its instance identity document alone. Every
    // other call (sessions, the admin API) refuses a caller without one.
    let server_tls = dr_proto::tls::ServerTls::new(
        dr_proto::tls::load_certs(&config.tls.ca)?,
        own_chain,
        own_key,
        Some(observer),
        dr_proto::tls::ClientAuth::Optional,
    )?;
    let tls = server_tls.config.clone();
    let own = reconcilers::certs::OwnCert {
        tls: server_tls.clone(),
        cert_path: config.tls.cert.clone(),
        key_path: config.tls.key.clone(),
        lifetime: config.pki.controller_cert_lifetime,
    };
    let location = store_location(&config.store)?;
    // SQLite has no leader: one controller per file (held until we return).
    let _sqlite_lock = match &location {
        store::Location::Sqlite(path) => Some(store::SqliteLock::acquire(path)?),
        store::Location::Postgres(_) => None,
    };
    let store = store::Store::open_at(location).await?;
    tokio::pin!(shutdown);
    // A replica binds its address first: it answers as a standby there,
    // and leads there (the same port, also when the config says port 0).
    let (leadership, mut standby_listener, listen_at) = match store.engine() {
        store::sql::Engine::Sqlite => (store::lease::Leadership::single(), None, config.server.listen),
        store::sql::Engine::Postgres => {
            let listener = server::bind(config.server.listen, config.server.listen_backlog)?;
            let bound = listener.local_addr()?;
            let leadership = store::lease::Leadership::replica(
                config.store.replica_id.clone().unwrap_or_else(default_replica_id),
                config.store.advertise.clone().unwrap_or_else(|| bound.to_string()),
                store::lease::LeaseTimings::from_ttl(config.store.lease_ttl),
            );
            (leadership, Some(listener), bound)
        }
    };
    let replica = metrics::Replica { leadership: leadership.clone(), leader: Default::default(), leading: Default::default() };
    if let Some(addr) = config.metrics.listen {
        let replica = replica.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, replica).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    // A shared (PostgreSQL) store: wait as a standby until this replica
    // holds the leader lease, answering every agent and drctl with the
    // leader's address; from then on every store call is fenced by the
    // lease, and losing it ends this process (systemd starts it again, as
    // a standby). Nothing below runs on a standby.
    let lease = if let Some(listener) = standby_listener.take() {
        let lease = store::lease::Lease::new(store.another_session_on_own_thread("dr-lease").await?, leadership.clone());
        tracing::info!(replica = %leadership.id(), addr = %listen_at, advertise = %leadership.address(), store = %store.path(),
            "standby: waiting for the leader lease");
        let waited = std::time::Instant::now();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let standby = tokio::spawn(server::serve_standby(
            listener,
            tls.clone(),
            config.server.handshake_timeout,
            replica.leader.clone(),
            leadership.timings().poll,
            async {
                let _ = stop_rx.await;
            },
        ));
        let won = tokio::select! {
            epoch = lease.campaign(|row| {
                *replica.leader.lock().unwrap_or_else(|p| p.into_inner()) = store::lease::LeaderSeen::from_row(row);
            }) => Some(epoch),
            _ = &mut shutdown => None,
        };
        // The standby's listener closes before the leader's opens (clients
        // refused while it starts back off, which costs a starting leader
        // less than answering them: measured with 10,000 agents).
        stop_standby(stop_tx, standby).await;
        let Some(epoch) = won else { return Ok(()) };
        store.fence_with(leadership.clone());
        tracing::info!(replica = %leadership.id(), epoch, waited_ms = waited.elapsed().as_millis() as u64, "leading: this replica holds the lease");
        Some(lease)
    } else {
        None
    };
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<String>();
    if let Some(lease) = lease.clone() {
        tokio::spawn(async move {
            let why = lease.hold().await;
            let _ = lost_tx.send(why);
        });
    }
    let lease_lost = async move {
        match lost_rx.await {
            Ok(why) => why,
            // No lease (SQLite): never lost.
            Err(_) => std::future::pending().await,
        }
    };
    store.mark_all_disconnected().await?;
    if config.sites.is_empty() {
        tracing::warn!("the configuration names no [[site]]: nothing will be backed up or recovered");
    }
    let configured = config
        .sites
        .iter()
        .map(|s| Site {
            id: s.id.clone(),
            region: config.site_region(s),
            primary_instance_id: s.instance_id.clone(),
            role_arn: s.role_arn.clone(),
        })
        .collect();
    for (s, stored) in config.sites.iter().zip(store.upsert_sites(configured).await?) {
        if stored.primary_instance_id != s.instance_id {
            tracing::info!(site = %s.id, configured = %s.instance_id, primary = %stored.primary_instance_id,
                "the store's primary instance differs from the config's instance_id (a failover happened); the store wins");
        }
    }
    // No AWS request leaves once this replica stops leading (checked
    // just before each is sent; a lone SQLite controller always leads).
    registry.send_only_while(leadership.clone());
    let gate = {
        let leadership = leadership.clone();
        cloud::CallGate::new(move || leadership.check().map(drop).map_err(|e| e.to_string()))
    };
    let ec2 = Arc::new(cloud::Ec2Clients::new(config.aws.clone()).with_gate(gate.clone()));
    catalog::check(&config, &store, &ec2).await?;
    let mut policies = std::collections::HashMap::new();
    for s in &config.sites {
        let policy = config.site_policy(s).map_err(|(key, message)| config::ConfigError::Invalid {
            path: "config".into(),
            key: format!("site `{}` policy.{key}", s.id),
            message,
        })?;
        policies.insert(s.id.clone(), policy);
    }
    let engine = workflows::engine(workflows::Deps {
        store: store.clone(),
        registry: registry.clone(),
        ec2: ec2.clone(),
        backup: config.backup.clone(),
        policies,
        recovery: config.sites.iter().map(|s| (s.id.clone(), s.recovery(config.site_region(s)))).collect(),
        failover: config.failover.clone(),
        drill: config.drill.clone(),
        aws: config.aws.clone(),
        dns: tokio::sync::OnceCell::new(),
        gate,
    });
    let resumed = engine.resume_all().await?;
    // Every background loop is supervised: restarted when it ends or
    // panics, counted in /metrics, reported as `controller.task_restarted`.
    let http = cloud::http::HttpClients::default();
    let notifier = reconcilers::notify::Notifier { store: store.clone(), sinks: std::sync::Arc::new(config.notify.clone()) };
    let tasks = reconcilers::supervisor::Supervisor::new(notifier.clone());
    {
        let (e, tick) = (engine.clone(), config.backup.scheduler_tick);
        tasks.spawn("scheduler", move || reconcilers::scheduler::run(e.clone(), tick));
        let (e, every) = (engine.clone(), config.backup.copy_poll);
        tasks.spawn("copies", move || reconcilers::copies::run(e.clone(), every));
        let (e, every) = (engine.clone(), config.drill.reap_every);
        tasks.spawn("drills", move || reconcilers::drills::run(e.clone(), every));
        let (e, tick) = (engine.clone(), config.backup.scheduler_tick);
        tasks.spawn("spares", move || reconcilers::spares::run(e.clone(), tick));
    }
    // The monitor and the keeper read their state from the store when they
    // are made: a restarted one starts from what was recorded.
    let window = config.server.heartbeat_interval * (config.server.missed_heartbeats + 1);
    // After a takeover every agent is reconnecting from the old leader:
    // no silent agent counts for two heartbeat windows, and at least a
    // minute (a new leader never fails a site over for not having heard
    // from its agent yet).
    let grace = if lease.is_some() { (window * 2).max(std::time::Duration::from_secs(60)) } else { window };
    let monitor = reconcilers::health::Monitor::new(engine.clone(), config.health.clone(), notifier.clone(), http.clone(), grace).await?;
    {
        let first = std::sync::Mutex::new(Some(monitor));
        let (e, h, n, c) = (engine.clone(), config.health.clone(), notifier.clone(), http.clone());
        tasks.spawn("health", move || {
            let first = first.lock().expect("first monitor").take();
            let (e, h, n, c) = (e.clone(), h.clone(), n.clone(), c.clone());
            async move {
                let monitor = match first {
                    Some(m) => m,
                    None => match reconcilers::health::Monitor::new(e, h, n, c, grace).await {
                        Ok(m) => m,
                        Err(err) => panic!("cannot restart the health monitor: {err}"),
                    },
                };
                monitor.run().await
            }
        });
    }
    let fences = reconcilers::fences::Fences::default();
    let keeper = reconcilers::fences::Keeper::new(engine.clone(), notifier.clone(), fences.clone(), config.health.fence_interval).await?;
    {
        let first = std::sync::Mutex::new(Some(keeper));
        let (e, n, f, every) = (engine.clone(), notifier.clone(), fences.clone(), config.health.fence_interval);
        tasks.spawn("fences", move || {
            let first = first.lock().expect("first keeper").take();
            let (e, n, f) = (e.clone(), n.clone(), f.clone());
            async move {
                let keeper = match first {
                    Some(k) => k,
                    None => match reconcilers::fences::Keeper::new(e, n, f, every).await {
                        Ok(k) => k,
                        Err(err) => panic!("cannot restart the fence keeper: {err}"),
                    },
                };
                keeper.run().await
            }
        });
    }
    {
        // Without a [[notify]] webhook there is nothing to deliver: no task.
        if !config.notify.is_empty() {
            let (s, sinks, h) = (store.clone(), std::sync::Arc::new(config.notify.clone()), http.clone());
            tasks.spawn("notify", move || reconcilers::notify::run(s.clone(), sinks.clone(), h.clone(), std::time::Duration::from_secs(1)));
        }
        let (r, n) = (registry.refusals().clone(), notifier.clone());
        tasks.spawn("refusals", move || reconcilers::refusals::run(r.clone(), n.clone()));
        let (s, r, every) = (store.clone(), registry.clone(), config.server.liveness_flush);
        tasks.spawn("liveness", move || agents::flush_liveness(s.clone(), r.clone(), every));
        let own = own.clone();
        let (a, n) = (authority.clone(), notifier.clone());
        tasks.spawn("certificates", move || reconcilers::certs::run(own.clone(), a.clone(), n.clone()));
    }
    // Events of the agent service (enrolments, renewals, identity
    // conflicts) are recorded by one forwarder.
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel::<domain::model::Event>();
    {
        let n = notifier.clone();
        tokio::spawn(async move {
            while let Some(e) = events_rx.recv().await {
                if let Err(err) = n.record(vec![], vec![e]).await {
                    tracing::error!(error = %err, "cannot record an agent event");
                }
            }
        });
    }
    let verifier = agents::verify::Verifier::start(store.clone(), registry.clone(), ec2.clone());
    // A CA rotation in progress is applied again before anything is served.
    let rotator = reconcilers::rotation::Rotator {
        store: store.clone(),
        registry: registry.clone(),
        authority: authority.clone(),
        own: own.clone(),
        configured: authority.signer(),
        dir: config.store.state_dir().join("pki"),
    };
    rotator.resume().await.map_err(ControllerError::Pki)?;
    let _ = replica.leading.set(metrics::Leading {
        engine: engine.clone(),
        registry: registry.clone(),
        tasks: tasks.clone(),
        authority: authority.clone(),
    });

    let agent_service = agents::service::AgentServer {
        trust_domain: config.tls.trust_domain.clone(),
        heartbeat_interval: config.server.heartbeat_interval,
        missed_heartbeats: config.server.missed_heartbeats,
        registry: registry.clone(),
        store: store.clone(),
        verifier,
        authority: authority.clone(),
        events: events_tx,
    };
    let admin_service = admin::AdminServer {
        trust_domain: config.tls.trust_domain.clone(),
        store: store.clone(),
        registry: registry.clone(),
        engine,
        notifier,
        fences,
        health_interval: config.health.interval,
        authority: authority.clone(),
        rotator,
        leadership: leadership.clone(),
    };

    let listener = {
        // The standby's accept loop lets go of the address as soon as it
        // notices its server stopped: give it a moment.
        let mut tries = 0;
        loop {
            match server::bind(listen_at, config.server.listen_backlog) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && lease.is_some() && tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => break other?,
            }
        }
    };
    let addr = listener.local_addr()?;
    let incoming = server::tls_incoming(listener, tls, config.server.handshake_timeout);
    tracing::info!(%addr, sites = config.sites.len(), resumed, trust_domain = %config.tls.trust_domain, "dr-controller listening");
    api::systemd::ready();
    api::systemd::spawn_watchdog(store.clone());

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(agent_service))
        .add_service(AdminServiceServer::new(admin_service))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return Ok(result?),
        _ = &mut shutdown => {}
        why = lease_lost => {
            // Stop at once: no EC2 call, agent command or write from here on.
            tracing::error!(%why, "stepping down: this replica no longer leads");
            return Err(ControllerError::LostLease(why));
        }
    }
    api::systemd::stopping();
    if let Some(lease) = &lease {
        // Hand over first: this replica stops counting on the lease at
        // once (no EC2 call, agent command or write from here on) and a
        // standby takes it on its next poll, while the streams close.
        match lease.release().await {
            Ok(()) => tracing::info!("leader lease released"),
            Err(e) => tracing::warn!(error = %e, "cannot release the leader lease; it expires by itself"),
        }
    }
    // tonic's graceful shutdown waits for open streams (hyper #4170): end the
    // agent streams ourselves and bound the wait.
    registry.close_all();
    let _ = stop_tx.send(());
    let grace = config.server.shutdown_grace;
    match tokio::time::timeout(grace, serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(?grace, "connections still open after the grace period; exiting anyway"),
    }
    tracing::info!("dr-controller stopped");
    Ok(())
}
