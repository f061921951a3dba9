//! The controller's plain HTTP(S) client, for what is not an AWS API: the
//! app probe of each site (`health_url`) and webhook deliveries. rustls
//! with the process's aws-lc provider; roots from a CA file when one is
//! configured, else the system's. One client per CA file, reused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot read the CA file {path}: {message}")]
    Ca { path: String, message: String },
    #[error("`{0}` is not a valid URL")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

/// A status and at most 4 KiB of the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// HTTP clients by CA file ("" = the system's roots).
/// One client per CA bundle path.
type ByCa = Arc<Mutex<HashMap<PathBuf, Client<Https, Full<Bytes>>>>>;

#[derive(Clone, Default)]
pub struct HttpClients {
    clients: ByCa,
}

impl HttpClients {
    fn client(&self, ca: Option<&Path>) -> Result<Client<Https, Full<Bytes>>, HttpError> {
        let key = ca.map(Path::to_owned).unwrap_or_default();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                let certs = dr_proto::tls::load_certs(path)
                    .map_err(|e| HttpError::Ca { path: path.display().to_string(), message: e.to_string() })?;
                for c in certs {
                    roots.add(c).map_err(|e| HttpError::Ca { path: path.display().to_string(), message: e.to_string() })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
            }
        }
        let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// GET `url` within `timeout`.
    pub async fn get(&self, url: &str, ca: Option<&Path>, timeout: Duration) -> Result<Answer, HttpError> {
        let req = hyper::Request::get(url)
            .header("user-agent", concat!("dr-controller/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::new()))
            .map_err(|_| HttpError::Url(url.to_owned()))?;
        self.send(req, ca, timeout).await
    }

    /// POST a JSON `body` with extra headers within `timeout`.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        ca: Option<&Path>,
        timeout: Duration,
    ) -> Result<Answer, HttpError> {
        let mut b = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("dr-controller/", env!("CARGO_PKG_VERSION")));
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let req = b.body(Full::new(Bytes::from(body))).map_err(|_| HttpError::Url(url.to_owned()))?;
        self.send(req, ca, timeout).await
    }

    async fn send(&self, req: hyper::Request<Full<Bytes>>, ca: Option<&Path>, timeout: Duration) -> Result<Answer, HttpError> {
        let client = self.client(ca)?;
        let call = async {
            let resp = client.request(req).await.map_err(|e| HttpError::Transport(error_chain(&e)))?;
            let status = resp.status().as_u16();
            // At most 64 KiB is read: a probe target or webhook answering
            // a huge body costs nothing more.
            let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| HttpError::Timeout(timeout))?
    }
}

/// An error with its sources, on one line ("connection refused" is usually
/// two levels down in hyper's errors).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// A URL as logs and metrics may show it: scheme, host and port only (a
/// webhook's path and query often carry its secret, as Slack's do).
pub fn redacted(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) => {
            let host = u.authority().map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_owned()).unwrap_or_default();
            let rest = if u.path().len() > 1 || u.query().is_some() { "/…" } else { "" };
            format!("{}://{host}{rest}", u.scheme_str().unwrap_or("?"))
        }
        Err(_) => "(invalid URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(super::redacted("https://hooks.slack.com/services/T000/B000/XXXX"), "https://hooks.slack.com/…");
        assert_eq!(super::redacted("https://user:pw@example.com:8443/x?token=1"), "https://example.com:8443/…");
        assert_eq!(super::redacted("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
    }
}
