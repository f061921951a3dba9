//! Runbook steps as commands from the controller over the agent stream run
//! the same code as by hand: here rewrite-addresses, dry run then for real,
//! and a malformed request refused before anything runs.

use dr_proto::pb;
use dr_tests::fake_control_plane::FakeControlPlane;
use dr_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn rewrite_addresses_by_command_dry_run_then_real() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let mut cp = FakeControlPlane::start(&pki).await;
    let instance = Instance { id: "i-0123456789abcdef0".into(), private_ip: "10.0.0.9".into(), public_ip: String::new() };
    let imds = Imds::start(dir.path(), &instance, None);
    let root = services_machine_root(dir.path(), "10.0.0.5", "54.1.2.3");
    let _agent = Agent::start(dir.path(), &pki, "prod-1", &cp.url, &imds, &root);
    let mut s = cp.next_session().await;
    let file = root.join("etc/default/replicated-operator");
    let before = std::fs::read(&file).expect("read");

    let rewrite = |dry_run| {
        pb::command::Kind::RewriteAddresses(pb::RewriteAddressesRequest {
            private: vec![pb::AddressChange { old_ip: "10.0.0.5".into(), new_ip: "10.0.0.9".into() }],
            public: vec![],
            dry_run,
        })
    };
    s.send("op-9.rewrite-dry", rewrite(true)).await;
    let dry = s.next_result().await;
    assert!(dry.ok, "{dry:?}");
    let report: serde_json::Value = serde_json::from_str(&dry.report_json).expect("report json");
    assert_eq!(report["dry_run"], true);
    assert!(report["diff"].as_str().expect("diff").contains("+DAEMON_ENDPOINT=10.0.0.9:9879"), "{report:#}");
    assert_eq!(std::fs::read(&file).expect("read"), before, "the dry run changed nothing");

    s.send("op-9.rewrite", rewrite(false)).await;
    let real = s.next_result().await;
    assert!(real.ok, "{real:?}");
    let after = std::fs::read_to_string(&file).expect("read");
    assert!(after.contains("DAEMON_ENDPOINT=10.0.0.9:9879") && !after.contains("=10.0.0.5"), "{after}");

    // A malformed request is refused at the edge; nothing runs.
    s.send(
        "op-9.bad",
        pb::command::Kind::RewriteAddresses(pb::RewriteAddressesRequest {
            private: vec![pb::AddressChange { old_ip: "10.0.0.9".into(), new_ip: "not-an-ip; rm -rf /".into() }],
            public: vec![],
            dry_run: false,
        }),
    )
    .await;
    let bad = s.next_result().await;
    assert!(!bad.ok && bad.error.contains("invalid command"), "{bad:?}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), after);
}
