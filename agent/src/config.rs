//! The agent's configuration file (TOML) and the settings derived from it.
//!
//! Every key is optional in the file; `run` additionally requires `site_id`
//! and `controller_url`. Errors name the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the agent's configuration lives when installed by the packages.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dr-agent/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {location}key `{key}`: {message}")]
    Parse { path: PathBuf, location: String, key: String, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid { origin: String, key: &'static str, message: String },
}

/// The whole configuration, with defaults filled in.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Required for `run`; must match the site id in the agent's certificate.
    pub site_id: Option<String>,
    /// Required for `run`: `https://host:port` of the controller.
    pub controller_url: Option<String>,
    /// TLS name the controller's certificate must carry; default: the host of
    /// `controller_url`.
    pub controller_name: Option<String>,
    /// The other replicas of a controller that runs on PostgreSQL with a
    /// leader (`https://host:port` each, TLS name: its host). The agent
    /// goes where a standby says the leader is, and otherwise tries these
    /// in turn after `controller_url`.
    pub controller_urls: Vec<String>,
    /// The journal lives in `state_dir/journal`.
    pub state_dir: PathBuf,
    /// Root of the machine's filesystem (a mounted copy in tests).
    pub root: PathBuf,
    pub tls: TlsSection,
    pub imds: ImdsSection,
    pub replicated: ReplicatedSection,
    pub reconnect: ReconnectSection,
    pub nomad: NomadSection,
    pub freeze: FreezeSection,
    pub circleci: CircleciSection,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The root(s) that verify the controller, until the controller sends
    /// its trust bundle (kept in `state_dir/credentials/trust.pem`).
    pub ca: PathBuf,
    /// The site-wide certificate and key (on every copy of the site's
    /// disk): they only let the agent enrol its instance. The instance's
    /// own certificate and key live in `state_dir/credentials/`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A one-time enrolment token (`drctl allow-enrol SITE INSTANCE --token`), for a machine
    /// without the EC2 instance identity document.
    pub enrol_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImdsSection {
    pub endpoint: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicatedSection {
    pub replicatedctl: PathBuf,
    /// Timeout of one replicatedctl call.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long `app stop` / `app start` may take to reach their state
    /// (CircleCI's own script waits 10 minutes).
    #[serde(with = "humantime_serde")]
    pub app_timeout: Duration,
    /// How often the app's state is polled while waiting.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Name of the app-config item that holds the installation's hostname.
    pub hostname_item: String,
}

/// Nomad: the server's data dir on this machine and the HTTP API used to
/// drain builder nodes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NomadSection {
    /// The Nomad server's data_dir, as a path on the machine (joined to `root`).
    pub data_dir: PathBuf,
    /// Nomad's HTTP API (the `nomad` container's port 4646).
    pub api_url: String,
    /// How long a drain may wait for running allocations to end.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Timeout of one HTTP call to Nomad.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `wipe-nomad` never deletes through a mount point below the data dir;
    /// it refuses, naming them, unless this is true: then it unmounts them
    /// (deepest first, not lazily) before wiping.
    pub unmount_below: bool,
}

/// File-system freezes around CreateImage.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FreezeSection {
    /// Mount points of the data file systems to freeze (e.g. "/data").
    pub mounts: Vec<PathBuf>,
    /// A freeze is lifted at this deadline whatever happens (the watchdog).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Allow freezing "/" (dangerous: the agent and sshd live there).
    pub allow_root: bool,
    /// Allow freezing the file system that holds the agent's journal.
    pub allow_journal_fs: bool,
}

/// The CircleCI installation's own API v1.1 and its admin REPL, for cleaning
/// up builds a backup caught half-way.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircleciSection {
    /// Base URL of the installation's API (API v1.1 lives under /api/v1.1).
    pub api_url: String,
    /// File holding an admin API token (first line). Never put the token in this file.
    pub api_token_file: PathBuf,
    /// The installation's hostname: build URLs must be https://<hostname>/gh|bb/<org>/<repo>/<n>.
    /// Default: the Replicated app-config item `replicated.hostname_item`.
    pub hostname: Option<String>,
    /// The command that opens the admin REPL (argv), fed on stdin.
    pub dev_console: Vec<String>,
    /// Longest the REPL may take to print its first prompt.
    #[serde(with = "humantime_serde")]
    pub console_load_timeout: Duration,
    /// Longest one `(admin/delete-build ...)` may take to answer.
    #[serde(with = "humantime_serde")]
    pub console_command_timeout: Duration,
    /// Timeout of one HTTP call to the API.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The frontend's health check, asked from this machine after a
    /// restore's app start (a 2xx is healthy).
    pub health_url: String,
}

impl Default for NomadSection {
    fn default() -> Self {
        NomadSection {
            data_dir: PathBuf::from("/opt/nomad"),
            api_url: "http://127.0.0.1:4646".to_owned(),
            drain_deadline: Duration::from_secs(600),
            request_timeout: Duration::from_secs(10),
            unmount_below: false,
        }
    }
}

impl Default for FreezeSection {
    fn default() -> Self {
        FreezeSection { mounts: Vec::new(), deadline: Duration::from_secs(60), allow_root: false, allow_journal_fs: false }
    }
}

impl Default for CircleciSection {
    fn default() -> Self {
        CircleciSection {
            api_url: "http://127.0.0.1:80".to_owned(),
            api_token_file: PathBuf::from("/etc/dr-agent/circleci-token"),
            hostname: None,
            dev_console: ["replicated", "admin", "--no-tty", "dev-console"].map(String::from).to_vec(),
            console_load_timeout: Duration::from_secs(300),
            console_command_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            health_url: "http://127.0.0.1/health-check".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectSection {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            site_id: None,
            controller_url: None,
            controller_name: None,
            controller_urls: Vec::new(),
            state_dir: PathBuf::from("/var/lib/dr-agent"),
            root: PathBuf::from("/"),
            tls: TlsSection::default(),
            imds: ImdsSection::default(),
            replicated: ReplicatedSection::default(),
            reconnect: ReconnectSection::default(),
            nomad: NomadSection::default(),
            freeze: FreezeSection::default(),
            circleci: CircleciSection::default(),
        }
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            ca: PathBuf::from("/etc/dr-agent/ca.pem"),
            cert: PathBuf::from("/etc/dr-agent/agent.pem"),
            key: PathBuf::from("/etc/dr-agent/agent.key"),
            enrol_token_file: None,
        }
    }
}

impl Default for ImdsSection {
    fn default() -> Self {
        ImdsSection { endpoint: "http://169.254.169.254".to_owned(), timeout: Duration::from_secs(2) }
    }
}

impl Default for ReplicatedSection {
    fn default() -> Self {
        ReplicatedSection {
            replicatedctl: PathBuf::from("/usr/local/bin/replicatedctl"),
            command_timeout: Duration::from_secs(60),
            app_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_secs(5),
            hostname_item: "hostname".to_owned(),
        }
    }
}

impl Default for ReconnectSection {
    fn default() -> Self {
        ReconnectSection { initial: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

/// What `run` needs beyond the optional keys, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    pub site_id: String,
    /// `controller_url` first, then `controller_urls`.
    pub controllers: Vec<ControllerTarget>,
}

/// One controller replica: where it is and the TLS name it must prove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerTarget {
    pub url: String,
    pub name: String,
}

impl ControllerTarget {
    /// A replica named by its `https://` URL (its TLS name is its host).
    pub fn from_url(url: &str) -> Result<Self, String> {
        Ok(ControllerTarget { url: url.to_owned(), name: controller_host(url)? })
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// `load` if a path is given, the defaults otherwise.
    pub fn load_optional(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None => Ok(Config::default()),
        }
    }

    /// Parses TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parse_err = |err: toml::de::Error, key: String| ConfigError::Parse {
            path: path.to_owned(),
            location: err
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default(),
            key,
            message: err.message().trim().to_owned(),
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| parse_err(e, "(syntax)".to_owned()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            parse_err(e.into_inner(), key)
        })?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Checks the values that have a shape. `origin` names the file (or
    /// "command line") in errors.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid { origin: origin.to_owned(), key, message };
        if let Some(site) = &self.site_id {
            dr_proto::identity::validate_name(site).map_err(|m| invalid("site_id", m.to_owned()))?;
        }
        if let Some(url) = &self.controller_url {
            controller_host(url).map_err(|m| invalid("controller_url", m))?;
        }
        for url in &self.controller_urls {
            controller_host(url).map_err(|m| invalid("controller_urls", m))?;
        }
        if let Some(name) = &self.controller_name
            && (name.is_empty() || name.contains(|c: char| c == '/' || c.is_whitespace()))
        {
            return Err(invalid("controller_name", format!("`{name}` is not a DNS name or IP address")));
        }
        if !self.imds.endpoint.starts_with("http://") {
            return Err(invalid("imds.endpoint", format!("`{}` must be an http:// URL (IMDS is plain HTTP)", self.imds.endpoint)));
        }
        for (key, d) in [
            ("imds.timeout", self.imds.timeout),
            ("replicated.command_timeout", self.replicated.command_timeout),
            ("replicated.app_timeout", self.replicated.app_timeout),
            ("replicated.poll_interval", self.replicated.poll_interval),
            ("nomad.drain_deadline", self.nomad.drain_deadline),
            ("nomad.request_timeout", self.nomad.request_timeout),
            ("freeze.deadline", self.freeze.deadline),
            ("circleci.console_load_timeout", self.circleci.console_load_timeout),
            ("circleci.console_command_timeout", self.circleci.console_command_timeout),
            ("circleci.request_timeout", self.circleci.request_timeout),
            ("reconnect.initial", self.reconnect.initial),
            ("reconnect.max", self.reconnect.max),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero".to_owned()));
            }
        }
        if !self.circleci.health_url.starts_with("http://") {
            return Err(invalid("circleci.health_url", format!("`{}` must be an http:// URL on this machine", self.circleci.health_url)));
        }
        for (key, url) in [("nomad.api_url", &self.nomad.api_url), ("circleci.api_url", &self.circleci.api_url)] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(key, format!("`{url}` must be an http:// or https:// URL")));
            }
        }
        if !self.nomad.data_dir.is_absolute() {
            return Err(invalid("nomad.data_dir", "must be an absolute path on the machine".to_owned()));
        }
        if let Some(m) = self.freeze.mounts.iter().find(|m| !m.is_absolute()) {
            return Err(invalid("freeze.mounts", format!("`{}` is not an absolute path", m.display())));
        }
        if self.circleci.dev_console.is_empty() {
            return Err(invalid("circleci.dev_console", "must name a command".to_owned()));
        }
        if self.reconnect.max < self.reconnect.initial {
            return Err(invalid("reconnect.max", "must not be smaller than reconnect.initial".to_owned()));
        }
        Ok(())
    }

    /// The settings `run` requires, or an error naming the missing key.
    pub fn run_settings(&self, origin: &str) -> Result<RunSettings, ConfigError> {
        let missing = |key| ConfigError::Invalid { origin: origin.to_owned(), key, message: "is required".to_owned() };
        self.validate(origin)?;
        let site_id = self.site_id.clone().ok_or_else(|| missing("site_id"))?;
        let controller_url = self.controller_url.clone().ok_or_else(|| missing("controller_url"))?;
        let controller_name = match &self.controller_name {
            Some(n) => n.clone(),
            None => controller_host(&controller_url).map_err(|message| ConfigError::Invalid {
                origin: origin.to_owned(),
                key: "controller_url",
                message,
            })?,
        };
        let mut controllers = vec![ControllerTarget { url: controller_url, name: controller_name }];
        for url in &self.controller_urls {
            let t = ControllerTarget::from_url(url).map_err(|message| ConfigError::Invalid {
                origin: origin.to_owned(),
                key: "controller_urls",
                message,
            })?;
            if !controllers.contains(&t) {
                controllers.push(t);
            }
        }
        Ok(RunSettings { site_id, controllers })
    }
}

/// The host of an `https://host[:port]` URL, without IPv6 brackets.
pub fn controller_host(url: &str) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("`{url}` must be an https:// URL"));
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("`{url}` has no host"))?;
    Ok(host.trim_start_matches('[').trim_end_matches(']').to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shipped_example_is_valid() {
        let path = std::path::Path::new("deploy/agent.example.toml");
        let c = super::Config::parse(include_str!("../../deploy/agent.example.toml"), path).expect("example parses");
        c.run_settings("deploy/agent.example.toml").expect("example has what `run` needs");
    }

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/dr-agent/agent.toml"))
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
site_id = "prod-eu-1"
controller_url = "https://controller.example.com:7443"
state_dir = "/var/lib/dr-agent"
root = "/"
[tls]
ca = "/etc/dr-agent/ca.pem"
cert = "/etc/dr-agent/agent.pem"
key = "/etc/dr-agent/agent.key"
[imds]
endpoint = "http://127.0.0.1:9999"
timeout = "2s"
[replicated]
replicatedctl = "/usr/local/bin/replicatedctl"
command_timeout = "60s"
[reconnect]
initial = "500ms"
max = "1m"
"#,
        )
        .expect("valid config");
        assert_eq!(c.reconnect.initial, Duration::from_millis(500));
        assert_eq!(c.reconnect.max, Duration::from_secs(60));
        let run = c.run_settings("f").expect("run settings");
        assert_eq!(run.controllers[0].name, "controller.example.com");
    }

    #[test]
    fn empty_file_gives_defaults_but_run_needs_site() {
        let c = parse("").expect("empty is fine");
        assert_eq!(c, Config::default());
        let err = c.run_settings("agent.toml").expect_err("site_id missing").to_string();
        assert!(err.contains("site_id"), "{err}");
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = parse("[imds]\ntimeout = \"soon\"\n").expect_err("bad duration").to_string();
        assert!(err.contains("/etc/dr-agent/agent.toml") && err.contains("imds.timeout"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = parse("[reconnect]\nmaximum = \"1s\"\n").expect_err("unknown key").to_string();
        assert!(err.contains("maximum"), "{err}");
        let err = parse("site_id = \"Prod\"\n").expect_err("bad site").to_string();
        assert!(err.contains("site_id"), "{err}");
        let err = parse("controller_url = \"http://x:1\"\n").expect_err("not https").to_string();
        assert!(err.contains("controller_url"), "{err}");
    }

    #[test]
    fn controller_host_strips_brackets() {
        assert_eq!(controller_host("https://[::1]:7443").as_deref(), Ok("::1"));
        assert_eq!(controller_host("https://127.0.0.1:7443").as_deref(), Ok("127.0.0.1"));
    }
}

/// Every key the agent accepts appears in `deploy/agent.example.toml` (set,
/// or commented out), asked of the deserializer (`dr_proto::example_keys`).
#[cfg(test)]
mod example_keys {
    use dr_proto::example_keys::{Probe, missing_keys, serde_keys};

    use super::Config;

    #[test]
    fn every_accepted_key_is_in_the_example_file() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let probe = Probe { parse: &|v| v.try_into::<Config>().map(drop).map_err(|e| e.to_string()), named_keys: &serde_keys };
        let (accepted, missing) = missing_keys(&text, &probe, &|k| k.to_owned());
        for must in ["site_id", "tls.ca", "nomad.data_dir", "reconnect.max"] {
            assert!(accepted.contains(must), "the probe finds `{must}`: {accepted:?}");
        }
        assert!(missing.is_empty(), "keys the agent accepts that deploy/agent.example.toml does not show: {missing:?}");
    }
}
