//! Site health, the event log and the webhook outbox (migration 8).
//!
//! Invariant: an event and its outbox rows are written in one transaction,
//! so an event is either not recorded at all or will be delivered to every
//! webhook that wants it, whatever restarts happen in between.

use std::collections::HashMap;

use super::sql::{OptionalExt, Row, SqlResult, args};

use super::{ACTIVE_SQL, Db, Store, StoreError, corrupt};
use crate::domain::health::{Pause, SiteHealth};
use crate::domain::model::{Event, Millis, OperationState};

/// An active operation with what the health monitor needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveDetail {
    pub id: String,
    pub site_id: String,
    pub kind: String,
    pub state: OperationState,
    pub requested_by: String,
    pub created_at_ms: Millis,
    pub waiting_for: String,
}

/// An operation that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedOp {
    pub id: String,
    pub site_id: String,
    pub kind: String,
    pub state: OperationState,
    pub requested_by: String,
    pub error: String,
    pub updated_at_ms: Millis,
}

/// One delivery still owed to a webhook.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxItem {
    pub sink: String,
    pub attempts: u32,
    pub event: Event,
}

const EVENT_COLS: &str = "seq, id, at_ms, site_id, kind, severity, summary, evidence, operation_id";
fn event_row(r: &Row<'_>) -> SqlResult<Event> {
    let evidence: String = r.get(7)?;
    Ok(Event {
        seq: r.get::<i64>(0)? as u64,
        id: r.get(1)?,
        at_ms: r.get::<i64>(2)? as u64,
        site_id: r.get(3)?,
        kind: r.get(4)?,
        severity: r.get(5)?,
        summary: r.get(6)?,
        evidence: serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null),
        operation_id: r.get(8)?,
    })
}

impl Db<'_> {
    pub fn health_all(&self) -> Result<HashMap<String, SiteHealth>, StoreError> {
        let stmt = self.0.prepare("SELECT site_id, record FROM site_health")?;
        let rows = stmt.query_map((), |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))?;
        let mut out = HashMap::new();
        for row in rows {
            let (site, record) = row?;
            let h: SiteHealth = serde_json::from_str(&record).map_err(|_| corrupt("site_health.record", record.clone()))?;
            out.insert(site, h);
        }
        Ok(out)
    }

    /// Writes the health of these sites and records these events (with an
    /// outbox row for each webhook named beside it), in one transaction.
    /// An event whose id is recorded already is skipped. Returns the events
    /// recorded, with their `seq`.
    pub fn put_health(&self, rows: Vec<SiteHealth>, events: Vec<(Event, Vec<String>)>) -> Result<Vec<Event>, StoreError> {
        let tx = self.0.transaction()?;
        let recorded = write_health(&tx, rows, events)?;
        tx.commit()?;
        Ok(recorded)
    }

    /// Events oldest first after `after_seq` (of one site when `site` is
    /// not empty); with `newest`, the last `limit` of them.
    pub fn events(&self, site: String, after_seq: u64, limit: u32, newest: bool) -> Result<Vec<Event>, StoreError> {
        let order = if newest { "DESC" } else { "ASC" };
        let stmt = self.0.prepare(&format!(
            "SELECT {EVENT_COLS} FROM events WHERE seq > ?1 AND (?2 = '' OR site_id = ?2) ORDER BY seq {order} LIMIT ?3"
        ))?;
        let mut out = stmt.query_map(args![after_seq as i64, site, limit as i64], event_row)?.collect::<Result<Vec<_>, _>>()?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    /// Deliveries due at `now`, oldest event first. Each webhook's queue is
    /// strictly ordered: a delivery is due only when it and every older
    /// undelivered one of the same webhook are due, so a head waiting out
    /// its backoff holds back the later events of its webhook (and only
    /// those).
    pub fn outbox_due(&self, now: Millis, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        let cols: String = EVENT_COLS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ");
        let stmt = self.0.prepare(&format!(
            "SELECT {cols}, o.sink, o.attempts FROM outbox o JOIN events e ON e.seq = o.event_seq
             WHERE o.delivered_at_ms = 0 AND o.next_at_ms <= ?1
               AND NOT EXISTS (SELECT 1 FROM outbox h WHERE h.sink = o.sink AND h.delivered_at_ms = 0
                               AND h.event_seq < o.event_seq AND h.next_at_ms > ?1)
             ORDER BY o.event_seq LIMIT ?2"
        ))?;
        let rows = stmt.query_map(args![now as i64, limit as i64], |r| {
            Ok(OutboxItem { event: event_row(r)?, sink: r.get(9)?, attempts: r.get::<i64>(10)? as u32 })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
    }

    pub fn outbox_delivered(&self, seq: u64, sink: String, now: Millis) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE outbox SET delivered_at_ms = ?3, attempts = attempts + 1, last_error = '' WHERE event_seq = ?1 AND sink = ?2",
            args![seq as i64, sink, now.max(1) as i64],
        )?;
        Ok(())
    }

    pub fn outbox_retry(&self, seq: u64, sink: String, next_at_ms: Millis, error: String) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at_ms = ?3, last_error = ?4 WHERE event_seq = ?1 AND sink = ?2",
            args![seq as i64, sink, next_at_ms as i64, error],
        )?;
        Ok(())
    }

    /// Undelivered deliveries per webhook, and the oldest one's event time.
    pub fn outbox_backlog(&self) -> Result<Vec<(String, u64, Millis)>, StoreError> {
        let stmt = self.0.prepare(
            "SELECT o.sink, COUNT(*), MIN(e.at_ms) FROM outbox o JOIN events e ON e.seq = o.event_seq WHERE o.delivered_at_ms = 0 GROUP BY o.sink",
        )?;
        let rows = stmt.query_map((), |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)? as u64, r.get::<i64>(2)? as u64)))?;
        rows.collect::<Result<Vec<_>, _>>()
    }

    pub fn active_detail(&self) -> Result<Vec<ActiveDetail>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT id, site_id, kind, state, requested_by, created_at_ms, waiting_for FROM operations WHERE state IN {ACTIVE_SQL} ORDER BY created_at_ms"
        ))?;
        let rows = stmt.query_map((), |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<String>(4)?,
                r.get::<i64>(5)?,
                r.get::<String>(6)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, site_id, kind, state, requested_by, created, waiting_for) = row?;
            let state = OperationState::parse(&state).ok_or_else(|| corrupt("operations.state", state.clone()))?;
            out.push(ActiveDetail { id, site_id, kind, state, requested_by, created_at_ms: created as u64, waiting_for });
        }
        Ok(out)
    }

    /// Operations that ended (succeeded, failed, cancelled) after `since`.
    pub fn ended_since(&self, since: Millis) -> Result<Vec<EndedOp>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT id, site_id, kind, state, requested_by, error, updated_at_ms FROM operations
             WHERE updated_at_ms > ?1 AND state NOT IN {ACTIVE_SQL} ORDER BY updated_at_ms"
        ))?;
        let rows = stmt.query_map([since as i64], |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<String>(4)?,
                r.get::<String>(5)?,
                r.get::<i64>(6)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, site_id, kind, state, requested_by, error, at) = row?;
            let state = OperationState::parse(&state).ok_or_else(|| corrupt("operations.state", state.clone()))?;
            out.push(EndedOp { id, site_id, kind, state, requested_by, error, updated_at_ms: at as u64 });
        }
        Ok(out)
    }

    /// Forgets delivered outbox rows older than `before`, then events older
    /// than `before` that no webhook still waits for. How many events went.
    pub fn prune_events(&self, before: Millis) -> Result<u64, StoreError> {
        let tx = self.0.transaction()?;
        tx.execute("DELETE FROM outbox WHERE delivered_at_ms > 0 AND delivered_at_ms < ?1", [before as i64])?;
        let n = tx.execute("DELETE FROM events WHERE at_ms < ?1 AND seq NOT IN (SELECT event_seq FROM outbox)", [before as i64])?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// Pauses (or with `until_ms` 0 lifts the pause of) a site's automatic
    /// recovery, recording `event` (with its outbox rows) in the same
    /// transaction.
    pub fn set_pause(&self, pause: Pause, event: (Event, Vec<String>)) -> Result<Event, StoreError> {
        let tx = self.0.transaction()?;
        if pause.until_ms == 0 {
            tx.execute("DELETE FROM recovery_pauses WHERE site_id = ?1", [&pause.site_id])?;
        } else {
            tx.execute(
                "INSERT INTO recovery_pauses (site_id, paused_by, reason, at_ms, until_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (site_id) DO UPDATE SET paused_by = excluded.paused_by, reason = excluded.reason, at_ms = excluded.at_ms, until_ms = excluded.until_ms",
                args![pause.site_id, pause.by, pause.reason, pause.at_ms as i64, pause.until_ms as i64],
            )?;
        }
        let recorded = write_health(&tx, vec![], vec![event])?;
        tx.commit()?;
        recorded.into_iter().next().ok_or_else(|| StoreError::NotFound("the pause event was recorded already".into()))
    }

    /// Every pause still in force at `now`.
    pub fn pauses(&self, now: Millis) -> Result<HashMap<String, Pause>, StoreError> {
        let stmt = self.0.prepare("SELECT site_id, paused_by, reason, at_ms, until_ms FROM recovery_pauses WHERE until_ms > ?1")?;
        let rows = stmt.query_map([now as i64], |r| {
            Ok(Pause {
                site_id: r.get(0)?,
                by: r.get(1)?,
                reason: r.get(2)?,
                at_ms: r.get::<i64>(3)? as u64,
                until_ms: r.get::<i64>(4)? as u64,
            })
        })?;
        let mut out = HashMap::new();
        for p in rows {
            let p = p?;
            out.insert(p.site_id.clone(), p);
        }
        Ok(out)
    }

    /// The last event of a kind for a site (e.g. the last `failover.started`).
    pub fn last_event(&self, site: String, kind: String) -> Result<Option<Event>, StoreError> {
        self.0
            .query_row(
                &format!("SELECT {EVENT_COLS} FROM events WHERE site_id = ?1 AND kind = ?2 ORDER BY seq DESC LIMIT 1"),
                args![site, kind],
                event_row,
            )
            .optional()
    }
}

/// The writes of [`Db::put_health`], inside the caller's transaction.
fn write_health(tx: &super::sql::Conn, rows: Vec<SiteHealth>, events: Vec<(Event, Vec<String>)>) -> Result<Vec<Event>, StoreError> {
    for h in &rows {
        let record = serde_json::to_string(h).expect("health records serialize");
        tx.execute(
            "INSERT INTO site_health (site_id, state, record, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (site_id) DO UPDATE SET state = excluded.state, record = excluded.record, updated_at_ms = excluded.updated_at_ms",
            args![h.site_id, h.state.as_str(), record, h.checked_at_ms as i64],
        )?;
    }
    let mut recorded = vec![];
    for (mut e, sinks) in events {
        let evidence = serde_json::to_string(&e.evidence).expect("JSON values serialize");
        let seq = tx.query_opt(
            "INSERT INTO events (id, at_ms, site_id, kind, severity, summary, evidence, operation_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING RETURNING seq",
            args![e.id, e.at_ms as i64, e.site_id, e.kind, e.severity, e.summary, evidence, e.operation_id],
            |r| r.get::<u64>(0),
        )?;
        let Some(seq) = seq else {
            continue;
        };
        e.seq = seq;
        for sink in sinks {
            tx.execute(
                "INSERT INTO outbox (event_seq, sink, attempts, next_at_ms, last_error, delivered_at_ms) VALUES (?1, ?2, 0, ?3, '', 0)",
                args![e.seq as i64, sink, e.at_ms as i64],
            )?;
        }
        recorded.push(e);
    }
    Ok(recorded)
}

impl Store {
    db_call!(health_all() -> HashMap<String, SiteHealth>);
    db_call!(
        /// See [`Db::put_health`].
        put_health(rows: Vec<SiteHealth>, events: Vec<(Event, Vec<String>)>) -> Vec<Event>);
    db_call!(events(site: String, after_seq: u64, limit: u32, newest: bool) -> Vec<Event>);
    db_call!(outbox_due(now: Millis, limit: u32) -> Vec<OutboxItem>);
    db_call!(outbox_delivered(seq: u64, sink: String, now: Millis) -> ());
    db_call!(outbox_retry(seq: u64, sink: String, next_at_ms: Millis, error: String) -> ());
    db_call!(outbox_backlog() -> Vec<(String, u64, Millis)>);
    db_call!(active_detail() -> Vec<ActiveDetail>);
    db_call!(ended_since(since: Millis) -> Vec<EndedOp>);
    db_call!(last_event(site: String, kind: String) -> Option<Event>);
    db_call!(prune_events(before: Millis) -> u64);
    db_call!(
        /// See [`Db::set_pause`].
        set_pause(pause: Pause, event: (Event, Vec<String>)) -> Event);
    db_call!(pauses(now: Millis) -> HashMap<String, Pause>);
}
