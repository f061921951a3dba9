//! The watchdog: a process outside the agent that freezes the mounts
//! itself, and thaws them when asked (a `thaw` line on stdin or on its
//! control socket), when its stdin closes (the agent died), when it gets
//! SIGTERM/SIGINT/SIGHUP, or at the deadline, whichever comes first.
//!
//! Between the freeze and the thaw it writes nothing to any file: only to
//! its stdout pipe and to control-socket peers. It logs only after the thaw.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use super::fs::{self, FreezeOutcome, ThawOutcome};
use super::{FreezeRecord, MountThaw, WatchdogError, WatchdogFrozen, WatchdogThawed, unix_ms, write_record};

/// What the watchdog was started with.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub id: String,
    pub mounts: Vec<PathBuf>,
    pub deadline: Duration,
    pub socket: Option<PathBuf>,
    pub record: Option<PathBuf>,
    /// Hand-run freeze: stdin is not the agent's pipe; its EOF means nothing.
    pub detached: bool,
}

enum Event {
    /// A `thaw` request; the answer goes to the socket peer if there is one.
    Thaw(&'static str, Option<UnixStream>),
    Status(UnixStream),
    StdinClosed,
    Signal(Signal),
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // The reader may be gone (a hand-run freeze exits): that is fine.
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn emit_error(kind: &str, path: Option<&Path>, message: String) {
    let e = WatchdogError { kind: kind.to_owned(), path: path.map(Path::to_path_buf), message };
    emit(&format!("error {}", serde_json::to_string(&e).expect("serializes")));
}

/// Runs the watchdog; returns the process exit code.
pub(crate) fn run(opts: Options) -> u8 {
    // Signals are taken by a thread (sigwait) so that none ends the process
    // while a file system is frozen. Block them before any thread exists.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        emit_error("setup", None, format!("cannot block signals: {e}"));
        return 1;
    }
    // The OOM killer must not pick the process that holds the thaw.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");

    let started = Instant::now();
    let deadline_at = started + opts.deadline;
    let mut files: Vec<(PathBuf, File)> = Vec::new();
    for m in &opts.mounts {
        match fs::open_mount(m) {
            Ok(f) => files.push((m.clone(), f)),
            Err(e) => {
                emit_error("io", Some(m), e.to_string());
                return 1;
            }
        }
    }
    let listener = match &opts.socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            match UnixListener::bind(path) {
                Ok(l) => Some(l),
                Err(e) => {
                    emit_error("io", Some(path), format!("cannot listen on {}: {e}", path.display()));
                    return 1;
                }
            }
        }
        None => None,
    };
    let mut record = FreezeRecord {
        id: opts.id.clone(),
        pid: std::process::id(),
        mounts: opts.mounts.clone(),
        socket: opts.socket.clone(),
        deadline_ms: opts.deadline.as_millis() as u64,
        started_unix_ms: unix_ms(),
        thaw_by_unix_ms: unix_ms() + opts.deadline.as_millis() as u64,
        state: "active".to_owned(),
        thawed: None,
        thawed_unix_ms: None,
        identity: Some(match opts.record.as_deref().and_then(Path::parent).and_then(Path::parent) {
            Some(state_dir) => crate::sys::identity::for_records(state_dir, Path::new(crate::sys::facts::BOOT_ID_PATH)),
            None => crate::sys::identity::Identity {
                instance_id: None,
                boot_id: crate::sys::facts::read_boot_id(Path::new(crate::sys::facts::BOOT_ID_PATH)).unwrap_or_default(),
            },
        }),
    };
    // Written before the freeze: nothing is written while frozen.
    if let Some(path) = &opts.record
        && let Err(e) = write_record(path, &record)
    {
        emit_error("io", Some(path), e.to_string());
        cleanup(&opts);
        return 1;
    }

    let mut frozen: Vec<usize> = Vec::new();
    for (i, (path, file)) in files.iter().enumerate() {
        let outcome = fs::fifreeze(file, path);
        match outcome {
            Ok(FreezeOutcome::Frozen) => frozen.push(i),
            Ok(FreezeOutcome::AlreadyFrozen) | Err(_) => {
                for &j in &frozen {
                    let _ = thaw_retrying(&files[j].1, &files[j].0);
                }
                match outcome {
                    Ok(_) => emit_error(
                        "already_frozen",
                        Some(path),
                        format!("{} is already frozen by another process (FIFREEZE: EBUSY)", path.display()),
                    ),
                    Err(e) => emit_error("io", Some(path), e.to_string()),
                }
                cleanup(&opts);
                return 1;
            }
        }
    }
    let frozen_at = Instant::now();
    let hello = WatchdogFrozen {
        pid: std::process::id(),
        mounts: opts.mounts.clone(),
        freeze_took_ms: frozen_at.duration_since(started).as_millis() as u64,
        deadline_ms: opts.deadline.as_millis() as u64,
        thaw_by_unix_ms: record.thaw_by_unix_ms,
        frozen_for_ms: 0,
    };
    emit(&format!("frozen {}", serde_json::to_string(&hello).expect("serializes")));

    let (tx, rx) = mpsc::channel::<Event>();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = tx.send(Event::Signal(sig));
            }
        });
    }
    if !opts.detached {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line {
                    Ok(l) if l.trim() == "thaw" => {
                        let _ = tx.send(Event::Thaw("asked by the agent", None));
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(Event::StdinClosed);
        });
    }
    if let Some(listener) = listener {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let read = stream.try_clone().map(|s| BufReader::new(s).read_line(&mut line));
                if !matches!(read, Ok(Ok(_))) {
                    continue;
                }
                let event = match line.trim() {
                    "thaw" => Event::Thaw("asked over the control socket (dr-agent thaw)", Some(stream)),
                    "status" => Event::Status(stream),
                    other => {
                        let _ = writeln!(stream, "error unknown command `{other}`");
                        continue;
                    }
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);

    let (reason, mut peer) = loop {
        let left = deadline_at.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Err(mpsc::RecvTimeoutError::Timeout) => break ("the deadline passed".to_owned(), None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Nothing left that could ask: wait for the deadline.
                std::thread::sleep(deadline_at.saturating_duration_since(Instant::now()));
                break ("the deadline passed".to_owned(), None);
            }
            Ok(Event::Thaw(why, peer)) => break (why.to_owned(), peer),
            Ok(Event::StdinClosed) => break ("the agent went away (its pipe closed)".to_owned(), None),
            Ok(Event::Signal(sig)) => break (format!("{sig} received"), None),
            Ok(Event::Status(mut s)) => {
                let status = WatchdogFrozen { frozen_for_ms: frozen_at.elapsed().as_millis() as u64, ..hello.clone() };
                let _ = writeln!(s, "frozen {}", serde_json::to_string(&status).expect("serializes"));
            }
        }
    };

    // Thaw first, everything else after.
    let mut outcomes = Vec::new();
    for (path, file) in &files {
        let outcome = match thaw_retrying(file, path) {
            Ok(ThawOutcome::Thawed) => "thawed".to_owned(),
            Ok(ThawOutcome::NotFrozen) => "already thawed".to_owned(),
            Err(e) => format!("FAILED: {e}"),
        };
        outcomes.push(MountThaw { path: path.clone(), outcome });
    }
    let frozen_for_ms = frozen_at.elapsed().as_millis() as u64;
    let failed = outcomes.iter().any(|o| o.outcome.starts_with("FAILED"));
    let thawed = WatchdogThawed { reason: reason.clone(), frozen_for_ms, mounts: outcomes };
    // Thawed: now the record may be written (before answering, so that a
    // reader who removes it after the answer removes the final version).
    if let Some(path) = &opts.socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(path) = &opts.record {
        record.state = "thawed".to_owned();
        record.thawed = Some(thawed.clone());
        record.thawed_unix_ms = Some(unix_ms());
        if let Err(e) = write_record(path, &record) {
            tracing::warn!(error = %e, "cannot update the freeze record");
        }
    }
    let line = format!("thawed {}", serde_json::to_string(&thawed).expect("serializes"));
    emit(&line);
    if let Some(s) = peer.as_mut() {
        let _ = writeln!(s, "{line}");
    }
    // Nobody may read stdout any more (a hand-run freeze, a dead agent):
    // point it at /dev/null so nothing after this fails on a broken pipe.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
    }
    tracing::info!(id = %opts.id, reason = %reason, frozen_for_ms, mounts = ?opts.mounts, "freeze lifted");
    u8::from(failed)
}

/// FITHAW, retried a few times on an unexpected error (never on EINVAL).
fn thaw_retrying(file: &File, path: &Path) -> Result<ThawOutcome, super::FreezeError> {
    let mut last = None;
    for _ in 0..20 {
        match fs::fithaw(file, path) {
            Ok(o) => return Ok(o),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

fn cleanup(opts: &Options) {
    if let Some(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &opts.record {
        let _ = std::fs::remove_file(p);
    }
}
