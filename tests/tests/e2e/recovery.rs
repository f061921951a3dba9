//! Crashes and reconnects: the controller killed mid-backup, an agent that
//! loses its controller, a command delivered twice.

use std::time::Duration;

use dr_tests::fake_control_plane::FakeControlPlane;
use dr_tests::*;

async fn operation_tagged_images(w: &World, op: &str) -> usize {
    images_tagged(&w.moto.client().await, "dr:operation", op).await.len()
}

fn step<'a>(op: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    op["steps"].as_array().and_then(|s| s.iter().find(|x| x["name"] == name)).unwrap_or(&serde_json::Value::Null)
}

fn start_backup(w: &World) -> String {
    let out = drctl_json(&w.pki, &w.controller.url, &["backup", &w.site]);
    out["operation_id"].as_str().expect("operation id").to_owned()
}

fn wait_succeeded(w: &World, op: &str) -> serde_json::Value {
    let mut last;
    assert_eventually!(
        Duration::from_secs(60),
        {
            last = drctl_json(&w.pki, &w.controller.url, &["operation", op]);
            last["state"] != "running"
        },
        "operation {op} finishes; controller log:\n{}",
        w.controller.log()
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_between_create_image_and_its_record_leaves_one_ami() {
    let mut w = World::start("prod-1", "200ms").await;
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "backup.after_create_image")]);
    w.wait_agent();

    let op = start_backup(&w);
    let proc = w.controller.proc.as_mut().expect("running");
    let status = proc.wait_exit(Duration::from_secs(30)).expect("the crash point kills the controller");
    assert!(!status.success());
    // The AMI exists in EC2 but the controller never stored its id.
    assert_eq!(operation_tagged_images(&w, &op).await, 1);

    w.controller.restart(&[]);
    let done = wait_succeeded(&w, &op);
    let create = step(&done, "create_image");
    assert_eq!(create["attempts"], 2, "the step ran again after the restart: {create}");
    assert!(create["detail"].as_str().expect("detail").contains("already exists"), "{create}");
    assert_eq!(operation_tagged_images(&w, &op).await, 1, "no second AMI");
    let backups = drctl_json(&w.pki, &w.controller.url, &["backups", "prod-1"]);
    assert_eq!(backups["backups"].as_array().expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_while_waiting_for_the_ami_resumes_without_a_duplicate() {
    // The first availability check comes 3 s after CreateImage: the window
    // in which the controller is killed.
    let mut w = World::start("prod-1", "3s").await;
    w.wait_agent();
    let op = start_backup(&w);
    assert_eventually!(
        Duration::from_secs(30),
        step(&drctl_json(&w.pki, &w.controller.url, &["operation", &op]), "create_image")["state"] == "done",
        "create_image recorded"
    );
    w.controller.kill();
    assert_eq!(operation_tagged_images(&w, &op).await, 1);

    w.controller.restart(&[]);
    let done = wait_succeeded(&w, &op);
    assert_eq!(step(&done, "create_image")["attempts"], 1, "create_image was not run again");
    assert_eq!(operation_tagged_images(&w, &op).await, 1);
    let log = w.controller.log();
    assert!(log.contains("resuming operation after a restart"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_reconnects_by_itself_when_the_controller_returns() {
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    w.controller.kill();
    // The agent notices and retries with backoff while the controller is away.
    assert_eventually!(
        Duration::from_secs(20),
        w.agent.log().matches("retry").count() >= 2 || w.agent.log().matches("backoff").count() >= 2,
        "agent retries; log:\n{}",
        w.agent.log()
    );
    w.controller.restart(&[]);
    w.wait_agent();
    // The reconnected agent takes work again.
    let op = start_backup(&w);
    let done = wait_succeeded(&w, &op);
    assert!(step(&done, "check_agent")["detail"].as_str().expect("detail").contains("agent answered"), "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_delivered_twice_runs_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let mut cp = FakeControlPlane::start(&pki).await;
    let instance = Instance { id: "i-0123456789abcdef0".into(), private_ip: "10.0.0.5".into(), public_ip: String::new() };
    let imds = Imds::start(dir.path(), &instance, None);
    let root = services_machine_root(dir.path(), "10.0.0.5", "54.1.2.3");
    let agent = Agent::start(dir.path(), &pki, "prod-1", &cp.url, &imds, &root);

    let mut s1 = cp.next_session().await;
    assert_eq!(s1.hello.site_id, "prod-1");
    assert_eq!(s1.hello.facts.as_ref().expect("facts").instance_id, instance.id);

    let before = agent.replicatedctl_calls("app status");
    s1.send_command("op-1.app-status").await;
    let first = s1.next_result().await;
    assert!(first.ok && !first.replayed, "{first:?}");
    assert_eq!(agent.replicatedctl_calls("app status"), before + 1, "the step ran once");

    // Same id again on the same stream: answered from the journal.
    s1.send_command("op-1.app-status").await;
    let second = s1.next_result().await;
    assert!(second.ok && second.replayed, "{second:?}");
    assert_eq!(second.started_at_ms, first.started_at_ms);
    assert_eq!(second.detail, first.detail);
    assert_eq!(agent.replicatedctl_calls("app status"), before + 1, "not run again");

    // The stream breaks; the agent comes back and the id is delivered again.
    drop(s1);
    let mut s2 = cp.next_session().await;
    let after_hello = agent.replicatedctl_calls("app status");
    s2.send_command("op-1.app-status").await;
    let third = s2.next_result().await;
    assert!(third.ok && third.replayed, "{third:?}");
    assert_eq!(third.started_at_ms, first.started_at_ms);
    assert_eq!(agent.replicatedctl_calls("app status"), after_hello, "not run again after a reconnect");

    // Two deliveries of a new id back to back: one run.
    let before = agent.replicatedctl_calls("app status");
    s2.send_command("op-2.app-status").await;
    s2.send_command("op-2.app-status").await;
    let (a, b) = (s2.next_result().await, s2.next_result().await);
    assert!(a.ok && b.ok, "{a:?} {b:?}");
    assert_eq!(a.started_at_ms, b.started_at_ms);
    assert_eq!(agent.replicatedctl_calls("app status"), before + 1);

    // An id that could escape the journal directory is refused, not run.
    s2.send_command("../../etc/passwd").await;
    let bad = s2.next_result().await;
    assert!(!bad.ok, "{bad:?}");
    assert_eq!(agent.replicatedctl_calls("app status"), before + 1);
}
