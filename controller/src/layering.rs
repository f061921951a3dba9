//! The dependency rules of ARCHITECTURE.md ("Invariants"), checked on the
//! source itself: every `crate::<module>` path in a non-test file is an
//! edge between two top-level modules. The graph must have no cycle, and:
//!
//! - `domain` imports nothing else from the controller;
//! - `config` imports only `domain`;
//! - `engine` knows no workflow, no agent, no cloud API;
//! - generated protobuf types (`pb::`) appear only in `api`, `agents`, the
//!   crate root (which registers the services) and the test kit's fake agent;
//! - drctl does not depend on the controller crate.
//!
//! A plain text scan, deliberately: it needs no tool beyond the test
//! runner, and it reads what a reviewer reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `module -> modules it imports`, from every `.rs` file under `src`,
/// leaving out test code (`tests.rs`, `testkit.rs` and inline
/// `#[cfg(test)] mod tests` blocks, which sit at the end of a file).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).expect("under src");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if matches!(name, "tests.rs" | "testkit.rs" | "layering.rs") || rel.starts_with("bin") {
            continue;
        }
        let from = top_module(rel);
        let text = std::fs::read_to_string(&file).expect("source is readable");
        let code = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text,
        };
        // Comments (docs linking to other modules) are not imports.
        let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let entry = edges.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let to: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !to.is_empty() && to != from && code[..i].chars().last().is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_') {
                entry.insert(to);
            }
        }
    }
    edges
}

fn top_module(rel: &Path) -> String {
    let first = rel.components().next().expect("non-empty path").as_os_str().to_string_lossy().into_owned();
    match first.strip_suffix(".rs") {
        Some("lib") => "crate".to_owned(),
        Some(m) => m.to_owned(),
        None => first,
    }
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

/// A cycle, if the graph has one (depth-first search).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|n| visit(n, edges, &mut done, &mut Vec::new()))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_module_graph_has_no_cycle() {
    let edges = graph(&src());
    assert!(edges.len() >= 9, "the scan found the modules: {edges:?}");
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import cycle between top-level modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn lower_layers_import_only_what_they_may() {
    let edges = graph(&src());
    let allowed: &[(&str, &[&str])] = &[
        ("domain", &[]),
        ("config", &["domain"]),
        ("store", &["domain"]),
        ("cloud", &["config", "domain"]),
        ("engine", &["store", "domain"]),
    ];
    for (module, may) in allowed {
        let uses = edges.get(*module).unwrap_or_else(|| panic!("module {module} exists"));
        let bad: Vec<&String> = uses.iter().filter(|u| !may.contains(&u.as_str())).collect();
        assert!(bad.is_empty(), "{module} may import only {may:?}, but imports {bad:?}");
    }
}

#[test]
fn generated_types_stay_at_the_edges() {
    let src = src();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = top_module(rel);
        if matches!(top.as_str(), "api" | "agents" | "crate" | "bin" | "layering" | "testkit") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(!text.contains("dr_proto::pb"), "{} uses generated protobuf types", rel.display());
    }
}

#[test]
fn drctl_does_not_depend_on_the_controller() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("drctl/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("drctl's manifest");
    let deps = text.split("[dependencies]").nth(1).expect("a [dependencies] table");
    assert!(!deps.contains("dr-controller"), "drctl depends on dr-controller");
    assert!(!deps.contains("aws-sdk"), "drctl depends on an AWS SDK");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&edges), None);
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}
