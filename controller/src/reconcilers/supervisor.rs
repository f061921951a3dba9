//! Supervised background tasks: the scheduler, the health monitor, the
//! fence keeper and every other loop the controller runs beside its RPCs.
//!
//! A reconciler never ends by itself. When one does (it returned, or it
//! panicked), the supervisor logs it with the task's name, counts it
//! (`dr_task_restarts_total{task}` and `dr_task_up{task}` in `/metrics`),
//! raises a fleet-wide `controller.task_restarted` event (critical: until it
//! runs again that part of the controller is not working) and starts it
//! again after a backoff (1 s, doubling to at most 60 s; reset once a run
//! has lasted 5 minutes). The controller therefore never runs on with a dead
//! health monitor while it still answers `drctl status`.
//!
//! Test-only fault point: `DR_CONTROLLER_PANIC_IN=<task>` makes that task
//! panic once, at the start of its first run (`engine::faults::panic_point`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::notify::{Notifier, event};
use crate::domain::events::EventKind;
use crate::engine::faults;

/// The first wait before a restart; doubled per consecutive failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A run this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(300);

/// What one supervised task has done since the controller started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// Times it ended or panicked and was started again.
    pub restarts: u64,
    /// Running now.
    pub up: bool,
    /// Why it last ended ("" when it never did).
    pub last_failure: String,
}

/// Starts and watches the controller's background tasks. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    notifier: Notifier,
    stats: Arc<Mutex<BTreeMap<&'static str, TaskStats>>>,
    first_backoff: Duration,
}

impl Supervisor {
    /// A supervisor whose restart events are recorded through `notifier`.
    pub fn new(notifier: Notifier) -> Supervisor {
        Supervisor { notifier, stats: Arc::default(), first_backoff: FIRST_BACKOFF }
    }

    /// Every task's counters, by name.
    pub fn stats(&self) -> BTreeMap<&'static str, TaskStats> {
        self.stats.lock().expect("supervisor stats lock").clone()
    }

    /// Runs `make()`'s future as the task `name`, and again (with backoff)
    /// whenever it ends or panics.
    pub fn spawn<F, Fut>(&self, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.stats.lock().expect("supervisor stats lock").entry(name).or_default();
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = this.first_backoff;
            loop {
                this.set(name, |s| s.up = true);
                let fut = make();
                let started = Instant::now();
                let ended = tokio::spawn(async move {
                    faults::panic_point(name);
                    fut.await
                })
                .await;
                let why = match ended {
                    Ok(()) => "it ended".to_owned(),
                    Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e.into_panic())),
                    Err(e) => format!("it was cancelled: {e}"),
                };
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = this.first_backoff;
                }
                let restarts = this.set(name, |s| {
                    s.up = false;
                    s.restarts += 1;
                    s.last_failure = why.clone();
                    s.restarts
                });
                tracing::error!(task = name, reason = %why, restarts, backoff = ?backoff, "background task stopped; restarting it");
                let e = event(
                    "",
                    EventKind::ControllerTaskRestarted,
                    "critical",
                    format!("the controller's {name} task stopped ({why}); it is started again in {}", humantime::format_duration(backoff)),
                    json!({"task": name, "reason": why, "restarts": restarts, "backoff_ms": backoff.as_millis() as u64}),
                    "",
                );
                if let Err(err) = this.notifier.record(vec![], vec![e]).await {
                    tracing::error!(task = name, error = %err, "cannot record the task's restart event");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }

    fn set<T>(&self, name: &'static str, f: impl FnOnce(&mut TaskStats) -> T) -> T {
        f(self.stats.lock().expect("supervisor stats lock").entry(name).or_default())
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map(|s| (*s).to_owned()).unwrap_or_else(|| "a non-text panic".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn notifier() -> (tempfile::TempDir, Notifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(&dir.path().join("s.db")).await.expect("store");
        (dir, Notifier { store, sinks: Arc::new(vec![]) })
    }

    #[tokio::test]
    async fn a_panicking_task_is_restarted_counted_and_reported() {
        let (_dir, notifier) = notifier().await;
        let mut sup = Supervisor::new(notifier.clone());
        sup.first_backoff = Duration::from_millis(10);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("probe", move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("injected for the test");
                }
                std::future::pending::<()>().await
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "the task was not started again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stats = sup.stats()["probe"].clone();
        assert_eq!((stats.restarts, stats.up), (1, true), "{stats:?}");
        assert_eq!(stats.last_failure, "it panicked: injected for the test");
        let events = notifier.store.events(String::new(), 0, 100, false).await.expect("events");
        let restarted: Vec<_> = events.iter().filter(|e| e.kind == "controller.task_restarted").collect();
        assert_eq!(restarted.len(), 1, "{events:?}");
        assert_eq!((restarted[0].site_id.as_str(), restarted[0].severity.as_str()), ("", "critical"));
        assert_eq!(restarted[0].evidence["task"], "probe");
    }

    #[tokio::test]
    async fn a_task_that_ends_is_started_again_with_growing_backoff() {
        let (_dir, notifier) = notifier().await;
        let mut sup = Supervisor::new(notifier);
        sup.first_backoff = Duration::from_millis(5);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("short", move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "the task was not started again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(sup.stats()["short"].restarts >= 2);
        assert_eq!(sup.stats()["short"].last_failure, "it ended");
    }
}
