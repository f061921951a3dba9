//! A webhook receiver on loopback, standing in for the endpoint the
//! controller sends its notifications to (failover started, done, failed).
//!
//! Records every delivery with whether its signature checks out, and can be
//! taken down (answers 503) to test the sender's retries. The scheme, which
//! the controller implements on the sending side:
//!
//! - `X-DR-Event-Id`: the event's id (the same on every retry of it);
//! - `X-DR-Timestamp`: unix seconds when the delivery was signed;
//! - `X-DR-Signature: sha256=<lowercase hex>`: HMAC-SHA256 keyed with the
//!   shared secret over the bytes `{timestamp}.{body}` ([`sign`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::hmac;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

/// The receiver on its loopback port; dropped, it keeps serving until the
/// test's runtime ends.
pub struct Receiver {
    /// `http://127.0.0.1:<port>`; any path under it accepts POSTs.
    pub url: String,
    shared: Arc<Shared>,
}

/// One accepted POST.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// `X-DR-Event-Id` (empty when missing).
    pub event_id: String,
    /// `X-DR-Timestamp` as sent (empty when missing).
    pub timestamp: String,
    /// The body parsed as JSON; `Value::Null` when it is not JSON.
    pub body: serde_json::Value,
    /// The body as received (lossy UTF-8).
    pub raw: String,
    /// Whether `X-DR-Signature` is `sign(secret, timestamp, body)`
    /// (compared in constant time); false when a header is missing.
    pub signature_valid: bool,
    /// `X-DR-Signature` as sent (empty when missing).
    pub signature: String,
    /// The request's path, e.g. `/hooks/dr`.
    pub path: String,
}

struct Shared {
    key: hmac::Key,
    down: AtomicBool,
    refused: AtomicU64,
    deliveries: Mutex<Vec<Delivery>>,
}

/// Starts a receiver on a free loopback port checking signatures with
/// `secret`.
pub async fn start(secret: &str) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind webhook receiver");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shared = Arc::new(Shared {
        key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        down: AtomicBool::new(false),
        refused: AtomicU64::new(0),
        deliveries: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new().fallback(receive).with_state(shared.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver { url, shared }
}

impl Receiver {
    /// While down, every POST is answered 503 and only counted
    /// ([`Receiver::refused`]), not recorded.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// POSTs refused while down.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// The accepted POSTs in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.deliveries.lock().expect("lock").clone()
    }

    /// `X-DR-Event-Id` of each accepted POST in arrival order, duplicates
    /// (retries of one event) kept.
    pub fn event_ids(&self) -> Vec<String> {
        self.shared.deliveries.lock().expect("lock").iter().map(|d| d.event_id.clone()).collect()
    }
}

/// `sha256=` and the lowercase hex of HMAC-SHA256(`secret`,
/// `{timestamp}.{body}`): the `X-DR-Signature` of a delivery.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, &signed_bytes(timestamp, body));
    format!("sha256={}", hex::encode(tag.as_ref()))
}

fn signed_bytes(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(timestamp.len() + 1 + body.len());
    msg.extend_from_slice(timestamp.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    msg
}

async fn receive(State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    if shared.down.load(Ordering::SeqCst) {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let timestamp = header("x-dr-timestamp");
    let signature = header("x-dr-signature").unwrap_or_default();
    let signature_valid = match (&timestamp, header("x-dr-signature")) {
        (Some(ts), Some(sig)) => sig
            .strip_prefix("sha256=")
            // Lowercase hex only, as the scheme says.
            .filter(|h| h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
            .and_then(|h| hex::decode(h).ok())
            .is_some_and(|tag| hmac::verify(&shared.key, &signed_bytes(ts, &body), &tag).is_ok()),
        _ => false,
    };
    let delivery = Delivery {
        event_id: header("x-dr-event-id").unwrap_or_default(),
        timestamp: timestamp.unwrap_or_default(),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        raw: String::from_utf8_lossy(&body).into_owned(),
        signature_valid,
        signature,
        path: uri.path().to_owned(),
    };
    shared.deliveries.lock().expect("lock").push(delivery);
    StatusCode::OK
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>") computed by
/// Python's standard library (`python3 -c`), independently of the code
/// under test and of this receiver's own check.
pub fn python_signature(secret: &str, timestamp: &str, body: &str) -> String {
    let mut data = format!("{timestamp}.").into_bytes();
    data.extend_from_slice(body.as_bytes());
    format!("sha256={}", python_hmac_sha256_hex(secret.as_bytes(), &data))
}

/// Hex HMAC-SHA256 of `data` under `key`, computed by Python's `hmac`
/// (key and data passed as hex, so any bytes go through unchanged).
pub fn python_hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib, hmac, sys; print(hmac.new(bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]), hashlib.sha256).hexdigest())",
            &hex::encode(key),
            &hex::encode(data),
        ])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
