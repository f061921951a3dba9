//! Several agents of one site, persisted liveness, and a freeze that does
//! not cover the snapshots: the controller, real agents, moto.

use std::time::Duration;

use dr_tests::*;

fn step<'a>(op: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    op["steps"].as_array().and_then(|s| s.iter().find(|x| x["name"] == name)).unwrap_or(&serde_json::Value::Null)
}

/// The last JSON value drctl printed (with `--wait`, the final operation).
fn last_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .last()
        .unwrap_or_else(|| panic!("no JSON: {}{}", text(&out.stdout), text(&out.stderr)))
}

fn backup(w: &World) -> (bool, serde_json::Value) {
    let out = drctl(&w.pki, &w.controller.url, &["backup", &w.site, "--wait", "--output", "json"]);
    (out.status.success(), last_json(&out))
}

/// After a SIGKILL, an agent seen a moment ago counts as alive (liveness is
/// persisted while it is connected, not only at connect): a resumed quiesce
/// waits for it to reconnect instead of falling back to crash-consistent.
#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_quiesce_waits_for_an_agent_seen_just_before_the_crash() {
    let mut w = World::start_full("prod-1", "200ms", &[], "agent_seen_within = \"3s\"\n[policy]\nquiesce = \"stop\"\n").await;
    let config = std::fs::read_to_string(&w.controller.config).expect("config");
    std::fs::write(&w.controller.config, config.replacen("[server]\n", "[server]\nliveness_flush = \"1s\"\n", 1)).expect("write");
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "step.quiesce.after")]);
    w.wait_agent();
    // Connected (and staying so) well beyond agent_seen_within (3 s) before
    // the crash: a duration the test needs, not a wait for an event.
    assert_quiet_for!(
        Duration::from_secs(5),
        !agent_connected(&w.pki, &w.controller.url, "prod-1"),
        "the agent disconnected:\n{}",
        w.agent.log()
    );
    let out = drctl_json(&w.pki, &w.controller.url, &["backup", "prod-1"]);
    let id = out["operation_id"].as_str().expect("id").to_owned();
    w.controller.proc.as_mut().expect("running").wait_exit(Duration::from_secs(30)).expect("killed at the crash point");
    w.controller.restart(&[]);
    let out = drctl(&w.pki, &w.controller.url, &["operation", &id, "--wait", "--output", "json"]);
    let op = last_json(&out);
    assert_eq!(op["state"], "succeeded", "{op:#}\n{}", w.controller.log());
    let q = step(&op, "quiesce")["detail"].as_str().expect("detail").to_owned();
    assert!(q.contains("stop: done (app-stop)"), "the resumed quiesce reached the agent: {q}");
    let b = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"])["backups"][0].clone();
    assert_eq!(b["consistency"], "application", "{b}");
    // The app was stopped once (the resumed step was answered from the
    // agent's journal) and started again.
    assert_eq!(w.agent.replicatedctl_calls("app stop"), 1);
    assert_eventually!(Duration::from_secs(10), w.agent.replicatedctl_calls("app start") == 1, "app started again");
}

/// The freeze's deadline passes before the snapshots are pending (here
/// CreateImage is held up): the watchdog thaws, the image is of live disks,
/// and the backup must say crash-consistent, not filesystem-consistent.
#[tokio::test(flavor = "multi_thread")]
async fn a_freeze_that_expired_before_the_snapshots_makes_the_backup_crash_consistent() {
    let fs = LoopFs::new(64);
    let agent_toml = format!("[freeze]\nmounts = [\"{}\"]\ndeadline = \"60s\"\n", fs.mount.display());
    let mut w =
        World::start_custom("prod-1", "200ms", &[], "freeze_deadline = \"2s\"\n[policy]\nquiesce = \"freeze\"\n", &agent_toml).await;
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_DELAY_AT", "step.create_image.before=4s")]);
    w.wait_agent();
    let (ok, op) = backup(&w);
    assert!(ok, "{op:#}\n{}", w.controller.log());
    let u = step(&op, "unquiesce")["detail"].as_str().expect("detail").to_owned();
    assert!(u.contains("thawed before the thaw was asked"), "{u}");
    let b = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"])["backups"][0].clone();
    assert_eq!(b["consistency"], "crash", "{b}");
    assert!(b["quiesce_note"].as_str().expect("note").contains("crash-consistent instead"), "{b}");
    assert!(fs.writable_within(Duration::from_secs(5)));
}
