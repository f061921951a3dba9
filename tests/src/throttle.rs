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
    let upstream = Arc::new(Upstream::new(upstream).expect("upstream URL"));
    let stats2 = stats.clone();
    serve(listener, move |req: hyper::Request<hyper::body::Incoming>| {
        let (stats, rng, upstream) = (stats2.clone(), rng.clone(), upstream.clone());
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
            upstream.forward(parts, body).await
        }
    });
    ThrottleProxy { url, stats }
}

/// An HTTP server (moto) that requests are passed on to unchanged.
pub struct Upstream {
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: hyper::Uri,
}

impl Upstream {
    /// `url` is `http://host:port` of the server.
    pub fn new(url: &str) -> Result<Upstream, hyper::http::uri::InvalidUri> {
        let uri = url.parse()?;
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Ok(Upstream { client, uri })
    }

    /// Sends the request (method, path and query, headers but Host, body)
    /// to the upstream server and returns its whole answer.
    pub async fn forward(
        &self,
        parts: hyper::http::request::Parts,
        body: Bytes,
    ) -> Result<hyper::Response<Full<Bytes>>, hyper_util::client::legacy::Error> {
        let mut uri = format!(
            "{}://{}{}",
            self.uri.scheme_str().unwrap_or("http"),
            self.uri.authority().map(|a| a.as_str()).unwrap_or("127.0.0.1"),
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
        let resp = self.client.request(fwd.body(Full::new(body)).expect("request")).await?;
        let (rparts, rbody) = resp.into_parts();
        let bytes = rbody.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok(hyper::Response::from_parts(rparts, Full::new(bytes)))
    }
}

/// Serves HTTP/1 on `listener` in the background, each request answered by
/// `handler`.
pub fn serve<H, F, E>(listener: tokio::net::TcpListener, handler: H)
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<hyper::Response<Full<Bytes>>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(handler);
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
}

/// The raw (not percent-decoded) value of `key` in a form-encoded body.
pub fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}
