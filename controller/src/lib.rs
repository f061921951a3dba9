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
    let tls = dr_proto::tls::server_config_observed(&config.tls.files(), Some(observer))?;
    let store = store::Store::open(&config.store.path).await?;
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
    let ec2 = Arc::new(cloud::Ec2Clients::new(config.aws.clone()));
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
    let grace = config.server.heartbeat_interval * (config.server.missed_heartbeats + 1);
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
    }
    let verifier = agents::verify::Verifier::start(store.clone(), registry.clone(), ec2.clone());
    if let Some(addr) = config.metrics.listen {
        let (engine, registry, tasks) = (engine.clone(), registry.clone(), tasks.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, engine, registry, tasks).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }

    let agent_service = agents::service::AgentServer {
        trust_domain: config.tls.trust_domain.clone(),
        heartbeat_interval: config.server.heartbeat_interval,
        missed_heartbeats: config.server.missed_heartbeats,
        registry: registry.clone(),
        store: store.clone(),
        verifier,
    };
    let admin_service = admin::AdminServer {
        trust_domain: config.tls.trust_domain.clone(),
        store: store.clone(),
        registry: registry.clone(),
        engine,
        notifier,
        fences,
        health_interval: config.health.interval,
    };

    let listener = server::bind(config.server.listen, config.server.listen_backlog)?;
    let addr = listener.local_addr()?;
    let incoming = server::tls_incoming(listener, tls, config.server.handshake_timeout);
    tracing::info!(%addr, sites = config.sites.len(), resumed, trust_domain = %config.tls.trust_domain, "dr-controller listening");

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
        _ = shutdown => {}
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
