//! Replicated app lifecycle steps: stop and start with a deadline and
//! progress, and setting the installation's hostname (app-config item).

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct StopArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct HostnameArgs {
    #[command(flatten)]
    pub common: Common,
    /// The hostname the installation must answer on.
    #[arg(long)]
    pub hostname: String,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn app_stop_cli(args: StopArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}

pub async fn app_start_cli(args: StartArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}

pub async fn set_hostname_cli(args: HostnameArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
