//! What the controller asks of EC2, behind a trait so that the waiting and
//! resuming logic is unit-tested without AWS (moto makes every AMI available
//! at once, which hides waits), and an implementation on aws-sdk-ec2.
//!
//! Invariant: nothing here retries on its own; the SDK's retry layer is off
//! unless `[aws] max_attempts` says otherwise, so every throttle reaches the
//! controller's `retry_ec2`, which counts and budgets it (see
//! [`Ec2Error::is_retryable`]). A permission EC2 or STS refuses becomes
//! [`Ec2Error::PermissionDenied`], naming the action and the resource.

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

pub use super::instance_state::InstanceState;
use crate::config::AwsConfig;

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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    pub private_ip: String,
    pub public_ip: String,
    /// The AMI it was launched from.
    pub image_id: String,
    pub tags: Vec<(String, String)>,
}

/// DescribeInstanceStatus of one instance (with IncludeAllInstances).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceStatus {
    pub id: String,
    pub state: InstanceState,
    /// The system status check: `ok`, `impaired`, `initializing`,
    /// `insufficient-data`, `not-applicable`.
    pub system: String,
    /// The instance status check (same values).
    pub instance: String,
    /// The attached EBS status check (same values; "" when not reported).
    pub ebs: String,
    /// Scheduled events not yet completed: (code, not-before, RFC 3339).
    pub events: Vec<(String, String)>,
}

/// At most this many instance ids per DescribeInstanceStatus (EC2's limit).
pub const STATUS_IDS_PER_CALL: usize = 100;

/// An EBS volume, as the drill teardown and reaper see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    /// `creating`, `available`, `in-use`, `deleting`, `deleted`, `error`.
    pub state: String,
    pub tags: Vec<(String, String)>,
}

/// A RunInstances of one instance.
#[derive(Clone, Debug, Default)]
pub struct RunInstance {
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    /// Empty: EC2 picks one in the subnet.
    pub private_ip: String,
    pub security_group_ids: Vec<String>,
    /// Used only without a subnet.
    pub availability_zone: String,
    /// ARN of an IAM instance profile, or empty.
    pub iam_instance_profile: String,
    pub key_name: String,
    /// Idempotency token: a repeat of the same call returns the first
    /// call's instance (≤ 64 ASCII characters).
    pub client_token: String,
    /// On the instance and its volumes.
    pub tags: Vec<(String, String)>,
}

/// An Elastic IP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Address {
    pub allocation_id: String,
    pub public_ip: String,
    /// The instance it is associated with ("" if none).
    pub instance_id: String,
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
    /// EC2 (`UnauthorizedOperation`, `AccessDenied`, `AuthFailure`, ...) or
    /// STS (AssumeRole) refused the caller. `action` is the IAM action
    /// (`ec2:DeregisterImage`, `sts:AssumeRole`), `resource` what it acted on.
    #[error("permission denied: {action} on {resource} ({message})")]
    PermissionDenied { op: &'static str, action: String, resource: String, message: String },
}

impl Ec2Error {
    /// Worth trying again after a pause: throttling, a network failure, or
    /// EC2 saying it is briefly unavailable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Ec2Error::Throttled { .. } | Ec2Error::Transport { .. } => true,
            Ec2Error::Api { code, .. } => matches!(code.as_str(), "InternalError" | "ServiceUnavailable" | "Unavailable"),
            Ec2Error::Setup { .. } | Ec2Error::PermissionDenied { .. } => false,
        }
    }
}

/// Error codes with which EC2 and STS refuse a caller's permissions or
/// credentials.
pub fn is_permission_code(code: &str) -> bool {
    matches!(
        code,
        "UnauthorizedOperation"
            | "AccessDenied"
            | "AccessDeniedException"
            | "AuthFailure"
            | "UnauthorizedAccess"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
    )
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
    /// The instances EC2 knows among `ids` (≤ 1000); unknown ids are absent,
    /// never an error for the whole batch. The default asks one by one.
    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Instance>, Ec2Error> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.describe_instance(id).await?);
        }
        Ok(out)
    }
    /// DescribeInstanceStatus with IncludeAllInstances of at most
    /// [`STATUS_IDS_PER_CALL`] instances; ids EC2 does not know are absent.
    async fn describe_instance_status(&self, ids: &[String]) -> Result<Vec<InstanceStatus>, Ec2Error> {
        Err(unsupported("DescribeInstanceStatus", &ids.join(",")))
    }
    /// States of snapshots (`pending`, `completed`, `error`); unknown ids are absent.
    async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error>;
    /// Deregisters an AMI; an AMI EC2 no longer knows counts as done.
    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error>;
    /// Deletes a snapshot; a snapshot EC2 no longer knows counts as done.
    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error>;
    /// CopyImage into this client's region, tagging the new AMI and its
    /// snapshots in the same call. `client_token` makes a retried call
    /// return the first call's image instead of a second copy.
    async fn copy_image(&self, req: &CopyImage) -> Result<String, Ec2Error>;

    // ---- restore and failover. The defaults say "not supported", so that
    // test doubles implement only what they exercise.

    /// What a restore needs to launch a replacement of `instance_id` (its
    /// type, placement, network, profile, volumes, Elastic IP); `None` when
    /// EC2 does not know the instance.
    async fn launch_facts(&self, instance_id: &str) -> Result<Option<crate::domain::model::LaunchFacts>, Ec2Error> {
        Err(unsupported("DescribeInstances", instance_id))
    }
    /// Instances carrying tag `key=value` that are not terminated.
    async fn find_instances_by_tag(&self, key: &str, value: &str) -> Result<Vec<Instance>, Ec2Error> {
        Err(unsupported("DescribeInstances", &format!("tag:{key}={value}")))
    }
    /// RunInstances of exactly one instance.
    async fn run_instance(&self, req: &RunInstance) -> Result<Instance, Ec2Error> {
        Err(unsupported("RunInstances", &req.image_id))
    }
    /// StopInstances (`force`: without a clean OS shutdown).
    async fn stop_instance(&self, id: &str, force: bool) -> Result<(), Ec2Error> {
        let _ = force;
        Err(unsupported("StopInstances", id))
    }
    async fn terminate_instance(&self, id: &str) -> Result<(), Ec2Error> {
        Err(unsupported("TerminateInstances", id))
    }
    /// StartInstances of a stopped instance (a hot spare).
    async fn start_instance(&self, id: &str) -> Result<(), Ec2Error> {
        Err(unsupported("StartInstances", id))
    }
    /// Sets DeleteOnTermination=false on these devices of an instance, so
    /// that terminating it keeps its volumes.
    async fn keep_volumes(&self, id: &str, devices: &[String]) -> Result<(), Ec2Error> {
        let _ = devices;
        Err(unsupported("ModifyInstanceAttribute", id))
    }
    /// Volumes carrying the tag `key=value`.
    async fn find_volumes_by_tag(&self, key: &str, value: &str) -> Result<Vec<Volume>, Ec2Error> {
        Err(unsupported("DescribeVolumes", &format!("tag:{key}={value}")))
    }
    /// DeleteVolume (a volume already gone is not an error).
    async fn delete_volume(&self, id: &str) -> Result<(), Ec2Error> {
        Err(unsupported("DeleteVolume", id))
    }
    /// The Elastic IP with this allocation id; `None` if EC2 does not know it.
    async fn describe_address(&self, allocation_id: &str) -> Result<Option<Address>, Ec2Error> {
        Err(unsupported("DescribeAddresses", allocation_id))
    }
    /// AssociateAddress with AllowReassociation: moves the Elastic IP.
    async fn associate_address(&self, allocation_id: &str, instance_id: &str) -> Result<(), Ec2Error> {
        let _ = instance_id;
        Err(unsupported("AssociateAddress", allocation_id))
    }
}

fn unsupported(op: &'static str, resource: &str) -> Ec2Error {
    Ec2Error::Api { op, code: "NotSupported".into(), message: format!("this EC2 client does not implement {op} ({resource})") }
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

/// EC2 through aws-sdk-ec2. Credentials come from aws-config's normal chain
/// (environment, profile, web identity, instance role), optionally followed
/// by an AssumeRole into the site's account.
pub struct AwsEc2 {
    client: aws_sdk_ec2::Client,
    role_arn: Option<String>,
}

impl AwsEc2 {
    pub async fn new(aws: &AwsConfig, region: &str, role_arn: Option<&str>, gate: super::CallGate) -> Result<Self, Ec2Error> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(aws_config::Region::new(region.to_owned()));
        if let Some(url) = &aws.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        // One attempt per call unless configured: throttles are retried
        // (and counted, and budgeted) by the controller's own retry_ec2.
        let attempts = aws.max_attempts.unwrap_or(1).max(1);
        loader = loader.retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts));
        let sdk = loader.load().await;
        let mut builder = aws_sdk_ec2::config::Builder::from(&sdk).interceptor(gate);
        if let Some(role) = role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role).session_name("dr-controller").configure(&sdk).build().await;
            // Assume the role once now, so that a refusal is a clear error
            // naming the role rather than a failure of some later EC2 call.
            use aws_credential_types::provider::ProvideCredentials;
            if let Err(e) = provider.provide_credentials().await {
                return Err(assume_role_error(role, DisplayErrorContext(&e).to_string()));
            }
            builder = builder.credentials_provider(provider);
        }
        Ok(AwsEc2 { client: aws_sdk_ec2::Client::from_conf(builder.build()), role_arn: role_arn.map(str::to_owned) })
    }

    /// The SDK client (for `preflight`'s DryRun calls).
    pub fn sdk(&self) -> &aws_sdk_ec2::Client {
        &self.client
    }

    /// Maps an SDK error of EC2 operation `op` acting on `resource`.
    fn err<E, R>(&self, op: &'static str, resource: &str, err: SdkError<E, R>) -> Ec2Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        map_err(op, resource, self.role_arn.as_deref(), err)
    }

    /// A describe by instance ids, where one id EC2 does not know fails the
    /// whole call (`InvalidInstanceID.NotFound`): drops the ids the error
    /// names and asks again (each round removes at least one), or asks one
    /// by one when the message names none of ours. Unknown ids are absent
    /// from the answer.
    async fn without_unknown_ids<T, E, R, F, Fut>(&self, op: &'static str, ids: &[String], call: F) -> Result<Vec<T>, Ec2Error>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        const NOT_FOUND: Option<&str> = Some("InvalidInstanceID.NotFound");
        let mut asked: Vec<String> = ids.to_vec();
        while !asked.is_empty() {
            match call(asked.clone()).await {
                Ok(found) => return Ok(found),
                Err(e) if e.code() == NOT_FOUND => {
                    let missing = missing_instance_ids(e.message().unwrap_or_default(), &asked);
                    if !missing.is_empty() {
                        asked.retain(|a| !missing.contains(a));
                        continue;
                    }
                    if asked.len() == 1 {
                        return Ok(vec![]);
                    }
                    let mut out = Vec::new();
                    for id in &asked {
                        match call(vec![id.clone()]).await {
                            Ok(found) => out.extend(found),
                            Err(e) if e.code() == NOT_FOUND => {}
                            Err(e) => return Err(self.err(op, id, e)),
                        }
                    }
                    return Ok(out);
                }
                Err(e) => return Err(self.err(op, "*", e)),
            }
        }
        Ok(vec![])
    }
}

/// An AssumeRole that failed while credentials were being fetched.
/// `text` is the whole error chain (the code is deep inside it).
fn assume_role_error(role: &str, text: String) -> Ec2Error {
    if ["AccessDenied", "not authorized", "InvalidClientTokenId", "SignatureDoesNotMatch"].iter().any(|c| text.contains(c)) {
        // STS's own words when the chain carries its XML answer (it does
        // when the SDK could not parse it), not the whole chain.
        let message =
            text.split_once("<Message>").and_then(|(_, rest)| rest.split_once("</Message>")).map(|(m, _)| m.to_owned()).unwrap_or(text);
        Ec2Error::PermissionDenied { op: "AssumeRole", action: "sts:AssumeRole".into(), resource: role.to_owned(), message }
    } else {
        Ec2Error::Setup { what: format!("role {role}"), message: text }
    }
}

/// Maps an SDK error of `op` acting on `resource`. `role` is the site role
/// the credentials come from: a refused AssumeRole while the SDK refreshes
/// them surfaces here, without an EC2 error code.
fn map_err<E, R>(op: &'static str, resource: &str, role: Option<&str>, err: SdkError<E, R>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let message = err.message().map(str::to_owned).unwrap_or_else(|| DisplayErrorContext(&err).to_string());
    match (&err, err.code(), role) {
        (_, Some("RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled"), _) => {
            Ec2Error::Throttled { op, message }
        }
        (_, Some(code), _) if is_permission_code(code) => {
            Ec2Error::PermissionDenied { op, action: format!("ec2:{op}"), resource: resource.to_owned(), message }
        }
        (_, None, Some(role)) if message.contains("AssumeRole") => assume_role_error(role, DisplayErrorContext(&err).to_string()),
        (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _, _) => Ec2Error::Transport { op, message },
        (_, code, _) => Ec2Error::Api { op, code: code.unwrap_or("Unknown").to_owned(), message },
    }
}

/// The instance ids an `InvalidInstanceID.NotFound` message names
/// (`The instance ID 'i-1' does not exist`, `The instance IDs 'i-1, i-2' do
/// not exist`), among those asked for.
/// One entry of a DescribeInstanceStatus answer; events already
/// completed or canceled are left out.
fn instance_status_of(st: &aws_sdk_ec2::types::InstanceStatus) -> InstanceStatus {
    let summary = |s: Option<&aws_sdk_ec2::types::InstanceStatusSummary>| {
        s.and_then(|s| s.status()).map(|s| s.as_str().to_owned()).unwrap_or_default()
    };
    let done = |e: &&aws_sdk_ec2::types::InstanceStatusEvent| {
        let d = e.description().unwrap_or_default();
        d.starts_with("[Completed]") || d.starts_with("[Canceled]")
    };
    InstanceStatus {
        id: st.instance_id().unwrap_or_default().to_owned(),
        state: st.instance_state().and_then(|s| s.name()).map(|n| InstanceState::parse(n.as_str())).unwrap_or_default(),
        system: summary(st.system_status()),
        instance: summary(st.instance_status()),
        ebs: st.attached_ebs_status().and_then(|s| s.status()).map(|s| s.as_str().to_owned()).unwrap_or_default(),
        events: st
            .events()
            .iter()
            .filter(|e| !done(e))
            .map(|e| {
                let nb = e.not_before().and_then(|t| t.fmt(aws_sdk_ec2::primitives::DateTimeFormat::DateTime).ok()).unwrap_or_default();
                (e.code().map(|c| c.as_str().to_owned()).unwrap_or_default(), nb)
            })
            .collect(),
    }
}

fn missing_instance_ids(message: &str, asked: &[String]) -> Vec<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("i-") && asked.iter().any(|a| a == w))
        .map(str::to_owned)
        .collect()
}

fn instance_of(i: &aws_sdk_ec2::types::Instance) -> Instance {
    Instance {
        id: i.instance_id().unwrap_or_default().to_owned(),
        state: i.state().and_then(|s| s.name()).map(|n| InstanceState::parse(n.as_str())).unwrap_or_default(),
        private_ip: i.private_ip_address().unwrap_or_default().to_owned(),
        public_ip: i.public_ip_address().unwrap_or_default().to_owned(),
        image_id: i.image_id().unwrap_or_default().to_owned(),
        tags: tag_pairs(i.tags()),
    }
}

fn launch_facts_of(i: &aws_sdk_ec2::types::Instance) -> crate::domain::model::LaunchFacts {
    use crate::domain::model::{BlockDevice, LaunchFacts};
    LaunchFacts {
        instance_id: i.instance_id().unwrap_or_default().to_owned(),
        instance_type: i.instance_type().map(|t| t.as_str().to_owned()).unwrap_or_default(),
        availability_zone: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_owned(),
        subnet_id: i.subnet_id().unwrap_or_default().to_owned(),
        vpc_id: i.vpc_id().unwrap_or_default().to_owned(),
        security_group_ids: i.security_groups().iter().filter_map(|g| g.group_id()).map(str::to_owned).collect(),
        iam_instance_profile: i.iam_instance_profile().and_then(|p| p.arn()).unwrap_or_default().to_owned(),
        key_name: i.key_name().unwrap_or_default().to_owned(),
        private_ip: i.private_ip_address().unwrap_or_default().to_owned(),
        public_ip: i.public_ip_address().unwrap_or_default().to_owned(),
        eip_allocation_id: String::new(),
        eip_public_ip: String::new(),
        root_device_name: i.root_device_name().unwrap_or_default().to_owned(),
        block_devices: i
            .block_device_mappings()
            .iter()
            .map(|m| BlockDevice {
                device_name: m.device_name().unwrap_or_default().to_owned(),
                volume_id: m.ebs().and_then(|e| e.volume_id()).unwrap_or_default().to_owned(),
                delete_on_termination: m.ebs().and_then(|e| e.delete_on_termination()).unwrap_or(true),
            })
            .collect(),
        read_at_ms: crate::domain::model::now_ms(),
    }
}

fn address_of(a: &aws_sdk_ec2::types::Address) -> Address {
    Address {
        allocation_id: a.allocation_id().unwrap_or_default().to_owned(),
        public_ip: a.public_ip().unwrap_or_default().to_owned(),
        instance_id: a.instance_id().unwrap_or_default().to_owned(),
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
        snapshot_ids: i.block_device_mappings().iter().filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned)).collect(),
        tags: tag_pairs(i.tags()),
    }
}

/// EC2's tags as (key, value) pairs.
fn tag_pairs(tags: &[aws_sdk_ec2::types::Tag]) -> Vec<(String, String)> {
    tags.iter().map(|t| (t.key().unwrap_or_default().to_owned(), t.value().unwrap_or_default().to_owned())).collect()
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
            .map_err(|e| self.err("DescribeImages", "*", e))?;
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
            .tag_specifications(TagSpecification::builder().resource_type(ResourceType::Image).set_tags(Some(tags_of(&req.tags))).build())
            .send()
            .await
            .map_err(|e| self.err("CreateImage", &req.instance_id, e))?;
        out.image_id().map(str::to_owned).ok_or_else(|| Ec2Error::Api {
            op: "CreateImage",
            code: "EmptyResponse".into(),
            message: "the answer carries no image id".into(),
        })
    }

    async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error> {
        let out =
            self.client.describe_images().set_image_ids(Some(ids.to_vec())).send().await.map_err(|e| self.err("DescribeImages", "*", e))?;
        Ok(out.images().iter().map(image_of).collect())
    }

    async fn create_tags(&self, resources: &[String], tags: &[(String, String)]) -> Result<(), Ec2Error> {
        self.client
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(tags_of(tags)))
            .send()
            .await
            .map_err(|e| self.err("CreateTags", &resources.join(", "), e))?;
        Ok(())
    }

    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error> {
        Ok(self.describe_instances(&[id.to_owned()]).await?.into_iter().find(|i| i.id == id))
    }

    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Instance>, Ec2Error> {
        let client = &self.client;
        self.without_unknown_ids("DescribeInstances", ids, move |asked: Vec<String>| async move {
            let out = client.describe_instances().set_instance_ids(Some(asked.clone())).send().await?;
            Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| i.instance_id().is_some_and(|id| asked.iter().any(|a| a == id)))
                .map(instance_of)
                .collect())
        })
        .await
    }

    async fn describe_instance_status(&self, ids: &[String]) -> Result<Vec<InstanceStatus>, Ec2Error> {
        let client = &self.client;
        self.without_unknown_ids("DescribeInstanceStatus", ids, move |asked: Vec<String>| async move {
            let out = client.describe_instance_status().include_all_instances(true).set_instance_ids(Some(asked)).send().await?;
            Ok(out.instance_statuses().iter().map(instance_status_of).collect())
        })
        .await
    }

    async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
        let out = match self.client.describe_snapshots().set_snapshot_ids(Some(ids.to_vec())).send().await {
            Ok(out) => out,
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => return Ok(vec![]),
            Err(e) => return Err(self.err("DescribeSnapshots", "*", e)),
        };
        Ok(out
            .snapshots()
            .iter()
            .map(|s| (s.snapshot_id().unwrap_or_default().to_owned(), s.state().map(|st| st.as_str().to_owned()).unwrap_or_default()))
            .collect())
    }

    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        match self.client.deregister_image().image_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")) => Ok(()),
            Err(e) => Err(self.err("DeregisterImage", id, e)),
        }
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
        match self.client.delete_snapshot().snapshot_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(self.err("DeleteSnapshot", id, e)),
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
            .tag_specifications(TagSpecification::builder().resource_type(ResourceType::Image).set_tags(Some(tags_of(&req.tags))).build())
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Snapshot).set_tags(Some(tags_of(&req.tags))).build(),
            )
            .send()
            .await
            .map_err(|e| self.err("CopyImage", &req.source_image_id, e))?;
        out.image_id().map(str::to_owned).ok_or_else(|| Ec2Error::Api {
            op: "CopyImage",
            code: "EmptyResponse".into(),
            message: "the answer carries no image id".into(),
        })
    }

    async fn launch_facts(&self, instance_id: &str) -> Result<Option<crate::domain::model::LaunchFacts>, Ec2Error> {
        let out = match self.client.describe_instances().instance_ids(instance_id).send().await {
            Ok(out) => out,
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => return Ok(None),
            Err(e) => return Err(self.err("DescribeInstances", instance_id, e)),
        };
        let Some(i) = out.reservations().iter().flat_map(|r| r.instances()).find(|i| i.instance_id() == Some(instance_id)) else {
            return Ok(None);
        };
        let mut facts = launch_facts_of(i);
        let addrs = self
            .client
            .describe_addresses()
            .filters(Filter::builder().name("instance-id").values(instance_id).build())
            .send()
            .await
            .map_err(|e| self.err("DescribeAddresses", instance_id, e))?;
        if let Some(a) = addrs.addresses().first() {
            facts.eip_allocation_id = a.allocation_id().unwrap_or_default().to_owned();
            facts.eip_public_ip = a.public_ip().unwrap_or_default().to_owned();
        }
        Ok(Some(facts))
    }

    async fn find_instances_by_tag(&self, key: &str, value: &str) -> Result<Vec<Instance>, Ec2Error> {
        let out = self
            .client
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{key}")).values(value).build())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(
                        InstanceState::ALL
                            .iter()
                            .filter(|s| !matches!(s, InstanceState::Terminated | InstanceState::Gone))
                            .map(ToString::to_string)
                            .collect(),
                    ))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err("DescribeInstances", &format!("tag:{key}={value}"), e))?;
        Ok(out.reservations().iter().flat_map(|r| r.instances()).map(instance_of).collect())
    }

    async fn run_instance(&self, req: &RunInstance) -> Result<Instance, Ec2Error> {
        use aws_sdk_ec2::types::{IamInstanceProfileSpecification, InstanceType, Placement};
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let mut call = self
            .client
            .run_instances()
            .image_id(&req.image_id)
            .instance_type(InstanceType::from(req.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&req.client_token)
            .set_subnet_id(nonempty(&req.subnet_id))
            .set_private_ip_address(nonempty(&req.private_ip))
            .set_key_name(nonempty(&req.key_name))
            .set_security_group_ids((!req.security_group_ids.is_empty()).then(|| req.security_group_ids.clone()))
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Instance).set_tags(Some(tags_of(&req.tags))).build(),
            )
            .tag_specifications(TagSpecification::builder().resource_type(ResourceType::Volume).set_tags(Some(tags_of(&req.tags))).build());
        if !req.iam_instance_profile.is_empty() {
            call = call.iam_instance_profile(IamInstanceProfileSpecification::builder().arn(&req.iam_instance_profile).build());
        }
        if req.subnet_id.is_empty() && !req.availability_zone.is_empty() {
            call = call.placement(Placement::builder().availability_zone(&req.availability_zone).build());
        }
        let out = call.send().await.map_err(|e| self.err("RunInstances", &req.image_id, e))?;
        out.instances().first().map(instance_of).ok_or_else(|| Ec2Error::Api {
            op: "RunInstances",
            code: "EmptyResponse".into(),
            message: "the answer carries no instance".into(),
        })
    }

    async fn stop_instance(&self, id: &str, force: bool) -> Result<(), Ec2Error> {
        self.client.stop_instances().instance_ids(id).force(force).send().await.map_err(|e| self.err("StopInstances", id, e))?;
        Ok(())
    }

    async fn start_instance(&self, id: &str) -> Result<(), Ec2Error> {
        self.client.start_instances().instance_ids(id).send().await.map_err(|e| self.err("StartInstances", id, e))?;
        Ok(())
    }

    async fn terminate_instance(&self, id: &str) -> Result<(), Ec2Error> {
        match self.client.terminate_instances().instance_ids(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(self.err("TerminateInstances", id, e)),
        }
    }

    async fn find_volumes_by_tag(&self, key: &str, value: &str) -> Result<Vec<Volume>, Ec2Error> {
        let out = self
            .client
            .describe_volumes()
            .filters(Filter::builder().name(format!("tag:{key}")).values(value).build())
            .send()
            .await
            .map_err(|e| self.err("DescribeVolumes", &format!("tag:{key}={value}"), e))?;
        Ok(out
            .volumes()
            .iter()
            .map(|v| Volume {
                id: v.volume_id().unwrap_or_default().to_owned(),
                state: v.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                tags: tag_pairs(v.tags()),
            })
            .collect())
    }

    async fn delete_volume(&self, id: &str) -> Result<(), Ec2Error> {
        match self.client.delete_volume().volume_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidVolume.NotFound") => Ok(()),
            Err(e) => Err(self.err("DeleteVolume", id, e)),
        }
    }

    async fn keep_volumes(&self, id: &str, devices: &[String]) -> Result<(), Ec2Error> {
        use aws_sdk_ec2::types::{EbsInstanceBlockDeviceSpecification, InstanceBlockDeviceMappingSpecification};
        if devices.is_empty() {
            return Ok(());
        }
        let mappings = devices
            .iter()
            .map(|d| {
                InstanceBlockDeviceMappingSpecification::builder()
                    .device_name(d)
                    .ebs(EbsInstanceBlockDeviceSpecification::builder().delete_on_termination(false).build())
                    .build()
            })
            .collect();
        self.client
            .modify_instance_attribute()
            .instance_id(id)
            .set_block_device_mappings(Some(mappings))
            .send()
            .await
            .map_err(|e| self.err("ModifyInstanceAttribute", id, e))?;
        Ok(())
    }

    async fn describe_address(&self, allocation_id: &str) -> Result<Option<Address>, Ec2Error> {
        match self.client.describe_addresses().allocation_ids(allocation_id).send().await {
            Ok(out) => Ok(out.addresses().first().map(address_of)),
            Err(e) if matches!(e.code(), Some("InvalidAllocationID.NotFound" | "InvalidAddress.NotFound")) => Ok(None),
            Err(e) => Err(self.err("DescribeAddresses", allocation_id, e)),
        }
    }

    async fn associate_address(&self, allocation_id: &str, instance_id: &str) -> Result<(), Ec2Error> {
        self.client
            .associate_address()
            .allocation_id(allocation_id)
            .instance_id(instance_id)
            .allow_reassociation(true)
            .send()
            .await
            .map_err(|e| self.err("AssociateAddress", allocation_id, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ids_are_read_from_both_message_forms() {
        let asked: Vec<String> = ["i-0aa", "i-0bb", "i-0cc"].iter().map(|s| s.to_string()).collect();
        assert_eq!(missing_instance_ids("The instance ID 'i-0bb' does not exist", &asked), vec!["i-0bb"]);
        assert_eq!(missing_instance_ids("The instance IDs 'i-0aa, i-0cc' do not exist", &asked), vec!["i-0aa", "i-0cc"]);
        // An id we did not ask for is never taken for one of ours.
        assert!(missing_instance_ids("The instance ID 'i-0dd' does not exist", &asked).is_empty());
    }

    #[test]
    fn permission_denied_names_action_and_resource_and_is_final() {
        let e = Ec2Error::PermissionDenied {
            op: "DeregisterImage",
            action: "ec2:DeregisterImage".into(),
            resource: "ami-0123456789abcdef0".into(),
            message: "You are not authorized to perform this operation.".into(),
        };
        assert_eq!(
            e.to_string(),
            "permission denied: ec2:DeregisterImage on ami-0123456789abcdef0 (You are not authorized to perform this operation.)"
        );
        assert!(!e.is_retryable());
        for code in ["UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"] {
            assert!(is_permission_code(code), "{code}");
        }
        assert!(!is_permission_code("RequestLimitExceeded"));
    }
}
