//! Freezing data file systems (FIFREEZE/FITHAW) under a watchdog that
//! thaws them at the deadline, also when the agent dies.

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct FreezeArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ThawArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct WatchdogArgs {
    #[command(flatten)]
    pub common: Common,
}

pub async fn freeze_cli(args: FreezeArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}

pub async fn thaw_cli(args: ThawArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}

pub async fn watchdog_cli(args: WatchdogArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
