//! Certificates per instance: who may enrol, what a session must prove,
//! renewals, revocation.
//!
//! Rules (ARCHITECTURE.md, "Identity"):
//! - an instance enrols with its EC2 instance identity document (or a
//!   one-time token from `drctl allow-enrol SITE INSTANCE --token`): the document's signature must
//!   verify with a configured AWS certificate, and its instance id, account
//!   and region must be an instance the controller knows for the site
//!   (its primary, or one recorded as candidate, drill or spare);
//! - an instance enrols once: while a certificate issued to it is valid, it
//!   cannot enrol again unless an operator allowed it (`drctl site
//!   allow-enrol`); once every certificate of it has expired (a machine off
//!   for months) it may, with the same proof;
//! - the certificate names the site and the instance; the CSR gives only
//!   the public key;
//! - a revoked site enrols no more; a revoked serial holds no session.

use std::sync::{Arc, RwLock};

use dr_proto::identity::{Identity, Role as IdentityRole};

use crate::cloud::budget::account_of;
use crate::config::PkiConfig;
use crate::domain::model::{Millis, Site, now_ms};
use crate::pki::{IidVerifier, Issued, Signer};
use crate::store::{AgentCert, Store, StoreError};

/// How an instance proves which one it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The signed EC2 instance identity document.
    Document {
        document: Vec<u8>,
        signature: String,
    },
    /// A one-time enrolment token.
    Token(String),
    None,
}

impl Proof {
    pub fn from_pb(p: Option<dr_proto::pb::InstanceProof>) -> Proof {
        match p {
            Some(p) if !p.document.is_empty() => Proof::Document { document: p.document, signature: p.signature },
            Some(p) if !p.token.is_empty() => Proof::Token(p.token),
            _ => Proof::None,
        }
    }
}

/// How an instance got its certificate (`agent_certs.attestation`).
pub const BY_DOCUMENT: &str = "instance-identity";
pub const BY_TOKEN: &str = "token";
/// A session held by a site-wide certificate (`pki.allow_site_certificates`).
pub const BY_SITE_CERTIFICATE: &str = "site-certificate";

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for EnrolError {
    fn from(e: StoreError) -> Self {
        EnrolError::Unavailable(format!("the controller's store: {e}"))
    }
}

impl From<EnrolError> for tonic::Status {
    fn from(e: EnrolError) -> Self {
        match e {
            EnrolError::Invalid(m) => tonic::Status::invalid_argument(m),
            EnrolError::Refused(m) => tonic::Status::permission_denied(m),
            EnrolError::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

/// Counters of `/metrics`.
#[derive(Debug, Default)]
pub struct CertCounters {
    pub enrolled: std::sync::atomic::AtomicU64,
    pub enrol_refused: std::sync::atomic::AtomicU64,
    pub renewed: std::sync::atomic::AtomicU64,
    pub renew_failed: std::sync::atomic::AtomicU64,
}

/// The controller's certificate authority, as agents see it.
#[derive(Debug)]
pub struct Authority {
    pub trust_domain: String,
    signer: RwLock<Option<Arc<Signer>>>,
    iid: Option<IidVerifier>,
    pub config: PkiConfig,
    trust: RwLock<TrustState>,
    pub counters: CertCounters,
}

/// The roots agents must trust now, and whether a rotation wants them to
/// renew at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustState {
    /// SHA-256 (hex) of `roots_pem`: what an agent acknowledges.
    pub id: String,
    pub roots_pem: String,
    pub renew_now: bool,
    /// A rotation is in progress: agents are sent the bundle until they
    /// acknowledge it.
    pub rotating: bool,
}

impl TrustState {
    pub fn new(roots_pem: String, renew_now: bool, rotating: bool) -> TrustState {
        TrustState { id: sha256_hex(&roots_pem), roots_pem, renew_now, rotating }
    }
}

/// A signed enrolment.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub issued: Issued,
    pub attestation: &'static str,
    pub trust_bundle_pem: String,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes()).as_ref())
}

impl Authority {
    pub fn new(
        trust_domain: String,
        signer: Option<Signer>,
        iid: Option<IidVerifier>,
        config: PkiConfig,
        trust_bundle: String,
    ) -> Authority {
        Authority {
            trust_domain,
            signer: RwLock::new(signer.map(Arc::new)),
            iid,
            config,
            trust: RwLock::new(TrustState::new(trust_bundle, false, false)),
            counters: CertCounters::default(),
        }
    }

    pub fn signer(&self) -> Option<Arc<Signer>> {
        self.signer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Issues with `signer` from now on (a CA rotation).
    pub fn set_signer(&self, signer: Arc<Signer>) {
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = Some(signer);
    }

    /// The roots agents must trust (PEM).
    pub fn trust_bundle(&self) -> String {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).roots_pem.clone()
    }

    pub fn trust_state(&self) -> TrustState {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_trust(&self, state: TrustState) {
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    fn require_signer(&self) -> Result<Arc<Signer>, EnrolError> {
        self.signer().ok_or_else(|| {
            EnrolError::Unavailable("this controller has no intermediate CA (pki.intermediate_cert): it cannot issue certificates".into())
        })
    }

    /// Whether a site-wide certificate may hold a session.
    pub fn allows_site_certificates(&self) -> bool {
        self.config.allow_site_certificates
    }

    /// The account a site's instances run in, if known.
    fn account_of_site(&self, site: &Site) -> Option<String> {
        match account_of(site.role_arn.as_deref()) {
            a if a == "default" => self.config.account_id.clone(),
            a => Some(a),
        }
    }

    /// Checks an instance identity document for `instance` of `site`:
    /// signature, instance id, account, region (`region`: where the
    /// controller knows the instance to run).
    pub fn check_document(&self, site: &Site, instance: &str, region: &str, document: &[u8], signature: &str) -> Result<(), String> {
        let verifier = self.iid.as_ref().ok_or(
            "this controller has no instance identity certificates (pki.instance_identity_certificates): documents cannot be checked",
        )?;
        let doc = verifier.verify(document, signature).map_err(|e| e.to_string())?;
        if doc.instance_id != instance {
            return Err(format!("the instance identity document is for instance {}, not {instance}", doc.instance_id));
        }
        let account = self.account_of_site(site).ok_or_else(|| {
            format!("site `{}` has no role_arn and pki.account_id is not set: the document's account cannot be checked", site.id)
        })?;
        if doc.account_id != account {
            return Err(format!(
                "the instance identity document is from account {}, site `{}` runs in account {account}",
                doc.account_id, site.id
            ));
        }
        if doc.region != region {
            return Err(format!("the instance identity document is from region {}, instance {instance} runs in {region}", doc.region));
        }
        Ok(())
    }

    /// Where the controller knows `instance` of `site` to run, and whether
    /// it may enrol at all (primary, candidate, drill or spare).
    async fn known_instance(&self, store: &Store, site: &Site, instance: &str) -> Result<String, EnrolError> {
        let rec = store.instance(site.id.clone(), instance.to_owned()).await?;
        let known = instance == site.primary_instance_id
            || rec.as_ref().is_some_and(|r| matches!(r.role.as_str(), "candidate" | "drill" | "spare"));
        if !known {
            let what = rec.map(|r| format!(" (recorded {}: {})", r.role, r.reason)).unwrap_or_default();
            return Err(EnrolError::Refused(format!(
                "instance {instance} is not an instance of site `{}` this controller knows (its primary, a restore candidate, a drill copy or the spare){what}",
                site.id
            )));
        }
        let regions = store.instance_regions().await?;
        Ok(regions.get(&(site.id.clone(), instance.to_owned())).cloned().unwrap_or_else(|| site.region.clone()))
    }

    /// Checks a session's proof of instance (instances that enrolled with
    /// their document must show it at every session).
    pub async fn check_session_proof(&self, store: &Store, site: &Site, instance: &str, proof: &Proof) -> Result<(), String> {
        let Proof::Document { document, signature } = proof else {
            return Err("no instance identity document (this instance enrolled with one: every session must show it)".into());
        };
        let regions = store.instance_regions().await.map_err(|e| e.to_string())?;
        let region = regions.get(&(site.id.clone(), instance.to_owned())).cloned().unwrap_or_else(|| site.region.clone());
        self.check_document(site, instance, &region, document, signature)
    }

    /// An enrolment: checks the caller, the revocations, the proof and the
    /// once-per-instance rule, then signs and records the certificate.
    pub async fn enrol(
        &self,
        store: &Store,
        caller: Option<&Identity>,
        site_id: &str,
        instance: &str,
        csr_der: &[u8],
        proof: Proof,
    ) -> Result<Enrolled, EnrolError> {
        if let Some(id) = caller {
            let site = id.require_site(&self.trust_domain).map_err(|e| EnrolError::Refused(e.to_string()))?;
            if site != site_id {
                return Err(EnrolError::Refused(format!(
                    "the caller's certificate is for site `{site}`, the request for site `{site_id}`"
                )));
            }
        }
        dr_proto::identity::validate_instance_id(instance).map_err(|m| EnrolError::Invalid(format!("instance id `{instance}`: {m}")))?;
        let site = store
            .site(site_id.to_owned())
            .await?
            .ok_or_else(|| EnrolError::Refused(format!("site `{site_id}` is not configured on this controller")))?;
        let revoked = store.revocations().await?;
        if let Some(reason) = revoked.get(&(site_id.to_owned(), String::new())) {
            return Err(EnrolError::Refused(format!("site `{site_id}` is revoked ({reason}): it cannot enrol until an operator lifts it")));
        }
        let region = self.known_instance(store, &site, instance).await?;
        let now = now_ms();
        let attestation = match &proof {
            Proof::Document { document, signature } => {
                self.check_document(&site, instance, &region, document, signature).map_err(EnrolError::Refused)?;
                if let Some(c) = store.agent_cert(site_id.to_owned(), instance.to_owned()).await?
                    && c.current_not_after_ms > now
                    && !c.reenrol_allowed
                {
                    return Err(EnrolError::Refused(format!(
                        "instance {instance} enrolled already and its certificate (serial {}) is valid until {}: an instance enrols once. \
                         If this machine lost its key, `drctl allow-enrol {site_id} {instance}` lets it enrol again",
                        c.current_serial,
                        crate::pki::ca::stamp(c.current_not_after_ms)
                    )));
                }
                BY_DOCUMENT
            }
            Proof::Token(token) => {
                store
                    .use_enrol_token(sha256_hex(token), site_id.to_owned(), instance.to_owned(), now)
                    .await?
                    .map_err(EnrolError::Refused)?;
                BY_TOKEN
            }
            Proof::None => {
                return Err(EnrolError::Invalid(
                    "no proof of instance: send the instance identity document and its signature, or an enrolment token".into(),
                ));
            }
        };
        let signer = self.require_signer()?;
        let identity = Identity::instance(&self.trust_domain, site_id, instance);
        let issued =
            signer.sign_csr(csr_der, &identity, self.config.agent_cert_lifetime).map_err(|e| EnrolError::Invalid(e.to_string()))?;
        store
            .put_enrolment(AgentCert {
                site_id: site_id.to_owned(),
                instance_id: instance.to_owned(),
                attestation: attestation.to_owned(),
                current_serial: issued.serial.clone(),
                current_not_after_ms: issued.not_after_ms,
                next_serial: String::new(),
                next_not_after_ms: 0,
                enrolled_at_ms: now,
                renewed_at_ms: now,
                renewal_error: String::new(),
                reenrol_allowed: false,
            })
            .await?;
        Ok(Enrolled { issued, attestation, trust_bundle_pem: self.trust_bundle() })
    }

    /// A renewal over an open stream: signs `csr` for the identity the
    /// stream was opened with and records it as the instance's next
    /// certificate before anyone hears of it.
    pub async fn renew(&self, store: &Store, identity: &Identity, csr_der: &[u8]) -> Result<Issued, String> {
        let IdentityRole::Instance { site, instance } = &identity.role else {
            return Err(format!("{identity} is not an instance certificate: enrol first"));
        };
        let signer = self.require_signer().map_err(|e| e.to_string())?;
        let issued = signer.sign_csr(csr_der, identity, self.config.agent_cert_lifetime).map_err(|e| e.to_string())?;
        store
            .put_renewal(site.clone(), instance.clone(), issued.serial.clone(), issued.not_after_ms, now_ms())
            .await
            .map_err(|e| format!("cannot record the renewal: {e}"))?;
        Ok(issued)
    }

    /// Makes a one-time token for (site, instance); returns it (shown once).
    pub async fn make_token(
        &self,
        store: &Store,
        site_id: &str,
        instance: &str,
        by: &str,
        expires_at_ms: Millis,
    ) -> Result<String, EnrolError> {
        let bytes: [u8; 24] = rand::random();
        let token = format!("drt_{}", hex::encode(bytes));
        store.put_enrol_token(sha256_hex(&token), site_id.to_owned(), instance.to_owned(), by.to_owned(), expires_at_ms).await?;
        Ok(token)
    }
}

/// Whether the chain (leaf first) verifies under the roots of `root_pem`
/// alone (which CA a certificate in use chains to, in a rotation).
pub fn chains_to(chain: &[rustls::pki_types::CertificateDer<'_>], root_pem: &str) -> bool {
    let Ok(roots) = dr_proto::tls::parse_certs(root_pem.as_bytes(), std::path::Path::new("root")) else { return false };
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        if store.add(r).is_err() {
            return false;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let Ok(verifier) = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider).build() else { return false };
    let Some((leaf, rest)) = chain.split_first() else { return false };
    let now = rustls::pki_types::UnixTime::now();
    verifier.verify_client_cert(leaf, rest, now).is_ok()
}

/// A serial as the controller records it: lower-case hex bytes joined by
/// `:` (input may omit the colons).
pub fn normalize_serial(s: &str) -> Result<String, String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{s}` is not a certificate serial (hex bytes, e.g. 4f:a0:...)"));
    }
    Ok(hex.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap_or("")).collect::<Vec<_>>().join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_normalize() {
        assert_eq!(normalize_serial("4FA0:01").as_deref(), Ok("4f:a0:01"));
        assert_eq!(normalize_serial("4f:a0:01").as_deref(), Ok("4f:a0:01"));
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("abc").is_err());
    }
}
