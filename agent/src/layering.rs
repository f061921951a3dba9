//! The agent's layers, checked on the source itself. Every `.rs` file under
//! `src` is read whole (every line, test modules included; only comment
//! lines are skipped: a doc link is not an import), and every `crate::<m>`
//! path is an edge from the file's top-level module to `m`.
//!
//! The order, lowest first:
//!
//! `config` < `sys` < `steps` < `daemon` < `cli`
//!
//! A module imports only from its own layer and the layers below it (so
//! there is no cycle between them). Also:
//!
//! - a step module (`steps/<step>`) imports the step error leaf, sibling
//!   steps and lower layers, never the executor beside it (`crate::steps::`
//!   followed by a type): no cycle inside `steps`;
//! - generated protobuf types (`dr_proto::pb`) only in `daemon` (the
//!   session);
//! - clap only in `cli`;
//! - `unsafe` only in `sys/fsfreeze.rs`.
//!
//! A plain text scan, deliberately, like the controller's.

use std::path::{Path, PathBuf};

/// The layers, lowest first.
const LAYERS: &[&str] = &["config", "sys", "steps", "daemon", "cli"];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == module)
}

/// The top-level module of a file (`steps/app.rs` -> `steps`, `lib.rs` -> `crate`).
fn top_module(rel: &Path) -> String {
    let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => "crate".to_owned(),
        Some(m) => m.to_owned(),
        None => first,
    }
}

/// What is wrong with one file (path relative to `src`, its whole text).
fn violations(rel: &Path, text: &str) -> Vec<String> {
    let from = top_module(rel);
    let file = rel.display().to_string();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let at = format!("{file}:{}: {}", n + 1, line.trim());
        for (i, _) in code.match_indices("crate::") {
            if code[..i].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue; // `dr_proto::...crate::`, not ours
            }
            let rest = &code[i + "crate::".len()..];
            let to: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if let (Some(f), Some(t)) = (layer(&from), layer(&to))
                && t > f
            {
                out.push(format!("{at}: `{from}` may not import `{to}` (layers: {})", LAYERS.join(" < ")));
            }
            // A step module names the executor's module only for a
            // submodule (`crate::steps::error`, a sibling step).
            let is_step_module = from == "steps" && rel != Path::new("steps/mod.rs");
            if is_step_module && to == "steps" {
                let item = rest["steps".len()..].trim_start_matches("::");
                let names: Vec<&str> = match item.strip_prefix('{') {
                    Some(group) => group.split('}').next().unwrap_or_default().split(',').map(str::trim).collect(),
                    None => vec![item],
                };
                if names.iter().any(|n| n.starts_with(|c: char| c.is_ascii_uppercase())) {
                    out.push(format!(
                        "{at}: a step module imports the executor's module (`crate::steps::{item}`): use `crate::steps::error`"
                    ));
                }
            }
        }
        if code.contains("dr_proto::pb") && from != "daemon" {
            out.push(format!("{at}: generated protobuf types only in `daemon`"));
        }
        if (code.contains("clap::") || code.starts_with("use clap")) && from != "cli" {
            out.push(format!("{at}: clap only in `cli`"));
        }
        let unsafe_code = code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == "unsafe");
        if unsafe_code && rel != Path::new("sys/fsfreeze.rs") && !code.contains("unsafe_code") {
            out.push(format!("{at}: `unsafe` only in sys/fsfreeze.rs"));
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

#[test]
fn every_file_imports_only_from_its_layer_and_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = rust_files(&src);
    assert!(files.len() >= 30, "the scan found the sources: {}", files.len());
    let mut seen = std::collections::BTreeSet::new();
    let mut bad = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        if rel == Path::new("layering.rs") {
            continue; // this file names what it forbids
        }
        seen.insert(top_module(rel));
        let text = std::fs::read_to_string(&file).expect("source is readable");
        bad.extend(violations(rel, &text));
    }
    for l in LAYERS {
        assert!(seen.contains(*l), "layer `{l}` exists: {seen:?}");
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn a_forbidden_import_on_any_line_is_caught() {
    // Deep in a test module of a step: still a step importing the daemon.
    let text = "//! A step.\nuse crate::sys::http;\n\n#[cfg(test)]\nmod tests {\n    fn f() {\n        let _ = crate::daemon::journal::RETENTION;\n    }\n}\n";
    let v = violations(Path::new("steps/app.rs"), text);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("steps/app.rs:7") && v[0].contains("may not import `daemon`"), "{v:?}");
    // A lower layer reaching up, in a grouped import.
    let v = violations(Path::new("sys/http.rs"), "use crate::steps::{app, drain};\n");
    assert!(v.len() == 1 && v[0].contains("`sys` may not import `steps`"), "{v:?}");
    // A step naming the executor; unsafe code outside its module; pb outside the daemon.
    let v = violations(Path::new("steps/drain.rs"), "use crate::steps::Executor;\nfn f() { unsafe { g() } }\nuse dr_proto::pb;\n");
    assert_eq!(v.len(), 3, "{v:?}");
    // Comments are not imports; the same layer and lower ones are fine.
    assert!(
        violations(Path::new("sys/http.rs"), "//! see [`crate::steps::health`]\nuse crate::sys::clock;\nuse crate::config::Config;\n")
            .is_empty()
    );
    assert!(
        violations(Path::new("steps/recover.rs"), "use crate::steps::{app, health};\nuse crate::steps::error::ErrorKind;\n").is_empty()
    );
    assert!(violations(Path::new("cli/mod.rs"), "use crate::daemon::commands;\nuse clap::Parser;\n").is_empty());
}
