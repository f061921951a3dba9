//! The hand-run subcommands (`app-status`, `facts`) and their output.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::facts::{self, FactsError, InstanceFacts};
use crate::imds::{ImdsClient, ImdsError};
use crate::replicated::{AppStatus, ReplicatedError};
use crate::steps::{Action, Executor, Outcome, StepError};

/// How subcommands print their result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
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

/// Options every hand-run step takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Common {
    /// Configuration file (TOML); defaults apply without it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Act on a mounted copy of a machine's disk instead of "/" (overrides `root`).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Output for humans (default) or scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// What a hand-run step returns to main: the text to print, or an exit code
/// and a message (1: the step failed; 2: bad configuration or input; 3: a
/// safety rule refused the step).
pub type CliResult = Result<String, (u8, String)>;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INPUT: u8 = 2;
pub const EXIT_REFUSED: u8 = 3;

impl Common {
    /// The configuration with `--root` applied, validated.
    pub fn load(&self) -> Result<Config, (u8, String)> {
        let mut config = Config::load_optional(self.config.as_deref()).map_err(|e| (EXIT_INPUT, e.to_string()))?;
        if let Some(root) = &self.root {
            config.root = root.clone();
        }
        config.validate("command line").map_err(|e| (EXIT_INPUT, e.to_string()))?;
        Ok(config)
    }

    /// Renders a report: JSON as is, or the human text.
    pub fn render<T: Serialize>(&self, report: &T, human: impl FnOnce(&T) -> String) -> String {
        match self.output {
            OutputFormat::Json => {
                let mut s = serde_json::to_string_pretty(report).expect("reports serialize");
                s.push('\n');
                s
            }
            OutputFormat::Human => human(report),
        }
    }
}

/// Runs the app-status step by hand.
pub async fn app_status(config: &Config) -> Result<AppStatus, CommandError> {
    let executor = Executor::new(std::sync::Arc::new(config.clone()));
    match executor.execute(&Action::AppStatus, None).await? {
        Outcome::AppStatus(s) => Ok(s),
        Outcome::Report { .. } => unreachable!("app status answers with an AppStatus"),
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
