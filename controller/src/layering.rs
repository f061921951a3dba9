//! The dependency rules of ARCHITECTURE.md ("Invariants"), checked on the
//! source itself: every `crate::<module>` path (also inside grouped
//! `use crate::{a, b::c}`) on any line of any `.rs` file under `src`, test
//! code included, is an edge between two top-level modules. The graph must
//! have no cycle, and each module may import only what [`LAYERS`] allows
//! it: that table is the full layer order, bottom first. A new top-level
//! module fails the test until it is placed there. Besides:
//!
//! - generated protobuf types (`pb::`) appear only in `api`, `agents`, the
//!   crate root (which registers the services) and the test kit's fake agent;
//! - drctl does not depend on the controller crate.
//!
//! `testkit` (compiled for tests only) is the fake world every module's
//! tests may use; it is outside the order. The binaries under `bin/` use
//! the library by its crate name (`dr_controller::`), never `crate::`.
//!
//! A plain text scan, deliberately: it needs no tool beyond the test
//! runner, and it reads what a reviewer reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may import, bottom layer
/// first. `crate` is `lib.rs`, which wires everything.
const LAYERS: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("logging", &[]),
    ("config", &["domain"]),
    ("pki", &[]),
    ("store", &["domain"]),
    ("cloud", &["config", "domain"]),
    ("engine", &["store", "domain"]),
    ("agents", &["domain", "config", "pki", "store", "cloud", "engine"]),
    ("workflows", &["domain", "config", "store", "cloud", "engine", "agents"]),
    ("reconcilers", &["domain", "config", "pki", "store", "cloud", "engine", "agents", "workflows"]),
    ("api", &["domain", "config", "pki", "store", "cloud", "engine", "agents", "workflows", "reconcilers"]),
    ("crate", &["domain", "logging", "config", "pki", "store", "cloud", "engine", "agents", "workflows", "reconcilers", "api"]),
];

/// Modules outside the order: test support and this test.
const OUTSIDE: &[&str] = &["testkit", "layering", "bin"];

/// `module -> modules it imports`, from every line of every `.rs` file
/// under `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).expect("under src");
        let from = top_module(rel);
        if OUTSIDE.contains(&from.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source is readable");
        let entry = edges.entry(from.clone()).or_default();
        for to in imports(&text) {
            if to != from && to != "testkit" {
                entry.insert(to);
            }
        }
    }
    edges
}

/// The top-level modules named by `crate::` paths in `text`, comments
/// left out (docs that link to other modules are not imports).
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| -> String { s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `dr_controller::crate::`-like or part of a longer name
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first name of each item at depth 1.
            let (mut depth, mut item_start, mut items) = (0usize, 0usize, Vec::new());
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        items.push(&group[item_start..j]);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&group[item_start..j]);
                        item_start = j + 1;
                    }
                    _ => {}
                }
            }
            out.extend(items.into_iter().map(ident).filter(|n| !n.is_empty() && n != "self"));
        } else {
            let to = ident(rest);
            if !to.is_empty() {
                out.insert(to);
            }
        }
    }
    out
}

/// Every import that [`LAYERS`] does not allow, as `from -> to` lines.
fn violations(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, tos) in edges {
        let Some((_, may)) = LAYERS.iter().find(|(m, _)| m == from) else {
            bad.push(format!("{from}: a top-level module not placed in LAYERS (controller/src/layering.rs)"));
            continue;
        };
        for to in tos.iter().filter(|t| !may.contains(&t.as_str())) {
            bad.push(format!("{from} -> {to}: {from} may import only {may:?}"));
        }
    }
    bad
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
fn every_module_imports_only_what_its_layer_allows() {
    let edges = graph(&src());
    let bad = violations(&edges);
    assert!(bad.is_empty(), "imports against the layer order:\n{}", bad.join("\n"));
}

#[test]
fn a_forbidden_import_on_any_line_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("engine")).expect("mkdir");
    // After an out-of-line `mod tests;`, inside an inline test module, in a
    // grouped import and at the very last line: each is an edge.
    std::fs::write(
        src.join("engine/mod.rs"),
        "#[cfg(test)]\nmod tests;\nuse crate::store::Store;\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::{domain, workflows::Deps};\n}\nfn g() { crate::agents::x() }",
    )
    .expect("write");
    std::fs::write(src.join("domain.rs"), "// crate::api in a comment is no import\nuse crate::testkit::x;\n").expect("write");
    std::fs::write(src.join("newmod.rs"), "use crate::domain;\n").expect("write");
    let edges = graph(src);
    assert_eq!(edges["engine"], BTreeSet::from(["agents".to_owned(), "domain".to_owned(), "store".to_owned(), "workflows".to_owned()]));
    assert!(edges["domain"].is_empty(), "{edges:?}");
    let bad = violations(&edges);
    assert_eq!(
        bad,
        vec![
            r#"engine -> agents: engine may import only ["store", "domain"]"#.to_owned(),
            r#"engine -> workflows: engine may import only ["store", "domain"]"#.to_owned(),
            "newmod: a top-level module not placed in LAYERS (controller/src/layering.rs)".to_owned(),
        ]
    );
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
