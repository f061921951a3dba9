//! A small PKI for one deployment: `drctl pki init` and `drctl pki issue`.
//!
//! The CA certificate carries the trust domain as its URI SAN
//! (`spiffe://<trust-domain>`, as SPIFFE CAs do), so issuing needs only the
//! CA directory. Keys are ECDSA P-256, written with mode 0600; no file is
//! ever overwritten.
//!
//! Lifetimes are 1 to [`MAX_DAYS`] days. A certificate never outlives its
//! CA: with `--days` its end is moved to the CA's (with a warning when that
//! takes more than an hour off), with an explicit `--not-after` past the
//! CA's end it is refused ([`CaEnd`]).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dr_proto::identity::{Identity, validate_name, validate_trust_domain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// The longest lifetime `Validity::days` accepts (100 years).
pub const MAX_DAYS: u32 = 36500;

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
    #[error("a lifetime of {days} days: give 1 to {MAX_DAYS} days")]
    Days { days: u32 },
    #[error(
        "the certificate would end at {not_after}, after its CA {ca} (which ends at {ca_not_after}): a certificate cannot outlive its CA; give an earlier --not-after or use --days"
    )]
    OutlivesCa { ca: PathBuf, not_after: String, ca_not_after: String },
    #[error("the CA {ca} ends at {ca_not_after}, before the certificate would start ({not_before}): create a new CA with `drctl pki init`")]
    CaEnded { ca: PathBuf, not_before: String, ca_not_after: String },
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
    /// From a minute ago (clock skew) for `days` days, 1 to [`MAX_DAYS`]
    /// (0 days would make a certificate useless a minute later).
    pub fn days(days: u32) -> Result<Self, PkiError> {
        if days == 0 || days > MAX_DAYS {
            return Err(PkiError::Days { days });
        }
        let now = OffsetDateTime::now_utc();
        Ok(Validity { not_before: now - time::Duration::minutes(1), not_after: now + time::Duration::days(days.into()) })
    }
}

/// What to do with a certificate that would end after its CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaEnd {
    /// End it with the CA (its lifetime came from `--days`).
    Clamp,
    /// Refuse (the end was given explicitly).
    Refuse,
}

/// A certificate written by [`issue_with`].
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: OffsetDateTime,
    /// The end that was asked for, when it was moved to the CA's end by
    /// more than an hour (worth a warning).
    pub shortened_from: Option<OffsetDateTime>,
}

/// What `issue` needs to know about the CA.
#[derive(Clone, Debug)]
pub struct CaInfo {
    pub trust_domain: String,
    pub not_after: OffsetDateTime,
}

/// Creates `dir/ca.pem` and `dir/ca.key` for `trust_domain`.
pub fn init_ca(dir: &Path, trust_domain: &str, validity: Validity) -> Result<PathBuf, PkiError> {
    validate_trust_domain(trust_domain)
        .map_err(|m| PkiError::Invalid { what: format!("trust domain `{trust_domain}`"), message: m.into() })?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert_path, &key_path])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("dr CA {trust_domain}"));
    // Path length 1: the root signs intermediates (`drctl pki
    // intermediate`), which sign the certificates in use.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
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

/// Creates an intermediate CA in `out` (ca.pem with the intermediate's
/// certificate, ca.key), signed by the root in `root_dir`, path length 0,
/// for the root's trust domain. It ends with the root at the latest.
pub fn intermediate(root_dir: &Path, out: &Path, mut validity: Validity) -> Result<Issued, PkiError> {
    let (root_cert, root_key) = (root_dir.join(CA_CERT), root_dir.join(CA_KEY));
    let root = ca_info(&root_cert)?;
    let root_pem = read(&root_cert)?;
    let der = dr_proto::tls::load_certs(&root_cert)
        .map_err(|e| PkiError::Invalid { what: root_cert.display().to_string(), message: e.to_string() })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der[0].as_ref())
        .map_err(|e| PkiError::Invalid { what: root_cert.display().to_string(), message: e.to_string() })?;
    if let Ok(Some(bc)) = parsed.basic_constraints()
        && bc.value.path_len_constraint == Some(0)
    {
        return Err(PkiError::Invalid {
            what: format!("root CA {}", root_cert.display()),
            message: "its path length is 0, so it cannot sign an intermediate (it was made before intermediates existed): make a new root with `drctl pki init` and move to it (see the README, \"CA rotation\")".into(),
        });
    }
    let issuer = Issuer::from_ca_cert_pem(&root_pem, KeyPair::from_pem(&read(&root_key)?)?)?;
    let mut shortened_from = None;
    if validity.not_after > root.not_after {
        shortened_from = Some(validity.not_after);
        validity.not_after = root.not_after;
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("dr intermediate CA {}", root.trust_domain));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = vec![SanType::URI(ia5(&format!("spiffe://{}", root.trust_domain))?)];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.use_authority_key_identifier_extension = true;
    let (cert_path, key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| PkiError::Write { path: out.to_owned(), source })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issued { cert: cert_path, key: key_path, not_after: validity.not_after, shortened_from })
}

/// The trust domain the CA certificate at `path` was created for, and its end.
pub fn ca_info(path: &Path) -> Result<CaInfo, PkiError> {
    let invalid = |m: String| PkiError::Invalid { what: format!("CA certificate {}", path.display()), message: m };
    let certs = dr_proto::tls::load_certs(path).map_err(|e| invalid(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref()).map_err(|e| invalid(e.to_string()))?;
    let not_after =
        OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).map_err(|e| invalid(format!("its end: {e}")))?;
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = n
                    && let Some(domain) = uri.strip_prefix("spiffe://").filter(|d| !d.contains('/'))
                {
                    return Ok(CaInfo { trust_domain: domain.to_owned(), not_after });
                }
            }
        }
    }
    Err(invalid("it carries no spiffe://<trust-domain> URI SAN (was it made by `drctl pki init`?)".into()))
}

/// RFC 3339, as messages show times.
pub(crate) fn stamp(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// [`issue_with`], ending the certificate with its CA if it would outlive it.
pub fn issue(ca_dir: &Path, subject: &Subject, validity: Validity, out: &Path, file_stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    issue_with(ca_dir, subject, validity, CaEnd::Clamp, out, file_stem).map(|i| (i.cert, i.key))
}

/// Issues a certificate signed by the CA in `ca_dir`, written to
/// `out/<file_stem>.pem` and `out/<file_stem>.key`.
pub fn issue_with(
    ca_dir: &Path,
    subject: &Subject,
    mut validity: Validity,
    ca_end: CaEnd,
    out: &Path,
    file_stem: &str,
) -> Result<Issued, PkiError> {
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT), ca_dir.join(CA_KEY));
    let ca_pem = read(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)?;
    let ca = ca_info(&ca_cert_path)?;
    let trust_domain = ca.trust_domain;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    if validity.not_before >= ca.not_after {
        return Err(PkiError::CaEnded { ca: ca_cert_path, not_before: stamp(validity.not_before), ca_not_after: stamp(ca.not_after) });
    }
    let mut shortened_from = None;
    if validity.not_after > ca.not_after {
        if ca_end == CaEnd::Refuse {
            return Err(PkiError::OutlivesCa { ca: ca_cert_path, not_after: stamp(validity.not_after), ca_not_after: stamp(ca.not_after) });
        }
        if validity.not_after - ca.not_after > time::Duration::hours(1) {
            shortened_from = Some(validity.not_after);
        }
        validity.not_after = ca.not_after;
    }

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
    // Issued by an intermediate: the chain goes with the certificate (a
    // root's certificates need none: the peer has the root).
    let chain = if is_self_signed(&ca_pem) { String::new() } else { ca_pem };
    write_new(&cert_path, format!("{}{chain}", cert.pem()).as_bytes(), 0o644)?;
    Ok(Issued { cert: cert_path, key: key_path, not_after: validity.not_after, shortened_from })
}

fn is_self_signed(pem: &str) -> bool {
    dr_proto::tls::parse_certs(pem.as_bytes(), Path::new("ca"))
        .ok()
        .and_then(|c| x509_parser::parse_x509_certificate(c[0].as_ref()).ok().map(|(_, c)| c.subject() == c.issuer()))
        .unwrap_or(true)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    rcgen::string::Ia5String::try_from(s.to_owned()).map_err(|e| PkiError::Invalid { what: format!("`{s}`"), message: e.to_string() })
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
        init_ca(dir.path(), "dr.test", Validity::days(30).expect("days")).expect("ca");
        assert_eq!(ca_info(&dir.path().join(CA_CERT)).expect("domain").trust_domain, "dr.test");
        let (cert, key) =
            issue(dir.path(), &Subject::Site("prod-1".into()), Validity::days(1).expect("days"), dir.path(), "site").expect("issue");
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let der = dr_proto::tls::load_certs(&cert).expect("certs");
        let id = Identity::from_certificate_der(der[0].as_ref()).expect("identity");
        assert_eq!(id, Identity::site("dr.test", "prod-1"));
        let again = issue(dir.path(), &Subject::Site("prod-1".into()), Validity::days(1).expect("days"), dir.path(), "site");
        assert!(matches!(again, Err(PkiError::Exists { .. })));
        let bad = issue(dir.path(), &Subject::Operator("Bad Name".into()), Validity::days(1).expect("days"), dir.path(), "op");
        assert!(matches!(bad, Err(PkiError::Invalid { .. })));
    }

    #[test]
    fn zero_days_is_refused() {
        assert!(matches!(Validity::days(0), Err(PkiError::Days { days: 0 })));
        assert!(matches!(Validity::days(MAX_DAYS + 1), Err(PkiError::Days { .. })));
        assert!(Validity::days(MAX_DAYS).is_ok());
    }

    #[test]
    fn a_certificate_never_outlives_its_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), "dr.test", Validity::days(10).expect("days")).expect("ca");
        let ca_end = ca_info(&dir.path().join(CA_CERT)).expect("ca").not_after;
        let subject = Subject::Operator("alice".into());
        let long = Validity::days(365).expect("days");
        let clamped = issue_with(dir.path(), &subject, long, CaEnd::Clamp, dir.path(), "a").expect("clamped");
        assert_eq!(clamped.not_after, ca_end);
        assert_eq!(clamped.shortened_from, Some(long.not_after));
        let der = dr_proto::tls::load_certs(&clamped.cert).expect("cert");
        let (_, parsed) = x509_parser::parse_x509_certificate(der[0].as_ref()).expect("parse");
        assert_eq!(parsed.validity().not_after.timestamp(), ca_end.unix_timestamp());
        let refused = issue_with(dir.path(), &subject, long, CaEnd::Refuse, dir.path(), "b");
        assert!(matches!(refused, Err(PkiError::OutlivesCa { .. })), "{refused:?}");
        assert!(!dir.path().join("b.pem").exists() && !dir.path().join("b.key").exists());
        let after = Validity { not_before: ca_end + time::Duration::days(1), not_after: ca_end + time::Duration::days(2) };
        assert!(matches!(issue_with(dir.path(), &subject, after, CaEnd::Clamp, dir.path(), "c"), Err(PkiError::CaEnded { .. })));
    }
}
