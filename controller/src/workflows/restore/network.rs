//! The site's addresses onto the new machine: its Elastic IP and its
//! Route 53 record.

use std::time::Duration;

use super::{ec2_launch, waited};
use crate::domain::model::now_ms;
use crate::engine::wait::{Poll, PollOpts};
use crate::engine::{Ctx, ErrorKind, Outcome, StepError};
use crate::workflows::failover::State;
use crate::workflows::{Deps, EC2_RETRY_BUDGET, retry_ec2};

pub(in crate::workflows) async fn move_eip(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let Some(eip) = st.plan.eip.clone() else {
        return Ok(Outcome::Done("the backup's instance had no Elastic IP".into()));
    };
    if !eip.movable {
        return Ok(Outcome::Done(format!("not moved: {}", eip.note)));
    }
    let ec2 = ec2_launch(ctx, st).await?;
    let id = st.candidate.clone();
    let now = retry_ec2("DescribeAddresses", EC2_RETRY_BUDGET, || ec2.describe_address(&eip.allocation_id)).await?;
    let Some(addr) = now else {
        return Err(StepError::failed(format!("Elastic IP {} ({}) no longer exists", eip.public_ip, eip.allocation_id)));
    };
    if addr.instance_id != id {
        retry_ec2("AssociateAddress", EC2_RETRY_BUDGET, || ec2.associate_address(&eip.allocation_id, &id)).await?;
    }
    st.eip_moved = true;
    // Status shows the address the site is reached at, not the launch one
    // the new instance's agent reported when it connected.
    ctx.store().set_public_ip(ctx.site.id.clone(), id.clone(), eip.public_ip.clone()).await?;
    Ok(Outcome::Done(format!(
        "Elastic IP {} moved to {id}{}",
        eip.public_ip,
        if addr.instance_id.is_empty() { String::new() } else { format!(" (from {})", addr.instance_id) }
    )))
}

pub(in crate::workflows) async fn update_dns(ctx: &Ctx<Deps>, st: &mut State) -> Result<Outcome, StepError> {
    let Some(dns) = st.plan.dns.clone() else {
        // Reachable once its addresses moved (the Elastic IP, if any).
        st.reachable_at_ms = now_ms();
        return Ok(Outcome::Done("no [site.dns] record configured".into()));
    };
    let value = match st.plan.eip.as_ref().filter(|e| e.movable) {
        Some(e) => e.public_ip.clone(),
        None if !st.candidate_public_ip.is_empty() => st.candidate_public_ip.clone(),
        None => st.candidate_private_ip.clone(),
    };
    let r53 = ctx.deps().dns().await;
    let change = retry_ec2("ChangeResourceRecordSets", EC2_RETRY_BUDGET, || r53.upsert_a(&dns.zone_id, &dns.name, &value, dns.ttl)).await?;
    let limit = ctx.deps().failover.dns_timeout;
    ctx.poll_until(PollOpts::every(Duration::from_secs(1), limit), false, || async {
        let status = retry_ec2("GetChange", EC2_RETRY_BUDGET, || r53.change_status(&change)).await?;
        Ok::<_, StepError>(if status == "INSYNC" {
            Poll::Ready(())
        } else {
            Poll::Waiting { progress: format!("waiting for Route 53 change {change} ({status})"), state: status }
        })
    })
    .await
    .map_err(|w| {
        waited(w, |status| StepError::new(ErrorKind::TimedOut, format!("Route 53 change {change} is still {status} after {limit:?}")))
    })?;
    st.dns_value = value.clone();
    st.reachable_at_ms = now_ms();
    Ok(Outcome::Done(format!("{} A {value} (ttl {}) in sync", dns.name, dns.ttl)))
}
