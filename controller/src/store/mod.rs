//! The controller's durable state: an embedded SQLite database (WAL,
//! `synchronous=FULL`).
//!
//! API boundary: [`Store`] is async and speaks domain types only. Each call
//! runs on tokio's blocking pool against one connection ([`Store::with`]),
//! so no SQLite call blocks the runtime's threads. The synchronous queries
//! live on [`Db`] (a borrowed connection), which also lets one call do
//! several of them in one transaction. Why rusqlite and not an async
//! driver: SQLite is in-process (an "async" SQLite driver is this same
//! thread hand-off), rusqlite is the maintained binding with the backup API
//! and `bundled` builds, and the schema and SQL stay PostgreSQL-compatible,
//! so a PostgreSQL store (tokio-postgres, for two controllers with a
//! leader) implements the same async methods without touching a workflow.
//!
//! Invariants:
//! - every write the engine depends on is committed before it takes its
//!   next step;
//! - every write of an operation's progress is conditional on its epoch
//!   ([`StoreError::Fenced`] when another controller claimed it since);
//! - admission of a new operation (conflicts per site) and the write of its
//!   rows happen in one transaction.

pub mod lease;
mod lock;
pub mod migrate;
mod schema;
pub mod sql;

pub use lock::SqliteLock;

pub use health::{ActiveDetail, EndedOp, OutboxItem};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sql::{Conn, OptionalExt, Row, SqlResult, ToValue, args};

use crate::domain::model::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sql::SqlError },
    #[error("cannot create the store's directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("store {path}: {source}")]
    Db { path: String, source: sql::SqlError },
    #[error("cannot open the store's lock file {path}: {source}")]
    LockFile { path: String, source: std::io::Error },
    #[error("store: {0}")]
    Sql(sql::SqlError),
    #[error("the store holds an invalid value in {what}: `{value}`")]
    Corrupt { what: &'static str, value: String },
    #[error("the store's schema version {found} is newer than this controller knows ({known}); upgrade the controller")]
    TooNew { found: i64, known: i64 },
    #[error("site `{site}` already has a running operation {operation}")]
    Busy { site: String, operation: String },
    #[error("operation {operation} is driven by another controller now (epoch {epoch} is no longer current)")]
    Fenced { operation: String, epoch: i64 },
    #[error(
        "the store {store} is in use by another controller ({holder}): one controller per SQLite file; \
         for several, use a PostgreSQL store ([store] url)"
    )]
    Locked { store: String, holder: String },
    #[error("{0}")]
    NotLeader(String),
    #[error("the store's worker failed: {0}")]
    Worker(String),
    #[error("{0}")]
    NotFound(String),
}

/// An active operation of a site, as admission sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveOp {
    pub id: String,
    pub kind: String,
    pub state: OperationState,
}

/// What admission decided for a new operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Create it.
    Admit,
    /// Create it and store an `abort` signal for each of these operations
    /// (they are preempted: their compensations run first).
    Preempt(Vec<String>),
    /// Refuse: the site is busy with this operation.
    Refuse(String),
}

/// What the admin API and metrics show of the whole fleet, read with a fixed
/// number of queries however many sites there are.
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    pub sites: Vec<Site>,
    /// Each enrolled instance's certificates, by (site, instance).
    pub certs: HashMap<(String, String), AgentCert>,
    /// Revocations: (site, serial or "" for the whole site) -> reason.
    pub revocations: HashMap<(String, String), String>,
    pub instances: HashMap<String, Vec<InstanceRecord>>,
    pub newest_backup: HashMap<String, Backup>,
    pub active: HashMap<String, Vec<ActiveOp>>,
    pub backup_counts: HashMap<(String, BackupState), u64>,
    pub copy_counts: HashMap<(String, String, CopyState), u64>,
    /// Each site's most recent failover or restore (id, state, last change).
    pub last_failover: HashMap<String, (String, OperationState, Millis)>,
    /// Each site's most recent recorded drill.
    pub last_drill: HashMap<String, DrillRecord>,
    /// Each schedule's last handled slot, by (site, kind).
    pub slots: HashMap<(String, String), Millis>,
    /// Each site's installed hot spare.
    pub spares: HashMap<String, SpareRecord>,
    /// Each site's health, as the monitor last stored it.
    pub health: HashMap<String, crate::domain::health::SiteHealth>,
    /// Pauses of automatic recovery still in force.
    pub pauses: HashMap<String, crate::domain::health::Pause>,
    /// Agents refused within [`REFUSALS_SHOWN_MS`], by the site their
    /// certificate names, the most recent first.
    pub refusals: HashMap<String, Vec<crate::domain::refusal::AgentRefusal>>,
}

/// How far back the fleet view reads refused agents: a day.
pub const REFUSALS_SHOWN_MS: Millis = 24 * 3600 * 1000;

/// Where the store lives: an SQLite file, or a PostgreSQL database.
#[derive(Clone, Debug)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(Box<PgTarget>),
}

/// A PostgreSQL database and how to reach it. The password never appears
/// in messages ([`PgTarget::shown`]).
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    /// PEM roots that sign the server's certificate: TLS to the database
    /// (`sslmode=require` unless the URL says otherwise); none: no TLS.
    ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgTarget {
    /// `url` is a `postgres://` URL or libpq's `key=value` form;
    /// `password`, when given, wins over one in the URL.
    pub fn new(url: &str, password: Option<String>, ca_pem: Option<&str>) -> Result<Self, String> {
        // The driver's parse errors do not repeat the URL (it may hold a password).
        let mut config: postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if let Some(p) = password {
            config.password(p);
        }
        config.application_name("dr-controller");
        config.connect_timeout(std::time::Duration::from_secs(10));
        // A half-open connection is noticed in about 30 s, not hours.
        config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(10));
        config.keepalives_interval(std::time::Duration::from_secs(5)).keepalives_retries(3);
        let ca = match ca_pem {
            Some(pem) => {
                let certs = ca_certs(pem)?;
                if config.get_ssl_mode() == postgres::config::SslMode::Prefer {
                    config.ssl_mode(postgres::config::SslMode::Require);
                }
                Some(certs)
            }
            None => {
                if config.get_ssl_mode() == postgres::config::SslMode::Require {
                    return Err("sslmode=require needs [store] ca: the certificates that sign the database server's".into());
                }
                config.ssl_mode(postgres::config::SslMode::Disable);
                None
            }
        };
        let shown = Self::describe(&config);
        Ok(PgTarget { config, ca, shown })
    }

    fn describe(c: &postgres::Config) -> String {
        let host = match c.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = c.get_ports().first().copied().unwrap_or(5432);
        format!("postgres://{}@{host}:{port}/{}", c.get_user().unwrap_or(""), c.get_dbname().unwrap_or(""))
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: &str) -> PgTarget {
        let mut config = self.config.clone();
        config.dbname(dbname);
        let shown = Self::describe(&config);
        PgTarget { config, ca: self.ca.clone(), shown }
    }

    /// Creates an empty database on the server (blocking: call it on the
    /// blocking pool). `name` is an identifier we chose: letters, digits, `_`.
    pub fn create_database(&self, name: &str) -> Result<(), StoreError> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(StoreError::NotFound(format!("`{name}` is not a database name of letters, digits and _")));
        }
        let conn = Conn::postgres(self.connect()?);
        conn.batch(&format!("CREATE DATABASE {name}")).map_err(|e| e.at(&self.shown))
    }

    /// The database, for messages: no password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn connect(&self) -> Result<sql::PgConn, StoreError> {
        let client = match &self.ca {
            None => self.config.connect(postgres::NoTls),
            Some(roots) => {
                let mut store = rustls::RootCertStore::empty();
                for c in roots {
                    store.add(c.clone()).map_err(|e| StoreError::NotFound(format!("[store] ca: {e}")))?;
                }
                let tls = rustls::ClientConfig::builder().with_root_certificates(store).with_no_client_auth();
                self.config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            }
        };
        let client = client.map_err(|source| StoreError::Open { path: self.shown.clone(), source: source.into() })?;
        Ok(sql::PgConn::new(client))
    }
}

fn ca_certs(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let certs = dr_proto::tls::parse_certs(pem.as_bytes(), Path::new("[store] ca")).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("[store] ca holds no certificate".into());
    }
    Ok(certs)
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Conn>>,
    path: Arc<str>,
    location: Arc<Location>,
    /// Set once this replica leads a shared store: every call is then one
    /// transaction that first checks the lease ([`lease::Leadership`]).
    fence: Arc<std::sync::OnceLock<lease::Leadership>>,
    /// A thread of this store's own that runs its calls instead of tokio's
    /// blocking pool (the lease's session: its renewals must not wait for
    /// a pool full of calls queued on the engine's store).
    worker: Option<std::sync::mpsc::Sender<Job>>,
}

/// A call for a store's own thread.
type Job = Box<dyn FnOnce() + Send>;

impl Store {
    /// Opens (creating if missing) and migrates an SQLite store.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_at(Location::Sqlite(path.to_owned())).await
    }

    /// Opens and migrates the store at `location`.
    pub async fn open_at(location: Location) -> Result<Self, StoreError> {
        tokio::task::spawn_blocking(move || Self::open_blocking_at(location)).await.map_err(|e| StoreError::Worker(e.to_string()))?
    }

    pub fn open_blocking(path: &Path) -> Result<Self, StoreError> {
        Self::open_blocking_at(Location::Sqlite(path.to_owned()))
    }

    pub fn open_blocking_at(location: Location) -> Result<Self, StoreError> {
        let (conn, shown) = match &location {
            Location::Sqlite(path) => (open_sqlite(path)?, path.display().to_string()),
            Location::Postgres(target) => {
                let conn = Conn::postgres(target.connect()?);
                migrate_pg(&conn).map_err(|e| e.at(target.shown()))?;
                (conn, target.shown().to_owned())
            }
        };
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: shown.into(),
            location: Arc::new(location),
            fence: Default::default(),
            worker: None,
        })
    }

    /// A second session to the same database (the lease's own, so its
    /// renewals never queue behind the engine's calls). No migration runs.
    pub async fn another_session(&self) -> Result<Store, StoreError> {
        let location = (*self.location).clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match &location {
                Location::Sqlite(p) => open_sqlite(p)?,
                Location::Postgres(t) => Conn::postgres(t.connect()?),
            };
            Ok(Store { conn: Arc::new(Mutex::new(conn)), path, location: Arc::new(location), fence: Default::default(), worker: None })
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }

    /// [`Store::another_session`] whose calls run on a thread of its own.
    pub async fn another_session_on_own_thread(&self, name: &str) -> Result<Store, StoreError> {
        let mut store = self.another_session().await?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| StoreError::Worker(e.to_string()))?;
        store.worker = Some(tx);
        Ok(store)
    }

    /// From now on every call of this store is fenced by `leadership`'s
    /// lease (once: a replica that loses its lease exits).
    pub fn fence_with(&self, leadership: lease::Leadership) {
        if self.fence.set(leadership).is_err() {
            tracing::warn!("the store is already fenced");
        }
    }

    /// The store's file or database, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Which engine the store runs on.
    pub fn engine(&self) -> sql::Engine {
        match *self.location {
            Location::Sqlite(_) => sql::Engine::Sqlite,
            Location::Postgres(_) => sql::Engine::Postgres,
        }
    }

    /// Runs `f` against the connection on the blocking pool. SQL errors
    /// come back naming the store. A PostgreSQL session that was lost is
    /// opened again first (what ran in it was rolled back with it).
    pub async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        let location = self.location.clone();
        let fence = self.fence.get().filter(|l| l.is_replica()).cloned();
        let call = move || {
            // A panic while holding the lock cannot leave the database
            // inconsistent (transactions roll back), so a poisoned lock is
            // still usable.
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_broken()
                && let Location::Postgres(target) = &*location
            {
                tracing::warn!(store = %target.shown(), "the database session was lost; connecting again");
                *c = Conn::postgres(target.connect()?);
            }
            let Some(leadership) = fence else { return f(&c) };
            // BEGIN and the lease check come first: when they fail because
            // the session died since its last use (a database restart),
            // nothing of `f` ran, and it runs once more on a new session.
            let mut f = Some(f);
            for attempt in 0..2 {
                let failed = {
                    let begun = c.transaction().and_then(|tx| leadership.fence(&tx).map(|()| tx));
                    match begun {
                        Ok(tx) => {
                            let out = (f.take().expect("runs once"))(&tx)?;
                            tx.commit()?;
                            return Ok(out);
                        }
                        Err(e) => e,
                    }
                };
                let Location::Postgres(target) = &*location else { return Err(failed) };
                if attempt > 0 || !c.is_broken() {
                    return Err(failed);
                }
                tracing::warn!(store = %target.shown(), error = %failed, "the database session was lost; connecting again");
                *c = Conn::postgres(target.connect()?);
            }
            unreachable!("the loop returns")
        };
        let result = match &self.worker {
            None => tokio::task::spawn_blocking(call).await.map_err(|e| StoreError::Worker(e.to_string()))?,
            Some(worker) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                worker
                    .send(Box::new(move || {
                        let _ = tx.send(call());
                    }))
                    .map_err(|_| StoreError::Worker("the store's thread ended".into()))?;
                rx.await.map_err(|_| StoreError::Worker("the store's thread dropped a call".into()))?
            }
        };
        result.map_err(|e| e.at(&path))
    }

    /// A consistent copy of the whole store, taken while the controller
    /// runs (`VACUUM INTO`: one transaction, WAL contents included, a
    /// compact file). Refuses to overwrite `to`. Returns how many backups
    /// the copy holds. SQLite only: a PostgreSQL store is backed up with
    /// the database's own tools.
    pub async fn backup_to(&self, to: PathBuf) -> Result<u64, StoreError> {
        self.with(move |c| {
            let Some(c) = c.as_sqlite() else {
                return Err(StoreError::NotFound("the store is in PostgreSQL: back it up with pg_dump or the database's snapshots".into()));
            };
            if to.exists() {
                return Err(StoreError::NotFound(format!("{} exists already; not overwriting it", to.display())));
            }
            let target = to.to_str().ok_or_else(|| StoreError::NotFound(format!("{} is not a UTF-8 path", to.display())))?;
            c.execute("VACUUM INTO ?1", [target])?;
            let copy = rusqlite::Connection::open(&to)?;
            let n: i64 = copy.query_row("SELECT COUNT(*) FROM backups", [], |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }
}

impl StoreError {
    /// A driver's error, named with the store it came from.
    fn at(self, path: &str) -> StoreError {
        match self {
            StoreError::Sql(source) => StoreError::Db { path: path.to_owned(), source },
            other => other,
        }
    }
}

fn open_sqlite(path: &Path) -> Result<Conn, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
    }
    let shown = path.display().to_string();
    let open_err = |source: rusqlite::Error| StoreError::Open { path: shown.clone(), source: source.into() };
    let conn = rusqlite::Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
    let conn = Conn::sqlite(conn);
    migrate_sqlite(&conn).map_err(|e| e.at(&shown))?;
    Ok(conn)
}

macro_rules! db_call {
    ($(#[$m:meta])* $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty) => {
        $(#[$m])*
        pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret, StoreError> {
            self.with(move |c| Db(c).$name($($arg),*)).await
        }
    };
}

// After the macro: its queries use `db_call!`.
mod certs;
mod health;
mod refusals;

pub use certs::{AgentCert, RotationRecord, SerialState};

/// The async API: one line per query, each on the blocking pool.
impl Store {
    db_call!(
        /// Adds a configured site, or updates its region and role. The primary
        /// is taken from the config only when the site is new: after that the
        /// store is authoritative (a failover changes it).
        upsert_site(site: Site) -> Site);
    db_call!(
        /// [`Store::upsert_site`] for every configured site, in one
        /// transaction (a fleet's start does not pay one call per site).
        upsert_sites(sites: Vec<Site>) -> Vec<Site>);
    db_call!(site(id: String) -> Option<Site>);
    db_call!(newest_backups() -> HashMap<String, Backup>);
    db_call!(sites() -> Vec<Site>);
    db_call!(set_primary(site_id: String, instance_id: String) -> ());
    db_call!(put_instance(rec: InstanceRecord) -> ());
    db_call!(instance(site_id: String, instance_id: String) -> Option<InstanceRecord>);
    db_call!(instances_of(site_id: String) -> Vec<InstanceRecord>);
    db_call!(
        /// Every instance recorded `fenced`, of every site, in one query.
        fenced_instances() -> Vec<InstanceRecord>);
    db_call!(
        /// See [`Db::set_public_ip`].
        set_public_ip(site_id: String, instance_id: String, public_ip: String) -> ());
    db_call!(
        /// See [`Db::forget_terminated`].
        forget_terminated(site_id: String, instance_id: String) -> bool);
    db_call!(
        /// Records a role for a non-primary instance.
        set_instance_role(site_id: String, instance_id: String, role: String, operation_id: String, reason: String) -> ());
    db_call!(
        /// Records EC2's confirmation of many instances (site, instance,
        /// private IP) in one transaction, and returns their records.
        set_verified(checks: Vec<(String, String, String)>, at_ms: Millis) -> Vec<Option<InstanceRecord>>);
    db_call!(
        /// Marks every instance disconnected (at start-up: no stream survives a restart).
        mark_all_disconnected() -> ());
    db_call!(
        /// Persists liveness for many instances in one transaction.
        touch_seen(seen: Vec<(String, String, Millis)>) -> ());
    db_call!(set_disconnected(site_id: String, instance_id: String, last_seen_ms: Millis) -> ());
    db_call!(operation(id: String) -> Option<Operation>);
    db_call!(
        /// Operations that have not ended (to resume after a restart).
        active_operations() -> Vec<String>);
    db_call!(active_operations_of(site_id: String) -> Vec<ActiveOp>);
    db_call!(
        /// Takes over an active operation for `owner`: its epoch goes up by
        /// one and every later write must carry the new epoch.
        claim(id: String, owner: String) -> i64);
    db_call!(
        /// Writes one step and, when given, the workflow's state and protected
        /// resources, in one transaction conditional on the epoch.
        put_step(op_id: String, epoch: i64, step: StepRecord, state: Option<(u32, serde_json::Value, Vec<Protected>)>) -> ());
    db_call!(
        /// Sets an operation's state, what it waits for, its first failure and error.
        set_operation_state(op_id: String, epoch: i64, state: OperationState, waiting_for: String, failure: String, error: String) -> ());
    db_call!(add_signal(op_id: String, signal: Signal, requested_by: String) -> ());
    db_call!(
        /// Signals not acted on yet, oldest first.
        pending_signals(op_id: String) -> Vec<(i64, Signal)>);
    db_call!(consume_signal(id: i64) -> ());
    db_call!(intent(op_id: String, name: String) -> Option<(String, String)>);
    db_call!(put_intent(op_id: String, epoch: i64, name: String, token: String, resource_id: String) -> ());
    db_call!(
        /// Images named by active operations and installed spares
        /// (retention must keep them).
        protected_images() -> HashSet<String>);
    db_call!(record_backup(b: Backup) -> ());
    db_call!(backups(site_id: String) -> Vec<Backup>);
    db_call!(backup_origin(image_id: String) -> Option<(String, String)>);
    db_call!(set_backup_state(image_id: String, state: BackupState, fate: String) -> ());
    db_call!(put_copy(c: Copy) -> ());
    db_call!(copies_of(source_image_id: String) -> Vec<Copy>);
    db_call!(unfinished_copies() -> Vec<Copy>);
    db_call!(
        /// The available copies of a site's backups in a region, newest
        /// backup first (by the backup's completion, which retries never
        /// change).
        available_copies_in(site_id: String, region: String) -> Vec<Copy>);
    db_call!(
        /// Every schedule's last handled slot, by (site, kind), in one query.
        slots() -> HashMap<(String, String), Millis>);
    db_call!(set_last_slot(site_id: String, kind: String, slot: Millis) -> ());
    db_call!(fleet_view() -> FleetView);
    db_call!(
        /// A backup found in EC2 by `store rebuild`, with a stand-in for the
        /// operation that made it (succeeded), in one transaction.
        insert_rebuilt_backup(b: Backup) -> ());
    db_call!(count_backups() -> u64);
    db_call!(
        /// Records the launch facts of a backup's source instance (once; a
        /// repeat after a restart keeps the first).
        put_launch_facts(image_id: String, site_id: String, facts: LaunchFacts) -> ());
    db_call!(launch_facts(image_id: String) -> Option<LaunchFacts>);
    db_call!(
        /// Installs a site's spare, in one transaction with its instance's
        /// `spare` role; returns the spare it replaces (to be retired).
        install_spare(record: SpareRecord) -> Option<SpareRecord>);
    db_call!(spare(site_id: String) -> Option<SpareRecord>);
    db_call!(active_by_site() -> HashMap<String, Vec<ActiveOp>>);
    db_call!(
        /// Every installed spare, by site, in one query.
        spares() -> HashMap<String, SpareRecord>);
    db_call!(
        /// A failover takes the spare: the row goes and the instance becomes
        /// the operation's candidate, in one transaction. False when the
        /// site's spare is not (or no longer) `instance_id`.
        claim_spare(site_id: String, instance_id: String, operation_id: String) -> bool);
    db_call!(
        /// Forgets the site's spare if it is `instance_id` (it was
        /// terminated); returns whether it was.
        drop_spare(site_id: String, instance_id: String) -> bool);
    db_call!(put_drill(record: DrillRecord) -> ());
    db_call!(drills(site_id: String, limit: u32) -> Vec<DrillRecord>);
    db_call!(
        /// Records that an instance of a site runs in another region than
        /// the site's (EC2 verification asks there).
        put_instance_region(site_id: String, instance_id: String, region: String) -> ());
    db_call!(instance_regions() -> HashMap<(String, String), String>);
    db_call!(
        /// A failover's promotion, in one transaction: `new` (in `region`)
        /// becomes the site's primary, `old` (if any) is recorded fenced with
        /// `reason`. From then on the site's region is the primary's, whatever
        /// the config says (as for the primary itself).
        promote(site_id: String, new: String, old: String, reason: String, region: String) -> ());

    /// Creates an operation with its steps, after `admit` decided on the
    /// site's active operations, in one transaction. With `slot`, the
    /// scheduler's slot is recorded in the same transaction, so a crash
    /// cannot consume a slot without starting its backup (or start one
    /// without recording its slot).
    pub async fn create_operation<F>(&self, op: Operation, slot: Option<Millis>, admit: F) -> Result<Vec<String>, StoreError>
    where
        F: FnOnce(&[ActiveOp]) -> Admission + Send + 'static,
    {
        self.with(move |c| {
            let tx = c.transaction()?;
            let active = Db(&tx).active_operations_of(op.site_id.clone())?;
            let preempted = match admit(&active) {
                Admission::Admit => vec![],
                Admission::Preempt(ids) => ids,
                Admission::Refuse(operation) => return Err(StoreError::Busy { site: op.site_id.clone(), operation }),
            };
            insert_operation(&tx, &op)?;
            for id in &preempted {
                Db(&tx).add_signal(id.clone(), Signal::Abort, format!("preempted by {}", op.id))?;
            }
            if let Some(slot) = slot {
                Db(&tx).set_last_slot(op.site_id.clone(), op.kind.clone(), slot)?;
            }
            tx.commit()?;
            Ok(preempted)
        })
        .await
    }
}

fn migrate_sqlite(conn: &Conn) -> Result<(), StoreError> {
    let sqlite = conn.as_sqlite().expect("an SQLite connection");
    let version: i64 = sqlite.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = schema::MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew { found: version, known });
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.batch(sql)?;
        sqlite.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "store schema migrated");
    }
    Ok(())
}

/// PostgreSQL's migrations, in one transaction that holds `dr_schema`
/// locked, so replicas starting together migrate once (a table lock: it
/// ends with the transaction, also behind a connection pooler).
fn migrate_pg(conn: &Conn) -> Result<(), StoreError> {
    if let Err(e) = conn.batch("CREATE TABLE IF NOT EXISTS dr_schema (version BIGINT NOT NULL)") {
        // Two replicas creating it at once: one fails on the catalog; the table is there.
        tracing::debug!(error = %e, "dr_schema");
    }
    let tx = conn.transaction()?;
    tx.batch("LOCK TABLE dr_schema IN ACCESS EXCLUSIVE MODE")?;
    let version = match tx.query_opt("SELECT version FROM dr_schema", (), |r| r.get::<i64>(0))? {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO dr_schema (version) VALUES (0)", ())?;
            0
        }
    };
    let known = schema::PG_MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew { found: version, known });
    }
    for (i, sql) in schema::PG_MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch(sql)?;
        tx.execute("UPDATE dr_schema SET version = ?1", args![(i + 1) as i64])?;
        tracing::info!(version = i + 1, "store schema migrated (PostgreSQL)");
    }
    tx.commit()
}

fn corrupt(what: &'static str, value: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what, value: value.into() }
}

const ACTIVE_SQL: &str = "('running', 'waiting', 'cancelling')";

/// Rows per statement of a batched write (parameters stay far below both
/// engines' limits: SQLite's 32,766, PostgreSQL's 65,535).
const BATCH_ROWS: usize = 500;

fn insert_operation(tx: &Conn, op: &Operation) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO operations (id, kind, site_id, state, error, requested_by, created_at_ms, updated_at_ms,
             waiting_for, failure, owner, epoch, state_version, wf_state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        args![
            op.id,
            op.kind,
            op.site_id,
            op.state.as_str(),
            op.error,
            op.requested_by,
            op.created_at_ms as i64,
            op.updated_at_ms as i64,
            op.waiting_for,
            op.failure,
            op.owner,
            op.epoch,
            op.state_version,
            op.wf_state.as_ref().map(|v| v.to_string()),
        ],
    )?;
    for s in &op.steps {
        tx.execute(
            "INSERT INTO steps (operation_id, seq, name, state, attempts, started_at_ms, finished_at_ms, detail,
                 error, result) VALUES (?1, ?2, ?3, ?4, 0, 0, 0, '', '', NULL)",
            args![op.id, s.seq, s.name, s.state.as_str()],
        )?;
    }
    Ok(())
}

/// The synchronous queries, on a borrowed connection (or transaction).
pub struct Db<'a>(pub &'a Conn);

const SITE_COLS: &str = "id, region, primary_instance_id, role_arn";
fn site_row(r: &Row<'_>) -> SqlResult<Site> {
    Ok(Site { id: r.get(0)?, region: r.get(1)?, primary_instance_id: r.get(2)?, role_arn: r.get(3)? })
}

const INSTANCE_COLS: &str = "site_id, instance_id, role, operation_id, reason, private_ip, public_ip, boot_id, os_family,
    app_state, verified_private_ip, verified_at_ms, connected, connected_at_ms, last_seen_ms, peer";
fn instance_row(r: &Row<'_>) -> SqlResult<InstanceRecord> {
    Ok(InstanceRecord {
        site_id: r.get(0)?,
        instance_id: r.get(1)?,
        role: r.get(2)?,
        operation_id: r.get(3)?,
        reason: r.get(4)?,
        facts: InstanceFacts {
            instance_id: r.get(1)?,
            private_ip: r.get(5)?,
            public_ip: r.get(6)?,
            boot_id: r.get(7)?,
            os_family: r.get(8)?,
            app_state: r.get(9)?,
        },
        verified_private_ip: r.get(10)?,
        verified_at_ms: r.get::<i64>(11)? as u64,
        connected: r.get(12)?,
        connected_at_ms: r.get::<i64>(13)? as u64,
        last_seen_ms: r.get::<i64>(14)? as u64,
        peer: r.get(15)?,
        cert_not_after_ms: 0,
    })
}

const BACKUP_COLS: &str = "image_id, site_id, operation_id, region, instance_id, snapshot_ids, started_at_ms,
    completed_at_ms, consistency, app_state, state, fate, deleted_at_ms, quiesce, frozen_ms, quiesce_note";
type BackupRow = (String, String, String, String, String, String, i64, i64, String, String, String, String, i64, String, i64, String);
fn backup_row(r: &Row<'_>) -> SqlResult<BackupRow> {
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
        r.get(13)?,
        r.get(14)?,
        r.get(15)?,
    ))
}
fn backup_of(row: BackupRow) -> Result<Backup, StoreError> {
    let (
        image_id,
        site_id,
        operation_id,
        region,
        instance_id,
        snaps,
        started,
        completed,
        cons,
        app_state,
        state,
        fate,
        deleted,
        quiesce,
        frozen,
        note,
    ) = row;
    Ok(Backup {
        snapshot_ids: serde_json::from_str(&snaps).map_err(|_| corrupt("backups.snapshot_ids", snaps))?,
        consistency: Consistency::parse(&cons).ok_or_else(|| corrupt("backups.consistency", cons.clone()))?,
        state: BackupState::parse(&state).ok_or_else(|| corrupt("backups.state", state.clone()))?,
        image_id,
        site_id,
        operation_id,
        region,
        instance_id,
        started_at_ms: started as u64,
        completed_at_ms: completed as u64,
        app_state,
        fate,
        deleted_at_ms: deleted as u64,
        quiesce,
        frozen_ms: frozen as u64,
        quiesce_note: note,
        copies: Vec::new(),
    })
}

const COPY_COLS: &str =
    "c.source_image_id, c.region, c.image_id, c.state, c.attempts, c.error, c.requested_at_ms, c.completed_at_ms, c.deleted_at_ms";
/// The columns of [`COPY_COLS`], in order.
type CopyRow = (String, String, String, String, u32, String, i64, i64, i64);
fn copy_row(r: &Row<'_>) -> SqlResult<CopyRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
}
fn copy_of(row: (String, String, String, String, u32, String, i64, i64, i64)) -> Result<Copy, StoreError> {
    let (source_image_id, region, image_id, state, attempts, error, req, done, del) = row;
    Ok(Copy {
        state: CopyState::parse(&state).ok_or_else(|| corrupt("copies.state", state.clone()))?,
        source_image_id,
        region,
        image_id,
        attempts,
        error,
        requested_at_ms: req as u64,
        completed_at_ms: done as u64,
        deleted_at_ms: del as u64,
    })
}

impl Db<'_> {
    // ------------------------------------------------------------ sites

    pub fn upsert_site(&self, site: Site) -> Result<Site, StoreError> {
        self.0.execute(
            "INSERT INTO sites (id, region, primary_instance_id, role_arn, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET role_arn = excluded.role_arn,
                 region = CASE WHEN sites.primary_instance_id = excluded.primary_instance_id
                               THEN excluded.region ELSE sites.region END",
            args![site.id, site.region, site.primary_instance_id, site.role_arn, now_ms() as i64],
        )?;
        Ok(self.site(site.id.clone())?.unwrap_or(site))
    }

    /// [`Db::upsert_site`] for many sites: a few statements of up to
    /// [`BATCH_ROWS`] rows each, then one read (a fleet's start does not
    /// pay a round trip per site).
    pub fn upsert_sites(&self, sites: Vec<Site>) -> Result<Vec<Site>, StoreError> {
        let tx = self.0.transaction()?;
        let now = now_ms() as i64;
        for chunk in sites.chunks(BATCH_ROWS) {
            let mut values: Vec<sql::Value> = Vec::with_capacity(chunk.len() * 5);
            for site in chunk {
                values.extend(
                    [&site.id as &dyn sql::ToValue, &site.region, &site.primary_instance_id, &site.role_arn, &now].map(|v| v.to_value()),
                );
            }
            tx.execute(
                &format!(
                    "INSERT INTO sites (id, region, primary_instance_id, role_arn, updated_at_ms) VALUES {}
                     ON CONFLICT(id) DO UPDATE SET role_arn = excluded.role_arn,
                         region = CASE WHEN sites.primary_instance_id = excluded.primary_instance_id
                                       THEN excluded.region ELSE sites.region END",
                    sql::values_rows(chunk.len(), &["", "", "", "", ""])
                ),
                values,
            )?;
        }
        let stored: HashMap<String, Site> = Db(&tx).sites()?.into_iter().map(|s| (s.id.clone(), s)).collect();
        tx.commit()?;
        Ok(sites.into_iter().map(|s| stored.get(&s.id).cloned().unwrap_or(s)).collect())
    }

    pub fn site(&self, id: String) -> Result<Option<Site>, StoreError> {
        self.0.query_row(&format!("SELECT {SITE_COLS} FROM sites WHERE id = ?1"), [id], site_row).optional()
    }

    pub fn sites(&self) -> Result<Vec<Site>, StoreError> {
        let stmt = self.0.prepare(&format!("SELECT {SITE_COLS} FROM sites ORDER BY id"))?;
        stmt.query_map((), site_row)?.collect::<Result<Vec<_>, _>>()
    }

    pub fn set_primary(&self, site_id: String, instance_id: String) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE sites SET primary_instance_id = ?2, updated_at_ms = ?3 WHERE id = ?1",
            args![site_id, instance_id, now_ms() as i64],
        )?;
        Ok(())
    }

    // ------------------------------------------------------------ instances

    /// Records an agent's report and connection (keeps the recorded role
    /// and verification of a known instance).
    pub fn put_instance(&self, a: InstanceRecord) -> Result<(), StoreError> {
        self.0.execute(
            &format!(
                "INSERT INTO instances ({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT(site_id, instance_id) DO UPDATE SET private_ip = excluded.private_ip,
                     public_ip = excluded.public_ip, boot_id = excluded.boot_id, os_family = excluded.os_family,
                     app_state = excluded.app_state, connected = excluded.connected,
                     connected_at_ms = excluded.connected_at_ms, last_seen_ms = excluded.last_seen_ms,
                     peer = excluded.peer"
            ),
            args![
                a.site_id,
                a.instance_id,
                a.role,
                a.operation_id,
                a.reason,
                a.facts.private_ip,
                a.facts.public_ip,
                a.facts.boot_id,
                a.facts.os_family,
                a.facts.app_state,
                a.verified_private_ip,
                a.verified_at_ms as i64,
                a.connected,
                a.connected_at_ms as i64,
                a.last_seen_ms as i64,
                a.peer
            ],
        )?;
        Ok(())
    }

    pub fn instance(&self, site_id: String, instance_id: String) -> Result<Option<InstanceRecord>, StoreError> {
        self.0
            .query_row(
                &format!("SELECT {INSTANCE_COLS} FROM instances WHERE site_id = ?1 AND instance_id = ?2"),
                args![site_id, instance_id],
                instance_row,
            )
            .optional()
    }

    pub fn instances_of(&self, site_id: String) -> Result<Vec<InstanceRecord>, StoreError> {
        let stmt = self.0.prepare(&format!("SELECT {INSTANCE_COLS} FROM instances WHERE site_id = ?1 ORDER BY last_seen_ms DESC"))?;
        stmt.query_map([site_id], instance_row)?.collect::<Result<Vec<_>, _>>()
    }

    pub fn fenced_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let stmt = self.0.prepare(&format!("SELECT {INSTANCE_COLS} FROM instances WHERE role = 'fenced' ORDER BY site_id, instance_id"))?;
        stmt.query_map((), instance_row)?.collect::<Result<Vec<_>, _>>()
    }

    pub fn set_instance_role(
        &self,
        site_id: String,
        instance_id: String,
        role: String,
        operation_id: String,
        reason: String,
    ) -> Result<(), StoreError> {
        self.0.execute(
            &format!(
                "INSERT INTO instances ({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, '', '', '', '', '', '', 0, 0, 0, 0, '')
                 ON CONFLICT(site_id, instance_id) DO UPDATE SET role = excluded.role,
                     operation_id = excluded.operation_id, reason = excluded.reason"
            ),
            args![site_id, instance_id, role, operation_id, reason],
        )?;
        Ok(())
    }

    pub fn set_verified(&self, checks: Vec<(String, String, String)>, at_ms: Millis) -> Result<Vec<Option<InstanceRecord>>, StoreError> {
        let tx = self.0.transaction()?;
        let mut found: HashMap<(String, String), InstanceRecord> = HashMap::with_capacity(checks.len());
        for chunk in checks.chunks(BATCH_ROWS) {
            let mut values: Vec<sql::Value> = chunk.iter().flat_map(|(s, i, ip)| [s, i, ip].map(|v| v.to_value())).collect();
            values.push((at_ms as i64).to_value());
            tx.execute(
                &format!(
                    "UPDATE instances SET verified_private_ip = v.column3, verified_at_ms = ?{}
                     FROM (VALUES {}) AS v WHERE instances.site_id = v.column1 AND instances.instance_id = v.column2",
                    chunk.len() * 3 + 1,
                    sql::values_rows(chunk.len(), &["", "", ""])
                ),
                values,
            )?;
            let keys: Vec<sql::Value> = chunk.iter().flat_map(|(s, i, _)| [s, i].map(|v| v.to_value())).collect();
            let rows = tx.query_map(
                &format!(
                    "SELECT {INSTANCE_COLS} FROM instances WHERE (site_id, instance_id) IN (VALUES {})",
                    sql::values_rows(chunk.len(), &["", ""])
                ),
                keys,
                instance_row,
            )?;
            for rec in rows {
                let rec = rec?;
                found.insert((rec.site_id.clone(), rec.instance_id.clone()), rec);
            }
        }
        tx.commit()?;
        Ok(checks.into_iter().map(|(s, i, _)| found.get(&(s, i)).cloned()).collect())
    }

    pub fn mark_all_disconnected(&self) -> Result<(), StoreError> {
        self.0.execute("UPDATE instances SET connected = 0", ())?;
        Ok(())
    }

    pub fn touch_seen(&self, seen: Vec<(String, String, Millis)>) -> Result<(), StoreError> {
        // One row per instance (its latest), then a few batched updates.
        let mut latest: HashMap<(String, String), Millis> = HashMap::with_capacity(seen.len());
        for (site, instance, at) in seen {
            let e = latest.entry((site, instance)).or_insert(at);
            *e = (*e).max(at);
        }
        let rows: Vec<((String, String), Millis)> = latest.into_iter().collect();
        let tx = self.0.transaction()?;
        for chunk in rows.chunks(BATCH_ROWS) {
            let values: Vec<sql::Value> =
                chunk.iter().flat_map(|((s, i), at)| [s.to_value(), i.to_value(), (*at as i64).to_value()]).collect();
            tx.execute(
                &format!(
                    "UPDATE instances SET last_seen_ms = CASE WHEN instances.last_seen_ms > v.column3 THEN instances.last_seen_ms ELSE v.column3 END
                     FROM (VALUES {}) AS v WHERE instances.site_id = v.column1 AND instances.instance_id = v.column2",
                    sql::values_rows(chunk.len(), &["", "", "BIGINT"])
                ),
                values,
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the public address an instance is reached at once the
    /// controller moved the site's Elastic IP onto it (its agent reported
    /// the launch address when it connected). The next Hello overwrites it
    /// with what the instance itself says.
    pub fn set_public_ip(&self, site_id: String, instance_id: String, public_ip: String) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE instances SET public_ip = ?3 WHERE site_id = ?1 AND instance_id = ?2",
            args![site_id, instance_id, public_ip],
        )?;
        Ok(())
    }

    /// Forgets an instance EC2 terminated for us (a drill copy torn down,
    /// a spare retired): it is no longer listed under its site. Never the
    /// site's primary nor a fenced instance (an old primary stays listed).
    /// Whether a record was forgotten.
    pub fn forget_terminated(&self, site_id: String, instance_id: String) -> Result<bool, StoreError> {
        let tx = self.0.transaction()?;
        let n = tx.execute(
            "DELETE FROM instances WHERE site_id = ?1 AND instance_id = ?2 AND role <> 'fenced'
               AND instance_id <> COALESCE((SELECT primary_instance_id FROM sites WHERE id = ?1), '')",
            args![site_id, instance_id],
        )?;
        if n > 0 {
            tx.execute("DELETE FROM instance_regions WHERE site_id = ?1 AND instance_id = ?2", args![site_id, instance_id])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    pub fn set_disconnected(&self, site_id: String, instance_id: String, last_seen_ms: Millis) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE instances SET connected = 0, last_seen_ms = CASE WHEN last_seen_ms > ?3 THEN last_seen_ms ELSE ?3 END WHERE site_id = ?1 AND instance_id = ?2",
            args![site_id, instance_id, last_seen_ms as i64],
        )?;
        Ok(())
    }

    // ------------------------------------------------------------ operations

    pub fn operation(&self, id: String) -> Result<Option<Operation>, StoreError> {
        type Head = (String, String, String, String, String, String, i64, i64, String, String, String, i64, u32, Option<String>);
        let head: Option<Head> = self
            .0
            .query_row(
                "SELECT id, kind, site_id, state, error, requested_by, created_at_ms, updated_at_ms, waiting_for,
                        failure, owner, epoch, state_version, wf_state FROM operations WHERE id = ?1",
                [&id],
                |r| {
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
                        r.get(13)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, kind, site_id, state, error, requested_by, created, updated, waiting_for, failure, owner, epoch, version, wf)) = head
        else {
            return Ok(None);
        };
        let stmt = self.0.prepare(
            "SELECT seq, name, state, attempts, started_at_ms, finished_at_ms, detail, error, result
             FROM steps WHERE operation_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([&id], |r| {
            Ok((
                r.get::<u32>(0)?,
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<u32>(3)?,
                r.get::<i64>(4)?,
                r.get::<i64>(5)?,
                r.get::<String>(6)?,
                r.get::<String>(7)?,
                r.get::<Option<String>>(8)?,
            ))
        })?;
        let mut steps = Vec::new();
        for row in rows {
            let (seq, name, state, attempts, started, finished, detail, error, result) = row?;
            steps.push(StepRecord {
                seq,
                name,
                state: StepState::parse(&state).ok_or_else(|| corrupt("steps.state", state.clone()))?,
                attempts,
                started_at_ms: started as u64,
                finished_at_ms: finished as u64,
                detail,
                error,
                result: match result {
                    Some(text) => Some(serde_json::from_str(&text).map_err(|_| corrupt("steps.result", text))?),
                    None => None,
                },
            });
        }
        let stmt = self.0.prepare("SELECT kind, resource_id FROM protected WHERE operation_id = ?1 ORDER BY kind, resource_id")?;
        let protects = stmt
            .query_map([&id], |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|(k, v)| if k == "instance" { Protected::Instance(v) } else { Protected::Image(v) })
            .collect();
        Ok(Some(Operation {
            state: OperationState::parse(&state).ok_or_else(|| corrupt("operations.state", state.clone()))?,
            wf_state: match wf {
                Some(text) => Some(serde_json::from_str(&text).map_err(|_| corrupt("operations.wf_state", text))?),
                None => None,
            },
            id,
            kind,
            site_id,
            error,
            requested_by,
            created_at_ms: created as u64,
            updated_at_ms: updated as u64,
            steps,
            waiting_for,
            failure,
            owner,
            epoch,
            state_version: version,
            protects,
        }))
    }

    pub fn active_operations(&self) -> Result<Vec<String>, StoreError> {
        let stmt = self.0.prepare(&format!("SELECT id FROM operations WHERE state IN {ACTIVE_SQL} ORDER BY created_at_ms"))?;
        stmt.query_map((), |r| r.get(0))?.collect::<Result<Vec<String>, _>>()
    }

    pub fn active_operations_of(&self, site_id: String) -> Result<Vec<ActiveOp>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT id, kind, state FROM operations WHERE site_id = ?1 AND state IN {ACTIVE_SQL} ORDER BY created_at_ms"
        ))?;
        let rows = stmt
            .query_map([site_id], |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<String>(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, kind, state)| {
                Ok(ActiveOp { id, kind, state: OperationState::parse(&state).ok_or_else(|| corrupt("operations.state", state))? })
            })
            .collect()
    }

    pub fn claim(&self, id: String, owner: String) -> Result<i64, StoreError> {
        let epoch: Option<i64> = self
            .0
            .query_row(
                &format!("UPDATE operations SET owner = ?2, epoch = epoch + 1 WHERE id = ?1 AND state IN {ACTIVE_SQL} RETURNING epoch"),
                args![id, owner],
                |r| r.get(0),
            )
            .optional()?;
        epoch.ok_or_else(|| StoreError::NotFound(format!("operation {id} is not active")))
    }

    fn check_epoch(tx: &Conn, op_id: &str, epoch: i64) -> Result<(), StoreError> {
        let now = now_ms() as i64;
        let n = tx.execute("UPDATE operations SET updated_at_ms = ?3 WHERE id = ?1 AND epoch = ?2", args![op_id, epoch, now])?;
        if n == 0 {
            return Err(StoreError::Fenced { operation: op_id.to_owned(), epoch });
        }
        Ok(())
    }

    pub fn put_step(
        &self,
        op_id: String,
        epoch: i64,
        step: StepRecord,
        state: Option<(u32, serde_json::Value, Vec<Protected>)>,
    ) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        Self::check_epoch(&tx, &op_id, epoch)?;
        tx.execute(
            "UPDATE steps SET state = ?3, attempts = ?4, started_at_ms = ?5, finished_at_ms = ?6, detail = ?7,
                 error = ?8, result = ?9 WHERE operation_id = ?1 AND seq = ?2",
            args![
                op_id,
                step.seq,
                step.state.as_str(),
                step.attempts,
                step.started_at_ms as i64,
                step.finished_at_ms as i64,
                step.detail,
                step.error,
                step.result.as_ref().map(|v| v.to_string())
            ],
        )?;
        if let Some((version, value, protects)) = state {
            tx.execute("UPDATE operations SET state_version = ?2, wf_state = ?3 WHERE id = ?1", args![op_id, version, value.to_string()])?;
            tx.execute("DELETE FROM protected WHERE operation_id = ?1", [&op_id])?;
            for p in protects {
                let (kind, id) = match p {
                    Protected::Image(id) => ("image", id),
                    Protected::Instance(id) => ("instance", id),
                };
                tx.execute(
                    "INSERT INTO protected (operation_id, kind, resource_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                    args![op_id, kind, id],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn set_operation_state(
        &self,
        op_id: String,
        epoch: i64,
        state: OperationState,
        waiting_for: String,
        failure: String,
        error: String,
    ) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        Self::check_epoch(&tx, &op_id, epoch)?;
        tx.execute(
            "UPDATE operations SET state = ?2, waiting_for = ?3, failure = ?4, error = ?5 WHERE id = ?1",
            args![op_id, state.as_str(), waiting_for, failure, error],
        )?;
        if state.is_finished() {
            tx.execute("DELETE FROM protected WHERE operation_id = ?1", [&op_id])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn add_signal(&self, op_id: String, signal: Signal, requested_by: String) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO signals (operation_id, signal, requested_by, at_ms, consumed_at_ms) VALUES (?1, ?2, ?3, ?4, 0)",
            args![op_id, signal.as_str(), requested_by, now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn pending_signals(&self, op_id: String) -> Result<Vec<(i64, Signal)>, StoreError> {
        let stmt = self.0.prepare("SELECT id, signal FROM signals WHERE operation_id = ?1 AND consumed_at_ms = 0 ORDER BY id")?;
        let rows = stmt.query_map([op_id], |r| Ok((r.get::<i64>(0)?, r.get::<String>(1)?)))?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(id, s)| Ok((id, Signal::parse(&s).ok_or_else(|| corrupt("signals.signal", s))?))).collect()
    }

    pub fn consume_signal(&self, id: i64) -> Result<(), StoreError> {
        self.0.execute("UPDATE signals SET consumed_at_ms = ?2 WHERE id = ?1", args![id, now_ms() as i64])?;
        Ok(())
    }

    pub fn intent(&self, op_id: String, name: String) -> Result<Option<(String, String)>, StoreError> {
        self.0
            .query_row("SELECT token, resource_id FROM intents WHERE operation_id = ?1 AND name = ?2", args![op_id, name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
    }

    pub fn put_intent(&self, op_id: String, epoch: i64, name: String, token: String, resource_id: String) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        Self::check_epoch(&tx, &op_id, epoch)?;
        tx.execute(
            "INSERT INTO intents (operation_id, name, token, resource_id, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(operation_id, name) DO UPDATE SET token = excluded.token, resource_id = excluded.resource_id",
            args![op_id, name, token, resource_id, now_ms() as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn protected_images(&self) -> Result<HashSet<String>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT p.resource_id FROM protected p JOIN operations o ON o.id = p.operation_id
             WHERE p.kind = 'image' AND o.state IN {ACTIVE_SQL}
             UNION SELECT backup_image_id FROM spares UNION SELECT launch_image_id FROM spares"
        ))?;
        stmt.query_map((), |r| r.get::<String>(0))?.collect::<Result<HashSet<_>, _>>()
    }

    // ------------------------------------------------------------ backups

    /// Records a completed backup; recording the same one twice is a no-op
    /// (the step may run again after a restart).
    pub fn record_backup(&self, b: Backup) -> Result<(), StoreError> {
        self.0.execute(
            &format!(
                "INSERT INTO backups ({BACKUP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT(image_id) DO NOTHING"
            ),
            args![
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

    /// A site's backups, newest first, with their copies.
    pub fn backups(&self, site_id: String) -> Result<Vec<Backup>, StoreError> {
        let stmt =
            self.0.prepare(&format!("SELECT {BACKUP_COLS} FROM backups WHERE site_id = ?1 ORDER BY completed_at_ms DESC, image_id"))?;
        let rows = stmt.query_map([&site_id], backup_row)?.collect::<Result<Vec<_>, _>>()?;
        let mut out = rows.into_iter().map(backup_of).collect::<Result<Vec<_>, _>>()?;
        let mut copies: HashMap<String, Vec<Copy>> = HashMap::new();
        for c in self.copies_where(
            "c.source_image_id IN (SELECT image_id FROM backups WHERE site_id = ?1)",
            &[&site_id],
            "c.requested_at_ms DESC, c.region",
        )? {
            copies.entry(c.source_image_id.clone()).or_default().push(c);
        }
        for b in &mut out {
            b.copies = copies.remove(&b.image_id).unwrap_or_default();
        }
        Ok(out)
    }

    pub fn insert_rebuilt_backup(&self, b: Backup) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        tx.execute(
            "INSERT INTO operations (id, kind, site_id, state, error, requested_by, created_at_ms, updated_at_ms,
                 waiting_for, failure, owner, epoch, state_version, wf_state)
             VALUES (?1, 'backup', ?2, 'succeeded', '', 'store rebuild', ?3, ?4, '', '', '', 0, 0, NULL)
             ON CONFLICT(id) DO NOTHING",
            args![b.operation_id, b.site_id, b.started_at_ms as i64, now_ms() as i64],
        )?;
        Db(&tx).record_backup(b)?;
        tx.commit()?;
        Ok(())
    }

    pub fn put_launch_facts(&self, image_id: String, site_id: String, facts: LaunchFacts) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO launch_facts (image_id, site_id, facts, recorded_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(image_id) DO NOTHING",
            args![image_id, site_id, serde_json::to_string(&facts).expect("launch facts serialize"), now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn install_spare(&self, record: SpareRecord) -> Result<Option<SpareRecord>, StoreError> {
        let tx = self.0.transaction()?;
        let db = Db(&tx);
        let previous = db.spare(record.site_id.clone())?.filter(|p| p.instance_id != record.instance_id);
        tx.execute(
            "INSERT INTO spares (site_id, instance_id, backup_image_id, launch_image_id, record) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(site_id) DO UPDATE SET instance_id = ?2, backup_image_id = ?3, launch_image_id = ?4, record = ?5",
            args![
                record.site_id,
                record.instance_id,
                record.backup_image_id,
                record.launch_image_id,
                serde_json::to_string(&record).expect("spare records serialize")
            ],
        )?;
        db.set_instance_role(record.site_id.clone(), record.instance_id.clone(), "spare".into(), String::new(), String::new())?;
        tx.commit()?;
        Ok(previous)
    }

    pub fn spare(&self, site_id: String) -> Result<Option<SpareRecord>, StoreError> {
        let text: Option<String> = self.0.query_row("SELECT record FROM spares WHERE site_id = ?1", [&site_id], |r| r.get(0)).optional()?;
        text.map(|t| serde_json::from_str(&t).map_err(|_| corrupt("spares.record", t))).transpose()
    }

    pub fn spares(&self) -> Result<HashMap<String, SpareRecord>, StoreError> {
        let stmt = self.0.prepare("SELECT record FROM spares")?;
        let rows = stmt.query_map((), |r| r.get::<String>(0))?.collect::<Result<Vec<_>, _>>()?;
        let mut out = HashMap::with_capacity(rows.len());
        for t in rows {
            let rec: SpareRecord = serde_json::from_str(&t).map_err(|_| corrupt("spares.record", t))?;
            out.insert(rec.site_id.clone(), rec);
        }
        Ok(out)
    }

    pub fn claim_spare(&self, site_id: String, instance_id: String, operation_id: String) -> Result<bool, StoreError> {
        let tx = self.0.transaction()?;
        let n = tx.execute("DELETE FROM spares WHERE site_id = ?1 AND instance_id = ?2", args![site_id, instance_id])?;
        if n > 0 {
            Db(&tx).set_instance_role(site_id, instance_id, "candidate".into(), operation_id, String::new())?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    pub fn drop_spare(&self, site_id: String, instance_id: String) -> Result<bool, StoreError> {
        Ok(self.0.execute("DELETE FROM spares WHERE site_id = ?1 AND instance_id = ?2", args![site_id, instance_id])? > 0)
    }

    /// Records (or, for the same operation, replaces) a drill's result.
    pub fn put_drill(&self, record: DrillRecord) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO drills (operation_id, site_id, started_at_ms, finished_at_ms, ok, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(operation_id) DO UPDATE SET finished_at_ms = ?4, ok = ?5, record = ?6",
            args![
                record.operation_id,
                record.site_id,
                record.started_at_ms as i64,
                record.finished_at_ms as i64,
                record.ok,
                serde_json::to_string(&record).expect("drill records serialize")
            ],
        )?;
        Ok(())
    }

    /// A site's drills, newest first.
    pub fn drills(&self, site_id: String, limit: u32) -> Result<Vec<DrillRecord>, StoreError> {
        let stmt = self.0.prepare("SELECT record FROM drills WHERE site_id = ?1 ORDER BY started_at_ms DESC LIMIT ?2")?;
        let rows = stmt.query_map(args![site_id, limit], |r| r.get::<String>(0))?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|t| serde_json::from_str(&t).map_err(|_| corrupt("drills.record", t))).collect()
    }

    pub fn launch_facts(&self, image_id: String) -> Result<Option<LaunchFacts>, StoreError> {
        let text: Option<String> =
            self.0.query_row("SELECT facts FROM launch_facts WHERE image_id = ?1", [&image_id], |r| r.get(0)).optional()?;
        text.map(|t| serde_json::from_str(&t).map_err(|_| corrupt("launch_facts.facts", t))).transpose()
    }

    pub fn put_instance_region(&self, site_id: String, instance_id: String, region: String) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO instance_regions (site_id, instance_id, region) VALUES (?1, ?2, ?3)
             ON CONFLICT(site_id, instance_id) DO UPDATE SET region = excluded.region",
            args![site_id, instance_id, region],
        )?;
        Ok(())
    }

    pub fn instance_regions(&self) -> Result<HashMap<(String, String), String>, StoreError> {
        let stmt = self.0.prepare("SELECT site_id, instance_id, region FROM instance_regions")?;
        let rows = stmt.query_map((), |r| Ok(((r.get::<String>(0)?, r.get::<String>(1)?), r.get::<String>(2)?)))?;
        rows.collect::<Result<HashMap<_, _>, _>>()
    }

    pub fn promote(&self, site_id: String, new: String, old: String, reason: String, region: String) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        tx.execute(
            "UPDATE sites SET primary_instance_id = ?2, region = ?4, updated_at_ms = ?3 WHERE id = ?1",
            args![site_id, new, now_ms() as i64, region],
        )?;
        let db = Db(&tx);
        db.set_instance_role(site_id.clone(), new, "primary".into(), String::new(), String::new())?;
        if !old.is_empty() {
            db.set_instance_role(site_id, old, "fenced".into(), String::new(), reason)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn count_backups(&self) -> Result<u64, StoreError> {
        Ok(self.0.query_row("SELECT COUNT(*) FROM backups", (), |r| r.get::<i64>(0))? as u64)
    }

    pub fn backup_origin(&self, image_id: String) -> Result<Option<(String, String)>, StoreError> {
        self.0
            .query_row("SELECT site_id, operation_id FROM backups WHERE image_id = ?1", [image_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    }

    pub fn set_backup_state(&self, image_id: String, state: BackupState, fate: String) -> Result<(), StoreError> {
        let deleted = if state == BackupState::Deleted { now_ms() as i64 } else { 0 };
        self.0.execute(
            "UPDATE backups SET state = ?2, fate = ?3, deleted_at_ms = ?4 WHERE image_id = ?1",
            args![image_id, state.as_str(), fate, deleted],
        )?;
        Ok(())
    }

    // ------------------------------------------------------------ copies

    pub fn put_copy(&self, c: Copy) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO copies (source_image_id, region, image_id, state, attempts, error, requested_at_ms,
                 completed_at_ms, deleted_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(source_image_id, region) DO UPDATE SET image_id = excluded.image_id,
                 state = excluded.state, attempts = excluded.attempts, error = excluded.error,
                 requested_at_ms = excluded.requested_at_ms, completed_at_ms = excluded.completed_at_ms,
                 deleted_at_ms = excluded.deleted_at_ms",
            args![
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

    fn copies_where(&self, clause: &str, args: &[&dyn sql::ToValue], order: &str) -> Result<Vec<Copy>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT {COPY_COLS} FROM copies c JOIN backups b ON b.image_id = c.source_image_id WHERE {clause} ORDER BY {order}"
        ))?;
        let rows = stmt.query_map(args, copy_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(copy_of).collect()
    }

    pub fn copies_of(&self, source_image_id: String) -> Result<Vec<Copy>, StoreError> {
        self.copies_where("c.source_image_id = ?1", &[&source_image_id], "c.region")
    }

    pub fn unfinished_copies(&self) -> Result<Vec<Copy>, StoreError> {
        self.copies_where("c.state IN ('pending', 'failed')", &[], "c.requested_at_ms, c.region")
    }

    pub fn available_copies_in(&self, site_id: String, region: String) -> Result<Vec<Copy>, StoreError> {
        self.copies_where(
            "b.site_id = ?1 AND c.region = ?2 AND c.state = 'available'",
            &[&site_id, &region],
            "b.completed_at_ms DESC, c.source_image_id",
        )
    }

    // ------------------------------------------------------------ schedules

    pub fn slots(&self) -> Result<HashMap<(String, String), Millis>, StoreError> {
        let stmt = self.0.prepare("SELECT site_id, kind, last_slot_ms FROM schedule_slots")?;
        let rows = stmt.query_map((), |r| Ok(((r.get(0)?, r.get(1)?), r.get::<i64>(2)? as Millis)))?;
        rows.collect::<Result<_, _>>()
    }

    /// Records the last slot handled of a site's schedule of `kind`
    /// (`backup`, `drill`: the operation kind it starts).
    pub fn set_last_slot(&self, site_id: String, kind: String, slot: Millis) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO schedule_slots (site_id, kind, last_slot_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(site_id, kind) DO UPDATE SET last_slot_ms = excluded.last_slot_ms",
            args![site_id, kind, slot as i64],
        )?;
        Ok(())
    }

    // ------------------------------------------------------------ fleet

    /// Every active operation, by site, oldest first, in one query.
    pub fn active_by_site(&self) -> Result<HashMap<String, Vec<ActiveOp>>, StoreError> {
        let stmt = self
            .0
            .prepare(&format!("SELECT site_id, id, kind, state FROM operations WHERE state IN {ACTIVE_SQL} ORDER BY created_at_ms"))?;
        let rows = stmt
            .query_map((), |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<String>(2)?, r.get::<String>(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out: HashMap<String, Vec<ActiveOp>> = HashMap::new();
        for (site, id, kind, state) in rows {
            let state = OperationState::parse(&state).ok_or_else(|| corrupt("operations.state", state.clone()))?;
            out.entry(site).or_default().push(ActiveOp { id, kind, state });
        }
        Ok(out)
    }

    /// Each site's newest good backup (one query).
    pub fn newest_backups(&self) -> Result<HashMap<String, Backup>, StoreError> {
        let stmt = self.0.prepare(&format!(
            "SELECT {BACKUP_COLS} FROM backups b WHERE state = 'available' AND completed_at_ms =
                 (SELECT MAX(completed_at_ms) FROM backups x WHERE x.site_id = b.site_id AND x.state = 'available')"
        ))?;
        let mut out = HashMap::new();
        for row in stmt.query_map((), backup_row)? {
            let b = backup_of(row?)?;
            out.insert(b.site_id.clone(), b);
        }
        Ok(out)
    }

    /// Everything `drctl status` and `/metrics` show, in a fixed number of
    /// queries however many sites.
    pub fn fleet_view(&self) -> Result<FleetView, StoreError> {
        let mut view = FleetView {
            sites: self.sites()?,
            health: self.health_all()?,
            pauses: self.pauses(now_ms())?,
            certs: self.agent_certs()?,
            revocations: self.revocations()?,
            ..FleetView::default()
        };
        let stmt = self.0.prepare(&format!("SELECT {INSTANCE_COLS} FROM instances ORDER BY site_id, last_seen_ms DESC"))?;
        for rec in stmt.query_map((), instance_row)? {
            let rec = rec?;
            view.instances.entry(rec.site_id.clone()).or_default().push(rec);
        }
        view.newest_backup = self.newest_backups()?;
        view.active = self.active_by_site()?;
        let stmt = self.0.prepare("SELECT site_id, state, COUNT(*) FROM backups GROUP BY site_id, state")?;
        let rows =
            stmt.query_map((), |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?)))?.collect::<Result<Vec<_>, _>>()?;
        for (site, state, n) in rows {
            let state = BackupState::parse(&state).ok_or_else(|| corrupt("backups.state", state.clone()))?;
            view.backup_counts.insert((site, state), n as u64);
        }
        let stmt = self.0.prepare(
            "SELECT b.site_id, c.region, c.state, COUNT(*) FROM copies c JOIN backups b ON b.image_id = c.source_image_id
             GROUP BY b.site_id, c.region, c.state",
        )?;
        let rows = stmt
            .query_map((), |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<String>(2)?, r.get::<i64>(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        for (site, region, state, n) in rows {
            let state = CopyState::parse(&state).ok_or_else(|| corrupt("copies.state", state.clone()))?;
            view.copy_counts.insert((site, region, state), n as u64);
        }
        let stmt = self.0.prepare(
            "SELECT site_id, id, state, updated_at_ms FROM operations o WHERE kind = 'failover' AND created_at_ms =
                 (SELECT MAX(created_at_ms) FROM operations x WHERE x.site_id = o.site_id AND x.kind = 'failover')",
        )?;
        let rows = stmt
            .query_map((), |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<String>(2)?, r.get::<i64>(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        for (site, id, state, at) in rows {
            let state = OperationState::parse(&state).ok_or_else(|| corrupt("operations.state", state.clone()))?;
            view.last_failover.insert(site, (id, state, at as u64));
        }
        let stmt = self.0.prepare(
            "SELECT record FROM drills d WHERE started_at_ms = (SELECT MAX(started_at_ms) FROM drills x WHERE x.site_id = d.site_id)",
        )?;
        let rows = stmt.query_map((), |r| r.get::<String>(0))?.collect::<Result<Vec<_>, _>>()?;
        for t in rows {
            let d: DrillRecord = serde_json::from_str(&t).map_err(|_| corrupt("drills.record", t))?;
            view.last_drill.insert(d.site_id.clone(), d);
        }
        view.slots = self.slots()?;
        view.spares = self.spares()?;
        view.refusals = self.agent_refusals(String::new(), now_ms().saturating_sub(REFUSALS_SHOWN_MS))?;
        Ok(view)
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
