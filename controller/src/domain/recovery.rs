//! How a site is to be restored: its `[site]` recovery settings (fence mode,
//! hostname, launch overrides per region, DNS record), the fleet's
//! `[failover]` timeouts, and [`resolve_launch`], which merges the launch
//! facts recorded at backup time with the overrides. Pure: no EC2, no store.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::model::LaunchFacts;

/// How the old primary is kept from coming back as a second primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fence {
    /// StopInstances (forced when it does not stop in time). Its volumes
    /// stay attached; a human can start it again to look at it.
    #[default]
    Stop,
    /// Keep its volumes (DeleteOnTermination=false, tagged
    /// `dr:fenced-from`), then TerminateInstances: frees its private IP for
    /// the replacement (`keep_private_ip`).
    Terminate,
}

impl Fence {
    pub fn as_str(self) -> &'static str {
        match self {
            Fence::Stop => "stop",
            Fence::Terminate => "terminate",
        }
    }
}

/// Settings of a launch that override the recorded launch facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchOverrides {
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub availability_zone: Option<String>,
    pub security_group_ids: Option<Vec<String>>,
    /// ARN of an IAM instance profile; `""` for none.
    pub iam_instance_profile: Option<String>,
    pub key_name: Option<String>,
}

/// `[site.launch]`: overrides for the site's own region, and one table per
/// other region (`[site.launch.us-west-2]`), whose subnet and security
/// groups necessarily differ.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LaunchConfig {
    #[serde(flatten)]
    pub home: LaunchOverridesHome,
    #[serde(flatten)]
    pub regions: BTreeMap<String, LaunchOverrides>,
}

const LAUNCH_KEYS: &str = "instance_type, subnet_id, availability_zone, security_group_ids, iam_instance_profile, key_name";

/// By hand, so that a misspelt key is named as such ("unknown key
/// `subnet`") instead of serde's "expected struct LaunchOverrides" for the
/// flattened region tables.
impl<'de> Deserialize<'de> for LaunchConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let mut home = serde_json::Map::new();
        let mut regions = BTreeMap::new();
        for (key, value) in raw {
            if LAUNCH_KEYS.split(", ").any(|k| k == key) {
                home.insert(key, value);
            } else if !value.is_object() {
                return Err(D::Error::custom(format!(
                    "unknown key `{key}`: the launch settings are {LAUNCH_KEYS}, and per other region a table such as `.us-west-2`"
                )));
            } else {
                // Its name is checked by `check`, which can name the key.
                let o: LaunchOverrides =
                    serde_json::from_value(value).map_err(|e| D::Error::custom(format!("in the `{key}` table: {e}")))?;
                regions.insert(key, o);
            }
        }
        let home = serde_json::from_value(serde_json::Value::Object(home)).map_err(D::Error::custom)?;
        Ok(LaunchConfig { home, regions })
    }
}

/// The home-region fields of `[site.launch]` (flattened beside the region
/// tables, so unknown keys are caught by [`LaunchConfig::check`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchOverridesHome {
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub availability_zone: Option<String>,
    pub security_group_ids: Option<Vec<String>>,
    pub iam_instance_profile: Option<String>,
    pub key_name: Option<String>,
}

impl LaunchConfig {
    /// The overrides that apply in `region` (`home`: the site's region).
    pub fn for_region(&self, region: &str, home: &str) -> LaunchOverrides {
        if region == home {
            let h = &self.home;
            LaunchOverrides {
                instance_type: h.instance_type.clone(),
                subnet_id: h.subnet_id.clone(),
                availability_zone: h.availability_zone.clone(),
                security_group_ids: h.security_group_ids.clone(),
                iam_instance_profile: h.iam_instance_profile.clone(),
                key_name: h.key_name.clone(),
            }
        } else {
            self.regions.get(region).cloned().unwrap_or_default()
        }
    }

    /// Region table names must look like regions (a misspelt setting lands
    /// here too, since the tables are flattened).
    pub fn check(&self) -> Result<(), (String, String)> {
        for name in self.regions.keys() {
            if !is_region(name) {
                return Err((
                    name.clone(),
                    format!("is neither a launch setting ({LAUNCH_KEYS}) nor a region table such as [site.launch.us-west-2]"),
                ));
            }
        }
        Ok(())
    }
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, ...
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        && parts.last().is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// `[site.dns]`: a Route 53 A record that follows the primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    pub zone_id: String,
    /// The record's name, e.g. `circleci.example.com`.
    pub name: String,
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

fn default_ttl() -> u32 {
    60
}

/// A site's recovery settings, as the workflows use them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteRecovery {
    /// The site's home region (its `region` in the config): where
    /// `drctl failback` returns it after a failover into a DR region.
    pub home_region: String,
    pub fence: Fence,
    pub keep_private_ip: bool,
    /// The CircleCI hostname to set on the restored machine ("" = keep).
    pub hostname: String,
    pub launch: LaunchConfig,
    pub dns: Option<DnsRecord>,
    pub drill: DrillSettings,
}

/// `[site.drill]`: where a drill copy runs, isolated from production: its
/// own subnet and security groups (per region: `[site.drill.us-west-2]`),
/// and the hostname the copy takes. Other launch settings fall back to
/// `[site.launch]` and then to the backup's recorded facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillSettings {
    pub hostname: Option<String>,
    #[serde(flatten)]
    pub launch: LaunchConfig,
}

impl DrillSettings {
    /// The site's launch settings with the drill's on top, so that
    /// [`resolve_launch`] gives the drill copy's spec. Refused when the
    /// drill's own subnet, security groups or hostname are missing for
    /// `region`: a drill never lands in production's network by default.
    pub fn launch_over(&self, site: &LaunchConfig, region: &str, home: &str) -> Result<LaunchConfig, SpecError> {
        let d = self.launch.for_region(region, home);
        let mut missing = vec![];
        if d.subnet_id.as_deref().is_none_or(str::is_empty) {
            missing.push("subnet_id");
        }
        if d.security_group_ids.as_ref().is_none_or(Vec::is_empty) {
            missing.push("security_group_ids");
        }
        if self.hostname.as_deref().is_none_or(str::is_empty) {
            missing.push("hostname");
        }
        if !missing.is_empty() {
            let table = if region == home { "[site.drill]".to_owned() } else { format!("[site.drill.{region}]") };
            return Err(SpecError::DrillNotIsolated { table, missing: missing.join(", ") });
        }
        let s = site.for_region(region, home);
        let merged = LaunchOverrides {
            instance_type: d.instance_type.or(s.instance_type),
            subnet_id: d.subnet_id,
            // The production subnet's AZ may not be the drill subnet's.
            availability_zone: d.availability_zone,
            security_group_ids: d.security_group_ids,
            iam_instance_profile: d.iam_instance_profile.or(s.iam_instance_profile),
            key_name: d.key_name.or(s.key_name),
        };
        let mut out = LaunchConfig::default();
        if region == home {
            out.home = LaunchOverridesHome {
                instance_type: merged.instance_type,
                subnet_id: merged.subnet_id,
                availability_zone: merged.availability_zone,
                security_group_ids: merged.security_group_ids,
                iam_instance_profile: merged.iam_instance_profile,
                key_name: merged.key_name,
            };
        } else {
            out.regions.insert(region.to_owned(), merged);
        }
        Ok(out)
    }
}

/// `[failover]`: how long each wait of a failover may take.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// The old primary must be stopped within this, else it is force-stopped
    /// (and given as long again).
    #[serde(with = "humantime_serde")]
    pub fence_timeout: Duration,
    /// From RunInstances to `running`.
    #[serde(with = "humantime_serde")]
    pub launch_timeout: Duration,
    /// From `running` to the candidate's agent connected and confirmed.
    #[serde(with = "humantime_serde")]
    pub agent_timeout: Duration,
    /// App stop or start (Replicated) on the candidate.
    #[serde(with = "humantime_serde")]
    pub app_timeout: Duration,
    /// Route 53 change to INSYNC.
    #[serde(with = "humantime_serde")]
    pub dns_timeout: Duration,
    /// Build cleanup on the candidate (one console session).
    #[serde(with = "humantime_serde")]
    pub cleanup_timeout: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(n * 60);
        FailoverConfig {
            fence_timeout: m(5),
            launch_timeout: m(10),
            agent_timeout: m(15),
            app_timeout: m(20),
            dns_timeout: m(5),
            cleanup_timeout: m(30),
        }
    }
}

/// `[drill]`: the fleet's drill settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrillConfig {
    /// A drill copy's `dr:keep-until` is its drill's start plus `--keep`
    /// plus this: time enough for the drill to finish, after which the
    /// reaper may terminate the copy if the drill has not.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often the drill reaper looks for expired drill copies.
    #[serde(with = "humantime_serde")]
    pub reap_every: Duration,
    /// The longest `--keep` accepted.
    #[serde(with = "humantime_serde")]
    pub max_keep: Duration,
}

impl Default for DrillConfig {
    fn default() -> Self {
        DrillConfig { lease: Duration::from_secs(2 * 3600), reap_every: Duration::from_secs(60), max_keep: Duration::from_secs(24 * 3600) }
    }
}

/// What RunInstances will be asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub region: String,
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub availability_zone: String,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: String,
    pub key_name: String,
    /// The private IP asked for ("" = a new one from the subnet).
    pub private_ip: String,
    /// Where each setting came from, by name: `backup` or `config`.
    pub sources: BTreeMap<String, String>,
}

/// Why no launch spec can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("no instance type: the backup has no launch facts and [site.launch] sets no instance_type")]
    NoInstanceType,
    #[error(
        "launching into region {region} needs [site.launch.{region}] with subnet_id and security_group_ids (the backup's are in {home})"
    )]
    NoRegionalNetwork { region: String, home: String },
    #[error(
        "a drill needs {table} with {missing}: its copy must run in its own subnet, behind its own security groups, under its own hostname"
    )]
    DrillNotIsolated { table: String, missing: String },
}

/// Merges the facts recorded at backup time with the site's overrides for
/// `region`. In another region than the facts' own, the recorded subnet,
/// AZ, security groups and private IP cannot apply: the region's table must
/// give them.
pub fn resolve_launch(
    facts: Option<&LaunchFacts>,
    rec: &SiteRecovery,
    home_region: &str,
    region: &str,
    image_id: &str,
    keep_private_ip: bool,
) -> Result<LaunchSpec, SpecError> {
    let o = rec.launch.for_region(region, home_region);
    let same_region = region == home_region;
    let empty = LaunchFacts::default();
    let f = facts.unwrap_or(&empty);
    let mut sources = BTreeMap::new();
    let mut pick = |name: &str, over: &Option<String>, recorded: &str, usable: bool| -> String {
        match over {
            Some(v) => {
                sources.insert(name.to_owned(), "config".to_owned());
                v.clone()
            }
            None if usable && !recorded.is_empty() => {
                sources.insert(name.to_owned(), "backup".to_owned());
                recorded.to_owned()
            }
            None => String::new(),
        }
    };
    let instance_type = pick("instance_type", &o.instance_type, &f.instance_type, true);
    let subnet_id = pick("subnet_id", &o.subnet_id, &f.subnet_id, same_region);
    let availability_zone = pick("availability_zone", &o.availability_zone, &f.availability_zone, same_region);
    let iam_instance_profile = pick("iam_instance_profile", &o.iam_instance_profile, &f.iam_instance_profile, true);
    let key_name = pick("key_name", &o.key_name, &f.key_name, same_region);
    let security_group_ids = match &o.security_group_ids {
        Some(v) => {
            sources.insert("security_group_ids".into(), "config".into());
            v.clone()
        }
        None if same_region && !f.security_group_ids.is_empty() => {
            sources.insert("security_group_ids".into(), "backup".into());
            f.security_group_ids.clone()
        }
        None => vec![],
    };
    if instance_type.is_empty() {
        return Err(SpecError::NoInstanceType);
    }
    if !same_region && (subnet_id.is_empty() || security_group_ids.is_empty()) {
        return Err(SpecError::NoRegionalNetwork { region: region.to_owned(), home: home_region.to_owned() });
    }
    // The old private IP is asked for only in its own subnet.
    let private_ip = if keep_private_ip && same_region && subnet_id == f.subnet_id { f.private_ip.clone() } else { String::new() };
    Ok(LaunchSpec {
        region: region.to_owned(),
        image_id: image_id.to_owned(),
        instance_type,
        subnet_id,
        availability_zone,
        security_group_ids,
        iam_instance_profile,
        key_name,
        private_ip,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> LaunchFacts {
        LaunchFacts {
            instance_type: "m5.xlarge".into(),
            subnet_id: "subnet-home".into(),
            availability_zone: "us-east-1a".into(),
            security_group_ids: vec!["sg-home".into()],
            private_ip: "10.0.0.5".into(),
            key_name: "ops".into(),
            ..LaunchFacts::default()
        }
    }

    #[test]
    fn recorded_facts_are_used_at_home_and_overrides_win() {
        let mut rec = SiteRecovery::default();
        rec.launch.home.instance_type = Some("m5.2xlarge".into());
        let spec = resolve_launch(Some(&facts()), &rec, "us-east-1", "us-east-1", "ami-1", false).expect("spec");
        assert_eq!(spec.instance_type, "m5.2xlarge");
        assert_eq!(spec.sources["instance_type"], "config");
        assert_eq!(spec.subnet_id, "subnet-home");
        assert_eq!(spec.sources["subnet_id"], "backup");
        assert_eq!(spec.private_ip, "", "a new private IP unless keep_private_ip");
        let kept = resolve_launch(Some(&facts()), &rec, "us-east-1", "us-east-1", "ami-1", true).expect("spec");
        assert_eq!(kept.private_ip, "10.0.0.5");
    }

    #[test]
    fn another_region_needs_its_own_network() {
        let rec = SiteRecovery::default();
        let err = resolve_launch(Some(&facts()), &rec, "us-east-1", "us-west-2", "ami-2", true).expect_err("no network");
        assert!(err.to_string().contains("[site.launch.us-west-2]"), "{err}");
        let mut rec = SiteRecovery::default();
        rec.launch.regions.insert(
            "us-west-2".into(),
            LaunchOverrides {
                subnet_id: Some("subnet-dr".into()),
                security_group_ids: Some(vec!["sg-dr".into()]),
                ..LaunchOverrides::default()
            },
        );
        let spec = resolve_launch(Some(&facts()), &rec, "us-east-1", "us-west-2", "ami-2", true).expect("spec");
        assert_eq!((spec.subnet_id.as_str(), spec.private_ip.as_str(), spec.key_name.as_str()), ("subnet-dr", "", ""));
        assert_eq!(spec.instance_type, "m5.xlarge", "the type travels across regions");
    }

    #[test]
    fn without_facts_the_config_must_name_the_type() {
        let rec = SiteRecovery::default();
        assert_eq!(resolve_launch(None, &rec, "us-east-1", "us-east-1", "ami-1", false), Err(SpecError::NoInstanceType));
    }

    #[test]
    fn launch_tables_parse_and_misspellings_are_named() {
        #[derive(Deserialize)]
        struct W {
            launch: LaunchConfig,
        }
        let w: W = toml::from_str(
            "[launch]\ninstance_type = \"m5.large\"\n[launch.us-west-2]\nsubnet_id = \"subnet-9\"\nsecurity_group_ids = [\"sg-9\"]\n",
        )
        .expect("parse");
        assert_eq!(w.launch.home.instance_type.as_deref(), Some("m5.large"));
        assert_eq!(w.launch.regions["us-west-2"].subnet_id.as_deref(), Some("subnet-9"));
        w.launch.check().expect("valid");
        let bad: Result<W, _> = toml::from_str("[launch]\ninstance_typ = \"m5.large\"\n");
        assert!(bad.is_err(), "a misspelt key is not silently ignored");
        let w: W = toml::from_str("[launch.west]\nsubnet_id = \"s\"\n").expect("parses as a table");
        assert!(w.launch.check().expect_err("`west` is no region").1.contains("region table"));
    }
}
