//! Each quiesce level end to end: controller, agent, moto, the simulated
//! machine, and a real ext4 file system on a loop device for freezes.

use std::time::Duration;

use dr_tests::*;

fn step<'a>(op: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    op["steps"].as_array().and_then(|s| s.iter().find(|x| x["name"] == name)).unwrap_or(&serde_json::Value::Null)
}

/// The words of a step detail (split on anything but letters, digits and `_`).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '_').filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

fn backup(w: &World) -> (bool, serde_json::Value) {
    let out = drctl(&w.pki, &w.controller.url, &["backup", &w.site, "--wait", "--output", "json"]);
    let op = json_lines(&out.stdout)
        .pop()
        .unwrap_or_else(|| panic!("no JSON: {}{}\n{}", text(&out.stdout), text(&out.stderr), w.controller.log()));
    (out.status.success(), op)
}

fn newest_backup(w: &World) -> serde_json::Value {
    drctl_json(&w.pki, &w.controller.url, &["backups", &w.site])["backups"][0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn freeze_covers_create_image_and_thaws_before_the_ami_is_available() {
    let fs = LoopFs::new(64);
    let agent_toml = format!("[freeze]\nmounts = [\"{}\"]\ndeadline = \"60s\"\n", fs.mount.display());
    let w = World::start_custom("prod-1", "200ms", &[], "[policy]\nquiesce = \"freeze\"\n", &agent_toml).await;
    w.wait_agent();
    let (ok, op) = backup(&w);
    assert!(ok, "{op:#}\n{}", w.agent.log());
    // Order: frozen before CreateImage, thawed once the snapshots were
    // pending, before the AMI was available.
    let (q, c, u, a) = (step(&op, "quiesce"), step(&op, "create_image"), step(&op, "unquiesce"), step(&op, "wait_available"));
    assert!(q["detail"].as_str().expect("detail").contains("freeze: done"), "{q}");
    assert!(at(&q["finished_at"]) <= at(&c["started_at"]));
    assert!(at(&u["finished_at"]) <= at(&a["finished_at"]));
    // The thaw is named as a word ("thaw: done", not e.g. "thawed" by someone else).
    assert!(words(u["detail"].as_str().expect("detail")).iter().any(|w| w == "thaw"), "{u}");
    let b = newest_backup(&w);
    assert_eq!(b["consistency"], "filesystem");
    assert_eq!(b["quiesce"], "freeze");
    assert!(b["frozen_ms"].as_u64().expect("frozen_ms") > 0, "{b}");
    assert!(fs.writable_within(Duration::from_secs(5)), "thawed after the backup");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_while_frozen_still_ends_thawed() {
    let fs = LoopFs::new(64);
    let agent_toml = format!("[freeze]\nmounts = [\"{}\"]\ndeadline = \"60s\"\n", fs.mount.display());
    let mut w = World::start_custom("prod-1", "200ms", &[], "[policy]\nquiesce = \"freeze\"\n", &agent_toml).await;
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "backup.after_create_image")]);
    w.wait_agent();
    let out = drctl_json(&w.pki, &w.controller.url, &["backup", "prod-1"]);
    let op = out["operation_id"].as_str().expect("id").to_owned();
    w.controller.proc.as_mut().expect("running").wait_exit(Duration::from_secs(30)).expect("killed at the crash point");
    // CreateImage ran while the file system was frozen: it still is.
    assert!(!fs.writable_within(Duration::from_millis(500)), "frozen during CreateImage");
    // The restarted controller resumes and lifts the freeze long before the
    // watchdog's 60 s deadline.
    w.controller.restart(&[]);
    w.wait_agent();
    assert_eventually!(
        Duration::from_secs(30),
        drctl_json(&w.pki, &w.controller.url, &["operation", &op])["state"] == "succeeded",
        "the backup completes after the restart\n{}",
        w.controller.log()
    );
    assert!(fs.writable_within(Duration::from_secs(5)));
    assert_eq!(images_tagged(&w.moto.client().await, "dr:operation", &op).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_undrains_the_builders_afterwards() {
    let fs = LoopFs::new(64);
    let (_nomad, nomad_url) = spawn_listening("dr-sim-nomad", &["--nodes", "2", "--allocs-per-node", "1", "--alloc-secs", "0.5"]);
    let agent_toml =
        format!("[freeze]\nmounts = [\"{}\"]\n\n[nomad]\napi_url = \"{nomad_url}\"\ndrain_deadline = \"20s\"\n", fs.mount.display());
    let w = World::start_custom("prod-1", "200ms", &[], "[policy]\nquiesce = \"drain\"\n", &agent_toml).await;
    w.wait_agent();
    let (ok, op) = backup(&w);
    assert!(ok, "{op:#}\n{}", w.agent.log());
    assert!(step(&op, "quiesce")["detail"].as_str().expect("detail").contains("drain, freeze"), "{op:#}");
    assert!(
        step(&op, "unquiesce")["detail"]
            .as_str()
            .expect("detail")
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .any(|w| w == "undrain"),
        "{op:#}"
    );
    let nodes: serde_json::Value = serde_json::from_str(&http_get(&nomad_url, "/v1/nodes")).expect("nodes json");
    for n in nodes.as_array().expect("nodes") {
        assert_eq!(n["Drain"], false, "{n}");
        assert_eq!(n["SchedulingEligibility"], "eligible", "{n}");
    }
    assert_eq!(newest_backup(&w)["consistency"], "filesystem");
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_starts_the_app_again_also_when_a_later_step_fails() {
    let mut w = World::start_custom("prod-1", "200ms", &[], "[policy]\nquiesce = \"stop\"\n", "").await;
    w.wait_agent();
    let (ok, op) = backup(&w);
    assert!(ok, "{op:#}");
    assert_eq!(newest_backup(&w)["consistency"], "application");
    assert_eq!(w.agent.replicatedctl_calls("app stop"), 1);
    assert_eq!(w.agent.replicatedctl_calls("app start"), 1);

    // CreateImage fails after the app was stopped: the app is started again.
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_FAIL_AT", "create_image")]);
    w.wait_agent();
    let (ok, op) = backup(&w);
    assert!(!ok, "the backup fails");
    assert_eq!(op["state"], "failed");
    assert!(words(op["error"].as_str().expect("error")).iter().any(|w| w == "create_image"), "{op:#}");
    assert_eq!(step(&op, "unquiesce")["state"], "done", "{op:#}");
    assert_eq!(w.agent.replicatedctl_calls("app stop"), 2);
    assert_eq!(w.agent.replicatedctl_calls("app start"), 2);
    let status = site_status(&w.pki, &w.controller.url, "prod-1");
    assert_eq!(status["agent"]["app_state"], "started", "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_freeze_falls_back_to_crash_consistent_and_says_so() {
    // No mounts configured on the agent: the freeze is refused.
    let w = World::start_custom("prod-1", "200ms", &[], "[policy]\nquiesce = \"freeze\"\n", "").await;
    w.wait_agent();
    let (ok, op) = backup(&w);
    assert!(ok, "{op:#}");
    assert!(step(&op, "quiesce")["detail"].as_str().expect("detail").contains("falling back to a crash-consistent"), "{op:#}");
    let b = newest_backup(&w);
    assert_eq!(b["consistency"], "crash");
    assert!(b["quiesce_note"].as_str().expect("note").contains("freeze failed"), "{b}");
}

fn at(v: &serde_json::Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(v.as_str().expect("a time"), &time::format_description::well_known::Rfc3339).expect("RFC 3339")
}

fn http_get(base: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}
