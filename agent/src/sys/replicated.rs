//! `replicatedctl`: running it with a timeout and parsing its answers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

pub use dr_proto::contract::AppStatus;

/// Largest stderr excerpt quoted in an error.
const MAX_STDERR: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum ReplicatedError {
    #[error("cannot run {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("`replicatedctl {args}` did not finish within {timeout:?} and was killed")]
    Timeout { args: String, timeout: Duration },
    #[error("`replicatedctl {args}` failed ({status}): {stderr}")]
    Failed { args: String, status: String, stderr: String },
    #[error("`replicatedctl {args}`: unexpected JSON: {why}: {excerpt}")]
    UnexpectedJson { args: String, why: String, excerpt: String },
}

/// One status object; unknown fields are ignored, optional ones may be missing.
#[derive(Deserialize)]
struct RawStatus {
    #[serde(rename = "State")]
    state: String,
    #[serde(rename = "IsTransitioning", default)]
    is_transitioning: bool,
    #[serde(rename = "DesiredState", default)]
    desired_state: String,
}

/// Parses the stdout of `replicatedctl app status`: a JSON array with one
/// object, or a bare object.
pub fn parse_app_status(stdout: &str) -> Result<AppStatus, ReplicatedError> {
    let bad = |why: String| ReplicatedError::UnexpectedJson { args: "app status".to_owned(), why, excerpt: excerpt(stdout, 300) };
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).map_err(|e| bad(e.to_string()))?;
    let object = match value {
        serde_json::Value::Array(mut items) => match items.len() {
            1 => items.remove(0),
            n => return Err(bad(format!("expected an array with one object, got {n} elements"))),
        },
        object @ serde_json::Value::Object(_) => object,
        _ => return Err(bad("expected an array or an object".to_owned())),
    };
    let raw: RawStatus = serde_json::from_value(object).map_err(|e| bad(e.to_string()))?;
    Ok(AppStatus { state: raw.state, is_transitioning: raw.is_transitioning, desired_state: raw.desired_state })
}

/// Parses the stdout of `replicatedctl app-config export`: one JSON object.
pub fn parse_app_config(stdout: &str) -> Result<serde_json::Map<String, serde_json::Value>, ReplicatedError> {
    let bad = |why: String| ReplicatedError::UnexpectedJson { args: "app-config export".to_owned(), why, excerpt: excerpt(stdout, 300) };
    match serde_json::from_str::<serde_json::Value>(stdout.trim()).map_err(|e| bad(e.to_string()))? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(bad("expected a JSON object of config items".to_owned())),
    }
}

fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Runs `replicatedctl` subcommands.
#[derive(Clone, Debug)]
pub struct Replicatedctl {
    path: PathBuf,
    timeout: Duration,
}

impl Replicatedctl {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Replicatedctl { path: path.into(), timeout }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `replicatedctl app status`.
    pub async fn app_status(&self) -> Result<AppStatus, ReplicatedError> {
        let out = self.run(&["app", "status"]).await?;
        parse_app_status(&out)
    }

    /// The same `replicatedctl` with another per-call timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Replicatedctl { path: self.path.clone(), timeout }
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `replicatedctl app stop [-f]`: asks the app to stop (does not wait).
    pub async fn app_stop(&self, force: bool) -> Result<(), ReplicatedError> {
        let args: &[&str] = if force { &["app", "stop", "-f"] } else { &["app", "stop"] };
        self.run(args).await.map(drop)
    }

    /// `replicatedctl app start`: asks the app to start (does not wait).
    pub async fn app_start(&self) -> Result<(), ReplicatedError> {
        self.run(&["app", "start"]).await.map(drop)
    }

    /// `replicatedctl app-config export`: the settings, a JSON object of items
    /// (`{"hostname": {"value": "ci.example.com"}, ...}`).
    pub async fn app_config_export(&self) -> Result<serde_json::Map<String, serde_json::Value>, ReplicatedError> {
        let out = self.run(&["app-config", "export"]).await?;
        parse_app_config(&out)
    }

    /// `replicatedctl app-config set NAME --value VALUE` (argv, no shell).
    pub async fn app_config_set(&self, name: &str, value: &str) -> Result<(), ReplicatedError> {
        self.run(&["app-config", "set", name, "--value", value]).await.map(drop)
    }

    /// `replicatedctl app apply-config`: applies the settings (restarts a running app).
    pub async fn apply_config(&self) -> Result<(), ReplicatedError> {
        self.run(&["app", "apply-config"]).await.map(drop)
    }

    /// Runs one subcommand, returns its stdout. Killed (with its process
    /// group) when it outlives the timeout.
    pub async fn run(&self, args: &[&str]) -> Result<String, ReplicatedError> {
        let joined = args.join(" ");
        let mut cmd = tokio::process::Command::new(&self.path);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
        let child = cmd.spawn().map_err(|source| ReplicatedError::Spawn { path: self.path.clone(), source })?;
        let pid = child.id();
        match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    // The group may hold `docker exec` children: end them all.
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
                Err(ReplicatedError::Timeout { args: joined, timeout: self.timeout })
            }
            Ok(Err(source)) => Err(ReplicatedError::Spawn { path: self.path.clone(), source }),
            Ok(Ok(output)) if output.status.success() => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
            Ok(Ok(output)) => Err(ReplicatedError::Failed {
                args: joined,
                status: output.status.to_string(),
                stderr: excerpt(&String::from_utf8_lossy(&output.stderr), MAX_STDERR),
            }),
        }
    }
}

/// Tests: writes an executable script. A child shell writes it, so no
/// file descriptor open for writing leaks into a process another test thread
/// forks at that moment (which makes executing the script fail with
/// ETXTBSY, "text file busy").
#[cfg(test)]
pub(crate) fn write_executable(path: &Path, body: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sh to write the script");
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write the script");
    assert!(child.wait().expect("wait for sh").success(), "sh could not write {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_shape() {
        let s = parse_app_status(
            r#"[{"AppID":"edd9","Sequence":2439,"State":"stopped","DesiredState":"stopped","Error":"","IsCancellable":false,"IsTransitioning":false,"LastModifiedAt":"2018-10-23T22:00:21.314987894Z"}]"#,
        )
        .expect("reference shape");
        assert_eq!(s, AppStatus { state: "stopped".into(), is_transitioning: false, desired_state: "stopped".into() });
        assert!(!s.is_up());
    }

    #[test]
    fn tolerant_parsing() {
        let s = parse_app_status(r#"{"State":"rebooting","Extra":1}"#).expect("bare object, unknown state");
        assert_eq!(s.state, "rebooting");
        assert_eq!(s.desired_state, "");
        let up = parse_app_status(r#"[{"State":"started","IsTransitioning":false}]"#).expect("minimal");
        assert!(up.is_up());
        let moving = parse_app_status(r#"[{"State":"started","IsTransitioning":true}]"#).expect("minimal");
        assert!(!moving.is_up());
    }

    #[test]
    fn rejects_bad_json() {
        for bad in ["", "[]", "[{}]", "not json", "[1,2]", "\"x\""] {
            let err = parse_app_status(bad).expect_err(bad).to_string();
            assert!(err.contains("unexpected JSON"), "{err}");
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("replicatedctl");
        write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
        path
    }

    #[tokio::test]
    async fn runs_and_reports_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = script(dir.path(), r#"echo '[{"State":"started","IsTransitioning":false,"DesiredState":"started"}]'"#);
        let status = Replicatedctl::new(&ok, Duration::from_secs(10)).app_status().await.expect("status");
        assert!(status.is_up());

        let failing = script(dir.path(), "echo 'daemon not running' >&2; exit 3");
        let err = Replicatedctl::new(&failing, Duration::from_secs(10)).app_status().await.expect_err("fails");
        let msg = err.to_string();
        assert!(msg.contains("daemon not running") && msg.contains('3'), "{msg}");

        let slow = script(dir.path(), "sleep 30");
        let started = std::time::Instant::now();
        let err = Replicatedctl::new(&slow, Duration::from_millis(200)).app_status().await.expect_err("times out");
        assert!(matches!(err, ReplicatedError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let missing = Replicatedctl::new(dir.path().join("nope"), Duration::from_secs(1)).app_status().await;
        assert!(matches!(missing, Err(ReplicatedError::Spawn { .. })));
    }
}
