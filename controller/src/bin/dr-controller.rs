//! dr-controller: parse the command line, load the config, run until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Disaster-recovery controller for CircleCI Server services machines.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); see deploy/controller.example.toml.
    #[arg(long, short, env = "DR_CONTROLLER_CONFIG")]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "DR_LOG_FORMAT")]
    log_format: dr_controller::logging::LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    dr_controller::logging::init(args.log_format, "info");
    let config = match dr_controller::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("dr-controller: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime can start");
    match runtime.block_on(dr_controller::run(config, dr_controller::server::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "dr-controller failed");
            eprintln!("dr-controller: {e}");
            ExitCode::FAILURE
        }
    }
}
