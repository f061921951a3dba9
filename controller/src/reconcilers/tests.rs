//! Reconcilers driving the restore workflows end to end on the unit-test
//! world (`workflows::test_world`): a scheduled drill fires once per slot,
//! the spare keeper keeps a spare current and a failover takes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::model::OperationState;
use crate::testkit::FakeEc2;
use crate::workflows::failover::{Request, plan, start};
use crate::workflows::test_world::{add_backup, drill_settings, engine_over, new_instance, until, world_with};

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

fn spare_answers(action: &str) -> crate::testkit::FakeAnswer {
    crate::testkit::fake_ok(action)
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
