//! freeze / thaw on real ext4 file systems on loop devices (needs root and
//! /dev/loop*: these tests fail, they do not skip, without them).
//!
//! A write to a frozen file system blocks in the kernel (uninterruptible),
//! so writes are probed from child processes that are never waited on
//! before the file system is thawed; `LoopFs` thaws before unmounting.

use std::borrow::BorrowMut;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dr_tests::bin;

fn run<C: BorrowMut<Command>>(mut cmd: C) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok<C: BorrowMut<Command>>(mut cmd: C) -> String {
    let cmd = cmd.borrow_mut();
    let out = run(&mut *cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}): {}{}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A 64 MiB ext4 image, attached to a loop device and mounted; a state dir
/// for the agent on the root file system.
struct LoopFs {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    dev: String,
    config: PathBuf,
    probes: Vec<Child>,
}

impl LoopFs {
    fn new() -> LoopFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).expect("image").set_len(64 << 20).expect("truncate");
        ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(&img));
        assert!(out.status.success(), "these tests need root and loop devices (losetup --find --show failed: {})", text(&out.stderr));
        let dev = text(&out.stdout).trim().to_owned();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let out = run(Command::new("mount").arg(&dev).arg(&mnt));
        if !out.status.success() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            panic!("mount {dev} failed: {}", text(&out.stderr));
        }
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, format!("state_dir = \"{}\"\n", dir.path().join("state").display())).expect("config");
        LoopFs { dir, mnt, dev, config, probes: Vec::new() }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `dr-agent <sub> --config <ours> <args>`.
    fn agent(&self, sub: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin("dr-agent"));
        c.arg(sub).arg("--config").arg(&self.config).args(args).stdin(Stdio::null());
        c
    }

    fn mnt(&self) -> &str {
        self.mnt.to_str().expect("utf-8 path")
    }

    /// Starts a process that creates a file on the fs; returns its index.
    fn probe(&mut self) -> usize {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let file = self.mnt.join(format!("probe-{n}"));
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("echo written > '{}'", file.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn a writer");
        self.probes.push(child);
        self.probes.len() - 1
    }

    /// Whether probe `i` finished (successfully) within `timeout`.
    fn probe_done_within(&mut self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.probes[i].try_wait().expect("try_wait") {
                assert!(status.success(), "the writer failed: {status}");
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A write completes within 2 s.
    fn assert_writable(&mut self, what: &str) {
        let p = self.probe();
        assert!(self.probe_done_within(p, Duration::from_secs(2)), "{what}: the file system is not writable");
    }

    /// A write is still blocked after 1 s; returns the probe.
    fn assert_frozen(&mut self, what: &str) -> usize {
        let p = self.probe();
        assert!(!self.probe_done_within(p, Duration::from_secs(1)), "{what}: a write completed on a frozen file system");
        p
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mnt).stderr(Stdio::null()).status();
        for p in &mut self.probes {
            let _ = p.wait();
        }
        let mut unmounted = false;
        for _ in 0..50 {
            if Command::new("umount").arg(&self.mnt).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                unmounted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn freeze_blocks_writes_until_thaw() {
    let mut fs = LoopFs::new();
    fs.assert_writable("before the freeze");
    let out = ok(fs.agent("freeze", &["--mount", fs.mnt(), "--deadline", "60s", "--output", "json"]));
    let report = json(&out);
    assert_eq!(report["state"], "frozen", "{out}");
    let pid = report["watchdog_pid"].as_u64().expect("watchdog pid");
    assert!(pid_alive(pid), "the watchdog holds the freeze after `dr-agent freeze` exits");
    let blocked = fs.assert_frozen("after freeze");
    // The record lives in state_dir/freeze, on a file system that is not frozen.
    let records: Vec<_> = std::fs::read_dir(fs.state_dir().join("freeze")).expect("records").flatten().collect();
    assert!(records.iter().any(|e| e.path().extension().is_some_and(|x| x == "json")), "a freeze record exists");

    let out = ok(fs.agent("thaw", &["--output", "json"]));
    let report = json(&out);
    assert_eq!(report["mounts"][0]["outcome"], "thawed", "{out}");
    assert_eq!(report["already_done"], false);
    assert!(report["frozen_for_ms"].as_u64().expect("frozen_for_ms") >= 1000, "{out}");
    assert!(fs.probe_done_within(blocked, Duration::from_secs(5)), "the blocked write completes after the thaw");
    dr_tests::assert_eventually!(Duration::from_secs(5), !pid_alive(pid), "the watchdog exits after the thaw");
    fs.assert_writable("after thaw");
}

#[test]
fn sigkill_of_the_agents_process_group_thaws_at_once() {
    let mut fs = LoopFs::new();
    let log = std::fs::File::create(fs.dir.path().join("agent.log")).expect("log");
    let mut agent = fs
        .agent("freeze", &["--mount", fs.mnt(), "--deadline", "60s", "--hold"])
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("spawn dr-agent freeze --hold");
    let stdout = agent.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("dr-agent freeze --hold reports the freeze");
    assert!(first.starts_with("Frozen:"), "{first}");
    let blocked = fs.assert_frozen("while the agent holds the freeze");

    // SIGKILL to the agent's whole process group: the watchdog, in its own
    // session, is not in it.
    // SAFETY: kill(2) on the process group of a child we started.
    let rc = unsafe { libc::kill(-(agent.id() as i32), libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 -<pgid>");
    let killed = Instant::now();
    let _ = agent.wait();
    assert!(fs.probe_done_within(blocked, Duration::from_secs(3)), "the file system is thawed within 3 s of the agent's death");
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "thawed {took:?} after SIGKILL, long before the 60 s deadline");
    fs.assert_writable("after the agent died");
    // The record says why.
    let out = ok(fs.agent("thaw", &["--output", "json"]));
    let report = json(&out);
    assert_eq!(report["already_done"], true, "{out}");
    assert!(report["reason"].as_str().unwrap_or_default().contains("pipe closed"), "{out}");
}

#[test]
fn nobody_thaws_then_the_deadline_does() {
    let mut fs = LoopFs::new();
    let out = ok(fs.agent("freeze", &["--mount", fs.mnt(), "--deadline", "3s"]));
    let frozen = Instant::now();
    assert!(out.contains("Frozen:"), "{out}");
    let blocked = fs.assert_frozen("after a hand-run freeze");
    assert!(fs.probe_done_within(blocked, Duration::from_secs(5)), "thawed at the 3 s deadline");
    let at = frozen.elapsed();
    assert!(at >= Duration::from_millis(1500) && at < Duration::from_secs(5), "thawed after {at:?}");
    fs.assert_writable("after the deadline");
    let out = ok(fs.agent("thaw", &[]));
    assert!(out.contains("Already done") && out.contains("deadline"), "{out}");
}

#[test]
fn refuses_root_the_journal_fs_and_non_mount_points() {
    let mut fs = LoopFs::new();
    let out = run(&mut fs.agent("freeze", &["--mount", "/", "--deadline", "3s"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("root file system"), "{}", text(&out.stderr));

    let sub = fs.mnt.join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let out = run(&mut fs.agent("freeze", &["--mount", sub.to_str().expect("utf-8"), "--deadline", "3s"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not a mount point"), "{}", text(&out.stderr));

    // The agent's journal on the loop fs: that fs cannot be frozen.
    let config = fs.dir.path().join("journal-on-fs.toml");
    std::fs::write(&config, format!("state_dir = \"{}\"\n", fs.mnt.join("state").display())).expect("config");
    let out = run(Command::new(bin("dr-agent")).args(["freeze", "--config"]).arg(&config).args(["--mount", fs.mnt(), "--deadline", "3s"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("journal"), "{}", text(&out.stderr));
    fs.assert_writable("after the refusals");
}

#[test]
fn already_frozen_and_already_thawed_are_reported() {
    let mut fs = LoopFs::new();
    let out = ok(fs.agent("thaw", &["--mount", fs.mnt(), "--output", "json"]));
    let report = json(&out);
    assert_eq!(report["already_done"], true, "{out}");
    assert_eq!(report["mounts"][0]["outcome"], "already thawed", "{out}");

    let out = ok(fs.agent("freeze", &["--mount", fs.mnt(), "--deadline", "30s", "--dry-run"]));
    assert!(out.contains("Would freeze"), "{out}");
    fs.assert_writable("after a dry run");

    let first = json(&ok(fs.agent("freeze", &["--mount", fs.mnt(), "--deadline", "30s", "--output", "json"])));
    let again = json(&ok(fs.agent("freeze", &["--mount", fs.mnt(), "--deadline", "30s", "--output", "json"])));
    assert_eq!(again["state"], "already frozen", "{again}");
    assert_eq!(again["watchdog_pid"], first["watchdog_pid"]);
    let blocked = fs.assert_frozen("frozen once");
    let out = ok(fs.agent("thaw", &["--mount", fs.mnt()]));
    assert!(out.contains("Thawed after"), "{out}");
    assert!(fs.probe_done_within(blocked, Duration::from_secs(5)));

    // Frozen by someone else: refused, and `thaw` can still lift it.
    ok(Command::new("fsfreeze").arg("-f").arg(&fs.mnt));
    let out = run(&mut fs.agent("freeze", &["--mount", fs.mnt(), "--deadline", "30s"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("already frozen by another process"), "{}", text(&out.stderr));
    let blocked = fs.assert_frozen("frozen by fsfreeze");
    let out = ok(fs.agent("thaw", &["--mount", fs.mnt()]));
    assert!(out.contains("thawed") && out.contains("outside dr-agent"), "{out}");
    assert!(fs.probe_done_within(blocked, Duration::from_secs(5)));
}

#[test]
fn an_agent_left_alone_is_thawed_at_the_deadline() {
    // The agent lives and holds the pipe, but nobody (no controller) asks
    // for the thaw: the watchdog lifts the freeze at the deadline.
    let mut fs = LoopFs::new();
    let (mut agent, rx, first) = hold(&fs, "3s");
    let frozen = Instant::now();
    assert!(first.starts_with("Frozen:"), "{first}");
    let blocked = fs.assert_frozen("held by a live agent");
    assert!(fs.probe_done_within(blocked, Duration::from_secs(5)), "thawed at the deadline");
    assert!(frozen.elapsed() < Duration::from_secs(5), "thawed after {:?}", frozen.elapsed());
    let rest: Vec<String> = rx.iter().take_while(|_| true).collect();
    let status = agent.wait().expect("the agent exits after the watchdog lifted the freeze");
    assert!(status.success(), "{status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("deadline")), "the agent reports who thawed: {rest:?}");
}

/// `dr-agent freeze --hold` with this deadline: the agent, its output lines
/// (after the first) and the first line (the freeze report).
fn hold(fs: &LoopFs, deadline: &str) -> (Child, std::sync::mpsc::Receiver<String>, String) {
    let log = std::fs::File::create(fs.dir.path().join("agent.log")).expect("log");
    let mut agent = fs
        .agent("freeze", &["--mount", fs.mnt(), "--deadline", deadline, "--hold"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn dr-agent freeze --hold");
    let stdout = agent.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("the freeze is reported");
    (agent, rx, first)
}

/// Kills (SIGKILL, also ends a stopped process) a pid on drop.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) of a watchdog this test started (through the agent).
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

#[test]
fn a_stopped_watchdog_is_noticed_by_the_agent_which_thaws_and_kills_it() {
    let mut fs = LoopFs::new();
    let (mut agent, _rx, first) = hold(&fs, "2s");
    let pid: i32 = first
        .split("Watchdog pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no watchdog pid in `{first}`"));
    let _kill = KillOnDrop(pid);
    // SAFETY: kill(2) of the watchdog this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP the watchdog");
    let stopped = Instant::now();
    let blocked = fs.assert_frozen("held by a stopped watchdog");
    // Deadline 2 s + grace 3 s + a 2 s status question: thawed by the agent.
    assert!(fs.probe_done_within(blocked, Duration::from_secs(15)), "the agent thaws past the deadline");
    assert!(stopped.elapsed() >= Duration::from_secs(2), "not before the deadline");
    let t0 = Instant::now();
    while pid_alive(pid as u64) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_alive(pid as u64), "the stuck watchdog is killed");
    let status = agent.wait().expect("the agent exits");
    assert!(status.success(), "{status}");
    fs.assert_writable("after the agent's own thaw");
}
