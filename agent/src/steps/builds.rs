//! Cleaning up builds a backup caught half-way (API v1.1 + one dev-console session).
//!
//! The plan is computed by one function for both the dry run and the real
//! run: running builds that started strictly before the cutoff, whose URL is
//! `https://<hostname>/gh|bb/<org>/<repo>/<number>` and matches the build.
//! Everything else running is kept (started after the cutoff, no start time)
//! or refused (a URL that fails validation); nothing of theirs is sent to the
//! REPL. All deletions go through ONE dev-console session.

pub(crate) mod api;
pub(crate) mod console;
pub mod url;

use std::time::{Duration, Instant};

pub(crate) use dr_proto::contract::{BuildOutcome, BuildResult, CleanupParams, CleanupReport};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::Config;
use crate::steps::error::ErrorKind;
use crate::sys::replicated::{ReplicatedError, Replicatedctl};

/// At most this many pages of 100 builds are listed.
pub(crate) const MAX_PAGES: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CleanupError {
    #[error("--before `{value}` is not an RFC 3339 time (e.g. 2024-05-01T12:00:00Z): {why}")]
    BadCutoff { value: String, why: String },
    #[error("circleci.hostname: {0}")]
    BadHostname(String),
    #[error("cannot read the installation's hostname (app-config item `{item}`): {source}")]
    HostnameRead { item: String, source: ReplicatedError },
    #[error("`replicatedctl app-config export`: item `{item}` {why}")]
    HostnameItem { item: String, why: String },
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
}

impl CleanupError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CleanupError::BadCutoff { .. } | CleanupError::BadHostname(_) | CleanupError::HostnameItem { .. } => ErrorKind::Invalid,
            CleanupError::Api(api::ApiError::BadUrl { .. } | api::ApiError::TokenRead { .. } | api::ApiError::TokenEmpty { .. }) => {
                ErrorKind::Invalid
            }
            _ => ErrorKind::Failed,
        }
    }
}

/// Parses an RFC 3339 time (also ISO-8601 with fractional seconds and `Z`).
pub(crate) fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|e| e.to_string())
}

/// The installation's hostname: the configured one, or the app-config item.
async fn hostname(config: &Config) -> Result<String, CleanupError> {
    if let Some(h) = &config.circleci.hostname {
        return url::normalize_hostname(h).map_err(CleanupError::BadHostname);
    }
    let item = config.replicated.hostname_item.clone();
    let ctl = Replicatedctl::new(config.replicated.replicatedctl.clone(), config.replicated.command_timeout);
    let out = ctl.run(&["app-config", "export"]).await.map_err(|source| CleanupError::HostnameRead { item: item.clone(), source })?;
    let bad = |why: &str| CleanupError::HostnameItem { item: item.clone(), why: why.to_owned() };
    let v: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| bad(&format!("cannot be read: not JSON ({e})")))?;
    let entry = v.get(&item).ok_or_else(|| bad("is missing"))?;
    let value = match entry {
        serde_json::Value::String(s) => s.as_str(),
        other => other.get("value").and_then(|x| x.as_str()).unwrap_or(""),
    };
    if value.trim().is_empty() {
        return Err(bad("has no value"));
    }
    url::normalize_hostname(value).map_err(|e| bad(&e))
}

/// The newest parseable start time among `builds`, normalized to RFC 3339.
pub(crate) fn newest_start(builds: &[api::Build]) -> Option<String> {
    builds
        .iter()
        .filter_map(|b| b.start_time.as_deref().and_then(|t| parse_time(t).ok()))
        .max()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&Rfc3339).ok())
}

/// The plan: one entry per running build; `WouldDelete` for candidates.
pub(crate) fn plan(builds: &[api::Build], cutoff: OffsetDateTime, hostname: &str) -> (Vec<BuildResult>, usize) {
    let mut out = Vec::new();
    let mut not_running = 0;
    for b in builds {
        if b.lifecycle.as_deref() != Some("running") {
            not_running += 1;
            continue;
        }
        let mut r = BuildResult {
            url: b.build_url.clone(),
            build_num: b.build_num,
            project: format!("{}/{}", b.username.as_deref().unwrap_or("?"), b.reponame.as_deref().unwrap_or("?")),
            started_at: b.start_time.clone(),
            outcome: BuildOutcome::Kept,
            detail: String::new(),
        };
        match b.start_time.as_deref().map(parse_time) {
            None => r.detail = "no start time: never touched".to_owned(),
            Some(Err(e)) => r.detail = format!("start time is not ISO-8601 ({e}): never touched"),
            Some(Ok(t)) if t >= cutoff => r.detail = "started after the cutoff".to_owned(),
            Some(Ok(_)) => {
                let expect = url::Expect { username: b.username.as_deref(), reponame: b.reponame.as_deref(), build_num: b.build_num };
                match b.build_url.as_deref().map(|u| url::validate_build_url(u, hostname, expect)) {
                    None => {
                        r.outcome = BuildOutcome::Refused;
                        r.detail = "the build has no build_url".to_owned();
                    }
                    Some(Err(why)) => {
                        r.outcome = BuildOutcome::Refused;
                        r.detail = format!("URL refused: {why}");
                    }
                    Some(Ok(())) => {
                        r.outcome = BuildOutcome::WouldDelete;
                        r.detail = "running, started before the cutoff".to_owned();
                    }
                }
            }
        }
        out.push(r);
    }
    (out, not_running)
}

/// Lists the builds, plans, and (unless `dry_run`) deletes the candidates in
/// one dev-console session. Per-build failures are in the report; an error
/// means nothing was deleted (except `Console` errors after the session
/// opened, which are per build too).
pub(crate) async fn run(config: &Config, params: &CleanupParams, dry_run: bool) -> Result<CleanupReport, CleanupError> {
    let cutoff = parse_time(&params.before).map_err(|why| CleanupError::BadCutoff { value: params.before.clone(), why })?;
    let hostname = hostname(config).await?;
    let (token, token_warning) = api::read_token(&config.circleci.api_token_file)?;
    let client = api::ApiClient::new(&config.circleci.api_url, &token, config.circleci.request_timeout)?;
    let listing = client.recent_builds(MAX_PAGES).await?;
    let (mut builds, not_running) = plan(&listing.builds, cutoff, &hostname);
    let mut report = CleanupReport {
        before: cutoff.format(&Rfc3339).unwrap_or_else(|_| params.before.clone()),
        hostname,
        dry_run,
        listed: listing.builds.len(),
        newest_build_started_at: newest_start(&listing.builds),
        not_running,
        builds: Vec::new(),
        deleted: 0,
        failed: 0,
        refused: 0,
        kept: 0,
        console_sessions: 0,
        already_done: false,
        actions: Vec::new(),
        warnings: token_warning.into_iter().chain(listing.warnings).collect(),
    };
    let candidates: Vec<usize> =
        builds.iter().enumerate().filter(|(_, b)| b.outcome == BuildOutcome::WouldDelete).map(|(i, _)| i).collect();
    if !candidates.is_empty() && !dry_run {
        delete_all(config, &mut builds, &candidates, &mut report).await?;
    }
    for b in &builds {
        match b.outcome {
            BuildOutcome::Deleted => report.deleted += 1,
            BuildOutcome::Failed => report.failed += 1,
            BuildOutcome::Refused => report.refused += 1,
            BuildOutcome::Kept => report.kept += 1,
            BuildOutcome::WouldDelete => {}
        }
    }
    // Nothing to delete and nothing refused: a refused build is not done.
    report.already_done = candidates.is_empty() && report.refused == 0;
    if report.refused > 0 {
        report.actions.push(format!(
            "{} running build(s) have a URL that failed validation and were not deleted: check them by hand",
            report.refused
        ));
    }
    if report.failed > 0 {
        report.actions.push(format!(
            "{} build(s) could not be deleted: run cleanup-builds again, or delete them in the dev-console by hand",
            report.failed
        ));
    }
    report.builds = builds;
    Ok(report)
}

/// Deletes the candidates in one session. Once the console stops answering,
/// nothing more is sent: the remaining builds are reported failed.
async fn delete_all(
    config: &Config,
    builds: &mut [BuildResult],
    candidates: &[usize],
    report: &mut CleanupReport,
) -> Result<(), CleanupError> {
    let c = &config.circleci;
    let mut session = console::Console::open(&c.dev_console, c.console_load_timeout, c.console_command_timeout).await?;
    report.console_sessions = 1;
    report.warnings.append(&mut session.warnings);
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut broken: Option<String> = None;
    for (done, &i) in candidates.iter().enumerate() {
        let b = &mut builds[i];
        if let Some(why) = &broken {
            b.outcome = BuildOutcome::Failed;
            b.detail = format!("not attempted: {why}");
            continue;
        }
        let url = b.url.as_deref().expect("candidates have a validated URL");
        match session.call(&url::delete_form(url)).await {
            Ok(console::Reply { outcome: console::Outcome::Value(value), stderr }) => {
                b.outcome = BuildOutcome::Deleted;
                b.detail = format!("REPL answered: {}", api::excerpt(&value, 200));
                // Stderr is a separate pipe: what arrived may belong to the
                // call before. Logged, not put on this build.
                if !stderr.is_empty() {
                    tracing::warn!(step = "cleanup-builds", url, stderr = %stderr, "the REPL wrote on stderr around this call");
                }
            }
            Ok(console::Reply { outcome: console::Outcome::Threw(message), .. }) => {
                b.outcome = BuildOutcome::Failed;
                b.detail = format!("delete-build threw: {}", api::excerpt(&message, 500));
                tracing::warn!(step = "cleanup-builds", url, message = %message, "delete-build failed");
            }
            Ok(console::Reply { outcome: console::Outcome::Rejected(said), .. }) => {
                b.outcome = BuildOutcome::Failed;
                b.detail = format!("the REPL did not evaluate the form: {}", api::excerpt(&said, 500));
                tracing::warn!(step = "cleanup-builds", url, said = %said, "delete-build form rejected");
            }
            Err(e) => {
                b.outcome = BuildOutcome::Failed;
                b.detail = e.to_string();
                broken = Some(format!("the dev-console stopped answering at {url}"));
            }
        }
        if last_log.elapsed() >= Duration::from_secs(3) {
            tracing::info!(step = "cleanup-builds", done = done + 1, total = candidates.len(), elapsed = ?started.elapsed(), "deleting builds");
            last_log = Instant::now();
        }
    }
    if broken.is_some() {
        report.warnings.push("the dev-console session broke off; the remaining builds were not attempted".to_owned());
        drop(session);
    } else {
        session.close().await;
    }
    tracing::info!(step = "cleanup-builds", total = candidates.len(), elapsed = ?started.elapsed(), "deletions done");
    Ok(())
}

/// Property tests: seeded, a fixed number of cases (`PROPTEST_CASES` for a
/// longer run), no failure files; each reports the cases it ran.
#[cfg(test)]
pub(crate) mod prop {
    use proptest::test_runner::{Config, RngSeed, TestRunner};

    pub const SEED: u64 = 0x00c1_0e0e_5eed;

    pub fn runner(default_cases: u32) -> TestRunner {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
        TestRunner::new(Config { cases, rng_seed: RngSeed::Fixed(SEED), failure_persistence: None, ..Config::default() })
    }

    /// Runs `test` over `strategy`; panics with the (shrunk) failing input.
    pub fn check<S: proptest::strategy::Strategy>(
        name: &str,
        default_cases: u32,
        strategy: S,
        test: impl Fn(S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
    ) where
        S::Value: std::fmt::Debug,
    {
        let mut runner = runner(default_cases);
        let cases = runner.config().cases;
        if let Err(e) = runner.run(&strategy, test) {
            panic!("{name}: {e}");
        }
        println!("{name}: {cases} cases, 0 failures (seed {SEED:#x})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(num: u64, lifecycle: &str, start: Option<&str>, url: &str) -> api::Build {
        api::Build {
            build_url: Some(url.to_owned()),
            build_num: Some(num),
            username: Some("org".to_owned()),
            reponame: Some("repo".to_owned()),
            lifecycle: Some(lifecycle.to_owned()),
            start_time: start.map(str::to_owned),
            ..api::Build::default()
        }
    }

    #[test]
    fn the_newest_start_is_over_every_lifecycle_and_skips_unreadable_times() {
        let u = "https://ci.example.com/gh/org/repo/1";
        let builds = vec![
            b(1, "finished", Some("2024-05-01T10:00:00Z"), u),
            b(2, "running", Some("2024-05-01T13:00:00+02:00"), u),
            b(3, "queued", None, u),
            b(4, "finished", Some("not a time"), u),
        ];
        assert_eq!(newest_start(&builds).as_deref(), Some("2024-05-01T11:00:00Z"));
        assert_eq!(newest_start(&builds[2..]), None);
    }

    #[test]
    fn plan_keeps_later_and_unstarted_builds_and_refuses_bad_urls() {
        let cutoff = parse_time("2024-05-01T12:00:00Z").expect("time");
        let u = |n: u64| format!("https://ci.example.com/gh/org/repo/{n}");
        let builds = vec![
            b(1, "running", Some("2024-05-01T11:59:59.999Z"), &u(1)),
            b(2, "running", Some("2024-05-01T12:00:00Z"), &u(2)),
            b(3, "running", None, &u(3)),
            b(4, "finished", Some("2024-04-01T00:00:00Z"), &u(4)),
            b(5, "queued", None, &u(5)),
            b(6, "running", Some("2024-04-30T00:00:00+02:00"), "https://ci.example.com/gh/org/repo/6\")"),
            b(7, "running", Some("yesterday"), &u(7)),
        ];
        let (plan, not_running) = plan(&builds, cutoff, "ci.example.com");
        assert_eq!(not_running, 2);
        let outcome: Vec<_> = plan.iter().map(|r| (r.build_num.expect("num"), r.outcome)).collect();
        assert_eq!(
            outcome,
            vec![
                (1, BuildOutcome::WouldDelete),
                (2, BuildOutcome::Kept),
                (3, BuildOutcome::Kept),
                (6, BuildOutcome::Refused),
                (7, BuildOutcome::Kept),
            ]
        );
        assert!(plan[1].detail.contains("after the cutoff"));
    }

    #[test]
    fn bad_cutoff_is_input_error() {
        assert!(parse_time("2024-05-01").is_err());
        let e = CleanupError::BadCutoff { value: "x".into(), why: "y".into() };
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }
}
