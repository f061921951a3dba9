//! The wipe step against `rm -rf` on a tree of 100,000 files (100 dirs x
//! 1,000 small files). Prints the figures; run with
//! `cargo bench -p dr-agent --bench wipe`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dr_agent::steps::nomad_state::move_aside_and_delete;

const DIRS: usize = 100;
const FILES_PER_DIR: usize = 1000;

fn build_tree(root: &Path) {
    for d in 0..DIRS {
        let dir = root.join(format!("alloc-{d:03}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..FILES_PER_DIR {
            std::fs::write(dir.join(format!("f{f:04}")), b"nomad state\n").expect("write");
        }
    }
}

fn main() {
    // Benches get `--bench` from cargo; nothing to parse.
    let base = tempfile::Builder::new().prefix("dr-wipe-bench").tempdir_in("/var/tmp").expect("tempdir");
    let a = base.path().join("a/nomad");
    let b = base.path().join("b/nomad");
    let t = Instant::now();
    build_tree(&a);
    build_tree(&b);
    println!("built 2 trees of {} files in {:.1} s", DIRS * FILES_PER_DIR, t.elapsed().as_secs_f64());
    // Settle the page cache the same way for both.
    let _ = Command::new("sync").status();

    // rm -rf first, then the wipe step (the order is swapped on every other
    // run with DR_BENCH_WIPE_FIRST=1, to see the effect of the page cache).
    let rm_rf = |b: &Path| {
        let t = Instant::now();
        let status = Command::new("rm").arg("-rf").arg(b).status().expect("rm -rf");
        assert!(status.success());
        t.elapsed()
    };
    let wipe_first = std::env::var_os("DR_BENCH_WIPE_FIRST").is_some();
    let mut rm = None;
    if !wipe_first {
        rm = Some(rm_rf(&b));
    }
    let meta = std::fs::symlink_metadata(&a).expect("stat");
    let t = Instant::now();
    let outcome = move_aside_and_delete(&a, &meta).expect("wipe");
    let total = t.elapsed();
    assert_eq!(outcome.removed.files as usize, DIRS * FILES_PER_DIR);
    assert!(a.is_dir() && std::fs::read_dir(&a).expect("ls").next().is_none());
    let rm = rm.unwrap_or_else(|| rm_rf(&b));

    println!("wipe step, visible part (rename aside + recreate): {:.3} ms", outcome.rename.as_secs_f64() * 1000.0);
    println!("wipe step, delete of the moved tree (count + remove_dir_all): {:.0} ms", outcome.delete.as_secs_f64() * 1000.0);
    println!("wipe step, total: {:.0} ms", total.as_secs_f64() * 1000.0);
    println!("rm -rf: {:.0} ms", rm.as_secs_f64() * 1000.0);
}
