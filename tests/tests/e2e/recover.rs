//! `dr-agent recover` on a simulated restored machine: the Replicated files
//! still name the old machine's IPs, the app runs, Nomad's state describes a
//! world that is gone, and builds the backup caught half-way still show
//! "running". Afterwards: a started app with the new IPs, empty Nomad state,
//! no stale builds, and the build that started after the backup untouched.

use std::process::Command;

use dr_tests::*;
use serde_json::{Value, json};

const HOST: &str = "ci.example.com";
const TOKEN: &str = "admin-token-0123";
const OLD_PRIVATE: &str = "10.0.0.5";
const OLD_PUBLIC: &str = "54.1.2.3";
const NEW_PRIVATE: &str = "10.0.0.9";
const NEW_PUBLIC: &str = "54.9.9.9";

fn build(num: u64, lifecycle: &str, start: &str) -> Value {
    json!({
        "build_url": format!("https://{HOST}/gh/my-org/my-project/{num}"),
        "build_num": num, "username": "my-org", "reponame": "my-project", "vcs_type": "github",
        "lifecycle": lifecycle, "status": lifecycle, "queued_at": "2024-05-01T10:00:00Z", "start_time": start,
    })
}

struct Machine {
    dir: tempfile::TempDir,
    root: std::path::PathBuf,
    config: std::path::PathBuf,
    deletions: std::path::PathBuf,
    _imds: Imds,
    _api: Proc,
}

/// The instance this machine runs as (the simulated IMDS says so).
const INSTANCE: &str = "i-0123456789abcdef0";

/// The identity record a state_dir captured with the image carries: the
/// instance the image was taken of.
fn seed_identity(m: &Machine, instance: &str) {
    let state = m.dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::write(
        state.join("identity.json"),
        json!({"current": {"instance_id": instance, "boot_id": "00000000-0000-0000-0000-000000000000"}}).to_string(),
    )
    .expect("identity");
}

/// A machine restored from an image of another instance.
fn machine() -> Machine {
    let m = bare_machine();
    seed_identity(&m, "i-0aaaaaaaaaaaaaaaa");
    m
}

fn bare_machine() -> Machine {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = services_machine_root(dir.path(), OLD_PRIVATE, OLD_PUBLIC);
    for i in 0..50 {
        std::fs::write(root.join(format!("opt/nomad/server/raft/snap-{i}")), b"old world").expect("nomad file");
    }
    let instance = Instance { id: INSTANCE.into(), private_ip: NEW_PRIVATE.into(), public_ip: NEW_PUBLIC.into() };
    let imds = Imds::start(dir.path(), &instance, Some(NEW_PUBLIC));
    let builds = json!([
        build(101, "running", "2024-05-01T11:00:00Z"),  // caught half-way: delete
        build(102, "running", "2024-05-01T12:30:00Z"),  // started after the backup: keep
        build(103, "finished", "2024-05-01T10:30:00Z"), // finished: keep
    ]);
    let builds_file = dir.path().join("builds.json");
    std::fs::write(&builds_file, builds.to_string()).expect("builds");
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
    let (api, api_url) = spawn_listening(
        "dr-sim-circleci-api",
        &[
            "--listen",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--builds",
            builds_file.to_str().expect("utf-8"),
            "--unhealthy-file",
            dir.path().join("unhealthy").to_str().expect("utf-8"),
        ],
    );
    let deletions = dir.path().join("deletions");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{state}\"\nroot = \"{root}\"\n\n[imds]\nendpoint = \"{imds}\"\n\n\
             [replicated]\nreplicatedctl = \"{ctl}\"\npoll_interval = \"100ms\"\n\n\
             [circleci]\napi_url = \"{api_url}\"\napi_token_file = \"{token}\"\nhostname = \"{HOST}\"\n\
             dev_console = [\"{console}\", \"--deletions\", \"{deletions}\", \"--known-builds\", \"{builds}\"]\n\
             health_url = \"{api_url}/health-check\"\n",
            state = dir.path().join("state").display(),
            root = root.display(),
            imds = imds.url,
            ctl = bin("dr-sim-replicatedctl").display(),
            token = dir.path().join("token").display(),
            console = bin("dr-sim-dev-console").display(),
            deletions = deletions.display(),
            builds = builds_file.display(),
        ),
    )
    .expect("config");
    Machine { root, config, deletions, _imds: imds, _api: api, dir }
}

fn recover(m: &Machine, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin("dr-agent"));
    aws_env(&mut cmd)
        .args(["recover", "--config"])
        .arg(&m.config)
        .args(["--builds-before", "2024-05-01T12:00:00Z", "--output", "json"])
        .args(extra)
        .env("DR_SIM_STATE_DIR", m.root.join("var/lib/dr-sim"))
        .env("DR_SIM_STOP_SECS", "0.3")
        .env("DR_SIM_START_SECS", "0.3");
    cmd.output().expect("run dr-agent recover")
}

fn snapshot(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for f in ["etc/default/replicated", "etc/default/replicated-operator"] {
        out.push((f.to_owned(), std::fs::read(root.join(f)).expect("read")));
    }
    out.push(("nomad".into(), std::fs::read_dir(root.join("opt/nomad")).expect("dir").count().to_string().into_bytes()));
    out
}

fn app_state(m: &Machine) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(m.root.join("var/lib/dr-sim/replicated.json")).expect("sim state")).expect("json");
    v["state"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn recover_brings_a_restored_machine_back_and_dry_run_changes_nothing() {
    let m = machine();
    let before = snapshot(&m.root);

    // The plan first: nothing changes.
    let out = recover(&m, &["--dry-run"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).expect("json");
    let outcomes: Vec<&str> = plan["steps"].as_array().expect("steps").iter().map(|s| s["outcome"].as_str().expect("o")).collect();
    assert!(outcomes.iter().all(|o| *o == "would do" || *o == "skipped"), "{outcomes:?}\n{plan:#}");
    assert_eq!(snapshot(&m.root), before, "the dry run changed nothing");
    assert!(!m.deletions.exists() || std::fs::read_to_string(&m.deletions).expect("read").is_empty());

    // The real run.
    let out = recover(&m, &["--hostname", HOST]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = report["steps"].as_array().expect("steps").iter().map(|s| s["name"].as_str().expect("n")).collect();
    assert_eq!(names, ["app-stop", "rewrite-addresses", "set-hostname", "wipe-nomad", "app-start", "cleanup-builds"]);

    let replicated = std::fs::read_to_string(m.root.join("etc/default/replicated")).expect("read");
    let operator = std::fs::read_to_string(m.root.join("etc/default/replicated-operator")).expect("read");
    assert!(replicated.contains(&format!("PRIVATE_ADDRESS={NEW_PRIVATE}")), "{replicated}");
    assert!(operator.contains(&format!("DAEMON_ENDPOINT={NEW_PRIVATE}:9879")), "{operator}");
    assert!(operator.contains(&format!("PUBLIC_ADDRESS={NEW_PUBLIC}")), "{operator}");
    assert!(!operator.contains(&format!("={OLD_PRIVATE}")) && !operator.contains(OLD_PUBLIC), "{operator}");
    // NODENAME keeps the old name, and the report says so.
    assert!(operator.contains("NODENAME=ip-10-0-0-5"), "{operator}");
    assert!(report.to_string().contains("NODENAME"), "{report:#}");

    assert_eq!(std::fs::read_dir(m.root.join("opt/nomad")).expect("dir").count(), 0, "empty Nomad state");
    assert_eq!(app_state(&m), "started");
    let deleted = std::fs::read_to_string(&m.deletions).expect("deletions");
    assert_eq!(deleted.lines().collect::<Vec<_>>(), [format!("https://{HOST}/gh/my-org/my-project/101")]);

    assert!(report["evidence"].as_str().unwrap_or_default().contains("restored from instance i-0aaaaaaaaaaaaaaaa"), "{report:#}");

    // Again: this machine is the primary now; recover refuses without --force.
    let out = recover(&m, &[]);
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("already recovered"), "{}", text(&out.stderr));
    // With --force every step is already done.
    let out = recover(&m, &["--force"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let again: Value = serde_json::from_slice(&out.stdout).expect("json");
    for s in again["steps"].as_array().expect("steps") {
        assert!(s["outcome"] == "already done" || s["outcome"] == "skipped", "{s}");
    }
    assert_eq!(std::fs::read_to_string(&m.deletions).expect("deletions").lines().count(), 1);
    let _ = &m.dir;
}

/// `recover` starts the app the way the controller's failover requires:
/// Replicated `started`, then the frontend's health check answering 2xx.
/// An app that never answers healthy fails the runbook at its app start.
#[test]
fn recover_fails_when_the_started_app_does_not_answer_its_health_check() {
    let m = machine();
    std::fs::write(m.dir.path().join("unhealthy"), "").expect("unhealthy");
    let config = std::fs::read_to_string(&m.config).expect("config");
    let config = config.replace("poll_interval = \"100ms\"", "poll_interval = \"100ms\"\napp_timeout = \"3s\"");
    std::fs::write(&m.config, config).expect("config");
    let out = recover(&m, &[]);
    assert_eq!(out.status.code(), Some(1), "{}{}", text(&out.stdout), text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    let steps = report["steps"].as_array().expect("steps");
    let start = steps.iter().find(|s| s["name"] == "app-start").expect("the app start ran");
    assert_eq!(start["outcome"], "failed", "{report:#}");
    assert!(start["summary"].as_str().unwrap_or_default().contains("health check did not pass"), "{report:#}");
    assert!(!steps.iter().any(|s| s["name"] == "cleanup-builds"), "the runbook stops there: {report:#}");
    assert_eq!(app_state(&m), "started", "Replicated started it");
}

#[test]
fn recover_refuses_on_a_machine_that_was_not_restored() {
    // The healthy primary: its identity record names this same instance.
    // Its Replicated files even name its own addresses; Nomad state is live.
    let m = bare_machine();
    for f in ["etc/default/replicated", "etc/default/replicated-operator"] {
        let p = m.root.join(f);
        let t = std::fs::read_to_string(&p).expect("read").replace(OLD_PRIVATE, NEW_PRIVATE).replace(OLD_PUBLIC, NEW_PUBLIC);
        std::fs::write(&p, t).expect("write");
    }
    let raft = || std::fs::read_dir(m.root.join("opt/nomad/server/raft")).expect("dir").count();
    let raft_before = raft();
    for (seed, why) in [(None, "first run"), (Some(INSTANCE), "same instance")] {
        if let Some(i) = seed {
            seed_identity(&m, i);
        }
        let before = snapshot(&m.root);
        let out = recover(&m, &[]);
        assert_eq!(out.status.code(), Some(3), "{why}: {}{}", text(&out.stdout), text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("no evidence this machine was restored") && err.contains("--force"), "{why}: {err}");
        // The simulator writes its state file on the first change only.
        let touched = m.root.join("var/lib/dr-sim/replicated.json").exists();
        assert!(!touched || app_state(&m) == "started", "{why}: the app was not stopped");
        assert_eq!(snapshot(&m.root), before, "{why}: nothing changed");
        assert_eq!(raft(), raft_before, "{why}: Nomad state intact");
    }
    // The dry run says the real run would refuse.
    let out = recover(&m, &["--dry-run"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("the real run would refuse"), "{}", text(&out.stdout));
    // --force: the operator's word.
    let out = recover(&m, &["--force"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(report["evidence"].as_str().unwrap_or_default().starts_with("--force"), "{report:#}");
}

#[test]
fn recover_offline_without_root_is_refused() {
    // No `root` in the configuration: "/" (this machine's own files).
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("state_dir = \"{}\"\n", dir.path().join("state").display())).expect("config");
    let out = Command::new(bin("dr-agent"))
        .args(["recover", "--offline", "--private-ip", "10.0.0.9", "--config"])
        .arg(&config)
        .output()
        .expect("run dr-agent recover");
    assert_eq!(out.status.code(), Some(2), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--offline acts on a mounted disk") && text(&out.stderr).contains("--root"),
        "{}",
        text(&out.stderr)
    );
}
