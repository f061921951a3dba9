//! `dr-agent drain` / `undrain` against the simulated Nomad HTTP API (real
//! binaries on loopback). The "always undrain, also when the step fails"
//! guarantee (`drain::with_drain`) is tested in agent/src/drain.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dr_tests::{Proc, bin, text};

struct Nomad {
    addr: String,
    _proc: Proc,
}

impl Nomad {
    fn start(args: &[&str]) -> Nomad {
        let mut child = Command::new(bin("dr-sim-nomad"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dr-sim-nomad");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read the address");
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected line {line:?}")).to_owned();
        Nomad { addr, _proc: Proc { child, name: "dr-sim-nomad".into() } }
    }

    /// A plain HTTP/1.1 GET on loopback.
    fn get(&self, path: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr).expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP answer");
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    fn nodes(&self) -> Vec<serde_json::Value> {
        self.get("/v1/nodes").as_array().expect("array").clone()
    }

    fn posts(&self) -> Vec<serde_json::Value> {
        self.get("/v1/sim/calls").as_array().expect("array").iter().filter(|c| c["method"] == "POST").cloned().collect()
    }
}

struct Agent {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Agent {
    fn new(nomad: &Nomad, extra: &str) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n\n[nomad]\napi_url = \"http://{}\"\nrequest_timeout = \"5s\"\n{extra}",
                dir.path().join("state").display(),
                nomad.addr
            ),
        )
        .expect("config");
        Agent { dir, config }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(bin("dr-agent")).args(args).arg("--config").arg(&self.config).env("RUST_LOG", "info").output().expect("dr-agent")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.run(&all);
        assert!(out.status.success(), "dr-agent {args:?}: {}\n{}", text(&out.stderr), text(&out.stdout));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
    }

    fn record(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("state/drain.json")).expect("drain.json")).expect("JSON")
    }
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = v.as_array().expect("array").iter().map(|n| n["id"].as_str().expect("id").to_owned()).collect();
    ids.sort();
    ids
}

#[test]
fn drain_waits_for_allocations_and_undrain_restores_eligibility() {
    let nomad = Nomad::start(&["--nodes", "2", "--down", "1", "--allocs-per-node", "2", "--alloc-secs", "2"]);
    let agent = Agent::new(&nomad, "");
    let ready: Vec<String> = {
        let mut v: Vec<String> =
            nomad.nodes().iter().filter(|n| n["Status"] == "ready").map(|n| n["ID"].as_str().expect("ID").to_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(ready.len(), 2);

    let t = Instant::now();
    let r = agent.json(&["drain", "--deadline", "30s"]);
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(2), "drain returned after {took:?}, before the allocations ended");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(r["idle"], true, "{r}");
    assert_eq!(ids(&r["drained"]), ready, "{r}");
    assert_eq!(r["skipped"].as_array().map(Vec::len), Some(1), "the down node is reported, not drained: {r}");
    assert_eq!(r["skipped"][0]["status"], "down");
    for n in nomad.nodes().iter().filter(|n| n["Status"] == "ready") {
        assert_eq!(n["SchedulingEligibility"], "ineligible", "{n}");
        let allocs = nomad.get(&format!("/v1/node/{}/allocations", n["ID"].as_str().expect("ID")));
        assert!(allocs.as_array().expect("array").iter().all(|a| a["ClientStatus"] == "complete"), "{allocs}");
    }
    let posts = nomad.posts();
    assert_eq!(posts.len(), 2, "{posts:?}");
    for p in &posts {
        assert_eq!(p["body"]["DrainSpec"]["Deadline"], 30_000_000_000_i64, "{p}");
        assert_eq!(p["body"]["MarkEligible"], false);
    }
    let mut recorded: Vec<String> =
        agent.record()["nodes"].as_array().expect("nodes").iter().map(|n| n["id"].as_str().expect("id").to_owned()).collect();
    recorded.sort();
    assert_eq!(recorded, ready);

    // Again: nothing new asked of Nomad.
    let r = agent.json(&["drain", "--deadline", "30s"]);
    assert_eq!((r["drained"].as_array().map(Vec::len), ids(&r["already_drained"])), (Some(0), ready.clone()), "{r}");
    assert_eq!(nomad.posts().len(), 2);

    let out = agent.run(&["undrain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Ended the drain of 2 node(s)"), "{}", text(&out.stdout));
    for n in nomad.nodes() {
        assert_eq!((n["Drain"].as_bool(), n["SchedulingEligibility"].as_str()), (Some(false), Some("eligible")), "{n}");
    }
    let posts = nomad.posts();
    assert_eq!(posts.len(), 4);
    for p in &posts[2..] {
        assert_eq!((&p["body"]["DrainSpec"], &p["body"]["MarkEligible"]), (&serde_json::Value::Null, &serde_json::json!(true)), "{p}");
    }
    assert_eq!(agent.record()["nodes"], serde_json::json!([]));

    // Idempotent.
    let r = agent.json(&["undrain"]);
    assert_eq!(r["undrained"], serde_json::json!([]), "{r}");
    assert_eq!(nomad.posts().len(), 4);
}

#[test]
fn deadline_passing_with_allocations_running_is_reported() {
    let nomad = Nomad::start(&["--nodes", "2", "--allocs-per-node", "3", "--alloc-secs", "120", "--kill-secs", "60"]);
    let agent = Agent::new(&nomad, "");
    let t = Instant::now();
    let out = agent.run(&["drain", "--deadline", "2s"]);
    let took = t.elapsed();
    assert!(out.status.success(), "not an error by default: {}", text(&out.stderr));
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
    let human = text(&out.stdout);
    assert!(human.contains("6 allocation(s) still running"), "{human}");
    assert!(human.contains("build-0-0"), "the allocations are named: {human}");

    let out = agent.run(&["drain", "--deadline", "1s", "--require-idle", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("still running or pending"), "{}", text(&out.stderr));

    let r = agent.json(&["undrain"]);
    assert_eq!(r["undrained"].as_array().map(Vec::len), Some(2), "{r}");
    // Undrained before they finished: the allocations go on running, the nodes are eligible.
    for n in nomad.nodes() {
        assert_eq!(n["SchedulingEligibility"], "eligible", "{n}");
        let allocs = nomad.get(&format!("/v1/node/{}/allocations", n["ID"].as_str().expect("ID")));
        assert_eq!(allocs.as_array().expect("array").iter().filter(|a| a["ClientStatus"] == "running").count(), 3);
    }
}

#[test]
fn dry_run_changes_nothing_and_nomad_errors_are_named() {
    let nomad = Nomad::start(&["--nodes", "3", "--alloc-secs", "1", "--fail", "/drain"]);
    let agent = Agent::new(&nomad, "");
    let r = agent.json(&["drain", "--dry-run"]);
    assert_eq!(r["drained"].as_array().map(Vec::len), Some(3), "{r}");
    assert!(nomad.posts().is_empty());
    assert!(!agent.dir.path().join("state/drain.json").exists());

    // A failing drain request: exit 1, the URL and what to do are named.
    let out = agent.run(&["drain"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("/drain") && err.contains("HTTP 500") && err.contains("dr-agent undrain"), "{err}");

    // A slow answer: the request timeout is kept.
    let nomad_slow = Nomad::start(&["--nodes", "1", "--delay", "/v1/nodes=3000"]);
    let slow = Agent::new(&nomad_slow, "");
    std::fs::write(
        &slow.config,
        std::fs::read_to_string(&slow.config).expect("config").replace("request_timeout = \"5s\"", "request_timeout = \"500ms\""),
    )
    .expect("config");
    let t = Instant::now();
    let out = slow.run(&["drain"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(text(&out.stderr).contains("no answer within 500ms"), "{}", text(&out.stderr));

    // A config error is exit 2 naming the key.
    let bad = Agent::new(&nomad, "");
    std::fs::write(&bad.config, "[nomad]\napi_url = \"https://127.0.0.1:1\"\n").expect("config");
    let out = bad.run(&["undrain"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nomad.api_url"));
}
