//! Certificates per instance (issue 22): enrolment with the instance
//! identity document, renewal over the stream, a copy of a disk posing as
//! the primary, re-enrolment after expiry, revocation, and the controller's
//! own certificate renewed under open streams. Real controller, real
//! agents, moto; the fake IMDS signs documents with the test's "AWS" key.

use std::path::Path;
use std::time::Duration;

use dr_proto::pb;
use dr_tests::*;

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn events(w: &World, kind: &str) -> Vec<serde_json::Value> {
    let all = drctl_json(&w.pki, &w.controller.url, &["events", &w.site, "--limit", "500"]);
    all.as_array().or_else(|| all["events"].as_array()).cloned().unwrap_or_default().into_iter().filter(|e| e["kind"] == kind).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// With 40-second certificates an agent renews at about 20 s: three
/// renewals in a row while backups run, a controller restart in between,
/// and the agent is never refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_renews_its_certificate_again_and_again_while_backups_run_and_across_a_restart() {
    let mut w = World::start_full("prod-1", "200ms", &[], "[pki]\nagent_cert_lifetime = \"40s\"\n").await;
    w.wait_agent();
    let renewed = |w: &World| count(&w.agent.log(), "certificate renewed;");
    let mut backups = 0;
    let mut restarted = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while renewed(&w) < 3 && std::time::Instant::now() < deadline {
        let out = drctl(&w.pki, &w.controller.url, &["backup", "prod-1", "--wait"]);
        assert!(out.status.success(), "backup {backups} failed: {}{}\nagent:\n{}", text(&out.stdout), text(&out.stderr), w.agent.log());
        backups += 1;
        if renewed(&w) >= 1 && !restarted {
            w.controller.kill();
            w.controller.restart(&[]);
            restarted = true;
            w.wait_agent();
        }
    }
    let log = w.agent.log();
    assert!(renewed(&w) >= 3, "3 renewals within 150 s; {backups} backups ran:\n{log}");
    assert!(restarted, "the controller was restarted in between");
    assert_eq!(count(&log, "the controller refused this agent"), 0, "the agent was refused:\n{log}");
    assert_eq!(count(&w.controller.log(), "agent stream refused"), 0, "{}", w.controller.log());
    // Each renewal was a new key: the serial the agent uses now is the
    // one the controller records as current.
    let inst = &site_status(&w.pki, &w.controller.url, "prod-1")["instances"][0];
    assert_eq!(inst["attestation"], "instance-identity", "{inst:#}");
    assert!(inst["renewal_error"].as_str().unwrap_or("").is_empty(), "{inst:#}");
    let held = std::fs::read(w.agent.state_dir.join("credentials/instance.pem")).expect("the agent's certificate");
    let leaf = dr_proto::tls::parse_certs(&held, Path::new("instance.pem")).expect("pem");
    let serial = dr_proto::tls::PresentedCert::from_der(leaf[0].as_ref()).expect("cert").serial;
    assert_eventually!(
        Duration::from_secs(10),
        site_status(&w.pki, &w.controller.url, "prod-1")["instances"][0]["cert_serial"] == serial.as_str(),
        "status shows the serial the agent holds ({serial})"
    );
}

/// The controller is killed after it signed a renewal (and recorded it as
/// the instance's next certificate) but before the agent heard of it: the
/// agent still connects with its current certificate and renews again.
#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_between_signing_and_answering_never_strands_the_agent() {
    let mut w = World::start_full("prod-1", "200ms", &[], "[pki]\nagent_cert_lifetime = \"30s\"\n").await;
    w.wait_agent();
    w.controller.kill();
    w.controller.restart(&[("DR_CONTROLLER_CRASH_AT", "renew.after_sign")]);
    w.controller.proc.as_mut().expect("running").wait_exit(Duration::from_secs(60)).expect("killed at renew.after_sign");
    assert!(!w.agent.log().contains("certificate renewed;"), "the agent got no answer:\n{}", w.agent.log());
    w.controller.restart(&[]);
    w.wait_agent();
    assert_eventually!(
        Duration::from_secs(40),
        w.agent.log().contains("certificate renewed;"),
        "renewed after the restart:\n{}",
        w.agent.log()
    );
    assert!(!w.agent.log().contains("the controller refused this agent"), "{}", w.agent.log());
}

/// A copy of the primary's disk (its key and certificate included) on
/// another machine, whose fake IMDS claims the primary's instance id but
/// cannot sign as AWS: no session, no command; the conflict is an event;
/// the primary is never displaced; and when the real primary goes silent
/// the site reads as not connected (the impostor does not keep it alive).
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_the_primarys_disk_posing_as_it_gets_no_session_and_no_command() {
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    let evil = w.dir.path().join("impostor");
    std::fs::create_dir_all(evil.join("pki")).expect("mkdir");
    write_iid_signer(&evil.join("pki/forged.pem"), &evil.join("pki/forged.key"));
    copy_dir(&w.agent.state_dir.join("credentials"), &evil.join("agent-prod-1/credentials"));
    let imds = Imds::start_signed(&w.instance, None, Some(&evil.join("pki/forged.key")), ACCOUNT);
    let root = services_machine_root(&evil, &w.instance.private_ip, "54.1.1.1");
    let impostor = Agent::start(&evil, &w.pki, "prod-1", &w.controller.url, &imds, &root);
    assert_eventually!(
        Duration::from_secs(30),
        impostor.log().contains("the controller refused this agent"),
        "the impostor is refused:\n{}",
        impostor.log()
    );
    let clog = w.controller.log();
    assert!(clog.contains("does not verify with any configured AWS certificate"), "{clog}");
    assert_eventually!(Duration::from_secs(10), !events(&w, "agent.identity_conflict").is_empty(), "a conflict event");
    // The primary holds its session while the impostor keeps trying.
    assert_quiet_for!(
        Duration::from_secs(4),
        !agent_connected(&w.pki, &w.controller.url, "prod-1"),
        "the primary was displaced:\n{}",
        w.agent.log()
    );
    let out = drctl(&w.pki, &w.controller.url, &["backup", "prod-1", "--wait"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!impostor.log().contains("command received"), "the impostor got a command:\n{}", impostor.log());
    assert!(!impostor.log().contains("connected") || !impostor.log().contains("role=primary"), "{}", impostor.log());
    // The real primary is lost: its agent goes silent. The impostor's
    // attempts do not make the site look alive.
    if let Some(mut p) = w.agent.proc.take() {
        p.kill();
    }
    assert_eventually!(Duration::from_secs(20), !agent_connected(&w.pki, &w.controller.url, "prod-1"), "the primary reads as silent");
    assert_quiet_for!(
        Duration::from_secs(5),
        agent_connected(&w.pki, &w.controller.url, "prod-1"),
        "the impostor took the primary's session:\n{}",
        impostor.log()
    );
}

/// A machine that is not one of the site's known instances (a stray copy
/// launched from an AMI) is refused enrolment with a clear message; the
/// primary is not touched.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_instance_cannot_enrol_and_the_primary_keeps_its_session() {
    let w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    let ec2 = w.moto.client().await;
    let copy = launch_instance(&ec2).await;
    let copy_dir = w.dir.path().join("copy");
    let imds = Imds::start(&copy_dir, &copy, None);
    let root = services_machine_root(&copy_dir, &copy.private_ip, "54.1.1.1");
    let stray = Agent::start(&copy_dir, &w.pki, "prod-1", &w.controller.url, &imds, &root);
    assert_eventually!(
        Duration::from_secs(30),
        stray.log().contains("is not an instance of site `prod-1` this controller knows"),
        "the stray is refused with a clear message:\n{}",
        stray.log()
    );
    assert_quiet_for!(Duration::from_secs(3), !agent_connected(&w.pki, &w.controller.url, "prod-1"), "the primary was displaced");
}

/// The agent's certificate expires while the controller is down (a machine
/// off for long): it enrols again with its identity document, by itself,
/// and is back as primary.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_certificate_expired_while_the_controller_was_down_enrols_again() {
    let mut w = World::start_full("prod-1", "200ms", &[], "[pki]\nagent_cert_lifetime = \"20s\"\n").await;
    w.wait_agent();
    w.controller.kill();
    // Past the end of every certificate the agent could hold (20 s).
    let held = std::fs::read(w.agent.state_dir.join("credentials/instance.pem")).expect("cert");
    let leaf = dr_proto::tls::parse_certs(&held, Path::new("instance.pem")).expect("pem");
    let end = dr_proto::tls::PresentedCert::from_der(leaf[0].as_ref()).expect("cert").not_after_ms;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    std::thread::sleep(Duration::from_millis(end.saturating_sub(now) + 2000));
    w.controller.restart(&[]);
    w.wait_agent();
    let log = w.agent.log();
    assert!(log.contains("no longer valid"), "{log}");
    assert!(count(&log, "enrolled") >= 2, "enrolled again:\n{log}");
    assert!(count(&w.controller.log(), "instance enrolled") >= 2, "the first enrolment and the new one:\n{}", w.controller.log());
}

/// Enrolment refusals, asked over the wire as an attacker would: a forged
/// document, a document from another account, one for an instance the
/// site does not have, and a revoked site.
#[tokio::test(flavor = "multi_thread")]
async fn forged_foreign_and_unknown_documents_and_a_revoked_site_are_refused_with_a_clear_message() {
    let w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    let (cert, key) = w.pki.site("prod-1");
    let channel = || async {
        let tls = dr_proto::tls::client_config_pem(
            &std::fs::read(w.pki.ca()).expect("ca"),
            Some((&std::fs::read(&cert).expect("cert"), &std::fs::read(&key).expect("key"))),
            "localhost",
        );
        tonic::transport::Channel::from_shared(w.controller.url.clone())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    };
    let doc = |instance: &str, account: &str| {
        format!("{{\"accountId\":\"{account}\",\"instanceId\":\"{instance}\",\"region\":\"{REGION}\",\"privateIp\":\"10.0.0.1\"}}")
    };
    let sign = |doc: &str, key: &Path| {
        use base64::Engine;
        use rcgen::SigningKey;
        let k = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key).expect("key")).expect("pem");
        base64::engine::general_purpose::STANDARD.encode(k.sign(doc.as_bytes()).expect("sign"))
    };
    let csr = || {
        let k = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::default().serialize_request(&k).expect("csr").der().to_vec()
    };
    let enrol = |instance: String, document: String, signature: String| {
        let channel = channel();
        let csr = csr();
        async move {
            let mut c = pb::agent_service_client::AgentServiceClient::new(channel.await);
            let proof = pb::InstanceProof { document: document.into_bytes(), signature, token: String::new() };
            c.enroll(pb::EnrollRequest { site_id: "prod-1".into(), instance_id: instance, csr_der: csr, proof: Some(proof) }).await
        }
    };
    let forged_key = w.dir.path().join("forged.key");
    write_iid_signer(&w.dir.path().join("forged.pem"), &forged_key);
    let primary = w.instance.id.clone();
    let d = doc(&primary, ACCOUNT);
    let e = enrol(primary.clone(), d.clone(), sign(&d, &forged_key)).await.expect_err("forged");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("does not verify"), "{}", e.message());
    let d = doc(&primary, "999999999999");
    let e = enrol(primary.clone(), d.clone(), sign(&d, &w.pki.iid_key())).await.expect_err("foreign account");
    assert!(e.message().contains("from account 999999999999"), "{}", e.message());
    let d = doc("i-0fedcba9876543210", ACCOUNT);
    let e = enrol("i-0fedcba9876543210".into(), d.clone(), sign(&d, &w.pki.iid_key())).await.expect_err("unknown instance");
    assert!(e.message().contains("is not an instance of site `prod-1`"), "{}", e.message());
    // The primary enrolled already and its certificate is valid: its own
    // genuine document does not buy a second certificate.
    let d = doc(&primary, ACCOUNT);
    let e = enrol(primary.clone(), d.clone(), sign(&d, &w.pki.iid_key())).await.expect_err("already enrolled");
    assert!(e.message().contains("enrolled already"), "{}", e.message());

    // Revocation: the live stream is closed within seconds, reconnects and
    // enrolments are refused, until it is lifted.
    let out = drctl(&w.pki, &w.controller.url, &["revoke", "prod-1", "--reason", "key leaked"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("1 live stream(s) closed"), "{}", text(&out.stdout));
    assert_eventually!(Duration::from_secs(5), !agent_connected(&w.pki, &w.controller.url, "prod-1"), "the stream is closed");
    assert_eventually!(Duration::from_secs(10), w.controller.log().contains("is revoked"), "the reconnect is refused");
    let e = enrol(primary.clone(), d.clone(), sign(&d, &w.pki.iid_key())).await.expect_err("revoked");
    assert!(e.message().contains("is revoked (key leaked"), "{}", e.message());
    let status = site_status(&w.pki, &w.controller.url, "prod-1");
    assert!(status["problems"].to_string().contains("revoked"), "{status:#}");
    assert_quiet_for!(Duration::from_secs(3), agent_connected(&w.pki, &w.controller.url, "prod-1"), "a revoked agent connected");
    let out = drctl(&w.pki, &w.controller.url, &["revoke", "prod-1", "--undo"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    w.wait_agent();

    // One certificate revoked (its key leaked): the agent sets it aside and
    // may enrol again only once an operator allows it.
    let serial = site_status(&w.pki, &w.controller.url, "prod-1")["instances"][0]["cert_serial"].as_str().expect("serial").to_owned();
    let out = drctl(&w.pki, &w.controller.url, &["revoke", "prod-1", "--serial", &serial, "--reason", "key copied"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eventually!(Duration::from_secs(20), w.agent.log().contains("set aside; enrolling again"), "{}", w.agent.log());
    assert_eventually!(Duration::from_secs(20), w.agent.log().contains("enrolled already"), "re-enrolment waits for an operator");
    assert!(!agent_connected(&w.pki, &w.controller.url, "prod-1"));
    let out = drctl(&w.pki, &w.controller.url, &["allow-enrol", "prod-1", &primary]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    w.wait_agent();
    let now = site_status(&w.pki, &w.controller.url, "prod-1")["instances"][0]["cert_serial"].as_str().unwrap_or_default().to_owned();
    assert!(!now.is_empty() && now != serial, "a new certificate: {now}");
}

/// The controller's own certificate, made to end soon, is renewed from its
/// intermediate without a restart: the agent's open stream stays, new
/// handshakes get the new certificate, and the file on disk is the new one.
#[tokio::test(flavor = "multi_thread")]
async fn the_controllers_certificate_renews_while_agents_stay_connected() {
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    w.controller.kill();
    let now = time::OffsetDateTime::now_utc();
    let short = drctl::pki::Validity { not_before: now - time::Duration::seconds(60), not_after: now + time::Duration::seconds(45) };
    let tmp = w.dir.path().join("short");
    drctl::pki::issue_with(
        &w.pki.dir.join("intermediate"),
        &drctl::pki::Subject::Controller { dns: vec!["localhost".into()], ips: vec!["127.0.0.1".parse().expect("ip")] },
        short,
        drctl::pki::CaEnd::Refuse,
        &tmp,
        "controller",
    )
    .expect("short controller cert");
    std::fs::copy(tmp.join("controller.pem"), w.pki.dir.join("controller.pem")).expect("install cert");
    std::fs::copy(tmp.join("controller.key"), w.pki.dir.join("controller.key")).expect("install key");
    w.controller.restart(&[]);
    w.wait_agent();
    let sessions_before = count(&w.agent.log(), "\"connected\"") + count(&w.agent.log(), " connected ");
    assert_eventually!(
        Duration::from_secs(60),
        w.controller.log().contains("the controller's certificate was renewed"),
        "renewed at two thirds of its life:\n{}",
        w.controller.log()
    );
    let pem = std::fs::read(w.pki.dir.join("controller.pem")).expect("cert");
    let leaf = dr_proto::tls::parse_certs(&pem, Path::new("controller.pem")).expect("pem");
    let end = dr_proto::tls::PresentedCert::from_der(leaf[0].as_ref()).expect("cert").not_after_ms;
    assert!(end > (now.unix_timestamp() as u64 + 3600) * 1000, "the new certificate lasts (pki.controller_cert_lifetime)");
    // Past the old certificate's end: the same stream is still up and new
    // handshakes (drctl) succeed.
    std::thread::sleep(Duration::from_secs(30));
    assert!(agent_connected(&w.pki, &w.controller.url, "prod-1"), "{}", w.agent.log());
    let sessions_after = count(&w.agent.log(), "\"connected\"") + count(&w.agent.log(), " connected ");
    assert_eq!(sessions_before, sessions_after, "the agent's stream was not re-established:\n{}", w.agent.log());
}

/// A new root and an intermediate made from it, offline; drctl's CA file
/// then holds both roots (what an operator does before a rotation).
struct NewCa {
    dir: std::path::PathBuf,
    old_root: String,
    new_root: String,
}

fn new_ca(w: &World) -> NewCa {
    use drctl::pki::{self, Validity};
    let old_root = std::fs::read_to_string(w.pki.ca()).expect("old root");
    let dir = w.dir.path().join("new-ca");
    pki::init_ca(&dir, TRUST_DOMAIN, Validity::days(1).expect("days")).expect("new root");
    pki::intermediate(&dir, &dir.join("intermediate"), Validity::days(1).expect("days")).expect("new intermediate");
    let new_root = std::fs::read_to_string(dir.join("ca.pem")).expect("new root");
    std::fs::write(w.pki.ca(), format!("{old_root}{new_root}")).expect("drctl's bundle");
    NewCa { dir, old_root, new_root }
}

fn rotate_ca(w: &World, args: &[&str]) -> std::process::Output {
    let mut all = vec!["rotate-ca"];
    all.extend_from_slice(args);
    drctl(&w.pki, &w.controller.url, &all)
}

/// A full CA rotation with three agents, one of them offline when it
/// starts and back in the middle: no agent is refused at any moment, each
/// phase waits for its condition, and at the end the old root is gone (from
/// the controller and from every agent's trust bundle).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_ca_rotation_with_agents_connected_and_one_offline_refuses_no_one() {
    use drctl::pki::{self, Subject, Validity};
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    let ec2 = w.moto.client().await;
    let mut machines = Vec::new();
    for site in ["prod-2", "prod-3"] {
        machines.push((site, launch_instance(&ec2).await));
    }
    let mut config = std::fs::read_to_string(&w.controller.config).expect("config");
    for (site, inst) in &machines {
        config.push_str(&format!("\n[[site]]\nid = \"{site}\"\ninstance_id = \"{}\"\n", inst.id));
    }
    std::fs::write(&w.controller.config, config).expect("write config");
    w.controller.kill();
    w.controller.restart(&[]);
    let mut agents = Vec::new();
    for (site, inst) in &machines {
        let d = w.dir.path().join(site);
        let imds = Imds::start(&d, inst, None);
        let root = services_machine_root(&d, &inst.private_ip, "54.2.2.2");
        agents.push((*site, Agent::start(&d, &w.pki, site, &w.controller.url, &imds, &root), imds));
    }
    w.wait_agent();
    for (site, a, _) in &agents {
        assert_eventually!(Duration::from_secs(30), agent_connected(&w.pki, &w.controller.url, site), "{site} connected:\n{}", a.log());
    }
    // prod-3's machine is off when the rotation starts.
    if let Some(mut p) = agents[1].1.proc.take() {
        p.kill();
    }
    let NewCa { dir: new, new_root, .. } = new_ca(&w);
    let rotate = |args: &[&str]| rotate_ca(&w, args);
    let rotation = || drctl_json(&w.pki, &w.controller.url, &["status"])["ca_rotation"].clone();
    let out = rotate(&[
        "start",
        "--root",
        &new.join("ca.pem").display().to_string(),
        "--intermediate",
        &new.join("intermediate").display().to_string(),
    ]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(rotation()["phase"], "init");
    let offline = format!("prod-3/{}", machines[1].1.id);
    assert_eventually!(
        Duration::from_secs(20),
        rotation()["not_acknowledged"].as_array().is_some_and(|a| a.len() == 1 && a[0] == offline.as_str()),
        "only the offline agent lacks the new roots: {}",
        rotation()
    );
    let out = rotate(&["advance"]);
    assert!(!out.status.success(), "advance must wait for {offline}");
    assert!(text(&out.stderr).contains(&offline), "{}", text(&out.stderr));
    // It comes back in the middle, gets both roots and acknowledges them.
    agents[1].1.restart();
    assert_eventually!(
        Duration::from_secs(30),
        rotation()["not_acknowledged"].as_array().is_some_and(|a| a.is_empty()),
        "every agent acknowledged: {}",
        rotation()
    );
    let out = rotate(&["advance"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(rotation()["phase"], "update_clients");
    // Agents renew at once, under the new CA.
    assert_eventually!(
        Duration::from_secs(60),
        rotation()["on_old_root"].as_array().is_some_and(|a| a.is_empty()),
        "every live agent renewed under the new CA: {}",
        rotation()
    );
    let out = rotate(&["advance"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(rotation()["phase"], "update_servers");
    assert!(w.controller.log().contains("now presents a certificate of the new CA"), "{}", w.controller.log());
    // Operators get a certificate of the new root before the old one goes.
    for f in ["operator-tester.pem", "operator-tester.key"] {
        std::fs::remove_file(w.pki.dir.join(f)).expect("remove the old operator cert");
    }
    pki::issue(&new, &Subject::Operator("tester".into()), Validity::days(1).expect("days"), &w.pki.dir, "operator-tester")
        .expect("operator");
    let out = rotate(&["advance"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(rotation()["phase"], "complete");
    // The old root is gone: every agent trusts the new root only, and a
    // certificate of the old root is refused.
    for (name, dir) in [("prod-1", w.agent.state_dir.clone())].into_iter().chain(agents.iter().map(|(s, a, _)| (*s, a.state_dir.clone()))) {
        assert_eventually!(
            Duration::from_secs(20),
            std::fs::read_to_string(dir.join("credentials/trust.pem")).is_ok_and(|t| t.trim() == new_root.trim()),
            "{name} trusts the new root only"
        );
    }
    let (site_cert, site_key) = w.pki.site("prod-1");
    let out = drctl_as(&w.controller.url, &w.pki.ca(), &site_cert, &site_key, &["status"]);
    assert_eq!(out.status.code(), Some(4), "a certificate of the old root is refused: {}", text(&out.stderr));
    for site in ["prod-1", "prod-2", "prod-3"] {
        assert!(agent_connected(&w.pki, &w.controller.url, site), "{site} is connected");
    }
    // No agent was refused at any moment.
    assert_eq!(count(&w.controller.log(), "agent stream refused"), 0, "{}", w.controller.log());
    for log in [w.agent.log()].into_iter().chain(agents.iter().map(|(_, a, _)| a.log())) {
        // Refused by the controller, or the controller's certificate refused.
        assert!(!log.contains("the controller refused this agent") && !log.contains("invalid peer certificate"), "{log}");
    }
}

/// A machine without the instance identity document enrols with a one-time
/// token from `drctl allow-enrol --token`; the token works once.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_without_an_identity_document_enrols_with_a_one_time_token() {
    let mut w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    // The primary's agent restarts on a machine whose IMDS has no document
    // and without its certificate (a rebuilt disk).
    if let Some(mut p) = w.agent.proc.take() {
        p.kill();
    }
    std::fs::remove_dir_all(w.agent.state_dir.join("credentials")).expect("forget the certificate");
    let imds = Imds::start_signed(&w.instance, None, None, ACCOUNT);
    let out = drctl_json(&w.pki, &w.controller.url, &["allow-enrol", "prod-1", &w.instance.id, "--token", "--ttl", "10m"]);
    let token = out["token"].as_str().expect("token").to_owned();
    let token_file = w.dir.path().join("enrol-token");
    std::fs::write(&token_file, &token).expect("token file");
    let config = std::fs::read_to_string(&w.agent.config).expect("agent config");
    let config =
        config.replace(&w.imds.url, &imds.url).replacen("[tls]\n", &format!("[tls]\nenrol_token_file = \"{}\"\n", token_file.display()), 1);
    std::fs::write(&w.agent.config, config).expect("write agent config");
    w.agent.restart();
    w.wait_agent();
    assert!(w.agent.log().contains("by=\"enrolment token\""), "{}", w.agent.log());
    let inst = &site_status(&w.pki, &w.controller.url, "prod-1")["instances"][0];
    assert_eq!(inst["attestation"], "token", "{inst:#}");
    // The token is spent: a second machine cannot use it.
    let (cert, key) = w.pki.site("prod-1");
    let tls = dr_proto::tls::client_config_pem(
        &std::fs::read(w.pki.ca()).expect("ca"),
        Some((&std::fs::read(&cert).expect("cert"), &std::fs::read(&key).expect("key"))),
        "localhost",
    );
    let ch = tonic::transport::Channel::from_shared(w.controller.url.clone())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let k = rcgen::KeyPair::generate().expect("key");
    let csr_der = rcgen::CertificateParams::default().serialize_request(&k).expect("csr").der().to_vec();
    let proof = pb::InstanceProof { token, ..Default::default() };
    let e = pb::agent_service_client::AgentServiceClient::new(ch)
        .enroll(pb::EnrollRequest { site_id: "prod-1".into(), instance_id: w.instance.id.clone(), csr_der, proof: Some(proof) })
        .await
        .expect_err("a spent token");
    assert!(e.message().contains("used already"), "{}", e.message());
}

/// A rotation rolled back after agents renewed under the new CA: they
/// renew under the old one again, the rollback ends once none is on the
/// new root, and nobody was refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_ca_rotation_rolled_back_returns_every_agent_to_the_old_ca() {
    let w = World::start("prod-1", "200ms").await;
    w.wait_agent();
    let NewCa { dir: new, old_root, .. } = new_ca(&w);
    let rotate = |args: &[&str]| {
        let out = rotate_ca(&w, args);
        assert!(out.status.success(), "rotate-ca {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    };
    let rotation = || drctl_json(&w.pki, &w.controller.url, &["status"])["ca_rotation"].clone();
    rotate(&[
        "start",
        "--root",
        &new.join("ca.pem").display().to_string(),
        "--intermediate",
        &new.join("intermediate").display().to_string(),
    ]);
    assert_eventually!(Duration::from_secs(20), rotation()["not_acknowledged"].as_array().is_some_and(|a| a.is_empty()), "{}", rotation());
    rotate(&["advance"]);
    assert_eventually!(Duration::from_secs(30), count(&w.agent.log(), "certificate renewed;") >= 1, "renewed under the new CA");
    rotate(&["rollback"]);
    assert_eq!(rotation()["phase"], "rollback");
    // The agent renews under the old CA again; then the rollback can end.
    assert_eventually!(
        Duration::from_secs(30),
        rotation()["on_old_root"].as_array().is_some_and(|a| a.is_empty()),
        "no live certificate on the new root: {}",
        rotation()
    );
    rotate(&["advance"]);
    assert!(rotation().is_null() || rotation()["phase"] == "", "no rotation any more: {}", rotation());
    assert_eventually!(
        Duration::from_secs(20),
        std::fs::read_to_string(w.agent.state_dir.join("credentials/trust.pem")).is_ok_and(|t| t.trim() == old_root.trim()),
        "the agent trusts the old root only"
    );
    w.wait_agent();
    assert_eq!(count(&w.controller.log(), "agent stream refused"), 0, "{}", w.controller.log());
    assert!(!w.agent.log().contains("the controller refused this agent"), "{}", w.agent.log());
}

/// A renewal that fails on the agent (its credentials directory cannot
/// take the new files) is shown in `drctl site` with the agent's reason,
/// and clears once a renewal works.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_failing_on_the_agent_says_why_in_status() {
    let w = World::start_full("prod-1", "200ms", &[], "[pki]\nagent_cert_lifetime = \"20s\"\n").await;
    w.wait_agent();
    // `previous.pem` cannot be replaced: a non-empty directory stands there.
    let blocker = w.agent.state_dir.join("credentials/previous.pem");
    std::fs::create_dir_all(blocker.join("x")).expect("block previous.pem");
    let error =
        || site_status(&w.pki, &w.controller.url, "prod-1")["instances"][0]["renewal_error"].as_str().unwrap_or_default().to_owned();
    assert_eventually!(Duration::from_secs(40), error().starts_with("on the agent:"), "the agent's reason in status: {:?}", error());
    let out = drctl(&w.pki, &w.controller.url, &["site", "prod-1"]);
    assert!(text(&out.stdout).contains("renewal failing: on the agent"), "{}", text(&out.stdout));
    std::fs::remove_dir_all(&blocker).expect("unblock");
    assert_eventually!(
        Duration::from_secs(60),
        w.agent.log().contains("certificate renewed;") && error().is_empty(),
        "cleared: {:?}",
        error()
    );
}
