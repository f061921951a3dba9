//! The harness itself: a killed test run leaves no process behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use dr_tests::*;

const HOLDER_ENV: &str = "DR_TEST_PROC_HOLDER";

/// Whether `pid` is still a live process (a zombie waiting to be reaped
/// counts as gone: it runs nothing).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Run by `children_die_with_a_killed_test_run` in a child test process:
/// starts a long-running [`Proc`] from the test thread, prints its pid and
/// waits to be killed.
#[test]
#[ignore = "a helper: run by children_die_with_a_killed_test_run"]
fn proc_holder() {
    let dir = std::env::var(HOLDER_ENV).expect("DR_TEST_PROC_HOLDER names a directory (run by another test)");
    let proc = Proc::spawn("sleep", Command::new("sleep").arg("600"), &Path::new(&dir).join("sleep.log"));
    println!("holder-pid {}", proc.child.id());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn children_die_with_a_killed_test_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut holder = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--ignored", "--exact", "harness::proc_holder", "--nocapture", "--test-threads", "1"])
        .env(HOLDER_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the holder test");
    let mut lines = BufReader::new(holder.stdout.take().expect("stdout")).lines();
    let pid: u32 = loop {
        let line = lines.next().expect("the holder prints the pid of its child").expect("read");
        // libtest prints `test proc_holder ... ` without a newline first.
        if let Some((_, pid)) = line.split_once("holder-pid ") {
            break pid.trim().parse().expect("a pid");
        }
    };
    assert!(alive(pid), "the holder's child {pid} runs");

    // SIGKILL: no destructor runs, so only PR_SET_PDEATHSIG can end the child.
    holder.kill().expect("kill the holder");
    holder.wait().expect("reap the holder");
    assert_eventually!(Duration::from_secs(5), !alive(pid), "the child {pid} of a killed test process is gone");
}
