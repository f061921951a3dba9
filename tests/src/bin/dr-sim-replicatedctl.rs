//! dr-sim-replicatedctl: a simulator of Replicated's `replicatedctl` for tests.
//!
//! State lives in `$DR_SIM_STATE_DIR/replicated.json` (created on first use
//! with the app started). Behaviour, from the environment:
//! - `DR_SIM_STOP_SECS`, `DR_SIM_START_SECS`: transition times (default 2, 3;
//!   fractions allowed);
//! - `DR_SIM_FAIL`: comma list of subcommands that exit 1 (e.g. `app status`);
//! - `DR_SIM_DELAY`: comma list of `subcommand=milliseconds` to sleep first
//!   (e.g. `app status=5000`), to exercise timeouts;
//! - `DR_SIM_HOSTNAME`: the `hostname` config item of a fresh state.
//!
//! `DR_SIM_FAIL` and `DR_SIM_DELAY` may also be set in the file
//! `$DR_SIM_STATE_DIR/faults` (lines `NAME=value`, read at every call, the
//! file wins): faults that travel with a machine's disk (a backup of it, a
//! machine restored from it) and that a test can lift while it runs.
//!
//! Every invocation appends `{"at_ms":..,"args":[..]}` to
//! `$DR_SIM_STATE_DIR/calls.log`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

const APP_ID: &str = "edd9471c4fa4c4b7b7e1a1b5c0d1e2f3";
const USAGE: &str = "usage: replicatedctl app status | app stop [-f] | app start | app apply-config\n       \
                     replicatedctl app-config export [--hidden] | app-config set NAME --value VALUE";

#[derive(Debug, Serialize, Deserialize)]
struct SimState {
    state: String,
    desired_state: String,
    #[serde(default)]
    transition_until_ms: u64,
    #[serde(default)]
    sequence: u64,
    #[serde(default)]
    app_config: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    last_modified_ms: u64,
}

impl SimState {
    fn fresh(now: u64) -> Self {
        let hostname = std::env::var("DR_SIM_HOSTNAME").unwrap_or_else(|_| "circleci.example.com".to_owned());
        let mut app_config = BTreeMap::new();
        app_config.insert("hostname".to_owned(), serde_json::json!({ "value": hostname }));
        SimState {
            state: "started".to_owned(),
            desired_state: "started".to_owned(),
            transition_until_ms: 0,
            sequence: 1,
            app_config,
            last_modified_ms: now,
        }
    }

    /// Completes a transition whose time has come.
    fn settle(&mut self, now: u64) {
        if self.transition_until_ms != 0 && now >= self.transition_until_ms {
            self.state = self.desired_state.clone();
            self.last_modified_ms = self.transition_until_ms;
            self.transition_until_ms = 0;
        }
    }

    fn transitioning(&self) -> bool {
        self.transition_until_ms != 0
    }

    fn begin(&mut self, desired: &str, moving: &str, secs: f64, now: u64) {
        if self.state == desired && !self.transitioning() {
            return;
        }
        self.desired_state = desired.to_owned();
        self.state = moving.to_owned();
        self.transition_until_ms = now + (secs.max(0.0) * 1000.0) as u64;
        self.last_modified_ms = now;
        self.settle(now);
    }
}

#[derive(Debug)]
struct Failure(String);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn env_secs(name: &str, default: f64) -> Result<f64, Failure> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .ok_or_else(|| Failure(format!("{name}=`{v}` is not a number of seconds"))),
    }
}

/// Holds an exclusive flock on `file` until dropped (the fd closes).
fn lock(file: &File) -> Result<(), Failure> {
    // SAFETY: flock on a valid, open file descriptor owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(Failure(format!("flock: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

fn log_call(dir: &Path, args: &[String]) -> Result<(), Failure> {
    let path = dir.join("calls.log");
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(&path)
        .map_err(|e| Failure(format!("cannot open {}: {e}", path.display())))?;
    lock(&f)?;
    let mut line = serde_json::to_string(&serde_json::json!({ "at_ms": now_ms(), "args": args })).expect("a JSON object serializes");
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))
}

fn load(path: &Path, now: u64) -> Result<SimState, Failure> {
    match File::open(path) {
        Ok(mut f) => {
            let mut s = String::new();
            f.read_to_string(&mut s).map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str(&s).map_err(|e| Failure(format!("{} is not valid state: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SimState::fresh(now)),
        Err(e) => Err(Failure(format!("cannot read {}: {e}", path.display()))),
    }
}

fn save(path: &Path, state: &SimState) -> Result<(), Failure> {
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Failure(format!("cannot write {}: {e}", path.display()))
    })
}

fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// One element of `app status`, fields in the order replicatedctl prints them.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct StatusJson<'a> {
    #[serde(rename = "AppID")]
    app_id: &'a str,
    sequence: u64,
    state: &'a str,
    desired_state: &'a str,
    error: &'a str,
    is_cancellable: bool,
    is_transitioning: bool,
    last_modified_at: String,
}

fn status_json(s: &SimState) -> String {
    let one = StatusJson {
        app_id: APP_ID,
        sequence: s.sequence,
        state: &s.state,
        desired_state: &s.desired_state,
        error: "",
        is_cancellable: s.transitioning(),
        is_transitioning: s.transitioning(),
        last_modified_at: rfc3339(s.last_modified_ms),
    };
    serde_json::to_string(&[one]).expect("status serializes")
}

/// The subcommand name used by DR_SIM_FAIL / DR_SIM_DELAY: the first two words.
fn subcommand(args: &[String]) -> String {
    args.iter().take(2).map(String::as_str).collect::<Vec<_>>().join(" ")
}

fn listed(dir: &Path, var: &str, sub: &str) -> Option<String> {
    let from_file = std::fs::read_to_string(dir.join("faults")).ok().and_then(|text| {
        text.lines().find_map(|l| l.trim().strip_prefix(var).and_then(|r| r.strip_prefix('=')).map(|v| v.trim().to_owned()))
    });
    let list = from_file.or_else(|| std::env::var(var).ok())?;
    list.split(',').map(str::trim).find_map(|entry| {
        let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
        (name.trim() == sub).then(|| value.trim().to_owned())
    })
}

enum Cmd {
    Status,
    Stop,
    Start,
    ApplyConfig,
    Export,
    Set { name: String, value: String },
}

fn parse(args: &[String]) -> Option<Cmd> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Some(match a.as_slice() {
        ["app", "status"] => Cmd::Status,
        ["app", "stop"] | ["app", "stop", "-f" | "--force"] => Cmd::Stop,
        ["app", "start"] => Cmd::Start,
        ["app", "apply-config"] => Cmd::ApplyConfig,
        ["app-config", "export"] | ["app-config", "export", "--hidden"] => Cmd::Export,
        ["app-config", "set", name, "--value", value] => Cmd::Set { name: (*name).to_owned(), value: (*value).to_owned() },
        ["app-config", "set", name, flag] if flag.starts_with("--value=") => {
            Cmd::Set { name: (*name).to_owned(), value: flag.trim_start_matches("--value=").to_owned() }
        }
        _ => return None,
    })
}

fn run(args: &[String]) -> Result<String, Failure> {
    let dir = PathBuf::from(
        std::env::var_os("DR_SIM_STATE_DIR")
            .ok_or_else(|| Failure("DR_SIM_STATE_DIR is not set: it must name the simulator's state directory".to_owned()))?,
    );
    std::fs::create_dir_all(&dir).map_err(|e| Failure(format!("cannot create {}: {e}", dir.display())))?;
    log_call(&dir, args)?;
    let sub = subcommand(args);
    if let Some(ms) = listed(&dir, "DR_SIM_DELAY", &sub) {
        let ms: u64 = ms.parse().map_err(|_| Failure(format!("DR_SIM_DELAY: `{sub}={ms}` is not milliseconds")))?;
        std::thread::sleep(Duration::from_millis(ms));
    }
    let Some(cmd) = parse(args) else {
        return Err(Failure(format!("unknown command `{}`\n{USAGE}", args.join(" "))));
    };
    if listed(&dir, "DR_SIM_FAIL", &sub).is_some() {
        return Err(Failure(format!("Error: simulated failure of `{sub}` (DR_SIM_FAIL)")));
    }
    let stop_secs = env_secs("DR_SIM_STOP_SECS", 2.0)?;
    let start_secs = env_secs("DR_SIM_START_SECS", 3.0)?;

    let lock_file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(".state.lock"))
        .map_err(|e| Failure(format!("cannot open the state lock: {e}")))?;
    lock(&lock_file)?;
    let path = dir.join("replicated.json");
    let now = now_ms();
    let mut state = load(&path, now)?;
    state.settle(now);
    let out = match cmd {
        Cmd::Status => status_json(&state),
        Cmd::Stop => {
            state.begin("stopped", "stopping", stop_secs, now);
            String::new()
        }
        Cmd::Start => {
            state.begin("started", "starting", start_secs, now);
            String::new()
        }
        Cmd::ApplyConfig => {
            state.sequence += 1;
            if state.desired_state == "started" {
                // Applying the configuration restarts a running app.
                state.state = "stopped".to_owned();
                state.begin("started", "starting", start_secs, now);
            }
            String::new()
        }
        Cmd::Export => serde_json::to_string(&state.app_config).expect("config serializes"),
        Cmd::Set { name, value } => {
            let item = state.app_config.entry(name).or_insert_with(|| serde_json::json!({}));
            match item {
                serde_json::Value::Object(map) => {
                    map.insert("value".to_owned(), serde_json::Value::String(value));
                }
                other => *other = serde_json::json!({ "value": value }),
            }
            String::new()
        }
    };
    save(&path, &state)?;
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(Failure(message)) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
