//! dr-sim-dev-console: a simulator of `circleci dev-console` (a Clojure REPL
//! connected to the frontend's nREPL) for the faults a real REPL cannot be
//! made to show on demand (a hang, a slow load) and for the hostile-URL
//! tests; the rest is tested against a real `clojure.main` (tests/clojure/).
//!
//! It prints what a real REPL prints, where: a banner, then after
//! `--load-delay-ms` the prompt `user=> ` (no newline); values on stdout,
//! exceptions and reader/compiler errors on stderr, then the prompt again.
//! It evaluates ONLY:
//! - `(admin/delete-build "<string literal>")` (escapes `\"`, `\\`, `\n`,
//!   `\t`, `\r`, `\b`, `\f`, `\uXXXX`): the URL is appended as one line to
//!   `--deletions FILE` (flushed) and the value is `true` (or `nil` when
//!   `--known-builds` is given and the URL is not among the builds there);
//! - `(set! *read-eval* false)` (kept for that form only, as in
//!   `clojure.main`), `*read-eval*`, and
//!   `(alter-var-root (var *read-eval*) (constantly false|true))`;
//! - any of these inside the agent's per-call wrapper (the exact text of
//!   `dr_agent::steps::builds::console::wrap`), answering the wrapper's sentinels
//!   like Clojure would, in two writes.
//!
//! Anything else (another symbol, unbalanced input, a second form on the
//! line) is a REPL-style error on stderr and records nothing. End of input,
//! `(exit)` or `(quit)` end the session.
//!
//! Every raw line received is appended to `<FILE>.raw`, and every expression
//! evaluated (unwrapped) to `<FILE>.forms`; each session start appends
//! `session <pid>` to `--sessions FILE` when given. `--error-on URL`
//! (repeatable) throws for that URL instead of deleting; `--hang-on URL`
//! never answers for it.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

const PROMPT: &str = "user=> ";

#[derive(Parser)]
#[command(name = "dr-sim-dev-console")]
struct Args {
    /// Deleted URLs are appended here, one per line; raw input goes to FILE.raw.
    #[arg(long)]
    deletions: PathBuf,
    /// Time between the banner and the first prompt.
    #[arg(long, default_value_t = 0)]
    load_delay_ms: u64,
    /// The builds JSON (as served by the API simulator): unknown URLs answer nil.
    #[arg(long)]
    known_builds: Option<PathBuf>,
    /// Appends one line per session started.
    #[arg(long)]
    sessions: Option<PathBuf>,
    /// Answer an execution error for this URL (nothing recorded).
    #[arg(long)]
    error_on: Vec<String>,
    /// Never answer for this URL.
    #[arg(long)]
    hang_on: Vec<String>,
}

fn append(path: &Path, line: &str) {
    let mut f = OpenOptions::new().create(true).append(true).open(path).unwrap_or_else(|e| {
        eprintln!("dr-sim-dev-console: cannot open {}: {e}", path.display());
        std::process::exit(70)
    });
    f.write_all(line.as_bytes()).and_then(|()| f.write_all(b"\n")).and_then(|()| f.flush()).unwrap_or_else(|e| {
        eprintln!("dr-sim-dev-console: cannot write {}: {e}", path.display());
        std::process::exit(70)
    });
}

/// What one expression is.
#[derive(Debug, PartialEq)]
enum Form {
    Empty,
    Exit,
    Delete(String),
    SetReadEval,
    ReadEval,
    RootReadEval(bool),
    /// A reader or compiler error (printed on stderr; nothing evaluated).
    Error(String),
}

/// The agent's per-call wrapper around an expression, split at `{marker}`
/// and `{expr}` (see `dr_agent::steps::builds::console::wrap`).
const WRAP_HEAD: &str = "(let [m \"";
const WRAP_MID: &str = ":\" r (try [:ok (pr-str ";
const WRAP_TAIL: &str = ")] (catch Throwable e [:error (str (.getName (class e)) \": \" (ex-message e))]))] \
     (print (str \"\\n@@\" m (name (first r)) \"\\n\" (second r) \"\\n@@\" m \"end\\n\")) (flush) nil)";

/// `(marker, expr)` when the line is the wrapper.
fn unwrap(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix(WRAP_HEAD)?;
    let (marker, rest) = rest.split_once(WRAP_MID)?;
    let expr = rest.strip_suffix(WRAP_TAIL)?;
    Some((marker, expr))
}

/// Reads a Clojure string literal starting at `s[0] == '"'`; returns the
/// value and the rest after the closing quote.
fn read_string(s: &str, col: usize) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 'b')) => out.push('\u{8}'),
                Some((_, 'f')) => out.push('\u{c}'),
                Some((j, 'u')) => {
                    let hex = s.get(j + 1..j + 5).ok_or_else(|| eof_string(col))?;
                    let n = u32::from_str_radix(hex, 16)
                        .map_err(|_| format!("Syntax error reading source at (REPL:1:{col}).\nInvalid unicode escape: \\u{hex}"))?;
                    out.push(char::from_u32(n).unwrap_or('\u{fffd}'));
                    for _ in 0..4 {
                        chars.next();
                    }
                }
                Some((_, other)) => {
                    return Err(format!("Syntax error reading source at (REPL:1:{col}).\nUnsupported escape character: \\{other}"));
                }
                None => return Err(eof_string(col)),
            },
            c => out.push(c),
        }
    }
    Err(eof_string(col))
}

fn eof_string(col: usize) -> String {
    format!("Syntax error reading source at (REPL:1:{col}).\nEOF while reading string")
}

fn parse_line(line: &str) -> Form {
    let t = line.trim();
    if t.is_empty() {
        return Form::Empty;
    }
    match t {
        "(exit)" | "(quit)" => return Form::Exit,
        "(set! *read-eval* false)" => return Form::SetReadEval,
        "*read-eval*" => return Form::ReadEval,
        "(alter-var-root (var *read-eval*) (constantly false))" => {
            return Form::RootReadEval(false);
        }
        "(alter-var-root (var *read-eval*) (constantly true))" => return Form::RootReadEval(true),
        _ => {}
    }
    let Some(rest) = t.strip_prefix("(admin/delete-build") else {
        let symbol: String = t.trim_start_matches('(').chars().take_while(|c| !c.is_whitespace() && *c != ')').collect();
        return Form::Error(format!("Syntax error compiling at (REPL:1:1).\nUnable to resolve symbol: {symbol} in this context"));
    };
    if !rest.starts_with(char::is_whitespace) {
        let symbol: String = t[1..].chars().take_while(|c| !c.is_whitespace() && *c != ')').collect();
        return Form::Error(format!("Syntax error compiling at (REPL:1:1).\nNo such var: {symbol}"));
    }
    let rest = rest.trim_start();
    if !rest.starts_with('"') {
        return Form::Error("Syntax error compiling at (REPL:1:1).\nadmin/delete-build takes a string literal here".to_owned());
    }
    let col = t.len() - rest.len() + 1;
    let (url, after) = match read_string(rest, col) {
        Ok(x) => x,
        Err(e) => return Form::Error(e),
    };
    let after = after.trim_start();
    let Some(trailing) = after.strip_prefix(')') else {
        return Form::Error(format!("Syntax error reading source at (REPL:1:{}).\nEOF while reading, starting at line 1", t.len() + 1));
    };
    if !trailing.trim().is_empty() {
        return Form::Error(format!(
            "Syntax error compiling at (REPL:1:{}).\nUnexpected input after the form: {}",
            t.len() - trailing.len() + 1,
            trailing.trim()
        ));
    }
    Form::Delete(url)
}

fn known_builds(path: &Path) -> HashSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("dr-sim-dev-console: cannot read {}: {e}", path.display());
        std::process::exit(66)
    });
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!("dr-sim-dev-console: {}: {e}", path.display());
        std::process::exit(65)
    });
    v.as_array().map(|a| a.iter().filter_map(|b| b.get("build_url")?.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// Removes a build from the builds file (atomic rewrite).
fn forget_build(path: &Path, url: &str) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let Ok(serde_json::Value::Array(builds)) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    let kept: Vec<serde_json::Value> = builds.into_iter().filter(|b| b.get("build_url").and_then(|u| u.as_str()) != Some(url)).collect();
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, serde_json::Value::Array(kept).to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn main() {
    let args = Args::parse();
    let raw = PathBuf::from(format!("{}.raw", args.deletions.display()));
    if let Some(s) = &args.sessions {
        append(s, &format!("session {}", std::process::id()));
    }
    let known = args.known_builds.as_deref().map(known_builds);
    let mut out = std::io::stdout().lock();
    let _ = write!(
        out,
        "nREPL server started on port 6005 on host 127.0.0.1 - nrepl://127.0.0.1:6005\n\
         REPL-y 0.4.4, nREPL 0.6.0\n\
         Clojure 1.10.1\n\
         OpenJDK 64-Bit Server VM 1.8.0_232-b09\n    \
         Docs: (doc function-name-here)\n          \
         (find-doc \"part-of-name-here\")\n  \
         Source: (source function-name-here)\n \
         Javadoc: (javadoc java-object-here)\n    \
         Exit: Control+D or (exit) or (quit)\n \
         Results: Stored in vars *1, *2, *3, an exception in *e\n\n"
    );
    let _ = out.flush();
    std::thread::sleep(Duration::from_millis(args.load_delay_ms));
    let _ = write!(out, "{PROMPT}");
    let _ = out.flush();
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut input = stdin.lock();
    let forms = PathBuf::from(format!("{}.forms", args.deletions.display()));
    let mut read_eval = true;
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        append(&raw, text);
        let (marker, expr) = match unwrap(text) {
            Some((m, e)) => (Some(m), e),
            None => (None, text),
        };
        let form = parse_line(expr);
        if !matches!(form, Form::Empty | Form::Exit | Form::Error(_)) {
            append(&forms, expr.trim());
        }
        // Ok(value as pr-str prints it) or Err(exception class, message).
        let result: Result<String, (&str, String)> = match form {
            Form::Empty => {
                let _ = write!(out, "{PROMPT}");
                let _ = out.flush();
                continue;
            }
            Form::Exit => break,
            Form::Error(e) => {
                eprintln!("{e}");
                let _ = write!(out, "{PROMPT}");
                let _ = out.flush();
                continue;
            }
            Form::SetReadEval => Ok("false".to_owned()),
            Form::ReadEval => Ok(read_eval.to_string()),
            Form::RootReadEval(v) => {
                read_eval = v;
                Ok(v.to_string())
            }
            Form::Delete(url) if args.hang_on.contains(&url) => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Form::Delete(url) if args.error_on.contains(&url) => {
                Err(("clojure.lang.ExceptionInfo", format!("Cannot delete build {url}: build is locked")))
            }
            Form::Delete(url) => {
                append(&args.deletions, &url);
                Ok(match (&known, &args.known_builds) {
                    (Some(k), _) if !k.contains(&url) => "nil".to_owned(),
                    (Some(_), Some(path)) => {
                        // Like the real installation: a deleted build is gone
                        // from the API too (the API simulator re-reads the file).
                        forget_build(path, &url);
                        "true".to_owned()
                    }
                    _ => "true".to_owned(),
                })
            }
        };
        match (marker, result) {
            (Some(m), result) => {
                let (kind, text) = match result {
                    Ok(v) => ("ok", v),
                    Err((class, message)) => ("error", format!("{class}: {message}")),
                };
                let answer = format!("\n@@{m}:{kind}\n{text}\n@@{m}:end\n");
                // Two writes, split inside the sentinel, like a slow pipe.
                let (a, b) = answer.split_at(answer.len() / 2);
                let _ = out.write_all(a.as_bytes());
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(1));
                let _ = writeln!(out, "{b}nil");
            }
            (None, Ok(v)) => {
                let _ = writeln!(out, "{v}");
            }
            (None, Err((class, message))) => {
                eprintln!(
                    "Execution error ({}) at admin/delete-build (admin.clj:57).\n{message}",
                    class.rsplit('.').next().unwrap_or(class)
                );
            }
        }
        let _ = write!(out, "{PROMPT}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_the_agents_wrapper() {
        let line = format!("{WRAP_HEAD}abc:3{WRAP_MID}(admin/delete-build \"x\"){WRAP_TAIL}");
        assert_eq!(unwrap(&line), Some(("abc:3", "(admin/delete-build \"x\")")));
        assert_eq!(unwrap("(admin/delete-build \"x\")"), None);
    }

    #[test]
    fn parses_forms() {
        assert_eq!(parse_line(r#"(admin/delete-build "https://h/gh/o/r/1")"#), Form::Delete("https://h/gh/o/r/1".into()));
        assert_eq!(parse_line(r#"(admin/delete-build "a\"b\\c")"#), Form::Delete("a\"b\\c".into()));
        assert!(matches!(parse_line(r#"(admin/delete-build "a") (System/exit 1)"#), Form::Error(_)));
        assert!(matches!(parse_line(r#"(admin/delete-build "a"#), Form::Error(e) if e.contains("EOF")));
        assert!(matches!(parse_line("(System/exit 1)"), Form::Error(e) if e.contains("Unable to resolve symbol: System/exit")));
        assert!(matches!(parse_line("(System/exit 0)"), Form::Error(_)), "(System/exit 0) would end the frontend's JVM");
        assert_eq!(parse_line("(exit)"), Form::Exit);
        assert_eq!(parse_line("*read-eval*"), Form::ReadEval);
    }
}
