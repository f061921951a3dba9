//! The agent's Clojure string literal writer (`builds::url::clojure_string`)
//! proven by the real Clojure reader: thousands of arbitrary strings (quotes,
//! backslashes, control characters, every Unicode plane, `#=`, `~@`) are
//! written as literals and read back with `read` in ONE JVM
//! (tests/clojure/read_literals.clj), with `*read-eval*` on and a canary that
//! counts any evaluation. Needs Debian's `clojure` (tests/run.sh installs it).
//!
//! Seeded and a fixed case count (3,000); `PROPTEST_CASES=N` for a longer run.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use dr_agent::steps::builds::url::clojure_string;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestRunner};

const SEED: u64 = 0x00c1_0e0e_5eed;

/// Pieces a hostile or unlucky string is made of.
fn piece() -> impl Strategy<Value = String> {
    let plane_char =
        (0u32..17, 0u32..0x1_0000).prop_filter_map("a scalar value", |(plane, low)| char::from_u32(plane << 16 | low).map(String::from));
    let control = prop_oneof![0u32..0x20, Just(0x7f), 0x80u32..0xa0]
        .prop_map(|c| char::from_u32(c).expect("control characters are scalar values").to_string());
    let special = prop::sample::select(vec![
        "\"",
        "\\",
        "\\\\",
        "\\\"",
        "#=",
        "#=(user/canary!)",
        "\"#=(user/canary!)\"",
        "~@",
        "~",
        "`",
        "'",
        "@",
        "^",
        "\\u",
        "\\u00",
        "\\u12345",
        "\\n",
        "\\o101",
        "#\"re\"",
        "#_",
        ";",
        "(",
        ")",
        "[",
        "{",
        "#?(:clj 1)",
        "#inst",
        "#uuid",
        "\u{2028}",
        "\u{feff}",
        "\u{ffff}",
        "\u{10ffff}",
        "\u{1f600}",
        "\u{0}",
        "%",
        "\r\n",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        3 => any::<char>().prop_map(String::from),
        3 => plane_char,
        2 => control,
        3 => special,
        2 => "[ -~]{1,6}",
    ]
}

fn hex(s: &str) -> String {
    s.bytes().fold(String::with_capacity(s.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// `<label> cases N mismatches M evaluations E` from the script's output.
fn counts(out: &str, label: &str) -> (usize, usize, usize) {
    let line = out.lines().find(|l| l.starts_with(&format!("{label} cases "))).unwrap_or_else(|| {
        panic!("no `{label}` line in the reader's output:\n{out}");
    });
    let n: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(n.len(), 3, "{line}");
    (n[0], n[1], n[2])
}

#[test]
fn every_literal_reads_back_as_exactly_its_input_and_nothing_is_evaluated() {
    let cases: u32 = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut runner = TestRunner::new(Config { rng_seed: RngSeed::Fixed(SEED), failure_persistence: None, ..Config::default() });
    let strategy = prop::collection::vec(piece(), 0..24).prop_map(|p| p.concat());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cases.txt");
    let mut text = String::new();
    let mut planes = [0usize; 17];
    for _ in 0..cases {
        let s = strategy.new_tree(&mut runner).expect("a case").current();
        for c in s.chars() {
            planes[c as usize >> 16] += 1;
        }
        let _ = writeln!(text, "case {} {}", hex(&s), clojure_string(&s));
    }
    // Controls: the same check on texts that are NOT properly written
    // literals must see one mismatch and one evaluation.
    let _ = writeln!(text, "control {} \"a\"b\"", hex("a\"b"));
    let _ = writeln!(text, "control {} \"x\"#=(user/canary!)", hex("x"));
    std::fs::write(&file, &text).expect("write cases");
    assert!(planes.iter().all(|&n| n > 0), "every Unicode plane is exercised: {planes:?}");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clojure/read_literals.clj");
    let out = Command::new("clojure")
        .arg(&script)
        .arg(&file)
        .output()
        .expect("run `clojure` (Debian's clojure package; tests/run.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let (n, mismatches, evaluations) = counts(&stdout, "literals");
    println!(
        "clojure literal writer vs the Clojure reader: {n} cases, {mismatches} mismatches, {evaluations} evaluations (seed {SEED:#x})"
    );
    assert_eq!(n, cases as usize, "{stdout}");
    assert_eq!((mismatches, evaluations), (0, 0), "{stdout}");
    assert_eq!(counts(&stdout, "controls"), (2, 2, 1), "the check itself detects both faults: {stdout}");
}
