//! `dr-agent cleanup-builds` end to end: the real agent binary against the
//! API v1.1 simulator and a dev-console that is either a real `clojure.main`
//! REPL with a test `admin` namespace (tests/clojure/admin.clj: deletions,
//! failures, prompts, banners, `*read-eval*`) or the dev-console simulator
//! (hostile URLs, a hang, a slow load: faults a real REPL cannot be made to
//! show on demand).
//!
//! Needs `dr-agent` built (`cargo build --workspace --bins`, as tests/run.sh
//! does) and Debian's `clojure` (tests/run.sh installs it).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dr_tests::{Proc, bin};
use serde_json::{Value, json};

const HOST: &str = "ci.example.com";
const TOKEN: &str = "admin-token-0123";
const CUTOFF: &str = "2024-05-01T12:00:00Z";
const BEFORE: &str = "2024-05-01T11:30:00.123Z";
const AFTER: &str = "2024-05-01T12:00:01Z";

fn url(org: &str, repo: &str, num: u64) -> String {
    format!("https://{HOST}/gh/{org}/{repo}/{num}")
}

/// A build as API v1.1 lists it (shallow).
fn build(num: u64, lifecycle: &str, start: Option<&str>) -> Value {
    build_with_url(num, lifecycle, start, &url("my-org", "my-project", num))
}

fn build_with_url(num: u64, lifecycle: &str, start: Option<&str>, build_url: &str) -> Value {
    let (status, outcome) = match lifecycle {
        "running" => ("running", Value::Null),
        "finished" => ("success", json!("success")),
        "queued" => ("queued", Value::Null),
        other => (other, Value::Null),
    };
    json!({
        "build_url": build_url,
        "build_num": num,
        "username": "my-org",
        "reponame": "my-project",
        "vcs_type": "github",
        "branch": "main",
        "committer_name": "A. Dev",
        "lifecycle": lifecycle,
        "status": status,
        "outcome": outcome,
        "queued_at": "2024-05-01T10:00:00.000Z",
        "start_time": start,
        "stop_time": if lifecycle == "finished" { json!("2024-05-01T11:45:00.000Z") } else { Value::Null },
    })
}

/// How the real clojure.main REPL runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repl {
    /// `clojure -i admin.clj -i site.clj -r`: the greeting, prompt `user=> `.
    User,
    /// A `clojure.main/repl` in namespace `admin` (prompt `admin=> `).
    Admin,
    /// The same REPL started while `-i` loads a file: `load` binds
    /// `*read-eval*` for the thread, so neither `set!` nor `alter-var-root`
    /// can turn it off for the forms the REPL reads.
    AdminInsideLoad,
}

struct Site {
    dir: tempfile::TempDir,
    builds_file: PathBuf,
    deletions: PathBuf,
    sessions: PathBuf,
    api_url: String,
    _api: Proc,
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

impl Site {
    fn start(builds: &[Value]) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let builds_file = dir.path().join("builds.json");
        std::fs::write(&builds_file, serde_json::to_vec(builds).expect("json")).expect("write builds");
        let log = dir.path().join("api.log");
        let api = Proc::spawn(
            "dr-sim-circleci-api",
            Command::new(bin("dr-sim-circleci-api")).args(["--listen", "127.0.0.1:0", "--token", TOKEN]).arg("--builds").arg(&builds_file),
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listening on ")) {
                break a.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "the API simulator did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
        Site {
            deletions: dir.path().join("deletions"),
            sessions: dir.path().join("sessions"),
            builds_file,
            api_url: format!("http://{addr}"),
            _api: api,
            dir,
        }
    }

    fn set_builds(&self, builds: &[Value]) {
        std::fs::write(&self.builds_file, serde_json::to_vec(builds).expect("json")).expect("write builds");
    }

    /// Writes the agent's config; `console_args` go to the console simulator.
    fn config(&self, console_args: &[&str], extra: &str) -> PathBuf {
        let mut argv = vec![
            bin("dr-sim-dev-console").display().to_string(),
            "--deletions".to_owned(),
            self.deletions.display().to_string(),
            "--sessions".to_owned(),
            self.sessions.display().to_string(),
            "--load-delay-ms".to_owned(),
            "300".to_owned(),
        ];
        argv.extend(console_args.iter().map(|s| (*s).to_owned()));
        self.config_with_console(&argv, extra, "20s")
    }

    /// The agent's config with a real clojure.main REPL as its dev-console,
    /// the test `admin` namespace (tests/clojure/admin.clj) loaded: deleting
    /// `fail` throws, `warn` prints a warning on stderr.
    fn clojure_config(&self, fail: &[String], warn: &[String], repl: Repl) -> PathBuf {
        let q = |s: &str| serde_json::to_string(s).expect("string");
        let set = |urls: &[String]| urls.iter().map(|u| q(u)).collect::<Vec<_>>().join(" ");
        let site = self.dir.path().join("site.clj");
        std::fs::write(
            &site,
            format!(
                "(admin/configure! {{:log {} :sessions {} :fail #{{{}}} :warn #{{{}}}}})\n{}",
                q(&self.deletions.display().to_string()),
                q(&self.sessions.display().to_string()),
                set(fail),
                set(warn),
                if repl == Repl::AdminInsideLoad { "(admin/repl-in 'admin)\n" } else { "" },
            ),
        )
        .expect("site.clj");
        let admin = Path::new(env!("CARGO_MANIFEST_DIR")).join("clojure/admin.clj");
        let mut argv = ["clojure", "-i", &admin.display().to_string(), "-i", &site.display().to_string()].map(String::from).to_vec();
        match repl {
            Repl::User => argv.push("-r".to_owned()),
            Repl::Admin => argv.extend(["-e".to_owned(), "(admin/repl-in 'admin)".to_owned()]),
            Repl::AdminInsideLoad => {}
        }
        self.config_with_console(&argv, "", "90s")
    }

    fn config_with_console(&self, argv: &[String], extra: &str, load_timeout: &str) -> PathBuf {
        let q = |s: &str| serde_json::to_string(s).expect("string");
        let argv: Vec<String> = argv.iter().map(|a| q(a)).collect();
        let text = format!(
            "state_dir = {state}\n{extra}\n[circleci]\napi_url = {api}\napi_token_file = {token}\n{host}dev_console = [{argv}]\n\
             console_load_timeout = \"{load_timeout}\"\nconsole_command_timeout = \"10s\"\nrequest_timeout = \"10s\"\n",
            state = q(&self.dir.path().join("state").display().to_string()),
            api = q(&self.api_url),
            token = q(&self.dir.path().join("token").display().to_string()),
            host = if extra.contains("[replicated]") { String::new() } else { format!("hostname = {}\n", q(HOST)) },
            argv = argv.join(", "),
        );
        let path = self.dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("config");
        path
    }

    fn run(&self, config: &Path, args: &[&str]) -> Run {
        self.run_env(config, args, &[])
    }

    /// Runs `dr-agent cleanup-builds --config F --before CUTOFF ARGS`, bounded.
    fn run_env(&self, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = self.dir.path().join("agent.out");
        let err = self.dir.path().join("agent.err");
        let mut cmd = Command::new(bin("dr-agent"));
        cmd.args(["cleanup-builds", "--config"]).arg(config).args(["--before", CUTOFF]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(std::fs::File::create(&out).expect("out"))
            .stderr(std::fs::File::create(&err).expect("err"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn dr-agent");
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dr-agent cleanup-builds did not finish within 180 s: {}", std::fs::read_to_string(&err).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            code: status.code(),
            stdout: std::fs::read_to_string(&out).expect("stdout"),
            stderr: std::fs::read_to_string(&err).expect("stderr"),
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        match std::fs::read_to_string(path) {
            Ok(t) => t.lines().map(str::to_owned).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }

    fn deleted(&self) -> Vec<String> {
        Self::lines(&self.deletions)
    }

    /// Every line that reached the REPL.
    fn raw(&self) -> Vec<String> {
        Self::lines(&PathBuf::from(format!("{}.raw", self.deletions.display())))
    }

    /// Every expression the REPL evaluated (taken out of the agent's wrapper).
    fn forms(&self) -> Vec<String> {
        Self::lines(&PathBuf::from(format!("{}.forms", self.deletions.display())))
    }

    /// The `admin/delete-build` forms evaluated, in order.
    fn delete_forms(&self) -> Vec<String> {
        self.forms().into_iter().filter(|f| f.starts_with("(admin/delete-build ")).collect()
    }

    fn sessions(&self) -> usize {
        Self::lines(&self.sessions).len()
    }
}

fn outcomes(report: &Value) -> Vec<(u64, String, String)> {
    report["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .map(|b| {
            (
                b["build_num"].as_u64().expect("build_num"),
                b["outcome"].as_str().expect("outcome").to_owned(),
                b["detail"].as_str().expect("detail").to_owned(),
            )
        })
        .collect()
}

fn form(url: &str) -> String {
    format!("(admin/delete-build \"{url}\")")
}

/// What the agent evaluates before the first deletion in a REPL that keeps
/// no `set!` between forms (clojure.main, the simulator).
const READ_EVAL_OFF: [&str; 4] =
    ["(set! *read-eval* false)", "*read-eval*", "(alter-var-root (var *read-eval*) (constantly false))", "*read-eval*"];
const READ_EVAL_BACK_ON: &str = "(alter-var-root (var *read-eval*) (constantly true))";

#[test]
fn deletes_running_builds_started_before_the_cutoff_in_one_session() {
    // 250 builds over three pages, newest first; a mix of lifecycles.
    let mut builds = Vec::new();
    let mut expected = BTreeSet::new();
    let mut after = Vec::new();
    for num in (1..=250u64).rev() {
        let b = if num % 5 == 0 {
            build(num, "finished", Some(BEFORE))
        } else if num % 7 == 0 {
            after.push(num);
            build(num, "running", Some(AFTER))
        } else if num % 11 == 0 {
            build(num, "queued", None)
        } else if num % 13 == 0 {
            build(num, "running", None)
        } else {
            expected.insert(url("my-org", "my-project", num));
            build(num, "running", Some(BEFORE))
        };
        builds.push(b);
    }
    assert!(expected.len() > 100);
    let site = Site::start(&builds);
    let config = site.config(&["--known-builds", &site.builds_file.display().to_string()], "");
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(0), "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["listed"], 250);
    assert_eq!(report["deleted"].as_u64(), Some(expected.len() as u64));
    assert_eq!(report["console_sessions"], 1);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["refused"], 0);

    let deleted = site.deleted();
    assert_eq!(deleted.len(), expected.len(), "each build deleted once");
    assert_eq!(deleted.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(site.sessions(), 1, "all deletions in ONE dev-console session");
    // *read-eval* off (and checked) before the first deletion; the simulator,
    // like clojure.main, keeps no set! between forms, so it is turned off for
    // the JVM and back on at the end.
    let forms = site.forms();
    assert_eq!(forms[..4], READ_EVAL_OFF, "{forms:?}");
    assert_eq!(forms.last().map(String::as_str), Some(READ_EVAL_BACK_ON));
    assert_eq!(forms.len(), expected.len() + 5);
    let sent: BTreeSet<String> = forms[4..forms.len() - 1].iter().cloned().collect();
    assert_eq!(sent, expected.iter().map(|u| form(u)).collect::<BTreeSet<_>>(), "exactly the candidates' forms");
    assert!(!site.raw().iter().any(|l| l.contains("System/exit")), "nothing may end the console's JVM");
    assert!(
        report["warnings"].as_array().expect("warnings").iter().any(|w| w.as_str().is_some_and(|w| w.contains("alter-var-root"))),
        "{report}"
    );

    // Started after the cutoff, or never started: kept, with the reason.
    for (num, outcome, detail) in outcomes(&report) {
        if after.contains(&num) {
            assert_eq!(outcome, "kept", "#{num}");
            assert!(detail.contains("after the cutoff"), "#{num}: {detail}");
        } else if num % 13 == 0 && num % 5 != 0 && num % 7 != 0 && num % 11 != 0 {
            assert_eq!(outcome, "kept", "#{num}");
            assert!(detail.contains("no start time"), "#{num}: {detail}");
        } else {
            assert_eq!(outcome, "deleted", "#{num}");
            assert_eq!(detail, "REPL answered: true");
        }
    }

    // The server forgets deleted builds: a second run has nothing to do.
    let remaining: Vec<Value> = builds.into_iter().filter(|b| !expected.contains(b["build_url"].as_str().expect("url"))).collect();
    site.set_builds(&remaining);
    let again = site.run(&config, &[]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert!(again.stdout.contains("Already done"), "{}", again.stdout);
    assert_eq!(site.sessions(), 1, "no console opened when nothing is to be deleted");
    assert_eq!(site.deleted().len(), expected.len());
}

#[test]
fn hostile_urls_are_refused_and_nothing_of_theirs_reaches_the_repl() {
    let good = url("my-org", "my-project", 1);
    let hostile: Vec<(u64, String)> = vec![
        (2, format!("{}\") (System/exit 1) (\"", url("my-org", "my-project", 2))),
        (3, format!("{}\\\") (System/exit 1) (\\\"", url("my-org", "my-project", 3))),
        (4, format!("{}\\", url("my-org", "my-project", 4))),
        (5, format!("https://{HOST}/gh/my-org/my-project/(System/exit 1)")),
        (6, url("my-org", "my-project", 6).replace(HOST, "evil.example.com")),
        (7, url("my-org", "my-project", 7).replace("https://", "https://evil@")),
        (8, format!("https://{HOST}/gh/my-org/../my-project/8")),
        (9, format!("https://{HOST}/gh/../../my-project/9")),
        (10, format!("{}?x=1", url("my-org", "my-project", 10))),
        (11, format!("https://{HOST}/gh/my-org/my-project/1l")),
        (12, format!("{}#top", url("my-org", "my-project", 12))),
        (13, url("my-org", "my-project", 13).replace("https://", "http://")),
        (14, url("my-org", "my-project", 14).replace(HOST, &format!("{HOST}.evil.org"))),
        (15, url("my-org", "my-project", 9999)),
        (16, format!("{}\n(System/exit 1)", url("my-org", "my-project", 16))),
        (17, url("other-org", "my-project", 17)),
    ];
    let mut builds = vec![build(1, "running", Some(BEFORE))];
    builds.extend(hostile.iter().map(|(n, u)| build_with_url(*n, "running", Some(BEFORE), u)));
    let site = Site::start(&builds);
    let config = site.config(&[], "");
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(3), "a refusal exits 3\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["refused"].as_u64(), Some(hostile.len() as u64));
    assert_eq!(report["deleted"], 1);
    for (num, outcome, detail) in outcomes(&report) {
        if num == 1 {
            assert_eq!(outcome, "deleted");
        } else {
            assert_eq!(outcome, "refused", "#{num}: {detail}");
            assert!(detail.starts_with("URL refused: "), "#{num}: {detail}");
        }
    }
    assert!(report["actions"].as_array().expect("actions").iter().any(|a| a.as_str().is_some_and(|a| a.contains("by hand"))));
    assert_eq!(site.delete_forms(), vec![form(&good)], "only the valid form reached the REPL");
    for line in site.raw() {
        assert!(!line.contains("System/exit") && !line.contains("evil"), "hostile text reached the REPL: {line}");
    }
    assert_eq!(site.deleted(), vec![good]);

    // Human output names the refused URLs safely quoted.
    let human = site.run(&config, &[]);
    assert_eq!(human.code, Some(3));
    assert!(human.stdout.contains("REFUSED") && human.stdout.contains("user information"), "{}", human.stdout);
}

#[test]
fn dry_run_lists_the_candidates_and_opens_no_console() {
    let builds = vec![
        build(4, "running", Some(AFTER)),
        build(3, "running", Some(BEFORE)),
        build(2, "finished", Some(BEFORE)),
        build(1, "running", Some("2024-04-30T23:00:00Z")),
        build(0, "running", Some("2024-05-01T13:59:00+02:00")),
    ];
    let site = Site::start(&builds);
    let config = site.config(&[], "");
    let dry = site.run(&config, &["--dry-run", "--output", "json"]);
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    let report = dry.json();
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["console_sessions"], 0);
    let would: Vec<u64> = outcomes(&report).into_iter().filter(|(_, o, _)| o == "would_delete").map(|(n, _, _)| n).collect();
    assert_eq!(would, vec![3, 1, 0]);
    assert!(!site.sessions.exists(), "the dry run started a console");
    assert!(site.raw().is_empty());
    let human = site.run(&config, &["--dry-run"]);
    assert!(human.stdout.contains("Would delete 3 build(s)"), "{}", human.stdout);

    // The real run does exactly what the dry run showed.
    let real = site.run(&config, &["--output", "json"]);
    assert_eq!(real.code, Some(0), "{}", real.stderr);
    let deleted: Vec<u64> = outcomes(&real.json()).into_iter().filter(|(_, o, _)| o == "deleted").map(|(n, _, _)| n).collect();
    assert_eq!(deleted, would);
    assert_eq!(site.deleted(), [3, 1, 0].map(|n| url("my-org", "my-project", n)).to_vec());
}

#[test]
fn a_wrong_token_is_a_clear_error() {
    let site = Site::start(&[build(1, "running", Some(BEFORE))]);
    let config = site.config(&[], "");
    std::fs::write(site.dir.path().join("token"), "not-the-token\n").expect("token");
    let run = site.run(&config, &[]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let expected_url = format!("{}/api/v1.1/recent-builds?limit=100&offset=0&shallow=true", site.api_url);
    assert!(run.stderr.contains(&expected_url) && run.stderr.contains("401"), "{}", run.stderr);
    assert!(run.stderr.contains("api_token_file"), "{}", run.stderr);
    assert_eq!(site.sessions(), 0);

    std::fs::write(site.dir.path().join("token"), "\n").expect("token");
    let run = site.run(&config, &[]);
    assert_eq!(run.code, Some(2), "an empty token file is bad input: {}", run.stderr);
    assert!(run.stderr.contains("token"), "{}", run.stderr);
    let run = site.run(&config, &["--before", "yesterday"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

#[test]
fn a_repl_error_fails_that_build_and_the_others_are_still_deleted() {
    let builds: Vec<Value> = (1..=5).rev().map(|n| build(n, "running", Some(BEFORE))).collect();
    let site = Site::start(&builds);
    let locked = url("my-org", "my-project", 3);
    let config = site.config(&["--error-on", &locked], "");
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["deleted"], 4);
    assert_eq!(report["failed"], 1);
    for (num, outcome, detail) in outcomes(&report) {
        if num == 3 {
            assert_eq!(outcome, "failed");
            assert_eq!(detail, format!("delete-build threw: clojure.lang.ExceptionInfo: Cannot delete build {locked}: build is locked"));
        } else {
            assert_eq!(outcome, "deleted");
        }
    }
    assert_eq!(site.sessions(), 1);
    assert_eq!(site.deleted(), [5, 4, 2, 1].map(|n| url("my-org", "my-project", n)).to_vec());
}

#[test]
fn a_console_that_stops_answering_ends_the_session_and_reports_the_rest() {
    let builds: Vec<Value> = (1..=3).rev().map(|n| build(n, "running", Some(BEFORE))).collect();
    let site = Site::start(&builds);
    let stuck = url("my-org", "my-project", 2);
    let config = site.config(&["--hang-on", &stuck], "");
    let text =
        std::fs::read_to_string(&config).expect("config").replace("console_command_timeout = \"10s\"", "console_command_timeout = \"1s\"");
    std::fs::write(&config, text).expect("config");
    let started = Instant::now();
    let run = site.run(&config, &["--output", "json"]);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let o = outcomes(&run.json());
    assert_eq!(o[0].1, "deleted");
    assert_eq!(o[1].1, "failed");
    assert!(o[1].2.contains("did not answer"), "{}", o[1].2);
    assert_eq!(o[2].1, "failed");
    assert!(o[2].2.contains("not attempted"), "{}", o[2].2);
    assert_eq!(site.delete_forms(), vec![form(&url("my-org", "my-project", 3)), form(&stuck)], "nothing sent after the hang");
}

#[test]
fn the_hostname_defaults_to_the_replicated_app_config_item() {
    let site = Site::start(&[build(1, "running", Some(BEFORE))]);
    let state = site.dir.path().join("replicated");
    std::fs::create_dir_all(&state).expect("state dir");
    let extra = format!(
        "[replicated]\nreplicatedctl = {}\nhostname_item = \"hostname\"\n",
        serde_json::to_string(&bin("dr-sim-replicatedctl").display().to_string()).expect("string")
    );
    let config = site.config(&[], &extra);
    let state_dir = state.display().to_string();
    let run = site.run_env(&config, &["--output", "json"], &[("DR_SIM_STATE_DIR", &state_dir)]);
    // The simulator's default hostname is circleci.example.com: the build's URL
    // names another host, so it is refused.
    assert_eq!(run.code, Some(3), "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["hostname"], "circleci.example.com");
    assert_eq!(outcomes(&report)[0].1, "refused");
    // With the site's hostname in the app config, it is deleted.
    let state2 = site.dir.path().join("replicated2").display().to_string();
    std::fs::create_dir_all(&state2).expect("state dir");
    let run = site.run_env(&config, &["--output", "json"], &[("DR_SIM_STATE_DIR", &state2), ("DR_SIM_HOSTNAME", HOST)]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.json()["hostname"], HOST);
    assert_eq!(site.deleted(), vec![url("my-org", "my-project", 1)]);
}

/// One raw HTTP/1.0 GET against the simulator: (status line, content-type, body).
fn raw_get(api_url: &str, path: &str, headers: &str) -> (String, String, String) {
    let addr = api_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("http answer");
    let status = head.lines().next().unwrap_or("").to_owned();
    let ctype =
        head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned())).unwrap_or_default();
    (status, ctype, body.to_owned())
}

#[test]
fn the_api_simulator_behaves_like_api_v1_1() {
    let builds: Vec<Value> = (1..=150).rev().map(|n| build(n, if n % 2 == 0 { "running" } else { "finished" }, Some(BEFORE))).collect();
    let site = Site::start(&builds);
    let auth = "Authorization: Basic YWRtaW4tdG9rZW4tMDEyMzo=\r\n"; // admin-token-0123:
    let (status, ctype, body) =
        raw_get(&site.api_url, "/api/v1.1/recent-builds?limit=500&offset=0", &format!("{auth}Accept: application/json\r\n"));
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let page: Vec<Value> = serde_json::from_str(&body).expect("json");
    assert_eq!(page.len(), 100, "pages are capped at 100");
    assert_eq!(page[0]["build_num"], 150);
    // No Accept header: EDN, which a JSON client cannot read.
    let (status, ctype, body) = raw_get(&site.api_url, "/api/v1.1/recent-builds?limit=1", auth);
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("application/edn"), "{ctype}");
    assert!(body.starts_with("[{:") && serde_json::from_str::<Value>(&body).is_err(), "{body}");
    // ?circle-token= works too; nothing at all is 401.
    let (status, _, body) = raw_get(
        &site.api_url,
        &format!("/api/v1.1/project/github/my-org/my-project?filter=running&limit=100&offset=50&circle-token={TOKEN}"),
        "Accept: application/json\r\n",
    );
    assert!(status.contains("200"), "{status}");
    let page: Vec<Value> = serde_json::from_str(&body).expect("json");
    assert_eq!(page.len(), 25);
    assert!(page.iter().all(|b| b["lifecycle"] == "running"));
    let (status, _, _) = raw_get(&site.api_url, "/api/v1.1/recent-builds", "Accept: application/json\r\n");
    assert!(status.contains("401"), "{status}");
}

/// The `admin` stand-in's record: (URL, `*read-eval*` when it was deleted).
fn clojure_deleted(site: &Site) -> Vec<(String, String)> {
    site.deleted()
        .iter()
        .map(|l| {
            let rest = l.strip_prefix("deleted ").unwrap_or_else(|| panic!("not a deletion record: {l}"));
            let (u, re) = rest.split_once(" read-eval=").unwrap_or_else(|| panic!("not a deletion record: {l}"));
            (u.to_owned(), re.to_owned())
        })
        .collect()
}

#[test]
fn against_a_real_clojure_repl_deletes_in_one_session_and_reports_a_throwing_delete_as_failed() {
    // 40 running before the cutoff (one throws, one warns on stderr), 5
    // running after it, 3 finished.
    let mut builds = Vec::new();
    for num in (1..=48u64).rev() {
        builds.push(match num {
            41..=45 => build(num, "running", Some(AFTER)),
            46..=48 => build(num, "finished", Some(BEFORE)),
            _ => build(num, "running", Some(BEFORE)),
        });
    }
    let site = Site::start(&builds);
    let missing = url("my-org", "my-project", 17);
    let warns = url("my-org", "my-project", 23);
    let config = site.clojure_config(std::slice::from_ref(&missing), std::slice::from_ref(&warns), Repl::Admin);

    // The dry run opens no REPL (the admin namespace records every session).
    let dry = site.run(&config, &["--dry-run", "--output", "json"]);
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    assert_eq!(dry.json()["console_sessions"], 0);
    assert_eq!(site.sessions(), 0, "the dry run started a REPL");

    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(1), "a failed deletion exits 1\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["console_sessions"], 1);
    assert_eq!(site.sessions(), 1, "ONE REPL session");
    assert_eq!((report["deleted"].as_u64(), report["failed"].as_u64()), (Some(39), Some(1)), "{report}");
    assert_eq!(report["kept"], 5);
    for (num, outcome, detail) in outcomes(&report) {
        match num {
            17 => {
                assert_eq!(outcome, "failed");
                assert_eq!(detail, format!("delete-build threw: clojure.lang.ExceptionInfo: build not found: {missing}"));
            }
            41..=45 => assert_eq!((outcome.as_str(), detail.as_str()), ("kept", "started after the cutoff")),
            _ => assert_eq!((outcome.as_str(), detail.as_str()), ("deleted", "REPL answered: true"), "#{num}"),
        }
    }
    // What the admin namespace deleted: exactly the candidates but the one
    // that threw, in the listing's order, each with *read-eval* off.
    let expected: Vec<(String, String)> =
        (1..=40u64).rev().filter(|&n| n != 17).map(|n| (url("my-org", "my-project", n), "false".to_owned())).collect();
    assert_eq!(clojure_deleted(&site), expected);
    assert!(run.stderr.contains("delete-build failed") && run.stderr.contains("build not found"), "{}", run.stderr);
    // A warning on stderr does not fail a deletion; it is logged.
    assert!(run.stderr.contains(&format!("WARNING: build {warns} has no containers left")), "{}", run.stderr);

    // Human output: the failure with the REPL's message, and the action.
    let human = site.run(&config, &[]);
    assert_eq!(human.code, Some(1));
    assert!(
        human.stdout.lines().any(|l| l.trim_start().starts_with("FAILED") && l.contains("#17 ") && l.contains("build not found")),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("1 build(s) could not be deleted"), "{}", human.stdout);
}

#[test]
fn against_a_real_clojure_repl_at_the_user_prompt_the_batch_goes_on_after_an_exception() {
    let builds: Vec<Value> = (1..=4u64).rev().map(|n| build(n, "running", Some(BEFORE))).collect();
    let site = Site::start(&builds);
    let missing = url("my-org", "my-project", 4);
    let config = site.clojure_config(std::slice::from_ref(&missing), &[], Repl::User);
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(1), "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    let o = outcomes(&run.json());
    assert_eq!(o[0], (4, "failed".to_owned(), format!("delete-build threw: clojure.lang.ExceptionInfo: build not found: {missing}")));
    assert!(o[1..].iter().all(|(_, outcome, _)| outcome == "deleted"), "{o:?}");
    assert_eq!(clojure_deleted(&site), [3, 2, 1].map(|n| (url("my-org", "my-project", n), "false".to_owned())).to_vec());
    assert_eq!(site.sessions(), 1);
}

#[test]
fn against_a_real_clojure_repl_where_read_eval_stays_on_nothing_is_deleted() {
    let site = Site::start(&[build(1, "running", Some(BEFORE))]);
    let config = site.clojure_config(&[], &[], Repl::AdminInsideLoad);
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(1), "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("cannot turn *read-eval* off") && run.stderr.contains("nothing was deleted"), "{}", run.stderr);
    assert_eq!(site.sessions(), 1);
    assert!(site.deleted().is_empty(), "{:?}", site.deleted());
}

#[test]
fn a_token_file_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let site = Site::start(&[build(1, "finished", Some(BEFORE))]);
    let config = site.config(&[], "");
    let token = site.dir.path().join("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(0), "a warning, not a refusal: {}", run.stderr);
    let warnings = run.json()["warnings"].clone();
    let expected = format!("the API token file {} is readable by group and others (mode 0644)", token.display());
    assert!(warnings.as_array().expect("warnings").iter().any(|w| w.as_str().is_some_and(|w| w.contains(&expected))), "{warnings}");
    assert!(run.stderr.contains(&expected), "the log carries it too: {}", run.stderr);

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let run = site.run(&config, &["--output", "json"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.json()["warnings"], json!([]));
    assert!(!run.stderr.contains("readable by"), "{}", run.stderr);
}
