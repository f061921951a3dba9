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

/// (region, role ARN): one client each.
type ClientKey = (String, Option<String>);

/// EC2 clients per (region, role), built on first use, each spending the
/// budget of its (account, region) (see [`crate::cloud::budget`]).
pub struct Ec2Clients {
    aws: AwsConfig,
    budgets: budget::BudgetBook,
    cache: tokio::sync::Mutex<HashMap<ClientKey, Arc<dyn Ec2>>>,
    /// Tests: this client for every site and region.
    fixed: Option<Arc<dyn Ec2>>,
}

impl Ec2Clients {
    pub fn new(aws: AwsConfig) -> Self {
        let budgets = budget::BudgetBook::new(aws.limits.clone());
        Ec2Clients { aws, budgets, cache: tokio::sync::Mutex::new(HashMap::new()), fixed: None }
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
        let raw: Arc<dyn Ec2> = Arc::new(AwsEc2::new(&self.aws, &site.region, site.role_arn.as_deref()).await?);
        let buckets = self.budgets.buckets(&budget::account_of(site.role_arn.as_deref()), &site.region);
        let client: Arc<dyn Ec2> = Arc::new(budget::Budgeted::new(raw, buckets));
        cache.insert(key, client.clone());
        Ok(client)
    }
}
