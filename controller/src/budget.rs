//! EC2 request budgets and batching, per account and region.
//!
//! EC2 throttles each account and region with token buckets (mutating calls
//! about 50 burst / 5 per second, CopyImage about 1 per second, describes
//! about 100 burst / 20 per second). The controller spends its own tokens
//! first ([`Budgeted`] waits for a token before each call), so that a fleet
//! round does not run into `RequestLimitExceeded`; when EC2 throttles anyway
//! the caller's `retry_ec2` backs off. DescribeImages calls that queue up
//! while one is in flight are merged into the next call (up to 100 ids): no
//! added latency when idle (the freeze window depends on it), few calls
//! under load.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::ec2::{CopyImage, CreateImage, Ec2, Ec2Error, Image, Instance};

/// Token-bucket sizes (`[aws.limits]`); defaults follow EC2's documented ones.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub mutating_per_sec: u32,
    pub mutating_burst: u32,
    pub copy_per_sec: u32,
    pub copy_burst: u32,
    pub describe_per_sec: u32,
    pub describe_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mutating_per_sec: 5,
            mutating_burst: 50,
            copy_per_sec: 1,
            copy_burst: 5,
            describe_per_sec: 20,
            describe_burst: 100,
        }
    }
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n.max(1)).expect("max(1) is non-zero");
    Quota::per_second(nz(per_sec)).allow_burst(nz(burst))
}

/// The buckets of one account and region.
pub struct Buckets {
    mutating: DefaultDirectRateLimiter,
    copy: DefaultDirectRateLimiter,
    describe: DefaultDirectRateLimiter,
}

impl Buckets {
    pub fn new(l: &Limits) -> Self {
        Buckets {
            mutating: RateLimiter::direct(quota(l.mutating_per_sec, l.mutating_burst)),
            copy: RateLimiter::direct(quota(l.copy_per_sec, l.copy_burst)),
            describe: RateLimiter::direct(quota(l.describe_per_sec, l.describe_burst)),
        }
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

type BatchReply = oneshot::Sender<Result<Vec<Image>, Ec2Error>>;

/// An [`Ec2`] that spends tokens before each call and batches DescribeImages.
pub struct Budgeted {
    inner: Arc<dyn Ec2>,
    buckets: Arc<Buckets>,
    batch: mpsc::Sender<(Vec<String>, BatchReply)>,
}

impl Budgeted {
    pub fn new(inner: Arc<dyn Ec2>, buckets: Arc<Buckets>) -> Self {
        let (batch, rx) = mpsc::channel(1024);
        tokio::spawn(batcher(inner.clone(), buckets.clone(), rx));
        Budgeted { inner, buckets, batch }
    }
}

/// Takes every DescribeImages request already queued (up to 100 ids) and
/// answers each from one call; requests arriving meanwhile wait for the
/// next call. If the merged call fails (one unknown id fails the whole call
/// in EC2), each request is retried on its own.
async fn batcher(inner: Arc<dyn Ec2>, buckets: Arc<Buckets>, mut rx: mpsc::Receiver<(Vec<String>, BatchReply)>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.iter().map(|(ids, _)| ids.len()).sum::<usize>() < 100 {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let mut ids: Vec<String> = group.iter().flat_map(|(ids, _)| ids.iter().cloned()).collect();
        ids.sort();
        ids.dedup();
        buckets.describe.until_ready().await;
        match inner.describe_images(&ids).await {
            Ok(images) => {
                for (want, reply) in group {
                    let mine = images.iter().filter(|i| want.contains(&i.id)).cloned().collect();
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(_) if group.len() > 1 => {
                for (want, reply) in group {
                    buckets.describe.until_ready().await;
                    let _ = reply.send(inner.describe_images(&want).await);
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
        let (tx, rx) = oneshot::channel();
        if self.batch.send((ids.to_vec(), tx)).await.is_err() {
            self.buckets.describe.until_ready().await;
            return self.inner.describe_images(ids).await;
        }
        rx.await.unwrap_or_else(|_| {
            Err(Ec2Error::Transport { op: "DescribeImages", message: "the batcher stopped".into() })
        })
    }
    async fn create_tags(&self, resources: &[String], tags: &[(String, String)]) -> Result<(), Ec2Error> {
        self.buckets.mutating.until_ready().await;
        self.inner.create_tags(resources, tags).await
    }
    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, Ec2Error> {
        self.buckets.describe.until_ready().await;
        self.inner.describe_instance(id).await
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
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Counts DescribeImages calls and the ids in each.
    #[derive(Default)]
    struct Counting {
        calls: Mutex<Vec<usize>>,
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
                .map(|id| Image { id: id.clone(), state: "available".into(), state_reason: String::new(), snapshot_ids: vec![], tags: vec![] })
                .collect())
        }
        async fn create_tags(&self, _: &[String], _: &[(String, String)]) -> Result<(), Ec2Error> {
            Ok(())
        }
        async fn describe_instance(&self, _: &str) -> Result<Option<Instance>, Ec2Error> {
            Ok(None)
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
