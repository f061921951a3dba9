//! Retention: which backups (and copies) to keep, which to delete, and
//! deleting them without orphaning a snapshot.
//!
//! Rules, in order: the newest completed backup is always kept; a backup in
//! use by a running operation is kept; the newest `keep_last` are kept; any
//! backup younger than `keep_for` is kept; the rest are deleted. Deleting
//! marks the backup `deleting` first, then deregisters the AMI, then deletes
//! each snapshot, then marks it `deleted`: a crash anywhere in between is
//! finished by the next run (both EC2 calls treat "not found" as done).

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use super::{Deps, EC2_RETRY_BUDGET, retry_ec2};
use crate::cloud::ec2::Ec2;
use crate::domain::model::{Backup, BackupState, Copy, CopyState, Millis, Site, now_ms};
use crate::domain::policy::Policy;
use crate::engine::StepError;

/// What retention decided about one backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub image_id: String,
    pub completed_at_ms: Millis,
    pub keep: bool,
    pub reason: String,
}

/// Decides the fate of each of a site's backups (`backups` newest first;
/// only `available` and `deleting` ones count: a `deleting` one is always
/// deleted, it was decided already).
pub fn plan(backups: &[Backup], policy: &Policy, in_use: &HashSet<String>, now: Millis) -> Vec<Decision> {
    let mut out = Vec::new();
    let mut rank = 0u32;
    for b in backups.iter().filter(|b| b.state != BackupState::Deleted) {
        let age = Duration::from_millis(now.saturating_sub(b.completed_at_ms));
        let (keep, reason) = if b.state == BackupState::Deleting {
            (false, "deletion already under way".to_owned())
        } else if rank == 0 {
            (true, "newest completed backup (always kept)".to_owned())
        } else if in_use.contains(&b.image_id) {
            (true, "in use by an active operation".to_owned())
        } else if rank < policy.keep_last {
            (true, format!("among the newest {}", policy.keep_last))
        } else if let Some(limit) = policy.keep_for.filter(|l| age < *l) {
            (true, format!("younger than {}", humantime::format_duration(limit)))
        } else {
            let age_text = humantime::format_duration(Duration::from_secs(age.as_secs()));
            match policy.keep_for {
                Some(limit) => (
                    false,
                    format!("beyond the newest {} and {age_text} old (older than {})", policy.keep_last, humantime::format_duration(limit)),
                ),
                None => (false, format!("beyond the newest {} ({age_text} old)", policy.keep_last)),
            }
        };
        if b.state == BackupState::Available {
            rank += 1;
        }
        out.push(Decision { image_id: b.image_id.clone(), completed_at_ms: b.completed_at_ms, keep, reason });
    }
    out
}

/// Deregisters an AMI and deletes its snapshots (in that order: a snapshot
/// of a registered AMI cannot be deleted).
pub async fn delete_image(ec2: &dyn Ec2, image_id: &str, snapshot_ids: &[String]) -> Result<(), crate::cloud::ec2::Ec2Error> {
    retry_ec2("DeregisterImage", EC2_RETRY_BUDGET, || ec2.deregister_image(image_id)).await?;
    for snap in snapshot_ids {
        retry_ec2("DeleteSnapshot", EC2_RETRY_BUDGET, || ec2.delete_snapshot(snap)).await?;
    }
    Ok(())
}

/// Which of a region's available copies (newest backup first) to delete:
/// beyond the newest `keep_last`, never the newest one, never one an
/// active operation protects.
pub fn copies_to_delete<'a>(copies: &'a [Copy], keep_last: u32, protected: &HashSet<String>) -> Vec<&'a Copy> {
    copies
        .iter()
        .enumerate()
        .filter(|(rank, c)| *rank > 0 && *rank >= keep_last as usize && !protected.contains(&c.image_id))
        .map(|(_, c)| c)
        .collect()
}

/// Applies (or, with `dry_run`, only plans) retention for a site: its
/// backups in its region, then its copies in each DR region.
pub async fn apply(deps: &Deps, site: &Site, dry_run: bool) -> Result<Vec<Decision>, StepError> {
    let policy = deps.policy(&site.id);
    let backups = deps.store.backups(site.id.clone()).await?;
    let protected = deps.store.protected_images().await?;
    let decisions = plan(&backups, &policy, &protected, now_ms());
    if dry_run {
        return Ok(decisions);
    }
    for d in &decisions {
        let Some(b) = backups.iter().find(|b| b.image_id == d.image_id) else { continue };
        if d.keep {
            if b.fate != d.reason {
                deps.store.set_backup_state(b.image_id.clone(), BackupState::Available, d.reason.clone()).await?;
            }
            continue;
        }
        deps.store.set_backup_state(b.image_id.clone(), BackupState::Deleting, d.reason.clone()).await?;
        // In the region the backup was taken in: after a failover into a DR
        // region the site's backups live in two.
        let ec2 = if b.region.is_empty() { deps.ec2(site).await? } else { deps.ec2_in(site, &b.region).await? };
        delete_image(ec2.as_ref(), &b.image_id, &b.snapshot_ids).await?;
        deps.store.set_backup_state(b.image_id.clone(), BackupState::Deleted, d.reason.clone()).await?;
        tracing::info!(site = %site.id, image = %b.image_id, reason = %d.reason, "backup deleted by retention");
    }
    // The configured DR regions, and home while the primary is away.
    let mut regions = policy.copy_regions.clone();
    regions.extend(deps.copy_regions(site).into_iter().filter(|r| !policy.copy_regions.contains(r)));
    for region in &regions {
        let copies = deps.store.available_copies_in(site.id.clone(), region.clone()).await?;
        for old in copies_to_delete(&copies, policy.copy_keep_last, &protected) {
            let rec2 = deps.ec2_in(site, region).await?;
            let snaps = retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || rec2.describe_images(std::slice::from_ref(&old.image_id)))
                .await?
                .into_iter()
                .flat_map(|i| i.snapshot_ids)
                .collect::<Vec<_>>();
            delete_image(rec2.as_ref(), &old.image_id, &snaps).await?;
            let mut old = old.clone();
            old.state = CopyState::Deleted;
            old.deleted_at_ms = now_ms();
            deps.store.put_copy(old.clone()).await?;
            tracing::info!(site = %site.id, region, image = %old.image_id, "copy deleted by retention");
        }
    }
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn backup(id: &str, completed: Millis) -> Backup {
        Backup {
            operation_id: format!("op-{id}"),
            snapshot_ids: vec![format!("snap-{id}")],
            ..crate::testkit::available_backup("s", "i-1", id, completed, completed)
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.image_id.as_str()).collect()
    }

    #[test]
    fn count_and_age_rules_combine() {
        let now = 100 * H;
        // Newest first: ages 1h, 2h, 3h, 30h, 50h, 70h.
        let list: Vec<Backup> = [1, 2, 3, 30, 50, 70].iter().map(|age| backup(&format!("ami-{age}"), now - age * H)).collect();
        let policy = Policy { keep_last: 2, keep_for: Some(Duration::from_secs(48 * 3600)), ..Policy::default() };
        let d = plan(&list, &policy, &HashSet::new(), now);
        assert_eq!(kept(&d), vec!["ami-1", "ami-2", "ami-3", "ami-30"]);
        assert!(d[4].reason.contains("older than 2days"), "{}", d[4].reason);
        // Count only.
        let policy = Policy { keep_last: 3, keep_for: None, ..Policy::default() };
        assert_eq!(kept(&plan(&list, &policy, &HashSet::new(), now)), vec!["ami-1", "ami-2", "ami-3"]);
    }

    #[test]
    fn the_newest_and_in_use_backups_are_never_deleted() {
        let now = 1000 * H;
        let list = vec![backup("ami-new", now - 900 * H), backup("ami-old", now - 950 * H), backup("ami-older", now - 990 * H)];
        let policy = Policy { keep_last: 1, keep_for: Some(Duration::from_secs(3600)), ..Policy::default() };
        let in_use: HashSet<String> = ["ami-older".to_owned()].into();
        let d = plan(&list, &policy, &in_use, now);
        assert_eq!(kept(&d), vec!["ami-new", "ami-older"]);
        assert!(d[0].reason.contains("newest completed"));
        assert!(d[2].reason.contains("in use"));
    }

    #[test]
    fn the_newest_copy_is_kept_whatever_keep_last_says() {
        let copy = |src: &str| Copy {
            source_image_id: src.into(),
            region: "r".into(),
            image_id: format!("{src}-c"),
            state: CopyState::Available,
            attempts: 1,
            error: String::new(),
            requested_at_ms: 0,
            completed_at_ms: 0,
            deleted_at_ms: 0,
        };
        let copies = vec![copy("a"), copy("b"), copy("c")];
        let names = |v: Vec<&Copy>| v.into_iter().map(|c| c.source_image_id.clone()).collect::<Vec<_>>();
        assert_eq!(names(copies_to_delete(&copies, 0, &HashSet::new())), vec!["b", "c"]);
        assert_eq!(names(copies_to_delete(&copies, 2, &HashSet::new())), vec!["c"]);
        let protected: HashSet<String> = ["c-c".to_owned()].into();
        assert!(copies_to_delete(&copies, 2, &protected).is_empty());
    }

    #[test]
    fn deleted_backups_do_not_count_and_deleting_ones_finish() {
        let now = 100 * H;
        let mut list = vec![backup("ami-a", now - H), backup("ami-b", now - 2 * H), backup("ami-c", now - 3 * H)];
        list[0].state = BackupState::Deleted;
        list[2].state = BackupState::Deleting;
        let policy = Policy { keep_last: 5, ..Policy::default() };
        let d = plan(&list, &policy, &HashSet::new(), now);
        assert_eq!(d.len(), 2);
        assert_eq!(kept(&d), vec!["ami-b"], "ami-b is now the newest; ami-c's deletion finishes");
    }
}
