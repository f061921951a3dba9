//! Stores for tests: the same test runs on an SQLite file and on a fresh
//! database of the PostgreSQL server that `DR_TEST_PG` names (tests/run.sh
//! starts one with tests/postgres.sh). Without `DR_TEST_PG` the PostgreSQL
//! half fails, saying so: a test suite that skips one engine silently
//! proves nothing about it.

use std::path::Path;

use super::{Location, PgTarget, Store};

/// The variable naming the test PostgreSQL server (a URL of its
/// `postgres` database).
pub const TEST_PG_ENV: &str = "DR_TEST_PG";

/// The test server, from `DR_TEST_PG`.
pub fn test_server() -> PgTarget {
    let url = std::env::var(TEST_PG_ENV).unwrap_or_else(|_| {
        panic!("{TEST_PG_ENV} is not set: run tests/run.sh, or start a server with `tests/postgres.sh start DIR` and export its URL")
    });
    PgTarget::new(&url, None, None).expect("DR_TEST_PG is a PostgreSQL URL")
}

/// A new, empty PostgreSQL store of its own.
pub async fn postgres() -> Store {
    let name = format!("dr_test_{}", uuid::Uuid::new_v4().simple());
    let server = test_server();
    let target = {
        let (server, name) = (server.clone(), name.clone());
        tokio::task::spawn_blocking(move || server.create_database(&name).map(|()| server.with_dbname(&name)))
            .await
            .expect("create the test database")
            .expect("create the test database")
    };
    Store::open_at(Location::Postgres(Box::new(target))).await.expect("open the PostgreSQL test store")
}

/// An SQLite store in `dir` and a PostgreSQL one: each test runs on both.
pub async fn both(dir: &Path) -> Vec<Store> {
    vec![Store::open(&dir.join("s.db")).await.expect("open the SQLite test store"), postgres().await]
}

/// The same store opened again (a restart of the controller).
pub async fn reopen(store: &Store) -> Store {
    Store::open_at((*store.location).clone()).await.expect("reopen the store")
}
