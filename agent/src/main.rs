//! dr-agent: the services-machine agent. Parses the command line, loads the
//! configuration and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use dr_agent::commands::{self, OutputFormat};
use dr_agent::{app, builds, drain, freeze, health, nomad_state, recover, rewrite};
use dr_agent::config::Config;
use dr_agent::logging::{self, LogFormat};

#[derive(Parser)]
#[command(name = "dr-agent", version, about = "Performs typed, local recovery steps on a CircleCI Server services machine.")]
struct Cli {
    /// Log format (logs go to stderr; RUST_LOG filters).
    #[arg(long, value_enum, default_value_t = LogFmt::Text, global = true)]
    log_format: LogFmt,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: connect to the controller and perform its commands.
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the app-status step by hand and print State, IsTransitioning, DesiredState.
    AppStatus {
        /// Configuration file (TOML); defaults apply without it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Path of replicatedctl (overrides the configuration).
        #[arg(long)]
        replicatedctl: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Print this instance's facts (what the Hello to the controller carries).
    Facts {
        /// Configuration file (TOML); defaults apply without it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// IMDS endpoint, e.g. http://127.0.0.1:8080 (overrides the configuration).
        #[arg(long)]
        imds_endpoint: Option<String>,
        /// Root of the machine's filesystem (overrides the configuration).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Path of replicatedctl, for the app state (overrides the configuration).
        #[arg(long)]
        replicatedctl: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Stop the Replicated app and wait until it is stopped.
    AppStop(app::StopArgs),
    /// Start the Replicated app and wait until it is started.
    AppStart(app::StartArgs),
    /// Set the installation's hostname (app-config item) and apply it, if it differs.
    SetHostname(app::HostnameArgs),
    /// Replace old private/public IPs in the Replicated environment files.
    RewriteAddresses(rewrite::Args),
    /// Remove the Nomad server's data dir (app stopped, no Nomad running).
    WipeNomad(nomad_state::Args),
    /// Delete builds a backup caught half-way, in one dev-console session.
    CleanupBuilds(builds::Args),
    /// GET the frontend's health check (circleci.health_url) from this machine.
    HealthCheck(health::Args),
    /// Freeze the configured data file systems under a watchdog.
    Freeze(freeze::FreezeArgs),
    /// Thaw file systems frozen by `freeze`.
    Thaw(freeze::ThawArgs),
    /// (internal) The watchdog process that thaws at the deadline.
    #[command(hide = true)]
    FreezeWatchdog(freeze::WatchdogArgs),
    /// Drain Nomad builder nodes and wait for their running allocations.
    Drain(drain::DrainArgs),
    /// End the drain of Nomad builder nodes.
    Undrain(drain::UndrainArgs),
    /// The whole restore runbook on this machine, in order.
    Recover(recover::Args),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFmt {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

impl From<Output> for OutputFormat {
    fn from(o: Output) -> Self {
        match o {
            Output::Human => OutputFormat::Human,
            Output::Json => OutputFormat::Json,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(match cli.log_format {
        LogFmt::Text => LogFormat::Text,
        LogFmt::Json => LogFormat::Json,
    });
    dr_proto::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime can always be built");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("dr-agent: {message}");
            ExitCode::from(code)
        }
    }
}

fn config_err(e: dr_agent::config::ConfigError) -> (u8, String) {
    (commands::EXIT_INPUT, e.to_string())
}

/// Exit code 2: bad configuration or input; 1: the work failed; 3: a safety
/// rule refused the step.
async fn dispatch(command: Command) -> Result<(), (u8, String)> {
    let text = match command {
        Command::Run { config } => {
            let cfg = Config::load(&config).map_err(config_err)?;
            return dr_agent::run_daemon(&cfg, &config.display().to_string()).await.map_err(|e| {
                let code = match e {
                    dr_agent::RunError::Config(_) => commands::EXIT_INPUT,
                    _ => commands::EXIT_FAILED,
                };
                (code, e.to_string())
            });
        }
        Command::AppStatus { config, replicatedctl, output } => {
            let mut cfg = Config::load_optional(config.as_deref()).map_err(config_err)?;
            if let Some(path) = replicatedctl {
                cfg.replicated.replicatedctl = path;
            }
            let status = commands::app_status(&cfg).await.map_err(|e| (1, e.to_string()))?;
            commands::render_app_status(&status, output.into())
        }
        Command::Facts { config, imds_endpoint, root, replicatedctl, output } => {
            let mut cfg = Config::load_optional(config.as_deref()).map_err(config_err)?;
            if let Some(endpoint) = imds_endpoint {
                cfg.imds.endpoint = endpoint;
            }
            if let Some(root) = root {
                cfg.root = root;
            }
            if let Some(path) = replicatedctl {
                cfg.replicated.replicatedctl = path;
            }
            cfg.validate("command line").map_err(config_err)?;
            let facts = commands::gather_facts(&cfg).await.map_err(|e| (1, e.to_string()))?;
            commands::render_facts(&facts, output.into())
        }
        Command::AppStop(a) => app::app_stop_cli(a).await?,
        Command::AppStart(a) => app::app_start_cli(a).await?,
        Command::SetHostname(a) => app::set_hostname_cli(a).await?,
        Command::RewriteAddresses(a) => rewrite::cli(a).await?,
        Command::WipeNomad(a) => nomad_state::cli(a).await?,
        Command::CleanupBuilds(a) => builds::cli(a).await?,
        Command::HealthCheck(a) => health::cli(a).await?,
        Command::Freeze(a) => freeze::freeze_cli(a).await?,
        Command::Thaw(a) => freeze::thaw_cli(a).await?,
        Command::FreezeWatchdog(a) => freeze::watchdog_cli(a).await?,
        Command::Drain(a) => drain::drain_cli(a).await?,
        Command::Undrain(a) => drain::undrain_cli(a).await?,
        Command::Recover(a) => recover::cli(a).await?,
    };
    print!("{text}");
    Ok(())
}
