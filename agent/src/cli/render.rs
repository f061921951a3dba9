//! Rendering of step reports for the hand-run CLI: JSON as the report is
//! on the wire ([`Report::to_json`]), or human text: the step's own lines,
//! then its [`Envelope`]'s warnings and actions, rendered here only.

use std::fmt::Write;

use serde::Serialize;

use super::OutputFormat;
use crate::steps::{Envelope, Report};
use crate::steps::{app, builds, drain, freeze, health, nomad_state, recover, rewrite};
use crate::sys::facts::InstanceFacts;
use crate::sys::replicated::AppStatus;

/// A report in the chosen format.
pub(crate) fn report(r: &Report, format: OutputFormat) -> String {
    match (format, r) {
        (OutputFormat::Json, Report::AppStatus(s)) => app_status_json(s),
        (OutputFormat::Json, _) => pretty(&r.to_json()),
        (OutputFormat::Human, _) => human(r),
    }
}

/// The human text of a report.
pub(crate) fn human(r: &Report) -> String {
    let mut s = match r {
        Report::AppStatus(s) => return app_status(s),
        Report::App(r) => app(r),
        Report::Hostname(r) => hostname(r),
        Report::Rewrite(r) => rewrite(r),
        Report::Wipe(r) => wipe(r),
        Report::Cleanup(r) => cleanup(r),
        Report::Freeze(r) => freeze(r),
        Report::Thaw(r) => thaw(r),
        Report::Drain(r) => drain(r),
        Report::Undrain(r) => undrain(r),
        Report::Recover(r) => recover(r),
        Report::Health(r) => health(r),
    };
    envelope(&mut s, &r.envelope());
    s
}

/// The part of every report: warnings, then actions (for a human, or in a
/// dry run what would be done).
fn envelope(s: &mut String, e: &Envelope<'_>) {
    for w in e.warnings {
        let _ = writeln!(s, "Warning: {w}");
    }
    for a in e.actions {
        let _ = writeln!(s, "Action: {a}");
    }
}

fn pretty<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("reports serialize");
    s.push('\n');
    s
}

#[derive(Serialize)]
struct AppStatusJson<'a> {
    state: &'a str,
    is_transitioning: bool,
    desired_state: &'a str,
    up: bool,
}

fn app_status_json(s: &AppStatus) -> String {
    let j = AppStatusJson { state: &s.state, is_transitioning: s.is_transitioning, desired_state: &s.desired_state, up: s.is_up() };
    format!("{}\n", serde_json::to_string(&j).expect("status serializes"))
}

fn app_status(s: &AppStatus) -> String {
    format!("State:           {}\nIsTransitioning: {}\nDesiredState:    {}\n", s.state, s.is_transitioning, s.desired_state)
}

/// This instance's facts (`dr-agent facts`).
pub(crate) fn facts(f: &InstanceFacts, format: OutputFormat) -> String {
    match format {
        OutputFormat::Human => format!(
            "Instance ID: {}\nPrivate IP:  {}\nPublic IP:   {}\nBoot ID:     {}\nOS family:   {}\nApp state:   {}\n",
            f.instance_id,
            f.private_ip,
            if f.public_ip.is_empty() { "(none)" } else { &f.public_ip },
            f.boot_id,
            f.os_family.as_str(),
            f.app_state
        ),
        OutputFormat::Json => format!("{}\n", serde_json::to_string(f).expect("facts serialize")),
    }
}

fn health(r: &health::HealthReport) -> String {
    format!("{} answered {} in {} ms\n", r.url, r.status, r.elapsed_ms)
}

fn app(r: &app::AppReport) -> String {
    if r.already {
        format!("App already {} (State {}); nothing to do.\n", r.target.state(), r.previous_state)
    } else if r.dry_run {
        format!(
            "Dry run: the app is {}{}; it would be {}.\n",
            r.previous_state,
            if r.previous_transitioning { " (transitioning)" } else { "" },
            r.target.state()
        )
    } else {
        format!(
            "App {}: {} -> {} in {:.1}s ({} status polls).\n",
            r.target.state(),
            r.previous_state,
            r.final_state,
            r.elapsed_ms as f64 / 1000.0,
            r.polls
        )
    }
}

fn hostname(r: &app::HostnameReport) -> String {
    let old = r.old.as_deref().unwrap_or("(no value)");
    if !r.changed {
        format!("Hostname already set: {} = {}; nothing to do.\n", r.item, old)
    } else if r.dry_run {
        format!("Dry run: {} would change {} -> {} (set + apply-config); nothing changed.\n", r.item, old, r.new)
    } else {
        format!("Hostname changed: {} {} -> {} (set and applied).\n", r.item, old, r.new)
    }
}

fn rewrite(r: &rewrite::RewriteReport) -> String {
    let mut s = String::new();
    let layout = match r.layout {
        rewrite::Layout::Debian => "Debian",
        rewrite::Layout::Rhel => "RHEL",
    };
    let _ = writeln!(
        s,
        "Rewrite addresses under {} ({layout} layout){}",
        r.root.display(),
        if r.dry_run { ", dry run: nothing is written" } else { "" }
    );
    for c in &r.private {
        let _ = writeln!(s, "  private {} -> {}", c.old, c.new);
    }
    for c in &r.public {
        let _ = writeln!(s, "  public  {} -> {}", c.old, c.new);
    }
    for f in &r.files {
        if f.changed_lines == 0 {
            let _ = writeln!(s, "{}: already up to date", f.path.display());
        } else if r.dry_run {
            let _ = writeln!(s, "{}: would change {} line(s) ({} address(es))", f.path.display(), f.changed_lines, f.replacements);
        } else {
            let _ = writeln!(
                s,
                "{}: changed {} line(s) ({} address(es)); backup {}",
                f.path.display(),
                f.changed_lines,
                f.replacements,
                f.backup.as_ref().map(|b| b.display().to_string()).unwrap_or_else(|| "none".into())
            );
        }
    }
    for t in &r.removed_temp_files {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        let _ = writeln!(s, "{verb} {} (left by an interrupted run)", t.display());
    }
    if r.up_to_date {
        let _ = writeln!(s, "Already up to date: nothing to change.");
    }
    if r.dry_run && !r.diff.is_empty() {
        let _ = writeln!(s);
        s.push_str(&r.diff);
    }
    s
}

fn wipe(r: &nomad_state::WipeReport) -> String {
    let mut s = match r.state.as_str() {
        "already done" => format!("Already done: {} is empty or absent.\n", r.path.display()),
        "would wipe" => format!(
            "Would wipe {} (dry run): {} files, {} directories, {} bytes.\n",
            r.path.display(),
            r.removed.files,
            r.removed.dirs,
            r.removed.bytes
        ),
        _ => format!(
            "Wiped {}: removed {} files, {} directories, {} bytes. Move aside + recreate took {:.3} ms; delete took {:.1} ms.\n",
            r.path.display(),
            r.removed.files,
            r.removed.dirs,
            r.removed.bytes,
            r.rename_ms,
            r.delete_ms
        ),
    };
    if let (Some(o), Some(m)) = (&r.owner, &r.mode)
        && r.state != "already done"
    {
        s.push_str(&format!("  owner {o}, mode {m}\n"));
    }
    for e in &r.entries {
        s.push_str(&format!("  {e}\n"));
    }
    for m in &r.mounts_below {
        s.push_str(&format!("  mount point below: {}\n", m.display()));
    }
    for b in &r.blocked_by {
        s.push_str(&format!("  the real run would refuse now: {b}\n"));
    }
    s
}

fn cleanup(r: &builds::CleanupReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mode = if r.dry_run { " (dry run: nothing deleted)" } else { "" };
    let _ = writeln!(s, "Clean up builds started before {} on {}{mode}", r.before, r.hostname);
    let _ = writeln!(s, "Listed {} builds; {} not running (untouched).", r.listed, r.not_running);
    for b in &r.builds {
        let _ = writeln!(
            s,
            "  {:<12} #{} {} started {}  {}  [{}]",
            b.outcome.label(),
            b.build_num.map(|n| n.to_string()).unwrap_or_else(|| "?".to_owned()),
            b.project,
            b.started_at.as_deref().unwrap_or("(never)"),
            b.url.as_deref().map(|u| format!("{u:?}")).unwrap_or_else(|| "(no url)".to_owned()),
            b.detail
        );
    }
    if r.already_done {
        let _ = writeln!(s, "Already done: no running build started before the cutoff.");
    } else if r.dry_run {
        let n = r.builds.iter().filter(|b| b.outcome == builds::BuildOutcome::WouldDelete).count();
        let _ = writeln!(s, "Would delete {n} build(s) in one dev-console session.");
    } else {
        let _ = writeln!(
            s,
            "Deleted {} build(s) in {} dev-console session(s); {} failed, {} refused, {} kept.",
            r.deleted, r.console_sessions, r.failed, r.refused, r.kept
        );
    }
    s
}

fn freeze(r: &freeze::FreezeReport) -> String {
    let mut s = String::new();
    let mounts = r.mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ");
    match r.state.as_str() {
        "would freeze" => s.push_str(&format!("Would freeze {mounts} for at most {} ms (dry run).\n", r.deadline_ms)),
        "already frozen" => s.push_str(&format!(
            "Already done: {mounts} already frozen by watchdog pid {}; it thaws by {}.\n",
            r.watchdog_pid.unwrap_or_default(),
            freeze::rfc3339(r.thaw_by_unix_ms)
        )),
        _ => s.push_str(&format!(
            "Frozen: {mounts} (FIFREEZE took {} ms). Watchdog pid {} thaws by {} (deadline {} ms).\n",
            r.freeze_took_ms,
            r.watchdog_pid.unwrap_or_default(),
            freeze::rfc3339(r.thaw_by_unix_ms),
            r.deadline_ms
        )),
    }
    s
}

fn thaw(r: &freeze::ThawReport) -> String {
    let mut s = String::new();
    if r.mounts.is_empty() {
        s.push_str("Already done: nothing is frozen.\n");
    } else if r.already_done {
        s.push_str("Already done: already thawed.\n");
    } else if r.dry_run {
        s.push_str("Would thaw (dry run):\n");
    } else {
        s.push_str(&format!("Thawed after {} ms frozen.\n", r.frozen_for_ms));
    }
    for m in &r.mounts {
        s.push_str(&format!("  {}: {}\n", m.path.display(), m.outcome));
    }
    s.push_str(&format!("  ({})\n", r.reason));
    s
}

fn names(nodes: &[drain::NodeRef]) -> String {
    nodes.iter().map(|n| format!("{} ({})", n.name, n.id)).collect::<Vec<_>>().join(", ")
}

fn drain(r: &drain::DrainReport) -> String {
    let mut out = String::new();
    if r.dry_run {
        out.push_str(&format!("Dry run: would drain {} ready node(s): {}\n", r.drained.len(), names(&r.drained)));
    } else {
        if !r.drained.is_empty() {
            out.push_str(&format!("Drained {} ready node(s): {}\n", r.drained.len(), names(&r.drained)));
        }
        if !r.already_drained.is_empty() {
            out.push_str(&format!("Already drained by dr-agent: {}\n", names(&r.already_drained)));
        }
        if r.drained.is_empty() && r.already_drained.is_empty() && r.drained_by_others.is_empty() {
            out.push_str("No ready node to drain.\n");
        }
        if r.idle {
            out.push_str(&format!("No allocation running after {:.1}s.\n", r.waited_ms as f64 / 1000.0));
        } else {
            out.push_str(&format!(
                "Deadline of {:.0}s passed; {} allocation(s) still running:\n",
                r.deadline_ms as f64 / 1000.0,
                r.still_running.len()
            ));
            for a in &r.still_running {
                out.push_str(&format!("  {} {} (job {}) on node {}: {}\n", a.id, a.name, a.job_id, a.node_id, a.client_status));
            }
        }
        out.push_str(&format!("Recorded in {}; `dr-agent undrain` ends the drain.\n", r.record.display()));
    }
    out
}

fn undrain(r: &drain::UndrainReport) -> String {
    let mut out = String::new();
    if r.dry_run {
        out.push_str(&format!("Dry run: would end the drain of {} node(s): {}\n", r.undrained.len(), r.undrained.join(", ")));
    } else if r.undrained.is_empty() {
        out.push_str("No node to undrain; nothing to do.\n");
    } else {
        out.push_str(&format!("Ended the drain of {} node(s): {}\n", r.undrained.len(), r.undrained.join(", ")));
    }
    if !r.already.is_empty() {
        out.push_str(&format!("Already undrained: {}\n", r.already.join(", ")));
    }
    out
}

fn recover(r: &recover::RecoverReport) -> String {
    let mut out = String::new();
    let head = if r.dry_run { "Recovery plan (dry run: nothing changed)" } else { "Recovery" };
    out.push_str(&format!(
        "{head}{}: private IP {}, public IP {}\n",
        if r.offline { " of a mounted disk" } else { "" },
        r.private_ip.map(|i| i.to_string()).unwrap_or("-".into()),
        r.public_ip.map(|i| i.to_string()).unwrap_or("-".into()),
    ));
    if !r.evidence.is_empty() {
        out.push_str(&format!("  (going on: {})\n", r.evidence));
    }
    for (i, s) in r.steps.iter().enumerate() {
        out.push_str(&format!("  {}. {:<18} {:<13} {}\n", i + 1, s.name, s.outcome, s.summary));
    }
    if let Some(f) = &r.failed {
        out.push_str(&format!("Stopped at a failure: {f}\n"));
    }
    if r.dry_run
        && let Some(diff) = r.steps.iter().find(|s| s.name == "rewrite-addresses").and_then(|s| s.report["diff"].as_str())
    {
        out.push_str("\nChanges to the Replicated files:\n");
        out.push_str(diff);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_says_what_it_would_change_or_that_nothing_is_left() {
        let mut r = rewrite::RewriteReport {
            root: "/m".into(),
            layout: rewrite::Layout::Debian,
            dry_run: true,
            private: vec![],
            public: vec![],
            files: vec![rewrite::FileReport {
                path: "/m/etc/default/replicated".into(),
                changed_lines: 2,
                replacements: 2,
                backup: None,
                written: false,
            }],
            up_to_date: false,
            removed_temp_files: vec![],
            diff: "+PRIVATE_ADDRESS=10.1.2.9\n".into(),
            warnings: vec![],
            actions: vec![],
        };
        let dry = human(&Report::Rewrite(r.clone()));
        assert!(dry.contains("would change 2 line(s)") && dry.contains("+PRIVATE_ADDRESS=10.1.2.9"), "{dry}");
        r.dry_run = false;
        r.files[0].changed_lines = 0;
        r.up_to_date = true;
        assert!(human(&Report::Rewrite(r)).contains("Already up to date"));
    }

    #[test]
    fn renders_status_and_facts() {
        let s = AppStatus { state: "started".into(), is_transitioning: false, desired_state: "started".into() };
        assert!(report(&Report::AppStatus(s.clone()), OutputFormat::Human).contains("IsTransitioning: false"));
        let v: serde_json::Value = serde_json::from_str(&report(&Report::AppStatus(s), OutputFormat::Json)).expect("json output");
        assert_eq!(v["up"], true);
        let f = InstanceFacts {
            instance_id: "i-0abc".into(),
            private_ip: "10.0.0.5".into(),
            public_ip: String::new(),
            boot_id: "b".into(),
            os_family: crate::sys::facts::OsFamily::Debian,
            app_state: "unknown".into(),
        };
        assert!(facts(&f, OutputFormat::Human).contains("(none)"));
        let v: serde_json::Value = serde_json::from_str(&facts(&f, OutputFormat::Json)).expect("json output");
        assert_eq!(v["os_family"], "debian");
        assert_eq!(v["public_ip"], "");
    }

    /// Every report, whatever its step, carries the envelope's fields in
    /// JSON, and its warnings and actions once in the human text.
    #[test]
    fn one_envelope_for_every_report() {
        let health = Report::Health(health::HealthReport { url: "http://127.0.0.1/health-check".into(), status: 200, elapsed_ms: 3 });
        let v = health.to_json();
        for key in ["dry_run", "already_done", "actions", "warnings"] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert_eq!(v["status"], 200);
        let thaw = Report::Thaw(freeze::ThawReport {
            mounts: vec![],
            frozen_for_ms: 0,
            reason: "nothing is frozen".into(),
            already_done: true,
            dry_run: false,
            warnings: vec!["w1".into()],
        });
        let v = thaw.to_json();
        assert_eq!((v["already_done"].as_bool(), v["actions"].as_array().map(Vec::len)), (Some(true), Some(0)), "{v}");
        let text = human(&thaw);
        assert_eq!(text.matches("Warning: w1").count(), 1, "{text}");
    }
}
