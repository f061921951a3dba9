//! Exit codes of the dr-agent binary: 2 for bad configuration or input.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dr-agent"))
}

#[test]
fn run_without_site_id_is_a_configuration_error_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "controller_url = \"https://127.0.0.1:7443\"\n").expect("config");
    let out = agent().arg("run").arg("--config").arg(&config).output().expect("run dr-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("site_id") && err.contains("is required"), "{err}");
}
