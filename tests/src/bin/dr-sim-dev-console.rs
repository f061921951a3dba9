//! dr-sim-dev-console: a simulator of `circleci dev-console` (a Clojure REPL
//! connected to the frontend's nREPL) for tests.
//!
//! Prints a banner, sleeps `--load-delay-ms`, prints the prompt `user=> `
//! (no newline) and reads forms line by line from stdin. It evaluates ONLY
//! `(admin/delete-build "<string literal>")`: the literal is read as a
//! Clojure string (escapes `\"`, `\\`, `\n`, `\t`, `\r`, `\b`, `\f`, `\uXXXX`);
//! the URL is appended as one line to `--deletions FILE` (flushed) and the
//! answer is `true` (or `nil` when `--known-builds` is given and the URL is
//! not among the builds there). Anything else (another symbol, unbalanced
//! input, a second form on the line) answers a REPL-style error and records
//! nothing. `(System/exit 0)`, `(exit)`, `(quit)` or EOF end the session.
//!
//! Every raw line received is appended to `<FILE>.raw`; each session start
//! appends `session <pid>` to `--sessions FILE` when given. `--error-on URL`
//! (repeatable) answers an Execution error for that URL instead of deleting;
//! `--hang-on URL` never answers for it.

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

/// What one line of input is.
#[derive(Debug, PartialEq)]
enum Form {
    Empty,
    Exit,
    Delete(String),
    Error(String),
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
                    let n = u32::from_str_radix(hex, 16).map_err(|_| {
                        format!("Syntax error reading source at (REPL:1:{col}).\nInvalid unicode escape: \\u{hex}")
                    })?;
                    out.push(char::from_u32(n).unwrap_or('\u{fffd}'));
                    for _ in 0..4 {
                        chars.next();
                    }
                }
                Some((_, other)) => {
                    return Err(format!(
                        "Syntax error reading source at (REPL:1:{col}).\nUnsupported escape character: \\{other}"
                    ));
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
    if matches!(t, "(System/exit 0)" | "(exit)" | "(quit)") {
        return Form::Exit;
    }
    let Some(rest) = t.strip_prefix("(admin/delete-build") else {
        let symbol: String =
            t.trim_start_matches('(').chars().take_while(|c| !c.is_whitespace() && *c != ')').collect();
        return Form::Error(format!(
            "Syntax error compiling at (REPL:1:1).\nUnable to resolve symbol: {symbol} in this context"
        ));
    };
    if !rest.starts_with(char::is_whitespace) {
        let symbol: String = t[1..].chars().take_while(|c| !c.is_whitespace() && *c != ')').collect();
        return Form::Error(format!("Syntax error compiling at (REPL:1:1).\nNo such var: {symbol}"));
    }
    let rest = rest.trim_start();
    if !rest.starts_with('"') {
        return Form::Error(
            "Execution error (IllegalArgumentException) at admin/delete-build (admin.clj:31).\nbuild url must be a string"
                .to_owned(),
        );
    }
    let col = t.len() - rest.len() + 1;
    let (url, after) = match read_string(rest, col) {
        Ok(x) => x,
        Err(e) => return Form::Error(e),
    };
    let after = after.trim_start();
    let Some(trailing) = after.strip_prefix(')') else {
        return Form::Error(format!(
            "Syntax error reading source at (REPL:1:{}).\nEOF while reading, starting at line 1",
            t.len() + 1
        ));
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
    v.as_array()
        .map(|a| a.iter().filter_map(|b| b.get("build_url")?.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Removes a build from the builds file (atomic rewrite).
fn forget_build(path: &Path, url: &str) {
    let Ok(text) = std::fs::read_to_string(path) else { return };
    let Ok(serde_json::Value::Array(builds)) = serde_json::from_str::<serde_json::Value>(&text) else { return };
    let kept: Vec<serde_json::Value> =
        builds.into_iter().filter(|b| b.get("build_url").and_then(|u| u.as_str()) != Some(url)).collect();
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
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        append(&raw, text);
        let answer = match parse_line(text) {
            Form::Empty => None,
            Form::Exit => break,
            Form::Error(e) => Some(e),
            Form::Delete(url) if args.hang_on.contains(&url) => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Form::Delete(url) if args.error_on.contains(&url) => Some(format!(
                "Execution error (ExceptionInfo) at circle.http.admin/delete-build (admin.clj:57).\n\
                 Cannot delete build {url}: build is locked"
            )),
            Form::Delete(url) => {
                append(&args.deletions, &url);
                Some(match (&known, &args.known_builds) {
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
        if let Some(a) = answer {
            let _ = writeln!(out, "{a}");
        }
        let _ = write!(out, "{PROMPT}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(
            parse_line(r#"(admin/delete-build "https://h/gh/o/r/1")"#),
            Form::Delete("https://h/gh/o/r/1".into())
        );
        assert_eq!(parse_line(r#"(admin/delete-build "a\"b\\c")"#), Form::Delete("a\"b\\c".into()));
        assert!(matches!(parse_line(r#"(admin/delete-build "a") (System/exit 1)"#), Form::Error(_)));
        assert!(matches!(parse_line(r#"(admin/delete-build "a"#), Form::Error(e) if e.contains("EOF")));
        assert!(
            matches!(parse_line("(System/exit 1)"), Form::Error(e) if e.contains("Unable to resolve symbol: System/exit"))
        );
        assert_eq!(parse_line("(System/exit 0)"), Form::Exit);
    }
}
