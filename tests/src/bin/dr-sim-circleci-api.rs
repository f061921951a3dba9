//! dr-sim-circleci-api: a simulator of a CircleCI Server 2.x installation's
//! API v1.1 (the parts build cleanup uses), on a loopback port, for tests.
//! Prints `listening on <addr>` once bound.
//!
//! - `GET /api/v1.1/recent-builds?limit&offset&shallow` (limit default 30,
//!   capped at 100), newest first as the builds file lists them;
//! - `GET /api/v1.1/project/github/<org>/<repo>?filter=running|completed|successful|failed&limit&offset`.
//!
//! The builds file (a JSON array of build objects, served as they are) is
//! re-read on every request, so a test can change it. Auth: HTTP basic with
//! the token as user name (`-u TOKEN:`) or `?circle-token=TOKEN`; otherwise
//! 401. Without `Accept: application/json` the answer is EDN
//! (`application/edn`), like the real one. `--fail-every N` answers every
//! Nth request with 500; `--page-delay-ms` delays every answer. Each request
//! is logged on stderr (method, path and query, Accept).
//! - `GET /health-check`: the frontend's health check, 200 `OK`, or 503
//!   while the file named by `--unhealthy-file` exists.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;

#[derive(Parser)]
#[command(name = "dr-sim-circleci-api")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// JSON array of builds (re-read on each request).
    #[arg(long)]
    builds: PathBuf,
    /// The admin API token accepted.
    #[arg(long)]
    token: String,
    /// Delay of every answer.
    #[arg(long, default_value_t = 0)]
    page_delay_ms: u64,
    /// Answer every Nth request with HTTP 500 (0: never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// `/health-check` answers 503 while this file exists.
    #[arg(long)]
    unhealthy_file: Option<PathBuf>,
}

struct Sim {
    builds: PathBuf,
    token: String,
    page_delay: Duration,
    fail_every: u64,
    requests: AtomicU64,
}

fn b64decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn authorized(sim: &Sim, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    if query.get("circle-token").is_some_and(|t| *t == sim.token) {
        return true;
    }
    let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(encoded) = auth.strip_prefix("Basic ") else {
        return false;
    };
    let Some(decoded) = b64decode(encoded).and_then(|d| String::from_utf8(d).ok()) else {
        return false;
    };
    let user = decoded.split_once(':').map(|(u, _)| u).unwrap_or(&decoded);
    user == sim.token
}

/// JSON to EDN-ish text (keywords for keys), as the API answers without
/// `Accept: application/json`.
fn edn(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Null => out.push_str("nil"),
        serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        serde_json::Value::Number(n) => out.push_str(&n.to_string()),
        serde_json::Value::String(s) => out.push_str(&serde_json::to_string(s).expect("strings serialize")),
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                edn(x, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push(':');
                out.push_str(k);
                out.push(' ');
                edn(x, out);
            }
            out.push('}');
        }
    }
}

fn num(query: &HashMap<String, String>, key: &str, default: usize) -> Result<usize, Box<Response>> {
    match query.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            Box::new((StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"message": format!("invalid {key}")}))).into_response())
        }),
    }
}

async fn answer(
    sim: &Sim,
    uri: &Uri,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    select: impl Fn(&serde_json::Value) -> bool,
) -> Response {
    let n = sim.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    eprintln!("dr-sim-circleci-api: GET {uri} accept={accept:?}");
    if !sim.page_delay.is_zero() {
        tokio::time::sleep(sim.page_delay).await;
    }
    if !authorized(sim, headers, query) {
        return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"message": "You must log in first."}))).into_response();
    }
    if sim.fail_every > 0 && n.is_multiple_of(sim.fail_every) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error (injected)\n").into_response();
    }
    let (limit, offset) = match (num(query, "limit", 30), num(query, "offset", 0)) {
        (Ok(l), Ok(o)) => (l.min(100), o),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    let builds: Vec<serde_json::Value> = match std::fs::read_to_string(&sim.builds)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("dr-sim-circleci-api: {}: {e}", sim.builds.display());
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot read builds\n").into_response();
        }
    };
    let page: Vec<serde_json::Value> = builds.into_iter().filter(|b| select(b)).skip(offset).take(limit).collect();
    let page = serde_json::Value::Array(page);
    if accept.contains("application/json") {
        axum::Json(page).into_response()
    } else {
        let mut body = String::new();
        edn(&page, &mut body);
        ([(header::CONTENT_TYPE, "application/edn;charset=utf-8")], body).into_response()
    }
}

async fn recent_builds(
    State(sim): State<Arc<Sim>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    answer(&sim, &uri, &headers, &query, |_| true).await
}

async fn project_builds(
    State(sim): State<Arc<Sim>>,
    Path((org, repo)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let filter = query.get("filter").cloned();
    answer(&sim, &uri, &headers, &query, move |b| {
        let s = |k: &str| b.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let lifecycle = s("lifecycle");
        let outcome = s("outcome");
        s("username") == org
            && s("reponame") == repo
            && match filter.as_deref() {
                Some("running") => lifecycle == "running",
                Some("completed") => lifecycle == "finished",
                Some("successful") => outcome == "success",
                Some("failed") => matches!(outcome, "failed" | "timedout" | "infrastructure_fail"),
                _ => true,
            }
    })
    .await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let sim = Arc::new(Sim {
        builds: args.builds,
        token: args.token,
        page_delay: Duration::from_millis(args.page_delay_ms),
        fail_every: args.fail_every,
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/api/v1.1/recent-builds", get(recent_builds))
        .route("/api/v1.1/project/github/{org}/{repo}", get(project_builds))
        .route(
            "/health-check",
            get(move || {
                let unhealthy = args.unhealthy_file.as_ref().is_some_and(|f| f.exists());
                async move { if unhealthy { (StatusCode::SERVICE_UNAVAILABLE, "unhealthy") } else { (StatusCode::OK, "OK") } }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"message": "Not found"}))) })
        .with_state(sim);
    dr_tests::serve_simulator("dr-sim-circleci-api", args.listen, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_basic_auth() {
        assert_eq!(b64decode("dG9rZW46").as_deref(), Some(&b"token:"[..]));
        assert_eq!(b64decode("Zm9vYmE=").as_deref(), Some(&b"fooba"[..]));
    }

    #[test]
    fn edn_shape() {
        let mut s = String::new();
        edn(&serde_json::json!([{"a": null, "b": "x"}]), &mut s);
        assert_eq!(s, r#"[{:a nil, :b "x"}]"#);
    }
}
