//! Cloud APIs: EC2 (with its per-account budget) and Route 53, one
//! attempt per call with errors mapped to kinds, and the IAM preflight.
//! Above `config` and `domain`, below everything that drives operations.

pub mod budget;
pub mod dns;
pub mod ec2;
pub mod http;
pub mod instance_state;
pub mod preflight;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::AwsConfig;
use crate::domain::model::Site;
use ec2::{AwsEc2, Ec2, Ec2Error};

/// EC2 calls retried because EC2 throttled them (for `/metrics`).
pub static EC2_THROTTLED: AtomicU64 = AtomicU64::new(0);
/// EC2 calls retried after a transient failure (for `/metrics`).
pub static EC2_TRANSIENT: AtomicU64 = AtomicU64::new(0);

/// Asked before every AWS request leaves (each attempt, just before it is
/// sent): an error stops it. The controller's gate refuses once this
/// replica no longer holds the leader lease, so a deposed leader that wakes
/// up (a stopped process, a lost database session) sends nothing to AWS.
#[derive(Clone, Default)]
pub struct CallGate(Option<Arc<dyn Fn() -> Result<(), String> + Send + Sync>>);

impl CallGate {
    pub fn new(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        CallGate(Some(Arc::new(check)))
    }

    fn check(&self) -> Result<(), String> {
        self.0.as_ref().map_or(Ok(()), |f| f())
    }
}

impl std::fmt::Debug for CallGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "CallGate(checked)" } else { "CallGate(open)" })
    }
}

/// One implementation for EC2's and Route 53's clients (the SDKs share the
/// smithy runtime's interceptor trait).
impl aws_sdk_ec2::config::Intercept for CallGate {
    fn name(&self) -> &'static str {
        "dr-controller leader gate"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_ec2::config::RuntimeComponents,
        _cfg: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.check().map_err(Into::into)
    }
}

/// (region, role ARN): one client each.
type ClientKey = (String, Option<String>);

/// EC2 clients per (region, role), built on first use, each spending the
/// budget of its (account, region) (see [`crate::cloud::budget`]).
pub struct Ec2Clients {
    aws: AwsConfig,
    gate: CallGate,
    budgets: budget::BudgetBook,
    cache: tokio::sync::Mutex<HashMap<ClientKey, Arc<dyn Ec2>>>,
    /// Tests: this client for every site and region.
    fixed: Option<Arc<dyn Ec2>>,
}

impl Ec2Clients {
    pub fn new(aws: AwsConfig) -> Self {
        let budgets = budget::BudgetBook::new(aws.limits.clone());
        Ec2Clients { aws, gate: CallGate::default(), budgets, cache: tokio::sync::Mutex::new(HashMap::new()), fixed: None }
    }

    /// Every client built from now on asks `gate` before each request.
    pub fn with_gate(mut self, gate: CallGate) -> Self {
        self.gate = gate;
        self
    }

    /// Every site's client is `client` (unit tests with an in-memory EC2).
    pub fn fixed(aws: AwsConfig, client: Arc<dyn Ec2>) -> Self {
        Ec2Clients { fixed: Some(client), ..Self::new(aws) }
    }

    /// The client for a site's region and (optional) role.
    pub async fn for_site(&self, site: &Site) -> Result<Arc<dyn Ec2>, Ec2Error> {
        if let Some(c) = &self.fixed {
            return Ok(c.clone());
        }
        let key = (site.region.clone(), site.role_arn.clone());
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let raw: Arc<dyn Ec2> = Arc::new(AwsEc2::new(&self.aws, &site.region, site.role_arn.as_deref(), self.gate.clone()).await?);
        let buckets = self.budgets.buckets(&budget::account_of(site.role_arn.as_deref()), &site.region);
        let client: Arc<dyn Ec2> = Arc::new(budget::Budgeted::new(raw, buckets));
        cache.insert(key, client.clone());
        Ok(client)
    }
}
