use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, UNIX_EPOCH};

use super::*;

const REPLICATED: &str = "# written by the installer\nRELEASE_CHANNEL=stable\nPRIVATE_ADDRESS=10.0.0.5\nSKIP_OPERATOR_INSTALL=0\nREPLICATED_OPTS=\" -e DAEMON_TOKEN=abc123 -e LOG_LEVEL=info -e NODENAME=ip-10-0-0-5.ec2.internal -e NO_PROXY=localhost,10.0.0.5,10.0.0.50,110.0.0.5\"\nREPLICATED_UI_OPTS=\"\"\n";
const OPERATOR: &str = "RELEASE_CHANNEL=stable\nDAEMON_ENDPOINT=[10.0.0.5]:9879\nDAEMON_TOKEN=abc123\nDAEMON_HOST=[10.0.0.5]\nPRIVATE_ADDRESS=10.0.0.5\n# old: 10.0.0.5 54.1.2.3\nREPLICATED_OPERATOR_OPTS=\" -e PUBLIC_ADDRESS=54.1.2.3 -e TAGS=local -e NODENAME=ip-10-0-0-5.ec2.internal\"\n";

fn machine(layout: Layout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join(layout.dir());
    std::fs::create_dir_all(&etc).expect("mkdir");
    if layout == Layout::Rhel {
        // A RHEL machine may also have /etc/default; sysconfig wins.
        std::fs::create_dir_all(dir.path().join("etc/default")).expect("mkdir");
        std::fs::write(dir.path().join("etc/default/replicated"), "PRIVATE_ADDRESS=1.1.1.1\n").expect("write");
    }
    std::fs::write(etc.join("replicated"), REPLICATED).expect("write");
    std::fs::write(etc.join("replicated-operator"), OPERATOR).expect("write");
    dir
}

fn params() -> RewriteParams {
    params_from_flags(&["10.0.0.5=10.1.2.9".into()], &["54.1.2.3=3.3.3.3".into()]).expect("params")
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

const NEW_REPLICATED: &str = "# written by the installer\nRELEASE_CHANNEL=stable\nPRIVATE_ADDRESS=10.1.2.9\nSKIP_OPERATOR_INSTALL=0\nREPLICATED_OPTS=\" -e DAEMON_TOKEN=abc123 -e LOG_LEVEL=info -e NODENAME=ip-10-0-0-5.ec2.internal -e NO_PROXY=localhost,10.1.2.9,10.0.0.50,110.0.0.5\"\nREPLICATED_UI_OPTS=\"\"\n";
const NEW_OPERATOR: &str = "RELEASE_CHANNEL=stable\nDAEMON_ENDPOINT=[10.1.2.9]:9879\nDAEMON_TOKEN=abc123\nDAEMON_HOST=[10.1.2.9]\nPRIVATE_ADDRESS=10.1.2.9\n# old: 10.0.0.5 54.1.2.3\nREPLICATED_OPERATOR_OPTS=\" -e PUBLIC_ADDRESS=3.3.3.3 -e TAGS=local -e NODENAME=ip-10-0-0-5.ec2.internal\"\n";

#[test]
fn rewrites_both_layouts_and_is_idempotent() {
    for layout in [Layout::Debian, Layout::Rhel] {
        let m = machine(layout);
        let etc = m.path().join(layout.dir());
        let r = execute(m.path(), &params(), false, now()).expect("rewrite");
        assert_eq!(r.layout, layout);
        assert!(!r.up_to_date);
        assert_eq!(std::fs::read_to_string(etc.join("replicated")).expect("read"), NEW_REPLICATED);
        assert_eq!(std::fs::read_to_string(etc.join("replicated-operator")).expect("read"), NEW_OPERATOR);
        assert_eq!(r.files[0].changed_lines, 2);
        assert_eq!(r.files[1].changed_lines, 4);
        assert_eq!(r.files[1].replacements, 4);
        let backup = r.files[0].backup.clone().expect("backup");
        assert_eq!(backup, etc.join("replicated.dr-backup-20231114T221320Z"));
        assert_eq!(std::fs::read_to_string(&backup).expect("read"), REPLICATED);
        assert_eq!(r.warnings.iter().filter(|w| w.contains("NODENAME=ip-10-0-0-5.ec2.internal")).count(), 2);
        assert!(r.actions.iter().any(|a| a.contains("old private IP 10.0.0.5:4647")), "{:?}", r.actions);
        if layout == Layout::Rhel {
            assert_eq!(std::fs::read_to_string(m.path().join("etc/default/replicated")).expect("read"), "PRIVATE_ADDRESS=1.1.1.1\n");
        }
        // Again, a second later: nothing to do, no new backup.
        let again = execute(m.path(), &params(), false, now() + Duration::from_secs(1)).expect("again");
        assert!(again.up_to_date);
        assert!(again.files.iter().all(|f| !f.written && f.backup.is_none()));
        assert!(again.files.iter().all(|f| f.changed_lines == 0), "rendered `already up to date`: {again:?}");
        let backups = std::fs::read_dir(&etc)
            .expect("ls")
            .filter(|e| e.as_ref().expect("entry").file_name().to_string_lossy().contains(".dr-backup-"))
            .count();
        assert_eq!(backups, 2);
    }
}

#[test]
fn dry_run_writes_nothing_and_shows_the_plan() {
    let m = machine(Layout::Debian);
    let r = execute(m.path(), &params(), true, now()).expect("dry run");
    assert!(r.dry_run && !r.up_to_date);
    assert!(r.files.iter().all(|f| !f.written && f.backup.is_none()));
    assert_eq!(std::fs::read_to_string(m.path().join("etc/default/replicated")).expect("read"), REPLICATED);
    assert_eq!(std::fs::read_dir(m.path().join("etc/default")).expect("ls").count(), 2);
    assert!(r.diff.contains("--- a/etc/default/replicated\n+++ b/etc/default/replicated\n"));
    assert!(
        r.diff.contains("-DAEMON_HOST=[10.0.0.5]\n-PRIVATE_ADDRESS=10.0.0.5\n+DAEMON_HOST=[10.1.2.9]\n+PRIVATE_ADDRESS=10.1.2.9\n"),
        "{}",
        r.diff
    );
    // (The CLI renders these as `would change 2 line(s)` and the diff: cli::render's tests.)
    assert_eq!(r.files[0].changed_lines, 2, "{r:?}");
    assert!(r.diff.contains("+PRIVATE_ADDRESS=10.1.2.9"));
    let real = execute(m.path(), &params(), false, now()).expect("real");
    assert_eq!(real.diff, r.diff);
}

#[test]
fn a_bad_line_in_either_file_writes_nothing() {
    for (file, text, line) in
        [("replicated-operator", format!("{OPERATOR}BROKEN LINE\n"), 8), ("replicated", format!("{REPLICATED}X=\"unterminated\n"), 7)]
    {
        let m = machine(Layout::Debian);
        let etc = m.path().join("etc/default");
        std::fs::write(etc.join(file), &text).expect("write");
        let before: Vec<_> = FILES.iter().map(|f| std::fs::read(etc.join(f)).expect("read")).collect();
        for dry_run in [true, false] {
            let e = execute(m.path(), &params(), dry_run, now()).expect_err("bad line");
            assert_eq!(e.kind(), crate::steps::error::ErrorKind::Invalid);
            let msg = e.to_string();
            assert!(msg.contains(&format!("{}:{line}:", etc.join(file).display())), "{msg}");
            assert!(!msg.contains("abc123"), "the message must not leak values: {msg}");
        }
        let after: Vec<_> = FILES.iter().map(|f| std::fs::read(etc.join(f)).expect("read")).collect();
        assert_eq!(before, after);
        assert_eq!(std::fs::read_dir(&etc).expect("ls").count(), 2, "no backup, no temp file");
    }
}

#[test]
fn keeps_owner_and_mode() {
    let m = machine(Layout::Rhel);
    let f = m.path().join("etc/sysconfig/replicated-operator");
    std::os::unix::fs::chown(&f, Some(1000), Some(1001)).expect("chown (tests run as root)");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let r = execute(m.path(), &params(), false, now()).expect("rewrite");
    let meta = std::fs::metadata(&f).expect("meta");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (1000, 1001, 0o640));
    let b = std::fs::metadata(r.files[1].backup.as_ref().expect("backup")).expect("meta");
    assert_eq!((b.uid(), b.gid(), b.mode() & 0o7777), (1000, 1001, 0o640));
}

#[test]
fn missing_files_symlinks_and_stray_temps() {
    let m = machine(Layout::Debian);
    let etc = m.path().join("etc/default");
    std::fs::remove_file(etc.join("replicated-operator")).expect("rm");
    std::fs::write(etc.join("replicated.dr-tmp-999999"), "torn").expect("write");
    let r = execute(m.path(), &params(), false, now()).expect("rewrite");
    assert!(r.warnings.iter().any(|w| w.contains("replicated-operator is missing")));
    assert_eq!(r.removed_temp_files, vec![etc.join("replicated.dr-tmp-999999")]);
    assert!(!etc.join("replicated.dr-tmp-999999").exists());
    // The public IP only lives in the operator file: reported as not found.
    assert!(r.warnings.iter().any(|w| w.contains("neither the old public IP 54.1.2.3")), "{:?}", r.warnings);

    std::os::unix::fs::symlink("/etc/hostname", etc.join("replicated-operator")).expect("symlink");
    let e = execute(m.path(), &params(), false, now()).expect_err("symlink");
    assert_eq!(e.kind(), crate::steps::error::ErrorKind::Refused);

    let empty = tempfile::tempdir().expect("tempdir");
    let e = execute(empty.path(), &params(), false, now()).expect_err("no files");
    assert!(e.to_string().contains("etc/sysconfig/replicated"), "{e}");
    assert_eq!(e.kind(), crate::steps::error::ErrorKind::Invalid);
}

#[test]
fn params_are_validated() {
    let e = params_from_flags(&["10.0.0.5".into()], &[]).expect_err("no =");
    assert!(e.to_string().starts_with("--private \"10.0.0.5\""), "{e}");
    let e = params_from_flags(&[], &["1.2.3.4=1.2.3.x".into()]).expect_err("bad new");
    assert!(e.to_string().contains("--public") && e.to_string().contains("NEW"), "{e}");
    assert_eq!(e.kind(), crate::steps::error::ErrorKind::Invalid);
    assert!(params_from_flags(&["10.0.0.5=fd00::1".into()], &[]).is_err());
    assert!(matches!(params_from_flags(&[], &[]), Err(RewriteError::NothingRequested)));
    assert!(matches!(params_from_flags(&["10.0.0.5=10.0.0.6".into()], &["10.0.0.5=10.0.0.7".into()]), Err(RewriteError::Conflict { .. })));
    let p = params_from_flags(&["[fd00::5]=[fd00::9]".into(), "10.0.0.5=10.0.0.5".into()], &[]).expect("ok");
    assert_eq!(effective(&p).len(), 1);
}

#[test]
fn ipv6_bracketed() {
    let m = machine(Layout::Debian);
    let etc = m.path().join("etc/default");
    std::fs::write(
        etc.join("replicated-operator"),
        "DAEMON_ENDPOINT=[fd00::5]:9879\nDAEMON_HOST=[fd00::5]\nPRIVATE_ADDRESS=fd00::5\nX=[fd00::55]\n",
    )
    .expect("write");
    std::fs::write(etc.join("replicated"), "PRIVATE_ADDRESS=fd00::5\n").expect("write");
    let p = params_from_flags(&["fd00::5=fd00::9".into()], &[]).expect("params");
    execute(m.path(), &p, false, now()).expect("rewrite");
    assert_eq!(
        std::fs::read_to_string(etc.join("replicated-operator")).expect("read"),
        "DAEMON_ENDPOINT=[fd00::9]:9879\nDAEMON_HOST=[fd00::9]\nPRIVATE_ADDRESS=fd00::9\nX=[fd00::55]\n"
    );
    let found = find_addresses(m.path()).expect("find");
    assert_eq!(found.private, Some("fd00::9".parse().expect("ip")));
}

#[test]
fn finds_the_addresses_in_the_files() {
    let m = machine(Layout::Debian);
    let ips = |v: &[&str]| v.iter().map(|s| s.parse::<IpAddr>().expect("ip")).collect::<Vec<_>>();
    let found = find_addresses(m.path()).expect("find");
    assert_eq!(
        found,
        FoundAddresses {
            layout: Layout::Debian,
            private: Some("10.0.0.5".parse().expect("ip")),
            public: Some("54.1.2.3".parse().expect("ip")),
            private_all: ips(&["10.0.0.5"]),
            public_all: ips(&["54.1.2.3"]),
        }
    );
    // Interrupted between the two files: both addresses are listed, and
    // rewriting each of them to the current one finishes the job.
    std::fs::write(m.path().join("etc/default/replicated"), "PRIVATE_ADDRESS=10.0.0.6\n").expect("write");
    let found = find_addresses(m.path()).expect("find");
    assert_eq!(found.private, Some("10.0.0.6".parse().expect("ip")));
    assert_eq!(found.private_all, ips(&["10.0.0.6", "10.0.0.5"]));
    let current: IpAddr = "10.0.0.6".parse().expect("ip");
    let p =
        RewriteParams { private: found.private_all.iter().map(|old| AddressChange { old: *old, new: current }).collect(), public: vec![] };
    execute(m.path(), &p, false, now()).expect("finish");
    assert_eq!(find_addresses(m.path()).expect("find").private_all, ips(&["10.0.0.6"]));
    std::fs::write(m.path().join("etc/default/replicated"), "PRIVATE_ADDRESS=10.0.0.x\n").expect("write");
    let e = find_addresses(m.path()).expect_err("bad address");
    assert!(e.to_string().contains("replicated:1: PRIVATE_ADDRESS"), "{e}");
    std::fs::write(m.path().join("etc/default/replicated"), "RELEASE_CHANNEL=stable\n").expect("write");
    std::fs::write(m.path().join("etc/default/replicated-operator"), "A=1\n").expect("write");
    let found = find_addresses(m.path()).expect("find");
    assert_eq!((found.private, found.public, found.private_all.len()), (None, None, 0));
}

#[test]
fn control_characters_in_values_are_refused_with_file_and_line() {
    for (bad, what) in [
        ("PRIVATE_ADDRESS=10.0.0.5\0evil\n", "NUL"),
        ("X=\"a\x01b\"\n", "U+0001"),
        ("X=a\rb\n", "carriage return"),
        ("# c\x1b[2J\n", "U+001B"),
    ] {
        let m = machine(Layout::Debian);
        let etc = m.path().join(Layout::Debian.dir());
        let text = format!("{}{bad}", REPLICATED);
        std::fs::write(etc.join("replicated"), &text).expect("write");
        let err = execute(m.path(), &params(), false, now()).expect_err("control character").to_string();
        let line = REPLICATED.lines().count() + 1;
        assert!(err.contains(&format!("{}:{line}:", etc.join("replicated").display())) && err.contains(what), "{err}");
        assert_eq!(std::fs::read_to_string(etc.join("replicated")).expect("read"), text, "nothing written");
    }
}

#[test]
fn with_both_rhel_and_debian_files_both_sets_are_rewritten() {
    let m = machine(Layout::Rhel);
    let debian = m.path().join(Layout::Debian.dir());
    std::fs::write(debian.join("replicated"), REPLICATED).expect("write");
    std::fs::write(debian.join("replicated-operator"), OPERATOR).expect("write");
    let r = execute(m.path(), &params(), false, now()).expect("rewrite");
    assert_eq!(r.layout, Layout::Rhel);
    for dir in [Layout::Rhel.dir(), Layout::Debian.dir()] {
        let etc = m.path().join(dir);
        assert_eq!(std::fs::read_to_string(etc.join("replicated")).expect("read"), NEW_REPLICATED, "{dir}");
        assert_eq!(std::fs::read_to_string(etc.join("replicated-operator")).expect("read"), NEW_OPERATOR, "{dir}");
    }
    assert_eq!(r.files.len(), 4, "{:?}", r.files);
    assert!(
        r.warnings.iter().any(|w| w.contains("etc/sysconfig/replicated") && w.contains("etc/default/replicated") && w.contains("both")),
        "{:?}",
        r.warnings
    );
    let found = find_addresses(m.path()).expect("find");
    assert_eq!(found.private_all, vec!["10.1.2.9".parse::<IpAddr>().expect("ip")]);
}
