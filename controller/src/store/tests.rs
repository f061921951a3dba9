use super::*;
use crate::store::testing;

fn site() -> Site {
    Site { id: "s1".into(), region: "us-east-1".into(), primary_instance_id: "i-1".into(), role_arn: None }
}

pub(super) fn op(id: &str) -> Operation {
    Operation {
        id: id.into(),
        kind: "backup".into(),
        site_id: "s1".into(),
        state: OperationState::Running,
        error: String::new(),
        requested_by: "operator/alice".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        steps: vec![StepRecord {
            seq: 0,
            name: "create_image".into(),
            state: StepState::Pending,
            attempts: 0,
            started_at_ms: 0,
            finished_at_ms: 0,
            detail: String::new(),
            error: String::new(),
            result: None,
        }],
        waiting_for: String::new(),
        failure: String::new(),
        owner: String::new(),
        epoch: 0,
        state_version: 1,
        wf_state: None,
        protects: vec![],
    }
}

fn one_per_site(active: &[ActiveOp]) -> Admission {
    match active.first() {
        Some(a) => Admission::Refuse(a.id.clone()),
        None => Admission::Admit,
    }
}

fn backup(id: &str, completed: Millis, op: &str) -> Backup {
    Backup { operation_id: op.into(), ..crate::testkit::available_backup("s1", "i-1", id, completed, completed) }
}

#[tokio::test]
async fn survives_reopen_admits_per_site_and_fences_stale_epochs() {
    let dir = tempfile::tempdir().expect("tempdir");
    for first in testing::both(dir.path()).await {
        eprintln!("on {}", first.engine());
        let store = first.clone();
        store.upsert_site(site()).await.expect("site");
        store.create_operation(op("op-1"), None, one_per_site).await.expect("op");
        let busy = store.create_operation(op("op-2"), None, one_per_site).await;
        assert!(matches!(busy, Err(StoreError::Busy { .. })), "{busy:?}");
        let epoch = store.claim("op-1".into(), "controller-a".into()).await.expect("claim");
        let mut step = store.operation("op-1".into()).await.expect("read").expect("exists").steps[0].clone();
        step.state = StepState::Done;
        let state = (1, serde_json::json!({"image_id": "ami-1"}), vec![Protected::Image("ami-1".into())]);
        store.put_step("op-1".into(), epoch, step.clone(), Some(state)).await.expect("step");
        // A second controller claims it: the first one's writes are refused.
        let newer = store.claim("op-1".into(), "controller-b".into()).await.expect("claim again");
        assert_eq!(newer, epoch + 1);
        let fenced = store.put_step("op-1".into(), epoch, step, None).await;
        assert!(matches!(fenced, Err(StoreError::Fenced { .. })), "{fenced:?}");
        assert_eq!(store.protected_images().await.expect("protected"), HashSet::from(["ami-1".to_owned()]));
        drop(store);
        let store = testing::reopen(&first).await;
        let moved = Site { primary_instance_id: "i-2".into(), ..site() };
        let stored = store.upsert_sites(vec![moved]).await.expect("sites");
        assert_eq!(stored[0].primary_instance_id, "i-1", "the store's primary wins");
        assert_eq!(store.active_operations().await.expect("active"), vec!["op-1".to_string()]);
        let op1 = store.operation("op-1".into()).await.expect("read").expect("exists");
        assert_eq!(op1.steps[0].state, StepState::Done);
        assert_eq!(op1.wf_state, Some(serde_json::json!({"image_id": "ami-1"})));
        assert_eq!(op1.owner, "controller-b");
        store
            .set_operation_state("op-1".into(), op1.epoch, OperationState::Succeeded, String::new(), String::new(), String::new())
            .await
            .expect("finish");
        assert!(store.protected_images().await.expect("protected").is_empty(), "a finished operation protects nothing");
        store.create_operation(op("op-2"), None, one_per_site).await.expect("a second operation once the first ended");
    }
}

#[tokio::test]
async fn a_scheduled_slot_is_recorded_with_its_operation_or_not_at_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in testing::both(dir.path()).await {
        eprintln!("on {}", store.engine());
        store.upsert_site(site()).await.expect("site");
        let slot = |kind: &str| (String::from("s1"), kind.to_owned());
        store.create_operation(op("op-1"), Some(1000), one_per_site).await.expect("op");
        assert_eq!(store.slots().await.expect("slots").get(&slot("backup")), Some(&1000));
        // Refused: neither the operation nor the slot is written.
        assert!(store.create_operation(op("op-2"), Some(2000), one_per_site).await.is_err());
        assert_eq!(store.slots().await.expect("slots").get(&slot("backup")), Some(&1000));
        assert!(store.operation("op-2".into()).await.expect("read").is_none());
        // Each kind has its own slot.
        store.set_last_slot("s1".into(), "drill".into(), 5000).await.expect("drill slot");
        let slots = store.slots().await.expect("slots");
        assert_eq!((slots.get(&slot("backup")), slots.get(&slot("drill"))), (Some(&1000), Some(&5000)));
    }
}

#[tokio::test]
async fn preemption_stores_an_abort_for_the_preempted_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in testing::both(dir.path()).await {
        eprintln!("on {}", store.engine());
        store.upsert_site(site()).await.expect("site");
        store.create_operation(op("low"), None, one_per_site).await.expect("op");
        let preempted = store
            .create_operation(op("high"), None, |active| Admission::Preempt(active.iter().map(|a| a.id.clone()).collect()))
            .await
            .expect("preempt");
        assert_eq!(preempted, vec!["low".to_string()]);
        let signals = store.pending_signals("low".into()).await.expect("signals");
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[0].1, Signal::Abort);
        store.consume_signal(signals[0].0).await.expect("consume");
        assert!(store.pending_signals("low".into()).await.expect("signals").is_empty());
    }
}

#[tokio::test]
async fn copies_are_ordered_by_their_backup_not_by_retry_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in testing::both(dir.path()).await {
        eprintln!("on {}", store.engine());
        store.upsert_site(site()).await.expect("site");
        for (i, (ami, done)) in [("ami-old", 1_000u64), ("ami-new", 2_000)].into_iter().enumerate() {
            let id = format!("op-{i}");
            let mut o = op(&id);
            o.state = OperationState::Succeeded;
            store.create_operation(o, None, |_| Admission::Admit).await.expect("op");
            store.record_backup(backup(ami, done, &id)).await.expect("backup");
        }
        // The old backup's copy was retried last: its request time is the newest.
        for (src, requested) in [("ami-new", 10u64), ("ami-old", 99)] {
            store
                .put_copy(Copy {
                    source_image_id: src.into(),
                    region: "us-west-2".into(),
                    image_id: format!("{src}-copy"),
                    state: CopyState::Available,
                    attempts: 1,
                    error: String::new(),
                    requested_at_ms: requested,
                    completed_at_ms: requested,
                    deleted_at_ms: 0,
                })
                .await
                .expect("copy");
        }
        let copies = store.available_copies_in("s1".into(), "us-west-2".into()).await.expect("copies");
        let order: Vec<&str> = copies.iter().map(|c| c.source_image_id.as_str()).collect();
        assert_eq!(order, vec!["ami-new", "ami-old"], "the newest backup's copy comes first");
    }
}

#[tokio::test]
async fn an_online_backup_holds_what_is_still_in_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let store = Store::open(&path).await.expect("open");
    store.upsert_site(site()).await.expect("site");
    let mut o = op("op-1");
    o.state = OperationState::Succeeded;
    store.create_operation(o, None, |_| Admission::Admit).await.expect("op");
    store.record_backup(backup("ami-1", 5, "op-1")).await.expect("backup");
    // A plain copy of state.db alone (what a file backup of only that file
    // gets while the controller runs) lacks what sits in the WAL.
    let plain = dir.path().join("plain.db");
    std::fs::copy(&path, &plain).expect("copy");
    let plain_store = Store::open(&plain).await.expect("a plain copy opens");
    assert_eq!(plain_store.count_backups().await.expect("count"), 0, "the catalog was still in the WAL");
    let copy = dir.path().join("backup.db");
    assert_eq!(store.backup_to(copy.clone()).await.expect("backup"), 1);
    let restored = Store::open(&copy).await.expect("open the copy");
    assert_eq!(restored.backups("s1".into()).await.expect("backups").len(), 1);
    assert!(store.backup_to(copy).await.is_err(), "an existing file is never overwritten");
}

#[tokio::test]
async fn a_promotion_moves_the_primary_and_its_region_and_the_config_does_not_undo_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in testing::both(dir.path()).await {
        eprintln!("on {}", store.engine());
        store.upsert_site(site()).await.expect("site");
        store.promote("s1".into(), "i-2".into(), "i-1".into(), "replaced by i-2".into(), "us-west-2".into()).await.expect("promote");
        let s = store.site("s1".into()).await.expect("read").expect("site");
        assert_eq!((s.primary_instance_id.as_str(), s.region.as_str()), ("i-2", "us-west-2"));
        let old = store.instance("s1".into(), "i-1".into()).await.expect("read").expect("old instance recorded");
        assert_eq!((old.role.as_str(), old.reason.as_str()), ("fenced", "replaced by i-2"));
        // A restart upserts the configured site (instance i-1, us-east-1): the
        // store's primary and region win after a failover.
        let after = store.upsert_site(site()).await.expect("upsert");
        assert_eq!((after.primary_instance_id.as_str(), after.region.as_str()), ("i-2", "us-west-2"));
        // Without a failover the config's region still applies.
        let mut other = site();
        other.id = "s2".into();
        store.upsert_site(other.clone()).await.expect("s2");
        other.region = "eu-west-1".into();
        assert_eq!(store.upsert_site(other).await.expect("s2 again").region, "eu-west-1");
    }
}

#[tokio::test]
async fn launch_facts_are_recorded_once_per_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in testing::both(dir.path()).await {
        eprintln!("on {}", store.engine());
        store.upsert_site(site()).await.expect("site");
        let facts = LaunchFacts { instance_id: "i-1".into(), instance_type: "m5.xlarge".into(), ..LaunchFacts::default() };
        store.put_launch_facts("ami-1".into(), "s1".into(), facts.clone()).await.expect("put");
        let later = LaunchFacts { instance_type: "t3.small".into(), ..facts.clone() };
        store.put_launch_facts("ami-1".into(), "s1".into(), later).await.expect("put again");
        assert_eq!(store.launch_facts("ami-1".into()).await.expect("read"), Some(facts), "a repeat keeps the first");
        assert_eq!(store.launch_facts("ami-2".into()).await.expect("read"), None);
    }
}

#[tokio::test]
async fn batched_verification_and_liveness_touch_every_instance_named_and_keep_the_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in testing::both(dir.path()).await {
        eprintln!("on {}", store.engine());
        // More sites than one batch holds.
        let sites: Vec<Site> = (0..BATCH_ROWS + 3)
            .map(|i| Site { id: format!("s{i}"), region: "us-east-1".into(), primary_instance_id: format!("i-{i}"), role_arn: None })
            .collect();
        let stored = store.upsert_sites(sites.clone()).await.expect("sites");
        assert_eq!(stored, sites, "every site back, in order");
        for i in 0..BATCH_ROWS + 3 {
            let rec = InstanceRecord {
                site_id: format!("s{i}"),
                instance_id: format!("i-{i}"),
                role: "primary".into(),
                facts: InstanceFacts { instance_id: format!("i-{i}"), private_ip: "10.0.0.1".into(), ..Default::default() },
                last_seen_ms: 100,
                ..Default::default()
            };
            store.put_instance(rec).await.expect("instance");
        }
        let mut checks: Vec<(String, String, String)> =
            (0..BATCH_ROWS + 3).map(|i| (format!("s{i}"), format!("i-{i}"), format!("10.0.{}.{}", i / 250, i % 250))).collect();
        checks.push(("s0".into(), "i-unknown".into(), "10.9.9.9".into()));
        let recs = store.set_verified(checks.clone(), 777).await.expect("verify");
        assert_eq!(recs.len(), checks.len());
        for ((_, _, ip), rec) in checks.iter().zip(&recs).take(BATCH_ROWS + 3) {
            let rec = rec.as_ref().expect("a known instance");
            assert_eq!((rec.verified_private_ip.as_str(), rec.verified_at_ms), (ip.as_str(), 777));
        }
        assert!(recs.last().expect("last").is_none(), "an unknown instance has no record");
        // Liveness: the latest of several reports wins; an older one never lowers it.
        store
            .touch_seen(vec![("s1".into(), "i-1".into(), 300), ("s1".into(), "i-1".into(), 200), ("s2".into(), "i-2".into(), 50)])
            .await
            .expect("touch");
        let seen = |s: &str, i: &str| {
            let store = store.clone();
            let (s, i) = (s.to_owned(), i.to_owned());
            async move { store.instance(s, i).await.expect("read").expect("record").last_seen_ms }
        };
        assert_eq!((seen("s1", "i-1").await, seen("s2", "i-2").await), (300, 100));
    }
}
