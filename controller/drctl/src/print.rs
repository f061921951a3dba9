//! Printing views: aligned text for humans, or JSON lines for scripts
//! (`--output json`: every object drctl prints is one line of JSON on
//! stdout; progress and diagnostics go to stderr).

use std::io::Write;

use serde::Serialize;

use crate::views::{BackupView, DecisionView, OperationView, SiteView, human_duration};

/// One JSON value as one line on stdout.
pub fn print_json<T: Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value);
    let _ = writeln!(out);
    let _ = out.flush();
}

pub fn print_status(sites: &[SiteView]) {
    if sites.is_empty() {
        return;
    }
    println!(
        "{:<20} {:<10} {:<21} {:<16} {:<16} {:<10} {:<12} LAST BACKUP",
        "SITE", "AGENT", "INSTANCE", "PRIVATE IP", "PUBLIC IP", "APP", "HEARTBEAT"
    );
    for s in sites {
        let (agent, instance, private, public, app, hb) = match &s.agent {
            Some(a) => (
                if a.connected { a.role.clone() } else { "offline".into() },
                a.instance_id.clone(),
                a.private_ip.clone(),
                if a.public_ip.is_empty() { "-".into() } else { a.public_ip.clone() },
                a.app_state.clone(),
                a.last_heartbeat_age_s.map(|s| format!("{} ago", human_duration(s * 1000))).unwrap_or("-".into()),
            ),
            None => ("never".into(), s.primary_instance_id.clone(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let backup = match &s.last_backup {
            Some(b) => format!("{} ({} ago, {})", b.image_id, human_duration(b.age_s * 1000), b.consistency),
            None => "none".into(),
        };
        println!("{:<20} {agent:<10} {instance:<21} {private:<16} {public:<16} {app:<10} {hb:<12} {backup}", s.site_id);
        if let Some(schedule) = &s.schedule {
            let target = s.rpo_target_s.map(|t| human_duration(t * 1000)).unwrap_or_default();
            let now = s.rpo_s.map(|t| human_duration(t * 1000)).unwrap_or_else(|| "no backup yet".into());
            let flag = if s.late { "  LATE" } else { "" };
            println!("{:<20} schedule: {schedule}, quiesce {}; RPO {now} (target {target}){flag}", "", s.quiesce);
        }
        if let Some(op) = &s.running_operation_id {
            println!("{:<20} running: {op}", "");
        }
        if let Some(f) = &s.last_failover {
            println!("{:<20} last failover: {} {} ({})", "", f.operation_id, f.state, f.at.clone().unwrap_or_default());
        }
        if let Some(schedule) = &s.drill_schedule {
            let flag = if s.drill_overdue { "  OVERDUE" } else { "" };
            println!("{:<20} drills: {schedule}, backup {}{flag}", "", s.drill_backup.as_deref().unwrap_or("latest"));
        }
        if let Some(d) = &s.last_drill {
            println!("{:<20} last drill: {}", "", drill_line(d));
        }
        if let Some(p) = &s.spare {
            let kept = match (&p.instance_id, &p.backup_image_id) {
                (Some(i), Some(b)) => format!("{i} from {b} ({} behind the newest backup)", human_duration(p.lag_s * 1000)),
                _ => "none installed yet".to_owned(),
            };
            let next = p.preparing_operation_id.as_ref().map(|o| format!("; preparing the next: {o}")).unwrap_or_default();
            println!(
                "{:<20} spare ({} in {}, failover prefers {}, max lag {}): {kept}{next}",
                "",
                p.mode,
                p.region,
                p.failover_prefers,
                human_duration(p.max_lag_s * 1000)
            );
        }
        if let Some(h) = &s.health {
            let mode = match (&h.paused_until, &h.paused_by) {
                (Some(until), Some(by)) => format!("{}, PAUSED by {by} until {until}", h.mode),
                _ => h.mode.clone(),
            };
            if h.state == "healthy" {
                println!("{:<20} health: healthy (automatic recovery: {mode})", "");
            } else {
                println!(
                    "{:<20} health: {} ({} for {}; automatic recovery: {mode}): {}",
                    "",
                    h.state.to_uppercase(),
                    h.condition,
                    human_duration(h.condition_for_s * 1000),
                    h.decision
                );
                for e in &h.evidence {
                    println!("{:<20}   {e}", "");
                }
            }
        }
        for i in s.instances.iter().filter(|i| !i.attestation.is_empty()) {
            println!(
                "{:<20} certificate of {}: {} serial {}, until {}{}",
                "",
                i.instance_id,
                i.attestation,
                i.cert_serial,
                i.cert_not_after.as_deref().unwrap_or("?"),
                if i.renewal_error.is_empty() { String::new() } else { format!("; renewal failing: {}", i.renewal_error) }
            );
        }
        for i in s.instances.iter().filter(|i| i.instance_id != s.primary_instance_id) {
            let state = if i.connected { "connected" } else { "offline" };
            let of = if i.operation_id.is_empty() { String::new() } else { format!(" of {}", i.operation_id) };
            let why = if i.reason.is_empty() { String::new() } else { format!(": {}", i.reason) };
            println!("{:<20} also {} {}{of} ({state}){why}", "", i.instance_id, i.role);
        }
        // Current refusals are among the problems below.
        for r in s.refusals.iter().filter(|r| !r.current) {
            println!(
                "{:<20} agent refused earlier: {} (serial {}, from {}), {} time(s), last at {}",
                "",
                r.description,
                r.serial,
                r.peer,
                r.count,
                r.last_at.as_deref().unwrap_or("-")
            );
        }
        for p in &s.problems {
            println!("{:<20} ! {p}", "");
        }
    }
}

/// The fleet's summary line, and what a partial listing left out.
pub fn print_summary(s: &crate::views::SummaryView, shown: usize, more: bool, filtered: bool) {
    println!(
        "{} site(s): {} with the primary's agent connected, {} late, {} with problems; {} agent(s) connected; {} operation(s) active",
        s.sites, s.primary_connected, s.late, s.with_problems, s.agents_connected, s.operations_active
    );
    if more {
        println!("(showing {shown}; `drctl status --all` lists every site, `--site S` one)");
    } else if filtered && shown == 0 {
        println!("(no site matches)");
    }
}

pub fn print_backups(site: &str, backups: &[BackupView]) {
    if backups.is_empty() {
        println!("Site {site} has no backups yet.");
        return;
    }
    println!(
        "{:<22} {:<25} {:<12} {:<11} {:<8} {:<10} {:<9} SNAPSHOTS",
        "AMI", "COMPLETED", "AGE", "CONSISTENCY", "FROZEN", "APP", "STATE"
    );
    for b in backups {
        let frozen = if b.frozen_ms > 0 { format!("{:.2}s", b.frozen_ms as f64 / 1000.0) } else { "-".into() };
        println!(
            "{:<22} {:<25} {:<12} {:<11} {:<8} {:<10} {:<9} {}",
            b.image_id,
            b.completed_at.clone().unwrap_or_default(),
            human_duration(b.age_s * 1000),
            b.consistency,
            frozen,
            b.app_state,
            b.state,
            b.snapshot_ids.join(",")
        );
        for c in &b.copies {
            let err = if c.error.is_empty() { String::new() } else { format!(" ({}, attempt {})", c.error, c.attempts) };
            println!("{:<22} copy in {}: {} {}{err}", "", c.region, if c.image_id.is_empty() { "-" } else { &c.image_id }, c.state);
        }
        if !b.quiesce_note.is_empty() {
            println!("{:<22} quiesce {}: {}", "", b.quiesce, b.quiesce_note);
        }
        if !b.fate.is_empty() {
            println!("{:<22} retention: {}", "", b.fate);
        }
    }
}

pub fn print_prune(site: &str, dry_run: bool, decisions: &[DecisionView]) {
    let verb = if dry_run { "would" } else { "did" };
    println!("Retention of {site} ({}):", if dry_run { "dry run, nothing changed" } else { "applied" });
    for d in decisions {
        let action = if d.action == "keep" { "keep".to_owned() } else { format!("{verb} delete") };
        println!("  {:<22} {:<13} {}", d.image_id, action, d.reason);
    }
}

pub fn print_operation(op: &OperationView) {
    println!("Operation {} ({} of site {})", op.id, op.kind, op.site_id);
    println!("  state:        {}", op.state);
    if !op.error.is_empty() {
        println!("  error:        {}", op.error);
    }
    if !op.waiting_for.is_empty() {
        println!("  waiting for:  {}", op.waiting_for);
    }
    println!("  requested by: {}", op.requested_by);
    println!("  created:      {}", op.created_at.clone().unwrap_or_default());
    if !op.protects.is_empty() {
        println!("  protects:     {}", op.protects.join(", "));
    }
    println!("  steps:");
    for s in &op.steps {
        let took = s.duration_s.map(|d| format!("{d:.1}s")).unwrap_or_default();
        let text = if s.error.is_empty() { s.detail.clone() } else { s.error.clone() };
        println!("    {:<18} {:<8} {:>7}  {}", s.name, s.state, took, text);
    }
    if let Some(r) = &op.report {
        crate::failover::print_report(r);
    }
}

fn secs(s: f64) -> String {
    if s >= 120.0 { human_duration((s * 1000.0) as u64) } else { format!("{s:.1} s") }
}

/// One line: when, outcome, RTO and RPO.
pub fn drill_line(d: &crate::views::DrillView) -> String {
    let when = d.started_at.clone().unwrap_or_default();
    if d.ok {
        format!(
            "{} {when} ok: RTO {}, RPO {} (worst {} over {})",
            d.operation_id,
            secs(d.rto_s),
            secs(d.rpo_s),
            secs(d.worst_rpo_s),
            secs(d.worst_rpo_window_s)
        )
    } else {
        format!("{} {when} FAILED: {}", d.operation_id, d.error)
    }
}

/// `drctl drills SITE`: newest first, then the newest one in detail.
pub fn print_drills(site: &str, drills: &[crate::views::DrillView]) {
    if drills.is_empty() {
        println!("No drill of {site} is recorded. Run one with: drctl drill {site} --wait");
        return;
    }
    println!("{:<34} {:<21} {:<7} {:>9} {:>9} {:>11} {:>10}  BACKUP", "DRILL", "STARTED", "RESULT", "RTO", "RPO", "WORST RPO", "DATA AGE");
    for d in drills {
        println!(
            "{:<34} {:<21} {:<7} {:>9} {:>9} {:>11} {:>10}  {}",
            d.operation_id,
            d.started_at.clone().unwrap_or_default(),
            if d.ok { "ok" } else { "FAILED" },
            if d.rto_s > 0.0 { secs(d.rto_s) } else { "-".into() },
            secs(d.rpo_s),
            secs(d.worst_rpo_s),
            d.data_age_s.map(secs).unwrap_or_else(|| "-".into()),
            d.backup_image_id
        );
    }
    print_drill(&drills[0]);
}

/// One drill in detail.
pub fn print_drill(d: &crate::views::DrillView) {
    println!();
    println!(
        "Drill {} of backup {} ({}), copy {} as {} in {}:",
        d.operation_id,
        d.backup_image_id,
        d.backup_started_at.clone().unwrap_or_default(),
        if d.instance_id.is_empty() { "(none launched)" } else { &d.instance_id },
        d.hostname,
        d.region
    );
    println!("  result:   {}", if d.ok { "ok".to_owned() } else { format!("FAILED: {}", d.error) });
    if d.rto_s > 0.0 {
        let phases: Vec<String> = d.phases_s.iter().filter(|(_, v)| **v > 0.0).map(|(k, v)| format!("{k} {}", secs(*v))).collect();
        println!("  RTO:      {} ({})", secs(d.rto_s), phases.join(", "));
    }
    println!(
        "  RPO:      {} (the backup's age at the start); worst {} over the {} before",
        secs(d.rpo_s),
        secs(d.worst_rpo_s),
        secs(d.worst_rpo_window_s)
    );
    match (&d.newest_build_at, d.data_age_s) {
        (Some(at), Some(age)) => println!("  data:     the copy's newest build started {at} ({} before the drill)", secs(age)),
        _ => println!("  data:     the copy reported no build start time"),
    }
    println!("  teardown: {}", d.teardown);
    if !d.leaked.is_empty() {
        println!("  LEFT RUNNING: {} (the drill reaper terminates them after their dr:keep-until)", d.leaked.join(", "));
    }
}

/// Events, one line each: time, site, kind, summary.
pub fn print_events(events: &[crate::views::EventView]) {
    for e in events {
        let site = if e.site_id.is_empty() { "(fleet)" } else { &e.site_id };
        let op = if e.operation_id.is_empty() { String::new() } else { format!(" [{}]", e.operation_id) };
        println!("{} {:<8} {site:<20} {:<27} {}{op}", e.at.as_deref().unwrap_or("-"), e.severity, e.kind, e.summary);
    }
}

/// A CA rotation: its phase, who lags, what comes next.
pub fn print_rotation(r: &crate::views::RotationView) {
    if r.phase.is_empty() {
        println!("CA rotation: none");
        return;
    }
    println!("CA rotation: phase {} since {}", r.phase, r.since.as_deref().unwrap_or("?"));
    if !r.not_acknowledged.is_empty() {
        println!("  not acknowledged the current roots: {}", r.not_acknowledged.join(", "));
    }
    if !r.on_old_root.is_empty() {
        println!("  live agents still on the root being dropped: {}", r.on_old_root.join(", "));
    }
    if !r.next.is_empty() {
        println!("  next: {}", r.next);
    }
}
