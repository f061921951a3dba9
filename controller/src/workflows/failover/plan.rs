//! The plan of a failover or restore: what `drctl failover --plan` prints
//! and what the workflow then does. One code path: [`make`] computes it
//! read-only (store reads, describes), the workflow stores it in its state at
//! start and its steps follow it.

use serde::{Deserialize, Serialize};

use super::super::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use crate::cloud::ec2::InstanceState;
use crate::domain::model::{Backup, BackupState, LaunchFacts, Millis, Site, now_ms};
use crate::domain::recovery::{Fence, LaunchSpec, SpecError, resolve_launch};
use crate::domain::refusal::CertOutlook;

/// What the operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// An AMI of the site's backups (its home-region id); empty: the newest
    /// available backup.
    pub backup_image_id: String,
    /// Launch in this region ("" = the site's own), from the backup's copy
    /// there.
    pub region: String,
    /// `restore` (an older point in time, asked for by AMI) or `failover`.
    pub restore: bool,
    /// A drill: the copy runs isolated (`[site.drill]`), nothing of
    /// production is touched, and it is torn down at the end.
    pub drill: bool,
    /// A drill without `backup_image_id`: a random available backup that
    /// started within this long before now (0 = the newest).
    pub random_within_ms: u64,
    /// A failback: back to the site's home region after a failover into a
    /// DR region, from the home copy of the newest backup of the current
    /// primary, with the home launch settings and Elastic IP.
    pub failback: bool,
    /// The plan of a hot spare (`spare` operation): the newest backup
    /// launchable in the spare's region, the production launch settings
    /// with a private IP of its own; nothing of production touched.
    pub spare: bool,
    /// A failover that launches fresh even when the policy prefers the
    /// site's spare.
    pub fresh: bool,
    /// A failover that takes the site's spare even when the policy prefers
    /// the freshest backup (refused when there is no usable spare).
    pub use_spare: bool,
}

impl Request {
    /// A plain failover: the only kind that may take the site's spare
    /// (not a restore, failback, drill or spare, and no backup named).
    fn may_take_spare(&self) -> bool {
        !(self.drill || self.spare || self.restore || self.failback || !self.backup_image_id.is_empty())
    }
}

/// The hot spare a failover takes instead of launching.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSpare {
    pub instance_id: String,
    /// `stopped` or `running`, as prepared.
    pub mode: String,
    /// Its EC2 state when planned.
    pub state: String,
    /// The spare's private IP (kept across a stop and start), and the
    /// public address its Replicated files hold (rewritten from).
    pub private_ip: String,
    pub files_public_ip: String,
    /// Its backup, and how much older that is than the newest backup: the
    /// data the operator trades for speed.
    pub backup_image_id: String,
    pub newest_backup_image_id: String,
    pub lag_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedBackup {
    /// The backup's AMI in the site's region.
    pub image_id: String,
    /// The AMI launched (a copy when the region is another one).
    pub launch_image_id: String,
    pub completed_at_ms: Millis,
    /// Started at: the point in time of the data, and the cutoff of build
    /// cleanup.
    pub started_at_ms: Millis,
    /// Age at planning: the data loss (RPO) the operator accepts.
    pub age_ms: u64,
    pub consistency: String,
    /// The instance the backup was taken of.
    pub source_instance_id: String,
    /// Launch facts were recorded with the backup.
    pub has_launch_facts: bool,
    /// When the agent certificate in the backup ends (0: not recorded, an
    /// older backup): the restored agent presents it.
    #[serde(default)]
    pub agent_cert_not_after_ms: Millis,
    /// That certificate for a human: "valid until ...", "EXPIRED at ...",
    /// "unknown (...)".
    #[serde(default)]
    pub agent_cert: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFence {
    /// The site's primary now ("" when the site has none).
    pub instance_id: String,
    pub mode: String,
    /// Its EC2 state now (`running`, `stopped`, `gone`, or why unknown).
    pub state: String,
    /// Volumes kept (and tagged) before a terminate fence.
    pub keeps_volumes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressChange {
    /// `private` or `public`.
    pub kind: String,
    pub old: String,
    /// The new address, or `assigned at launch` before it is known.
    pub new: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedEip {
    pub allocation_id: String,
    pub public_ip: String,
    /// AssociateAddress works only within a region.
    pub movable: bool,
    pub note: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDns {
    pub zone_id: String,
    pub name: String,
    pub ttl: u32,
}

/// Something a human must still do after the workflow (also in JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanAction {
    /// `github_oauth_callback`, `nomad_builders`, `fenced_volumes`,
    /// `nodename`, `elastic_ip`, `build_cleanup`, `app_health`.
    pub kind: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub site_id: String,
    /// `failover`, `restore`, `failback` or `drill`.
    pub kind: String,
    pub planned_at_ms: Millis,
    pub home_region: String,
    pub backup: PlannedBackup,
    pub fence: PlannedFence,
    pub launch: LaunchSpec,
    /// In the Replicated files (`/etc/default/replicated*` or
    /// `/etc/sysconfig/replicated*`); NODENAME values are never rewritten.
    pub addresses: Vec<AddressChange>,
    pub hostname: String,
    pub eip: Option<PlannedEip>,
    pub dns: Option<PlannedDns>,
    /// Builds running on the restored machine that started before this are
    /// deleted (in one console session).
    pub cleanup_builds_before_ms: Millis,
    pub human_actions: Vec<HumanAction>,
    pub warnings: Vec<String>,
    /// The failover takes this hot spare (no launch).
    #[serde(default)]
    pub spare: Option<PlannedSpare>,
    /// Not empty: an automatic failover that waits for `drctl approve`
    /// (policy `auto_failover = "approve"`) after its preflight; why.
    #[serde(default)]
    pub approval: String,
    /// What the health monitor saw, for an automatic failover: its RTO runs
    /// from the first evidence, and an approval is for this evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
}

/// The evidence an automatic recovery was decided on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// The first pass that saw the site unwell in this episode.
    pub first_evidence_ms: Millis,
    /// The pass that decided.
    pub decided_ms: Millis,
    pub condition: String,
    /// One line per signal, as `drctl site` shows them.
    pub evidence: Vec<String>,
}

/// Why no plan can be made: nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("site `{0}` is not configured")]
    UnknownSite(String),
    #[error("site `{0}` has no available backup to restore from")]
    NoBackup(String),
    #[error("{image} is not an available backup of site `{site}` (see `drctl backups {site}`)")]
    NotABackup { site: String, image: String },
    #[error("backup {image} has no available copy in {region} (copy regions are set by the site's policy copy_regions)")]
    NoCopy { image: String, region: String },
    #[error("site `{site}` has no available backup that started within the last {within}")]
    NoBackupWithin { site: String, within: String },
    #[error("a restore needs --backup AMI (an older point in time); a failover takes the newest good backup by default")]
    RestoreNeedsBackup,
    #[error(
        "site `{site}` has no available backup of its primary {primary} yet: take one (`drctl backup {site} --wait`) and wait for its copy home (`drctl backups {site}`)"
    )]
    NoBackupOfPrimary { site: String, primary: String },
    #[error("site `{site}` runs in its home region {home}: there is nothing to fail back")]
    AtHome { site: String, home: String },
    #[error("a failback goes to the site's home region {home}, not {region}")]
    FailbackRegion { home: String, region: String },
    #[error("site `{site}` has no available backup launchable in {region} (the backup there, or its copy): a spare needs one")]
    NoBackupIn { site: String, region: String },
    #[error("site `{site}` has no usable hot spare in {region}: {why}")]
    NoSpare { site: String, region: String, why: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

pub const ASSIGNED_AT_LAUNCH: &str = "assigned at launch";

/// Computes the plan without changing anything: store reads and EC2
/// describes only (a describe that fails, e.g. the home region is down, is
/// reported in the plan, not fatal).
pub async fn make(deps: &Deps, site: &Site, req: &Request) -> Result<Plan, PlanError> {
    if req.restore && req.backup_image_id.is_empty() {
        return Err(PlanError::RestoreNeedsBackup);
    }
    if req.fresh && req.use_spare {
        return Err(PlanError::Conflict("--fresh and --use-spare ask for opposite things: give one".into()));
    }
    if (req.fresh || req.use_spare) && !req.may_take_spare() {
        return Err(PlanError::Conflict(
            "--fresh and --use-spare choose between the spare and the newest backup of a failover: not with --backup, a restore, a failback or a drill".into(),
        ));
    }
    let rec = deps.recovery(&site.id);
    let policy = deps.policy(&site.id);
    if req.failback {
        if rec.home_region.is_empty() || rec.home_region == site.region {
            return Err(PlanError::AtHome {
                site: site.id.clone(),
                home: if rec.home_region.is_empty() { site.region.clone() } else { rec.home_region.clone() },
            });
        }
        if !req.region.is_empty() && req.region != rec.home_region {
            return Err(PlanError::FailbackRegion { home: rec.home_region.clone(), region: req.region.clone() });
        }
    }
    let region = if req.failback {
        rec.home_region.clone()
    } else if req.spare {
        spare_region(&policy, &rec, site)
    } else if req.region.is_empty() {
        site.region.clone()
    } else {
        req.region.clone()
    };
    let backups = deps.store.backups(site.id.clone()).await?;
    let backup: Backup = if req.spare {
        backups
            .iter()
            .filter(|b| b.state == BackupState::Available && launch_image_in(b, site, &region).is_some())
            .max_by_key(|b| b.completed_at_ms)
            .cloned()
            .ok_or_else(|| PlanError::NoBackupIn { site: site.id.clone(), region: region.clone() })?
    } else if req.backup_image_id.is_empty() && req.random_within_ms > 0 {
        let since = now_ms().saturating_sub(req.random_within_ms);
        let pool: Vec<&Backup> = backups.iter().filter(|b| b.state == BackupState::Available && b.started_at_ms >= since).collect();
        if pool.is_empty() {
            return Err(PlanError::NoBackupWithin {
                site: site.id.clone(),
                within: humantime::format_duration(std::time::Duration::from_secs(req.random_within_ms / 1000)).to_string(),
            });
        }
        let i = rand::random_range(0..pool.len());
        pool[i].clone()
    } else if req.backup_image_id.is_empty() && req.failback {
        // Never back to an older point than the machine running now: the
        // newest backup of the current (DR) primary.
        backups
            .iter()
            .filter(|b| b.state == BackupState::Available && b.instance_id == site.primary_instance_id)
            .max_by_key(|b| b.completed_at_ms)
            .cloned()
            .ok_or_else(|| PlanError::NoBackupOfPrimary { site: site.id.clone(), primary: site.primary_instance_id.clone() })?
    } else if req.backup_image_id.is_empty() {
        backups
            .iter()
            .filter(|b| b.state == BackupState::Available)
            .max_by_key(|b| b.completed_at_ms)
            .cloned()
            .ok_or_else(|| PlanError::NoBackup(site.id.clone()))?
    } else {
        backups
            .iter()
            .find(|b| {
                b.state == BackupState::Available
                    && (b.image_id == req.backup_image_id || b.copies.iter().any(|c| c.image_id == req.backup_image_id))
            })
            .cloned()
            .ok_or_else(|| PlanError::NotABackup { site: site.id.clone(), image: req.backup_image_id.clone() })?
    };
    // A failover may take the site's hot spare instead: then the data is the
    // spare's backup.
    let mut spare_notes = Vec::new();
    let spare = if req.may_take_spare() && !req.fresh {
        choose_spare(deps, site, &policy, &region, req.use_spare, &backup, &backups, &mut spare_notes).await?
    } else {
        None
    };
    let backup = match &spare {
        Some((_, b)) => b.clone(),
        None => backup,
    };
    let spare = spare.map(|(s, _)| s);
    // The backup itself where it was taken (its region; older rows: the
    // site's), else its copy in the launch region.
    let taken_in = if backup.region.is_empty() { site.region.as_str() } else { backup.region.as_str() };
    let launch_image_id = launch_image_in(&backup, site, &region)
        .ok_or_else(|| PlanError::NoCopy { image: backup.image_id.clone(), region: region.clone() })?;
    let facts: Option<LaunchFacts> = deps.store.launch_facts(backup.image_id.clone()).await?;
    let cert_not_after = deps.store.backup_agent_cert(backup.image_id.clone()).await?;
    let agent_due = deps.failover.agent_timeout;
    if req.drill {
        let mut plan = drill_plan(site, &rec, &region, backup, launch_image_id, facts)?;
        note_agent_cert(&mut plan, cert_not_after, agent_due);
        return Ok(plan);
    }
    if req.spare {
        let mut plan = spare_plan(site, &rec, &policy, &region, backup, launch_image_id, facts)?;
        note_agent_cert(&mut plan, cert_not_after, agent_due);
        return Ok(plan);
    }
    let keep_ip = rec.fence == Fence::Terminate && rec.keep_private_ip && !req.failback;
    // A failback launches with the home machine's recorded facts (subnet,
    // groups, type, its Elastic IP): those of the newest backup taken at
    // home. The backup's own facts still say which addresses its files hold.
    let home_facts = if req.failback { home_launch_facts(deps, site, &region).await? } else { None };
    let launch = match &home_facts {
        Some(h) => resolve_launch(Some(h), &rec, &region, &region, &launch_image_id, false)?,
        None => resolve_launch(facts.as_ref(), &rec, taken_in, &region, &launch_image_id, keep_ip)?,
    };
    let mut warnings = Vec::new();
    let mut human = Vec::new();
    if !req.failback
        && let Some(w) = healthy_primary_warning(deps, site).await?
    {
        warnings.push(w);
    }

    // The old primary, as EC2 sees it now.
    let old = site.primary_instance_id.clone();
    let state = match deps.ec2(site).await {
        Ok(ec2) => {
            match retry_ec2("DescribeInstances", EC2_RETRY_BUDGET.min(std::time::Duration::from_secs(20)), || ec2.describe_instance(&old))
                .await
            {
                Ok(Some(i)) => i.state.to_string(),
                Ok(None) => InstanceState::Gone.to_string(),
                Err(e) => format!("unknown ({e})"),
            }
        }
        Err(e) => format!("unknown ({e})"),
    };
    let keeps_volumes = match (rec.fence, &facts) {
        (Fence::Terminate, Some(f)) if f.instance_id == old => f.block_devices.iter().map(|b| b.volume_id.clone()).collect(),
        _ => vec![],
    };
    if rec.fence == Fence::Terminate {
        human.push(HumanAction {
            kind: "fenced_volumes".into(),
            message: format!(
                "the volumes of {old} are kept (tagged dr:fenced-from={old}); they may hold data newer than the backup: look, then delete them by hand"
            ),
        });
    }
    let fence = PlannedFence { instance_id: old.clone(), mode: rec.fence.as_str().to_owned(), state, keeps_volumes };

    // Addresses in the Replicated files: the backup's, and the new machine's.
    let (old_private, old_public) = match &facts {
        Some(f) => (f.private_ip.clone(), f.public_ip.clone()),
        None => {
            let r = deps.store.instance(site.id.clone(), backup.instance_id.clone()).await?;
            r.map(|r| (r.facts.private_ip, r.facts.public_ip)).unwrap_or_default()
        }
    };
    if old_private.is_empty() {
        warnings.push("the backup's private IP is not known (no launch facts, no agent report): the Replicated files are rewritten only for addresses the agent finds".into());
    }
    let eip_facts = if req.failback { home_facts.as_ref() } else { facts.as_ref() };
    // An Elastic IP belongs to the region of the machine it was recorded on.
    let eip_region = if req.failback { region.as_str() } else { taken_in };
    let eip = eip_facts.filter(|f| !f.eip_allocation_id.is_empty()).map(|f| {
        let movable = region == eip_region;
        PlannedEip {
            allocation_id: f.eip_allocation_id.clone(),
            public_ip: f.eip_public_ip.clone(),
            movable,
            note: if movable {
                "AssociateAddress (AllowReassociation) onto the new instance".into()
            } else {
                format!("an Elastic IP cannot move from {eip_region} to {region}: DNS must carry the site")
            },
        }
    });
    if let Some(e) = eip.as_ref().filter(|e| !e.movable) {
        human.push(HumanAction {
            kind: "elastic_ip".into(),
            message: format!("Elastic IP {} stays in {eip_region}: {}", e.public_ip, e.note),
        });
    }
    let new_private = if !launch.private_ip.is_empty() { launch.private_ip.clone() } else { ASSIGNED_AT_LAUNCH.to_owned() };
    let new_public = match &eip {
        Some(e) if e.movable => e.public_ip.clone(),
        _ => ASSIGNED_AT_LAUNCH.to_owned(),
    };
    let mut addresses = Vec::new();
    if !old_private.is_empty() && old_private != new_private {
        addresses.push(AddressChange { kind: "private".into(), old: old_private.clone(), new: new_private.clone() });
        human.push(HumanAction {
            kind: "nomad_builders".into(),
            message: format!(
                "Nomad builders point at the services machine's old private IP {old_private}: point them at the new one (shown after launch) and restart their nomad client"
            ),
        });
        human.push(HumanAction {
            kind: "nodename".into(),
            message: format!("NODENAME values in the Replicated files still carry the old address {old_private} (never rewritten): harmless, fix by hand if wanted"),
        });
    }
    if !old_public.is_empty() && old_public != new_public {
        addresses.push(AddressChange { kind: "public".into(), old: old_public, new: new_public });
    }
    if !rec.hostname.is_empty() {
        human.push(HumanAction {
            kind: "github_oauth_callback".into(),
            message: format!(
                "the hostname becomes {}: update the GitHub OAuth app's callback URL to https://{}/auth/github",
                rec.hostname, rec.hostname
            ),
        });
    }
    if facts.is_none() {
        warnings.push(format!(
            "backup {} has no recorded launch facts (taken before this version): the launch uses [site.launch] only",
            backup.image_id
        ));
    }
    if req.failback && home_facts.is_none() {
        warnings.push(format!(
            "no backup taken in {region} recorded launch facts: the launch uses [site.launch] and the DR backup's facts, and no home Elastic IP is moved"
        ));
    }
    if req.failback && backup.instance_id != site.primary_instance_id {
        warnings.push(format!(
            "backup {} is of {}, not of the running primary {}: what the site did since that backup is lost",
            backup.image_id, backup.instance_id, site.primary_instance_id
        ));
    }
    let dns = rec.dns.as_ref().map(|d| PlannedDns { zone_id: d.zone_id.clone(), name: d.name.clone(), ttl: d.ttl });
    if region != site.region && dns.is_none() {
        warnings.push(format!("no [site.dns]: after a failover into {region} the site is reachable only at the new instance's address"));
    }
    warnings.extend(spare_notes);
    if let Some(sp) = &spare {
        // The spare's files already hold its own addresses (rewritten when
        // it was prepared): rewrite from those. Its private IP stays.
        addresses.clear();
        if !sp.files_public_ip.is_empty() {
            let new = match &eip {
                Some(e) if e.movable => e.public_ip.clone(),
                _ => "assigned at start".to_owned(),
            };
            addresses.push(AddressChange { kind: "public".into(), old: sp.files_public_ip.clone(), new });
        }
        for h in human.iter_mut().filter(|h| h.kind == "nomad_builders") {
            h.message = format!(
                "Nomad builders point at the services machine's old private IP {old_private}: point them at the spare's {} and restart their nomad client",
                sp.private_ip
            );
        }
    }
    let now = now_ms();
    let mut plan = Plan {
        approval: String::new(),
        trigger: None,
        spare,
        site_id: site.id.clone(),
        kind: if req.failback {
            "failback"
        } else if req.restore {
            "restore"
        } else {
            "failover"
        }
        .into(),
        planned_at_ms: now,
        home_region: site.region.clone(),
        backup: planned_backup(&backup, launch_image_id, facts.is_some(), now),
        fence,
        launch,
        addresses,
        hostname: rec.hostname.clone(),
        eip,
        dns,
        cleanup_builds_before_ms: backup.started_at_ms,
        human_actions: human,
        warnings,
    };
    note_agent_cert(&mut plan, cert_not_after, agent_due);
    Ok(plan)
}

/// How close after the restored agent is due an ending certificate is
/// worth a warning.
const CERT_SOON: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Notes the agent certificate the backup carries (recorded at backup
/// time) in the plan, and warns when it is expired or will be before the
/// restored agent is due (`agent_due` from now: `failover.agent_timeout`),
/// or soon after. A backup that recorded none: "unknown", no warning.
pub fn note_agent_cert(plan: &mut Plan, not_after_ms: Option<Millis>, agent_due: std::time::Duration) {
    let now = now_ms();
    let outlook = CertOutlook::of(not_after_ms.unwrap_or(0), now, now.saturating_add(agent_due.as_millis() as u64), CERT_SOON);
    plan.backup.agent_cert_not_after_ms = not_after_ms.unwrap_or(0);
    plan.backup.agent_cert = outlook.describe(now);
    if let Some(w) = outlook.warning(&plan.site_id, &plan.backup.image_id, now) {
        plan.warnings.push(w);
    }
}

/// A warning when the primary this plan fences looks fine: its agent is
/// connected as primary and the health monitor's record says healthy (or
/// the site's health is not monitored). A failover then stops a working
/// site and loses what it did since the backup.
async fn healthy_primary_warning(deps: &Deps, site: &Site) -> Result<Option<String>, PlanError> {
    let connected = deps.registry.live(&site.id, &site.primary_instance_id).is_some_and(|l| l.role == crate::domain::model::Role::Primary);
    if !connected {
        return Ok(None);
    }
    let health = deps.store.health_all().await?.remove(&site.id);
    let said = match health {
        Some(h) if h.state == crate::domain::health::HealthState::Healthy => {
            let ago = now_ms().saturating_sub(h.checked_at_ms);
            format!(
                "the health monitor says healthy (checked {} ago)",
                humantime::format_duration(std::time::Duration::from_secs(ago / 1000))
            )
        }
        Some(_) => return Ok(None),
        None => "its health is not monitored".to_owned(),
    };
    Ok(Some(format!(
        "the primary {} looks healthy: its agent is connected as primary and {said}; this stops a working site, and what it did since the backup is lost",
        site.primary_instance_id
    )))
}

/// The launch facts of the newest available backup taken in `home` (the
/// machine the site ran on there), if any.
async fn home_launch_facts(deps: &Deps, site: &Site, home: &str) -> Result<Option<LaunchFacts>, PlanError> {
    let mut at_home: Vec<Backup> = deps.store.backups(site.id.clone()).await?.into_iter().filter(|b| b.region == home).collect();
    at_home.sort_by_key(|b| std::cmp::Reverse(b.completed_at_ms));
    for b in at_home {
        if let Some(f) = deps.store.launch_facts(b.image_id.clone()).await? {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

fn planned_backup(backup: &Backup, launch_image_id: String, has_launch_facts: bool, now: Millis) -> PlannedBackup {
    PlannedBackup {
        image_id: backup.image_id.clone(),
        launch_image_id,
        completed_at_ms: backup.completed_at_ms,
        started_at_ms: backup.started_at_ms,
        age_ms: now.saturating_sub(backup.started_at_ms),
        consistency: backup.consistency.as_str().to_owned(),
        source_instance_id: backup.instance_id.clone(),
        has_launch_facts,
        // Set by `note_agent_cert`.
        agent_cert_not_after_ms: 0,
        agent_cert: String::new(),
    }
}

/// The address changes of a machine that gets addresses of its own (a drill
/// copy, a spare): each address the backup's files hold, to the one
/// assigned at launch.
fn own_addresses(facts: Option<&LaunchFacts>) -> Vec<AddressChange> {
    let (old_private, old_public) = facts.map(|f| (f.private_ip.clone(), f.public_ip.clone())).unwrap_or_default();
    [("private", old_private), ("public", old_public)]
        .into_iter()
        .filter(|(_, old)| !old.is_empty())
        .map(|(kind, old)| AddressChange { kind: kind.into(), old, new: ASSIGNED_AT_LAUNCH.into() })
        .collect()
}

/// A drill's plan: the copy in `[site.drill]`'s subnet and security groups
/// under its hostname, its own addresses written into the Replicated files;
/// no fence, no Elastic IP, no DNS, no promotion, and nothing for a human.
fn drill_plan(
    site: &Site,
    rec: &crate::domain::recovery::SiteRecovery,
    region: &str,
    backup: Backup,
    launch_image_id: String,
    facts: Option<LaunchFacts>,
) -> Result<Plan, PlanError> {
    let mut drill_rec = rec.clone();
    drill_rec.launch = rec.drill.launch_over(&rec.launch, region, &site.region)?;
    let isolated = Isolated { kind: "drill", fence_mode: "none (drill)".into(), hostname: rec.drill.hostname.clone().unwrap_or_default() };
    isolated_plan(site, &drill_rec, isolated, region, backup, launch_image_id, facts)
}

/// What tells a drill's plan from a spare's.
struct Isolated {
    kind: &'static str,
    fence_mode: String,
    hostname: String,
}

/// The plan of a machine production does not rely on (a drill copy, a
/// spare): launched with `launch_rec`'s settings but a private IP of its
/// own, its own addresses written into its files; no fence, no Elastic IP,
/// no DNS, nothing for a human.
fn isolated_plan(
    site: &Site,
    launch_rec: &crate::domain::recovery::SiteRecovery,
    what: Isolated,
    region: &str,
    backup: Backup,
    launch_image_id: String,
    facts: Option<LaunchFacts>,
) -> Result<Plan, PlanError> {
    let taken_in = if backup.region.is_empty() { site.region.as_str() } else { backup.region.as_str() };
    let mut launch = resolve_launch(facts.as_ref(), launch_rec, taken_in, region, &launch_image_id, false)?;
    let mut warnings = vec![];
    if !launch.private_ip.is_empty() {
        warnings.push(format!("the configured private_ip {} is the primary's: the {} gets one of its own", launch.private_ip, what.kind));
        launch.private_ip.clear();
    }
    if facts.is_none() {
        warnings.push(format!(
            "backup {} has no recorded launch facts: the {}'s Replicated files are rewritten only for addresses the agent finds",
            backup.image_id, what.kind
        ));
    }
    let now = now_ms();
    Ok(Plan {
        approval: String::new(),
        trigger: None,
        site_id: site.id.clone(),
        kind: what.kind.into(),
        planned_at_ms: now,
        home_region: site.region.clone(),
        backup: planned_backup(&backup, launch_image_id, facts.is_some(), now),
        fence: PlannedFence { mode: what.fence_mode, ..PlannedFence::default() },
        launch,
        addresses: own_addresses(facts.as_ref()),
        hostname: what.hostname,
        eip: None,
        dns: None,
        cleanup_builds_before_ms: backup.started_at_ms,
        human_actions: vec![],
        warnings,
        spare: None,
    })
}

/// Where a site's spare lives: the policy's `spare_region`, else the
/// site's home region.
pub fn spare_region(policy: &crate::domain::policy::Policy, rec: &crate::domain::recovery::SiteRecovery, site: &Site) -> String {
    if !policy.spare_region.is_empty() {
        policy.spare_region.clone()
    } else if !rec.home_region.is_empty() {
        rec.home_region.clone()
    } else {
        site.region.clone()
    }
}

/// The AMI of `backup` that launches in `region`: the backup itself where
/// it was taken, else its available copy there.
pub fn launch_image_in(backup: &Backup, site: &Site, region: &str) -> Option<String> {
    let taken_in = if backup.region.is_empty() { site.region.as_str() } else { backup.region.as_str() };
    if region == taken_in {
        return Some(backup.image_id.clone());
    }
    backup
        .copies
        .iter()
        .find(|c| c.region == region && c.state == crate::domain::model::CopyState::Available && !c.image_id.is_empty())
        .map(|c| c.image_id.clone())
}

/// Whether a failover into `region` takes the site's spare (policy
/// `failover_prefers`, or `--use-spare`), with the spare's backup. A spare
/// that cannot be used is said in `notes` (a fresh launch follows), or
/// refused with `--use-spare`.
#[allow(clippy::too_many_arguments)]
async fn choose_spare(
    deps: &Deps,
    site: &Site,
    policy: &crate::domain::policy::Policy,
    region: &str,
    insist: bool,
    newest: &Backup,
    backups: &[Backup],
    notes: &mut Vec<String>,
) -> Result<Option<(PlannedSpare, Backup)>, PlanError> {
    let refuse = |why: String| PlanError::NoSpare { site: site.id.clone(), region: region.to_owned(), why };
    let Some(s) = deps.store.spare(site.id.clone()).await? else {
        return if insist { Err(refuse("the site has none (policy spare)".into())) } else { Ok(None) };
    };
    if policy.failover_prefers == crate::domain::policy::FailoverPrefers::Freshest && !insist {
        notes.push(format!(
            "the hot spare {} is not used (failover_prefers = \"freshest\"): a fresh launch from the newest backup; --use-spare takes it",
            s.instance_id
        ));
        return Ok(None);
    }
    let unusable = |why: String, notes: &mut Vec<String>| {
        if insist {
            Err(refuse(why))
        } else {
            notes.push(format!("the hot spare {} is not used: {why}; a fresh launch instead", s.instance_id));
            Ok(None)
        }
    };
    if s.region != region {
        return unusable(format!("it is in {}, the failover goes to {region}", s.region), notes);
    }
    let Some(backup) = backups.iter().find(|b| b.image_id == s.backup_image_id && b.state == BackupState::Available) else {
        return unusable(format!("its backup {} is no longer available", s.backup_image_id), notes);
    };
    let state = match deps.ec2_in(site, region).await {
        Ok(ec2) => match retry_ec2("DescribeInstances", EC2_RETRY_BUDGET.min(std::time::Duration::from_secs(20)), || {
            ec2.describe_instance(&s.instance_id)
        })
        .await
        {
            Ok(Some(i)) => i.state,
            Ok(None) => InstanceState::Gone,
            Err(e) => return unusable(format!("its state is unknown ({e})"), notes),
        },
        Err(e) => return unusable(format!("its state is unknown ({e})"), notes),
    };
    if !(state.is_up() || matches!(state, InstanceState::Stopped | InstanceState::Stopping)) {
        return unusable(format!("it is {state} in EC2"), notes);
    }
    let lag_ms = newest.started_at_ms.saturating_sub(backup.started_at_ms);
    notes.push(format!(
        "takes the hot spare {} ({state}, prepared from backup {}): no launch, no disk hydration; its data is {} older than the newest backup {} (the RPO traded for speed; --fresh launches from the newest)",
        s.instance_id,
        s.backup_image_id,
        humantime::format_duration(std::time::Duration::from_secs(lag_ms / 1000)),
        newest.image_id
    ));
    let planned = PlannedSpare {
        instance_id: s.instance_id.clone(),
        mode: s.mode.clone(),
        state: state.to_string(),
        private_ip: s.files_private_ip.clone(),
        files_public_ip: s.files_public_ip.clone(),
        backup_image_id: s.backup_image_id.clone(),
        newest_backup_image_id: newest.image_id.clone(),
        lag_ms,
    };
    Ok(Some((planned, backup.clone())))
}

/// A spare's plan: the production launch settings (`[site.launch]`, the
/// backup's facts) in the spare's region, with a private IP of its own (the
/// primary holds the site's) and the site's hostname.
fn spare_plan(
    site: &Site,
    rec: &crate::domain::recovery::SiteRecovery,
    policy: &crate::domain::policy::Policy,
    region: &str,
    backup: Backup,
    launch_image_id: String,
    facts: Option<LaunchFacts>,
) -> Result<Plan, PlanError> {
    let isolated =
        Isolated { kind: "spare", fence_mode: format!("none (spare, kept {})", policy.spare.as_str()), hostname: rec.hostname.clone() };
    isolated_plan(site, rec, isolated, region, backup, launch_image_id, facts)
}
