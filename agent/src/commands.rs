//! The hand-run subcommands (`app-status`, `facts`) and their output.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::facts::{self, FactsError, InstanceFacts};
use crate::imds::{ImdsClient, ImdsError};
use crate::replicated::{AppStatus, ReplicatedError, Replicatedctl};
use crate::steps::{Action, Executor, Outcome, StepError};

/// How subcommands print their result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error(transparent)]
    Facts(#[from] FactsError),
}

/// Runs the app-status step by hand.
pub async fn app_status(config: &Config) -> Result<AppStatus, CommandError> {
    let executor = Executor::new(Replicatedctl::new(
        config.replicated.replicatedctl.clone(),
        config.replicated.command_timeout,
    ));
    match executor.execute(&Action::AppStatus, None).await? {
        Outcome::AppStatus(s) => Ok(s),
    }
}

#[derive(Serialize)]
struct AppStatusJson<'a> {
    state: &'a str,
    is_transitioning: bool,
    desired_state: &'a str,
    up: bool,
}

/// Renders an app status for stdout.
pub fn render_app_status(s: &AppStatus, format: OutputFormat) -> String {
    match format {
        OutputFormat::Human => format!(
            "State:           {}\nIsTransitioning: {}\nDesiredState:    {}\n",
            s.state, s.is_transitioning, s.desired_state
        ),
        OutputFormat::Json => {
            let j = AppStatusJson {
                state: &s.state,
                is_transitioning: s.is_transitioning,
                desired_state: &s.desired_state,
                up: s.is_up(),
            };
            format!("{}\n", serde_json::to_string(&j).expect("status serializes"))
        }
    }
}

/// Gathers the facts a Hello would carry.
pub async fn gather_facts(config: &Config) -> Result<InstanceFacts, CommandError> {
    let imds = ImdsClient::new(&config.imds.endpoint, config.imds.timeout)?;
    let app_state = match app_status(config).await {
        Ok(s) => s.state,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the app state");
            "unknown".to_owned()
        }
    };
    Ok(facts::gather(&imds, &config.root, Path::new(facts::BOOT_ID_PATH), app_state).await?)
}

/// Renders facts for stdout.
pub fn render_facts(f: &InstanceFacts, format: OutputFormat) -> String {
    match format {
        OutputFormat::Human => format!(
            "Instance ID: {}\nPrivate IP:  {}\nPublic IP:   {}\nBoot ID:     {}\nOS family:   {}\nApp state:   {}\n",
            f.instance_id,
            f.private_ip,
            if f.public_ip.is_empty() { "(none)" } else { &f.public_ip },
            f.boot_id,
            f.os_family.as_str(),
            f.app_state
        ),
        OutputFormat::Json => format!("{}\n", serde_json::to_string(f).expect("facts serialize")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let s = AppStatus { state: "started".into(), is_transitioning: false, desired_state: "started".into() };
        assert!(render_app_status(&s, OutputFormat::Human).contains("IsTransitioning: false"));
        let v: serde_json::Value =
            serde_json::from_str(&render_app_status(&s, OutputFormat::Json)).expect("json output");
        assert_eq!(v["up"], true);
        let f = InstanceFacts {
            instance_id: "i-0abc".into(),
            private_ip: "10.0.0.5".into(),
            public_ip: String::new(),
            boot_id: "b".into(),
            os_family: facts::OsFamily::Debian,
            app_state: "unknown".into(),
        };
        assert!(render_facts(&f, OutputFormat::Human).contains("(none)"));
        let v: serde_json::Value = serde_json::from_str(&render_facts(&f, OutputFormat::Json)).expect("json output");
        assert_eq!(v["os_family"], "debian");
        assert_eq!(v["public_ip"], "");
    }
}
