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
    let b_dir = w.dir.path().join("b");
    std::fs::create_dir_all(&b_dir).expect("mkdir");
    let spec = ControllerSpec {
        port: 0,
        heartbeat: "1s",
        poll_initial: "200ms",
        sites: vec![(w.site.clone(), w.instance.id.clone())],
        extra: replica_toml(&db, "b"),
        endpoint: None,
        record_into: None,
    };
    let b_config = Controller::write_config(&b_dir, &w.pki, &w.moto, &spec);
    let mut b = Controller::start_standby(&b_dir, b_config, 0);
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
