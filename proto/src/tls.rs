//! TLS material and configurations shared by both ends.
//!
//! The controller accepts TLS 1.3 only and requires a client certificate that
//! chains to the deployment's CA ([`server_config`]). Agents and drctl present
//! their certificate and verify the controller's DNS/IP name against the same
//! CA ([`client_config`]). Only the aws-lc provider is linked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{Identity, IdentityError};

/// Paths of the PEM files one end needs.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate(s) that sign every certificate of the deployment.
    pub ca: PathBuf,
    /// This end's certificate (chain).
    pub cert: PathBuf,
    /// This end's private key.
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path} is not valid PEM: {source}")]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read(path)?, path)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoKey { path: path.to_owned() }),
        Err(source) => Err(TlsError::Pem { path: path.to_owned(), source }),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc as the process-wide rustls provider. Call once at the start
/// of every binary; later calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The controller's server configuration: TLS 1.3 only, a client certificate
/// chaining to the CA is required, ALPN h2 for gRPC.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let roots = load_certs(&files.ca)?;
    Ok(ServerTls::new(roots, load_certs(&files.cert)?, load_key(&files.key)?, None, ClientAuth::Required)?.config)
}

/// Whether a client without a certificate may complete the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client presents a certificate chaining to the roots.
    Required,
    /// A client may present none (an agent whose certificates all expired,
    /// enrolling with its instance identity document); one that presents a
    /// certificate must still chain to the roots. Every service but
    /// enrolment then refuses a request without one.
    Optional,
}

/// The controller's TLS: a server configuration whose certificate and
/// trusted roots can be replaced while it serves (certificate renewal, CA
/// rotation). Open connections keep what they were made with; new
/// handshakes get the new material.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    cert: Arc<SwapCert>,
    verifier: Arc<ObservedVerifier>,
}

impl ServerTls {
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        observer: Option<Arc<dyn RefusalObserver>>,
        auth: ClientAuth,
    ) -> Result<ServerTls, TlsError> {
        let verifier = Arc::new(ObservedVerifier { inner: std::sync::RwLock::new(client_verifier(roots, auth)?), observer, auth });
        let cert = Arc::new(SwapCert { current: std::sync::RwLock::new(certified(chain, key)?) });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls { config: Arc::new(config), cert, verifier })
    }

    /// Presents `chain` (leaf first) from the next handshake on. The key
    /// must match the leaf: a mismatch is refused and nothing changes.
    pub fn set_certificate(&self, chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<(), TlsError> {
        let new = certified(chain, key)?;
        *self.cert.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// Trusts exactly `roots` for client certificates from the next
    /// handshake on.
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        let new = client_verifier(roots, self.verifier.auth)?;
        *self.verifier.inner.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// The leaf certificate presented now.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.current.read().unwrap_or_else(|p| p.into_inner()).cert[0].clone()
    }
}

fn client_verifier(roots: Vec<CertificateDer<'static>>, auth: ClientAuth) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for ca in roots {
        store.add(ca)?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider());
    Ok(match auth {
        ClientAuth::Required => builder.build()?,
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
    })
}

fn certified(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::Rustls(rustls::Error::General("an empty certificate chain".into())));
    }
    Ok(Arc::new(rustls::sign::CertifiedKey::from_der(chain, key, &provider())?))
}

/// The certificate the server presents, replaceable.
#[derive(Debug)]
struct SwapCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for SwapCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// [`server_config`], with an observer told about every client certificate
/// the verifier refuses. The real verifier decides first and its answer is
/// returned unchanged: the observer only learns of a refusal afterwards.
pub fn server_config_observed(files: &TlsFiles, observer: Option<Arc<dyn RefusalObserver>>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Ok(ServerTls::new(load_certs(&files.ca)?, load_certs(&files.cert)?, load_key(&files.key)?, observer, ClientAuth::Required)?.config)
}

/// A client configuration for tonic: our certificate, the CA to verify the
/// controller with, and the name the controller's certificate must carry.
pub fn client_config(files: &TlsFiles, server_name: &str) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    // Parse everything first so that a bad file is reported by name here,
    // not as an opaque handshake failure later.
    load_certs(&files.ca)?;
    load_certs(&files.cert)?;
    load_key(&files.key)?;
    let ca = tonic::transport::Certificate::from_pem(read(&files.ca)?);
    let identity = tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    Ok(tonic::transport::ClientTlsConfig::new().ca_certificate(ca).identity(identity).domain_name(server_name))
}

/// A client configuration from PEM held in memory: `identity` (certificate
/// chain, key) is None for a client without a certificate (enrolment).
pub fn client_config_pem(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>, server_name: &str) -> tonic::transport::ClientTlsConfig {
    let mut config =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem)).domain_name(server_name);
    if let Some((cert, key)) = identity {
        config = config.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    config
}

/// Reads every certificate in PEM text held in memory (`what` names it in errors).
pub fn parse_certs(pem: &[u8], what: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: what.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: what.to_owned() });
    }
    Ok(certs)
}

/// Told about each client certificate the server's verifier refused, after
/// the refusal (it cannot change the outcome). Called inside the handshake:
/// it must be quick and must not block.
pub trait RefusalObserver: Send + Sync + std::fmt::Debug {
    fn refused(&self, refusal: &Refused<'_>);
}

/// A client certificate the verifier refused, and why.
pub struct Refused<'a> {
    pub end_entity: &'a CertificateDer<'a>,
    pub intermediates: &'a [CertificateDer<'a>],
    /// The time the certificate was checked at.
    pub now: UnixTime,
    /// The verifier's answer (what the client was refused with).
    pub error: &'a rustls::Error,
    verifier: &'a dyn ClientCertVerifier,
}

impl Refused<'_> {
    /// Runs the same verifier again as if it were `unix_secs`: whether the
    /// chain is this deployment's apart from the time (an expired
    /// certificate of ours, checked at its own not-after, passes; one from
    /// another CA does not). Changes nothing.
    pub fn verify_at(&self, unix_secs: u64) -> Result<(), rustls::Error> {
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(unix_secs));
        self.verifier.verify_client_cert(self.end_entity, self.intermediates, at).map(|_| ())
    }
}

/// What a certificate says about itself, read without trusting it.
#[derive(Debug, PartialEq, Eq)]
pub struct PresentedCert {
    /// Its spiffe:// identity, or why it has none.
    pub identity: Result<Identity, IdentityError>,
    /// The serial number, hex bytes separated by `:`.
    pub serial: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl PresentedCert {
    /// `None` when the DER is not a certificate.
    pub fn from_der(der: &[u8]) -> Option<PresentedCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let ms = |t: i64| u64::try_from(t).unwrap_or(0).saturating_mul(1000);
        Some(PresentedCert {
            identity: Identity::from_certificate_der(der),
            serial: cert.raw_serial_as_string(),
            not_before_ms: ms(cert.validity().not_before.timestamp()),
            not_after_ms: ms(cert.validity().not_after.timestamp()),
        })
    }
}

/// The real client verifier (replaceable: CA rotation), and an observer
/// told about its refusals.
#[derive(Debug)]
struct ObservedVerifier {
    inner: std::sync::RwLock<Arc<dyn ClientCertVerifier>>,
    observer: Option<Arc<dyn RefusalObserver>>,
    auth: ClientAuth,
}

impl ObservedVerifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientCertVerifier for ObservedVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.auth == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would tie the answer to one set of roots; clients here
        // have one certificate each and need none.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.current();
        let result = inner.verify_client_cert(end_entity, intermediates, now);
        if let (Err(error), Some(observer)) = (&result, &self.observer) {
            observer.refused(&Refused { end_entity, intermediates, now, error, verifier: inner.as_ref() });
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        false
    }
}
