//! One connection, two engines: the store's queries are written once, in
//! the SQL that SQLite and PostgreSQL both accept, and run through [`Conn`]
//! on either.
//!
//! What differs is kept here and nowhere else:
//! - placeholders: queries use SQLite's `?N`; on PostgreSQL they become
//!   `$N` ([`pg_placeholders`]);
//! - values: a parameter is converted to the type PostgreSQL inferred for
//!   it (an `i64` for a `BIGINT`, an `i32` for an `INTEGER`, a `bool` for a
//!   `BOOLEAN`), and a column is read by its declared type, so neither
//!   engine's driver loses or guesses a type: a mismatch is an error naming
//!   the parameter or column and the query;
//! - transactions: [`Conn::transaction`] is `BEGIN` at the outside and a
//!   savepoint inside another transaction, on both engines, so a nested
//!   transaction that is dropped uncommitted undoes only its own writes.
//!
//! The drivers are the maintained ones of each engine: rusqlite (SQLite in
//! process, with `bundled`) and rust-postgres (`postgres`, the blocking
//! client over `tokio-postgres`, which keeps every PostgreSQL type); both
//! run on tokio's blocking pool like the rest of the store.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;

use postgres::types::{ToSql, Type};

use super::StoreError;

/// A value going into or coming out of a query.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// What went wrong in a driver, or between a value and its column.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("{what} in `{sql}`")]
    Type { what: String, sql: String },
    #[error("query returned no rows: `{0}`")]
    NoRows(String),
}

fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                s.push_str(&format!(" ({detail})"));
            }
            s
        }
        None => e.to_string(),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(SqlError::Sqlite(e))
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Sql(SqlError::Postgres(e))
    }
}

fn type_error(what: String, sql: &str) -> StoreError {
    StoreError::Sql(SqlError::Type { what, sql: sql.split_whitespace().collect::<Vec<_>>().join(" ") })
}

/// A Rust value that can be a query's parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8);

impl ToValue for u64 {
    /// Millisecond timestamps and counters: stored as `BIGINT`.
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl ToValue for usize {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

/// A query's parameters: `args![a, b]`, `&[&a as &dyn ToValue]`, `()`.
pub trait Params {
    fn values(self) -> Vec<Value>;
}
impl Params for () {
    fn values(self) -> Vec<Value> {
        Vec::new()
    }
}
impl Params for &[&dyn ToValue] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}
impl<const N: usize> Params for &[&dyn ToValue; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}
impl Params for Vec<Value> {
    fn values(self) -> Vec<Value> {
        self
    }
}
impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}

/// `args![a, b, c]`: the parameters `?1, ?2, ?3` of a query.
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        &[$(&($x) as &dyn $crate::store::sql::ToValue),*][..]
    };
}
pub(crate) use args;

/// A Rust value a column can be read as.
pub trait FromValue: Sized {
    /// `None` when the value does not fit; the caller names the column.
    fn from_value(v: &Value) -> Option<Self>;
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Option<Self> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
int_from_value!(i64, i32, u32, u64, usize, u16, u8);

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Real(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}
impl FromValue for Value {
    fn from_value(v: &Value) -> Option<Self> {
        Some(v.clone())
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One row of a result, read by column index.
pub struct Row<'a> {
    values: Vec<Value>,
    names: &'a [String],
    sql: &'a str,
}

impl Row<'_> {
    /// Column `i` as a `T`; an error names the column, what it holds and
    /// the query when it does not fit (a `NULL` into a non-`Option`, a
    /// negative number into an unsigned, text into a number).
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let v = self.values.get(i).ok_or_else(|| type_error(format!("no column {i}"), self.sql))?;
        T::from_value(v).ok_or_else(|| {
            let name = self.names.get(i).map(String::as_str).unwrap_or("?");
            type_error(format!("column {i} ({name}) holds {v:?}, not a {}", std::any::type_name::<T>()), self.sql)
        })
    }

    /// The whole row, for copying between stores.
    pub fn values(&self) -> &[Value] {
        &self.values
    }
}

pub type SqlResult<T> = Result<T, StoreError>;

/// Which engine a connection talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        })
    }
}

/// A PostgreSQL session with its prepared statements (a statement is
/// prepared once per connection and reused, as rusqlite's cache does).
pub struct PgConn {
    /// Always `Some` but while dropping (see the `Drop` impl).
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    /// A call failed below SQL (the session reset, closed, timed out): the
    /// store opens a new session before the next call.
    failed: bool,
    /// When the session last answered.
    last_used: std::time::Instant,
}

impl PgConn {
    pub fn new(client: postgres::Client) -> Self {
        PgConn { client: Some(client), statements: HashMap::new(), failed: false, last_used: std::time::Instant::now() }
    }

    fn client(&mut self) -> &mut postgres::Client {
        self.client.as_mut().expect("a PostgreSQL client until dropped")
    }

    pub fn is_closed(&self) -> bool {
        self.failed || self.client.as_ref().is_none_or(|c| c.is_closed())
    }

    /// Notes a failure that is not the server's answer to the SQL (which
    /// leaves the session usable) as a lost session.
    fn check<T>(&mut self, r: Result<T, postgres::Error>) -> Result<T, postgres::Error> {
        match &r {
            Err(e) if e.as_db_error().is_none() => self.failed = true,
            // The server ended the session (an administrator, a restart).
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("57P")) => self.failed = true,
            _ => self.last_used = std::time::Instant::now(),
        }
        r
    }

    /// After `idle` without a call, asks the server whether the session is
    /// still there (a database restart or failover ends idle sessions
    /// silently); a session that does not answer is counted as lost.
    fn probe_after(&mut self, idle: std::time::Duration) {
        if self.failed || self.last_used.elapsed() < idle {
            return;
        }
        let alive = self.client().is_valid(std::time::Duration::from_secs(2));
        let _ = self.check(alive);
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let prepared = self.client().prepare(&pg_placeholders(sql));
        let s = self.check(prepared)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

impl Drop for PgConn {
    /// rust-postgres' blocking client closes its session on a runtime of
    /// its own, which panics on a thread that drives tokio tasks (a store
    /// dropped in async code, or with the runtime at shutdown): the client
    /// is dropped on a thread of its own.
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return drop(client);
        }
        let _ = std::thread::Builder::new().name("pg-close".into()).spawn(move || drop(client));
    }
}

enum Backend {
    Sqlite(rusqlite::Connection),
    Pg(Box<RefCell<PgConn>>),
}

/// A connection to either engine. Not shared between threads: the store
/// keeps it behind a mutex and lends it to one call at a time.
pub struct Conn {
    backend: Backend,
    /// Open transactions: 0 outside, 1 in `BEGIN`, more in savepoints.
    depth: Cell<u32>,
}

impl Conn {
    pub fn sqlite(c: rusqlite::Connection) -> Self {
        Conn { backend: Backend::Sqlite(c), depth: Cell::new(0) }
    }

    pub fn postgres(c: PgConn) -> Self {
        Conn { backend: Backend::Pg(Box::new(RefCell::new(c))), depth: Cell::new(0) }
    }

    pub fn engine(&self) -> Engine {
        match self.backend {
            Backend::Sqlite(_) => Engine::Sqlite,
            Backend::Pg(_) => Engine::Postgres,
        }
    }

    /// The SQLite connection (pragmas, `VACUUM INTO`, migrations' version).
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.backend {
            Backend::Sqlite(c) => Some(c),
            Backend::Pg(_) => None,
        }
    }

    /// Whether the PostgreSQL session was lost (the store reconnects
    /// before the next call). A session idle for a second or more is asked
    /// first, so the call after a database restart does not fail on it.
    pub fn is_broken(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(_) => false,
            Backend::Pg(c) => {
                let mut c = c.borrow_mut();
                c.probe_after(std::time::Duration::from_secs(1));
                c.is_closed()
            }
        }
    }

    /// Runs statements without parameters (migrations).
    pub fn batch(&self, sql: &str) -> SqlResult<()> {
        match &self.backend {
            Backend::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Backend::Pg(c) => {
                let mut c = c.borrow_mut();
                let r = c.client().batch_execute(sql);
                Ok(c.check(r)?)
            }
        }
    }

    /// Runs one statement; returns how many rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> SqlResult<usize> {
        let values = params.values();
        match &self.backend {
            Backend::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(values.iter().map(sqlite_value)))?)
            }
            Backend::Pg(c) => {
                let mut c = c.borrow_mut();
                let stmt = c.statement(sql)?;
                let bound = pg_params(&stmt, &values, sql)?;
                let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
                let r = c.client().execute(&stmt, &refs);
                Ok(c.check(r)? as usize)
            }
        }
    }

    /// Runs a query and maps every row with `f`. The rows come back as an
    /// iterator of results, so `collect::<Result<Vec<_>, _>>()` reads them.
    pub fn query_map<T, F>(&self, sql: &str, params: impl Params, mut f: F) -> SqlResult<std::vec::IntoIter<SqlResult<T>>>
    where
        F: FnMut(&Row<'_>) -> SqlResult<T>,
    {
        let values = params.values();
        let mut out = Vec::new();
        match &self.backend {
            Backend::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
                let n = names.len();
                let mut rows = stmt.query(rusqlite::params_from_iter(values.iter().map(sqlite_value)))?;
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for i in 0..n {
                        vals.push(from_sqlite(r.get_ref(i)?));
                    }
                    out.push(f(&Row { values: vals, names: &names, sql }));
                }
            }
            Backend::Pg(c) => {
                let mut c = c.borrow_mut();
                let stmt = c.statement(sql)?;
                let bound = pg_params(&stmt, &values, sql)?;
                let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
                let r = c.client().query(&stmt, &refs);
                let rows = c.check(r)?;
                let names: Vec<String> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
                for r in &rows {
                    let vals = from_pg(r, sql)?;
                    out.push(f(&Row { values: vals, names: &names, sql }));
                }
            }
        }
        Ok(out.into_iter())
    }

    /// The first row of a query, mapped by `f`; an error when there is none.
    pub fn query_row<T, F>(&self, sql: &str, params: impl Params, f: F) -> SqlResult<T>
    where
        F: FnMut(&Row<'_>) -> SqlResult<T>,
    {
        self.query_opt(sql, params, f)?
            .ok_or_else(|| StoreError::Sql(SqlError::NoRows(sql.split_whitespace().collect::<Vec<_>>().join(" "))))
    }

    /// The first row of a query, if there is one, mapped by `f`.
    pub fn query_opt<T, F>(&self, sql: &str, params: impl Params, f: F) -> SqlResult<Option<T>>
    where
        F: FnMut(&Row<'_>) -> SqlResult<T>,
    {
        self.query_map(sql, params, f)?.next().transpose()
    }

    /// A query to run several times (each engine caches its prepared form).
    pub fn prepare(&self, sql: &str) -> SqlResult<Stmt<'_>> {
        Ok(Stmt { conn: self, sql: sql.to_owned() })
    }

    /// Starts a transaction: `BEGIN`, or a savepoint inside an open one.
    /// It rolls back when dropped without [`Tx::commit`].
    pub fn transaction(&self) -> SqlResult<Tx<'_>> {
        let depth = self.depth.get();
        if depth == 0 {
            self.batch("BEGIN")?;
        } else {
            self.batch(&format!("SAVEPOINT dr_{depth}"))?;
        }
        self.depth.set(depth + 1);
        Ok(Tx { conn: self, done: false })
    }
}

/// A query bound to its connection (see [`Conn::prepare`]).
pub struct Stmt<'a> {
    conn: &'a Conn,
    sql: String,
}

impl Stmt<'_> {
    pub fn execute(&self, params: impl Params) -> SqlResult<usize> {
        self.conn.execute(&self.sql, params)
    }

    pub fn query_map<T, F>(&self, params: impl Params, f: F) -> SqlResult<std::vec::IntoIter<SqlResult<T>>>
    where
        F: FnMut(&Row<'_>) -> SqlResult<T>,
    {
        self.conn.query_map(&self.sql, params, f)
    }

    pub fn query_row<T, F>(&self, params: impl Params, f: F) -> SqlResult<T>
    where
        F: FnMut(&Row<'_>) -> SqlResult<T>,
    {
        self.conn.query_row(&self.sql, params, f)
    }
}

/// `query_row(..).optional()`: no row is `None`, as in rusqlite.
pub trait OptionalExt<T> {
    fn optional(self) -> SqlResult<Option<T>>;
}

impl<T> OptionalExt<T> for SqlResult<T> {
    fn optional(self) -> SqlResult<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::Sql(SqlError::NoRows(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An open transaction (see [`Conn::transaction`]); it derefs to its
/// connection.
pub struct Tx<'a> {
    conn: &'a Conn,
    done: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> SqlResult<()> {
        self.done = true;
        let depth = self.conn.depth.get() - 1;
        self.conn.depth.set(depth);
        if depth == 0 { self.conn.batch("COMMIT") } else { self.conn.batch(&format!("RELEASE SAVEPOINT dr_{depth}")) }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let depth = self.conn.depth.get() - 1;
        self.conn.depth.set(depth);
        let undo =
            if depth == 0 { "ROLLBACK".to_owned() } else { format!("ROLLBACK TO SAVEPOINT dr_{depth}; RELEASE SAVEPOINT dr_{depth}") };
        if let Err(e) = self.conn.batch(&undo) {
            // The session is gone (PostgreSQL rolled back with it) or
            // SQLite already rolled back after an error.
            tracing::debug!(error = %e, "rollback");
        }
    }
}

fn sqlite_value(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Null => V::Null,
        Value::Int(i) => V::Integer(*i),
        Value::Real(f) => V::Real(*f),
        Value::Text(s) => V::Text(s.clone()),
        Value::Blob(b) => V::Blob(b.clone()),
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::Int(i),
        V::Real(f) => Value::Real(f),
        V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::Blob(b.to_vec()),
    }
}

type Bound = Box<dyn ToSql + Sync>;

/// Each value as the Rust type of the parameter PostgreSQL inferred.
fn pg_params(stmt: &postgres::Statement, values: &[Value], sql: &str) -> SqlResult<Vec<Bound>> {
    let types = stmt.params();
    if types.len() != values.len() {
        return Err(type_error(format!("{} parameters given, the query has {}", values.len(), types.len()), sql));
    }
    types
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (ty, v))| pg_param(ty, v).ok_or_else(|| type_error(format!("parameter ${} is {ty}, given {v:?}", i + 1), sql)))
        .collect()
}

fn pg_param(ty: &Type, v: &Value) -> Option<Bound> {
    let b: Bound = match (ty, v) {
        (&Type::INT8, Value::Int(i)) => Box::new(*i),
        (&Type::INT8, Value::Null) => Box::new(None::<i64>),
        (&Type::INT4, Value::Int(i)) => Box::new(i32::try_from(*i).ok()?),
        (&Type::INT4, Value::Null) => Box::new(None::<i32>),
        (&Type::INT2, Value::Int(i)) => Box::new(i16::try_from(*i).ok()?),
        (&Type::INT2, Value::Null) => Box::new(None::<i16>),
        (&Type::BOOL, Value::Int(i)) => Box::new(*i != 0),
        (&Type::BOOL, Value::Null) => Box::new(None::<bool>),
        (&Type::FLOAT8, Value::Real(f)) => Box::new(*f),
        (&Type::FLOAT8, Value::Int(i)) => Box::new(*i as f64),
        (&Type::FLOAT8, Value::Null) => Box::new(None::<f64>),
        (&Type::TEXT | &Type::VARCHAR | &Type::BPCHAR | &Type::NAME | &Type::UNKNOWN, Value::Text(s)) => Box::new(s.clone()),
        (&Type::TEXT | &Type::VARCHAR | &Type::BPCHAR | &Type::NAME | &Type::UNKNOWN, Value::Null) => Box::new(None::<String>),
        (&Type::BYTEA, Value::Blob(b)) => Box::new(b.clone()),
        (&Type::BYTEA, Value::Null) => Box::new(None::<Vec<u8>>),
        _ => return None,
    };
    Some(b)
}

fn from_pg(r: &postgres::Row, sql: &str) -> SqlResult<Vec<Value>> {
    let mut out = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into())),
            Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into())),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| Value::Int(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            Type::FLOAT4 => r.try_get::<_, Option<f32>>(i)?.map(|v| Value::Real(v.into())),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
            ref other => return Err(type_error(format!("column {i} ({}) has type {other}: cast it in the query", col.name()), sql)),
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(out)
}

/// The rows of a multi-row `VALUES`: `rows` groups of `casts.len()`
/// numbered placeholders, `(?1, ?2), (?3, ?4)`, each wrapped in `CAST(.. AS
/// T)` where `casts` names a type (PostgreSQL types the parameters of a
/// `VALUES` list as text otherwise).
pub fn values_rows(rows: usize, casts: &[&str]) -> String {
    let cols = casts.len();
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = casts
                .iter()
                .enumerate()
                .map(|(c, cast)| {
                    let n = r * cols + c + 1;
                    if cast.is_empty() { format!("?{n}") } else { format!("CAST(?{n} AS {cast})") }
                })
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `?N` placeholders (SQLite's numbered form, which the queries use) as
/// PostgreSQL's `$N`. Quoted strings and identifiers are left alone.
pub fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut next = 1;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                out.push('$');
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                if digits.is_empty() {
                    out.push_str(&next.to_string());
                    next += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            (None, c) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_dollars_outside_quotes() {
        assert_eq!(pg_placeholders("SELECT a FROM t WHERE b = ?1 AND c = ?12"), "SELECT a FROM t WHERE b = $1 AND c = $12");
        assert_eq!(pg_placeholders("VALUES (?, ?)"), "VALUES ($1, $2)");
        assert_eq!(pg_placeholders("SELECT '?1', \"x?\" WHERE a = ?2"), "SELECT '?1', \"x?\" WHERE a = $2");
    }

    #[test]
    fn sqlite_round_trips_values_and_names_a_misfit() {
        let c = Conn::sqlite(rusqlite::Connection::open_in_memory().expect("sql"));
        c.batch("CREATE TABLE t (a BIGINT NOT NULL, b TEXT, c BLOB)").expect("sql");
        c.execute("INSERT INTO t (a, b, c) VALUES (?1, ?2, ?3)", args![-5_i64, None::<String>, vec![1u8, 2]]).expect("sql");
        let (a, b, blob): (i64, Option<String>, Vec<u8>) =
            c.query_row("SELECT a, b, c FROM t", (), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).expect("sql");
        assert_eq!((a, b, blob), (-5, None, vec![1, 2]));
        let err = c.query_row("SELECT a FROM t", (), |r| r.get::<u64>(0)).expect_err("an error").to_string();
        assert!(err.contains("column 0 (a) holds Int(-5), not a u64"), "{err}");
        assert!(c.query_opt("SELECT a FROM t WHERE a = ?1", [1_i64], |r| r.get::<i64>(0)).expect("sql").is_none());
    }

    #[test]
    fn a_nested_transaction_dropped_undoes_only_its_writes() {
        let c = Conn::sqlite(rusqlite::Connection::open_in_memory().expect("sql"));
        c.batch("CREATE TABLE t (a BIGINT NOT NULL)").expect("sql");
        let outer = c.transaction().expect("sql");
        outer.execute("INSERT INTO t (a) VALUES (1)", ()).expect("sql");
        {
            let inner = outer.transaction().expect("sql");
            inner.execute("INSERT INTO t (a) VALUES (2)", ()).expect("sql");
        }
        outer.commit().expect("sql");
        let all: Vec<i64> = c.query_map("SELECT a FROM t", (), |r| r.get(0)).expect("sql").collect::<Result<_, _>>().expect("sql");
        assert_eq!(all, vec![1]);
    }
}
