//! dr-controller: parse the command line, load the config, then run the
//! daemon until SIGTERM (the default), or check AWS permissions (`preflight`).

#![forbid(unsafe_code)]

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
    /// The store ([store] path): online backup, rebuild from EC2's tags.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// A consistent copy of the store while the controller runs (one
    /// transaction, WAL included: a plain copy of state.db is not one).
    Backup {
        /// The copy to write (never overwritten).
        #[arg(long)]
        to: PathBuf,
    },
    /// Recreate the catalog of backups and copies from the dr:* tags of the
    /// AMIs in EC2 (each configured site's region and DR regions).
    Rebuild,
    /// Copy this SQLite store, whole (operations in flight included), into
    /// an empty PostgreSQL database, and check every table's count. Stop the
    /// controller first (its lock on the file is taken here). The password
    /// comes from DR_STORE_PASSWORD or --password-file.
    Migrate {
        /// postgres://user@host:port/db (no password in the URL).
        #[arg(long)]
        to: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// PEM certificates that sign the database server's (TLS).
        #[arg(long)]
        ca: Option<PathBuf>,
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
        Command::Run => match runtime.block_on(dr_controller::run(config, dr_controller::api::server::shutdown_signal())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "dr-controller failed");
                eprintln!("dr-controller: {e}");
                // Bad configuration (including TLS files it names): 2.
                match e {
                    dr_controller::ControllerError::Config(_) | dr_controller::ControllerError::Tls(_) => ExitCode::from(2),
                    _ => ExitCode::FAILURE,
                }
            }
        },
        Command::Store { command } => runtime.block_on(store_command(&config, command)),
        Command::Preflight { site } => {
            let checks = match runtime.block_on(dr_controller::cloud::preflight::run(&config, site.as_deref())) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dr-controller: {e}");
                    return ExitCode::from(2);
                }
            };
            for check in &checks {
                println!("{check}");
            }
            let denied = checks.iter().filter(|c| matches!(c.verdict, dr_controller::cloud::preflight::Verdict::Denied(_))).count();
            let unchecked = checks.iter().filter(|c| matches!(c.verdict, dr_controller::cloud::preflight::Verdict::NotChecked(_))).count();
            println!("preflight: {} checks, {denied} denied, {unchecked} not checked", checks.len());
            if dr_controller::cloud::preflight::all_allowed(&checks) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}

async fn store_command(config: &dr_controller::config::Config, command: StoreCommand) -> ExitCode {
    dr_proto::tls::install_crypto_provider();
    let location = match dr_controller::store_location(&config.store) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dr-controller: {e}");
            return ExitCode::from(2);
        }
    };
    let store = match dr_controller::store::Store::open_at(location).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dr-controller: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        StoreCommand::Backup { to } => match store.backup_to(to.clone()).await {
            Ok(n) => {
                println!("wrote {} ({n} backup(s) in the catalog)", to.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dr-controller: store backup: {e}");
                ExitCode::FAILURE
            }
        },
        StoreCommand::Rebuild => {
            let ec2 = dr_controller::cloud::Ec2Clients::new(config.aws.clone());
            match dr_controller::reconcilers::catalog::rebuild(config, &store, &ec2).await {
                Ok(r) => {
                    for b in &r.backups {
                        println!("backup {b} recovered from its tags");
                    }
                    for c in &r.copies {
                        println!("copy {c} recovered from its tags");
                    }
                    println!(
                        "store rebuild: {} backup(s) and {} copy(ies) added, {} already known",
                        r.backups.len(),
                        r.copies.len(),
                        r.already
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dr-controller: store rebuild: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        StoreCommand::Migrate { to, password_file, ca } => migrate(config, &store, &to, password_file, ca).await,
    }
}

/// `store migrate`: the SQLite store (held locked: no controller may run on
/// it meanwhile) into an empty PostgreSQL database.
async fn migrate(
    config: &dr_controller::config::Config,
    store: &dr_controller::store::Store,
    to: &str,
    password_file: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> ExitCode {
    use dr_controller::store::{Location, PgTarget, SqliteLock, Store};
    let Some(path) = &config.store.path else {
        eprintln!("dr-controller: store migrate: the configured store is not an SQLite file ([store] path)");
        return ExitCode::from(2);
    };
    let _lock = match SqliteLock::acquire(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dr-controller: store migrate: {e}; stop it first");
            return ExitCode::FAILURE;
        }
    };
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let password = match password_file.as_ref().map(read).transpose() {
        Ok(p) => {
            p.map(|t| t.lines().next().unwrap_or("").to_owned()).or_else(|| std::env::var(dr_controller::config::STORE_PASSWORD_ENV).ok())
        }
        Err(e) => {
            eprintln!("dr-controller: store migrate: --password-file: {e}");
            return ExitCode::from(2);
        }
    };
    let ca_pem = match ca.as_ref().map(read).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dr-controller: store migrate: --ca: {e}");
            return ExitCode::from(2);
        }
    };
    let target = match PgTarget::new(to, password, ca_pem.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dr-controller: store migrate: --to: {e}");
            return ExitCode::from(2);
        }
    };
    let shown = target.shown().to_owned();
    let into = match Store::open_at(Location::Postgres(Box::new(target))).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dr-controller: store migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    match store.migrate_into(&into).await {
        Ok(copied) => {
            for (table, n) in &copied {
                println!("{table}: {n} row(s)");
            }
            println!(
                "store migrate: {} row(s) copied from {} into {shown}, every count checked; set [store] url and start the controllers",
                copied.iter().map(|(_, n)| n).sum::<u64>(),
                store.path()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dr-controller: store migrate: {e} (no row was written to {shown})");
            ExitCode::FAILURE
        }
    }
}
