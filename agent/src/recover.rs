//! The whole restore runbook on one machine, in order, each step skipped
//! when already done.

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn cli(args: Args) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
