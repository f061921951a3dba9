//! Copies of backups in DR regions, and retention of backups and copies.
//!
//! A copy is recorded before CopyImage is called and carries a ClientToken
//! derived from the operation, the region and the attempt, so a repeated
//! call (after a crash or a retry) does not make a second copy. The
//! reconciler ([`run`]) drives every pending or failed copy to an end:
//! batched DescribeImages per region, retries of failed copies with backoff
//! (attempt n waits n × copy_poll), never forgetting one.

use std::collections::HashMap;
use std::time::Duration;

use crate::ec2::CopyImage;
use crate::model::{BackupState, Copy, CopyState, Site, now_ms};
use crate::ops::{Engine, StepError, retry_ec2};
use crate::retention::{self, Decision};

const BUDGET: Duration = Duration::from_secs(300);

/// A copy recorded as pending without an image id for this long was left by
/// a crash between recording it and CopyImage answering.
const STALE_PENDING: Duration = Duration::from_secs(30);

/// The ClientToken of a copy attempt (at most 64 ASCII characters).
pub fn client_token(operation_id: &str, region: &str, attempt: u32) -> String {
    let mut t = format!("dr-{operation_id}-{region}-{attempt}");
    t.truncate(64);
    t
}

/// Starts (or, if already recorded, leaves alone) the copy of `image_id` to `region`.
pub async fn start_copy(
    engine: &Engine,
    site: &Site,
    image_id: &str,
    operation_id: &str,
    region: &str,
) -> Result<Copy, StepError> {
    if let Some(existing) = engine.store.copies_of(image_id)?.into_iter().find(|c| c.region == region) {
        if !existing.image_id.is_empty() || existing.state == CopyState::Failed {
            return Ok(existing);
        }
    }
    let mut copy = Copy {
        source_image_id: image_id.to_owned(),
        region: region.to_owned(),
        image_id: String::new(),
        state: CopyState::Pending,
        attempts: 1,
        error: String::new(),
        requested_at_ms: now_ms(),
        completed_at_ms: 0,
        deleted_at_ms: 0,
    };
    engine.store.put_copy(&copy)?;
    issue(engine, site, &mut copy, operation_id).await?;
    Ok(copy)
}

/// Calls CopyImage for `copy` (attempt `copy.attempts`) and records the answer.
async fn issue(engine: &Engine, site: &Site, copy: &mut Copy, operation_id: &str) -> Result<(), StepError> {
    let result = async {
        let ec2 = engine.ec2_in(site, &copy.region).await?;
        let req = CopyImage {
            source_region: site.region.clone(),
            source_image_id: copy.source_image_id.clone(),
            name: format!("dr-{}-{}-copy", site.id, copy.source_image_id),
            description: format!("dr-controller copy of {} (site {}) from {}", copy.source_image_id, site.id, site.region),
            client_token: client_token(operation_id, &copy.region, copy.attempts),
            tags: copy_tags(site, operation_id, &copy.source_image_id),
        };
        retry_ec2("CopyImage", BUDGET, || ec2.copy_image(&req)).await
    }
    .await;
    match result {
        Ok(id) => {
            copy.image_id = id;
            copy.state = CopyState::Pending;
            copy.error.clear();
        }
        Err(e) => {
            tracing::warn!(source = %copy.source_image_id, region = %copy.region, attempt = copy.attempts, error = %e, "copy failed; it will be retried");
            copy.state = CopyState::Failed;
            copy.error = e.to_string();
        }
    }
    engine.store.put_copy(copy)?;
    Ok(())
}

/// The tags of a copy (set by CopyImage itself).
fn copy_tags(site: &Site, operation_id: &str, source_image_id: &str) -> Vec<(String, String)> {
    vec![
        (crate::ops::backup::TAG_SITE.into(), site.id.clone()),
        (crate::ops::backup::TAG_OPERATION.into(), operation_id.to_owned()),
        (crate::ops::backup::TAG_CREATED_BY.into(), crate::ops::backup::CREATED_BY.into()),
        ("dr:source-image".into(), source_image_id.to_owned()),
    ]
}

/// The reconciler: forever, every `every`.
pub async fn run(engine: Engine, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = reconcile(&engine, every).await {
            tracing::error!(error = %e, "copy reconciler pass failed");
        }
    }
}

/// One pass over unfinished copies. Returns how many changed state.
pub async fn reconcile(engine: &Engine, every: Duration) -> Result<usize, StepError> {
    let copies = engine.store.unfinished_copies()?;
    let mut changed = 0;
    // One DescribeImages per (site, region) for every pending copy there.
    let mut pending: HashMap<(String, String), Vec<(Copy, String)>> = HashMap::new();
    for copy in copies {
        let Some((site, operation_id)) = site_of(engine, &copy.source_image_id)? else { continue };
        if copy.state == CopyState::Failed || copy.image_id.is_empty() {
            let age = now_ms().saturating_sub(copy.requested_at_ms);
            let wait = every.saturating_mul(copy.attempts);
            if copy.state == CopyState::Failed && age < wait.as_millis() as u64 {
                continue;
            }
            // Pending without an image id: CopyImage may still be in flight
            // (the copy step records the copy first). Only a stale one was
            // left by a crash and is issued again (same ClientToken).
            if copy.state == CopyState::Pending && age < STALE_PENDING.max(every * 2).as_millis() as u64 {
                continue;
            }
            let mut copy = copy;
            if copy.state == CopyState::Failed {
                copy.attempts += 1;
            }
            copy.requested_at_ms = now_ms();
            issue(engine, &site, &mut copy, &operation_id).await?;
            changed += 1;
            continue;
        }
        pending.entry((site.id.clone(), copy.region.clone())).or_default().push((copy, operation_id));
    }
    for ((site_id, region), group) in pending {
        let Some(site) = engine.store.site(&site_id)? else { continue };
        let ec2 = engine.ec2_in(&site, &region).await?;
        let ids: Vec<String> = group.iter().map(|(c, _)| c.image_id.clone()).collect();
        let images = retry_ec2("DescribeImages", BUDGET, || ec2.describe_images(&ids)).await?;
        for (mut copy, operation_id) in group {
            // CopyImage tags the copy; an EC2 that dropped the tags (moto
            // 5.2.5 accepts TagSpecifications on CopyImage and ignores them)
            // gets them once here, so the copy is found by its tags.
            let untagged = images
                .iter()
                .find(|i| i.id == copy.image_id)
                .is_some_and(|i| !i.tags.iter().any(|(k, _)| k == crate::ops::backup::TAG_OPERATION));
            if untagged {
                let tags = copy_tags(&site, &operation_id, &copy.source_image_id);
                let id = [copy.image_id.clone()];
                retry_ec2("CreateTags", BUDGET, || ec2.create_tags(&id, &tags)).await?;
            }
            match images.iter().find(|i| i.id == copy.image_id).map(|i| (i.state.as_str(), i.state_reason.clone())) {
                Some(("available", _)) => {
                    copy.state = CopyState::Available;
                    copy.completed_at_ms = now_ms();
                }
                Some(("failed" | "deregistered" | "invalid" | "error", reason)) => {
                    copy.state = CopyState::Failed;
                    copy.error = format!("{} became failed: {reason}", copy.image_id);
                    copy.image_id.clear();
                }
                Some(_) => continue,
                None => {
                    copy.state = CopyState::Failed;
                    copy.error = format!("{} is unknown to EC2 in {region}", copy.image_id);
                    copy.image_id.clear();
                }
            }
            tracing::info!(source = %copy.source_image_id, region = %copy.region, state = copy.state.as_str(), "copy state changed");
            engine.store.put_copy(&copy)?;
            changed += 1;
        }
    }
    Ok(changed)
}

fn site_of(engine: &Engine, image_id: &str) -> Result<Option<(Site, String)>, StepError> {
    let Some((site_id, operation_id)) = engine.store.backup_origin(image_id)? else { return Ok(None) };
    Ok(engine.store.site(&site_id)?.map(|s| (s, operation_id)))
}

/// Applies (or, with `dry_run`, only plans) retention for a site: its
/// backups in its region, then its copies in each DR region.
pub async fn apply_retention(engine: &Engine, site: &Site, dry_run: bool) -> Result<Vec<Decision>, StepError> {
    let policy = engine.policy(&site.id);
    let backups = engine.store.backups(&site.id)?;
    let in_use = engine.store.images_in_use()?;
    let decisions = retention::plan(&backups, &policy, &in_use, now_ms());
    if dry_run {
        return Ok(decisions);
    }
    let ec2 = engine.ec2.for_site(site).await?;
    for d in &decisions {
        let Some(b) = backups.iter().find(|b| b.image_id == d.image_id) else { continue };
        if d.keep {
            if b.fate != d.reason {
                engine.store.set_backup_state(&b.image_id, BackupState::Available, &d.reason)?;
            }
            continue;
        }
        engine.store.set_backup_state(&b.image_id, BackupState::Deleting, &d.reason)?;
        retention::delete_image(ec2.as_ref(), &b.image_id, &b.snapshot_ids).await?;
        engine.store.set_backup_state(&b.image_id, BackupState::Deleted, &d.reason)?;
        tracing::info!(site = %site.id, image = %b.image_id, reason = %d.reason, "backup deleted by retention");
    }
    for region in &policy.copy_regions {
        let copies: Vec<Copy> = engine
            .store
            .copies_in(&site.id, region)?
            .into_iter()
            .filter(|c| c.state == CopyState::Available)
            .collect();
        for mut old in copies.into_iter().skip(policy.copy_keep_last as usize) {
            if in_use.contains(&old.image_id) {
                continue;
            }
            let rec2 = engine.ec2_in(site, region).await?;
            let snaps = retry_ec2("DescribeImages", BUDGET, || rec2.describe_images(std::slice::from_ref(&old.image_id)))
                .await?
                .into_iter()
                .flat_map(|i| i.snapshot_ids)
                .collect::<Vec<_>>();
            retention::delete_image(rec2.as_ref(), &old.image_id, &snaps).await?;
            old.state = CopyState::Deleted;
            old.deleted_at_ms = now_ms();
            engine.store.put_copy(&old)?;
            tracing::info!(site = %site.id, region, image = %old.image_id, "copy deleted by retention");
        }
    }
    Ok(decisions)
}

