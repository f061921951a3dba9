//! The failover's EC2 side against the in-memory EC2 of the test kit (which,
//! unlike moto, honours ClientTokens): a RunInstances whose answer was lost
//! is asked again with the same token and launches nothing more; without an
//! agent the operation waits for a human; an abort terminates what it
//! launched and leaves the old instance fenced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{AwsConfig, BackupConfig};
use crate::cloud::Ec2Clients;
use crate::domain::model::{Backup, BackupState, Consistency, LaunchFacts, OperationState, Signal, Site};
use crate::domain::recovery::FailoverConfig;
use crate::store::Store;
use crate::testkit::FakeEc2;

async fn until(store: &Store, id: &str, want: OperationState) -> crate::domain::model::Operation {
    for _ in 0..300 {
        let op = store.operation(id.to_owned()).await.expect("read").expect("operation");
        if op.state == want {
            return op;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} never became {want:?}: {:#?}", store.operation(id.to_owned()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_run_instances_answer_launches_once_and_an_abort_releases_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("s.db")).await.expect("store");
    let site = Site { id: "s1".into(), region: "us-east-1".into(), primary_instance_id: "i-old".into(), role_arn: None };
    store.upsert_site(site.clone()).await.expect("site");
    let now = crate::domain::model::now_ms();
    store
        .insert_rebuilt_backup(Backup {
            image_id: "ami-b1".into(),
            site_id: "s1".into(),
            operation_id: "backup-1".into(),
            region: "us-east-1".into(),
            instance_id: "i-old".into(),
            snapshot_ids: vec![],
            started_at_ms: now - 60_000,
            completed_at_ms: now - 30_000,
            consistency: Consistency::Crash,
            app_state: "started".into(),
            state: BackupState::Available,
            fate: String::new(),
            deleted_at_ms: 0,
            quiesce: "none".into(),
            frozen_ms: 0,
            quiesce_note: String::new(),
            copies: vec![],
        })
        .await
        .expect("backup");
    let facts = LaunchFacts {
        instance_id: "i-old".into(),
        instance_type: "m5.xlarge".into(),
        subnet_id: "subnet-1".into(),
        private_ip: "10.0.0.5".into(),
        ..LaunchFacts::default()
    };
    store.put_launch_facts("ami-b1".into(), "s1".into(), facts).await.expect("facts");
    let fake = Arc::new(FakeEc2::default());
    fake.add_instance("i-old", "10.0.0.5");
    fake.add_image("ami-b1");
    fake.lock().lose.insert("RunInstances", 1);
    let deps = Deps {
        store: store.clone(),
        registry: crate::agents::Registry::default(),
        ec2: Arc::new(Ec2Clients::fixed(AwsConfig::default(), fake.clone())),
        backup: BackupConfig::default(),
        policies: HashMap::new(),
        recovery: HashMap::new(),
        failover: FailoverConfig { agent_timeout: Duration::from_secs(1), ..FailoverConfig::default() },
        drill: Default::default(),
        aws: AwsConfig::default(),
        dns: tokio::sync::OnceCell::new(),
    };
    let engine = super::super::engine(deps);
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    assert_eq!(plan.launch.subnet_id, "subnet-1");
    assert_eq!(plan.launch.private_ip, "", "a new private IP with a stop fence");
    let op = start(&engine, plan, "operator/t").await.expect("start");

    // No agent ever connects: the operation waits for a human at wait_agent.
    let waiting = until(&store, &op.id, OperationState::Waiting).await;
    assert!(waiting.waiting_for.contains("wait_agent"), "{}", waiting.waiting_for);
    assert_eq!(fake.calls_of("RunInstances"), 2, "the lost answer was asked again");
    let launched: Vec<_> = fake.lock().instances.iter().filter(|i| i.instance.id != "i-old").cloned().collect();
    assert_eq!(launched.len(), 1, "one instance for one operation: the retry carried the same ClientToken");
    let candidate = launched[0].instance.id.clone();
    assert!(launched[0].tags.iter().any(|(k, v)| k == TAG_OPERATION && v == &op.id), "tagged with the operation");
    assert_eq!(launched[0].instance_type, "m5.xlarge");
    assert_eq!(fake.instance("i-old").expect("old").instance.state, "stopped", "fenced by a stop");
    let rec = store.instance("s1".into(), "i-old".into()).await.expect("read").expect("recorded");
    assert_eq!(rec.role, "fenced");
    let cand = store.instance("s1".into(), candidate.clone()).await.expect("read").expect("recorded");
    assert_eq!((cand.role.as_str(), cand.operation_id.as_str()), ("candidate", op.id.as_str()));

    engine.signal(&op.id, Signal::Abort, "operator/t").await.expect("abort");
    let ended = until(&store, &op.id, OperationState::Cancelled).await;
    assert_eq!(fake.instance(&candidate).expect("candidate").instance.state, "terminated", "release terminated it");
    assert_eq!(fake.instance("i-old").expect("old").instance.state, "stopped", "the old one stays fenced");
    let state: State = serde_json::from_value(ended.wf_state.expect("state")).expect("typed state");
    let report = state.report.expect("the report step ran");
    assert!(report.site_state.contains("no primary is running"), "{}", report.site_state);
    assert_eq!(store.site("s1".into()).await.expect("read").expect("site").primary_instance_id, "i-old", "not promoted");
}
