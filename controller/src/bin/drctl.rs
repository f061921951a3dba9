//! drctl: the operator's command line for dr-controller.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dr_controller::drctl::{self, CliError, Connection, Output};
use dr_controller::pki::{self, Subject, Validity};
use dr_proto::pb;

/// Operate disaster recovery of CircleCI Server services machines.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Controller admin URL, e.g. https://dr.example.com:7443
    #[arg(long, global = true, env = "DRCTL_CONTROLLER")]
    controller: Option<String>,
    /// Name the controller's certificate must carry (default: the URL's host).
    #[arg(long, global = true, env = "DRCTL_SERVER_NAME")]
    server_name: Option<String>,
    /// CA certificate of the deployment (PEM).
    #[arg(long, global = true, env = "DRCTL_CA")]
    ca: Option<PathBuf>,
    /// Your operator certificate (PEM), from `drctl pki issue operator`.
    #[arg(long, global = true, env = "DRCTL_CERT")]
    cert: Option<PathBuf>,
    /// Your operator key (PEM).
    #[arg(long, global = true, env = "DRCTL_KEY")]
    key: Option<PathBuf>,
    /// A TOML file with `controller`, `server_name` and `[tls] ca/cert/key`.
    #[arg(long, global = true, env = "DRCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Output for humans (text) or scripts (json).
    #[arg(long, short, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every site: its agent, instance, addresses, last heartbeat, last backup.
    Status,
    /// Start a backup of SITE now.
    Backup {
        site: String,
        /// Follow it until it finishes; exit 1 if it fails.
        #[arg(long)]
        wait: bool,
    },
    /// The recorded backups of SITE, newest first, with copies and retention fate.
    Backups { site: String },
    /// Apply SITE's retention now (deregister AMIs, delete their snapshots).
    Prune {
        site: String,
        /// Show what would be deleted and why; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// One operation with all its steps.
    Operation {
        id: String,
        /// Follow it until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Certificates for the controller, agents and operators.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) for a trust domain.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate signed by the CA in --dir.
    Issue {
        #[command(subcommand)]
        kind: IssueKind,
        /// Directory of the CA (ca.pem, ca.key).
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        /// Where to write <name>.pem and <name>.key (default: --dir).
        #[arg(long, global = true)]
        out: Option<PathBuf>,
        /// Lifetime in days.
        #[arg(long, global = true, default_value_t = 365)]
        days: u32,
        /// Explicit validity start (RFC 3339); with --not-after, replaces --days.
        #[arg(long, global = true)]
        not_before: Option<String>,
        /// Explicit validity end (RFC 3339).
        #[arg(long, global = true)]
        not_after: Option<String>,
    },
}

#[derive(Subcommand)]
enum IssueKind {
    /// The controller's server certificate.
    Controller {
        /// DNS names agents and drctl dial (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses agents and drctl dial (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// File name stem.
        #[arg(long, default_value = "controller")]
        name: String,
    },
    /// An agent certificate for one site (spiffe://<domain>/site/<SITE>).
    Site { site: String },
    /// An operator certificate (spiffe://<domain>/operator/<NAME>).
    Operator { name: String },
}

fn main() -> ExitCode {
    let args = Args::parse();
    dr_controller::logging::init(dr_controller::logging::LogFormat::Text, "warn");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime can start");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn parse_time(s: &str, flag: &str) -> Result<time::OffsetDateTime, CliError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| CliError::Usage(format!("--{flag} `{s}` is not an RFC 3339 time: {e}")))
}

async fn run(args: Args) -> Result<ExitCode, CliError> {
    let output = args.output;
    if let Command::Pki { command } = args.command {
        return pki_command(command, output);
    }
    let conn = Connection::resolve(args.config, args.controller, args.server_name, args.ca, args.cert, args.key)?;
    match remote(&conn, args.command, output).await {
        Ok(code) => Ok(code),
        Err(e) => Err(conn.explain(e).await),
    }
}

/// The commands that talk to the controller.
async fn remote(conn: &Connection, command: Command, output: Output) -> Result<ExitCode, CliError> {
    match command {
        Command::Pki { .. } => unreachable!("handled before connecting"),
        Command::Status => {
            let mut client = conn.connect().await?;
            let reply = client.status(pb::StatusRequest::default()).await.map_err(|s| conn.status_error(s))?.into_inner();
            let sites: Vec<_> = reply.sites.into_iter().map(|s| drctl::site_view(s, reply.now_ms)).collect();
            match output {
                Output::Json => drctl::print_json(&serde_json::json!({ "sites": sites })),
                Output::Text => drctl::print_status(&sites),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { site, wait } => {
            let mut client = conn.connect().await?;
            let id = client
                .start_backup(pb::StartBackupRequest { site_id: site.clone() })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner()
                .operation_id;
            if !wait {
                match output {
                    Output::Json => drctl::print_json(&serde_json::json!({ "operation_id": id })),
                    Output::Text => println!("Backup of {site} started: operation {id}\nFollow it with: drctl operation {id} --wait"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            if output == Output::Text {
                println!("Backup of {site} started: operation {id}");
            }
            finish(drctl::watch(conn, &mut client, &id, output).await?, output)
        }
        Command::Operation { id, wait } => {
            let mut client = conn.connect().await?;
            let op = if wait {
                drctl::watch(conn, &mut client, &id, output).await?
            } else {
                client
                    .get_operation(pb::OperationRef { operation_id: id })
                    .await
                    .map_err(|s| conn.status_error(s))?
                    .into_inner()
            };
            finish(op, output)
        }
        Command::Prune { site, dry_run } => {
            let mut client = conn.connect().await?;
            let reply = client
                .prune(pb::PruneRequest { site_id: site.clone(), dry_run })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let decisions = drctl::decision_views(reply);
            match output {
                Output::Json => drctl::print_json(&serde_json::json!({ "site_id": site, "dry_run": dry_run, "decisions": decisions })),
                Output::Text => drctl::print_prune(&site, dry_run, &decisions),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backups { site } => {
            let mut client = conn.connect().await?;
            let reply = client
                .list_backups(pb::ListBackupsRequest { site_id: site.clone() })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let now = dr_controller::model::now_ms();
            let backups: Vec<_> = reply.backups.into_iter().map(|b| drctl::backup_view(b, now)).collect();
            match output {
                Output::Json => drctl::print_json(&serde_json::json!({ "site_id": site, "backups": backups })),
                Output::Text => drctl::print_backups(&site, &backups),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints an operation; exit 0 when it succeeded (or is still running), 1 when it failed.
fn finish(op: pb::Operation, output: Output) -> Result<ExitCode, CliError> {
    let view = drctl::operation_view(op);
    match output {
        Output::Json => drctl::print_json(&view),
        Output::Text => drctl::print_operation(&view),
    }
    Ok(if view.state == "failed" { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn pki_command(command: PkiCommand, output: Output) -> Result<ExitCode, CliError> {
    let written = match command {
        PkiCommand::Init { dir, trust_domain, days } => {
            vec![pki::init_ca(&dir, &trust_domain, Validity::days(days))?, dir.join(pki::CA_KEY)]
        }
        PkiCommand::Issue { kind, dir, out, days, not_before, not_after } => {
            let dir = dir.ok_or_else(|| CliError::Usage("give --dir, the CA's directory".into()))?;
            let out = out.unwrap_or_else(|| dir.clone());
            let mut validity = Validity::days(days);
            if let Some(t) = &not_before {
                validity.not_before = parse_time(t, "not-before")?;
            }
            if let Some(t) = &not_after {
                validity.not_after = parse_time(t, "not-after")?;
            }
            if validity.not_after <= validity.not_before {
                return Err(CliError::Usage("the certificate would end before it starts".into()));
            }
            let (subject, stem) = match kind {
                IssueKind::Controller { dns, ip, name } => (Subject::Controller { dns, ips: ip }, name),
                IssueKind::Site { site } => (Subject::Site(site.clone()), format!("site-{site}")),
                IssueKind::Operator { name } => (Subject::Operator(name.clone()), format!("operator-{name}")),
            };
            let (cert, key) = pki::issue(&dir, &subject, validity, &out, &stem)?;
            vec![cert, key]
        }
    };
    match output {
        Output::Json => drctl::print_json(&serde_json::json!({ "written": written })),
        Output::Text => {
            for path in written {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
