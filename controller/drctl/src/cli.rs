//! drctl's command-line grammar and what each command does.
//!
//! The connection flags (`--controller --server-name --ca --cert --key
//! --config`, also `DRCTL_*`) belong to the commands that talk to the
//! controller; they are accepted before the command too (`drctl
//! --controller URL status`). `drctl pki` works on local files only and
//! neither takes nor lists them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dr_proto::pb;

use crate::connection::Connection;
use crate::error::CliError;
use crate::pki::{self, Subject, Validity};
use crate::print::{self, print_json};
use crate::views;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    // JSON lines on stdout: each object drctl prints is one line; a failure
    // is `{"error": {"kind", "message", "exit_code"}}`.
    Json,
}

/// Operate disaster recovery of CircleCI Server services machines.
#[derive(Parser)]
#[command(name = "drctl", version)]
pub struct Args {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Output for humans (text) or scripts (json: JSON lines on stdout).
    #[arg(long, short, global = true, value_enum, default_value = "text")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the controller.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConnArgs {
    /// Controller admin URL, e.g. https://dr.example.com:7443
    #[arg(long, env = "DRCTL_CONTROLLER")]
    pub controller: Option<String>,
    /// Name the controller's certificate must carry (default: the URL's host).
    #[arg(long, env = "DRCTL_SERVER_NAME")]
    pub server_name: Option<String>,
    /// CA certificate of the deployment (PEM).
    #[arg(long, env = "DRCTL_CA")]
    pub ca: Option<PathBuf>,
    /// Your operator certificate (PEM), from `drctl pki issue operator`.
    #[arg(long, env = "DRCTL_CERT")]
    pub cert: Option<PathBuf>,
    /// Your operator key (PEM).
    #[arg(long, env = "DRCTL_KEY")]
    pub key: Option<PathBuf>,
    /// A TOML file with `controller`, `server_name` and `[tls] ca/cert/key`.
    #[arg(long, env = "DRCTL_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConnArgs {
    /// The command's own flags win over those given before the command.
    fn or(self, outer: ConnArgs) -> ConnArgs {
        ConnArgs {
            controller: self.controller.or(outer.controller),
            server_name: self.server_name.or(outer.server_name),
            ca: self.ca.or(outer.ca),
            cert: self.cert.or(outer.cert),
            key: self.key.or(outer.key),
            config: self.config.or(outer.config),
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// The fleet's summary and its sites: instances and their roles, last
    /// heartbeat, last backup, problems. With more than 50 sites only those
    /// with problems are listed unless `--all`.
    Status {
        /// Only this site (repeatable).
        #[arg(long = "site")]
        sites: Vec<String>,
        /// Only sites with problems.
        #[arg(long)]
        problems: bool,
        /// Every site, however many (fetched page by page).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Start a backup of SITE now.
    Backup {
        site: String,
        /// Follow it until it finishes; exit 1 if it fails. With `-o json`
        /// the first line is `{"operation_id", "site_id"}`, the last the
        /// finished operation.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Replace SITE's services machine by a new instance launched from a
    /// backup (default: the newest good one). Shows the plan and asks for the
    /// site id unless --yes (`-o json` does not confirm: it needs --yes too). Exit 8 with --wait when the
    /// failover stopped and waits for a human (resume or abort it).
    Failover {
        site: String,
        #[command(flatten)]
        target: FailoverTarget,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// After a failover into a DR region, return SITE to its home region:
    /// the newest backup of the DR primary, from its copy at home (backups
    /// are copied home while the primary is away), launched with the home
    /// machine's settings; the DR instance is fenced, the home Elastic IP
    /// and the DNS record move back.
    Failback {
        site: String,
        #[command(flatten)]
        target: FailoverTarget,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Like failover, to an older point in time: --backup AMI is required.
    Restore {
        site: String,
        #[command(flatten)]
        target: FailoverTarget,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Prove SITE can be restored, without touching production: a copy
    /// launched from a backup into the site's [site.drill] subnet under the
    /// drill hostname, taken through the runbook until healthy, measured
    /// (RTO, RPO, the data it holds), then terminated with its volumes.
    Drill {
        site: String,
        /// The backup's AMI (default: the newest good one).
        #[arg(long)]
        backup: Option<String>,
        /// The newest good backup (the default).
        #[arg(long, conflicts_with = "backup")]
        latest: bool,
        /// A random good backup that started within this long (e.g. 7d).
        #[arg(long, value_name = "DURATION", conflicts_with_all = ["backup", "latest"])]
        random_within: Option<humantime::Duration>,
        /// Launch in this region, from the backup's copy there.
        #[arg(long)]
        region: Option<String>,
        /// Keep the copy this long after it is verified (e.g. 30m), for a look.
        #[arg(long, value_name = "DURATION")]
        keep: Option<humantime::Duration>,
        /// Print the plan and change nothing.
        #[arg(long)]
        plan: bool,
        /// Follow it until it ends, then print its result (exit 1 if it failed).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The recorded drills of SITE, newest first, with RTO, RPO and data age.
    Drills {
        site: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The recorded backups of SITE, newest first, with copies and retention fate.
    Backups {
        site: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Apply SITE's retention now (deregister AMIs, delete their snapshots).
    Prune {
        site: String,
        /// Show what would be deleted and why; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// One operation with all its steps: `drctl operation ID [--wait]`; or a
    /// signal to it: `drctl operation resume ID` (retry the failed step of an
    /// operation waiting for a human), `abort ID` (run its compensations,
    /// then cancel it), `approve ID` / `deny ID` (an operation waiting for
    /// an approval).
    Operation {
        /// `ID`, or `resume|abort|approve|deny ID`.
        #[arg(num_args = 1..=2, required = true, value_name = "[SIGNAL] ID")]
        words: Vec<String>,
        /// Follow it until it finishes.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Approve an operation waiting for an approval (an automatic failover
    /// of a site in `auto_failover = "approve"` mode): it runs.
    Approve {
        operation: String,
        /// Follow it until it ends.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Deny an operation waiting for an approval: it ends, nothing changed.
    Deny {
        operation: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// One site in full: its status, health with the evidence of each
    /// signal (agent, EC2, app probe), and its latest events.
    Site {
        site: String,
        /// How many of its latest events to show.
        #[arg(long, default_value_t = 10)]
        events: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Pause SITE's automatic recovery for maintenance (health is still
    /// checked and shown; no repair or failover starts). It lifts by
    /// itself after --for.
    Pause {
        site: String,
        /// How long (at most 7 days).
        #[arg(long = "for", value_name = "DURATION", default_value = "2h")]
        duration: humantime::Duration,
        /// Why (shown in status and events).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Resume SITE's automatic recovery now.
    Unpause {
        site: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The event log: every health decision (taken or not, with its
    /// evidence), alert and operation end; of SITE or of the whole fleet.
    Events {
        site: Option<String>,
        /// The latest this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep printing new events as they are recorded (Ctrl-C ends).
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke SITE's agent certificates: every one (the site cannot enrol
    /// again until --undo), or one --serial (as `drctl site` shows it).
    /// Live streams holding them are closed at once.
    Revoke {
        site: String,
        #[arg(long)]
        serial: Option<String>,
        /// Why (shown in status and events).
        #[arg(long, default_value = "")]
        reason: String,
        /// Lift the revocation of the whole site.
        #[arg(long, conflicts_with = "serial")]
        undo: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Let INSTANCE of SITE enrol: with --token, print a one-time token for
    /// a machine without the EC2 instance identity document (put it in the
    /// agent's tls.enrol_token_file); without, let an instance that enrolled
    /// already enrol once more with its document (it lost its key).
    AllowEnrol {
        site: String,
        instance: String,
        #[arg(long)]
        token: bool,
        /// How long the token stays usable (at most 7 days).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        ttl: humantime::Duration,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// CA rotation without an outage, one phase at a time: `start` (with
    /// the new root and the new intermediate made from it), `advance` to
    /// the next phase (init → update_clients → update_servers → complete),
    /// `rollback` (until complete), `status`.
    RotateCa {
        #[arg(value_parser = ["status", "start", "advance", "rollback"])]
        action: String,
        /// start: the new root's certificate (`drctl pki init`).
        #[arg(long)]
        root: Option<PathBuf>,
        /// start: the new intermediate's directory (`drctl pki intermediate
        /// --dir NEW_ROOT_DIR`), its ca.pem and ca.key are sent to the
        /// controller.
        #[arg(long)]
        intermediate: Option<PathBuf>,
        /// advance: even if its condition does not hold (agents that have
        /// not acknowledged, or still on the old root, may be refused).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Certificates for the controller, agents and operators (local files only).
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

/// What a failover or restore launches, and how drctl runs it.
#[derive(clap::Args, Clone, Debug)]
pub struct FailoverTarget {
    /// The backup's AMI (its id in the site's region, or its copy's id).
    #[arg(long)]
    pub backup: Option<String>,
    /// The newest good backup (the default of `failover`).
    #[arg(long, conflicts_with = "backup")]
    pub latest: bool,
    /// Launch in this region, from the backup's copy there (a region outage).
    #[arg(long)]
    pub region: Option<String>,
    /// Launch from the newest backup even when the site's policy prefers
    /// its hot spare (failover only).
    #[arg(long, conflicts_with_all = ["backup", "use_spare"])]
    pub fresh: bool,
    /// Take the site's hot spare even when its policy prefers the freshest
    /// backup (failover only; refused when it has no usable spare).
    #[arg(long, conflicts_with = "backup")]
    pub use_spare: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub plan: bool,
    /// Follow it until it ends (exit 1 failed, 8 waiting for a human).
    #[arg(long)]
    pub wait: bool,
    /// Do not ask for a confirmation.
    #[arg(long, short)]
    pub yes: bool,
}

/// Lifetimes are whole days from 1 to 36500 (0 would make a certificate
/// that is useless at once).
fn days_parser() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(pki::MAX_DAYS))
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) for a trust domain.
    Init {
        /// Directory to create ca.pem and ca.key in (created if missing; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// The deployment's trust domain, e.g. dr.example.com: certificates name spiffe://<domain>/site/<SITE> and spiffe://<domain>/operator/<NAME>.
        #[arg(long)]
        trust_domain: String,
        /// Lifetime of the CA in days (1 to 36500); every certificate it issues ends by then.
        #[arg(long, default_value_t = 3650, value_parser = days_parser())]
        days: u32,
    },
    /// Create the controller's intermediate CA (OUT/ca.pem, OUT/ca.key),
    /// signed by the offline root in --dir, path length 0: the only CA key
    /// on a running machine. Name it in the controller's [pki]
    /// intermediate_cert and intermediate_key. `drctl pki issue --dir OUT`
    /// issues from it too (the chain is written with the certificate).
    Intermediate {
        /// Directory of the root CA (ca.pem, ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// Directory to write the intermediate's ca.pem and ca.key in.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days; agent certificates never outlive it.
        #[arg(long, default_value_t = 90, value_parser = days_parser())]
        days: u32,
    },
    /// Issue a certificate signed by the CA in --dir.
    Issue {
        #[command(subcommand)]
        kind: IssueKind,
        /// Directory of the CA (ca.pem, ca.key), as made by `drctl pki init`.
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        /// Where to write <name>.pem and <name>.key (default: --dir).
        #[arg(long, global = true)]
        out: Option<PathBuf>,
        /// Lifetime in days (1 to 36500), from now; shortened (with a warning) to end with the CA.
        #[arg(long, global = true, default_value_t = 365, value_parser = days_parser())]
        days: u32,
        /// Explicit validity start (RFC 3339, e.g. 2026-01-01T00:00:00Z); default: a minute ago.
        #[arg(long, global = true)]
        not_before: Option<String>,
        /// Explicit validity end (RFC 3339); replaces --days; refused if after the CA's end.
        #[arg(long, global = true)]
        not_after: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum IssueKind {
    /// The controller's server certificate.
    Controller {
        /// DNS names agents and drctl dial (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses agents and drctl dial (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// File name stem: writes <NAME>.pem and <NAME>.key.
        #[arg(long, default_value = "controller")]
        name: String,
    },
    /// An agent certificate for one site (spiffe://<domain>/site/<SITE>); writes site-<SITE>.pem/.key.
    Site {
        /// The site id, as in the controller's config.
        site: String,
    },
    /// An operator certificate (spiffe://<domain>/operator/<NAME>); writes operator-<NAME>.pem/.key.
    Operator {
        /// The operator's name: lower-case letters, digits and dashes.
        name: String,
    },
}

fn parse_time(s: &str, flag: &str) -> Result<time::OffsetDateTime, CliError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| CliError::Usage(format!("--{flag} `{s}` is not an RFC 3339 time: {e}")))
}

/// Runs one command. Errors are returned for `main` to print (as text on
/// stderr, and with `-o json` also as a JSON error object on stdout).
pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let output = args.output;
    let (command, conn) = match args.command {
        Command::Pki { command } => return pki_command(command, output),
        Command::Status { sites, problems, all, conn } => (Remote::Status { sites, problems, all }, conn),
        Command::Backup { site, wait, conn } => (Remote::Backup { site, wait }, conn),
        Command::Backups { site, conn } => (Remote::Backups { site }, conn),
        Command::Failover { site, target, conn } => (Remote::Failover { site, target, restore: false, failback: false }, conn),
        Command::Failback { site, target, conn } => (Remote::Failover { site, target, restore: false, failback: true }, conn),
        Command::Restore { site, target, conn } => {
            if target.backup.is_none() {
                return Err(CliError::Usage(format!(
                    "`drctl restore {site}` needs --backup AMI (see `drctl backups {site}`); for the newest backup use `drctl failover {site}`"
                )));
            }
            (Remote::Failover { site, target, restore: true, failback: false }, conn)
        }
        Command::Prune { site, dry_run, conn } => (Remote::Prune { site, dry_run }, conn),
        Command::Drill { site, backup, latest: _, random_within, region, keep, plan, wait, conn } => {
            let req = pb::StartDrillRequest {
                site_id: site,
                backup_image_id: backup.unwrap_or_default(),
                region: region.unwrap_or_default(),
                random_within_ms: random_within.map(|d| Duration::from(d).as_millis() as u64).unwrap_or(0),
                keep_ms: keep.map(|d| Duration::from(d).as_millis() as u64).unwrap_or(0),
                plan_only: plan,
            };
            (Remote::Drill { req, wait }, conn)
        }
        Command::Drills { site, limit, conn } => (Remote::Drills { site, limit }, conn),
        Command::Approve { operation, wait, conn } => {
            (Remote::Signal { id: operation, signal: "approve".into(), wait, stored_is_success: true }, conn)
        }
        Command::Deny { operation, conn } => {
            (Remote::Signal { id: operation, signal: "deny".into(), wait: false, stored_is_success: true }, conn)
        }
        Command::Site { site, events, conn } => (Remote::Site { site, events }, conn),
        Command::Revoke { site, serial, reason, undo, conn } => {
            (Remote::Revoke { site, serial: serial.unwrap_or_default(), reason, undo }, conn)
        }
        Command::RotateCa { action, root, intermediate, force, conn } => {
            let mut req = pb::RotateCaRequest { action: action.clone(), force, ..Default::default() };
            if action == "start" {
                let (Some(root), Some(dir)) = (root, intermediate) else {
                    return Err(CliError::Usage(
                        "`drctl rotate-ca start` needs --root NEW_ROOT/ca.pem and --intermediate NEW_INTERMEDIATE_DIR".into(),
                    ));
                };
                let read =
                    |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())));
                req.new_root_pem = read(root)?;
                req.new_intermediate_cert_pem = read(dir.join(pki::CA_CERT))?;
                req.new_intermediate_key_pem = read(dir.join(pki::CA_KEY))?;
            }
            (Remote::RotateCa { req }, conn)
        }
        Command::AllowEnrol { site, instance, token, ttl, conn } => {
            (Remote::AllowEnrol { site, instance, token, ttl_ms: Duration::from(ttl).as_millis() as u64 }, conn)
        }
        Command::Pause { site, duration, reason, conn } => {
            let for_ms = Duration::from(duration).as_millis() as u64;
            if for_ms == 0 {
                return Err(CliError::Usage("--for must be longer than 0 (to resume, `drctl unpause SITE`)".into()));
            }
            (Remote::Pause { site, for_ms, reason }, conn)
        }
        Command::Unpause { site, conn } => (Remote::Pause { site, for_ms: 0, reason: String::new() }, conn),
        Command::Events { site, limit, follow, conn } => (Remote::Events { site: site.unwrap_or_default(), limit, follow }, conn),
        Command::Operation { words, wait, conn } => match words.as_slice() {
            [id] => (Remote::Operation { id: id.clone(), wait }, conn),
            [signal, id] if ["resume", "abort", "approve", "deny"].contains(&signal.as_str()) => {
                (Remote::Signal { id: id.clone(), signal: signal.clone(), wait, stored_is_success: false }, conn)
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "`drctl operation {}`: give an operation id, or resume|abort|approve|deny and an id",
                    words.join(" ")
                )));
            }
        },
    };
    if let Remote::Failover { site, target, restore, failback } = &command {
        // A format flag never confirms: with `-o json` a change needs
        // `--yes` like anywhere else. Refused before anything is sent.
        if output == Output::Json && !target.plan && !target.yes {
            let what = failover_word(*restore, *failback);
            return Err(CliError::Usage(format!(
                "{what} of {site} needs a confirmation: -o json only chooses the output, it does not confirm. Nothing was sent to the controller; read the plan with `drctl -o json {what} {site} --plan`, then run it with --yes"
            )));
        }
    }
    let c = conn.or(args.conn);
    let conn = Connection::resolve(c.config, c.controller, c.server_name, c.ca, c.cert, c.key)?;
    warn_if_ending(&conn.tls.cert);
    // A standby refuses every request before acting on it: asking the
    // leader it names instead repeats nothing.
    let (conn, result) = match remote(&conn, command.clone(), output).await {
        Err(CliError::NotLeader { url, leader }) => {
            eprintln!("drctl: {url} is a standby; asking the leader at {leader}");
            let leader_conn = conn.redirect(&leader)?;
            let result = remote(&leader_conn, command, output).await;
            (leader_conn, result)
        }
        other => (conn, other),
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => Err(conn.explain(e).await),
    }
}

/// The commands that talk to the controller.
#[derive(Clone)]
enum Remote {
    RotateCa {
        req: pb::RotateCaRequest,
    },
    Revoke {
        site: String,
        serial: String,
        reason: String,
        undo: bool,
    },
    AllowEnrol {
        site: String,
        instance: String,
        token: bool,
        ttl_ms: u64,
    },
    Status {
        sites: Vec<String>,
        problems: bool,
        all: bool,
    },
    /// `stored_is_success`: without `wait`, exit 0 once the signal is
    /// stored (`approve`, `deny`), not the operation's state.
    Signal {
        id: String,
        signal: String,
        wait: bool,
        stored_is_success: bool,
    },
    Backup {
        site: String,
        wait: bool,
    },
    Backups {
        site: String,
    },
    Failover {
        site: String,
        target: FailoverTarget,
        restore: bool,
        failback: bool,
    },
    Prune {
        site: String,
        dry_run: bool,
    },
    Operation {
        id: String,
        wait: bool,
    },
    Drill {
        req: pb::StartDrillRequest,
        wait: bool,
    },
    Drills {
        site: String,
        limit: u32,
    },
    Site {
        site: String,
        events: u32,
    },
    /// `for_ms` 0: resume.
    Pause {
        site: String,
        for_ms: u64,
        reason: String,
    },
    Events {
        site: String,
        limit: u32,
        follow: bool,
    },
}

async fn remote(conn: &Connection, command: Remote, output: Output) -> Result<ExitCode, CliError> {
    let mut client = conn.connect().await?;
    match command {
        Remote::Status { sites: only, problems, all } => {
            // Small fleets are listed whole; large ones show their problems
            // unless asked for everything.
            let mut req = pb::StatusRequest { site_ids: only.clone(), problems_only: problems, ..Default::default() };
            let first = client.status(req.clone()).await.map_err(|s| conn.status_error(s))?.into_inner();
            let summary = first.summary;
            let rotation = first.ca_rotation.clone();
            let replica = first.controller.clone().map(views::replica_view);
            let large = summary.as_ref().is_some_and(|s| s.sites > 50);
            let mut pages = vec![first];
            if large && !all && only.is_empty() && !problems {
                req.problems_only = true;
                pages = vec![client.status(req.clone()).await.map_err(|s| conn.status_error(s))?.into_inner()];
            }
            while all && !pages.last().map(|p| p.next_page_token.is_empty()).unwrap_or(true) {
                req.page_token = pages.last().map(|p| p.next_page_token.clone()).unwrap_or_default();
                pages.push(client.status(req.clone()).await.map_err(|s| conn.status_error(s))?.into_inner());
            }
            let more = !pages.last().map(|p| p.next_page_token.is_empty()).unwrap_or(true) || (large && !all && only.is_empty());
            let next_page_token = pages.last().map(|p| p.next_page_token.clone()).unwrap_or_default();
            let sites: Vec<_> = pages.into_iter().flat_map(|p| p.sites.into_iter().map(move |s| views::site_view(s, p.now_ms))).collect();
            let summary = views::summary_view(summary);
            let rotation = rotation.map(views::rotation_view);
            match output {
                Output::Json => print_json(
                    &serde_json::json!({ "summary": summary, "sites": sites, "next_page_token": next_page_token, "ca_rotation": rotation, "controller": replica }),
                ),
                Output::Text => {
                    if let Some(r) = replica.as_ref().filter(|r| r.store == "postgresql") {
                        println!("Controller: replica {} leads (lease epoch {}) at {}", r.replica_id, r.epoch, r.address);
                    }
                    print::print_summary(&summary, sites.len(), more, problems || !only.is_empty());
                    if let Some(r) = &rotation {
                        print::print_rotation(r);
                    }
                    print::print_status(&sites);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::Site { site, events } => {
            let reply = client
                .status(pb::StatusRequest { site_ids: vec![site.clone()], ..Default::default() })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let now = reply.now_ms;
            let sites: Vec<_> = reply.sites.into_iter().map(|s| views::site_view(s, now)).collect();
            let ev = client
                .list_events(pb::ListEventsRequest { site_id: site.clone(), after_seq: 0, limit: events, newest: true })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let ev: Vec<_> = ev.events.into_iter().map(views::event_view).collect();
            match output {
                Output::Json => print_json(&serde_json::json!({ "site": sites.first(), "events": ev })),
                Output::Text => {
                    print::print_status(&sites);
                    if let Some(h) = sites.first().and_then(|s| s.health.as_ref()) {
                        println!("\nHealth: {} ({})\n  decision: {}", h.state, h.condition, h.decision);
                        for e in &h.evidence {
                            println!("  {e}");
                        }
                    }
                    if !ev.is_empty() {
                        println!("\nLatest events:");
                        print::print_events(&ev);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::Revoke { site, serial, reason, undo } => {
            let r = client
                .revoke(pb::RevokeRequest { site_id: site.clone(), serial: serial.clone(), reason, undo })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let what = if serial.is_empty() { format!("every certificate of {site}") } else { format!("certificate {serial} of {site}") };
            match output {
                Output::Json => print_json(&serde_json::json!({ "site_id": site, "serial": serial, "undo": undo, "closed": r.closed })),
                Output::Text if undo => println!("the revocation of {site} is lifted: its instances may enrol again"),
                Output::Text => println!("{what} revoked; {} live stream(s) closed", r.closed),
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::RotateCa { req } => {
            let r = client.rotate_ca(req).await.map_err(|s| conn.status_error(s))?.into_inner();
            let view = views::rotation_view(r);
            match output {
                Output::Json => print_json(&serde_json::json!(view)),
                Output::Text => print::print_rotation(&view),
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::AllowEnrol { site, instance, token, ttl_ms } => {
            let r = client
                .allow_enrolment(pb::AllowEnrolmentRequest { site_id: site.clone(), instance_id: instance.clone(), token, ttl_ms })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let until = views::rfc3339(r.expires_at_ms);
            match output {
                Output::Json => {
                    print_json(&serde_json::json!({ "site_id": site, "instance_id": instance, "token": r.token, "expires_at": until }))
                }
                Output::Text if token => {
                    println!("{}", r.token);
                    eprintln!(
                        "drctl: one-time enrolment token for {site} instance {instance}, usable until {}: put it in the agent's tls.enrol_token_file",
                        until.unwrap_or_default()
                    );
                }
                Output::Text => println!("instance {instance} of {site} may enrol once more"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::Pause { site, for_ms, reason } => {
            let r = client
                .pause_recovery(pb::PauseRecoveryRequest { site_id: site.clone(), for_ms, reason })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner();
            let until = views::rfc3339(r.paused_until_ms);
            match output {
                Output::Json => print_json(&serde_json::json!({ "site_id": site, "paused_until": until })),
                Output::Text if r.paused_until_ms == 0 => println!("automatic recovery of {site} resumed"),
                Output::Text => {
                    println!("automatic recovery of {site} paused until {} (`drctl unpause {site}` to resume)", until.unwrap_or_default())
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::Events { site, limit, follow } => {
            let mut req = pb::ListEventsRequest { site_id: site, after_seq: 0, limit: limit.max(1), newest: true };
            loop {
                let got = client.list_events(req.clone()).await.map_err(|s| conn.status_error(s))?.into_inner().events;
                if let Some(last) = got.last() {
                    req.after_seq = last.seq;
                }
                let views: Vec<_> = got.into_iter().map(views::event_view).collect();
                match output {
                    // One JSON object per line when following.
                    Output::Json if follow => {
                        for v in &views {
                            println!("{}", serde_json::to_string(v).expect("events serialize"));
                        }
                    }
                    Output::Json => print_json(&serde_json::json!({ "events": views })),
                    Output::Text => print::print_events(&views),
                }
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                // Follow: new events oldest first.
                req.newest = false;
                req.limit = 1000;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Remote::Signal { id, signal, wait, stored_is_success } => {
            let op = client
                .signal_operation(pb::SignalRequest { operation_id: id.clone(), signal: signal.clone() })
                .await
                .map_err(|s| {
                    conn.unanswered(
                        conn.status_error(s),
                        &format!("{signal} operation {id}"),
                        &[format!("drctl operation {id}"), "drctl events".to_owned()],
                    )
                })?
                .into_inner();
            if output == Output::Text {
                println!("{signal} sent to {id} (it was {})", op.state);
            }
            if stored_is_success && !wait {
                if output == Output::Json {
                    print_json(&serde_json::json!({ "operation_id": id, "signal": signal, "state": op.state }));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let op = if wait { crate::watch::watch_after_signal(conn, &mut client, &id, output).await? } else { op };
            finish(op, output)
        }
        Remote::Backup { site, wait } => {
            let id = client
                .start_backup(pb::StartBackupRequest { site_id: site.clone() })
                .await
                .map_err(|s| {
                    conn.unanswered(
                        conn.status_error(s),
                        &format!("start a backup of {site}"),
                        &[format!("drctl status --site {site}"), format!("drctl backups {site}"), format!("drctl events {site}")],
                    )
                })?
                .into_inner()
                .operation_id;
            match output {
                // First line, before any watch: a script has the id even if
                // the watch is cut short.
                Output::Json => print_json(&serde_json::json!({ "operation_id": id, "site_id": site })),
                Output::Text if wait => println!("Backup of {site} started: operation {id}"),
                Output::Text => println!("Backup of {site} started: operation {id}\nFollow it with: drctl operation {id} --wait"),
            }
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            finish(crate::watch::watch(conn, &mut client, &id, output).await?, output)
        }
        Remote::Failover { site, target, restore, failback } => {
            let what = failover_word(restore, failback);
            let mut req = pb::StartFailoverRequest {
                site_id: site.clone(),
                backup_image_id: target.backup.clone().unwrap_or_default(),
                region: target.region.clone().unwrap_or_default(),
                plan_only: true,
                restore,
                failback,
                fresh: target.fresh,
                use_spare: target.use_spare,
            };
            let planned = client.start_failover(req.clone()).await.map_err(|s| conn.status_error(s))?.into_inner();
            let plan: serde_json::Value = serde_json::from_str(&planned.plan_json)
                .map_err(|e| CliError::Failed(format!("the controller sent a plan drctl cannot read: {e}")))?;
            if target.plan {
                match output {
                    Output::Json => print_json(&serde_json::json!({ "site_id": site, "plan": plan })),
                    Output::Text => {
                        crate::failover::print_plan(&plan);
                        println!(
                            "Nothing was changed. Run it with: drctl {what} {site}{}",
                            if target.backup.is_some() { format!(" --backup {}", req.backup_image_id) } else { String::new() }
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            if output == Output::Text {
                crate::failover::print_plan(&plan);
                if !target.yes {
                    crate::failover::confirm(&site, what)?;
                }
            }
            // Run what was shown: the hot spare it takes, else exactly the
            // backup shown, even if a newer one completed in between.
            req.plan_only = false;
            if plan["spare"].is_object() {
                req.use_spare = true;
            } else if let Some(image) = plan["backup"]["image_id"].as_str() {
                req.backup_image_id = image.to_owned();
            }
            let started = client
                .start_failover(req)
                .await
                .map_err(|s| {
                    conn.unanswered(
                        conn.status_error(s),
                        &format!("start a {what} of {site}"),
                        &[format!("drctl status --site {site}"), format!("drctl events {site}")],
                    )
                })?
                .into_inner();
            let id = started.operation_id;
            match output {
                Output::Json => print_json(&serde_json::json!({ "operation_id": id, "site_id": site, "plan": plan })),
                Output::Text if target.wait => println!("{what} of {site} started: operation {id}"),
                Output::Text => println!("{what} of {site} started: operation {id}\nFollow it with: drctl operation {id} --wait"),
            }
            if !target.wait {
                return Ok(ExitCode::SUCCESS);
            }
            finish(crate::watch::watch(conn, &mut client, &id, output).await?, output)
        }
        Remote::Drill { mut req, wait } => {
            let site = req.site_id.clone();
            let plan_only = req.plan_only;
            req.plan_only = true;
            let planned = client.start_drill(req.clone()).await.map_err(|s| conn.status_error(s))?.into_inner();
            let plan: serde_json::Value = serde_json::from_str(&planned.plan_json)
                .map_err(|e| CliError::Failed(format!("the controller sent a plan drctl cannot read: {e}")))?;
            if plan_only {
                match output {
                    Output::Json => print_json(&serde_json::json!({ "site_id": site, "plan": plan })),
                    Output::Text => {
                        crate::failover::print_plan(&plan);
                        println!(
                            "Nothing was changed. Run it with: drctl drill {site} --backup {}",
                            plan["backup"]["image_id"].as_str().unwrap_or_default()
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            if output == Output::Text {
                crate::failover::print_plan(&plan);
            }
            // Exactly the backup that was shown (a random pick included).
            req.plan_only = false;
            req.random_within_ms = 0;
            if let Some(image) = plan["backup"]["image_id"].as_str() {
                req.backup_image_id = image.to_owned();
            }
            let id = client
                .start_drill(req)
                .await
                .map_err(|s| {
                    conn.unanswered(
                        conn.status_error(s),
                        &format!("start a drill of {site}"),
                        &[format!("drctl status --site {site}"), format!("drctl drills {site}"), format!("drctl events {site}")],
                    )
                })?
                .into_inner()
                .operation_id;
            match output {
                Output::Json => print_json(&serde_json::json!({ "operation_id": id, "site_id": site, "plan": plan })),
                Output::Text if wait => println!("drill of {site} started: operation {id}"),
                Output::Text => println!(
                    "drill of {site} started: operation {id}\nFollow it with: drctl operation {id} --wait; its result: drctl drills {site}"
                ),
            }
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let op = crate::watch::watch(conn, &mut client, &id, output).await?;
            let code = finish(op, output)?;
            let drills = client
                .list_drills(pb::ListDrillsRequest { site_id: site.clone(), limit: 5 })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner()
                .drills;
            if let Some(d) = drills.into_iter().find(|d| d.operation_id == id) {
                let view = views::drill_view(d);
                match output {
                    Output::Json => print_json(&serde_json::json!({ "drill": view })),
                    Output::Text => print::print_drill(&view),
                }
            }
            Ok(code)
        }
        Remote::Drills { site, limit } => {
            let drills: Vec<_> = client
                .list_drills(pb::ListDrillsRequest { site_id: site.clone(), limit })
                .await
                .map_err(|s| conn.status_error(s))?
                .into_inner()
                .drills
                .into_iter()
                .map(views::drill_view)
                .collect();
            match output {
                Output::Json => print_json(&serde_json::json!({ "site_id": site, "drills": drills })),
                Output::Text => print::print_drills(&site, &drills),
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::Operation { id, wait } => {
            let op = if wait {
                crate::watch::watch(conn, &mut client, &id, output).await?
            } else {
                client.get_operation(pb::OperationRef { operation_id: id }).await.map_err(|s| conn.status_error(s))?.into_inner()
            };
            finish(op, output)
        }
        Remote::Prune { site, dry_run } => {
            let reply =
                client.prune(pb::PruneRequest { site_id: site.clone(), dry_run }).await.map_err(|s| conn.status_error(s))?.into_inner();
            let decisions = views::decision_views(reply);
            match output {
                Output::Json => print_json(&serde_json::json!({ "site_id": site, "dry_run": dry_run, "decisions": decisions })),
                Output::Text => print::print_prune(&site, dry_run, &decisions),
            }
            Ok(ExitCode::SUCCESS)
        }
        Remote::Backups { site } => {
            let reply =
                client.list_backups(pb::ListBackupsRequest { site_id: site.clone() }).await.map_err(|s| conn.status_error(s))?.into_inner();
            let now = views::now_ms();
            let backups: Vec<_> = reply.backups.into_iter().map(|b| views::backup_view(b, now)).collect();
            match output {
                Output::Json => print_json(&serde_json::json!({ "site_id": site, "backups": backups })),
                Output::Text => print::print_backups(&site, &backups),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn failover_word(restore: bool, failback: bool) -> &'static str {
    if failback {
        "failback"
    } else if restore {
        "restore"
    } else {
        "failover"
    }
}

/// Prints an operation; exit 0 when it succeeded (or is still running), 1 when it failed.
fn finish(op: pb::Operation, output: Output) -> Result<ExitCode, CliError> {
    let view = views::operation_view(op);
    match output {
        Output::Json => print_json(&view),
        Output::Text => print::print_operation(&view),
    }
    Ok(match view.state.as_str() {
        "failed" | "cancelled" => ExitCode::FAILURE,
        "waiting" => {
            if output == Output::Text {
                println!(
                    "It waits for a human: `drctl operation resume {id}` retries the step, `drctl operation abort {id}` ends it.",
                    id = view.id
                );
            }
            ExitCode::from(crate::error::exit::WAITING)
        }
        _ => ExitCode::SUCCESS,
    })
}

/// Warns (stderr) when the operator's certificate is in the last third of
/// its life: operator certificates are issued by hand and do not renew.
fn warn_if_ending(cert: &std::path::Path) {
    let Some(c) = dr_proto::tls::load_certs(cert).ok().and_then(|c| dr_proto::tls::PresentedCert::from_der(c[0].as_ref())) else { return };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let third = c.not_after_ms.saturating_sub(c.not_before_ms) / 3;
    if now + third >= c.not_after_ms {
        eprintln!(
            "drctl: warning: your certificate {} ends at {}: issue a new one (`drctl pki issue operator NAME --dir CA_DIR`)",
            cert.display(),
            views::rfc3339(c.not_after_ms).unwrap_or_default()
        );
    }
}

fn pki_command(command: PkiCommand, output: Output) -> Result<ExitCode, CliError> {
    let mut warnings = Vec::new();
    let written = match command {
        PkiCommand::Init { dir, trust_domain, days } => {
            vec![pki::init_ca(&dir, &trust_domain, Validity::days(days)?)?, dir.join(pki::CA_KEY)]
        }
        PkiCommand::Intermediate { dir, out, days } => {
            let issued = pki::intermediate(&dir, &out, Validity::days(days)?)?;
            if let Some(asked) = issued.shortened_from {
                warnings.push(format!(
                    "the intermediate ends at {} with its root, not at {} as --days asked",
                    pki::stamp(issued.not_after),
                    pki::stamp(asked)
                ));
            }
            vec![issued.cert, issued.key]
        }
        PkiCommand::Issue { kind, dir, out, days, not_before, not_after } => {
            let dir = dir.ok_or_else(|| CliError::Usage("give --dir, the CA's directory".into()))?;
            let out = out.unwrap_or_else(|| dir.clone());
            let mut validity = Validity::days(days)?;
            if let Some(t) = &not_before {
                validity.not_before = parse_time(t, "not-before")?;
            }
            let explicit_end = not_after.is_some();
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
            let end = if explicit_end { pki::CaEnd::Refuse } else { pki::CaEnd::Clamp };
            let issued = pki::issue_with(&dir, &subject, validity, end, &out, &stem)?;
            if let Some(asked) = issued.shortened_from {
                warnings.push(format!(
                    "the certificate ends at {} with its CA, not at {} as --days asked: a certificate cannot outlive its CA",
                    pki::stamp(issued.not_after),
                    pki::stamp(asked)
                ));
            }
            vec![issued.cert, issued.key]
        }
    };
    for w in &warnings {
        eprintln!("drctl: warning: {w}");
    }
    match output {
        Output::Json => print_json(&serde_json::json!({ "written": written, "warnings": warnings })),
        Output::Text => {
            for path in written {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
