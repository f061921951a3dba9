//! The harness pieces of the failover tests work as those tests assume: the
//! fault proxy in front of moto (failed status checks and scheduled events
//! as the SDK parses them, instances that won't stop, a failed region) and
//! the webhook receiver (signature check, downtime).

use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{EventCode, InstanceStateName, StatusName, StatusType, SummaryStatus};
use dr_tests::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// Launches `n` instances in one RunInstances; returns their ids. The AMI
/// id is made up: moto does not check it (MOTO_ENABLE_AMI_VALIDATION is
/// off), and listing its stock AMIs would take a second.
async fn launch(ec2: &aws_sdk_ec2::Client, n: i32) -> Vec<String> {
    let ami = "ami-0fa0170000000000f";
    let out = ec2.run_instances().image_id(ami).min_count(n).max_count(n).send().await.expect("expected RunInstances to succeed");
    let ids: Vec<String> = out.instances().iter().filter_map(|i| i.instance_id().map(str::to_owned)).collect();
    assert_eq!(ids.len(), n as usize, "expected {n} instances launched");
    ids
}

/// `DescribeInstanceStatus` of one instance (all instances, running or
/// not), through `ec2`.
async fn status_of(ec2: &aws_sdk_ec2::Client, id: &str) -> aws_sdk_ec2::types::InstanceStatus {
    let out = ec2
        .describe_instance_status()
        .include_all_instances(true)
        .instance_ids(id)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DescribeInstanceStatus of {id} should succeed: {e:?}"));
    let statuses = out.instance_statuses();
    assert_eq!(statuses.len(), 1, "expected exactly one status for {id}, got {statuses:?}");
    statuses[0].clone()
}

async fn state_of(ec2: &aws_sdk_ec2::Client, id: &str) -> InstanceStateName {
    let out = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DescribeInstances of {id} should succeed: {e:?}"));
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find_map(|i| i.state().and_then(|s| s.name()).cloned())
        .unwrap_or_else(|| panic!("expected DescribeInstances to list {id} with a state"))
}

/// Waits (briefly) until the instance is in `want`; returns the last state.
async fn wait_state(ec2: &aws_sdk_ec2::Client, id: &str, want: InstanceStateName) -> InstanceStateName {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = state_of(ec2, id).await;
        if state == want || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_checks_and_scheduled_events_show_for_the_faulty_instances_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let proxy = faults::start(&moto.url).await;
    let ec2 = ec2_client(&proxy.url, REGION);
    let [sick_host, sick_guest, healthy]: [String; 3] = launch(&ec2, 3).await.try_into().expect("three ids");

    proxy.faults.impair_system(&sick_host);
    proxy.faults.schedule_event(&sick_host, "instance-retirement");
    proxy.faults.impair_instance(&sick_guest);
    proxy.faults.schedule_event(&sick_guest, "system-reboot");
    proxy.faults.schedule_event(&sick_guest, "instance-stop");

    let s = status_of(&ec2, &sick_host).await;
    let system = s.system_status().expect("expected a systemStatus for the impaired host");
    assert_eq!(system.status(), Some(&SummaryStatus::Impaired), "expected systemStatus impaired, got {s:?}");
    let detail = &system.details()[0];
    assert_eq!(detail.name(), Some(&StatusName::Reachability), "expected a reachability detail, got {s:?}");
    assert_eq!(detail.status(), Some(&StatusType::Failed), "expected reachability failed, got {s:?}");
    assert!(detail.impaired_since().is_some(), "expected impairedSince on the failed check, got {s:?}");
    assert_eq!(
        s.instance_status().and_then(|i| i.status()),
        Some(&SummaryStatus::Ok),
        "expected the host's instanceStatus to stay ok (only the system check fails), got {s:?}"
    );
    assert_eq!(s.events().len(), 1, "expected one scheduled event on the host, got {s:?}");
    let event = &s.events()[0];
    assert_eq!(event.code(), Some(&EventCode::InstanceRetirement), "expected an instance-retirement event, got {s:?}");
    assert!(event.description().is_some_and(|d| !d.is_empty()), "expected the event to have a description, got {s:?}");
    let not_before = event.not_before().expect("expected the event to have a notBefore");
    let ahead = not_before.secs() - aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now()).secs();
    assert!((86_000..=86_500).contains(&ahead), "expected notBefore about one day ahead, got {ahead}s ({s:?})");
    assert!(event.instance_event_id().is_some(), "expected the event to have an id, got {s:?}");
    let first_id = event.instance_event_id().map(str::to_owned);
    assert_eq!(
        status_of(&ec2, &sick_host).await.events()[0].instance_event_id().map(str::to_owned),
        first_id,
        "expected the same event id on every poll"
    );

    let s = status_of(&ec2, &sick_guest).await;
    assert_eq!(
        s.instance_status().and_then(|i| i.status()),
        Some(&SummaryStatus::Impaired),
        "expected the guest's instanceStatus impaired, got {s:?}"
    );
    assert_eq!(
        s.system_status().and_then(|i| i.status()),
        Some(&SummaryStatus::Ok),
        "expected the guest's systemStatus to stay ok, got {s:?}"
    );
    let codes: Vec<_> = s.events().iter().filter_map(|e| e.code().cloned()).collect();
    assert_eq!(codes, [EventCode::SystemReboot, EventCode::InstanceStop], "expected both events in the order scheduled, got {s:?}");

    let s = status_of(&ec2, &healthy).await;
    assert_eq!(
        s.system_status().and_then(|i| i.status()),
        Some(&SummaryStatus::Ok),
        "expected the healthy instance's systemStatus ok, got {s:?}"
    );
    assert_eq!(
        s.instance_status().and_then(|i| i.status()),
        Some(&SummaryStatus::Ok),
        "expected the healthy instance's instanceStatus ok, got {s:?}"
    );
    assert!(s.events().is_empty(), "expected no events on the healthy instance, got {s:?}");

    // All three in one call, as a poller asks: each item edited on its own.
    let all = ec2
        .describe_instance_status()
        .include_all_instances(true)
        .instance_ids(&sick_host)
        .instance_ids(&sick_guest)
        .instance_ids(&healthy)
        .send()
        .await
        .expect("expected DescribeInstanceStatus of three instances to succeed");
    let summary = |id: &str| {
        let s = all.instance_statuses().iter().find(|s| s.instance_id() == Some(id)).unwrap_or_else(|| panic!("expected {id} listed"));
        (s.system_status().and_then(|x| x.status()).cloned(), s.instance_status().and_then(|x| x.status()).cloned(), s.events().len())
    };
    assert_eq!(summary(&sick_host), (Some(SummaryStatus::Impaired), Some(SummaryStatus::Ok), 1), "expected the host impaired with 1 event");
    assert_eq!(
        summary(&sick_guest),
        (Some(SummaryStatus::Ok), Some(SummaryStatus::Impaired), 2),
        "expected the guest impaired with 2 events"
    );
    assert_eq!(summary(&healthy), (Some(SummaryStatus::Ok), Some(SummaryStatus::Ok), 0), "expected the healthy one untouched");

    // Cleared, the host is healthy again.
    proxy.faults.clear(&sick_host);
    let s = status_of(&ec2, &sick_host).await;
    assert_eq!(s.system_status().and_then(|i| i.status()), Some(&SummaryStatus::Ok), "expected systemStatus ok after clear, got {s:?}");
    assert!(s.events().is_empty(), "expected no events after clear, got {s:?}");

    // A stopped instance has no status checks: its faults do not show.
    ec2.stop_instances().instance_ids(&sick_guest).send().await.expect("expected StopInstances to succeed");
    assert_eq!(wait_state(&ec2, &sick_guest, InstanceStateName::Stopped).await, InstanceStateName::Stopped, "expected the guest stopped");
    let s = status_of(&ec2, &sick_guest).await;
    assert_eq!(
        s.instance_status().and_then(|i| i.status()),
        Some(&SummaryStatus::NotApplicable),
        "expected a stopped instance's instanceStatus left not-applicable, got {s:?}"
    );
    assert!(s.events().is_empty(), "expected no events shown on a stopped instance, got {s:?}");
    assert!(proxy.stats.calls_of("DescribeInstanceStatus") >= 7, "expected the proxy to count DescribeInstanceStatus calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_wont_stop_keeps_running_while_others_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let proxy = faults::start(&moto.url).await;
    let ec2 = ec2_client(&proxy.url, REGION);
    let [stuck, normal, stuck2, normal2]: [String; 4] = launch(&ec2, 4).await.try_into().expect("four ids");
    proxy.faults.wont_stop(&stuck);
    proxy.faults.wont_stop(&stuck2);

    // A dry run (the controller's permission check) reaches moto and is
    // not a stop call.
    let dry = ec2.stop_instances().dry_run(true).instance_ids(&stuck).send().await;
    let dry = dry.expect_err("expected a dry run to be answered DryRunOperation");
    assert_eq!(dry.code(), Some("DryRunOperation"), "expected moto's DryRunOperation for a dry run, got {dry:?}");

    let out = ec2.stop_instances().instance_ids(&stuck).send().await.expect("expected the swallowed StopInstances to succeed");
    let change = &out.stopping_instances()[0];
    assert_eq!(change.instance_id(), Some(stuck.as_str()), "expected the answer to name the stuck instance");
    assert_eq!(change.current_state().and_then(|s| s.name()), Some(&InstanceStateName::Stopping), "expected currentState stopping");
    assert_eq!(change.previous_state().and_then(|s| s.name()), Some(&InstanceStateName::Running), "expected previousState running");
    ec2.stop_instances().instance_ids(&normal).send().await.expect("expected the forwarded StopInstances to succeed");

    // One call naming both kinds: moto stops one, the answer lists both.
    let out = ec2
        .stop_instances()
        .instance_ids(&stuck2)
        .instance_ids(&normal2)
        .send()
        .await
        .expect("expected the mixed StopInstances to succeed");
    let mut named: Vec<_> = out.stopping_instances().iter().filter_map(|c| c.instance_id().map(str::to_owned)).collect();
    named.sort();
    let mut want = vec![stuck2.clone(), normal2.clone()];
    want.sort();
    assert_eq!(named, want, "expected the mixed answer to list both instances");

    // The normal instances stop (moto acted on the calls), while the
    // wont_stop ones stay running throughout and a while after.
    assert_eq!(
        wait_state(&ec2, &normal, InstanceStateName::Stopped).await,
        InstanceStateName::Stopped,
        "expected the normal instance stopped"
    );
    assert_eq!(
        wait_state(&ec2, &normal2, InstanceStateName::Stopped).await,
        InstanceStateName::Stopped,
        "expected the normal instance of the mixed call stopped"
    );
    dr_tests::assert_quiet_for!(
        Duration::from_millis(500),
        state_of(&ec2, &stuck).await != InstanceStateName::Running || state_of(&ec2, &stuck2).await != InstanceStateName::Running,
        "expected the wont_stop instances still running"
    );
    assert_eq!(
        proxy.faults.stop_calls(),
        [stuck.clone(), normal.clone(), stuck2.clone(), normal2.clone()],
        "expected every real StopInstances recorded in order, the dry run not"
    );
    assert_eq!(proxy.stats.calls_of("StopInstances"), 4, "expected 4 StopInstances counted (dry run included)");

    // Cleared, it stops like any other.
    proxy.faults.clear(&stuck);
    ec2.stop_instances().instance_ids(&stuck).send().await.expect("expected StopInstances to succeed");
    assert_eq!(
        wait_state(&ec2, &stuck, InstanceStateName::Stopped).await,
        InstanceStateName::Stopped,
        "expected the cleared instance stopped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_region_answers_unavailable_while_others_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let proxy = faults::start(&moto.url).await;
    let east = ec2_client(&proxy.url, "us-east-1");
    let west = ec2_client(&proxy.url, "us-west-2");
    west.describe_instances().send().await.expect("expected us-west-2 to work before the fault");

    proxy.faults.fail_region("us-west-2");
    let err = west.describe_instances().send().await.expect_err("expected us-west-2 to fail while its region is down");
    assert_eq!(err.code(), Some("Unavailable"), "expected EC2 error code Unavailable, got {err:?}");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(503), "expected HTTP 503, got {err:?}");
    let err = west
        .stop_instances()
        .instance_ids("i-0123456789abcdef0")
        .send()
        .await
        .expect_err("expected StopInstances in the failed region to fail");
    assert_eq!(err.code(), Some("Unavailable"), "expected every action of the failed region Unavailable, got {err:?}");
    assert!(proxy.faults.stop_calls().is_empty(), "expected a refused StopInstances not recorded as a stop call");
    let i = launch(&east, 1).await.remove(0);
    assert_eq!(state_of(&east, &i).await, InstanceStateName::Running, "expected us-east-1 to keep working");

    proxy.faults.heal_region("us-west-2");
    west.describe_instances().send().await.expect("expected us-west-2 to work again once healed");
}

/// POSTs `body` to `url` with the given headers; returns the HTTP status.
async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder().method("POST").uri(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).expect("request"))
        .await
        .unwrap_or_else(|e| panic!("expected the receiver at {url} to answer: {e}"));
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_receiver_checks_signatures_and_refuses_while_down() {
    let secret = "s3cret";
    let rx = webhook::start(secret).await;
    let body = r#"{"event":"failover.started","site":"prod-1"}"#;
    let ts = "1796000000";

    // The scheme, pinned: HMAC-SHA256 over "{ts}.{body}", lowercase hex.
    let sig = webhook::sign(secret, ts, body.as_bytes());
    assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "expected sha256= and 64 hex digits, got {sig}");
    // Checked against Python's hmac (itself checked against RFC 4231 in
    // `webhooks::pythons_hmac_matches_rfc_4231`), not the library we sign with.
    assert_eq!(
        webhook::sign("key", "1", b"x"),
        webhook::python_signature("key", "1", "x"),
        "expected the signature over the bytes \"{{timestamp}}.{{body}}\""
    );
    assert_eq!(sig, webhook::python_signature(secret, ts, body), "expected Python's hmac to agree");

    let good = [("X-DR-Event-Id", "ev-1"), ("X-DR-Timestamp", ts), ("X-DR-Signature", sig.as_str())];
    assert_eq!(post(&format!("{}/hooks/dr", rx.url), &good, body).await, 200, "expected a signed POST accepted with 200");
    let wrong = webhook::sign("not-the-secret", ts, body.as_bytes());
    let bad = [("X-DR-Event-Id", "ev-2"), ("X-DR-Timestamp", ts), ("X-DR-Signature", wrong.as_str())];
    assert_eq!(post(&rx.url, &bad, body).await, 200, "expected a wrongly signed POST still recorded (with 200)");
    let upper = sig.to_uppercase().replace("SHA256=", "sha256=");
    let shouting = [("X-DR-Event-Id", "ev-3"), ("X-DR-Timestamp", ts), ("X-DR-Signature", upper.as_str())];
    post(&rx.url, &shouting, body).await;
    let stale = [("X-DR-Event-Id", "ev-4"), ("X-DR-Timestamp", "1796000001"), ("X-DR-Signature", sig.as_str())];
    post(&rx.url, &stale, body).await;
    let not_json_sig = webhook::sign(secret, ts, b"not json");
    post(&rx.url, &[("X-DR-Event-Id", "ev-5"), ("X-DR-Timestamp", ts), ("X-DR-Signature", not_json_sig.as_str())], "not json").await;
    post(&rx.url, &[("X-DR-Event-Id", "ev-6")], body).await;

    let d = rx.deliveries();
    assert_eq!(d.len(), 6, "expected 6 deliveries recorded, got {d:?}");
    assert!(d[0].signature_valid, "expected the correctly signed delivery valid: {:?}", d[0]);
    assert_eq!(d[0].event_id, "ev-1", "expected the event id from X-DR-Event-Id");
    assert_eq!(d[0].path, "/hooks/dr", "expected the request's path recorded");
    assert_eq!(d[0].body["event"], "failover.started", "expected the JSON body parsed: {:?}", d[0]);
    assert_eq!(d[0].raw, body, "expected the raw body kept");
    assert_eq!(d[0].timestamp, ts, "expected the timestamp header kept");
    assert!(!d[1].signature_valid, "expected a signature with the wrong secret flagged invalid: {:?}", d[1]);
    assert!(!d[2].signature_valid, "expected an uppercase-hex signature flagged invalid: {:?}", d[2]);
    assert!(!d[3].signature_valid, "expected a signature over another timestamp flagged invalid: {:?}", d[3]);
    assert!(d[4].signature_valid, "expected a signed non-JSON body valid: {:?}", d[4]);
    assert_eq!(d[4].body, serde_json::Value::Null, "expected a non-JSON body recorded as Null: {:?}", d[4]);
    assert_eq!(d[4].raw, "not json", "expected the raw non-JSON body kept");
    assert!(!d[5].signature_valid, "expected an unsigned delivery flagged invalid: {:?}", d[5]);
    assert_eq!(d[1].path, "/", "expected the bare URL's path /");

    // Down: 503, counted, nothing recorded.
    rx.set_down(true);
    assert_eq!(post(&rx.url, &good, body).await, 503, "expected 503 while down");
    assert_eq!(post(&rx.url, &good, body).await, 503, "expected 503 again while down");
    assert_eq!(rx.refused(), 2, "expected both refused attempts counted");
    assert_eq!(rx.deliveries().len(), 6, "expected nothing recorded while down");

    // Back up: the retry is accepted; duplicates are kept in order.
    rx.set_down(false);
    assert_eq!(post(&rx.url, &good, body).await, 200, "expected 200 once back up");
    assert_eq!(
        rx.event_ids(),
        ["ev-1", "ev-2", "ev-3", "ev-4", "ev-5", "ev-6", "ev-1"],
        "expected event ids in arrival order, duplicates kept"
    );
    assert_eq!(rx.refused(), 2, "expected the refused count unchanged once up");
}
