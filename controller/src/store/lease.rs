//! The leader lease of controllers that share a PostgreSQL store.
//!
//! Two rows: `leader_lease` (holder, address, epoch) and `leader_expiry`
//! (the same holder and epoch, and an expiry computed by the database's
//! clock, `now()`, never a replica's). What each party does with them:
//! - a standby takes the lease when it is free or its expiry has passed,
//!   raising the epoch by one and writing both rows in one transaction (the
//!   row lock orders two standbys: one wins);
//! - the leader renews every `renew_every`, well inside `ttl`, by moving
//!   `leader_expiry` only where it still names it at its epoch and has not
//!   expired. It counts its lease as valid until the instant it *sent* its
//!   last successful renewal plus `ttl` minus `margin`, on its own monotonic
//!   clock: the database's expiry is later than that, whatever the two
//!   clocks say. Past that instant it stops by itself (no EC2 call, no agent
//!   command, no write), before any standby can take the lease;
//! - every transaction of the leader's store first reads `leader_lease`
//!   under a share lock (and the expiry) and is refused unless it is still
//!   the holder at its epoch and the lease has not expired
//!   ([`Leadership`] installed as the store's fence). A takeover's update
//!   of that row waits for those transactions to end, and every transaction
//!   after it sees the new epoch: a deposed leader that wakes up (a stopped
//!   process, a lost session) cannot write. Renewals touch the other row,
//!   so they never wait for the leader's own transactions, however long;
//! - a clean shutdown gives the lease up at once (`holder = ''`).
//!
//! No advisory lock: they are tied to a session, which poolers (PgBouncer,
//! RDS Proxy) share between clients and half-open connections keep alive.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::sql::{Conn, args};
use super::{Store, StoreError};

/// The lease's timings.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTimings {
    /// How long a grant or renewal holds, by the database's clock.
    pub ttl: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How often a standby tries to take a free or expired lease.
    pub poll: Duration,
    /// How much earlier than `ttl` the leader stops counting on its lease
    /// (the time a renewal's request may take to reach the database is
    /// already on the safe side; this covers clock rate differences).
    pub margin: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings::from_ttl(Duration::from_secs(15))
    }
}

impl LeaseTimings {
    /// Renewals every fifth of `ttl`, the local margin a tenth of it (at
    /// least a second), standbys polling every half second.
    pub fn from_ttl(ttl: Duration) -> Self {
        LeaseTimings { ttl, renew_every: ttl / 5, poll: Duration::from_millis(500), margin: (ttl / 10).max(Duration::from_secs(1)) }
    }
}

/// Who holds the lease, as the row says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub address: String,
    pub epoch: i64,
    /// Milliseconds until it expires by the database's clock (negative:
    /// expired).
    pub expires_in_ms: i64,
}

/// What a standby last read of the lease: whom to send clients to, and
/// when that leader's lease ends unless it renews.
#[derive(Clone, Debug, Default)]
pub struct LeaderSeen {
    pub address: String,
    pub epoch: i64,
    pub ends_at: Option<Instant>,
}

impl LeaderSeen {
    pub fn from_row(row: &LeaseRow) -> Self {
        let ends_at = Instant::now() + Duration::from_millis(row.expires_in_ms.max(0) as u64);
        LeaderSeen { address: row.address.clone(), epoch: row.epoch, ends_at: Some(ends_at) }
    }

    /// How long until the lease ends (zero once it has).
    pub fn ends_in(&self) -> Duration {
        self.ends_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()))
    }
}

#[derive(Debug)]
struct Held {
    epoch: i64,
    /// Local instant past which the lease is not counted on.
    valid_until: Instant,
}

/// This replica's view of its leadership; cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    inner: Arc<Inner>,
}

struct Inner {
    /// This replica's id (the row's `holder` while it leads).
    id: String,
    /// Where agents and drctl reach this replica.
    address: String,
    timings: LeaseTimings,
    held: Mutex<Option<Held>>,
    /// Single-controller stores (SQLite): always the leader, epoch 1.
    always: bool,
}

/// Why a leader-only action was refused here.
#[derive(Clone, Debug, thiserror::Error)]
#[error("this controller is not the leader")]
pub struct NotLeader;

impl Leadership {
    /// A controller alone on its store (SQLite, guarded by its file lock).
    pub fn single() -> Self {
        Leadership {
            inner: Arc::new(Inner {
                id: String::new(),
                address: String::new(),
                timings: LeaseTimings::default(),
                held: Mutex::new(None),
                always: true,
            }),
        }
    }

    /// A replica that campaigns for the lease of a shared store.
    pub fn replica(id: String, address: String, timings: LeaseTimings) -> Self {
        Leadership { inner: Arc::new(Inner { id, address, timings, held: Mutex::new(None), always: false }) }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn address(&self) -> &str {
        &self.inner.address
    }

    pub fn timings(&self) -> LeaseTimings {
        self.inner.timings
    }

    /// The epoch this replica leads with, while its lease is valid.
    pub fn epoch(&self) -> Option<i64> {
        if self.inner.always {
            return Some(1);
        }
        let held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().filter(|h| Instant::now() < h.valid_until).map(|h| h.epoch)
    }

    pub fn is_leader(&self) -> bool {
        self.epoch().is_some()
    }

    /// The epoch, or why this replica may not act as the leader now.
    pub fn check(&self) -> Result<i64, NotLeader> {
        self.epoch().ok_or(NotLeader)
    }

    /// Whether this is a replica of a shared store (not a lone controller).
    pub fn is_replica(&self) -> bool {
        !self.inner.always
    }

    fn granted(&self, epoch: i64, sent: Instant) {
        let t = self.inner.timings;
        let valid_until = sent + t.ttl.saturating_sub(t.margin);
        *self.inner.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Held { epoch, valid_until });
    }

    fn drop_lease(&self) {
        *self.inner.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The epoch of the lease last granted, valid or not.
    fn held_epoch(&self) -> Option<i64> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|h| h.epoch)
    }

    /// The local instant the lease stops being counted on.
    pub fn valid_until(&self) -> Option<Instant> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|h| h.valid_until)
    }

    /// The check every transaction of the leader's store makes first: the
    /// row still names this replica at its epoch and has not expired. The
    /// share lock holds a standby's takeover until the transaction ends.
    pub(super) fn fence(&self, tx: &Conn) -> Result<(), StoreError> {
        if self.inner.always {
            return Ok(());
        }
        let epoch = self.check().map_err(|e| StoreError::NotLeader(e.to_string()))?;
        let held = tx.query_opt(
            "SELECT l.epoch FROM leader_lease l JOIN leader_expiry e ON e.id = l.id
             WHERE l.id = 1 AND l.holder = ?1 AND l.epoch = ?2 AND e.expires_at > now() FOR SHARE OF l",
            args![self.inner.id, epoch],
            |r| r.get::<i64>(0),
        )?;
        match held {
            Some(_) => Ok(()),
            None => {
                self.drop_lease();
                Err(StoreError::NotLeader(format!("the lease of epoch {epoch} is no longer this controller's")))
            }
        }
    }
}

const ROW_SQL: &str = "SELECT l.holder, l.address, l.epoch, CAST(EXTRACT(EPOCH FROM (e.expires_at - now())) * 1000 AS BIGINT)
     FROM leader_lease l JOIN leader_expiry e ON e.id = l.id WHERE l.id = 1";

fn read_row(c: &Conn) -> Result<LeaseRow, StoreError> {
    c.query_row(ROW_SQL, (), |r| Ok(LeaseRow { holder: r.get(0)?, address: r.get(1)?, epoch: r.get(2)?, expires_in_ms: r.get(3)? }))
}

/// The lease's operations, on a store session of their own (a lease
/// renewal must not queue behind the engine's calls).
#[derive(Clone)]
pub struct Lease {
    store: Store,
    leadership: Leadership,
}

impl Lease {
    pub fn new(store: Store, leadership: Leadership) -> Self {
        Lease { store, leadership }
    }

    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Who holds the lease now.
    pub async fn current(&self) -> Result<LeaseRow, StoreError> {
        self.store.with(read_row).await
    }

    /// Takes the lease if it is free or expired; the new epoch when won.
    pub async fn try_acquire(&self) -> Result<Option<i64>, StoreError> {
        let (id, address, ttl) = (self.leadership.id().to_owned(), self.leadership.address().to_owned(), self.leadership.timings().ttl);
        let sent = Instant::now();
        let won = self
            .store
            .with(move |c| {
                let seen = read_row(c)?;
                if !seen.holder.is_empty() && seen.expires_in_ms > 0 {
                    return Ok(None);
                }
                let tx = c.transaction()?;
                // Conditional on the epoch seen: of two standbys racing, the
                // second finds the epoch moved (its update re-checks the
                // row the first one wrote) and takes nothing.
                let epoch = tx.query_opt(
                    "UPDATE leader_lease SET holder = ?1, address = ?2, epoch = epoch + 1, acquired_at = now()
                     WHERE id = 1 AND epoch = ?3 AND (holder = '' OR (SELECT expires_at FROM leader_expiry WHERE id = 1) < now())
                     RETURNING epoch",
                    args![id, address, seen.epoch],
                    |r| r.get::<i64>(0),
                )?;
                if let Some(epoch) = epoch {
                    tx.execute(
                        "UPDATE leader_expiry SET holder = ?1, epoch = ?2, expires_at = now() + ?3 * interval '1 millisecond' WHERE id = 1",
                        args![id, epoch, ttl.as_millis() as i64],
                    )?;
                }
                tx.commit()?;
                Ok(epoch)
            })
            .await?;
        if let Some(epoch) = won {
            self.leadership.granted(epoch, sent);
        }
        Ok(won)
    }

    /// Renews the lease; false when it is no longer ours (another replica
    /// took it, or it expired and was taken).
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let Some(epoch) = self.leadership.held_epoch() else {
            return Ok(false);
        };
        let (id, ttl) = (self.leadership.id().to_owned(), self.leadership.timings().ttl);
        let sent = Instant::now();
        let renewed = self
            .store
            .with(move |c| {
                c.execute(
                    "UPDATE leader_expiry SET expires_at = now() + ?3 * interval '1 millisecond'
                     WHERE id = 1 AND holder = ?1 AND epoch = ?2 AND expires_at > now()",
                    args![id, epoch, ttl.as_millis() as i64],
                )
            })
            .await?;
        if renewed == 1 {
            self.leadership.granted(epoch, sent);
            Ok(true)
        } else {
            self.leadership.drop_lease();
            Ok(false)
        }
    }

    /// Gives the lease up at once (a clean shutdown): a standby takes it on
    /// its next poll instead of waiting for the expiry.
    pub async fn release(&self) -> Result<(), StoreError> {
        let Some(epoch) = self.leadership.held_epoch() else {
            return Ok(());
        };
        self.leadership.drop_lease();
        let id = self.leadership.id().to_owned();
        self.store
            .with(move |c| {
                let tx = c.transaction()?;
                tx.execute("UPDATE leader_expiry SET expires_at = now() WHERE id = 1 AND holder = ?1 AND epoch = ?2", args![id, epoch])?;
                tx.execute("UPDATE leader_lease SET holder = '' WHERE id = 1 AND holder = ?1 AND epoch = ?2", args![id, epoch])?;
                tx.commit()
            })
            .await?;
        Ok(())
    }

    /// Waits until this replica holds the lease, polling; `on_standby` is
    /// told who leads meanwhile (for status and logs).
    pub async fn campaign(&self, mut on_standby: impl FnMut(&LeaseRow)) -> i64 {
        let poll = self.leadership.timings().poll;
        let mut last_holder = None;
        loop {
            match self.try_acquire().await {
                Ok(Some(epoch)) => return epoch,
                Ok(None) => match self.current().await {
                    Ok(row) => {
                        if last_holder.as_ref() != Some(&row.holder) {
                            tracing::info!(leader = %row.holder, address = %row.address, epoch = row.epoch, "standby: another controller leads");
                            last_holder = Some(row.holder.clone());
                        }
                        on_standby(&row);
                    }
                    Err(e) => tracing::warn!(error = %e, "standby: cannot read the lease"),
                },
                Err(e) => tracing::warn!(error = %e, "standby: cannot try the lease"),
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Renews until the lease is lost or cannot be renewed before its local
    /// deadline; returns then (the caller stops leading at once).
    pub async fn hold(&self) -> String {
        let every = self.leadership.timings().renew_every;
        loop {
            let Some(until) = self.leadership.valid_until() else {
                return "the lease was taken over".into();
            };
            let next = (Instant::now() + every).min(until);
            tokio::time::sleep_until(next.into()).await;
            if Instant::now() >= until {
                self.leadership.drop_lease();
                return "the lease could not be renewed before its deadline".into();
            }
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.renew()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return "another controller holds the lease now".into(),
                Ok(Err(e)) => tracing::warn!(error = %e, left_ms = left.as_millis() as u64, "cannot renew the lease; trying again"),
                Err(_) => {
                    self.leadership.drop_lease();
                    return "the lease could not be renewed before its deadline".into();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Site;
    use crate::store::testing;

    fn quick() -> LeaseTimings {
        LeaseTimings {
            ttl: Duration::from_millis(1500),
            renew_every: Duration::from_millis(300),
            poll: Duration::from_millis(100),
            margin: Duration::from_millis(300),
        }
    }

    /// A replica on `store`'s database: its fenced store and its lease.
    async fn replica(store: &Store, id: &str) -> (Store, Lease) {
        let own = testing::reopen(store).await;
        let leadership = Leadership::replica(id.into(), format!("{id}:7443"), quick());
        let lease = Lease::new(own.another_session_on_own_thread("dr-lease").await.expect("lease session"), leadership.clone());
        own.fence_with(leadership);
        (own, lease)
    }

    fn site(id: &str) -> Site {
        Site { id: id.into(), region: "us-east-1".into(), primary_instance_id: "i-1".into(), role_arn: None }
    }

    #[tokio::test]
    async fn one_replica_leads_and_a_deposed_one_cannot_write_even_before_it_notices() {
        let db = testing::postgres().await;
        let (a_store, a) = replica(&db, "a").await;
        let (b_store, b) = replica(&db, "b").await;
        assert!(a_store.upsert_site(site("s0")).await.is_err(), "no write before the lease is held");
        assert_eq!(a.try_acquire().await.expect("a tries"), Some(1));
        assert_eq!(b.try_acquire().await.expect("b tries"), None, "a valid lease is not taken");
        a_store.upsert_site(site("s1")).await.expect("the leader writes");
        assert!(b_store.upsert_site(site("s2")).await.is_err(), "a standby does not write");
        assert!(a.renew().await.expect("renew"), "the holder renews");
        assert_eq!(b.current().await.expect("row").holder, "a");

        // `a` stalls (SIGSTOP, a long pause): its lease expires in the
        // database while its own clock still counts on it.
        db.with(|c| c.execute("UPDATE leader_expiry SET expires_at = now() - interval '1 second'", ())).await.expect("expire");
        assert!(a.leadership().is_leader(), "a's local deadline has not passed yet");
        assert_eq!(b.try_acquire().await.expect("b takes over"), Some(2));
        let err = a_store.upsert_site(site("s3")).await.expect_err("the deposed leader's write is refused by the row");
        assert!(matches!(err, StoreError::NotLeader(_)), "{err}");
        assert!(!a.leadership().is_leader(), "a learnt it lost the lease");
        assert!(!a.renew().await.expect("renew"), "a cannot renew a lease it lost");
        b_store.upsert_site(site("s3")).await.expect("the new leader writes");
        assert!(db.site("s3".into()).await.expect("read").is_some());
    }

    #[tokio::test]
    async fn a_leader_that_cannot_renew_stops_before_a_standby_can_win_and_a_release_hands_over_at_once() {
        let db = testing::postgres().await;
        let (_a_store, a) = replica(&db, "a").await;
        let (_b_store, b) = replica(&db, "b").await;
        assert_eq!(a.try_acquire().await.expect("a"), Some(1));
        // `a` never renews: it stops counting on its lease before the
        // database lets `b` take it.
        let started = Instant::now();
        let b_won = {
            let b = b.clone();
            tokio::spawn(async move {
                b.campaign(|_| {}).await;
                Instant::now()
            })
        };
        let a_stopped = loop {
            if !a.leadership().is_leader() {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let b_won = b_won.await.expect("b campaign");
        assert!(a_stopped < b_won, "a stopped at {:?}, b won at {:?}", a_stopped - started, b_won - started);
        assert_eq!(b.leadership().epoch(), Some(2));
        // A clean shutdown of `b` hands over without waiting for the expiry.
        b.release().await.expect("release");
        let t = Instant::now();
        assert_eq!(a.campaign(|_| {}).await, 3);
        assert!(t.elapsed() < Duration::from_millis(1000), "handover took {:?}", t.elapsed());
    }

    #[tokio::test]
    async fn renewals_never_wait_for_the_leaders_own_long_transactions_and_racing_standbys_take_it_once() {
        let db = testing::postgres().await;
        let (a_store, a) = replica(&db, "a").await;
        assert_eq!(a.try_acquire().await.expect("a"), Some(1));
        // A fenced transaction of the leader that takes 2 s holds the
        // lease row's share lock all along.
        let long = tokio::spawn(async move { a_store.with(|c| c.query_row("SELECT 1 FROM pg_sleep(2)", (), |r| r.get::<i64>(0))).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        assert!(a.renew().await.expect("renew"), "renewed");
        assert!(t.elapsed() < Duration::from_millis(1000), "the renewal waited {:?} for the leader's transaction", t.elapsed());
        long.await.expect("join").expect("the long transaction");
        // The lease expires; two standbys race for it: one wins.
        db.with(|c| c.execute("UPDATE leader_expiry SET expires_at = now() - interval '1 second'", ())).await.expect("expire");
        let (_b_store, b) = replica(&db, "b").await;
        let (_c_store, c) = replica(&db, "c").await;
        let (won_b, won_c) = tokio::join!(b.try_acquire(), c.try_acquire());
        let won: Vec<i64> = [won_b.expect("b"), won_c.expect("c")].into_iter().flatten().collect();
        assert_eq!(won, vec![2], "exactly one standby takes the lease, at the next epoch");
    }

    #[tokio::test]
    async fn a_killed_database_session_is_opened_again_and_the_lease_still_fences_it() {
        let db = testing::postgres().await;
        let (a_store, a) = replica(&db, "a").await;
        assert_eq!(a.try_acquire().await.expect("a"), Some(1));
        a_store.upsert_site(site("s1")).await.expect("write");
        let killed = db
            .with(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
                    (),
                    |r| r.get::<i64>(0),
                )
            })
            .await
            .expect("terminate");
        assert!(killed >= 2, "the store's and the lease's sessions were killed ({killed})");
        // pg_terminate_backend only signals: wait until they are gone.
        let others = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let deadline = Instant::now() + Duration::from_secs(10);
        while db.with(move |c| c.query_row(others, (), |r| r.get::<i64>(0))).await.expect("count sessions") > 0 {
            assert!(Instant::now() < deadline, "the killed sessions are still there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first call after the kill fails with the dead session (what
        // it sent may or may not have run); the next one opens a new one.
        let _ = a_store.upsert_site(site("s2")).await;
        let _ = a.renew().await;
        assert!(a.renew().await.expect("renew on a new session"));
        a_store.upsert_site(site("s2")).await.expect("write on a new session");
    }
}
