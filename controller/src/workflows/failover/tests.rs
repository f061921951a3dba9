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

/// A site `s1` with primary `i-old` and one available backup `ami-b1`
/// (with launch facts) on `fake`, and the engine over it.
async fn world(fake: Arc<FakeEc2>, recovery: HashMap<String, crate::domain::recovery::SiteRecovery>) -> (tempfile::TempDir, Store, Site, super::super::Engine) {
    world_with(fake, recovery, HashMap::new()).await
}

async fn world_with(
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
    policies: HashMap<String, crate::domain::policy::Policy>,
) -> (tempfile::TempDir, Store, Site, super::super::Engine) {
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
    fake.add_instance("i-old", "10.0.0.5");
    fake.add_image("ami-b1");
    let engine = engine_over(&store, fake, recovery, policies);
    (dir, store, site, engine)
}

/// An engine over `store` (a controller start: call again for a restart).
fn engine_over(
    store: &Store,
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
    policies: HashMap<String, crate::domain::policy::Policy>,
) -> super::super::Engine {
    let deps = Deps {
        store: store.clone(),
        registry: crate::agents::Registry::default(),
        ec2: Arc::new(Ec2Clients::fixed(AwsConfig::default(), fake.clone())),
        backup: BackupConfig::default(),
        policies,
        recovery,
        failover: FailoverConfig { agent_timeout: Duration::from_secs(1), ..FailoverConfig::default() },
        drill: Default::default(),
        aws: AwsConfig::default(),
        dns: tokio::sync::OnceCell::new(),
    };
    super::super::engine(deps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_run_instances_answer_launches_once_and_an_abort_releases_it() {
    let fake = Arc::new(FakeEc2::default());
    fake.lock().lose.insert("RunInstances", 1);
    let (_dir, store, site, engine) = world(fake.clone(), HashMap::new()).await;
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

fn drill_settings() -> crate::domain::recovery::DrillSettings {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_runs_the_runbook_on_its_copy_only_then_tears_it_down_and_records_it() {
    use crate::domain::recovery::SiteRecovery;
    use crate::testkit::FakeAgent;
    let fake = Arc::new(FakeEc2::default());
    let recovery = HashMap::from([("s1".to_owned(), SiteRecovery { drill: drill_settings(), ..Default::default() })]);
    let (_dir, store, site, engine) = world(fake.clone(), recovery).await;
    // The primary's agent: it must get no command of the drill.
    let primary = FakeAgent::attach(&engine.deps().registry, "s1", "i-old", crate::domain::model::Role::Primary, |_| Ok(serde_json::json!({})));
    let req = Request { drill: true, ..Default::default() };
    let plan = plan::make(engine.deps(), &site, &req).await.expect("plan");
    assert_eq!((plan.launch.subnet_id.as_str(), plan.hostname.as_str()), ("subnet-drill", "drill.example.com"));
    let op = crate::workflows::drill::start(&engine, plan, Duration::ZERO, "operator/t", None).await.expect("start");

    // The copy's agent comes up once EC2 has the instance.
    let copy = loop {
        let id = fake.lock().instances.iter().find(|i| i.instance.id != "i-old").map(|i| i.instance.id.clone());
        if let Some(id) = id {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let agent = FakeAgent::attach(
        &engine.deps().registry,
        "s1",
        &copy,
        crate::domain::model::Role::Drill { operation_id: op.id.clone() },
        |action| match action {
            "cleanup_builds" => Ok(serde_json::json!({"deleted": 1, "newest_build_started_at": "2026-01-01T00:00:00Z"})),
            "health_check" => Ok(serde_json::json!({"url": "http://127.0.0.1/health-check", "status": 200})),
            _ => Ok(serde_json::json!({})),
        },
    );
    let done = until(&store, &op.id, OperationState::Succeeded).await;
    assert_eq!(
        agent.actions(),
        ["app_stop", "rewrite_addresses", "set_hostname", "wipe_nomad", "app_start", "app_status", "health_check", "cleanup_builds", "app_status"],
        "the runbook on the copy, in order"
    );
    assert!(primary.actions().is_empty(), "the primary got nothing: {:?}", primary.actions());
    assert_eq!(fake.instance(&copy).expect("copy").instance.state, "terminated", "torn down");
    assert_eq!(fake.instance("i-old").expect("old").instance.state, "running", "production untouched");
    assert!(fake.lock().instances.iter().find(|i| i.instance.id == copy).expect("copy").tags.iter().any(|(k, v)| k == "dr:role" && v == "drill"));
    assert_eq!(store.site("s1".into()).await.expect("read").expect("site").primary_instance_id, "i-old", "never promoted");
    let rec = store.drills("s1".into(), 5).await.expect("drills");
    assert_eq!(rec.len(), 1, "recorded once");
    assert!(rec[0].ok && rec[0].rto_ms > 0 && rec[0].instance_id == copy, "{:?}", rec[0]);
    assert_eq!(rec[0].newest_build_at_ms, 1_767_225_600_000, "the copy's newest build: {:?}", rec[0]);
    assert_eq!(done.steps.iter().find(|s| s.name == "teardown").map(|s| s.state), Some(crate::domain::model::StepState::Done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_drill_fires_once_per_slot_and_a_restart_does_not_repeat_it() {
    use crate::domain::policy::{DrillBackup, Policy, parse_schedule};
    use crate::domain::recovery::SiteRecovery;
    use crate::reconcilers::scheduler::{Scheduled, tick_once};
    let fake = Arc::new(FakeEc2::default());
    let recovery = HashMap::from([("s1".to_owned(), SiteRecovery { drill: drill_settings(), ..Default::default() })]);
    let policy = Policy {
        drill_schedule: parse_schedule("1h", "UTC").expect("ok"),
        drill_backup: DrillBackup::RandomWithin(Duration::from_secs(86_400)),
        ..Policy::default()
    };
    let policies = HashMap::from([("s1".to_owned(), policy)]);
    let (_dir, store, _site, engine) = world_with(fake.clone(), recovery.clone(), policies.clone()).await;
    let h = 3_600_000;
    // A minute into an hour (slots of "1h" are whole hours).
    let t0 = crate::domain::model::now_ms() / h * h + 60_000;
    let running_drills = || async {
        let active = store.active_operations_of("s1".into()).await.expect("active");
        let mut ops = vec![];
        for a in active.into_iter().filter(|a| a.kind == "drill") {
            ops.push(store.operation(a.id).await.expect("read").expect("op"));
        }
        ops
    };

    assert!(tick_once(&engine, t0).await.expect("tick").is_empty(), "a new schedule starts counting from now");
    assert!(tick_once(&engine, t0 + h / 2).await.expect("tick").is_empty(), "no slot yet");
    let slot = (t0 / h + 1) * h;
    assert_eq!(tick_once(&engine, slot + 1000).await.expect("tick"), [("s1".to_owned(), Scheduled::Drill)]);
    assert!(tick_once(&engine, slot + 2000).await.expect("tick").is_empty(), "one drill per slot");
    // A controller restart on the same store: the slot is not fired again.
    let restarted = engine_over(&store, fake.clone(), recovery.clone(), policies.clone());
    assert!(tick_once(&restarted, slot + 3000).await.expect("tick").is_empty(), "not repeated after a restart");
    let first = running_drills().await;
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0].requested_by, "schedule");

    // No agent comes up on the copy: the drill fails at wait_agent, tears
    // its copy down and records itself.
    let ended = until(&store, &first[0].id, OperationState::Failed).await;
    assert!(ended.error.contains("wait_agent") || ended.steps.iter().any(|s| s.name == "wait_agent"), "{ended:#?}");
    let rec = store.drills("s1".into(), 5).await.expect("drills");
    assert_eq!(rec.len(), 1);
    assert!(!rec[0].ok);
    // The next slot fires again, once, on the restarted controller.
    assert_eq!(tick_once(&restarted, slot + h + 1000).await.expect("tick"), [("s1".to_owned(), Scheduled::Drill)]);
    assert!(tick_once(&restarted, slot + h + 2000).await.expect("tick").is_empty());
    let second = running_drills().await;
    assert_eq!(second.len(), 1, "{second:#?}");
    assert_ne!(second[0].id, first[0].id);
    let slots = store.slots().await.expect("slots");
    assert_eq!(slots.get(&("s1".to_owned(), "drill".to_owned())), Some(&(slot + h)));
    assert_eq!(slots.get(&("s1".to_owned(), "backup".to_owned())), None, "no backup schedule, no backup slot");
}
