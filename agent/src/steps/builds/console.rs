//! One `circleci dev-console` session: a Clojure REPL fed on stdin.
//!
//! What a real REPL prints is not one answer per line: a banner (and
//! warnings) before the first prompt, the value on stdout, exceptions on
//! stderr, output in several writes, and a prompt that names the current
//! namespace (`user=> `, `admin=> `). So every call is wrapped in a form
//! that catches any `Throwable` and prints a per-call sentinel on stdout:
//!
//! ```text
//! \n@@<nonce>:<n>:ok\n<pr-str of the value>\n@@<nonce>:<n>:end\n
//! \n@@<nonce>:<n>:error\n<exception class>: <message>\n@@<nonce>:<n>:end\n
//! ```
//!
//! The nonce is random per session, so nothing the called function prints
//! can forge an outcome. A form the REPL rejects before evaluating it (a
//! reader or compile error, which the `try` cannot catch) prints no sentinel:
//! the prompt comes back with the error on stderr, and the call is reported
//! rejected with that message. Before the first call, `*read-eval*` is
//! turned off and checked (see [`Console::open`]).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Largest output kept for one call (a REPL may print a long stack trace).
const MAX_ANSWER: usize = 256 * 1024;
/// Stderr kept for error messages.
const MAX_STDERR: usize = 16 * 1024;
/// How long the console may take to exit once its stdin is closed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// A prompt with no sentinel before it means the form was rejected, unless
/// more output follows within this time (a REPL printing a spare prompt).
const REJECT_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsoleError {
    #[error("cannot start the dev-console `{argv}`: {source}")]
    Spawn { argv: String, source: std::io::Error },
    #[error("the dev-console printed no prompt (`<namespace>=> `) within {timeout:?}; last output: {output:?}; stderr: {stderr:?}")]
    LoadTimeout { timeout: Duration, output: String, stderr: String },
    #[error("the dev-console did not answer within {timeout:?}; partial output: {output:?}; stderr: {stderr:?}")]
    CommandTimeout { timeout: Duration, output: String, stderr: String },
    #[error("the dev-console ended its output (exited?); last output: {output:?}; stderr: {stderr:?}")]
    Closed { output: String, stderr: String },
    #[error("the dev-console: {0}")]
    Io(std::io::Error),
    #[error("the dev-console printed more than {MAX_ANSWER} bytes for one call")]
    TooLong,
    #[error("cannot turn *read-eval* off in the dev-console (it answered {answer}): nothing was deleted")]
    ReadEval { answer: String },
}

/// How one call ended, as the REPL said it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Evaluated; the value as `pr-str` printed it.
    Value(String),
    /// Evaluated and threw: `<exception class>: <message>`.
    Threw(String),
    /// Not evaluated: the REPL rejected the form (reader or compile error);
    /// what it printed.
    Rejected(String),
}

/// One call's outcome and what the REPL wrote on stderr meanwhile (warnings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub outcome: Outcome,
    pub stderr: String,
}

/// Stderr as it arrives: the last [`MAX_STDERR`] bytes and the total count,
/// so a call can take what arrived since it was sent.
#[derive(Default)]
struct StderrLog {
    kept: Vec<u8>,
    total: u64,
}

impl StderrLog {
    fn push(&mut self, bytes: &[u8]) {
        self.kept.extend_from_slice(bytes);
        self.total += bytes.len() as u64;
        let len = self.kept.len();
        if len > MAX_STDERR {
            self.kept.drain(..len - MAX_STDERR);
        }
    }

    /// What arrived after `mark` (a previous `total`), as far as still kept.
    fn since(&self, mark: u64) -> String {
        let new = usize::try_from(self.total - mark).unwrap_or(usize::MAX).min(self.kept.len());
        String::from_utf8_lossy(&self.kept[self.kept.len() - new..]).trim().to_owned()
    }
}

/// Does the output end with a REPL prompt (`<namespace>=> ` on its own line)?
pub(crate) fn ends_with_prompt(out: &[u8]) -> bool {
    let line = match out.iter().rposition(|&b| b == b'\n') {
        Some(i) => &out[i + 1..],
        None => out,
    };
    match line.strip_suffix(b"=> ") {
        Some(ns) => !ns.is_empty() && ns.len() <= 200 && !ns.iter().any(|b| b.is_ascii_whitespace()),
        None => false,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The one-line form that evaluates `expr` and prints its outcome between
/// sentinels `@@<marker>` (see the module doc).
pub(crate) fn wrap(marker: &str, expr: &str) -> String {
    format!(
        "(let [m \"{marker}:\" r (try [:ok (pr-str {expr})] (catch Throwable e [:error (str (.getName (class e)) \": \" (ex-message e))]))] \
         (print (str \"\\n@@\" m (name (first r)) \"\\n\" (second r) \"\\n@@\" m \"end\\n\")) (flush) nil)"
    )
}

/// Finds call `marker`'s sentinels in `out`: the outcome and where the end
/// sentinel stops.
fn parse_sentinel(out: &[u8], marker: &str) -> Option<(Outcome, usize)> {
    let ok = format!("\n@@{marker}:ok\n");
    let error = format!("\n@@{marker}:error\n");
    let end = format!("\n@@{marker}:end\n");
    let (start, threw) = match (find(out, ok.as_bytes()), find(out, error.as_bytes())) {
        (Some(a), Some(b)) if b < a => (b + error.len(), true),
        (Some(a), _) => (a + ok.len(), false),
        (None, Some(b)) => (b + error.len(), true),
        (None, None) => return None,
    };
    let stop = start + find(&out[start..], end.as_bytes())?;
    let text = String::from_utf8_lossy(&out[start..stop]).into_owned();
    let outcome = if threw { Outcome::Threw(text) } else { Outcome::Value(text) };
    Some((outcome, stop + end.len()))
}

/// A running dev-console, at its prompt between calls.
pub(crate) struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    stderr: Arc<Mutex<StderrLog>>,
    command_timeout: Duration,
    pgid: Option<i32>,
    nonce: String,
    calls: u64,
    /// `*read-eval*` was turned off JVM-wide (the REPL keeps no `set!`
    /// between forms): turned back on at [`Console::close`].
    root_read_eval: bool,
    /// Warnings for the report (how `*read-eval*` was turned off).
    pub warnings: Vec<String>,
}

impl Console {
    /// Starts the console (own process group, killed with it when dropped),
    /// waits for its first prompt (after any banner), and turns `*read-eval*`
    /// off: `(set! *read-eval* false)` where the REPL keeps it between forms
    /// (nREPL sessions), else for the JVM (`alter-var-root`, as
    /// `clojure.main` binds it afresh for every form), checked by reading it
    /// back in a later form. If it stays on, nothing is deleted.
    pub async fn open(argv: &[String], load_timeout: Duration, command_timeout: Duration) -> Result<Console, ConsoleError> {
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
        let stderr = Arc::new(Mutex::new(StderrLog::default()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().expect("stderr buffer lock").push(&buf[..n]);
            }
        });
        let nonce = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let mut console = Console {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            command_timeout,
            pgid,
            nonce,
            calls: 0,
            root_read_eval: false,
            warnings: Vec::new(),
        };
        let started = Instant::now();
        tracing::info!(step = "cleanup-builds", console = %joined, "starting the dev-console");
        console.read_banner(load_timeout).await?;
        tracing::info!(step = "cleanup-builds", elapsed = ?started.elapsed(), "dev-console ready");
        console.read_eval_off().await?;
        Ok(console)
    }

    async fn read_banner(&mut self, timeout: Duration) -> Result<(), ConsoleError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let started = Instant::now();
        let mut out = Vec::new();
        loop {
            if ends_with_prompt(&out) {
                return Ok(());
            }
            match self.read_some(&mut out, deadline.min(tokio::time::Instant::now() + Duration::from_secs(5))).await? {
                true => {}
                false if tokio::time::Instant::now() >= deadline => {
                    return Err(ConsoleError::LoadTimeout { timeout, output: tail(&out), stderr: self.stderr_since(0) });
                }
                false => {
                    tracing::info!(step = "cleanup-builds", elapsed = ?started.elapsed(), "waiting for the dev-console prompt");
                }
            }
        }
    }

    async fn read_eval_off(&mut self) -> Result<(), ConsoleError> {
        let probe = |r: &Reply| r.outcome == Outcome::Value("false".to_owned());
        // Its own outcome does not matter: only what a later form sees.
        self.call("(set! *read-eval* false)").await?;
        if probe(&self.call("*read-eval*").await?) {
            tracing::info!(step = "cleanup-builds", "*read-eval* is off for this session");
            return Ok(());
        }
        self.call("(alter-var-root (var *read-eval*) (constantly false))").await?;
        let after = self.call("*read-eval*").await?;
        if probe(&after) {
            self.root_read_eval = true;
            let w = "the dev-console does not keep `set!` between forms: *read-eval* was turned off for its whole JVM \
                     during the session (alter-var-root) and back on at the end"
                .to_owned();
            tracing::warn!(step = "cleanup-builds", "{w}");
            self.warnings.push(w);
            return Ok(());
        }
        Err(ConsoleError::ReadEval { answer: format!("{:?}", after.outcome) })
    }

    fn stderr_since(&self, mark: u64) -> String {
        super::api::excerpt(&self.stderr.lock().expect("stderr buffer lock").since(mark), 2000)
    }

    fn stderr_mark(&self) -> u64 {
        self.stderr.lock().expect("stderr buffer lock").total
    }

    /// Reads what is there into `out`, waiting until `until`; false when
    /// nothing came in time.
    async fn read_some(&mut self, out: &mut Vec<u8>, until: tokio::time::Instant) -> Result<bool, ConsoleError> {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(until, self.stdout.read(&mut chunk)).await {
            Ok(Ok(0)) => Err(ConsoleError::Closed { output: tail(out), stderr: self.stderr_since(0) }),
            Ok(Ok(n)) => {
                out.extend_from_slice(&chunk[..n]);
                if out.len() > MAX_ANSWER {
                    return Err(ConsoleError::TooLong);
                }
                Ok(true)
            }
            Ok(Err(e)) => Err(ConsoleError::Io(e)),
            Err(_) => Ok(false),
        }
    }

    /// Evaluates one expression (a single line) in the wrapper and returns
    /// its outcome once the REPL is back at its prompt.
    pub async fn call(&mut self, expr: &str) -> Result<Reply, ConsoleError> {
        debug_assert!(!expr.contains('\n'));
        self.calls += 1;
        let marker = format!("{}:{}", self.nonce, self.calls);
        let mut line = wrap(&marker, expr).into_bytes();
        line.push(b'\n');
        let mark = self.stderr_mark();
        let timeout = self.command_timeout;
        let stdin = self.stdin.as_mut().ok_or_else(|| ConsoleError::Closed { output: String::new(), stderr: String::new() })?;
        let write = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Err(_) => {
                return Err(ConsoleError::CommandTimeout { timeout, output: String::new(), stderr: self.stderr_since(mark) });
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(ConsoleError::Closed { output: String::new(), stderr: self.stderr_since(0) });
            }
            Ok(Err(e)) => return Err(ConsoleError::Io(e)),
            Ok(Ok(())) => {}
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        let mut answered: Option<(Outcome, usize)> = None;
        loop {
            if answered.is_none() {
                answered = parse_sentinel(&out, &marker);
            }
            match &answered {
                Some((outcome, end)) if ends_with_prompt(&out[*end..]) => {
                    return Ok(Reply { outcome: outcome.clone(), stderr: self.stderr_since(mark) });
                }
                None if ends_with_prompt(&out) => {
                    // Back at the prompt with no sentinel: rejected, unless
                    // more output follows (a spare prompt).
                    if !self.read_some(&mut out, tokio::time::Instant::now() + REJECT_GRACE).await? {
                        let stdout = String::from_utf8_lossy(&out);
                        let stdout = stdout.trim_end().rsplit_once('\n').map_or("", |(before, _prompt)| before);
                        let said = [self.stderr_since(mark), super::api::excerpt(stdout, 2000)]
                            .into_iter()
                            .filter(|s| !s.is_empty())
                            .collect::<Vec<_>>()
                            .join("\n");
                        let said = if said.is_empty() { "(nothing)".to_owned() } else { said };
                        return Ok(Reply { outcome: Outcome::Rejected(said), stderr: String::new() });
                    }
                    continue;
                }
                _ => {}
            }
            if !self.read_some(&mut out, deadline).await? {
                return Err(ConsoleError::CommandTimeout { timeout, output: tail(&out), stderr: self.stderr_since(mark) });
            }
        }
    }

    /// Ends the session: turns `*read-eval*` back on if it was turned off
    /// JVM-wide, closes stdin (end of input: how a REPL is left without
    /// evaluating anything; `(System/exit 0)` would end the JVM that serves
    /// the console, CircleCI's frontend) and waits briefly; kills the process
    /// group if it lingers.
    pub async fn close(mut self) {
        if self.root_read_eval {
            match self.call("(alter-var-root (var *read-eval*) (constantly true))").await {
                Ok(Reply { outcome: Outcome::Value(_), .. }) => self.root_read_eval = false,
                other => {
                    tracing::warn!(step = "cleanup-builds", answer = ?other, "could not turn *read-eval* back on")
                }
            }
        }
        drop(self.stdin.take());
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => {
                tracing::info!(step = "cleanup-builds", %status, "dev-console exited");
                self.pgid = None;
            }
            _ => tracing::warn!(step = "cleanup-builds", "dev-console did not exit; killing it"),
        }
    }
}

fn tail(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let start = text.char_indices().rev().nth(1000).map_or(0, |(i, _)| i);
    text[start..].trim().to_owned()
}

impl Drop for Console {
    fn drop(&mut self) {
        // The group may hold `docker exec` children: end them all.
        if let Some(pgid) = self.pgid.take() {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts() {
        assert!(ends_with_prompt(b"Clojure 1.11.1\nuser=> "));
        assert!(ends_with_prompt(b"admin=> "));
        assert!(ends_with_prompt(b"nil\ncircle.http.admin=> "));
        assert!(!ends_with_prompt(b"user=>"));
        assert!(!ends_with_prompt(b"user=> \n"));
        assert!(!ends_with_prompt(b"deleting x => "));
        assert!(!ends_with_prompt(b"=> "));
    }

    #[test]
    fn sentinels() {
        let m = "n0:7";
        let out = b"deleting...\n@@n0:7:ok\n\"a\nb\"\n@@n0:7:end\nnil\nuser=> ";
        let (o, end) = parse_sentinel(out, m).expect("answered");
        assert_eq!(o, Outcome::Value("\"a\nb\"".to_owned()));
        assert_eq!(&out[end..], b"nil\nuser=> ");
        let out = b"\n@@n0:7:error\nclojure.lang.ExceptionInfo: build not found\n@@n0:7:end\n";
        assert_eq!(parse_sentinel(out, m).map(|x| x.0), Some(Outcome::Threw("clojure.lang.ExceptionInfo: build not found".to_owned())));
        // Another call's (or a forged) sentinel, or an unfinished one: no answer.
        assert_eq!(parse_sentinel(b"\n@@n0:6:ok\ntrue\n@@n0:6:end\n", m), None);
        assert_eq!(parse_sentinel(b"\n@@n0:7:ok\ntrue", m), None);
        // The wrapper itself echoed back does not answer (its newlines are escapes).
        assert_eq!(parse_sentinel(wrap(m, "(f)").as_bytes(), m), None);
    }

    #[test]
    fn stderr_since_a_mark() {
        let mut log = StderrLog::default();
        log.push(b"banner warning\n");
        let mark = log.total;
        log.push(b"Execution error\n");
        assert_eq!(log.since(mark), "Execution error");
        log.push(&vec![b'x'; MAX_STDERR * 2]);
        assert_eq!(log.since(mark).len(), MAX_STDERR);
    }

    fn script(dir: &std::path::Path, body: &str) -> Vec<String> {
        let p = dir.join("console.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
        vec!["/bin/sh".to_owned(), p.display().to_string()]
    }

    /// A shell stand-in for a REPL: banner, warnings on stderr, prompt
    /// `admin=> `, answers in several writes, exceptions and rejections.
    const SHELL_REPL: &str = r#"
echo "Clojure 1.10.1"; echo "WARNING: x already refers to #'clojure.core/x" >&2; printf 'admin=> '
while IFS= read -r l; do
  m=$(printf '%s' "$l" | sed -n 's/^(let \[m "\([^"]*\):".*/\1/p')
  case "$l" in
    *'(pr-str *read-eval*)'*) printf '\n@@%s:ok\nfalse\n@@%s:end\nnil\nadmin=> ' "$m" "$m";;
    *'(set! *read-eval* false)'*) printf '\n@@%s:ok\nfalse\n@@%s:end\nnil\nadmin=> ' "$m" "$m";;
    *'(boom)'*) printf '\n@@%s:error\nclojure.lang.ExceptionInfo: build not found\n@@%s:end\nnil\nadmin=> ' "$m" "$m";;
    *'(unknown/fn)'*) echo "Syntax error compiling at (REPL:1:1)." >&2; echo "No such namespace: unknown" >&2; printf 'admin=> ';;
    *) printf 'deleting'; sleep 0.1; printf '...\n@@%s:o' "$m"; sleep 0.1; printf 'k\ntrue\n@@%s:end\n' "$m"; echo 'WARNING: slow' >&2; printf 'nil\nadmin=> ';;
  esac
done"#;

    #[tokio::test]
    async fn talks_to_a_repl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = script(dir.path(), SHELL_REPL);
        let mut c = Console::open(&argv, Duration::from_secs(5), Duration::from_secs(5)).await.expect("open");
        assert!(c.warnings.is_empty(), "set! was kept: {:?}", c.warnings);
        let r = c.call("(admin/delete-build \"x\")").await.expect("call");
        assert_eq!(r.outcome, Outcome::Value("true".to_owned()));
        let r = c.call("(boom)").await.expect("call");
        assert_eq!(r.outcome, Outcome::Threw("clojure.lang.ExceptionInfo: build not found".to_owned()));
        let r = c.call("(unknown/fn)").await.expect("call");
        assert!(matches!(&r.outcome, Outcome::Rejected(m) if m.contains("No such namespace: unknown")), "{:?}", r.outcome);
        // The session still works after an exception and a rejection.
        let r = c.call("(admin/delete-build \"y\")").await.expect("call");
        assert_eq!(r.outcome, Outcome::Value("true".to_owned()));
        c.close().await;
    }

    #[tokio::test]
    async fn read_eval_that_stays_on_refuses_the_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = SHELL_REPL.replace(
            "\\nfalse\\n@@%s:end\\nnil\\nadmin=> ' \"$m\" \"$m\";;\n    *'(set!",
            "\\ntrue\\n@@%s:end\\nnil\\nadmin=> ' \"$m\" \"$m\";;\n    *'(set!",
        );
        assert_ne!(body, SHELL_REPL);
        let argv = script(dir.path(), &body);
        let e = Console::open(&argv, Duration::from_secs(5), Duration::from_secs(5)).await.err().expect("refused");
        assert!(matches!(e, ConsoleError::ReadEval { .. }), "{e}");
    }

    #[tokio::test]
    async fn load_and_command_timeouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = script(dir.path(), "echo banner; sleep 30");
        let e = Console::open(&argv, Duration::from_millis(300), Duration::from_secs(1)).await.err().expect("timeout");
        assert!(matches!(e, ConsoleError::LoadTimeout { .. }), "{e}");
        assert!(e.to_string().contains("banner"), "{e}");
        let argv = script(dir.path(), "printf 'user=> '; read l; sleep 30");
        let e = Console::open(&argv, Duration::from_secs(5), Duration::from_millis(300)).await.err().expect("no answer");
        assert!(matches!(e, ConsoleError::CommandTimeout { .. }), "{e}");
        let argv = script(dir.path(), "printf 'user=> '; read l; echo bye >&2; exit 3");
        let e = Console::open(&argv, Duration::from_secs(5), Duration::from_secs(5)).await.err().expect("exited");
        assert!(matches!(e, ConsoleError::Closed { .. }), "{e}");
    }
}
