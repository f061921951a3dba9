//! The controller's durable state: an embedded SQLite database (WAL).
//!
//! Schema changes are numbered migrations applied at open (`PRAGMA
//! user_version`); the SQL keeps to what PostgreSQL also accepts so the
//! schema can move there. Every write that the engine depends on is
//! committed (synchronous=FULL) before the engine takes its next step.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("cannot create the store's directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store holds an invalid value in {what}: `{value}`")]
    Corrupt { what: &'static str, value: String },
    #[error("the store's schema version {found} is newer than this controller knows ({known}); upgrade the controller")]
    TooNew { found: i64, known: i64 },
    #[error("site `{site}` already has a running operation {operation}")]
    Busy { site: String, operation: String },
}

const MIGRATIONS: &[&str] = &[
    // 1: the walking skeleton.
    "CREATE TABLE sites (
        id TEXT PRIMARY KEY,
        region TEXT NOT NULL,
        primary_instance_id TEXT NOT NULL,
        role_arn TEXT,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE agents (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        instance_id TEXT NOT NULL,
        private_ip TEXT NOT NULL,
        public_ip TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        os_family TEXT NOT NULL,
        app_state TEXT NOT NULL,
        role TEXT NOT NULL,
        role_reason TEXT NOT NULL,
        connected INTEGER NOT NULL,
        connected_at_ms BIGINT NOT NULL,
        last_heartbeat_ms BIGINT NOT NULL,
        peer TEXT NOT NULL
    );
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        site_id TEXT NOT NULL REFERENCES sites(id),
        state TEXT NOT NULL,
        error TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX one_running_operation_per_site ON operations(site_id) WHERE state = 'running';
    CREATE INDEX operations_by_site ON operations(site_id, created_at_ms);
    CREATE TABLE steps (
        operation_id TEXT NOT NULL REFERENCES operations(id),
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        started_at_ms BIGINT NOT NULL,
        finished_at_ms BIGINT NOT NULL,
        detail TEXT NOT NULL,
        error TEXT NOT NULL,
        result TEXT,
        PRIMARY KEY (operation_id, seq)
    );
    CREATE TABLE backups (
        image_id TEXT PRIMARY KEY,
        site_id TEXT NOT NULL REFERENCES sites(id),
        operation_id TEXT NOT NULL UNIQUE REFERENCES operations(id),
        region TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        snapshot_ids TEXT NOT NULL,
        started_at_ms BIGINT NOT NULL,
        completed_at_ms BIGINT NOT NULL,
        consistency TEXT NOT NULL,
        app_state TEXT NOT NULL
    );
    CREATE INDEX backups_by_site ON backups(site_id, completed_at_ms);",
    // 2: fleet backups: retention, copies, schedules, quiesce records.
    "ALTER TABLE backups ADD COLUMN state TEXT NOT NULL DEFAULT 'available';
    ALTER TABLE backups ADD COLUMN fate TEXT NOT NULL DEFAULT '';
    ALTER TABLE backups ADD COLUMN deleted_at_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE backups ADD COLUMN quiesce TEXT NOT NULL DEFAULT 'none';
    ALTER TABLE backups ADD COLUMN frozen_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE backups ADD COLUMN quiesce_note TEXT NOT NULL DEFAULT '';
    CREATE TABLE copies (
        source_image_id TEXT NOT NULL REFERENCES backups(image_id),
        region TEXT NOT NULL,
        image_id TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        error TEXT NOT NULL,
        requested_at_ms BIGINT NOT NULL,
        completed_at_ms BIGINT NOT NULL,
        deleted_at_ms BIGINT NOT NULL,
        PRIMARY KEY (source_image_id, region)
    );
    CREATE TABLE schedules (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        last_slot_ms BIGINT NOT NULL
    );",
];

/// A handle on the store; cheap to clone. Calls are short and synchronous
/// (local SQLite), serialized by one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
        }
        let conn = Connection::open(path)
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Store { conn: Arc::new(Mutex::new(conn)) };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew { found: version, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "store schema migrated");
        }
        Ok(())
    }

    // ------------------------------------------------------------ sites

    /// Adds a configured site, or updates its region and role. The primary
    /// instance is taken from the config only when the site is new: after
    /// that the store is authoritative (a failover changes it).
    pub fn upsert_site(&self, site: &Site) -> Result<Site, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO sites (id, region, primary_instance_id, role_arn, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET region = excluded.region, role_arn = excluded.role_arn",
            params![site.id, site.region, site.primary_instance_id, site.role_arn, now_ms() as i64],
        )?;
        drop(conn);
        Ok(self.site(&site.id)?.unwrap_or_else(|| site.clone()))
    }

    pub fn site(&self, id: &str) -> Result<Option<Site>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT id, region, primary_instance_id, role_arn FROM sites WHERE id = ?1", [id], |r| {
                Ok(Site { id: r.get(0)?, region: r.get(1)?, primary_instance_id: r.get(2)?, role_arn: r.get(3)? })
            })
            .optional()?)
    }

    /// Every site, by id.
    pub fn sites(&self) -> Result<Vec<Site>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, region, primary_instance_id, role_arn FROM sites ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(Site { id: r.get(0)?, region: r.get(1)?, primary_instance_id: r.get(2)?, role_arn: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    // ------------------------------------------------------------ agents

    pub fn put_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO agents (site_id, instance_id, private_ip, public_ip, boot_id, os_family, app_state, role,
                 role_reason, connected, connected_at_ms, last_heartbeat_ms, peer)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT(site_id) DO UPDATE SET instance_id = excluded.instance_id,
                 private_ip = excluded.private_ip, public_ip = excluded.public_ip, boot_id = excluded.boot_id,
                 os_family = excluded.os_family, app_state = excluded.app_state, role = excluded.role,
                 role_reason = excluded.role_reason, connected = excluded.connected,
                 connected_at_ms = excluded.connected_at_ms, last_heartbeat_ms = excluded.last_heartbeat_ms,
                 peer = excluded.peer",
            params![
                a.site_id,
                a.facts.instance_id,
                a.facts.private_ip,
                a.facts.public_ip,
                a.facts.boot_id,
                a.facts.os_family,
                a.facts.app_state,
                a.role,
                a.role_reason,
                a.connected,
                a.connected_at_ms as i64,
                a.last_heartbeat_ms as i64,
                a.peer
            ],
        )?;
        Ok(())
    }

    /// Marks every agent disconnected (at start-up: no stream survives a
    /// controller restart).
    pub fn mark_all_agents_disconnected(&self) -> Result<(), StoreError> {
        self.conn().execute("UPDATE agents SET connected = 0", [])?;
        Ok(())
    }

    pub fn agent(&self, site_id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT site_id, instance_id, private_ip, public_ip, boot_id, os_family, app_state, role, role_reason,
                        connected, connected_at_ms, last_heartbeat_ms, peer FROM agents WHERE site_id = ?1",
                [site_id],
                |r| {
                    Ok(AgentRecord {
                        site_id: r.get(0)?,
                        facts: InstanceFacts {
                            instance_id: r.get(1)?,
                            private_ip: r.get(2)?,
                            public_ip: r.get(3)?,
                            boot_id: r.get(4)?,
                            os_family: r.get(5)?,
                            app_state: r.get(6)?,
                        },
                        role: r.get(7)?,
                        role_reason: r.get(8)?,
                        connected: r.get(9)?,
                        connected_at_ms: r.get::<_, i64>(10)? as u64,
                        last_heartbeat_ms: r.get::<_, i64>(11)? as u64,
                        peer: r.get(12)?,
                    })
                },
            )
            .optional()?)
    }

    // ------------------------------------------------------------ operations

    /// Creates an operation with its steps, all pending. Fails with
    /// [`StoreError::Busy`] when the site already has a running operation.
    pub fn create_operation(&self, op: &Operation) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let running: Option<String> = tx
            .query_row("SELECT id FROM operations WHERE site_id = ?1 AND state = 'running'", [&op.site_id], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(operation) = running {
            return Err(StoreError::Busy { site: op.site_id.clone(), operation });
        }
        tx.execute(
            "INSERT INTO operations (id, kind, site_id, state, error, requested_by, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                op.id,
                op.kind.as_str(),
                op.site_id,
                op.state.as_str(),
                op.error,
                op.requested_by,
                op.created_at_ms as i64,
                op.updated_at_ms as i64
            ],
        )?;
        for s in &op.steps {
            tx.execute(
                "INSERT INTO steps (operation_id, seq, name, state, attempts, started_at_ms, finished_at_ms, detail,
                     error, result) VALUES (?1, ?2, ?3, ?4, 0, 0, 0, '', '', NULL)",
                params![op.id, s.seq, s.name, s.state.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes one step's state (and the operation's updated time) in one
    /// transaction.
    pub fn put_step(&self, operation_id: &str, step: &StepRecord) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let result = step.result.as_ref().map(|v| v.to_string());
        tx.execute(
            "UPDATE steps SET state = ?3, attempts = ?4, started_at_ms = ?5, finished_at_ms = ?6, detail = ?7,
                 error = ?8, result = ?9 WHERE operation_id = ?1 AND seq = ?2",
            params![
                operation_id,
                step.seq,
                step.state.as_str(),
                step.attempts,
                step.started_at_ms as i64,
                step.finished_at_ms as i64,
                step.detail,
                step.error,
                result
            ],
        )?;
        tx.execute("UPDATE operations SET updated_at_ms = ?2 WHERE id = ?1", params![operation_id, now_ms() as i64])?;
        tx.commit()?;
        Ok(())
    }

    pub fn finish_operation(&self, id: &str, state: OperationState, error: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE operations SET state = ?2, error = ?3, updated_at_ms = ?4 WHERE id = ?1",
            params![id, state.as_str(), error, now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        let conn = self.conn();
        let head = conn
            .query_row(
                "SELECT id, kind, site_id, state, error, requested_by, created_at_ms, updated_at_ms
                 FROM operations WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, kind, site_id, state, error, requested_by, created, updated)) = head else {
            return Ok(None);
        };
        let mut stmt = conn.prepare(
            "SELECT seq, name, state, attempts, started_at_ms, finished_at_ms, detail, error, result
             FROM steps WHERE operation_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([&id], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        })?;
        let mut steps = Vec::new();
        for row in rows {
            let (seq, name, state, attempts, started, finished, detail, error, result) = row?;
            steps.push(StepRecord {
                seq,
                name,
                state: StepState::parse(&state).ok_or(StoreError::Corrupt { what: "steps.state", value: state })?,
                attempts,
                started_at_ms: started as u64,
                finished_at_ms: finished as u64,
                detail,
                error,
                result: match result {
                    Some(text) => Some(
                        serde_json::from_str(&text).map_err(|_| StoreError::Corrupt { what: "steps.result", value: text })?,
                    ),
                    None => None,
                },
            });
        }
        Ok(Some(Operation {
            kind: OperationKind::parse(&kind).ok_or(StoreError::Corrupt { what: "operations.kind", value: kind })?,
            state: OperationState::parse(&state)
                .ok_or(StoreError::Corrupt { what: "operations.state", value: state })?,
            id,
            site_id,
            error,
            requested_by,
            created_at_ms: created as u64,
            updated_at_ms: updated as u64,
            steps,
        }))
    }

    /// Ids of operations still running (to resume after a restart).
    pub fn running_operations(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM operations WHERE state = 'running' ORDER BY created_at_ms")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    pub fn running_operation_of(&self, site_id: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT id FROM operations WHERE site_id = ?1 AND state = 'running'", [site_id], |r| r.get(0))
            .optional()?)
    }

    // ------------------------------------------------------------ backups

    /// Records a completed backup; recording the same operation twice is a
    /// no-op (the step may be re-run after a restart).
    pub fn record_backup(&self, b: &Backup) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO backups (image_id, site_id, operation_id, region, instance_id, snapshot_ids, started_at_ms,
                 completed_at_ms, consistency, app_state, state, fate, deleted_at_ms, quiesce, frozen_ms, quiesce_note)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT(image_id) DO NOTHING",
            params![
                b.image_id,
                b.site_id,
                b.operation_id,
                b.region,
                b.instance_id,
                serde_json::to_string(&b.snapshot_ids).expect("a list of strings serializes"),
                b.started_at_ms as i64,
                b.completed_at_ms as i64,
                b.consistency.as_str(),
                b.app_state,
                b.state.as_str(),
                b.fate,
                b.deleted_at_ms as i64,
                b.quiesce,
                b.frozen_ms as i64,
                b.quiesce_note
            ],
        )?;
        Ok(())
    }

    /// A site's backups, newest first.
    pub fn backups(&self, site_id: &str) -> Result<Vec<Backup>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT image_id, site_id, operation_id, region, instance_id, snapshot_ids, started_at_ms,
                    completed_at_ms, consistency, app_state, state, fate, deleted_at_ms, quiesce, frozen_ms, quiesce_note
             FROM backups WHERE site_id = ?1 ORDER BY completed_at_ms DESC, image_id",
        )?;
        let rows = stmt.query_map([site_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, String>(9)?,
                (
                    r.get::<_, String>(10)?,
                    r.get::<_, String>(11)?,
                    r.get::<_, i64>(12)?,
                    r.get::<_, String>(13)?,
                    r.get::<_, i64>(14)?,
                    r.get::<_, String>(15)?,
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (image_id, site_id, operation_id, region, instance_id, snaps, started, completed, cons, app_state, more) =
                row?;
            let (state, fate, deleted_at, quiesce, frozen_ms, quiesce_note) = more;
            out.push(Backup {
                snapshot_ids: serde_json::from_str(&snaps)
                    .map_err(|_| StoreError::Corrupt { what: "backups.snapshot_ids", value: snaps })?,
                consistency: Consistency::parse(&cons)
                    .ok_or(StoreError::Corrupt { what: "backups.consistency", value: cons })?,
                image_id,
                site_id,
                operation_id,
                region,
                instance_id,
                started_at_ms: started as u64,
                completed_at_ms: completed as u64,
                app_state,
                state: BackupState::parse(&state).ok_or(StoreError::Corrupt { what: "backups.state", value: state })?,
                fate,
                deleted_at_ms: deleted_at as u64,
                quiesce,
                frozen_ms: frozen_ms as u64,
                quiesce_note,
                copies: Vec::new(),
            });
        }
        drop(stmt);
        drop(conn);
        let mut copies: std::collections::HashMap<String, Vec<Copy>> = std::collections::HashMap::new();
        for c in self.copies_where("source_image_id IN (SELECT image_id FROM backups WHERE site_id = ?1)", &[&site_id])? {
            copies.entry(c.source_image_id.clone()).or_default().push(c);
        }
        for b in &mut out {
            b.copies = copies.remove(&b.image_id).unwrap_or_default();
        }
        Ok(out)
    }

    /// The site and operation that made a backup.
    pub fn backup_origin(&self, image_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT site_id, operation_id FROM backups WHERE image_id = ?1", [image_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    /// Sets a backup's retention state and why.
    pub fn set_backup_state(&self, image_id: &str, state: BackupState, fate: &str) -> Result<(), StoreError> {
        let deleted = if state == BackupState::Deleted { now_ms() as i64 } else { 0 };
        self.conn().execute(
            "UPDATE backups SET state = ?2, fate = ?3, deleted_at_ms = ?4 WHERE image_id = ?1",
            params![image_id, state.as_str(), fate, deleted],
        )?;
        Ok(())
    }

    // ------------------------------------------------------------ copies

    /// Records (or updates) the copy of a backup in another region.
    pub fn put_copy(&self, c: &Copy) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO copies (source_image_id, region, image_id, state, attempts, error, requested_at_ms,
                 completed_at_ms, deleted_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(source_image_id, region) DO UPDATE SET image_id = excluded.image_id,
                 state = excluded.state, attempts = excluded.attempts, error = excluded.error,
                 requested_at_ms = excluded.requested_at_ms, completed_at_ms = excluded.completed_at_ms,
                 deleted_at_ms = excluded.deleted_at_ms",
            params![
                c.source_image_id,
                c.region,
                c.image_id,
                c.state.as_str(),
                c.attempts,
                c.error,
                c.requested_at_ms as i64,
                c.completed_at_ms as i64,
                c.deleted_at_ms as i64
            ],
        )?;
        Ok(())
    }

    fn copies_where(&self, clause: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Copy>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT source_image_id, region, image_id, state, attempts, error, requested_at_ms, completed_at_ms,
                    deleted_at_ms FROM copies WHERE {clause} ORDER BY requested_at_ms DESC, region"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (source_image_id, region, image_id, state, attempts, error, req, done, del) = row?;
            out.push(Copy {
                state: CopyState::parse(&state).ok_or(StoreError::Corrupt { what: "copies.state", value: state })?,
                source_image_id,
                region,
                image_id,
                attempts,
                error,
                requested_at_ms: req as u64,
                completed_at_ms: done as u64,
                deleted_at_ms: del as u64,
            });
        }
        Ok(out)
    }

    pub fn copies_of(&self, source_image_id: &str) -> Result<Vec<Copy>, StoreError> {
        self.copies_where("source_image_id = ?1", &[&source_image_id])
    }

    /// Copies still to be driven to an end: pending or failed.
    pub fn unfinished_copies(&self) -> Result<Vec<Copy>, StoreError> {
        self.copies_where("state IN ('pending', 'failed')", &[])
    }

    /// Every copy in a region of a site's backups, newest first.
    pub fn copies_in(&self, site_id: &str, region: &str) -> Result<Vec<Copy>, StoreError> {
        self.copies_where(
            "region = ?2 AND source_image_id IN (SELECT image_id FROM backups WHERE site_id = ?1)",
            &[&site_id, &region],
        )
    }

    // ------------------------------------------------------------ schedules

    pub fn last_slot(&self, site_id: &str) -> Result<Option<Millis>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT last_slot_ms FROM schedules WHERE site_id = ?1", [site_id], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    pub fn set_last_slot(&self, site_id: &str, slot: Millis) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO schedules (site_id, last_slot_ms) VALUES (?1, ?2)
             ON CONFLICT(site_id) DO UPDATE SET last_slot_ms = excluded.last_slot_ms",
            params![site_id, slot as i64],
        )?;
        Ok(())
    }

    /// Image ids named in the results of running operations (they must not
    /// be deleted while those run).
    pub fn images_in_use(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT s.result FROM steps s JOIN operations o ON o.id = s.operation_id
             WHERE o.state = 'running' AND s.result IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = std::collections::HashSet::new();
        for row in rows {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&row?) {
                for key in ["image_id", "source_image_id"] {
                    if let Some(id) = v.get(key).and_then(|x| x.as_str()) {
                        out.insert(id.to_owned());
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Site {
        Site { id: "s1".into(), region: "us-east-1".into(), primary_instance_id: "i-1".into(), role_arn: None }
    }

    fn op(id: &str) -> Operation {
        Operation {
            id: id.into(),
            kind: OperationKind::Backup,
            site_id: "s1".into(),
            state: OperationState::Running,
            error: String::new(),
            requested_by: "operator/alice".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            steps: vec![StepRecord {
                seq: 0,
                name: "create_image".into(),
                state: StepState::Pending,
                attempts: 0,
                started_at_ms: 0,
                finished_at_ms: 0,
                detail: String::new(),
                error: String::new(),
                result: None,
            }],
        }
    }

    #[test]
    fn survives_reopen_and_keeps_one_running_operation_per_site() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let store = Store::open(&path).expect("open");
            store.upsert_site(&site()).expect("site");
            store.create_operation(&op("op-1")).expect("op");
            assert!(matches!(store.create_operation(&op("op-2")), Err(StoreError::Busy { .. })));
            let mut step = store.operation("op-1").expect("read").expect("exists").steps[0].clone();
            step.state = StepState::Done;
            step.result = Some(serde_json::json!({"image_id": "ami-1"}));
            store.put_step("op-1", &step).expect("step");
        }
        let store = Store::open(&path).expect("reopen");
        // The config's instance id does not override the stored primary.
        let moved = Site { primary_instance_id: "i-2".into(), ..site() };
        assert_eq!(store.upsert_site(&moved).expect("site").primary_instance_id, "i-1");
        assert_eq!(store.running_operations().expect("running"), vec!["op-1".to_string()]);
        let op1 = store.operation("op-1").expect("read").expect("exists");
        assert_eq!(op1.steps[0].state, StepState::Done);
        assert_eq!(op1.steps[0].result, Some(serde_json::json!({"image_id": "ami-1"})));
        store.finish_operation("op-1", OperationState::Succeeded, "").expect("finish");
        store.create_operation(&op("op-2")).expect("a second operation once the first is finished");
    }
}
