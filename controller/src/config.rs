//! The controller's configuration file (TOML).
//!
//! Every key is documented in `deploy/controller.example.toml`. Errors name
//! the file and the key that was wrong.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dr_proto::identity::{validate_name, validate_trust_domain};
use dr_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::domain::events::EventKind;
use crate::domain::policy::{Policy, PolicyFile};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: ControllerTls,
    pub store: StoreConfig,
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub backup: BackupConfig,
    /// Fleet defaults of every site's backup policy.
    #[serde(default)]
    pub policy: PolicyFile,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// Restore and failover timeouts.
    #[serde(default)]
    pub failover: crate::domain::recovery::FailoverConfig,
    /// Drill lease, reaper interval, longest keep.
    #[serde(default)]
    pub drill: crate::domain::recovery::DrillConfig,
    /// The health monitor: how often, and the fleet-wide guards.
    #[serde(default)]
    pub health: HealthConfig,
    /// Webhooks that receive events (`[[notify]]`).
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// The intermediate CA the controller issues agent certificates with,
    /// and how agents prove which instance they run on.
    #[serde(default)]
    pub pki: PkiConfig,
}

/// `[pki]`: certificates per instance, issued by the controller.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PkiConfig {
    /// The intermediate CA (`drctl pki intermediate`): its certificate (then
    /// any CA certificate between it and the root) and its key. Required
    /// unless `allow_site_certificates` holds every agent's session.
    pub intermediate_cert: Option<PathBuf>,
    pub intermediate_key: Option<PathBuf>,
    /// Lifetime of an agent's certificate. Agents renew at half of it
    /// (±10 %), so the fleet rides out a controller outage of at least
    /// 45 % of it without any agent going dark: 35 days gives 15.
    #[serde(with = "humantime_serde")]
    pub agent_cert_lifetime: Duration,
    /// Lifetime of the controller's own certificate, which it renews from
    /// the intermediate at two thirds of its life (written back to
    /// `tls.cert`/`tls.key`, presented without a restart).
    #[serde(with = "humantime_serde")]
    pub controller_cert_lifetime: Duration,
    /// PEM bundle of the AWS public certificates that verify instance
    /// identity documents (the "RSA" certificate of each region the fleet
    /// runs in, from the EC2 documentation). Without it, instances enrol
    /// only with one-time tokens (`drctl allow-enrol SITE INSTANCE --token`).
    pub instance_identity_certificates: Option<PathBuf>,
    /// The account of sites without a `role_arn` (a document's account
    /// must match its site's).
    pub account_id: Option<String>,
    /// While a fleet moves over: site-wide certificates (`drctl pki issue
    /// site`) still hold sessions, without a proof of instance; `drctl
    /// status` lists the instances still on them. Off by default: then a
    /// site certificate only lets an agent enrol.
    pub allow_site_certificates: bool,
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            intermediate_cert: None,
            intermediate_key: None,
            agent_cert_lifetime: Duration::from_secs(35 * 24 * 3600),
            controller_cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            instance_identity_certificates: None,
            account_id: None,
            allow_site_certificates: false,
        }
    }
}

/// `[health]`: the fleet-wide side of health checking.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often every site's signals are gathered (one batched EC2 call
    /// per 100 instances of an account and region, one probe per site).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// More than this share of the sites with a silent agent at once, or
    /// with a failing app probe: the fault is taken to be on the
    /// controller's side and no rung starts anywhere (one alert).
    pub max_down_fraction: f64,
    /// Automatic failovers running at once, fleet-wide.
    pub max_concurrent_failovers: u32,
    /// Automatic repairs (app restarts, host stop/starts) running at once,
    /// fleet-wide.
    pub max_concurrent_repairs: u32,
    /// Probes running at once.
    pub probe_concurrency: u32,
    /// An agent whose certificate ends within this raises
    /// `agent.cert_expiring` (once per certificate). Agents renew at half
    /// of `pki.agent_cert_lifetime` (±10 %): keep this below 45 % of it, so
    /// that the event means "renewal is failing", not a chore.
    #[serde(with = "humantime_serde")]
    pub cert_warning: Duration,
    /// How often the fenced instances of every site are looked up in EC2
    /// (one DescribeInstances per account and region) and their agents in
    /// the live sessions; one seen running again is stopped again.
    #[serde(with = "humantime_serde")]
    pub fence_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(15),
            max_down_fraction: 0.2,
            max_concurrent_failovers: 5,
            max_concurrent_repairs: 5,
            probe_concurrency: 64,
            cert_warning: Duration::from_secs(14 * 24 * 3600),
            fence_interval: Duration::from_secs(20),
        }
    }
}

/// What a webhook's body looks like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// The event as JSON (id, at, site, kind, severity, summary, evidence).
    #[default]
    Json,
    /// `{"text": ...}`, for Slack-compatible incoming webhooks.
    Slack,
}

/// `[[notify]]`: one webhook.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// http:// or https:// URL the events are POSTed to.
    pub url: String,
    /// Event kinds sent (`site.down`, or a prefix with `*`: `failover.*`);
    /// empty or absent: every event.
    #[serde(default)]
    pub events: Vec<String>,
    /// HMAC-SHA256 key of the `X-DR-Signature` header; the key itself, or
    /// `secret_file` naming a file that holds it.
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub format: NotifyFormat,
    /// PEM file of the CA an https:// URL is checked against (default: the
    /// system's roots).
    pub ca: Option<PathBuf>,
}

impl NotifyConfig {
    /// Whether this webhook takes events of `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        self.events.is_empty()
            || self.events.iter().any(|e| e == "*" || e == kind || e.strip_suffix('*').is_some_and(|p| kind.starts_with(p)))
    }

    /// The HMAC key ("" for unsigned deliveries).
    pub fn secret(&self) -> Result<String, String> {
        match (&self.secret, &self.secret_file) {
            (Some(s), None) => Ok(s.clone()),
            (None, Some(f)) => {
                std::fs::read_to_string(f).map(|s| s.trim().to_owned()).map_err(|e| format!("cannot read {}: {e}", f.display()))
            }
            (None, None) => Ok(String::new()),
            (Some(_), Some(_)) => Err("give secret or secret_file, not both".into()),
        }
    }
}

/// Prometheus metrics over plain HTTP (keep it on a private address).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// e.g. "127.0.0.1:9464"; no listener when absent.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the single listener that serves both the agent stream and
    /// the admin API.
    pub listen: SocketAddr,
    /// Interval agents are told to send heartbeats at.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// An agent that sent nothing for this many heartbeat intervals is
    /// considered gone and its stream is closed.
    #[serde(default = "default_missed_heartbeats")]
    pub missed_heartbeats: u32,
    /// Longest a TLS handshake may take before the connection is dropped.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// On SIGTERM, how long open streams and calls get to finish.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often the last-seen time of every connected agent is written to
    /// the store (so "recently seen" survives a controller restart).
    #[serde(default = "default_liveness_flush", with = "humantime_serde")]
    pub liveness_flush: Duration,
    /// Pending-connection queue of the listener: sized for every agent of
    /// the fleet reconnecting at once after a controller restart (the
    /// kernel caps it at net.core.somaxconn).
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerTls {
    /// CA certificate that signs every certificate of the deployment.
    pub ca: PathBuf,
    /// The controller's certificate (DNS/IP SANs agents and drctl dial).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Identities are `spiffe://<trust_domain>/site/<id>` and
    /// `spiffe://<trust_domain>/operator/<name>`.
    pub trust_domain: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file (created with its directory if missing): the
    /// embedded store of one controller. Either this or `url`.
    pub path: Option<PathBuf>,
    /// A PostgreSQL database (`postgres://user@host:5432/db`, or libpq's
    /// `key=value` form) that any number of controller replicas share;
    /// one leads. Put no password here: use `password_file` or the
    /// `DR_STORE_PASSWORD` environment variable.
    pub url: Option<String>,
    /// A file whose first line is the database password.
    pub password_file: Option<PathBuf>,
    /// PEM certificates that sign the database server's certificate: the
    /// connection then uses TLS (`sslmode=require` unless `url` asks for
    /// more). Without it the connection is plain (loopback, a Unix socket).
    pub ca: Option<PathBuf>,
    /// PostgreSQL: how long the leader's lease holds by the database's
    /// clock. A standby takes over at most this long after the leader dies.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// PostgreSQL: this replica's name in the lease (default: host name
    /// and process id).
    pub replica_id: Option<String>,
    /// PostgreSQL: the address agents and drctl reach this replica at,
    /// shown to them by standbys while it leads (default: `server.listen`).
    pub advertise: Option<String>,
    /// Where this controller keeps its local files (the CA rotation's new
    /// certificates). Default: the SQLite file's directory, or
    /// `/var/lib/dr-controller` with PostgreSQL.
    pub state_dir: Option<PathBuf>,
}

/// The store `[store]` names, its files read.
pub enum StoreTarget {
    Sqlite(PathBuf),
    Postgres { url: String, password: Option<String>, ca_pem: Option<String> },
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(15)
}

/// The environment variable that holds the PostgreSQL password (when
/// `[store] password_file` is not set).
pub const STORE_PASSWORD_ENV: &str = "DR_STORE_PASSWORD";

impl StoreConfig {
    /// Where the store is, with its password and TLS roots read. Errors
    /// name the key; none repeats the URL or the password.
    pub fn target(&self) -> Result<StoreTarget, (String, String)> {
        match (&self.path, &self.url) {
            (Some(path), None) => Ok(StoreTarget::Sqlite(path.clone())),
            (None, Some(url)) => {
                let password = match &self.password_file {
                    Some(f) => {
                        let text = std::fs::read_to_string(f)
                            .map_err(|e| ("store.password_file".to_owned(), format!("cannot read {}: {e}", f.display())))?;
                        Some(text.lines().next().unwrap_or("").to_owned())
                    }
                    None => std::env::var(STORE_PASSWORD_ENV).ok(),
                };
                let ca_pem = match &self.ca {
                    Some(f) => {
                        Some(std::fs::read_to_string(f).map_err(|e| ("store.ca".to_owned(), format!("cannot read {}: {e}", f.display())))?)
                    }
                    None => None,
                };
                Ok(StoreTarget::Postgres { url: url.clone(), password, ca_pem })
            }
            (Some(_), Some(_)) => Err(("store".into(), "set `path` (SQLite) or `url` (PostgreSQL), not both".into())),
            (None, None) => Err(("store".into(), "set `path` (an SQLite file) or `url` (a PostgreSQL database)".into())),
        }
    }

    /// This controller's local state directory (see `state_dir`).
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        match &self.path {
            Some(p) => p.parent().filter(|d| !d.as_os_str().is_empty()).map(Path::to_owned).unwrap_or_else(|| PathBuf::from(".")),
            None => PathBuf::from("/var/lib/dr-controller"),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Default region of sites that name none. Without it, aws-config's
    /// normal chain (AWS_REGION, profile) decides.
    pub region: Option<String>,
    /// Send EC2 (and STS) calls to this endpoint instead of AWS: for moto in
    /// tests and the demo, or a VPC endpoint.
    pub endpoint_url: Option<String>,
    /// Attempts per EC2 call made by the SDK's own retry layer (1 = no
    /// retries, as tests use so an unimplemented emulator path fails fast).
    pub max_attempts: Option<u32>,
    /// The controller's own request budget per account and region.
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// First wait before checking whether a new AMI is available.
    #[serde(default = "default_poll_initial", with = "humantime_serde")]
    pub poll_initial: Duration,
    /// Longest wait between two checks (the wait doubles up to this).
    #[serde(default = "default_poll_max", with = "humantime_serde")]
    pub poll_max: Duration,
    /// A backup whose AMI is not available after this long fails.
    #[serde(default = "default_backup_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline of the app-status question asked of the agent.
    #[serde(default = "default_agent_call_timeout", with = "humantime_serde")]
    pub agent_call_timeout: Duration,
    /// Quiesce `freeze`/`drain`: the agent's watchdog thaws after this long
    /// whatever happens (keep it well above CreateImage + snapshot start).
    #[serde(default = "default_freeze_deadline", with = "humantime_serde")]
    pub freeze_deadline: Duration,
    /// Quiesce `drain`: longest wait for running builds before freezing.
    #[serde(default = "default_drain_deadline", with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// How long to keep retrying to lift a quiesce (thaw, undrain, start the
    /// app) while the agent is unreachable.
    #[serde(default = "default_unquiesce_patience", with = "humantime_serde")]
    pub unquiesce_patience: Duration,
    /// After a controller restart, how long an operation waits for a site's
    /// agent (seen within `agent_seen_within`) to reconnect.
    #[serde(default = "default_agent_reconnect_grace", with = "humantime_serde")]
    pub agent_reconnect_grace: Duration,
    /// An agent last seen (any message) within this long is worth waiting
    /// for after a restart; older than this it counts as gone.
    #[serde(default = "default_agent_seen_within", with = "humantime_serde")]
    pub agent_seen_within: Duration,
    /// How often the scheduler looks for sites whose backup is due.
    #[serde(default = "default_scheduler_tick", with = "humantime_serde")]
    pub scheduler_tick: Duration,
    /// How often pending and failed copies to DR regions are checked/retried.
    #[serde(default = "default_copy_poll", with = "humantime_serde")]
    pub copy_poll: Duration,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            poll_initial: default_poll_initial(),
            poll_max: default_poll_max(),
            timeout: default_backup_timeout(),
            agent_call_timeout: default_agent_call_timeout(),
            freeze_deadline: default_freeze_deadline(),
            drain_deadline: default_drain_deadline(),
            unquiesce_patience: default_unquiesce_patience(),
            agent_reconnect_grace: default_agent_reconnect_grace(),
            agent_seen_within: default_agent_seen_within(),
            scheduler_tick: default_scheduler_tick(),
            copy_poll: default_copy_poll(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's name: what its agent certificate says
    /// (`spiffe://<trust_domain>/site/<id>`).
    pub id: String,
    /// The services machine's instance when the site is first added. After
    /// that the store's record of the primary is authoritative (a failover
    /// changes it).
    pub instance_id: String,
    /// Region of the instance; defaults to `[aws] region`.
    pub region: Option<String>,
    /// Role to assume for this site's EC2 calls (another account).
    pub role_arn: Option<String>,
    /// Overrides of the fleet's `[policy]`.
    #[serde(default)]
    pub policy: PolicyFile,
    /// Restore: how the old primary is fenced (`stop`, default, or
    /// `terminate`).
    #[serde(default)]
    pub fence: crate::domain::recovery::Fence,
    /// Restore with `fence = "terminate"`: launch the replacement with the
    /// old private IP (same subnet), so Nomad builders need no change.
    #[serde(default)]
    pub keep_private_ip: bool,
    /// Restore: the CircleCI hostname the restored machine must use, when it
    /// differs from the one in the backup.
    pub hostname: Option<String>,
    /// Restore: overrides of the launch facts recorded at backup time, and
    /// one table per other region (`[site.launch.us-west-2]`).
    #[serde(default)]
    pub launch: crate::domain::recovery::LaunchConfig,
    /// Restore: a Route 53 A record that follows the primary.
    pub dns: Option<crate::domain::recovery::DnsRecord>,
    /// Drills: the isolated subnet, security groups and hostname of a drill
    /// copy (and one table per other region).
    #[serde(default)]
    pub drill: crate::domain::recovery::DrillSettings,
}

impl SiteConfig {
    /// The site's recovery settings; `home_region` is the site's region in
    /// the config (`Config::site_region`).
    pub fn recovery(&self, home_region: String) -> crate::domain::recovery::SiteRecovery {
        crate::domain::recovery::SiteRecovery {
            home_region,
            fence: self.fence,
            keep_private_ip: self.keep_private_ip,
            hostname: self.hostname.clone().unwrap_or_default(),
            launch: self.launch.clone(),
            dns: self.dns.clone(),
            drill: self.drill.clone(),
        }
    }
}

impl ControllerTls {
    pub fn files(&self) -> TlsFiles {
        TlsFiles { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }
}

/// 6 s × 3 missed beats: a dead agent is noticed 18 s after its last
/// message (issue 7's target: 20 s), at 1,667 heartbeats/s for 10,000
/// agents (5 s cost the controller 10.5 % of a core there, 6 s about 9).
fn default_heartbeat() -> Duration {
    Duration::from_secs(6)
}
fn default_liveness_flush() -> Duration {
    Duration::from_secs(30)
}
fn default_listen_backlog() -> u32 {
    16384
}
fn default_agent_seen_within() -> Duration {
    Duration::from_secs(300)
}
fn default_missed_heartbeats() -> u32 {
    3
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_poll_initial() -> Duration {
    Duration::from_secs(5)
}
fn default_poll_max() -> Duration {
    Duration::from_secs(60)
}
fn default_backup_timeout() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_freeze_deadline() -> Duration {
    Duration::from_secs(120)
}
fn default_drain_deadline() -> Duration {
    Duration::from_secs(600)
}
fn default_unquiesce_patience() -> Duration {
    Duration::from_secs(300)
}
fn default_agent_reconnect_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_scheduler_tick() -> Duration {
    Duration::from_secs(5)
}
fn default_copy_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_agent_call_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid { path: path.to_owned(), key, message };
        validate_trust_domain(&self.tls.trust_domain).map_err(|m| invalid("tls.trust_domain".into(), m.into()))?;
        match (&self.store.path, &self.store.url) {
            (Some(_), Some(_)) => return Err(invalid("store".into(), "set `path` (SQLite) or `url` (PostgreSQL), not both".into())),
            (None, None) => return Err(invalid("store".into(), "set `path` (an SQLite file) or `url` (a PostgreSQL database)".into())),
            (Some(_), None) if self.store.password_file.is_some() || self.store.ca.is_some() => {
                return Err(invalid("store".into(), "`password_file` and `ca` are for a PostgreSQL `url`, not an SQLite `path`".into()));
            }
            _ => {}
        }
        // Every duration within a range that makes sense: no zero waits that
        // busy-loop, no values that overflow a deadline computation.
        let s = Duration::from_secs;
        let (sv, b) = (&self.server, &self.backup);
        let f = &self.failover;
        let d = &self.drill;
        let ranges: [(&str, Duration, Duration, Duration); 27] = [
            ("store.lease_ttl", self.store.lease_ttl, s(3), s(600)),
            ("drill.lease", d.lease, s(10), s(7 * 24 * 3600)),
            ("drill.reap_every", d.reap_every, s(1), s(24 * 3600)),
            ("drill.max_keep", d.max_keep, Duration::ZERO, s(7 * 24 * 3600)),
            ("failover.fence_timeout", f.fence_timeout, s(1), s(3600)),
            ("failover.launch_timeout", f.launch_timeout, s(1), s(3600)),
            ("failover.agent_timeout", f.agent_timeout, s(1), s(3 * 3600)),
            ("failover.app_timeout", f.app_timeout, s(1), s(3 * 3600)),
            ("failover.dns_timeout", f.dns_timeout, s(1), s(3600)),
            ("failover.cleanup_timeout", f.cleanup_timeout, s(1), s(6 * 3600)),
            ("server.heartbeat_interval", sv.heartbeat_interval, s(1), s(300)),
            ("server.handshake_timeout", sv.handshake_timeout, s(1), s(300)),
            ("server.shutdown_grace", sv.shutdown_grace, Duration::ZERO, s(600)),
            ("server.liveness_flush", sv.liveness_flush, s(1), s(600)),
            ("backup.poll_initial", b.poll_initial, Duration::from_millis(10), s(3600)),
            ("backup.poll_max", b.poll_max, Duration::from_millis(10), s(3600)),
            ("backup.timeout", b.timeout, s(1), s(7 * 24 * 3600)),
            ("backup.agent_call_timeout", b.agent_call_timeout, s(1), s(3600)),
            ("backup.freeze_deadline", b.freeze_deadline, s(1), s(3600)),
            ("backup.drain_deadline", b.drain_deadline, s(1), s(24 * 3600)),
            ("backup.unquiesce_patience", b.unquiesce_patience, Duration::ZERO, s(24 * 3600)),
            ("backup.agent_reconnect_grace", b.agent_reconnect_grace, Duration::ZERO, s(3600)),
            ("backup.agent_seen_within", b.agent_seen_within, Duration::ZERO, s(7 * 24 * 3600)),
            ("backup.scheduler_tick", b.scheduler_tick, Duration::from_millis(100), s(3600)),
            ("backup.copy_poll", b.copy_poll, Duration::from_millis(100), s(24 * 3600)),
            ("policy.jitter", self.policy.jitter.unwrap_or_default(), Duration::ZERO, s(7 * 24 * 3600)),
            ("policy.keep_for", self.policy.keep_for.unwrap_or_default(), Duration::ZERO, s(100 * 365 * 24 * 3600)),
        ];
        for (key, value, min, max) in ranges {
            if value < min || value > max {
                return Err(invalid(
                    key.into(),
                    format!(
                        "{} is out of range: must be between {} and {}",
                        humantime::format_duration(value),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        let p = &self.pki;
        for (key, value) in
            [("pki.agent_cert_lifetime", p.agent_cert_lifetime), ("pki.controller_cert_lifetime", p.controller_cert_lifetime)]
        {
            // Seconds are allowed for tests of renewal; production keeps days.
            if value < s(10) || value > s(397 * 24 * 3600) {
                return Err(invalid(
                    key.into(),
                    format!("{} is out of range: must be between 10s and 397days", humantime::format_duration(value)),
                ));
            }
        }
        if p.intermediate_cert.is_some() != p.intermediate_key.is_some() {
            return Err(invalid(
                "pki.intermediate_key".into(),
                "give both pki.intermediate_cert and pki.intermediate_key, or neither".into(),
            ));
        }
        if let Some(a) = &p.account_id
            && (a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(invalid("pki.account_id".into(), format!("`{a}` is not a 12-digit AWS account id")));
        }
        if !(2..=100).contains(&sv.missed_heartbeats) {
            return Err(invalid("server.missed_heartbeats".into(), "must be between 2 and 100".into()));
        }
        if !(16..=1 << 20).contains(&sv.listen_backlog) {
            return Err(invalid("server.listen_backlog".into(), "must be between 16 and 1048576".into()));
        }
        if b.poll_max < b.poll_initial {
            return Err(invalid("backup.poll_max".into(), "must be at least poll_initial".into()));
        }
        self.default_policy().map_err(|(k, m)| invalid(format!("policy.{k}"), m))?;
        let h = &self.health;
        if h.interval < Duration::from_millis(100) || h.interval > s(3600) {
            return Err(invalid("health.interval".into(), "must be between 100ms and 1h".into()));
        }
        if !(0.0..=1.0).contains(&h.max_down_fraction) {
            return Err(invalid("health.max_down_fraction".into(), format!("{} is not a fraction between 0 and 1", h.max_down_fraction)));
        }
        if !(1..=1000).contains(&h.max_concurrent_failovers) {
            return Err(invalid("health.max_concurrent_failovers".into(), "must be between 1 and 1000".into()));
        }
        if !(1..=1000).contains(&h.max_concurrent_repairs) {
            return Err(invalid("health.max_concurrent_repairs".into(), "must be between 1 and 1000".into()));
        }
        if !(1..=1024).contains(&h.probe_concurrency) {
            return Err(invalid("health.probe_concurrency".into(), "must be between 1 and 1024".into()));
        }
        if h.fence_interval < Duration::from_millis(100) || h.fence_interval > s(600) {
            return Err(invalid("health.fence_interval".into(), "must be between 100ms and 10m".into()));
        }
        for (i, n) in self.notify.iter().enumerate() {
            let key = |f: &str| format!("notify[{i}].{f}");
            if !(n.url.starts_with("https://") || n.url.starts_with("http://")) || n.url.parse::<hyper::Uri>().is_err() {
                return Err(invalid(key("url"), format!("`{}` is not an http:// or https:// URL", n.url)));
            }
            if let Some(bad) = n.events.iter().find(|e| {
                let e = e.as_str();
                e != "*"
                    && EventKind::parse(e).is_none()
                    && !e.strip_suffix('*').is_some_and(|p| EventKind::ALL.iter().any(|k| k.as_str().starts_with(p)))
            }) {
                return Err(invalid(
                    key("events"),
                    format!("`{bad}` names no event (known: {})", EventKind::ALL.map(EventKind::as_str).join(", ")),
                ));
            }
            n.secret().map_err(|m| invalid(key("secret"), m))?;
        }
        let mut seen = HashSet::new();
        for (i, site) in self.sites.iter().enumerate() {
            let key = |field: &str| format!("site[{i}].{field}");
            validate_name(&site.id).map_err(|m| invalid(key("id"), format!("`{}`: {m}", site.id)))?;
            if !seen.insert(site.id.as_str()) {
                return Err(invalid(key("id"), format!("site `{}` is defined twice", site.id)));
            }
            if !is_instance_id(&site.instance_id) {
                return Err(invalid(key("instance_id"), format!("`{}` is not an EC2 instance id", site.instance_id)));
            }
            if site.region.is_none() && self.aws.region.is_none() {
                return Err(invalid(key("region"), "no region for this site and no [aws] region".into()));
            }
            let policy = self.site_policy(site).map_err(|(k, m)| invalid(format!("site[{i}].policy.{k}"), m))?;
            let home = self.site_region(site);
            if policy.spare != crate::domain::policy::SpareMode::Off
                && !policy.spare_region.is_empty()
                && policy.spare_region != home
                && !policy.copy_regions.contains(&policy.spare_region)
            {
                return Err(invalid(
                    key("policy.spare_region"),
                    format!(
                        "site `{}`: the spare is launched from a copy in {r}, but copy_regions does not copy backups there: add \"{r}\" to copy_regions",
                        site.id,
                        r = policy.spare_region
                    ),
                ));
            }
            if policy.drill_schedule.is_some() {
                let region = self.site_region(site);
                site.drill
                    .launch_over(&site.launch, &region, &region)
                    .map_err(|e| invalid(key("policy.drill_schedule"), format!("site `{}`: {e}", site.id)))?;
            }
            site.launch.check().map_err(|(k, m)| invalid(key(&format!("launch.{k}")), m))?;
            if site.keep_private_ip && site.fence != crate::domain::recovery::Fence::Terminate {
                return Err(invalid(
                    key("keep_private_ip"),
                    "needs fence = \"terminate\": a stopped instance still holds its private IP".into(),
                ));
            }
            site.drill.launch.check().map_err(|(k, m)| invalid(key(&format!("drill.{k}")), m.replace("[site.launch", "[site.drill")))?;
            for (k, h) in [("hostname", &site.hostname), ("drill.hostname", &site.drill.hostname)] {
                if let Some(h) = h
                    && (h.is_empty()
                        || h.len() > 253
                        || !h
                            .split('.')
                            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')))
                {
                    return Err(invalid(key(k), format!("`{h}` is not a DNS hostname")));
                }
            }
            if site.drill.hostname.is_some() && site.drill.hostname == site.hostname {
                return Err(invalid(
                    key("drill.hostname"),
                    "is the site's own hostname: a drill copy must not answer as production".into(),
                ));
            }
            if let Some(d) = &site.dns
                && (d.zone_id.is_empty() || d.name.is_empty() || !(1..=604_800).contains(&d.ttl))
            {
                return Err(invalid(key("dns"), "needs zone_id, name and a ttl between 1 and 604800 seconds".into()));
            }
            for (k, v, max) in [
                ("jitter", site.policy.jitter, Duration::from_secs(7 * 24 * 3600)),
                ("keep_for", site.policy.keep_for, Duration::from_secs(100 * 365 * 24 * 3600)),
            ] {
                if v.is_some_and(|v| v > max) {
                    return Err(invalid(key(&format!("policy.{k}")), format!("must be at most {}", humantime::format_duration(max))));
                }
            }
        }
        Ok(())
    }

    /// The fleet's default policy.
    pub fn default_policy(&self) -> Result<Policy, (String, String)> {
        self.policy.apply(&Policy::default())
    }

    /// A site's effective policy: fleet defaults, then the site's overrides.
    pub fn site_policy(&self, site: &SiteConfig) -> Result<Policy, (String, String)> {
        site.policy.apply(&self.default_policy()?)
    }

    /// The region a site's instance lives in.
    pub fn site_region(&self, site: &SiteConfig) -> String {
        site.region.clone().or_else(|| self.aws.region.clone()).unwrap_or_default()
    }
}

/// `i-` followed by 8 or 17 hex digits (moto and AWS both use 17 today).
pub fn is_instance_id(s: &str) -> bool {
    dr_proto::identity::validate_instance_id(s).is_ok()
}

/// Token-bucket sizes (`[aws.limits]`); defaults follow EC2's documented ones.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub mutating_per_sec: u32,
    pub mutating_burst: u32,
    pub copy_per_sec: u32,
    pub copy_burst: u32,
    pub describe_per_sec: u32,
    pub describe_burst: u32,
    pub run_instances_per_sec: u32,
    pub run_instances_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mutating_per_sec: 5,
            mutating_burst: 50,
            copy_per_sec: 1,
            copy_burst: 5,
            describe_per_sec: 20,
            describe_burst: 100,
            run_instances_per_sec: 2,
            run_instances_burst: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:7443"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "c.key"
trust_domain = "dr.example.com"
[store]
path = "state.db"
[aws]
region = "us-east-1"
[[site]]
id = "prod-1"
instance_id = "i-0123456789abcdef0"
"#;

    #[test]
    fn a_misspelt_launch_or_drill_key_is_named() {
        let cases = [
            ("[site.drill]\nhostname = \"d.example.com\"\nsubnet = \"subnet-1\"\n", "unknown key `subnet`"),
            ("[site.launch]\ninstance_typ = \"m5.xlarge\"\n", "unknown key `instance_typ`"),
            ("[site.launch.us-west-2]\nsubnet = \"subnet-1\"\n", "in the `us-west-2` table: unknown field `subnet`"),
            ("[site.launch.uswest2]\nsubnet_id = \"subnet-1\"\n", "site[0].launch.uswest2"),
        ];
        for (extra, want) in cases {
            let e = Config::parse(Path::new("c.toml"), &format!("{GOOD}{extra}")).expect_err(extra).to_string();
            assert!(e.contains(want) && e.contains("c.toml"), "{extra}: {e}");
        }
        let c = Config::parse(
            Path::new("c.toml"),
            &format!("{GOOD}[site.launch]\nsubnet_id = \"subnet-1\"\n[site.launch.us-west-2]\nsubnet_id = \"subnet-2\"\n"),
        )
        .expect("valid");
        assert_eq!(c.sites[0].launch.for_region("us-west-2", "us-east-1").subnet_id.as_deref(), Some("subnet-2"));
        assert_eq!(c.sites[0].launch.for_region("us-east-1", "us-east-1").subnet_id.as_deref(), Some("subnet-1"));
    }

    /// Each `(extra, want)`: GOOD plus `extra` is refused with an error
    /// containing `want`.
    fn assert_refused(cases: &[(&str, &str)]) {
        for (extra, want) in cases {
            let e = Config::parse(Path::new("c.toml"), &format!("{GOOD}{extra}")).expect_err(extra).to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn spare_keys_are_checked_and_name_what_is_wrong() {
        let cases = [
            ("[site.policy]\nspare = \"warm\"\n", "unknown variant `warm`, expected one of `off`, `stopped`, `running`"),
            ("[site.policy]\nspare = \"stopped\"\nspare_region = \"mars-1\"\n", "`mars-1` is not an AWS region"),
            ("[site.policy]\nspare = \"stopped\"\nspare_region = \"us-west-2\"\n", "add \"us-west-2\" to copy_regions"),
            ("[site.policy]\nspare_max_lag = \"400d\"\n", "spare_max_lag"),
            ("[site.policy]\nfailover_prefers = \"fastest\"\n", "failover_prefers"),
        ];
        assert_refused(&cases);
        let ok = "[site.policy]\nspare = \"running\"\nspare_region = \"us-west-2\"\ncopy_regions = [\"us-west-2\"]\nspare_max_lag = \"12h\"\nfailover_prefers = \"freshest\"\n";
        let c = Config::parse(Path::new("c.toml"), &format!("{GOOD}{ok}")).expect("valid");
        let p = c.site_policy(&c.sites[0]).expect("policy");
        assert_eq!(
            (p.spare, p.spare_region.as_str(), p.spare_max_lag),
            (crate::domain::policy::SpareMode::Running, "us-west-2", Duration::from_secs(12 * 3600))
        );
        assert_eq!(p.failover_prefers, crate::domain::policy::FailoverPrefers::Freshest);
    }

    #[test]
    fn health_and_notify_keys_are_checked_and_name_what_is_wrong() {
        let cases = [
            ("[site.policy]\nauto_failover = \"yes\"\n", "unknown variant `yes`, expected one of `off`, `approve`, `auto`"),
            (
                "[site.policy]\nhealth_url = \"ftp://ci/health\"\n",
                "site[0].policy.health_url: `ftp://ci/health` is not an http:// or https:// URL",
            ),
            ("[site.policy]\nhealth_expect_status = 42\n", "health_expect_status: 42 is not an HTTP status"),
            (
                "[site.policy]\nconfirm_for = \"40days\"\n",
                "site[0].policy.confirm_for: 1month 9days 13h 26m 24s is out of range: must be between 0s and 1day",
            ),
            ("[site.policy]\nhealth_timeout = \"0s\"\n", "health_timeout"),
            ("[health]\nmax_down_fraction = 2.0\n", "health.max_down_fraction: 2 is not a fraction"),
            ("[health]\nmax_concurrent_failovers = 0\n", "health.max_concurrent_failovers"),
            ("[health]\nfence_interval = \"1h\"\n", "health.fence_interval: must be between 100ms and 10m"),
            ("[health]\nintervall = \"1s\"\n", "unknown field `intervall`"),
            ("[[notify]]\nurl = \"mailto:ops@example.com\"\n", "notify[0].url"),
            (
                "[[notify]]\nurl = \"https://hooks.example.com/x\"\nevents = [\"site.dwon\"]\n",
                "notify[0].events: `site.dwon` names no event",
            ),
            (
                "[[notify]]\nurl = \"https://hooks.example.com/x\"\nsecret = \"a\"\nsecret_file = \"/b\"\n",
                "notify[0].secret: give secret or secret_file, not both",
            ),
            (
                "[[notify]]\nurl = \"https://hooks.example.com/x\"\nsecret_file = \"/nonexistent/dr-secret\"\n",
                "cannot read /nonexistent/dr-secret",
            ),
        ];
        assert_refused(&cases);
        let ok = "[[notify]]\nurl = \"https://hooks.example.com/x\"\nevents = [\"failover.*\", \"site.down\"]\nformat = \"slack\"\n[site.policy]\nauto_failover = \"approve\"\nconfirm_for = \"5m\"\n";
        let c = Config::parse(Path::new("c.toml"), &format!("{GOOD}{ok}")).expect("valid");
        let p = c.site_policy(&c.sites[0]).expect("policy");
        assert_eq!((p.health.mode, p.health.confirm_for), (crate::domain::health::AutoMode::Approve, Duration::from_secs(300)));
        let n = &c.notify[0];
        assert!(n.wants("failover.started") && n.wants("site.down") && !n.wants("site.suspect"));
        assert_eq!(n.format, NotifyFormat::Slack);
    }

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        let c = Config::parse(Path::new("c.toml"), GOOD).expect("valid config");
        assert_eq!(c.server.heartbeat_interval, Duration::from_secs(6));
        assert_eq!(c.sites.len(), 1);
        assert_eq!(c.site_region(&c.sites[0]), "us-east-1");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../deploy/controller.example.toml");
        let c = Config::parse(Path::new("deploy/controller.example.toml"), text).expect("example parses");
        assert_eq!(c.sites.len(), 2);
        assert_eq!(c.sites[1].role_arn.as_deref(), Some("arn:aws:iam::111122223333:role/dr-controller-site"));
    }

    #[test]
    fn the_example_shows_the_code_defaults() {
        let text = include_str!("../../deploy/controller.example.toml");
        let c = Config::parse(Path::new("deploy/controller.example.toml"), text).expect("example parses");
        let d = Config::parse(Path::new("c.toml"), GOOD).expect("minimal");
        assert_eq!(format!("{:?}", c.backup), format!("{:?}", d.backup), "[backup] in the example differs from the defaults");
        let (mut cs, ds) = (c.server.clone(), d.server.clone());
        cs.listen = ds.listen;
        assert_eq!(format!("{cs:?}"), format!("{ds:?}"), "[server] in the example differs from the defaults");
        assert_eq!(c.default_policy().expect("policy"), Policy::default(), "[policy] in the example differs from the defaults");
        assert_eq!(format!("{:?}", c.aws.limits), format!("{:?}", d.aws.limits), "[aws.limits] differs from the defaults");
        assert_eq!(format!("{:?}", c.failover), format!("{:?}", d.failover), "[failover] differs from the defaults");
        assert_eq!(format!("{:?}", c.drill), format!("{:?}", d.drill), "[drill] differs from the defaults");
        assert_eq!(format!("{:?}", c.health), format!("{:?}", d.health), "[health] differs from the defaults");
        assert_eq!(c.sites[0].drill.hostname.as_deref(), Some("drill.circleci.example.com"));
        assert_eq!(c.sites[0].drill.launch.regions["us-west-2"].subnet_id.as_deref(), Some("subnet-0eeeeffff22223333"));
        assert_eq!(c.sites[0].launch.regions["us-west-2"].subnet_id.as_deref(), Some("subnet-0aaaabbbbccccdddd"));
        assert_eq!(c.sites[0].dns.as_ref().map(|d| d.ttl), Some(60));
    }

    #[test]
    fn recovery_settings_are_checked_naming_the_key() {
        for (extra, key) in [
            ("keep_private_ip = true\n", "site[0].keep_private_ip"),
            ("hostname = \"not a host\"\n", "site[0].hostname"),
            ("[site.launch.westus]\nsubnet_id = \"s\"\n", "site[0].launch.westus"),
            ("[site.drill]\nhostnme = \"d.example.com\"\n", "[site.drill]"),
            ("[site.drill]\nhostname = \"not a host\"\n", "site[0].drill.hostname"),
            ("[site.dns]\nzone_id = \"Z1\"\nname = \"a.b\"\nttl = 0\n", "site[0].dns"),
        ] {
            let text = format!("{GOOD}{extra}");
            let err = Config::parse(Path::new("c.toml"), &text).expect_err(extra).to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let ok = format!("{GOOD}fence = \"terminate\"\nkeep_private_ip = true\nhostname = \"ci.example.com\"\n");
        let c = Config::parse(Path::new("c.toml"), &ok).expect("valid");
        assert_eq!(c.sites[0].recovery(String::new()).fence, crate::domain::recovery::Fence::Terminate);
    }

    #[test]
    fn durations_out_of_range_are_refused_naming_the_key() {
        for (key, line) in [
            ("server.heartbeat_interval", "[server]\nheartbeat_interval = \"0s\""),
            ("backup.poll_initial", "[backup]\npoll_initial = \"0s\""),
            ("backup.timeout", "[backup]\ntimeout = \"20000years\""),
            ("policy.jitter", "[policy]\njitter = \"100years\""),
        ] {
            let (section, assignment) = line.split_once('\n').expect("two lines");
            let text = if GOOD.contains(section) { GOOD.replacen(section, line, 1) } else { format!("{GOOD}\n{section}\n{assignment}\n") };
            let err = Config::parse(Path::new("c.toml"), &text).expect_err(key).to_string();
            assert!(err.contains(key) && err.contains("out of range"), "{key}: {err}");
        }
        let bad = GOOD.replace(
            "instance_id = \"i-0123456789abcdef0\"",
            "instance_id = \"i-0123456789abcdef0\"\n[site.policy]\njitter = \"999years\"",
        );
        let err = Config::parse(Path::new("c.toml"), &bad).expect_err("site jitter").to_string();
        assert!(err.contains("site[0].policy.jitter"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Untrusted text never panics the parser, and a refusal names the file.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            if let Err(e) = Config::parse(Path::new("fuzz.toml"), &text) {
                proptest::prop_assert!(e.to_string().contains("fuzz.toml"), "{}", e);
            }
        }

        /// Any value in any known key of a valid config: a valid config or
        /// an error naming the file; never a panic (durations, counts,
        /// schedules, regions).
        #[test]
        fn arbitrary_values_in_known_keys_never_panic(
            key in proptest::sample::select(vec![
                "heartbeat_interval", "missed_heartbeats", "handshake_timeout", "listen_backlog", "liveness_flush",
            ]),
            policy_key in proptest::sample::select(vec!["schedule", "jitter", "keep_last", "keep_for", "copy_keep_last", "timezone"]),
            value in proptest::prop_oneof![
                "[0-9]{1,25}",
                "\"[0-9]{0,20}(ns|ms|s|m|h|d|days|years|y)?\"",
                "\"cron:[0-9* /,-]{0,30}\"",
                "\"\\PC{0,20}\"",
            ],
        ) {
            let text = GOOD.replacen("[server]\n", &format!("[server]\n{key} = {value}\n"), 1)
                + &format!("\n[policy]\n{policy_key} = {value}\n");
            if let Err(e) = Config::parse(Path::new("fuzz.toml"), &text) {
                proptest::prop_assert!(e.to_string().contains("fuzz.toml"), "{}", e);
            }
        }
    }

    #[test]
    fn errors_name_the_key() {
        let bad = GOOD.replace("prod-1", "Prod 1");
        let err = Config::parse(Path::new("c.toml"), &bad).expect_err("bad site id").to_string();
        assert!(err.contains("c.toml") && err.contains("site[0].id"), "{err}");
        let bad = GOOD.replace("i-0123456789abcdef0", "i-xyz");
        let err = Config::parse(Path::new("c.toml"), &bad).expect_err("bad instance").to_string();
        assert!(err.contains("site[0].instance_id"), "{err}");
        let bad = GOOD.replace("[store]", "[store]\nbogus = 1");
        let err = Config::parse(Path::new("c.toml"), &bad).expect_err("unknown key").to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}

/// Every key the code accepts appears in `deploy/controller.example.toml`
/// (set, or commented out with its default). The accepted keys are asked
/// of the deserializer itself (`dr_proto::example_keys`), not listed here.
#[cfg(test)]
mod example_keys {
    use dr_proto::example_keys::{Probe, missing_keys, serde_keys};

    use super::Config;

    /// serde's unknown-field error, or the launch tables' own list
    /// (`domain::recovery::LaunchConfig` names its keys itself).
    fn named_keys(error: &str) -> Option<Vec<String>> {
        let launch = format!("unknown key `{}`: the launch settings are ", dr_proto::example_keys::PROBE);
        match error.split(&launch).nth(1) {
            Some(rest) => Some(rest.split(", and per").next()?.split(", ").map(str::to_owned).collect()),
            None => serde_keys(error),
        }
    }

    /// Where the example documents `path`: `[site.policy]` takes the keys of
    /// `[policy]`, `[site.drill]` those of `[site.launch]`, and a region
    /// table (`.us-west-2`) those of its parent.
    fn documented_as(path: &str) -> String {
        let p = path.replacen("site.policy.", "policy.", 1).replacen("site.drill.", "site.launch.", 1);
        p.split('.').filter(|seg| !crate::domain::recovery::is_region(seg)).collect::<Vec<_>>().join(".")
    }

    #[test]
    fn every_accepted_key_is_in_the_example_file() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.example.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let probe = Probe { parse: &|v| v.try_into::<Config>().map(drop).map_err(|e| e.to_string()), named_keys: &named_keys };
        let (accepted, missing) = missing_keys(&text, &probe, &documented_as);
        for must in ["server.listen", "site.launch.subnet_id", "notify.url", "health.max_down_fraction"] {
            assert!(accepted.contains(must), "the probe finds `{must}`: {accepted:?}");
        }
        assert!(missing.is_empty(), "keys the controller accepts that deploy/controller.example.toml does not show: {missing:?}");
    }

    #[test]
    fn the_probe_reads_the_launch_tables_errors() {
        let e = "unknown key `zz_probe_key`: the launch settings are x, y_z, and per other region a table such as `.us-west-2`";
        assert_eq!(named_keys(e), Some(vec!["x".to_owned(), "y_z".to_owned()]));
        assert_eq!(documented_as("site.drill.us-west-2.key_name"), "site.launch.key_name");
        assert_eq!(documented_as("site.policy.cooldown"), "policy.cooldown");
    }
}
