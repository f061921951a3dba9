//! The daemon: the session with the controller ([`session`]), the command
//! journal ([`journal`]), the fence keeper ([`fence`]) and the hand-run
//! reads ([`commands`]). It runs [`crate::steps`] through their executor;
//! it is the only layer that knows the generated protobuf types.

pub(crate) mod commands;
pub(crate) mod credentials;
pub(crate) mod fence;
pub(crate) mod journal;
pub(crate) mod session;

use std::sync::Arc;

use crate::config;
use crate::sys::{facts, identity, imds};

/// Errors that end the daemon before it runs.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Agent(#[from] session::AgentError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub(crate) async fn run_daemon(config: &config::Config, origin: &str) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let settings = config.run_settings(origin)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    tracing::info!(
        site_id = %settings.site_id,
        controller = %settings.controllers[0].url,
        replicas = settings.controllers.len(),
        version = env!("CARGO_PKG_VERSION"),
        "dr-agent starting"
    );
    record_identity(config).await;
    let agent = Arc::new(session::Agent::new(config, settings)?);
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
    };
    agent.run(shutdown).await;
    Ok(())
}

/// Records the instance id and boot id this daemon runs on
/// (state_dir/identity.json), keeping the previous ones when they changed.
/// IMDS down or an unwritable state_dir: logged, the daemon goes on.
async fn record_identity(config: &config::Config) {
    let client = match imds::ImdsClient::new(&config.imds.endpoint, config.imds.timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the IMDS client: identity not recorded");
            return;
        }
    };
    let live = match identity::live(&client, std::path::Path::new(facts::BOOT_ID_PATH)).await {
        Ok((live, imds_down)) => {
            if let Some(why) = imds_down {
                tracing::warn!(error = %why, "IMDS did not answer: recording the boot id only");
            }
            live
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this machine's identity: not recorded");
            return;
        }
    };
    match identity::observe(&config.state_dir, &live) {
        Ok((change, file)) => tracing::info!(?change, current = %file.current,
            restored_from = file.restored_from.as_ref().map(|i| i.to_string()).unwrap_or_default(), "identity recorded"),
        Err(e) => tracing::warn!(error = %e, "cannot record this machine's identity"),
    }
}
