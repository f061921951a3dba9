//! The instance's own certificate: enrolment, renewal, and the files.
//!
//! `state_dir/credentials/` holds `instance.pem` (the certificate and its CA
//! chain), `instance.key` (mode 0600, generated here: the private key never
//! leaves the machine), `trust.pem` (the roots the controller sent) and,
//! while a renewed pair has not yet worked, `previous.pem`/`previous.key`.
//! Every file is written crash-safely (temp file, fsync, rename, fsync of
//! the directory).
//!
//! Renewal is due at half of the certificate's lifetime, ±10 % (a fleet
//! installed in one go does not renew in one go), and at once when past it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dr_proto::identity::{Identity, Role as IdentityRole};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialsError {
    #[error("{0}")]
    Io(String),
    #[error("the new certificate is not acceptable: {0}")]
    Rejected(String),
    #[error("key generation: {0}")]
    Key(String),
}

/// A certificate the agent holds, with its key.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub identity: Identity,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Held {
    /// Reads a certificate chain and key from PEM (None when unusable).
    pub fn parse(chain_pem: Vec<u8>, key_pem: Vec<u8>) -> Option<Held> {
        let leaf = CertificateDer::pem_slice_iter(&chain_pem).next()?.ok()?;
        let presented = dr_proto::tls::PresentedCert::from_der(leaf.as_ref())?;
        let identity = presented.identity.ok()?;
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        Some(Held {
            chain_pem,
            key_pem,
            identity,
            serial: presented.serial,
            not_before: at(presented.not_before_ms),
            not_after: at(presented.not_after_ms),
        })
    }

    /// Whether it is valid at `now` (with a margin for the controller's clock).
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now + Duration::from_secs(5) < self.not_after && now + Duration::from_secs(60) >= self.not_before
    }

    /// The instance this certificate is for (instance certificates only).
    pub fn instance(&self) -> Option<&str> {
        self.identity.instance_id()
    }

    pub fn site(&self) -> Option<&str> {
        match &self.identity.role {
            IdentityRole::Site(s) | IdentityRole::Instance { site: s, .. } => Some(s),
            IdentityRole::Operator(_) => None,
        }
    }

    /// When to renew: at `0.5 * (1 + jitter)` of the lifetime, `jitter` in
    /// [-0.1, 0.1].
    pub fn renew_at(&self, jitter: f64) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life.mul_f64(0.5 * (1.0 + jitter.clamp(-0.1, 0.1)))
    }
}

/// The credentials directory.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    dir: PathBuf,
}

const CERT: &str = "instance.pem";
const KEY: &str = "instance.key";
const PREVIOUS_CERT: &str = "previous.pem";
const PREVIOUS_KEY: &str = "previous.key";
const TRUST: &str = "trust.pem";

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, CredentialsError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CredentialsError::Io(format!("cannot read {}: {e}", path.display()))),
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CredentialsError> {
    crate::sys::atomic::write(path, bytes, mode).map_err(|e| CredentialsError::Io(e.to_string()))
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store { dir: state_dir.join("credentials") }
    }

    fn pair(&self, cert: &str, key: &str) -> Result<Option<Held>, CredentialsError> {
        match (read_opt(&self.dir.join(cert))?, read_opt(&self.dir.join(key))?) {
            (Some(c), Some(k)) => Ok(Held::parse(c, k)),
            _ => Ok(None),
        }
    }

    /// The instance's certificate, if any.
    pub fn current(&self) -> Result<Option<Held>, CredentialsError> {
        self.pair(CERT, KEY)
    }

    /// The pair before the last renewal, kept until the new one worked.
    pub fn previous(&self) -> Result<Option<Held>, CredentialsError> {
        self.pair(PREVIOUS_CERT, PREVIOUS_KEY)
    }

    /// The roots to verify the controller with: what it sent, else the
    /// configured file.
    pub fn trust_bundle(&self, configured: &Path) -> Result<Vec<u8>, CredentialsError> {
        match read_opt(&self.dir.join(TRUST))? {
            Some(b) if !b.is_empty() => Ok(b),
            _ => std::fs::read(configured).map_err(|e| CredentialsError::Io(format!("cannot read {}: {e}", configured.display()))),
        }
    }

    /// Installs a new pair; the current one (if any) becomes the previous.
    pub fn install(&self, new: &Held, trust_bundle_pem: &str) -> Result<(), CredentialsError> {
        if let Some(cur) = self.current()? {
            write(&self.dir.join(PREVIOUS_KEY), &cur.key_pem, 0o600)?;
            write(&self.dir.join(PREVIOUS_CERT), &cur.chain_pem, 0o644)?;
        }
        write(&self.dir.join(KEY), &new.key_pem, 0o600)?;
        write(&self.dir.join(CERT), &new.chain_pem, 0o644)?;
        if !trust_bundle_pem.trim().is_empty() {
            write(&self.dir.join(TRUST), trust_bundle_pem.as_bytes(), 0o644)?;
        }
        Ok(())
    }

    /// Stores the roots the controller sent (a CA rotation); returns how
    /// many certificates the bundle holds. A bundle that does not parse is
    /// refused and nothing changes.
    pub fn set_trust(&self, roots_pem: &str) -> Result<usize, CredentialsError> {
        let certs = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CredentialsError::Rejected(format!("the trust bundle: {e}")))?;
        if certs.is_empty() {
            return Err(CredentialsError::Rejected("the trust bundle holds no certificate".into()));
        }
        write(&self.dir.join(TRUST), roots_pem.as_bytes(), 0o644)?;
        Ok(certs.len())
    }

    /// The new pair worked: the previous one goes.
    pub fn confirm(&self) {
        for f in [PREVIOUS_CERT, PREVIOUS_KEY] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
    }

    /// The certificate was refused for good: it is moved aside
    /// (`instance.pem.refused`, kept for a human) so that the next attempt
    /// enrols.
    pub fn discard(&self) -> Result<(), CredentialsError> {
        for f in [CERT, KEY] {
            let from = self.dir.join(f);
            if from.exists() {
                std::fs::rename(&from, self.dir.join(format!("{f}.refused")))
                    .map_err(|e| CredentialsError::Io(format!("cannot move {} aside: {e}", from.display())))?;
            }
        }
        Ok(())
    }

    /// The new pair was refused: the previous one comes back.
    pub fn roll_back(&self) -> Result<bool, CredentialsError> {
        let Some(prev) = self.previous()? else { return Ok(false) };
        write(&self.dir.join(KEY), &prev.key_pem, 0o600)?;
        write(&self.dir.join(CERT), &prev.chain_pem, 0o644)?;
        self.confirm();
        Ok(true)
    }
}

/// A new P-256 key (PEM) and a CSR for it (DER). The CSR names nothing the
/// controller uses: it signs for the identity it knows.
pub(crate) fn new_key_and_csr() -> Result<(String, Vec<u8>), CredentialsError> {
    let key = rcgen::KeyPair::generate().map_err(|e| CredentialsError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key).map_err(|e| CredentialsError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Checks a certificate the controller sent before it is used, with the
/// verifier the controller uses for client certificates: it must chain to
/// `trust_pem`, be valid now, name `site` and `instance`, and match `key_pem`.
pub(crate) fn accept(chain_pem: &str, key_pem: String, trust_pem: &[u8], site: &str, instance: &str) -> Result<Held, CredentialsError> {
    let bad = |m: String| CredentialsError::Rejected(m);
    let held = Held::parse(chain_pem.as_bytes().to_vec(), key_pem.into_bytes()).ok_or_else(|| bad("it does not parse".into()))?;
    if held.identity.role != (IdentityRole::Instance { site: site.to_owned(), instance: instance.to_owned() }) {
        return Err(bad(format!("it is for {}, not site `{site}` instance {instance}", held.identity)));
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&held.chain_pem).collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&held.key_pem).map_err(|e| bad(e.to_string()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| bad(format!("its key does not match: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_slice_iter(trust_pem) {
        roots.add(r.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), std::sync::Arc::new(provider))
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let now = UnixTime::since_unix_epoch(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    verifier.verify_client_cert(&chain[0], &chain[1..], now).map_err(|e| bad(format!("it does not verify: {e}")))?;
    Ok(held)
}
