//! dr-controller: parse the command line, load the config, then run the
//! daemon until SIGTERM (the default), or check AWS permissions (`preflight`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Disaster-recovery controller for CircleCI Server services machines.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); see deploy/controller.example.toml.
    #[arg(long, short, env = "DR_CONTROLLER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "DR_LOG_FORMAT", global = true)]
    log_format: dr_controller::logging::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default when no command is given).
    Run,
    /// Check, without changing anything, that the AWS identity has every
    /// permission each configured site needs (EC2 DryRun on every mutating
    /// call, the describes, the role assumptions). Exit 1 if one is denied.
    Preflight {
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let command = args.command.unwrap_or(Command::Run);
    let level = if matches!(command, Command::Run) { "info" } else { "warn" };
    dr_controller::logging::init(args.log_format, level);
    let Some(path) = args.config else {
        eprintln!("dr-controller: no configuration: pass --config FILE (or set DR_CONTROLLER_CONFIG)");
        return ExitCode::from(2);
    };
    let config = match dr_controller::config::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("dr-controller: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime can start");
    match command {
        Command::Run => match runtime.block_on(dr_controller::run(config, dr_controller::server::shutdown_signal())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "dr-controller failed");
                eprintln!("dr-controller: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Preflight { site } => {
            let checks = match runtime.block_on(dr_controller::preflight::run(&config, site.as_deref())) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dr-controller: {e}");
                    return ExitCode::from(2);
                }
            };
            for check in &checks {
                println!("{check}");
            }
            let denied = checks.iter().filter(|c| matches!(c.verdict, dr_controller::preflight::Verdict::Denied(_))).count();
            let unchecked =
                checks.iter().filter(|c| matches!(c.verdict, dr_controller::preflight::Verdict::NotChecked(_))).count();
            println!("preflight: {} checks, {denied} denied, {unchecked} not checked", checks.len());
            if dr_controller::preflight::all_allowed(&checks) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}
