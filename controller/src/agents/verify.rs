//! Batched EC2 verification of the instances agents claim to run on.
//!
//! An agent's Hello names its instance id and private IP; before it gets
//! work, EC2 must confirm that instance with that IP (a stolen site
//! certificate on another machine is refused this way). Checks queue here
//! and are answered in batches: one DescribeInstances per (region, role)
//! for up to 1,000 instances, within the controller's describe budget. A
//! failing or throttled call never demotes an agent: its checks are
//! queued again with backoff. A confirmation is stored (24 h), so agents
//! reconnecting after a controller restart get their role at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::backoff::Backoff;
use tokio::sync::mpsc;

use super::{Registry, role_of};
use crate::cloud::Ec2Clients;
use crate::cloud::ec2::{Ec2, Ec2Error, Instance};
use crate::domain::model::{Role, Site, now_ms};
use crate::domain::tags::TAG_SITE;
use crate::store::Store;

const BATCH: usize = 1000;
/// How long checks may gather before a call: few calls in a reconnect storm,
/// little added latency when one agent connects.
const GATHER: Duration = Duration::from_millis(100);
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// Tries of the adoption tag before it waits for the agent's next connection.
const ADOPT_ATTEMPTS: u32 = 8;

#[derive(Clone, Debug)]
struct Check {
    site: String,
    instance: String,
    private_ip: String,
    attempt: u32,
}

/// Queue of instances to verify; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    tx: mpsc::UnboundedSender<Check>,
}

impl Verifier {
    /// Starts the verifier task.
    pub fn start(store: Store, registry: Registry, ec2: Arc<Ec2Clients>) -> Verifier {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, tx.clone(), store, registry, ec2));
        Verifier { tx }
    }

    pub fn enqueue(&self, site: String, instance: String, private_ip: String) {
        let _ = self.tx.send(Check { site, instance, private_ip, attempt: 0 });
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Check>,
    tx: mpsc::UnboundedSender<Check>,
    store: Store,
    registry: Registry,
    ec2: Arc<Ec2Clients>,
) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(GATHER).await;
        let mut batch = vec![first];
        while batch.len() < 10 * BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let sites: HashMap<String, Site> = match store.sites().await {
            Ok(s) => s.into_iter().map(|s| (s.id.clone(), s)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "verifier: cannot read sites; retrying");
                requeue(&tx, batch);
                continue;
            }
        };
        // Instances launched in another region than their site's (a
        // failover into the DR region) are checked there.
        let elsewhere = match store.instance_regions().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "verifier: cannot read instance regions; retrying");
                requeue(&tx, batch);
                continue;
            }
        };
        // One call per (region, role) and at most BATCH ids.
        let mut groups: HashMap<(String, Option<String>), Vec<Check>> = HashMap::new();
        for c in batch {
            let Some(site) = sites.get(&c.site) else { continue };
            let region = elsewhere.get(&(c.site.clone(), c.instance.clone())).cloned().unwrap_or_else(|| site.region.clone());
            groups.entry((region, site.role_arn.clone())).or_default().push(c);
        }
        for ((region, _), group) in groups {
            for chunk in group.chunks(BATCH) {
                let site = &sites[&chunk[0].site];
                verify_chunk(&store, &registry, &ec2, &tx, site, &region, chunk, &sites).await;
            }
        }
    }
}

fn requeue(tx: &mpsc::UnboundedSender<Check>, checks: Vec<Check>) {
    for mut c in checks {
        let wait = RETRY.delay(c.attempt);
        c.attempt += 1;
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = tx.send(c);
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn verify_chunk(
    store: &Store,
    registry: &Registry,
    ec2: &Ec2Clients,
    tx: &mpsc::UnboundedSender<Check>,
    site: &Site,
    region: &str,
    chunk: &[Check],
    sites: &HashMap<String, Site>,
) {
    let ids: Vec<String> = chunk.iter().map(|c| c.instance.clone()).collect();
    let in_region = Site { region: region.to_owned(), ..site.clone() };
    let answer = match ec2.for_site(&in_region).await {
        Ok(client) => client.describe_instances(&ids).await.map(|found| (client, found)),
        Err(e) => Err(e),
    };
    let (client, found) = match answer {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(region, instances = ids.len(), error = %e, "cannot verify instances with EC2 now; their agents stay pending and are checked again");
            requeue(tx, chunk.to_vec());
            return;
        }
    };
    let now = now_ms();
    let found: HashMap<&str, &crate::cloud::ec2::Instance> = found.iter().map(|i| (i.id.as_str(), i)).collect();
    // Every confirmation recorded in one transaction (not one commit per
    // agent: in a reconnect storm that was the verifier's bottleneck).
    let confirmed: Vec<&Check> = chunk
        .iter()
        .filter(|c| {
            found
                .get(c.instance.as_str())
                .is_some_and(|i| i.private_ip == c.private_ip && !matches!(i.state.as_str(), "terminated" | "shutting-down"))
        })
        .collect();
    let records: HashMap<(String, String), Option<crate::domain::model::InstanceRecord>> =
        match store.set_verified(confirmed.iter().map(|c| (c.site.clone(), c.instance.clone(), c.private_ip.clone())).collect(), now).await
        {
            Ok(recs) => confirmed.iter().map(|c| (c.site.clone(), c.instance.clone())).zip(recs).collect(),
            Err(e) => {
                tracing::error!(instances = confirmed.len(), error = %e, "cannot record the verifications; checked again");
                requeue(tx, confirmed.into_iter().cloned().collect());
                HashMap::new()
            }
        };
    for c in chunk {
        let Some(site) = sites.get(&c.site) else { continue };
        // Only a session still waiting for this check gets a role from it.
        let still_pending = registry.live(&c.site, &c.instance).is_some_and(|l| l.role == Role::Pending);
        let role = match found.get(c.instance.as_str()) {
            Some(i) if matches!(i.state.as_str(), "terminated" | "shutting-down") => {
                Role::Passive { reason: format!("EC2 says instance {} is {}", i.id, i.state) }
            }
            Some(i) if i.private_ip == c.private_ip => match records.get(&(c.site.clone(), c.instance.clone())) {
                Some(rec) => role_of(site, &c.instance, rec.as_ref()),
                // Its record could not be written: checked again, stays pending.
                None => continue,
            },
            Some(i) => Role::Passive {
                reason: format!("EC2 says instance {} has private IP {}, the agent reports {}", i.id, i.private_ip, c.private_ip),
            },
            None => Role::Passive { reason: format!("EC2 does not know instance {} in {region}", c.instance) },
        };
        if role == Role::Primary
            && let Some(i) = found.get(c.instance.as_str())
        {
            adopt(&client, &c.site, i);
        }
        if still_pending {
            registry.set_role(&c.site, &c.instance, role);
        }
    }
}

/// Primaries being tagged now (one task per instance however often its
/// agent reconnects).
static ADOPTING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> = std::sync::LazyLock::new(Default::default);

/// Adoption: a site's primary carries `dr:site=<site>`, the tag the IAM
/// policy's instance statements (Stop/Start/Terminate/ModifyInstanceAttribute)
/// require, so that rung 2 (host restart) and the fence may act on it.
/// Instances the controller launches are tagged at launch; the site's
/// original primary is tagged here, the one place every primary passes
/// before it gets work (its agent's Hello, verified against EC2 with the
/// instance's tags in the same DescribeInstances answer: no extra call
/// when the tag is there). Idempotent; budgeted (the site's `Ec2` client);
/// a failure is logged and tried again with backoff, then at the agent's
/// next connection; never fatal (`dr-controller preflight` names a
/// missing tag).
fn adopt(client: &Arc<dyn Ec2>, site: &str, instance: &Instance) {
    match site_tag(instance) {
        Some(v) if v == site => return,
        Some(other) => {
            tracing::error!(
                site,
                instance = %instance.id,
                tag = TAG_SITE,
                value = other,
                "the site's primary is tagged as another site's; not retagged (fix the tag by hand)"
            );
            return;
        }
        None => {}
    }
    {
        let Ok(mut adopting) = ADOPTING.lock() else { return };
        if !adopting.insert(instance.id.clone()) {
            return;
        }
    }
    let (client, site, id) = (client.clone(), site.to_owned(), instance.id.clone());
    tokio::spawn(async move {
        tag_primary(client.as_ref(), &site, &id).await;
        if let Ok(mut adopting) = ADOPTING.lock() {
            adopting.remove(&id);
        }
    });
}

fn site_tag(instance: &Instance) -> Option<&str> {
    instance.tags.iter().find(|(k, _)| k == TAG_SITE).map(|(_, v)| v.as_str())
}

async fn tag_primary(client: &dyn Ec2, site: &str, id: &str) {
    let tags = [(TAG_SITE.to_owned(), site.to_owned())];
    for attempt in 0..ADOPT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(RETRY.delay(attempt - 1)).await;
            // A tag whose answer was lost is there already (and the policy
            // allows tagging an instance without `dr:site` only).
            match client.describe_instance(id).await {
                Ok(Some(i)) if site_tag(&i).is_some() => return,
                Ok(None) => return,
                _ => {}
            }
        }
        match client.create_tags(&[id.to_owned()], &tags).await {
            Ok(()) => {
                tracing::info!(site, instance = id, tag = TAG_SITE, "adopted the site's primary: tagged with its site");
                return;
            }
            Err(e @ Ec2Error::PermissionDenied { .. }) => {
                tracing::error!(
                    site,
                    instance = id,
                    error = %e,
                    "cannot tag the site's primary `dr:site`; host restarts and fences of it will be denied (see `dr-controller preflight`)"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(site, instance = id, attempt, error = %e, "cannot tag the site's primary `dr:site` now; trying again");
            }
        }
    }
    tracing::error!(site, instance = id, "gave up tagging the site's primary `dr:site`; tried again when its agent next connects");
}
