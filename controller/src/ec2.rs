//! What the controller asks of EC2, behind a trait so that the waiting and
//! resuming logic is unit-tested without AWS (moto makes every AMI available
//! at once, which hides waits), and an implementation on aws-sdk-ec2.
//!
//! Invariant: nothing here retries on its own beyond the SDK's configured
//! attempts; callers decide (see [`Ec2Error::is_retryable`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

use crate::config::AwsConfig;
use crate::model::Site;

/// An AMI as far as the controller cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    /// EC2's state: `pending`, `available`, `failed`, ... (an open set).
    pub state: String,
    pub state_reason: String,
    pub snapshot_ids: Vec<String>,
    pub tags: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: String,
    pub private_ip: String,
    pub public_ip: String,
}

#[derive(Clone, Debug)]
pub struct CreateImage {
    pub instance_id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<(String, String)>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error("EC2 {op} was throttled: {message}")]
    Throttled { op: &'static str, message: String },
    #[error("EC2 {op} failed: {code}: {message}")]
    Api { op: &'static str, code: String, message: String },
    #[error("EC2 {op} could not be sent: {message}")]
    Transport { op: &'static str, message: String },
    #[error("cannot set up AWS credentials for {what}: {message}")]
    Setup { what: String, message: String },
}

impl Ec2Error {
    /// Worth trying again after a pause: throttling, a network failure, or
    /// EC2 saying it is briefly unavailable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Ec2Error::Throttled { .. } | Ec2Error::Transport { .. } => true,
            Ec2Error::Api { code, .. } => matches!(code.as_str(), "InternalError" | "ServiceUnavailable" | "Unavailable"),
            Ec2Error::Setup { .. } => false,
        }
    }
}

#[async_trait]
pub trait Ec2: Send + Sync {
    /// Our own AMIs carrying tag `key=value`, in any state.
    async fn find_images_by_tag(&self, key: &str, value: &str) -> Result<Vec<Image>, Ec2Error>;
    /// CreateImage with NoReboot, tagging the image in the same call.
    async fn create_image(&self, req: &CreateImage) -> Result<String, Ec2Error>;
    async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error>;
    async fn create_tags(&self, resources: &[String], tags: &[(String, String)]) -> Result<(), Ec2Error>;
    /// `None` when EC2 does not know the instance.
    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error>;
    /// Many instances at once; unknown ids are absent from the answer.
    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Instance>, Ec2Error> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(i) = self.describe_instance(id).await? {
                out.push(i);
            }
        }
        Ok(out)
    }
    /// States of snapshots (`pending`, `completed`, `error`); unknown ids are absent.
    async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error>;
    /// Deregisters an AMI; an AMI EC2 no longer knows counts as done.
    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error>;
    /// Deletes a snapshot; a snapshot EC2 no longer knows counts as done.
    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error>;
    /// CopyImage into this client's region. `client_token` makes a retried
    /// call return the first call's image instead of a second copy.
    async fn copy_image(&self, req: &CopyImage) -> Result<String, Ec2Error>;
}

#[derive(Clone, Debug)]
pub struct CopyImage {
    pub source_region: String,
    pub source_image_id: String,
    pub name: String,
    pub description: String,
    pub client_token: String,
    pub tags: Vec<(String, String)>,
}

/// EC2 clients per (region, role), built on first use, each spending the
/// budget of its (account, region) (see [`crate::budget`]).
pub struct Ec2Clients {
    aws: AwsConfig,
    budgets: crate::budget::BudgetBook,
    cache: tokio::sync::Mutex<HashMap<(String, Option<String>), Arc<dyn Ec2>>>,
}

impl Ec2Clients {
    pub fn new(aws: AwsConfig) -> Self {
        let budgets = crate::budget::BudgetBook::new(aws.limits.clone());
        Ec2Clients { aws, budgets, cache: tokio::sync::Mutex::new(HashMap::new()) }
    }

    /// The client for a site's region and (optional) role.
    pub async fn for_site(&self, site: &Site) -> Result<Arc<dyn Ec2>, Ec2Error> {
        let key = (site.region.clone(), site.role_arn.clone());
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let raw: Arc<dyn Ec2> = Arc::new(AwsEc2::new(&self.aws, &site.region, site.role_arn.as_deref()).await?);
        let buckets = self.budgets.buckets(&crate::budget::account_of(site.role_arn.as_deref()), &site.region);
        let client: Arc<dyn Ec2> = Arc::new(crate::budget::Budgeted::new(raw, buckets));
        cache.insert(key, client.clone());
        Ok(client)
    }
}

/// EC2 through aws-sdk-ec2. Credentials come from aws-config's normal chain
/// (environment, profile, web identity, instance role), optionally followed
/// by an AssumeRole into the site's account.
pub struct AwsEc2 {
    client: aws_sdk_ec2::Client,
}

impl AwsEc2 {
    pub async fn new(aws: &AwsConfig, region: &str, role_arn: Option<&str>) -> Result<Self, Ec2Error> {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(aws_config::Region::new(region.to_owned()));
        if let Some(url) = &aws.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        let mut builder = aws_sdk_ec2::config::Builder::from(&sdk);
        if let Some(n) = aws.max_attempts {
            builder = builder.retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(n.max(1)));
        }
        if let Some(role) = role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("dr-controller")
                .configure(&sdk)
                .build()
                .await;
            builder = builder.credentials_provider(provider);
        }
        Ok(AwsEc2 { client: aws_sdk_ec2::Client::from_conf(builder.build()) })
    }
}

fn map_err<E, R>(op: &'static str, err: SdkError<E, R>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let message = err.message().map(str::to_owned).unwrap_or_else(|| DisplayErrorContext(&err).to_string());
    match (&err, err.code()) {
        (_, Some(code))
            if matches!(code, "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled") =>
        {
            Ec2Error::Throttled { op, message }
        }
        (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _) => Ec2Error::Transport { op, message },
        (_, code) => Ec2Error::Api { op, code: code.unwrap_or("Unknown").to_owned(), message },
    }
}

fn tags_of(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

fn image_of(i: &aws_sdk_ec2::types::Image) -> Image {
    Image {
        id: i.image_id().unwrap_or_default().to_owned(),
        state: i.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        state_reason: i.state_reason().and_then(|r| r.message()).unwrap_or_default().to_owned(),
        snapshot_ids: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
            .collect(),
        tags: i
            .tags()
            .iter()
            .map(|t| (t.key().unwrap_or_default().to_owned(), t.value().unwrap_or_default().to_owned()))
            .collect(),
    }
}

#[async_trait]
impl Ec2 for AwsEc2 {
    async fn find_images_by_tag(&self, key: &str, value: &str) -> Result<Vec<Image>, Ec2Error> {
        let out = self
            .client
            .describe_images()
            .owners("self")
            .filters(Filter::builder().name(format!("tag:{key}")).values(value).build())
            .send()
            .await
            .map_err(|e| map_err("DescribeImages", e))?;
        Ok(out.images().iter().map(image_of).collect())
    }

    async fn create_image(&self, req: &CreateImage) -> Result<String, Ec2Error> {
        let out = self
            .client
            .create_image()
            .instance_id(&req.instance_id)
            .name(&req.name)
            .description(&req.description)
            .no_reboot(true)
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Image).set_tags(Some(tags_of(&req.tags))).build(),
            )
            .send()
            .await
            .map_err(|e| map_err("CreateImage", e))?;
        out.image_id().map(str::to_owned).ok_or_else(|| Ec2Error::Api {
            op: "CreateImage",
            code: "EmptyResponse".into(),
            message: "the answer carries no image id".into(),
        })
    }

    async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error> {
        let out = self
            .client
            .describe_images()
            .set_image_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| map_err("DescribeImages", e))?;
        Ok(out.images().iter().map(image_of).collect())
    }

    async fn create_tags(&self, resources: &[String], tags: &[(String, String)]) -> Result<(), Ec2Error> {
        self.client
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(tags_of(tags)))
            .send()
            .await
            .map_err(|e| map_err("CreateTags", e))?;
        Ok(())
    }

    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error> {
        let out = match self.client.describe_instances().instance_ids(id).send().await {
            Ok(out) => out,
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => return Ok(None),
            Err(e) => return Err(map_err("DescribeInstances", e)),
        };
        Ok(out.reservations().iter().flat_map(|r| r.instances()).find(|i| i.instance_id() == Some(id)).map(|i| {
            Instance {
                id: id.to_owned(),
                state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_owned()).unwrap_or_default(),
                private_ip: i.private_ip_address().unwrap_or_default().to_owned(),
                public_ip: i.public_ip_address().unwrap_or_default().to_owned(),
            }
        }))
    }

    async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
        let out = match self.client.describe_snapshots().set_snapshot_ids(Some(ids.to_vec())).send().await {
            Ok(out) => out,
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => return Ok(vec![]),
            Err(e) => return Err(map_err("DescribeSnapshots", e)),
        };
        Ok(out
            .snapshots()
            .iter()
            .map(|s| {
                (
                    s.snapshot_id().unwrap_or_default().to_owned(),
                    s.state().map(|st| st.as_str().to_owned()).unwrap_or_default(),
                )
            })
            .collect())
    }

    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        match self.client.deregister_image().image_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")) => Ok(()),
            Err(e) => Err(map_err("DeregisterImage", e)),
        }
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
        match self.client.delete_snapshot().snapshot_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(map_err("DeleteSnapshot", e)),
        }
    }

    async fn copy_image(&self, req: &CopyImage) -> Result<String, Ec2Error> {
        let out = self
            .client
            .copy_image()
            .source_region(&req.source_region)
            .source_image_id(&req.source_image_id)
            .name(&req.name)
            .description(&req.description)
            .client_token(&req.client_token)
            .send()
            .await
            .map_err(|e| map_err("CopyImage", e))?;
        let id = out.image_id().map(str::to_owned).ok_or_else(|| Ec2Error::Api {
            op: "CopyImage",
            code: "EmptyResponse".into(),
            message: "the answer carries no image id".into(),
        })?;
        // CopyImage cannot tag in the same call: tag right after (a retry with
        // the same token returns the same id, so tagging again is harmless).
        self.create_tags(std::slice::from_ref(&id), &req.tags).await?;
        Ok(id)
    }
}
