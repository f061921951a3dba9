//! Wiping the Nomad server's data dir after a restore.

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn cli(args: Args) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
