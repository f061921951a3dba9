//! dr-sim-nomad: a simulator of the parts of Nomad's HTTP API a drain uses.
//!
//! `dr-sim-nomad --listen 127.0.0.1:0 --nodes N --allocs-per-node K --alloc-secs S`
//! prints `listening on <addr>` once bound. It serves:
//! - `GET /v1/nodes`: node stubs (`ID`, `Name`, `Datacenter`, `NodeClass`,
//!   `Status`, `Drain`, `SchedulingEligibility`, `DrainStrategy`...);
//! - `GET /v1/node/<id>/allocations`: `K` allocations per node, `running`
//!   until `S` seconds after the node was drained (never while it is not),
//!   then `complete`; plus one old `complete` allocation per node;
//! - `POST /v1/node/<id>/drain` with `{"DrainSpec":{"Deadline":<ns>,...},
//!   "MarkEligible":false}` starts a drain, `{"DrainSpec":null,
//!   "MarkEligible":true}` ends it.
//!
//! Like Nomad: a drain makes the node ineligible; when the drain completes
//! (allocations done) `Drain` turns false but the node stays ineligible
//! until a request marks it eligible. At the drain deadline Nomad stops the
//! remaining allocations: they end `--kill-secs` (default 5, Nomad's default
//! kill_timeout) later. Ending a drain leaves unfinished allocations running.
//!
//! Test hooks: `--down M` adds M nodes in Status `down`; `--fail SUBSTR`
//! (repeatable) answers 500 to requests whose path contains SUBSTR;
//! `--delay SUBSTR=MS` (repeatable) sleeps first; `GET /v1/sim/calls` lists
//! every request received (method, path, body), not itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "dr-sim-nomad", about = "Simulates Nomad's HTTP API (nodes, drain, allocations) for tests.")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Ready client nodes.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Nodes in Status `down` (not to be drained).
    #[arg(long, default_value_t = 0)]
    down: usize,
    /// Running allocations per node.
    #[arg(long, default_value_t = 2)]
    allocs_per_node: usize,
    /// Seconds an allocation keeps running after its node was drained.
    #[arg(long, default_value_t = 2.0)]
    alloc_secs: f64,
    /// Seconds forced-stopped allocations take to end after the drain deadline.
    #[arg(long, default_value_t = 5.0)]
    kill_secs: f64,
    /// Answer 500 to requests whose path contains this (repeatable).
    #[arg(long)]
    fail: Vec<String>,
    /// SUBSTR=MS: sleep MS milliseconds before answering such paths (repeatable).
    #[arg(long)]
    delay: Vec<String>,
}

#[derive(Clone, Debug)]
struct Alloc {
    id: String,
    name: String,
    job_id: String,
    /// Set once finished (`complete`), for good.
    done: bool,
}

#[derive(Clone, Debug)]
struct Node {
    id: String,
    name: String,
    status: &'static str,
    eligible: bool,
    /// The current drain: (started, deadline).
    drain: Option<(Instant, Duration)>,
    drain_deadline_ns: i64,
    allocs: Vec<Alloc>,
    old_alloc: Alloc,
    modify_index: u64,
}

#[derive(Clone, Serialize)]
struct Call {
    method: String,
    path: String,
    body: serde_json::Value,
    at_ms: u64,
}

struct Sim {
    nodes: Vec<Node>,
    calls: Vec<Call>,
    alloc_secs: Duration,
    kill_secs: Duration,
    fail: Vec<String>,
    delay: Vec<(String, Duration)>,
    index: u64,
}

type Shared = Arc<Mutex<Sim>>;

impl Sim {
    /// Finishes allocations (and drains) whose time has come.
    fn settle(&mut self, now: Instant) {
        for n in &mut self.nodes {
            let Some((started, deadline)) = n.drain else { continue };
            let natural = started + self.alloc_secs;
            let forced = started + deadline + self.kill_secs;
            if now >= natural.min(forced) {
                for a in &mut n.allocs {
                    a.done = true;
                }
            }
            if n.allocs.iter().all(|a| a.done) {
                // Drain complete: Nomad clears the strategy, the node stays ineligible.
                n.drain = None;
                n.drain_deadline_ns = 0;
                self.index += 1;
                n.modify_index = self.index;
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A uuid-shaped id from a seed (splitmix64).
fn uuid_like(seed: &mut u64) -> String {
    let mut next = || {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

fn node_json(n: &Node) -> serde_json::Value {
    let draining = n.drain.is_some();
    serde_json::json!({
        "Address": "10.0.1.10",
        "ID": n.id,
        "Datacenter": "us-east-1",
        "Name": n.name,
        "NodeClass": "",
        "Version": "0.9.3",
        "Drain": draining,
        "DrainStrategy": if draining {
            serde_json::json!({"DrainSpec": {"Deadline": n.drain_deadline_ns, "IgnoreSystemJobs": false}, "ForceDeadline": "0001-01-01T00:00:00Z"})
        } else {
            serde_json::Value::Null
        },
        "SchedulingEligibility": if n.eligible { "eligible" } else { "ineligible" },
        "Status": n.status,
        "StatusDescription": "",
        "CreateIndex": 10,
        "ModifyIndex": n.modify_index,
    })
}

fn alloc_json(n: &Node, a: &Alloc) -> serde_json::Value {
    let status = if a.done { "complete" } else { "running" };
    serde_json::json!({
        "ID": a.id,
        "EvalID": "00000000-0000-4000-8000-000000000000",
        "Name": a.name,
        "NodeID": n.id,
        "JobID": a.job_id,
        "TaskGroup": "build",
        "DesiredStatus": if a.done { "stop" } else { "run" },
        "ClientStatus": status,
        "CreateIndex": 20,
        "ModifyIndex": 21,
    })
}

/// Records the call, applies injected delays and failures.
async fn hooks(sim: &Shared, method: &Method, uri: &Uri, body: &Bytes) -> Option<Response> {
    let path = uri.path().to_owned();
    let (delay, fail) = {
        let mut s = sim.lock().expect("sim lock");
        if path != "/v1/sim/calls" {
            let body = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
            s.calls.push(Call { method: method.to_string(), path: path.clone(), body, at_ms: now_ms() });
        }
        let delay = s.delay.iter().find(|(sub, _)| path.contains(sub.as_str())).map(|(_, d)| *d);
        (delay, s.fail.iter().any(|sub| path.contains(sub.as_str())))
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    fail.then(|| (StatusCode::INTERNAL_SERVER_ERROR, "simulated failure (--fail)\n").into_response())
}

async fn get_nodes(State(sim): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    if let Some(r) = hooks(&sim, &method, &uri, &body).await {
        return r;
    }
    let mut s = sim.lock().expect("sim lock");
    s.settle(Instant::now());
    Json(s.nodes.iter().map(node_json).collect::<Vec<_>>()).into_response()
}

async fn get_allocations(State(sim): State<Shared>, Path(id): Path<String>, method: Method, uri: Uri, body: Bytes) -> Response {
    if let Some(r) = hooks(&sim, &method, &uri, &body).await {
        return r;
    }
    let mut s = sim.lock().expect("sim lock");
    s.settle(Instant::now());
    match s.nodes.iter().find(|n| n.id == id) {
        None => (StatusCode::NOT_FOUND, "node not found\n").into_response(),
        Some(n) => {
            let mut list = vec![alloc_json(n, &n.old_alloc)];
            list.extend(n.allocs.iter().map(|a| alloc_json(n, a)));
            Json(list).into_response()
        }
    }
}

async fn post_drain(State(sim): State<Shared>, Path(id): Path<String>, method: Method, uri: Uri, body: Bytes) -> Response {
    if let Some(r) = hooks(&sim, &method, &uri, &body).await {
        return r;
    }
    let req: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => return (StatusCode::BAD_REQUEST, "request body must be a JSON object\n").into_response(),
    };
    let mut s = sim.lock().expect("sim lock");
    let now = Instant::now();
    s.settle(now);
    s.index += 1;
    let index = s.index;
    let Some(n) = s.nodes.iter_mut().find(|n| n.id == id) else {
        return (StatusCode::NOT_FOUND, "node not found\n").into_response();
    };
    let mark_eligible = req.get("MarkEligible").and_then(serde_json::Value::as_bool).unwrap_or(false);
    match req.get("DrainSpec") {
        None | Some(serde_json::Value::Null) => {
            n.drain = None;
            n.drain_deadline_ns = 0;
            if mark_eligible {
                n.eligible = true;
            }
        }
        Some(spec) => {
            let Some(ns) = spec.get("Deadline").and_then(serde_json::Value::as_i64) else {
                return (StatusCode::BAD_REQUEST, "DrainSpec.Deadline must be an integer (nanoseconds)\n").into_response();
            };
            // Nomad: 0 means the default (1h), negative means force at once.
            let deadline = match ns {
                0 => Duration::from_secs(3600),
                n if n < 0 => Duration::ZERO,
                n => Duration::from_nanos(n as u64),
            };
            // A new spec on a draining node replaces the deadline, not the start.
            let started = n.drain.map(|(t, _)| t).unwrap_or(now);
            n.drain = Some((started, deadline));
            n.drain_deadline_ns = ns;
            n.eligible = false;
        }
    }
    n.modify_index = index;
    // Nomad answers with the evaluations it created and the indexes.
    Json(serde_json::json!({"EvalIDs": [], "EvalCreateIndex": 0, "NodeModifyIndex": index, "Index": index})).into_response()
}

async fn get_calls(State(sim): State<Shared>) -> Response {
    Json(sim.lock().expect("sim lock").calls.clone()).into_response()
}

async fn fallback(uri: Uri) -> Response {
    (StatusCode::NOT_FOUND, format!("no route for {}\n", uri.path())).into_response()
}

fn parse_delays(list: &[String]) -> Result<Vec<(String, Duration)>, String> {
    list.iter()
        .map(|d| {
            let (sub, ms) = d.rsplit_once('=').ok_or_else(|| format!("--delay `{d}`: expected SUBSTR=MS"))?;
            let ms: u64 = ms.parse().map_err(|_| format!("--delay `{d}`: `{ms}` is not milliseconds"))?;
            Ok((sub.to_owned(), Duration::from_millis(ms)))
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let delay = match parse_delays(&args.delay) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dr-sim-nomad: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if !(args.alloc_secs.is_finite() && args.alloc_secs >= 0.0 && args.kill_secs.is_finite() && args.kill_secs >= 0.0) {
        eprintln!("dr-sim-nomad: --alloc-secs and --kill-secs must be non-negative numbers");
        return std::process::ExitCode::from(2);
    }
    let mut seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) ^ u64::from(std::process::id());
    let mut nodes = Vec::new();
    for i in 0..args.nodes + args.down {
        let id = uuid_like(&mut seed);
        let down = i >= args.nodes;
        let alloc = |seed: &mut u64, k: usize, done: bool| Alloc {
            id: uuid_like(seed),
            name: format!("build-{i}-{k}.build[0]"),
            job_id: format!("build-{i}-{k}"),
            done,
        };
        let allocs = if down { Vec::new() } else { (0..args.allocs_per_node).map(|k| alloc(&mut seed, k, false)).collect() };
        let old_alloc = alloc(&mut seed, 999, true);
        nodes.push(Node {
            id,
            name: format!("nomad-client-{i}"),
            status: if down { "down" } else { "ready" },
            eligible: true,
            drain: None,
            drain_deadline_ns: 0,
            allocs,
            old_alloc,
            modify_index: 10,
        });
    }
    let sim: Shared = Arc::new(Mutex::new(Sim {
        nodes,
        calls: Vec::new(),
        alloc_secs: Duration::from_secs_f64(args.alloc_secs),
        kill_secs: Duration::from_secs_f64(args.kill_secs),
        fail: args.fail.clone(),
        delay,
        index: 100,
    }));
    let app = Router::new()
        .route("/v1/nodes", get(get_nodes))
        .route("/v1/node/{id}/allocations", get(get_allocations))
        .route("/v1/node/{id}/drain", axum::routing::post(post_drain))
        .route("/v1/sim/calls", get(get_calls))
        .fallback(fallback)
        .with_state(sim);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dr-sim-nomad: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().expect("bound address");
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("dr-sim-nomad: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
