//! Freezing data file systems (FIFREEZE/FITHAW) under a watchdog that
//! thaws them at the deadline, also when the agent dies.
//!
//! The agent never freezes anything itself: it spawns `dr-agent
//! freeze-watchdog` (its own executable) in a new session, with a pipe on
//! its stdin. The watchdog freezes the mounts, says `frozen {json}` on
//! stdout, and thaws when asked (`thaw` on stdin or on its control socket),
//! when the pipe closes (the agent died, SIGKILL included), on
//! SIGTERM/SIGINT/SIGHUP, or at the deadline. It never exits with a file
//! system still frozen unless it is itself SIGKILLed (it sets its
//! oom_score_adj to -1000; under systemd it runs in its own scope, see
//! [`WATCHDOG_SCOPE_ENV`]).
//!
//! Each freeze is recorded in `state_dir/freeze/<id>.json` (written before
//! the freeze; the journal's file system cannot be frozen unless allowed)
//! with a control socket `state_dir/freeze/<id>.sock`, so that `dr-agent
//! thaw` can find and ask the watchdog. The agent writes nothing while
//! frozen; the watchdog writes only to its pipe and socket peers.
//!
//! Two ways to freeze:
//! - [`freeze`] / [`thaw`] (the backup path): the handle owns the pipe;
//!   dropping it without [`thaw`] makes the watchdog thaw at once.
//! - [`run`] (hand-run `dr-agent freeze`): the watchdog is detached (stdin
//!   is /dev/null) and holds the freeze until [`run_thaw`] (`dr-agent
//!   thaw`) or the deadline.

pub(crate) mod fs;
pub(crate) mod watchdog;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) use dr_proto::contract::{FreezeParams, FreezeReport, MountThaw, ThawParams, ThawReport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::config::Config;
use crate::steps::error::ErrorKind;

/// `auto` (default): run the watchdog through `systemd-run --scope` when the
/// agent runs under systemd (INVOCATION_ID set, /run/systemd/system exists,
/// systemd-run installed), so that stopping or killing the agent's unit
/// does not kill the watchdog. `off`: never. `systemd-run`: always.
pub(crate) const WATCHDOG_SCOPE_ENV: &str = "DR_AGENT_WATCHDOG_SCOPE";

/// Longest freeze accepted: a frozen file system blocks every writer.
pub(crate) const MAX_DEADLINE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub(crate) enum FreezeError {
    #[error("{0}")]
    Input(String),
    #[error("refusing to freeze {path}: it is the root file system (set freeze.allow_root = true to allow it)")]
    RootRefused { path: PathBuf },
    #[error(
        "refusing to freeze {path}: it holds the agent's journal (state_dir {state_dir}, on the file system of {at}); set freeze.allow_journal_fs = true to allow it"
    )]
    JournalFsRefused { path: PathBuf, state_dir: PathBuf, at: PathBuf },
    #[error("refusing to freeze {path}: it is not a mount point (see /proc/self/mountinfo)")]
    NotAMountPoint { path: PathBuf },
    #[error("{path} is already frozen {by}")]
    AlreadyFrozen { path: PathBuf, by: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("freeze watchdog: {0}")]
    Watchdog(String),
}

impl FreezeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FreezeError::Input(_) => ErrorKind::Invalid,
            FreezeError::RootRefused { .. }
            | FreezeError::JournalFsRefused { .. }
            | FreezeError::NotAMountPoint { .. }
            | FreezeError::AlreadyFrozen { .. } => ErrorKind::Refused,
            FreezeError::Io { .. } | FreezeError::Watchdog(_) => ErrorKind::Failed,
        }
    }
}

/// The watchdog's `frozen {json}` line (and its `status` answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct WatchdogFrozen {
    pub pid: u32,
    pub mounts: Vec<PathBuf>,
    pub freeze_took_ms: u64,
    pub deadline_ms: u64,
    pub thaw_by_unix_ms: u64,
    /// In a `status` answer: frozen for this long so far.
    pub frozen_for_ms: u64,
}

/// The watchdog's `thawed {json}` line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct WatchdogThawed {
    pub reason: String,
    pub frozen_for_ms: u64,
    pub mounts: Vec<MountThaw>,
}

/// The watchdog's `error {json}` line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct WatchdogError {
    /// `already_frozen`, `io`, `setup`.
    pub kind: String,
    pub path: Option<PathBuf>,
    pub message: String,
}

/// state_dir/freeze/<id>.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FreezeRecord {
    pub id: String,
    pub pid: u32,
    pub mounts: Vec<PathBuf>,
    pub socket: Option<PathBuf>,
    pub deadline_ms: u64,
    pub started_unix_ms: u64,
    pub thaw_by_unix_ms: u64,
    /// `active` (written just before the freeze) or `thawed`.
    pub state: String,
    pub thawed: Option<WatchdogThawed>,
    pub thawed_unix_ms: Option<u64>,
    /// The instance and boot the freeze was made under (records of older
    /// agents have none: taken as the identity recorded before this one).
    #[serde(default)]
    pub identity: Option<crate::sys::identity::Identity>,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Writes a record atomically ([`crate::sys::atomic::write`]).
pub(crate) fn write_record(path: &Path, record: &FreezeRecord) -> Result<(), FreezeError> {
    let bytes = serde_json::to_string_pretty(record).expect("records serialize");
    crate::sys::atomic::write(path, bytes.as_bytes(), 0o600)
        .map_err(|e| FreezeError::Io { what: format!("cannot {} {}", e.what, e.path.display()), source: e.source })
}

fn freeze_dir(config: &Config) -> PathBuf {
    config.state_dir.join("freeze")
}

/// The records in state_dir/freeze (unreadable ones are skipped with a
/// warning). Records of another boot (or instance) are stale: no file
/// system stays frozen across a reboot or a restore, and their pid and
/// socket name nothing of this boot. They are reported and (unless
/// `dry_run`) removed; nothing is ever thawed or asked by them.
fn load_records(config: &Config, dry_run: bool, warnings: &mut Vec<String>) -> Vec<(PathBuf, FreezeRecord)> {
    let dir = freeze_dir(config);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let live_boot = crate::sys::facts::read_boot_id(Path::new(crate::sys::facts::BOOT_ID_PATH)).unwrap_or_default();
    let recorded = crate::sys::identity::load(&config.state_dir).ok().flatten();
    let assumed = crate::sys::identity::assumed_for_old_records(recorded.as_ref());
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<FreezeRecord>(&t).map_err(|e| e.to_string()))
        {
            Ok(r) => {
                let written = r.identity.clone().or_else(|| assumed.clone());
                match written {
                    Some(w) if !w.boot_id.is_empty() && !live_boot.is_empty() && w.boot_id != live_boot => {
                        warnings.push(format!(
                            "stale freeze record {} (watchdog pid {}, {}) was written under {w}, not this boot ({live_boot}): a freeze does not outlive a reboot or restore; {} it, thawing nothing by it",
                            path.display(),
                            r.pid,
                            r.mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", "),
                            if dry_run { "would clear" } else { "cleared" }
                        ));
                        tracing::warn!(record = %path.display(), written = %w, boot = %live_boot, "stale freeze record");
                        if !dry_run {
                            let _ = std::fs::remove_file(&path);
                            if let Some(sock) = &r.socket {
                                let _ = std::fs::remove_file(sock);
                            }
                        }
                    }
                    _ => out.push((path, r)),
                }
            }
            Err(e) => warnings.push(format!("ignoring unreadable freeze record {}: {e}", path.display())),
        }
    }
    out.sort_by_key(|r| r.1.started_unix_ms);
    out
}

/// Asks a watchdog over its socket; `None` when nobody answers (it is gone).
fn ask(socket: &Path, command: &str, timeout: Duration) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    writeln!(s, "{command}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    (!line.is_empty()).then(|| line.trim_end().to_owned())
}

/// A live watchdog's status, if it answers.
fn live_status(record: &FreezeRecord) -> Option<WatchdogFrozen> {
    let socket = record.socket.as_ref()?;
    let line = ask(socket, "status", Duration::from_secs(5))?;
    serde_json::from_str(line.strip_prefix("frozen ")?).ok()
}

/// Checks what a freeze would act on: the mounts (canonical), the deadline.
fn plan(config: &Config, params: &FreezeParams) -> Result<(Vec<fs::CheckedMount>, Vec<String>), FreezeError> {
    if params.deadline.is_zero() || params.deadline > MAX_DEADLINE {
        return Err(FreezeError::Input(format!(
            "deadline {} must be more than 0 and at most {}",
            humantime::format_duration(params.deadline),
            humantime::format_duration(MAX_DEADLINE)
        )));
    }
    let mounts = if params.mounts.is_empty() { &config.freeze.mounts } else { &params.mounts };
    let table = fs::mount_table()?;
    let policy = fs::Policy {
        allow_root: config.freeze.allow_root,
        allow_journal_fs: config.freeze.allow_journal_fs,
        state_dir: &config.state_dir,
        table: &table,
    };
    fs::check_mounts(mounts, &policy)
}

/// Refuses mounts held by a live dr-agent watchdog; returns that freeze's
/// record when it holds exactly these mounts. Removes records of lifted freezes.
fn existing_freeze(
    config: &Config,
    mounts: &[fs::CheckedMount],
    dry_run: bool,
    warnings: &mut Vec<String>,
) -> Result<Option<(PathBuf, FreezeRecord, WatchdogFrozen)>, FreezeError> {
    for (path, record) in load_records(config, dry_run, warnings) {
        let live = if record.state == "active" { live_status(&record) } else { None };
        let Some(status) = live else {
            if record.state == "active" {
                warnings.push(format!(
                    "freeze record {} names watchdog pid {} which does not answer: if {} are still frozen, run `dr-agent thaw`",
                    path.display(),
                    record.pid,
                    record.mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
                ));
            } else if !dry_run {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        let ours: Vec<&PathBuf> = mounts.iter().map(|m| &m.path).collect();
        if record.mounts.iter().collect::<Vec<_>>() == ours {
            return Ok(Some((path, record, status)));
        }
        if let Some(m) = record.mounts.iter().find(|m| ours.contains(m)) {
            return Err(FreezeError::AlreadyFrozen {
                path: m.clone(),
                by: format!(
                    "by dr-agent watchdog pid {} (record {}), which thaws it by {}; run `dr-agent thaw` first",
                    record.pid,
                    path.display(),
                    rfc3339(record.thaw_by_unix_ms)
                ),
            });
        }
    }
    Ok(None)
}

/// Whether to wrap the watchdog in `systemd-run --scope`.
fn systemd_run() -> Option<PathBuf> {
    let mode = std::env::var(WATCHDOG_SCOPE_ENV).unwrap_or_else(|_| "auto".to_owned());
    let found = ["/usr/bin/systemd-run", "/bin/systemd-run"].into_iter().map(PathBuf::from).find(|p| p.exists());
    match mode.as_str() {
        "off" => None,
        "systemd-run" => found,
        _ => {
            let under_systemd = std::env::var_os("INVOCATION_ID").is_some() && Path::new("/run/systemd/system").exists();
            if under_systemd { found } else { None }
        }
    }
}

struct Spawned {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    frozen: WatchdogFrozen,
}

/// Starts a watchdog and waits for its first line.
async fn spawn_watchdog(
    config: &Config,
    mounts: &[fs::CheckedMount],
    deadline: Duration,
    detached: bool,
) -> Result<(Spawned, PathBuf), FreezeError> {
    let dir = freeze_dir(config);
    std::fs::create_dir_all(&dir).map_err(|source| FreezeError::Io { what: format!("cannot create {}", dir.display()), source })?;
    let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let id = format!("{}-{}", unix_ms(), std::process::id());
    let record = dir.join(format!("{id}.json"));
    let socket = dir.join(format!("{id}.sock"));
    let exe =
        std::env::current_exe().map_err(|source| FreezeError::Io { what: "cannot find the dr-agent executable".to_owned(), source })?;
    let mut args: Vec<std::ffi::OsString> = vec!["freeze-watchdog".into(), "--id".into(), id.clone().into()];
    for m in mounts {
        args.push("--mount".into());
        args.push(m.path.clone().into());
    }
    args.extend(["--deadline-ms".into(), deadline.as_millis().to_string().into()]);
    args.extend(["--socket".into(), socket.clone().into_os_string(), "--record".into(), record.clone().into_os_string()]);
    if detached {
        args.push("--detached".into());
    }
    let scope = systemd_run();
    let mut attempts: Vec<Option<PathBuf>> = vec![scope.clone()];
    if scope.is_some() {
        attempts.push(None);
    }
    let mut last_err = String::new();
    for wrapper in attempts {
        let mut cmd = match &wrapper {
            Some(sr) => {
                let mut c = tokio::process::Command::new(sr);
                c.args(["--scope", "--quiet", "--collect"])
                    .arg(format!("--unit=dr-agent-freeze-{id}"))
                    .arg("--description=dr-agent freeze watchdog")
                    .arg("--")
                    .arg(&exe);
                c
            }
            None => tokio::process::Command::new(&exe),
        };
        cmd.args(&args).stdout(Stdio::piped()).kill_on_drop(false);
        if detached {
            let log = dir.join(format!("{id}.log"));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|source| FreezeError::Io { what: format!("cannot open {}", log.display()), source })?;
            cmd.stdin(Stdio::null()).stderr(f);
        } else {
            cmd.stdin(Stdio::piped()).stderr(Stdio::inherit());
        }
        // Its own session and process group: signals to the agent's group
        // do not reach it.
        crate::sys::fsfreeze::in_own_session(&mut cmd);
        let mut child =
            cmd.spawn().map_err(|source| FreezeError::Io { what: format!("cannot start the watchdog {}", exe.display()), source })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        // FIFREEZE flushes dirty data first: it may take a while.
        let wait = deadline + Duration::from_secs(30);
        let first = match tokio::time::timeout(wait, lines.next_line()).await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(FreezeError::Watchdog(format!("reading its output: {e}"))),
            Err(_) => {
                // Closing its stdin makes it thaw whatever it froze.
                return Err(FreezeError::Watchdog(format!("no answer within {}", humantime::format_duration(wait))));
            }
        };
        match first {
            Some(line) if line.starts_with("frozen ") => {
                let frozen: WatchdogFrozen = serde_json::from_str(&line["frozen ".len()..])
                    .map_err(|e| FreezeError::Watchdog(format!("unexpected line `{line}`: {e}")))?;
                if !detached {
                    guard(frozen.pid, frozen.mounts.clone(), socket.clone(), record.clone(), deadline);
                }
                return Ok((Spawned { child, stdin, lines, frozen }, record));
            }
            Some(line) if line.starts_with("error ") => {
                let _ = child.wait().await;
                let e: WatchdogError = serde_json::from_str(&line["error ".len()..])
                    .map_err(|e| FreezeError::Watchdog(format!("unexpected line `{line}`: {e}")))?;
                return Err(match (e.kind.as_str(), e.path) {
                    ("already_frozen", Some(path)) => FreezeError::AlreadyFrozen {
                        path,
                        by: "by another process, not by a dr-agent watchdog (FIFREEZE said EBUSY); thaw it with `dr-agent thaw --mount` or `fsfreeze -u` first".to_owned(),
                    },
                    _ => FreezeError::Watchdog(e.message),
                });
            }
            other => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                last_err = format!("it exited ({status}) without a word: {other:?}");
                if let Some(sr) = &wrapper {
                    tracing::warn!(systemd_run = %sr.display(), error = %last_err, "the watchdog did not start in its own scope; starting it directly");
                }
            }
        }
    }
    Err(FreezeError::Watchdog(last_err))
}

/// How long after its deadline a watchdog that has not lifted the freeze
/// (and does not answer) is taken for stuck (SIGSTOP, a debugger).
pub(crate) const WATCHDOG_GRACE: Duration = Duration::from_secs(3);

/// The agent's own check of its watchdog: at the deadline plus
/// [`WATCHDOG_GRACE`], if the freeze is still recorded as active, the
/// watchdog process lives and it does not answer `status` on its socket
/// within 2 s, the agent thaws the mounts itself (FITHAW) and kills the
/// watchdog (SIGKILL also ends a stopped process).
fn guard(pid: u32, mounts: Vec<PathBuf>, socket: PathBuf, record: PathBuf, deadline: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(deadline + WATCHDOG_GRACE).await;
        let _ = tokio::task::spawn_blocking(move || {
            let active = std::fs::read_to_string(&record)
                .ok()
                .and_then(|t| serde_json::from_str::<FreezeRecord>(&t).ok())
                .filter(|r| r.state == "active");
            let Some(mut rec) = active else { return };
            let target = nix::unistd::Pid::from_raw(pid as i32);
            if nix::sys::signal::kill(target, None).is_err() || ask(&socket, "status", Duration::from_secs(2)).is_some() {
                return;
            }
            let mut outcomes = Vec::new();
            for m in &mounts {
                let outcome = match fs::thaw_path(m) {
                    Ok(fs::ThawOutcome::Thawed) => "thawed".to_owned(),
                    Ok(fs::ThawOutcome::NotFrozen) => "already thawed".to_owned(),
                    Err(e) => format!("FAILED: {e}"),
                };
                outcomes.push(MountThaw { path: m.clone(), outcome });
            }
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
            let _ = std::fs::remove_file(&socket);
            tracing::error!(
                watchdog_pid = pid,
                ?outcomes,
                "the freeze watchdog did not lift the freeze at its deadline and does not answer: thawed by the agent, watchdog killed"
            );
            rec.state = "thawed".to_owned();
            rec.thawed = Some(WatchdogThawed {
                reason: format!("the watchdog (pid {pid}) was stuck past its deadline: thawed by the agent, watchdog killed"),
                frozen_for_ms: unix_ms().saturating_sub(rec.started_unix_ms),
                mounts: outcomes,
            });
            rec.thawed_unix_ms = Some(unix_ms());
            let _ = write_record(&record, &rec);
        })
        .await;
    });
}

/// A freeze held by the agent: dropping it without [`thaw`] closes the
/// watchdog's pipe, and the watchdog thaws at once.
#[derive(Debug)]
pub(crate) struct FreezeHandle {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    report: FreezeReport,
    frozen_at: Instant,
    lifted: Option<WatchdogThawed>,
}

impl FreezeHandle {
    pub fn report(&self) -> &FreezeReport {
        &self.report
    }

    pub fn watchdog_pid(&self) -> Option<u32> {
        self.report.watchdog_pid
    }

    /// Waits until the watchdog lifts the freeze by itself (deadline,
    /// signal, someone's `dr-agent thaw`); returns why.
    pub async fn lifted(&mut self) -> Option<WatchdogThawed> {
        if self.lifted.is_none() {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Some(json) = line.strip_prefix("thawed ") {
                    self.lifted = serde_json::from_str(json).ok();
                    break;
                }
            }
        }
        self.lifted.clone()
    }
}

fn frozen_report(state: &str, frozen: &WatchdogFrozen, record: Option<PathBuf>, warnings: Vec<String>) -> FreezeReport {
    FreezeReport {
        state: state.to_owned(),
        mounts: frozen.mounts.clone(),
        deadline_ms: frozen.deadline_ms,
        thaw_by_unix_ms: frozen.thaw_by_unix_ms,
        watchdog_pid: Some(frozen.pid),
        freeze_took_ms: frozen.freeze_took_ms,
        record,
        dry_run: false,
        actions: vec![format!(
            "thaw with `dr-agent thaw` when done; the watchdog (pid {}) thaws by {} anyway",
            frozen.pid,
            rfc3339(frozen.thaw_by_unix_ms)
        )],
        warnings,
    }
}

/// Freezes the mounts under a watchdog tied to this process (the backup path).
pub(crate) async fn freeze(config: &Config, params: &FreezeParams) -> Result<FreezeHandle, FreezeError> {
    let (mounts, mut warnings) = plan(config, params)?;
    if let Some((path, record, _)) = existing_freeze(config, &mounts, false, &mut warnings)? {
        return Err(FreezeError::AlreadyFrozen {
            path: record.mounts.first().cloned().unwrap_or_default(),
            by: format!("by dr-agent watchdog pid {} (record {})", record.pid, path.display()),
        });
    }
    let started = Instant::now();
    let (spawned, record) = spawn_watchdog(config, &mounts, params.deadline, false).await?;
    tracing::info!(mounts = ?spawned.frozen.mounts, pid = spawned.frozen.pid, took_ms = spawned.frozen.freeze_took_ms, "frozen");
    let report = frozen_report("frozen", &spawned.frozen, Some(record), warnings);
    Ok(FreezeHandle {
        child: spawned.child,
        stdin: spawned.stdin,
        lines: spawned.lines,
        report,
        frozen_at: started + Duration::from_millis(spawned.frozen.freeze_took_ms),
        lifted: None,
    })
}

/// Asks the watchdog to thaw and waits for its answer. If the watchdog is
/// gone without a word, thaws directly (FITHAW).
pub(crate) async fn thaw(handle: FreezeHandle) -> Result<ThawReport, FreezeError> {
    let FreezeHandle { mut child, stdin, mut lines, report, frozen_at, lifted } = handle;
    if lifted.is_none()
        && let Some(mut stdin) = stdin
    {
        // It may have thawed already (deadline): then the pipe is closed.
        let _ = stdin.write_all(b"thaw\n").await;
        let _ = stdin.flush().await;
    }
    let mut answer = lifted;
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(json) = line.strip_prefix("thawed ") {
                return serde_json::from_str::<WatchdogThawed>(json).ok();
            }
        }
        None
    };
    if answer.is_none()
        && let Ok(a) = tokio::time::timeout(Duration::from_secs(30), read).await
    {
        answer = a;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let mut warnings = Vec::new();
    let thawed = match answer {
        Some(t) => t,
        None => {
            warnings.push(format!("the watchdog (pid {:?}) did not answer: thawed directly", report.watchdog_pid));
            let mut mounts = Vec::new();
            for m in &report.mounts {
                let outcome = match fs::thaw_path(m) {
                    Ok(fs::ThawOutcome::Thawed) => "thawed".to_owned(),
                    Ok(fs::ThawOutcome::NotFrozen) => "already thawed".to_owned(),
                    Err(e) => format!("FAILED: {e}"),
                };
                mounts.push(MountThaw { path: m.clone(), outcome });
            }
            WatchdogThawed {
                reason: "thawed directly by the agent".to_owned(),
                frozen_for_ms: frozen_at.elapsed().as_millis() as u64,
                mounts,
            }
        }
    };
    if let Some(record) = &report.record {
        let _ = std::fs::remove_file(record);
    }
    if thawed.reason != "asked by the agent" {
        warnings.push(format!("the freeze was lifted before the agent asked: {}", thawed.reason));
    }
    to_thaw_report(thawed, warnings)
}

fn to_thaw_report(t: WatchdogThawed, warnings: Vec<String>) -> Result<ThawReport, FreezeError> {
    if let Some(m) = t.mounts.iter().find(|m| m.outcome.starts_with("FAILED")) {
        return Err(FreezeError::Watchdog(format!("{}: {}", m.path.display(), m.outcome)));
    }
    Ok(ThawReport {
        already_done: t.mounts.iter().all(|m| m.outcome == "already thawed"),
        mounts: t.mounts,
        frozen_for_ms: t.frozen_for_ms,
        reason: t.reason,
        dry_run: false,
        warnings,
    })
}

/// Hand-run freeze: a detached watchdog holds the freeze until `dr-agent
/// thaw` or the deadline. Idempotent: the same mounts already frozen by a
/// live watchdog are reported as `already frozen`.
pub(crate) async fn run(config: &Config, params: &FreezeParams, dry_run: bool) -> Result<FreezeReport, FreezeError> {
    let (mounts, mut warnings) = plan(config, params)?;
    if let Some((path, _, status)) = existing_freeze(config, &mounts, dry_run, &mut warnings)? {
        let mut r = frozen_report("already frozen", &status, Some(path), warnings);
        r.dry_run = dry_run;
        r.freeze_took_ms = 0;
        return Ok(r);
    }
    if dry_run {
        let deadline_ms = params.deadline.as_millis() as u64;
        return Ok(FreezeReport {
            state: "would freeze".to_owned(),
            mounts: mounts.iter().map(|m| m.path.clone()).collect(),
            deadline_ms,
            thaw_by_unix_ms: unix_ms() + deadline_ms,
            watchdog_pid: None,
            freeze_took_ms: 0,
            record: None,
            dry_run: true,
            actions: mounts
                .iter()
                .map(|m| {
                    format!(
                        "freeze {} ({} on {}) for at most {}",
                        m.path.display(),
                        m.fs_type,
                        m.source,
                        humantime::format_duration(params.deadline)
                    )
                })
                .collect(),
            warnings,
        });
    }
    let (spawned, record) = spawn_watchdog(config, &mounts, params.deadline, true).await?;
    Ok(frozen_report("frozen", &spawned.frozen, Some(record), warnings))
}

/// Hand-run thaw: asks the watchdogs that hold the mounts, or thaws
/// directly when none is alive. Thawing what is not frozen is `already thawed`.
pub(crate) async fn run_thaw(config: &Config, params: &ThawParams, dry_run: bool) -> Result<ThawReport, FreezeError> {
    let mut warnings = Vec::new();
    let requested = if params.mounts.is_empty() { config.freeze.mounts.clone() } else { params.mounts.clone() };
    let mut targets: Vec<PathBuf> = Vec::new();
    for m in &requested {
        let c =
            std::fs::canonicalize(m).map_err(|source| FreezeError::Io { what: format!("cannot resolve mount {}", m.display()), source })?;
        targets.push(c);
    }
    let all = targets.is_empty();
    let mut mounts: Vec<MountThaw> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let mut frozen_for_ms = 0u64;
    for (path, record) in load_records(config, dry_run, &mut warnings) {
        if !all && !record.mounts.iter().any(|m| targets.contains(m)) {
            continue;
        }
        let covered: Vec<PathBuf> = record.mounts.clone();
        targets.retain(|t| !covered.contains(t));
        if record.state != "active" {
            if let Some(t) = &record.thawed {
                reasons.push(format!(
                    "already thawed by watchdog pid {} ({}) at {} after {} ms",
                    record.pid,
                    t.reason,
                    record.thawed_unix_ms.map(rfc3339).unwrap_or_default(),
                    t.frozen_for_ms
                ));
            }
            mounts.extend(covered.into_iter().map(|p| MountThaw { path: p, outcome: "already thawed".to_owned() }));
            if !dry_run {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if dry_run {
            reasons.push(format!("would ask watchdog pid {} to thaw", record.pid));
            mounts.extend(covered.into_iter().map(|p| MountThaw { path: p, outcome: "would thaw".to_owned() }));
            continue;
        }
        let socket = record.socket.clone();
        let answer = tokio::task::spawn_blocking(move || socket.and_then(|s| ask(&s, "thaw", Duration::from_secs(30))))
            .await
            .expect("the socket task does not panic");
        match answer.as_deref().and_then(|l| l.strip_prefix("thawed ")).and_then(|j| serde_json::from_str::<WatchdogThawed>(j).ok()) {
            Some(t) => {
                frozen_for_ms = frozen_for_ms.max(t.frozen_for_ms);
                reasons.push(format!("watchdog pid {} thawed ({})", record.pid, t.reason));
                mounts.extend(t.mounts);
            }
            None => {
                warnings.push(format!("watchdog pid {} does not answer: thawed directly", record.pid));
                reasons.push("thawed directly (no watchdog alive)".to_owned());
                frozen_for_ms = frozen_for_ms.max(unix_ms().saturating_sub(record.started_unix_ms));
                for p in covered {
                    let outcome = match fs::thaw_path(&p) {
                        Ok(fs::ThawOutcome::Thawed) => "thawed".to_owned(),
                        Ok(fs::ThawOutcome::NotFrozen) => "already thawed".to_owned(),
                        Err(e) => format!("FAILED: {e}"),
                    };
                    mounts.push(MountThaw { path: p, outcome });
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    // Mounts no record knows: thaw directly (FITHAW on what is not frozen
    // is harmless and says so).
    if !targets.is_empty() {
        let table = fs::mount_table()?;
        for t in targets {
            if !table.iter().any(|e| e.mount_point == t) {
                return Err(FreezeError::NotAMountPoint { path: t });
            }
            let outcome = if dry_run {
                "would thaw if frozen".to_owned()
            } else {
                match fs::thaw_path(&t)? {
                    fs::ThawOutcome::Thawed => {
                        reasons.push(format!("{} was frozen outside dr-agent: thawed directly", t.display()));
                        "thawed".to_owned()
                    }
                    fs::ThawOutcome::NotFrozen => "already thawed".to_owned(),
                }
            };
            mounts.push(MountThaw { path: t, outcome });
        }
    }
    if let Some(m) = mounts.iter().find(|m| m.outcome.starts_with("FAILED")) {
        return Err(FreezeError::Watchdog(format!("{}: {}", m.path.display(), m.outcome)));
    }
    let already_done = mounts.iter().all(|m| m.outcome == "already thawed");
    if reasons.is_empty() {
        reasons.push(if mounts.is_empty() { "nothing is frozen".to_owned() } else { "nothing was frozen".to_owned() });
    }
    Ok(ThawReport { mounts, frozen_for_ms, reason: reasons.join("; "), already_done, dry_run, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_freeze_record_of_another_boot_is_cleared_and_never_thawed_by() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::config::Config { state_dir: dir.path().to_owned(), ..Default::default() };
        let fdir = dir.path().join("freeze");
        std::fs::create_dir_all(&fdir).expect("mkdir");
        // A live socket at the recorded path: the old code asks it to thaw.
        let socket = fdir.join("old.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let asked = std::sync::Arc::new(AtomicBool::new(false));
        let a = asked.clone();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let t = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if listener.accept().is_ok() {
                    a.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let record = FreezeRecord {
            id: "old".into(),
            pid: std::process::id(),
            mounts: vec![],
            socket: Some(socket.clone()),
            deadline_ms: 60_000,
            started_unix_ms: unix_ms(),
            thaw_by_unix_ms: unix_ms() + 60_000,
            state: "active".into(),
            thawed: None,
            thawed_unix_ms: None,
            identity: Some(crate::sys::identity::Identity { instance_id: Some("i-0aaa".into()), boot_id: "another-boot".into() }),
        };
        let path = fdir.join("old.json");
        write_record(&path, &record).expect("write");
        let dry = run_thaw(&config, &ThawParams { mounts: vec![] }, true).await.expect("dry thaw");
        assert!(dry.warnings.iter().any(|w| w.contains("stale freeze record") && w.contains("would clear")), "{dry:?}");
        assert!(path.exists(), "the dry run clears nothing");
        let r = run_thaw(&config, &ThawParams { mounts: vec![] }, false).await.expect("thaw");
        stop.store(true, Ordering::SeqCst);
        t.join().expect("thread");
        assert!(!asked.load(Ordering::SeqCst), "the watchdog socket of a stale record is never asked");
        assert!(r.warnings.iter().any(|w| w.contains("stale freeze record") && w.contains("another-boot")), "{r:?}");
        assert!(r.mounts.is_empty(), "nothing thawed by it: {r:?}");
        assert!(!path.exists(), "the stale record is cleared");
    }
}
