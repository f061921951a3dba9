//! Flushes refused agents (`agents::refusals`) to the store and raises
//! `agent.refused`: once per site, reason and certificate (the event's id
//! names them, so a restart does not raise it again), never per retry.
//!
//! A certificate refused for the first time is flushed at once (at most
//! one flush a second); retries are added to its row every [`EVERY`].

use std::time::Duration;

use serde_json::json;

use super::notify::{Notifier, event};
use crate::agents::refusals::Refusals;
use crate::domain::events::EventKind;
use crate::domain::model::{Event, Millis, now_ms};
use crate::domain::refusal::{AgentRefusal, rfc3339};
use crate::store::StoreError;

/// How often retries are added to the store.
pub const EVERY: Duration = Duration::from_secs(5);
/// The least time between two flushes, however many new certificates.
const MIN_GAP: Duration = Duration::from_secs(1);
/// At most this many `agent.refused` events per flush (more new
/// certificates at once are recorded and logged; their events follow in
/// the next flushes).
const EVENTS_PER_FLUSH: usize = 100;
/// Refusals not seen for this long are deleted from the store.
const KEEP_MS: Millis = 30 * 24 * 3600 * 1000;

/// Flushes until the process ends.
pub async fn run(refusals: Refusals, notifier: Notifier) {
    let mut pruned_at: Millis = 0;
    loop {
        tokio::select! {
            () = refusals.first_refusal() => {}
            () = tokio::time::sleep(EVERY) => {}
        }
        if let Err(e) = flush(&refusals, &notifier).await {
            tracing::error!(error = %e, "cannot record refused agents; retried");
        }
        let now = now_ms();
        if now.saturating_sub(pruned_at) > 3600 * 1000 {
            pruned_at = now;
            match notifier.store.prune_agent_refusals(now.saturating_sub(KEEP_MS)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(forgotten = n, "refused agents not seen for 30 days forgotten"),
                Err(e) => tracing::warn!(error = %e, "cannot prune refused agents"),
            }
        }
        tokio::time::sleep(MIN_GAP).await;
    }
}

/// The `agent.refused` event of a certificate.
pub fn refused_event(r: &AgentRefusal, now: Millis) -> Event {
    let whose = if r.site_id.is_empty() { "an agent".to_owned() } else { format!("an agent of site `{}`", r.site_id) };
    let summary = format!(
        "{whose} was refused: {} (serial {}, from {}); {}",
        r.describe(now),
        if r.serial.is_empty() { "?" } else { &r.serial },
        if r.peer.is_empty() { "?" } else { &r.peer },
        r.remedy()
    );
    let evidence = json!({
        "reason": r.reason.as_str(),
        "serial": r.serial,
        "fingerprint": r.fingerprint,
        "identity": r.identity,
        "not_before": rfc3339(r.not_before_ms),
        "not_after": rfc3339(r.not_after_ms),
        "not_after_ms": r.not_after_ms,
        "ca_verified": r.ca_verified,
        "peer": r.peer,
        "detail": r.detail,
    });
    let mut e = event(&r.site_id, EventKind::AgentRefused, "warning", summary, evidence, "");
    e.id = r.event_id();
    e
}

/// One flush: the counts since the last one, and the events of
/// certificates refused for the first time. On a store error everything
/// is put back for the next flush.
pub async fn flush(refusals: &Refusals, notifier: &Notifier) -> Result<usize, StoreError> {
    let mut batch = refusals.take();
    if batch.rows.is_empty() {
        return Ok(0);
    }
    let n = batch.rows.len();
    if let Err(e) = notifier.store.put_agent_refusals(batch.rows.clone()).await {
        refusals.restore(batch);
        return Err(e);
    }
    // Rows are in: a failed event write only puts the events back.
    batch.rows.clear();
    let now = now_ms();
    let events: Vec<Event> = batch.first.iter().take(EVENTS_PER_FLUSH).map(|r| refused_event(r, now)).collect();
    if batch.first.len() > EVENTS_PER_FLUSH {
        tracing::warn!(new = batch.first.len(), raised = EVENTS_PER_FLUSH, "many agents refused at once: the other events follow");
        let later = batch.split_first_after(EVENTS_PER_FLUSH);
        refusals.restore(later);
    }
    if !events.is_empty()
        && let Err(e) = notifier.record(vec![], events).await
    {
        refusals.restore(batch);
        return Err(e);
    }
    Ok(n)
}
