//! `dr-agent rewrite-addresses` as a user runs it: the built binary on a
//! temporary machine root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

const AGENT: &str = env!("CARGO_BIN_EXE_dr-agent");

const REPLICATED: &str = "RELEASE_CHANNEL=stable\n\
PRIVATE_ADDRESS=10.0.0.5\n\
SKIP_OPERATOR_INSTALL=0\n\
# 10.0.0.5 in a comment stays as it is\n\
REPLICATED_OPTS=\" -e DAEMON_TOKEN=abc123 -e LOG_LEVEL=info -e NODENAME=ip-10-0-0-5.ec2.internal -e HTTP_PROXY=http://10.0.0.50:3128 -e NO_PROXY=localhost,127.0.0.1,10.0.0.5,10.0.0.50,110.0.0.5,10.0.0.5:9879\"\n\
REPLICATED_UI_OPTS=\"\"\n\
OTHER_HOST=10.0.0.50\n\
ANOTHER=110.0.0.5\n";

const OPERATOR: &str = "RELEASE_CHANNEL=stable\n\
DAEMON_ENDPOINT=[10.0.0.5]:9879\n\
DAEMON_TOKEN=abc123\n\
DAEMON_HOST=[10.0.0.5]\n\
PRIVATE_ADDRESS=10.0.0.5\n\
REPLICATED_OPERATOR_OPTS=\" -e PUBLIC_ADDRESS=54.1.2.3 -e TAGS=local -e LOG_LEVEL=info -e NODENAME=ip-10-0-0-5.ec2.internal\"\n";

const NEW_REPLICATED: &str = "RELEASE_CHANNEL=stable\n\
PRIVATE_ADDRESS=10.9.8.7\n\
SKIP_OPERATOR_INSTALL=0\n\
# 10.0.0.5 in a comment stays as it is\n\
REPLICATED_OPTS=\" -e DAEMON_TOKEN=abc123 -e LOG_LEVEL=info -e NODENAME=ip-10-0-0-5.ec2.internal -e HTTP_PROXY=http://10.0.0.50:3128 -e NO_PROXY=localhost,127.0.0.1,10.9.8.7,10.0.0.50,110.0.0.5,10.9.8.7:9879\"\n\
REPLICATED_UI_OPTS=\"\"\n\
OTHER_HOST=10.0.0.50\n\
ANOTHER=110.0.0.5\n";

const NEW_OPERATOR: &str = "RELEASE_CHANNEL=stable\n\
DAEMON_ENDPOINT=[10.9.8.7]:9879\n\
DAEMON_TOKEN=abc123\n\
DAEMON_HOST=[10.9.8.7]\n\
PRIVATE_ADDRESS=10.9.8.7\n\
REPLICATED_OPERATOR_OPTS=\" -e PUBLIC_ADDRESS=3.4.5.6 -e TAGS=local -e LOG_LEVEL=info -e NODENAME=ip-10-0-0-5.ec2.internal\"\n";

const FORWARD: [&str; 4] = ["--private", "10.0.0.5=10.9.8.7", "--public", "54.1.2.3=3.4.5.6"];
const BACKWARD: [&str; 4] = ["--private", "10.9.8.7=10.0.0.5", "--public", "3.4.5.6=54.1.2.3"];

fn machine(dir: &Path, dist: &str, replicated: &str, operator: &str) -> PathBuf {
    let root = dir.join("root");
    let etc = root.join(dist);
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::write(etc.join("replicated"), replicated).expect("write");
    std::fs::write(etc.join("replicated-operator"), operator).expect("write");
    root
}

fn agent(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(AGENT);
    c.arg("rewrite-addresses").arg("--root").arg(root).args(args);
    c.env_remove("RUST_LOG").stdin(Stdio::null());
    c
}

fn run(root: &Path, args: &[&str]) -> Output {
    agent(root, args).output().expect("run dr-agent")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "dr-agent failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

fn entries(dir: &Path, mark: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().expect("name").to_string_lossy().contains(mark))
        .collect();
    v.sort();
    v
}

/// Applies one file's part of a line-aligned unified diff to `old`: context
/// and `-` lines must match the old text, and the k-th `+` line of a block
/// replaces its k-th `-` line. The result must equal what the real run
/// writes.
fn apply_plus_lines(old: &str, diff: &str, file: &str) -> String {
    let mut lines: Vec<String> = old.split_inclusive('\n').map(str::to_owned).collect();
    let header = format!("+++ b/{file}\n");
    let Some(start) = diff.find(&header) else {
        return old.to_owned();
    };
    let body = &diff[start + header.len()..];
    let body = body.split("\n--- ").next().expect("body");
    let mut at = 0usize;
    let mut removed = std::collections::VecDeque::new();
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("@@ -") {
            let new_start: usize =
                rest.split(" +").nth(1).and_then(|s| s.split([',', ' ']).next()).and_then(|s| s.parse().ok()).expect("hunk header");
            at = new_start - 1;
            removed.clear();
        } else if let Some(ctx) = l.strip_prefix(' ') {
            assert_eq!(lines[at].trim_end_matches('\n'), ctx, "context line {} of {file}", at + 1);
            at += 1;
        } else if let Some(gone) = l.strip_prefix('-') {
            assert_eq!(lines[at].trim_end_matches('\n'), gone, "removed line {} of {file}", at + 1);
            removed.push_back(at);
            at += 1;
        } else if let Some(new) = l.strip_prefix('+') {
            let i = removed.pop_front().expect("a + line without its - line");
            lines[i] = format!("{new}\n");
        }
    }
    lines.concat()
}

#[test]
fn debian_and_rhel_rewrite_then_nothing_to_do() {
    for dist in ["etc/default", "etc/sysconfig"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = machine(dir.path(), dist, REPLICATED, OPERATOR);
        let etc = root.join(dist);

        let dry = ok(&run(&root, &[&FORWARD[..], &["--dry-run"]].concat()));
        assert!(dry.contains("dry run: nothing is written"), "{dry}");
        assert_eq!(std::fs::read_to_string(etc.join("replicated")).expect("read"), REPLICATED);
        assert_eq!(std::fs::read_to_string(etc.join("replicated-operator")).expect("read"), OPERATOR);
        assert_eq!(std::fs::read_dir(&etc).expect("ls").count(), 2, "the dry run created files");

        let out = ok(&run(&root, &FORWARD));
        let new_r = std::fs::read_to_string(etc.join("replicated")).expect("read");
        let new_o = std::fs::read_to_string(etc.join("replicated-operator")).expect("read");
        assert_eq!(new_r, NEW_REPLICATED);
        assert_eq!(new_o, NEW_OPERATOR);
        // The dry run's + lines are exactly what the real run wrote.
        assert_eq!(apply_plus_lines(REPLICATED, &dry, &format!("{dist}/replicated")), new_r);
        assert_eq!(apply_plus_lines(OPERATOR, &dry, &format!("{dist}/replicated-operator")), new_o);
        assert!(out.contains("changed 2 line(s)"), "{out}");
        assert!(out.contains("NODENAME=ip-10-0-0-5.ec2.internal encodes the old private IP 10.0.0.5"), "{out}");
        assert!(out.contains("builders still point at the old private IP 10.0.0.5:4647"), "{out}");
        assert_eq!(entries(&etc, ".dr-backup-").len(), 2);
        for (f, content) in [("replicated", REPLICATED), ("replicated-operator", OPERATOR)] {
            let b = entries(&etc, &format!("{f}.dr-backup-"));
            assert_eq!(b.len(), 1, "{f}: {b:?}");
            assert_eq!(std::fs::read_to_string(&b[0]).expect("read"), content);
            assert!(out.contains(&format!("backup {}", b[0].display())), "{out}");
        }

        let again = ok(&run(&root, &FORWARD));
        assert!(again.contains("Already up to date"), "{again}");
        assert_eq!(entries(&etc, ".dr-backup-").len(), 2, "a second run made a backup");
        assert_eq!(std::fs::read_to_string(etc.join("replicated")).expect("read"), NEW_REPLICATED);

        // JSON for scripts.
        let json: serde_json::Value =
            serde_json::from_str(&ok(&run(&root, &[&FORWARD[..], &["--output", "json"]].concat()))).expect("json");
        assert_eq!(json["up_to_date"], true);
        assert_eq!(json["layout"], if dist == "etc/default" { "debian" } else { "rhel" });
    }
}

#[test]
fn the_dry_run_diff_applies_with_patch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = machine(dir.path(), "etc/default", REPLICATED, &OPERATOR.replace("TAGS=local -e ", ""));
    let copy = machine(&dir.path().join("copy"), "etc/default", REPLICATED, &OPERATOR.replace("TAGS=local -e ", ""));
    let out = ok(&run(&root, &[&FORWARD[..], &["--dry-run", "--output", "json"]].concat()));
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    let diff = json["diff"].as_str().expect("diff");
    let mut patch = Command::new("patch")
        .args(["-p1", "--quiet", "--forward", "-d"])
        .arg(&copy)
        .stdin(Stdio::piped())
        .spawn()
        .expect("patch is installed");
    use std::io::Write;
    patch.stdin.take().expect("stdin").write_all(diff.as_bytes()).expect("write diff");
    assert!(patch.wait().expect("patch").success());
    ok(&run(&root, &FORWARD));
    for f in ["replicated", "replicated-operator"] {
        assert_eq!(
            std::fs::read(root.join("etc/default").join(f)).expect("read"),
            std::fs::read(copy.join("etc/default").join(f)).expect("read"),
            "{f}"
        );
    }
}

#[test]
fn malformed_file_names_the_line_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = format!("{OPERATOR}OOPS=\"no closing quote\n");
    let root = machine(dir.path(), "etc/default", REPLICATED, &bad);
    let etc = root.join("etc/default");
    for extra in [&[][..], &["--dry-run"][..]] {
        let out = run(&root, &[&FORWARD[..], extra].concat());
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}:7: unbalanced double quote", etc.join("replicated-operator").display())), "{err}");
    }
    assert_eq!(std::fs::read_to_string(etc.join("replicated")).expect("read"), REPLICATED, "the valid file changed");
    assert_eq!(std::fs::read_to_string(etc.join("replicated-operator")).expect("read"), bad);
    assert_eq!(std::fs::read_dir(&etc).expect("ls").count(), 2);

    // Bad flags name the flag.
    let out = run(&root, &["--private", "10.0.0.5=10.0.0.999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--private"), "{out:?}");
}

#[test]
fn owner_and_mode_are_kept_and_the_backup_is_made_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = machine(dir.path(), "etc/sysconfig", REPLICATED, OPERATOR);
    let etc = root.join("etc/sysconfig");
    for (f, mode) in [("replicated", 0o600), ("replicated-operator", 0o644)] {
        std::os::unix::fs::chown(etc.join(f), Some(1000), Some(1000)).expect("chown (tests run as root)");
        std::fs::set_permissions(etc.join(f), std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    ok(&run(&root, &FORWARD));
    ok(&run(&root, &FORWARD));
    for (f, mode) in [("replicated", 0o600), ("replicated-operator", 0o644)] {
        let m = std::fs::metadata(etc.join(f)).expect("meta");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, mode), "{f}");
        let backups: Vec<_> = entries(&etc, &format!("{f}.dr-backup-"));
        assert_eq!(backups.len(), 1, "{f}: {backups:?}");
        let b = std::fs::metadata(&backups[0]).expect("meta");
        assert_eq!((b.uid(), b.gid(), b.mode() & 0o7777), (1000, 1000, mode), "{f} backup");
        let name = backups[0].file_name().expect("name").to_string_lossy().into_owned();
        let stamp = name.rsplit(".dr-backup-").next().expect("stamp");
        assert!(stamp.len() == 16 && stamp.as_bytes()[8] == b'T' && stamp.ends_with('Z'), "{stamp}");
    }
    assert!(entries(&etc, ".dr-tmp-").is_empty());
}

/// SIGKILL at random moments of many runs: every file is always wholly old
/// or wholly new, and the next run cleans up after the killed one.
#[test]
fn sigkill_never_leaves_a_torn_file() {
    // Large files (many comment lines) so that a kill lands mid-write.
    let pad: String = (0..40_000).map(|i| format!("# padding line {i} of a large environment file\n")).collect();
    let old = [format!("{pad}{REPLICATED}"), format!("{OPERATOR}{pad}")];
    let new = [format!("{pad}{NEW_REPLICATED}"), format!("{NEW_OPERATOR}{pad}")];
    let dir = tempfile::tempdir().expect("tempdir");
    let root = machine(dir.path(), "etc/default", &old[0], &old[1]);
    let etc = root.join("etc/default");
    let names = ["replicated", "replicated-operator"];

    // How long a whole run takes, to spread the kills over it.
    let t = Instant::now();
    ok(&run(&root, &FORWARD));
    ok(&run(&root, &BACKWARD));
    let full = t.elapsed() / 2;
    let budget = Instant::now();

    let mut rng = rand::rng();
    let (mut killed, mut torn_temps, mut mixed) = (0, 0, 0);
    let rounds = 200;
    for round in 0..rounds {
        let state: Vec<bool> = names
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let bytes = std::fs::read(etc.join(f)).expect("read");
                if bytes == old[i].as_bytes() {
                    false
                } else {
                    assert_eq!(bytes, new[i].as_bytes(), "round {round}: {f} is torn");
                    true
                }
            })
            .collect();
        if state[0] != state[1] {
            mixed += 1;
        }
        let args = if state.iter().any(|s| !s) { FORWARD } else { BACKWARD };
        let mut child = agent(&root, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        let delay = rng.random_range(0..=(full.as_micros() as u64 * 5 / 4).max(1));
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().expect("wait");
        if status.code().is_none() {
            killed += 1;
        }
        if !entries(&etc, ".dr-tmp-").is_empty() {
            torn_temps += 1;
        }
        // Backups are complete too (they appear by link, never half-written).
        for b in entries(&etc, ".dr-backup-") {
            let bytes = std::fs::read(&b).expect("read backup");
            assert!(old.iter().chain(new.iter()).any(|c| c.as_bytes() == bytes), "round {round}: backup {} is torn", b.display());
            std::fs::remove_file(&b).expect("remove backup");
        }
        assert!(budget.elapsed() < Duration::from_secs(90), "the kill loop is too slow ({round} rounds)");
    }
    eprintln!(
        "{rounds} rounds, one run takes {full:?}: {killed} killed before exiting, {torn_temps} left a temporary file, \
         {mixed} found one file rewritten and the other not; {:?} in all",
        budget.elapsed()
    );
    assert!(killed > rounds / 4, "too few kills landed during a run: {killed}");
    assert!(torn_temps > 0, "no kill landed in the middle of a write");

    // A last complete run finishes the job and removes the stray temp files.
    ok(&run(&root, &FORWARD));
    for (i, f) in names.iter().enumerate() {
        assert_eq!(std::fs::read(etc.join(f)).expect("read"), new[i].as_bytes());
    }
    assert!(entries(&etc, ".dr-tmp-").is_empty(), "stray temporary files remain");
}
