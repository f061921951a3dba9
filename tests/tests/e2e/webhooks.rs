//! Webhook delivery end to end: a real controller and two receivers on
//! loopback. One receiver is down during a burst of events; once it is back
//! it gets every event exactly in event order (a failing head holds back
//! the later events of its webhook only), while the other receiver got each
//! as it happened. Signatures are checked against Python's `hmac`, not the
//! code under test.

use std::collections::HashSet;
use std::time::Duration;

use dr_tests::*;
use serde_json::Value;

const SECRET: &str = "s3cret-for-order";

fn events(w: &World) -> Vec<Value> {
    drctl_json(&w.pki, &w.controller.url, &["events", "--limit", "1000"])["events"].as_array().cloned().unwrap_or_default()
}

/// The `seq` of each delivery in arrival order, a retry of an event already
/// received dropped (receivers deduplicate on the id: at least once).
fn first_arrivals(hook: &webhook::Receiver) -> Vec<u64> {
    unique(hook).into_iter().map(|d| d.body["seq"].as_u64().unwrap_or_else(|| panic!("a seq in {}", d.raw))).collect()
}

/// The deliveries in arrival order, each event once (its first arrival).
fn unique(hook: &webhook::Receiver) -> Vec<webhook::Delivery> {
    let mut seen = HashSet::new();
    hook.deliveries().into_iter().filter(|d| seen.insert(d.event_id.clone())).collect()
}

/// Python's `hmac` itself agrees with RFC 4231 (test cases 1 and 2), so
/// that the signatures below are checked against a known-good HMAC.
#[test]
fn pythons_hmac_matches_rfc_4231() {
    // Test case 2: key "Jefe", data "what do ya want for nothing?".
    assert_eq!(
        webhook::python_hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Test case 1: key 0x0b x 20, data "Hi There".
    assert_eq!(
        webhook::python_hmac_sha256_hex(&[0x0b; 20], b"Hi There"),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
    // And the signature format: `sha256=` + HMAC over "<timestamp>.<body>".
    assert_eq!(
        webhook::python_signature("Jefe", "what do ya want for nothing?", ""),
        format!("sha256={}", webhook::python_hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?."))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_was_down_gets_every_event_in_order_and_the_others_are_not_held_back() {
    let flaky = webhook::start(SECRET).await;
    let steady = webhook::start(SECRET).await;
    let toml = format!(
        "[[notify]]\nurl = \"{}/flaky\"\nsecret = \"{SECRET}\"\n\n[[notify]]\nurl = \"{}/steady\"\nsecret = \"{SECRET}\"\n",
        flaky.url, steady.url
    );
    let w = World::start_full("hook-site", "200ms", &[], &toml).await;
    w.wait_agent();

    // A burst of events while the flaky receiver answers 503: failures pile
    // up backoffs of different lengths.
    flaky.set_down(true);
    for i in 0..10 {
        let args: Vec<&str> =
            if i % 2 == 0 { vec!["pause", "hook-site", "--for", "1h", "--reason", "maintenance"] } else { vec!["unpause", "hook-site"] };
        let out = drctl(&w.pki, &w.controller.url, &args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        // Pacing of the stimulus (events spread over ~9 s, so that the
        // flaky receiver's failures pile up backoffs of different lengths),
        // not a wait for something to happen.
        std::thread::sleep(Duration::from_millis(900));
    }
    let all: Vec<u64> = events(&w).iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(all.len() >= 10, "the burst is recorded: {all:?}");
    // In order and without a gap: what a receiver took is the start of
    // the event log.
    let in_order = |got: &[u64]| {
        let now: Vec<u64> = events(&w).iter().filter_map(|e| e["seq"].as_u64()).collect();
        now.starts_with(got)
    };
    // The steady one got each event meanwhile, in order.
    assert_eventually!(
        Duration::from_secs(30),
        first_arrivals(&steady).len() >= all.len(),
        "steady: {:?} of {all:?}",
        first_arrivals(&steady)
    );
    assert!(in_order(&first_arrivals(&steady)), "steady in order: {:?}", first_arrivals(&steady));
    assert!(flaky.refused() > 0, "the flaky one was tried while down");
    assert!(first_arrivals(&flaky).len() < all.len(), "the flaky one was down: {:?}", first_arrivals(&flaky));

    flaky.set_down(false);
    assert_eventually!(
        Duration::from_secs(120),
        first_arrivals(&flaky).len() >= all.len(),
        "flaky got {:?} of {all:?}\ncontroller:\n{}",
        first_arrivals(&flaky),
        w.controller.log()
    );
    let got = first_arrivals(&flaky);
    assert!(in_order(&got), "strictly in event order, without a gap: got {got:?}, recorded {all:?}");
    // A receiver applying them in arrival order ends where the site is:
    // the last pause event it took is the last one recorded (an unpause).
    let last = unique(&flaky).iter().rev().map(|d| d.body["kind"].clone()).find(|k| k == "site.paused" || k == "site.unpaused");
    assert_eq!(last, Some(Value::from("site.unpaused")), "the site is unpaused");

    // Every delivery carries a signature Python's hmac agrees with.
    for d in flaky.deliveries().iter().chain(steady.deliveries().iter()) {
        assert!(d.signature_valid, "{d:?}");
        assert_eq!(d.signature, webhook::python_signature(SECRET, &d.timestamp, &d.raw), "{d:?}");
    }
}
