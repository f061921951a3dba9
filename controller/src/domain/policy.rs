//! Backup policies: when each site is backed up, how it is quiesced, how
//! long backups are kept, where they are copied. Fleet defaults live in the
//! config's `[policy]`; a site overrides any of them in `[site.policy]`.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::health::{AutoMode, HealthPolicy};
use crate::domain::model::Millis;

/// When backups start.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// Every so often, counted from the last scheduled start.
    Every(Duration),
    /// A cron expression (seconds first: `sec min hour dom month dow`) in a time zone.
    Cron { expr: String, schedule: Box<cron::Schedule>, tz: chrono_tz::Tz },
}

/// Whether a site keeps a hot spare (policy `spare`), and in what state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpareMode {
    /// No spare (the default); an existing one is terminated.
    #[default]
    Off,
    /// Prepared through the runbook, checked healthy, then the instance is
    /// stopped: costs its EBS volumes only; a failover starts it.
    Stopped,
    /// Prepared and kept running with the app stopped: a failover only
    /// starts the app.
    Running,
}

impl SpareMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SpareMode::Off => "off",
            SpareMode::Stopped => "stopped",
            SpareMode::Running => "running",
        }
    }
}

/// What a failover launches from when the site has a hot spare (policy
/// `failover_prefers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverPrefers {
    /// The spare (no launch, no disk hydration), trading its data age (at
    /// most `spare_max_lag` behind the newest backup) for speed.
    #[default]
    Spare,
    /// A fresh launch from the newest backup; the spare is left alone.
    Freshest,
}

impl FailoverPrefers {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverPrefers::Spare => "spare",
            FailoverPrefers::Freshest => "freshest",
        }
    }
}

/// The longest `spare_max_lag` accepted.
pub const SPARE_MAX_LAG_LIMIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Which backup a scheduled drill restores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DrillBackup {
    /// The newest available backup.
    #[default]
    Latest,
    /// A random available backup that started within this long before the
    /// drill (so older backups are proven too).
    RandomWithin(Duration),
}

impl DrillBackup {
    /// `latest` or `random-within:<duration>`.
    pub fn parse(s: &str) -> Result<DrillBackup, String> {
        let s = s.trim();
        if s == "latest" {
            return Ok(DrillBackup::Latest);
        }
        let Some(d) = s.strip_prefix("random-within:") else {
            return Err(format!("`{s}` is neither \"latest\" nor \"random-within:<duration>\" (e.g. \"random-within:7d\")"));
        };
        let d = humantime::parse_duration(d.trim()).map_err(|e| format!("`{s}`: {e}"))?;
        if d < Duration::from_secs(60) || d > Duration::from_secs(366 * 24 * 3600) {
            return Err(format!("`{s}`: the window must be between 1 minute and 366 days"));
        }
        Ok(DrillBackup::RandomWithin(d))
    }

    pub fn describe(&self) -> String {
        match self {
            DrillBackup::Latest => "latest".into(),
            DrillBackup::RandomWithin(d) => format!("random-within:{}", humantime::format_duration(*d)),
        }
    }
}

/// How a backup quiesces the machine while CreateImage runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quiesce {
    /// Crash-consistent no-reboot AMI.
    #[default]
    None,
    /// Freeze the data file systems until the snapshots are pending.
    Freeze,
    /// Drain Nomad builders first, then as `freeze`.
    Drain,
    /// Stop the app until the snapshots are pending.
    Stop,
}

impl Quiesce {
    pub fn as_str(self) -> &'static str {
        match self {
            Quiesce::None => "none",
            Quiesce::Freeze => "freeze",
            Quiesce::Drain => "drain",
            Quiesce::Stop => "stop",
        }
    }
}

/// What to do when a quiesce step fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnQuiesceFailure {
    /// Take the backup anyway, crash-consistent, and say so.
    #[default]
    Crash,
    /// Skip this backup (the operation fails, saying why).
    Skip,
}

/// A site's effective policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub schedule: Option<Schedule>,
    /// Each site starts at a stable offset in [0, jitter) so sites do not
    /// all start at once.
    pub jitter: Duration,
    pub quiesce: Quiesce,
    pub on_quiesce_failure: OnQuiesceFailure,
    /// Keep at least the newest N backups.
    pub keep_last: u32,
    /// Keep every backup younger than this (None: age keeps nothing extra).
    pub keep_for: Option<Duration>,
    /// Regions to copy every new AMI to.
    pub copy_regions: Vec<String>,
    /// Copies kept per region (newest first).
    pub copy_keep_last: u32,
    /// When drills start (None: never by schedule). Needs `[site.drill]`.
    pub drill_schedule: Option<Schedule>,
    /// Which backup a scheduled drill restores.
    pub drill_backup: DrillBackup,
    /// Keep a hot spare of the site.
    pub spare: SpareMode,
    /// Where the spare lives ("" = the site's home region).
    pub spare_region: String,
    /// A spare is replaced when a newer good backup exists and the spare's
    /// backup started longer ago than this.
    pub spare_max_lag: Duration,
    /// Whether a failover uses the spare.
    pub failover_prefers: FailoverPrefers,
    /// Health checking and automatic recovery (`auto_failover`, `health_*`,
    /// `confirm_for`, ...).
    pub health: HealthPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            schedule: None,
            jitter: Duration::ZERO,
            quiesce: Quiesce::None,
            on_quiesce_failure: OnQuiesceFailure::Crash,
            keep_last: 7,
            keep_for: None,
            copy_regions: Vec::new(),
            copy_keep_last: 7,
            drill_schedule: None,
            drill_backup: DrillBackup::Latest,
            spare: SpareMode::Off,
            spare_region: String::new(),
            spare_max_lag: Duration::from_secs(24 * 3600),
            failover_prefers: FailoverPrefers::Spare,
            health: HealthPolicy::default(),
        }
    }
}

/// The `[policy]` / `[site.policy]` table: every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// "15m", "1h", ... or "cron:<sec min hour dom month dow>".
    pub schedule: Option<String>,
    /// IANA time zone of the cron schedules of this table (`schedule` and
    /// `drill_schedule`; default UTC).
    pub timezone: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub jitter: Option<Duration>,
    pub quiesce: Option<Quiesce>,
    pub on_quiesce_failure: Option<OnQuiesceFailure>,
    pub keep_last: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub keep_for: Option<Duration>,
    pub copy_regions: Option<Vec<String>>,
    pub copy_keep_last: Option<u32>,
    /// Like `schedule`, for drills: "off", "7d" or "cron:<expr>".
    pub drill_schedule: Option<String>,
    /// "latest" or "random-within:<duration>".
    pub drill_backup: Option<String>,
    /// "off", "stopped" or "running".
    pub spare: Option<SpareMode>,
    /// The region the spare lives in (default: the site's home region).
    pub spare_region: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub spare_max_lag: Option<Duration>,
    /// "spare" or "freshest".
    pub failover_prefers: Option<FailoverPrefers>,
    /// "off", "approve" or "auto".
    pub auto_failover: Option<AutoMode>,
    /// The app probe's URL; `{hostname}` is the site's hostname; "" = none.
    pub health_url: Option<String>,
    /// The HTTP status a healthy app answers (default 200).
    pub health_expect_status: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    pub health_timeout: Option<Duration>,
    /// PEM file of the CA the probe trusts (default: the system's roots).
    pub health_ca: Option<std::path::PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub confirm_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub repair_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub approval_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub host_restart_deadline: Option<Duration>,
    /// The id of a Route 53 health check of the site's public endpoint: a
    /// vantage point outside the controller's network ("" = none).
    pub route53_health_check: Option<String>,
}

impl PolicyFile {
    /// Applies this table over `base`. Errors name the key.
    pub fn apply(&self, base: &Policy) -> Result<Policy, (String, String)> {
        let mut p = base.clone();
        let tz = self.timezone.as_deref().unwrap_or("UTC");
        if let Some(s) = &self.schedule {
            p.schedule = parse_schedule(s, tz).map_err(|m| ("schedule".to_owned(), m))?;
        }
        if let Some(s) = &self.drill_schedule {
            p.drill_schedule = parse_schedule(s, tz).map_err(|m| ("drill_schedule".to_owned(), m))?;
        }
        if self.timezone.is_some() && self.schedule.is_none() && self.drill_schedule.is_none() {
            return Err(("timezone".into(), "a timezone needs a cron schedule (schedule or drill_schedule) in the same table".into()));
        }
        if let Some(b) = &self.drill_backup {
            p.drill_backup = DrillBackup::parse(b).map_err(|m| ("drill_backup".to_owned(), m))?;
        }
        if let Some(j) = self.jitter {
            p.jitter = j;
        }
        if let Some(q) = self.quiesce {
            p.quiesce = q;
        }
        if let Some(f) = self.on_quiesce_failure {
            p.on_quiesce_failure = f;
        }
        if let Some(n) = self.keep_last {
            if n == 0 {
                return Err(("keep_last".into(), "must be at least 1 (the newest backup is always kept)".into()));
            }
            p.keep_last = n;
        }
        if let Some(a) = self.keep_for {
            p.keep_for = Some(a);
        }
        if let Some(r) = &self.copy_regions {
            if let Some(bad) = r.iter().find(|r| !is_region(r)) {
                return Err(("copy_regions".into(), format!("`{bad}` is not an AWS region name")));
            }
            p.copy_regions = r.clone();
        }
        if let Some(n) = self.copy_keep_last {
            if n == 0 {
                return Err(("copy_keep_last".into(), "must be at least 1".into()));
            }
            p.copy_keep_last = n;
        }
        if let Some(m) = self.spare {
            p.spare = m;
        }
        if let Some(r) = &self.spare_region {
            if !r.is_empty() && !is_region(r) {
                return Err(("spare_region".into(), format!("`{r}` is not an AWS region name")));
            }
            p.spare_region = r.clone();
        }
        if let Some(l) = self.spare_max_lag {
            if l > SPARE_MAX_LAG_LIMIT {
                return Err(("spare_max_lag".into(), format!("{} is longer than 366 days", humantime::format_duration(l))));
            }
            p.spare_max_lag = l;
        }
        if let Some(f) = self.failover_prefers {
            p.failover_prefers = f;
        }
        self.apply_health(&mut p.health)?;
        Ok(p)
    }

    fn apply_health(&self, h: &mut HealthPolicy) -> Result<(), (String, String)> {
        if let Some(m) = self.auto_failover {
            h.mode = m;
        }
        if let Some(u) = &self.health_url {
            let probe = u.replace("{hostname}", "host.invalid");
            // "" turns the probe off (documented); anything else must be a URL.
            if !u.is_empty() && (!(probe.starts_with("https://") || probe.starts_with("http://")) || probe.parse::<hyper::Uri>().is_err()) {
                return Err(("health_url".into(), format!("`{u}` is not an http:// or https:// URL")));
            }
            h.url = u.clone();
        }
        if let Some(s) = self.health_expect_status {
            if !(100..=599).contains(&s) {
                return Err(("health_expect_status".into(), format!("{s} is not an HTTP status")));
            }
            h.expect_status = s;
        }
        if let Some(ca) = &self.health_ca {
            h.ca = Some(ca.clone());
        }
        if let Some(id) = &self.route53_health_check {
            // Route 53 health check ids are UUIDs; refuse anything that
            // would not be one rather than ask Route 53 for it every pass.
            let looks_like_one = id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !id.is_empty() && !looks_like_one {
                return Err(("route53_health_check".into(), format!("`{id}` is not a Route 53 health check id")));
            }
            h.route53_health_check = id.clone();
        }
        let s = Duration::from_secs;
        let windows: [(&str, Option<Duration>, &mut Duration, Duration, Duration); 6] = [
            ("health_timeout", self.health_timeout, &mut h.timeout, Duration::from_millis(100), s(120)),
            ("confirm_for", self.confirm_for, &mut h.confirm_for, Duration::ZERO, s(24 * 3600)),
            ("repair_after", self.repair_after, &mut h.repair_after, Duration::ZERO, s(24 * 3600)),
            ("cooldown", self.cooldown, &mut h.cooldown, Duration::ZERO, s(30 * 24 * 3600)),
            ("approval_timeout", self.approval_timeout, &mut h.approval_timeout, s(1), s(30 * 24 * 3600)),
            ("host_restart_deadline", self.host_restart_deadline, &mut h.host_restart_deadline, s(10), s(24 * 3600)),
        ];
        for (key, value, slot, min, max) in windows {
            if let Some(v) = value {
                if v < min || v > max {
                    return Err((
                        key.into(),
                        format!(
                            "{} is out of range: must be between {} and {}",
                            humantime::format_duration(v),
                            humantime::format_duration(min),
                            humantime::format_duration(max)
                        ),
                    ));
                }
                *slot = v;
            }
        }
        Ok(())
    }
}

impl Policy {
    /// Where the backups of a site whose primary runs in `current` are
    /// copied: `copy_regions`, but while the primary is away from `home`
    /// (after a failover into a DR region) the copies go home instead of to
    /// the region the backups are now taken in, so a failback has them.
    pub fn copy_regions_from(&self, current: &str, home: &str) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        if !home.is_empty() && current != home {
            out.push(home.to_owned());
        }
        for r in &self.copy_regions {
            if r != current && !out.contains(r) {
                out.push(r.clone());
            }
        }
        out
    }

    /// Scheduled drills are overdue when none started within the drill
    /// schedule's interval plus the jitter window plus `lease` (the time a
    /// drill may take) since the last one; with none recorded, since the
    /// schedule's last handled slot (`slot`, first set when the scheduler
    /// saw the schedule).
    pub fn drill_overdue(&self, lease: Duration, last_started: Option<Millis>, slot: Option<Millis>, now: Millis) -> bool {
        let Some(schedule) = &self.drill_schedule else { return false };
        let Some(since) = last_started.or(slot) else { return false };
        let Some(interval) = schedule.nominal_interval(since) else { return false };
        let allowed = interval.saturating_add(self.jitter).saturating_add(lease).as_millis() as u64;
        now.saturating_sub(since) > allowed
    }
}

pub fn is_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        && parts.last().is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses "off", "15m" / "1h" (interval) or "cron:<expr>" in `tz`.
pub fn parse_schedule(s: &str, tz: &str) -> Result<Option<Schedule>, String> {
    let s = s.trim();
    if s == "off" || s.is_empty() {
        return Ok(None);
    }
    if let Some(expr) = s.strip_prefix("cron:") {
        let schedule = cron::Schedule::from_str(expr.trim()).map_err(|e| format!("`{expr}` is not a cron expression: {e}"))?;
        let tz: chrono_tz::Tz = tz.parse().map_err(|_| format!("`{tz}` is not an IANA time zone"))?;
        return Ok(Some(Schedule::Cron { expr: expr.trim().to_owned(), schedule: Box::new(schedule), tz }));
    }
    let every = humantime::parse_duration(s).map_err(|e| format!("`{s}` is neither an interval like \"15m\" nor \"cron:<expr>\": {e}"))?;
    if every < Duration::from_secs(60) {
        return Err(format!("`{s}`: more often than once a minute is not supported"));
    }
    Ok(Some(Schedule::Every(every)))
}

/// The stable offset of a site within the jitter window (FNV-1a of its id).
pub fn jitter_offset(site_id: &str, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    let mut h: u64 = 0xcbf29ce484222325;
    for b in site_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    Duration::from_millis(h % jitter.as_millis().max(1) as u64)
}

impl Schedule {
    /// The first scheduled slot strictly after `after` (ms since epoch),
    /// before jitter.
    pub fn next_slot(&self, after: Millis) -> Option<Millis> {
        match self {
            Schedule::Every(every) => {
                let step = every.as_millis() as u64;
                Some((after / step + 1) * step)
            }
            Schedule::Cron { schedule, tz, .. } => {
                use chrono::TimeZone;
                let t = tz.timestamp_millis_opt(after as i64).single()?;
                schedule.after(&t).next().map(|n| n.timestamp_millis() as Millis)
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Schedule::Every(d) => format!("every {}", humantime::format_duration(*d)),
            Schedule::Cron { expr, tz, .. } => format!("cron `{expr}` ({tz})"),
        }
    }

    /// The nominal interval between backups (for RPO lateness).
    pub fn nominal_interval(&self, now: Millis) -> Option<Duration> {
        let a = self.next_slot(now)?;
        let b = self.next_slot(a)?;
        Some(Duration::from_millis(b - a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_align_to_slots_and_jitter_is_stable() {
        let s = parse_schedule("15m", "UTC").expect("ok").expect("on");
        let q = 15 * 60 * 1000;
        assert_eq!(s.next_slot(0), Some(q));
        assert_eq!(s.next_slot(q), Some(2 * q));
        assert_eq!(s.next_slot(q - 1), Some(q));
        let j = Duration::from_secs(300);
        assert_eq!(jitter_offset("prod-1", j), jitter_offset("prod-1", j));
        assert!(jitter_offset("prod-1", j) < j);
        assert_ne!(jitter_offset("prod-1", j), jitter_offset("prod-2", j));
        assert!(parse_schedule("10s", "UTC").is_err());
        assert!(parse_schedule("often", "UTC").is_err());
        assert_eq!(parse_schedule("off", "UTC").expect("ok"), None);
    }

    #[test]
    fn cron_in_a_time_zone() {
        // 02:30 every day in Berlin; on 2026-11-24 that is 01:30 UTC.
        let s = parse_schedule("cron:0 30 2 * * *", "Europe/Berlin").expect("ok").expect("on");
        let noon_utc = 1_795_521_600_000; // 2026-11-24T12:00:00Z
        let next = s.next_slot(noon_utc).expect("a next slot");
        assert_eq!(next, 1_795_570_200_000, "2026-11-25T01:30:00Z");
        assert_eq!(s.nominal_interval(noon_utc), Some(Duration::from_secs(86_400)));
        assert!(parse_schedule("cron:not a cron", "UTC").is_err());
        assert!(parse_schedule("cron:0 0 * * * *", "Mars/Olympus").is_err());
    }

    #[test]
    fn drill_schedules_and_backup_choice() {
        let base = Policy::default();
        let f = PolicyFile {
            drill_schedule: Some("cron:0 0 3 * * Sun".into()),
            timezone: Some("Europe/Berlin".into()),
            drill_backup: Some("random-within:7d".into()),
            ..Default::default()
        };
        let p = f.apply(&base).expect("ok");
        assert!(matches!(&p.drill_schedule, Some(Schedule::Cron { tz: chrono_tz::Tz::Europe__Berlin, .. })));
        assert_eq!(p.schedule, None, "the backup schedule is untouched");
        assert_eq!(p.drill_backup, DrillBackup::RandomWithin(Duration::from_secs(7 * 86_400)));
        assert_eq!(p.drill_backup.describe(), "random-within:7days");
        for bad in ["newest", "random-within:", "random-within:10s", "random-within:400d"] {
            let f = PolicyFile { drill_backup: Some(bad.into()), ..Default::default() };
            assert_eq!(f.apply(&base).expect_err(bad).0, "drill_backup", "{bad}");
        }
        let f = PolicyFile { drill_schedule: Some("soon".into()), ..Default::default() };
        assert_eq!(f.apply(&base).expect_err("bad").0, "drill_schedule");
    }

    #[test]
    fn copies_go_home_while_the_primary_is_away() {
        let p = Policy { copy_regions: vec!["us-west-2".into(), "eu-west-1".into()], ..Policy::default() };
        assert_eq!(p.copy_regions_from("us-east-1", "us-east-1"), ["us-west-2", "eu-west-1"], "at home: as configured");
        assert_eq!(p.copy_regions_from("us-west-2", "us-east-1"), ["us-east-1", "eu-west-1"], "away: home first, never to itself");
        assert_eq!(Policy::default().copy_regions_from("us-west-2", "us-east-1"), ["us-east-1"], "home even with no copy regions");
        assert_eq!(p.copy_regions_from("us-east-1", ""), ["us-west-2", "eu-west-1"], "no home known: as configured");
    }

    #[test]
    fn drills_are_overdue_after_interval_jitter_and_lease() {
        let h = 3_600_000;
        let lease = Duration::from_secs(2 * 3600);
        let unscheduled = Policy::default();
        assert!(!unscheduled.drill_overdue(lease, Some(0), None, 1000 * h), "no schedule, never overdue");
        let p = PolicyFile { drill_schedule: Some("24h".into()), jitter: Some(Duration::from_secs(3600)), ..Default::default() }
            .apply(&Policy::default())
            .expect("ok");
        // Last drill at 0: allowed 24 h + 1 h jitter + 2 h lease.
        assert!(!p.drill_overdue(lease, Some(0), None, 27 * h));
        assert!(p.drill_overdue(lease, Some(0), None, 27 * h + 1));
        // None recorded: counted from the schedule's slot; the last drill wins over it.
        assert!(!p.drill_overdue(lease, None, Some(10 * h), 37 * h));
        assert!(p.drill_overdue(lease, None, Some(10 * h), 38 * h));
        assert!(!p.drill_overdue(lease, Some(30 * h), Some(10 * h), 38 * h));
        assert!(!p.drill_overdue(lease, None, None, 1000 * h), "the scheduler has not seen it yet");
    }

    #[test]
    fn site_tables_override_defaults_and_name_bad_keys() {
        let base = Policy::default();
        let f = PolicyFile { keep_last: Some(0), ..Default::default() };
        assert_eq!(f.apply(&base).expect_err("zero").0, "keep_last");
        let f = PolicyFile { copy_regions: Some(vec!["mars".into()]), ..Default::default() };
        assert_eq!(f.apply(&base).expect_err("bad region").0, "copy_regions");
        let f = PolicyFile { quiesce: Some(Quiesce::Freeze), keep_for: Some(Duration::from_secs(3600)), ..Default::default() };
        let p = f.apply(&base).expect("ok");
        assert_eq!((p.quiesce, p.keep_for, p.keep_last), (Quiesce::Freeze, Some(Duration::from_secs(3600)), 7));
    }
}
