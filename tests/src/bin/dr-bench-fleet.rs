//! One backup round for many sites through moto behind a throttling proxy.
//! Prints wall time, EC2 calls per site and throttled calls absorbed.
//!
//!   target/debug/dr-bench-fleet                      # 200 sites, 10% throttled
//!   DR_BENCH_SITES=50 DR_BENCH_THROTTLE=0.2 target/debug/dr-bench-fleet
//!
//! A plain binary (built with the workspace) rather than a `cargo bench`
//! target: moto dominates the wall time, and a release build of this crate
//! would rebuild aws-sdk-ec2. Needs DR_MOTO_SERVER (tests/ensure-moto.sh).

use std::time::{Duration, Instant};

use dr_tests::Fleet;

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("DR_BENCH_SITES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let share: f64 = std::env::var("DR_BENCH_THROTTLE").ok().and_then(|v| v.parse().ok()).unwrap_or(0.1);
    let fleet = Fleet::start(n, share, "").await;
    let start = Instant::now();
    let ids = fleet.backup_all().await;
    let ops = fleet.wait_all(&ids, Duration::from_secs(1800)).await;
    let wall = start.elapsed();
    let failed = ops.iter().filter(|o| o.state != "succeeded").count();
    let stats = &fleet.proxy.stats;
    let calls = stats.total_calls();
    let throttled = stats.throttled.load(std::sync::atomic::Ordering::Relaxed);
    println!("fleet backup round: {n} sites, {:.0}% of EC2 requests throttled by the proxy", share * 100.0);
    println!("  wall time:            {:.1} s", wall.as_secs_f64());
    println!("  operations failed:    {failed}");
    println!("  EC2 calls:            {calls} ({:.2} per site)", calls as f64 / n as f64);
    for action in ["CreateImage", "DescribeImages", "CreateTags", "DescribeInstances"] {
        println!("    {action:<18}  {}", stats.calls_of(action));
    }
    println!("  throttled, absorbed:  {throttled}");
    assert_eq!(failed, 0, "a throttled call surfaced as a failed backup");
}
