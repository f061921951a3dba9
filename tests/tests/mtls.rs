//! Mutual TLS: who may talk to the controller, and about what.

use std::path::Path;
use std::time::Duration;

use drctl::pki::{self, Subject, Validity};
use dr_proto::pb;
use dr_tests::*;
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
    assert_eventually!(Duration::from_secs(5), w.controller.log().contains("TLS handshake refused"), "refusal logged");

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
