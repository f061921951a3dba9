//! Numbered migrations, applied at open (`PRAGMA user_version`). The SQL
//! keeps to what PostgreSQL also accepts (no AUTOINCREMENT, no SQLite-only
//! types), so the schema can move there.

pub const MIGRATIONS: &[&str] = &[
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
    // 3: the step engine (typed state, owner/epoch, signals, intents,
    // protected resources) and instances keyed by (site, instance id).
    "CREATE TABLE instances (
        site_id TEXT NOT NULL REFERENCES sites(id),
        instance_id TEXT NOT NULL,
        role TEXT NOT NULL,
        operation_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        private_ip TEXT NOT NULL,
        public_ip TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        os_family TEXT NOT NULL,
        app_state TEXT NOT NULL,
        verified_private_ip TEXT NOT NULL,
        verified_at_ms BIGINT NOT NULL,
        connected INTEGER NOT NULL,
        connected_at_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        peer TEXT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );
    INSERT INTO instances (site_id, instance_id, role, operation_id, reason, private_ip, public_ip, boot_id,
            os_family, app_state, verified_private_ip, verified_at_ms, connected, connected_at_ms, last_seen_ms, peer)
        SELECT site_id, instance_id, 'passive', '', '', private_ip, public_ip, boot_id, os_family, app_state,
            '', 0, 0, connected_at_ms, last_heartbeat_ms, peer FROM agents;
    DROP TABLE agents;
    DROP INDEX one_running_operation_per_site;
    CREATE INDEX operations_by_state ON operations(state);
    ALTER TABLE operations ADD COLUMN waiting_for TEXT NOT NULL DEFAULT '';
    ALTER TABLE operations ADD COLUMN failure TEXT NOT NULL DEFAULT '';
    ALTER TABLE operations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE operations ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN state_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN wf_state TEXT;
    CREATE TABLE signals (
        id INTEGER PRIMARY KEY,
        operation_id TEXT NOT NULL REFERENCES operations(id),
        signal TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        consumed_at_ms BIGINT NOT NULL
    );
    CREATE INDEX signals_by_operation ON signals(operation_id);
    CREATE TABLE intents (
        operation_id TEXT NOT NULL REFERENCES operations(id),
        name TEXT NOT NULL,
        token TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (operation_id, name)
    );
    CREATE TABLE protected (
        operation_id TEXT NOT NULL REFERENCES operations(id),
        kind TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        PRIMARY KEY (operation_id, kind, resource_id)
    );",
    // 4: restore. The launch facts of each backup's source instance (what a
    // restore needs when that instance is gone).
    "CREATE TABLE launch_facts (
        image_id TEXT PRIMARY KEY,
        site_id TEXT NOT NULL REFERENCES sites(id),
        facts TEXT NOT NULL,
        recorded_at_ms BIGINT NOT NULL
    );
    CREATE TABLE instance_regions (
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        region TEXT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );",
    // 5: drills. One row per drill, written by its `record` step (always),
    // the measured result as JSON (`DrillRecord`).
    "CREATE TABLE drills (
        operation_id TEXT PRIMARY KEY REFERENCES operations(id),
        site_id TEXT NOT NULL REFERENCES sites(id),
        started_at_ms BIGINT NOT NULL,
        finished_at_ms BIGINT NOT NULL,
        ok INTEGER NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX drills_by_site ON drills(site_id, started_at_ms);",
    // 6: one schedule slot per site and kind (backups, drills); the
    // backup slots of migration 2 move over.
    "CREATE TABLE schedule_slots (
        site_id TEXT NOT NULL REFERENCES sites(id),
        kind TEXT NOT NULL,
        last_slot_ms BIGINT NOT NULL,
        PRIMARY KEY (site_id, kind)
    );
    INSERT INTO schedule_slots (site_id, kind, last_slot_ms) SELECT site_id, 'backup', last_slot_ms FROM schedules;
    DROP TABLE schedules;",
    // 7: hot spares. One installed spare per site (`SpareRecord` as JSON);
    // its AMIs are protected from retention while it exists.
    "CREATE TABLE spares (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        instance_id TEXT NOT NULL,
        backup_image_id TEXT NOT NULL,
        launch_image_id TEXT NOT NULL,
        record TEXT NOT NULL
    );",
    // 8: automatic failover. Each site's health (`SiteHealth` as JSON),
    // the event log every decision is written to, and the webhook outbox
    // (one row per event and webhook, delivered at least once).
    "CREATE TABLE site_health (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        state TEXT NOT NULL,
        record TEXT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        at_ms BIGINT NOT NULL,
        site_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        severity TEXT NOT NULL,
        summary TEXT NOT NULL,
        evidence TEXT NOT NULL,
        operation_id TEXT NOT NULL
    );
    CREATE INDEX events_by_site ON events(site_id, seq);
    CREATE TABLE outbox (
        event_seq INTEGER NOT NULL REFERENCES events(seq),
        sink TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at_ms BIGINT NOT NULL,
        last_error TEXT NOT NULL,
        delivered_at_ms BIGINT NOT NULL,
        PRIMARY KEY (event_seq, sink)
    );
    CREATE INDEX outbox_due ON outbox(delivered_at_ms, next_at_ms);",
    // 9: automatic recovery paused per site by an operator (maintenance).
    "CREATE TABLE recovery_pauses (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        paused_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        until_ms BIGINT NOT NULL
    );",
    // 10: agents refused (TLS handshake or Hello), one row per site, reason
    // and certificate with a count and first/last time (retries are
    // aggregated, never one row each); the agent certificate's not-after
    // recorded with each backup (0: not recorded).
    "CREATE TABLE agent_refusals (
        site_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        serial TEXT NOT NULL,
        not_before_ms BIGINT NOT NULL,
        not_after_ms BIGINT NOT NULL,
        identity TEXT NOT NULL,
        ca_verified INTEGER NOT NULL,
        detail TEXT NOT NULL,
        peer TEXT NOT NULL,
        first_ms BIGINT NOT NULL,
        last_ms BIGINT NOT NULL,
        count BIGINT NOT NULL,
        PRIMARY KEY (site_id, reason, fingerprint)
    );
    CREATE INDEX agent_refusals_by_last ON agent_refusals(last_ms);
    ALTER TABLE backups ADD COLUMN agent_cert_not_after_ms BIGINT NOT NULL DEFAULT 0;",
    // 11: certificates per instance (issue 22): each enrolled instance's
    // current certificate and the one signed for it and not yet used (a
    // renewal's answer may be lost; the agent keeps the current one), how it
    // proved itself, and whether an operator let it enrol once more;
    // revocations (serial '' = the whole site); one-time enrolment tokens
    // (their SHA-256 only).
    "CREATE TABLE agent_certs (
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        attestation TEXT NOT NULL,
        current_serial TEXT NOT NULL,
        current_not_after_ms BIGINT NOT NULL,
        next_serial TEXT NOT NULL,
        next_not_after_ms BIGINT NOT NULL,
        enrolled_at_ms BIGINT NOT NULL,
        renewed_at_ms BIGINT NOT NULL,
        renewal_error TEXT NOT NULL,
        reenrol_allowed INTEGER NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );
    CREATE TABLE revocations (
        site_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (site_id, serial)
    );
    CREATE TABLE enrol_tokens (
        token_sha256 TEXT PRIMARY KEY,
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        created_by TEXT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        used_at_ms BIGINT NOT NULL
    );",
    // 12: a CA rotation in progress (one row) and which trust bundle each
    // instance's agent acknowledged.
    "CREATE TABLE ca_rotation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        phase TEXT NOT NULL,
        since_ms BIGINT NOT NULL,
        old_roots_pem TEXT NOT NULL,
        new_root_pem TEXT NOT NULL,
        new_cert_path TEXT NOT NULL,
        new_key_path TEXT NOT NULL
    );
    CREATE TABLE trust_acks (
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        bundle_id TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );",
];

/// PostgreSQL's migrations, applied at open (`dr_schema.version`). The
/// first is SQLite's schema at its version 12, in PostgreSQL's types
/// (`BIGINT` for every integer, identity columns for SQLite's rowids); a
/// change of schema from then on is a migration in both lists.
pub const PG_MIGRATIONS: &[&str] = &[
    // 1: SQLite's 1 to 12.
    "    CREATE TABLE sites (
        id TEXT PRIMARY KEY,
        region TEXT NOT NULL,
        primary_instance_id TEXT NOT NULL,
        role_arn TEXT,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        site_id TEXT NOT NULL REFERENCES sites(id),
        state TEXT NOT NULL,
        error TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        waiting_for TEXT NOT NULL DEFAULT '', failure TEXT NOT NULL DEFAULT '', owner TEXT NOT NULL DEFAULT '', epoch BIGINT NOT NULL DEFAULT 0, state_version BIGINT NOT NULL DEFAULT 0, wf_state TEXT);
    CREATE INDEX operations_by_site ON operations(site_id, created_at_ms);
    CREATE TABLE steps (
        operation_id TEXT NOT NULL REFERENCES operations(id),
        seq BIGINT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL,
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
        app_state TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'available', fate TEXT NOT NULL DEFAULT '', deleted_at_ms BIGINT NOT NULL DEFAULT 0, quiesce TEXT NOT NULL DEFAULT 'none', frozen_ms BIGINT NOT NULL DEFAULT 0, quiesce_note TEXT NOT NULL DEFAULT '', agent_cert_not_after_ms BIGINT NOT NULL DEFAULT 0);
    CREATE INDEX backups_by_site ON backups(site_id, completed_at_ms);
    CREATE TABLE copies (
        source_image_id TEXT NOT NULL REFERENCES backups(image_id),
        region TEXT NOT NULL,
        image_id TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        error TEXT NOT NULL,
        requested_at_ms BIGINT NOT NULL,
        completed_at_ms BIGINT NOT NULL,
        deleted_at_ms BIGINT NOT NULL,
        PRIMARY KEY (source_image_id, region)
    );
    CREATE TABLE instances (
        site_id TEXT NOT NULL REFERENCES sites(id),
        instance_id TEXT NOT NULL,
        role TEXT NOT NULL,
        operation_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        private_ip TEXT NOT NULL,
        public_ip TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        os_family TEXT NOT NULL,
        app_state TEXT NOT NULL,
        verified_private_ip TEXT NOT NULL,
        verified_at_ms BIGINT NOT NULL,
        connected BIGINT NOT NULL,
        connected_at_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        peer TEXT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );
    CREATE INDEX operations_by_state ON operations(state);
    CREATE TABLE signals (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        operation_id TEXT NOT NULL REFERENCES operations(id),
        signal TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        consumed_at_ms BIGINT NOT NULL
    );
    CREATE INDEX signals_by_operation ON signals(operation_id);
    CREATE TABLE intents (
        operation_id TEXT NOT NULL REFERENCES operations(id),
        name TEXT NOT NULL,
        token TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (operation_id, name)
    );
    CREATE TABLE protected (
        operation_id TEXT NOT NULL REFERENCES operations(id),
        kind TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        PRIMARY KEY (operation_id, kind, resource_id)
    );
    CREATE TABLE launch_facts (
        image_id TEXT PRIMARY KEY,
        site_id TEXT NOT NULL REFERENCES sites(id),
        facts TEXT NOT NULL,
        recorded_at_ms BIGINT NOT NULL
    );
    CREATE TABLE instance_regions (
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        region TEXT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );
    CREATE TABLE drills (
        operation_id TEXT PRIMARY KEY REFERENCES operations(id),
        site_id TEXT NOT NULL REFERENCES sites(id),
        started_at_ms BIGINT NOT NULL,
        finished_at_ms BIGINT NOT NULL,
        ok BIGINT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX drills_by_site ON drills(site_id, started_at_ms);
    CREATE TABLE schedule_slots (
        site_id TEXT NOT NULL REFERENCES sites(id),
        kind TEXT NOT NULL,
        last_slot_ms BIGINT NOT NULL,
        PRIMARY KEY (site_id, kind)
    );
    CREATE TABLE spares (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        instance_id TEXT NOT NULL,
        backup_image_id TEXT NOT NULL,
        launch_image_id TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE TABLE site_health (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        state TEXT NOT NULL,
        record TEXT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE events (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        at_ms BIGINT NOT NULL,
        site_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        severity TEXT NOT NULL,
        summary TEXT NOT NULL,
        evidence TEXT NOT NULL,
        operation_id TEXT NOT NULL
    );
    CREATE INDEX events_by_site ON events(site_id, seq);
    CREATE TABLE outbox (
        event_seq BIGINT NOT NULL REFERENCES events(seq),
        sink TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_at_ms BIGINT NOT NULL,
        last_error TEXT NOT NULL,
        delivered_at_ms BIGINT NOT NULL,
        PRIMARY KEY (event_seq, sink)
    );
    CREATE INDEX outbox_due ON outbox(delivered_at_ms, next_at_ms);
    CREATE TABLE recovery_pauses (
        site_id TEXT PRIMARY KEY REFERENCES sites(id),
        paused_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        until_ms BIGINT NOT NULL
    );
    CREATE TABLE agent_refusals (
        site_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        serial TEXT NOT NULL,
        not_before_ms BIGINT NOT NULL,
        not_after_ms BIGINT NOT NULL,
        identity TEXT NOT NULL,
        ca_verified BIGINT NOT NULL,
        detail TEXT NOT NULL,
        peer TEXT NOT NULL,
        first_ms BIGINT NOT NULL,
        last_ms BIGINT NOT NULL,
        count BIGINT NOT NULL,
        PRIMARY KEY (site_id, reason, fingerprint)
    );
    CREATE INDEX agent_refusals_by_last ON agent_refusals(last_ms);
    CREATE TABLE agent_certs (
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        attestation TEXT NOT NULL,
        current_serial TEXT NOT NULL,
        current_not_after_ms BIGINT NOT NULL,
        next_serial TEXT NOT NULL,
        next_not_after_ms BIGINT NOT NULL,
        enrolled_at_ms BIGINT NOT NULL,
        renewed_at_ms BIGINT NOT NULL,
        renewal_error TEXT NOT NULL,
        reenrol_allowed BIGINT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );
    CREATE TABLE revocations (
        site_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (site_id, serial)
    );
    CREATE TABLE enrol_tokens (
        token_sha256 TEXT PRIMARY KEY,
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        created_by TEXT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        used_at_ms BIGINT NOT NULL
    );
    CREATE TABLE ca_rotation (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        phase TEXT NOT NULL,
        since_ms BIGINT NOT NULL,
        old_roots_pem TEXT NOT NULL,
        new_root_pem TEXT NOT NULL,
        new_cert_path TEXT NOT NULL,
        new_key_path TEXT NOT NULL
    );
    CREATE TABLE trust_acks (
        site_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        bundle_id TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (site_id, instance_id)
    );",
    // 2: the leader lease of replicas sharing this store (store/lease.rs):
    // who leads at which epoch (the row leader transactions lock FOR SHARE
    // and a takeover updates), and until when (the row renewals update, so
    // that they never wait for the leader's own transactions).
    "CREATE TABLE leader_lease (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        address TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE leader_expiry (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO leader_lease (id, holder, address, epoch, acquired_at) VALUES (1, '', '', 0, now());
    INSERT INTO leader_expiry (id, holder, epoch, expires_at) VALUES (1, '', 0, now());",
];
