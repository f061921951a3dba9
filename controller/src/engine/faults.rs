//! Fault injection for crash-recovery tests.
//!
//! When the environment variable `DR_CONTROLLER_CRASH_AT` names a crash
//! point, the controller sends itself SIGKILL when it reaches that point:
//! no destructor, no flush, exactly like `kill -9` at the worst moment. The
//! end-to-end tests use it to prove that a restarted controller finishes the
//! operation without duplicating work. Points:
//!
//! - `backup.after_create_image`: CreateImage has returned an AMI id, the
//!   step's result is not yet stored.
//! - `step.<name>.before`: a step is marked running, it has not acted.
//! - `step.<name>.after`: a step has acted, its result is not stored.
//! - `api.<rpc>.before_reply` (`start_backup`, `start_failover`,
//!   `start_drill`, `signal_operation`): the admin API has started the
//!   operation (or stored the signal), its answer is not sent.
//!
//! `DR_CONTROLLER_FAIL_AT=<step>` instead makes that step of a backup fail
//! (with an error saying so) before it acts: the tests use it to show that a
//! quiesce is lifted also when a later step fails.
//!
//! `DR_CONTROLLER_DELAY_AT=<point>=<duration>` (e.g.
//! `step.create_image.before=5s`) makes the controller wait there once per
//! run of that point: the tests use it to let a freeze's deadline pass.
//!
//! `DR_CONTROLLER_PANIC_IN=<task>` makes the supervised background task of
//! that name (`scheduler`, `health`, ...: `reconcilers::supervisor`) panic
//! once, at the start of its first run: the tests use it to show that the
//! task is started again, counted in `/metrics` and reported as an event.
//!
//! Unset (always, in production), each costs one string comparison.

use std::sync::OnceLock;

pub const ENV: &str = "DR_CONTROLLER_CRASH_AT";

static POINT: OnceLock<Option<String>> = OnceLock::new();

pub fn crash_point(point: &str) {
    let armed = POINT.get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()));
    if armed.as_deref() == Some(point) {
        tracing::error!(point, "crash point reached: sending SIGKILL to self ({ENV} is set)");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

pub const FAIL_ENV: &str = "DR_CONTROLLER_FAIL_AT";

static FAIL: OnceLock<Option<String>> = OnceLock::new();

/// `Some(message)` when `DR_CONTROLLER_FAIL_AT` names `step`.
pub fn fail_point(step: &str) -> Option<String> {
    let armed = FAIL.get_or_init(|| std::env::var(FAIL_ENV).ok().filter(|v| !v.is_empty()));
    (armed.as_deref() == Some(step)).then(|| format!("injected failure ({FAIL_ENV}={step})"))
}

pub const DELAY_ENV: &str = "DR_CONTROLLER_DELAY_AT";

static DELAY: OnceLock<Option<(String, std::time::Duration)>> = OnceLock::new();

/// Sleeps at `point` when `DR_CONTROLLER_DELAY_AT` names it.
pub async fn delay_point(point: &str) {
    let armed = DELAY.get_or_init(|| {
        let v = std::env::var(DELAY_ENV).ok()?;
        let (p, d) = v.rsplit_once('=')?;
        Some((p.to_owned(), humantime::parse_duration(d).ok()?))
    });
    if let Some((p, d)) = armed.as_ref().filter(|(p, _)| p == point) {
        tracing::warn!(point = %p, delay = ?d, "delay point reached ({DELAY_ENV} is set)");
        tokio::time::sleep(*d).await;
    }
}

pub const PANIC_ENV: &str = "DR_CONTROLLER_PANIC_IN";

static PANIC: OnceLock<Option<String>> = OnceLock::new();
static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Panics (once per process) when `DR_CONTROLLER_PANIC_IN` names `task`.
pub fn panic_point(task: &str) {
    let armed = PANIC.get_or_init(|| std::env::var(PANIC_ENV).ok().filter(|v| !v.is_empty()));
    if armed.as_deref() == Some(task) && !PANICKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!(task, "panic point reached ({PANIC_ENV} is set)");
        panic!("injected panic ({PANIC_ENV}={task})");
    }
}
