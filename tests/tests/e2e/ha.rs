//! Controller replicas on one PostgreSQL store (a real server, tests/postgres.sh):
//! one leads, standbys answer with its address, a standby takes over when
//! the leader dies or hands over, and a second controller on one SQLite
//! file refuses to start.

use std::path::Path;
use std::time::{Duration, Instant};

use dr_tests::*;

/// `[store]` of a replica: the shared database, a short lease, metrics.
fn replica_toml(db: &str, id: &str) -> String {
    format!("[store]\nurl = \"{db}\"\nlease_ttl = \"3s\"\nreplica_id = \"{id}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
}

/// Puts `line` first in an agent's config (a top-level key) and restarts it.
fn agent_also_knows(agent: &mut Agent, line: &str) {
    let text = std::fs::read_to_string(&agent.config).expect("agent config");
    std::fs::write(&agent.config, format!("{line}\n{text}")).expect("agent config");
    if let Some(mut p) = agent.proc.take() {
        p.kill();
    }
    agent.restart();
}

/// Replica `b` beside `a` (its config with b's name, a port of its own),
/// started as a standby.
fn second_replica(a: &Controller, dir: &Path) -> Controller {
    std::fs::create_dir_all(dir).expect("mkdir");
    let text = std::fs::read_to_string(&a.config).expect("a's config");
    let b_text = text.replacen(&format!("listen = \"127.0.0.1:{}\"", a.port), "listen = \"127.0.0.1:0\"", 1).replacen(
        "replica_id = \"a\"",
        "replica_id = \"b\"",
        1,
    );
    let config = dir.join("controller.toml");
    std::fs::write(&config, b_text).expect("b's config");
    Controller::start_standby(dir, config, 0)
}

fn leader_status(port: u16) -> String {
    http_get(port, "/leader").lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_from_a_killed_leader_and_agents_and_drctl_follow_the_leader() {
    let db = postgres_database();
    let mut w = World::start_full("prod-1", "200ms", &[], &replica_toml(&db, "a")).await;
    w.wait_agent();
    let a_metrics = w.controller.metrics_port();

    // Replica b on the same database waits as a standby.
    let mut b = second_replica(&w.controller, &w.dir.path().join("b"));
    let b_metrics = b.metrics_port();
    assert!(leader_status(a_metrics).contains("200"), "a leads: {}", http_get(a_metrics, "/leader"));
    let standby = http_get(b_metrics, "/leader");
    assert!(standby.contains("503") && standby.contains(&format!("the leader is at 127.0.0.1:{}", w.controller.port)), "{standby}");
    assert!(http_get(b_metrics, "/metrics").contains("dr_controller_is_leader 0"));
    assert!(http_get(a_metrics, "/metrics").contains("dr_controller_is_leader 1"));

    // drctl pointed at the standby is sent to the leader.
    let out = drctl(&w.pki, &b.url, &["site", &w.site]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("is a standby; asking the leader"), "{}", text(&out.stderr));
    let st = drctl_json(&w.pki, &b.url, &["status"]);
    assert_eq!((st["controller"]["replica_id"].as_str(), st["controller"]["store"].as_str()), (Some("a"), Some("postgresql")), "{st}");

    // The agent knows both; pointed at the standby first, it is sent on.
    let a_url = w.controller.url.clone();
    let text_before = std::fs::read_to_string(&w.agent.config).expect("agent config");
    std::fs::write(
        &w.agent.config,
        text_before.replacen(&format!("controller_url = \"{a_url}\""), &format!("controller_url = \"{}\"", b.url), 1),
    )
    .expect("agent config");
    agent_also_knows(&mut w.agent, &format!("controller_urls = [\"{a_url}\"]"));
    w.wait_agent();
    assert!(w.agent.log().contains("that controller is a standby; going to the leader"), "{}", w.agent.log());

    // The leader dies: b takes over within the lease's TTL and its poll.
    let killed = Instant::now();
    w.controller.kill();
    b.wait_leading(Duration::from_secs(30));
    let takeover = killed.elapsed();
    println!("takeover after SIGKILL of the leader (lease_ttl 3s): {takeover:?}");
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
    assert!(leader_status(b_metrics).contains("200"));
    let st = drctl_json(&w.pki, &b.url, &["status"]);
    assert_eq!(st["controller"]["replica_id"], "b", "{st}");
    assert!(st["controller"]["epoch"].as_i64().is_some_and(|e| e >= 2), "{st}");
    // The agent comes back to the new leader, as the site's primary.
    assert_eventually!(
        Duration::from_secs(30),
        agent_connected(&w.pki, &b.url, &w.site),
        "the agent is back on b as primary; agent log:\n{}\nb's log:\n{}",
        w.agent.log(),
        b.log()
    );

    // a comes back as a standby; a clean stop of b hands over at once.
    let mut a = Controller::start_standby(w.dir.path(), w.controller.config.clone(), w.controller.port);
    let stopped = Instant::now();
    signal(b.proc.as_ref().expect("b runs").child.id(), "TERM");
    a.wait_leading(Duration::from_secs(10));
    let handover = stopped.elapsed();
    println!("takeover after SIGTERM of the leader: {handover:?}");
    assert!(handover < Duration::from_secs(2), "handover took {handover:?}; b's log:\n{}", b.log());
    assert!(b.log().contains("leader lease released"), "{}", b.log());
    assert_eventually!(Duration::from_secs(30), agent_connected(&w.pki, &a.url, &w.site), "the agent is back on a; {}", w.agent.log());
    a.kill();
    b.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_controller_on_one_sqlite_file_refuses_to_start_naming_the_first() {
    let w = World::start("prod-1", "200ms").await;
    let second = w.dir.path().join("second");
    std::fs::create_dir_all(&second).expect("mkdir");
    let out = std::process::Command::new(bin("dr-controller"))
        .arg("--config")
        .arg(&w.controller.config)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run a second controller");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the second controller must not run: {err}");
    let pid = w.controller.proc.as_ref().expect("first runs").child.id();
    assert!(err.contains("is in use by another controller") && err.contains(&format!("pid {pid}")), "{err}");
    assert!(Path::new(&format!("{}.lock", w.dir.path().join("state.db").display())).exists());
    w.wait_agent();
}

/// The leader dies (it exits at a fault point) right after the failover's
/// launch acted and before it was recorded; the standby takes the lease,
/// resumes the failover from its last recorded step and finishes it once:
/// one instance launched (the launch's ClientToken), the old primary
/// stopped, the Elastic IP on the new one, the new agent promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_finishes_a_failover_whose_leader_died_in_the_middle_exactly_once() {
    use dr_tests::recovery_world::*;
    let db = postgres_database();
    let spec = RecoverySpec { controller_toml: replica_toml(&db, "a"), ..Default::default() };
    let mut w = RecoveryWorld::start("ha-fo", spec).await;
    let old = w.instance.id.clone();
    w.wait_primary(&old);
    // a again, set to exit after the launch (it takes its own lease back
    // once the killed process's expires).
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "step.launch.after")]);
    w.wait_primary(&old);
    let mut b = second_replica(&w.controller, &w.dir.path().join("b"));
    // Machines restored from the next backup know both replicas.
    let template = w.disk.join("etc/dr-agent/agent.toml.in");
    let t = std::fs::read_to_string(&template).expect("agent template");
    std::fs::write(&template, format!("controller_urls = [\"{}\"]\n{t}", b.url)).expect("agent template");
    assert_eq!(w.backup()["state"], "succeeded");

    let started = drctl_json(&w.pki, &w.controller.url, &["failover", &w.site, "--yes"]);
    let op = started["operation_id"].as_str().expect("an operation id").to_owned();
    let exited = w.controller.proc.as_mut().expect("a runs").wait_exit(Duration::from_secs(60));
    assert!(exited.is_some(), "a exited after the launch\n{}", w.controller.log());
    let died = Instant::now();
    b.wait_leading(Duration::from_secs(30));
    println!("takeover in the middle of a failover (lease_ttl 3s): {:?}", died.elapsed());
    let resumed = b.log().lines().any(|l| l.contains("resuming operation after a restart") && l.contains(&op));
    assert!(resumed, "b resumed {op}:\n{}", b.log());
    w.controller = b;
    assert_eventually!(
        Duration::from_secs(90),
        !matches!(drctl_json(&w.pki, &w.controller.url, &["operation", &op])["state"].as_str(), Some("running" | "cancelling")),
        "{op} finishes on b\n{}",
        w.controller.log()
    );
    let done = drctl_json(&w.pki, &w.controller.url, &["operation", &op]);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let launched = w.launched_by(&op).await;
    assert_eq!(launched.len(), 1, "one instance launched across the takeover");
    let new = launched[0].instance_id().expect("id").to_owned();
    assert_eq!(w.instance_state(&old).await, "stopped", "the old primary is fenced");
    assert_eq!(w.eip_holder().await, new, "the Elastic IP is on the new instance");
    w.wait_primary(&new);
}

fn recorded_calls(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().lines().count()).sum::<usize>())
        .unwrap_or(0)
}

/// The leader is paused (SIGSTOP) past its lease: a standby takes over.
/// Woken (SIGCONT), the old leader finds the lease taken: it sends no AWS
/// request from then on (its health monitor calls EC2 every second while it
/// leads) and exits, and the new leader keeps leading.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_paused_past_its_lease_wakes_to_find_it_taken_and_sends_nothing() {
    let db = postgres_database();
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let instance = launch_instance(&moto.client().await).await;
    let pki = Pki::new(dir.path());
    let a_calls = dir.path().join("a-calls");
    let spec = |id: &str, record: Option<std::path::PathBuf>| ControllerSpec {
        port: 0,
        heartbeat: "1s",
        poll_initial: "200ms",
        sites: vec![("paused-1".to_owned(), instance.id.clone())],
        extra: format!("{}[health]\ninterval = \"1s\"\n", replica_toml(&db, id)),
        endpoint: None,
        record_into: record,
    };
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).expect("mkdir");
    let mut a = Controller::start(&a_dir, &pki, &moto, &spec("a", Some(a_calls.clone())));
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).expect("mkdir");
    let b_config = Controller::write_config(&b_dir, &pki, &moto, &spec("b", None));
    let mut b = Controller::start_standby(&b_dir, b_config, 0);
    assert_eventually!(Duration::from_secs(20), recorded_calls(&a_calls) > 0, "the leader calls EC2\n{}", a.log());

    let pid = a.proc.as_ref().expect("a runs").child.id();
    signal(pid, "STOP");
    b.wait_leading(Duration::from_secs(30));
    // Past a's local deadline too (its lease is 3 s): then it wakes.
    std::thread::sleep(Duration::from_secs(1));
    let before = recorded_calls(&a_calls);
    signal(pid, "CONT");
    let exited = a.proc.as_mut().expect("a runs").wait_exit(Duration::from_secs(30));
    assert!(exited.is_some_and(|s| !s.success()), "a exits after waking without the lease\n{}", a.log());
    assert_eq!(recorded_calls(&a_calls), before, "no AWS request from a after it woke\n{}", a.log());
    assert!(a.log().contains("stepping down"), "{}", a.log());
    let port = b.metrics_port();
    assert!(http_get(port, "/leader").contains("200"), "b still leads");
    b.kill();
}

/// The leader's database sessions are killed (pg_terminate_backend), then
/// the database restarts. Sampled every 50 ms throughout, never do both
/// replicas say they lead; afterwards one leads and work goes on (a backup).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_session_and_a_database_restart_never_make_two_leaders_and_work_resumes() {
    let pg_home = tempfile::tempdir().expect("tempdir");
    let pg = OwnPostgres::start(&pg_home.path().join("pg"));
    let db = postgres_database_on(&pg.url);
    let mut w = World::start_full("pg-restart", "200ms", &[], &replica_toml(&db, "a")).await;
    w.wait_agent();
    let mut b = second_replica(&w.controller, &w.dir.path().join("b"));
    let ports = [w.controller.metrics_port(), b.metrics_port()];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut samples, mut both) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let leads = ports.map(|p| try_http_get(p, "/leader").is_ok_and(|r| r.starts_with("HTTP/1.1 200")));
                samples += 1;
                if leads[0] && leads[1] {
                    both += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, both)
        })
    };

    let db_name = db.rsplit('/').next().expect("database name").to_owned();
    let kill = format!(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db_name}' AND application_name = 'dr-controller'"
    );
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql").arg(&pg.url).args(["-Atc", sql]).output().expect("psql");
        assert!(out.status.success(), "psql: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    assert_ne!(psql(&kill), "0", "the replicas' sessions were killed");
    std::thread::sleep(Duration::from_secs(2));
    pg.restart();
    // Work goes on: whichever replica leads now takes a backup.
    let urls = [w.controller.url.clone(), b.url.clone()];
    let leader = move || {
        urls.iter()
            .zip(ports)
            .find(|(_, p)| try_http_get(*p, "/leader").is_ok_and(|r| r.starts_with("HTTP/1.1 200")))
            .map(|(u, _)| u.clone())
    };
    assert_eventually!(
        Duration::from_secs(60),
        leader().is_some(),
        "a replica leads after the restart\na:\n{}\nb:\n{}",
        w.controller.log(),
        b.log()
    );
    // A replica that stepped down comes back as a standby (systemd's job here).
    for (c, metrics) in [(&mut w.controller, ports[0]), (&mut b, ports[1])] {
        if c.proc.as_mut().is_some_and(|p| p.child.try_wait().ok().flatten().is_some()) {
            let (dir, config, port) = (c.dir.clone(), c.config.clone(), c.port);
            // The same metrics port as before (the sampler watches it).
            let t = std::fs::read_to_string(&config).expect("config");
            std::fs::write(&config, t.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{metrics}\""), 1))
                .expect("config");
            *c = Controller::start_standby(&dir, config, port);
        }
    }
    let url = leader().expect("a leader");
    assert_eventually!(Duration::from_secs(30), agent_connected(&w.pki, &url, &w.site), "the agent is on the leader\n{}", w.agent.log());
    let out = drctl(&w.pki, &url, &["-o", "json", "backup", &w.site, "--wait"]);
    assert!(out.status.success(), "a backup after the restart: {}{}", text(&out.stdout), text(&out.stderr));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, both) = sampler.join().expect("sampler");
    println!("leadership sampled {samples} times across the kill and the restart; both leading: {both}");
    assert_eq!(both, 0, "two replicas said they lead at the same time");
    assert!(samples > 20, "{samples} samples");
    b.kill();
}
