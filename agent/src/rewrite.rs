//! Rewriting the old private/public IPs in the Replicated environment files.

use crate::commands::{CliResult, Common};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// OLD=NEW private IP (repeatable).
    #[arg(long = "private")]
    pub private: Vec<String>,
    /// OLD=NEW public IP (repeatable).
    #[arg(long = "public")]
    pub public: Vec<String>,
    /// Print a unified diff; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn cli(args: Args) -> CliResult {
    let _ = args;
    Err((crate::commands::EXIT_FAILED, "not implemented yet".to_owned()))
}
