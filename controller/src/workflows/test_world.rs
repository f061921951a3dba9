//! The world the restore workflows' unit tests run in: a site `s1` with
//! primary `i-old`, a backup with launch facts, the engine over an
//! in-memory EC2 (`testkit::FakeEc2`). Shared by `workflows::failover`'s
//! tests and the reconcilers' tests that drive those workflows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cloud::Ec2Clients;
use crate::config::{AwsConfig, BackupConfig};
use crate::domain::model::{LaunchFacts, OperationState, Site};
use crate::domain::recovery::FailoverConfig;
use crate::store::Store;
use crate::testkit::FakeEc2;
use crate::workflows::Deps;

pub(crate) async fn until(store: &Store, id: &str, want: OperationState) -> crate::domain::model::Operation {
    for _ in 0..300 {
        let op = store.operation(id.to_owned()).await.expect("read").expect("operation");
        if op.state == want {
            return op;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} never became {want:?}: {:#?}", store.operation(id.to_owned()).await);
}

/// A site `s1` with primary `i-old` and one available backup `ami-b1`
/// (with launch facts) on `fake`, and the engine over it.
pub(crate) async fn world(
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
) -> (tempfile::TempDir, Store, Site, crate::workflows::Engine) {
    world_with(fake, recovery, HashMap::new()).await
}

pub(crate) async fn world_with(
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
    policies: HashMap<String, crate::domain::policy::Policy>,
) -> (tempfile::TempDir, Store, Site, crate::workflows::Engine) {
    world_full(fake, recovery, policies, quick_failover()).await
}

/// `[failover]` of the unit tests: a restored agent that does not come up
/// within 1 s fails `wait_agent`.
fn quick_failover() -> FailoverConfig {
    FailoverConfig { agent_timeout: Duration::from_secs(1), ..FailoverConfig::default() }
}

/// Like [`world_with`], with its own `[failover]` settings.
pub(crate) async fn world_full(
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
    policies: HashMap<String, crate::domain::policy::Policy>,
    failover: FailoverConfig,
) -> (tempfile::TempDir, Store, Site, crate::workflows::Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("s.db")).await.expect("store");
    let site = Site { id: "s1".into(), region: "us-east-1".into(), primary_instance_id: "i-old".into(), role_arn: None };
    store.upsert_site(site.clone()).await.expect("site");
    let now = crate::domain::model::now_ms();
    add_backup(&store, &fake, "ami-b1", now - 60_000, now - 30_000).await;
    fake.add_instance("i-old", "10.0.0.5");
    let engine = engine_with(&store, fake, recovery, policies, failover);
    (dir, store, site, engine)
}

/// An available backup `image` of `i-old` in site `s1` (with launch facts),
/// in the store and in `fake`.
pub(crate) async fn add_backup(store: &Store, fake: &FakeEc2, image: &str, started_at_ms: u64, completed_at_ms: u64) {
    let b = crate::testkit::available_backup("s1", "i-old", image, started_at_ms, completed_at_ms);
    store.insert_rebuilt_backup(b).await.expect("backup");
    let facts = LaunchFacts {
        instance_id: "i-old".into(),
        instance_type: "m5.xlarge".into(),
        subnet_id: "subnet-1".into(),
        private_ip: "10.0.0.5".into(),
        ..LaunchFacts::default()
    };
    store.put_launch_facts(image.into(), "s1".into(), facts).await.expect("facts");
    fake.add_image(image);
}

/// An engine over `store` (a controller start: call again for a restart).
pub(crate) fn engine_over(
    store: &Store,
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
    policies: HashMap<String, crate::domain::policy::Policy>,
) -> crate::workflows::Engine {
    engine_with(store, fake, recovery, policies, quick_failover())
}

fn engine_with(
    store: &Store,
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
    policies: HashMap<String, crate::domain::policy::Policy>,
    failover: FailoverConfig,
) -> crate::workflows::Engine {
    let deps = Deps {
        store: store.clone(),
        registry: crate::agents::Registry::default(),
        ec2: Arc::new(Ec2Clients::fixed(AwsConfig::default(), fake.clone())),
        backup: BackupConfig::default(),
        policies,
        recovery,
        failover,
        drill: Default::default(),
        aws: AwsConfig::default(),
        dns: tokio::sync::OnceCell::new(),
        gate: Default::default(),
    };
    crate::workflows::engine(deps)
}

pub(crate) fn drill_settings() -> crate::domain::recovery::DrillSettings {
    use crate::domain::recovery::{DrillSettings, LaunchConfig, LaunchOverridesHome};
    DrillSettings {
        hostname: Some("drill.example.com".into()),
        launch: LaunchConfig {
            home: LaunchOverridesHome {
                subnet_id: Some("subnet-drill".into()),
                security_group_ids: Some(vec!["sg-drill".into()]),
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

/// The id of the one instance of `fake` not in `known` (waits for it).
pub(crate) async fn new_instance(fake: &FakeEc2, known: &[&str]) -> String {
    for _ in 0..500 {
        let id = fake.lock().instances.iter().find(|i| !known.contains(&i.instance.id.as_str())).map(|i| i.instance.id.clone());
        if let Some(id) = id {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no new instance was launched");
}
