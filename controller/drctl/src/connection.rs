//! Reaching the controller's admin API over mutual TLS, and telling apart
//! why that failed.
//!
//! A failed connection or a broken stream can mean four different things,
//! each with its own message and exit code ([`CliError`]):
//! - the controller cannot be reached (no TCP connection, closed or reset,
//!   gone in the middle of a watch): `Unreachable`, exit 3;
//! - the controller refused our certificate: it answered the handshake with
//!   a TLS alert (`Refused`, exit 4), explained from the alert and from our
//!   own certificate's dates (an alert `certificate_expired` covers both
//!   "expired" and "not yet valid");
//! - drctl refused the controller's certificate (another CA than `--ca`, a
//!   name other than `--server-name`, out of its validity): `Untrusted`,
//!   exit 7;
//! - our own files are unusable (a key that does not belong to the
//!   certificate, no PEM): `LocalTls`, exit 2, found before dialling.
//!
//! tonic reports all of these as "transport error" or a broken pipe (in
//! TLS 1.3 the server's verdict on our certificate arrives after the
//! client's side of the handshake). So after a transport failure drctl makes
//! one direct handshake with the same settings ([`Connection::probe`]) and
//! classifies its typed rustls outcome; no error text is pattern-matched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::pb::admin_service_client::AdminServiceClient;
use dr_proto::tls::TlsFiles;
use rustls::{AlertDescription, CertificateError};
use serde::Deserialize;
use tonic::codegen::http::Uri;
use tonic::transport::Channel;

use crate::error::CliError;
use crate::pki::stamp;

/// drctl's optional config file (`--config`, `DRCTL_CONFIG`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub controller: Option<String>,
    pub server_name: Option<String>,
    pub tls: Option<TlsFiles>,
}

/// Where and how to reach the controller.
#[derive(Clone, Debug)]
pub struct Connection {
    pub url: String,
    /// `host:port` to dial.
    pub authority: String,
    pub server_name: String,
    /// `server_name` was given (`--server-name`, the config file), not
    /// taken from the URL's host.
    pub pinned_name: bool,
    pub tls: TlsFiles,
}

/// What a direct TLS handshake with the controller showed.
#[derive(Debug)]
pub enum Probe {
    /// No TCP connection, or it closed before the handshake ended.
    Unreachable(String),
    /// We rejected the controller's certificate.
    Untrusted(CertificateError),
    /// The controller answered with a fatal TLS alert.
    Refused(AlertDescription),
    /// Another TLS failure (not a TLS server, no common protocol).
    Tls(rustls::Error),
    /// The handshake succeeded and the controller kept the connection.
    Accepted,
}

impl Connection {
    /// Flags win over the file; the TLS name defaults to the URL's host.
    pub fn resolve(
        file: Option<PathBuf>,
        url: Option<String>,
        server_name: Option<String>,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, CliError> {
        let from_file = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
                toml::from_str::<ClientFile>(&text).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?
            }
            None => ClientFile::default(),
        };
        let url = url
            .or(from_file.controller)
            .ok_or_else(|| CliError::Usage("no controller address: give --controller URL (or DRCTL_CONTROLLER, or --config)".into()))?;
        let ftls = from_file.tls;
        let pick = |flag: Option<PathBuf>, f: Option<PathBuf>, name: &str| {
            flag.or(f).ok_or_else(|| CliError::Usage(format!("no --{name} given (flag, DRCTL_{}, or --config)", name.to_uppercase())))
        };
        let tls = TlsFiles {
            ca: pick(ca, ftls.as_ref().map(|t| t.ca.clone()), "ca")?,
            cert: pick(cert, ftls.as_ref().map(|t| t.cert.clone()), "cert")?,
            key: pick(key, ftls.as_ref().map(|t| t.key.clone()), "key")?,
        };
        let not_url = || CliError::Usage(format!("--controller `{url}` is not a URL like https://host:port"));
        let uri: Uri = url.parse().map_err(|_| not_url())?;
        if uri.scheme_str() != Some("https") {
            return Err(CliError::Usage(format!("--controller `{url}` must start with https:// (the admin API is TLS only)")));
        }
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(not_url)?;
        let authority = format!("{host}:{}", uri.port_u16().unwrap_or(443));
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let given = server_name.or(from_file.server_name);
        Ok(Connection { pinned_name: given.is_some(), server_name: given.unwrap_or(host), authority, url, tls })
    }

    /// The same client towards the leader a standby named (`host:port`).
    pub fn redirect(&self, leader: &str) -> Result<Connection, CliError> {
        let url = format!("https://{leader}");
        let uri: Uri =
            url.parse().map_err(|_| CliError::Failed(format!("a standby named the leader `{leader}`, which is not host:port")))?;
        let host = uri.host().filter(|h| !h.is_empty()).map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned());
        let Some(host) = host else {
            return Err(CliError::Failed(format!("a standby named the leader `{leader}`, which has no host")));
        };
        let server_name = if self.pinned_name { self.server_name.clone() } else { host };
        Ok(Connection { url, authority: leader.to_owned(), server_name, pinned_name: self.pinned_name, tls: self.tls.clone() })
    }

    /// Our side of TLS, built the way the handshake will use it, so that a
    /// file problem is named before dialling (tonic would only say
    /// "transport error").
    pub fn client_tls(&self) -> Result<rustls::ClientConfig, CliError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in dr_proto::tls::load_certs(&self.tls.ca)? {
            roots.add(ca).map_err(|e| CliError::LocalTls(format!("--ca {}: not a usable CA certificate: {e}", self.tls.ca.display())))?;
        }
        let certs = dr_proto::tls::load_certs(&self.tls.cert)?;
        let key = dr_proto::tls::load_key(&self.tls.key)?;
        let (cert_path, key_path) = (self.tls.cert.display(), self.tls.key.display());
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CliError::LocalTls(format!("TLS 1.3 with aws-lc: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => CliError::LocalTls(format!(
                    "--key {key_path} is not the private key of --cert {cert_path}: give the .key file written with that certificate"
                )),
                other => CliError::LocalTls(format!("--cert {cert_path} / --key {key_path}: {other}")),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    pub async fn connect(&self) -> Result<AdminServiceClient<Channel>, CliError> {
        dr_proto::tls::install_crypto_provider();
        self.client_tls()?;
        let tls = dr_proto::tls::client_config(&self.tls, &self.server_name)?;
        let endpoint = Channel::from_shared(self.url.clone())
            .map_err(|e| CliError::Usage(format!("`{}` is not a valid controller URL: {e}", self.url)))?
            .tls_config(tls)
            .map_err(|e| CliError::LocalTls(format!("TLS configuration: {}", error_chain(&e))))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        let channel = endpoint.connect().await.map_err(|e| CliError::Unreachable { url: self.url.clone(), cause: error_chain(&e) })?;
        Ok(AdminServiceClient::new(channel))
    }

    /// One direct TLS 1.3 handshake with our certificate, then a short read
    /// for the controller's verdict on it.
    pub async fn probe(&self) -> Probe {
        use tokio::io::AsyncReadExt;
        let config = match self.client_tls() {
            Ok(c) => c,
            Err(e) => return Probe::Unreachable(e.to_string()),
        };
        let tcp = match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&self.authority)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Probe::Unreachable(format!("TCP connection to {}: {e}", self.authority)),
            Err(_) => return Probe::Unreachable(format!("TCP connection to {}: no answer within 5s", self.authority)),
        };
        let name = match rustls::pki_types::ServerName::try_from(self.server_name.clone()) {
            Ok(n) => n,
            Err(e) => return Probe::Unreachable(format!("server name `{}`: {e}", self.server_name)),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let handshake = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await;
        let mut tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return classify_io(e),
            Err(_) => return Probe::Unreachable("the TLS handshake got no answer within 5s".into()),
        };
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
            Ok(Err(e)) => classify_io(e),
            Ok(Ok(0)) => Probe::Unreachable("the controller closed the connection after the handshake".into()),
            _ => Probe::Accepted,
        }
    }

    /// Refines a transport failure by a direct handshake: our certificate
    /// refused, or the controller's not trusted. Everything else stays
    /// "unreachable" with its original cause.
    pub async fn explain(&self, e: CliError) -> CliError {
        let CliError::Unreachable { .. } = e else { return e };
        match self.probe().await {
            Probe::Refused(alert) => CliError::Refused(self.refusal(alert)),
            Probe::Untrusted(cert_error) => CliError::Untrusted(self.untrusted(&cert_error)),
            Probe::Tls(tls) => CliError::Unreachable {
                url: self.url.clone(),
                cause: format!("something answers there, but not a TLS 1.3 server drctl can talk to: {tls}"),
            },
            Probe::Unreachable(_) | Probe::Accepted => e,
        }
    }

    /// The message for a TLS alert from the controller.
    fn refusal(&self, alert: AlertDescription) -> String {
        let cert = self.tls.cert.display();
        let head = format!("the controller at {} refused your certificate {cert}", self.url);
        match alert {
            AlertDescription::CertificateExpired => match own_validity(&self.tls.cert) {
                Some((not_before, not_after)) => {
                    let now = time::OffsetDateTime::now_utc();
                    if now < not_before {
                        format!(
                            "{head}: it is not valid yet (valid from {}, now is {}); wait, issue one that starts now, or check this machine's clock",
                            stamp(not_before),
                            stamp(now)
                        )
                    } else if now > not_after {
                        format!("{head}: it expired at {}; issue a new one with `drctl pki issue operator NAME`", stamp(not_after))
                    } else {
                        format!(
                            "{head} as expired or not yet valid, but by this machine's clock it is valid from {} to {}: check the controller's clock",
                            stamp(not_before),
                            stamp(not_after)
                        )
                    }
                }
                None => format!("{head}: expired or not yet valid"),
            },
            // DecryptError: signed by a CA of the same name but another key.
            AlertDescription::UnknownCA | AlertDescription::DecryptError => {
                format!("{head}: it is not signed by this deployment's CA (was it issued from another CA directory?)")
            }
            AlertDescription::CertificateRequired => format!("{head}: the controller requires a client certificate"),
            AlertDescription::BadCertificate | AlertDescription::UnsupportedCertificate => {
                format!("{head}: it is not a usable client certificate (issue one with `drctl pki issue operator NAME`)")
            }
            AlertDescription::CertificateRevoked => format!("{head}: it is revoked"),
            other => format!("{head}: TLS alert {other:?}"),
        }
    }

    /// The message for our rejection of the controller's certificate.
    fn untrusted(&self, e: &CertificateError) -> String {
        let head = format!("drctl does not trust the controller's certificate at {}", self.url);
        let ca = self.tls.ca.display();
        match e {
            CertificateError::UnknownIssuer => {
                format!("{head}: it is not signed by the CA in --ca {ca} (is that this deployment's CA?)")
            }
            // A CA of the same name but another key (re-created with
            // `drctl pki init`): the issuer is found by name, its signature
            // does not verify.
            #[allow(deprecated)]
            CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithm
            | CertificateError::UnsupportedSignatureAlgorithmContext { .. } => {
                format!("{head}: it is not signed by the CA in --ca {ca} (a CA of the same name but another key: was the CA re-created?)")
            }
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "{head}: it is not valid for the name `{}` (it names {}); give --server-name with one of its names",
                self.server_name,
                presented.join(", ")
            ),
            CertificateError::NotValidForName => {
                format!("{head}: it is not valid for the name `{}`; give --server-name with one of its names", self.server_name)
            }
            CertificateError::ExpiredContext { not_after, .. } => {
                format!("{head}: it expired at {}; the controller needs a new certificate", unix_stamp(*not_after))
            }
            CertificateError::Expired => format!("{head}: it has expired; the controller needs a new certificate"),
            CertificateError::NotValidYetContext { not_before, .. } => format!(
                "{head}: it is not valid before {} (now {}); check the clocks",
                unix_stamp(*not_before),
                stamp(time::OffsetDateTime::now_utc())
            ),
            CertificateError::NotValidYet => format!("{head}: it is not valid yet; check the clocks"),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!("{head}: it is not a server certificate (issue one with `drctl pki issue controller`)")
            }
            other => format!("{head}: {other}"),
        }
    }

    /// A request that starts or changes something (`what`, e.g. "start a
    /// backup of prod-1") broke without an answer: the controller may have
    /// acted on it before it went away, or not. Says so, and how to find
    /// out (`check`: commands) before trying again. Other errors pass.
    pub fn unanswered(&self, e: CliError, what: &str, check: &[String]) -> CliError {
        let CliError::Unreachable { url, cause } = e else { return e };
        let check = check.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
        CliError::Unreachable {
            url,
            cause: format!(
                "{cause}; the request to {what} got no answer: it may have started before the controller went away, or nothing may have started. Check with {check} once the controller is back, before asking again"
            ),
        }
    }

    /// Turns a gRPC status into what the operator should read. A status
    /// carrying a source came from our transport (connection broken), not
    /// from the controller.
    pub fn status_error(&self, s: tonic::Status) -> CliError {
        use tonic::Code;
        if let Some(src) = std::error::Error::source(&s) {
            return CliError::Unreachable { url: self.url.clone(), cause: format!("the connection broke: {}", error_chain(src)) };
        }
        match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => {
                CliError::Refused(format!("the controller refused this client: {}", s.message()))
            }
            Code::NotFound => CliError::NotFound(s.message().to_owned()),
            Code::InvalidArgument => CliError::Usage(s.message().to_owned()),
            Code::FailedPrecondition | Code::AlreadyExists => CliError::Busy(s.message().to_owned()),
            Code::Unavailable => match s.metadata().get(dr_proto::LEADER_METADATA).and_then(|v| v.to_str().ok()) {
                Some(leader) if !leader.is_empty() => CliError::NotLeader { url: self.url.clone(), leader: leader.to_owned() },
                _ => CliError::Unreachable { url: self.url.clone(), cause: s.message().to_owned() },
            },
            _ => CliError::Failed(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

/// A rustls error inside an I/O error (tokio-rustls wraps them so).
fn classify_io(e: std::io::Error) -> Probe {
    let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(c)) => Probe::Untrusted(c),
        Some(rustls::Error::AlertReceived(a)) => Probe::Refused(a),
        Some(other) => Probe::Tls(other),
        None => Probe::Unreachable(e.to_string()),
    }
}

/// notBefore and notAfter of the first certificate in `path`.
fn own_validity(path: &std::path::Path) -> Option<(time::OffsetDateTime, time::OffsetDateTime)> {
    let certs = dr_proto::tls::load_certs(path).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let v = cert.validity();
    Some((
        time::OffsetDateTime::from_unix_timestamp(v.not_before.timestamp()).ok()?,
        time::OffsetDateTime::from_unix_timestamp(v.not_after.timestamp()).ok()?,
    ))
}

fn unix_stamp(t: rustls::pki_types::UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .map(stamp)
        .unwrap_or_else(|| format!("{}s after 1970", t.as_secs()))
}

pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}
