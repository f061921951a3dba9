//! drctl against real processes and real certificates: each failure gets
//! its own true message and exit code, `--output json` reports failures as
//! JSON, `backup --wait -o json` is JSON lines, and `drctl pki` is strict.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dr_tests::*;
use drctl::pki::{self, Subject, Validity};

/// Asserts a failed drctl run with `-o json`: the exit code, the message on
/// stderr, and on stdout one JSON error object agreeing with both.
fn assert_fails(out: &Output, code: i32, kind: &str, needle: &str) -> String {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr} stdout: {stdout}");
    assert!(stderr.contains(needle), "stderr should say `{needle}`: {stderr}");
    let error = last_json(&out.stdout);
    assert_eq!(error["error"]["kind"], kind, "{stdout}");
    assert_eq!(error["error"]["exit_code"], code, "{stdout}");
    let message = error["error"]["message"].as_str().expect("a message").to_owned();
    assert!(message.contains(needle), "{message}");
    message
}

#[tokio::test(flavor = "multi_thread")]
async fn each_certificate_problem_has_its_own_message_and_exit_code() {
    let w = World::start("prod-1", "200ms").await;
    let url = w.controller.url.clone();
    let (ca, (op_cert, op_key)) = (w.pki.ca(), w.pki.operator());
    let ok = drctl(&w.pki, &url, &["status"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    // drctl refuses the controller's certificate: a name it does not carry.
    let out = drctl_as(&url, &ca, &op_cert, &op_key, &["-o", "json", "status", "--server-name", "wrong.example"]);
    let m = assert_fails(&out, 7, "untrusted", "does not trust the controller's certificate");
    assert!(m.contains("`wrong.example`") && m.contains("localhost") && !m.contains("refused"), "{m}");

    // ... or another CA than the one that signed it.
    let other = w.dir.path().join("other-ca");
    pki::init_ca(&other, "dr.test", Validity::days(1).expect("one day")).expect("other CA");
    let out = drctl_as(&url, &other.join("ca.pem"), &op_cert, &op_key, &["-o", "json", "status"]);
    let m = assert_fails(&out, 7, "untrusted", "is not signed by the CA in --ca");
    assert!(!m.contains("refused"), "{m}");

    // The controller refuses ours: not valid yet is not "expired".
    let now = time::OffsetDateTime::now_utc();
    let future = Validity { not_before: now + time::Duration::hours(2), not_after: now + time::Duration::hours(3) };
    pki::issue(&w.pki.dir, &Subject::Operator("future".into()), future, w.dir.path(), "future").expect("issue");
    let (future_cert, future_key) = (w.dir.path().join("future.pem"), w.dir.path().join("future.key"));
    let out = drctl_as(&url, &ca, &future_cert, &future_key, &["-o", "json", "status"]);
    let m = assert_fails(&out, 4, "refused", "refused your certificate");
    assert!(m.contains("not valid yet") && !m.contains("expired"), "{m}");

    // A key that is not the certificate's: named locally, nothing sent.
    let (_, site_key) = w.pki.site("prod-1");
    let out = drctl_as(&url, &ca, &op_cert, &site_key, &["-o", "json", "status"]);
    let m = assert_fails(&out, 2, "local_tls", "is not the private key of --cert");
    assert!(!m.contains("transport error"), "{m}");

    // Unknown site: a JSON error too, not an empty stdout.
    let out = drctl_as(&url, &ca, &op_cert, &op_key, &["-o", "json", "backup", "no-such-site"]);
    assert_fails(&out, 5, "not_found", "unknown site `no-such-site`");

    // And a usage error caught by the grammar.
    let out = drctl_as(&url, &ca, &op_cert, &op_key, &["status", "--no-such-flag", "-o", "json"]);
    assert_fails(&out, 2, "usage", "--no-such-flag");
}

/// Starts `drctl -o json backup SITE --wait`; returns it once its first line
/// (the operation id) is out, with that id.
fn start_backup_wait(w: &World) -> (std::process::Child, BufReader<std::process::ChildStdout>, String) {
    let (cert, key) = w.pki.operator();
    let mut child = drctl_command(&w.controller.url, &w.pki.ca(), &cert, &key, &["-o", "json", "backup", &w.site, "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drctl");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("read the first line");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("first line {first:?}: {e}"));
    assert_eq!(first["site_id"], w.site.as_str(), "{first}");
    let id = first["operation_id"].as_str().unwrap_or_else(|| panic!("no operation id first: {first}")).to_owned();
    (child, stdout, id)
}

/// The rest of a `start_backup_wait` run, once it ended.
fn finish_run(child: std::process::Child, mut stdout: BufReader<std::process::ChildStdout>) -> Output {
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("read stdout");
    let mut out = child.wait_with_output().expect("drctl ends");
    out.stdout = rest;
    out
}

fn assert_lost_controller(out: &Output, id: &str, how: &str) {
    let stderr = text(&out.stderr);
    let m = assert_fails(out, 3, "unreachable", "cannot reach the controller");
    assert!(!m.contains("refused") && !stderr.contains("refused"), "{how}: {stderr}");
    assert!(m.contains(&format!("drctl operation {id} --wait")), "{how}: says how to follow up: {m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_dying_under_backup_wait_is_unreachable() {
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();

    // 1. SIGKILL mid-backup (the controller kills itself at a step).
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "step.wait_snapshots.before")]);
    w.wait_agent();
    let (child, stdout, id) = start_backup_wait(&w);
    let out = finish_run(child, stdout);
    assert_lost_controller(&out, &id, "after SIGKILL");

    // The restarted controller finishes that backup.
    w.controller.kill();
    w.controller.restart(&[]);
    let done = drctl_json(&w.pki, &w.controller.url, &["operation", &id, "--wait"]);
    assert_eq!(done["state"], "succeeded", "{done}");

    // 2. SIGTERM (a restart by systemd) while a step waits for a stopped agent.
    w.wait_agent();
    let agent = w.agent.proc.as_ref().expect("agent runs").child.id() as i32;
    // SAFETY: kill(2) on a child we own.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let (mut child, stdout, id) = start_backup_wait(&w);
    dr_tests::assert_quiet_for!(
        Duration::from_millis(500),
        child.try_wait().expect("poll drctl").is_some(),
        "drctl returned although the backup waits for the stopped agent"
    );
    let status = w.controller.proc.as_mut().expect("controller runs").terminate(Duration::from_secs(30));
    assert!(status.is_some(), "the controller exits on SIGTERM");
    let out = finish_run(child, stdout);
    // SAFETY: as above.
    unsafe { libc::kill(agent, libc::SIGCONT) };
    assert_lost_controller(&out, &id, "after SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_dying_before_it_answers_a_start_says_it_may_have_started_and_how_to_check() {
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    // The controller starts the backup, then dies before its answer.
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "api.start_backup.before_reply")]);
    w.wait_agent();
    let (cert, key) = w.pki.operator();
    let out = drctl_as(&w.controller.url, &w.pki.ca(), &cert, &key, &["-o", "json", "backup", &w.site]);
    let m = assert_fails(&out, 3, "unreachable", "got no answer");
    assert!(m.contains("it may have started") && m.contains("nothing may have started"), "{m}");
    for check in [format!("`drctl status --site {}`", w.site), format!("`drctl events {}`", w.site), format!("`drctl backups {}`", w.site)]
    {
        assert!(m.contains(&check), "says how to check ({check}): {m}");
    }
    // And it had started: the restarted controller finishes it.
    w.controller.kill();
    w.controller.restart(&[]);
    w.wait_agent();
    assert_eventually!(
        Duration::from_secs(60),
        drctl_json(&w.pki, &w.controller.url, &["backups", &w.site])["backups"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["state"] == "available")),
        "the unanswered backup ran: {}",
        drctl_json(&w.pki, &w.controller.url, &["backups", &w.site])
    );

    // A read that breaks says nothing of the kind.
    w.controller.kill();
    let out = drctl_as(&w.controller.url, &w.pki.ca(), &cert, &key, &["-o", "json", "status"]);
    let m = assert_fails(&out, 3, "unreachable", "cannot reach the controller");
    assert!(!m.contains("may have started"), "{m}");
}

fn run_drctl(args: &[&str]) -> Output {
    Command::new(bin("drctl")).args(args).env_remove("DRCTL_CONTROLLER").output().expect("run drctl")
}

fn not_after(cert: &Path) -> i64 {
    let der = dr_proto::tls::load_certs(cert).expect("cert");
    let (_, parsed) = x509_parser::parse_x509_certificate(der[0].as_ref()).expect("x509");
    parsed.validity().not_after.timestamp()
}

#[test]
fn drctl_names_itself_and_pki_is_strict() {
    let out = run_drctl(&["--version"]);
    assert!(text(&out.stdout).starts_with("drctl "), "{}", text(&out.stdout));

    // pki's help describes every option and lists no connection flag.
    for cmd in [&["pki", "init", "--help"][..], &["pki", "issue", "operator", "--help"], &["pki", "issue", "--help"]] {
        let help = text(&run_drctl(cmd).stdout);
        for flag in ["--controller", "--server-name", "--ca ", "--cert", "--key", "--config", "DRCTL_"] {
            assert!(!help.contains(flag), "{cmd:?} lists {flag}: {help}");
        }
        assert!(help.contains("--dir"), "{help}");
    }
    let help = text(&run_drctl(&["pki", "init", "--help"]).stdout);
    assert!(help.contains("Directory to create ca.pem") && help.contains("trust domain") && help.contains("Lifetime of the CA"), "{help}");
    let help = text(&run_drctl(&["pki", "issue", "operator", "--help"]).stdout);
    assert!(help.contains("Directory of the CA") && help.contains("Lifetime in days") && help.contains("operator's name"), "{help}");

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let ca_dir = ca.to_str().expect("utf-8");
    let out = run_drctl(&["pki", "init", "--dir", ca_dir, "--trust-domain", "dr.test", "--days", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // --days 0 is refused, nothing written.
    let out = run_drctl(&["pki", "issue", "operator", "zero", "--dir", ca_dir, "--days", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--days") && text(&out.stderr).contains("1..="), "{}", text(&out.stderr));
    assert!(!ca.join("operator-zero.pem").exists());

    // --days past the CA's end: the certificate ends with the CA, with a warning.
    let out = run_drctl(&["pki", "issue", "operator", "long", "--dir", ca_dir, "--days", "30"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot outlive its CA"), "{}", text(&out.stderr));
    assert_eq!(not_after(&ca.join("operator-long.pem")), not_after(&ca.join("ca.pem")));

    // An explicit --not-after past the CA's end is refused.
    let late = (time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    let out = run_drctl(&["pki", "issue", "operator", "late", "--dir", ca_dir, "--not-after", &late]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot outlive its CA"), "{}", text(&out.stderr));
    assert!(!ca.join("operator-late.pem").exists());
}
