//! N sites failed over at once (default 50), through the throttling proxy
//! in front of the simulated data plane in front of moto: every site a
//! simulated host with a real agent, every restored machine booted from its
//! backup's disk after a simulated boot delay. Prints wall time, EC2 calls
//! and throttles per failover, how RunInstances was paced, and the
//! orchestration overhead per failover: its duration minus the time spent
//! waiting for the simulated world (boot, agent up, app stop and start) and
//! for the RunInstances bucket.
//!
//!   target/debug/dr-bench-failover
//!   DR_BENCH_SITES=20 DR_BENCH_THROTTLE=0.1 DR_BENCH_BOOT=3s target/debug/dr-bench-failover
//!   DR_BENCH_KIND=drill target/debug/dr-bench-failover   # drills instead (same world, same delays)
//!   DR_BENCH_KIND=spare target/debug/dr-bench-failover   # failovers onto hot spares (`spare = "stopped"`)
//!
//! Also prints the RTO (operation start to the app healthy on the new
//! machine: the end of `app_start`) and the RPO (the backup's age at the
//! start), so a drill and a failover compare like for like.
//!
//! A plain binary like the other benches (moto dominates; a release build
//! of this crate would rebuild aws-sdk-ec2). Needs DR_MOTO_SERVER.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dr_proto::pb;
use dr_tests::*;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn wait_ops(
    client: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    ids: &[String],
    timeout: Duration,
) -> Vec<pb::Operation> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut done = Vec::new();
        for id in ids {
            let op = client.get_operation(pb::OperationRef { operation_id: id.clone() }).await.expect("GetOperation").into_inner();
            if matches!(op.state.as_str(), "running" | "cancelling") {
                break;
            }
            done.push(op);
        }
        if done.len() == ids.len() {
            return done;
        }
        assert!(Instant::now() < deadline, "operations still running after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn step_ms(op: &pb::Operation, names: &[&str]) -> u64 {
    op.steps
        .iter()
        .filter(|s| names.contains(&s.name.as_str()) && s.finished_at_ms >= s.started_at_ms && s.started_at_ms > 0)
        .map(|s| s.finished_at_ms - s.started_at_ms)
        .sum()
}

#[tokio::main]
async fn main() {
    let n: usize = env("DR_BENCH_SITES", 50);
    let kind = std::env::var("DR_BENCH_KIND").unwrap_or_else(|_| "failover".into());
    assert!(["failover", "drill", "spare"].contains(&kind.as_str()), "DR_BENCH_KIND is failover, drill or spare, not `{kind}`");
    let share: f64 = env("DR_BENCH_THROTTLE", 0.1);
    let boot = humantime::parse_duration(&std::env::var("DR_BENCH_BOOT").unwrap_or_else(|_| "3s".into())).expect("DR_BENCH_BOOT");
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let dp = DataPlane::start(&dir.path().join("dataplane"), &moto.url, boot);
    let proxy = throttle::start(&dp.url, share, 7).await;
    let ec2 = ec2_client(&dp.url, REGION);
    let pki = Pki::new(dir.path());
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    // One RunInstances for every site's primary (moto's DescribeImages of
    // its stock AMIs is slow: once).
    let images = ec2.describe_images().owners("amazon").send().await.expect("DescribeImages");
    let ami = images.images().first().and_then(|i| i.image_id()).expect("a stock AMI").to_owned();
    let out = ec2
        .run_instances()
        .image_id(ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Xlarge)
        .min_count(n as i32)
        .max_count(n as i32)
        .send()
        .await
        .expect("RunInstances");
    let primaries: Vec<Instance> = out
        .instances()
        .iter()
        .map(|i| Instance {
            id: i.instance_id().expect("id").to_owned(),
            private_ip: i.private_ip_address().expect("ip").to_owned(),
            public_ip: i.public_ip_address().unwrap_or_default().to_owned(),
        })
        .collect();
    // The frontend's health check every restored machine's agent asks.
    let builds = dir.path().join("builds.json");
    std::fs::write(&builds, "[]").expect("builds");
    let (_api, api_url) = spawn_listening("dr-sim-circleci-api", &["--token", "t", "--builds", &builds.display().to_string()]);
    let agent_extra = format!("[circleci]\nhealth_url = \"{api_url}/health-check\"\n");
    let mut sites = Vec::new();
    for (i, instance) in primaries.into_iter().enumerate() {
        let site = format!("bench-{i:03}");
        let disk_dir = dir.path().join(format!("disk-{i:03}"));
        std::fs::create_dir_all(&disk_dir).expect("mkdir");
        let disk = site_disk(&disk_dir, &pki, &site, &url, &instance, &agent_extra);
        sites.push((site, instance, disk));
    }
    let spec = ControllerSpec {
        port,
        heartbeat: "2s",
        poll_initial: "200ms",
        sites: sites.iter().map(|(s, i, _)| (s.clone(), i.id.clone())).collect(),
        extra: "[failover]\nagent_timeout = \"10m\"\n".into(),
        endpoint: Some(proxy.url.clone()),
        record_into: None,
    };
    let mut controller = Controller::start(dir.path(), &pki, &moto, &spec);
    if kind != "failover" {
        // Every site's [site.drill] (moto's default subnet and group: the
        // drill only needs them to be its own settings), or its spare.
        let subnet = ec2.describe_subnets().send().await.expect("DescribeSubnets").subnets()[0].subnet_id().expect("subnet").to_owned();
        let sg = ec2.describe_security_groups().send().await.expect("DescribeSecurityGroups").security_groups()[0]
            .group_id()
            .expect("sg")
            .to_owned();
        let per_site = if kind == "drill" {
            format!("[site.drill]\nhostname = \"drill.example.com\"\nsubnet_id = \"{subnet}\"\nsecurity_group_ids = [\"{sg}\"]\n")
        } else {
            "[site.policy]\nspare = \"stopped\"\n".to_owned()
        };
        let text = std::fs::read_to_string(&controller.config).expect("config");
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(line);
            out.push('\n');
            if line.starts_with("instance_id = ") {
                out.push_str(&per_site);
            }
        }
        std::fs::write(&controller.config, out).expect("config");
        controller.kill();
        controller.restart(&[]);
    }
    for (_, instance, disk) in &sites {
        dp.adopt(&instance.id, disk).await.expect("adopt");
    }
    let mut client = admin_client(&pki, &url).await;
    let ready = Instant::now();
    loop {
        let s = client.status(pb::StatusRequest { page_size: 1000, ..Default::default() }).await.expect("Status").into_inner();
        if s.summary.as_ref().is_some_and(|x| x.primary_connected as usize == n) {
            break;
        }
        assert!(ready.elapsed() < Duration::from_secs(300), "not every primary connected:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut backups = Vec::new();
    for (site, _, _) in &sites {
        backups.push(
            client.start_backup(pb::StartBackupRequest { site_id: site.clone() }).await.expect("StartBackup").into_inner().operation_id,
        );
    }
    let done = wait_ops(&mut client, &backups, Duration::from_secs(900)).await;
    assert!(done.iter().all(|o| o.state == "succeeded"), "a backup failed");
    let backup_started: HashMap<String, u64> = done.iter().map(|o| (o.site_id.clone(), o.created_at_ms)).collect();
    if kind == "spare" {
        // Every site's spare prepared from this round's backup (and stopped).
        let since = Instant::now();
        loop {
            let s = client.status(pb::StatusRequest { page_size: 1000, ..Default::default() }).await.expect("Status").into_inner();
            let ready = s.sites.iter().filter(|x| x.spare.as_ref().is_some_and(|p| !p.instance_id.is_empty())).count();
            if ready == n {
                println!("{n} spares prepared in {:.1} s", since.elapsed().as_secs_f64());
                break;
            }
            assert!(since.elapsed() < Duration::from_secs(1800), "{ready} of {n} spares prepared:\n{}", controller.log());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    // The backup round spent the account's mutating budget (CreateImage,
    // CreateTags); let it refill as it would have before a real outage, so
    // the fences measure the workflow, not the backup round's debt.
    let refill = Duration::from_secs(env("DR_BENCH_REFILL_SECS", 12));
    tokio::time::sleep(refill).await;
    let calls_before: HashMap<String, u64> = proxy.stats.calls.lock().expect("lock").clone();
    let throttled_before = proxy.stats.throttled.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    let mut ops = Vec::new();
    for (site, _, _) in &sites {
        let id = if kind == "drill" {
            let r = pb::StartDrillRequest { site_id: site.clone(), ..Default::default() };
            client.start_drill(r).await.expect("StartDrill").into_inner().operation_id
        } else {
            // With spares, the default policy takes them (failover_prefers = "spare").
            let r = pb::StartFailoverRequest { site_id: site.clone(), ..Default::default() };
            client.start_failover(r).await.expect("StartFailover").into_inner().operation_id
        };
        ops.push(id);
    }
    let started_all = start.elapsed();
    let done = wait_ops(&mut client, &ops, Duration::from_secs(1800)).await;
    let wall = start.elapsed();
    let failed: Vec<&pb::Operation> = done.iter().filter(|o| o.state != "succeeded").collect();
    let calls_after: HashMap<String, u64> = proxy.stats.calls.lock().expect("lock").clone();
    let throttled = proxy.stats.throttled.load(std::sync::atomic::Ordering::Relaxed) - throttled_before;
    let delta = |a: &str| calls_after.get(a).copied().unwrap_or(0) - calls_before.get(a).copied().unwrap_or(0);
    let total: u64 = calls_after.values().sum::<u64>() - calls_before.values().sum::<u64>();

    let mut rtos = Vec::new();
    let mut rpos = Vec::new();
    for op in &done {
        let healthy = op.steps.iter().find(|s| s.name == "app_start").map(|s| s.finished_at_ms).unwrap_or(0);
        rtos.push(healthy.saturating_sub(op.created_at_ms));
        // The data's point in time is its backup's start.
        if let Some(b) = backup_started.get(&op.site_id) {
            rpos.push(op.created_at_ms.saturating_sub(*b));
        }
    }
    let mut overheads = Vec::new();
    let mut launch_waits = Vec::new();
    let mut durations = Vec::new();
    for op in &done {
        let end = op.steps.iter().map(|s| s.finished_at_ms).max().unwrap_or(op.updated_at_ms);
        let total_ms = end.saturating_sub(op.created_at_ms);
        let simulated = step_ms(op, &["wait_running", "wait_agent", "app_stop", "app_start"]);
        let launch = step_ms(op, &["launch"]);
        durations.push(total_ms);
        launch_waits.push(launch);
        overheads.push(total_ms.saturating_sub(simulated + launch));
    }
    let stats = |v: &mut Vec<u64>| {
        v.sort_unstable();
        let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        (mean / 1000.0, v.get(v.len() * 95 / 100).copied().unwrap_or(0) as f64 / 1000.0, v.last().copied().unwrap_or(0) as f64 / 1000.0)
    };
    let (d_mean, d_p95, d_max) = stats(&mut durations);
    let (o_mean, o_p95, o_max) = stats(&mut overheads);
    let (l_mean, _, l_max) = stats(&mut launch_waits);
    let (r_mean, r_p95, r_max) = stats(&mut rtos);
    let (p_mean, _, p_max) = stats(&mut rpos);
    let mut per_step: Vec<(String, f64, f64)> = done[0]
        .steps
        .iter()
        .map(|s| {
            let mut v: Vec<u64> = done.iter().map(|op| step_ms(op, &[s.name.as_str()])).collect();
            let (mean, _, max) = stats(&mut v);
            (s.name.clone(), mean, max)
        })
        .collect();
    per_step.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "{n} {} at once: boot delay {boot:?}, app stop/start 0.5 s each, {:.0}% of EC2 requests throttled, started {refill:?} after the backup round",
        match kind.as_str() {
            "spare" => "failovers onto hot spares",
            "drill" => "drills",
            _ => "failovers",
        },
        share * 100.0
    );
    println!("  RTO (start to app healthy): mean {r_mean:.1} s, p95 {r_p95:.1} s, max {r_max:.1} s");
    println!("  RPO (backup age at start):  mean {p_mean:.1} s, max {p_max:.1} s");
    println!("  all started in:       {:.2} s", started_all.as_secs_f64());
    println!("  wall time:            {:.1} s", wall.as_secs_f64());
    println!("  failed:               {}", failed.len());
    println!("  per operation:        mean {d_mean:.1} s, p95 {d_p95:.1} s, max {d_max:.1} s");
    println!(
        "  orchestration:        mean {o_mean:.2} s, p95 {o_p95:.2} s, max {o_max:.2} s (beyond boot, agent, app and the RunInstances bucket)"
    );
    println!("  RunInstances bucket:  mean wait {l_mean:.1} s, max {l_max:.1} s; {} RunInstances calls", delta("RunInstances"));
    println!(
        "  EC2 calls:            {total} ({:.1} per failover), throttled and absorbed {throttled} ({:.1} per failover)",
        total as f64 / n as f64,
        throttled as f64 / n as f64
    );
    let mut actions: Vec<(&String, u64)> = calls_after.keys().map(|a| (a, delta(a))).filter(|(_, c)| *c > 0).collect();
    actions.sort_by_key(|a| std::cmp::Reverse(a.1));
    for (a, c) in actions {
        println!("    {a:<22} {c}");
    }
    println!("  by step (mean / max):");
    for (name, mean, max) in &per_step {
        println!("    {name:<22} {mean:>6.2} s / {max:>6.2} s");
    }
    if let Some(slowest) = done.iter().max_by_key(|op| step_ms(op, &["fence"])) {
        println!(
            "  slowest fence: {} {}",
            slowest.id,
            slowest.steps.iter().find(|s| s.name == "fence").map(|s| s.detail.as_str()).unwrap_or("")
        );
    }
    if std::env::var("DR_BENCH_KEEP").is_ok() {
        println!("  kept: {}", dir.keep().display());
        return;
    }
    for op in &failed {
        println!("  FAILED {} {}: {} {}", op.site_id, op.id, op.state, op.waiting_for);
    }
    controller.kill();
    if kind == "spare" {
        let taken = done.iter().filter(|o| o.steps.iter().any(|s| s.name == "launch" && s.detail.contains("took the hot spare"))).count();
        println!("  failovers onto a spare: {taken} of {n}");
    }
    assert!(failed.is_empty(), "a {kind} did not succeed");
}
