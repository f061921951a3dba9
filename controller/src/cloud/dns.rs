//! Route 53: the optional A record that follows a site's primary (what
//! makes a cross-region failover reachable under the same hostname).
//! Same rules as [`crate::cloud::ec2`]: one attempt per call, errors mapped to
//! [`Ec2Error`] so the one retry loop (`retry_ec2`) budgets them.

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_route53::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_route53::types::{Change, ChangeAction, ChangeBatch, ResourceRecord, ResourceRecordSet, RrType};

use crate::cloud::ec2::{Ec2Error, is_permission_code};
use crate::config::AwsConfig;

#[async_trait]
pub trait Dns: Send + Sync {
    /// UPSERTs `name` A `ip`; returns the change id to wait on.
    async fn upsert_a(&self, zone_id: &str, name: &str, ip: &str, ttl: u32) -> Result<String, Ec2Error>;
    /// `PENDING` or `INSYNC`.
    async fn change_status(&self, change_id: &str) -> Result<String, Ec2Error>;
    /// The latest observation of each Route 53 health checker of a health
    /// check (GetHealthCheckStatus): (checker region, status report).
    async fn health_check_status(&self, id: &str) -> Result<Vec<(String, String)>, Ec2Error> {
        Err(Ec2Error::Api {
            op: "GetHealthCheckStatus",
            code: "NotSupported".into(),
            message: format!("no Route 53 health checks here ({id})"),
        })
    }
}

/// Route 53's own rule: an endpoint is healthy when more than 18 % of its
/// health checkers report it healthy. `Some(detail)` when it is not.
pub fn unhealthy_by_checkers(observations: &[(String, String)]) -> Result<String, String> {
    let ok = observations.iter().filter(|(_, s)| s.starts_with("Success")).count();
    let n = observations.len();
    let first_failure = observations.iter().find(|(_, s)| !s.starts_with("Success")).map(|(r, s)| format!("{r}: {s}")).unwrap_or_default();
    if n > 0 && (ok as f64) <= 0.18 * n as f64 {
        Ok(format!("{ok} of {n} checkers reach it; {first_failure}"))
    } else {
        Err(format!("{ok} of {n} checkers reach it"))
    }
}

pub struct Route53 {
    client: aws_sdk_route53::Client,
}

impl Route53 {
    /// Route 53 is global: its API lives in us-east-1. `[aws] endpoint_url`
    /// applies to it as to EC2 (tests and emulators serve both).
    pub async fn new(aws: &AwsConfig, gate: super::CallGate) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(aws_config::Region::new("us-east-1"));
        if let Some(url) = &aws.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let attempts = aws.max_attempts.unwrap_or(1).max(1);
        loader = loader.retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts));
        let sdk = loader.load().await;
        Route53 { client: aws_sdk_route53::Client::from_conf(aws_sdk_route53::config::Builder::from(&sdk).interceptor(gate).build()) }
    }
}

fn map_err<E, R>(op: &'static str, resource: &str, err: SdkError<E, R>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let message = err.message().map(str::to_owned).unwrap_or_else(|| DisplayErrorContext(&err).to_string());
    match (&err, err.code()) {
        (_, Some("Throttling" | "ThrottlingException" | "PriorRequestNotComplete")) => Ec2Error::Throttled { op, message },
        (_, Some(code)) if is_permission_code(code) => {
            Ec2Error::PermissionDenied { op, action: format!("route53:{op}"), resource: resource.to_owned(), message }
        }
        (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _) => Ec2Error::Transport { op, message },
        (_, code) => Ec2Error::Api { op, code: code.unwrap_or("Unknown").to_owned(), message },
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') { name.to_owned() } else { format!("{name}.") }
}

#[async_trait]
impl Dns for Route53 {
    async fn upsert_a(&self, zone_id: &str, name: &str, ip: &str, ttl: u32) -> Result<String, Ec2Error> {
        let set = ResourceRecordSet::builder()
            .name(fqdn(name))
            .r#type(RrType::A)
            .ttl(ttl as i64)
            .resource_records(
                ResourceRecord::builder()
                    .value(ip)
                    .build()
                    .map_err(|e| Ec2Error::Setup { what: "Route 53 record".into(), message: e.to_string() })?,
            )
            .build()
            .map_err(|e| Ec2Error::Setup { what: "Route 53 record".into(), message: e.to_string() })?;
        let change = Change::builder()
            .action(ChangeAction::Upsert)
            .resource_record_set(set)
            .build()
            .map_err(|e| Ec2Error::Setup { what: "Route 53 change".into(), message: e.to_string() })?;
        let batch = ChangeBatch::builder()
            .comment("dr-controller failover")
            .changes(change)
            .build()
            .map_err(|e| Ec2Error::Setup { what: "Route 53 change".into(), message: e.to_string() })?;
        let out = self
            .client
            .change_resource_record_sets()
            .hosted_zone_id(zone_id)
            .change_batch(batch)
            .send()
            .await
            .map_err(|e| map_err("ChangeResourceRecordSets", zone_id, e))?;
        Ok(out.change_info().map(|c| c.id().to_owned()).unwrap_or_default())
    }

    async fn change_status(&self, change_id: &str) -> Result<String, Ec2Error> {
        let out = self.client.get_change().id(change_id).send().await.map_err(|e| map_err("GetChange", change_id, e))?;
        Ok(out.change_info().map(|c| c.status().as_str().to_owned()).unwrap_or_default())
    }

    async fn health_check_status(&self, id: &str) -> Result<Vec<(String, String)>, Ec2Error> {
        let out =
            self.client.get_health_check_status().health_check_id(id).send().await.map_err(|e| map_err("GetHealthCheckStatus", id, e))?;
        Ok(out
            .health_check_observations()
            .iter()
            .map(|o| {
                let region = o.region().map(|r| r.as_str().to_owned()).unwrap_or_default();
                let status = o.status_report().and_then(|r| r.status()).unwrap_or_default().to_owned();
                (region, status)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_53s_rule_unhealthy_at_18_percent_or_fewer_healthy_checkers() {
        let obs = |ok: usize, failing: usize| -> Vec<(String, String)> {
            (0..ok)
                .map(|i| (format!("r{i}"), "Success: HTTP Status Code 200, OK".to_owned()))
                .chain((0..failing).map(|i| (format!("f{i}"), "Failure: Connection timed out.".to_owned())))
                .collect()
        };
        assert!(unhealthy_by_checkers(&obs(0, 8)).is_ok());
        assert!(unhealthy_by_checkers(&obs(1, 7)).is_ok(), "1 of 8 = 12.5 %");
        assert!(unhealthy_by_checkers(&obs(2, 6)).is_err(), "2 of 8 = 25 % > 18 %");
        assert!(unhealthy_by_checkers(&obs(8, 0)).is_err());
        assert!(unhealthy_by_checkers(&[]).is_err(), "no observation is no evidence");
        assert!(unhealthy_by_checkers(&obs(0, 3)).is_ok_and(|d| d.contains("Connection timed out")));
    }
}
