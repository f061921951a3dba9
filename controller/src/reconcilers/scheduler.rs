//! Starts backups when they are due according to each site's schedule.
//!
//! Each site fires at `slot + jitter_offset(site)`, where slots come from its
//! schedule (an interval or cron in a time zone). The last slot handled is
//! stored, so a restart neither repeats a backup nor floods: after downtime
//! a site fires once for the latest missed slot. A site whose last slot is
//! unknown (new) starts counting from now. A backup still running at the
//! next slot is not doubled: the slot is recorded as skipped. A slot is
//! recorded in the same transaction as the backup it starts, so a crash
//! can neither lose a slot nor start its backup twice.

use std::time::Duration;

use crate::engine::EngineError;
use crate::domain::model::{Millis, now_ms};
use crate::domain::policy::{Schedule, jitter_offset};
use crate::store::StoreError;
use crate::workflows::Engine;

pub async fn run(engine: Engine, tick: Duration) {
    loop {
        if let Err(e) = tick_once(&engine, now_ms()).await {
            tracing::error!(error = %e, "scheduler pass failed");
        }
        tokio::time::sleep(tick).await;
    }
}

/// The slot to fire for now, if any: the latest slot after `last` whose
/// time plus `offset` has come (one firing however many were missed).
pub fn due_slot(schedule: &Schedule, offset: Millis, last: Millis, now: Millis) -> Option<Millis> {
    let shifted = now.checked_sub(offset)?;
    let mut latest = schedule.next_slot(last).filter(|n| *n <= shifted)?;
    while let Some(n) = schedule.next_slot(latest).filter(|n| *n <= shifted) {
        latest = n;
    }
    Some(latest)
}

/// One pass at time `now`. Returns the sites a backup was started for.
pub async fn tick_once(engine: &Engine, now: Millis) -> Result<Vec<String>, StoreError> {
    let mut started = Vec::new();
    let store = engine.store();
    for site in store.sites().await? {
        let policy = engine.deps().policy(&site.id);
        let Some(schedule) = &policy.schedule else { continue };
        let offset = jitter_offset(&site.id, policy.jitter).as_millis() as Millis;
        let Some(last) = store.last_slot(site.id.clone()).await? else {
            store.set_last_slot(site.id.clone(), now.saturating_sub(offset)).await?;
            continue;
        };
        let Some(latest) = due_slot(schedule, offset, last, now) else { continue };
        match crate::workflows::backup::start(engine, &site.id, "schedule", Some(latest)).await {
            Ok(op) => {
                tracing::info!(site = %site.id, operation = %op.id, schedule = %schedule.describe(), "scheduled backup started");
                started.push(site.id.clone());
            }
            Err(EngineError::Store(StoreError::Busy { operation, .. })) => {
                store.set_last_slot(site.id.clone(), latest).await?;
                tracing::warn!(site = %site.id, running = %operation, "scheduled backup skipped: an operation is still running");
            }
            Err(e) => tracing::error!(site = %site.id, error = %e, "scheduled backup could not start"),
        }
    }
    Ok(started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_per_slot_after_the_offset_and_once_after_downtime() {
        let s = crate::domain::policy::parse_schedule("1h", "UTC").expect("ok").expect("on");
        let h = 3_600_000;
        let off = 5 * 60_000;
        // Last handled slot 10:00; at 11:04 the 11:00 slot is not due yet (offset 5 min).
        assert_eq!(due_slot(&s, off, 10 * h, 11 * h + 4 * 60_000), None);
        assert_eq!(due_slot(&s, off, 10 * h, 11 * h + 5 * 60_000), Some(11 * h));
        // Once handled, the same slot does not fire again.
        assert_eq!(due_slot(&s, off, 11 * h, 11 * h + 30 * 60_000), None);
        // Down from 10:00 to 15:30: one firing, for the 15:00 slot.
        assert_eq!(due_slot(&s, off, 10 * h, 15 * h + 30 * 60_000), Some(15 * h));
    }
}
