//! The backup catalog against EC2: losing the controller's disk must not
//! lose a backup.
//!
//! - [`check`] (at start): a store that holds no backup while EC2 holds
//!   AMIs tagged by this deployment for a configured site was lost or
//!   replaced (for example by a plain copy of `state.db` without its WAL):
//!   the controller refuses to start, naming `dr-controller store rebuild`.
//! - [`rebuild`] (`dr-controller store rebuild`): recreates the catalog of
//!   backups and copies from the `dr:*` tags in EC2, for every configured
//!   site, in its region and its DR regions.
//! - `dr-controller store backup --to FILE` is [`crate::store::Store::backup_to`].

use crate::cloud::Ec2Clients;
use crate::cloud::ec2::Image;
use crate::config::Config;
use crate::domain::model::{Backup, BackupState, Consistency, Copy, CopyState, Site, now_ms};
use crate::domain::tags::TAG_SOURCE_IMAGE;
use crate::domain::tags::{CREATED_BY, TAG_CREATED_BY, TAG_OPERATION, TAG_SITE};
use crate::store::{Store, StoreError};
use crate::workflows::{EC2_RETRY_BUDGET, retry_ec2};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ec2(#[from] crate::cloud::ec2::Ec2Error),
    #[error(
        "the store {store} holds no backup, but EC2 holds {count} AMI(s) this deployment made for site `{site}` in {region} \
         (e.g. {example}): the store was lost or replaced. Run `dr-controller store rebuild --config ...` to recover the catalog \
         from EC2's tags (or restore a copy made with `dr-controller store backup`)"
    )]
    LostCatalog { store: String, site: String, region: String, count: usize, example: String },
}

fn tag<'a>(i: &'a Image, key: &str) -> Option<&'a str> {
    i.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn site_of(config: &Config, s: &crate::config::SiteConfig, store_site: Option<Site>) -> Site {
    store_site.unwrap_or(Site {
        id: s.id.clone(),
        region: config.site_region(s),
        primary_instance_id: s.instance_id.clone(),
        role_arn: s.role_arn.clone(),
    })
}

/// Our AMIs of `site` in `region` (backups and, with the source tag, copies).
async fn ours(ec2: &Ec2Clients, site: &Site, region: &str) -> Result<Vec<Image>, CatalogError> {
    let mut there = site.clone();
    there.region = region.to_owned();
    let client = ec2.for_site(&there).await?;
    let images = retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || client.find_images_by_tag(TAG_CREATED_BY, CREATED_BY)).await?;
    Ok(images.into_iter().filter(|i| tag(i, TAG_SITE) == Some(site.id.as_str())).collect())
}

/// At start: refuses a store that lost its catalog (see the module docs).
/// One DescribeImages per (region, role), whatever the number of sites.
/// Best effort: where the images cannot be listed, a warning, and the start
/// goes on (the backups' own steps will report the cause).
pub async fn check(config: &Config, store: &Store, ec2: &Ec2Clients) -> Result<(), CatalogError> {
    if store.count_backups().await? > 0 {
        return Ok(());
    }
    let mut groups: std::collections::BTreeMap<(String, Option<String>), Vec<Site>> = Default::default();
    // One read of every site, not one per configured site (10,000 at start).
    let mut stored: std::collections::HashMap<String, Site> = store.sites().await?.into_iter().map(|s| (s.id.clone(), s)).collect();
    for s in &config.sites {
        let site = site_of(config, s, stored.remove(&s.id));
        groups.entry((site.region.clone(), site.role_arn.clone())).or_default().push(site);
    }
    for ((region, _), sites) in groups {
        let images = match ec2.for_site(&sites[0]).await {
            Ok(client) => retry_ec2("DescribeImages", EC2_RETRY_BUDGET, || client.find_images_by_tag(TAG_CREATED_BY, CREATED_BY)).await,
            Err(e) => Err(e),
        };
        let images = match images {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(%region, error = %e, "cannot check the backup catalog against EC2 at start");
                continue;
            }
        };
        for site in &sites {
            // An AMI of an operation this store knows (a backup under way when
            // the controller stopped) is not a sign of a lost catalog.
            let mut unknown = Vec::new();
            for i in images
                .iter()
                .filter(|i| tag(i, TAG_SITE) == Some(site.id.as_str()) && tag(i, TAG_SOURCE_IMAGE).is_none() && i.state == "available")
            {
                let op = tag(i, TAG_OPERATION).unwrap_or_default().to_owned();
                if op.is_empty() || store.operation(op).await?.is_none() {
                    unknown.push(i.id.clone());
                }
            }
            if let Some(first) = unknown.first() {
                return Err(CatalogError::LostCatalog {
                    store: store.path().to_owned(),
                    site: site.id.clone(),
                    region: region.clone(),
                    count: unknown.len(),
                    example: first.clone(),
                });
            }
        }
    }
    Ok(())
}

/// What [`rebuild`] did.
#[derive(Debug, Default)]
pub struct Rebuilt {
    pub backups: Vec<String>,
    pub copies: Vec<String>,
    pub already: usize,
}

/// The backup's time from its operation id (`backup-YYYYMMDDtHHMMSS-xxxx`).
fn time_of(operation_id: &str) -> Option<u64> {
    let stamp = operation_id.split('-').nth(1)?;
    let fmt = time::macros::format_description!("[year][month][day]t[hour][minute][second]");
    let t = time::PrimitiveDateTime::parse(stamp, fmt).ok()?.assume_utc();
    u64::try_from(t.unix_timestamp()).ok().map(|s| s * 1000)
}

/// Recreates the catalog from EC2's tags. Backups already in the store are
/// left as they are; what is added is marked as rebuilt (its consistency is
/// not known: recorded as crash-consistent, the weakest claim).
pub async fn rebuild(config: &Config, store: &Store, ec2: &Ec2Clients) -> Result<Rebuilt, CatalogError> {
    let mut out = Rebuilt::default();
    for s in &config.sites {
        let site = store.upsert_site(site_of(config, s, None)).await?;
        let known: Vec<String> = store.backups(site.id.clone()).await?.into_iter().map(|b| b.image_id).collect();
        for image in ours(ec2, &site, &site.region).await? {
            if tag(&image, TAG_SOURCE_IMAGE).is_some() || image.state != "available" {
                continue;
            }
            if known.contains(&image.id) {
                out.already += 1;
                continue;
            }
            let operation_id = tag(&image, TAG_OPERATION).map(str::to_owned).unwrap_or_else(|| format!("backup-rebuilt-{}", image.id));
            let at = time_of(&operation_id).unwrap_or(0);
            let backup = Backup {
                image_id: image.id.clone(),
                site_id: site.id.clone(),
                operation_id: operation_id.clone(),
                region: site.region.clone(),
                instance_id: String::new(),
                snapshot_ids: image.snapshot_ids.clone(),
                started_at_ms: at,
                completed_at_ms: at,
                consistency: Consistency::Crash,
                app_state: "unknown".into(),
                state: BackupState::Available,
                fate: String::new(),
                deleted_at_ms: 0,
                quiesce: "unknown".into(),
                frozen_ms: 0,
                quiesce_note: "rebuilt from EC2 tags by `dr-controller store rebuild`: consistency not known".into(),
                copies: Vec::new(),
            };
            store.insert_rebuilt_backup(backup).await?;
            out.backups.push(image.id.clone());
        }
        let policy = config.site_policy(s).unwrap_or_default();
        for region in &policy.copy_regions {
            for image in ours(ec2, &site, region).await? {
                let Some(source) = tag(&image, TAG_SOURCE_IMAGE) else { continue };
                if image.state != "available" || store.backup_origin(source.to_owned()).await?.is_none() {
                    continue;
                }
                if store.copies_of(source.to_owned()).await?.iter().any(|c| c.region == *region) {
                    continue;
                }
                store
                    .put_copy(Copy {
                        source_image_id: source.to_owned(),
                        region: region.clone(),
                        image_id: image.id.clone(),
                        state: CopyState::Available,
                        attempts: 1,
                        error: String::new(),
                        requested_at_ms: now_ms(),
                        completed_at_ms: now_ms(),
                        deleted_at_ms: 0,
                    })
                    .await?;
                out.copies.push(format!("{region}:{}", image.id));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn backup_times_come_from_operation_ids() {
        assert_eq!(super::time_of("backup-20261201t120000-abcd1234"), Some(1_796_126_400_000));
        assert_eq!(super::time_of("backup-rebuilt-ami-1"), None);
    }
}
