//! The hand-run command line (`dr-agent <step> ...`), a layer on top of the
//! step library: it parses flags into a [`Action`], runs it through
//! the same [`Executor`] the daemon uses ([`Executor::hand_run`]), maps the
//! [`ErrorKind`] of a failure to the exit code ([`exit_code`], the one
//! place) and renders the report ([`render`]).
//!
//! Exit codes: 0 done, 1 the step failed, 2 bad configuration or input, 3 a
//! safety rule refused the step.

pub(crate) mod logging;
pub(crate) mod render;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError};
use crate::daemon::commands;
use crate::steps::{Action, ErrorKind, Executor, StepError};
use crate::steps::{app, builds, drain, freeze, recover, rewrite};

pub(crate) const EXIT_FAILED: u8 = 1;
pub(crate) const EXIT_INPUT: u8 = 2;
pub(crate) const EXIT_REFUSED: u8 = 3;

/// The exit status of a step that failed with this kind.
pub(crate) fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Invalid | ErrorKind::NotSupported => EXIT_INPUT,
        ErrorKind::Refused => EXIT_REFUSED,
        ErrorKind::Failed | ErrorKind::Interrupted | ErrorKind::TimedOut => EXIT_FAILED,
    }
}

#[derive(Parser)]
#[command(name = "dr-agent", version, about = "Performs typed, local recovery steps on a CircleCI Server services machine.")]
pub(crate) struct Cli {
    /// Log format (logs go to stderr; RUST_LOG filters).
    #[arg(long, value_enum, default_value_t = LogFmt::Text, global = true)]
    log_format: LogFmt,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFmt {
    Text,
    Json,
}

/// How subcommands print their result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// Options every hand-run step takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct Common {
    /// Configuration file (TOML); defaults apply without it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Act on a mounted copy of a machine's disk instead of "/" (overrides `root`).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Output for humans (default) or scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

impl Common {
    /// The configuration with `--root` applied, validated.
    pub fn load(&self) -> Result<Config, Failure> {
        let mut config = Config::load_optional(self.config.as_deref())?;
        if let Some(root) = &self.root {
            config.root = root.clone();
        }
        config.validate("command line")?;
        Ok(config)
    }
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
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        output: OutputFormat,
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
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        output: OutputFormat,
    },
    /// (internal) The watchdog process that thaws at the deadline.
    #[command(hide = true)]
    FreezeWatchdog(WatchdogArgs),
    #[command(flatten)]
    Step(StepCommand),
}

/// The subcommands that are steps: each becomes one [`Action`].
#[derive(Subcommand)]
enum StepCommand {
    /// Stop the Replicated app and wait until it is stopped.
    AppStop(StopArgs),
    /// Start the Replicated app and wait until it is started.
    AppStart(DryRunArgs),
    /// Set the installation's hostname (app-config item) and apply it, if it differs.
    SetHostname(HostnameArgs),
    /// Replace old private/public IPs in the Replicated environment files.
    RewriteAddresses(RewriteArgs),
    /// Remove the Nomad server's data dir (app stopped, no Nomad running).
    WipeNomad(WipeArgs),
    /// Delete builds a backup caught half-way, in one dev-console session.
    CleanupBuilds(CleanupArgs),
    /// GET the frontend's health check (circleci.health_url) from this machine.
    HealthCheck(HealthArgs),
    /// Freeze the configured data file systems under a watchdog.
    Freeze(FreezeArgs),
    /// Thaw file systems frozen by `freeze`.
    Thaw(ThawArgs),
    /// Drain Nomad builder nodes and wait for their running allocations.
    Drain(DrainArgs),
    /// End the drain of the Nomad builder nodes this agent drained.
    Undrain(DryRunArgs),
    /// The whole restore runbook on this machine, in order.
    Recover(RecoverArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct StopArgs {
    #[command(flatten)]
    pub common: Common,
    /// `replicatedctl app stop -f`.
    #[arg(long)]
    pub force: bool,
    /// Show whether the app would be stopped; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A step whose only own flag is `--dry-run`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct DryRunArgs {
    #[command(flatten)]
    pub common: Common,
    /// Show what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct HostnameArgs {
    #[command(flatten)]
    pub common: Common,
    /// The hostname the installation must answer on.
    #[arg(long)]
    pub hostname: String,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RewriteArgs {
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

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct WipeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The data dir is on a mounted disk (with --root): skip the checks of
    /// this host's app and Nomad processes.
    #[arg(long)]
    pub offline: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct CleanupArgs {
    #[command(flatten)]
    pub common: Common,
    /// The backup's point in time (RFC 3339): only builds started before it are deleted.
    #[arg(long)]
    pub before: String,
    /// List the candidates; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct HealthArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct FreezeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Mount point to freeze (repeatable); default: freeze.mounts.
    #[arg(long = "mount")]
    pub mounts: Vec<PathBuf>,
    /// Thaw at this deadline whatever happens (default: freeze.deadline).
    #[arg(long)]
    pub deadline: Option<humantime::Duration>,
    /// Show what would be frozen; freeze nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep this process alive holding the watchdog's pipe until SIGTERM or
    /// SIGINT (then thaw), as the agent daemon does. For tests and drills.
    #[arg(long, hide = true)]
    pub hold: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ThawArgs {
    #[command(flatten)]
    pub common: Common,
    /// Mount point to thaw (repeatable); default: freeze.mounts, or every recorded freeze.
    #[arg(long = "mount")]
    pub mounts: Vec<PathBuf>,
    /// Show what would be thawed; thaw nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct WatchdogArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub id: String,
    #[arg(long = "mount", required = true)]
    pub mounts: Vec<PathBuf>,
    #[arg(long)]
    pub deadline_ms: u64,
    #[arg(long)]
    pub socket: Option<PathBuf>,
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Stdin is not the agent's pipe (hand-run freeze).
    #[arg(long)]
    pub detached: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// How long running allocations may take to end (Nomad's drain deadline
    /// too: then Nomad stops them). Default: nomad.drain_deadline.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Exit 1 if allocations still run at the deadline.
    #[arg(long)]
    pub require_idle: bool,
    /// Show the nodes that would be drained; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RecoverArgs {
    #[command(flatten)]
    pub common: Common,
    /// Print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The backup's point in time (RFC 3339): running builds that started
    /// before it are deleted. Without it the build clean-up is skipped.
    #[arg(long)]
    pub builds_before: Option<String>,
    /// The hostname the installation must answer on (default: unchanged).
    #[arg(long)]
    pub hostname: Option<String>,
    /// This machine's private IP (default: from IMDS; required with --root).
    #[arg(long)]
    pub private_ip: Option<IpAddr>,
    /// This machine's public IP (default: from IMDS; none if it has none).
    #[arg(long)]
    pub public_ip: Option<IpAddr>,
    /// Act on a mounted disk (with --root): only rewrite the files and wipe
    /// the Nomad state; needs --private-ip.
    #[arg(long)]
    pub offline: bool,
    /// Go on although nothing shows this machine was restored (its
    /// identity record names this same instance). Stops the app and wipes
    /// the Nomad state of a machine that may be a healthy primary.
    #[arg(long)]
    pub force: bool,
}

/// Why a hand-run command did not succeed: its exit code, the message for
/// stderr and, when the step ran and has a report, that report for stdout.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: u8,
    pub message: String,
    pub stdout: Option<String>,
}

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure { code: exit_code(kind), message: message.into(), stdout: None }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(ErrorKind::Invalid, e.to_string())
    }
}

/// Parses the command line, runs the command and returns the exit status
/// (what `main` does).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(match cli.log_format {
        LogFmt::Text => logging::LogFormat::Text,
        LogFmt::Json => logging::LogFormat::Json,
    });
    dr_proto::tls::install_crypto_provider();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread tokio runtime can always be built");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            if let Some(out) = &f.stdout {
                print!("{out}");
            }
            eprintln!("dr-agent: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Runs one action through a hand-run [`Executor`] and renders its report
/// (also the report of a step that failed after it ran).
pub(crate) async fn run_step(config: Config, action: &Action, output: OutputFormat) -> Result<String, Failure> {
    let executor = Executor::hand_run(Arc::new(config));
    executor.run(action, None).await.map(|r| render::report(&r, output)).map_err(|e| step_failure(&e, output))
}

fn step_failure(e: &StepError, output: OutputFormat) -> Failure {
    Failure { code: exit_code(e.kind()), message: e.to_string(), stdout: e.report().map(|r| render::report(r, output)) }
}

/// The [`Action`] a step subcommand asks for, with its configuration and
/// output format.
fn action_of(command: &StepCommand) -> Result<(Config, Action, OutputFormat), Failure> {
    let (common, action) = match command {
        StepCommand::AppStop(a) => (&a.common, Action::AppStop { force: a.force, dry_run: a.dry_run }),
        StepCommand::AppStart(a) => (&a.common, Action::AppStart { dry_run: a.dry_run }),
        StepCommand::SetHostname(a) => {
            (&a.common, Action::SetHostname { params: app::HostnameParams { hostname: a.hostname.clone() }, dry_run: a.dry_run })
        }
        StepCommand::RewriteAddresses(a) => {
            let params = rewrite::params_from_flags(&a.private, &a.public).map_err(|e| Failure::new(e.kind(), e.to_string()))?;
            (&a.common, Action::RewriteAddresses { params, dry_run: a.dry_run })
        }
        StepCommand::WipeNomad(a) => (&a.common, Action::WipeNomad { dry_run: a.dry_run, offline: a.offline }),
        StepCommand::CleanupBuilds(a) => {
            (&a.common, Action::CleanupBuilds { params: builds::CleanupParams { before: a.before.clone() }, dry_run: a.dry_run })
        }
        StepCommand::HealthCheck(a) => (&a.common, Action::HealthCheck),
        StepCommand::Freeze(a) => {
            let config = a.common.load()?;
            let params =
                freeze::FreezeParams { mounts: a.mounts.clone(), deadline: a.deadline.map(Into::into).unwrap_or(config.freeze.deadline) };
            return Ok((config, Action::Freeze { params, dry_run: a.dry_run }, a.common.output));
        }
        StepCommand::Thaw(a) => (&a.common, Action::Thaw { params: freeze::ThawParams { mounts: a.mounts.clone() }, dry_run: a.dry_run }),
        StepCommand::Drain(a) => {
            let config = a.common.load()?;
            let params = drain::DrainParams { deadline: a.deadline.unwrap_or(config.nomad.drain_deadline), require_idle: a.require_idle };
            return Ok((config, Action::Drain { params, dry_run: a.dry_run }, a.common.output));
        }
        StepCommand::Undrain(a) => (&a.common, Action::Undrain { dry_run: a.dry_run }),
        StepCommand::Recover(a) => (
            &a.common,
            Action::Recover {
                params: recover::RecoverParams {
                    builds_before: a.builds_before.clone(),
                    hostname: a.hostname.clone(),
                    private_ip: a.private_ip,
                    public_ip: a.public_ip,
                    offline: a.offline,
                    force: a.force,
                    candidate: false,
                },
                dry_run: a.dry_run,
            },
        ),
    };
    Ok((common.load()?, action, common.output))
}

async fn dispatch(command: Command) -> Result<String, Failure> {
    match command {
        Command::Step(StepCommand::Freeze(a)) if a.hold && !a.dry_run => freeze_hold(&a).await,
        Command::Step(step) => {
            let (config, action, output) = action_of(&step)?;
            run_step(config, &action, output).await
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            crate::daemon::run_daemon(&cfg, &config.display().to_string()).await.map_err(|e| {
                let kind = if matches!(e, crate::daemon::RunError::Config(_)) { ErrorKind::Invalid } else { ErrorKind::Failed };
                Failure::new(kind, e.to_string())
            })?;
            Ok(String::new())
        }
        Command::AppStatus { config, replicatedctl, output } => {
            let mut cfg = Config::load_optional(config.as_deref())?;
            if let Some(path) = replicatedctl {
                cfg.replicated.replicatedctl = path;
            }
            let report = Executor::hand_run(Arc::new(cfg)).run(&Action::AppStatus, None).await.map_err(|e| step_failure(&e, output))?;
            Ok(render::report(&report, output))
        }
        Command::Facts { config, imds_endpoint, root, replicatedctl, output } => {
            let mut cfg = Config::load_optional(config.as_deref())?;
            if let Some(endpoint) = imds_endpoint {
                cfg.imds.endpoint = endpoint;
            }
            if let Some(root) = root {
                cfg.root = root;
            }
            if let Some(path) = replicatedctl {
                cfg.replicated.replicatedctl = path;
            }
            cfg.validate("command line")?;
            let facts = commands::gather_facts(&cfg).await.map_err(|e| Failure::new(ErrorKind::Failed, e.to_string()))?;
            Ok(render::facts(&facts, output))
        }
        Command::FreezeWatchdog(a) => {
            let opts = freeze::watchdog::Options {
                id: a.id,
                mounts: a.mounts,
                deadline: Duration::from_millis(a.deadline_ms),
                socket: a.socket,
                record: a.record,
                detached: a.detached,
            };
            match freeze::watchdog::run(opts) {
                0 => Ok(String::new()),
                code => Err(Failure { code, message: "the freeze watchdog failed (see its `error` line)".to_owned(), stdout: None }),
            }
        }
    }
}

/// `freeze --hold`: the daemon's kind of freeze (held by this process, so
/// the watchdog thaws if it dies), through the daemon's executor; thawed on
/// SIGTERM/SIGINT or when the watchdog thaws by itself.
async fn freeze_hold(a: &FreezeArgs) -> Result<String, Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = a.common.load()?;
    let params = freeze::FreezeParams { mounts: a.mounts.clone(), deadline: a.deadline.map(Into::into).unwrap_or(config.freeze.deadline) };
    let signals = |e: std::io::Error| Failure::new(ErrorKind::Failed, format!("cannot install signal handlers: {e}"));
    let mut term = signal(SignalKind::terminate()).map_err(signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(signals)?;
    let executor = Executor::new(Arc::new(config));
    let output = a.common.output;
    let frozen = executor.run(&Action::Freeze { params, dry_run: false }, None).await.map_err(|e| step_failure(&e, output))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(render::report(&frozen, output).as_bytes());
        let _ = out.flush();
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = executor.freeze_lifted() => {}
    }
    let thaw = Action::Thaw { params: freeze::ThawParams::default(), dry_run: false };
    executor.run(&thaw, None).await.map(|r| render::report(&r, output)).map_err(|e| step_failure(&e, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_exit_code() {
        assert_eq!(exit_code(ErrorKind::Invalid), 2);
        assert_eq!(exit_code(ErrorKind::NotSupported), 2);
        assert_eq!(exit_code(ErrorKind::Refused), 3);
        for k in [ErrorKind::Failed, ErrorKind::Interrupted, ErrorKind::TimedOut] {
            assert_eq!(exit_code(k), 1, "{k:?}");
        }
    }

    #[test]
    fn flags_become_the_daemons_actions() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("dr-agent").chain(args.iter().copied())).expect("parses");
            let Command::Step(step) = cli.command else { panic!("{args:?} is a step") };
            action_of(&step).expect("an action").1
        };
        assert_eq!(parse(&["app-stop", "--force"]), Action::AppStop { force: true, dry_run: false });
        assert_eq!(parse(&["undrain", "--dry-run"]), Action::Undrain { dry_run: true });
        assert_eq!(parse(&["wipe-nomad", "--offline"]), Action::WipeNomad { dry_run: false, offline: true });
        assert_eq!(
            parse(&["drain", "--deadline", "30s", "--require-idle"]),
            Action::Drain { params: drain::DrainParams { deadline: Duration::from_secs(30), require_idle: true }, dry_run: false }
        );
        // Bad input is named, exit 2, before anything runs.
        let cli = Cli::try_parse_from(["dr-agent", "rewrite-addresses", "--private", "10.0.0.1"]).expect("parses");
        let Command::Step(step) = cli.command else { panic!("a step") };
        let err = action_of(&step).expect_err("no NEW");
        assert_eq!(err.code, EXIT_INPUT);
        assert!(err.message.contains("--private"), "{}", err.message);
    }

    /// A step that failed after it ran still shows its report on stdout,
    /// in the chosen format, with the exit code of its kind.
    #[test]
    fn a_reported_failure_keeps_its_report() {
        let r = crate::steps::drain::UndrainReport {
            undrained: vec![],
            already: vec![],
            not_found: vec![],
            from_record: true,
            already_done: false,
            dry_run: false,
            actions: vec!["check node n-1".into()],
            warnings: vec![],
        };
        let e =
            StepError::Reported { kind: ErrorKind::Refused, message: "refused".into(), report: Box::new(crate::steps::Report::Undrain(r)) };
        let f = step_failure(&e, OutputFormat::Json);
        assert_eq!((f.code, f.message.as_str()), (EXIT_REFUSED, "refused"));
        let v: serde_json::Value = serde_json::from_str(f.stdout.as_deref().expect("stdout")).expect("json");
        assert_eq!(v["actions"][0], "check node n-1");
        let human = step_failure(&e, OutputFormat::Human).stdout.expect("stdout");
        assert!(human.contains("Action: check node n-1"), "{human}");
    }
}
