//! Mutual TLS: who may talk to the controller, and about what.

use std::path::Path;
use std::time::Duration;

use dr_proto::pb;
use dr_tests::*;
use drctl::pki::{self, Subject, Validity};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn channel(url: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Channel, tonic::transport::Error> {
    dr_proto::tls::install_crypto_provider();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).expect("cert"), std::fs::read(key).expect("key")));
    }
    Channel::from_shared(url.to_owned()).expect("url").tls_config(tls)?.timeout(Duration::from_secs(10)).connect().await
}

/// Opens an agent stream with a Hello for `site`; returns the first answer.
async fn hello(url: &str, ca: &Path, cert: &Path, key: &Path, site: &str) -> Result<pb::ControllerMessage, tonic::Status> {
    let ch = channel(url, ca, Some((cert, key))).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            site_id: site.to_owned(),
            facts: Some(pb::InstanceFacts { instance_id: "i-0123456789abcdef0".into(), ..Default::default() }),
            agent_version: "test".into(),
            proof: None,
        })),
    })
    .await
    .expect("queue hello");
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let first = inbound.message().await?;
    drop(tx);
    first.ok_or_else(|| tonic::Status::unknown("stream ended"))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_right_certificates_get_through() {
    let w = World::start_with("prod-1", "200ms", &[("prod-2", "i-0123456789abcdef0")]).await;
    let url = w.controller.url.clone();
    let dir = w.dir.path();

    // Legitimate paths: the agent is connected as primary, the operator reads status.
    w.wait_agent();
    let ok = drctl(&w.pki, &url, &["status"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    // 1. No client certificate at all.
    let err = match channel(&url, &w.pki.ca(), None).await {
        Ok(ch) => pb::admin_service_client::AdminServiceClient::new(ch)
            .status(pb::StatusRequest::default())
            .await
            .expect_err("a call without a client certificate must fail")
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(!err.is_empty());
    // The handshake may complete without a certificate (an agent whose
    // certificates all expired enrols that way); every other call is refused.
    assert!(err.contains("no client certificate was presented"), "{err}");
    assert_eventually!(Duration::from_secs(5), w.controller.log().contains("admin call refused"), "refusal logged");

    // 2. A certificate from another CA.
    let other = dir.join("other-ca");
    pki::init_ca(&other, "dr.test", Validity::days(1).expect("one day")).expect("other CA");
    pki::issue(&other, &Subject::Operator("tester".into()), Validity::days(1).expect("one day"), &other, "op").expect("issue");
    let out = drctl_as(&url, &w.pki.ca(), &other.join("op.pem"), &other.join("op.key"), &["status"]);
    assert_eq!(out.status.code(), Some(4), "another CA is refused: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("refused your certificate"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not signed by this deployment's CA"), "{}", text(&out.stderr));

    // 3. An expired certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity { not_before: now - time::Duration::days(10), not_after: now - time::Duration::days(1) };
    pki::issue(&w.pki.dir, &Subject::Operator("old".into()), expired, dir, "expired").expect("issue");
    let out = drctl_as(&url, &w.pki.ca(), &dir.join("expired.pem"), &dir.join("expired.key"), &["status"]);
    assert_eq!(out.status.code(), Some(4), "an expired certificate is refused: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("it expired at"), "{}", text(&out.stderr));

    // 4. A site certificate calling the admin API.
    let (site_cert, site_key) = w.pki.site("prod-1");
    let out = drctl_as(&url, &w.pki.ca(), &site_cert, &site_key, &["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("operator certificate is required"), "{}", text(&out.stderr));

    // 5. An operator certificate opening an agent stream.
    let (op_cert, op_key) = w.pki.operator();
    let status = hello(&url, &w.pki.ca(), &op_cert, &op_key, "prod-1").await.expect_err("operator cannot be an agent");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("site (agent) certificate is required"), "{status}");

    // 6. A Hello naming another site than the certificate.
    let (other_cert, other_key) = w.pki.site("prod-2");
    let status = hello(&url, &w.pki.ca(), &other_cert, &other_key, "prod-1").await.expect_err("impersonation refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("certificate is for site `prod-2`"), "{status}");
    assert_eventually!(
        Duration::from_secs(5),
        w.controller.log().contains("Hello names another site than its certificate"),
        "impersonation logged"
    );

    // And the genuine agent is still the connected one.
    assert!(agent_connected(&w.pki, &url, "prod-1"));
}

/// An agent whose certificate expired is refused as before, and the
/// operator sees why: `drctl status` shows the refusal (reason `expired`,
/// its count over many retries), the health evidence says `agent: refused
/// (certificate expired ...)` instead of `silent`, and `drctl events` has
/// one `agent.refused` for it however often the agent retried. A
/// certificate of another CA naming the site is shown as such.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_agent_certificate_is_shown_as_such() {
    let mut w = World::start_full("prod-1", "200ms", &[], "[health]\ninterval = \"1s\"\n").await;
    let url = w.controller.url.clone();
    let dir = w.dir.path().to_owned();
    w.wait_agent();

    // A certificate of another CA that names the site: refused, and shown
    // as not ours (its chain is not verified).
    let other = dir.join("other-ca");
    pki::init_ca(&other, TRUST_DOMAIN, Validity::days(1).expect("one day")).expect("other CA");
    pki::issue(&other, &Subject::Site("prod-1".into()), Validity::days(1).expect("one day"), &other, "forged").expect("issue");
    assert!(
        hello(&url, &w.pki.ca(), &other.join("forged.pem"), &other.join("forged.key"), "prod-1").await.is_err(),
        "another CA is refused"
    );

    // The agent is gone; a client presents an expired site certificate of
    // our CA (valid after the CA began, ended seconds ago).
    if let Some(mut p) = w.agent.proc.take() {
        p.kill();
    }
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity { not_before: now - time::Duration::seconds(40), not_after: now - time::Duration::seconds(2) };
    pki::issue(&w.pki.dir, &Subject::Site("prod-1".into()), expired, &dir, "expired-site").expect("issue");
    // The agent itself never presents an expired certificate (it enrols
    // again with its identity document): this is an agent that cannot,
    // an old version or a machine without IMDS, retrying.
    // Many more attempts with the same certificate.
    for _ in 0..40 {
        let refused = hello(&url, &w.pki.ca(), &dir.join("expired-site.pem"), &dir.join("expired-site.key"), "prod-1").await;
        assert!(refused.is_err(), "an expired certificate is still refused");
    }

    let expired_refusal = |s: &serde_json::Value| {
        s["refusals"].as_array().and_then(|a| a.iter().find(|r| r["reason"] == "expired").cloned()).unwrap_or_default()
    };
    assert_eventually!(
        Duration::from_secs(60),
        {
            let s = site_status(&w.pki, &url, "prod-1");
            expired_refusal(&s)["count"].as_u64().unwrap_or(0) >= 40
                && s["health"]["evidence"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|l| l.as_str().is_some_and(|l| l.starts_with("agent: refused (certificate expired"))))
        },
        "the refusal and the health line; status: {}\ncontroller log:\n{}",
        site_status(&w.pki, &url, "prod-1"),
        w.controller.log()
    );
    let s = site_status(&w.pki, &url, "prod-1");
    let r = expired_refusal(&s);
    assert_eq!(r["ca_verified"], true, "{r}");
    assert_eq!(r["current"], true, "{r}");
    assert!(r["description"].as_str().unwrap_or("").starts_with("certificate expired"), "{r}");
    assert!(r["remedy"].as_str().unwrap_or("").contains("drctl pki issue site prod-1"), "{r}");
    assert!(r["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"), "{r}");
    let forged = s["refusals"].as_array().and_then(|a| a.iter().find(|r| r["reason"] == "unknown_ca").cloned()).unwrap_or_default();
    assert_eq!(forged["ca_verified"], false, "another CA's certificate: {s}");
    let problems: Vec<&str> = s["problems"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
    assert!(problems.iter().any(|p| p.contains("agent refused: certificate expired")), "{problems:?}");
    assert!(
        !s["health"]["evidence"].as_array().into_iter().flatten().any(|l| l.as_str().unwrap_or("").starts_with("agent: silent")),
        "{s}"
    );

    // Text: the site's lines say it too.
    let out = drctl(&w.pki, &url, &["site", "prod-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("agent: refused (certificate expired"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("! agent refused: certificate expired"), "{}", text(&out.stdout));

    // One event per site, reason and certificate, not one per retry.
    let events = drctl_json(&w.pki, &url, &["events", "prod-1", "--limit", "1000"]);
    let refused: Vec<&serde_json::Value> =
        events["events"].as_array().into_iter().flatten().filter(|e| e["kind"] == "agent.refused").collect();
    let expired_events = refused.iter().filter(|e| e["evidence"]["reason"] == "expired").count();
    assert_eq!(expired_events, 1, "{refused:#?}");
    assert_eq!(refused.iter().filter(|e| e["evidence"]["reason"] == "unknown_ca").count(), 1, "{refused:#?}");
    assert!(refused.iter().all(|e| e["site_id"] == "prod-1"), "{refused:#?}");
}
