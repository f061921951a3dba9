//! TLS material and configurations shared by both ends.
//!
//! The controller accepts TLS 1.3 only and requires a client certificate that
//! chains to the deployment's CA ([`server_config`]). Agents and drctl present
//! their certificate and verify the controller's DNS/IP name against the same
//! CA ([`client_config`]). Only the aws-lc provider is linked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

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
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
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
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&files.ca)? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
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
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity)
        .domain_name(server_name))
}
