//! The engine against a real store, with test workflows.

use std::sync::atomic::AtomicU32;

use serde::Deserialize;

use super::*;
use crate::store::Store;

#[derive(Default)]
struct TestDeps {
    log: Mutex<Vec<String>>,
    /// Failures still to produce per step name (kind, count).
    fail: Mutex<HashMap<&'static str, (ErrorKind, u32)>>,
    /// A step named here waits until the gate opens (or an abort).
    gate: Notify,
    gated: Mutex<Vec<&'static str>>,
    runs: AtomicU32,
}

impl TestDeps {
    fn log(&self, s: impl Into<String>) {
        self.log.lock().expect("lock").push(s.into());
    }
    fn logged(&self) -> Vec<String> {
        self.log.lock().expect("lock").clone()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct St {
    done: Vec<String>,
}

async fn act(ctx: &Ctx<TestDeps>, st: &mut St) -> Result<Outcome, StepError> {
    let name = ctx.step_name();
    let deps = ctx.deps();
    deps.runs.fetch_add(1, Ordering::Relaxed);
    deps.log(format!("{}:{name}", ctx.op_id.split('-').next().unwrap_or("")));
    if deps.gated.lock().expect("lock").iter().any(|g| *g == name) {
        loop {
            if ctx.abort_requested() {
                return Err(StepError::new(ErrorKind::Failed, "interrupted by an abort"));
            }
            if tokio::time::timeout(Duration::from_millis(20), deps.gate.notified()).await.is_ok() {
                break;
            }
        }
    }
    let failure = {
        let mut fail = deps.fail.lock().expect("lock");
        match fail.get_mut(name.as_str()) {
            Some((kind, n)) if *n > 0 => {
                *n -= 1;
                Some(*kind)
            }
            _ => None,
        }
    };
    if let Some(kind) = failure {
        return Err(StepError::new(kind, format!("{name} broke")));
    }
    if name == "approve" {
        return Ok(Outcome::AwaitApproval("a human must agree".into()));
    }
    st.done.push(name.clone());
    Ok(Outcome::Done(format!("{name} done")))
}

macro_rules! test_workflow {
    ($ty:ident, $kind:literal, $prio:literal, $preemptible:literal, [$($def:expr),* $(,)?]) => {
        struct $ty;
        impl Workflow for $ty {
            type Deps = TestDeps;
            type State = St;
            const KIND: &'static str = $kind;
            const VERSION: u32 = 1;
            const PRIORITY: u8 = $prio;
            const PREEMPTIBLE: bool = $preemptible;
            fn steps() -> Vec<StepDef<TestDeps, St>> {
                vec![$($def),*]
            }
            fn protects(st: &St) -> Vec<Protected> {
                st.done.iter().map(|d| Protected::Image(format!("ami-{d}"))).collect()
            }
        }
    };
}

fn s(name: &'static str) -> StepDef<TestDeps, St> {
    StepDef::new(name, |c, st| Box::pin(act(c, st)))
}

test_workflow!(Low, "low", 1, true, [s("one"), s("two"), s("undo").always()]);
test_workflow!(High, "high", 9, false, [s("alpha"), s("beta")]);
test_workflow!(
    Retrying,
    "retrying",
    1,
    false,
    [s("flaky").retry(Retry {
        on: &[ErrorKind::Transient],
        attempts: 3,
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(4))
    })]
);
test_workflow!(Pausing, "pausing", 1, false, [s("risky").on_failure(OnFailure::Pause), s("after"), s("cleanup").always()]);
test_workflow!(Approving, "approving", 1, false, [s("approve"), s("go"), s("cleanup").always()]);
test_workflow!(Compensating, "comp", 1, false, [s("quiesce").on_failure(OnFailure::Compensate("unquiesce")), s("work"), s("unquiesce")]);

async fn world() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("state.db")).await.expect("open");
    store.upsert_site(Site { id: "s1".into(), region: "r".into(), primary_instance_id: "i-1".into(), role_arn: None }).await.expect("site");
    (dir, store)
}

fn engine(store: &Store, deps: TestDeps) -> Engine<TestDeps> {
    let e = Engine::new(store.clone(), deps);
    e.register::<Low>();
    e.register::<High>();
    e.register::<Retrying>();
    e.register::<Pausing>();
    e.register::<Approving>();
    e.register::<Compensating>();
    e
}

fn start<'a>(state: St) -> Start<'a, St> {
    Start { site_id: "s1", requested_by: "test", state, slot: None }
}

async fn wait_state(store: &Store, id: &str, want: &[OperationState]) -> Operation {
    for _ in 0..2000 {
        let op = store.operation(id.into()).await.expect("read").expect("exists");
        if want.contains(&op.state) {
            return op;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("operation {id} never reached {want:?}");
}

fn step<'a>(op: &'a Operation, name: &str) -> &'a StepRecord {
    op.steps.iter().find(|s| s.name == name).expect("step exists")
}

#[tokio::test]
async fn steps_run_in_order_with_typed_state_and_the_always_step_runs_after_a_failure() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    let op = e.start::<Low>(start(St::default())).await.expect("start");
    let done = wait_state(&store, &op.id, &[OperationState::Succeeded]).await;
    assert_eq!(done.wf_state, Some(serde_json::json!({"done": ["one", "two", "undo"]})));
    assert!(done.protects.is_empty(), "a finished operation protects nothing");

    e.deps().fail.lock().expect("lock").insert("one", (ErrorKind::Failed, 1));
    let op = e.start::<Low>(start(St::default())).await.expect("start");
    let failed = wait_state(&store, &op.id, &[OperationState::Failed]).await;
    assert_eq!(step(&failed, "one").state, StepState::Failed);
    assert_eq!(step(&failed, "two").state, StepState::Pending, "after a failure only `always` steps run");
    assert_eq!(step(&failed, "undo").state, StepState::Done);
    assert_eq!(failed.error, "step one failed: one broke");
}

#[tokio::test]
async fn a_compensation_named_by_a_failed_step_runs() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    e.deps().fail.lock().expect("lock").insert("quiesce", (ErrorKind::Refused, 1));
    let op = e.start::<Compensating>(start(St::default())).await.expect("start");
    let failed = wait_state(&store, &op.id, &[OperationState::Failed]).await;
    assert_eq!(step(&failed, "work").state, StepState::Pending);
    assert_eq!(step(&failed, "unquiesce").state, StepState::Done, "the named compensation ran");
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_policy_kinds_and_attempts() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    e.deps().fail.lock().expect("lock").insert("flaky", (ErrorKind::Transient, 2));
    let op = e.start::<Retrying>(start(St::default())).await.expect("start");
    let done = wait_state(&store, &op.id, &[OperationState::Succeeded]).await;
    assert_eq!(step(&done, "flaky").attempts, 3);
    // A kind the policy does not name is not retried.
    e.deps().fail.lock().expect("lock").insert("flaky", (ErrorKind::Refused, 1));
    let op = e.start::<Retrying>(start(St::default())).await.expect("start");
    let failed = wait_state(&store, &op.id, &[OperationState::Failed]).await;
    assert_eq!(step(&failed, "flaky").attempts, 1);
    // Three transient failures exhaust three attempts.
    e.deps().fail.lock().expect("lock").insert("flaky", (ErrorKind::Transient, 3));
    let op = e.start::<Retrying>(start(St::default())).await.expect("start");
    let failed = wait_state(&store, &op.id, &[OperationState::Failed]).await;
    assert_eq!(step(&failed, "flaky").attempts, 3);
}

#[tokio::test]
async fn a_step_that_failed_before_a_restart_is_not_rerun_into_success() {
    let (_d, store) = world().await;
    let first = engine(&store, TestDeps::default());
    first.deps().fail.lock().expect("lock").insert("one", (ErrorKind::Failed, 1));
    // The compensation hangs: the "crash" happens while it runs.
    first.deps().gated.lock().expect("lock").push("undo");
    let op = first.start::<Low>(start(St::default())).await.expect("start");
    for _ in 0..500 {
        if first.deps().logged().iter().any(|l| l.ends_with(":undo")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A new controller takes over (the old one would be dead; here its
    // writes are fenced by the new epoch). Step `one` would now succeed.
    let second = engine(&store, TestDeps::default());
    assert_eq!(second.resume_all().await.expect("resume"), 1);
    let failed = wait_state(&store, &op.id, &[OperationState::Failed]).await;
    assert_eq!(step(&failed, "one").attempts, 1, "the failed step did not run again");
    assert!(second.deps().logged().iter().all(|l| !l.ends_with(":one")), "{:?}", second.deps().logged());
    assert_eq!(step(&failed, "undo").state, StepState::Done);
    assert!(failed.error.contains("one broke"), "the stored failure survives: {}", failed.error);
    // The first controller, released, cannot write any more.
    first.deps().gate.notify_waiters();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = store.operation(op.id.clone()).await.expect("read").expect("exists");
    assert_eq!(after.state, OperationState::Failed);
    assert_eq!(after.owner, second.owner());
}

#[tokio::test]
async fn a_paused_operation_waits_for_a_human_and_resume_retries_the_step() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    e.deps().fail.lock().expect("lock").insert("risky", (ErrorKind::Failed, 1));
    let op = e.start::<Pausing>(start(St::default())).await.expect("start");
    let waiting = wait_state(&store, &op.id, &[OperationState::Waiting]).await;
    assert!(waiting.waiting_for.contains("step risky failed: risky broke"), "{}", waiting.waiting_for);
    assert!(waiting.waiting_for.contains(&format!("drctl operation resume {}", op.id)), "{}", waiting.waiting_for);
    assert!(e.signal(&op.id, Signal::Approve, "alice").await.is_err(), "nothing to approve");
    e.signal(&op.id, Signal::Resume, "alice").await.expect("resume");
    let done = wait_state(&store, &op.id, &[OperationState::Succeeded]).await;
    assert_eq!(step(&done, "risky").attempts, 2);
    assert_eq!(step(&done, "after").state, StepState::Done);
    assert!(e.signal(&op.id, Signal::Resume, "alice").await.is_err(), "an ended operation takes no signal");
}

#[tokio::test]
async fn a_signal_sent_while_no_controller_runs_acts_at_the_next_start() {
    let (_d, store) = world().await;
    let first = engine(&store, TestDeps::default());
    first.deps().fail.lock().expect("lock").insert("risky", (ErrorKind::Failed, 5));
    let op = first.start::<Pausing>(start(St::default())).await.expect("start");
    wait_state(&store, &op.id, &[OperationState::Waiting]).await;
    // Stored directly, as if the admin API wrote it while this controller was down.
    store.add_signal(op.id.clone(), Signal::Abort, "alice".into()).await.expect("signal");
    let second = engine(&store, TestDeps::default());
    second.resume_all().await.expect("resume");
    let cancelled = wait_state(&store, &op.id, &[OperationState::Cancelled]).await;
    assert_eq!(step(&cancelled, "after").state, StepState::Pending);
    assert_eq!(step(&cancelled, "cleanup").state, StepState::Done, "compensations run on abort");
    assert!(cancelled.error.contains("aborted after step risky failed"), "{}", cancelled.error);
}

#[tokio::test]
async fn approval_waits_then_runs_and_deny_cancels() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    let op = e.start::<Approving>(start(St::default())).await.expect("start");
    let waiting = wait_state(&store, &op.id, &[OperationState::Waiting]).await;
    assert!(waiting.waiting_for.starts_with("approval: a human must agree"), "{}", waiting.waiting_for);
    assert!(e.signal(&op.id, Signal::Resume, "bob").await.is_err(), "resume is not approve");
    e.signal(&op.id, Signal::Approve, "bob").await.expect("approve");
    let done = wait_state(&store, &op.id, &[OperationState::Succeeded]).await;
    assert_eq!(step(&done, "go").state, StepState::Done);

    let op = e.start::<Approving>(start(St::default())).await.expect("start");
    wait_state(&store, &op.id, &[OperationState::Waiting]).await;
    e.signal(&op.id, Signal::Deny, "bob").await.expect("deny");
    let cancelled = wait_state(&store, &op.id, &[OperationState::Cancelled]).await;
    assert_eq!(step(&cancelled, "go").state, StepState::Pending);
    assert_eq!(step(&cancelled, "cleanup").state, StepState::Done);
}

#[tokio::test]
async fn a_higher_priority_workflow_preempts_after_the_compensations_and_equal_ones_are_refused() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    e.deps().gated.lock().expect("lock").push("two");
    let low = e.start::<Low>(start(St::default())).await.expect("start");
    for _ in 0..500 {
        if e.deps().logged().iter().any(|l| l.ends_with(":two")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Another low one is refused while the first runs.
    let busy = e.start::<Low>(start(St::default())).await;
    assert!(matches!(busy, Err(EngineError::Store(StoreError::Busy { .. }))), "{:?}", busy.map(|o| o.id));
    let high = e.start::<High>(start(St::default())).await.expect("preempts");
    let cancelled = wait_state(&store, &low.id, &[OperationState::Cancelled]).await;
    assert_eq!(step(&cancelled, "undo").state, StepState::Done, "the preempted one's compensation ran");
    let done = wait_state(&store, &high.id, &[OperationState::Succeeded]).await;
    assert_eq!(done.state, OperationState::Succeeded);
    let log = e.deps().logged();
    let undo = log.iter().position(|l| l == "low:undo").expect("undo ran");
    let alpha = log.iter().position(|l| l == "high:alpha").expect("alpha ran");
    assert!(undo < alpha, "the preempting workflow starts after the compensation: {log:?}");
    // Nothing preempts the high one: a low one is refused beside it.
    e.deps().gated.lock().expect("lock").push("alpha");
    let high2 = e.start::<High>(start(St::default())).await.expect("start");
    let refused = e.start::<Low>(start(St::default())).await;
    assert!(matches!(refused, Err(EngineError::Store(StoreError::Busy { .. }))));
    e.signal(&high2.id, Signal::Abort, "test").await.expect("abort");
    wait_state(&store, &high2.id, &[OperationState::Cancelled]).await;
}

#[tokio::test]
async fn protected_resources_follow_the_state_and_end_with_the_operation() {
    let (_d, store) = world().await;
    let e = engine(&store, TestDeps::default());
    e.deps().gated.lock().expect("lock").push("two");
    let op = e.start::<Low>(start(St::default())).await.expect("start");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..500 {
        seen = store.protected_images().await.expect("protected");
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, ["ami-one".to_owned()].into(), "the image named by the state is protected while it runs");
    e.deps().gate.notify_waiters();
    wait_state(&store, &op.id, &[OperationState::Succeeded]).await;
    assert!(store.protected_images().await.expect("protected").is_empty());
}

#[test]
fn an_isolated_workflow_runs_beside_others_but_never_beside_its_own_kind() {
    let rank = |priority, preemptible, isolated| Rank { priority, preemptible, isolated };
    let ranks: HashMap<&'static str, Rank> =
        [("backup", rank(10, true, false)), ("failover", rank(100, false, false)), ("drill", rank(5, true, true))].into();
    let op = |id: &str, kind: &str| ActiveOp { id: id.into(), kind: kind.into(), state: OperationState::Running };
    let drill = ranks["drill"];
    assert_eq!(admission("drill", drill, &ranks, &[op("b", "backup")]), Admission::Admit);
    assert_eq!(admission("drill", drill, &ranks, &[op("f", "failover")]), Admission::Admit);
    assert_eq!(admission("drill", drill, &ranks, &[op("d", "drill")]), Admission::Refuse("d".into()));
    assert_eq!(admission("backup", ranks["backup"], &ranks, &[op("d", "drill")]), Admission::Admit);
    assert_eq!(admission("failover", ranks["failover"], &ranks, &[op("d", "drill")]), Admission::Admit);
    // The others keep their rules.
    assert_eq!(
        admission("failover", ranks["failover"], &ranks, &[op("b", "backup"), op("d", "drill")]),
        Admission::Preempt(vec!["b".into()])
    );
    assert_eq!(admission("backup", ranks["backup"], &ranks, &[op("f", "failover")]), Admission::Refuse("f".into()));
}
