//! Refused agents and the agent certificate of each backup (migration 10).
//!
//! Refusals arrive already aggregated in memory (`agents::refusals`): a
//! flush upserts one row per (site, reason, certificate), adding the new
//! count, so an agent retrying 10,000 times costs one row update per flush.

use std::collections::HashMap;

use super::sql::{OptionalExt, Row as SqlRow, SqlResult, args};

use super::{Db, Store, StoreError, corrupt};
use crate::domain::model::Millis;
use crate::domain::refusal::{AgentRefusal, RefusalReason};

const COLS: &str = "site_id, reason, fingerprint, serial, not_before_ms, not_after_ms, identity, ca_verified, detail, peer,
    first_ms, last_ms, count";

type Row = (String, String, String, String, i64, i64, String, bool, String, String, i64, i64, i64);

fn row(r: &SqlRow<'_>) -> SqlResult<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
    ))
}

fn refusal_of(row: Row) -> Result<AgentRefusal, StoreError> {
    let (site_id, reason, fingerprint, serial, nb, na, identity, ca_verified, detail, peer, first, last, count) = row;
    Ok(AgentRefusal {
        reason: RefusalReason::parse(&reason).ok_or_else(|| corrupt("agent_refusals.reason", reason.clone()))?,
        site_id,
        fingerprint,
        serial,
        not_before_ms: nb as u64,
        not_after_ms: na as u64,
        identity,
        ca_verified,
        detail,
        peer,
        first_ms: first as u64,
        last_ms: last as u64,
        count: count as u64,
    })
}

impl Db<'_> {
    /// Adds refusals seen since the last flush (`count` is how many new
    /// ones), in one transaction: new rows are inserted, known ones get
    /// their count added and their last time and peer updated.
    pub fn put_agent_refusals(&self, batch: Vec<AgentRefusal>) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        {
            let stmt = tx.prepare(&format!(
                "INSERT INTO agent_refusals ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT(site_id, reason, fingerprint) DO UPDATE SET
                     count = agent_refusals.count + excluded.count,
                     first_ms = CASE WHEN agent_refusals.first_ms < excluded.first_ms THEN agent_refusals.first_ms ELSE excluded.first_ms END,
                     last_ms = CASE WHEN agent_refusals.last_ms > excluded.last_ms THEN agent_refusals.last_ms ELSE excluded.last_ms END,
                     peer = excluded.peer, detail = excluded.detail"
            ))?;
            for r in batch {
                stmt.execute(args![
                    r.site_id,
                    r.reason.as_str(),
                    r.fingerprint,
                    r.serial,
                    r.not_before_ms as i64,
                    r.not_after_ms as i64,
                    r.identity,
                    r.ca_verified,
                    r.detail,
                    r.peer,
                    r.first_ms as i64,
                    r.last_ms as i64,
                    r.count as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Refusals last seen at or after `since_ms`, by site, the most recent
    /// first (of one site when `site` is not empty).
    pub fn agent_refusals(&self, site: String, since_ms: Millis) -> Result<HashMap<String, Vec<AgentRefusal>>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT {COLS} FROM agent_refusals WHERE last_ms >= ?1 AND (?2 = '' OR site_id = ?2) ORDER BY last_ms DESC"
        ))?;
        let rows = stmt.query_map(args![since_ms as i64, site], row)?;
        let mut out: HashMap<String, Vec<AgentRefusal>> = HashMap::new();
        for r in rows {
            let r = refusal_of(r?)?;
            out.entry(r.site_id.clone()).or_default().push(r);
        }
        Ok(out)
    }

    /// Forgets refusals last seen before `before_ms`; how many.
    pub fn prune_agent_refusals(&self, before_ms: Millis) -> Result<usize, StoreError> {
        self.0.execute("DELETE FROM agent_refusals WHERE last_ms < ?1", [before_ms as i64])
    }

    /// Records the not-after of the agent certificate the backup's source
    /// instance presented (what a restore of it will present).
    pub fn set_backup_agent_cert(&self, image_id: String, not_after_ms: Millis) -> Result<(), StoreError> {
        self.0.execute("UPDATE backups SET agent_cert_not_after_ms = ?2 WHERE image_id = ?1", args![image_id, not_after_ms as i64])?;
        Ok(())
    }

    /// The not-after recorded by [`Db::set_backup_agent_cert`]; `None`
    /// when the backup recorded none (older backups) or is unknown.
    pub fn backup_agent_cert(&self, image_id: String) -> Result<Option<Millis>, StoreError> {
        let t: Option<i64> =
            self.0.query_row("SELECT agent_cert_not_after_ms FROM backups WHERE image_id = ?1", [image_id], |r| r.get(0)).optional()?;
        Ok(t.filter(|t| *t > 0).map(|t| t as u64))
    }
}

impl Store {
    db_call!(
        /// See [`Db::put_agent_refusals`].
        put_agent_refusals(batch: Vec<AgentRefusal>) -> ());
    db_call!(
        /// See [`Db::agent_refusals`].
        agent_refusals(site: String, since_ms: Millis) -> HashMap<String, Vec<AgentRefusal>>);
    db_call!(prune_agent_refusals(before_ms: Millis) -> usize);
    db_call!(set_backup_agent_cert(image_id: String, not_after_ms: Millis) -> ());
    db_call!(backup_agent_cert(image_id: String) -> Option<Millis>);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Site;

    fn refusal(count: u64, last_ms: Millis, peer: &str) -> AgentRefusal {
        AgentRefusal {
            site_id: "s1".into(),
            reason: RefusalReason::Expired,
            fingerprint: "f1".into(),
            serial: "01".into(),
            not_before_ms: 1,
            not_after_ms: 2,
            identity: "spiffe://dr.test/site/s1".into(),
            ca_verified: true,
            detail: "expired".into(),
            peer: peer.into(),
            first_ms: last_ms,
            last_ms,
            count,
        }
    }

    #[tokio::test]
    async fn refusals_are_upserted_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        for store in crate::store::testing::both(dir.path()).await {
            eprintln!("on {}", store.engine());
            store
                .upsert_site(Site { id: "s1".into(), region: "r".into(), primary_instance_id: "i-1".into(), role_arn: None })
                .await
                .expect("site");
            store.put_agent_refusals(vec![refusal(3, 100, "a:1")]).await.expect("first");
            store.put_agent_refusals(vec![refusal(5, 200, "b:2")]).await.expect("second");
            let all = store.agent_refusals(String::new(), 0).await.expect("read");
            let rows = &all["s1"];
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!((rows[0].count, rows[0].first_ms, rows[0].last_ms, rows[0].peer.as_str()), (8, 100, 200, "b:2"));
            assert!(store.agent_refusals("s1".into(), 201).await.expect("read").is_empty());
            assert_eq!(store.prune_agent_refusals(201).await.expect("prune"), 1);
            assert_eq!(store.backup_agent_cert("ami-none".into()).await.expect("read"), None);
        }
    }
}
