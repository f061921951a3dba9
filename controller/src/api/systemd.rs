//! systemd's service protocol (`Type=notify` in deploy/dr-controller.service):
//! `READY=1` once the controller serves, `WATCHDOG=1` while its runtime and
//! its store's worker answer, `STOPPING=1` when it shuts down. Outside
//! systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::store::Store;

fn send(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The controller serves: systemd's start job ends.
pub fn ready() {
    send(NotifyState::Ready);
}

/// The controller is shutting down.
pub fn stopping() {
    send(NotifyState::Stopping);
}

/// With `WatchdogSec=` set, pings systemd at half the interval as long as
/// the store answers a call within that half: a wedged runtime or store
/// worker stops the pings and systemd restarts the controller.
pub fn spawn_watchdog(store: Store) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec) / 2;
    tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match tokio::time::timeout(every, store.with(|_| Ok(()))).await {
                Ok(Ok(())) => send(NotifyState::Watchdog),
                Ok(Err(e)) => tracing::warn!(error = %e, "store worker failed; no watchdog ping"),
                Err(_) => tracing::warn!(waited_ms = every.as_millis() as u64, "store worker busy; no watchdog ping"),
            }
        }
    });
}
