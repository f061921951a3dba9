//! The dr-agent binary: exit codes, and hand-run steps following the daemon's rules.

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

/// A Nomad on 127.0.0.1 that answers every request with one node an
/// operator drained, and records each request line.
fn operator_drained_nomad() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            s.lock().expect("lock").push(line.trim().to_owned());
            let body = r#"[{"ID":"aaaa-1","Name":"builder-1","Status":"ready","Drain":true,"SchedulingEligibility":"ineligible"}]"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

/// Issue 7 §4: `dr-agent undrain` by hand, with no drain record, follows the
/// daemon's rule: an operator's drained node is not touched (no request to
/// Nomad at all), exit 0, and the report says why.
#[test]
fn hand_run_undrain_without_a_record_touches_no_node() {
    let (url, seen) = operator_drained_nomad();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("state_dir = {:?}\n[nomad]\napi_url = {url:?}\n", dir.path().join("state"))).expect("config");
    for extra in [&["--dry-run"][..], &[]] {
        let out = agent().args(["undrain", "--output", "json", "--config"]).arg(&config).args(extra).output().expect("run dr-agent");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
        assert_eq!(r["undrained"], serde_json::json!([]), "{r}");
        assert_eq!(r["already_done"], true, "{r}");
        assert!(r["warnings"][0].as_str().unwrap_or_default().contains("no drain record"), "{r}");
    }
    assert!(seen.lock().expect("lock").is_empty(), "Nomad was asked: {:?}", seen.lock().expect("lock"));
}
