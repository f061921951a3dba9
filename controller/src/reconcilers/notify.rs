//! Events and their delivery to webhooks (`[[notify]]`).
//!
//! [`Notifier::record`] writes events to the store's log together with one
//! outbox row per webhook that wants each (one transaction); [`run`]
//! delivers the outbox: POST, `X-DR-Event-Id`, `X-DR-Timestamp` and
//! `X-DR-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! A delivery that fails (no answer, or not 2xx) is retried with backoff
//! (1 s doubling to 5 min) until it succeeds: at least once, in event
//! order per webhook, across restarts. Receivers deduplicate on the id.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::cloud::http::HttpClients;
use crate::config::{NotifyConfig, NotifyFormat};
use crate::domain::events::EventKind;
use crate::domain::health::SiteHealth;
use crate::domain::model::{Event, Millis, now_ms};
use crate::store::{Store, StoreError};

/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF: dr_proto::backoff::Backoff = dr_proto::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// Records events and knows which webhook wants which.
#[derive(Clone)]
pub struct Notifier {
    pub store: Store,
    pub sinks: Arc<Vec<NotifyConfig>>,
}

/// A new event (its id is a fresh UUID unless `id` is set).
pub fn event(
    site: &str,
    kind: EventKind,
    severity: &str,
    summary: impl Into<String>,
    evidence: serde_json::Value,
    operation_id: &str,
) -> Event {
    Event::new(site, kind, severity, summary, evidence, operation_id)
}

impl Notifier {
    /// Writes health records and events (with their outbox rows) at once;
    /// logs each new event.
    pub async fn record(&self, health: Vec<SiteHealth>, events: Vec<Event>) -> Result<Vec<Event>, StoreError> {
        let with_sinks = events
            .into_iter()
            .map(|e| {
                let sinks = self.sinks.iter().filter(|s| s.wants(&e.kind)).map(|s| s.url.clone()).collect();
                (e, sinks)
            })
            .collect();
        let recorded = self.store.put_health(health, with_sinks).await?;
        for e in &recorded {
            match e.severity.as_str() {
                "critical" | "warning" => {
                    tracing::warn!(event = %e.kind, site = %e.site_id, operation = %e.operation_id, summary = %e.summary, "event")
                }
                _ => tracing::info!(event = %e.kind, site = %e.site_id, operation = %e.operation_id, summary = %e.summary, "event"),
            }
        }
        Ok(recorded)
    }
}

impl Notifier {
    /// Pauses (`until_ms` > 0) or resumes (`until_ms` 0) a site's automatic
    /// recovery, with its `site.paused` / `site.unpaused` event.
    pub async fn set_pause(&self, pause: crate::domain::health::Pause) -> Result<Event, StoreError> {
        let e = if pause.until_ms > 0 {
            let until = time::OffsetDateTime::from_unix_timestamp((pause.until_ms / 1000) as i64)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_default();
            event(
                &pause.site_id,
                EventKind::SitePaused,
                "warning",
                format!("automatic recovery paused by {} until {until}: {}", pause.by, pause.reason),
                json!({"until_ms": pause.until_ms, "by": pause.by}),
                "",
            )
        } else {
            event(
                &pause.site_id,
                EventKind::SiteUnpaused,
                "info",
                format!("automatic recovery resumed by {}", pause.by),
                json!({"by": pause.by}),
                "",
            )
        };
        let sinks = self.sinks.iter().filter(|s| s.wants(&e.kind)).map(|s| s.url.clone()).collect();
        self.store.set_pause(pause, (e, sinks)).await
    }
}

/// The body sent for an event in a webhook's format.
pub fn body(e: &Event, format: NotifyFormat) -> serde_json::Value {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(e.at_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    match format {
        NotifyFormat::Json => json!({
            "id": e.id, "seq": e.seq, "at": at, "site": e.site_id, "kind": e.kind, "severity": e.severity,
            "summary": e.summary, "operation_id": e.operation_id, "evidence": e.evidence,
        }),
        NotifyFormat::Slack => {
            let icon = match e.severity.as_str() {
                "critical" => ":rotating_light:",
                "warning" => ":warning:",
                _ => ":information_source:",
            };
            let site = if e.site_id.is_empty() { "fleet".to_owned() } else { format!("site `{}`", e.site_id) };
            let op = if e.operation_id.is_empty() { String::new() } else { format!(" (operation `{}`)", e.operation_id) };
            json!({ "text": format!("{icon} *{}* {site}: {}{op}", e.kind, e.summary) })
        }
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// Delivers the outbox every `tick` until the process ends (never returns:
/// the supervisor would take an end for a fault).
pub async fn run(store: Store, sinks: Arc<Vec<NotifyConfig>>, http: HttpClients, tick: Duration) {
    loop {
        match deliver_due(&store, &sinks, &http, now_ms()).await {
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "webhook outbox pass failed"),
        }
        tokio::time::sleep(tick).await;
    }
}

/// One pass: every delivery due at `now`, per webhook in event order (a
/// webhook that fails stops its own queue for this pass, not the others').
/// How many were delivered.
pub async fn deliver_due(store: &Store, sinks: &[NotifyConfig], http: &HttpClients, now: Millis) -> Result<usize, StoreError> {
    let due = store.outbox_due(now, 500).await?;
    let mut failed_sinks: Vec<String> = vec![];
    let mut delivered = 0;
    for item in due {
        if failed_sinks.contains(&item.sink) {
            continue;
        }
        let Some(sink) = sinks.iter().find(|s| s.url == item.sink) else {
            // A webhook no longer configured: its deliveries stay owed
            // (shown in the backlog) until it is configured again.
            continue;
        };
        let body = serde_json::to_vec(&body(&item.event, sink.format)).expect("JSON values serialize");
        let ts = (now_ms() / 1000).to_string();
        let mut headers =
            vec![("x-dr-event-id", item.event.id.clone()), ("x-dr-timestamp", ts.clone()), ("x-dr-event-kind", item.event.kind.clone())];
        match sink.secret() {
            Ok(secret) if !secret.is_empty() => headers.push(("x-dr-signature", signature(&secret, &ts, &body))),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(webhook = %crate::cloud::http::redacted(&sink.url), error = %e, "webhook secret unreadable: sent unsigned")
            }
        }
        let result = http.post_json(&sink.url, &headers, body, sink.ca.as_deref(), DELIVERY_TIMEOUT).await;
        match result {
            Ok(a) if (200..300).contains(&a.status) => {
                store.outbox_delivered(item.event.seq, item.sink.clone(), now_ms()).await?;
                delivered += 1;
            }
            other => {
                let error = match other {
                    Ok(a) => format!("HTTP {}: {}", a.status, a.body.chars().take(200).collect::<String>()),
                    Err(e) => e.to_string(),
                };
                let wait = BACKOFF.delay(item.attempts);
                tracing::warn!(webhook = %crate::cloud::http::redacted(&sink.url), event = %item.event.id, attempt = item.attempts + 1, retry_in = ?wait, error = %error, "webhook delivery failed");
                store.outbox_retry(item.event.seq, item.sink.clone(), now_ms() + wait.as_millis() as u64, error).await?;
                failed_sinks.push(item.sink.clone());
            }
        }
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        let sig = signature("Jefe", "what do ya want for nothing?", b"");
        assert_ne!(sig, signature("Jefe", "what do ya want for nothing?", b"x"));
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"key"));
        ctx.update(b"1700000000.{}");
        assert_eq!(signature("key", "1700000000", b"{}"), format!("sha256={}", hex::encode(ctx.sign().as_ref())));
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
    }

    /// A webhook on loopback that answers 503 while `down`, else 200 and
    /// records the `seq` of each body it took, in arrival order.
    async fn receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>, std::sync::Arc<std::sync::Mutex<Vec<u64>>>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, g) = (down.clone(), got.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let (d, g) = (d.clone(), g.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then Content-Length bytes of body.
                    let body = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break buf[end + 4..end + 4 + len].to_vec();
                            }
                        }
                    };
                    let status = if d.load(Ordering::SeqCst) {
                        "503 Service Unavailable"
                    } else {
                        let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
                        g.lock().expect("lock").push(v["seq"].as_u64().expect("seq"));
                        "200 OK"
                    };
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = sock.write_all(answer.as_bytes()).await;
                });
            }
        });
        (url, down, got)
    }

    #[tokio::test]
    async fn a_webhook_waiting_out_its_backoff_holds_back_its_later_events_only() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state.db")).await.expect("open");
        let (slow_url, slow_down, slow_got) = receiver().await;
        let (fast_url, _, fast_got) = receiver().await;
        let sink = |url: &str| NotifyConfig {
            url: url.to_owned(),
            events: vec![],
            secret: None,
            secret_file: None,
            format: NotifyFormat::Json,
            ca: None,
        };
        let sinks = vec![sink(&slow_url), sink(&fast_url)];
        let notifier = Notifier { store: store.clone(), sinks: Arc::new(sinks.clone()) };
        let http = HttpClients::default();
        let record = |n: u32| {
            let notifier = notifier.clone();
            async move {
                let events = (0..n).map(|i| event("s1", EventKind::SitePaused, "warning", format!("event {i}"), json!({}), "")).collect();
                notifier.record(vec![], events).await.expect("record")
            }
        };

        // The slow webhook refuses the first event: it waits out a backoff.
        slow_down.store(true, Ordering::SeqCst);
        let first = record(1).await;
        deliver_due(&store, &sinks, &http, now_ms()).await.expect("pass");
        assert_eq!(*fast_got.lock().expect("lock"), vec![first[0].seq]);
        // The backoff is jittered (0 to 1 s): make it a sure minute.
        store.outbox_retry(first[0].seq, slow_url.clone(), now_ms() + 60_000, "HTTP 503".into()).await.expect("retry");

        // It is back before its head's retry is due; newer events arrive.
        slow_down.store(false, Ordering::SeqCst);
        let later = record(3).await;
        deliver_due(&store, &sinks, &http, now_ms()).await.expect("pass");
        assert!(
            slow_got.lock().expect("lock").is_empty(),
            "nothing overtakes the head in its backoff: {:?}",
            slow_got.lock().expect("lock")
        );
        let all: Vec<u64> = first.iter().chain(&later).map(|e| e.seq).collect();
        assert_eq!(*fast_got.lock().expect("lock"), all, "the other webhook is not held back");

        // Once the head is due, the queue goes in order.
        let delivered = deliver_due(&store, &sinks, &http, now_ms() + 600_000).await.expect("pass");
        assert_eq!(delivered, 4);
        assert_eq!(*slow_got.lock().expect("lock"), all, "in event order");
        assert_eq!(*fast_got.lock().expect("lock"), all, "each once");
    }

    #[test]
    fn slack_bodies_are_one_text_line() {
        let e = event("s1", EventKind::SiteDown, "critical", "it is down", json!({}), "op-1");
        let b = body(&e, NotifyFormat::Slack);
        let t = b["text"].as_str().expect("text");
        assert!(t.contains("site.down") && t.contains("`s1`") && t.contains("op-1"), "{t}");
        assert_eq!(body(&e, NotifyFormat::Json)["id"], e.id);
    }
}
