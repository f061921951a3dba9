//! `dr-controller preflight`: does this deployment's AWS identity have every
//! permission the configured sites need?
//!
//! For each site it assumes the site's role (if any), makes the read-only
//! calls the controller makes (DescribeInstances, DescribeImages,
//! DescribeSnapshots), and sends every mutating call with `DryRun=true`
//! (CreateImage, CreateTags, DeregisterImage, DeleteSnapshot; for a failover
//! RunInstances from the newest backup, StopInstances, StartInstances (host
//! restart), TerminateInstances,
//! ModifyInstanceAttribute with `fence = "terminate"`, AssociateAddress of
//! the instance's Elastic IP; and CopyImage into each DR region plus the
//! copy-retention calls there): EC2 answers
//! `DryRunOperation` when the call would be allowed and
//! `UnauthorizedOperation` when it would not, and changes nothing.
//!
//! The site's primary must carry the tag `dr:site=<site>` (the policy's
//! instance statements require it; the controller adds it at adoption):
//! a missing or wrong tag is reported with the command that fixes it.
//!
//! Tag conditions are evaluated on real resources: the site's newest backup
//! (found by its `dr:site` tag) is the AMI and snapshot acted on. Before the
//! first backup there is none; EC2 may then answer "not found" instead of
//! judging the permission, and the line says "not checked".

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};

use crate::cloud::ec2::{AwsEc2, Ec2, Ec2Error, is_permission_code};
use crate::config::{Config, SiteConfig};

/// Stand-ins when the site has no backup yet.
const NO_IMAGE: &str = "ami-00000000000000000";
const NO_SNAPSHOT: &str = "snap-00000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("site `{0}` is not in the configuration")]
    UnknownSite(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied(String),
    /// EC2 answered something that says nothing about the permission.
    NotChecked(String),
}

/// One action of one site.
#[derive(Clone, Debug)]
pub struct Check {
    pub site: String,
    pub region: String,
    pub action: &'static str,
    pub resource: String,
    pub verdict: Verdict,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = match &self.verdict {
            Verdict::Allowed => "allowed".to_owned(),
            Verdict::Denied(m) => format!("DENIED ({m})"),
            Verdict::NotChecked(m) => format!("not checked ({m})"),
        };
        write!(f, "{:<16} {:<12} {:<20} {:<36} {verdict}", self.site, self.region, self.action, self.resource)
    }
}

/// Checks every configured site, or only `only`.
pub async fn run(config: &Config, only: Option<&str>) -> Result<Vec<Check>, PreflightError> {
    let sites: Vec<&SiteConfig> = config.sites.iter().filter(|s| only.is_none_or(|o| o == s.id)).collect();
    if let Some(o) = only
        && sites.is_empty()
    {
        return Err(PreflightError::UnknownSite(o.to_owned()));
    }
    let mut checks = Vec::new();
    for site in sites {
        check_site(config, site, &mut checks).await;
    }
    Ok(checks)
}

async fn check_site(config: &Config, site: &SiteConfig, out: &mut Vec<Check>) {
    let region = config.site_region(site);
    let mut push = |region: &str, action: &'static str, resource: &str, verdict: Verdict| {
        out.push(Check { site: site.id.clone(), region: region.to_owned(), action, resource: resource.to_owned(), verdict })
    };
    let Some(ec2) = connect(config, site, &region, &mut push).await else { return };

    let (verdict, primary) = match ec2.describe_instance(&site.instance_id).await {
        Ok(Some(i)) => (Verdict::Allowed, Some(i)),
        Ok(None) => (Verdict::NotChecked(format!("allowed, but EC2 does not know instance {}", site.instance_id)), None),
        Err(e) => (verdict_of_error(e), None),
    };
    push(&region, "ec2:DescribeInstances", &site.instance_id, verdict);
    if let Some(primary) = &primary {
        push(&region, "tag dr:site", &site.instance_id, site_tag_verdict(site, primary));
    }
    // The health monitor's view of the instance (status checks, events).
    let verdict = match ec2.describe_instance_status(std::slice::from_ref(&site.instance_id)).await {
        Ok(_) => Verdict::Allowed,
        Err(e) => verdict_of_error(e),
    };
    push(&region, "ec2:DescribeInstanceStatus", &site.instance_id, verdict);

    // The newest backup of the site, to act on real, tagged resources.
    let (image, snapshot) = match ec2.find_images_by_tag(crate::domain::tags::TAG_SITE, &site.id).await {
        Ok(images) => {
            push(&region, "ec2:DescribeImages", "*", Verdict::Allowed);
            let newest = images.into_iter().filter(|i| i.state == "available").max_by(|a, b| a.id.cmp(&b.id));
            match newest {
                Some(i) => {
                    let snap = i.snapshot_ids.first().cloned().unwrap_or_else(|| NO_SNAPSHOT.into());
                    (i.id, snap)
                }
                None => (NO_IMAGE.to_owned(), NO_SNAPSHOT.to_owned()),
            }
        }
        Err(e) => {
            push(&region, "ec2:DescribeImages", "*", verdict_of_error(e));
            (NO_IMAGE.to_owned(), NO_SNAPSHOT.to_owned())
        }
    };
    let verdict = match ec2.describe_snapshots(std::slice::from_ref(&snapshot)).await {
        Ok(_) => Verdict::Allowed,
        Err(e) => verdict_of_error(e),
    };
    push(&region, "ec2:DescribeSnapshots", "*", verdict);

    let tags = tags_for(site, None);
    let copy_tags = tags_for(site, Some(&image));
    let sdk = ec2.sdk();
    let r = sdk
        .create_image()
        .dry_run(true)
        .instance_id(&site.instance_id)
        .name(format!("dr-{}-preflight", site.id))
        .no_reboot(true)
        .tag_specifications(tag_spec(ResourceType::Image, &tags))
        .send()
        .await;
    push(&region, "ec2:CreateImage", &site.instance_id, dry_run_verdict(r));
    let r = sdk.create_tags().dry_run(true).resources(&snapshot).set_tags(Some(tags.clone())).send().await;
    push(&region, "ec2:CreateTags", &snapshot, dry_run_verdict(r));
    let r = sdk.deregister_image().dry_run(true).image_id(&image).send().await;
    push(&region, "ec2:DeregisterImage", &image, dry_run_verdict(r));
    let r = sdk.delete_snapshot().dry_run(true).snapshot_id(&snapshot).send().await;
    push(&region, "ec2:DeleteSnapshot", &snapshot, dry_run_verdict(r));

    restore_checks(site, &region, sdk, &image, &mut push).await;

    let policy = match config.site_policy(site) {
        Ok(p) => p,
        Err((key, message)) => {
            push(&region, "ec2:CopyImage", "*", Verdict::NotChecked(format!("policy.{key}: {message}")));
            return;
        }
    };
    for dr in &policy.copy_regions {
        let Some(dr_ec2) = connect(config, site, dr, &mut push).await else { continue };
        let sdk = dr_ec2.sdk();
        let r = sdk
            .copy_image()
            .dry_run(true)
            .source_region(&region)
            .source_image_id(&image)
            .name(format!("dr-{}-preflight-copy", site.id))
            .tag_specifications(tag_spec(ResourceType::Image, &copy_tags))
            .tag_specifications(tag_spec(ResourceType::Snapshot, &copy_tags))
            .send()
            .await;
        push(dr, "ec2:CopyImage", &image, dry_run_verdict(r));
        let verdict = match dr_ec2.describe_images(&[NO_IMAGE.to_owned()]).await {
            Ok(_) => Verdict::Allowed,
            Err(Ec2Error::Api { code, .. }) if code.starts_with("InvalidAMIID") => Verdict::Allowed,
            Err(e) => verdict_of_error(e),
        };
        push(dr, "ec2:DescribeImages", "*", verdict);
        // Copy retention in the DR region (on stand-ins: the copies' ids
        // are in the controller's store, not in the configuration).
        let r = sdk.deregister_image().dry_run(true).image_id(NO_IMAGE).send().await;
        push(dr, "ec2:DeregisterImage", NO_IMAGE, dry_run_verdict(r));
        let r = sdk.delete_snapshot().dry_run(true).snapshot_id(NO_SNAPSHOT).send().await;
        push(dr, "ec2:DeleteSnapshot", NO_SNAPSHOT, dry_run_verdict(r));
    }
}

/// What a failover of the site will ask of EC2, with `DryRun`: launching
/// from its newest backup, fencing its instance, moving its Elastic IP.
/// (Route 53 has no dry run: its permissions are checked when the record
/// moves.)
async fn restore_checks(
    site: &SiteConfig,
    region: &str,
    sdk: &aws_sdk_ec2::Client,
    image: &str,
    push: &mut impl FnMut(&str, &'static str, &str, Verdict),
) {
    let instance_type = site.launch.home.instance_type.clone().unwrap_or_else(|| "m5.xlarge".to_owned());
    let mut tags = tags_for(site, None);
    tags.push(Tag::builder().key(crate::domain::tags::TAG_ROLE).value("candidate").build());
    let r = sdk
        .run_instances()
        .dry_run(true)
        .image_id(image)
        .instance_type(aws_sdk_ec2::types::InstanceType::from(instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .tag_specifications(tag_spec(ResourceType::Instance, &tags))
        .send()
        .await;
    push(region, "ec2:RunInstances", image, dry_run_verdict(r));
    // The fence and rung 2 (host restart: stop, then start the same
    // instance), on the primary itself: the policy allows them on
    // instances tagged `dr:site` only.
    let r = sdk.stop_instances().dry_run(true).instance_ids(&site.instance_id).send().await;
    push(region, "ec2:StopInstances", &site.instance_id, dry_run_verdict(r));
    let r = sdk.start_instances().dry_run(true).instance_ids(&site.instance_id).send().await;
    push(region, "ec2:StartInstances", &site.instance_id, dry_run_verdict(r));
    let r = sdk.terminate_instances().dry_run(true).instance_ids(&site.instance_id).send().await;
    push(region, "ec2:TerminateInstances", &site.instance_id, dry_run_verdict(r));
    if site.fence == crate::domain::recovery::Fence::Terminate {
        let r = sdk
            .modify_instance_attribute()
            .dry_run(true)
            .instance_id(&site.instance_id)
            .disable_api_termination(aws_sdk_ec2::types::AttributeBooleanValue::builder().value(false).build())
            .send()
            .await;
        push(region, "ec2:ModifyInstanceAttribute", &site.instance_id, dry_run_verdict(r));
    }
    let addresses = sdk
        .describe_addresses()
        .filters(aws_sdk_ec2::types::Filter::builder().name("instance-id").values(&site.instance_id).build())
        .send()
        .await;
    match addresses {
        Ok(out) => {
            push(region, "ec2:DescribeAddresses", "*", Verdict::Allowed);
            match out.addresses().first().and_then(|a| a.allocation_id()) {
                Some(alloc) => {
                    let r = sdk
                        .associate_address()
                        .dry_run(true)
                        .allocation_id(alloc)
                        .instance_id(&site.instance_id)
                        .allow_reassociation(true)
                        .send()
                        .await;
                    push(region, "ec2:AssociateAddress", alloc, dry_run_verdict(r));
                }
                None => push(
                    region,
                    "ec2:AssociateAddress",
                    "*",
                    Verdict::NotChecked(format!("{} has no Elastic IP to move", site.instance_id)),
                ),
            }
        }
        Err(e) => {
            let verdict = match e.code() {
                Some(code) if is_permission_code(code) => Verdict::Denied(e.message().unwrap_or(code).to_owned()),
                _ => Verdict::NotChecked(DisplayErrorContext(&e).to_string()),
            };
            push(region, "ec2:DescribeAddresses", "*", verdict);
        }
    }
}

/// The client of a site in `region`; with a role, the AssumeRole is the
/// first check (and nothing else can be checked when it is refused).
async fn connect(
    config: &Config,
    site: &SiteConfig,
    region: &str,
    push: &mut impl FnMut(&str, &'static str, &str, Verdict),
) -> Option<AwsEc2> {
    match AwsEc2::new(&config.aws, region, site.role_arn.as_deref(), super::CallGate::default()).await {
        Ok(ec2) => {
            if let Some(role) = &site.role_arn {
                push(region, "sts:AssumeRole", role, Verdict::Allowed);
            }
            Some(ec2)
        }
        Err(e) => {
            let resource = site.role_arn.clone().unwrap_or_else(|| "credentials".into());
            let action = if site.role_arn.is_some() { "sts:AssumeRole" } else { "ec2:*" };
            push(region, action, &resource, verdict_of_error(e));
            None
        }
    }
}

/// The tags a backup of this site carries (what the tag conditions test);
/// a copy also names its source image.
fn tags_for(site: &SiteConfig, source_image: Option<&str>) -> Vec<Tag> {
    let mut tags = vec![
        (crate::domain::tags::TAG_SITE, site.id.as_str()),
        (crate::domain::tags::TAG_OPERATION, "preflight"),
        (crate::domain::tags::TAG_CREATED_BY, crate::domain::tags::CREATED_BY),
    ];
    if let Some(source) = source_image {
        tags.push(("dr:source-image", source));
    }
    tags.iter().map(|(k, v)| Tag::builder().key(*k).value(*v).build()).collect()
}

fn tag_spec(kind: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder().resource_type(kind).set_tags(Some(tags.to_vec())).build()
}

/// The site's primary must carry `dr:site=<site>`: the shipped policy
/// allows StopInstances, StartInstances, TerminateInstances and
/// ModifyInstanceAttribute only on instances with that tag. The controller
/// adds it when the site's agent first connects (adoption); until then, or
/// when the tag is wrong, say how to fix it.
fn site_tag_verdict(site: &SiteConfig, primary: &crate::cloud::ec2::Instance) -> Verdict {
    let tag = crate::domain::tags::TAG_SITE;
    let fix = format!("aws ec2 create-tags --resources {} --tags Key={tag},Value={}", primary.id, site.id);
    match primary.tags.iter().find(|(k, _)| k == tag) {
        Some((_, v)) if *v == site.id => Verdict::Allowed,
        Some((_, v)) => Verdict::Denied(format!(
            "{} is tagged {tag}={v}, not {}: the controller does not retag it, and host restarts and fences act on \
             another site's instance (fix the tag: aws ec2 delete-tags, then {fix})",
            primary.id, site.id
        )),
        None => Verdict::Denied(format!(
            "{} has no {tag} tag: the policy denies stopping, starting or terminating it (host restart, fence) until it \
             has; the controller adds it when the site's agent connects, or run: {fix}",
            primary.id
        )),
    }
}

fn verdict_of_error(e: Ec2Error) -> Verdict {
    match e {
        Ec2Error::PermissionDenied { message, .. } => Verdict::Denied(message),
        other => Verdict::NotChecked(other.to_string()),
    }
}

/// A DryRun's answer: `DryRunOperation` means allowed.
fn dry_run_verdict<T, E, R>(r: Result<T, SdkError<E, R>>) -> Verdict
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match r {
        // Only an emulator that ignores DryRun gets here.
        Ok(_) => Verdict::NotChecked("EC2 ignored DryRun and performed the call".into()),
        Err(e) => match e.code() {
            Some("DryRunOperation") => Verdict::Allowed,
            Some(code) if is_permission_code(code) => Verdict::Denied(e.message().unwrap_or(code).to_owned()),
            Some(code) if code.ends_with(".NotFound") => {
                Verdict::NotChecked(format!("{code}: nothing to act on yet; run preflight again after the first backup"))
            }
            Some(code) => Verdict::NotChecked(format!("{code}: {}", e.message().unwrap_or_default())),
            None => Verdict::NotChecked(DisplayErrorContext(&e).to_string()),
        },
    }
}

/// True when no check was denied.
pub fn all_allowed(checks: &[Check]) -> bool {
    !checks.iter().any(|c| matches!(c.verdict, Verdict::Denied(_)))
}
