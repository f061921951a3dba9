//! `dr-agent wipe-nomad` on a simulated services machine: refusals while
//! the app or Nomad runs and for symlink escapes, the wipe, idempotence and
//! the dry run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dr_tests::{bin, services_machine_root};

/// The fake Nomad process of one test would make every other wipe refuse
/// (in this binary: also the failover tests' `wipe_nomad` steps): tests
/// that wipe hold a shared guard, the one that runs a fake Nomad an
/// exclusive one ([`dr_tests::nomad_exclusive`]).
fn nomad_lock() -> dr_tests::NomadGuard {
    dr_tests::nomad_shared()
}

struct Machine {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    root: PathBuf,
    config: PathBuf,
}

impl Machine {
    fn new() -> Machine {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let root = services_machine_root(&dir, "10.0.0.5", "35.1.2.3");
        // A Nomad state with some depth.
        let nomad = root.join("opt/nomad");
        for d in ["server/raft/snapshots/2-100", "client/alloc/abc"] {
            std::fs::create_dir_all(nomad.join(d)).expect("mkdir");
        }
        std::fs::write(nomad.join("server/raft/snapshots/2-100/state.bin"), vec![7u8; 1000]).expect("write");
        std::fs::write(nomad.join("client/alloc/abc/log"), b"hello").expect("write");
        std::fs::write(nomad.join("checkpoint-signature"), b"sig").expect("write");
        std::fs::set_permissions(&nomad, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nroot = \"{}\"\n[replicated]\nreplicatedctl = \"{}\"\ncommand_timeout = \"10s\"\n",
                dir.join("state").display(),
                root.display(),
                bin("dr-sim-replicatedctl").display()
            ),
        )
        .expect("config");
        Machine { _dir: tmp, dir, root, config }
    }

    fn nomad(&self) -> PathBuf {
        self.root.join("opt/nomad")
    }

    fn sim(&self) -> Command {
        let mut c = Command::new(bin("dr-sim-replicatedctl"));
        c.env("DR_SIM_STATE_DIR", self.root.join("var/lib/dr-sim")).env("DR_SIM_STOP_SECS", "0.1");
        c
    }

    fn wipe(&self, args: &[&str]) -> Output {
        Command::new(bin("dr-agent"))
            .args(["wipe-nomad", "--config"])
            .arg(&self.config)
            .args(args)
            .env("DR_SIM_STATE_DIR", self.root.join("var/lib/dr-sim"))
            .stdin(Stdio::null())
            .output()
            .expect("run dr-agent wipe-nomad")
    }

    fn stop_app(&self) {
        let out = self.sim().args(["app", "stop"]).output().expect("sim");
        assert!(out.status.success(), "app stop: {}", text(&out.stderr));
        dr_tests::assert_eventually!(
            Duration::from_secs(10),
            text(&self.sim().args(["app", "status"]).output().expect("sim").stdout).contains("\"State\":\"stopped\""),
            "the simulated app to stop"
        );
    }

    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.nomad(), &self.nomad(), &mut out);
        out.sort();
        out
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).expect("ls").flatten() {
        let p = e.path();
        out.push(p.strip_prefix(base).expect("under base").display().to_string());
        if e.file_type().expect("type").is_dir() {
            walk(base, &p, out);
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed ({}): {}{}", out.status, text(&out.stdout), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

#[test]
fn refuses_while_the_app_runs() {
    let m = Machine::new();
    let before = m.files();
    let out = m.wipe(&[]);
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("not stopped") && text(&out.stderr).contains("started"), "{}", text(&out.stderr));
    assert_eq!(m.files(), before, "nothing touched");
    // The dry run says the same, without failing (a plan can show the wipe
    // after an app stop).
    let dry = json(&m.wipe(&["--dry-run", "--output", "json"]));
    assert_eq!(dry["state"], "would wipe", "{dry}");
    assert!(dry["blocked_by"][0].as_str().unwrap_or_default().contains("not stopped"), "{dry}");
    assert_eq!(m.files(), before, "nothing touched");
}

#[test]
fn refuses_while_a_nomad_process_runs() {
    let _guard = dr_tests::nomad_exclusive();
    let m = Machine::new();
    m.stop_app();
    // A process whose executable is named `nomad`.
    let fake = m.dir.join("nomad");
    std::fs::copy("/bin/sleep", &fake).expect("copy sleep");
    let mut nomad = Command::new(&fake).arg("30").spawn().expect("start a fake nomad");
    let out = m.wipe(&[]);
    let _ = nomad.kill();
    let _ = nomad.wait();
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("Nomad is running"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("pid {}", nomad.id())), "{}", text(&out.stderr));
    assert!(m.nomad().join("checkpoint-signature").exists());
}

#[test]
fn refuses_symlinks_that_lead_elsewhere() {
    let _guard = nomad_lock();
    let m = Machine::new();
    m.stop_app();
    // The data dir itself is a symlink to a directory outside the root.
    let outside = m.dir.join("precious");
    std::fs::create_dir_all(outside.join("db")).expect("mkdir");
    std::fs::write(outside.join("db/data"), b"keep me").expect("write");
    std::fs::remove_dir_all(m.nomad()).expect("rm");
    std::os::unix::fs::symlink(&outside, m.nomad()).expect("symlink");
    let out = m.wipe(&[]);
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("symlink"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(outside.join("db/data")).expect("target intact"), b"keep me");

    // A symlinked parent (/opt -> elsewhere) is refused too.
    std::fs::remove_file(m.nomad()).expect("rm");
    let opt = m.root.join("opt");
    std::fs::remove_dir(&opt).expect("rmdir");
    let other_opt = m.dir.join("other-opt");
    std::fs::create_dir_all(other_opt.join("nomad")).expect("mkdir");
    std::fs::write(other_opt.join("nomad/raft.db"), b"other").expect("write");
    std::os::unix::fs::symlink(&other_opt, &opt).expect("symlink");
    let out = m.wipe(&[]);
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("leads elsewhere"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(other_opt.join("nomad/raft.db")).expect("intact"), b"other");
}

#[test]
fn dry_run_lists_then_the_wipe_removes_exactly_that_and_is_idempotent() {
    let _guard = nomad_lock();
    let m = Machine::new();
    // A symlink inside the data dir pointing outside: its target survives.
    let outside = m.dir.join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("keep"), b"keep").expect("write");
    std::os::unix::fs::symlink(&outside, m.nomad().join("escape")).expect("symlink");
    m.stop_app();
    let before = m.files();

    let dry = json(&m.wipe(&["--dry-run", "--output", "json"]));
    assert_eq!(dry["state"], "would wipe", "{dry}");
    assert_eq!(dry["blocked_by"], serde_json::json!([]), "{dry}");
    assert_eq!(m.files(), before, "the dry run removes nothing");
    let entries: Vec<String> =
        dry["entries"].as_array().expect("entries").iter().map(|e| e.as_str().unwrap_or_default().to_owned()).collect();
    assert!(entries.iter().any(|e| e.ends_with("opt/nomad/server")), "{entries:?}");
    // 4 files (raft.db, state.bin, log, checkpoint-signature) + the symlink.
    assert_eq!(dry["removed"]["files"], 5, "{dry}");

    let done = json(&m.wipe(&["--output", "json"]));
    assert_eq!(done["state"], "wiped", "{done}");
    assert_eq!(done["removed"], dry["removed"], "the wipe removes what the dry run showed");
    assert_eq!(done["mode"], "0750");
    assert!(done["rename_ms"].as_f64().is_some() && done["delete_ms"].as_f64().is_some(), "{done}");
    assert!(m.nomad().is_dir(), "the data dir is recreated");
    assert!(m.files().is_empty(), "and empty");
    assert_eq!(std::fs::metadata(m.nomad()).expect("stat").permissions().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::read(outside.join("keep")).expect("symlink target intact"), b"keep");
    let aside: Vec<_> = std::fs::read_dir(m.root.join("opt"))
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".nomad-wipe-"))
        .collect();
    assert!(aside.is_empty(), "nothing left aside");

    let again = m.wipe(&[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("Already done"), "{}", text(&again.stdout));
}

#[test]
fn a_tree_left_aside_by_an_interrupted_wipe_is_finished() {
    let _guard = nomad_lock();
    let m = Machine::new();
    m.stop_app();
    // Interrupted right after the rename: the data dir is gone, the tree is aside.
    let aside = m.root.join("opt/.nomad-wipe-20250101T000000Z");
    std::fs::rename(m.nomad(), &aside).expect("rename");
    let out = m.wipe(&["--output", "json"]);
    let report = json(&out);
    assert_eq!(report["state"], "wiped", "{report}");
    assert!(!aside.exists(), "the leftover is deleted");
    assert!(m.nomad().is_dir(), "the data dir is back, empty");
    assert!(m.files().is_empty());
}

/// Real mounts made by a test, unmounted (lazily, loop devices detached)
/// on drop, deepest first, whatever the test did.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?} failed (these tests need root): {}", text(&out.stderr));
    }
    fn tmpfs(&mut self, at: &Path) {
        std::fs::create_dir_all(at).expect("mkdir");
        Mounts::run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "dr-test-tmpfs"]).arg(at));
        self.0.push(at.to_owned());
    }
    fn bind(&mut self, from: &Path, at: &Path) {
        std::fs::create_dir_all(at).expect("mkdir");
        Mounts::run(Command::new("mount").arg("--bind").arg(from).arg(at));
        self.0.push(at.to_owned());
    }
    /// A fresh ext4 on a loop device, mounted at `at`.
    fn ext4(&mut self, img: &Path, at: &Path) {
        std::fs::create_dir_all(at).expect("mkdir");
        Mounts::run(Command::new("truncate").arg("-s").arg("16M").arg(img));
        Mounts::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(img));
        Mounts::run(Command::new("mount").args(["-o", "loop"]).arg(img).arg(at));
        self.0.push(at.to_owned());
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").args(["-l", "-d"]).arg(m).stderr(Stdio::null()).status();
        }
    }
}

/// The mount points of this mount namespace.
fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(|m| PathBuf::from(m.replace("\\040", " "))))
        .collect()
}

fn config_with(m: &Machine, extra: &str) {
    let mut text = std::fs::read_to_string(&m.config).expect("config");
    text.push_str(extra);
    std::fs::write(&m.config, text).expect("config");
}

#[test]
fn mounts_below_the_data_dir_are_refused_by_name_and_never_deleted_through() {
    let _guard = nomad_lock();
    let m = Machine::new();
    let mut mounts = Mounts::default();
    // A bind mount of a directory outside the Nomad dir (same file system:
    // same device id, only mountinfo tells) and a tmpfs (another device).
    let precious = m.dir.join("precious");
    std::fs::create_dir_all(precious.join("db")).expect("mkdir");
    std::fs::write(precious.join("db/data"), b"keep me").expect("write");
    let vol = m.nomad().join("client/alloc/abc/vol");
    mounts.bind(&precious, &vol);
    let tmp = m.nomad().join("server/tmp space");
    mounts.tmpfs(&tmp);
    std::fs::write(tmp.join("scratch"), b"on tmpfs").expect("write");
    m.stop_app();
    let before = m.files();

    let dry = json(&m.wipe(&["--dry-run", "--output", "json"]));
    let listed: Vec<&str> = dry["mounts_below"].as_array().expect("mounts_below").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(listed.len(), 2, "{dry}");
    assert!(listed.iter().any(|l| l.ends_with("client/alloc/abc/vol")) && listed.iter().any(|l| l.ends_with("server/tmp space")), "{dry}");
    let blocked = dry["blocked_by"][0].as_str().unwrap_or_default();
    assert!(blocked.contains("mount points below") && blocked.contains("unmount_below"), "{dry}");
    // Only the Nomad dir's own 4 files (raft.db, state.bin, log,
    // checkpoint-signature), not the 2 behind the mounts.
    assert_eq!(dry["removed"]["files"], 4, "{dry}");

    for _ in 0..2 {
        let out = m.wipe(&[]);
        assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("client/alloc/abc/vol") && err.contains("server/tmp space") && err.contains("unmount_below"), "{err}");
        assert_eq!(std::fs::read(precious.join("db/data")).expect("bind source intact"), b"keep me");
        assert_eq!(std::fs::read(tmp.join("scratch")).expect("tmpfs intact"), b"on tmpfs");
        assert_eq!(m.files(), before, "nothing touched");
    }
}

#[test]
fn unmount_below_set_unmounts_them_then_wipes() {
    let _guard = nomad_lock();
    let m = Machine::new();
    config_with(&m, "[nomad]\nunmount_below = true\n");
    let mut mounts = Mounts::default();
    let precious = m.dir.join("precious");
    std::fs::create_dir_all(&precious).expect("mkdir");
    std::fs::write(precious.join("data"), b"keep me").expect("write");
    let vol = m.nomad().join("client/alloc/abc/vol");
    mounts.bind(&precious, &vol);
    // A tmpfs stacked inside the bind mount: unmounted first.
    mounts.tmpfs(&vol.join("inner"));
    m.stop_app();
    let done = json(&m.wipe(&["--output", "json"]));
    assert_eq!(done["state"], "wiped", "{done}");
    assert_eq!(done["mounts_below"].as_array().map(|a| a.len()), Some(2), "{done}");
    assert_eq!(done["removed"]["files"], 4, "{done}");
    assert!(m.files().is_empty(), "{:?}", m.files());
    let table = mount_points();
    assert!(!table.iter().any(|p| p.starts_with(m.nomad())), "unmounted: {table:?}");
    assert_eq!(std::fs::read(precious.join("data")).expect("bind source intact"), b"keep me");
}

#[test]
fn a_data_dir_that_is_a_mount_point_is_emptied_in_place_and_an_interrupted_run_finished() {
    let _guard = nomad_lock();
    let m = Machine::new();
    let mut mounts = Mounts::default();
    // Its own file system (an EBS volume): a loop-mounted ext4.
    std::fs::remove_dir_all(m.nomad()).expect("rm");
    mounts.ext4(&m.dir.join("nomad.img"), &m.nomad());
    std::fs::create_dir_all(m.nomad().join("server/raft")).expect("mkdir");
    std::fs::write(m.nomad().join("server/raft/raft.db"), vec![1u8; 4096]).expect("write");
    std::fs::write(m.nomad().join("checkpoint-signature"), b"sig").expect("write");
    std::fs::set_permissions(m.nomad(), std::fs::Permissions::from_mode(0o751)).expect("chmod");
    m.stop_app();

    let dry = json(&m.wipe(&["--dry-run", "--output", "json"]));
    assert_eq!((dry["state"].as_str(), dry["in_place"].as_bool()), (Some("would wipe"), Some(true)), "{dry}");
    assert_eq!(dry["removed"]["files"], 2, "lost+found is not counted: {dry}");
    let done = json(&m.wipe(&["--output", "json"]));
    assert_eq!(done["state"], "wiped", "{done}");
    assert_eq!(done["removed"]["files"], 2, "{done}");
    assert_eq!(m.files(), vec!["lost+found".to_owned()], "only lost+found is left");
    assert!(mount_points().contains(&m.nomad()), "still a mount point");
    assert_eq!(std::fs::metadata(m.nomad()).expect("stat").permissions().mode() & 0o7777, 0o751);
    let again = m.wipe(&[]);
    assert!(again.status.success() && text(&again.stdout).contains("Already done"), "{}{}", text(&again.stdout), text(&again.stderr));

    // Interrupted after moving the entries into the trash dir: the next run
    // deletes it (and what came since).
    let trash = m.nomad().join(".dr-agent-wipe-20250101T000000Z");
    std::fs::create_dir_all(trash.join("server/raft")).expect("mkdir");
    std::fs::write(trash.join("server/raft/raft.db"), b"old").expect("write");
    std::fs::write(m.nomad().join("new-file"), b"new").expect("write");
    let done = json(&m.wipe(&["--output", "json"]));
    assert_eq!(done["removed"]["files"], 2, "{done}");
    assert_eq!(m.files(), vec!["lost+found".to_owned()]);

    // Bind-mounted into place (the Nomad container's volume): same.
    drop(mounts);
    let mut mounts = Mounts::default();
    let volume = m.dir.join("volume");
    std::fs::create_dir_all(volume.join("client")).expect("mkdir");
    std::fs::write(volume.join("client/state.db"), b"x").expect("write");
    mounts.bind(&volume, &m.nomad());
    let done = json(&m.wipe(&["--output", "json"]));
    assert_eq!((done["state"].as_str(), done["in_place"].as_bool()), (Some("wiped"), Some(true)), "{done}");
    assert!(m.files().is_empty(), "{:?}", m.files());
    assert_eq!(std::fs::read_dir(&volume).expect("ls").count(), 0, "the volume is emptied");
}
