//! Starts backups and drills when they are due according to each site's
//! schedules (`schedule`, `drill_schedule`).
//!
//! Each site fires at `slot + jitter_offset(site)`, where slots come from its
//! schedule (an interval or cron in a time zone). The last slot handled is
//! stored per site and kind, so a restart neither repeats an operation nor
//! floods: after downtime a site fires once for the latest missed slot. A
//! schedule whose last slot is unknown (new) starts counting from now. An
//! operation of the kind still running at the next slot is not doubled: the
//! slot is recorded as skipped. A slot is recorded in the same transaction
//! as the operation it starts, so a crash can neither lose a slot nor start
//! its operation twice. A drill that cannot be planned (no backup in its
//! window) consumes its slot and is logged; `drctl status` then flags the
//! site's drills as overdue.

use std::time::Duration;

use crate::domain::model::{Millis, Site, now_ms};
use crate::domain::policy::{DrillBackup, Policy, Schedule, jitter_offset};
use crate::engine::EngineError;
use crate::store::StoreError;
use crate::workflows::{Engine, backup, drill, failover};

/// The kinds of operation a schedule starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduled {
    Backup,
    Drill,
}

impl Scheduled {
    pub const ALL: [Scheduled; 2] = [Scheduled::Backup, Scheduled::Drill];

    /// The operation kind, which is also the key of its slot in the store.
    pub fn kind(self) -> &'static str {
        match self {
            Scheduled::Backup => <backup::Backup as crate::engine::Workflow>::KIND,
            Scheduled::Drill => <drill::Drill as crate::engine::Workflow>::KIND,
        }
    }

    pub fn schedule(self, policy: &Policy) -> Option<&Schedule> {
        match self {
            Scheduled::Backup => policy.schedule.as_ref(),
            Scheduled::Drill => policy.drill_schedule.as_ref(),
        }
    }
}

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

/// One pass at time `now` (two store reads however many sites). Returns
/// the (site, kind) pairs an operation was started for.
pub async fn tick_once(engine: &Engine, now: Millis) -> Result<Vec<(String, Scheduled)>, StoreError> {
    let mut started = Vec::new();
    let store = engine.store();
    let slots = store.slots().await?;
    for site in store.sites().await? {
        let policy = engine.deps().policy(&site.id);
        let offset = jitter_offset(&site.id, policy.jitter).as_millis() as Millis;
        for what in Scheduled::ALL {
            let Some(schedule) = what.schedule(&policy) else { continue };
            let Some(&last) = slots.get(&(site.id.clone(), what.kind().to_owned())) else {
                store.set_last_slot(site.id.clone(), what.kind().into(), now.saturating_sub(offset)).await?;
                continue;
            };
            let Some(latest) = due_slot(schedule, offset, last, now) else { continue };
            match start(engine, &site, &policy, what, latest).await {
                Ok(op) => {
                    tracing::info!(site = %site.id, operation = %op, kind = what.kind(), schedule = %schedule.describe(), "scheduled operation started");
                    started.push((site.id.clone(), what));
                }
                Err(Start::Engine(EngineError::Store(StoreError::Busy { operation, .. }))) => {
                    store.set_last_slot(site.id.clone(), what.kind().into(), latest).await?;
                    tracing::warn!(site = %site.id, kind = what.kind(), running = %operation, "scheduled operation skipped: one is still running");
                }
                Err(Start::Plan(e)) => {
                    store.set_last_slot(site.id.clone(), what.kind().into(), latest).await?;
                    tracing::error!(site = %site.id, error = %e, "scheduled drill skipped: it cannot be planned");
                }
                Err(Start::Engine(e)) => {
                    tracing::error!(site = %site.id, kind = what.kind(), error = %e, "scheduled operation could not start")
                }
            }
        }
    }
    Ok(started)
}

enum Start {
    Engine(EngineError),
    Plan(failover::plan::PlanError),
}

/// Starts the scheduled operation for `slot`; returns its id.
async fn start(engine: &Engine, site: &Site, policy: &Policy, what: Scheduled, slot: Millis) -> Result<String, Start> {
    match what {
        Scheduled::Backup => backup::start(engine, &site.id, "schedule", Some(slot)).await.map(|o| o.id).map_err(Start::Engine),
        Scheduled::Drill => {
            let req = failover::Request {
                drill: true,
                random_within_ms: match policy.drill_backup {
                    DrillBackup::Latest => 0,
                    DrillBackup::RandomWithin(d) => d.as_millis() as u64,
                },
                ..Default::default()
            };
            let plan = failover::plan::make(engine.deps(), site, &req).await.map_err(Start::Plan)?;
            drill::start(engine, plan, Duration::ZERO, "schedule", Some(slot)).await.map(|o| o.id).map_err(Start::Engine)
        }
    }
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
