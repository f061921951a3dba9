//! The command journal: `id -> result` on the agent's own disk, so that a
//! command delivered twice runs once and gets the same answer.
//!
//! Layout: one file per command, `<dir>/<id>.json`, written atomically (temp
//! file in the same directory, fsync, rename, fsync of the directory). A
//! `started` record is written before a step runs and a `finished` record
//! (with the result) after it, before the answer is sent.

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::steps::{Action, ErrorKind, Outcome, StepError};

/// Records older than this are removed at startup.
pub(crate) const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The error answered for a command whose earlier run was cut short.
pub(crate) const INTERRUPTED: &str = "interrupted: the agent restarted while this command ran; not re-run";

#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    #[error("invalid command id `{0}`: expected 1 to 128 characters of A-Z a-z 0-9 . _ : -, not `.` or `..`")]
    InvalidId(String),
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal record {path} is unreadable: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

/// The answer to one command, as sent to the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct CommandAnswer {
    pub id: String,
    pub ok: bool,
    pub error: String,
    /// Why it did not succeed (None when `ok`).
    #[serde(default)]
    pub kind: Option<ErrorKind>,
    /// True when this answer was not produced by running the step for this
    /// delivery (journal replay, or a delivery that joined a running one).
    pub replayed: bool,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub outcome: Option<Outcome>,
}

impl CommandAnswer {
    /// An error answer that touched nothing.
    pub fn rejected(id: &str, kind: ErrorKind, error: impl Into<String>) -> Self {
        let now = now_ms();
        CommandAnswer {
            id: id.to_owned(),
            ok: false,
            error: error.into(),
            kind: Some(kind),
            replayed: false,
            started_at_ms: now,
            finished_at_ms: now,
            outcome: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RecordState {
    Started,
    Finished,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    action: String,
    /// The whole request (the action and its parameters), so that an id
    /// reused for another request is refused instead of answered with the
    /// first one's result. Absent in records of older agents.
    #[serde(default)]
    request: Option<serde_json::Value>,
    state: RecordState,
    pid: u32,
    started_at_ms: u64,
    #[serde(default)]
    finished_at_ms: u64,
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    error: String,
    #[serde(default)]
    kind: Option<ErrorKind>,
    #[serde(default)]
    outcome: Option<Outcome>,
}

impl Record {
    /// Whether a delivery asks for what this record ran. A record of an
    /// older agent (no request) is compared by the action's name.
    fn same_request(&self, action: &Action, request: &serde_json::Value) -> bool {
        match &self.request {
            Some(r) => r == request,
            None => self.action == action.name(),
        }
    }

    fn answer(&self, replayed: bool) -> CommandAnswer {
        CommandAnswer {
            id: self.id.clone(),
            ok: self.ok,
            error: self.error.clone(),
            kind: if self.ok { None } else { Some(self.kind.unwrap_or(ErrorKind::Failed)) },
            replayed,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            outcome: self.outcome.clone(),
        }
    }
}

type Slot = watch::Receiver<Option<CommandAnswer>>;

/// The journal of one agent process.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    /// Commands executing in this process (and results that could not be
    /// journaled, kept so that a repeat still gets them).
    inflight: Mutex<HashMap<String, Slot>>,
}

/// Checks a command id: `[A-Za-z0-9._:-]{1,128}`, not `.` or `..`.
pub(crate) fn validate_id(id: &str) -> Result<(), JournalError> {
    let ok = (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok { Ok(()) } else { Err(JournalError::InvalidId(id.chars().take(200).collect())) }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Journal {
    /// Opens (creating it, mode 0700) the journal directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Journal, JournalError> {
        let dir = dir.into();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|source| JournalError::Io { path: dir.clone(), source })?;
        Ok(Journal { dir, inflight: Mutex::new(HashMap::new()) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes records (and leftover temp files) last written before
    /// `now - max_age`. Returns how many files were removed.
    pub fn prune(&self, max_age: Duration, now: SystemTime) -> Result<usize, JournalError> {
        let io = |path: &Path, source| JournalError::Io { path: path.to_owned(), source };
        let cutoff = now.checked_sub(max_age).unwrap_or(UNIX_EPOCH);
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_ours = name.ends_with(".json") || name.ends_with(".tmp");
            let Ok(meta) = entry.metadata() else { continue };
            if !is_ours || !meta.is_file() {
                continue;
            }
            let stale_tmp = name.ends_with(".tmp");
            let old = meta.modified().map(|m| m < cutoff).unwrap_or(false);
            if old || stale_tmp {
                fs::remove_file(&path).map_err(|e| io(&path, e))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn read_record(&self, id: &str) -> Result<Option<Record>, JournalError> {
        let path = self.record_path(id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| JournalError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }

    fn write_record(&self, record: &Record) -> Result<(), JournalError> {
        let path = self.record_path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).expect("a journal record always serializes");
        crate::sys::atomic::write(&path, &bytes, 0o600).map_err(|e| JournalError::Io { path: e.path, source: e.source })
    }

    /// Runs `action` through the journal and returns the answer to send.
    ///
    /// - invalid id: error answer, the filesystem is not touched;
    /// - finished record: its result, `replayed = true`, nothing runs;
    /// - running in this process: waits for that run's answer;
    /// - `started` record from an earlier process: [`INTERRUPTED`], journaled;
    /// - otherwise: journal `started`, run, journal `finished`, answer.
    pub async fn run<F, Fut>(&self, id: &str, action: &Action, exec: F) -> CommandAnswer
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Outcome, StepError>>,
    {
        if let Err(e) = validate_id(id) {
            return CommandAnswer::rejected(id, ErrorKind::Invalid, e.to_string());
        }
        let (tx, mut record) = match self.begin(id, action) {
            Begin::Answer(answer) => return answer,
            Begin::Join(mut slot) => {
                tracing::info!(id, "command already running or answered in this process: joining it");
                return match slot.wait_for(Option::is_some).await {
                    Ok(answer) => {
                        let mut answer = answer.clone().expect("wait_for guarantees Some");
                        answer.replayed = true;
                        answer
                    }
                    Err(_) => {
                        CommandAnswer::rejected(id, ErrorKind::Interrupted, "the first delivery of this command ended without a result")
                    }
                };
            }
            Begin::Run(tx, record) => (tx, record),
        };
        let mut guard = InflightGuard { journal: self, id, keep: false };

        let result = exec().await;
        record.state = RecordState::Finished;
        record.finished_at_ms = now_ms();
        match result {
            Ok(outcome) => {
                record.ok = true;
                record.outcome = Some(outcome);
            }
            Err(e) => {
                record.kind = Some(e.kind());
                record.error = e.to_string();
                // A step that failed after it ran keeps its report.
                record.outcome = e.report().map(|r| Outcome::from(r.clone()));
            }
        }
        if let Err(e) = self.write_record(&record) {
            // Keep the answer in memory so a repeat in this process still gets it.
            tracing::error!(id, error = %e, "cannot journal the command's result");
            guard.keep = true;
        }
        let answer = record.answer(false);
        tx.send_replace(Some(answer.clone()));
        answer
    }
    /// Decides, under the in-flight lock, what to do with a delivery.
    fn begin(&self, id: &str, action: &Action) -> Begin {
        let mut inflight = self.inflight.lock().expect("journal lock poisoned");
        if let Some(slot) = inflight.get(id) {
            return Begin::Join(slot.clone());
        }
        let request = serde_json::to_value(action).expect("an action always serializes");
        match self.read_record(id) {
            Err(e) => return Begin::Answer(CommandAnswer::rejected(id, ErrorKind::Failed, format!("not run: {e}"))),
            Ok(Some(record)) if !record.same_request(action, &request) => {
                tracing::warn!(id, journaled = %record.action, asked = action.name(), "command id reused for another request: refused");
                return Begin::Answer(CommandAnswer::rejected(
                    id,
                    ErrorKind::Invalid,
                    format!("command id `{id}` was already used for another request ({}); not run: ids must not be reused", record.action),
                ));
            }
            Ok(Some(record)) if record.state == RecordState::Finished => {
                tracing::info!(id, ok = record.ok, "command already finished: answering from the journal");
                return Begin::Answer(record.answer(true));
            }
            Ok(Some(mut record)) => {
                tracing::warn!(id, started_at_ms = record.started_at_ms, "command was interrupted by a restart");
                record.state = RecordState::Finished;
                record.finished_at_ms = now_ms();
                record.ok = false;
                record.kind = Some(ErrorKind::Interrupted);
                record.error = INTERRUPTED.to_owned();
                record.outcome = None;
                if let Err(e) = self.write_record(&record) {
                    tracing::error!(id, error = %e, "cannot journal the interrupted command");
                }
                return Begin::Answer(record.answer(false));
            }
            Ok(None) => {}
        }
        let started = Record {
            id: id.to_owned(),
            action: action.name().to_owned(),
            request: Some(request),
            state: RecordState::Started,
            pid: std::process::id(),
            started_at_ms: now_ms(),
            finished_at_ms: 0,
            ok: false,
            error: String::new(),
            kind: None,
            outcome: None,
        };
        if let Err(e) = self.write_record(&started) {
            return Begin::Answer(CommandAnswer::rejected(id, ErrorKind::Failed, format!("not run: cannot journal the command: {e}")));
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(id.to_owned(), rx);
        Begin::Run(tx, started)
    }
}

enum Begin {
    Answer(CommandAnswer),
    Join(Slot),
    Run(watch::Sender<Option<CommandAnswer>>, Record),
}

/// Removes an id from the in-flight map when its run ends (also on panic or
/// cancellation, so that waiters are released).
struct InflightGuard<'a> {
    journal: &'a Journal,
    id: &'a str,
    keep: bool,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if !self.keep
            && let Ok(mut map) = self.journal.inflight.lock()
        {
            map.remove(self.id);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| JournalError::Io { path: dir.to_owned(), source })
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::replicated::AppStatus;
    use std::cell::Cell;

    fn status() -> Outcome {
        Outcome::AppStatus(AppStatus { state: "started".into(), is_transitioning: false, desired_state: "started".into() })
    }

    #[test]
    fn id_validation() {
        for good in ["a", "op-1:step.2_x", "...", &"x".repeat(128)] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"x".repeat(129), "a\0b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn invalid_id_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path().join("journal")).expect("open");
        let ran = Cell::new(false);
        let a = j
            .run("../evil", &Action::AppStatus, || async {
                ran.set(true);
                Ok(status())
            })
            .await;
        assert!(!a.ok && a.error.contains("invalid command id"));
        assert!(!ran.get());
        assert_eq!(fs::read_dir(j.dir()).expect("readdir").count(), 0);
    }

    #[tokio::test]
    async fn runs_once_then_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        let runs = Cell::new(0);
        let exec = || async {
            runs.set(runs.get() + 1);
            Ok(status())
        };
        let first = j.run("cmd-1", &Action::AppStatus, exec).await;
        assert!(first.ok && !first.replayed);
        assert_eq!(first.outcome, Some(status()));
        let again = j.run("cmd-1", &Action::AppStatus, exec).await;
        assert!(again.replayed);
        assert_eq!(runs.get(), 1);
        assert_eq!((again.ok, &again.outcome, again.started_at_ms), (first.ok, &first.outcome, first.started_at_ms));
        // A new process (new Journal on the same dir) replays too.
        let j2 = Journal::open(dir.path()).expect("reopen");
        let third = j2.run("cmd-1", &Action::AppStatus, exec).await;
        assert!(third.replayed && third.ok);
        assert_eq!(runs.get(), 1);
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).expect("readdir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cmd-1.json")]);
    }

    #[tokio::test]
    async fn an_id_reused_for_another_request_is_refused_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        let first = j.run("op-1.x", &Action::AppStatus, || async { Ok(status()) }).await;
        assert!(first.ok);
        let other = Action::WipeNomad { dry_run: false, offline: false };
        let again = j.run("op-1.x", &other, || async { panic!("must not run") }).await;
        assert!(!again.ok && !again.replayed, "{again:?}");
        assert_eq!(again.kind, Some(ErrorKind::Invalid));
        assert!(again.error.contains("already used for another request (app_status)"), "{}", again.error);
        // Same action, other parameters: refused too.
        let dry = Action::WipeNomad { dry_run: true, offline: false };
        assert!(j.run("op-1.w", &dry, || async { Ok(status()) }).await.ok);
        let wet = j.run("op-1.w", &other, || async { panic!("must not run") }).await;
        assert!(!wet.ok && wet.error.contains("another request"), "{}", wet.error);
        // The same request is still answered from the journal.
        assert!(j.run("op-1.x", &Action::AppStatus, || async { panic!("replayed") }).await.replayed);
    }

    #[tokio::test]
    async fn failures_are_journaled_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        let a = j.run("f", &Action::AppStatus, || async { Err(StepError::DeadlineExceeded(Duration::from_secs(1))) }).await;
        assert!(!a.ok && a.error.contains("deadline"));
        assert_eq!(a.kind, Some(ErrorKind::TimedOut));
        let b = j.run("f", &Action::AppStatus, || async { Ok(status()) }).await;
        assert!(b.replayed && !b.ok && b.error == a.error);
        assert_eq!(b.kind, Some(ErrorKind::TimedOut), "the kind is journaled with the error");
    }

    #[tokio::test]
    async fn concurrent_delivery_runs_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        let runs = Cell::new(0);
        let exec = || async {
            runs.set(runs.get() + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(status())
        };
        let (a, b) = tokio::join!(j.run("dup", &Action::AppStatus, exec), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            j.run("dup", &Action::AppStatus, exec).await
        });
        assert_eq!(runs.get(), 1);
        assert!(a.ok && b.ok && !a.replayed && b.replayed);
        assert_eq!(a.finished_at_ms, b.finished_at_ms);
    }

    #[tokio::test]
    async fn cancelled_run_releases_waiters_and_counts_as_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        // A run that is cancelled (the task is dropped) mid-step.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(20),
            j.run("c", &Action::AppStatus, || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(status())
            }),
        )
        .await;
        assert!(cancelled.is_err());
        let a = j.run("c", &Action::AppStatus, || async { panic!("must not run again") }).await;
        assert!(!a.ok && a.error == INTERRUPTED);
    }

    #[tokio::test]
    async fn started_record_from_earlier_process_is_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let earlier = Journal::open(dir.path()).expect("open");
        earlier
            .write_record(&Record {
                id: "op:7".into(),
                action: "app_status".into(),
                request: None,
                state: RecordState::Started,
                pid: 1,
                started_at_ms: 1000,
                finished_at_ms: 0,
                ok: false,
                error: String::new(),
                kind: None,
                outcome: None,
            })
            .expect("write");
        let j = Journal::open(dir.path()).expect("reopen");
        let ran = Cell::new(false);
        let a = j
            .run("op:7", &Action::AppStatus, || async {
                ran.set(true);
                Ok(status())
            })
            .await;
        assert!(!ran.get());
        assert!(!a.ok && a.error == INTERRUPTED && !a.replayed && a.started_at_ms == 1000);
        let b = j.run("op:7", &Action::AppStatus, || async { Ok(status()) }).await;
        assert!(b.replayed && b.error == INTERRUPTED);
        assert!(!ran.get());
    }

    #[tokio::test]
    async fn corrupt_record_is_not_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        fs::write(dir.path().join("bad.json"), "{not json").expect("write");
        let a = j.run("bad", &Action::AppStatus, || async { panic!("must not run") }).await;
        assert!(!a.ok && a.error.contains("unreadable"), "{}", a.error);
    }

    #[tokio::test]
    async fn prune_removes_old_records_and_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path()).expect("open");
        j.run("old", &Action::AppStatus, || async { Ok(status()) }).await;
        j.run("new", &Action::AppStatus, || async { Ok(status()) }).await;
        fs::write(dir.path().join("x.json.1-0.tmp"), "partial").expect("write");
        fs::write(dir.path().join("unrelated.txt"), "keep").expect("write");
        let eight_days_ago = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
        File::options().write(true).open(dir.path().join("old.json")).and_then(|f| f.set_modified(eight_days_ago)).expect("set mtime");
        let removed = j.prune(RETENTION, SystemTime::now()).expect("prune");
        assert_eq!(removed, 2);
        assert!(!dir.path().join("old.json").exists());
        assert!(dir.path().join("new.json").exists());
        assert!(dir.path().join("unrelated.txt").exists());
    }
}
