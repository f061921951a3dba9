//! Benchmark: cleaning up 1,000 builds in ONE dev-console session against one
//! session per build, with the dev-console simulator's load delay on.
//!
//! Both cases run the real `dr-agent cleanup-builds` binary against the API
//! v1.1 and dev-console simulators:
//! - one session: one run over 1,000 running builds (10 API pages);
//! - one session per build: 1,000 runs, the API listing one build each time.
//!
//! Run: `cargo build --release -p dr-agent && DR_BENCH_AGENT=target/release/dr-agent target/debug/dr-bench-cleanup`
//! (a plain binary: a `cargo bench` target here would rebuild the controller in release).
//! `DR_BENCH_BUILDS` (default 1000) and `DR_BENCH_LOAD_DELAY_MS` (default 200)
//! change the size; `DR_BENCH_AGENT` names another dr-agent binary.
//!
//! `DR_BENCH_REPL=clojure`: instead, 1,000 deletions in ONE real
//! `clojure.main` session (Debian's `clojure`, with tests/clojure/admin.clj),
//! and a one-build run to separate the JVM's start-up from the per-deletion
//! cost, next to the same 1,000 in one simulator session.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dr_tests::{Proc, bin};

const HOST: &str = "ci.example.com";
const TOKEN: &str = "bench-token";

fn build(num: u64) -> serde_json::Value {
    serde_json::json!({
        "build_url": format!("https://{HOST}/gh/bench-org/bench-repo/{num}"),
        "build_num": num,
        "username": "bench-org",
        "reponame": "bench-repo",
        "vcs_type": "github",
        "lifecycle": "running",
        "status": "running",
        "outcome": null,
        "queued_at": "2024-05-01T10:00:00.000Z",
        "start_time": "2024-05-01T11:00:00.000Z",
        "stop_time": null,
    })
}

fn write_builds(path: &Path, nums: impl Iterator<Item = u64>) {
    let builds: Vec<serde_json::Value> = nums.map(build).collect();
    std::fs::write(path, serde_json::to_vec(&builds).expect("json")).expect("write builds");
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// The agent under test: `DR_BENCH_AGENT` or the built `dr-agent`.
fn agent() -> PathBuf {
    std::env::var_os("DR_BENCH_AGENT").map(PathBuf::from).unwrap_or_else(|| bin("dr-agent"))
}

fn run_agent(config: &Path) {
    let mut child = Command::new(agent())
        .args(["cleanup-builds", "--output", "json", "--before", "2024-05-01T12:00:00Z", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dr-agent");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "dr-agent cleanup-builds failed: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dr-agent cleanup-builds did not finish within 600 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn run_bench() {
    let n = env_u64("DR_BENCH_BUILDS", 1000);
    let load_delay_ms = env_u64("DR_BENCH_LOAD_DELAY_MS", 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let builds = dir.path().join("builds.json");
    write_builds(&builds, (1..=n).rev());
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let log = dir.path().join("api.log");
    let _api = Proc::spawn(
        "dr-sim-circleci-api",
        Command::new(bin("dr-sim-circleci-api")).args(["--listen", "127.0.0.1:0", "--token", TOKEN]).arg("--builds").arg(&builds),
        &log,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(a) = std::fs::read_to_string(&log).unwrap_or_default().lines().find_map(|l| l.strip_prefix("listening on ")) {
            break a.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the API simulator did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let config_text = |argv: &[String], case: &str| -> PathBuf {
        let q = |s: &str| serde_json::to_string(s).expect("string");
        let argv = argv.iter().map(|a| q(a)).collect::<Vec<_>>().join(", ");
        let text = format!(
            "state_dir = {}\n[circleci]\napi_url = {}\napi_token_file = {}\nhostname = {}\ndev_console = [{argv}]\n\
             console_load_timeout = \"60s\"\nconsole_command_timeout = \"30s\"\nrequest_timeout = \"30s\"\n",
            q(&dir.path().join("state").display().to_string()),
            q(&format!("http://{addr}")),
            q(&token.display().to_string()),
            q(HOST),
        );
        let path = dir.path().join(format!("{case}.toml"));
        std::fs::write(&path, text).expect("config");
        path
    };
    let config_for = |case: &str| -> (PathBuf, PathBuf, PathBuf) {
        let deletions = dir.path().join(format!("{case}.deletions"));
        let sessions = dir.path().join(format!("{case}.sessions"));
        let argv = [
            bin("dr-sim-dev-console").display().to_string(),
            "--deletions".to_owned(),
            deletions.display().to_string(),
            "--sessions".to_owned(),
            sessions.display().to_string(),
            "--load-delay-ms".to_owned(),
            load_delay_ms.to_string(),
        ];
        (config_text(&argv, case), deletions, sessions)
    };

    if std::env::var("DR_BENCH_REPL").as_deref() == Ok("clojure") {
        let clojure_for = |case: &str| -> (PathBuf, PathBuf) {
            let deletions = dir.path().join(format!("{case}.deletions"));
            let site = dir.path().join(format!("{case}.clj"));
            let q = |s: &str| serde_json::to_string(s).expect("string");
            std::fs::write(&site, format!("(admin/configure! {{:log {}}})\n", q(&deletions.display().to_string()))).expect("site.clj");
            let admin = Path::new(env!("CARGO_MANIFEST_DIR")).join("clojure/admin.clj");
            let argv = ["clojure", "-i", &admin.display().to_string(), "-i", &site.display().to_string(), "-r"].map(String::from);
            (config_text(&argv, case), deletions)
        };
        println!("cleanup of {n} running builds in one real clojure.main session; agent {}", agent().display());
        let (config, deletions) = clojure_for("clojure-one-build");
        write_builds(&builds, std::iter::once(1));
        let t = Instant::now();
        run_agent(&config);
        let start_up = t.elapsed();
        assert_eq!(count_lines(&deletions), 1);
        write_builds(&builds, (1..=n).rev());
        let (config, deletions) = clojure_for("clojure-all");
        let t = Instant::now();
        run_agent(&config);
        let all = t.elapsed();
        assert_eq!(count_lines(&deletions), n as usize);
        let (config, deletions, _) = config_for("sim-one");
        let t = Instant::now();
        run_agent(&config);
        let sim = t.elapsed();
        assert_eq!(count_lines(&deletions), n as usize);
        println!("  1 build (JVM start-up, session set-up): {:>8.3} s", start_up.as_secs_f64());
        println!(
            "  {n} builds, one session:               {:>8.3} s  ({:.3} ms per deletion after start-up)",
            all.as_secs_f64(),
            (all.saturating_sub(start_up)).as_secs_f64() * 1e3 / (n.max(2) - 1) as f64
        );
        println!("  {n} builds, one simulator session:     {:>8.3} s  (load delay {load_delay_ms} ms)", sim.as_secs_f64());
        return;
    }

    println!("cleanup of {n} running builds; dev-console simulator load delay {load_delay_ms} ms; agent {}", agent().display());
    let (config, deletions, sessions) = config_for("one");
    let t = Instant::now();
    run_agent(&config);
    let one = t.elapsed();
    assert_eq!(count_lines(&deletions), n as usize);
    assert_eq!(count_lines(&sessions), 1);
    println!("  one session:           {:>9.3} s  ({:.3} ms per build)", one.as_secs_f64(), one.as_secs_f64() * 1e3 / n as f64);

    let (config, deletions, sessions) = config_for("each");
    let t = Instant::now();
    for num in (1..=n).rev() {
        write_builds(&builds, std::iter::once(num));
        run_agent(&config);
    }
    let each = t.elapsed();
    assert_eq!(count_lines(&deletions), n as usize);
    assert_eq!(count_lines(&sessions), n as usize);
    println!("  one session per build: {:>9.3} s  ({:.3} ms per build)", each.as_secs_f64(), each.as_secs_f64() * 1e3 / n as f64);
    println!("  ratio (per build / one session): {:.1}x", each.as_secs_f64() / one.as_secs_f64());
}

fn main() {
    run_bench();
}
