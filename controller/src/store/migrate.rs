//! `dr-controller store migrate --to postgres://...`: an SQLite store moved
//! into an empty PostgreSQL store, whole: the catalog, operations in flight
//! (the PostgreSQL controller resumes them from their last step), events,
//! spares, health, certificates. One transaction on the target: it has all
//! of it or nothing. Refuses a target that holds anything.

use super::sql::{Conn, Value};
use super::{Store, StoreError};

/// Every table, parents before children (foreign keys), with the identity
/// column PostgreSQL must continue after the copied rows.
const TABLES: &[(&str, Option<&str>)] = &[
    ("sites", None),
    ("operations", None),
    ("steps", None),
    ("backups", None),
    ("copies", None),
    ("instances", None),
    ("signals", Some("id")),
    ("intents", None),
    ("protected", None),
    ("launch_facts", None),
    ("instance_regions", None),
    ("drills", None),
    ("schedule_slots", None),
    ("spares", None),
    ("site_health", None),
    ("events", Some("seq")),
    ("outbox", None),
    ("recovery_pauses", None),
    ("agent_refusals", None),
    ("agent_certs", None),
    ("revocations", None),
    ("enrol_tokens", None),
    ("ca_rotation", None),
    ("trust_acks", None),
];

/// A table read whole: its name, its columns, its rows.
type TableRows = (&'static str, Vec<String>, Vec<Vec<Value>>);

/// What was copied: (table, rows), in copy order.
pub type Copied = Vec<(&'static str, u64)>;

fn columns(c: &Conn, table: &str) -> Result<Vec<String>, StoreError> {
    let sqlite = c.as_sqlite().ok_or_else(|| StoreError::NotFound("the source of a migration is an SQLite store".into()))?;
    let mut stmt = sqlite.prepare(&format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

fn count(c: &Conn, table: &str) -> Result<u64, StoreError> {
    c.query_row(&format!("SELECT COUNT(*) FROM {table}"), (), |r| r.get::<u64>(0))
}

impl Store {
    /// Copies this (SQLite) store into `target` (an empty PostgreSQL store)
    /// and checks every table's count; returns the counts.
    pub async fn migrate_into(&self, target: &Store) -> Result<Copied, StoreError> {
        let source: Vec<TableRows> = self
            .with(|c| {
                let mut all = Vec::new();
                for (table, _) in TABLES {
                    let cols = columns(c, table)?;
                    let rows = c
                        .query_map(&format!("SELECT {} FROM {table}", cols.join(", ")), (), |r| Ok(r.values().to_vec()))?
                        .collect::<Result<Vec<_>, _>>()?;
                    all.push((*table, cols, rows));
                }
                Ok(all)
            })
            .await?;
        target
            .with(move |c| {
                let tx = c.transaction()?;
                let mut busy = Vec::new();
                for (table, _) in TABLES {
                    let n = count(&tx, table)?;
                    if n > 0 {
                        busy.push(format!("{table} ({n})"));
                    }
                }
                if !busy.is_empty() {
                    return Err(StoreError::NotFound(format!(
                        "the target store is not empty ({}): migrate only into a new database",
                        busy.join(", ")
                    )));
                }
                let mut copied = Vec::new();
                for (table, cols, rows) in source {
                    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
                    let insert = format!("INSERT INTO {table} ({}) VALUES ({})", cols.join(", "), marks.join(", "));
                    for row in &rows {
                        tx.execute(&insert, row.clone())?;
                    }
                    let n = count(&tx, table)?;
                    if n != rows.len() as u64 {
                        return Err(StoreError::NotFound(format!("{table}: {} rows read, {n} in the target", rows.len())));
                    }
                    copied.push((table, n));
                }
                for (table, identity) in TABLES {
                    if let Some(col) = identity {
                        // New rows continue after the copied ones.
                        tx.query_row(
                            &format!(
                                "SELECT setval(pg_get_serial_sequence('{table}', '{col}'), COALESCE(MAX({col}), 0) + 1, false) FROM {table}"
                            ),
                            (),
                            |r| r.get::<i64>(0),
                        )?;
                    }
                }
                tx.commit()?;
                Ok(copied)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::model::*;
    use crate::store::{Admission, testing};

    #[tokio::test]
    async fn a_store_with_work_in_flight_moves_whole_and_a_used_target_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let from = crate::store::Store::open(&dir.path().join("s.db")).await.expect("sqlite");
        from.upsert_site(Site { id: "s1".into(), region: "us-east-1".into(), primary_instance_id: "i-1".into(), role_arn: None })
            .await
            .expect("site");
        let op =
            Operation { kind: "failover".into(), wf_state: Some(serde_json::json!({"step": "launch"})), ..crate::store::tests::op("op-1") };
        from.create_operation(op, None, |_| Admission::Admit).await.expect("operation");
        from.add_signal("op-1".into(), Signal::Approve, "operator/bob".into()).await.expect("signal");
        let to = testing::postgres().await;
        let copied = from.migrate_into(&to).await.expect("migrate");
        let n = |t: &str| copied.iter().find(|(name, _)| *name == t).map(|(_, n)| *n);
        assert_eq!((n("sites"), n("operations"), n("signals")), (Some(1), Some(1), Some(1)));
        assert_eq!(to.active_operations().await.expect("active"), vec!["op-1".to_owned()], "the operation in flight is there to resume");
        // New rows continue after the copied identities.
        to.add_signal("op-1".into(), Signal::Abort, "operator/bob".into()).await.expect("a new signal");
        let ids: Vec<i64> = to.pending_signals("op-1".into()).await.expect("signals").into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        let again = from.migrate_into(&to).await.expect_err("a used target is refused").to_string();
        assert!(again.contains("not empty") && again.contains("sites (1)"), "{again}");
    }
}
