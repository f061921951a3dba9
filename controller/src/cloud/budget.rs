//! EC2 request budgets and batching, per account and region.
//!
//! EC2 throttles each account and region with token buckets (mutating calls
//! about 50 burst / 5 per second, CopyImage about 1 per second, describes
//! about 100 burst / 20 per second). The controller spends its own tokens
//! first ([`Budgeted`] waits for a token before each call), so that a fleet
//! round does not run into `RequestLimitExceeded`; when EC2 throttles anyway
//! the caller's `retry_ec2` backs off. DescribeImages and DescribeInstances
//! calls that queue up while one is in flight are merged into the next call
//! (up to 100 image ids, 1000 instance ids): no added latency when idle (the
//! freeze window depends on it), few calls under load. RunInstances has its
//! own bucket (about 5 burst / 2 per second).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, oneshot};

use crate::cloud::ec2::{Address, CopyImage, CreateImage, Ec2, Ec2Error, Image, Instance, RunInstance, Volume};
use crate::config::Limits;
use crate::domain::model::LaunchFacts;

fn quota(per_sec: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n.max(1)).expect("max(1) is non-zero");
    Quota::per_second(nz(per_sec)).allow_burst(nz(burst))
}

/// The buckets of one account and region.
pub struct Buckets {
    mutating: DefaultDirectRateLimiter,
    copy: DefaultDirectRateLimiter,
    describe: DefaultDirectRateLimiter,
    run_instances: DefaultDirectRateLimiter,
}

impl Buckets {
    pub fn new(l: &Limits) -> Self {
        Buckets {
            mutating: RateLimiter::direct(quota(l.mutating_per_sec, l.mutating_burst)),
            copy: RateLimiter::direct(quota(l.copy_per_sec, l.copy_burst)),
            describe: RateLimiter::direct(quota(l.describe_per_sec, l.describe_burst)),
            run_instances: RateLimiter::direct(quota(l.run_instances_per_sec, l.run_instances_burst)),
        }
    }

    /// Waits for a RunInstances token (EC2 also charges RunInstances to
    /// its own bucket, not to the mutating one).
    pub async fn until_run_instances_ready(&self) {
        self.run_instances.until_ready().await;
    }
}

/// Buckets shared by every client of the same (account, region).
#[derive(Default)]
pub struct BudgetBook {
    limits: Limits,
    books: std::sync::Mutex<HashMap<(String, String), Arc<Buckets>>>,
}

impl BudgetBook {
    pub fn new(limits: Limits) -> Self {
        BudgetBook { limits, books: Default::default() }
    }

    /// `account` is the account id of the site's role, or "default" for the
    /// controller's own credentials.
    pub fn buckets(&self, account: &str, region: &str) -> Arc<Buckets> {
        let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
        books.entry((account.to_owned(), region.to_owned())).or_insert_with(|| Arc::new(Buckets::new(&self.limits))).clone()
    }
}

/// The account id in a role ARN (`arn:aws:iam::<account>:role/...`).
pub fn account_of(role_arn: Option<&str>) -> String {
    role_arn.and_then(|arn| arn.split(':').nth(4)).filter(|a| !a.is_empty()).unwrap_or("default").to_owned()
}

/// Something a batched describe answers, found by its id.
trait Described: Clone + Send + 'static {
    fn id(&self) -> &str;
}
impl Described for Image {
    fn id(&self) -> &str {
        &self.id
    }
}
impl Described for Instance {
    fn id(&self) -> &str {
        &self.id
    }
}

type BatchReply<T> = oneshot::Sender<Result<Vec<T>, Ec2Error>>;
type Describe<T> = fn(Arc<dyn Ec2>, Vec<String>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<T>, Ec2Error>> + Send>>;

fn describe_images(
    ec2: Arc<dyn Ec2>,
    ids: Vec<String>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Image>, Ec2Error>> + Send>> {
    Box::pin(async move { ec2.describe_images(&ids).await })
}

fn describe_instances(
    ec2: Arc<dyn Ec2>,
    ids: Vec<String>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Instance>, Ec2Error>> + Send>> {
    Box::pin(async move { ec2.describe_instances(&ids).await })
}

/// The queue of one kind of describe, merged by its [`batcher`] task.
struct Batches<T> {
    tx: mpsc::Sender<(Vec<String>, BatchReply<T>)>,
    describe: Describe<T>,
    op: &'static str,
}

impl<T: Described> Batches<T> {
    fn spawn(inner: Arc<dyn Ec2>, buckets: Arc<Buckets>, max_ids: usize, describe: Describe<T>, op: &'static str) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(batcher(inner, buckets, max_ids, describe, rx));
        Batches { tx, describe, op }
    }

    /// Queues `ids` for the next merged call.
    async fn ask(&self, inner: &Arc<dyn Ec2>, buckets: &Buckets, ids: &[String]) -> Result<Vec<T>, Ec2Error> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((ids.to_vec(), tx)).await.is_err() {
            buckets.describe.until_ready().await;
            return (self.describe)(inner.clone(), ids.to_vec()).await;
        }
        rx.await.unwrap_or_else(|_| Err(Ec2Error::Transport { op: self.op, message: "the batcher stopped".into() }))
    }
}

/// An [`Ec2`] that spends tokens before each call and batches DescribeImages
/// and DescribeInstances.
pub struct Budgeted {
    inner: Arc<dyn Ec2>,
    buckets: Arc<Buckets>,
    images: Batches<Image>,
    instances: Batches<Instance>,
}

impl Budgeted {
    pub fn new(inner: Arc<dyn Ec2>, buckets: Arc<Buckets>) -> Self {
        let images = Batches::spawn(inner.clone(), buckets.clone(), 100, describe_images, "DescribeImages");
        let instances = Batches::spawn(inner.clone(), buckets.clone(), 1000, describe_instances, "DescribeInstances");
        Budgeted { inner, buckets, images, instances }
    }
}

/// Takes every request of one kind already queued (up to `max_ids` ids) and
/// answers each from one call; requests arriving meanwhile wait for the
/// next call. If the merged call fails (one unknown image id fails the
/// whole DescribeImages in EC2), each request is retried on its own.
async fn batcher<T: Described>(
    inner: Arc<dyn Ec2>,
    buckets: Arc<Buckets>,
    max_ids: usize,
    describe: Describe<T>,
    mut rx: mpsc::Receiver<(Vec<String>, BatchReply<T>)>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.iter().map(|(ids, _)| ids.len()).sum::<usize>() < max_ids {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let mut ids: Vec<String> = group.iter().flat_map(|(ids, _)| ids.iter().cloned()).collect();
        ids.sort();
        ids.dedup();
        buckets.describe.until_ready().await;
        match describe(inner.clone(), ids).await {
            Ok(found) => {
                for (want, reply) in group {
                    let mine = found.iter().filter(|i| want.iter().any(|w| w == i.id())).cloned().collect();
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(_) if group.len() > 1 => {
                for (want, reply) in group {
                    buckets.describe.until_ready().await;
                    let _ = reply.send(describe(inner.clone(), want).await);
                }
            }
            Err(e) => {
                for (_, reply) in group {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[async_trait]
impl Ec2 for Budgeted {
    async fn find_images_by_tag(&self, key: &str, value: &str) -> Result<Vec<Image>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.find_images_by_tag(key, value).await
    }
    async fn create_image(&self, req: &CreateImage) -> Result<String, Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.create_image(req).await
    }
    async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error> {
        self.images.ask(&self.inner, &self.buckets, ids).await
    }
    async fn create_tags(&self, resources: &[String], tags: &[(String, String)]) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.create_tags(resources, tags).await
    }
    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error> {
        Ok(self.describe_instances(&[id.to_owned()]).await?.into_iter().find(|i| i.id == id))
    }
    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Instance>, Ec2Error> {
        self.instances.ask(&self.inner, &self.buckets, ids).await
    }
    async fn describe_instance_status(&self, ids: &[String]) -> Result<Vec<crate::cloud::ec2::InstanceStatus>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.describe_instance_status(ids).await
    }
    async fn describe_snapshots(&self, ids: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.describe_snapshots(ids).await
    }
    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.deregister_image(id).await
    }
    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.delete_snapshot(id).await
    }
    async fn copy_image(&self, req: &CopyImage) -> Result<String, Ec2Error> {
        self.buckets.copy.until_ready().await;
        self.buckets.mutating.until_ready().await;
        self.inner.copy_image(req).await
    }
    async fn launch_facts(&self, instance_id: &str) -> Result<Option<LaunchFacts>, Ec2Error> {
        // DescribeInstances and DescribeAddresses.
        self.buckets.describe.until_ready().await;
        self.buckets.describe.until_ready().await;
        self.inner.launch_facts(instance_id).await
    }
    async fn find_instances_by_tag(&self, key: &str, value: &str) -> Result<Vec<Instance>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.find_instances_by_tag(key, value).await
    }
    async fn run_instance(&self, req: &RunInstance) -> Result<Instance, Ec2Error> {
        self.buckets.until_run_instances_ready().await;
        self.inner.run_instance(req).await
    }
    async fn stop_instance(&self, id: &str, force: bool) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.stop_instance(id, force).await
    }
    async fn terminate_instance(&self, id: &str) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.terminate_instance(id).await
    }
    async fn start_instance(&self, id: &str) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.start_instance(id).await
    }
    async fn keep_volumes(&self, id: &str, devices: &[String]) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.keep_volumes(id, devices).await
    }
    async fn find_volumes_by_tag(&self, key: &str, value: &str) -> Result<Vec<Volume>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.find_volumes_by_tag(key, value).await
    }
    async fn delete_volume(&self, id: &str) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.delete_volume(id).await
    }
    async fn describe_address(&self, allocation_id: &str) -> Result<Option<Address>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.describe_address(allocation_id).await
    }
    async fn associate_address(&self, allocation_id: &str, instance_id: &str) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.associate_address(allocation_id, instance_id).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Counts DescribeImages calls and the ids in each.
    #[derive(Default)]
    struct Counting {
        calls: Mutex<Vec<usize>>,
        instance_calls: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl Ec2 for Counting {
        async fn find_images_by_tag(&self, _: &str, _: &str) -> Result<Vec<Image>, Ec2Error> {
            Ok(vec![])
        }
        async fn create_image(&self, _: &CreateImage) -> Result<String, Ec2Error> {
            Ok("ami-x".into())
        }
        async fn describe_images(&self, ids: &[String]) -> Result<Vec<Image>, Ec2Error> {
            self.calls.lock().expect("lock").push(ids.len());
            Ok(ids
                .iter()
                .map(|id| Image {
                    id: id.clone(),
                    state: "available".into(),
                    state_reason: String::new(),
                    snapshot_ids: vec![],
                    tags: vec![],
                })
                .collect())
        }
        async fn create_tags(&self, _: &[String], _: &[(String, String)]) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn describe_instance(&self, _: &str) -> Result<Option<Instance>, Ec2Error> {
            panic!("Budgeted asks for instances in batches")
        }
        /// Knows every instance id except those ending in "-gone".
        async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Instance>, Ec2Error> {
            self.instance_calls.lock().expect("lock").push(ids.len());
            Ok(ids
                .iter()
                .filter(|id| !id.ends_with("-gone"))
                .map(|id| Instance {
                    image_id: String::new(),
                    id: id.clone(),
                    state: "running".into(),
                    private_ip: "10.0.0.1".into(),
                    public_ip: String::new(),
                    tags: vec![],
                })
                .collect())
        }
        async fn describe_snapshots(&self, _: &[String]) -> Result<Vec<(String, String)>, Ec2Error> {
            Ok(vec![])
        }
        async fn deregister_image(&self, _: &str) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn delete_snapshot(&self, _: &str) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn copy_image(&self, _: &CopyImage) -> Result<String, Ec2Error> {
            Ok("ami-c".into())
        }
    }

    #[tokio::test]
    async fn concurrent_describes_are_merged_and_answered_separately() {
        let inner = Arc::new(Counting::default());
        let budgeted = Arc::new(Budgeted::new(inner.clone(), Arc::new(Buckets::new(&Limits::default()))));
        let mut tasks = Vec::new();
        for i in 0..30 {
            let b = budgeted.clone();
            tasks.push(tokio::spawn(async move { b.describe_images(&[format!("ami-{i}")]).await }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let images = t.await.expect("task").expect("describe");
            assert_eq!(images.len(), 1);
            assert_eq!(images[0].id, format!("ami-{i}"));
        }
        let calls = inner.calls.lock().expect("lock").clone();
        assert!(calls.len() <= 5, "30 concurrent describes became {} calls: {calls:?}", calls.len());
        assert_eq!(calls.iter().sum::<usize>(), 30);
    }

    #[tokio::test]
    async fn concurrent_instance_lookups_are_merged_and_unknown_ids_are_absent() {
        let inner = Arc::new(Counting::default());
        let budgeted = Arc::new(Budgeted::new(inner.clone(), Arc::new(Buckets::new(&Limits::default()))));
        let mut tasks = Vec::new();
        for i in 0..1500 {
            let b = budgeted.clone();
            let id = if i % 100 == 7 { format!("i-{i}-gone") } else { format!("i-{i}") };
            tasks.push(tokio::spawn(async move { (id.clone(), b.describe_instance(&id).await) }));
        }
        for t in tasks {
            let (id, found) = t.await.expect("task");
            let found = found.expect("a batch never fails for an unknown id");
            if id.ends_with("-gone") {
                assert_eq!(found, None, "{id}");
            } else {
                assert_eq!(found.map(|i| i.id), Some(id));
            }
        }
        let calls = inner.instance_calls.lock().expect("lock").clone();
        assert!(calls.iter().all(|&n| n <= 1000), "a call carries at most 1000 ids: {calls:?}");
        assert!(calls.len() <= 10, "1500 concurrent lookups became {} calls: {calls:?}", calls.len());
        assert_eq!(calls.iter().sum::<usize>(), 1500);
    }

    #[test]
    fn the_run_instances_bucket_has_ec2s_size() {
        let limits = Limits::default();
        assert_eq!((limits.run_instances_per_sec, limits.run_instances_burst), (2, 5));
        let buckets = Buckets::new(&limits);
        for _ in 0..5 {
            assert!(buckets.run_instances.check().is_ok());
        }
        assert!(buckets.run_instances.check().is_err(), "the sixth RunInstances waits");
        // The other buckets are untouched by it.
        assert!(buckets.mutating.check().is_ok());
    }

    #[tokio::test]
    async fn the_mutating_bucket_paces_calls_after_its_burst() {
        let limits = Limits { mutating_per_sec: 5, mutating_burst: 10, ..Limits::default() };
        let buckets = Buckets::new(&limits);
        for _ in 0..10 {
            buckets.mutating.until_ready().await;
        }
        // governor uses its own clock (not tokio's), so only the burst is
        // checked here: ten immediate tokens, the eleventh must wait.
        assert!(buckets.mutating.check().is_err());
        assert_eq!(account_of(Some("arn:aws:iam::111122223333:role/x")), "111122223333");
        assert_eq!(account_of(None), "default");
    }
}
