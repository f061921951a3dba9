//! Draining Nomad builder nodes through Nomad's HTTP API, and undraining.

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct UndrainArgs {
    #[command(flatten)]
    pub common: Common,
}

pub async fn drain_cli(args: DrainArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}

pub async fn undrain_cli(args: UndrainArgs) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
