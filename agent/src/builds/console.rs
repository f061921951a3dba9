//! One `circleci dev-console` session: a Clojure REPL fed on stdin, answering
//! on stdout after a banner, each answer followed by the prompt `user=> `.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The REPL's prompt in the `user` namespace.
pub const PROMPT: &str = "user=> ";
/// Largest answer kept (a REPL may print a long stack trace).
const MAX_ANSWER: usize = 256 * 1024;
/// Stderr kept for error messages.
const MAX_STDERR: usize = 4096;
/// How long the console may take to exit once asked to.
const EXIT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot start the dev-console `{argv}`: {source}")]
    Spawn { argv: String, source: std::io::Error },
    #[error(
        "the dev-console printed no `user=> ` prompt within {timeout:?}; last output: {output:?}; stderr: {stderr:?}"
    )]
    LoadTimeout { timeout: Duration, output: String, stderr: String },
    #[error("the dev-console did not answer within {timeout:?}; partial output: {output:?}")]
    CommandTimeout { timeout: Duration, output: String },
    #[error("the dev-console ended its output (exited?); last output: {output:?}; stderr: {stderr:?}")]
    Closed { output: String, stderr: String },
    #[error("the dev-console: {0}")]
    Io(std::io::Error),
    #[error("the dev-console printed more than {MAX_ANSWER} bytes without a prompt")]
    TooLong,
}

/// A running dev-console, at its prompt between calls.
pub struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    stderr: Arc<Mutex<Vec<u8>>>,
    command_timeout: Duration,
    pgid: Option<i32>,
}

impl Console {
    /// Starts the console (own process group, killed with it when dropped)
    /// and waits for its first prompt.
    pub async fn open(
        argv: &[String],
        load_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Console, ConsoleError> {
        let joined = argv.join(" ");
        let (program, args) = argv.split_first().ok_or_else(|| ConsoleError::Spawn {
            argv: joined.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .map_err(|source| ConsoleError::Spawn { argv: joined.clone(), source })?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut kept = sink.lock().expect("stderr buffer lock");
                kept.extend_from_slice(&buf[..n]);
                let len = kept.len();
                if len > MAX_STDERR {
                    kept.drain(..len - MAX_STDERR);
                }
            }
        });
        let mut console = Console { child, stdin: Some(stdin), stdout, stderr, command_timeout, pgid };
        let started = Instant::now();
        tracing::info!(step = "cleanup-builds", console = %joined, "starting the dev-console");
        match console.read_until_prompt(load_timeout, true).await {
            Ok(_banner) => {
                tracing::info!(step = "cleanup-builds", elapsed = ?started.elapsed(), "dev-console ready");
                Ok(console)
            }
            Err(ConsoleError::CommandTimeout { output, .. }) => {
                Err(ConsoleError::LoadTimeout { timeout: load_timeout, output, stderr: console.stderr_text() })
            }
            Err(e) => Err(e),
        }
    }

    fn stderr_text(&self) -> String {
        let kept = self.stderr.lock().expect("stderr buffer lock");
        super::api::excerpt(&String::from_utf8_lossy(&kept), 1000)
    }

    /// Sends one form (a single line) and returns the answer printed before
    /// the next prompt.
    pub async fn eval(&mut self, form: &str) -> Result<String, ConsoleError> {
        debug_assert!(!form.contains('\n'));
        let stdin =
            self.stdin.as_mut().ok_or_else(|| ConsoleError::Closed { output: String::new(), stderr: String::new() })?;
        let mut line = Vec::with_capacity(form.len() + 1);
        line.extend_from_slice(form.as_bytes());
        line.push(b'\n');
        let write = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        match tokio::time::timeout(self.command_timeout, write).await {
            Err(_) => {
                return Err(ConsoleError::CommandTimeout { timeout: self.command_timeout, output: String::new() });
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(ConsoleError::Closed { output: String::new(), stderr: self.stderr_text() });
            }
            Ok(Err(e)) => return Err(ConsoleError::Io(e)),
            Ok(Ok(())) => {}
        }
        let answer = self.read_until_prompt(self.command_timeout, false).await?;
        Ok(answer.trim().to_owned())
    }

    /// Reads until the output ends with the prompt; returns what came before it.
    async fn read_until_prompt(&mut self, timeout: Duration, loading: bool) -> Result<String, ConsoleError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if buf.ends_with(PROMPT.as_bytes()) {
                buf.truncate(buf.len() - PROMPT.len());
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now()).min(Duration::from_secs(5));
            match tokio::time::timeout(wait, self.stdout.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    return Err(ConsoleError::Closed {
                        output: super::api::excerpt(&String::from_utf8_lossy(&buf), 1000),
                        stderr: self.stderr_text(),
                    });
                }
                Ok(Ok(n)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_ANSWER {
                        return Err(ConsoleError::TooLong);
                    }
                }
                Ok(Err(e)) => return Err(ConsoleError::Io(e)),
                Err(_) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ConsoleError::CommandTimeout {
                            timeout,
                            output: super::api::excerpt(&String::from_utf8_lossy(&buf), 1000),
                        });
                    }
                    if loading && last_log.elapsed() >= Duration::from_secs(5) {
                        tracing::info!(step = "cleanup-builds", elapsed = ?started.elapsed(), "waiting for the dev-console prompt");
                        last_log = Instant::now();
                    }
                }
            }
        }
    }

    /// Asks the REPL to exit, closes its stdin and waits briefly; kills the
    /// process group if it lingers.
    pub async fn close(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let bye = async {
                let _ = stdin.write_all(b"(System/exit 0)\n").await;
                let _ = stdin.flush().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
            drop(stdin);
        }
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => {
                tracing::info!(step = "cleanup-builds", %status, "dev-console exited");
                self.pgid = None;
            }
            _ => tracing::warn!(step = "cleanup-builds", "dev-console did not exit; killing it"),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // The group may hold `docker exec` children: end them all.
        if let Some(pgid) = self.pgid.take() {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Is a REPL answer an error? Returns the reason if so.
pub fn answer_error(answer: &str) -> Option<String> {
    const MARKERS: [&str; 6] =
        ["Exception", "Error", "Syntax error", "Execution error", "Unable to resolve", "EOF while reading"];
    answer.lines().find(|l| MARKERS.iter().any(|m| l.contains(m))).map(|l| super::api::excerpt(l, 300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        assert_eq!(answer_error("true"), None);
        assert_eq!(answer_error("nil"), None);
        assert_eq!(answer_error("{:deleted 1}"), None);
        assert!(
            answer_error("Syntax error compiling at (REPL:1:1).\nUnable to resolve symbol: x in this context")
                .is_some()
        );
        assert!(answer_error("Execution error (NullPointerException) at admin/delete-build").is_some());
        assert!(answer_error("CompilerException java.lang.RuntimeException: x").is_some());
    }

    fn script(dir: &std::path::Path, body: &str) -> Vec<String> {
        let p = dir.join("console.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
        vec!["/bin/sh".to_owned(), p.display().to_string()]
    }

    #[tokio::test]
    async fn talks_to_a_repl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = script(
            dir.path(),
            r#"echo "Clojure 1.10"; printf 'user=> '; while read l; do case "$l" in "(System/exit 0)") exit 0;; *) printf '%s\nuser=> ' "ok:$l";; esac; done"#,
        );
        let mut c = Console::open(&argv, Duration::from_secs(5), Duration::from_secs(5)).await.expect("open");
        assert_eq!(c.eval("(+ 1 2)").await.expect("eval"), "ok:(+ 1 2)");
        assert_eq!(c.eval("x").await.expect("eval"), "ok:x");
        c.close().await;
    }

    #[tokio::test]
    async fn load_and_command_timeouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = script(dir.path(), "echo banner; sleep 30");
        let e = Console::open(&argv, Duration::from_millis(300), Duration::from_secs(1)).await.err().expect("timeout");
        assert!(matches!(e, ConsoleError::LoadTimeout { .. }), "{e}");
        assert!(e.to_string().contains("banner"), "{e}");
        let argv = script(dir.path(), "printf 'user=> '; read l; sleep 30");
        let mut c = Console::open(&argv, Duration::from_secs(5), Duration::from_millis(300)).await.expect("open");
        let e = c.eval("(x)").await.expect_err("no answer");
        assert!(matches!(e, ConsoleError::CommandTimeout { .. }), "{e}");
        let argv = script(dir.path(), "printf 'user=> '; read l; echo bye >&2; exit 3");
        let mut c = Console::open(&argv, Duration::from_secs(5), Duration::from_secs(5)).await.expect("open");
        let e = c.eval("(x)").await.expect_err("exited");
        assert!(matches!(e, ConsoleError::Closed { .. }), "{e}");
    }
}
