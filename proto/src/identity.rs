//! Identities carried in certificates.
//!
//! Every certificate the product issues carries exactly one URI SAN:
//!
//! - an agent on one instance: `spiffe://<trust-domain>/site/<site-id>/instance/<i-...>`,
//!   issued by the controller after the instance proved itself (enrolment);
//! - a site (every copy of its disk has it): `spiffe://<trust-domain>/site/<site-id>`,
//!   which only lets an agent ask to enrol (unless the controller's
//!   `pki.allow_site_certificates` lets it hold a session, while a fleet moves over);
//! - operators: `spiffe://<trust-domain>/operator/<name>`
//!
//! The controller's own certificate carries DNS/IP SANs instead (rustls checks
//! those). Nothing in a message is trusted to say who a peer is: the
//! controller reads the identity from the verified peer certificate with
//! [`peer_identity`] and authorizes it with [`Identity::require_site`] /
//! [`Identity::require_operator`].

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// What a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The site-wide certificate (on every AMI of the site): enrolment only.
    Site(String),
    /// A services machine's agent on one EC2 instance of a site.
    Instance { site: String, instance: String },
    /// A human or automation driving the admin API.
    Operator(String),
}

/// A parsed `spiffe://<trust-domain>/<kind>/<name>` identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub trust_domain: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the peer certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the peer certificate carries {0} spiffe:// URI SANs; exactly one is required")]
    UriCount(usize),
    #[error("`{uri}` is not a valid identity: {why}")]
    BadUri { uri: String, why: &'static str },
    #[error("identity {got} belongs to trust domain `{got_domain}`, expected `{expected}`")]
    WrongTrustDomain { got: String, got_domain: String, expected: String },
    #[error("identity {0} is not allowed here: a site (agent) certificate is required")]
    NotASite(String),
    #[error("identity {0} is not allowed here: an operator certificate is required")]
    NotAnOperator(String),
}

/// Checks an EC2 instance id: `i-` and 8 to 17 hex digits.
pub fn validate_instance_id(id: &str) -> Result<(), &'static str> {
    let hex = id.strip_prefix("i-").ok_or("an instance id starts with `i-`")?;
    if !(8..=17).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("an instance id is `i-` and 8 to 17 hex digits");
    }
    Ok(())
}

/// Checks a site id or operator name: 1 to 63 characters of lower-case
/// ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 63 {
        return Err("a name must be 1 to 63 characters long");
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err("a name must start with a lower-case letter or a digit");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("a name may contain only a-z, 0-9, '-', '_' and '.'");
    }
    Ok(())
}

/// Checks a trust domain: a DNS-like name of lower-case labels.
pub fn validate_trust_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() || domain.len() > 255 {
        return Err("a trust domain must be 1 to 255 characters long");
    }
    if !domain.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')) {
        return Err("a trust domain is dot-separated labels of a-z, 0-9 and '-'");
    }
    Ok(())
}

impl Identity {
    pub fn site(trust_domain: &str, site_id: &str) -> Self {
        Identity { trust_domain: trust_domain.to_owned(), role: Role::Site(site_id.to_owned()) }
    }

    pub fn instance(trust_domain: &str, site_id: &str, instance_id: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            role: Role::Instance { site: site_id.to_owned(), instance: instance_id.to_owned() },
        }
    }

    pub fn operator(trust_domain: &str, name: &str) -> Self {
        Identity { trust_domain: trust_domain.to_owned(), role: Role::Operator(name.to_owned()) }
    }

    /// The URI to put in a certificate's SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Parses `spiffe://<trust-domain>/site/<id>`, `.../site/<id>/instance/<i-...>`
    /// or `.../operator/<name>`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let bad = |why| IdentityError::BadUri { uri: uri.to_owned(), why };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(|| bad("it does not start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let role = match parts.as_slice() {
            [domain, "site", name] | [domain, "operator", name] | [domain, "site", name, "instance", _] => {
                validate_trust_domain(domain).map_err(bad)?;
                validate_name(name).map_err(bad)?;
                match parts.as_slice() {
                    [_, "operator", _] => Role::Operator((*name).to_owned()),
                    [_, _, _, _, instance] => {
                        validate_instance_id(instance).map_err(bad)?;
                        Role::Instance { site: (*name).to_owned(), instance: (*instance).to_owned() }
                    }
                    _ => Role::Site((*name).to_owned()),
                }
            }
            [_, _, _] => return Err(bad("the kind must be `site` or `operator`")),
            _ => return Err(bad("expected spiffe://<trust-domain>/<site|operator>/<name>[/instance/<i-...>]")),
        };
        Ok(Identity { trust_domain: parts[0].to_owned(), role })
    }

    /// The instance this identity is bound to (instance certificates only).
    pub fn instance_id(&self) -> Option<&str> {
        match &self.role {
            Role::Instance { instance, .. } => Some(instance),
            _ => None,
        }
    }

    /// Reads the single spiffe:// URI SAN of a DER certificate.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name
                        && uri.starts_with("spiffe://")
                    {
                        uris.push(*uri);
                    }
                }
            }
        }
        match uris.as_slice() {
            [uri] => Identity::parse(uri),
            other => Err(IdentityError::UriCount(other.len())),
        }
    }

    fn check_domain(&self, expected: &str) -> Result<(), IdentityError> {
        if self.trust_domain != expected {
            return Err(IdentityError::WrongTrustDomain {
                got: self.to_string(),
                got_domain: self.trust_domain.clone(),
                expected: expected.to_owned(),
            });
        }
        Ok(())
    }

    /// The site id, if this is a site or instance identity in `trust_domain`.
    pub fn require_site(&self, trust_domain: &str) -> Result<&str, IdentityError> {
        self.check_domain(trust_domain)?;
        match &self.role {
            Role::Site(id) | Role::Instance { site: id, .. } => Ok(id),
            Role::Operator(_) => Err(IdentityError::NotASite(self.to_string())),
        }
    }

    /// The operator name, if this is an operator identity in `trust_domain`.
    pub fn require_operator(&self, trust_domain: &str) -> Result<&str, IdentityError> {
        self.check_domain(trust_domain)?;
        match &self.role {
            Role::Operator(name) => Ok(name),
            Role::Site(_) | Role::Instance { .. } => Err(IdentityError::NotAnOperator(self.to_string())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.role {
            Role::Site(id) => write!(f, "spiffe://{}/site/{id}", self.trust_domain),
            Role::Instance { site, instance } => write!(f, "spiffe://{}/site/{site}/instance/{instance}", self.trust_domain),
            Role::Operator(name) => write!(f, "spiffe://{}/operator/{name}", self.trust_domain),
        }
    }
}

/// The identity of the peer of a gRPC request, from its verified client
/// certificate (the chain was already checked against our CA by rustls).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<Identity, IdentityError> {
    let certs = request.peer_certs().ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    Identity::from_certificate_der(leaf.as_ref())
}

/// When the peer's certificate ends (Unix milliseconds), if it has one.
pub fn peer_not_after_ms<T>(request: &tonic::Request<T>) -> Option<u64> {
    let certs = request.peer_certs()?;
    let (_, cert) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok().map(|s| s * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_kinds() {
        let site = Identity::parse("spiffe://dr.example.com/site/prod-eu-1").expect("valid site uri");
        assert_eq!(site.role, Role::Site("prod-eu-1".into()));
        assert_eq!(site.to_string(), "spiffe://dr.example.com/site/prod-eu-1");
        let op = Identity::parse("spiffe://dr.example.com/operator/alice").expect("valid operator uri");
        assert_eq!(op.require_operator("dr.example.com"), Ok("alice"));
        assert!(matches!(op.require_site("dr.example.com"), Err(IdentityError::NotASite(_))));
        assert!(matches!(site.require_operator("dr.example.com"), Err(IdentityError::NotAnOperator(_))));
        assert!(matches!(site.require_site("other.example"), Err(IdentityError::WrongTrustDomain { .. })));
        let inst = Identity::parse("spiffe://dr.example.com/site/prod-eu-1/instance/i-0123456789abcdef0").expect("valid instance uri");
        assert_eq!(inst, Identity::instance("dr.example.com", "prod-eu-1", "i-0123456789abcdef0"));
        assert_eq!(inst.require_site("dr.example.com"), Ok("prod-eu-1"));
        assert_eq!(inst.instance_id(), Some("i-0123456789abcdef0"));
        assert_eq!(inst.to_string(), "spiffe://dr.example.com/site/prod-eu-1/instance/i-0123456789abcdef0");
        assert_eq!(site.instance_id(), None);
    }

    #[test]
    fn rejects_malformed_uris() {
        for bad in [
            "https://dr.example.com/site/a",
            "spiffe://dr.example.com/site",
            "spiffe://dr.example.com/site/a/b",
            "spiffe://dr.example.com/admin/a",
            "spiffe://dr.example.com/site/A",
            "spiffe://dr.example.com/site/..",
            "spiffe://dr.example.com/site/",
            "spiffe:///site/a",
            "spiffe://DR.example.com/site/a",
            "spiffe://dr.example.com/site/a/instance/x-1234",
            "spiffe://dr.example.com/site/a/instance/i-XYZXYZXYZ",
            "spiffe://dr.example.com/operator/a/instance/i-12345678",
            "spiffe://dr.example.com/site/a/host/i-12345678",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} must be rejected");
        }
    }
}
