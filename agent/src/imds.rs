//! A minimal IMDSv2 client (plain HTTP, hyper 1), every call bounded by a timeout.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Token lifetime asked for, in seconds (the IMDS maximum).
pub const TOKEN_TTL_SECONDS: &str = "21600";
/// Largest answer body accepted.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("invalid IMDS endpoint `{endpoint}`: {why}")]
    Endpoint { endpoint: String, why: String },
    #[error("IMDS {what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("IMDS {what}: {source}")]
    Http { what: String, source: hyper_util::client::legacy::Error },
    #[error("IMDS {what}: reading the body: {source}")]
    Body { what: String, source: hyper::Error },
    #[error("IMDS {what}: HTTP status {status}")]
    Status { what: String, status: StatusCode },
    #[error("IMDS {what}: answer is too large or not UTF-8")]
    BadBody { what: String },
}

/// IMDSv2 client for one endpoint.
#[derive(Clone, Debug)]
pub struct ImdsClient {
    base: String,
    timeout: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl ImdsClient {
    /// `endpoint` is `http://host[:port]` (no path).
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, ImdsError> {
        let base = endpoint.trim_end_matches('/').to_owned();
        let bad = |why: String| ImdsError::Endpoint { endpoint: endpoint.to_owned(), why };
        let uri: hyper::Uri = base.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("IMDS is plain HTTP: use an http:// URL".to_owned()));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("the endpoint must not carry a path".to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
        Ok(ImdsClient { base, timeout, client })
    }

    /// Gets a session token (`PUT /latest/api/token`).
    pub async fn token(&self) -> Result<String, ImdsError> {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
            .body(Empty::new())
            .expect("static request parts are valid");
        match self.call("token", req).await? {
            (StatusCode::OK, body) if !body.trim().is_empty() => Ok(body.trim().to_owned()),
            (status, _) => Err(ImdsError::Status { what: "token".to_owned(), status }),
        }
    }

    /// Gets `/latest/meta-data/<item>`; `Ok(None)` on 404.
    pub async fn meta_data(&self, token: &str, item: &str) -> Result<Option<String>, ImdsError> {
        let what = format!("meta-data/{item}");
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}/latest/meta-data/{item}", self.base))
            .header("X-aws-ec2-metadata-token", token)
            .body(Empty::new())
            .map_err(|_| ImdsError::BadBody { what: what.clone() })?;
        match self.call(&what, req).await? {
            (StatusCode::OK, body) => Ok(Some(body.trim().to_owned())),
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (status, _) => Err(ImdsError::Status { what, status }),
        }
    }

    async fn call(&self, what: &str, req: Request<Empty<Bytes>>) -> Result<(StatusCode, String), ImdsError> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|source| ImdsError::Http { what: what.to_owned(), source })?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|_| ImdsError::BadBody { what: what.to_owned() })?
                .to_bytes();
            let body = String::from_utf8(body.to_vec()).map_err(|_| ImdsError::BadBody { what: what.to_owned() })?;
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ImdsError::Timeout { what: what.to_owned(), timeout: self.timeout })?
    }
}
