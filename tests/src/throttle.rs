//! A throttling proxy in front of moto: forwards EC2 query-API requests and
//! answers a share of them with HTTP 503 `RequestLimitExceeded`, the way
//! EC2 throttles. Counts calls per Action and the throttles it injected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rand::{Rng, SeedableRng};

#[derive(Default)]
pub struct Stats {
    pub calls: Mutex<HashMap<String, u64>>,
    pub throttled: AtomicU64,
}

impl Stats {
    pub fn total_calls(&self) -> u64 {
        self.calls.lock().expect("lock").values().sum()
    }
    pub fn calls_of(&self, action: &str) -> u64 {
        self.calls.lock().expect("lock").get(action).copied().unwrap_or(0)
    }
}

pub struct ThrottleProxy {
    pub url: String,
    pub stats: Arc<Stats>,
}

const THROTTLED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>";

/// Starts the proxy on a free loopback port; `share` of requests (0..1) are
/// throttled, chosen by a PRNG seeded with `seed` (reproducible runs).
pub async fn start(upstream: &str, share: f64, seed: u64) -> ThrottleProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stats = Arc::new(Stats::default());
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let upstream: hyper::Uri = upstream.parse().expect("upstream URL");
    let (stats2, upstream) = (stats.clone(), Arc::new(upstream));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (stats, rng, client, upstream) = (stats2.clone(), rng.clone(), client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (stats, rng, client, upstream) = (stats.clone(), rng.clone(), client.clone(), upstream.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let action = form_value(&body, "Action").unwrap_or_else(|| "?".into());
                        *stats.calls.lock().expect("lock").entry(action).or_default() += 1;
                        if rng.lock().expect("lock").random_bool(share) {
                            stats.throttled.fetch_add(1, Ordering::Relaxed);
                            return Ok::<_, hyper_util::client::legacy::Error>(
                                hyper::Response::builder()
                                    .status(503)
                                    .header("content-type", "text/xml")
                                    .body(Full::new(Bytes::from_static(THROTTLED.as_bytes())))
                                    .expect("static response"),
                            );
                        }
                        let mut uri = format!(
                            "{}://{}{}",
                            upstream.scheme_str().unwrap_or("http"),
                            upstream.authority().map(|a| a.as_str()).unwrap_or("127.0.0.1"),
                            parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
                        );
                        if uri.ends_with('?') {
                            uri.pop();
                        }
                        let mut fwd = hyper::Request::builder().method(parts.method).uri(uri);
                        for (k, v) in parts.headers.iter() {
                            if k != hyper::header::HOST {
                                fwd = fwd.header(k, v);
                            }
                        }
                        let resp = client.request(fwd.body(Full::new(body)).expect("request")).await?;
                        let (rparts, rbody) = resp.into_parts();
                        let bytes = rbody.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        Ok(hyper::Response::from_parts(rparts, Full::new(bytes)))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    ThrottleProxy { url, stats }
}

fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}
