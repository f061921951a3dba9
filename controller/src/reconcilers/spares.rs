//! The spare keeper: keeps one hot spare per site whose policy asks for
//! one (`spare = stopped | running`), by starting the `spare` workflow
//! (`workflows::spare`) when
//! - the site has no spare,
//! - the spare is not where or how the policy wants it (`spare_region`,
//!   `spare`), or
//! - a newer good backup is launchable in the spare's region and the
//!   spare's backup started longer ago than `spare_max_lag`.
//!
//! The old spare is terminated by the new one's `retire` step, after the new
//! one is installed: a site that had a spare never has none while it is
//! refreshed. With `spare = "off"` an existing spare is terminated here.
//! A site with a failover (running or waiting) is left alone: it may be
//! taking the spare. No spare is prepared while any failover of the fleet
//! runs: spares never compete with a failover for the RunInstances budget
//! (50 failovers at once need all of it); they are replaced once the
//! failovers have ended. Per pass: three store reads, plus one per site
//! whose spare is missing, misplaced or older than `spare_max_lag`. Every
//! [`CHECK_EVERY`] the installed spares are looked up in EC2 in batches; one
//! terminated behind the controller's back is forgotten and replaced.

use std::time::Duration;

use crate::cloud::ec2::InstanceState;
use crate::domain::model::{BackupState, Millis, OperationState, Role, Site, SpareRecord, now_ms};
use crate::domain::policy::{Policy, SpareMode};
use crate::store::StoreError;
use crate::workflows::failover::plan::{self, launch_image_in, spare_region};
use crate::workflows::{EC2_RETRY_BUDGET, Engine, retry_ec2, spare};

/// Why the keeper acted on a site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kept {
    /// A `spare` operation was started (its id), and why.
    Started { operation_id: String, why: String },
    /// The spare was terminated (policy `off`).
    Retired { instance_id: String },
    /// The spare is gone from EC2 (terminated behind the controller's
    /// back) and forgotten; the next pass prepares another.
    Gone { instance_id: String, state: String },
}

/// How often the installed spares are looked up in EC2 (batched).
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

pub async fn run(engine: Engine, tick: Duration) {
    let mut checked: Option<tokio::time::Instant> = None;
    loop {
        if checked.is_none_or(|t| t.elapsed() >= CHECK_EVERY) {
            checked = Some(tokio::time::Instant::now());
            if let Err(e) = check_spares(&engine).await {
                tracing::error!(error = %e, "spare check failed");
            }
        }
        match tick_once(&engine, now_ms()).await {
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "spare keeper pass failed"),
        }
        tokio::time::sleep(tick).await;
    }
}

/// Looks every installed spare up in EC2, one DescribeInstances per
/// account and region for up to 1,000 spares, and forgets those EC2 no
/// longer has (terminated, shutting down, unknown). A lookup that fails is
/// logged and changes nothing.
pub async fn check_spares(engine: &Engine) -> Result<Vec<(String, Kept)>, StoreError> {
    let store = engine.store();
    let spares = store.spares().await?;
    let sites: std::collections::HashMap<String, Site> = store.sites().await?.into_iter().map(|s| (s.id.clone(), s)).collect();
    let mut groups: std::collections::BTreeMap<(Option<String>, String), Vec<&SpareRecord>> = Default::default();
    for s in spares.values() {
        if let Some(site) = sites.get(&s.site_id) {
            groups.entry((site.role_arn.clone(), s.region.clone())).or_default().push(s);
        }
    }
    let mut done = vec![];
    for ((_, region), group) in groups {
        for chunk in group.chunks(1000) {
            let site = &sites[&chunk[0].site_id];
            let ids: Vec<String> = chunk.iter().map(|s| s.instance_id.clone()).collect();
            let found = match engine.deps().ec2_in(site, &region).await {
                Ok(ec2) => retry_ec2("DescribeInstances", EC2_RETRY_BUDGET, || ec2.describe_instances(&ids)).await,
                Err(e) => Err(e),
            };
            let found = match found {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(region = %region, spares = ids.len(), error = %e, "cannot look the spares up in EC2; kept as they are");
                    continue;
                }
            };
            for s in chunk {
                let state = InstanceState::of(found.iter().find(|i| i.id == s.instance_id));
                if !state.is_ending() {
                    continue;
                }
                if store.drop_spare(s.site_id.clone(), s.instance_id.clone()).await? {
                    let reason = format!("the spare is {state} in EC2 (not by this controller)");
                    store.set_instance_role(s.site_id.clone(), s.instance_id.clone(), "passive".into(), String::new(), reason).await?;
                    tracing::warn!(site = %s.site_id, spare = %s.instance_id, state = %state, "the hot spare is gone from EC2: forgotten, a new one is prepared");
                    done.push((s.site_id.clone(), Kept::Gone { instance_id: s.instance_id.clone(), state: state.to_string() }));
                }
            }
        }
    }
    Ok(done)
}

/// Why `site` needs a new spare now, if it does.
pub fn needs_spare(
    policy: &Policy,
    region: &str,
    spare: Option<&SpareRecord>,
    newest: Option<(&str, Millis)>,
    now: Millis,
) -> Option<String> {
    let (newest_id, newest_started) = newest?;
    let Some(s) = spare else { return Some("the site has no spare".into()) };
    if let Some(why) = misfit(policy, region, s) {
        return Some(why);
    }
    if newest_id != s.backup_image_id && newest_started > s.backup_started_at_ms && stale(policy, s, now) {
        return Some(format!(
            "the spare's data is {} old (spare_max_lag {}) and backup {newest_id} is newer",
            humantime::format_duration(Duration::from_secs(now.saturating_sub(s.backup_started_at_ms) / 1000)),
            humantime::format_duration(policy.spare_max_lag)
        ));
    }
    None
}

/// Why the installed spare is not where or how the policy wants it.
fn misfit(policy: &Policy, region: &str, s: &SpareRecord) -> Option<String> {
    if s.region != region {
        return Some(format!("the spare {} is in {}, the policy wants it in {region}", s.instance_id, s.region));
    }
    if s.mode != policy.spare.as_str() {
        return Some(format!("the spare {} is kept {}, the policy wants {}", s.instance_id, s.mode, policy.spare.as_str()));
    }
    None
}

/// The spare's backup started longer ago than `spare_max_lag`.
fn stale(policy: &Policy, s: &SpareRecord, now: Millis) -> bool {
    now.saturating_sub(s.backup_started_at_ms) > policy.spare_max_lag.as_millis() as u64
}

/// One pass at `now`: what was done, by site.
pub async fn tick_once(engine: &Engine, now: Millis) -> Result<Vec<(String, Kept)>, StoreError> {
    let store = engine.store();
    let spares = store.spares().await?;
    let active = store.active_by_site().await?;
    // Running failovers (one waiting for a human does not hold spares back).
    let failovers = active.values().flatten().filter(|a| a.kind == "failover" && a.state == OperationState::Running).count();
    let mut done = vec![];
    for site in store.sites().await? {
        let policy = engine.deps().policy(&site.id);
        let current = spares.get(&site.id);
        if policy.spare == SpareMode::Off {
            if let Some(s) = current {
                match retire(engine, &site, s).await {
                    Ok(()) => done.push((site.id.clone(), Kept::Retired { instance_id: s.instance_id.clone() })),
                    Err(e) => {
                        tracing::error!(site = %site.id, spare = %s.instance_id, error = %e, "the spare could not be terminated (policy spare = off); retried next pass")
                    }
                }
            }
            continue;
        }
        if failovers > 0 || active.get(&site.id).is_some_and(|a| a.iter().any(|a| a.kind == "spare" || a.kind == "failover")) {
            continue;
        }
        let region = spare_region(&policy, &engine.deps().recovery(&site.id), &site);
        // The steady state, without reading the site's backups.
        if current.is_some_and(|s| misfit(&policy, &region, s).is_none() && !stale(&policy, s, now)) {
            continue;
        }
        let backups = store.backups(site.id.clone()).await?;
        let newest = backups
            .iter()
            .filter(|b| b.state == BackupState::Available && launch_image_in(b, &site, &region).is_some())
            .max_by_key(|b| b.completed_at_ms);
        let Some(why) = needs_spare(&policy, &region, current, newest.map(|b| (b.image_id.as_str(), b.started_at_ms)), now) else {
            continue;
        };
        let req = plan::Request { spare: true, ..Default::default() };
        let plan = match plan::make(engine.deps(), &site, &req).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(site = %site.id, error = %e, "a spare is wanted but cannot be planned");
                continue;
            }
        };
        match spare::start(engine, plan, "policy/spare").await {
            Ok(op) => {
                tracing::info!(site = %site.id, operation = %op.id, why = %why, "preparing a hot spare");
                done.push((site.id.clone(), Kept::Started { operation_id: op.id, why }));
            }
            Err(e) => tracing::warn!(site = %site.id, error = %e, "the spare operation could not start"),
        }
    }
    Ok(done)
}

/// Terminates a site's spare (policy `off`) and forgets it.
async fn retire(engine: &Engine, site: &Site, s: &SpareRecord) -> Result<(), crate::cloud::ec2::Ec2Error> {
    let deps = engine.deps();
    let ec2 = deps.ec2_in(site, &s.region).await?;
    retry_ec2("TerminateInstances", EC2_RETRY_BUDGET, || ec2.terminate_instance(&s.instance_id)).await?;
    let reason = "terminated: the site's policy no longer keeps a spare".to_owned();
    let store = engine.store();
    let forget = async {
        store.drop_spare(site.id.clone(), s.instance_id.clone()).await?;
        store.set_instance_role(site.id.clone(), s.instance_id.clone(), "passive".into(), String::new(), reason.clone()).await?;
        // TerminateInstances answered (a termination is final): no longer
        // listed under the site.
        store.forget_terminated(site.id.clone(), s.instance_id.clone()).await.map(|_| ())
    };
    if let Err(e) = forget.await {
        tracing::error!(site = %site.id, error = %e, "the terminated spare could not be forgotten in the store");
    }
    deps.registry.set_role(&site.id, &s.instance_id, Role::Passive { reason });
    tracing::info!(site = %site.id, spare = %s.instance_id, "hot spare terminated (policy spare = off)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_is_replaced_only_when_a_newer_backup_exists_and_it_is_older_than_the_lag() {
        let h = 3_600_000;
        let policy = Policy { spare: SpareMode::Stopped, spare_max_lag: Duration::from_secs(6 * 3600), ..Policy::default() };
        let spare = SpareRecord {
            instance_id: "i-s".into(),
            region: "us-east-1".into(),
            mode: "stopped".into(),
            backup_image_id: "ami-1".into(),
            backup_started_at_ms: 10 * h,
            ..SpareRecord::default()
        };
        assert!(needs_spare(&policy, "us-east-1", None, None, 11 * h).is_none(), "no backup, no spare");
        assert!(needs_spare(&policy, "us-east-1", None, Some(("ami-1", 10 * h)), 11 * h).is_some(), "none yet");
        assert!(needs_spare(&policy, "us-east-1", Some(&spare), Some(("ami-2", 12 * h)), 15 * h).is_none(), "newer backup, within the lag");
        assert!(needs_spare(&policy, "us-east-1", Some(&spare), Some(("ami-1", 10 * h)), 30 * h).is_none(), "old, but no newer backup");
        let why = needs_spare(&policy, "us-east-1", Some(&spare), Some(("ami-2", 12 * h)), 17 * h).expect("stale");
        assert!(why.contains("ami-2") && why.contains("7h"), "{why}");
        assert!(needs_spare(&policy, "eu-west-1", Some(&spare), Some(("ami-1", 10 * h)), 11 * h).expect("moved").contains("eu-west-1"));
        let running = Policy { spare: SpareMode::Running, ..policy };
        assert!(needs_spare(&running, "us-east-1", Some(&spare), Some(("ami-1", 10 * h)), 11 * h).expect("mode").contains("running"));
    }
}
