//! Signing with the intermediate CA.
//!
//! An agent's certificate is made for the identity the controller decided
//! (`spiffe://<td>/site/<site>/instance/<id>`), from the public key of the
//! agent's CSR and nothing else of it: a name asked for in a CSR is never
//! issued. Serials are 16 random bytes. A certificate never outlives the
//! intermediate: its end is moved to the intermediate's.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dr_proto::identity::Identity;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("the certificate signing request is not valid: {0}")]
    Csr(String),
    #[error("the intermediate CA ended at {ended}: an operator must install a new one (`drctl pki intermediate`)")]
    Expired { ended: String },
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// What the CA signed.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The new certificate, then the intermediate's chain, PEM.
    pub chain_pem: String,
    /// Hex bytes separated by `:` (as `drctl status` shows serials).
    pub serial: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// The intermediate CA: its certificate chain (intermediate first, up to
/// but not including the root) and key.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    chain_pem: String,
    chain: Vec<CertificateDer<'static>>,
    trust_domain: String,
    not_before_ms: u64,
    not_after_ms: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("trust_domain", &self.trust_domain).field("not_after_ms", &self.not_after_ms).finish()
    }
}

fn ms(t: i64) -> u64 {
    u64::try_from(t).unwrap_or(0).saturating_mul(1000)
}

/// The hex serial of a DER certificate, as [`Issued::serial`] spells it.
pub fn serial_of(der: &[u8]) -> Option<String> {
    X509Certificate::from_der(der).ok().map(|(_, c)| c.raw_serial_as_string())
}

impl Signer {
    /// Loads the intermediate from PEM files, checking that it is a CA for
    /// `trust_domain` whose key matches.
    pub fn load(cert: &Path, key: &Path, trust_domain: &str) -> Result<Signer, SignerError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| SignerError::Read { path: p.to_owned(), source });
        let (chain_pem, key_pem) = (read(cert)?, read(key)?);
        let invalid = |p: &Path, why: String| SignerError::Invalid { path: p.to_owned(), why };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key, format!("not a private key: {e}")))?;
        Signer::from_pem(&chain_pem, key, trust_domain).map_err(|why| invalid(cert, why))
    }

    /// [`Signer::load`] from PEM text and a key.
    pub fn from_pem(chain_pem: &str, key: KeyPair, trust_domain: &str) -> Result<Signer, String> {
        let chain = dr_proto::tls::parse_certs(chain_pem.as_bytes(), Path::new("intermediate")).map_err(|e| e.to_string())?;
        let (_, cert) = X509Certificate::from_der(chain[0].as_ref()).map_err(|e| format!("not a certificate: {e}"))?;
        if !cert.is_ca() {
            return Err("the first certificate is not a CA certificate (make one with `drctl pki intermediate`)".into());
        }
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err("the key does not belong to the first certificate".into());
        }
        let domain = ca_trust_domain(&cert).ok_or("the CA carries no spiffe://<trust-domain> URI SAN")?;
        if domain != trust_domain {
            return Err(format!("the CA is for trust domain `{domain}`, the controller's is `{trust_domain}`"));
        }
        let (not_before_ms, not_after_ms) = (ms(cert.validity().not_before.timestamp()), ms(cert.validity().not_after.timestamp()));
        let issuer = Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| e.to_string())?;
        Ok(Signer { issuer, chain_pem: chain_pem.to_owned(), chain, trust_domain: trust_domain.to_owned(), not_before_ms, not_after_ms })
    }

    /// When the intermediate starts and ends (Unix ms).
    pub fn validity_ms(&self) -> (u64, u64) {
        (self.not_before_ms, self.not_after_ms)
    }

    /// The intermediate's chain (DER), for the controller's own certificate.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs the public key of `csr` (its self-signature checked) for
    /// `identity`, valid `lifetime` from a minute ago.
    pub fn sign_csr(&self, csr_der: &[u8], identity: &Identity, lifetime: Duration) -> Result<Issued, SignerError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| SignerError::Csr(e.to_string()))?;
        let mut params = self.params(lifetime)?;
        params.distinguished_name = name(&identity.uri());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into().map_err(|e: rcgen::Error| SignerError::Sign(e))?)];
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        self.issued(cert.pem(), cert.der())
    }

    /// A new key and a server certificate for the controller with the
    /// DNS/IP names of `current` (its present certificate).
    pub fn sign_server(&self, current: &CertificateDer<'_>, lifetime: Duration) -> Result<(Issued, PrivateKeyDer<'static>), SignerError> {
        let (_, old) =
            X509Certificate::from_der(current.as_ref()).map_err(|e| SignerError::Csr(format!("the current certificate: {e}")))?;
        let mut params = self.params(lifetime)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if let Ok(Some(san)) = old.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        params.subject_alt_names.push(SanType::DnsName((*d).try_into()?));
                    }
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()),
                            16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()),
                            _ => continue,
                        };
                        params.subject_alt_names.push(SanType::IpAddress(ip));
                    }
                    _ => {}
                }
            }
        }
        let cn = old.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("dr-controller").to_owned();
        params.distinguished_name = name(&cn);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued = self.issued(cert.pem(), cert.der())?;
        let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| SignerError::Csr(e.to_string()))?;
        Ok((issued, key))
    }

    fn params(&self, lifetime: Duration) -> Result<CertificateParams, SignerError> {
        let now = SystemTime::now();
        let now_ms = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        if now_ms >= self.not_after_ms {
            return Err(SignerError::Expired { ended: stamp(self.not_after_ms) });
        }
        let end_ms = (now_ms + lifetime.as_millis() as u64).min(self.not_after_ms);
        let mut params = CertificateParams::default();
        // Backdated for clocks a little behind ours: a minute, or a
        // twentieth of a short lifetime (agents renew at half of the
        // lifetime counted from here).
        params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60).min(lifetime / 20));
        params.not_after = time::OffsetDateTime::from(SystemTime::UNIX_EPOCH + Duration::from_millis(end_ms));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        Ok(params)
    }

    fn issued(&self, leaf_pem: String, der: &CertificateDer<'_>) -> Result<Issued, SignerError> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| SignerError::Csr(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{leaf_pem}{}", self.chain_pem),
            serial: cert.raw_serial_as_string(),
            not_before_ms: ms(cert.validity().not_before.timestamp()),
            not_after_ms: ms(cert.validity().not_after.timestamp()),
        })
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// RFC 3339 of Unix ms, for messages.
pub fn stamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The trust domain a CA certificate names (`spiffe://<td>` URI SAN).
fn ca_trust_domain(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix("spiffe://").filter(|d| !d.contains('/')).map(str::to_owned),
        _ => None,
    })
}
