//! CA rotation without an outage, in phases (as Teleport rotates its CAs):
//!
//! | phase            | roots trusted | issues with | presents        | agents are told            |
//! |------------------|---------------|-------------|-----------------|----------------------------|
//! | `init`           | old + new     | old         | old             | both roots; acknowledge    |
//! | `update_clients` | old + new     | new         | old             | both roots; renew now      |
//! | `update_servers` | old + new     | new         | new             | both roots; renew now      |
//! | `complete`       | new           | new         | new             | the new root only          |
//! | `rollback`       | old + new     | old         | old             | both roots; renew now      |
//!
//! Each advance is refused while its condition does not hold (unless
//! forced): `init` → `update_clients` once every enrolled instance
//! acknowledged both roots; `update_servers` → `complete` once no live
//! session's certificate chains to the old root; `rollback` → none once no
//! live session's certificate chains to the new root. A rollback is possible
//! until `complete`. The phase is in the store (`ca_rotation`), applied
//! again at start; the new intermediate's files are kept in the store's
//! directory (`pki/rotation-<ms>/`, key mode 0600).

use std::path::PathBuf;
use std::sync::Arc;

use super::certs::OwnCert;
use crate::agents::Registry;
use crate::agents::enrol::{Authority, TrustState, chains_to};
use crate::domain::model::{Millis, now_ms};
use crate::pki::Signer;
use crate::store::{RotationRecord, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Init,
    UpdateClients,
    UpdateServers,
    Complete,
    Rollback,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Init => "init",
            Phase::UpdateClients => "update_clients",
            Phase::UpdateServers => "update_servers",
            Phase::Complete => "complete",
            Phase::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        [Phase::Init, Phase::UpdateClients, Phase::UpdateServers, Phase::Complete, Phase::Rollback].into_iter().find(|p| p.as_str() == s)
    }
}

/// What `drctl status` and `drctl rotate-ca` show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationView {
    /// "" when no rotation was ever made.
    pub phase: String,
    pub since_ms: Millis,
    pub not_acknowledged: Vec<String>,
    pub on_old_root: Vec<String>,
    pub next: String,
}

/// Drives the rotation.
#[derive(Clone)]
pub struct Rotator {
    pub store: Store,
    pub registry: Registry,
    pub authority: Arc<Authority>,
    pub own: OwnCert,
    /// The signer of the configuration (`pki.intermediate_*`): what a
    /// rollback issues with.
    pub configured: Option<Arc<Signer>>,
    /// Where new intermediates are kept.
    pub dir: PathBuf,
}

fn both(old: &str, new: &str) -> String {
    format!("{}\n{}", old.trim_end(), new.trim_end()) + "\n"
}

impl Rotator {
    fn new_signer(&self, r: &RotationRecord) -> Result<Arc<Signer>, String> {
        Signer::load(std::path::Path::new(&r.new_cert_path), std::path::Path::new(&r.new_key_path), &self.authority.trust_domain)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    /// Applies a phase: signer, roots (agents' bundle and the listener's),
    /// the controller's own certificate; sends the bundle to live agents.
    async fn apply(&self, r: &RotationRecord) -> Result<(), String> {
        let phase = Phase::parse(&r.phase).ok_or_else(|| format!("unknown rotation phase `{}` in the store", r.phase))?;
        let new_signer = self.new_signer(r)?;
        let old_signer = self.configured.clone().ok_or("no intermediate is configured (pki.intermediate_cert)")?;
        let (roots, signer, present_new, renew_now) = match phase {
            Phase::Init => (both(&r.old_roots_pem, &r.new_root_pem), old_signer.clone(), None, false),
            Phase::UpdateClients => (both(&r.old_roots_pem, &r.new_root_pem), new_signer.clone(), None, true),
            Phase::UpdateServers => (both(&r.old_roots_pem, &r.new_root_pem), new_signer.clone(), Some(true), true),
            Phase::Complete => (r.new_root_pem.clone(), new_signer.clone(), Some(true), false),
            Phase::Rollback => (both(&r.old_roots_pem, &r.new_root_pem), old_signer.clone(), Some(false), true),
        };
        let parsed = dr_proto::tls::parse_certs(roots.as_bytes(), std::path::Path::new("trust bundle")).map_err(|e| e.to_string())?;
        self.own.tls.set_roots(parsed).map_err(|e| e.to_string())?;
        self.authority.set_signer(signer);
        if let Some(new) = present_new {
            let (s, root) = if new { (&new_signer, &r.new_root_pem) } else { (&old_signer, &r.old_roots_pem) };
            let mut chain = vec![self.own.tls.certificate()];
            chain.extend(s.chain().iter().cloned());
            if !chains_to(&chain, root) {
                super::certs::renew_with(&self.own, s)?;
                tracing::info!(
                    phase = phase.as_str(),
                    "the controller now presents a certificate of the {} CA",
                    if new { "new" } else { "old" }
                );
            }
        }
        let trust = TrustState::new(roots, renew_now, true);
        self.authority.set_trust(trust.clone());
        let sent = self.registry.push_trust(&trust);
        tracing::warn!(phase = phase.as_str(), agents = sent, "CA rotation phase applied; live agents sent the trust bundle");
        Ok(())
    }

    /// At start: the recorded phase, applied again.
    pub async fn resume(&self) -> Result<(), String> {
        match self.store.rotation().await.map_err(|e| e.to_string())? {
            Some(r) => self.apply(&r).await,
            None => Ok(()),
        }
    }

    /// The rotation as status shows it.
    pub async fn view(&self) -> Result<RotationView, String> {
        let Some(r) = self.store.rotation().await.map_err(|e| e.to_string())? else { return Ok(RotationView::default()) };
        let phase = Phase::parse(&r.phase);
        let trust = self.authority.trust_state();
        let acks = self.store.trust_acks().await.map_err(|e| e.to_string())?;
        let now = now_ms();
        let mut not_acknowledged: Vec<String> = self
            .store
            .agent_certs()
            .await
            .map_err(|e| e.to_string())?
            .into_values()
            .filter(|c| c.current_not_after_ms > now)
            .filter(|c| acks.get(&(c.site_id.clone(), c.instance_id.clone())) != Some(&trust.id))
            .map(|c| format!("{}/{}", c.site_id, c.instance_id))
            .collect();
        not_acknowledged.sort();
        // The root being dropped: the old one going forward, the new one
        // in a rollback.
        let dropping = if phase == Some(Phase::Rollback) { &r.new_root_pem } else { &r.old_roots_pem };
        let mut on_old_root: Vec<String> = self
            .registry
            .chains()
            .into_iter()
            .filter(|(_, _, chain)| chains_to(chain, dropping))
            .map(|(site, inst, _)| format!("{site}/{inst}"))
            .collect();
        on_old_root.sort();
        let next = match phase {
            Some(Phase::Init) => "advance to update_clients once every instance acknowledged both roots".to_owned(),
            Some(Phase::UpdateClients) => {
                "advance to update_servers (the controller then presents a certificate of the new CA); add the new root to drctl's CA file first".to_owned()
            }
            Some(Phase::UpdateServers) => {
                "advance to complete once no live agent certificate chains to the old root; give operators certificates of the new root first".to_owned()
            }
            Some(Phase::Complete) => "done: point pki.intermediate_cert/_key and tls.ca of the config at the new CA".to_owned(),
            Some(Phase::Rollback) => "advance to end the rollback once no live agent certificate chains to the new root".to_owned(),
            None => String::new(),
        };
        Ok(RotationView { phase: r.phase, since_ms: r.since_ms, not_acknowledged, on_old_root, next })
    }

    /// Begins a rotation to `new_root_pem`, the new intermediate (cert and
    /// key PEM) signed by it.
    pub async fn start(&self, new_root_pem: &str, int_cert_pem: &str, int_key_pem: &str) -> Result<RotationView, String> {
        if let Some(r) = self.store.rotation().await.map_err(|e| e.to_string())?
            && r.phase != Phase::Complete.as_str()
        {
            return Err(format!("a rotation is in progress (phase {}): advance it to the end or roll it back first", r.phase));
        }
        let key = rcgen::KeyPair::from_pem(int_key_pem).map_err(|e| format!("the new intermediate's key: {e}"))?;
        let signer = Signer::from_pem(int_cert_pem, key, &self.authority.trust_domain).map_err(|e| format!("the new intermediate: {e}"))?;
        dr_proto::tls::parse_certs(new_root_pem.as_bytes(), std::path::Path::new("new root")).map_err(|e| e.to_string())?;
        // The new intermediate must chain to the new root: a test
        // certificate made with it has to verify there.
        let probe = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let csr = rcgen::CertificateParams::default().serialize_request(&probe).map_err(|e| e.to_string())?;
        let id = dr_proto::identity::Identity::instance(&self.authority.trust_domain, "rotation-check", "i-00000000");
        let issued = signer.sign_csr(csr.der(), &id, std::time::Duration::from_secs(300)).map_err(|e| e.to_string())?;
        let chain = dr_proto::tls::parse_certs(issued.chain_pem.as_bytes(), std::path::Path::new("probe")).map_err(|e| e.to_string())?;
        if !chains_to(&chain, new_root_pem) {
            return Err(
                "the new intermediate does not chain to the new root (make it with `drctl pki intermediate --dir NEW_ROOT_DIR`)".into()
            );
        }
        let old_roots = self.authority.trust_bundle();
        if chains_to(&chain, &old_roots) {
            return Err("the new root is already trusted: nothing to rotate to".into());
        }
        let since = now_ms();
        let dir = self.dir.join(format!("rotation-{since}"));
        let write = |name: &str, bytes: &str, mode: u32| super::certs::write_file(&dir.join(name), bytes.as_bytes(), mode);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write("ca.pem", int_cert_pem, 0o644)?;
        write("ca.key", int_key_pem, 0o600)?;
        write("root.pem", new_root_pem, 0o644)?;
        let record = RotationRecord {
            phase: Phase::Init.as_str().to_owned(),
            since_ms: since,
            old_roots_pem: old_roots,
            new_root_pem: new_root_pem.to_owned(),
            new_cert_path: dir.join("ca.pem").display().to_string(),
            new_key_path: dir.join("ca.key").display().to_string(),
        };
        self.store.put_rotation(Some(record.clone())).await.map_err(|e| e.to_string())?;
        self.apply(&record).await?;
        self.view().await
    }

    /// The next phase, when its condition holds (or `force`).
    pub async fn advance(&self, force: bool) -> Result<RotationView, String> {
        let mut r = self.store.rotation().await.map_err(|e| e.to_string())?.ok_or("no CA rotation is in progress")?;
        let view = self.view().await?;
        let next = match Phase::parse(&r.phase) {
            Some(Phase::Init) => {
                if !view.not_acknowledged.is_empty() && !force {
                    return Err(format!("not every instance has the new root yet: {}", view.not_acknowledged.join(", ")));
                }
                Some(Phase::UpdateClients)
            }
            Some(Phase::UpdateClients) => Some(Phase::UpdateServers),
            Some(Phase::UpdateServers) => {
                if !view.on_old_root.is_empty() && !force {
                    return Err(format!("live agent certificates still chain to the old root: {}", view.on_old_root.join(", ")));
                }
                Some(Phase::Complete)
            }
            Some(Phase::Rollback) => {
                if !view.on_old_root.is_empty() && !force {
                    return Err(format!("live agent certificates still chain to the new root: {}", view.on_old_root.join(", ")));
                }
                None
            }
            Some(Phase::Complete) => return Err("the rotation is complete".into()),
            None => return Err(format!("unknown rotation phase `{}`", r.phase)),
        };
        match next {
            Some(p) => {
                r.phase = p.as_str().to_owned();
                r.since_ms = now_ms();
                self.store.put_rotation(Some(r.clone())).await.map_err(|e| e.to_string())?;
                self.apply(&r).await?;
            }
            None => {
                // The rollback ends: back to the old roots only.
                self.store.put_rotation(None).await.map_err(|e| e.to_string())?;
                let old = r.old_roots_pem.clone();
                let parsed = dr_proto::tls::parse_certs(old.as_bytes(), std::path::Path::new("trust bundle")).map_err(|e| e.to_string())?;
                self.own.tls.set_roots(parsed).map_err(|e| e.to_string())?;
                let trust = TrustState::new(old, false, true);
                self.authority.set_trust(trust.clone());
                self.registry.push_trust(&trust);
                tracing::warn!("CA rotation rolled back: the old root only");
            }
        }
        self.view().await
    }

    /// Back to the old CA, from any phase but `complete`.
    pub async fn rollback(&self) -> Result<RotationView, String> {
        let mut r = self.store.rotation().await.map_err(|e| e.to_string())?.ok_or("no CA rotation is in progress")?;
        match Phase::parse(&r.phase) {
            Some(Phase::Complete) => return Err("the rotation is complete: the old root is gone; rotate again to go back".into()),
            Some(Phase::Rollback) => return Err("a rollback is in progress".into()),
            _ => {}
        }
        r.phase = Phase::Rollback.as_str().to_owned();
        r.since_ms = now_ms();
        self.store.put_rotation(Some(r.clone())).await.map_err(|e| e.to_string())?;
        self.apply(&r).await?;
        self.view().await
    }
}
