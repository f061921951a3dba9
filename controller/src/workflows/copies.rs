//! Copies of backups in DR regions.
//!
//! A copy is recorded before CopyImage is called and carries a ClientToken
//! derived from the operation, the region and the attempt, so a repeated
//! call (after a crash or a retry) does not make a second copy. The
//! copy reconciler (`reconcilers::copies`) calls [`reconcile`], which drives every pending or failed copy to an end:
//! batched DescribeImages per region, retries of failed copies with backoff
//! (attempt n waits n × copy_poll), never forgetting one.

use std::collections::HashMap;
use std::time::Duration;

use crate::cloud::ec2::CopyImage;
use crate::domain::model::{Copy, CopyState, Site, now_ms};
use crate::domain::tags::TAG_SOURCE_IMAGE;
use crate::domain::tags::{CREATED_BY, TAG_CREATED_BY, TAG_OPERATION, TAG_SITE};
use crate::engine::StepError;
use crate::workflows::{Deps, EC2_RETRY_BUDGET as BUDGET, retry_ec2};

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
pub async fn start_copy(engine: &Deps, site: &Site, image_id: &str, operation_id: &str, region: &str) -> Result<Copy, StepError> {
    if let Some(existing) = engine.store.copies_of(image_id.to_owned()).await?.into_iter().find(|c| c.region == region)
        && (!existing.image_id.is_empty() || existing.state == CopyState::Failed)
    {
        return Ok(existing);
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
    engine.store.put_copy(copy.clone()).await?;
    issue(engine, site, &mut copy, operation_id).await?;
    Ok(copy)
}

/// Calls CopyImage for `copy` (attempt `copy.attempts`) and records the answer.
async fn issue(engine: &Deps, site: &Site, copy: &mut Copy, operation_id: &str) -> Result<(), StepError> {
    let result = async {
        let ec2 = engine.ec2_in(site, &copy.region).await?;
        // A copy may exist although its answer was lost (a crash, a timeout,
        // an emulator that ignores ClientTokens): adopt it rather than make
        // an untracked second one.
        let existing = retry_ec2("DescribeImages", BUDGET, || ec2.find_images_by_tag(TAG_SOURCE_IMAGE, &copy.source_image_id)).await?;
        if let Some(found) = existing.iter().find(|i| !matches!(i.state.as_str(), "failed" | "deregistered" | "invalid" | "error")) {
            tracing::info!(source = %copy.source_image_id, region = %copy.region, image = %found.id, "found this backup's copy already in EC2; adopting it");
            return Ok(found.id.clone());
        }
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
    engine.store.put_copy(copy.clone()).await?;
    Ok(())
}

/// The tags of a copy (set by CopyImage itself).
fn copy_tags(site: &Site, operation_id: &str, source_image_id: &str) -> Vec<(String, String)> {
    vec![
        (TAG_SITE.into(), site.id.clone()),
        (TAG_OPERATION.into(), operation_id.to_owned()),
        (TAG_CREATED_BY.into(), CREATED_BY.into()),
        (TAG_SOURCE_IMAGE.into(), source_image_id.to_owned()),
    ]
}

/// One pass over unfinished copies. Returns how many changed state.
pub async fn reconcile(engine: &Deps, every: Duration) -> Result<usize, StepError> {
    let copies = engine.store.unfinished_copies().await?;
    let mut changed = 0;
    // One DescribeImages per (site, region) for every pending copy there.
    let mut pending: HashMap<(String, String), Vec<(Copy, String)>> = HashMap::new();
    for copy in copies {
        let Some((site, operation_id)) = site_of(engine, &copy.source_image_id).await? else { continue };
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
        let Some(site) = engine.store.site(site_id.clone()).await? else { continue };
        let ec2 = engine.ec2_in(&site, &region).await?;
        let ids: Vec<String> = group.iter().map(|(c, _)| c.image_id.clone()).collect();
        let images = retry_ec2("DescribeImages", BUDGET, || ec2.describe_images(&ids)).await?;
        for (mut copy, operation_id) in group {
            // CopyImage tags the copy; an EC2 that dropped the tags (moto
            // 5.2.5 accepts TagSpecifications on CopyImage and ignores them)
            // gets them once here, so the copy is found by its tags.
            let untagged = images.iter().find(|i| i.id == copy.image_id).is_some_and(|i| !i.tags.iter().any(|(k, _)| k == TAG_OPERATION));
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
            engine.store.put_copy(copy.clone()).await?;
            changed += 1;
        }
    }
    Ok(changed)
}

async fn site_of(engine: &Deps, image_id: &str) -> Result<Option<(Site, String)>, StepError> {
    let Some((site_id, operation_id)) = engine.store.backup_origin(image_id.to_owned()).await? else { return Ok(None) };
    Ok(engine.store.site(site_id).await?.map(|s| (s, operation_id)))
}
