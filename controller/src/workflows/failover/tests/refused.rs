//! The agent certificate a backup carries: the plan warns when it is
//! expired (or will be before the restored agent is due), and `wait_agent`
//! ends as soon as the restored agent is refused for it instead of
//! waiting the whole `failover.agent_timeout`.

use super::*;
use crate::domain::refusal::{AgentRefusal, RefusalReason};

const DAY: u64 = 86_400_000;

/// Like `world`, with an `agent_timeout` long enough that only the early
/// end can end `wait_agent` within a test.
async fn slow_agent_world(fake: Arc<FakeEc2>) -> (tempfile::TempDir, Store, Site, crate::workflows::Engine) {
    let failover = FailoverConfig { agent_timeout: Duration::from_secs(600), ..FailoverConfig::default() };
    crate::workflows::test_world::world_full(fake, HashMap::new(), HashMap::new(), failover).await
}

fn refusal(not_after_ms: u64, fingerprint: &str) -> AgentRefusal {
    let now = crate::domain::model::now_ms();
    AgentRefusal {
        site_id: "s1".into(),
        reason: RefusalReason::Expired,
        fingerprint: fingerprint.into(),
        serial: "7f:01".into(),
        not_before_ms: not_after_ms.saturating_sub(30 * DAY),
        not_after_ms,
        identity: "spiffe://dr.test/site/s1".into(),
        ca_verified: true,
        detail: "invalid peer certificate: Expired".into(),
        peer: "10.0.9.9:41000".into(),
        first_ms: now,
        last_ms: now,
        count: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_says_what_the_backups_agent_certificate_will_be() {
    let fake = Arc::new(FakeEc2::default());
    let (_dir, store, site, engine) = slow_agent_world(fake).await;
    let now = crate::domain::model::now_ms();
    let cert_warnings = |p: &Plan| p.warnings.iter().filter(|w| w.contains("agent certificate")).cloned().collect::<Vec<_>>();

    // A backup that recorded no certificate (taken before this version).
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    assert!(plan.backup.agent_cert.starts_with("unknown"), "{}", plan.backup.agent_cert);
    assert!(cert_warnings(&plan).is_empty(), "{:?}", plan.warnings);

    // Expired three days ago.
    store.set_backup_agent_cert("ami-b1".into(), now - 3 * DAY).await.expect("record");
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    assert!(plan.backup.agent_cert.starts_with("EXPIRED at"), "{}", plan.backup.agent_cert);
    let w = cert_warnings(&plan);
    assert_eq!(w.len(), 1, "{:?}", plan.warnings);
    assert!(w[0].contains("3 days ago") && w[0].contains("will be refused") && w[0].contains("drctl pki issue site s1"), "{}", w[0]);

    // Valid now, but not by the time the restored agent is due
    // (failover.agent_timeout is 10 minutes here).
    store.set_backup_agent_cert("ami-b1".into(), now + 120_000).await.expect("record");
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    let w = cert_warnings(&plan);
    assert_eq!(w.len(), 1, "{:?}", plan.warnings);
    assert!(w[0].contains("before the restored agent is due") && w[0].contains("will be refused"), "{}", w[0]);

    // Valid for a year: no warning, and the plan says until when.
    store.set_backup_agent_cert("ami-b1".into(), now + 365 * DAY).await.expect("record");
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    assert!(plan.backup.agent_cert.starts_with("valid until"), "{}", plan.backup.agent_cert);
    assert!(cert_warnings(&plan).is_empty(), "{:?}", plan.warnings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_agent_ends_early_when_the_restored_agent_is_refused() {
    let fake = Arc::new(FakeEc2::default());
    let (_dir, store, site, engine) = slow_agent_world(fake.clone()).await;
    let expired_at = crate::domain::model::now_ms() - 3 * DAY;
    store.set_backup_agent_cert("ami-b1".into(), expired_at).await.expect("record");
    let plan = plan::make(engine.deps(), &site, &Request::default()).await.expect("plan");
    let op = start(&engine, plan, "operator/t").await.expect("start");

    // Wait for the launch, then for wait_agent to be running.
    for _ in 0..300 {
        let o = store.operation(op.id.clone()).await.expect("read").expect("op");
        if o.steps.iter().any(|s| s.name == "wait_agent" && s.state.as_str() == "running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refusals = engine.deps().registry.refusals().clone();

    // A refused agent of the site with another certificate (a stray copy
    // from another backup) does not end the wait.
    refusals.record_for_test(refusal(expired_at - 40 * DAY, "other"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let o = store.operation(op.id.clone()).await.expect("read").expect("op");
    assert_eq!(o.state, OperationState::Running, "{o:#?}");

    // The restored agent, with the backup's expired certificate, is
    // refused: the step fails at once (not after 10 minutes) and says why.
    refusals.record_for_test(refusal(expired_at, "restored"));
    let waiting = until(&store, &op.id, OperationState::Waiting).await;
    assert!(waiting.waiting_for.contains("wait_agent"), "{}", waiting.waiting_for);
    let step = waiting.steps.iter().find(|s| s.name == "wait_agent").expect("wait_agent");
    assert!(step.error.contains("the restored agent's certificate was refused: certificate expired 3 days ago"), "{}", step.error);
    assert!(step.error.contains("drctl pki issue site s1"), "{}", step.error);
    assert!(!step.error.contains("never connected"), "{}", step.error);
    engine.signal(&op.id, Signal::Abort, "operator/t").await.expect("abort");
    until(&store, &op.id, OperationState::Cancelled).await;
}
