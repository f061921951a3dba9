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
use crate::domain::model::{LaunchFacts, OperationState, Signal, Site};
use crate::domain::recovery::FailoverConfig;
use crate::store::Store;
use crate::testkit::FakeEc2;

mod refused;

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
async fn world(
    fake: Arc<FakeEc2>,
    recovery: HashMap<String, crate::domain::recovery::SiteRecovery>,
) -> (tempfile::TempDir, Store, Site, super::super::Engine) {
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
    add_backup(&store, &fake, "ami-b1", now - 60_000, now - 30_000).await;
    fake.add_instance("i-old", "10.0.0.5");
    let engine = engine_over(&store, fake, recovery, policies);
    (dir, store, site, engine)
}

/// An available backup `image` of `i-old` in site `s1` (with launch facts),
/// in the store and in `fake`.
async fn add_backup(store: &Store, fake: &FakeEc2, image: &str, started_at_ms: u64, completed_at_ms: u64) {
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
                Ok(crate::testkit::FakeReply::Report(dr_proto::contract::Report::Cleanup(dr_proto::contract::CleanupReport {
                    deleted: 1,
                    newest_build_started_at: Some("2026-01-01T00:00:00Z".into()),
                    ..crate::testkit::cleanup_report()
                })))
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

/// Waits until `fake` has an instance that `known` does not list, and
/// returns it.
async fn new_instance(fake: &FakeEc2, known: &[&str]) -> String {
    for _ in 0..500 {
        let id = fake.lock().instances.iter().find(|i| !known.contains(&i.instance.id.as_str())).map(|i| i.instance.id.clone());
        if let Some(id) = id {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no new instance was launched");
}

fn spare_answers(action: &str) -> crate::testkit::FakeAnswer {
    match action {
        other => crate::testkit::fake_ok(other),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_is_kept_refreshed_without_a_gap_protected_from_retention_and_taken_by_a_failover() {
    use crate::domain::model::Role;
    use crate::domain::policy::{Policy, SpareMode};
    use crate::reconcilers::spares::{Kept, tick_once};
    use crate::testkit::FakeAgent;
    let fake = Arc::new(FakeEc2::default());
    let policy = Policy { spare: SpareMode::Stopped, spare_max_lag: Duration::from_secs(1), keep_last: 1, ..Policy::default() };
    let policies = HashMap::from([("s1".to_owned(), policy)]);
    let (_dir, store, site, engine) = world_with(fake.clone(), HashMap::new(), policies).await;
    let registry = engine.deps().registry.clone();
    let primary = FakeAgent::attach(&registry, "s1", "i-old", Role::Primary, crate::testkit::fake_ok);

    // No spare yet: the keeper prepares one from the newest backup.
    let kept = tick_once(&engine, crate::domain::model::now_ms()).await.expect("tick");
    let [(_, Kept::Started { operation_id: first_op, .. })] = kept.as_slice() else { panic!("{kept:?}") };
    let first = new_instance(&fake, &["i-old"]).await;
    let first_agent = FakeAgent::attach(&registry, "s1", &first, Role::Spare, spare_answers);
    until(&store, first_op, OperationState::Succeeded).await;
    let installed = store.spare("s1".into()).await.expect("read").expect("a spare is installed");
    assert_eq!(
        (installed.instance_id.as_str(), installed.backup_image_id.as_str(), installed.mode.as_str()),
        (first.as_str(), "ami-b1", "stopped")
    );
    let spare_ec2 = fake.instance(&first).expect("spare");
    assert_eq!(spare_ec2.instance.state, "stopped", "parked stopped");
    assert!(spare_ec2.tags.iter().any(|(k, v)| k == "dr:role" && v == "spare"), "{:?}", spare_ec2.tags);
    assert_eq!(
        first_agent.actions(),
        [
            "app_stop",
            "rewrite_addresses",
            "wipe_nomad",
            "app_start",
            "app_status",
            "health_check",
            "cleanup_builds",
            "app_status",
            "app_stop"
        ],
        "the runbook with its own addresses, checked healthy, then the app stopped"
    );
    assert!(primary.actions().is_empty(), "the primary got nothing: {:?}", primary.actions());
    assert_eq!(fake.instance("i-old").expect("old").instance.state, "running", "production untouched");
    assert!(tick_once(&engine, crate::domain::model::now_ms()).await.expect("tick").is_empty(), "no newer backup: kept");

    // A newer backup, and the spare is older than spare_max_lag: a fresh
    // spare is prepared, and the old one is terminated only once the new
    // one is installed.
    let now = crate::domain::model::now_ms();
    add_backup(&store, &fake, "ami-b2", now - 10_000, now - 5_000).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let kept = tick_once(&engine, crate::domain::model::now_ms()).await.expect("tick");
    let [(_, Kept::Started { operation_id: second_op, why })] = kept.as_slice() else { panic!("{kept:?}") };
    assert!(why.contains("ami-b2"), "{why}");
    let gaps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watch = {
        let (store, gaps, op) = (store.clone(), gaps.clone(), second_op.clone());
        tokio::spawn(async move {
            loop {
                if store.spare("s1".into()).await.expect("read").is_none() {
                    gaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let o = store.operation(op.clone()).await.expect("read").expect("op");
                if o.state.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let second = new_instance(&fake, &["i-old", &first]).await;
    let _second_agent = FakeAgent::attach(&registry, "s1", &second, Role::Spare, spare_answers);
    until(&store, second_op, OperationState::Succeeded).await;
    watch.await.expect("watcher");
    assert_eq!(gaps.load(std::sync::atomic::Ordering::Relaxed), 0, "the site never had no spare while it was refreshed");
    let installed = store.spare("s1".into()).await.expect("read").expect("spare");
    assert_eq!((installed.instance_id.as_str(), installed.backup_image_id.as_str()), (second.as_str(), "ami-b2"));
    assert_eq!(fake.instance(&first).expect("first").instance.state, "terminated", "the old spare is retired");
    assert_eq!(fake.instance(&second).expect("second").instance.state, "stopped");

    // Retention (keep_last 1) keeps the spare's backup even when a newer
    // one would push it out.
    add_backup(&store, &fake, "ami-b3", now - 2_000, now - 1_000).await;
    let decisions = crate::workflows::retention::apply(engine.deps(), &site, false).await.expect("retention");
    let fate = |id: &str| decisions.iter().find(|d| d.image_id == id).map(|d| d.keep);
    assert_eq!(fate("ami-b2"), Some(true), "the spare's backup is kept: {decisions:?}");
    assert_eq!(fate("ami-b1"), Some(false), "an unprotected older backup goes: {decisions:?}");

    // A spare EC2 no longer has is noticed by the check and replaced.
    let mut ghost = fake.instance(&second).expect("second");
    ghost.instance.id = "i-ghost".into();
    fake.lock().instances.push(ghost);
    fake.lock().instances.iter_mut().find(|i| i.instance.id == "i-ghost").expect("ghost").instance.state = "terminated".into();
    let mut rec = store.spare("s1".into()).await.expect("read").expect("spare");
    let real = rec.instance_id.clone();
    rec.instance_id = "i-ghost".into();
    store.install_spare(rec.clone()).await.expect("install");
    let gone = crate::reconcilers::spares::check_spares(&engine).await.expect("check");
    assert_eq!(gone, [("s1".to_owned(), Kept::Gone { instance_id: "i-ghost".into(), state: "terminated".into() })]);
    assert!(store.spare("s1".into()).await.expect("read").is_none(), "forgotten");
    rec.instance_id = real;
    store.install_spare(rec).await.expect("reinstall the real one");
    assert!(crate::reconcilers::spares::check_spares(&engine).await.expect("check").is_empty(), "a stopped spare is kept");

    // The failover takes the spare (failover_prefers = spare by default):
    // no RunInstances; the plan states the data it trades.
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    let planned = plan.spare.clone().expect("the plan takes the spare");
    assert_eq!(
        (planned.instance_id.as_str(), planned.backup_image_id.as_str(), planned.newest_backup_image_id.as_str()),
        (second.as_str(), "ami-b2", "ami-b3")
    );
    assert_eq!(plan.backup.image_id, "ami-b2", "the data is the spare's");
    assert!(planned.lag_ms >= 8_000, "{planned:?}");
    assert!(plan.warnings.iter().any(|w| w.contains("hot spare") && w.contains("ami-b3")), "{:?}", plan.warnings);
    let fresh = plan::make(engine.deps(), &site, &Request { fresh: true, ..Default::default() }).await.expect("plan");
    assert!(fresh.spare.is_none() && fresh.backup.image_id == "ami-b3", "--fresh launches from the newest");
    let launches = fake.calls_of("RunInstances");
    let op = start(&engine, plan, "operator/t").await.expect("start");
    let done = until(&store, &op.id, OperationState::Succeeded).await;
    assert_eq!(fake.calls_of("RunInstances"), launches, "no launch: the spare was started");
    assert_eq!(fake.calls_of("StartInstances"), 1);
    assert_eq!(store.site("s1".into()).await.expect("read").expect("site").primary_instance_id, second, "the spare is the primary");
    assert!(store.spare("s1".into()).await.expect("read").is_none(), "taken: no longer the spare");
    assert_eq!(fake.instance("i-old").expect("old").instance.state, "stopped", "the old primary is fenced");
    let retagged = fake.instance(&second).expect("second");
    assert!(retagged.tags.iter().any(|(k, v)| k == "dr:operation" && v == &op.id), "retagged as the failover's: {:?}", retagged.tags);
    let launch = done.steps.iter().find(|s| s.name == "launch").expect("launch step");
    assert!(launch.detail.contains("took the hot spare"), "{}", launch.detail);
    let pinned = Request { use_spare: true, ..Default::default() };
    let refused = plan::make(engine.deps(), &site, &pinned).await.expect_err("no spare left");
    assert!(refused.to_string().contains("no usable hot spare"), "{refused}");
}
