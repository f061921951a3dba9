//! A minimal IMDSv2 client (plain HTTP, hyper 1), every call bounded by a timeout.

use std::time::Duration;

use hyper::{Method, StatusCode};

use crate::sys::http::{HttpClient, HttpError};

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
    Http { what: String, source: HttpError },
    #[error("IMDS {what}: HTTP status {status}")]
    Status { what: String, status: StatusCode },
    #[error("IMDS {what}: answer is too large or not UTF-8")]
    BadBody { what: String },
}

/// IMDSv2 client for one endpoint.
#[derive(Clone, Debug)]
pub struct ImdsClient {
    http: HttpClient,
}

impl ImdsClient {
    /// `endpoint` is `http://host[:port]` (no path).
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, ImdsError> {
        let bad = |why: String| ImdsError::Endpoint { endpoint: endpoint.to_owned(), why };
        let http = HttpClient::new(endpoint.trim_end_matches('/'), timeout, MAX_BODY).map_err(|e| match e {
            HttpError::NotHttp => bad("IMDS is plain HTTP: use an http:// URL".to_owned()),
            e => bad(e.to_string()),
        })?;
        let path = http.base_uri().path();
        if path != "/" && !path.is_empty() {
            return Err(bad("the endpoint must not carry a path".to_owned()));
        }
        Ok(ImdsClient { http })
    }

    /// Gets a session token (`PUT /latest/api/token`).
    pub async fn token(&self) -> Result<String, ImdsError> {
        let headers = [("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)];
        match self.call("token", Method::PUT, "/latest/api/token", &headers).await? {
            (StatusCode::OK, body) if !body.trim().is_empty() => Ok(body.trim().to_owned()),
            (status, _) => Err(ImdsError::Status { what: "token".to_owned(), status }),
        }
    }

    /// Gets `/latest/meta-data/<item>`; `Ok(None)` on 404.
    pub async fn meta_data(&self, token: &str, item: &str) -> Result<Option<String>, ImdsError> {
        let what = format!("meta-data/{item}");
        let path = format!("/latest/meta-data/{item}");
        match self.call(&what, Method::GET, &path, &[("X-aws-ec2-metadata-token", token)]).await? {
            (StatusCode::OK, body) => Ok(Some(body.trim().to_owned())),
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (status, _) => Err(ImdsError::Status { what, status }),
        }
    }

    /// The signed instance identity document and its base64 signature
    /// (`dynamic/instance-identity/document` and `.../signature`); `Ok(None)`
    /// when IMDS has none (404).
    pub async fn identity_document(&self, token: &str) -> Result<Option<(String, String)>, ImdsError> {
        let mut got = Vec::new();
        for item in ["document", "signature"] {
            let what = format!("dynamic/instance-identity/{item}");
            let path = format!("/latest/{what}");
            match self.call(&what, Method::GET, &path, &[("X-aws-ec2-metadata-token", token)]).await? {
                (StatusCode::OK, body) => got.push(body),
                (StatusCode::NOT_FOUND, _) => return Ok(None),
                (status, _) => return Err(ImdsError::Status { what, status }),
            }
        }
        let signature = got.pop().unwrap_or_default();
        Ok(got.pop().map(|document| (document, signature)))
    }

    async fn call(&self, what: &str, method: Method, path: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, String), ImdsError> {
        let r = self.http.send(method, path, headers, None).await.map_err(|e| match e {
            HttpError::Timeout(timeout) => ImdsError::Timeout { what: what.to_owned(), timeout },
            HttpError::TooLarge { .. } => ImdsError::BadBody { what: what.to_owned() },
            source => ImdsError::Http { what: what.to_owned(), source },
        })?;
        let body = r.utf8().ok_or_else(|| ImdsError::BadBody { what: what.to_owned() })?.to_owned();
        Ok((r.status, body))
    }
}
