//! The installation's API v1.1 (plain HTTP for now, hyper 1): listing recent
//! builds, paged, with the token as HTTP basic user name.

use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// Builds per page (the API's maximum).
pub const PAGE_SIZE: usize = 100;
/// Largest answer body accepted (100 shallow builds are far smaller).
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("circleci.api_url `{url}`: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot read the API token from {path}: {source}")]
    TokenRead { path: PathBuf, source: std::io::Error },
    #[error("the API token file {path} is empty (the token is its first line)")]
    TokenEmpty { path: PathBuf },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: {source}")]
    Http { url: String, source: hyper_util::client::legacy::Error },
    #[error("GET {url}: reading the body: {why}")]
    Body { url: String, why: String },
    #[error("GET {url}: HTTP {status}{hint}: {excerpt}")]
    Status { url: String, status: StatusCode, hint: &'static str, excerpt: String },
    #[error("GET {url}: the answer is not a JSON array of builds (content-type {content_type:?}): {why}")]
    NotJson { url: String, content_type: String, why: String },
}

/// One build as listed by the API; every field may be missing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub build_url: Option<String>,
    pub build_num: Option<u64>,
    pub username: Option<String>,
    pub reponame: Option<String>,
    pub lifecycle: Option<String>,
    pub status: Option<String>,
    pub start_time: Option<String>,
    pub queued_at: Option<String>,
}

impl Build {
    /// Reads the fields we use from one element of the answer, tolerating
    /// missing fields, nulls, and numbers written as strings.
    pub fn from_json(v: &serde_json::Value) -> Build {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let build_num = v.get("build_num").and_then(|x| match x {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        });
        Build {
            build_url: s("build_url"),
            build_num,
            username: s("username"),
            reponame: s("reponame"),
            lifecycle: s("lifecycle"),
            status: s("status"),
            start_time: s("start_time"),
            queued_at: s("queued_at"),
        }
    }
}

/// Reads the token: the first line of the file, trimmed.
pub fn read_token(path: &Path) -> Result<String, ApiError> {
    let text = std::fs::read_to_string(path).map_err(|source| ApiError::TokenRead { path: path.to_owned(), source })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(ApiError::TokenEmpty { path: path.to_owned() });
    }
    Ok(token)
}


/// A client for one installation's API.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    authorization: String,
    timeout: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// What listing returned: the builds, and warnings (e.g. the page bound).
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub builds: Vec<Build>,
    pub pages: usize,
    pub warnings: Vec<String>,
}

impl ApiClient {
    /// `api_url` is `http://host[:port][/prefix]`; https is not supported yet.
    pub fn new(api_url: &str, token: &str, timeout: Duration) -> Result<ApiClient, ApiError> {
        let base = api_url.trim_end_matches('/').to_owned();
        let bad = |why: String| ApiError::BadUrl { url: api_url.to_owned(), why };
        let uri: hyper::Uri = base.parse().map_err(|e| bad(format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad(
                "https is not supported yet: use the installation's http:// endpoint (e.g. from the machine itself)"
                    .to_owned(),
            )),
            _ => return Err(bad("must be an http:// URL".to_owned())),
        }
        if uri.query().is_some() {
            return Err(bad("must not carry a query".to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let authorization = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{token}:")));
        Ok(ApiClient { base, authorization, timeout, client })
    }

    /// `GET /api/v1.1/recent-builds?limit=100&offset=N&shallow=true` until a
    /// short page, at most `max_pages` pages. Duplicates (a build that moved
    /// to the next page while paging) are dropped.
    pub async fn recent_builds(&self, max_pages: usize) -> Result<Listing, ApiError> {
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut listing = Listing::default();
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0usize;
        loop {
            if listing.pages == max_pages {
                listing.warnings.push(format!(
                    "stopped listing after {max_pages} pages ({} builds): older builds were not examined",
                    listing.builds.len()
                ));
                break;
            }
            let url = format!("{}/api/v1.1/recent-builds?limit={PAGE_SIZE}&offset={offset}&shallow=true", self.base);
            let page = self.get_array(&url).await?;
            listing.pages += 1;
            let n = page.len();
            for v in &page {
                let b = Build::from_json(v);
                let key = (b.build_url.clone(), b.username.clone(), b.reponame.clone(), b.build_num);
                if seen.insert(key) {
                    listing.builds.push(b);
                }
            }
            if last_log.elapsed() >= Duration::from_secs(3) {
                tracing::info!(step = "cleanup-builds", pages = listing.pages, builds = listing.builds.len(), elapsed = ?started.elapsed(), "listing builds");
                last_log = Instant::now();
            }
            if n < PAGE_SIZE {
                break;
            }
            offset += n;
        }
        tracing::info!(step = "cleanup-builds", pages = listing.pages, builds = listing.builds.len(), elapsed = ?started.elapsed(), "listed builds");
        Ok(listing)
    }

    async fn get_array(&self, url: &str) -> Result<Vec<serde_json::Value>, ApiError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .body(Empty::new())
            .map_err(|e| ApiError::BadUrl { url: url.to_owned(), why: e.to_string() })?;
        let fut = async {
            let resp =
                self.client.request(req).await.map_err(|source| ApiError::Http { url: url.to_owned(), source })?;
            let status = resp.status();
            let content_type =
                resp.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ApiError::Body { url: url.to_owned(), why: e.to_string() })?
                .to_bytes();
            Ok((status, content_type, body))
        };
        let (status, content_type, body) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ApiError::Timeout { url: url.to_owned(), timeout: self.timeout })??;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            let hint = match status {
                StatusCode::UNAUTHORIZED => " (the token in circleci.api_token_file was refused)",
                StatusCode::FORBIDDEN => " (the token lacks admin rights)",
                _ => "",
            };
            return Err(ApiError::Status { url: url.to_owned(), status, hint, excerpt: excerpt(&text, 300) });
        }
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Array(items)) => Ok(items),
            Ok(_) => Err(ApiError::NotJson { url: url.to_owned(), content_type, why: "not an array".to_owned() }),
            Err(e) => Err(ApiError::NotJson { url: url.to_owned(), content_type, why: e.to_string() }),
        }
    }
}

pub(crate) fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_parse_tolerantly() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"build_url":"https://h/gh/o/r/7","build_num":"7","username":"o","reponame":"r","lifecycle":"running","start_time":null,"extra":{"x":1}}"#,
        )
        .expect("json");
        let b = Build::from_json(&v);
        assert_eq!(b.build_num, Some(7));
        assert_eq!(b.start_time, None);
        assert_eq!(b.lifecycle.as_deref(), Some("running"));
        assert_eq!(Build::from_json(&serde_json::json!(3)), Build::default());
    }

    #[test]
    fn token_file_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t");
        std::fs::write(&p, " abc \nsecond\n").expect("write");
        assert_eq!(read_token(&p).expect("token"), "abc");
        std::fs::write(&p, "\n").expect("write");
        assert!(read_token(&p).expect_err("empty").to_string().contains(&p.display().to_string()));
    }

    #[test]
    fn https_is_refused_for_now() {
        let e = ApiClient::new("https://ci.example.com", "t", Duration::from_secs(1)).expect_err("https");
        assert!(e.to_string().contains("https"), "{e}");
    }
}
