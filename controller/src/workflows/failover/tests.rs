//! The failover's EC2 side against the in-memory EC2 of the test kit (which,
//! unlike moto, honours ClientTokens): a RunInstances whose answer was lost
//! is asked again with the same token and launches nothing more; without an
//! agent the operation waits for a human; an abort terminates what it
//! launched and leaves the old instance fenced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cloud::Ec2Clients;
use crate::config::{AwsConfig, BackupConfig};
use crate::domain::model::{OperationState, Signal, Site};
use crate::domain::recovery::FailoverConfig;
use crate::store::Store;
use crate::testkit::FakeEc2;
use crate::workflows::test_world::{drill_settings, new_instance, until, world};

mod refused;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_runs_the_runbook_on_its_copy_only_then_tears_it_down_and_records_it() {
    use crate::domain::recovery::SiteRecovery;
    use crate::testkit::FakeAgent;
    let fake = Arc::new(FakeEc2::default());
    let recovery = HashMap::from([("s1".to_owned(), SiteRecovery { drill: drill_settings(), ..Default::default() })]);
    let (_dir, store, site, engine) = world(fake.clone(), recovery).await;
    // The primary's agent: it must get no command of the drill.
    let primary = FakeAgent::attach(&engine.deps().registry, "s1", "i-old", crate::domain::model::Role::Primary, crate::testkit::fake_ok);
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
            "cleanup_builds" => {
                Ok(crate::testkit::FakeReply::Report(Box::new(dr_proto::contract::Report::Cleanup(dr_proto::contract::CleanupReport {
                    deleted: 1,
                    newest_build_started_at: Some("2026-01-01T00:00:00Z".into()),
                    ..crate::testkit::cleanup_report()
                }))))
            }
            other => crate::testkit::fake_ok(other),
        },
    );
    let done = until(&store, &op.id, OperationState::Succeeded).await;
    assert_eq!(
        agent.actions(),
        [
            "app_stop",
            "rewrite_addresses",
            "set_hostname",
            "wipe_nomad",
            "app_start",
            "app_status",
            "health_check",
            "cleanup_builds",
            "app_status"
        ],
        "the runbook on the copy, in order"
    );
    assert!(primary.actions().is_empty(), "the primary got nothing: {:?}", primary.actions());
    assert_eq!(fake.instance(&copy).expect("copy").instance.state, "terminated", "torn down");
    assert_eq!(fake.instance("i-old").expect("old").instance.state, "running", "production untouched");
    assert!(
        fake.lock()
            .instances
            .iter()
            .find(|i| i.instance.id == copy)
            .expect("copy")
            .tags
            .iter()
            .any(|(k, v)| k == "dr:role" && v == "drill")
    );
    assert_eq!(store.site("s1".into()).await.expect("read").expect("site").primary_instance_id, "i-old", "never promoted");
    let rec = store.drills("s1".into(), 5).await.expect("drills");
    assert_eq!(rec.len(), 1, "recorded once");
    assert!(rec[0].ok && rec[0].rto_ms > 0 && rec[0].instance_id == copy, "{:?}", rec[0]);
    assert_eq!(rec[0].newest_build_at_ms, 1_767_225_600_000, "the copy's newest build: {:?}", rec[0]);
    assert_eq!(done.steps.iter().find(|s| s.name == "teardown").map(|s| s.state), Some(crate::domain::model::StepState::Done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_drill_says_to_start_a_new_one_not_to_resume_it_and_forgets_its_copy() {
    use crate::domain::recovery::SiteRecovery;
    use crate::testkit::FakeAgent;
    let fake = Arc::new(FakeEc2::default());
    let recovery = HashMap::from([("s1".to_owned(), SiteRecovery { drill: drill_settings(), ..Default::default() })]);
    let (_dir, store, site, _) = world(fake.clone(), recovery.clone()).await;
    let deps = Deps {
        store: store.clone(),
        registry: crate::agents::Registry::default(),
        ec2: Arc::new(Ec2Clients::fixed(AwsConfig::default(), fake.clone())),
        backup: BackupConfig::default(),
        policies: HashMap::new(),
        recovery,
        failover: FailoverConfig {
            agent_timeout: Duration::from_secs(5),
            app_timeout: Duration::from_secs(1),
            ..FailoverConfig::default()
        },
        drill: Default::default(),
        aws: AwsConfig::default(),
        dns: tokio::sync::OnceCell::new(),
        gate: Default::default(),
    };
    let engine = super::super::engine(deps);
    let plan = plan::make(engine.deps(), &site, &Request { drill: true, ..Default::default() }).await.expect("plan");
    let op = crate::workflows::drill::start(&engine, plan, Duration::ZERO, "operator/t", None).await.expect("start");
    let copy = new_instance(&fake, &["i-old"]).await;
    // The copy's app starts but its health check never passes.
    let record = crate::domain::model::InstanceRecord {
        site_id: "s1".into(),
        instance_id: copy.clone(),
        role: "drill".into(),
        operation_id: op.id.clone(),
        ..Default::default()
    };
    store.put_instance(record).await.expect("the copy's Hello");
    let agent = FakeAgent::attach(
        &engine.deps().registry,
        "s1",
        &copy,
        crate::domain::model::Role::Drill { operation_id: op.id.clone() },
        |action| match action {
            "health_check" => crate::testkit::fake_failure("GET /health-check answered 503"),
            other => crate::testkit::fake_ok(other),
        },
    );
    let ended = until(&store, &op.id, OperationState::Failed).await;
    let rec = store.drills("s1".into(), 5).await.expect("drills");
    let said = format!("{} | {}", ended.error, rec[0].error);
    assert!(said.contains("health check did not pass"), "{said}");
    assert!(!said.contains("operation resume"), "a drill cannot be resumed: {said}");
    assert!(said.contains("start a new drill") && said.contains("drctl drill s1"), "{said}");
    assert!(agent.actions().contains(&"health_check".to_owned()), "{:?}", agent.actions());
    // Torn down: EC2 terminated it, so the store no longer lists it.
    assert_eq!(fake.instance(&copy).expect("copy").instance.state, "terminated");
    assert!(store.instance("s1".into(), copy.clone()).await.expect("read").is_none(), "the terminated copy is forgotten");
}
