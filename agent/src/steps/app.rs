//! Replicated app lifecycle steps: stop and start with a deadline and
//! progress, and setting the installation's hostname (app-config item).
//!
//! Safety rule: a stop or start is never reported done before `State` is the
//! target and `IsTransitioning` is false. Unknown `State` values and failing
//! status calls are waited through until `replicated.app_timeout`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

pub(crate) use dr_proto::contract::{AppParams, AppReport, HostnameParams, HostnameReport, Target};

use crate::config::Config;
use crate::steps::error::ErrorKind;
use crate::sys::replicated::{AppStatus, ReplicatedError, Replicatedctl};

/// `State` values replicatedctl is known to print; others are tolerated.
const KNOWN_STATES: &[&str] = &["started", "starting", "stopped", "stopping"];

#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error(
        "the app did not reach State `{target}` with IsTransitioning false within {timeout:?} ({polls} polls); \
         last state seen: {last_state}{}",
        last_error.as_ref().map(|e| format!("; last status error: {e}")).unwrap_or_default()
    )]
    Timeout { target: &'static str, timeout: Duration, polls: u32, last_state: String, last_error: Option<String> },
    #[error("hostname `{hostname}` is not valid: {why} (expected a DNS name or an IP address, no scheme, no port, no path)")]
    InvalidHostname { hostname: String, why: String },
    #[error("config key `replicated.hostname_item`: `{item}` is not a valid app-config item name")]
    InvalidItem { item: String },
    #[error(
        "`replicatedctl app-config export` has no item `{item}` (config key replicated.hostname_item){}",
        if candidates.is_empty() { String::new() } else { format!("; items that look like a hostname: {}", candidates.join(", ")) }
    )]
    ItemMissing { item: String, candidates: Vec<String> },
    #[error("app-config item `{item}` is `{found}` after set + apply-config, expected `{expected}`")]
    NotApplied { item: String, expected: String, found: String },
}

impl AppError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AppError::InvalidHostname { .. } | AppError::InvalidItem { .. } | AppError::ItemMissing { .. } => ErrorKind::Invalid,
            AppError::Replicated(_) | AppError::Timeout { .. } | AppError::NotApplied { .. } => ErrorKind::Failed,
        }
    }
}

fn replicatedctl(config: &Config) -> Replicatedctl {
    Replicatedctl::new(config.replicated.replicatedctl.clone(), config.replicated.command_timeout)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Drives the app to `params.target` and waits for it (State == target,
/// IsTransitioning false) until `replicated.app_timeout`. Does nothing when
/// it is already there. Dry-run only reads the status.
pub(crate) async fn run(config: &Config, params: &AppParams, dry_run: bool) -> Result<AppReport, AppError> {
    let target = params.target;
    let rc = replicatedctl(config);
    let began = Instant::now();
    let deadline = began + config.replicated.app_timeout;
    let mut report = AppReport {
        target,
        previous_state: "unknown".to_owned(),
        previous_transitioning: false,
        final_state: String::new(),
        already: false,
        issued: false,
        dry_run,
        elapsed_ms: 0,
        polls: 0,
        unknown_states: Vec::new(),
        actions: Vec::new(),
        warnings: Vec::new(),
    };
    match rc.app_status().await {
        Ok(s) => {
            report.previous_state = s.state.clone();
            report.previous_transitioning = s.is_transitioning;
            note_unknown(&mut report, &s.state);
            if target.reached(&s) {
                tracing::info!(step = target.verb(), state = %s.state, "app already {}", target.state());
                report.already = true;
                report.final_state = s.state;
                report.elapsed_ms = ms(began.elapsed());
                return Ok(report);
            }
        }
        // An unreadable status must not stop a stop: issue it and wait.
        Err(e) if !dry_run => {
            tracing::warn!(step = target.verb(), error = %e, "cannot read the app state before the {}", target.verb());
            report.warnings.push(format!("the app state could not be read before the {}: {e}", target.verb()));
        }
        Err(e) => return Err(e.into()),
    }
    if dry_run {
        report.final_state = report.previous_state.clone();
        report.actions.push(format!(
            "would run `replicatedctl app {}{}` and wait up to {:?} for State `{}`",
            target.verb(),
            if target == Target::Stopped && params.force { " -f" } else { "" },
            config.replicated.app_timeout,
            target.state()
        ));
        return Ok(report);
    }
    tracing::info!(step = target.verb(), from = %report.previous_state, "asking replicatedctl to {} the app", target.verb());
    match target {
        Target::Stopped => rc.app_stop(params.force).await?,
        Target::Started => rc.app_start().await?,
    }
    report.issued = true;
    let final_status = wait_for(config, &rc, target, began, deadline, &mut report).await?;
    report.final_state = final_status.state;
    report.elapsed_ms = ms(began.elapsed());
    tracing::info!(step = target.verb(), elapsed_ms = report.elapsed_ms, polls = report.polls, "app {}", target.state());
    Ok(report)
}

fn note_unknown(report: &mut AppReport, state: &str) {
    if !KNOWN_STATES.contains(&state) && !report.unknown_states.iter().any(|s| s == state) {
        tracing::warn!(state, "unknown app State value; waiting on");
        report.unknown_states.push(state.to_owned());
        report.warnings.push(format!("replicatedctl reported an unknown State `{state}` (tolerated)"));
    }
}

/// Polls `app status` every `poll_interval` until the target is reached or
/// the deadline passes. Status failures are retried until the deadline.
async fn wait_for(
    config: &Config,
    rc: &Replicatedctl,
    target: Target,
    began: Instant,
    deadline: Instant,
    report: &mut AppReport,
) -> Result<AppStatus, AppError> {
    let poll = config.replicated.poll_interval;
    let mut last_state = report.previous_state.clone();
    let mut last_error: Option<String> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(AppError::Timeout {
                target: target.state(),
                timeout: config.replicated.app_timeout,
                polls: report.polls,
                last_state,
                last_error,
            });
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
        // One status call may not run (much) past the deadline.
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let call = rc.with_timeout(rc.timeout().min(remaining));
        report.polls += 1;
        match call.app_status().await {
            Ok(s) => {
                note_unknown(report, &s.state);
                tracing::info!(
                    step = target.verb(),
                    state = %s.state,
                    transitioning = s.is_transitioning,
                    desired = %s.desired_state,
                    elapsed_ms = ms(began.elapsed()),
                    "waiting for the app to be {}",
                    target.state()
                );
                last_state = if s.is_transitioning { format!("{} (transitioning)", s.state) } else { s.state.clone() };
                last_error = None;
                if target.reached(&s) {
                    return Ok(s);
                }
            }
            Err(e) => {
                tracing::warn!(step = target.verb(), error = %e, elapsed_ms = ms(began.elapsed()), "app status failed; retrying");
                last_error = Some(e.to_string());
            }
        }
    }
}

/// Checks that `h` is a DNS name or an IP address (what goes after `https://`).
pub(crate) fn validate_hostname(h: &str) -> Result<(), AppError> {
    let bad = |why: &str| Err(AppError::InvalidHostname { hostname: h.to_owned(), why: why.to_owned() });
    if h.is_empty() {
        return bad("it is empty");
    }
    if h.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if h.contains("://") {
        return bad("it carries a URL scheme");
    }
    if let Some(c) = h.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.')) {
        return bad(&format!("it contains {c:?}"));
    }
    if h.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    let labels: Vec<&str> = h.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return bad("it has an empty label");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    if labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit())) {
        return bad("it looks like an IP address but is not one");
    }
    Ok(())
}

fn validate_item(item: &str) -> Result<(), AppError> {
    let ok = !item.is_empty()
        && item.len() <= 128
        && !item.starts_with('-')
        && item.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok { Ok(()) } else { Err(AppError::InvalidItem { item: item.to_owned() }) }
}

/// The value of an exported item: `{"value": "..."}`; None if it has none.
fn item_value(item: &serde_json::Value) -> Option<String> {
    match item.get("value")? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The callback URL prefix GitHub's OAuth application must use.
fn https_base(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("https://[{host}]"),
        _ => format!("https://{host}"),
    }
}

/// Sets the hostname app-config item and applies it, when it differs
/// (compared case-insensitively, as DNS names are).
pub(crate) async fn set_hostname(config: &Config, params: &HostnameParams, dry_run: bool) -> Result<HostnameReport, AppError> {
    let new = params.hostname.trim().to_owned();
    validate_hostname(&new)?;
    let item = config.replicated.hostname_item.clone();
    validate_item(&item)?;
    let rc = replicatedctl(config);
    let export = rc.app_config_export().await?;
    let Some(current) = export.get(&item) else {
        let candidates = export.keys().filter(|k| k.to_ascii_lowercase().contains("host")).cloned().collect();
        return Err(AppError::ItemMissing { item, candidates });
    };
    let old = item_value(current);
    let mut report = HostnameReport {
        item: item.clone(),
        old: old.clone(),
        new: new.clone(),
        changed: false,
        applied: false,
        dry_run,
        actions: Vec::new(),
        warnings: Vec::new(),
    };
    if old.as_deref().is_some_and(|o| o.trim().eq_ignore_ascii_case(&new)) {
        tracing::info!(item = %item, hostname = %new, "hostname already set");
        return Ok(report);
    }
    report.changed = true;
    let oauth = format!(
        "the GitHub OAuth application's callback URL must change to {}/... (GitHub > Settings > Developer settings > OAuth Apps)",
        https_base(&new)
    );
    if dry_run {
        report.actions.push(format!("would run `replicatedctl app-config set {item} --value {new}` then `replicatedctl app apply-config`"));
        report.actions.push(format!("after the change, {oauth}"));
        return Ok(report);
    }
    tracing::info!(item = %item, old = ?old, new = %new, "setting the hostname");
    rc.app_config_set(&item, &new).await?;
    rc.apply_config().await?;
    report.applied = true;
    // Read it back: a silently ignored set must not be reported as done.
    let after = rc.app_config_export().await?;
    let found = after.get(&item).and_then(item_value).unwrap_or_default();
    if !found.trim().eq_ignore_ascii_case(&new) {
        return Err(AppError::NotApplied { item, expected: new, found });
    }
    report.actions.push(oauth);
    report.warnings.push("`app apply-config` restarts the app if it was running".to_owned());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    #[test]
    fn hostnames() {
        for ok in ["ci.example.com", "CI-1.example.com", "localhost", "10.0.0.5", "::1", "2001:db8::1", "a.b-c.d"] {
            validate_hostname(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "https://ci.example.com",
            "ci.example.com/",
            "ci example.com",
            "ci.example.com:443",
            "-ci.example.com",
            "ci..example.com",
            "ci.example.com.",
            "10.0.0.256",
            "ci\"; (x)",
            "[::1]",
        ] {
            let err = validate_hostname(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Invalid, "{bad}");
        }
        assert!(validate_item("hostname").is_ok());
        assert!(validate_item("--value").is_err());
        assert!(validate_item("host name").is_err());
    }

    #[test]
    fn item_values() {
        assert_eq!(item_value(&serde_json::json!({"value": "a", "default": "b"})).as_deref(), Some("a"));
        assert_eq!(item_value(&serde_json::json!({"default": "b"})), None);
        assert_eq!(item_value(&serde_json::json!({"value": null})), None);
        assert_eq!(item_value(&serde_json::json!("flat")), None);
        assert_eq!(https_base("::1"), "https://[::1]");
    }

    /// A replicatedctl whose `app status` fails twice, then reports a state
    /// sequence from a file, one line per call.
    fn flaky_script(dir: &Path) -> PathBuf {
        let path = dir.join("replicatedctl");
        let body = format!(
            r#"#!/bin/sh
d={dir}
echo "$*" >> "$d/calls"
case "$*" in
  "app status")
    n=$(cat "$d/n" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$d/n"
    if [ $n -eq 2 ] || [ $n -eq 3 ]; then echo "daemon busy" >&2; exit 1; fi
    line=$(sed -n "${{n}}p" "$d/states"); [ -z "$line" ] && line=$(tail -n 1 "$d/states")
    echo "$line";;
  "app stop"|"app start") ;;
  *) exit 2;;
esac
"#,
            dir = dir.display()
        );
        crate::sys::replicated::write_executable(&path, &body);
        path
    }

    fn config(rc: &Path, timeout: Duration) -> Config {
        let mut c = Config::default();
        c.replicated.replicatedctl = rc.to_owned();
        c.replicated.poll_interval = Duration::from_millis(20);
        c.replicated.app_timeout = timeout;
        c
    }

    fn st(state: &str, moving: bool) -> String {
        format!(r#"[{{"State":"{state}","IsTransitioning":{moving},"DesiredState":"stopped"}}]"#)
    }

    #[tokio::test]
    async fn stop_waits_through_failures_and_unknown_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rc = flaky_script(dir.path());
        // 1: before; 2,3: failures; 4: unknown; 5: stopped but moving; 6: stopped.
        let states = [st("started", false), String::new(), String::new(), st("quiescing", true), st("stopped", true), st("stopped", false)];
        std::fs::write(dir.path().join("states"), states.join("\n") + "\n").expect("states");
        let report =
            run(&config(&rc, Duration::from_secs(10)), &AppParams { target: Target::Stopped, force: false }, false).await.expect("stops");
        assert_eq!(report.previous_state, "started");
        assert_eq!(report.final_state, "stopped");
        assert_eq!(report.polls, 5, "{report:?}");
        assert_eq!(report.unknown_states, vec!["quiescing".to_owned()]);
        let calls = std::fs::read_to_string(dir.path().join("calls")).expect("calls");
        assert_eq!(calls.lines().filter(|l| *l == "app stop").count(), 1);
    }

    #[tokio::test]
    async fn timeout_names_last_state_and_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rc = flaky_script(dir.path());
        std::fs::write(dir.path().join("states"), format!("{}\n", st("stopping", true))).expect("states");
        let started = Instant::now();
        let err = run(&config(&rc, Duration::from_millis(300)), &AppParams { target: Target::Stopped, force: false }, false)
            .await
            .expect_err("times out");
        assert!(started.elapsed() < Duration::from_secs(3));
        let msg = err.to_string();
        assert!(matches!(err, AppError::Timeout { .. }), "{msg}");
        assert!(msg.contains("stopping (transitioning)") && msg.contains("stopped"), "{msg}");
        assert_eq!(err.kind(), ErrorKind::Failed);
    }
}
