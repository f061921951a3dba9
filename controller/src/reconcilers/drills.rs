//! The drill reaper: every `[drill] reap_every`, in each site's regions,
//! terminates every instance tagged `dr:role=drill` (and made by this
//! deployment for this site) whose `dr:keep-until` has passed, and deletes
//! such volumes left unattached. It finishes drills whose teardown failed
//! or whose controller died and never came back; a drill that is still
//! running within its lease is never touched.
//!
//! It never touches the instance the store knows as the site's primary, nor
//! one without our `dr:created-by` tag, nor one whose `dr:keep-until` it
//! cannot read (logged instead).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::domain::model::{Role, Site, now_ms};
use crate::domain::tags::{CREATED_BY, TAG_CREATED_BY, TAG_KEEP_UNTIL, TAG_ROLE, TAG_SITE, parse_keep_until};
use crate::engine::StepError;
use crate::workflows::{Deps, EC2_RETRY_BUDGET as BUDGET, Engine, retry_ec2};

/// Forever, every `every`.
pub async fn run(engine: Engine, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match reap(engine.deps()).await {
            Ok(r) if !r.is_empty() => tracing::warn!(reaped = ?r, "drill reaper terminated expired drill copies"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "drill reaper pass failed"),
        }
    }
}

/// The regions a site's drill copies may be in: its own, its copy regions
/// and those its `[site.drill]` names.
fn regions(deps: &Deps, site: &Site) -> BTreeSet<String> {
    let mut r: BTreeSet<String> = [site.region.clone()].into();
    r.extend(deps.policy(&site.id).copy_regions);
    r.extend(deps.copy_regions(site));
    r.extend(deps.recovery(&site.id).drill.launch.regions.keys().cloned());
    r
}

/// One pass. Returns what it terminated or deleted.
pub async fn reap(deps: &Deps) -> Result<Vec<String>, StepError> {
    let now = now_ms();
    let mut done = vec![];
    for site in deps.store.sites().await? {
        for region in regions(deps, &site) {
            let ec2 = deps.ec2_in(&site, &region).await?;
            let ours = |tags: &[(String, String)]| {
                let tag = |k: &str| tags.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
                tag(TAG_SITE) == Some(site.id.as_str()) && tag(TAG_CREATED_BY) == Some(CREATED_BY)
            };
            let expired = |tags: &[(String, String)], what: &str| match tags.iter().find(|(k, _)| k == TAG_KEEP_UNTIL) {
                Some((_, v)) => match parse_keep_until(v) {
                    Some(until) => until <= now,
                    None => {
                        tracing::warn!(site = %site.id, %region, %what, value = %v, "a drill copy's dr:keep-until is unreadable; left alone");
                        false
                    }
                },
                None => {
                    tracing::warn!(site = %site.id, %region, %what, "a drill copy has no dr:keep-until; left alone");
                    false
                }
            };
            let instances = retry_ec2("DescribeInstances", BUDGET, || ec2.find_instances_by_tag(TAG_ROLE, "drill")).await?;
            for i in instances.iter().filter(|i| ours(&i.tags) && i.id != site.primary_instance_id && expired(&i.tags, &i.id)) {
                retry_ec2("TerminateInstances", BUDGET, || ec2.terminate_instance(&i.id)).await?;
                let reason = "terminated by the drill reaper: its dr:keep-until passed".to_owned();
                deps.store.set_instance_role(site.id.clone(), i.id.clone(), "passive".into(), String::new(), reason.clone()).await?;
                deps.registry.set_role(&site.id, &i.id, Role::Passive { reason });
                tracing::warn!(site = %site.id, %region, instance = %i.id, "drill copy past its dr:keep-until terminated");
                done.push(i.id.clone());
            }
            let volumes = retry_ec2("DescribeVolumes", BUDGET, || ec2.find_volumes_by_tag(TAG_ROLE, "drill")).await?;
            for v in volumes.iter().filter(|v| v.state == "available" && ours(&v.tags) && expired(&v.tags, &v.id)) {
                retry_ec2("DeleteVolume", BUDGET, || ec2.delete_volume(&v.id)).await?;
                tracing::warn!(site = %site.id, %region, volume = %v.id, "drill volume past its dr:keep-until deleted");
                done.push(v.id.clone());
            }
        }
    }
    Ok(done)
}
