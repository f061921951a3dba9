//! The whole restore runbook on one machine, in order, each step skipped
//! when already done:
//!
//! 1. stop the app;
//! 2. rewrite the Replicated files from the old IPs found in them to the
//!    current ones (from IMDS, or `--private-ip` / `--public-ip`);
//! 3. set the hostname (when `--hostname` is given);
//! 4. wipe the Nomad server's state;
//! 5. start the app and wait for its health check to pass (the same step
//!    the controller's failover requires: [`health::start_healthy`]);
//! 6. clean up builds that started before `--builds-before` (the backup's
//!    point in time).
//!
//! Every step is idempotent, so after a failure `recover` is simply run
//! again. `--dry-run` prints the plan: what each step would do, from the
//! same code paths. With `--offline --root DIR` (a restored disk mounted on
//! a rescue instance) only the file steps (2 and 4) run: nothing of the app
//! runs there, and IMDS describes the rescue instance, so the new IPs must
//! be given.

use std::net::IpAddr;

use serde::Serialize;

pub(crate) use dr_proto::contract::{RecoverParams, RecoverReport, RunbookStep};

use crate::config::Config;
use crate::steps::error::ErrorKind;
use crate::steps::{app, builds, health, nomad_state, rewrite};
use crate::sys::{facts, identity, imds};

#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoverError {
    #[error(
        "with --offline (a mounted disk), give --private-ip (and --public-ip if it has one): IMDS describes this instance, not the one that will boot the disk"
    )]
    NeedAddresses,
    #[error(
        "refusing to recover: {reason}. Recover stops the app and wipes the Nomad state; on a healthy primary that is an outage. If this machine really is a restored copy, run it again with --force"
    )]
    NotRestored { reason: String },
    #[error(
        "--offline acts on a mounted disk: give --root DIR (the disk's mount point); it would otherwise rewrite and wipe this machine's own `/`"
    )]
    OfflineNeedsRoot,
    #[error("cannot record this machine's identity: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("cannot learn this instance's addresses from IMDS: {0}")]
    Imds(String),
    #[error("cannot read the old addresses from the Replicated files: {0}")]
    Find(#[from] rewrite::RewriteError),
}

impl RecoverError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RecoverError::NeedAddresses | RecoverError::OfflineNeedsRoot => ErrorKind::Invalid,
            RecoverError::NotRestored { .. } => ErrorKind::Refused,
            RecoverError::Identity(_) => ErrorKind::Failed,
            RecoverError::Find(e) => e.kind(),
            RecoverError::Imds(_) => ErrorKind::Failed,
        }
    }
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("reports serialize")
}

/// Records a step's result; returns false when it failed (recover stops).
fn push<T: Serialize, E: std::fmt::Display>(
    report: &mut RecoverReport,
    name: &str,
    result: Result<T, E>,
    outcome: impl FnOnce(&T) -> (String, String),
    actions: impl FnOnce(&T) -> Vec<String>,
) -> bool {
    match result {
        Ok(r) => {
            let (outcome, summary) = outcome(&r);
            report.actions.extend(actions(&r));
            report.steps.push(RunbookStep { name: name.to_owned(), outcome, summary, report: json(&r) });
            true
        }
        Err(e) => {
            report.steps.push(RunbookStep {
                name: name.to_owned(),
                outcome: "failed".into(),
                summary: e.to_string(),
                report: serde_json::Value::Null,
            });
            report.failed = Some(format!("{name}: {e}"));
            report.actions.push(format!("fix the cause and run `dr-agent recover` again (every step is idempotent): {e}"));
            false
        }
    }
}

fn skipped(report: &mut RecoverReport, name: &str, why: &str) {
    report.steps.push(RunbookStep {
        name: name.to_owned(),
        outcome: "skipped".into(),
        summary: why.to_owned(),
        report: serde_json::Value::Null,
    });
}

fn verb(dry_run: bool, already: bool) -> String {
    match (dry_run, already) {
        (_, true) => "already done",
        (true, false) => "would do",
        (false, false) => "done",
    }
    .to_owned()
}

/// Runs the runbook. Step failures end up in the report (`failed`), not in
/// the error: the error is for what stops recover before its first step.
pub(crate) async fn run(config: &Config, params: &RecoverParams, dry_run: bool) -> Result<RecoverReport, RecoverError> {
    let offline = params.offline;
    if offline && std::fs::canonicalize(&config.root).map(|r| r == std::path::Path::new("/")).unwrap_or(false) {
        return Err(RecoverError::OfflineNeedsRoot);
    }
    let mut warnings = Vec::new();
    let mut evidence = String::new();
    if !offline {
        // Was this machine restored? Its identity record (captured with the
        // image) names the instance it was taken on.
        let client = imds::ImdsClient::new(&config.imds.endpoint, config.imds.timeout).map_err(|e| RecoverError::Imds(e.to_string()))?;
        let (live, imds_down) = identity::live(&client, std::path::Path::new(facts::BOOT_ID_PATH)).await?;
        let e = identity::restore_evidence(&config.state_dir, &live, params.candidate)?;
        if let Some(why) = imds_down {
            warnings.push(format!("IMDS did not answer ({why}): the instance id was not checked"));
        }
        evidence = match (e.restored, params.force, dry_run) {
            (true, _, _) => e.reason,
            (false, true, _) => format!("--force ({})", e.reason),
            (false, false, true) => {
                warnings.push(format!("the real run would refuse: {}; pass --force if this is a restored copy", e.reason));
                String::new()
            }
            (false, false, false) => return Err(RecoverError::NotRestored { reason: e.reason }),
        };
    }
    let (private_ip, public_ip) = match (params.private_ip, offline) {
        (Some(p), _) => (Some(p), params.public_ip),
        (None, true) => return Err(RecoverError::NeedAddresses),
        (None, false) => {
            let client =
                imds::ImdsClient::new(&config.imds.endpoint, config.imds.timeout).map_err(|e| RecoverError::Imds(e.to_string()))?;
            let f = facts::imds_facts(&client).await.map_err(|e| RecoverError::Imds(e.to_string()))?;
            (Some(f.private_ip), params.public_ip.or(f.public_ip))
        }
    };
    let found = rewrite::find_addresses(&config.root)?;
    let mut report =
        RecoverReport { dry_run, offline, private_ip, public_ip, evidence, steps: Vec::new(), failed: None, actions: Vec::new(), warnings };

    // 2. Rewrite addresses: every old address in the files to the current one.
    let pairs = |all: &[IpAddr], new: Option<IpAddr>| -> Vec<rewrite::AddressChange> {
        match new {
            Some(new) => all.iter().filter(|old| **old != new).map(|old| rewrite::AddressChange { old: *old, new }).collect(),
            None => Vec::new(),
        }
    };
    let rp = rewrite::RewriteParams { private: pairs(&found.private_all, private_ip), public: pairs(&found.public_all, public_ip) };
    // Is anything on disk still to change? If not, the app is left running
    // (recover run again after a success changes nothing).
    let needs_rewrite =
        !(rp.private.is_empty() && rp.public.is_empty()) && rewrite::run(config, &rp, true).await.map(|r| !r.up_to_date).unwrap_or(true);
    let needs_hostname = match (&params.hostname, offline) {
        (Some(h), false) => {
            app::set_hostname(config, &app::HostnameParams { hostname: h.clone() }, true).await.map(|r| r.changed).unwrap_or(true)
        }
        _ => false,
    };
    let wipe_params = nomad_state::WipeParams { offline };
    let needs_wipe = match nomad_state::run(config, &wipe_params, true).await {
        Ok(r) => r.state != "already done",
        Err(_) => true,
    };

    // 1. Stop the app.
    if offline {
        skipped(&mut report, "app-stop", "offline: no app runs on a mounted disk");
    } else if !(needs_rewrite || needs_hostname || needs_wipe) {
        report.steps.push(RunbookStep {
            name: "app-stop".into(),
            outcome: "already done".into(),
            summary: "nothing on disk needs changing: the app is not stopped".into(),
            report: serde_json::Value::Null,
        });
    } else {
        let r = app::run(config, &app::AppParams { target: app::Target::Stopped, force: false }, dry_run).await;
        if !push(&mut report, "app-stop", r, |r| (verb(dry_run, r.already), format!("app {}", r.final_state)), |r| r.actions.clone()) {
            return Ok(report);
        }
    }

    if found.public.is_some() && public_ip.is_none() {
        report.warnings.push("the files name a public IP but this instance has none: PUBLIC_ADDRESS left as it is".into());
    }
    if rp.private.is_empty() && rp.public.is_empty() {
        report.steps.push(RunbookStep {
            name: "rewrite-addresses".into(),
            outcome: "already done".into(),
            summary: "the Replicated files already name this machine's addresses".into(),
            report: serde_json::Value::Null,
        });
    } else {
        let r = rewrite::run(config, &rp, dry_run).await;
        if !push(
            &mut report,
            "rewrite-addresses",
            r,
            |r| {
                let changed: Vec<String> = r.files.iter().filter(|f| f.changed_lines > 0).map(|f| f.path.display().to_string()).collect();
                (verb(dry_run, r.up_to_date), if changed.is_empty() { "nothing to change".into() } else { changed.join(", ") })
            },
            |r| r.actions.iter().chain(r.warnings.iter()).cloned().collect(),
        ) {
            return Ok(report);
        }
    }

    // 3. Hostname.
    match (&params.hostname, offline) {
        (None, _) => skipped(&mut report, "set-hostname", "no --hostname given: the hostname stays as it is"),
        (Some(_), true) => skipped(&mut report, "set-hostname", "offline: run `dr-agent set-hostname` once the machine runs"),
        (Some(h), false) => {
            let r = app::set_hostname(config, &app::HostnameParams { hostname: h.clone() }, dry_run).await;
            if !push(
                &mut report,
                "set-hostname",
                r,
                |r| (verb(dry_run, !r.changed), format!("{} -> {}", r.old.clone().unwrap_or_default(), r.new)),
                |r| r.actions.clone(),
            ) {
                return Ok(report);
            }
        }
    }

    // 4. Wipe the Nomad server's state. In a dry run the app has not really
    // been stopped, so "the app runs" is what the real run will have fixed.
    let r = nomad_state::run(config, &wipe_params, dry_run).await;
    match r {
        Err(nomad_state::WipeError::AppRunning { path, .. }) if dry_run => {
            report.steps.push(RunbookStep {
                name: "wipe-nomad".into(),
                outcome: "would do".into(),
                summary: format!("wipe {} once the app is stopped", path.display()),
                report: serde_json::Value::Null,
            });
        }
        r => {
            if !push(
                &mut report,
                "wipe-nomad",
                r,
                |r| (verb(dry_run, r.state == "already done"), format!("{} ({} files)", r.path.display(), r.removed.files)),
                |r| r.actions.clone(),
            ) {
                return Ok(report);
            }
        }
    }

    // 5. Start the app.
    let stop_planned = report.steps.iter().any(|s| s.name == "app-stop" && s.outcome == "would do");
    if offline {
        skipped(&mut report, "app-start", "offline: start the machine, then `dr-agent app-start`");
    } else if dry_run && stop_planned {
        // The dry run did not stop the app; the real run will have, so it
        // will start it again here.
        report.steps.push(RunbookStep {
            name: "app-start".into(),
            outcome: "would do".into(),
            summary: "start the app again and wait until it is started".into(),
            report: serde_json::Value::Null,
        });
    } else {
        // The same app start the controller's failover requires: started,
        // then the frontend's health check answering 2xx.
        let r = health::start_healthy(config, dry_run).await;
        let summary = |r: &health::StartedHealthy| match &r.health {
            Some(h) => format!("app {}; {} answered {}", r.app.final_state, h.url, h.status),
            None => format!("app {}", r.app.final_state),
        };
        if !push(&mut report, "app-start", r, |r| (verb(dry_run, r.app.already), summary(r)), |r| r.app.actions.clone()) {
            return Ok(report);
        }
        if !dry_run {
            // The app runs on the new state: this machine is the primary
            // from now on, and a later recover here needs --force (or the
            // controller's word): it would wipe live Nomad state.
            identity::mark_recovered(&config.state_dir, crate::sys::clock::utc_stamp(std::time::SystemTime::now()))?;
        }
    }

    // 6. Builds the backup caught half-way.
    match (&params.builds_before, offline) {
        (None, _) => {
            skipped(&mut report, "cleanup-builds", "no --builds-before given");
            report.actions.push("delete the builds the backup caught half-way: `dr-agent cleanup-builds --before <backup time>`".into());
        }
        (Some(_), true) => skipped(&mut report, "cleanup-builds", "offline: run it once the app runs"),
        (Some(before), false) => {
            let r = builds::run(config, &builds::CleanupParams { before: before.clone() }, dry_run).await;
            push(
                &mut report,
                "cleanup-builds",
                r,
                |r| {
                    (
                        verb(dry_run, r.already_done),
                        format!("{} deleted, {} failed, {} refused, {} kept", r.deleted, r.failed, r.refused, r.kept),
                    )
                },
                |r| r.actions.iter().chain(r.warnings.iter()).cloned().collect(),
            );
        }
    }
    report.actions.dedup();
    Ok(report)
}
