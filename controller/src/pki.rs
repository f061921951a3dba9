//! A small PKI for one deployment: `drctl pki init` and `drctl pki issue`.
//!
//! The CA certificate carries the trust domain as its URI SAN
//! (`spiffe://<trust-domain>`, as SPIFFE CAs do), so issuing needs only the
//! CA directory. Keys are ECDSA P-256, written with mode 0600; no file is
//! ever overwritten.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dr_proto::identity::{Identity, validate_name, validate_trust_domain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What a certificate is for.
#[derive(Clone, Debug)]
pub enum Subject {
    /// The controller's server certificate: DNS and IP SANs agents dial.
    Controller { dns: Vec<String>, ips: Vec<IpAddr> },
    /// An agent of one site.
    Site(String),
    /// A human or automation using drctl.
    Operator(String),
}

/// The validity window of a new certificate.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a minute ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - time::Duration::minutes(1), not_after: now + time::Duration::days(days.into()) }
    }
}

/// Creates `dir/ca.pem` and `dir/ca.key` for `trust_domain`.
pub fn init_ca(dir: &Path, trust_domain: &str, validity: Validity) -> Result<PathBuf, PkiError> {
    validate_trust_domain(trust_domain)
        .map_err(|m| PkiError::Invalid { what: format!("trust domain `{trust_domain}`"), message: m.into() })?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert_path, &key_path])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("dr CA {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = vec![SanType::URI(ia5(&format!("spiffe://{trust_domain}"))?)];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// The trust domain the CA certificate at `path` was created for.
pub fn ca_trust_domain(path: &Path) -> Result<String, PkiError> {
    let invalid = |m: String| PkiError::Invalid { what: format!("CA certificate {}", path.display()), message: m };
    let certs = dr_proto::tls::load_certs(path).map_err(|e| invalid(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref()).map_err(|e| invalid(e.to_string()))?;
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = n {
                    if let Some(domain) = uri.strip_prefix("spiffe://").filter(|d| !d.contains('/')) {
                        return Ok(domain.to_owned());
                    }
                }
            }
        }
    }
    Err(invalid("it carries no spiffe://<trust-domain> URI SAN (was it made by `drctl pki init`?)".into()))
}

/// Issues a certificate signed by the CA in `ca_dir`, written to
/// `out/<file_stem>.pem` and `out/<file_stem>.key`.
pub fn issue(
    ca_dir: &Path,
    subject: &Subject,
    validity: Validity,
    out: &Path,
    file_stem: &str,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT), ca_dir.join(CA_KEY));
    let ca_pem = read(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)?;
    let trust_domain = ca_trust_domain(&ca_cert_path)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    match subject {
        Subject::Controller { dns, ips } => {
            if dns.is_empty() && ips.is_empty() {
                return Err(PkiError::Invalid {
                    what: "controller certificate".into(),
                    message: "give at least one --dns or --ip name agents will dial".into(),
                });
            }
            params.distinguished_name = name(dns.first().map(String::as_str).unwrap_or("dr-controller"));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for d in dns {
                params.subject_alt_names.push(SanType::DnsName(ia5(d)?));
            }
            for ip in ips {
                params.subject_alt_names.push(SanType::IpAddress(*ip));
            }
        }
        Subject::Site(id) | Subject::Operator(id) => {
            validate_name(id).map_err(|m| PkiError::Invalid { what: format!("name `{id}`"), message: m.into() })?;
            let identity = match subject {
                Subject::Site(_) => Identity::site(&trust_domain, id),
                _ => Identity::operator(&trust_domain, id),
            };
            params.distinguished_name = name(&identity.uri());
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.subject_alt_names = vec![SanType::URI(ia5(&identity.uri())?)];
        }
    }
    let (cert_path, key_path) = (out.join(format!("{file_stem}.pem")), out.join(format!("{file_stem}.key")));
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| PkiError::Write { path: out.to_owned(), source })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    rcgen::string::Ia5String::try_from(s.to_owned())
        .map_err(|e| PkiError::Invalid { what: format!("`{s}`"), message: e.to_string() })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.to_owned(), source })
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists { path: p.to_path_buf() }),
        None => Ok(()),
    }
}

/// Creates a file that must not exist yet, with `mode` from the start (a key
/// is never readable by others, not even for a moment).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn issues_identities_that_parse_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), "dr.test", Validity::days(30)).expect("ca");
        assert_eq!(ca_trust_domain(&dir.path().join(CA_CERT)).expect("domain"), "dr.test");
        let (cert, key) =
            issue(dir.path(), &Subject::Site("prod-1".into()), Validity::days(1), dir.path(), "site").expect("issue");
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let der = dr_proto::tls::load_certs(&cert).expect("certs");
        let id = Identity::from_certificate_der(der[0].as_ref()).expect("identity");
        assert_eq!(id, Identity::site("dr.test", "prod-1"));
        let again = issue(dir.path(), &Subject::Site("prod-1".into()), Validity::days(1), dir.path(), "site");
        assert!(matches!(again, Err(PkiError::Exists { .. })));
        let bad = issue(dir.path(), &Subject::Operator("Bad Name".into()), Validity::days(1), dir.path(), "op");
        assert!(matches!(bad, Err(PkiError::Invalid { .. })));
    }
}
