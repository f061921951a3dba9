//! The freeze window of `quiesce = "freeze"` backups: how long the data file
//! system stays frozen beyond the EC2 calls it has to cover (CreateImage and
//! the wait until the snapshots are pending). Target: under 100 ms.
//!
//!   DR_MOTO_SERVER=.venv/bin/moto_server target/debug/dr-bench-freeze   # 20 backups
//!   DR_BENCH_BACKUPS=50 ...
//!
//! Real parts: moto on loopback, dr-controller, dr-agent, an ext4 file
//! system on a loop device (root needed). Debug builds, like the tests.

use std::time::Duration;

use dr_tests::*;

fn ms(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("DR_BENCH_BACKUPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let fs = LoopFs::new(64);
    let agent_toml = format!("[freeze]\nmounts = [\"{}\"]\ndeadline = \"60s\"\n", fs.mount.display());
    let w = World::start_custom("bench-1", "100ms", &[], "[policy]\nquiesce = \"freeze\"\nkeep_last = 100\n", &agent_toml).await;
    w.wait_agent();
    let mut rows = Vec::new();
    for _ in 0..n {
        let out = drctl(&w.pki, &w.controller.url, &["backup", "bench-1", "--wait", "--output", "json"]);
        let op = last_json(&out.stdout);
        assert_eq!(op["state"], "succeeded", "{op:#}");
        let step = |name: &str| op["steps"].as_array().and_then(|s| s.iter().find(|x| x["name"] == name)).cloned().unwrap_or_default();
        let un = step("unquiesce")["result"].clone();
        rows.push((
            ms(&un["frozen_ms"]),
            ms(&step("create_image")["result"]["call_ms"]),
            ms(&step("wait_snapshots")["result"]["wait_ms"]),
            ms(&un["freeze_overhead_ms"]),
        ));
    }
    let mut overhead: Vec<u64> = rows.iter().map(|r| r.3).collect();
    overhead.sort_unstable();
    let pct = |p: f64| overhead[((overhead.len() - 1) as f64 * p).round() as usize];
    let avg = |i: usize| rows.iter().map(|r| [r.0, r.1, r.2, r.3][i]).sum::<u64>() as f64 / rows.len() as f64;
    println!("freeze window over {n} backups (quiesce = freeze, ext4 on a loop device, moto):");
    println!("  frozen (agent-measured):       mean {:.1} ms", avg(0));
    println!("  CreateImage call:              mean {:.1} ms", avg(1));
    println!("  wait until snapshots pending:  mean {:.1} ms", avg(2));
    println!("  overhead beyond those:         median {} ms, p90 {} ms, max {} ms (target < 100 ms)", pct(0.5), pct(0.9), pct(1.0));
    assert!(fs.writable_within(Duration::from_secs(5)), "thawed at the end");
}
