//! The installation's API v1.1 (plain HTTP for now, hyper 1): listing recent
//! builds, paged, with the token as HTTP basic user name.

use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

pub(crate) use crate::sys::http::excerpt;
use crate::sys::http::{EXCERPT, HttpClient, HttpError};

/// Builds per page (the API's maximum).
pub(crate) const PAGE_SIZE: usize = 100;
/// Largest answer body accepted (100 shallow builds are far smaller).
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("circleci.api_url `{url}`: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot read the API token from {path}: {source}")]
    TokenRead { path: PathBuf, source: std::io::Error },
    #[error("the API token file {path} is empty (the token is its first line)")]
    TokenEmpty { path: PathBuf },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: {source}")]
    Http { url: String, source: HttpError },
    #[error("GET {url}: reading the body: {why}")]
    Body { url: String, why: String },
    #[error("GET {url}: HTTP {status}{hint}: {excerpt}")]
    Status { url: String, status: StatusCode, hint: &'static str, excerpt: String },
    #[error("GET {url}: the answer is not a JSON array of builds (content-type {content_type:?}): {why}")]
    NotJson { url: String, content_type: String, why: String },
}

/// One build as listed by the API; every field may be missing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Build {
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

/// Reads the token: the first line of the file, trimmed. The second value is
/// a warning when the file is readable by group or others (it still works:
/// the installation may have been set up that way, but the token is an
/// admin credential).
pub(crate) fn read_token(path: &Path) -> Result<(String, Option<String>), ApiError> {
    use std::os::unix::fs::PermissionsExt as _;
    let text = std::fs::read_to_string(path).map_err(|source| ApiError::TokenRead { path: path.to_owned(), source })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(ApiError::TokenEmpty { path: path.to_owned() });
    }
    let mode =
        std::fs::metadata(path).map_err(|source| ApiError::TokenRead { path: path.to_owned(), source })?.permissions().mode() & 0o7777;
    let warning = (mode & 0o044 != 0).then(|| {
        let w = format!(
            "the API token file {} is readable by {} (mode {mode:04o}): `chmod 600` it",
            path.display(),
            match (mode & 0o040 != 0, mode & 0o004 != 0) {
                (true, true) => "group and others",
                (true, false) => "its group",
                _ => "others",
            }
        );
        tracing::warn!(step = "cleanup-builds", file = %path.display(), mode = format!("{mode:04o}"), "{w}");
        w
    });
    Ok((token, warning))
}

/// Reads one page of `recent-builds`: a JSON array of build objects. Anything
/// else (not UTF-8, not JSON, not an array, an element that is not an
/// object) is an error naming what was wrong; fields inside a build are read
/// tolerantly ([`Build::from_json`]).
pub(crate) fn parse_page(url: &str, content_type: &str, body: &[u8]) -> Result<Vec<Build>, ApiError> {
    let bad = |why: String| ApiError::NotJson { url: url.to_owned(), content_type: content_type.to_owned(), why };
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                serde_json::Value::Object(_) => Ok(Build::from_json(v)),
                other => Err(bad(format!("element {i} is not a build object: {}", excerpt(&other.to_string(), 100)))),
            })
            .collect(),
        Ok(other) => Err(bad(format!("not an array: {}", excerpt(&other.to_string(), 100)))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// A client for one installation's API.
#[derive(Clone, Debug)]
pub(crate) struct ApiClient {
    http: HttpClient,
    authorization: String,
}

/// What listing returned: the builds, and warnings (e.g. the page bound).
#[derive(Clone, Debug, Default)]
pub(crate) struct Listing {
    pub builds: Vec<Build>,
    pub pages: usize,
    pub warnings: Vec<String>,
}

impl ApiClient {
    /// `api_url` is `http://host[:port][/prefix]`; https is not supported yet.
    pub fn new(api_url: &str, token: &str, timeout: Duration) -> Result<ApiClient, ApiError> {
        let bad = |why: String| ApiError::BadUrl { url: api_url.to_owned(), why };
        if api_url.starts_with("https://") {
            return Err(bad(
                "https is not supported yet: use the installation's http:// endpoint (e.g. from the machine itself)".to_owned()
            ));
        }
        let http = HttpClient::new(api_url.trim_end_matches('/'), timeout, MAX_BODY).map_err(|e| bad(e.to_string()))?;
        if http.base_uri().query().is_some() {
            return Err(bad("must not carry a query".to_owned()));
        }
        let authorization = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{token}:")));
        Ok(ApiClient { http, authorization })
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
            let page = self.get_page(&format!("/api/v1.1/recent-builds?limit={PAGE_SIZE}&offset={offset}&shallow=true")).await?;
            listing.pages += 1;
            let n = page.len();
            for b in page {
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

    async fn get_page(&self, path: &str) -> Result<Vec<Build>, ApiError> {
        let url = self.http.url(path);
        let headers = [("Authorization", self.authorization.as_str()), ("Accept", "application/json")];
        let resp = self.http.get(path, &headers).await.map_err(|e| match e {
            HttpError::Timeout(timeout) => ApiError::Timeout { url: url.clone(), timeout },
            e @ (HttpError::Body(_) | HttpError::TooLarge { .. }) => ApiError::Body { url: url.clone(), why: e.to_string() },
            source => ApiError::Http { url: url.clone(), source },
        })?;
        if !resp.status.is_success() {
            let hint = match resp.status {
                StatusCode::UNAUTHORIZED => " (the token in circleci.api_token_file was refused)",
                StatusCode::FORBIDDEN => " (the token lacks admin rights)",
                _ => "",
            };
            return Err(ApiError::Status { url, status: resp.status, hint, excerpt: excerpt(&resp.text(), EXCERPT) });
        }
        parse_page(&url, &resp.content_type, &resp.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        assert_eq!(read_token(&p).expect("token"), ("abc".to_owned(), None));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
        let (_, w) = read_token(&p).expect("token");
        let w = w.expect("a world-readable token file is warned about");
        assert!(w.contains(&p.display().to_string()) && w.contains("0644") && w.contains("group and others"), "{w}");
        std::fs::write(&p, "\n").expect("write");
        assert!(read_token(&p).expect_err("empty").to_string().contains(&p.display().to_string()));
    }

    #[test]
    fn https_is_refused_for_now() {
        let e = ApiClient::new("https://ci.example.com", "t", Duration::from_secs(1)).expect_err("https");
        assert!(e.to_string().contains("https"), "{e}");
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            prop::sample::select(vec!["running", "finished", "https://ci.example.com/gh/o/r/1", "2024-05-01T12:00:00Z"])
                .prop_map(Value::from),
        ];
        let key = prop_oneof![
            3 => prop::sample::select(vec!["build_url", "build_num", "username", "reponame", "lifecycle", "status", "start_time", "queued_at"])
                .prop_map(str::to_owned),
            1 => any::<String>(),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn the_pages_parser_takes_only_arrays_of_objects_and_never_panics() {
        use serde_json::Value;
        crate::steps::builds::prop::check("API v1.1 pages parser (JSON)", 2000, json(), |v| {
            let body = serde_json::to_vec(&v).expect("serialize");
            let parsed = parse_page("http://h/p", "application/json", &body);
            let expected_ok = matches!(&v, Value::Array(items) if items.iter().all(Value::is_object));
            prop_assert_eq!(parsed.is_ok(), expected_ok, "{}: {:?}", v, parsed);
            if let (Ok(builds), Value::Array(items)) = (&parsed, &v) {
                prop_assert_eq!(builds.len(), items.len());
                for (b, item) in builds.iter().zip(items) {
                    prop_assert_eq!(b.build_url.as_deref(), item.get("build_url").and_then(Value::as_str));
                    prop_assert_eq!(b.lifecycle.as_deref(), item.get("lifecycle").and_then(Value::as_str));
                }
            }
            if let Err(e) = &parsed {
                prop_assert!(e.to_string().contains("http://h/p"), "the error names the page: {}", e);
            }
            Ok(())
        });
        let bytes = prop_oneof![
            any::<Vec<u8>>(),
            json()
                .prop_flat_map(|v| {
                    let b = serde_json::to_vec(&v).expect("serialize");
                    let n = b.len();
                    (Just(b), 0..=n, any::<u8>())
                })
                .prop_map(|(mut b, at, byte)| {
                    // Truncated or with one byte changed: mostly malformed.
                    if at < b.len() && byte % 2 == 0 {
                        b[at] = byte
                    } else {
                        b.truncate(at)
                    }
                    b
                }),
        ];
        crate::steps::builds::prop::check("API v1.1 pages parser (bytes)", 2000, bytes, |b| {
            let parsed = parse_page("http://h/p", "text/html", &b);
            let oracle =
                serde_json::from_slice::<Value>(&b).is_ok_and(|v| matches!(&v, Value::Array(items) if items.iter().all(Value::is_object)));
            prop_assert_eq!(parsed.is_ok(), oracle, "{:?}", String::from_utf8_lossy(&b));
            Ok(())
        });
    }

    #[test]
    fn malformed_pages_are_errors_naming_what_is_wrong() {
        for (body, why) in [
            (&b"[{\"build_num\":1}, 3]"[..], "element 1 is not a build object"),
            (b"{\"message\":\"x\"}", "not an array"),
            (b"[{:build_num 1}]", "key must be a string"),
            (b"[{\"build_url\":\"\xff\"}]", "invalid unicode"),
            (b"", "EOF"),
        ] {
            let e = parse_page("http://h/p", "application/edn", body).expect_err(why);
            assert!(e.to_string().contains(why) && e.to_string().contains("application/edn"), "{e}");
        }
    }
}
