//! `dr-agent app-stop`, `app-start` and `set-hostname` against the simulated
//! replicatedctl (real binaries, a temporary services-machine root).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dr_tests::{bin, services_machine_root, text};

#[derive(Clone, Copy, Debug)]
enum Layout {
    Debian,
    Rhel,
}

struct Machine {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Machine {
    /// A root in `layout`, an agent config pointing at `replicatedctl`
    /// (default: the simulator), `extra` appended to `[replicated]`.
    fn new(layout: Layout, replicatedctl: Option<&Path>, extra: &str, env: &[(&str, &str)]) -> Machine {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = services_machine_root(dir.path(), "10.0.0.5", "35.0.0.5");
        if let Layout::Rhel = layout {
            std::fs::create_dir_all(root.join("etc")).expect("mkdir");
            std::fs::rename(root.join("etc/default"), root.join("etc/sysconfig")).expect("RHEL layout");
        }
        let rc = replicatedctl.map(Path::to_owned).unwrap_or_else(|| bin("dr-sim-replicatedctl"));
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nroot = \"{}\"\n\n[replicated]\nreplicatedctl = \"{}\"\npoll_interval = \"100ms\"\n{extra}",
                dir.path().join("state").display(),
                root.display(),
                rc.display()
            ),
        )
        .expect("write config");
        let mut all = vec![("DR_SIM_STATE_DIR".to_owned(), root.join("var/lib/dr-sim").display().to_string())];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Machine { _dir: dir, root, config, env: all }
    }

    fn agent(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("dr-agent"));
        cmd.args(args).arg("--config").arg(&self.config);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "info").output().expect("run dr-agent")
    }

    fn agent_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.agent(&all);
        assert!(out.status.success(), "dr-agent {args:?} failed: {}\n{}", text(&out.stderr), text(&out.stdout));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out.stdout)))
    }

    /// What the simulator says now (not through dr-agent).
    fn sim(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(bin("dr-sim-replicatedctl"));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.args(args).output().expect("run the simulator");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    fn status(&self) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.sim(&["app", "status"])).expect("status JSON");
        v[0].clone()
    }

    fn calls(&self, args: &str) -> usize {
        dr_tests::replicatedctl_calls(&self.root, args)
    }
}

#[test]
fn stop_and_start_wait_for_the_state_and_are_idempotent() {
    for layout in [Layout::Debian, Layout::Rhel] {
        let m = Machine::new(layout, None, "", &[("DR_SIM_STOP_SECS", "1.5"), ("DR_SIM_START_SECS", "1")]);

        let t = Instant::now();
        let r = m.agent_json(&["app-stop"]);
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(1500), "{layout:?}: reported stopped after {took:?}, before the transition ended");
        assert_eq!(r["previous_state"], "started", "{r}");
        assert_eq!(r["final_state"], "stopped", "{r}");
        assert_eq!(r["already"], false);
        assert!(r["elapsed_ms"].as_u64().expect("elapsed") >= 1500, "{r}");
        assert!(r["polls"].as_u64().expect("polls") >= 2, "it polled through `stopping`: {r}");
        // What the simulator says right after the report.
        let s = m.status();
        assert_eq!((s["State"].as_str(), s["IsTransitioning"].as_bool()), (Some("stopped"), Some(false)), "{s}");
        assert_eq!(m.calls("app stop"), 1);

        // Again: already stopped, no `app stop` call.
        let out = m.agent(&["app-stop"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("already stopped"), "{}", text(&out.stdout));
        assert_eq!(m.calls("app stop"), 1, "{layout:?}: an already stopped app got another `app stop`");

        let t = Instant::now();
        let r = m.agent_json(&["app-start"]);
        assert!(t.elapsed() >= Duration::from_secs(1), "{layout:?}: started reported too early");
        assert_eq!((r["previous_state"].as_str(), r["final_state"].as_str()), (Some("stopped"), Some("started")), "{r}");
        assert_eq!(m.status()["State"], "started");
        let r = m.agent_json(&["app-start"]);
        assert_eq!(r["already"], true, "{r}");
        assert_eq!(m.calls("app start"), 1);

        // Dry run: says what it would do, does nothing.
        let out = m.agent(&["app-stop", "--dry-run"]);
        assert!(out.status.success() && text(&out.stdout).contains("would be stopped"), "{}", text(&out.stdout));
        assert_eq!(m.calls("app stop"), 1);
        assert_eq!(m.status()["State"], "started");
    }
}

#[test]
fn a_stop_slower_than_the_timeout_is_an_error_naming_the_state() {
    let m = Machine::new(Layout::Debian, None, "app_timeout = \"1s\"\n", &[("DR_SIM_STOP_SECS", "6")]);
    let t = Instant::now();
    let out = m.agent(&["app-stop"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(t.elapsed() < Duration::from_secs(5), "the timeout was not kept: {:?}", t.elapsed());
    let err = text(&out.stderr);
    assert!(err.contains("did not reach State `stopped`") && err.contains("stopping"), "{err}");
    assert_eq!(m.status()["State"], "stopping");
}

#[test]
fn unknown_states_and_failing_status_calls_are_waited_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A replicatedctl that shows the transition as a State nobody documented
    // and whose 2nd and 3rd `app status` fail.
    let wrapper = dir.path().join("replicatedctl");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$*\" = \"app status\" ]; then\n  n=$(cat {d}/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/n\n  \
             if [ $n -eq 2 ] || [ $n -eq 3 ]; then echo 'Error: daemon busy' >&2; exit 1; fi\nfi\n\
             out=$({sim} \"$@\") || exit $?\n[ -n \"$out\" ] && printf '%s\\n' \"$out\" | sed 's/\"State\":\"stopping\"/\"State\":\"quiescing\"/'\nexit 0\n",
            d = dir.path().display(),
            sim = bin("dr-sim-replicatedctl").display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let m = Machine::new(Layout::Debian, Some(&wrapper), "", &[("DR_SIM_STOP_SECS", "1.5")]);
    let t = Instant::now();
    let r = m.agent_json(&["app-stop"]);
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert_eq!(r["final_state"], "stopped", "{r}");
    assert_eq!(r["unknown_states"], serde_json::json!(["quiescing"]), "{r}");
    assert_eq!(m.status()["State"], "stopped");
}

#[test]
fn set_hostname_sets_and_applies_once_and_dry_run_changes_nothing() {
    for layout in [Layout::Debian, Layout::Rhel] {
        let m = Machine::new(layout, None, "", &[("DR_SIM_HOSTNAME", "old.example.com"), ("DR_SIM_START_SECS", "0.2")]);
        let export = || -> serde_json::Value { serde_json::from_str(&m.sim(&["app-config", "export"])).expect("export JSON") };

        let out = m.agent(&["set-hostname", "--hostname", "ci.new.example.com", "--dry-run"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("old.example.com -> ci.new.example.com"), "{}", text(&out.stdout));
        assert_eq!((m.calls("app-config set hostname --value ci.new.example.com"), m.calls("app apply-config")), (0, 0));
        assert_eq!(export()["hostname"]["value"], "old.example.com");

        let r = m.agent_json(&["set-hostname", "--hostname", "ci.new.example.com"]);
        assert_eq!((r["old"].as_str(), r["new"].as_str()), (Some("old.example.com"), Some("ci.new.example.com")), "{r}");
        assert_eq!((r["changed"].as_bool(), r["applied"].as_bool()), (Some(true), Some(true)), "{r}");
        let actions = r["actions"].to_string();
        assert!(actions.contains("OAuth") && actions.contains("https://ci.new.example.com/"), "{r}");
        assert_eq!(export()["hostname"]["value"], "ci.new.example.com");
        assert_eq!((m.calls("app-config set hostname --value ci.new.example.com"), m.calls("app apply-config")), (1, 1));

        let out = m.agent(&["set-hostname", "--hostname", "ci.new.example.com"]);
        assert!(out.status.success() && text(&out.stdout).contains("already set"), "{layout:?}: {}", text(&out.stdout));
        assert_eq!((m.calls("app-config set hostname --value ci.new.example.com"), m.calls("app apply-config")), (1, 1));

        // Bad input: exit 2, nothing asked of replicatedctl.
        for bad in ["https://ci.example.com", "ci example.com", "ci.example.com/x", "\"); (x"] {
            let before = std::fs::read_to_string(m.root.join("var/lib/dr-sim/calls.log")).unwrap_or_default();
            let out = m.agent(&["set-hostname", "--hostname", bad]);
            assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out.stderr));
            assert_eq!(std::fs::read_to_string(m.root.join("var/lib/dr-sim/calls.log")).unwrap_or_default(), before);
        }
    }
}

#[test]
fn the_hostname_item_is_configurable_and_a_missing_item_is_named() {
    let m = Machine::new(Layout::Debian, None, "hostname_item = \"circle_hostname\"\n", &[]);
    let out = m.agent(&["set-hostname", "--hostname", "ci.example.org"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("circle_hostname") && err.contains("hostname_item") && err.contains("hostname"), "{err}");
    assert_eq!(m.calls("app apply-config"), 0);
    // The item exists with extra fields and no "value" yet: it is set.
    m.sim(&["app", "status"]);
    let state_file = m.root.join("var/lib/dr-sim/replicated.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).expect("sim state")).expect("JSON");
    state["app_config"]["circle_hostname"] = serde_json::json!({"type": "text", "default": "", "title": "Hostname"});
    std::fs::write(&state_file, serde_json::to_vec(&state).expect("JSON")).expect("write sim state");
    let r = m.agent_json(&["set-hostname", "--hostname", "ci.example.org"]);
    assert_eq!((r["item"].as_str(), r["changed"].as_bool()), (Some("circle_hostname"), Some(true)), "{r}");
    assert_eq!(r["old"], serde_json::Value::Null, "{r}");
    assert_eq!(m.calls("app apply-config"), 1);
}
