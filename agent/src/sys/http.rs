//! The agent's one small HTTP/1.1 client (hyper), for the plain-http
//! services it talks to on its machine: IMDS ([`crate::sys::imds`]), Nomad
//! ([`crate::steps::drain`]), the CircleCI API ([`crate::steps::builds::api`]) and the
//! frontend's health check ([`crate::steps::health`]).
//!
//! In one place: the URL rules every caller shares (http only, a host, no
//! user info), the connect timeout and the deadline of a whole exchange
//! (request, answer and body), the body size limit, no idle connections
//! kept (each call opens its own, so a restarted service is never talked to
//! over a dead socket), the error chain of a transport failure, the status
//! check with an excerpt of the body, and excerpts. Callers add their own
//! rules (no path, no query) and name what they asked for in their errors.

use std::borrow::Cow;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why an exchange did not give an answer (or the answer was not a success,
/// [`Response::success`]). The caller names the URL and what it asked.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("must be an http:// URL")]
    NotHttp,
    #[error("{0}")]
    BadUrl(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
    #[error("reading the body: {0}")]
    Body(String),
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("HTTP {status}: {excerpt}")]
    Status { status: StatusCode, excerpt: String },
}

/// An answer: status, content type and the whole body (within the limit).
#[derive(Clone, Debug)]
pub(crate) struct Response {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body, only if it is UTF-8.
    pub fn utf8(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// The answer if its status is 2xx, else [`HttpError::Status`] with the
    /// start of the body.
    pub fn success(self) -> Result<Response, HttpError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(HttpError::Status { status: self.status, excerpt: excerpt(&self.text(), EXCERPT) })
        }
    }
}

/// How much of a body an error quotes.
pub(crate) const EXCERPT: usize = 300;

/// The start of `s` (trimmed), at most `max` characters, `...` when cut.
pub(crate) fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// An error and its sources, `: `-joined (hyper's top-level message alone
/// says little, e.g. "client error (Connect)").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A client for one base URL (`http://host[:port][/prefix]`).
#[derive(Clone, Debug)]
pub(crate) struct HttpClient {
    base: String,
    uri: hyper::Uri,
    timeout: Duration,
    max_body: usize,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClient {
    /// Checks `base` (http, a host, no user info). Paths are appended to it
    /// as is (callers that append paths trim a trailing `/`).
    /// `timeout` bounds the connect and each whole exchange; bodies beyond
    /// `max_body` bytes are refused.
    pub fn new(base: &str, timeout: Duration, max_body: usize) -> Result<HttpClient, HttpError> {
        let uri = parse(base)?;
        if uri.scheme_str() != Some("http") {
            return Err(HttpError::NotHttp);
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(HttpError::BadUrl("must not carry user information".to_owned()));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(HttpError::BadUrl("no host".to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
        Ok(HttpClient { base: base.to_owned(), uri, timeout, max_body, client })
    }

    /// The base URL, parsed (for a caller's own rules: no path, no query).
    pub fn base_uri(&self) -> &hyper::Uri {
        &self.uri
    }

    /// The full URL of `path` (appended to the base as is).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET base+path` with these headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Response, HttpError> {
        self.send(Method::GET, path, headers, None).await
    }

    /// One exchange: request, answer and whole body within the timeout.
    pub async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Result<Response, HttpError> {
        let url = self.url(path);
        let mut req = Request::builder().method(method).uri(parse(&url)?);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| HttpError::BadUrl(e.to_string()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| HttpError::Transport(error_chain(&e)))?;
            let status = resp.status();
            let content_type = resp.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let body = http_body_util::Limited::new(resp.into_body(), self.max_body).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge { limit: self.max_body }
                } else {
                    HttpError::Body(error_chain(e.as_ref()))
                }
            })?;
            Ok(Response { status, content_type, body: body.to_bytes() })
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| HttpError::Timeout(self.timeout))?
    }
}

fn parse(url: &str) -> Result<hyper::Uri, HttpError> {
    url.parse().map_err(|e: hyper::http::uri::InvalidUri| HttpError::BadUrl(format!("not a URL: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A raw HTTP/1.1 listener on 127.0.0.1: each connection's request head
    /// is recorded and answered with `answer` (bytes as sent, so a test can
    /// send anything, or nothing).
    pub(crate) async fn listener(answer: Vec<u8>, delay: Duration) -> (String, Arc<Mutex<Vec<String>>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = l.accept().await else { return };
                let (answer, s) = (answer.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    s.lock().expect("lock").push(String::from_utf8_lossy(&head).into_owned());
                    tokio::time::sleep(delay).await;
                    let _ = c.write_all(&answer).await;
                    let _ = c.shutdown().await;
                });
            }
        });
        (format!("http://{addr}"), seen)
    }

    fn answer(status: &str, body: &str) -> Vec<u8> {
        format!("HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
            .into_bytes()
    }

    #[tokio::test]
    async fn answers_status_body_and_sends_the_headers() {
        let (url, seen) = listener(answer("200 OK", "hello"), Duration::ZERO).await;
        let c = HttpClient::new(&url, Duration::from_secs(5), 1024).expect("client");
        assert_eq!(c.url(""), url);
        let r = c.get("/v1/x?y=1", &[("X-Test", "t1")]).await.expect("answer");
        assert_eq!((r.status, r.content_type.as_str(), r.text().as_ref()), (StatusCode::OK, "text/plain", "hello"));
        let head = seen.lock().expect("lock")[0].clone();
        assert!(head.starts_with("GET /v1/x?y=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("x-test: t1"), "{head}");
        let r = c.send(Method::POST, "/p", &[], Some(b"{}".to_vec())).await.expect("post");
        assert!(r.success().is_ok());
        assert!(seen.lock().expect("lock")[1].starts_with("POST /p HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_failing_status_quotes_the_body() {
        let long = "x".repeat(1000);
        let (url, _) = listener(answer("503 Service Unavailable", &format!("  down: {long}")), Duration::ZERO).await;
        let c = HttpClient::new(&url, Duration::from_secs(5), 4096).expect("client");
        let r = c.get("/", &[]).await.expect("an answer");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = r.success().expect_err("not 2xx");
        let text = e.to_string();
        assert!(text.starts_with("HTTP 503 Service Unavailable: down: xxx"), "{text}");
        assert!(text.ends_with("...") && text.len() < 400, "an excerpt, not the whole body: {}", text.len());
    }

    #[tokio::test]
    async fn a_slow_answer_times_out() {
        let (url, _) = listener(answer("200 OK", "late"), Duration::from_secs(3)).await;
        let c = HttpClient::new(&url, Duration::from_millis(300), 1024).expect("client");
        let t = std::time::Instant::now();
        let e = c.get("/", &[]).await.expect_err("timeout");
        assert!(matches!(e, HttpError::Timeout(d) if d == Duration::from_millis(300)), "{e}");
        assert_eq!(e.to_string(), "no answer within 300ms");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let (url, _) = listener(answer("200 OK", &"y".repeat(2048)), Duration::ZERO).await;
        let c = HttpClient::new(&url, Duration::from_secs(5), 1024).expect("client");
        let e = c.get("/", &[]).await.expect_err("too large");
        assert!(matches!(e, HttpError::TooLarge { limit: 1024 }), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_cause() {
        // A port nobody listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let c = HttpClient::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5), 1024).expect("client");
        let e = c.get("/", &[]).await.expect_err("refused");
        assert!(matches!(e, HttpError::Transport(_)), "{e}");
        assert!(e.to_string().contains("Connection refused"), "the cause, not only `client error`: {e}");
    }

    #[tokio::test]
    async fn a_garbled_answer_is_an_error() {
        let (url, _) = listener(b"SPEAK FRIEND\r\n\r\n".to_vec(), Duration::ZERO).await;
        let c = HttpClient::new(&url, Duration::from_secs(5), 1024).expect("client");
        assert!(matches!(c.get("/", &[]).await, Err(HttpError::Transport(_))));
    }

    #[test]
    fn bad_urls_are_named() {
        for (url, why) in [
            ("https://127.0.0.1", "http://"),
            ("127.0.0.1:80", "http://"),
            ("http://", "not a URL"),
            ("http://user:pw@127.0.0.1", "user information"),
            ("ht tp://x", "not a URL"),
        ] {
            let e = HttpClient::new(url, Duration::from_secs(1), 1).expect_err(url);
            assert!(e.to_string().contains(why), "{url}: {e}");
        }
        assert_eq!(excerpt("  abcdef ", 3), "abc...");
        assert_eq!(excerpt("ab", 3), "ab");
    }
}
