//! What the benchmark binaries share: the controller process they start,
//! the limits they raise, and how they read its CPU and memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Proc, aws_env};

/// The controller's default `server.listen_backlog`.
pub const BACKLOG: u32 = 16384;
/// Descriptors the bench and the controller it starts may open.
pub const NOFILE: u64 = 65536;

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// VmRSS of a process, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn raise_limits() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < NOFILE {
            let old = (lim.rlim_cur, lim.rlim_max);
            let new = libc::rlimit { rlim_cur: NOFILE, rlim_max: NOFILE.max(lim.rlim_max) };
            // Without CAP_SYS_RESOURCE the hard limit cannot rise: take it.
            let soft = libc::rlimit { rlim_cur: NOFILE.min(lim.rlim_max), rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                println!(
                    "changed: RLIMIT_NOFILE {}/{} -> {}/{} (this process and the controller it starts)",
                    old.0, old.1, new.rlim_cur, new.rlim_max
                );
            } else if soft.rlim_cur > old.0 && libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
                println!("changed: RLIMIT_NOFILE {}/{} -> {}/{} (hard limit cannot rise here)", old.0, old.1, soft.rlim_cur, soft.rlim_max);
            } else {
                println!(
                    "note: RLIMIT_NOFILE stays {}/{} (raising it: {}); the bench and the controller each need about one descriptor per agent",
                    old.0,
                    old.1,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Puts net.core.somaxconn back when dropped (also when a phase panics).
pub struct RestoreSomaxconn(pub Option<String>);

impl Drop for RestoreSomaxconn {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write("/proc/sys/net/core/somaxconn", old);
        }
    }
}

/// Raises net.core.somaxconn to the controller's backlog; returns the old
/// value to restore.
pub fn raise_somaxconn() -> Option<String> {
    let path = "/proc/sys/net/core/somaxconn";
    let old = std::fs::read_to_string(path).ok()?.trim().to_owned();
    if old.parse::<u32>().ok()? >= BACKLOG {
        return None;
    }
    match std::fs::write(path, BACKLOG.to_string()) {
        Ok(()) => {
            println!("changed: net.core.somaxconn {old} -> {BACKLOG} (restored at the end)");
            Some(old)
        }
        Err(e) => {
            println!("warning: cannot raise net.core.somaxconn from {old}: {e}; the backlog is capped at {old}");
            None
        }
    }
}

pub fn default_controller() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let profile_dir = exe.parent().expect("target/<profile>");
    let release = profile_dir.parent().map(|t| t.join("release/dr-controller"));
    match release {
        Some(r) if r.exists() => r,
        _ => crate::bin("dr-controller"),
    }
}

pub fn profile_of(path: &Path) -> &'static str {
    match path.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()) {
        Some("release") => "release",
        Some("debug") => "DEBUG build (unoptimised: CPU and latency figures are pessimistic)",
        _ => "unknown build profile",
    }
}

pub fn spawn_controller(bin: &Path, config: &Path, log: &Path) -> Proc {
    let mut cmd = Command::new(bin);
    aws_env(&mut cmd).arg("--config").arg(config).env_remove("RUST_LOG");
    Proc::spawn("dr-controller", &mut cmd, log)
}

pub async fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
