//! Cleaning up builds a backup caught half-way (API v1.1 + one dev-console session).

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// The backup's point in time (RFC 3339): only builds started before it are deleted.
    #[arg(long)]
    pub before: String,
    /// List the candidates; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn cli(args: Args) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
