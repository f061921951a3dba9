//! The store's write throughput for the engine's step records, on each
//! backend: SQLite (WAL, synchronous=FULL) and PostgreSQL (a real server,
//! every transaction fenced by the leader lease, as a leading replica
//! writes). `--operations` operations run at once (the engine drives each
//! on its own task); each writes `--steps` step records with its workflow
//! state, one transaction per write, as the engine does between steps.
//!
//!   target/debug/dr-bench-store                       # 50 operations x 40 steps
//!   DR_TEST_PG=postgres://postgres@127.0.0.1:5432/postgres target/debug/dr-bench-store
//!
//! Without DR_TEST_PG it starts a throw-away PostgreSQL server with
//! tests/postgres.sh (Debian's packages) and stops it at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dr_controller::domain::model::*;
use dr_controller::store::lease::{Leadership, Lease, LeaseTimings};
use dr_controller::store::{Admission, Location, PgTarget, Store};

#[derive(Parser)]
#[command(about = "The store's write throughput for step records, SQLite and PostgreSQL")]
struct Args {
    /// Operations writing at once.
    #[arg(long, default_value_t = 50)]
    operations: usize,
    /// Step records each writes.
    #[arg(long, default_value_t = 40)]
    steps: u32,
}

fn op(i: usize) -> Operation {
    Operation {
        id: format!("op-{i:05}"),
        kind: "failover".into(),
        site_id: format!("s{i:05}"),
        state: OperationState::Running,
        error: String::new(),
        requested_by: "bench".into(),
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
        steps: vec![],
        waiting_for: String::new(),
        failure: String::new(),
        owner: String::new(),
        epoch: 0,
        state_version: 1,
        wf_state: None,
        protects: vec![],
    }
}

/// Writes and reports: (writes per second, p50, p99, max latency).
async fn run(store: Store, args: &Args) -> (f64, Duration, Duration, Duration) {
    for i in 0..args.operations {
        let site = Site { id: format!("s{i:05}"), region: "us-east-1".into(), primary_instance_id: format!("i-{i:017}"), role_arn: None };
        store.upsert_site(site).await.expect("site");
        store.create_operation(op(i), None, |_| Admission::Admit).await.expect("operation");
    }
    let epochs: Vec<i64> = {
        let mut v = Vec::new();
        for i in 0..args.operations {
            v.push(store.claim(format!("op-{i:05}"), "bench".into()).await.expect("claim"));
        }
        v
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, epoch) in epochs.into_iter().enumerate() {
        let (store, steps) = (store.clone(), args.steps);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(steps as usize);
            for seq in 0..steps {
                let rec = StepRecord {
                    seq,
                    name: format!("step-{seq}"),
                    state: StepState::Done,
                    attempts: 1,
                    started_at_ms: now_ms(),
                    finished_at_ms: now_ms(),
                    detail: "launched i-0123456789abcdef0 from ami-0123456789abcdef0 in us-east-1a".into(),
                    error: String::new(),
                    result: Some(serde_json::json!({"instance_id": "i-0123456789abcdef0", "private_ip": "10.0.0.12"})),
                };
                let state = (seq + 1, serde_json::json!({"step": seq, "candidate": "i-0123456789abcdef0"}), vec![]);
                let t = Instant::now();
                store.put_step(format!("op-{i:05}"), epoch, rec, Some(state)).await.expect("put_step");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    let wall = started.elapsed();
    all.sort_unstable();
    let q = |f: f64| all[((all.len() as f64 - 1.0) * f).round() as usize];
    (all.len() as f64 / wall.as_secs_f64(), q(0.5), q(0.99), q(1.0))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("tempdir");
    println!("dr-bench-store: {} operations at once, {} step records each", args.operations, args.steps);

    let sqlite = Store::open(&dir.path().join("state.db")).await.expect("SQLite store");
    let (rate, p50, p99, max) = run(sqlite, &args).await;
    println!("SQLite (WAL, synchronous=FULL): {rate:.0} step writes/s; latency p50 {}, p99 {}, max {}", ms(p50), ms(p99), ms(max));

    let started_here = std::env::var("DR_TEST_PG").is_err();
    let pg_dir = dir.path().join("pg");
    let server = match std::env::var("DR_TEST_PG") {
        Ok(url) => url,
        Err(_) => {
            let out = std::process::Command::new("bash")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/postgres.sh"))
                .arg("start")
                .arg(&pg_dir)
                .output()
                .expect("run tests/postgres.sh");
            assert!(out.status.success(), "tests/postgres.sh start: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    let name = format!("dr_bench_{:016x}", rand::random::<u64>());
    let target = {
        let (server, name) = (server.clone(), name.clone());
        tokio::task::spawn_blocking(move || {
            let t = PgTarget::new(&server, None, None).expect("a PostgreSQL URL");
            t.create_database(&name).expect("create the bench database");
            t.with_dbname(&name)
        })
        .await
        .expect("create database")
    };
    let pg = Store::open_at(Location::Postgres(Box::new(target))).await.expect("PostgreSQL store");
    // As a leading replica writes: every transaction checks the lease.
    let leadership = Leadership::replica("bench".into(), "127.0.0.1:0".into(), LeaseTimings::default());
    let lease = Arc::new(Lease::new(pg.another_session().await.expect("lease session"), leadership.clone()));
    assert!(lease.try_acquire().await.expect("lease").is_some(), "the bench holds the lease");
    pg.fence_with(leadership);
    let holder = {
        let lease = lease.clone();
        tokio::spawn(async move { lease.hold().await })
    };
    let (rate, p50, p99, max) = run(pg, &args).await;
    holder.abort();
    println!(
        "PostgreSQL 15 (local, fsync on, lease-fenced transactions): {rate:.0} step writes/s; latency p50 {}, p99 {}, max {}",
        ms(p50),
        ms(p99),
        ms(max)
    );
    if started_here {
        let _ =
            std::process::Command::new("bash").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/postgres.sh")).arg("stop").arg(&pg_dir).status();
    }
}
